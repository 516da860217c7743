//! Takes [`Rendered`] bytes to disk safely: unchanged bytes are left alone; changed bytes go to a
//! staged file next to the destination (created exclusively, never through a symlink, with the
//! final mode from the start), are checked, then fsynced, renamed over the destination and the
//! directory fsynced. A failed check leaves the old file untouched.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::command::{self, CommandError};
use crate::render::Rendered;
use crate::target::Target;

/// Placeholder in check argvs replaced by the staged file's path.
pub const STAGED_PLACEHOLDER: &str = "{{staged}}";

/// Errors of the apply stage; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The destination could not be read for comparison.
    #[error("cannot read {path}: {source}")]
    ReadDest {
        /// Destination.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The staged file could not be created or written (missing or read-only directory...).
    #[error("cannot stage {path}: {source}")]
    Stage {
        /// Staged file path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The check command refused the staged file.
    #[error("check of {target:?} refused the new file; {dest} is unchanged: {source}")]
    Check {
        /// Target name.
        target: String,
        /// Destination kept.
        dest: PathBuf,
        /// The command's failure, with its stderr.
        source: CommandError,
    },
    /// The rename or directory fsync failed.
    #[error("cannot swap {dest} into place: {source}")]
    Commit {
        /// Destination.
        dest: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A checked-or-not file waiting next to its destination. Dropping it removes the file.
#[derive(Debug)]
pub struct Staged {
    /// Target name.
    pub name: String,
    /// Destination path.
    pub dest: PathBuf,
    /// The staged file's path.
    pub path: PathBuf,
    committed: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `dest` exists, refusing anything but a regular file (through symlinks): opening a
/// FIFO someone left at the destination would block the pass for good, and a directory or a
/// device is no config file to replace.
fn existing_file(dest: &Path) -> Result<bool, ApplyError> {
    match std::fs::metadata(dest) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            let kind = if t.is_fifo() {
                "a FIFO"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            Err(ApplyError::ReadDest {
                path: dest.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{kind}, not a regular file; nothing was written"),
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ApplyError::ReadDest {
            path: dest.to_owned(),
            source,
        }),
    }
}

/// What `dest` holds now; None when it does not exist.
pub fn current(dest: &Path) -> Result<Option<Vec<u8>>, ApplyError> {
    if !existing_file(dest)? {
        return Ok(None);
    }
    match std::fs::read(dest) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ApplyError::ReadDest {
            path: dest.to_owned(),
            source,
        }),
    }
}

/// Whether `dest` holds exactly `bytes`, read in small chunks: most passes change nothing, and
/// a 300 KB haproxy.cfg read whole into a fresh buffer on every heartbeat costs page faults.
pub fn holds(dest: &Path, bytes: &[u8]) -> Result<bool, ApplyError> {
    use std::io::Read;
    let read_err = |source| ApplyError::ReadDest {
        path: dest.to_owned(),
        source,
    };
    if !existing_file(dest)? {
        return Ok(false);
    }
    let mut file = match File::open(dest) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(read_err(e)),
    };
    if file.metadata().map_err(read_err)?.len() != bytes.len() as u64 {
        return Ok(false);
    }
    let mut buf = [0u8; 16 * 1024];
    let mut rest = bytes;
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            return Ok(rest.is_empty());
        }
        if n > rest.len() || buf[..n] != rest[..n] {
            return Ok(false);
        }
        rest = &rest[n..];
    }
}

/// Writes `rendered` to a new staged file beside `target.dest`, fsynced, with the final mode and
/// owner: the configured ones, else the current file's, else 0644 and the process's own.
pub fn stage(target: &Target, rendered: &Rendered) -> Result<Staged, ApplyError> {
    let existing = std::fs::metadata(&target.dest).ok();
    let mode = target
        .mode
        .or_else(|| existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let owner = (
        target.owner.or_else(|| existing.as_ref().map(|m| m.uid())),
        target.group.or_else(|| existing.as_ref().map(|m| m.gid())),
    );
    stage_bytes(
        &target.dest,
        &rendered.name,
        &rendered.bytes,
        mode,
        owner,
        true,
    )
}

/// Writes `bytes` to a new staged file beside `dest` with exactly `mode` and, where it differs
/// from the process's, `owner` (uid, gid). `durable` fsyncs it: a config must survive a crash
/// once renamed; a scratch file haconfd rewrites every pass need not.
pub fn stage_bytes(
    dest: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    owner: (Option<u32>, Option<u32>),
    durable: bool,
) -> Result<Staged, ApplyError> {
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = parent_dir(dest).join(format!(
        ".{file_name}.haconfd-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let stage_err = |source| ApplyError::Stage {
        path: path.clone(),
        source,
    };
    let mut file = create_exclusive(&path, mode).map_err(stage_err)?;
    let staged = Staged {
        name: name.to_owned(),
        dest: dest.to_owned(),
        path: path.clone(),
        committed: false,
    };
    let meta = file.metadata().map_err(stage_err)?;
    let want_uid = owner.0.filter(|u| *u != meta.uid());
    let want_gid = owner.1.filter(|g| *g != meta.gid());
    if want_uid.is_some() || want_gid.is_some() {
        std::os::unix::fs::fchown(&file, want_uid, want_gid).map_err(stage_err)?;
        // chown clears set-id bits; restore the exact mode.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(stage_err)?;
    }
    file.write_all(bytes).map_err(stage_err)?;
    if durable {
        file.sync_all().map_err(stage_err)?;
    }
    Ok(staged)
}

/// Runs the target's check on the staged file. No check configured means accepted.
pub async fn check(target: &Target, staged: &Staged) -> Result<(), ApplyError> {
    if target.check.is_empty() {
        return Ok(());
    }
    let staged_path = staged.path.display().to_string();
    let argv: Vec<String> = target
        .check
        .iter()
        .map(|a| a.replace(STAGED_PLACEHOLDER, &staged_path))
        .collect();
    command::run(&argv, target.check_timeout)
        .await
        .map_err(|source| ApplyError::Check {
            target: target.name.clone(),
            dest: target.dest.clone(),
            source,
        })
}

/// What a commit leaves to do once the consumer has been told: fsync the directory (the rename
/// is already visible to every reader; only its durability waits) and release the replaced file,
/// kept alive under a hidden name. Freeing a replaced file's blocks happens inside `rename(2)` when
/// the rename drops its last link, and costs about a millisecond on ext4 with `discard` (see
/// docs/BENCHMARKS.md); the hard link moves that cost to the `unlink` here, after the reload.
#[derive(Debug)]
pub struct Retired {
    dir: PathBuf,
    dest: PathBuf,
    old: Option<PathBuf>,
}

impl Retired {
    /// Makes the rename durable and releases the replaced file.
    pub fn finish(mut self) -> Result<(), ApplyError> {
        let synced = File::open(&self.dir).and_then(|d| d.sync_all());
        if let Some(p) = self.old.take() {
            let _ = std::fs::remove_file(p);
        }
        synced.map_err(|source| ApplyError::Commit {
            dest: self.dest.clone(),
            source,
        })
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        if let Some(p) = self.old.take() {
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Renames the staged file over its destination. The directory fsync and the release of the old
/// file follow in [`Retired::finish`].
pub fn commit(mut staged: Staged) -> Result<Retired, ApplyError> {
    let dir = parent_dir(&staged.dest);
    let keep = dir.join(format!(
        ".{}.haconfd-old-{}-{:08x}",
        staged
            .dest
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        rand::random::<u32>()
    ));
    // No old file (or a filesystem without hard links): nothing to keep.
    let old = std::fs::hard_link(&staged.dest, &keep).ok().map(|()| keep);
    let retired = Retired {
        dir,
        dest: staged.dest.clone(),
        old,
    };
    std::fs::rename(&staged.path, &staged.dest).map_err(|source| ApplyError::Commit {
        dest: staged.dest.clone(),
        source,
    })?;
    staged.committed = true;
    Ok(retired)
}

/// Removes staged or retired files that a haconfd process which no longer runs left beside `dest`
/// (`.<name>.haconfd-[old-]<pid>-<random>`), e.g. after a crash mid-pass.
pub fn sweep_leftovers(dest: &Path) {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.haconfd-");
    let Ok(entries) = std::fs::read_dir(parent_dir(dest)) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest
            .trim_start_matches("old-")
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if pid.is_some() && !alive {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed a leftover of an earlier run")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a leftover of an earlier run")
                }
            }
        }
    }
}

/// Creates a new file with exactly `mode`. O_EXCL refuses any existing entry, a planted symlink
/// included (O_NOFOLLOW says so twice); the umask may clear bits of `mode`, so it is set again on
/// the open descriptor before any content is written.
pub fn create_exclusive(path: &Path, mode: u32) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(f)
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically and durably (stage, fsync, rename, fsync dir) with `mode`;
/// used for haconfd's own files such as the guard's memory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ApplyError> {
    let staged = stage_bytes(path, "", bytes, mode, (None, None), true)?;
    commit(staged)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(dest: &Path, check: &[&str]) -> Target {
        let mut t = Target::bare("t", Path::new("/dev/null"), dest);
        t.check = check.iter().map(|s| s.to_string()).collect();
        t.check_timeout = Duration::from_secs(5);
        t
    }

    fn rendered(b: &[u8]) -> Rendered {
        Rendered {
            name: "t".into(),
            bytes: b.to_vec(),
        }
    }

    #[tokio::test]
    async fn staged_file_passes_check_and_replaces_dest_keeping_mode() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        std::fs::write(&dest, "old").unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o640)).unwrap();
        let t = target(&dest, &["grep", "-q", "new", "{{staged}}"]);
        let s = stage(&t, &rendered(b"new")).unwrap();
        check(&t, &s).await.unwrap();
        commit(s).unwrap().finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staged leftovers"
        );
    }

    #[tokio::test]
    async fn failed_check_keeps_the_old_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        std::fs::write(&dest, "old").unwrap();
        let t = target(
            &dest,
            &["sh", "-c", "echo 'bad line 7' >&2; exit 1", "{{staged}}"],
        );
        let s = stage(&t, &rendered(b"new")).unwrap();
        let err = check(&t, &s).await.unwrap_err();
        drop(s);
        assert!(err.to_string().contains("bad line 7"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn configured_mode_is_exact_despite_umask() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let mut t = target(&dest, &[]);
        t.mode = Some(0o664);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let s = stage(&t, &rendered(b"x"));
        nix::sys::stat::umask(old);
        let s = s.unwrap();
        assert_eq!(std::fs::metadata(&s.path).unwrap().mode() & 0o7777, 0o664);
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let planted = dir.path().join(".out.cfg.haconfd-planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = create_exclusive(&planted, 0o644).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(create_exclusive(&dangling, 0o644).is_err());
        assert!(
            !dir.path().join("nowhere").exists(),
            "a dangling link must not create its target"
        );
    }

    #[test]
    fn leftovers_of_dead_processes_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let dead = dir.path().join(".out.cfg.haconfd-old-999999999-0000abcd");
        let live = dir
            .path()
            .join(format!(".out.cfg.haconfd-{}-0000abcd", std::process::id()));
        let other = dir.path().join(".other.haconfd-999999999-0");
        for f in [&dead, &live, &other] {
            std::fs::write(f, "x").unwrap();
        }
        sweep_leftovers(&dest);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn missing_directory_is_named() {
        let t = target(Path::new("/nonexistent-dir/out.cfg"), &[]);
        let err = stage(&t, &rendered(b"x")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/"), "{err}");
    }

    #[test]
    fn holds_compares_the_whole_content() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        assert!(!holds(&dest, b"a").unwrap());
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&dest, &big).unwrap();
        assert!(holds(&dest, &big).unwrap());
        let mut other = big.clone();
        other[70_000] ^= 1;
        assert!(!holds(&dest, &other).unwrap());
        assert!(!holds(&dest, &big[..99_999]).unwrap());
    }

    #[test]
    fn current_reads_the_file_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        assert_eq!(current(&dest).unwrap(), None);
        std::fs::write(&dest, "a").unwrap();
        assert_eq!(current(&dest).unwrap().as_deref(), Some(&b"a"[..]));
    }
}
