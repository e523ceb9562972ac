//! Files that hold secrets (tokens, private keys, configs with tokens):
//! created with their final permissions (0600 files, 0700 directories)
//! instead of written then chmod'ed, and never through a symlink.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// Creates `dir` and any missing parents with mode 0700. An existing
/// directory is left as it is, but a symlink in its place is refused.
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        if meta.file_type().is_symlink() {
            bail!("{} is a symlink; refusing to keep secrets behind it", dir.display());
        }
        if !meta.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Creates `path` with mode 0600 and writes `contents`; fails if anything
/// (a file or a symlink) is already there (`O_CREAT | O_EXCL`).
pub fn create_secret(path: &Path, contents: &[u8]) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Replaces `path` with `contents`, mode 0600: writes a fresh file next to
/// it with [`create_secret`], then renames it over `path` (a symlink at
/// `path` is replaced, never followed).
pub fn replace_secret(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    create_secret(&tmp, contents)?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("replacing {}", path.display())
    })
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secrets_are_private_from_the_start_and_never_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let key = d.join("n1.key");
        create_secret(&key, b"secret").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert!(create_secret(&key, b"again").is_err(), "never overwritten");
        // A symlink planted where a secret goes is not followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "public").unwrap();
        let link = d.join("token");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_secret(&link, b"secret").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "public");
        replace_secret(&link, b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "public");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "secret");
        assert_eq!(mode(&link), 0o600);
        let linked_dir = dir.path().join("ld");
        std::os::unix::fs::symlink(dir.path(), &linked_dir).unwrap();
        assert!(private_dir(&linked_dir).is_err());
    }
}
