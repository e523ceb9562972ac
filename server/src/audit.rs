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
}

/// Reads and parses every entry of the file at `path` (absent: none).
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
    text.lines()
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

impl AuditLog {
    /// Opens the log in `data_dir`, verifying the whole chain.
    pub fn open(data_dir: &Path) -> Result<AuditLog, Error> {
        let path = data_dir.join("audit.log");
        let entries = read_entries(&path)?;
        audit::verify(&entries)?;
        Ok(AuditLog {
            path,
            last: entries.into_iter().last(),
        })
    }

    /// The policy of the newest entry.
    pub fn last_policy(&self) -> Option<&PolicySet> {
        self.last.as_ref().map(|e| &e.policy)
    }

    /// Appends (and fsyncs) an entry for `policy`.
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
        self.last = Some(entry);
        Ok(())
    }

    /// Every entry, read back from disk (so tampering since start shows).
    pub fn entries(&self) -> Result<Vec<AuditEntry>, Error> {
        read_entries(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::policy::{Policy, Priority, Regions};

    #[test]
    fn appended_entries_verify_and_an_edit_is_caught_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        log.append("n1", "config", PolicySet::default()).unwrap();
        let set = PolicySet::new(2, vec![Policy::new("eu/", Regions::Local, Priority::Critical)]).unwrap();
        log.append("n1", "admin", set.clone()).unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.last_policy(), Some(&set));
        let path = dir.path().join("audit.log");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"admin\"", "\"config\"")).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path()),
            Err(Error::AuditBroken { index: 1, .. })
        ));
    }
}
