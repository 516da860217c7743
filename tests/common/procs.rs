//! Real etcd, HAProxy and PgBouncer processes on free loopback ports, stopped by PID.
//!
//! Everything here runs on 127.0.0.1 with ports from [`free_port`] and state in temp dirs.
//!
//! Process lifetime rules:
//! - Every child is spawned through one long-lived "spawner" thread ([`on_spawner_thread`]) with
//!   `prctl(PR_SET_PDEATHSIG, SIGKILL)`. PDEATHSIG fires when the *spawning thread* exits, and
//!   cargo runs each test on its own short-lived thread, so spawning from the test thread would
//!   kill shared (static) processes as soon as the first test ends. The spawner thread lives as
//!   long as the test process, so children die with the test binary, even on SIGKILL.
//! - Each child also gets its own process group (pgid = its PID). [`Proc`]'s `Drop` sends SIGKILL
//!   to that group and to the PID, then reaps it (bounded). This also takes out forked helpers
//!   such as HAProxy workers.
//! - PIDs are recorded in a global list, and a `libc::atexit` hook SIGKILLs whatever is still
//!   listed when the test binary exits normally (statics are never dropped in Rust).
//! - HAProxy runs in the foreground master-worker mode (`-W` without `-D`), so the master is our
//!   direct child; PgBouncer runs in the foreground (no `-d`). Daemonizing programs can be
//!   tracked with [`Proc::track_pid`] (e.g. from a pidfile) and are then killed on drop as well.
//!
//! Every wait is bounded in time; nothing loops forever.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Pid, User};

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// What to run when a component is missing.
pub const SETUP_HINT: &str = "install the test dependencies with `sudo apt-get install -y \
protobuf-compiler etcd-server etcd-client haproxy pgbouncer postgresql patroni python3-etcd \
prometheus chromium lintian` (or run `bash .ci/run`)";

/// Directories searched after `$PATH`.
const EXTRA_BIN_DIRS: &[&str] = &[
    "/usr/sbin",
    "/sbin",
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/bin",
    "/usr/lib/postgresql/15/bin",
];

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Looks a binary up on `$PATH`, then in `/usr/sbin` and `/usr/lib/postgresql/15/bin`.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Like [`find_bin`], but panics with the set-up command when the binary is missing. Tests never
/// skip silently.
pub fn require_bin(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|| panic!("`{name}` not found: {SETUP_HINT}"))
}

/// `Command` for a required binary with arguments (for [`Proc::spawn`]).
pub fn command(bin: &str, args: &[&str]) -> Command {
    let mut c = Command::new(require_bin(bin));
    c.args(args);
    c
}

/// The daemon under test (only compiles inside integration tests): this build's, or the one
/// `HACONFD_TEST_BIN` names (to show that a new test fails on an earlier build).
pub fn haconfd_bin() -> PathBuf {
    std::env::var_os("HACONFD_TEST_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_haconfd")))
}

// ---------------------------------------------------------------------------------------------
// Ports, polling, small helpers
// ---------------------------------------------------------------------------------------------

static HANDED_OUT_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Where [`free_port`] looks: below the kernel's ephemeral range (32768–60999), so that no
/// outgoing connection (a client's, a probe's) takes a port between the test picking it and a
/// server binding it (CI saw HAProxy fail with `Address already in use` on such a port).
const TEST_PORTS: std::ops::Range<u32> = 20000..32000;

static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A free TCP port on 127.0.0.1 below the ephemeral range, never the same one twice within this
/// process; each process starts at its own place in the range.
pub fn free_port() -> u16 {
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let offset = std::process::id().wrapping_mul(2654435761) % span;
    for _ in 0..2000 {
        let i = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (TEST_PORTS.start + (offset + i) % span) as u16;
        let mut g = HANDED_OUT_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            g.get_or_insert_with(HashSet::new).insert(port);
            return port;
        }
    }
    panic!("free_port: no free port in {TEST_PORTS:?} after 2000 tries");
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes. Returns the last verdict.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A string unique within this machine run (pid + counter), e.g. for etcd key prefixes on the
/// shared etcd: `/service/<unique_name("demo")>/`.
pub fn unique_name(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads a PID from a pidfile (first line), if present and parseable.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// True when `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // State is the field after the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// `haconfd -c <cfg> once --no-reload` (the first files, before their consumers start), bounded
/// to 30 s; panics with its output when it fails.
pub fn haconfd_once_no_reload(cfg: &Path) {
    let out = run_with_timeout(
        Command::new(haconfd_bin())
            .arg("-c")
            .arg(cfg)
            .args(["once", "--no-reload"]),
        Duration::from_secs(30),
    )
    .expect("haconfd once");
    assert!(
        out.status.success(),
        "haconfd once --no-reload -c {} failed ({}):\n{}{}",
        cfg.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command to completion, killing it (by PID) after `timeout`. Stdout/stderr are captured.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Runs `cmd` within `timeout`: whether it succeeded, and its stdout then stderr.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let o = run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `haconfd -c CONFIG run` with JSON logs at debug level (tests read the log lines).
pub fn haconfd_run_json(config: &Path) -> Command {
    let mut cmd = Command::new(haconfd_bin());
    cmd.arg("-c").arg(config).args([
        "run",
        "--log-format",
        "json",
        "--log-level",
        "haconfd=debug",
    ]);
    cmd
}

/// (op state, admin state) of `backend/server` in HAProxy's `show servers state` on `sock`.
pub fn server_state(sock: &Path, backend: &str, server: &str) -> Option<(u8, u32)> {
    let dump = unix_cmd(
        sock,
        &format!("show servers state {backend}"),
        Duration::from_secs(2),
    )
    .ok()?;
    dump.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 6 && f[1] == backend && f[3] == server)
            .then(|| (f[5].parse().unwrap_or(255), f[6].parse().unwrap_or(255)))
    })
}

/// Minimal HTTP/1.0 request on 127.0.0.1:`port`. Returns (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// `GET` on 127.0.0.1:`port`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, Duration::from_secs(2))
}

/// Connects to 127.0.0.1:`port` and reads the first line (a [`TcpBackend`] banner), trimmed.
pub fn tcp_banner(port: u16, timeout: Duration) -> io::Result<String> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a banner",
        ));
    }
    Ok(line.trim().to_string())
}

/// Polls the banner read through 127.0.0.1:`port` (HAProxy in front of a fake member) until it
/// is `want`, bounded by `timeout`; the error names the port and the last banner read.
pub fn wait_banner(port: u16, want: &str, timeout: Duration) -> Result<(), String> {
    let mut last = String::new();
    let ok = wait_until(timeout, || {
        last = match tcp_banner(port, Duration::from_millis(500)) {
            Ok(b) => b,
            Err(e) => format!("error: {e}"),
        };
        last == want
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "port {port}: wanted banner {want:?}, last {last:?}"
        ))
    }
}

/// Sends one command on a unix stream socket (HAProxy master CLI or stats socket), half-closes
/// the write side (without it the master CLI keeps the connection open), and reads to EOF.
/// Bounded: connect retries for up to 2 s, reads time out after `timeout`.
pub fn unix_cmd(sock: &Path, cmd: &str, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(cmd.as_bytes())?;
    s.write_all(b"\n")?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Makes `path` (file or dir, recursively) owned by `postgres` and readable by it. A no-op when
/// not running as root (then PgBouncer runs as the current user instead).
pub fn give_to_postgres(path: &Path) {
    let Some((uid, gid)) = pgbouncer_user() else {
        return;
    };
    fn walk(p: &Path, uid: u32, gid: u32) {
        let _ = nix::unistd::chown(p, Some(uid.into()), Some(gid.into()));
        if p.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), uid, gid);
                }
            }
        }
    }
    walk(path, uid, gid);
}

/// The uid/gid of the `postgres` OS user (panics with the set-up hint when missing).
pub fn postgres_ids() -> (u32, u32) {
    let u = User::from_name("postgres")
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("OS user `postgres` not found: {SETUP_HINT}"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Who PgBouncer runs as: `postgres` when we are root (it refuses root), else the current user.
pub fn pgbouncer_user() -> Option<(u32, u32)> {
    nix::unistd::geteuid().is_root().then(postgres_ids)
}

/// A fresh temp dir under /tmp, mode 0755 so that `postgres` can traverse it.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("haconfd-{tag}-"))
        .tempdir()
        .expect("create temp dir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

// ---------------------------------------------------------------------------------------------
// The spawner thread, the PID registry and the atexit hook
// ---------------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send + 'static>;

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

thread_local! {
    static ON_SPAWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the one long-lived spawner thread and returns its result (panics are forwarded).
/// Spawn children here so that their PDEATHSIG is tied to the test process, not to a test thread.
/// Keep `f` short (spawn only, no waiting): all spawns of the process queue behind it.
pub fn on_spawner_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    if ON_SPAWNER.with(|c| c.get()) {
        return f();
    }
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("procs-spawner".into())
            .spawn(move || {
                ON_SPAWNER.with(|c| c.set(true));
                // Ends only when every sender is gone, which never happens (static).
                for job in rx {
                    job();
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = rtx.send(r);
    });
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .expect("spawner thread is gone");
    match rrx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("spawner thread did not answer within 60 s"),
    }
}

static LIVE_PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static EXIT_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static ATEXIT: Once = Once::new();

extern "C" fn kill_live_pids_at_exit() {
    // try_lock: never block process exit.
    if let Ok(pids) = LIVE_PIDS.try_lock() {
        for &pid in pids.iter() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    if let Ok(dirs) = EXIT_DIRS.try_lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn install_atexit() {
    ATEXIT.call_once(|| unsafe {
        nix::libc::atexit(kill_live_pids_at_exit);
    });
}

fn register_pid(pid: i32) {
    install_atexit();
    LIVE_PIDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pid);
}

/// Removes `dir` when the test binary exits (for state of statics, which are never dropped).
pub fn remove_at_exit(dir: &Path) {
    install_atexit();
    EXIT_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.to_path_buf());
}

fn unregister_pid(pid: i32) {
    LIVE_PIDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

// ---------------------------------------------------------------------------------------------
// Proc
// ---------------------------------------------------------------------------------------------

/// A child process that is killed by PID (SIGKILL) and reaped on drop. Spawned on the spawner
/// thread with PDEATHSIG=SIGKILL and in its own process group.
pub struct Proc {
    name: String,
    pid: i32,
    child: Mutex<Option<Child>>,
    status: Mutex<Option<ExitStatus>>,
    log: Option<PathBuf>,
    tracked: Mutex<Vec<i32>>,
}

impl Proc {
    /// Spawns `cmd` (stdin null; stdout/stderr as configured by the caller). Panics on failure.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Self::try_spawn(name, cmd, None).unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    /// Spawns `cmd` with stdout and stderr appended to `log`. Panics on failure.
    pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        Self::try_spawn(name, cmd, Some(log.to_path_buf()))
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    /// Spawns on the spawner thread; the child gets PDEATHSIG=SIGKILL and its own process group.
    pub fn try_spawn(name: &str, mut cmd: Command, log: Option<PathBuf>) -> io::Result<Proc> {
        let parent = std::process::id() as nix::libc::pid_t;
        cmd.stdin(Stdio::null());
        cmd.process_group(0);
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::prctl(
                    nix::libc::PR_SET_PDEATHSIG,
                    nix::libc::SIGKILL as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if nix::libc::getppid() != parent {
                    nix::libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = on_spawner_thread(move || cmd.spawn())?;
        let pid = child.id() as i32;
        register_pid(pid);
        Ok(Proc {
            name: name.to_string(),
            pid,
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
            log,
            tracked: Mutex::new(Vec::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The log file given to [`Proc::spawn_logged`], read now (empty if none).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Exit status if the child has exited (reaps it).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        if let Some(st) = *self.status.lock().unwrap() {
            return Some(st);
        }
        let mut g = self.child.lock().unwrap();
        let st = g.as_mut()?.try_wait().ok().flatten()?;
        *g = None;
        *self.status.lock().unwrap() = Some(st);
        unregister_pid(self.pid);
        Some(st)
    }

    pub fn is_running(&self) -> bool {
        self.try_wait().is_none() && self.child.lock().unwrap().is_some()
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = None;
        wait_until(timeout, || {
            st = self.try_wait();
            st.is_some()
        });
        st
    }

    /// Sends `sig` to the child PID (no-op once reaped).
    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        if self.child.lock().unwrap().is_none() {
            return Err(nix::errno::Errno::ESRCH);
        }
        kill(Pid::from_raw(self.pid), sig)
    }

    /// Also kill `pid` (e.g. read from the pidfile of a daemonizing program) on drop / kill.
    pub fn track_pid(&self, pid: i32) {
        register_pid(pid);
        self.tracked.lock().unwrap().push(pid);
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps. Returns the exit status if it exited.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        if self.signal(Signal::SIGTERM).is_ok() {
            if let Some(st) = self.wait_timeout(grace) {
                self.kill_tracked();
                return Some(st);
            }
        }
        self.kill()
    }

    /// SIGKILL (process group, PID and tracked PIDs), then reap, bounded to 5 s. Idempotent.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.kill_tracked();
        let mut g = self.child.lock().unwrap();
        if let Some(child) = g.as_mut() {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        *self.status.lock().unwrap() = Some(st);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        eprintln!(
                            "procs: {} (pid {}) not reaped within 5 s after SIGKILL",
                            self.name, self.pid
                        );
                        break;
                    }
                }
            }
            *g = None;
            unregister_pid(self.pid);
        }
        *self.status.lock().unwrap()
    }

    fn kill_tracked(&self) {
        for pid in self.tracked.lock().unwrap().drain(..) {
            if pid_alive(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            unregister_pid(pid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

const ETCD_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// One etcd member (a single-node cluster for [`Etcd::start`], or a member of [`EtcdCluster`]).
/// Key/value helpers are synchronous: they run etcd-client on a private tokio runtime and block
/// on a std channel, so they also work inside `#[tokio::test]`.
pub struct Etcd {
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    token: String,
    proc: Mutex<Option<Proc>>,
    /// `(cert, key, ca)` PEM paths when clients must use TLS with a client certificate.
    tls: Option<(String, String, String)>,
    /// Serve the v2 API too (`--enable-v2`, etcd 3.4/3.5): Patroni's `etcd:` section.
    v2: bool,
    paused: AtomicBool,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    client: Mutex<Option<etcd_client::Client>>,
}

impl Etcd {
    /// A fresh single-node etcd on free loopback ports; waits (bounded) until it is healthy.
    pub fn start() -> Etcd {
        let (c, p) = (free_port(), free_port());
        let name = "default".to_string();
        let initial = format!("{name}=http://127.0.0.1:{p}");
        let e = Etcd::new_member(name, c, p, initial, unique_name("etcd"));
        e.spawn_process();
        if !e.wait_healthy(Duration::from_secs(30)) {
            panic!(
                "etcd on {} not healthy within 30 s; log:\n{}",
                e.endpoint(),
                e.log()
            );
        }
        e
    }

    /// A fresh single-node etcd whose client port is `client_port` (e.g. a port a test already
    /// pointed haconfd at while nothing listened there).
    pub fn start_on(client_port: u16) -> Etcd {
        let p = free_port();
        let initial = format!("default=http://127.0.0.1:{p}");
        let e = Etcd::new_member(
            "default".into(),
            client_port,
            p,
            initial,
            unique_name("etcd"),
        );
        e.spawn_process();
        assert!(
            e.wait_healthy(Duration::from_secs(30)),
            "etcd not healthy:\n{}",
            e.log()
        );
        e
    }

    /// A single-node etcd serving clients over TLS and requiring client certificates signed by
    /// `ca`. The key/value helpers do not speak TLS: drive it with `etcdctl`.
    pub fn start_tls(cert: &str, key: &str, ca: &str) -> Etcd {
        let (c, p) = (free_port(), free_port());
        let initial = format!("default=http://127.0.0.1:{p}");
        let mut e = Etcd::new_member("default".into(), c, p, initial, unique_name("etcd"));
        e.tls = Some((cert.into(), key.into(), ca.into()));
        e.spawn_process();
        assert!(
            wait_until(Duration::from_secs(30), || port_open(c)
                && e.log().contains("serving client traffic")),
            "TLS etcd did not come up:\n{}",
            e.log()
        );
        e
    }

    /// One etcd per test binary, started on first use. Use [`unique_name`] for key prefixes.
    pub fn shared() -> &'static Etcd {
        static SHARED: OnceLock<Etcd> = OnceLock::new();
        SHARED.get_or_init(|| {
            let e = Etcd::start();
            remove_at_exit(e.dir.path());
            e
        })
    }

    fn new_member(
        name: String,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
        token: String,
    ) -> Etcd {
        require_bin("etcd");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("procs-etcd-client")
            .enable_all()
            .build()
            .expect("tokio runtime for the etcd helpers");
        let handle = rt.handle().clone();
        Etcd {
            dir: temp_dir(&format!("etcd-{name}")),
            name,
            client_port,
            peer_port,
            initial_cluster,
            token,
            proc: Mutex::new(None),
            tls: None,
            v2: false,
            paused: AtomicBool::new(false),
            rt: Mutex::new(Some(rt)),
            handle,
            client: Mutex::new(None),
        }
    }

    fn spawn_process(&self) {
        let mut g = self.proc.lock().unwrap();
        if g.as_ref().is_some_and(|p| p.is_running()) {
            return;
        }
        let c = self.endpoint();
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(require_bin("etcd"));
        if let Some((cert, key, ca)) = &self.tls {
            cmd.args([
                "--cert-file",
                cert,
                "--key-file",
                key,
                "--trusted-ca-file",
                ca,
            ])
            .arg("--client-cert-auth");
        }
        if self.v2 {
            cmd.arg("--enable-v2");
        }
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(self.dir.path())
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let log = self.dir.path().join("etcd.log");
        *g = Some(Proc::spawn_logged(
            &format!("etcd {}", self.name),
            cmd,
            &log,
        ));
        self.paused.store(false, Ordering::SeqCst);
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The process' stderr log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// PID of the running etcd, if any.
    pub fn pid(&self) -> Option<i32> {
        self.proc
            .lock()
            .unwrap()
            .as_ref()
            .filter(|p| p.is_running())
            .map(|p| p.pid())
    }

    /// `GET /health` says `"health":"true"` (needs a leader).
    pub fn is_healthy(&self) -> bool {
        matches!(http_request(self.client_port, "GET", "/health", Duration::from_millis(500)),
                 Some((200, body)) if body.contains("\"health\":\"true\""))
    }

    /// Polls `/health`, bounded.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.is_healthy())
    }

    /// SIGSTOP: the process hangs (connections stay open, nothing answers).
    pub fn pause(&self) {
        if let Some(p) = self.proc.lock().unwrap().as_ref() {
            p.signal(Signal::SIGSTOP).expect("SIGSTOP etcd");
            self.paused.store(true, Ordering::SeqCst);
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(p) = self.proc.lock().unwrap().as_ref() {
            p.signal(Signal::SIGCONT).expect("SIGCONT etcd");
            self.paused.store(false, Ordering::SeqCst);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stops the process (SIGTERM, SIGKILL after 5 s), keeping the data dir and ports.
    pub fn stop(&self) {
        if let Some(p) = self.proc.lock().unwrap().take() {
            if self.paused.swap(false, Ordering::SeqCst) {
                let _ = p.signal(Signal::SIGCONT);
            }
            p.stop(Duration::from_secs(5));
        }
    }

    /// SIGKILL the process (a crash), keeping the data dir and ports.
    pub fn kill(&self) {
        if let Some(p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Starts the process again on the same ports and data dir and waits until healthy (30 s).
    pub fn restart(&self) {
        self.spawn_process();
        if !self.wait_healthy(Duration::from_secs(30)) {
            panic!(
                "etcd {} not healthy 30 s after restart; log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Starts the process again without waiting (for cluster members that need quorum).
    pub fn restart_nowait(&self) {
        self.spawn_process();
    }

    /// A new etcd-client `Client` for this endpoint (must be awaited inside a runtime).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], Some(Self::connect_options()))
            .await
            .expect("etcd client")
    }

    fn connect_options() -> etcd_client::ConnectOptions {
        etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
    }

    /// Runs `f(client)` on the private runtime, blocking (bounded) for the result.
    fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(etcd_client::Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let cached = self.client.lock().unwrap().clone();
        let endpoint = self.endpoint();
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let work = async move {
                let client = match cached {
                    Some(c) => c,
                    // The channel is lazy: connect() succeeds even while etcd is down, and the
                    // same client reconnects for later calls.
                    None => {
                        etcd_client::Client::connect([endpoint], Some(Etcd::connect_options()))
                            .await?
                    }
                };
                let r = f(client.clone()).await?;
                Ok::<_, etcd_client::Error>((client, r))
            };
            let r = match tokio::time::timeout(ETCD_OP_TIMEOUT, work).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            let _ = tx.send(r);
        });
        match rx.recv_timeout(ETCD_OP_TIMEOUT + Duration::from_secs(2)) {
            Ok(Ok((client, v))) => {
                *self.client.lock().unwrap() = Some(client);
                Ok(v)
            }
            Ok(Err(e)) => Err(format!("etcd {what} on {}: {e}", self.endpoint())),
            Err(_) => Err(format!("etcd {what} on {}: no answer", self.endpoint())),
        }
    }

    pub fn try_put(&self, key: &str, value: &str) -> Result<i64, String> {
        let (k, v) = (key.to_string(), value.to_string());
        self.run("put", move |mut c| async move {
            let r = c.put(k, v, None).await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    /// Puts `key` = `value`; returns the new revision. Panics on error.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.try_put(key, value).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_get(&self, key: &str) -> Result<Option<String>, String> {
        let k = key.to_string();
        self.run("get", move |mut c| async move {
            let r = c.get(k, None).await?;
            Ok(r.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.try_get(key).unwrap_or_else(|e| panic!("{e}"))
    }

    /// All (key, value) pairs under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let k = prefix.to_string();
        self.run("get --prefix", move |mut c| async move {
            let r = c
                .get(k, Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect())
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_delete(&self, key: &str) -> Result<i64, String> {
        let k = key.to_string();
        self.run("delete", move |mut c| async move {
            Ok(c.delete(k, None).await?.deleted())
        })
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> i64 {
        self.try_delete(key).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn delete_prefix(&self, prefix: &str) -> i64 {
        let k = prefix.to_string();
        self.run("delete --prefix", move |mut c| async move {
            Ok(
                c.delete(k, Some(etcd_client::DeleteOptions::new().with_prefix()))
                    .await?
                    .deleted(),
            )
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Grants a lease of `ttl_secs` and puts `key` under it; returns the lease ID (an i64, often
    /// above 2^53).
    pub fn put_with_lease(&self, key: &str, value: &str, ttl_secs: i64) -> i64 {
        let (k, v) = (key.to_string(), value.to_string());
        self.run("put with lease", move |mut c| async move {
            let id = c.lease_grant(ttl_secs, None).await?.id();
            c.put(k, v, Some(etcd_client::PutOptions::new().with_lease(id)))
                .await?;
            Ok(id)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Puts `key` under an existing lease.
    pub fn put_on_lease(&self, key: &str, value: &str, lease: i64) -> i64 {
        let (k, v) = (key.to_string(), value.to_string());
        self.run("put on lease", move |mut c| async move {
            let r = c
                .put(k, v, Some(etcd_client::PutOptions::new().with_lease(lease)))
                .await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Revokes a lease: its keys are deleted at once.
    pub fn revoke(&self, lease: i64) {
        self.run("lease revoke", move |mut c| async move {
            c.lease_revoke(lease).await?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Compacts history up to `revision` (physical, so it has taken effect on return).
    pub fn compact(&self, revision: i64) {
        self.run("compact", move |mut c| async move {
            c.compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_revision(&self) -> Result<i64, String> {
        self.run("revision", move |mut c| async move {
            let r = c
                .get("\0", Some(etcd_client::GetOptions::new().with_count_only()))
                .await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.try_revision().unwrap_or_else(|e| panic!("{e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// etcd's v2 API (Patroni's `etcd:` section): its own keys, invisible to the v3 helpers above
// ---------------------------------------------------------------------------------------------

/// One answer of the v2 API: status, `X-Etcd-Index`, and the JSON body.
#[derive(Debug, Clone)]
pub struct V2Answer {
    pub status: u16,
    pub index: Option<i64>,
    pub body: serde_json::Value,
}

impl V2Answer {
    /// The `modifiedIndex` of the answer's node (the index a write made).
    pub fn modified_index(&self) -> i64 {
        self.body["node"]["modifiedIndex"]
            .as_i64()
            .unwrap_or_else(|| panic!("no node.modifiedIndex in {self:?}"))
    }
}

impl Etcd {
    /// A fresh single-node etcd serving the v2 API too (`--enable-v2`), as Patroni's `etcd:`
    /// section needs it.
    pub fn start_v2() -> Etcd {
        let (c, p) = (free_port(), free_port());
        let initial = format!("default=http://127.0.0.1:{p}");
        let mut e = Etcd::new_member("default".into(), c, p, initial, unique_name("etcd"));
        e.v2 = true;
        e.spawn_process();
        assert!(
            e.wait_healthy(Duration::from_secs(30)),
            "etcd --enable-v2 not healthy:\n{}",
            e.log()
        );
        e
    }

    /// [`Etcd::start_tls`] serving the v2 API too. The v2 helpers do not speak TLS: drive it
    /// with `ETCDCTL_API=2 etcdctl`.
    pub fn start_tls_v2(cert: &str, key: &str, ca: &str) -> Etcd {
        let (c, p) = (free_port(), free_port());
        let initial = format!("default=http://127.0.0.1:{p}");
        let mut e = Etcd::new_member("default".into(), c, p, initial, unique_name("etcd"));
        e.tls = Some((cert.into(), key.into(), ca.into()));
        e.v2 = true;
        e.spawn_process();
        assert!(
            wait_until(Duration::from_secs(30), || port_open(c)
                && e.log().contains("serving client traffic")),
            "TLS etcd did not come up:\n{}",
            e.log()
        );
        e
    }

    /// One request to the v2 API (`/v2/...`) over plain HTTP/1.0, with a form body for writes and
    /// optional basic auth. `Err` when etcd did not answer.
    pub fn v2_request(
        &self,
        method: &str,
        path: &str,
        form: &[(&str, &str)],
        auth: Option<(&str, &str)>,
    ) -> Result<V2Answer, String> {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let kind = (!form.is_empty()).then_some("application/x-www-form-urlencoded");
        self.v2_send(method, path, kind, &body, auth)
    }

    /// [`Etcd::v2_request`] with a JSON body (etcd's `/v2/auth` API).
    pub fn v2_request_json(
        &self,
        method: &str,
        path: &str,
        json: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<V2Answer, String> {
        let kind = (!json.is_empty()).then_some("application/json");
        self.v2_send(method, path, kind, json, auth)
    }

    fn v2_send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<V2Answer, String> {
        use base64::Engine as _;
        let timeout = ETCD_OP_TIMEOUT;
        let addr = ([127, 0, 0, 1], self.client_port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("etcd v2 {method} {path}: connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
        if let Some((u, p)) = auth {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Authorization: Basic {b64}\r\n"));
        }
        if let Some(kind) = content_type {
            req.push_str(&format!("Content-Type: {kind}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes())
            .map_err(|e| format!("etcd v2 {method} {path}: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .map_err(|e| format!("etcd v2 {method} {path}: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("etcd v2 {method} {path}: no status in {head:?}"))?;
        let index = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-etcd-index")
                .then(|| v.trim().parse().ok())
                .flatten()
        });
        let body = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()));
        Ok(V2Answer {
            status,
            index,
            body,
        })
    }

    fn v2_ok(&self, method: &str, key: &str, form: &[(&str, &str)]) -> V2Answer {
        let a = self
            .v2_request(method, &format!("/v2/keys{key}"), form, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            (200..300).contains(&a.status),
            "etcd v2 {method} {key}: {a:?}"
        );
        a
    }

    /// Sets a v2 key; returns the index of the write.
    pub fn v2_put(&self, key: &str, value: &str) -> i64 {
        self.v2_ok("PUT", key, &[("value", value)]).modified_index()
    }

    /// Sets a v2 key that expires after `ttl_secs` (as Patroni writes its leader and member keys).
    pub fn v2_put_ttl(&self, key: &str, value: &str, ttl_secs: u32) -> i64 {
        let ttl = ttl_secs.to_string();
        self.v2_ok("PUT", key, &[("value", value), ("ttl", &ttl)])
            .modified_index()
    }

    /// Deletes a v2 key; returns the index of the delete.
    pub fn v2_delete(&self, key: &str) -> i64 {
        self.v2_ok("DELETE", key, &[]).modified_index()
    }

    /// Deletes a v2 directory and everything under it (`patronictl remove`).
    pub fn v2_delete_dir(&self, dir: &str) -> i64 {
        self.v2_ok("DELETE", &format!("{dir}?recursive=true"), &[])
            .modified_index()
    }

    /// A v2 key's value, or `None` when absent.
    pub fn v2_get(&self, key: &str) -> Option<String> {
        let a = self
            .v2_request("GET", &format!("/v2/keys{key}"), &[], None)
            .unwrap_or_else(|e| panic!("{e}"));
        match a.status {
            200 => a.body["node"]["value"].as_str().map(String::from),
            404 => None,
            _ => panic!("etcd v2 GET {key}: {a:?}"),
        }
    }

    /// The leaves under a v2 directory, sorted by key (empty when it does not exist).
    pub fn v2_get_prefix(&self, dir: &str) -> Vec<(String, String)> {
        fn walk(n: &serde_json::Value, out: &mut Vec<(String, String)>) {
            if n["dir"].as_bool() == Some(true) {
                for c in n["nodes"].as_array().into_iter().flatten() {
                    walk(c, out);
                }
            } else if let (Some(k), Some(v)) = (n["key"].as_str(), n["value"].as_str()) {
                out.push((k.to_owned(), v.to_owned()));
            }
        }
        let a = self
            .v2_request(
                "GET",
                &format!("/v2/keys{}?recursive=true", dir.trim_end_matches('/')),
                &[],
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        if a.status == 200 {
            walk(&a.body["node"], &mut out);
        }
        out.sort();
        out
    }

    /// The v2 store's current index (`X-Etcd-Index`).
    pub fn v2_index(&self) -> i64 {
        let a = self
            .v2_request("GET", "/v2/keys/", &[], None)
            .unwrap_or_else(|e| panic!("{e}"));
        a.index.unwrap_or_else(|| panic!("no X-Etcd-Index: {a:?}"))
    }
}

impl EtcdCluster {
    /// Sets a v2 key through the first member that answers.
    pub fn v2_put(&self, key: &str, value: &str) -> i64 {
        self.first_ok(|m| {
            m.v2_request("PUT", &format!("/v2/keys{key}"), &[("value", value)], None)
                .and_then(|a| match a.status {
                    200..=299 => Ok(a.modified_index()),
                    _ => Err(format!("{a:?}")),
                })
        })
    }

    /// Deletes a v2 key through the first member that answers.
    pub fn v2_delete(&self, key: &str) -> i64 {
        self.first_ok(|m| {
            m.v2_request("DELETE", &format!("/v2/keys{key}"), &[], None)
                .and_then(|a| match a.status {
                    200..=299 => Ok(a.modified_index()),
                    _ => Err(format!("{a:?}")),
                })
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Ok(mut g) = self.proc.lock() {
            if let Some(p) = g.take() {
                p.kill();
            }
        }
        // Never block (and never panic) when dropped inside an async context.
        if let Some(rt) = self.rt.lock().ok().and_then(|mut g| g.take()) {
            rt.shutdown_background();
        }
    }
}

/// A real 3-member etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `n` (usually 3) members at once and waits (60 s) until all are healthy.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_members(n, false)
    }

    /// [`EtcdCluster::start`] with every member serving the v2 API too (`--enable-v2`).
    pub fn start_v2(n: usize) -> EtcdCluster {
        Self::start_members(n, true)
    }

    fn start_members(n: usize, v2: bool) -> EtcdCluster {
        assert!(n >= 1);
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = unique_name("etcd-cluster");
        let members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, &(c, p))| {
                let mut m = Etcd::new_member(format!("m{i}"), c, p, initial.clone(), token.clone());
                m.v2 = v2;
                m
            })
            .collect();
        for m in &members {
            m.spawn_process();
        }
        let cluster = EtcdCluster { members };
        let ok = wait_until(Duration::from_secs(60), || {
            cluster.members.iter().all(|m| m.is_healthy())
        });
        if !ok {
            let logs: String = cluster
                .members
                .iter()
                .map(|m| format!("--- {}:\n{}\n", m.name, m.log()))
                .collect();
            panic!("etcd cluster not healthy within 60 s\n{logs}");
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }

    /// Comma-separated endpoints.
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    pub fn members(&self) -> &[Etcd] {
        &self.members
    }

    /// The first member that is running, not paused and healthy.
    pub fn any_healthy(&self) -> Option<&Etcd> {
        self.members
            .iter()
            .find(|m| m.pid().is_some() && !m.is_paused() && m.is_healthy())
    }

    fn first_ok<T>(&self, f: impl Fn(&Etcd) -> Result<T, String>) -> T {
        let mut errs = Vec::new();
        for m in self
            .members
            .iter()
            .filter(|m| m.pid().is_some() && !m.is_paused())
        {
            match f(m) {
                Ok(v) => return v,
                Err(e) => errs.push(e),
            }
        }
        panic!("no etcd member answered: {errs:?}");
    }

    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.first_ok(|m| m.try_put(key, value))
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.first_ok(|m| m.try_get(key))
    }

    pub fn delete(&self, key: &str) -> i64 {
        self.first_ok(|m| m.try_delete(key))
    }

    pub fn revision(&self) -> i64 {
        self.first_ok(|m| m.try_revision())
    }

    /// Waits until every running, unpaused member is healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.members
                .iter()
                .filter(|m| m.pid().is_some() && !m.is_paused())
                .all(|m| m.is_healthy())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy
// ---------------------------------------------------------------------------------------------

/// One process line of the master CLI's `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcLine {
    pub pid: i32,
    /// `master` or `worker` (or a program name).
    pub kind: String,
    /// For the master: reload attempts since start (failed ones included). For a worker: how many
    /// reloads it has survived (0 for the current worker).
    pub reloads: u32,
    pub uptime: String,
    pub version: String,
}

/// Parsed `show proc` (HAProxy 2.6 master CLI).
///
/// Observed on 2.6.12 (columns are space-padded; lines end with "\n"; a blank line ends it):
/// ```text
/// #<PID>          <type>          <reloads>       <uptime>        <version>
/// 4081            master          0 [failed: 0]   0d00h10m08s     2.6.12-1+deb12u4
/// # workers
/// 4084            worker          0               0d00h10m08s     2.6.12-1+deb12u4
/// # programs
///
/// ```
/// After one good reload the master line reads `1 [failed: 0]` and a new worker PID is listed
/// with reloads 0; a worker that still serves old sessions is listed under `# old workers` with
/// its own reload count (1, 2, ...). After a reload with a broken config the master line reads
/// `3 [failed: 1]` (the counter counts the failed attempt too), the old worker stays under
/// `# workers` with reloads 1, and the next successful reload resets it to `[failed: 0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShowProc {
    pub master: Option<ProcLine>,
    /// `[failed: N]` on the master line: failed reloads since the last successful one.
    pub failed: u32,
    pub workers: Vec<ProcLine>,
    pub old_workers: Vec<ProcLine>,
    pub programs: Vec<ProcLine>,
}

impl ShowProc {
    pub fn parse(text: &str) -> ShowProc {
        let mut out = ShowProc::default();
        let mut section = "master";
        for line in text.lines() {
            let t = line.trim();
            if t.is_empty() || t.starts_with("#<PID>") {
                continue;
            }
            if let Some(s) = t.strip_prefix('#') {
                section = match s.trim() {
                    "workers" => "workers",
                    "old workers" => "old",
                    "programs" => "programs",
                    "old programs" => "programs",
                    _ => section,
                };
                continue;
            }
            let mut failed = None;
            let mut rest = t.to_string();
            if let (Some(a), Some(b)) = (t.find("[failed:"), t.find(']')) {
                failed = t[a + 8..b].trim().parse().ok();
                rest = format!("{}{}", &t[..a], &t[b + 1..]);
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() < 3 {
                continue;
            }
            let Ok(pid) = f[0].parse() else { continue };
            let pl = ProcLine {
                pid,
                kind: f[1].to_string(),
                reloads: f[2].parse().unwrap_or(0),
                uptime: f.get(3).unwrap_or(&"").to_string(),
                version: f.get(4).unwrap_or(&"").to_string(),
            };
            if pl.kind == "master" {
                out.failed = failed.unwrap_or(0);
                out.master = Some(pl);
                continue;
            }
            match section {
                "old" => out.old_workers.push(pl),
                "programs" => out.programs.push(pl),
                _ => out.workers.push(pl),
            }
        }
        out
    }

    /// The master's reload counter (attempts, failed included).
    pub fn reloads(&self) -> u32 {
        self.master.as_ref().map(|m| m.reloads).unwrap_or(0)
    }
}

/// `haproxy -W -p <pidfile> -S <master.sock> -f <cfg>` in the foreground: the master is our
/// direct child and its PID (also in the pidfile) survives reloads.
pub struct Haproxy {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    proc: Proc,
}

impl Haproxy {
    /// Starts HAProxy on `cfg` and waits (15 s) until the master CLI lists a worker. Panics with
    /// the log on failure.
    pub fn start(cfg: &Path) -> Haproxy {
        Self::try_start(cfg, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Haproxy::start`], with extra command-line arguments, returning the log on failure.
    pub fn try_start(cfg: &Path, extra_args: &[&str]) -> Result<Haproxy, String> {
        let dir = temp_dir("haproxy");
        let pidfile = dir.path().join("haproxy.pid");
        let sock = dir.path().join("master.sock");
        let mut cmd = Command::new(require_bin("haproxy"));
        cmd.arg("-W")
            .arg("-p")
            .arg(&pidfile)
            .arg("-S")
            .arg(&sock)
            .arg("-f")
            .arg(cfg)
            .args(extra_args);
        let log = dir.path().join("haproxy.log");
        let proc = Proc::spawn_logged("haproxy", cmd, &log);
        let h = Haproxy {
            dir,
            cfg: cfg.to_path_buf(),
            proc,
        };
        let mut exited = None;
        let ok = wait_until(Duration::from_secs(15), || {
            if let Some(st) = h.proc.try_wait() {
                exited = Some(st);
                return true;
            }
            h.pidfile().exists()
                && h.try_show_proc()
                    .map(|p| !p.workers.is_empty())
                    .unwrap_or(false)
        });
        match (ok, exited) {
            (true, None) => Ok(h),
            (_, Some(st)) => Err(format!("haproxy exited at start ({st}); log:\n{}", h.log())),
            (false, None) => Err(format!("haproxy not ready within 15 s; log:\n{}", h.log())),
        }
    }

    /// `haproxy -c -f cfg`: (valid, combined output).
    pub fn check_config(cfg: &Path) -> (bool, String) {
        let out = run_with_timeout(
            Command::new(require_bin("haproxy"))
                .arg("-c")
                .arg("-f")
                .arg(cfg),
            Duration::from_secs(20),
        )
        .expect("haproxy -c");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The master PID (our child; equal to the pidfile's content).
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn pidfile(&self) -> PathBuf {
        self.dir.path().join("haproxy.pid")
    }

    pub fn master_socket(&self) -> PathBuf {
        self.dir.path().join("master.sock")
    }

    pub fn cfg(&self) -> &Path {
        &self.cfg
    }

    /// The temp dir holding pidfile, master socket and log (handy for a stats socket path).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Master stdout/stderr so far (NOTICE/WARNING/ALERT lines of master and workers).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// One command on the master CLI; panics on socket errors.
    pub fn master_cmd(&self, cmd: &str) -> String {
        unix_cmd(&self.master_socket(), cmd, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("master CLI `{cmd}`: {e}; log:\n{}", self.log()))
    }

    pub fn show_proc(&self) -> String {
        self.master_cmd("show proc")
    }

    pub fn try_show_proc(&self) -> Option<ShowProc> {
        unix_cmd(&self.master_socket(), "show proc", Duration::from_secs(2))
            .ok()
            .map(|t| ShowProc::parse(&t))
            .filter(|p| p.master.is_some())
    }

    pub fn proc_status(&self) -> ShowProc {
        ShowProc::parse(&self.show_proc())
    }

    /// The master's reload counter from `show proc` (counts failed attempts too).
    pub fn reload_count(&self) -> u32 {
        self.proc_status().reloads()
    }

    /// `[failed: N]` from `show proc`: failed reloads since the last good one (2.6 shows it).
    pub fn failed_reloads(&self) -> u32 {
        self.proc_status().failed
    }

    /// PIDs of the current workers.
    pub fn worker_pids(&self) -> Vec<i32> {
        self.try_show_proc()
            .map(|p| p.workers.iter().map(|w| w.pid).collect())
            .unwrap_or_default()
    }

    /// `reload` on the master CLI. 2.6 prints nothing and closes the connection.
    pub fn reload(&self) -> String {
        self.master_cmd("reload")
    }

    /// `reload` on the master CLI, then waits until the master's counter has moved past its
    /// previous value and a worker is listed. Returns the new `show proc`; check `.failed` (1 =
    /// the new config was rejected and the old worker still serves).
    pub fn reload_and_wait(&self, timeout: Duration) -> Option<ShowProc> {
        let before = self.reload_count();
        self.reload();
        let mut last = None;
        wait_until(timeout, || {
            last = self
                .try_show_proc()
                .filter(|p| p.reloads() > before && !p.workers.is_empty());
            last.is_some()
        });
        last
    }

    /// SIGUSR2 to the master (same effect as `reload`).
    pub fn sigusr2(&self) {
        self.proc
            .signal(Signal::SIGUSR2)
            .expect("SIGUSR2 haproxy master");
    }

    /// Waits until the master's reload counter is at least `n` and a worker is up.
    pub fn wait_reloads(&self, n: u32, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.try_show_proc()
                .map(|p| p.reloads() >= n && !p.workers.is_empty())
                .unwrap_or(false)
        })
    }

    /// One command on a stats socket (`stats socket <path> level admin` in the config).
    pub fn stats_cmd(sock: &Path, cmd: &str) -> String {
        unix_cmd(sock, cmd, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("stats socket `{cmd}`: {e}"))
    }

    /// Parses `show servers state` into (backend, server) -> srv_op_state (0 = DOWN/stopped,
    /// 1 = starting, 2 = UP/running, 3 = stopping).
    pub fn servers_op_state(sock: &Path) -> BTreeMap<(String, String), u8> {
        Self::stats_cmd(sock, "show servers state")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 5).then(|| {
                    (
                        (f[1].to_string(), f[3].to_string()),
                        f[5].parse().unwrap_or(255),
                    )
                })
            })
            .collect()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Workers are in the master's process group (killpg in Proc::kill) and exit when the
        // master dies; also kill the listed ones by PID, in case one left the group.
        if self.proc.is_running() {
            if let Ok(t) = unix_cmd(
                &self.master_socket(),
                "show proc",
                Duration::from_millis(500),
            ) {
                let p = ShowProc::parse(&t);
                for w in p.workers.iter().chain(p.old_workers.iter()) {
                    self.proc.track_pid(w.pid);
                }
            }
        }
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// PgBouncer
// ---------------------------------------------------------------------------------------------

/// A run directory for a PgBouncer haconfd renders the ini of: `<parent>/pgb`, owned by
/// `postgres`, with a `userlist.txt` listing `postgres` and `pgbouncer` (trust auth).
pub fn pgbouncer_run_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("pgb");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("userlist.txt"),
        "\"postgres\" \"\"\n\"pgbouncer\" \"\"\n",
    )
    .unwrap();
    give_to_postgres(&dir);
    dir
}

/// A minimal valid pgbouncer.ini in its own temp dir, owned by `postgres`.
pub struct PgbouncerIni {
    dir: tempfile::TempDir,
    pub path: PathBuf,
    pub port: u16,
    pub pidfile: PathBuf,
    pub logfile: PathBuf,
    pub auth_file: PathBuf,
    /// Extra lines for the `[pgbouncer]` section.
    pub extra: String,
}

impl PgbouncerIni {
    /// `databases` is the body of `[databases]`, e.g. `* = host=127.0.0.1 port=5432`.
    pub fn new(databases: &str) -> PgbouncerIni {
        Self::with_extra(databases, "")
    }

    /// With extra `[pgbouncer]` lines (e.g. `pool_mode = transaction`).
    pub fn with_extra(databases: &str, extra: &str) -> PgbouncerIni {
        let dir = temp_dir("pgbouncer");
        let d = dir.path();
        let ini = PgbouncerIni {
            path: d.join("pgbouncer.ini"),
            port: free_port(),
            pidfile: d.join("pgbouncer.pid"),
            logfile: d.join("pgbouncer.log"),
            auth_file: d.join("userlist.txt"),
            extra: extra.to_string(),
            dir,
        };
        // auth_type trust still requires the user to be listed in auth_file.
        std::fs::write(&ini.auth_file, "\"pgbouncer\" \"\"\n\"postgres\" \"\"\n").unwrap();
        ini.write_databases(databases);
        give_to_postgres(ini.dir.path());
        ini
    }

    /// The `[pgbouncer]` section used by this helper.
    pub fn pgbouncer_section(&self) -> String {
        format!(
            "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\nunix_socket_dir = {}\n\
             auth_type = trust\nauth_file = {}\nadmin_users = pgbouncer\nstats_users = pgbouncer\n\
             logfile = {}\npidfile = {}\n{}\n",
            self.port,
            self.dir.path().display(),
            self.auth_file.display(),
            self.logfile.display(),
            self.pidfile.display(),
            self.extra
        )
    }

    /// Renders the whole ini for the given `[databases]` body.
    pub fn render(&self, databases: &str) -> String {
        format!("[databases]\n{databases}\n\n{}", self.pgbouncer_section())
    }

    /// Rewrites the ini (atomically, readable by `postgres`) with a new `[databases]` body.
    pub fn write_databases(&self, databases: &str) {
        let tmp = self.path.with_extension("ini.tmp");
        std::fs::write(&tmp, self.render(databases)).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        give_to_postgres(&tmp);
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// PgBouncer in the foreground as `postgres`, with a clean environment.
pub struct Pgbouncer {
    ini: PathBuf,
    port: u16,
    pidfile: PathBuf,
    logfile: Option<PathBuf>,
    proc: Proc,
    // Declared after `proc`: the dir outlives the process.
    _owned_ini: Option<PgbouncerIni>,
}

fn ini_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

impl Pgbouncer {
    /// Writes a [`PgbouncerIni`] with `databases` and starts PgBouncer on it (it owns the dir).
    pub fn start_with(databases: &str) -> Pgbouncer {
        let ini = PgbouncerIni::new(databases);
        let mut p = Self::start(&ini.path);
        p._owned_ini = Some(ini);
        p
    }

    /// Starts on an existing ini (reads `listen_port`, `pidfile` and `logfile` from it). The ini
    /// and every path in it must be accessible by `postgres` (see [`give_to_postgres`]).
    /// Waits (15 s) until the port accepts connections and the pidfile exists.
    pub fn start(ini: &Path) -> Pgbouncer {
        let ini = &std::fs::canonicalize(ini).unwrap_or_else(|e| panic!("{}: {e}", ini.display()));
        let text =
            std::fs::read_to_string(ini).unwrap_or_else(|e| panic!("read {}: {e}", ini.display()));
        let port: u16 = ini_value(&text, "listen_port")
            .and_then(|v| v.parse().ok())
            .expect("listen_port in ini");
        let pidfile = PathBuf::from(ini_value(&text, "pidfile").expect("pidfile in ini"));
        let logfile = ini_value(&text, "logfile").map(PathBuf::from);
        let out_log = ini.parent().unwrap().join("pgbouncer.stdout.log");
        std::fs::write(&out_log, "").unwrap();
        give_to_postgres(&out_log);
        let mut cmd = Command::new(require_bin("pgbouncer"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(ini.parent().unwrap())
            .arg(ini);
        if let Some((uid, gid)) = pgbouncer_user() {
            cmd.uid(uid).gid(gid);
        }
        let proc = Proc::spawn_logged("pgbouncer", cmd, &out_log);
        let p = Pgbouncer {
            ini: ini.to_path_buf(),
            port,
            pidfile,
            logfile,
            proc,
            _owned_ini: None,
        };
        let ok = wait_until(Duration::from_secs(15), || {
            !p.proc.is_running() || (port_open(p.port) && read_pidfile(&p.pidfile).is_some())
        });
        if !ok || !p.proc.is_running() {
            panic!(
                "pgbouncer did not come up on port {port}; output:\n{}\nlog:\n{}",
                p.proc.log(),
                p.log()
            );
        }
        p
    }

    /// Our child's PID (pgbouncer itself: no wrapper, no fork).
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn pidfile(&self) -> PathBuf {
        self.pidfile.clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn ini(&self) -> &Path {
        &self.ini
    }

    /// The ini helper when started with [`Pgbouncer::start_with`].
    pub fn owned_ini(&self) -> Option<&PgbouncerIni> {
        self._owned_ini.as_ref()
    }

    /// PgBouncer's logfile plus its stdout/stderr.
    pub fn log(&self) -> String {
        let lf = self
            .logfile
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        format!("{lf}{}", self.proc.log())
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn sighup(&self) {
        self.proc.signal(Signal::SIGHUP).expect("SIGHUP pgbouncer");
    }

    /// `psql -X -h 127.0.0.1 -p PORT -U user db -At -F '|' -c sql` with a clean environment,
    /// bounded to 15 s. Ok(stdout) or Err(stderr).
    pub fn psql(
        port: u16,
        user: &str,
        db: &str,
        sql: &str,
        tuples_only: bool,
    ) -> Result<String, String> {
        let mut cmd = Command::new(require_bin("psql"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("PGCONNECT_TIMEOUT", "5")
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                user,
                "-d",
                db,
            ])
            .args(["-A", "-F", "|", "-P", "footer=off", "-v", "ON_ERROR_STOP=1"]);
        if tuples_only {
            cmd.arg("-t");
        }
        cmd.args(["-c", sql]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(15)).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Admin console (simple query protocol via psql), tuples only, `|`-separated.
    pub fn try_admin_query(&self, sql: &str) -> Result<String, String> {
        Self::psql(self.port, "pgbouncer", "pgbouncer", sql, true)
    }

    pub fn admin_query(&self, sql: &str) -> String {
        self.try_admin_query(sql)
            .unwrap_or_else(|e| panic!("pgbouncer admin `{sql}`: {e}\nlog:\n{}", self.log()))
    }

    /// An admin `SHOW ...` as rows of column -> value.
    pub fn admin_rows(&self, sql: &str) -> Vec<BTreeMap<String, String>> {
        let text = Self::psql(self.port, "pgbouncer", "pgbouncer", sql, false)
            .unwrap_or_else(|e| panic!("pgbouncer admin `{sql}`: {e}"));
        let mut lines = text.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap_or("")
            .split('|')
            .map(String::from)
            .collect();
        lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split('|').map(String::from))
                    .collect()
            })
            .collect()
    }

    /// `SHOW DATABASES` as name -> row.
    pub fn show_databases(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.admin_rows("SHOW DATABASES")
            .into_iter()
            .filter_map(|r| Some((r.get("name")?.clone(), r)))
            .collect()
    }

    /// A query through the pooler (data plane) as `user` on `db`.
    pub fn query(&self, db: &str, user: &str, sql: &str) -> Result<String, String> {
        Self::psql(self.port, user, db, sql, true).map(|s| s.trim().to_string())
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Fake Patroni members: a TCP "database" and a REST health endpoint
// ---------------------------------------------------------------------------------------------

struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Accept loop on a free port; `handle` runs on its own thread per connection and must
    /// return soon after `stop` is set.
    fn start(
        name: &str,
        handle: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static,
    ) -> Server {
        // Bound on port 0 and kept: a port looked up first and bound later can be taken in
        // between (CI saw `Address already in use` here).
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let port = listener.local_addr().expect("test server address").port();
        HANDED_OUT_PORTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashSet::new)
            .insert(port);
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let handle = Arc::new(handle);
        let (stop2, threads2) = (stop.clone(), threads.clone());
        let accept = std::thread::Builder::new()
            .name(format!("srv-{name}"))
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let (h, st) = (handle.clone(), stop2.clone());
                            let t = std::thread::spawn(move || h(s, &st));
                            let mut g = threads2.lock().unwrap();
                            g.retain(|t| !t.is_finished());
                            g.push(t);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .unwrap();
        Server {
            port,
            stop,
            threads,
            accept: Some(accept),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP server that greets every connection with `<name>\n`, then echoes what it reads until
/// the client closes. Proves which server a proxied connection reached.
pub struct TcpBackend {
    name: String,
    conns: Arc<AtomicUsize>,
    srv: Server,
}

impl TcpBackend {
    pub fn start(name: &str) -> TcpBackend {
        let conns = Arc::new(AtomicUsize::new(0));
        let (n, c) = (name.to_string(), conns.clone());
        let srv = Server::start(name, move |mut s, stop| {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            if s.write_all(format!("{n}\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        TcpBackend {
            name: name.to_string(),
            conns,
            srv,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.srv.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.srv.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

/// What a fake Patroni REST API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Holds the leader lock while PostgreSQL is still in recovery (the ~0.2 s of a promotion):
    /// `/primary` answers 200, but the body says `replica`, with no write location.
    Promoting,
    /// Answers 503 everywhere (Patroni up, PostgreSQL not running).
    Down,
    /// A standby cluster's leader: `/standby-leader` and `/read-only` answer 200, `/primary`
    /// and `/replica` 503; the body says `standby_leader`, with replay locations.
    StandbyLeader,
}

/// Status code Patroni would give for `path` in `role` (query string ignored).
pub fn patroni_status(role: Role, path: &str) -> u16 {
    let p = path.split('?').next().unwrap_or("");
    let ok = match p {
        "/" | "/primary" | "/master" | "/read-write" => {
            matches!(role, Role::Primary | Role::Promoting)
        }
        "/leader" => matches!(role, Role::Primary | Role::Promoting | Role::StandbyLeader),
        "/standby-leader" | "/standby_leader" => role == Role::StandbyLeader,
        // A fake cannot tell a synchronous standby: templates list only those under /sync.
        "/replica" | "/async" | "/sync" => matches!(role, Role::Replica | Role::Promoting),
        "/read-only" | "/health" | "/readiness" | "/patroni" => role != Role::Down,
        "/liveness" => true,
        _ => return 404,
    };
    if ok {
        200
    } else {
        503
    }
}

/// An HTTP server mimicking Patroni's REST health checks: `HEAD`/`GET` `/primary` (`/master`,
/// `/`), `/replica`, `/read-only`, `/health`, ... answer 200 or 503 according to a settable role.
pub struct HealthEndpoint {
    role: Arc<Mutex<Role>>,
    hits: Arc<AtomicUsize>,
    /// How far a replica's replay location is behind the primary's write location, in bytes
    /// (`GET /patroni`'s `xlog`).
    lag: Arc<AtomicU64>,
    srv: Server,
}

impl HealthEndpoint {
    pub fn start(role: Role) -> HealthEndpoint {
        let role = Arc::new(Mutex::new(role));
        let hits = Arc::new(AtomicUsize::new(0));
        let lag = Arc::new(AtomicU64::new(0));
        let (r, h, behind) = (role.clone(), hits.clone(), lag.clone());
        let srv = Server::start("health", move |mut s, _stop| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && !req.windows(2).any(|w| w == b"\n\n")
            {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
                if req.len() > 16 * 1024 {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&req);
            let mut first = text.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or("/"));
            if method.is_empty() {
                return;
            }
            h.fetch_add(1, Ordering::SeqCst);
            let role = *r.lock().unwrap();
            let code = patroni_status(role, path);
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            // As Patroni builds it: the role and the xlog section come from a query on the
            // node, so a promoting node still reports itself a replica.
            let replayed = 50331816u64.saturating_sub(behind.load(Ordering::SeqCst));
            let body = match role {
                Role::Primary => {
                    r#"{"state":"running","role":"primary","xlog":{"location":50331816},"timeline":2}"#.to_owned()
                }
                Role::Replica | Role::Promoting => format!(
                    r#"{{"state":"running","role":"replica","xlog":{{"received_location":50331816,"replayed_location":{replayed}}},"timeline":1}}"#
                ),
                Role::StandbyLeader => format!(
                    r#"{{"state":"running","role":"standby_leader","xlog":{{"received_location":50331816,"replayed_location":{replayed}}},"timeline":1}}"#
                ),
                Role::Down => r#"{"state":"stopped","role":"uninitialized"}"#.to_owned(),
            };
            let mut resp = format!(
                "HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            if method != "HEAD" && method != "OPTIONS" {
                resp.push_str(&body);
            }
            let _ = s.write_all(resp.as_bytes());
            let _ = s.shutdown(Shutdown::Both);
        });
        HealthEndpoint {
            role,
            hits,
            lag,
            srv,
        }
    }

    /// Sets how far behind the primary this replica reports its replay (`GET /patroni`).
    pub fn set_lag(&self, bytes: u64) {
        self.lag.store(bytes, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.srv.port
    }

    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap() = role;
    }

    pub fn role(&self) -> Role {
        *self.role.lock().unwrap()
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A fake Patroni member: a [`TcpBackend`] named `name` plus a [`HealthEndpoint`].
pub struct FakeMember {
    pub name: String,
    pub backend: TcpBackend,
    pub health: HealthEndpoint,
}

impl FakeMember {
    pub fn start(name: &str, role: Role) -> FakeMember {
        FakeMember {
            name: name.to_string(),
            backend: TcpBackend::start(name),
            health: HealthEndpoint::start(role),
        }
    }

    pub fn port(&self) -> u16 {
        self.backend.port()
    }

    pub fn api_port(&self) -> u16 {
        self.health.port()
    }

    pub fn set_role(&self, role: Role) {
        self.health.set_role(role)
    }

    /// Patroni-style member JSON for `/service/<scope>/members/<name>`. `role_name` is what
    /// Patroni writes (`master` for 3.x, `primary` for 4.x, `replica`, ...).
    pub fn member_json(&self, role_name: &str) -> String {
        serde_json::json!({
            "conn_url": format!("postgres://127.0.0.1:{}/postgres", self.port()),
            "api_url": format!("http://127.0.0.1:{}/patroni", self.api_port()),
            "state": "running",
            "role": role_name,
            "version": "3.0.2",
            "xlog_location": 50331816u64,
            "timeline": 1
        })
        .to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// A plain PostgreSQL server (initdb + postgres, no Patroni)
// ---------------------------------------------------------------------------------------------

/// A throwaway PostgreSQL 15 server on 127.0.0.1:`port` (trust auth, superuser `postgres`, no
/// fsync), run as `postgres` in its own temp dir and killed by PID on drop.
pub struct Postgres {
    port: u16,
    data: PathBuf,
    proc: Proc,
    // Declared after `proc`: the dir outlives the process.
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// `initdb` (about half a second) and start; waits (30 s) until `SELECT 1` answers.
    pub fn start() -> Postgres {
        Self::start_on(&["127.0.0.1"])
    }

    /// [`Postgres::start`] listening on each of `addrs` (loopback addresses: one server can
    /// stand for several members, told apart by `inet_server_addr()`), 127.0.0.1 first.
    pub fn start_on(addrs: &[&str]) -> Postgres {
        let listen = format!("listen_addresses={}", addrs.join(","));
        let dir = temp_dir("postgres");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&sock).unwrap();
        give_to_postgres(dir.path());
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let bin = |name: &str| {
            let p = Path::new("/usr/lib/postgresql/15/bin").join(name);
            if is_executable(&p) {
                p
            } else {
                require_bin(name)
            }
        };
        let as_postgres = |cmd: &mut Command| {
            cmd.env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("LC_ALL", "C")
                .current_dir(dir.path());
            if let Some((uid, gid)) = pgbouncer_user() {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin("initdb"));
        as_postgres(&mut initdb);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        let out = run_with_timeout(&mut initdb, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("initdb: {e}: {SETUP_HINT}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = Command::new(bin("postgres"));
        as_postgres(&mut cmd);
        cmd.arg("-D").arg(&data).arg("-k").arg(&sock).args([
            "-p",
            &port.to_string(),
            "-c",
            &listen,
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=16MB",
            "-c",
            "max_connections=50",
        ]);
        let log = dir.path().join("postgres.log");
        std::fs::write(&log, "").unwrap();
        give_to_postgres(&log);
        let proc = Proc::spawn_logged("postgres", cmd, &log);
        let pg = Postgres {
            port,
            data,
            proc,
            _dir: dir,
        };
        let ok = wait_until(Duration::from_secs(30), || {
            !pg.proc.is_running()
                || (port_open(port)
                    && Pgbouncer::psql(port, "postgres", "postgres", "SELECT 1", true).is_ok())
        });
        assert!(
            ok && pg.proc.is_running(),
            "postgres did not come up on port {port}:\n{}",
            pg.proc.log()
        );
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

/// Whether the HAProxy behind `admin_sock` has a server that leaves parked in maintenance
/// (before 2.9, whose `del server` can crash a worker that has streams on the server: HAProxy
/// issue #2323) rather than deleted.
pub fn parks_removed_servers(admin_sock: &Path) -> bool {
    let info = unix_cmd(admin_sock, "show info", Duration::from_secs(2)).unwrap();
    !haconfd::consumers::haproxy::membership::version_at_least(&info, (2, 9))
}
