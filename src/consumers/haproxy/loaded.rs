//! Whether the running HAProxy has read a file as it is on disk: when its current worker
//! started (the master CLI's `show proc`, or `show info` on the stats socket) against the
//! file's modification time. A file written without a reload (`once --no-reload`, a run stopped
//! between swap and reload) is newer than the worker that serves. A file whose servers alone
//! changed through the runtime API keeps the modification time of the one the worker loaded
//! ([`super::membership`]): the worker runs it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::cli;

/// What can be told of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// The current worker started after the file was last written.
    Yes,
    /// The file was written after the current worker started (or too close to tell).
    No {
        /// How long before now the worker started.
        worker_up: Duration,
        /// How long before now the file was written.
        file_age: Duration,
    },
    /// HAProxy did not answer, or the file is not there: why.
    Unknown(String),
}

/// Compares `file` with the current worker of the HAProxy behind `master` (preferred) or
/// `stats`. The worker's start is read from `/proc` when its PID is visible there (to the
/// clock tick); otherwise from its uptime, which HAProxy counts in whole seconds, so a file
/// written less than a second before counts as not read: a reload too many is harmless, one
/// too few leaves HAProxy on an old file.
pub async fn has_loaded(file: &Path, master: Option<&Path>, stats: Option<&Path>) -> Loaded {
    let modified = match std::fs::metadata(file).and_then(|m| m.modified()) {
        Ok(m) => m,
        Err(e) => return Loaded::Unknown(format!("{}: {e}", file.display())),
    };
    let worker = match current_worker(master, stats).await {
        Ok(w) => w,
        Err(why) => return Loaded::Unknown(why),
    };
    let now = SystemTime::now();
    let (started, margin) = match worker.0.and_then(process_started) {
        Some(at) => (at, Duration::ZERO),
        None => (now - worker.1, Duration::from_secs(1)),
    };
    let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);
    if modified + margin < started {
        Loaded::Yes
    } else {
        Loaded::No {
            worker_up: age(started),
            file_age: age(modified),
        }
    }
}

/// The current worker's PID (when shown) and uptime: `show proc` on the master CLI, else
/// `show info` on the stats socket.
async fn current_worker(
    master: Option<&Path>,
    stats: Option<&Path>,
) -> Result<(Option<i32>, Duration), String> {
    let timeout = Duration::from_secs(2);
    let mut why = Vec::new();
    if let Some(m) = master {
        match cli(m, "show proc", timeout).await {
            Ok(text) => match worker_of(&text) {
                Some((pid, up)) => return Ok((Some(pid), up)),
                None => why.push(format!("master socket {}: no worker listed", m.display())),
            },
            Err(e) => why.push(format!("master socket {}: {e}", m.display())),
        }
    }
    if let Some(s) = stats {
        match cli(s, "show info", timeout).await {
            Ok(text) => match info_uptime(&text) {
                Some(up) => return Ok((info_pid(&text), up)),
                None => why.push(format!("stats socket {}: no Uptime_sec", s.display())),
            },
            Err(e) => why.push(format!("stats socket {}: {e}", s.display())),
        }
    }
    Err(why.join("; "))
}

/// When process `pid` started: its age is the time since boot (`/proc/uptime`) less its start
/// after boot (`/proc/<pid>/stat`, field 22, in clock ticks). Both count from boot to the
/// hundredth of a second (`btime` of `/proc/stat` is whole seconds: too coarse here).
fn process_started(pid: i32) -> Option<SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let age =
        Duration::from_secs_f64(uptime).checked_sub(Duration::from_millis(ticks * 1000 / hz))?;
    SystemTime::now().checked_sub(age)
}

/// The current worker's PID and uptime from the master CLI's `show proc`: the first line under
/// `# workers`, `<pid> worker <reloads> <uptime> <version>`.
pub fn worker_of(show_proc: &str) -> Option<(i32, Duration)> {
    show_proc
        .lines()
        .skip_while(|l| l.trim() != "# workers")
        .skip(1)
        .take_while(|l| !l.starts_with('#'))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) != Some(&"worker") {
                return None;
            }
            Some((f.first()?.parse().ok()?, parse_uptime(f.get(3)?)?))
        })
}

/// `Pid` of `show info`.
fn info_pid(show_info: &str) -> Option<i32> {
    show_info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:")?.trim().parse().ok())
}

/// `Uptime_sec` of `show info` (the worker answering the stats socket).
pub fn info_uptime(show_info: &str) -> Option<Duration> {
    show_info.lines().find_map(|l| {
        let v = l.strip_prefix("Uptime_sec:")?;
        v.trim().parse().ok().map(Duration::from_secs)
    })
}

/// `0d00h10m08s` → 608 s.
fn parse_uptime(text: &str) -> Option<Duration> {
    let mut secs = 0u64;
    let mut num = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        secs += n * match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    num.is_empty().then_some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_workers_uptime_is_read_from_show_proc() {
        // As HAProxy 2.6.12's master CLI prints it after one reload.
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    4081            master          1 [failed: 0]   0d01h10m08s     2.6.12\n\
                    # workers\n\
                    4090            worker          0               0d00h00m07s     2.6.12\n\
                    # old workers\n\
                    4084            worker          1               0d01h10m08s     2.6.12\n\
                    # programs\n\n";
        assert_eq!(worker_of(text), Some((4090, Duration::from_secs(7))));
        assert_eq!(
            parse_uptime("1d02h03m04s"),
            Some(Duration::from_secs(93_784))
        );
        assert_eq!(parse_uptime("12x"), None);
        let info = "Name: HAProxy\nPid: 4090\nUptime: 0d 0h00m12s\nUptime_sec: 12\n";
        assert_eq!(info_uptime(info), Some(Duration::from_secs(12)));
        assert_eq!(info_pid(info), Some(4090));
        let me = process_started(std::process::id() as i32).unwrap();
        let age = SystemTime::now().duration_since(me).unwrap();
        assert!(
            age < Duration::from_secs(3600),
            "this test process started {age:?} ago"
        );
    }
}
