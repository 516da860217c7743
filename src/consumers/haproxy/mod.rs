//! HAProxy: its sockets ([`cli`]: one request per connection on the master CLI or the admin
//! stats socket, with `show proc` and `reload` answers parsed), its server state carried across
//! reloads ([`server_state`]), the runtime-API moves of the failover fast path ([`runtime`]),
//! member changes made without a reload ([`membership`]),
//! its servers' live states as people see them ([`live`]), its settings ([`settings`]) and whether it has read its file as
//! it is on disk ([`loaded`]).

pub mod live;
pub mod loaded;
pub mod membership;
pub mod runtime;
pub mod server_state;
pub mod settings;

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The master's counters from `show proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// The master's PID.
    pub master_pid: i32,
    /// Reloads since start.
    pub reloads: u32,
    /// Failed reloads (`[failed: N]` in 2.6; 0 when not shown).
    pub failed: u32,
}

/// The unix `stats socket` paths a haproxy.cfg declares in its global section (`unix@` and
/// plain paths; addresses such as `ipv4@` are left out).
pub fn declared_stats_sockets(cfg: &str) -> Vec<std::path::PathBuf> {
    let mut in_global = false;
    let mut out = Vec::new();
    for line in cfg.lines() {
        let t = line.trim();
        if !line.starts_with(char::is_whitespace) && !t.is_empty() && !t.starts_with('#') {
            in_global = t == "global" || t.starts_with("global ");
            continue;
        }
        let Some(rest) = t.strip_prefix("stats socket ").filter(|_| in_global) else {
            continue;
        };
        let addr = rest.split_whitespace().next().unwrap_or_default();
        let path = addr.strip_prefix("unix@").unwrap_or(addr);
        if path.starts_with('/') {
            out.push(std::path::PathBuf::from(path));
        }
    }
    out
}

/// Sends one command and reads the answer until HAProxy closes the connection.
pub async fn cli(path: &Path, command: &str, timeout: Duration) -> std::io::Result<String> {
    let work = async {
        let mut s = UnixStream::connect(path).await?;
        s.write_all(command.as_bytes()).await?;
        s.write_all(b"\n").await?;
        // The master CLI answers only once the client half-closes its side.
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer to {command:?} within {timeout:?}"),
        )
    })?
}

/// The answers to `;`-separated commands sent on one connection, one per command: HAProxy ends
/// each with an empty line. Each answer's lines are trimmed and joined with spaces.
pub(crate) fn split_answers(answer: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in answer.lines() {
        if line.trim().is_empty() {
            out.push(current.join(" "));
            current.clear();
        } else {
            current.push(line.trim());
        }
    }
    if !current.is_empty() {
        out.push(current.join(" "));
    }
    out
}

/// Parses the master line of `show proc`:
/// `2041  master  3 [failed: 1]  0d00h00m09s  2.6.12-1+deb12u1`.
pub fn parse_show_proc(text: &str) -> Option<ProcInfo> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let pid = fields.next()?.parse::<i32>().ok();
        if fields.next() != Some("master") {
            continue;
        }
        let reloads = fields.next()?.parse::<u32>().ok()?;
        let failed = line
            .split_once("[failed:")
            .and_then(|(_, rest)| rest.split(']').next())
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        return Some(ProcInfo {
            master_pid: pid?,
            reloads,
            failed,
        });
    }
    None
}

/// 2.7+ answers `reload` with `Success=1` or `Success=0`; 2.6 answers nothing (None).
pub fn parse_reload_answer(text: &str) -> Option<bool> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Success="))
        .map(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_26_with_failed_counter() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>        \n\
                    2041            master          3 [failed: 1]   0d00h00m09s     2.6.12-1+deb12u1\n\
                    # workers\n\
                    2090            worker          0               0d00h00m02s     2.6.12-1+deb12u1\n";
        assert_eq!(
            parse_show_proc(text),
            Some(ProcInfo {
                master_pid: 2041,
                reloads: 3,
                failed: 1
            })
        );
    }

    #[test]
    fn show_proc_without_failed_counter() {
        let text = "#<PID> <type> <reloads> <uptime> <version>\n77 master 0 0d00h00m01s 2.8.3\n";
        assert_eq!(parse_show_proc(text).unwrap().reloads, 0);
        assert_eq!(parse_show_proc("garbage"), None);
    }

    #[test]
    fn reload_answer_forms() {
        assert_eq!(parse_reload_answer(""), None);
        assert_eq!(parse_reload_answer("Success=1\n--\n"), Some(true));
        assert_eq!(
            parse_reload_answer("Success=0\n--\n[ALERT] x\n"),
            Some(false)
        );
    }
}
