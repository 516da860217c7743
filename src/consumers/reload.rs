//! Reloads a target's consumer once its file changed: a signal to a PID read from a pidfile and
//! verified to be alive and to be the expected process, a `reload` through HAProxy's master CLI
//! (verified with `show proc`), or an argv with a time limit. A missing, stale or foreign PID is
//! refused and never signalled.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::command::{self, CommandError};
use crate::consumers::haproxy::{self, ProcInfo};

/// A resolved reload action.
#[derive(Debug, Clone)]
pub enum Reload {
    /// Signal the verified PID from a pidfile.
    Signal {
        /// Pidfile path.
        pidfile: PathBuf,
        /// Signal to send.
        signal: nix::sys::signal::Signal,
        /// Expected process name.
        process: String,
        /// Optional HAProxy master socket to verify the reload's outcome.
        master_socket: Option<PathBuf>,
        /// How long to wait for the verification.
        timeout: Duration,
    },
    /// `reload` through HAProxy's master CLI, verified with `show proc`.
    MasterSocket {
        /// Master CLI socket.
        path: PathBuf,
        /// How long to wait for the new worker.
        timeout: Duration,
    },
    /// Run an argv with a time limit.
    Command {
        /// The argv.
        argv: Vec<String>,
        /// Time limit.
        timeout: Duration,
    },
}

/// Errors of the reload stage; each names the pidfile, PID, socket or command involved.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The pidfile is missing or unreadable.
    #[error("cannot read pidfile {path}: {source}; nothing was signalled")]
    Pidfile {
        /// Pidfile.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The pidfile does not hold a PID.
    #[error("pidfile {path} holds {content:?}, not a PID; nothing was signalled")]
    PidfileContent {
        /// Pidfile.
        path: PathBuf,
        /// What it holds (truncated).
        content: String,
    },
    /// No such process.
    #[error("PID {pid} from {path} is not running (stale pidfile); nothing was signalled")]
    NotRunning {
        /// PID.
        pid: i32,
        /// Pidfile.
        path: PathBuf,
    },
    /// The PID belongs to another program.
    #[error("PID {pid} from {path} is {actual:?}, not {expected:?}; refusing to signal it")]
    WrongProcess {
        /// PID.
        pid: i32,
        /// Pidfile.
        path: PathBuf,
        /// What it is.
        actual: String,
        /// What was expected.
        expected: String,
    },
    /// kill(2) failed.
    #[error("cannot send {signal} to PID {pid} from {path}: {source}")]
    Signal {
        /// PID.
        pid: i32,
        /// Pidfile.
        path: PathBuf,
        /// Signal.
        signal: Signal,
        /// Cause.
        source: nix::Error,
    },
    /// The master CLI could not be reached or did not answer sensibly.
    #[error("HAProxy master socket {path}: {message}")]
    MasterSocket {
        /// Socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// HAProxy reported the reload as failed (the old worker keeps serving).
    #[error("HAProxy reload failed (master socket {path}): {detail}")]
    ReloadFailed {
        /// Socket.
        path: PathBuf,
        /// The counters or HAProxy's own message.
        detail: String,
    },
    /// The reload command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// PgBouncer's admin console refused or could not take `RELOAD`, and no `reload` action is
    /// configured to fall back to.
    #[error("PgBouncer admin console: {0}")]
    Console(String),
}

/// Reads a pidfile and returns the PID it names.
pub fn read_pidfile(path: &Path) -> Result<i32, ReloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReloadError::Pidfile {
        path: path.to_owned(),
        source,
    })?;
    // HAProxy's pidfile holds one PID per line (only the master's in master-worker mode). PID 1
    // is a PID like any other here: a sidecar sharing haproxy's PID namespace (`--pid
    // container:haproxy`, no init) sees HAProxy's master as PID 1. It is signalled only if it
    // is the expected process, as every PID is ([`verify_process`]).
    let first = text.lines().next().unwrap_or("").trim();
    match first.parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(ReloadError::PidfileContent {
            path: path.to_owned(),
            content: text.chars().take(40).collect(),
        }),
    }
}

/// Checks that `pid` is alive (not a zombie) and is `expected`, by `/proc/<pid>/comm` or the
/// file name of `/proc/<pid>/exe`.
pub fn verify_process(pid: i32, expected: &str, pidfile: &Path) -> Result<(), ReloadError> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let stat =
        std::fs::read_to_string(proc_dir.join("stat")).map_err(|_| ReloadError::NotRunning {
            pid,
            path: pidfile.to_owned(),
        })?;
    // Field 3, after the parenthesised comm, is the state; Z and X are dead.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    if matches!(state, "Z" | "X" | "x") {
        return Err(ReloadError::NotRunning {
            pid,
            path: pidfile.to_owned(),
        });
    }
    let comm = std::fs::read_to_string(proc_dir.join("comm"))
        .unwrap_or_default()
        .trim_end()
        .to_owned();
    let exe = std::fs::read_link(proc_dir.join("exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    // comm is truncated to 15 bytes by the kernel.
    let expected_comm: String = expected.chars().take(15).collect();
    if comm == expected_comm || exe.as_deref() == Some(expected) {
        return Ok(());
    }
    Err(ReloadError::WrongProcess {
        pid,
        path: pidfile.to_owned(),
        actual: exe.unwrap_or(comm),
        expected: expected.to_owned(),
    })
}

/// Runs a target's reload action.
pub async fn reload(action: &Reload) -> Result<(), ReloadError> {
    match action {
        Reload::Signal {
            pidfile,
            signal,
            process,
            master_socket,
            timeout,
        } => {
            let pid = read_pidfile(pidfile)?;
            verify_process(pid, process, pidfile)?;
            let before = match master_socket {
                Some(sock) => Some(show_proc(sock, *timeout).await?),
                None => None,
            };
            signal::kill(Pid::from_raw(pid), *signal).map_err(|source| ReloadError::Signal {
                pid,
                path: pidfile.clone(),
                signal: *signal,
                source,
            })?;
            if let (Some(sock), Some(before)) = (master_socket, before) {
                wait_for_reload(sock, &before, *timeout).await?;
            }
            Ok(())
        }
        Reload::MasterSocket { path, timeout } => {
            let before = show_proc(path, *timeout).await?;
            let answer = haproxy::cli(path, "reload", *timeout).await.map_err(|e| {
                ReloadError::MasterSocket {
                    path: path.clone(),
                    message: format!("sending `reload`: {e}"),
                }
            })?;
            // 2.7+ answers `Success=1|0` followed by the startup logs; 2.6 answers nothing.
            if let Some(ok) = haproxy::parse_reload_answer(&answer) {
                if !ok {
                    return Err(ReloadError::ReloadFailed {
                        path: path.clone(),
                        detail: answer.trim().to_owned(),
                    });
                }
            }
            wait_for_reload(path, &before, *timeout).await
        }
        Reload::Command { argv, timeout } => Ok(command::run(argv, *timeout).await?),
    }
}

async fn show_proc(path: &Path, timeout: Duration) -> Result<ProcInfo, ReloadError> {
    let text = haproxy::cli(path, "show proc", timeout)
        .await
        .map_err(|e| ReloadError::MasterSocket {
            path: path.to_owned(),
            message: format!("`show proc`: {e}"),
        })?;
    haproxy::parse_show_proc(&text).ok_or_else(|| ReloadError::MasterSocket {
        path: path.to_owned(),
        message: format!("unexpected `show proc` answer: {:?}", text.trim()),
    })
}

/// Waits until the master's reload counter moves past `before`, then reports failure if HAProxy
/// counted the reload as failed.
async fn wait_for_reload(
    path: &Path,
    before: &ProcInfo,
    timeout: Duration,
) -> Result<(), ReloadError> {
    let deadline = Instant::now() + timeout;
    loop {
        // The master re-execs during a reload; its socket is briefly unavailable.
        if let Ok(now) = show_proc(path, Duration::from_secs(1)).await {
            if now.reloads > before.reloads {
                if now.failed > before.failed {
                    return Err(ReloadError::ReloadFailed {
                        path: path.to_owned(),
                        detail: format!(
                            "`show proc` counts {} failed reload(s), {} before; the previous worker keeps serving",
                            now.failed, before.failed
                        ),
                    });
                }
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(ReloadError::MasterSocket {
                path: path.to_owned(),
                message: format!(
                    "the reload counter did not move past {} within {timeout:?}",
                    before.reloads
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_garbage_empty_and_missing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert!(matches!(read_pidfile(&p), Err(ReloadError::Pidfile { .. })));
        for bad in ["", "abc", "-5", "0", "12 34x"] {
            std::fs::write(&p, bad).unwrap();
            let err = read_pidfile(&p).unwrap_err();
            assert!(err.to_string().contains("x.pid"), "{bad:?}: {err}");
        }
        // PID 1 is read like any PID; whether it may be signalled is `verify_process`'s call.
        std::fs::write(&p, "1\n").unwrap();
        assert_eq!(read_pidfile(&p).unwrap(), 1);
        std::fs::write(&p, "1234\n5678\n").unwrap();
        assert_eq!(read_pidfile(&p).unwrap(), 1234);
    }

    #[test]
    fn foreign_process_is_refused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let err = verify_process(pid, "haproxy", Path::new("/p")).unwrap_err();
        assert!(matches!(err, ReloadError::WrongProcess { .. }), "{err}");
        assert!(err.to_string().contains(&pid.to_string()));
        verify_process(pid, "sleep", Path::new("/p")).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            verify_process(pid, "sleep", Path::new("/p")),
            Err(ReloadError::NotRunning { .. })
        ));
    }
}
