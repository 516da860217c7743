//! Runs an argv (never a shell string) with a time limit, for check and reload commands and
//! hooks; a failure carries the argv, the exit status and the command's stderr verbatim. Of what a
//! command prints, the first and last [`KEEP`] bytes of each stream are kept, with the count of
//! those left out: a command printing megabytes costs neither memory nor a giant log line.

use std::fmt;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started (missing binary, permissions).
    #[error("cannot run `{argv}`: {source}")]
    Spawn {
        /// The argv, joined for display.
        argv: String,
        /// Cause.
        source: std::io::Error,
    },
    /// It ran past its time limit and was killed.
    #[error("`{argv}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The argv.
        argv: String,
        /// The limit.
        timeout: Duration,
    },
    /// It exited non-zero.
    #[error("`{argv}` failed ({status}){output}")]
    Failed {
        /// The argv.
        argv: String,
        /// Exit status.
        status: String,
        /// Its stderr (and stdout) verbatim between dividers.
        output: Verbatim,
    },
}

/// A command's output shown as it was, between dividers.
#[derive(Debug)]
pub struct Verbatim(pub String);

impl fmt::Display for Verbatim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.trim().is_empty() {
            return write!(f, " with no output");
        }
        write!(
            f,
            ":\n---------- output ----------\n{}\n----------------------------",
            self.0.trim_end()
        )
    }
}

/// Shows an argv as a user would type it.
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Process groups of the commands running now, so that an immediate exit can take them along.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// A running command's process group: registered while it runs; killed (SIGKILL to the whole
/// group, so a `sh -c` check takes its children along) unless the command was seen to exit.
struct Group {
    pgid: i32,
    reaped: bool,
}

impl Group {
    fn register(pgid: i32) -> Group {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
        Group {
            pgid,
            reaped: false,
        }
    }

    fn kill(&self) {
        // The leader is not reaped yet (the caller holds it), so the group ID cannot have been
        // reused by an unrelated process.
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
        }
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != self.pgid);
    }
}

/// Kills every command running now with its children (SIGKILL to each process group): called
/// before exiting at once on a second SIGTERM, which would otherwise leave them orphaned.
pub fn kill_running() {
    let groups = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pgid in groups {
        tracing::warn!(pgid, "killing the command in flight and its children");
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// How much of each output stream is kept: its first and its last `KEEP` bytes.
pub const KEEP: usize = 4096;

/// One output stream as kept: its start, its end, and how long it was. Everything is read (a
/// command must never block on a full pipe), little is kept.
#[derive(Debug, Default)]
struct Capped {
    head: Vec<u8>,
    /// The latest bytes past the head; trimmed to `KEEP` whenever it doubles.
    tail: Vec<u8>,
    total: u64,
}

impl Capped {
    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = KEEP - self.head.len();
        let (head, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(head);
        self.tail.extend_from_slice(rest);
        if self.tail.len() > 2 * KEEP {
            self.tail.drain(..self.tail.len() - KEEP);
        }
    }

    /// The stream as text: whole when it was short, else its first and last `KEEP` bytes
    /// around a line that counts what was left out.
    fn text(&self) -> String {
        let tail = &self.tail[self.tail.len().saturating_sub(KEEP)..];
        let left_out = self.total - (self.head.len() + tail.len()) as u64;
        let head = String::from_utf8_lossy(&self.head);
        let tail = String::from_utf8_lossy(tail);
        if left_out == 0 {
            return format!("{head}{tail}");
        }
        format!(
            "{head}\n[... {left_out} bytes left out: {} bytes in all, the first and last {KEEP} kept ...]\n{tail}",
            self.total
        )
    }
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Capped {
    let mut kept = Capped::default();
    if let Some(mut p) = pipe {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = p.read(&mut buf).await {
            kept.push(&buf[..n]);
        }
    }
    kept
}

/// Runs `argv` with `timeout`. Standard input is closed. The command runs in a process group of
/// its own, killed as a whole on timeout, when the caller gives up, or by [`kill_running`].
pub async fn run(argv: &[String], timeout: Duration) -> Result<(), CommandError> {
    run_with(argv, timeout, None, &[]).await.map(drop)
}

/// Like [`run`], with `stdin` written to the command's standard input (then closed) and `env`
/// added to its environment. Returns what it printed (stderr, then stdout).
pub async fn run_with(
    argv: &[String],
    timeout: Duration,
    stdin: Option<&[u8]>,
    env: &[(String, String)],
) -> Result<String, CommandError> {
    let shown = display_argv(argv);
    let (prog, args) = argv.split_first().ok_or_else(|| CommandError::Spawn {
        argv: shown.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
    })?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            argv: shown.clone(),
            source,
        })?;
    // Declared after `child`, so dropped before it: the group is killed while its leader is
    // still unreaped.
    let mut group = child.id().map(|pid| Group::register(pid as i32));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let input = child.stdin.take();
    let feed = async move {
        if let (Some(mut pipe), Some(bytes)) = (input, stdin) {
            use tokio::io::AsyncWriteExt;
            // A command that does not read its input must not fail for it.
            let _ = pipe.write_all(bytes).await;
        }
    };
    let finished = tokio::time::timeout(timeout, async {
        let ((status, out, err), ()) = tokio::join!(
            async { tokio::join!(child.wait(), read_capped(stdout), read_capped(stderr)) },
            feed
        );
        (status, out, err)
    })
    .await;
    let (status, out, err) = match finished {
        Err(_) => {
            if let Some(g) = &group {
                g.kill();
            }
            // Reap it; SIGKILL makes this immediate.
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                if let Some(g) = &mut group {
                    g.reaped = true;
                }
            }
            return Err(CommandError::Timeout {
                argv: shown,
                timeout,
            });
        }
        Ok((Err(source), _, _)) => {
            return Err(CommandError::Spawn {
                argv: shown,
                source,
            })
        }
        Ok((Ok(status), out, err)) => (status, out, err),
    };
    if let Some(g) = &mut group {
        g.reaped = true;
    }
    let mut text = err.text();
    let stdout = out.text();
    if !stdout.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&stdout);
    }
    if status.success() {
        return Ok(text);
    }
    Err(CommandError::Failed {
        argv: shown,
        status: status.to_string(),
        output: Verbatim(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn failure_keeps_stderr_verbatim() {
        let err = run(
            &argv(&["sh", "-c", "echo '[ALERT] line 3: bad' >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("[ALERT] line 3: bad"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[tokio::test]
    async fn hang_is_killed_at_the_timeout() {
        let start = std::time::Instant::now();
        let err = run(&argv(&["sleep", "30"]), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let group_file = dir.path().join("group.pid");
        let script = format!(
            "echo $$ > {}; sleep 30 & echo $! > {}; wait",
            group_file.display(),
            pidfile.display()
        );
        let err = run(&argv(&["sh", "-c", &script]), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The orphaned `sleep` is reaped by init once killed; allow it a moment.
        let gone = (0..100).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = stat.is_empty()
                || stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !dead {
                std::thread::sleep(Duration::from_millis(20));
            }
            dead
        });
        assert!(gone, "the check's child {pid} outlived the timeout");
        // Its process group (led by the shell) is no longer registered; other tests' commands
        // may be running meanwhile.
        let group: i32 = std::fs::read_to_string(&group_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!RUNNING.lock().unwrap().contains(&group));
    }

    #[tokio::test]
    async fn a_command_printing_megabytes_keeps_its_first_and_last_kib_and_the_count() {
        // 50 MB on stdout, a line on stderr, then a failure.
        let script = "echo first-line; head -c 52428800 /dev/zero | tr '\\0' x; echo; echo last-line; echo oops >&2; exit 4";
        let err = run(&argv(&["sh", "-c", script]), Duration::from_secs(60))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.len() < 4 * KEEP, "{} bytes of output kept", msg.len());
        assert!(
            msg.contains("oops") && msg.contains("exit status: 4"),
            "{msg:.300}"
        );
        assert!(
            msg.contains("first-line") && msg.contains("last-line"),
            "{msg:.300}"
        );
        assert!(
            msg.contains("52428822 bytes in all"),
            "no count: {msg:.300}"
        );
        // Short output stays whole.
        let out = run_with(
            &argv(&["sh", "-c", "echo hello"]),
            Duration::from_secs(5),
            None,
            &[],
        )
        .await
        .unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn capped_output_counts_what_it_left_out_at_every_size() {
        for total in [
            0,
            1,
            KEEP - 1,
            KEEP,
            KEEP + 1,
            2 * KEEP,
            3 * KEEP + 7,
            10 * KEEP,
        ] {
            let bytes: Vec<u8> = (0..total).map(|i| b'a' + (i % 26) as u8).collect();
            let mut c = Capped::default();
            for chunk in bytes.chunks(1000) {
                c.push(chunk);
            }
            let text = c.text();
            if total <= 2 * KEEP {
                assert_eq!(text.as_bytes(), &bytes[..], "{total} bytes");
            } else {
                assert!(text.starts_with(std::str::from_utf8(&bytes[..KEEP]).unwrap()));
                assert!(text.ends_with(std::str::from_utf8(&bytes[total - KEEP..]).unwrap()));
                assert!(
                    text.contains(&format!("{} bytes left out", total - 2 * KEEP)),
                    "{total}"
                );
            }
        }
    }

    #[tokio::test]
    async fn missing_binary_is_named() {
        let err = run(
            &argv(&["/nonexistent/haproxy", "-c"]),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/haproxy"), "{err}");
    }
}
