//! Files written atomically, as every stage that writes one needs it: bytes staged beside the
//! destination (created exclusively, never through a symlink, with the final mode and owner from
//! the start), optionally fsynced, renamed over the destination, the directory fsynced and the
//! replaced file released after the consumer was told ([`Retired`]). Takes bytes and paths only:
//! nothing of the pipeline.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::command::CommandError;

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
    /// The owner or group configured for the file (`owner`/`group` of a `[[template]]`) could
    /// not be given to it: nothing was swapped.
    #[error(
        "cannot give {dest} the configured {what}: {source}; nothing was swapped (a file's owner \
         changes only with CAP_CHOWN, its group to one haconfd's user is in or with CAP_CHOWN; \
         unset owner/group to keep the existing file's where haconfd may)"
    )]
    Owner {
        /// Destination.
        dest: PathBuf,
        /// `owner 99`, `group 99`, or both.
        what: String,
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

/// Who a staged file is to belong to. A configured uid or gid (`owner`/`group` of a
/// `[[template]]`) is given to the file or it is not staged: the operator asked for it. The
/// replaced file's uid and gid are kept where the process may (its gid when the process is in
/// that group; its uid only with CAP_CHOWN); else the new file stays the process's, with a
/// warning: an image that runs under another uid than the one that wrote the volume must still
/// follow a failover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    /// Configured uid.
    pub uid: Option<u32>,
    /// Configured gid.
    pub gid: Option<u32>,
    /// The replaced file's uid, kept where the process may.
    pub keep_uid: Option<u32>,
    /// The replaced file's gid, kept where the process may.
    pub keep_gid: Option<u32>,
}

/// A configured (uid, gid): given to the file, or the stage fails.
impl From<(Option<u32>, Option<u32>)> for Owner {
    fn from((uid, gid): (Option<u32>, Option<u32>)) -> Owner {
        Owner {
            uid,
            gid,
            ..Owner::default()
        }
    }
}

/// Gives the staged `file` at `path` (just created, so the process's) the owner `owner` asks for,
/// as far as it must and may (see [`Owner`]); the mode is set again after a change (chown clears
/// set-id bits).
fn give_owner(
    file: &File,
    path: &Path,
    dest: &Path,
    owner: Owner,
    mode: u32,
) -> Result<(), ApplyError> {
    let stage_err = |source| ApplyError::Stage {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(stage_err)?;
    let differs = |want: Option<u32>, have: u32| want.filter(|w| *w != have);
    let (uid, gid) = (
        differs(owner.uid, meta.uid()),
        differs(owner.gid, meta.gid()),
    );
    let keep_uid = differs(owner.keep_uid, meta.uid()).filter(|_| owner.uid.is_none());
    let keep_gid = differs(owner.keep_gid, meta.gid()).filter(|_| owner.gid.is_none());
    if uid.or(keep_uid).is_none() && gid.or(keep_gid).is_none() {
        return Ok(());
    }
    let set_mode = || {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(stage_err)
    };
    let err = match std::os::unix::fs::fchown(file, uid.or(keep_uid), gid.or(keep_gid)) {
        Ok(()) => return set_mode(),
        Err(e) => e,
    };
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(file, uid, gid).map_err(|source| {
            let what = [
                uid.map(|u| format!("owner {u}")),
                gid.map(|g| format!("group {g}")),
            ];
            ApplyError::Owner {
                dest: dest.to_owned(),
                what: what.into_iter().flatten().collect::<Vec<_>>().join(" and "),
                source,
            }
        })?;
    }
    if keep_uid.is_none() && keep_gid.is_none() {
        return set_mode();
    }
    if let Some(g) = keep_gid {
        // Without CAP_CHOWN the group may still be kept: one the process is in.
        let _ = std::os::unix::fs::fchown(file, None, Some(g));
    }
    set_mode()?;
    let now = file.metadata().map_err(stage_err)?;
    let was = (
        owner.keep_uid.or(owner.uid).unwrap_or(meta.uid()),
        owner.keep_gid.or(owner.gid).unwrap_or(meta.gid()),
    );
    tracing::warn!(
        dest = %dest.display(),
        was = %format!("{}:{}", was.0, was.1),
        now = %format!("{}:{}", now.uid(), now.gid()),
        mode = %format!("{mode:04o}"),
        error = %err,
        "cannot keep the replaced file's owner: the new file belongs to haconfd's user (`now`), \
         with the same mode; check that its reader may still read it, or give haconfd CAP_CHOWN, \
         or set owner/group in the [[template]] to ones haconfd may give"
    );
    Ok(())
}

/// Writes `bytes` to a new staged file beside `dest` with exactly `mode` and the owner `owner`
/// asks for (see [`Owner`]; a `(uid, gid)` pair is a configured one). `durable` fsyncs it: a
/// config must survive a crash once renamed; a scratch file haconfd rewrites every pass need not.
pub fn stage_bytes(
    dest: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    owner: impl Into<Owner>,
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
    give_owner(&file, &path, dest, owner.into(), mode)?;
    file.write_all(bytes).map_err(stage_err)?;
    if durable {
        file.sync_all().map_err(stage_err)?;
    }
    Ok(staged)
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
    /// The destination whose file this replaced.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// When the replaced file was last modified (None when there was none).
    pub fn replaced_modified(&self) -> Option<std::time::SystemTime> {
        let old = self.old.as_ref()?;
        std::fs::metadata(old).and_then(|m| m.modified()).ok()
    }

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
/// (`.<name>.haconfd-[old-]<pid>-<random>`), e.g. after a crash mid-pass. Called before this
/// process stages anything there, so a file with this process's own PID is an earlier one's: in
/// a container restarted on the same volume, haconfd gets the same PID every time.
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
        let ours = pid.is_some_and(|p| u32::try_from(p).ok() == Some(std::process::id()));
        let alive =
            !ours && pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
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
