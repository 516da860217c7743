//! Benchmarks of haconfd against a real etcd, HAProxy and Patroni on loopback (docs/BENCHMARKS.md).
//!
//! `cargo bench --bench pipeline` runs every scenario; `cargo bench --bench pipeline -- NAME` runs
//! one (`latency`, `burst`, `idle`, `reload-under-load`, `heartbeat`). Each scenario is bounded in count and
//! time, prints a human-readable result line (`RESULT ...`) and a machine-readable JSON line
//! (`{"bench":...}`), and stops every process it started, by PID.
//!
//! The haconfd under test is `$HACONFD_BIN` when set, else the binary cargo built for this bench
//! (`CARGO_BIN_EXE_haconfd`: the bench profile inherits `release`, so it is
//! `target/release/haconfd`); if that is missing, `cargo build --release` is run once.
//!
//! Knobs (environment): `BENCH_LATENCY_N` (default 200 changes per latency variant),
//! `BENCH_IDLE_SECS` (default 60), `BENCH_RELOADS` (default 100 reloads per reload-under-load
//! phase), `BENCH_VERIFY_RELOAD=1` (haconfd also verifies each reload on the master CLI; see
//! [`verify_reload`]), `BENCH_HEARTBEAT_MEMBERS` (default `3,300,3000`) and
//! `BENCH_HEARTBEAT_SECS` (default 2 s per variant, at most 200 events).
//!
//! Latency is measured from just before the etcd put (client side, `SystemTime`) to the
//! `timestamp` of haconfd's JSON log line `reloaded` for that pass; both clocks are this machine's
//! wall clock. haconfd's other lines of the same pass (`file updated`, `pass applied` with its
//! `took`) split the time into stages.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::patroni::{self, LoadStats, PatroniCluster, ReadLoad, WriteLoad};
use common::procs::{
    self, free_port, run_with_timeout, temp_dir, unique_name, wait_until, Etcd, FakeMember,
    Haproxy, Proc, Role,
};

/// The scenarios, in the order `cargo bench --bench pipeline` runs them.
const SCENARIOS: &[&str] = &["latency", "burst", "idle", "reload-under-load", "heartbeat"];

/// confd's figures from the field measurements haconfd was designed against (not measured here:
/// confd is not installable).
const CONFD_P50_NOOP_MS: f64 = 7.0;
const CONFD_P99_NOOP_MS: f64 = 12.0;
const CONFD_P50_HAPROXY_C_MS: f64 = 69.0;
const CONFD_BURST_RELOADS: f64 = 30.0;
const CONFD_IDLE_RSS_MB: f64 = 29.0;
/// Field measurement: 297–321 failed writes per 20 reloads without server state.
const FIELD_FAILED_WRITES_PER_20: (f64, f64) = (297.0, 321.0);

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
    // a ten-minute benchmark has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline benchmarks: run them with `cargo bench --bench pipeline [-- SCENARIO]`");
        return;
    }
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for w in &wanted {
        if !SCENARIOS.contains(&w.as_str()) {
            eprintln!("unknown scenario {w:?}; known: {}", SCENARIOS.join(", "));
            std::process::exit(2);
        }
    }
    let run: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s))
        .collect();
    let bin = haconfd_bin();
    println!(
        "haconfd under test: {} ({} bytes); load average at start: {}",
        bin.display(),
        std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0),
        loadavg()
    );
    let mut failed = Vec::new();
    for s in run {
        println!("\n=== scenario {s} (load average {})", loadavg());
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(|| match s {
            "latency" => bench_latency(),
            "burst" => bench_burst(),
            "idle" => bench_idle(),
            "reload-under-load" => bench_reload_under_load(),
            "heartbeat" => bench_heartbeat(),
            _ => unreachable!(),
        });
        println!(
            "=== scenario {s} took {:.1}s (load average {})",
            t0.elapsed().as_secs_f64(),
            loadavg()
        );
        if r.is_err() {
            failed.push(s);
        }
    }
    if !failed.is_empty() {
        eprintln!("scenarios that failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The binary, knobs, small statistics
// ---------------------------------------------------------------------------------------------

/// `$HACONFD_BIN`, else cargo's bench build of the binary (built once with `cargo build
/// --release` if missing).
fn haconfd_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HACONFD_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "HACONFD_BIN={} does not exist", p.display());
            return p;
        }
        let p = procs::haconfd_bin();
        if p.is_file() {
            return p;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new("cargo")
            .args(["build", "--release", "--bin", "haconfd"])
            .current_dir(root)
            .status()
            .expect("run cargo build --release");
        assert!(status.success(), "cargo build --release failed");
        let p = root.join("target/release/haconfd");
        assert!(p.is_file(), "{} missing after the build", p.display());
        p
    })
    .clone()
}

/// `BENCH_VERIFY_RELOAD=1`: give haconfd `master_socket` so that it verifies each SIGUSR2 with
/// `show proc` (as in examples/haconfd.toml). Off by default: the bench confirms every reload with
/// the master's counter itself, and haconfd's own verification currently times out (its master
/// CLI client never half-closes the connection, so HAProxy 2.6 never ends the answer).
fn verify_reload() -> bool {
    std::env::var("BENCH_VERIFY_RELOAD").is_ok_and(|v| v == "1")
}

/// The 1/5/15-minute load averages.
fn loadavg() -> String {
    let t = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    t.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn summarize(v: &[f64]) -> Summary {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Summary {
        n: s.len(),
        p50: pct(&s, 50.0),
        p90: pct(&s, 90.0),
        p99: pct(&s, 99.0),
        max: s.last().copied().unwrap_or(f64::NAN),
        mean: s.iter().sum::<f64>() / s.len().max(1) as f64,
    }
}

fn summary_json(s: &Summary) -> Value {
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"n": s.n, "p50": r(s.p50), "p90": r(s.p90), "p99": r(s.p99), "max": r(s.max), "mean": r(s.mean)})
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Parses `Duration`'s Debug form as haconfd logs it (`took`): `812.4µs`, `1.93ms`, `2.1s`.
fn parse_debug_duration_ms(s: &str) -> Option<f64> {
    let units = [
        ("ns", 1e-6),
        ("µs", 1e-3),
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1000.0),
    ];
    units.iter().find_map(|(u, mul)| {
        s.strip_suffix(u)
            .and_then(|n| n.parse::<f64>().ok())
            .map(|n| n * mul)
    })
}

fn print_json(v: Value) {
    println!("{v}");
}

// ---------------------------------------------------------------------------------------------
// haconfd: config, process, JSON log
// ---------------------------------------------------------------------------------------------

/// One line of haconfd's JSON log.
#[derive(Debug, Clone)]
struct LogLine {
    /// The `timestamp` field, ms since the epoch.
    ts_ms: f64,
    message: String,
    revision: Option<i64>,
    took_ms: Option<f64>,
    raw: String,
}

impl LogLine {
    fn parse(raw: &str) -> Option<LogLine> {
        let v: Value = serde_json::from_str(raw).ok()?;
        let ts = v.get("timestamp")?.as_str()?;
        let ts_ms = unix_ms(humantime::parse_rfc3339(ts).ok()?);
        Some(LogLine {
            ts_ms,
            message: v.get("message")?.as_str()?.to_string(),
            revision: v.get("revision").and_then(Value::as_i64),
            took_ms: v
                .get("took")
                .and_then(Value::as_str)
                .and_then(parse_debug_duration_ms),
            raw: raw.to_string(),
        })
    }

    /// The event names the haproxy target (the field `target` clashes with tracing's own
    /// `target` key in the JSON, so look at the raw line).
    fn is_haproxy(&self) -> bool {
        self.raw.contains("\"target\":\"haproxy\"")
    }
}

/// Reads the lines appended to a log file since the last call.
struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
    all: Vec<LogLine>,
}

impl LogTail {
    fn new(path: &Path) -> LogTail {
        LogTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
            all: Vec::new(),
        }
    }

    /// New complete lines (JSON lines only), also kept in `all`.
    fn poll(&mut self) -> Vec<LogLine> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            if let Some(l) = LogLine::parse(line.trim()) {
                out.push(l);
            }
        }
        self.all.extend(out.iter().cloned());
        out
    }

    /// Polls (every 10 ms, bounded by `timeout`) until `f` accepts a new line; returns every line
    /// read meanwhile, or None on timeout.
    fn wait_for(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&LogLine) -> bool,
    ) -> Option<Vec<LogLine>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let new = self.poll();
            let hit = new.iter().any(&mut f);
            seen.extend(new);
            if hit {
                return Some(seen);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn count(&self, message: &str) -> usize {
        self.all.iter().filter(|l| l.message == message).count()
    }
}

/// How the haproxy target of a bench config is set up.
#[derive(Clone)]
struct Setup {
    endpoint: String,
    scope: String,
    /// `daemon.min_interval`; None = the default (500 ms).
    min_interval: Option<&'static str>,
    check: Vec<String>,
    template: PathBuf,
    dest: PathBuf,
    pidfile: PathBuf,
    /// Verify the signal with the master CLI (`show proc`); the socket is HAProxy's.
    verify_reload: bool,
    master_socket: PathBuf,
    /// `server_state = { stats_socket, file }`.
    server_state: Option<PathBuf>,
    stats_socket: PathBuf,
    primary_port: u16,
    replica_port: u16,
    stats_port: u16,
    maxconn: u32,
}

impl Setup {
    /// A setup in `dir` with a copy of the shipped template (so that edits elsewhere in the
    /// repository cannot trigger haconfd's template watcher mid-run), the default check and
    /// server state. The pidfile is a placeholder until HAProxy runs.
    fn new(dir: &Path, endpoint: &str, scope: &str) -> Setup {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy.cfg.tera");
        let template = dir.join("haproxy.cfg.tera");
        std::fs::copy(&src, &template).expect("copy the shipped haproxy template");
        Setup {
            endpoint: endpoint.to_string(),
            scope: scope.to_string(),
            min_interval: None,
            check: haproxy_check(),
            template,
            dest: dir.join("haproxy.cfg"),
            pidfile: dir.join("no-haproxy-yet.pid"),
            verify_reload: false,
            master_socket: dir.join("no-haproxy-yet.sock"),
            server_state: Some(dir.join("server-state")),
            stats_socket: dir.join("admin.sock"),
            primary_port: free_port(),
            replica_port: free_port(),
            stats_port: free_port(),
            maxconn: 1000,
        }
    }

    fn toml(&self) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut s = format!(
            "[etcd]\nendpoints = [{:?}]\nscope = {:?}\n\n[daemon]\n",
            self.endpoint, self.scope
        );
        if let Some(mi) = self.min_interval {
            s += &format!("min_interval = {mi:?}\n");
        }
        s += &format!(
            "\n[vars]\nbind_address = \"127.0.0.1\"\nprimary_port = {}\nreplica_port = {}\n\
             stats_port = {}\nstats_socket = {}\nmaxconn = {}\n\n",
            self.primary_port,
            self.replica_port,
            self.stats_port,
            q(&self.stats_socket),
            self.maxconn
        );
        let check: Vec<String> = self.check.iter().map(|a| format!("{a:?}")).collect();
        s += &format!(
            "[[template]]\nname = \"haproxy\"\nsrc = {}\ndest = {}\ncheck = [{}]\n",
            q(&self.template),
            q(&self.dest),
            check.join(", ")
        );
        s += &format!(
            "reload = {{ pidfile = {}, signal = \"SIGUSR2\", process = \"haproxy\"{} }}\n",
            q(&self.pidfile),
            if self.verify_reload {
                format!(", master_socket = {}", q(&self.master_socket))
            } else {
                String::new()
            }
        );
        if let Some(f) = &self.server_state {
            s += &format!(
                "server_state = {{ stats_socket = {}, file = {} }}\n",
                q(&self.stats_socket),
                q(f)
            );
        }
        s
    }

    fn write(&self, cfg: &Path) {
        let tmp = cfg.with_extension("toml.tmp");
        std::fs::write(&tmp, self.toml()).expect("write haconfd config");
        std::fs::rename(&tmp, cfg).expect("swap haconfd config");
    }
}

fn haproxy_check() -> Vec<String> {
    vec![
        procs::require_bin("haproxy").display().to_string(),
        "-c".into(),
        "-f".into(),
        "{{staged}}".into(),
    ]
}

fn haconfd_cmd(cfg: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(haconfd_bin());
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .arg("-c")
        .arg(cfg)
        .args(args);
    cmd
}

/// `haconfd once --no-reload`: renders the first haproxy.cfg (and server-state file).
fn render_once(cfg: &Path) {
    let out = run_with_timeout(
        &mut haconfd_cmd(cfg, &["once", "--no-reload"]),
        Duration::from_secs(30),
    )
    .expect("haconfd once");
    assert!(
        out.status.success(),
        "haconfd once failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `haconfd run --log-format json` and its log.
struct Haconfd {
    proc: Proc,
    log: LogTail,
}

impl Haconfd {
    /// Starts the daemon and waits (20 s) for its first listing of the scope, then `settle`.
    fn start(cfg: &Path, dir: &Path, settle: Duration) -> Haconfd {
        let log_path = dir.join("haconfd.log");
        let proc = Proc::spawn_logged(
            "haconfd",
            haconfd_cmd(cfg, &["run", "--log-format", "json"]),
            &log_path,
        );
        let mut log = LogTail::new(&log_path);
        if log
            .wait_for(Duration::from_secs(20), |l| l.message == "listed")
            .is_none()
        {
            panic!(
                "haconfd did not list etcd within 20 s; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(settle);
        log.poll();
        Haconfd { proc, log }
    }

    fn pid(&self) -> i32 {
        self.proc.pid()
    }

    fn log_text(&self) -> String {
        self.proc.log()
    }
}

impl Drop for Haconfd {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

/// Patroni-style member JSON.
fn member_json(port: u16, api_port: u16, role: &str, xlog: u64) -> String {
    json!({
        "conn_url": format!("postgres://127.0.0.1:{port}/postgres"),
        "api_url": format!("http://127.0.0.1:{api_port}/patroni"),
        "state": "running",
        "role": role,
        "version": "3.0.2",
        "xlog_location": xlog,
        "timeline": 1
    })
    .to_string()
}

/// Three fake members (m1 primary, m2 and m3 replicas) with their keys in etcd.
struct FakeCluster {
    members: Vec<FakeMember>,
    prefix: String,
}

impl FakeCluster {
    fn start(etcd: &Etcd, scope: &str) -> FakeCluster {
        let members = vec![
            FakeMember::start("m1", Role::Primary),
            FakeMember::start("m2", Role::Replica),
            FakeMember::start("m3", Role::Replica),
        ];
        let c = FakeCluster {
            members,
            prefix: format!("/service/{scope}/"),
        };
        etcd.put(&format!("{}leader", c.prefix), "m1");
        c.heartbeat(etcd, 50_331_816);
        c
    }

    fn role(i: usize) -> &'static str {
        if i == 0 {
            "master"
        } else {
            "replica"
        }
    }

    fn key(&self, i: usize) -> String {
        format!("{}members/{}", self.prefix, self.members[i].name)
    }

    /// Rewrites every member key with a new `xlog_location` (Patroni's heartbeat).
    fn heartbeat(&self, etcd: &Etcd, xlog: u64) {
        for (i, m) in self.members.iter().enumerate() {
            etcd.put(
                &self.key(i),
                &member_json(m.port(), m.api_port(), Self::role(i), xlog),
            );
        }
    }

    /// Puts member `i` with database port `port`; returns the revision.
    fn put_port(&self, etcd: &Etcd, i: usize, port: u16) -> i64 {
        let m = &self.members[i];
        etcd.put(
            &self.key(i),
            &member_json(port, m.api_port(), Self::role(i), 50_331_816),
        )
    }
}

/// HAProxy + haconfd on fake members, wired as `setup` says (the pidfile and master socket are
/// filled in once HAProxy runs).
struct Rig {
    setup: Setup,
    cluster: FakeCluster,
    haproxy: Haproxy,
    daemon: Haconfd,
    // Last: the directory outlives the processes using it.
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start(tag: &str, tweak: impl FnOnce(&mut Setup)) -> Rig {
        let etcd = Etcd::shared();
        let dir = temp_dir(tag);
        let scope = unique_name(tag);
        let cluster = FakeCluster::start(etcd, &scope);
        let mut setup = Setup::new(dir.path(), &etcd.endpoint(), &scope);
        tweak(&mut setup);
        let (haproxy, daemon) = start_stack(&mut setup, dir.path(), Duration::from_millis(1500));
        Rig {
            setup,
            cluster,
            haproxy,
            daemon,
            _dir: dir,
        }
    }
}

/// Renders once, starts HAProxy from that file, points `setup` at its pidfile and master socket,
/// and starts haconfd on the result (waiting `settle` for its first pass).
fn start_stack(setup: &mut Setup, dir: &Path, settle: Duration) -> (Haproxy, Haconfd) {
    let cfg = dir.join("haconfd.toml");
    setup.write(&cfg);
    render_once(&cfg);
    let haproxy = Haproxy::start(&setup.dest);
    setup.pidfile = haproxy.pidfile();
    setup.master_socket = haproxy.master_socket();
    setup.write(&cfg);
    let daemon = Haconfd::start(&cfg, dir, settle);
    (haproxy, daemon)
}

/// `(utime + stime)` of `pid` in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12).
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// On-CPU time of `pid`'s live threads in seconds, from /proc/<pid>/task/*/schedstat (ns
/// resolution, unlike the 10 ms ticks of /proc/<pid>/stat).
fn schedstat_seconds(pid: i32) -> f64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

/// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in MB.
fn status_mb(pid: i32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// 1. latency
// ---------------------------------------------------------------------------------------------

fn bench_latency() {
    let n = env_usize("BENCH_LATENCY_N", 200);
    let variants: [(&str, bool, bool); 3] = [
        // (name, haproxy -c check, server state)
        ("noop", false, false),
        ("haproxy-c", true, false),
        ("noop+server_state", false, true),
    ];
    for (name, check, state) in variants {
        latency_variant(name, check, state, n);
    }
}

fn latency_variant(name: &str, haproxy_c: bool, server_state: bool, n: usize) {
    const SPACING: Duration = Duration::from_millis(150);
    let mut rig = Rig::start("bench-lat", |s| {
        s.min_interval = Some("0s");
        if !haproxy_c {
            s.check = vec!["true".into()];
        }
        if !server_state {
            s.server_state = None;
        }
        s.verify_reload = false;
    });
    let reloads_before = rig.haproxy.reload_count();
    let spare = free_port();
    let ports = [rig.cluster.members[2].port(), spare];
    let etcd = Etcd::shared();
    let (mut total, mut ack, mut watch, mut apply, mut signal, mut pass) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut misses = 0usize;
    let mut extra_passes = 0usize;
    let run_start = Instant::now();
    for i in 0..n {
        let start = Instant::now();
        let t0 = SystemTime::now();
        let rev = rig.cluster.put_port(etcd, 2, ports[(i + 1) % 2]);
        let t_ack = SystemTime::now();
        let lines = rig.daemon.log.wait_for(Duration::from_secs(5), |l| {
            l.message == "pass applied" && l.revision.is_some_and(|r| r >= rev)
        });
        let Some(lines) = lines else {
            misses += 1;
            continue;
        };
        extra_passes += lines
            .iter()
            .filter(|l| l.message == "pass applied")
            .count()
            .saturating_sub(1);
        let applied = lines
            .iter()
            .rev()
            .find(|l| l.message == "pass applied")
            .unwrap();
        let reloaded = lines
            .iter()
            .rev()
            .find(|l| l.message == "reloaded" && l.is_haproxy());
        let updated = lines
            .iter()
            .rev()
            .find(|l| l.message == "file updated" && l.is_haproxy());
        let (Some(reloaded), Some(updated)) = (reloaded, updated) else {
            misses += 1;
            continue;
        };
        let t0 = unix_ms(t0);
        let took = applied.took_ms.unwrap_or(f64::NAN);
        let pass_start = applied.ts_ms - took;
        total.push(reloaded.ts_ms - t0);
        ack.push(unix_ms(t_ack) - t0);
        watch.push(pass_start - t0);
        apply.push(updated.ts_ms - pass_start);
        signal.push(reloaded.ts_ms - updated.ts_ms);
        pass.push(took);
        if let Some(rest) = SPACING.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let elapsed = run_start.elapsed();
    // Let the last reload finish before reading the master's counter.
    std::thread::sleep(Duration::from_millis(500));
    let proc_after = rig.haproxy.proc_status();
    let reloads = proc_after.reloads().saturating_sub(reloads_before);
    let rendered = std::fs::read_to_string(&rig.setup.dest).unwrap_or_default();
    let final_port = ports[n % 2];
    let final_ok = rendered.contains(&format!("127.0.0.1:{final_port} "));
    let rss = status_mb(rig.daemon.pid(), "VmHWM");
    let log_reloaded = rig.daemon.log.count("reloaded");
    drop(rig);

    let (t, a, w, ap, sg, ps) = (
        summarize(&total),
        summarize(&ack),
        summarize(&watch),
        summarize(&apply),
        summarize(&signal),
        summarize(&pass),
    );
    let confd_p50 = if haproxy_c {
        CONFD_P50_HAPROXY_C_MS
    } else {
        CONFD_P50_NOOP_MS
    };
    println!(
        "RESULT latency/{name}: put→reload p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         over {} changes ({} missed, {} extra passes) in {:.1}s; HAProxy reloads {} \
         (failed {}), haconfd `reloaded` lines {}; final state rendered: {}",
        t.p50,
        t.p90,
        t.p99,
        t.max,
        t.n,
        misses,
        extra_passes,
        elapsed.as_secs_f64(),
        reloads,
        proc_after.failed,
        log_reloaded,
        final_ok
    );
    println!(
        "       stages p50/p99 (ms): etcd put ack {:.2}/{:.2}; put→pass start {:.2}/{:.2}; \
         pass start→file updated (render+stage+check+commit) {:.2}/{:.2}; \
         file updated→reloaded {:.2}/{:.2}; whole pass {:.2}/{:.2}",
        a.p50, a.p99, w.p50, w.p99, ap.p50, ap.p99, sg.p50, sg.p99, ps.p50, ps.p99
    );
    let mut j = json!({
        "bench": "latency",
        "variant": name,
        "check": if haproxy_c { "haproxy -c" } else { "true" },
        "server_state": server_state,
        "changes": n,
        "missed": misses,
        "extra_passes": extra_passes,
        "put_to_reload_ms": summary_json(&t),
        "stages_ms": {
            "etcd_put_ack": summary_json(&a),
            "put_to_pass_start": summary_json(&w),
            "pass_start_to_file_updated": summary_json(&ap),
            "file_updated_to_reloaded": summary_json(&sg),
            "pass_took": summary_json(&ps),
        },
        "haproxy_reloads": reloads,
        "haproxy_failed_reloads": proc_after.failed,
        "log_reloaded_lines": log_reloaded,
        "final_state_rendered": final_ok,
        "haconfd_vmhwm_mb": rss,
        "confd_facts_p50_ms": confd_p50,
        "ratio_p50_vs_confd": t.p50 / confd_p50,
    });
    if !haproxy_c {
        j["confd_facts_p99_ms"] = json!(CONFD_P99_NOOP_MS);
        j["ratio_p99_vs_confd"] = json!(t.p99 / CONFD_P99_NOOP_MS);
    }
    if !haproxy_c && !server_state {
        j["target_p50_ms"] = json!(2.0);
        j["target_p99_ms"] = json!(4.0);
        j["meets_target"] = json!(t.p50 <= 2.0 && t.p99 <= 4.0);
    }
    print_json(j);
}

// ---------------------------------------------------------------------------------------------
// 2. burst
// ---------------------------------------------------------------------------------------------

fn bench_burst() {
    const CHANGES: usize = 30;
    const GAP: Duration = Duration::from_millis(10);
    // The default setup: haproxy -c, master-socket verification, server state, min_interval 500ms.
    let mut rig = Rig::start("bench-burst", |s| s.verify_reload = verify_reload());
    let etcd = Etcd::shared();
    let before = rig.haproxy.reload_count();
    let passes_before = rig.daemon.log.count("pass applied");
    let reloaded_before = rig.daemon.log.count("reloaded");
    // Distinct ports so that the final state is recognisable; nothing needs to listen there.
    let base = 41_000u16;
    let t0 = SystemTime::now();
    let start = Instant::now();
    for i in 0..CHANGES {
        let at = GAP * i as u32;
        if let Some(rest) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
        rig.cluster.put_port(etcd, 2, base + i as u16);
    }
    let puts_took = start.elapsed();
    let final_addr = format!("127.0.0.1:{} ", base + CHANGES as u16 - 1);
    let dest = rig.setup.dest.clone();
    let final_ok = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&dest)
            .map(|t| t.contains(&final_addr))
            .unwrap_or(false)
    });
    // Then quiet: no new pass for 3 s (bounded to 15 s).
    let quiet_deadline = Instant::now() + Duration::from_secs(15);
    let mut last_count = usize::MAX;
    while Instant::now() < quiet_deadline {
        rig.daemon.log.poll();
        let c = rig.daemon.log.count("pass applied");
        if c == last_count {
            break;
        }
        last_count = c;
        std::thread::sleep(Duration::from_secs(3));
    }
    let status = rig.haproxy.proc_status();
    let reloads = status.reloads().saturating_sub(before);
    let passes = rig.daemon.log.count("pass applied") - passes_before;
    let log_reloads = rig.daemon.log.count("reloaded") - reloaded_before;
    let last_reload_ms = rig
        .daemon
        .log
        .all
        .iter()
        .rev()
        .find(|l| l.message == "reloaded")
        .map(|l| l.ts_ms - unix_ms(t0));
    let log_ok = final_ok || {
        eprintln!("haconfd log:\n{}", rig.daemon.log_text());
        false
    };
    drop(rig);
    println!(
        "RESULT burst: {CHANGES} changes {} ms apart (puts took {:.0} ms): HAProxy reloads {} \
         (show proc; failed {}), haconfd `reloaded` lines {}, passes {}; final state rendered: {}; \
         first put→last reload {:.0} ms; target ≤ 3; confd {} (ratio {:.3})",
        GAP.as_millis(),
        puts_took.as_secs_f64() * 1000.0,
        reloads,
        status.failed,
        log_reloads,
        passes,
        log_ok,
        last_reload_ms.unwrap_or(f64::NAN),
        CONFD_BURST_RELOADS,
        reloads as f64 / CONFD_BURST_RELOADS
    );
    print_json(json!({
        "bench": "burst",
        "changes": CHANGES,
        "gap_ms": GAP.as_millis() as u64,
        "min_interval": "500ms (default)",
        "puts_took_ms": puts_took.as_secs_f64() * 1000.0,
        "haproxy_reloads": reloads,
        "haproxy_failed_reloads": status.failed,
        "log_reloaded_lines": log_reloads,
        "passes": passes,
        "final_state_rendered": log_ok,
        "first_put_to_last_reload_ms": last_reload_ms,
        "target_max_reloads": 3,
        "meets_target": reloads <= 3 && log_ok,
        "confd_facts_reloads": CONFD_BURST_RELOADS,
        "ratio_vs_confd": reloads as f64 / CONFD_BURST_RELOADS,
    }));
}

// ---------------------------------------------------------------------------------------------
// 3. idle
// ---------------------------------------------------------------------------------------------

fn bench_idle() {
    let secs = env_usize("BENCH_IDLE_SECS", 60);
    const HEARTBEAT_EVERY: usize = 10;
    let mut rig = Rig::start("bench-idle", |s| s.verify_reload = verify_reload());
    let etcd = Etcd::shared();
    let pid = rig.daemon.pid();
    let reloads_before = rig.haproxy.reload_count();
    let passes_before = rig.daemon.log.count("pass applied");
    let rss_start = status_mb(pid, "VmRSS").unwrap_or(f64::NAN);
    let cpu0 = cpu_seconds(pid);
    let sched0 = schedstat_seconds(pid);
    let start = Instant::now();
    let mut samples = Vec::with_capacity(secs);
    let mut heartbeats = 0;
    for s in 0..secs {
        let at = Duration::from_secs(s as u64);
        if let Some(rest) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
        if s % HEARTBEAT_EVERY == 0 {
            rig.cluster
                .heartbeat(etcd, 50_331_816 + 1000 * (s as u64 + 1));
            heartbeats += 1;
        }
        match status_mb(pid, "VmRSS") {
            Some(mb) => samples.push(mb),
            None => panic!(
                "haconfd (pid {pid}) is gone; log:\n{}",
                rig.daemon.log_text()
            ),
        }
    }
    if let Some(rest) = Duration::from_secs(secs as u64).checked_sub(start.elapsed()) {
        std::thread::sleep(rest);
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let sched = schedstat_seconds(pid) - sched0;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    let hwm = status_mb(pid, "VmHWM");
    rig.daemon.log.poll();
    let reloads = rig.haproxy.reload_count().saturating_sub(reloads_before);
    let passes = rig.daemon.log.count("pass applied") - passes_before;
    drop(rig);
    let max = samples.iter().copied().fold(f64::MIN, f64::max);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let cpu_pct = cpu / wall * 100.0;
    println!(
        "RESULT idle: {secs} s, {heartbeats} heartbeats of 3 member keys: RSS max {max:.2} MB, \
         mean {mean:.2} MB (at start {rss_start:.2} MB, VmHWM {:.2} MB, {threads} threads); CPU \
         {cpu:.2} s (utime+stime) = {cpu_pct:.3} % of one core, on-CPU {:.1} ms (schedstat) = \
         {:.4} %; passes that wrote {passes}, HAProxy reloads {reloads}; \
         target RSS ≤ 8 MB; confd {CONFD_IDLE_RSS_MB} MB (ratio {:.3})",
        hwm.unwrap_or(f64::NAN),
        sched * 1000.0,
        sched / wall * 100.0,
        max / CONFD_IDLE_RSS_MB
    );
    print_json(json!({
        "bench": "idle",
        "seconds": secs,
        "heartbeats": heartbeats,
        "rss_max_mb": max,
        "rss_mean_mb": mean,
        "rss_start_mb": rss_start,
        "vmhwm_mb": hwm,
        "cpu_seconds": cpu,
        "cpu_percent": cpu_pct,
        "schedstat_cpu_ms": sched * 1000.0,
        "schedstat_cpu_percent": sched / wall * 100.0,
        "threads": threads,
        "wall_seconds": wall,
        "passes_that_wrote": passes,
        "haproxy_reloads": reloads,
        "target_rss_mb": 8,
        "meets_target": max <= 8.0,
        "confd_facts_rss_mb": CONFD_IDLE_RSS_MB,
        "ratio_vs_confd": max / CONFD_IDLE_RSS_MB,
    }));
}

// ---------------------------------------------------------------------------------------------
// 4. reload-under-load
// ---------------------------------------------------------------------------------------------

struct PhaseResult {
    reloads: usize,
    confirmed: usize,
    haproxy_failed: usize,
    sighup_to_reload: Summary,
    writes: LoadStats,
    reads: LoadStats,
    secs: f64,
}

fn bench_reload_under_load() {
    let n = env_usize("BENCH_RELOADS", 100);
    let etcd = Etcd::shared();
    let scope = unique_name("bench-rul");
    let cluster = PatroniCluster::start(&etcd.endpoint(), &scope, 3);
    cluster.create_probe_table();
    let dir = temp_dir("bench-rul");
    let mut setup = Setup::new(dir.path(), &etcd.endpoint(), &scope);
    setup.verify_reload = verify_reload();
    let cfg = dir.path().join("haconfd.toml");
    let (haproxy, daemon) = start_stack(&mut setup, dir.path(), Duration::from_millis(500));

    let with_state = reload_phase(&cluster, &haproxy, &daemon, &cfg, &mut setup, n, true);
    let without = reload_phase(&cluster, &haproxy, &daemon, &cfg, &mut setup, n, false);
    drop(daemon);
    drop(haproxy);
    drop(cluster);

    for (label, p) in [
        ("server_state (default)", &with_state),
        ("no server_state (baseline)", &without),
    ] {
        println!(
            "RESULT reload-under-load/{label}: {}/{} reloads confirmed (HAProxy failed {}) in \
             {:.0} s; writes ok {} failed {}; reads ok {} served by the primary {} failed {}; \
             SIGHUP→reload p50 {:.0} ms",
            p.confirmed,
            p.reloads,
            p.haproxy_failed,
            p.secs,
            p.writes.ok,
            p.writes.failed,
            p.reads.ok,
            p.reads.misrouted,
            p.reads.failed,
            p.sighup_to_reload.p50
        );
        for e in p.writes.errors.iter().take(3) {
            println!("       write error: {e}");
        }
    }
    let per20 = |p: &PhaseResult| p.writes.failed as f64 * 20.0 / p.reloads.max(1) as f64;
    let j = |p: &PhaseResult| {
        json!({
            "reloads": p.reloads,
            "confirmed": p.confirmed,
            "haproxy_failed_reloads": p.haproxy_failed,
            "seconds": p.secs,
            "writes_ok": p.writes.ok,
            "writes_failed": p.writes.failed,
            "writes_failed_per_20_reloads": per20(p),
            "reads_ok": p.reads.ok,
            "reads_served_by_primary": p.reads.misrouted,
            "reads_failed": p.reads.failed,
            "sighup_to_reload_ms": summary_json(&p.sighup_to_reload),
            "write_errors_sample": p.writes.errors,
        })
    };
    print_json(json!({
        "bench": "reload-under-load",
        "reloads_per_phase": n,
        "with_server_state": j(&with_state),
        "baseline_no_server_state": j(&without),
        "target_failed_writes": 0,
        "meets_target": with_state.writes.failed == 0 && with_state.confirmed == n,
        "field_failed_writes_per_20_no_state": [FIELD_FAILED_WRITES_PER_20.0, FIELD_FAILED_WRITES_PER_20.1],
    }));
}

/// Sets the config for the phase (server state on or off), waits until routing is right, then
/// does `n` SIGHUP-driven reloads (alternating `maxconn`) under a write and a read load.
fn reload_phase(
    cluster: &PatroniCluster,
    haproxy: &Haproxy,
    daemon: &Haconfd,
    cfg: &Path,
    setup: &mut Setup,
    n: usize,
    server_state: bool,
) -> PhaseResult {
    const SPACING: Duration = Duration::from_millis(1500);
    let want_state = if server_state {
        Some(cfg.with_file_name("server-state"))
    } else {
        None
    };
    if setup.server_state != want_state {
        setup.server_state = want_state;
        hup_and_wait(haproxy, daemon, cfg, setup);
    }
    let leader = cluster.leader().expect("the cluster has a leader");
    let (pp, rp) = (setup.primary_port, setup.replica_port);
    let routed = wait_until(Duration::from_secs(60), || {
        matches!(patroni::is_in_recovery(pp), Ok(false))
            && matches!(patroni::is_in_recovery(rp), Ok(true))
    });
    assert!(
        routed,
        "HAProxy does not route writes to {leader} and reads to replicas; log:\n{}",
        haproxy.log()
    );
    // Rise 2 × inter 1 s for every server, then a quiet moment.
    std::thread::sleep(Duration::from_secs(4));
    let failed_before = reload_failures(daemon);
    let max = SPACING * (n as u32 + 10) + Duration::from_secs(60);
    let writes = WriteLoad::start(pp, max);
    let reads = ReadLoad::start(rp, max);
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let mut confirmed = 0;
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        if let Some(ms) = hup_and_wait(haproxy, daemon, cfg, setup) {
            confirmed += 1;
            took.push(ms);
        }
        if let Some(rest) = SPACING.checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    // The last reload's misrouting window is over well within 2 s.
    std::thread::sleep(Duration::from_secs(2));
    let secs = start.elapsed().as_secs_f64();
    let writes = writes.stop();
    let reads = reads.stop();
    PhaseResult {
        reloads: n,
        confirmed,
        haproxy_failed: reload_failures(daemon).saturating_sub(failed_before),
        sighup_to_reload: summarize(&took),
        writes,
        reads,
        secs,
    }
}

/// Flips `vars.maxconn` (changes haproxy.cfg, not routing), writes the config, SIGHUPs haconfd
/// and waits (10 s) for the master's reload counter to move. Returns SIGHUP→counter in ms.
fn hup_and_wait(haproxy: &Haproxy, daemon: &Haconfd, cfg: &Path, setup: &mut Setup) -> Option<f64> {
    setup.maxconn = if setup.maxconn == 1000 { 1001 } else { 1000 };
    setup.write(cfg);
    let before = haproxy.reload_count();
    let t = Instant::now();
    daemon.proc.signal(Signal::SIGHUP).expect("SIGHUP haconfd");
    let ok = wait_until(Duration::from_secs(10), || {
        haproxy
            .try_show_proc()
            .is_some_and(|p| p.reloads() > before && !p.workers.is_empty())
    });
    if !ok {
        eprintln!(
            "reload not seen within 10 s of SIGHUP; haconfd log tail:\n{}",
            tail(&daemon.log_text(), 20)
        );
    }
    ok.then(|| t.elapsed().as_secs_f64() * 1000.0)
}

/// haconfd's `reload failed` lines so far (it verifies each reload with `show proc`).
fn reload_failures(daemon: &Haconfd) -> usize {
    daemon
        .log_text()
        .matches("\"message\":\"reload failed\"")
        .count()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// 5. heartbeat
// ---------------------------------------------------------------------------------------------

/// CPU time per Patroni heartbeat (a member key rewritten with only a new `xlog_location`) at
/// 3, 300 and 3,000 members, with the shipped haproxy (plus server state) and pgbouncer
/// templates. In process, one `Engine::pass` per event: the worst case, where no two events
/// coalesce. Two variants in the same run: `render-every-pass` renders every target on every
/// pass, as haconfd did before it reused renders; `reuse-unchanged` is the default now.
fn bench_heartbeat() {
    let sizes: Vec<usize> = std::env::var("BENCH_HEARTBEAT_MEMBERS")
        .unwrap_or_else(|_| "3,300,3000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let budget = Duration::from_secs(env_usize("BENCH_HEARTBEAT_SECS", 2) as u64);
    for n in sizes {
        for (mode, reuse) in [("render-every-pass", false), ("reuse-unchanged", true)] {
            heartbeat_variant(n, mode, reuse, budget);
        }
    }
}

/// CPU seconds this process has used (all threads; the pass runs on this one).
fn process_cpu_seconds() -> f64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn heartbeat_variant(n: usize, mode: &str, reuse: bool, budget: Duration) {
    use haconfd::config::RawConfig;
    use haconfd::pipeline::Engine;
    use haconfd::snapshot::Snapshot;

    let dir = temp_dir("heartbeat");
    let d = dir.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let toml = format!(
        "[etcd]\nscope = \"demo\"\n[vars]\nstats_socket = {sock}\n\
         [[template]]\nname = \"haproxy\"\nsrc = {hsrc}\ndest = {hdest}\n\
         server_state = {{ stats_socket = {sock}, file = {state} }}\n\
         [[template]]\nname = \"pgbouncer\"\nsrc = {psrc}\ndest = {pdest}\nrequire_leader = true\n",
        sock = q(&d.join("admin.sock")),
        hsrc = q(&root.join("templates/haproxy.cfg.tera")),
        hdest = q(&d.join("haproxy.cfg")),
        state = q(&d.join("server-state")),
        psrc = q(&root.join("templates/pgbouncer.ini.tera")),
        pdest = q(&d.join("pgbouncer.ini")),
    );
    let settings = RawConfig::parse(&toml, &d.join("haconfd.toml"))
        .expect("parse the heartbeat config")
        .resolve(d)
        .expect("resolve the heartbeat config");
    let mut engine = Engine::new(std::sync::Arc::new(settings)).expect("compile the templates");
    engine.set_reuse_renders(reuse);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = |i: usize| format!("/service/demo/members/m{i:04}");
    let member = |i: usize, xlog: u64| {
        let role = if i == 0 { "master" } else { "replica" };
        member_json(5432 + i as u16, 8000 + i as u16, role, xlog).into_bytes()
    };
    let mut snap = Snapshot::new();
    snap.put("/service/demo/leader".into(), b"m0000".to_vec());
    for i in 0..n {
        snap.put(key(i), member(i, 50_331_816));
    }
    rt.block_on(engine.pass(&snap, false))
        .expect("the first pass");
    let bytes = std::fs::metadata(d.join("haproxy.cfg"))
        .map(|m| m.len())
        .unwrap_or(0);

    let (mut events, mut renders) = (0usize, 0usize);
    let mut wall = Vec::new();
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    while events < 200 && t0.elapsed() < budget {
        events += 1;
        let i = events % n;
        snap.put(key(i), member(i, 50_331_816 + 4096 * events as u64));
        snap.revision += 1;
        let t = Instant::now();
        let outcome = rt
            .block_on(engine.pass(&snap, false))
            .expect("a heartbeat pass");
        wall.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(outcome.is_noop(), "a heartbeat changed a file: {outcome:?}");
        renders += engine.stats.rendered.len();
    }
    let cpu_ms = (process_cpu_seconds() - cpu0) * 1000.0;
    let per_event = cpu_ms / events.max(1) as f64;
    let w = summarize(&wall);
    println!(
        "RESULT heartbeat members={n} mode={mode}: {events} events, CPU {per_event:.3} ms/event \
         ({:.0} % of a core at 200 events/s), renders/event {:.2}, pass wall p50 {:.3} ms p99 \
         {:.3} ms, haproxy.cfg {bytes} bytes",
        per_event * 20.0,
        renders as f64 / events.max(1) as f64,
        w.p50,
        w.p99,
    );
    print_json(json!({
        "bench": "heartbeat",
        "members": n,
        "mode": mode,
        "events": events,
        "cpu_ms_per_event": (per_event * 1000.0).round() / 1000.0,
        "renders_per_event": renders as f64 / events.max(1) as f64,
        "pass_wall_ms": summary_json(&w),
        "haproxy_cfg_bytes": bytes,
    }));
}
