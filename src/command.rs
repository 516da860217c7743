//! Runs an argv (never a shell string) with a time limit, for check and reload commands; a failure
//! carries the argv, the exit status and the command's stderr verbatim.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

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

/// Runs `argv` with `timeout`. Standard input is closed; the child is killed on timeout.
pub async fn run(argv: &[String], timeout: Duration) -> Result<(), CommandError> {
    let shown = display_argv(argv);
    let (prog, args) = argv.split_first().ok_or_else(|| CommandError::Spawn {
        argv: shown.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
    })?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            argv: shown.clone(),
            source,
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            return Err(CommandError::Timeout {
                argv: shown,
                timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(CommandError::Spawn {
                argv: shown,
                source,
            })
        }
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&stdout);
    }
    Err(CommandError::Failed {
        argv: shown,
        status: out.status.to_string(),
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
