//! The policy audit log on disk: `audit.log` in the data directory, one
//! JSON entry per line, appended and fsynced whenever the node adopts a
//! policy set. Entries are chained with blake3 (see
//! `lattice_core::policy::audit`), so editing, removing or reordering lines
//! is detected by `lattice audit verify` and by the node at start.

use lattice_core::policy::audit::{self, AuditEntry, AuditKey};
use lattice_core::policy::signed::PolicySignature;
use lattice_core::policy::PolicySet;
use lattice_core::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest audit log part read into memory whole: what the node serves to
/// `lattice audit verify` (the current part, which the node keeps under
/// [`CHECKPOINT_BYTES`] plus one entry). Opening and `latticed audit
/// verify` never read a part whole: they stream it one entry at a time, so
/// a part of any size (left by an older version, or grown while archiving
/// failed) neither keeps the node from starting nor fills its memory.
pub const MAX_AUDIT_BYTES: u64 = 64 << 20;

/// Size past which `audit.log` is archived (renamed to
/// `audit.<first index>.log`): before an append that would pass it, and at
/// open for a part found already past it. So the part read at start and
/// served stays far below [`MAX_AUDIT_BYTES`] however many sets are
/// adopted.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

/// Longest line read as one entry. An entry is under 512 KiB of JSON even
/// if every byte of a set's strings needs a 6-byte escape, so a longer
/// line is not one a node wrote: it is refused rather than buffered.
pub const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// The log and its newest entry.
pub struct AuditLog {
    path: PathBuf,
    dir: PathBuf,
    last: Option<AuditEntry>,
    /// The last entry of the archived parts: the current part follows it.
    base: Option<AuditEntry>,
    /// The index of the current part's first entry (`None`: it is empty).
    first: Option<u64>,
    /// Bytes in the current part.
    size: u64,
    checkpoint: u64,
    /// Where the newest entry's hash (and the archive base) is also kept
    /// (in sled), so that entries removed from the end of the file are
    /// detected too.
    head: Option<sled::Tree>,
    /// The audit key: entries are keyed with it and must all be keyed.
    key: Option<AuditKey>,
}

/// What one pass over a part found: the few entries the checks at open
/// need, never the whole part.
#[derive(Default)]
struct Part {
    first: Option<AuditEntry>,
    before_last: Option<AuditEntry>,
    last: Option<AuditEntry>,
    /// Bytes up to the end of the last complete line.
    complete: u64,
}

impl Part {
    fn of(entries: &[AuditEntry]) -> Part {
        let n = entries.len();
        Part {
            first: entries.first().cloned(),
            before_last: n.checked_sub(2).map(|i| entries[i].clone()),
            last: entries.last().cloned(),
            complete: 0,
        }
    }
}

/// Reads the part at `path` (absent: empty) one line at a time, checks
/// each entry against the one before it in the part (the first only
/// against its own hash: what it follows is the caller's to check), and
/// calls `each` on it. Holds one line (at most [`MAX_ENTRY_BYTES`]) and
/// three entries, whatever the part's size. A last line without its
/// newline is a write torn by a crash: it is left out, and
/// [`Part::complete`] says where it starts.
fn scan(
    path: &Path,
    key: Option<&AuditKey>,
    mut each: impl FnMut(&AuditEntry) -> Result<(), Error>,
) -> Result<Part, Error> {
    use std::io::{BufRead, Read};
    let io = |e: std::io::Error| Error::Store(format!("{}: {e}", path.display()));
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Part::default()),
        Err(e) => return Err(io(e)),
    };
    let mut reader = std::io::BufReader::with_capacity(64 << 10, file);
    let mut part = Part::default();
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        let got = (&mut reader)
            .take(MAX_ENTRY_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(io)? as u64;
        if line.last() != Some(&b'\n') {
            if got > MAX_ENTRY_BYTES {
                return Err(Error::AuditBroken {
                    index: part.last.as_ref().map_or(0, |e| e.index + 1),
                    reason: format!("line {number} is longer than {MAX_ENTRY_BYTES} bytes"),
                });
            }
            break; // the end, or a torn last line
        }
        part.complete += got;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let e: AuditEntry = serde_json::from_slice(&line).map_err(|e| Error::AuditBroken {
            index: number - 1,
            reason: format!("line {number} does not parse: {e}"),
        })?;
        if key.is_none() && e.keyed {
            return Err(Error::AuditBroken {
                index: e.index,
                reason: "the entry is keyed, and no audit key is configured (audit_key_file or LATTICE_AUDIT_KEY)"
                    .into(),
            });
        }
        match &part.last {
            Some(prev) => audit::verify_next(Some(prev), &e, key)?,
            None => audit::verify_entry(&e, key)?,
        }
        each(&e)?;
        if part.first.is_none() {
            part.first = Some(e.clone());
        }
        part.before_last = part.last.replace(e);
    }
    Ok(part)
}

/// Reads and parses every entry of the part at `path` (absent: none),
/// checking each against the one before it. For the part the node serves:
/// a part larger than [`MAX_AUDIT_BYTES`] is refused rather than read into
/// memory. A last line without its newline is left out.
pub fn read_entries(path: &Path, key: Option<&AuditKey>) -> Result<Vec<AuditEntry>, Error> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_AUDIT_BYTES => {
            return Err(Error::Store(format!(
                "{} is larger than {MAX_AUDIT_BYTES} bytes",
                path.display()
            )))
        }
        _ => {}
    }
    let mut entries = Vec::new();
    scan(path, key, |e| {
        entries.push(e.clone());
        Ok(())
    })?;
    Ok(entries)
}

/// The archived parts of the log in `data_dir`, oldest first.
pub fn archived_parts(data_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut parts: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir)
        .map_err(|e| Error::Store(format!("{}: {e}", data_dir.display())))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let first = name.strip_prefix("audit.")?.strip_suffix(".log")?.parse().ok()?;
            Some((first, e.path()))
        })
        .collect();
    parts.sort();
    Ok(parts.into_iter().map(|(_, p)| p).collect())
}

/// Verifies every part of the log in `data_dir`, archived ones first, as
/// one chain, streaming each part (so any size verifies in bounded
/// memory); calls `each` on every entry. Returns how many there are.
/// With `key`, every entry must be keyed with it; without, a keyed entry
/// is refused.
pub fn verify_dir(data_dir: &Path, key: Option<&AuditKey>, mut each: impl FnMut(&AuditEntry)) -> Result<u64, Error> {
    let mut base: Option<AuditEntry> = None;
    let mut n = 0;
    let mut parts = archived_parts(data_dir)?;
    parts.push(data_dir.join("audit.log"));
    for p in parts {
        let mut at_start = true;
        let part = scan(&p, key, |e| {
            if at_start {
                // Each part's first entry follows the last of the part before.
                audit::verify_next(base.as_ref(), e, key)?;
                at_start = false;
            }
            n += 1;
            each(e);
            Ok(())
        })?;
        if let Some(last) = part.last {
            base = Some(last);
        }
    }
    Ok(n)
}

const HEAD: &[u8] = b"head";
const BASE: &[u8] = b"base";

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Store(format!("{}: {e}", dir.display())))
}

impl AuditLog {
    /// Opens the log in `data_dir`, verifying the whole current part (from
    /// the archived base) one entry at a time and, with `head`, that
    /// nothing was cut off its end. Crash states are finished rather than
    /// refused: a torn last line is cut off, an entry the file holds one
    /// past the recorded head (a crash between the file's fsync and the
    /// head's flush) rolls the head forward, and an archive begun but not
    /// renamed is renamed. A part found past [`CHECKPOINT_BYTES`] (any
    /// size: from an older version, or grown while archiving failed) is
    /// archived at once, so what is served stays small.
    ///
    /// With `key`, every entry must be keyed with it (an unkeyed log is
    /// refused: move it aside to start a keyed one) and new entries are
    /// keyed; without, a keyed entry is refused.
    pub fn open(data_dir: &Path, head: Option<sled::Tree>, key: Option<AuditKey>) -> Result<AuditLog, Error> {
        let path = data_dir.join("audit.log");
        let io = |e: std::io::Error| Error::Store(format!("{}: {e}", path.display()));
        let mut log = AuditLog {
            path: path.clone(),
            dir: data_dir.to_path_buf(),
            last: None,
            base: None,
            first: None,
            size: 0,
            checkpoint: CHECKPOINT_BYTES,
            head,
            key,
        };
        log.base = log.recorded_base()?;
        let mut part = scan(&path, log.key.as_ref(), |_| Ok(()))?;
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        if len > part.complete {
            // A torn last line (a crash in the middle of an append).
            let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
            f.set_len(part.complete).map_err(io)?;
            tracing::warn!(path = %path.display(), "cut a torn last line off the audit log");
        }
        if let (Some(b), Some(first), Some(last)) = (&log.base, &part.first, &part.last) {
            if first.index < b.index + 1 && last.hash == b.hash {
                // A crash after the base was recorded, before the rename.
                log.archive(first.index)?;
                part = Part::default();
            }
        }
        if let Some(b) = &log.base {
            audit::verify_entry(b, log.key.as_ref())?;
        }
        if let Some(first) = &part.first {
            audit::verify_next(log.base.as_ref(), first, log.key.as_ref())?;
        }
        log.check_head(&part, true)?;
        log.size = part.complete;
        log.first = part.first.map(|e| e.index);
        log.last = part.last.or_else(|| log.base.clone());
        if log.size > log.checkpoint && log.first.is_some() {
            let size = log.size;
            match log.checkpoint() {
                Ok(()) => tracing::warn!(
                    bytes = size,
                    "the audit log was past its checkpoint size at start: archived it"
                ),
                // Still a verified log: start, and try again at the next append.
                Err(e) => tracing::error!(error = %e, "could not archive the oversized audit log"),
            }
        }
        Ok(log)
    }

    /// For tests: archive past `bytes` instead of [`CHECKPOINT_BYTES`].
    pub fn with_checkpoint(mut self, bytes: u64) -> AuditLog {
        self.checkpoint = bytes;
        self
    }

    fn recorded_base(&self) -> Result<Option<AuditEntry>, Error> {
        let Some(t) = &self.head else { return Ok(None) };
        match t.get(BASE).map_err(store_err)? {
            Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|e| Error::AuditBroken {
                index: 0,
                reason: format!("the recorded archive base does not parse: {e}"),
            }),
            None => Ok(None),
        }
    }

    /// Checks the recorded head against the current part; with
    /// `roll_forward`, exactly one entry past the head is accepted and
    /// recorded (its append reached the file but not sled).
    fn check_head(&self, part: &Part, roll_forward: bool) -> Result<(), Error> {
        let Some(t) = &self.head else { return Ok(()) };
        let Some(raw) = t.get(HEAD).map_err(store_err)? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (index, hash) = text.split_once(' ').unwrap_or(("0", ""));
        let index: u64 = index.parse().unwrap_or(0);
        let newest = part.last.as_ref().or(self.base.as_ref());
        // Only the newest entry and the one before can match a head that
        // passes, so those are all a part keeps.
        let at = |i: u64| {
            [self.base.as_ref(), part.before_last.as_ref(), part.last.as_ref()]
                .into_iter()
                .flatten()
                .find(|e| e.index == i)
        };
        let found = at(index).map(|e| e.hash.as_str());
        let newest_index = newest.map(|e| e.index);
        if found == Some(hash) && newest_index == Some(index) {
            return Ok(());
        }
        if roll_forward && found == Some(hash) && newest_index == Some(index + 1) {
            if let Some(e) = newest {
                tracing::warn!(
                    index = e.index,
                    "the audit log holds one entry past its recorded head (a crash before the head was flushed): rolling the head forward"
                );
                self.record_head(e)?;
                return Ok(());
            }
        }
        Err(Error::AuditBroken {
            index,
            reason: format!(
                "the log ends at entry {} but its recorded head is entry {index}: entries were removed or added",
                newest_index.map_or_else(|| "(none)".to_string(), |i| i.to_string())
            ),
        })
    }

    fn record_head(&self, e: &AuditEntry) -> Result<(), Error> {
        if let Some(t) = &self.head {
            t.insert(HEAD, format!("{} {}", e.index, e.hash).as_bytes())
                .map_err(store_err)?;
            t.flush().map_err(store_err)?;
        }
        Ok(())
    }

    /// Renames the current part (whose first entry is `first`) to its
    /// archive name, durably.
    fn archive(&self, first: u64) -> Result<(), Error> {
        let to = self.dir.join(format!("audit.{first:020}.log"));
        std::fs::rename(&self.path, &to).map_err(|e| Error::Store(format!("{}: {e}", to.display())))?;
        sync_dir(&self.dir)
    }

    /// Archives the current part: records its last entry as the base
    /// first, so that a crash at any point leaves a state `open` accepts.
    fn checkpoint(&mut self) -> Result<(), Error> {
        let Some(last) = self.last.clone() else { return Ok(()) };
        let first = self.first.unwrap_or(last.index);
        if let Some(t) = &self.head {
            let json = serde_json::to_vec(&last).map_err(|e| Error::Codec(e.to_string()))?;
            t.insert(BASE, json).map_err(store_err)?;
            t.flush().map_err(store_err)?;
        }
        self.archive(first)?;
        self.base = Some(last);
        self.first = None;
        self.size = 0;
        Ok(())
    }

    /// The newest entry.
    pub fn last(&self) -> Option<&AuditEntry> {
        self.last.as_ref()
    }

    /// The policy of the newest entry.
    pub fn last_policy(&self) -> Option<&PolicySet> {
        self.last.as_ref().map(|e| &e.policy)
    }

    /// Appends (and fsyncs) an entry for `policy`, then records it as the
    /// head. Archives the current part first if the entry would take it
    /// past the checkpoint size.
    pub fn append(
        &mut self,
        node: &str,
        source: &str,
        policy: PolicySet,
        signature: Option<PolicySignature>,
    ) -> Result<(), Error> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entry = AuditEntry::next(
            self.last.as_ref(),
            at_ms,
            node,
            source,
            policy,
            signature,
            self.key.as_ref(),
        );
        let mut line = serde_json::to_string(&entry).map_err(|e| Error::Codec(e.to_string()))?;
        line.push('\n');
        if self.size > 0 && self.size + line.len() as u64 > self.checkpoint {
            self.checkpoint()?;
        }
        let io = |e: std::io::Error| Error::Store(format!("{}: {e}", self.path.display()));
        let created = self.size == 0;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        if created {
            sync_dir(&self.dir)?;
        }
        self.size += line.len() as u64;
        self.first.get_or_insert(entry.index);
        self.record_head(&entry)?;
        self.last = Some(entry);
        Ok(())
    }

    /// The current part's entries, read back from disk (so tampering since
    /// start shows), verified from the archived base, and that the file
    /// ends at the recorded head. When older entries are archived, the
    /// base comes first (see
    /// [`verify_served`](lattice_core::policy::audit::verify_served)).
    pub fn entries(&self) -> Result<Vec<AuditEntry>, Error> {
        let entries = read_entries(&self.path, self.key.as_ref())?;
        audit::verify_from(self.base.as_ref(), &entries, self.key.as_ref())?;
        self.check_head(&Part::of(&entries), false)?;
        Ok(self.base.iter().cloned().chain(entries).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::policy::{Policy, Priority, Regions};

    #[test]
    fn appended_entries_verify_and_an_edit_is_caught_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let mut log = AuditLog::open(dir.path(), head(), None).unwrap();
        log.append("n1", "config", PolicySet::default(), None).unwrap();
        let set = PolicySet::new(2, vec![Policy::new("eu/", Regions::Local, Priority::Critical)]).unwrap();
        log.append("n1", "admin", set.clone(), None).unwrap();
        log.append("n1", "admin", PolicySet::new(3, vec![]).unwrap(), None)
            .unwrap();
        let log = AuditLog::open(dir.path(), head(), None).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(3));
        let path = dir.path().join("audit.log");
        let version_at_open = || {
            AuditLog::open(dir.path(), head(), None)
                .unwrap()
                .last_policy()
                .map(|p| p.version)
        };
        let full = std::fs::read_to_string(&path).unwrap();
        // A torn append is cut off at open.
        std::fs::write(&path, format!("{full}{{\"index\": 3, \"pre")).unwrap();
        assert_eq!(version_at_open(), Some(3));
        // Removing the newest entry is caught by the recorded head.
        let kept: Vec<&str> = full.lines().take(2).collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head(), None),
            Err(Error::AuditBroken { index: 2, .. })
        ));
        std::fs::write(&path, &full).unwrap();
        assert_eq!(version_at_open(), Some(3));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"admin\"", "\"config\"")).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head(), None),
            Err(Error::AuditBroken { index: 1, .. })
        ));
    }

    #[test]
    fn a_crash_between_the_files_fsync_and_the_heads_flush_rolls_forward() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let mut log = AuditLog::open(dir.path(), head(), None).unwrap();
        log.append("n1", "config", PolicySet::default(), None).unwrap();
        log.append("n1", "admin", PolicySet::new(2, vec![]).unwrap(), None)
            .unwrap();
        let at_one = db.open_tree("audit").unwrap().get(HEAD).unwrap().unwrap();
        log.append("n1", "admin", PolicySet::new(3, vec![]).unwrap(), None)
            .unwrap();
        log.append("n1", "admin", PolicySet::new(4, vec![]).unwrap(), None)
            .unwrap();
        drop(log);
        let tree = db.open_tree("audit").unwrap();
        // Exactly one entry past the head: what the crash leaves.
        let at_two = format!(
            "2 {}",
            read_entries(&dir.path().join("audit.log"), None).unwrap()[2].hash
        );
        tree.insert(HEAD, at_two.as_bytes()).unwrap();
        let log = AuditLog::open(dir.path(), head(), None).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(4));
        assert!(tree.get(HEAD).unwrap().unwrap().starts_with(b"3 "), "rolled forward");
        assert_eq!(log.entries().unwrap().len(), 4);
        // Two past the head is not a crash: refused.
        tree.insert(HEAD, at_one).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head(), None),
            Err(Error::AuditBroken { index: 1, .. })
        ));
    }

    /// A crash after an archive's base was recorded, before the rename,
    /// is finished at open by archiving the part without re-reading it
    /// against the base: so the part's first entry, which nothing after it
    /// vouches for, must be checked against its own hash as it is read (an
    /// edit of it was archived unnoticed when that check was removed).
    #[test]
    fn an_edited_first_entry_is_refused_even_when_open_finishes_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let mut log = AuditLog::open(dir.path(), head(), None).unwrap();
        log.append("n1", "config", PolicySet::default(), None).unwrap();
        log.append("n1", "admin", PolicySet::new(2, vec![]).unwrap(), None)
            .unwrap();
        log.append("n1", "admin", PolicySet::new(3, vec![]).unwrap(), None)
            .unwrap();
        let last = log.last.clone().unwrap();
        drop(log);
        let tree = db.open_tree("audit").unwrap();
        tree.insert(BASE, serde_json::to_vec(&last).unwrap()).unwrap();
        let path = dir.path().join("audit.log");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("\"config\"").count(), 1);
        std::fs::write(&path, text.replace("\"config\"", "\"confix\"")).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head(), None),
            Err(Error::AuditBroken { index: 0, .. })
        ));
        assert!(path.exists(), "the edited part was not archived");
    }

    #[test]
    fn the_log_is_archived_at_its_checkpoint_and_still_verifies() {
        use lattice_core::policy::MAX_POLICY_SET_BYTES;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let checkpoint = 256 << 10;
        let mut log = AuditLog::open(dir.path(), head(), None)
            .unwrap()
            .with_checkpoint(checkpoint);
        // The largest sets a node accepts: 40 of them are ~2.5 MiB of log.
        let big = |v: u64| {
            let n = (MAX_POLICY_SET_BYTES - 1_000) / (900 + 32);
            let policies = (0..n)
                .map(|i| Policy::new(format!("{i:0>900}"), Regions::All, Priority::Normal))
                .collect();
            PolicySet::new(v, policies).unwrap()
        };
        for v in 1..=40 {
            log.append("n1", "admin", big(v), None).unwrap();
            let size = std::fs::metadata(dir.path().join("audit.log")).unwrap().len();
            assert!(size <= checkpoint + (2 * MAX_POLICY_SET_BYTES) as u64, "{size}");
        }
        assert!(archived_parts(dir.path()).unwrap().len() >= 5);
        let log = AuditLog::open(dir.path(), head(), None).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(40));
        let served = log.entries().unwrap();
        assert_eq!(
            lattice_core::policy::audit::verify_served(&served, None).map(|f| f > 0),
            Ok(true)
        );
        assert_eq!(verify_dir(dir.path(), None, |_| {}).unwrap(), 40);
        // A crash after the base was recorded, before the rename: finished at open.
        let tree = db.open_tree("audit").unwrap();
        let last = log.last.clone().unwrap();
        tree.insert(BASE, serde_json::to_vec(&last).unwrap()).unwrap();
        drop(log);
        let log = AuditLog::open(dir.path(), head(), None).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(40));
        assert!(!dir.path().join("audit.log").exists());
        assert_eq!(verify_dir(dir.path(), None, |_| {}).unwrap(), 40);
    }

    /// A set whose entry is close to the largest JSON line a node writes:
    /// 64 KiB of keyspace strings of control characters (6 bytes each).
    fn escaped(v: u64) -> PolicySet {
        use lattice_core::policy::MAX_POLICY_SET_BYTES;
        let n = (MAX_POLICY_SET_BYTES - 1_000) / (900 + 32);
        let policies = (0..n)
            .map(|i| Policy::new(format!("{i:\u{1}>900}"), Regions::All, Priority::Normal))
            .collect();
        PolicySet::new(v, policies).unwrap()
    }

    fn vm_hwm_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap_or("VmHWM: 0 kB");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    /// The peak RSS is the process's, and the other tests of this binary
    /// run beside this one in threads (one of them growing it by 100 MB
    /// failed this test in CI): the test runs again, alone, in a child
    /// process of this binary, and measures there.
    #[test]
    fn a_log_past_the_read_limit_opens_is_archived_and_still_verifies() {
        const NAME: &str = "audit::tests::a_log_past_the_read_limit_opens_is_archived_and_still_verifies";
        if std::env::var_os("LATTICE_AUDIT_ALONE").is_some() {
            return archived_log_opens_streamed();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env("LATTICE_AUDIT_ALONE", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        eprintln!("{stderr}");
        assert!(out.status.success(), "alone in a child process:\n{stdout}\n{stderr}");
        assert!(stdout.contains("1 passed"), "the child did not run the test:\n{stdout}");
    }

    fn archived_log_opens_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        // What an older version (no archiving) or failed archiving leaves:
        // one part past the read limit, written by the real append.
        let mut log = AuditLog::open(dir.path(), head(), None)
            .unwrap()
            .with_checkpoint(u64::MAX);
        let path = dir.path().join("audit.log");
        let mut v = 0;
        while std::fs::metadata(&path).map_or(0, |m| m.len()) <= MAX_AUDIT_BYTES + (1 << 20) {
            v += 1;
            log.append("n1", "admin", escaped(v), None).unwrap();
        }
        drop(log);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size > MAX_AUDIT_BYTES, "{size}");
        // Tampering in the middle of the big part still keeps the node closed.
        let flip = |path: &Path| {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
            let mut chunk = vec![0; 4096];
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.read_exact(&mut chunk).unwrap();
            let at = chunk.iter().position(|&b| b == b'"').unwrap() + 1;
            let hit = at + chunk[at..].iter().position(u8::is_ascii_alphanumeric).unwrap();
            chunk[hit] = if chunk[hit] == b'0' { b'1' } else { b'0' };
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.write_all(&chunk).unwrap();
            f.sync_all().unwrap();
        };
        let mut tampered = vec![0; 4096];
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path).unwrap();
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.read_exact(&mut tampered).unwrap();
        }
        flip(&path);
        assert!(matches!(
            AuditLog::open(dir.path(), head(), None),
            Err(Error::AuditBroken { .. })
        ));
        {
            use std::io::{Seek, SeekFrom};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.write_all(&tampered).unwrap();
        }
        // Streamed: opening reads far less than the part into memory (the
        // test has not read it either, so the peak is still the baseline).
        let before = vm_hwm_kib();
        let log = AuditLog::open(dir.path(), head(), None).unwrap();
        let grown = vm_hwm_kib().saturating_sub(before);
        eprintln!("audit.log of {size} bytes, {v} entries: opening grew the peak RSS by {grown} KiB");
        assert!(grown < 24 << 10, "opening grew the peak RSS by {grown} KiB");
        assert_eq!(log.last_policy().map(|p| p.version), Some(v));
        // Archived at open: the part served is small and chains to it.
        assert_eq!(archived_parts(dir.path()).unwrap().len(), 1);
        assert!(!path.exists() || std::fs::metadata(&path).unwrap().len() == 0);
        let served = log.entries().unwrap();
        assert_eq!(served.len(), 1, "the base only");
        drop(log);
        let mut log = AuditLog::open(dir.path(), head(), None).unwrap();
        log.append("n1", "admin", escaped(v + 1), None).unwrap();
        let served = log.entries().unwrap();
        assert_eq!(lattice_core::policy::audit::verify_served(&served, None), Ok(v - 1));
        assert_eq!(verify_dir(dir.path(), None, |_| {}).unwrap(), v + 1);
        // The archive is still checked, streamed, by `latticed audit verify`.
        let archive = archived_parts(dir.path()).unwrap().remove(0);
        let text = std::fs::read(&archive).unwrap();
        let mut edited = text.clone();
        let last_line = edited[..edited.len() - 1].iter().rposition(|&b| b == b'\n').unwrap();
        edited.truncate(last_line + 1);
        std::fs::write(&archive, &edited).unwrap();
        assert!(
            verify_dir(dir.path(), None, |_| {}).is_err(),
            "an archive's last entry removed"
        );
    }

    /// The audit log's read limits at their edge (SECURITY.md, "audit log
    /// at start"): a line of `MAX_ENTRY_BYTES` (its newline aside) is read,
    /// one byte more is refused as tampering naming the line; a part of
    /// exactly `MAX_AUDIT_BYTES` is served, one byte more is refused naming
    /// the limit. Blank lines (skipped by the reader) pad the part, as no
    /// entry a node writes comes near either limit.
    #[test]
    fn the_read_limits_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open(dir.path(), None, None)
            .unwrap()
            .append("n1", "config", PolicySet::default(), None)
            .unwrap();
        let entry = std::fs::read(&path).unwrap();
        let line = MAX_ENTRY_BYTES as usize;
        let blank = |n: usize| {
            let mut l = vec![b' '; n];
            l.push(b'\n');
            l
        };
        let with = |extra: &[u8]| {
            let mut f = entry.clone();
            f.extend(extra);
            std::fs::write(&path, &f).unwrap();
            f.len()
        };
        with(&blank(line));
        assert_eq!(read_entries(&path, None).unwrap().len(), 1);
        with(&blank(line + 1));
        match read_entries(&path, None) {
            Err(Error::AuditBroken { reason, .. }) => {
                assert_eq!(reason, format!("line 2 is longer than {MAX_ENTRY_BYTES} bytes"));
            }
            other => panic!("a line of {} bytes: {other:?}", line + 1),
        }
        let limit = MAX_AUDIT_BYTES as usize;
        let mut pad = Vec::new();
        while entry.len() + pad.len() + line < limit {
            pad.extend(blank(line));
        }
        pad.extend(blank(limit - entry.len() - pad.len() - 1));
        assert_eq!(with(&pad), limit);
        assert_eq!(read_entries(&path, None).unwrap().len(), 1);
        pad.push(b'\n');
        assert_eq!(with(&pad), limit + 1);
        match read_entries(&path, None) {
            Err(Error::Store(m)) => assert!(m.ends_with(&format!("is larger than {MAX_AUDIT_BYTES} bytes")), "{m}"),
            other => panic!("a part of {} bytes: {other:?}", limit + 1),
        }
    }

    #[test]
    fn an_overlong_line_is_refused_without_being_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, vec![b'x'; (MAX_ENTRY_BYTES + 10) as usize]).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), None, None),
            Err(Error::AuditBroken { index: 0, .. })
        ));
    }
}
