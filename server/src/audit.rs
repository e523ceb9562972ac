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

/// Largest audit log read back (beyond it the node refuses to start rather
/// than read an unbounded file into memory).
pub const MAX_AUDIT_BYTES: u64 = 64 << 20;

/// The log and its newest entry.
pub struct AuditLog {
    path: PathBuf,
    last: Option<AuditEntry>,
    /// Where the newest entry's hash is also kept (in sled), so that
    /// entries removed from the end of the file are detected too.
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

const HEAD: &[u8] = b"head";

impl AuditLog {
    /// Opens the log in `data_dir`, verifying the whole chain and, with
    /// `head`, that nothing was cut off its end.
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
        let log = AuditLog { path, last: None, head };
        let entries = log.entries()?;
        Ok(AuditLog {
            last: entries.into_iter().last(),
            ..log
        })
    }

    /// The policy of the newest entry.
    pub fn last_policy(&self) -> Option<&PolicySet> {
        self.last.as_ref().map(|e| &e.policy)
    }

    /// Appends (and fsyncs) an entry for `policy`, then records it as the head.
    pub fn append(&mut self, node: &str, source: &str, policy: PolicySet) -> Result<(), Error> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entry = AuditEntry::next(self.last.as_ref(), at_ms, node, source, policy);
        let mut line = serde_json::to_string(&entry).map_err(|e| Error::Codec(e.to_string()))?;
        line.push('\n');
        let io = |e: std::io::Error| Error::Store(format!("{}: {e}", self.path.display()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        if let Some(t) = &self.head {
            let store = |e: sled::Error| Error::Store(e.to_string());
            t.insert(HEAD, format!("{} {}", entry.index, entry.hash).as_bytes())
                .map_err(store)?;
            t.flush().map_err(store)?;
        }
        self.last = Some(entry);
        Ok(())
    }

    /// Every entry, read back from disk (so tampering since start shows),
    /// verified: the chain, and that the file ends at the recorded head.
    pub fn entries(&self) -> Result<Vec<AuditEntry>, Error> {
        let entries = read_entries(&self.path)?;
        audit::verify(&entries)?;
        let recorded = match &self.head {
            Some(t) => t.get(HEAD).map_err(|e| Error::Store(e.to_string()))?,
            None => None,
        };
        if let Some(raw) = recorded {
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (index, hash) = text.split_once(' ').unwrap_or(("0", ""));
            let index: u64 = index.parse().unwrap_or(0);
            let found = entries.get(index as usize).map(|e| e.hash.as_str());
            if found != Some(hash) || entries.len() as u64 != index + 1 {
                return Err(Error::AuditBroken {
                    index,
                    reason: format!(
                        "the log has {} entries but its recorded head is entry {index}: entries were removed or added",
                        entries.len()
                    ),
                });
            }
        }
        Ok(entries)
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
}
