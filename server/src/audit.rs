//! The policy audit log on disk: `audit.log` in the data directory, one
//! JSON entry per line, appended and fsynced whenever the node adopts a
//! policy set. Entries are chained with blake3 (see
//! `lattice_core::policy::audit`), so editing, removing or reordering lines
//! is detected by `lattice audit verify` and by the node at start.

use lattice_core::policy::audit::{self, AuditEntry};
use lattice_core::policy::PolicySet;
use lattice_core::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest audit log part read back (beyond it the node refuses to start
/// rather than read an unbounded file into memory). The node never writes
/// a part this large: it archives the part at [`CHECKPOINT_BYTES`], and an
/// entry is at most a policy set of
/// [`MAX_POLICY_SET_BYTES`](lattice_core::policy::MAX_POLICY_SET_BYTES)
/// plus its JSON escaping and fields.
pub const MAX_AUDIT_BYTES: u64 = 64 << 20;

/// Size past which `audit.log` is archived (renamed to
/// `audit.<first index>.log`) before the next append, so the part read at
/// start stays far below [`MAX_AUDIT_BYTES`] however many sets are adopted.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

/// The log and its newest entry.
pub struct AuditLog {
    path: PathBuf,
    dir: PathBuf,
    last: Option<AuditEntry>,
    /// The last entry of the archived parts: the current part follows it.
    base: Option<AuditEntry>,
    /// Bytes in the current part.
    size: u64,
    checkpoint: u64,
    /// Where the newest entry's hash (and the archive base) is also kept
    /// (in sled), so that entries removed from the end of the file are
    /// detected too.
    head: Option<sled::Tree>,
}

/// Reads and parses every entry of the file at `path` (absent: none). A
/// last line without its newline is a write torn by a crash: it is left
/// out (and [`AuditLog::open`] cuts it off).
pub fn read_entries(path: &Path) -> Result<Vec<AuditEntry>, Error> {
    let io = |e: std::io::Error| Error::Store(format!("{}: {e}", path.display()));
    let text = match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_AUDIT_BYTES => {
            return Err(Error::Store(format!(
                "{} is larger than {MAX_AUDIT_BYTES} bytes",
                path.display()
            )))
        }
        Ok(_) => std::fs::read_to_string(path).map_err(io)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::AuditBroken {
                index: i as u64,
                reason: format!("line {} does not parse: {e}", i + 1),
            })
        })
        .collect()
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
/// one chain; calls `each` on every entry. Returns how many there are.
pub fn verify_dir(data_dir: &Path, mut each: impl FnMut(&AuditEntry)) -> Result<u64, Error> {
    let mut base: Option<AuditEntry> = None;
    let mut n = 0;
    let mut parts = archived_parts(data_dir)?;
    parts.push(data_dir.join("audit.log"));
    for p in parts {
        let entries = read_entries(&p)?;
        audit::verify_from(base.as_ref(), &entries)?;
        entries.iter().for_each(&mut each);
        n += entries.len() as u64;
        if let Some(last) = entries.into_iter().last() {
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
    /// the archived base) and, with `head`, that nothing was cut off its
    /// end. Crash states are finished rather than refused: a torn last line
    /// is cut off, an entry the file holds one past the recorded head (a
    /// crash between the file's fsync and the head's flush) rolls the head
    /// forward, and an archive begun but not renamed is renamed.
    pub fn open(data_dir: &Path, head: Option<sled::Tree>) -> Result<AuditLog, Error> {
        let path = data_dir.join("audit.log");
        // Cut a torn last line (a crash in the middle of an append).
        if let Ok(text) = std::fs::read(&path) {
            if !text.is_empty() && !text.ends_with(b"\n") {
                let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
                f.set_len(keep as u64)
                    .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
                tracing::warn!(path = %path.display(), "cut a torn last line off the audit log");
            }
        }
        let mut log = AuditLog {
            path,
            dir: data_dir.to_path_buf(),
            last: None,
            base: None,
            size: 0,
            checkpoint: CHECKPOINT_BYTES,
            head,
        };
        log.base = log.recorded_base()?;
        let mut entries = read_entries(&log.path)?;
        if let (Some(b), Some(first), Some(last)) = (&log.base, entries.first(), entries.last()) {
            if first.index < b.index + 1 && last.hash == b.hash {
                // A crash after the base was recorded, before the rename.
                log.archive(first.index)?;
                entries.clear();
            }
        }
        audit::verify_from(log.base.as_ref(), &entries)?;
        log.check_head(&entries, true)?;
        log.size = std::fs::metadata(&log.path).map_or(0, |m| m.len());
        log.last = entries.into_iter().last().or_else(|| log.base.clone());
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
    fn check_head(&self, entries: &[AuditEntry], roll_forward: bool) -> Result<(), Error> {
        let Some(t) = &self.head else { return Ok(()) };
        let Some(raw) = t.get(HEAD).map_err(store_err)? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (index, hash) = text.split_once(' ').unwrap_or(("0", ""));
        let index: u64 = index.parse().unwrap_or(0);
        let newest = entries.last().or(self.base.as_ref());
        let at = |i: u64| {
            if self.base.as_ref().is_some_and(|b| b.index == i) {
                return self.base.as_ref();
            }
            let first = entries.first()?.index;
            entries.get(i.checked_sub(first)? as usize)
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
        let first = read_entries(&self.path)?.first().map_or(last.index, |e| e.index);
        if let Some(t) = &self.head {
            let json = serde_json::to_vec(&last).map_err(|e| Error::Codec(e.to_string()))?;
            t.insert(BASE, json).map_err(store_err)?;
            t.flush().map_err(store_err)?;
        }
        self.archive(first)?;
        self.base = Some(last);
        self.size = 0;
        Ok(())
    }

    /// The policy of the newest entry.
    pub fn last_policy(&self) -> Option<&PolicySet> {
        self.last.as_ref().map(|e| &e.policy)
    }

    /// Appends (and fsyncs) an entry for `policy`, then records it as the
    /// head. Archives the current part first if the entry would take it
    /// past the checkpoint size.
    pub fn append(&mut self, node: &str, source: &str, policy: PolicySet) -> Result<(), Error> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entry = AuditEntry::next(self.last.as_ref(), at_ms, node, source, policy);
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
        let entries = read_entries(&self.path)?;
        audit::verify_from(self.base.as_ref(), &entries)?;
        self.check_head(&entries, false)?;
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
        let mut log = AuditLog::open(dir.path(), head()).unwrap();
        log.append("n1", "config", PolicySet::default()).unwrap();
        let set = PolicySet::new(2, vec![Policy::new("eu/", Regions::Local, Priority::Critical)]).unwrap();
        log.append("n1", "admin", set.clone()).unwrap();
        log.append("n1", "admin", PolicySet::new(3, vec![]).unwrap()).unwrap();
        let log = AuditLog::open(dir.path(), head()).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(3));
        let path = dir.path().join("audit.log");
        let version_at_open = || {
            AuditLog::open(dir.path(), head())
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
            AuditLog::open(dir.path(), head()),
            Err(Error::AuditBroken { index: 2, .. })
        ));
        std::fs::write(&path, &full).unwrap();
        assert_eq!(version_at_open(), Some(3));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"admin\"", "\"config\"")).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head()),
            Err(Error::AuditBroken { index: 1, .. })
        ));
    }

    #[test]
    fn a_crash_between_the_files_fsync_and_the_heads_flush_rolls_forward() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let mut log = AuditLog::open(dir.path(), head()).unwrap();
        log.append("n1", "config", PolicySet::default()).unwrap();
        log.append("n1", "admin", PolicySet::new(2, vec![]).unwrap()).unwrap();
        let at_one = db.open_tree("audit").unwrap().get(HEAD).unwrap().unwrap();
        log.append("n1", "admin", PolicySet::new(3, vec![]).unwrap()).unwrap();
        log.append("n1", "admin", PolicySet::new(4, vec![]).unwrap()).unwrap();
        drop(log);
        let tree = db.open_tree("audit").unwrap();
        // Exactly one entry past the head: what the crash leaves.
        let at_two = format!("2 {}", read_entries(&dir.path().join("audit.log")).unwrap()[2].hash);
        tree.insert(HEAD, at_two.as_bytes()).unwrap();
        let log = AuditLog::open(dir.path(), head()).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(4));
        assert!(tree.get(HEAD).unwrap().unwrap().starts_with(b"3 "), "rolled forward");
        assert_eq!(log.entries().unwrap().len(), 4);
        // Two past the head is not a crash: refused.
        tree.insert(HEAD, at_one).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), head()),
            Err(Error::AuditBroken { index: 1, .. })
        ));
    }

    #[test]
    fn the_log_is_archived_at_its_checkpoint_and_still_verifies() {
        use lattice_core::policy::MAX_POLICY_SET_BYTES;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let head = || Some(db.open_tree("audit").unwrap());
        let checkpoint = 256 << 10;
        let mut log = AuditLog::open(dir.path(), head()).unwrap().with_checkpoint(checkpoint);
        // The largest sets a node accepts: 40 of them are ~2.5 MiB of log.
        let big = |v: u64| {
            let n = (MAX_POLICY_SET_BYTES - 1_000) / (900 + 32);
            let policies = (0..n)
                .map(|i| Policy::new(format!("{i:0>900}"), Regions::All, Priority::Normal))
                .collect();
            PolicySet::new(v, policies).unwrap()
        };
        for v in 1..=40 {
            log.append("n1", "admin", big(v)).unwrap();
            let size = std::fs::metadata(dir.path().join("audit.log")).unwrap().len();
            assert!(size <= checkpoint + (2 * MAX_POLICY_SET_BYTES) as u64, "{size}");
        }
        assert!(archived_parts(dir.path()).unwrap().len() >= 5);
        let log = AuditLog::open(dir.path(), head()).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(40));
        let served = log.entries().unwrap();
        assert_eq!(
            lattice_core::policy::audit::verify_served(&served).map(|f| f > 0),
            Ok(true)
        );
        assert_eq!(verify_dir(dir.path(), |_| {}).unwrap(), 40);
        // A crash after the base was recorded, before the rename: finished at open.
        let tree = db.open_tree("audit").unwrap();
        let last = log.last.clone().unwrap();
        tree.insert(BASE, serde_json::to_vec(&last).unwrap()).unwrap();
        drop(log);
        let log = AuditLog::open(dir.path(), head()).unwrap();
        assert_eq!(log.last_policy().map(|p| p.version), Some(40));
        assert!(!dir.path().join("audit.log").exists());
        assert_eq!(verify_dir(dir.path(), |_| {}).unwrap(), 40);
    }
}
