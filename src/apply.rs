//! Takes [`Rendered`] bytes to disk safely: unchanged bytes are left alone; changed bytes go to a
//! staged file next to the destination (created exclusively, never through a symlink, with the
//! final mode from the start), are checked, then fsynced, renamed over the destination and the
//! directory fsynced. A failed check leaves the old file untouched. The file mechanics are
//! [`crate::files`]'s.

use std::os::unix::fs::MetadataExt;

use crate::command;
pub use crate::files::{commit, current, holds, sweep_leftovers, ApplyError, Retired, Staged};
use crate::files::{stage_bytes, Owner};
use crate::render::Rendered;
use crate::target::Target;

/// Placeholder in check argvs replaced by the staged file's path.
pub const STAGED_PLACEHOLDER: &str = "{{staged}}";

/// Writes `rendered` to a new staged file beside `target.dest`, fsynced, with the final mode and
/// owner: the configured ones (an owner or group that cannot be given fails the stage), else the
/// current file's (its owner kept where the process may, else the process's with a warning), else
/// 0644 and the process's own.
pub fn stage(target: &Target, rendered: &Rendered) -> Result<Staged, ApplyError> {
    let existing = std::fs::metadata(&target.dest).ok();
    let mode = target
        .mode
        .or_else(|| existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let owner = Owner {
        uid: target.owner,
        gid: target.group,
        keep_uid: existing.as_ref().map(|m| m.uid()),
        keep_gid: existing.as_ref().map(|m| m.gid()),
    };
    stage_bytes(
        &target.dest,
        &rendered.name,
        &rendered.bytes,
        mode,
        owner,
        true,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::create_exclusive;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
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
        let live = dir.path().join(format!(
            ".out.cfg.haconfd-{}-0000abcd",
            std::os::unix::process::parent_id()
        ));
        let other = dir.path().join(".other.haconfd-999999999-0");
        for f in [&dead, &live, &other] {
            std::fs::write(f, "x").unwrap();
        }
        sweep_leftovers(&dest);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn a_leftover_with_this_processes_own_pid_is_an_earlier_runs_and_is_swept() {
        // A container restarted on the same volume: haconfd has the same PID as the run that
        // was killed between staging and rename.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let staged = dir
            .path()
            .join(format!(".out.cfg.haconfd-{}-0000abcd", std::process::id()));
        let retired = dir.path().join(format!(
            ".out.cfg.haconfd-old-{}-0000abcd",
            std::process::id()
        ));
        for f in [&staged, &retired] {
            std::fs::write(f, "x").unwrap();
        }
        sweep_leftovers(&dest);
        assert!(!staged.exists() && !retired.exists());
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
