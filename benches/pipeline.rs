//! Benchmarks of haconfd against a real etcd, HAProxy and Patroni on loopback (docs/BENCHMARKS.md).
//!
//! `cargo bench --bench pipeline` runs every scenario; `cargo bench --bench pipeline -- NAME` runs
//! one (`latency`, `burst`, `idle`, `reload-under-load`, `heartbeat`, `failover`, `clusters`).
//! Each scenario
//! is bounded in count and time, prints a human-readable result line (`RESULT ...`) and a
//! machine-readable JSON line (`{"bench":...}`), and stops every process it started, by PID.
//!
//! The haconfd under test is `$HACONFD_BIN` when set, else the binary cargo built for this bench
//! (`CARGO_BIN_EXE_haconfd`: the bench profile inherits `release`, so it is
//! `target/release/haconfd`); if that is missing, `cargo build --release` is run once.
//!
//! Knobs (environment): `BENCH_LATENCY_N` (default 200 changes per latency variant),
//! `BENCH_IDLE_SECS` (default 60), `BENCH_RELOADS` (default 100 reloads per reload-under-load
//! phase), `BENCH_VERIFY_RELOAD=1` (haconfd also verifies each reload on the master CLI; see
//! [`verify_reload`]), `BENCH_HEARTBEAT_MEMBERS` (default `3,300,3000`) and
//! `BENCH_HEARTBEAT_SECS` (default 2 s per variant, at most 200 events),
//! `BENCH_FAILOVER_SWITCHOVERS` (default 5) and `BENCH_FAILOVER_CRASHES` (default 3) per
//! variant, `BENCH_FAILOVER_MAX_SECS` (default 3600: no failover round starts after that), and
//! `BENCH_PATRONI_VENV` (a virtualenv whose `bin/patroni` and `bin/patronictl` the failover
//! scenario runs instead of Debian's; docs/BENCHMARKS.md says how to make one), and for
//! `clusters`: `BENCH_CLUSTERS` (default 1000, at most 5000), `BENCH_CLUSTERS_SECS` (default 60 s
//! of heartbeats measured per variant) and `BENCH_CLUSTERS_CHANGES` (default 20 leader changes
//! per variant).
//!
//! `clusters` follows many Patroni clusters with one haconfd (`etcd.discover`, a `[clusters.*]`
//! table per cluster, one haproxy and one pgbouncer template over every cluster), on an etcd of
//! its own, side by side with the one-cluster baseline (`etcd.scope`, same templates): start →
//! first applied pass (without and with `haproxy -c` and PgBouncer's `RELOAD`), the daemon's CPU
//! and RSS while every member key is rewritten once per 10 s (Patroni's heartbeat), and leader
//! changes under that load timed to PgBouncer's reload, with the other clusters' lines
//! byte-compared.
//!
//! `failover` times leader changes of a real 3-node Patroni cluster from the clients' side: a
//! write probe on every node (when does the new primary itself first take a write), new
//! connections through HAProxy's write port and through PgBouncer, and two persistent PgBouncer
//! clients, with haconfd's fast path (`fast`) and with health checks and SIGHUP alone
//! (`checks`), alternating round by round on the same cluster, HAProxy and PgBouncer.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use common::patroni::{self, LoadStats, PatroniCluster, ReadLoad, WriteLoad};
use common::procs::{
    self, free_port, run_with_timeout, temp_dir, unique_name, wait_until, Etcd, FakeMember,
    Haproxy, Pgbouncer, Proc, Role,
};
use common::switch::{self, Mode, WriteProbe};

/// The scenarios, in the order `cargo bench --bench pipeline` runs them.
const SCENARIOS: &[&str] = &[
    "latency",
    "burst",
    "idle",
    "reload-under-load",
    "heartbeat",
    "failover",
    "clusters",
    "membership",
    "lag",
    "crash-hold",
];

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
            "failover" => bench_failover(),
            "clusters" => bench_clusters(),
            "membership" => bench_membership(),
            "lag" => bench_lag(),
            "crash-hold" => bench_crash_hold(),
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
    /// `server_state = { stats_socket, file, membership }`.
    server_state: Option<PathBuf>,
    /// `server_state.membership`: `"runtime"` (the default) or `"reload"`.
    membership: &'static str,
    stats_socket: PathBuf,
    primary_port: u16,
    replica_port: u16,
    stats_port: u16,
    maxconn: u32,
    /// More config, appended as it is (`[lag]`).
    extra: String,
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
            membership: "runtime",
            stats_socket: dir.join("admin.sock"),
            primary_port: free_port(),
            replica_port: free_port(),
            stats_port: free_port(),
            maxconn: 1000,
            extra: String::new(),
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
                "server_state = {{ stats_socket = {}, file = {}, membership = {:?} }}\n",
                q(&self.stats_socket),
                q(f),
                self.membership
            );
        }
        s += &self.extra;
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
        Self::start_logged(cfg, &dir.join("haconfd.log"), settle)
    }

    /// Like [`Haconfd::start`], logging to `log_path` (a new file per daemon: the tail reads it
    /// from the start).
    fn start_logged(cfg: &Path, log_path: &Path, settle: Duration) -> Haconfd {
        let log_path = log_path.to_path_buf();
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
        renders += engine.last_stats().rendered.len();
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

// ---------------------------------------------------------------------------------------------
// 6. failover
// ---------------------------------------------------------------------------------------------

/// Step of the write probes on the nodes and through HAProxy and PgBouncer.
const FO_STEP: Duration = Duration::from_millis(5);
/// Step of the two pooled (persistent) PgBouncer clients.
const FO_POOLED_STEP: Duration = Duration::from_millis(10);
/// How long after the new primary's own first write HAProxy and PgBouncer may take to bring a
/// write to it before the run records that they never did.
const FO_REACH_BOUND: Duration = Duration::from_secs(10);
/// How long after the event the new primary may take to accept its own first write.
const FO_OWN_BOUND: Duration = Duration::from_secs(20);
/// The probes go on this long after the last first write, so that late errors count too.
const FO_TAIL: Duration = Duration::from_secs(1);
/// Upper bound of one probe's life (each round stops its probes long before).
const FO_PROBE_MAX: Duration = Duration::from_secs(240);

/// The two ways haconfd is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FoVariant {
    /// `server_state`, `[failover] enabled = true`, the hold action, `pgbouncer_admin`, and
    /// the crash hold (on by default).
    Fast,
    /// [`FoVariant::Fast`] with `[failover.crash_hold] enabled = false`: the fast path as it
    /// was before the crash hold.
    NoHold,
    /// No server state, `[failover] enabled = false`, no hold, PgBouncer reloaded by SIGHUP:
    /// HAProxy's health checks alone move the write port.
    Checks,
}

impl FoVariant {
    fn name(self) -> &'static str {
        match self {
            FoVariant::Fast => "fast",
            FoVariant::NoHold => "no_hold",
            FoVariant::Checks => "checks",
        }
    }
}

/// How the leader goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FoKind {
    /// `patronictl switchover --force`.
    Switchover,
    /// SIGKILL of the leader's Patroni and postmaster: a replica takes over once the leader
    /// key's lease (`ttl`) runs out.
    Crash,
    /// SIGKILL of the leader's postmaster alone: its Patroni starts PostgreSQL again as the
    /// primary at its next loop, with the leader key kept.
    PgCrash,
}

impl FoKind {
    fn name(self) -> &'static str {
        match self {
            FoKind::Switchover => "switchover",
            FoKind::Crash => "crash",
            FoKind::PgCrash => "pg_crash",
        }
    }
}

/// The variant of round `i`: ABBA order (fast, checks, checks, fast, ...), so that neither
/// variant always comes first in a pair and haconfd is reconfigured every other round.
fn fo_variant(i: usize) -> FoVariant {
    if (i / 2) % 2 == (i % 2) {
        FoVariant::Fast
    } else {
        FoVariant::Checks
    }
}

/// One HAProxy and one PgBouncer in front of the cluster for the whole scenario, and the
/// haconfd of the variant being measured: it is stopped and started again with the other
/// variant's config when the variant changes, so that every round begins with a haconfd whose
/// fast-path state is its own. Field order is drop order: haconfd goes first, so that it never
/// signals a process being torn down.
struct FoStack {
    daemon: Option<Haconfd>,
    haproxy: Option<Haproxy>,
    pgbouncer: Option<Pgbouncer>,
    variant: FoVariant,
    endpoint: String,
    scope: String,
    primary_port: u16,
    replica_port: u16,
    stats_port: u16,
    pgb_port: u16,
    cfg: PathBuf,
    haproxy_cfg: PathBuf,
    state_file: PathBuf,
    admin_sock: PathBuf,
    pgb_ini: PathBuf,
    pgb_dir: PathBuf,
    tpl_dir: PathBuf,
    daemons_started: usize,
    // Last: the directory outlives the processes using it.
    dir: tempfile::TempDir,
}

/// What [`FoStack::settle`] found before a round.
struct FoSettled {
    leader: String,
    /// PgBouncer did not reach the leader and the bench SIGHUPed it (haconfd left it on an old
    /// primary: with the placeholder console, a fast round's RELOAD does nothing).
    pgbouncer_fixup: bool,
    /// Everything agreed within the bounds.
    ok: bool,
    /// What did not, if anything.
    problems: Vec<String>,
}

impl FoStack {
    /// Lays out the directory (copies of the shipped templates, PgBouncer's run dir owned by
    /// `postgres`), renders once, starts HAProxy and PgBouncer on the result, then haconfd.
    fn start(cluster: &PatroniCluster, variant: FoVariant) -> FoStack {
        procs::require_bin("pgbouncer");
        let dir = temp_dir("bench-fo");
        let d = dir.path().to_path_buf();
        let tpl_dir = d.join("tpl");
        std::fs::create_dir(&tpl_dir).expect("create the template dir");
        // Copies: haconfd watches the templates' directory, and edits elsewhere in the
        // repository must not reload anything mid-run.
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        for t in ["haproxy.cfg.tera", "pgbouncer.ini.tera", "hold.lua"] {
            std::fs::copy(shipped.join(t), tpl_dir.join(t))
                .unwrap_or_else(|e| panic!("copy template {t}: {e}"));
        }
        let pgb_dir = d.join("pgb");
        std::fs::create_dir(&pgb_dir).expect("create PgBouncer's dir");
        std::fs::write(
            pgb_dir.join("userlist.txt"),
            "\"postgres\" \"\"\n\"pgbouncer\" \"\"\n",
        )
        .expect("write userlist.txt");
        procs::give_to_postgres(&pgb_dir);
        let mut s = FoStack {
            daemon: None,
            haproxy: None,
            pgbouncer: None,
            variant,
            endpoint: cluster.etcd_endpoint.clone(),
            scope: cluster.scope.clone(),
            primary_port: free_port(),
            replica_port: free_port(),
            stats_port: free_port(),
            pgb_port: free_port(),
            cfg: d.join("haconfd.toml"),
            haproxy_cfg: d.join("haproxy.cfg"),
            state_file: d.join("server-state"),
            admin_sock: d.join("admin.sock"),
            pgb_ini: d.join("pgbouncer.ini"),
            pgb_dir,
            tpl_dir,
            daemons_started: 0,
            dir,
        };
        s.write_config();
        render_once(&s.cfg);
        s.haproxy = Some(Haproxy::start(&s.haproxy_cfg));
        procs::give_to_postgres(&s.pgb_dir);
        s.pgbouncer = Some(Pgbouncer::start(&s.pgb_ini));
        s.start_daemon();
        s
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().expect("HAProxy runs")
    }

    fn pgbouncer(&self) -> &Pgbouncer {
        self.pgbouncer.as_ref().expect("PgBouncer runs")
    }

    fn daemon(&mut self) -> &mut Haconfd {
        self.daemon.as_mut().expect("haconfd runs")
    }

    /// haconfd's config for the current variant (as tests/e2e_patroni.rs writes it).
    fn config_text(&self) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let fast = self.variant != FoVariant::Checks;
        let haproxy_reload = match &self.haproxy {
            Some(h) => format!(
                "reload = {{ pidfile = {}, signal = \"SIGUSR2\", process = \"haproxy\"{} }}\n",
                q(&h.pidfile()),
                if verify_reload() {
                    format!(", master_socket = {}", q(&h.master_socket()))
                } else {
                    String::new()
                }
            ),
            None => String::new(),
        };
        let check: Vec<String> = haproxy_check().iter().map(|a| format!("{a:?}")).collect();
        let mut s = format!(
            "[etcd]\nendpoints = [{:?}]\nscope = {:?}\n\n\
             [daemon]\nmin_interval = \"100ms\"\nretry_interval = \"1s\"\n\n\
             [failover]\nenabled = {fast}\n\n\
             [failover.crash_hold]\nenabled = {}\n\n\
             [vars]\nbind_address = \"127.0.0.1\"\nprimary_port = {}\nreplica_port = {}\n\
             stats_port = {}\nstats_socket = {}\nmaxconn = 1000\n",
            self.endpoint,
            self.scope,
            self.variant == FoVariant::Fast,
            self.primary_port,
            self.replica_port,
            self.stats_port,
            q(&self.admin_sock),
        );
        if fast {
            s += &format!("hold_lua = {}\n", q(&self.tpl_dir.join("hold.lua")));
        }
        s += &format!(
            "\n[[template]]\nname = \"haproxy\"\nsrc = {}\ndest = {}\ncheck = [{}]\n{haproxy_reload}",
            q(&self.tpl_dir.join("haproxy.cfg.tera")),
            q(&self.haproxy_cfg),
            check.join(", "),
        );
        if fast {
            s += &format!(
                "server_state = {{ stats_socket = {}, file = {} }}\n",
                q(&self.admin_sock),
                q(&self.state_file)
            );
        }
        let pgb = |f: &str| q(&self.pgb_dir.join(f));
        s += &format!(
            "\n[[template]]\nname = \"pgbouncer\"\nsrc = {}\ndest = {}\nrequire_leader = true\n\
             reload = {{ pidfile = {}, signal = \"SIGHUP\", process = \"pgbouncer\" }}\n",
            q(&self.tpl_dir.join("pgbouncer.ini.tera")),
            q(&self.pgb_ini),
            pgb("pgbouncer.pid"),
        );
        if fast {
            s += &format!(
                "pgbouncer_admin = {{ host = {}, port = {}, user = \"pgbouncer\", \
                 pause_timeout = \"15s\", connect_timeout = \"2s\" }}\n",
                q(&self.pgb_dir),
                self.pgb_port
            );
        }
        s += &format!(
            "\n[template.vars]\nlisten_addr = \"127.0.0.1\"\nlisten_port = {}\n\
             unix_socket_dir = {}\nauth_type = \"trust\"\nauth_file = {}\n\
             admin_users = \"pgbouncer\"\npool_mode = \"transaction\"\npidfile = {}\nlogfile = {}\n",
            self.pgb_port,
            q(&self.pgb_dir),
            pgb("userlist.txt"),
            pgb("pgbouncer.pid"),
            pgb("pgbouncer.log"),
        );
        s
    }

    fn write_config(&self) {
        let tmp = self.cfg.with_extension("toml.tmp");
        std::fs::write(&tmp, self.config_text()).expect("write haconfd config");
        std::fs::rename(&tmp, &self.cfg).expect("swap haconfd config");
    }

    /// Starts `haconfd run` on the current variant's config, with a log of its own.
    fn start_daemon(&mut self) {
        self.write_config();
        self.daemons_started += 1;
        let log = self.dir.path().join(format!(
            "haconfd-{}-{}.log",
            self.daemons_started,
            self.variant.name()
        ));
        self.daemon = Some(Haconfd::start_logged(
            &self.cfg,
            &log,
            Duration::from_millis(500),
        ));
    }

    /// Runs `variant`'s haconfd: if another variant's runs, stops it, starts one with this
    /// variant's config and waits (20 s) until HAProxy was reloaded on the variant's file.
    fn use_variant(&mut self, variant: FoVariant) {
        if self.variant == variant && self.daemon.is_some() {
            return;
        }
        drop(self.daemon.take());
        self.variant = variant;
        let before = self.haproxy().reload_count();
        self.start_daemon();
        let want_hold = variant != FoVariant::Checks;
        let ok = wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&self.haproxy_cfg)
                .is_ok_and(|c| c.contains("lua-load") == want_hold)
                && self
                    .haproxy()
                    .try_show_proc()
                    .is_some_and(|p| p.reloads() > before && !p.workers.is_empty())
        });
        if !ok {
            eprintln!(
                "[failover] HAProxy was not reloaded on the {} file within 20 s; haconfd log tail:\n{}",
                variant.name(),
                tail(&self.daemon().log_text(), 20)
            );
        }
    }

    /// Waits (bounded) until the cluster is healthy, HAProxy's live servers agree with the
    /// leader (it alone UP in `primary`, every other member UP in `replicas`, none drained or in
    /// maintenance), and new connections through HAProxy's write port and PgBouncer reach it.
    /// A PgBouncer left on another node is SIGHUPed by the bench (and reported).
    fn settle(&self, cluster: &PatroniCluster) -> FoSettled {
        if let Err(e) = cluster.wait_healthy(patroni::READY_TIMEOUT) {
            cluster.dump_logs();
            panic!("the cluster is not healthy before a round: {e:#}");
        }
        let leader = cluster
            .wait_leader(None, patroni::SWITCH_TIMEOUT)
            .unwrap_or_else(|e| panic!("no leader before a round: {e:#}"));
        let leader_port = cluster.node(&leader).pg_port;
        let names: Vec<String> = cluster
            .nodes()
            .iter()
            .filter(|n| cluster.is_running(&n.name))
            .map(|n| n.name.clone())
            .collect();
        let mut problems = Vec::new();
        let mut last = String::new();
        let agreed = wait_until(Duration::from_secs(30), || {
            let cfg = std::fs::read_to_string(&self.haproxy_cfg).unwrap_or_default();
            if !names.iter().all(|n| cfg.contains(&format!("server {n} "))) {
                last = "haproxy.cfg does not list every member yet".into();
                return false;
            }
            let live = fo_servers(&self.admin_sock);
            last = format!("{live:?}");
            !live.is_empty()
                && names.iter().all(|n| {
                    ["primary", "replicas"].iter().all(|b| {
                        live.get(&(b.to_string(), n.clone()))
                            .is_some_and(|&(op, admin)| {
                                admin == 0 && (op == 2) == ((*b == "primary") == (*n == leader))
                            })
                    })
                })
        });
        if !agreed {
            problems.push(format!(
                "HAProxy's live servers do not agree with leader {leader} after 30 s: {last}"
            ));
        }
        let reaches = |port: u16, timeout: Duration| {
            wait_until(timeout, || {
                let hit = fo_route(port) == Ok((leader_port, false));
                if !hit {
                    std::thread::sleep(Duration::from_millis(100));
                }
                hit
            })
        };
        if !reaches(self.primary_port, Duration::from_secs(10)) {
            problems.push(format!(
                "writes through HAProxy do not reach {leader}: {:?}",
                fo_route(self.primary_port)
            ));
        }
        let mut pgbouncer_fixup = false;
        if !reaches(self.pgb_port, Duration::from_secs(3)) {
            pgbouncer_fixup = true;
            eprintln!(
                "[failover] PgBouncer does not reach the leader {leader} ({:?}): the bench SIGHUPs it",
                fo_route(self.pgb_port)
            );
            self.pgbouncer().sighup();
            if !reaches(self.pgb_port, Duration::from_secs(10)) {
                problems.push(format!(
                    "writes through PgBouncer do not reach {leader}: {:?}",
                    fo_route(self.pgb_port)
                ));
            }
        }
        for p in &problems {
            eprintln!("[failover] not settled: {p}");
        }
        // A quiet moment: no check or reload in flight when the round begins.
        std::thread::sleep(Duration::from_secs(1));
        FoSettled {
            leader,
            pgbouncer_fixup,
            ok: problems.is_empty(),
            problems,
        }
    }
}

/// `show servers state`: (backend, server) → (srv_op_state, srv_admin_state); empty when the
/// socket does not answer.
fn fo_servers(sock: &Path) -> std::collections::BTreeMap<(String, String), (u8, u32)> {
    procs::unix_cmd(sock, "show servers state", Duration::from_secs(2))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 6).then(|| {
                (
                    (f[1].to_string(), f[3].to_string()),
                    (f[5].parse().unwrap_or(255), f[6].parse().unwrap_or(255)),
                )
            })
        })
        .collect()
}

/// What each of HAProxy's old workers (those still serving sessions after a reload) sees: the
/// `primary` servers it has UP and how many sessions it holds, through the master CLI
/// (`@!<pid> ...`). Empty when no old worker is left.
fn fo_old_workers(h: &Haproxy) -> Vec<String> {
    let Some(p) = h.try_show_proc() else {
        return Vec::new();
    };
    let ask = |pid: i32, cmd: &str| {
        procs::unix_cmd(
            &h.master_socket(),
            &format!("@!{pid} {cmd}"),
            Duration::from_secs(2),
        )
        .unwrap_or_default()
    };
    p.old_workers
        .iter()
        .map(|w| {
            let up: Vec<String> = ask(w.pid, "show servers state primary")
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 5 && f[5] == "2").then(|| f[3].to_string())
                })
                .collect();
            let sessions = ask(w.pid, "show sess")
                .lines()
                .filter(|l| l.starts_with("0x"))
                .count();
            format!(
                "old worker {} ({} reloads ago): primary servers UP {up:?}, {sessions} sessions \
                 (the CLI's own included)",
                w.pid, w.reloads
            )
        })
        .collect()
}

/// haconfd's WARN and ERROR lines since `wall0_ms`: each distinct message once, with a count.
fn fo_warnings(daemon: &Haconfd, wall0_ms: f64) -> Vec<String> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for l in daemon.log.all.iter().filter(|l| l.ts_ms >= wall0_ms) {
        if !(l.raw.contains("\"level\":\"WARN\"") || l.raw.contains("\"level\":\"ERROR\"")) {
            continue;
        }
        match seen.iter_mut().find(|(m, _)| *m == l.message) {
            Some((_, n)) => *n += 1,
            None => seen.push((l.message.clone(), 1)),
        }
    }
    seen.into_iter().map(|(m, n)| format!("{n}× {m}")).collect()
}

/// `SELECT inet_server_port(), pg_is_in_recovery()` on a new connection to 127.0.0.1:`port`
/// (simple query protocol: PgBouncer in transaction mode), on its own thread.
fn fo_route(port: u16) -> Result<(u16, bool), String> {
    std::thread::spawn(move || {
        let mut c = patroni::connect(port).map_err(|e| format!("{e:#}"))?;
        let msgs = c
            .simple_query("SELECT inet_server_port(), pg_is_in_recovery()")
            .map_err(|e| patroni::pg_err_text(&e))?;
        let _ = c.close();
        for m in msgs {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                let p = r.get(0).and_then(|v| v.parse().ok()).ok_or("no port")?;
                return Ok((p, r.get(1) == Some("t")));
            }
        }
        Err("no row".to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("route thread panicked".into()))
}

type ErrorCounts = std::collections::BTreeMap<&'static str, u64>;

/// The probes through HAProxy and PgBouncer whose errors a run counts.
const FO_PROBES: [&str; 4] = ["haproxy", "pgbouncer", "pooled1", "pooled2"];

/// What one leader change looked like from the clients' side.
struct FoRun {
    round: usize,
    kind: FoKind,
    variant: FoVariant,
    old: String,
    new: String,
    /// When the harness saw the new leader writable (ms after the event).
    harness_saw_ms: f64,
    /// The new primary's own first accepted direct write, ms after the event.
    own_ms: Option<f64>,
    /// The first write through HAProxy's write port / PgBouncer that reached the new primary,
    /// ms after the event.
    haproxy_ms: Option<f64>,
    pgbouncer_ms: Option<f64>,
    /// Errors from the event to the end of the window, per probe (see [`FO_PROBES`]).
    errors: Vec<ErrorCounts>,
    /// Errors from the new primary's own first write to the end of the window.
    errors_after_own: Vec<ErrorCounts>,
    /// Errors in the half second before the event (there should be none).
    errors_before: Vec<ErrorCounts>,
    /// The first few error texts through HAProxy and PgBouncer (reconnecting probes).
    sample_errors: Vec<(&'static str, Vec<String>)>,
    /// Attempts per probe in the window (shows the probes' pace).
    attempts: Vec<usize>,
    /// The longest attempt per probe that began in the window, ms: the longest a client
    /// waited (a query queued by PgBouncer's pause, a connection held by hold.lua).
    longest_ms: Vec<f64>,
    /// Errors of the :5000 probe's connections made after haconfd noticed the dead primary
    /// and HAProxy took the drain (its `drained` mark after `crash_noticed`; a connection
    /// that came in between went to the dead server); None without a notice.
    haproxy_errors_after_notice: Option<ErrorCounts>,
    /// haconfd's log, ms after the event: fenced, confirmed, HAProxy moved, PgBouncer
    /// followed, PgBouncer and HAProxy reloaded (first of each).
    marks: std::collections::BTreeMap<&'static str, f64>,
    window_ms: f64,
    /// HAProxy's old workers 0.2 s after the new primary's own first write (see
    /// [`fo_old_workers`]).
    old_workers: Vec<String>,
    /// haconfd's warnings and errors during the round.
    warnings: Vec<String>,
    settled: bool,
    problems: Vec<String>,
    pgbouncer_fixup: bool,
}

impl FoRun {
    fn after_own(&self, t: Option<f64>) -> Option<f64> {
        Some(t? - self.own_ms?)
    }
    fn haproxy_after_own(&self) -> Option<f64> {
        self.after_own(self.haproxy_ms)
    }
    fn pgbouncer_after_own(&self) -> Option<f64> {
        self.after_own(self.pgbouncer_ms)
    }
    /// Errors of the pooled clients, both added up.
    fn pooled(errors: &[ErrorCounts]) -> ErrorCounts {
        fo_add(&errors[2], &errors[3])
    }
}

fn fo_add(a: &ErrorCounts, b: &ErrorCounts) -> ErrorCounts {
    let mut out = a.clone();
    for (k, v) in b {
        *out.entry(k).or_default() += v;
    }
    out
}

fn fo_fmt_errors(e: &ErrorCounts) -> String {
    if e.is_empty() {
        return "none".into();
    }
    e.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fo_fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "never".into(), |v| format!("{v:+.0} ms"))
}

/// Errors of `attempts` in [from, to).
fn fo_errors_between(attempts: &[switch::Attempt], from: Instant, to: Instant) -> ErrorCounts {
    let mut out = ErrorCounts::new();
    for a in attempts.iter().filter(|a| a.at >= from && a.at < to) {
        if let Err(e) = &a.result {
            *out.entry(switch::error_class(e)).or_default() += 1;
        }
    }
    out
}

/// haconfd's fast-path and reload lines since `wall0_ms`, ms after it (the first of each).
fn fo_marks(daemon: &mut Haconfd, wall0_ms: f64) -> std::collections::BTreeMap<&'static str, f64> {
    daemon.log.poll();
    let mut m = std::collections::BTreeMap::new();
    for l in daemon.log.all.iter().filter(|l| l.ts_ms >= wall0_ms) {
        let key = match l.message.as_str() {
            "fencing the old primary: no new connection goes to it" => "fenced",
            "the new primary takes writes" => "confirmed",
            "HAProxy follows the new primary" => "haproxy_moved",
            "PgBouncer follows the new primary" => "pgbouncer_followed",
            m if m.starts_with("the primary is down: holding its clients") => "crash_noticed",
            "HAProxy moved through the runtime API" if l.raw.contains("state drain") => "drained",
            m if m.starts_with("crash hold released") => "hold_released",
            "reloaded" if l.raw.contains("\"target\":\"pgbouncer\"") => "pgbouncer_reloaded",
            "reloaded" if l.is_haproxy() => "haproxy_reloaded",
            _ => continue,
        };
        m.entry(key).or_insert(l.ts_ms - wall0_ms);
    }
    m
}

/// One round: the variant's haconfd, a settled stack, probes everywhere, the event, then the
/// first writes on the new primary (its own, through HAProxy, through PgBouncer), each bounded.
/// A crashed member is started again (and streams) before returning.
fn failover_round(
    cluster: &mut PatroniCluster,
    stack: &mut FoStack,
    kind: FoKind,
    variant: FoVariant,
    round: usize,
) -> FoRun {
    stack.use_variant(variant);
    let settled = stack.settle(cluster);
    let nodes: Vec<(String, u16, WriteProbe)> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let p = WriteProbe::start(n.pg_port, Mode::Sticky, FO_STEP, FO_PROBE_MAX);
            (n.name.clone(), n.pg_port, p)
        })
        .collect();
    let mut probes = vec![
        WriteProbe::start(stack.primary_port, Mode::Reconnect, FO_STEP, FO_PROBE_MAX),
        WriteProbe::start(stack.pgb_port, Mode::Reconnect, FO_STEP, FO_PROBE_MAX),
    ];
    for _ in 0..2 {
        probes.push(WriteProbe::start(
            stack.pgb_port,
            Mode::Persistent,
            FO_POOLED_STEP,
            FO_PROBE_MAX,
        ));
    }
    let probes_t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let (old, new) = match kind {
        FoKind::Switchover => {
            let new = cluster.switchover(None);
            (settled.leader.clone(), new)
        }
        FoKind::PgCrash => {
            let old = settled.leader.clone();
            patroni::kill_postmaster(&cluster.node(&old).data_dir, Signal::SIGKILL)
                .unwrap_or_else(|| panic!("no postmaster for {old}"));
            (old.clone(), old)
        }
        FoKind::Crash => {
            let old = cluster.crash_leader();
            let new = cluster
                .wait_leader(Some(&old), patroni::FAILOVER_TIMEOUT)
                .unwrap_or_else(|e| {
                    cluster.dump_logs();
                    panic!("no new leader after crashing {old}: {e:#}")
                });
            (old, new)
        }
    };
    let harness_saw = t0.elapsed();
    let new_port = cluster.node(&new).pg_port;
    let own_probe = &nodes
        .iter()
        .find(|(n, _, _)| *n == new)
        .expect("a probe on the new leader")
        .2;
    // Bounded polls (every 20 ms) for the three first writes.
    let own_deadline = Instant::now() + FO_OWN_BOUND;
    let mut own = None;
    // A PostgreSQL-only crash keeps the node: its first write counts once it has failed (a
    // write that finished just as the SIGKILL went out is from before).
    let down_since = |log: &[switch::Attempt]| {
        if kind != FoKind::PgCrash {
            return Some(t0);
        }
        log.iter()
            .find(|a| a.at >= t0 && a.result.is_err())
            .map(|a| a.at)
    };
    for _ in 0..2000 {
        own = down_since(&own_probe.attempts())
            .and_then(|from| switch::first_on(&own_probe.attempts(), new_port, from));
        if own.is_some() || Instant::now() >= own_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // By then haconfd has moved HAProxy (it confirms within milliseconds of the node's own
    // first write): does an old worker still hold connections it cannot hand over?
    std::thread::sleep(Duration::from_millis(200));
    let old_workers = fo_old_workers(stack.haproxy());
    let reach_deadline = own.unwrap_or_else(Instant::now) + FO_REACH_BOUND;
    // After a PostgreSQL-only crash, writes through HAProxy and PgBouncer count from just
    // before the node's own first one (the probes step every 5 ms).
    let reach_from = match (kind, own) {
        (FoKind::PgCrash, Some(o)) => o.checked_sub(Duration::from_millis(20)).unwrap_or(t0),
        _ => t0,
    };
    let (mut via_haproxy, mut via_pgbouncer) = (None, None);
    for _ in 0..2000 {
        if via_haproxy.is_none() {
            via_haproxy = switch::first_on(&probes[0].attempts(), new_port, reach_from);
        }
        if via_pgbouncer.is_none() {
            via_pgbouncer = switch::first_on(&probes[1].attempts(), new_port, reach_from);
        }
        if (via_haproxy.is_some() && via_pgbouncer.is_some()) || Instant::now() >= reach_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(FO_TAIL);
    let end = Instant::now();
    let logs = switch::stop_all(probes);
    switch::stop_all(nodes.into_iter().map(|(_, _, p)| p).collect());
    let marks = fo_marks(stack.daemon(), unix_ms(wall0));
    let warnings = fo_warnings(stack.daemon(), unix_ms(wall0));

    let ms = |t: Option<Instant>| t.map(|t| switch::ms_between(t0, t));
    let own_from = own.unwrap_or(end);
    let run = FoRun {
        round,
        kind,
        variant,
        old: old.clone(),
        new,
        harness_saw_ms: harness_saw.as_secs_f64() * 1000.0,
        own_ms: ms(own),
        haproxy_ms: ms(via_haproxy),
        pgbouncer_ms: ms(via_pgbouncer),
        errors: logs.iter().map(|l| fo_errors_between(l, t0, end)).collect(),
        errors_after_own: logs
            .iter()
            .map(|l| fo_errors_between(l, own_from, end))
            .collect(),
        errors_before: logs
            .iter()
            .map(|l| fo_errors_between(l, probes_t0, t0))
            .collect(),
        sample_errors: vec![
            (":5000", switch::first_errors(&logs[0], t0, 3)),
            ("PgBouncer", switch::first_errors(&logs[1], t0, 3)),
            (
                ":5000 (after the node's own write)",
                own.map(|o| switch::first_errors(&logs[0], o, 3))
                    .unwrap_or_default(),
            ),
        ],
        attempts: logs
            .iter()
            .map(|l| l.iter().filter(|a| a.at >= t0 && a.at < end).count())
            .collect(),
        longest_ms: logs
            .iter()
            .map(|l| switch::longest(l, t0).as_secs_f64() * 1000.0)
            .collect(),
        haproxy_errors_after_notice: marks.get("crash_noticed").map(|noticed_ms| {
            let ms = marks
                .get("drained")
                .copied()
                .filter(|d| d >= noticed_ms)
                .unwrap_or(*noticed_ms);
            let noticed = t0 + Duration::from_secs_f64(ms.max(0.0) / 1000.0);
            let mut out = ErrorCounts::new();
            for a in logs[0]
                .iter()
                .filter(|a| a.started >= noticed && a.at < end)
            {
                if let Err(e) = &a.result {
                    *out.entry(switch::error_class(e)).or_default() += 1;
                }
            }
            out
        }),
        marks,
        window_ms: switch::ms_between(t0, end),
        old_workers,
        warnings,
        settled: settled.ok,
        problems: settled.problems,
        pgbouncer_fixup: settled.pgbouncer_fixup,
    };
    if kind == FoKind::Crash {
        cluster.restart_member(&old);
    }
    run
}

/// The crash hold's rounds: crashes (Patroni and PostgreSQL), PostgreSQL-only crashes and
/// switchovers, each with the crash hold on (`fast`) and off (`no_hold`, the fast path as it
/// was), ABBA, on one Patroni cluster, one HAProxy and one PgBouncer (see docs/BENCHMARKS.md).
fn bench_crash_hold() {
    let crashes = env_usize("BENCH_HOLD_CRASHES", 3);
    let pg_crashes = env_usize("BENCH_HOLD_PG_CRASHES", 2);
    let switchovers = env_usize("BENCH_HOLD_SWITCHOVERS", 2);
    let max_secs = env_usize("BENCH_HOLD_MAX_SECS", 3600) as u64;
    let start = Instant::now();
    let (mut cluster, version, timing) = fo_cluster("bench-hold");
    println!(
        "crash-hold: {version} ({}), ttl {} s, loop_wait {} s, retry_timeout {} s; per \
         variant {crashes} crashes, {pg_crashes} PostgreSQL-only crashes, {switchovers} switchovers",
        cluster.binaries.patroni.display(),
        timing.ttl,
        timing.loop_wait,
        timing.retry_timeout,
    );
    // ABBA within each kind: fast, no_hold, no_hold, fast, ...
    let variant = |i: usize| {
        if (i / 2) % 2 == (i % 2) {
            FoVariant::Fast
        } else {
            FoVariant::NoHold
        }
    };
    let mut stack = FoStack::start(&cluster, FoVariant::Fast);
    let plan: Vec<(FoKind, FoVariant)> = [
        (FoKind::Crash, crashes),
        (FoKind::PgCrash, pg_crashes),
        (FoKind::Switchover, switchovers),
    ]
    .into_iter()
    .flat_map(|(k, n)| (0..2 * n).map(move |i| (k, variant(i))))
    .collect();
    let mut runs = Vec::with_capacity(plan.len());
    let mut stopped_early = false;
    for (round, &(kind, v)) in plan.iter().enumerate() {
        if start.elapsed() > Duration::from_secs(max_secs) {
            eprintln!("[crash-hold] BENCH_HOLD_MAX_SECS={max_secs} reached after {round} rounds");
            stopped_early = true;
            break;
        }
        let t = Instant::now();
        let run = failover_round(&mut cluster, &mut stack, kind, v, round);
        fo_print_run(&run);
        println!(
            "       longest wait per probe {:?} ms; :5000 errors after the crash was noticed: {}; round took {:.1} s",
            run.longest_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
            run.haproxy_errors_after_notice
                .as_ref()
                .map_or("no notice".into(), fo_fmt_errors),
            t.elapsed().as_secs_f64()
        );
        runs.push(run);
    }
    drop(stack);
    drop(cluster);

    let total = |e: &ErrorCounts| e.values().sum::<u64>() as f64;
    let mut summary = serde_json::Map::new();
    for v in [FoVariant::Fast, FoVariant::NoHold] {
        let mut per_kind = serde_json::Map::new();
        for kind in [FoKind::Crash, FoKind::PgCrash, FoKind::Switchover] {
            let rs: Vec<&FoRun> = runs
                .iter()
                .filter(|r| r.variant == v && r.kind == kind)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let stat = |f: &dyn Fn(&FoRun) -> Option<f64>| {
                let xs: Vec<f64> = rs.iter().filter_map(|r| f(r)).collect();
                let (p50, max) = fo_p50_max(&xs);
                json!({"per_run": xs, "p50": p50, "max": max})
            };
            let pooled_max = |r: &FoRun| Some(total(&r.errors[2]).max(total(&r.errors[3])));
            let e = json!({
                "pooled_errors_per_client_max": stat(&pooled_max),
                "reconnecting_pgbouncer_errors": stat(&|r| Some(total(&r.errors[1]))),
                "new_5000_errors": stat(&|r| Some(total(&r.errors[0]))),
                "new_5000_errors_after_notice": stat(&|r| r.haproxy_errors_after_notice.as_ref().map(total)),
                "longest_wait_pooled_ms": stat(&|r| Some(r.longest_ms[2].max(r.longest_ms[3]).round())),
                "pgbouncer_after_own_ms": stat(&|r| r.pgbouncer_after_own()),
                "haproxy_after_own_ms": stat(&|r| r.haproxy_after_own()),
                "noticed_ms": stat(&|r| r.marks.get("crash_noticed").copied()),
                "errors_by_class": {
                    "pooled": rs.iter().fold(ErrorCounts::new(), |a, r| fo_add(&a, &FoRun::pooled(&r.errors))),
                    "reconnecting_pgbouncer": rs.iter().fold(ErrorCounts::new(), |a, r| fo_add(&a, &r.errors[1])),
                    "new_5000": rs.iter().fold(ErrorCounts::new(), |a, r| fo_add(&a, &r.errors[0])),
                },
            });
            println!(
                "RESULT crash-hold/{} {} over {} runs: {e}",
                v.name(),
                kind.name(),
                rs.len()
            );
            per_kind.insert(kind.name().into(), e);
        }
        summary.insert(v.name().into(), per_kind.into());
    }
    let secs = start.elapsed().as_secs_f64();
    print_json(json!({
        "bench": "crash-hold",
        "patroni": version,
        "patroni_bin": patroni::Binaries::from_env().patroni.display().to_string(),
        "ttl": timing.ttl,
        "loop_wait": timing.loop_wait,
        "retry_timeout": timing.retry_timeout,
        "order": "per kind ABBA by round (fast = crash hold on, no_hold = off); one cluster, one HAProxy, one PgBouncer; haconfd restarted with the variant's config when it changes",
        "probes": "errors[0] new connections through :5000 every 5 ms, errors[1] a PgBouncer client reconnecting for every write every 5 ms, errors[2..3] two persistent PgBouncer clients writing every 10 ms",
        "summary": summary,
        "runs": runs.iter().map(fo_run_json).collect::<Vec<_>>(),
        "stopped_early": stopped_early,
        "seconds": secs,
    }));
}

fn fo_print_run(r: &FoRun) {
    println!(
        "RESULT failover/{} {} round {}: {}->{}: own write {} after the event; through :5000 {} \
         and PgBouncer {} after the node's own; errors :5000 [{}], PgBouncer [{}], pooled [{}]{}",
        r.variant.name(),
        r.kind.name(),
        r.round,
        r.old,
        r.new,
        fo_fmt_ms(r.own_ms),
        fo_fmt_ms(r.haproxy_after_own()),
        fo_fmt_ms(r.pgbouncer_after_own()),
        fo_fmt_errors(&r.errors[0]),
        fo_fmt_errors(&r.errors[1]),
        fo_fmt_errors(&FoRun::pooled(&r.errors)),
        if r.settled {
            ""
        } else {
            " (NOT SETTLED before the event)"
        }
    );
    let marks: Vec<String> = r.marks.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
    println!(
        "       haconfd (ms after the event): {}; harness saw the leader writable at {:.0} ms; \
         window {:.0} ms; attempts {:?}",
        if marks.is_empty() {
            "nothing logged".into()
        } else {
            marks.join(", ")
        },
        r.harness_saw_ms,
        r.window_ms,
        r.attempts
    );
    for (what, errs) in &r.sample_errors {
        if !errs.is_empty() {
            println!("       first {what} errors: {errs:?}");
        }
    }
    for w in &r.old_workers {
        println!("       HAProxy 0.2 s after the node's own write: {w}");
    }
    if !r.warnings.is_empty() {
        println!("       haconfd warned: {:?}", r.warnings);
    }
}

fn fo_run_json(r: &FoRun) -> Value {
    let per_probe = |e: &[ErrorCounts]| -> Value {
        FO_PROBES
            .iter()
            .zip(e)
            .map(|(p, c)| (p.to_string(), json!(c)))
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };
    let r1 = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
    json!({
        "round": r.round,
        "kind": r.kind.name(),
        "variant": r.variant.name(),
        "old": r.old,
        "new": r.new,
        "own_first_write_ms": r1(r.own_ms),
        "haproxy_first_write_ms": r1(r.haproxy_ms),
        "pgbouncer_first_write_ms": r1(r.pgbouncer_ms),
        "haproxy_after_own_ms": r1(r.haproxy_after_own()),
        "pgbouncer_after_own_ms": r1(r.pgbouncer_after_own()),
        "harness_saw_leader_ms": r1(Some(r.harness_saw_ms)),
        "errors": per_probe(&r.errors),
        "errors_after_own": per_probe(&r.errors_after_own),
        "errors_before_event": per_probe(&r.errors_before),
        "attempts": r.attempts,
        "longest_wait_ms": r.longest_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
        "haproxy_errors_after_notice": r.haproxy_errors_after_notice,
        "haconfd_log_ms": r.marks,
        "window_ms": r1(Some(r.window_ms)),
        "haproxy_old_workers_after_own": r.old_workers,
        "haconfd_warnings": r.warnings,
        "settled": r.settled,
        "problems": r.problems,
        "pgbouncer_sighup_by_bench_before": r.pgbouncer_fixup,
    })
}

/// p50/max over `v` (nearest rank), `None` when empty.
fn fo_p50_max(v: &[f64]) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    let s = summarize(v);
    (Some(s.p50), Some(s.max))
}

fn fo_summary(runs: &[&FoRun], variant: FoVariant, kind: FoKind) -> Value {
    let hap: Vec<f64> = runs.iter().filter_map(|r| r.haproxy_after_own()).collect();
    let pgb: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.pgbouncer_after_own())
        .collect();
    let own: Vec<f64> = runs.iter().filter_map(|r| r.own_ms).collect();
    let sum = |f: &dyn Fn(&FoRun) -> ErrorCounts| {
        runs.iter()
            .fold(ErrorCounts::new(), |acc, r| fo_add(&acc, &f(r)))
    };
    let e_hap = sum(&|r| r.errors[0].clone());
    let e_pgb = sum(&|r| r.errors[1].clone());
    let e_pooled = sum(&|r| FoRun::pooled(&r.errors));
    let (hp50, hmax) = fo_p50_max(&hap);
    let (pp50, pmax) = fo_p50_max(&pgb);
    let (op50, omax) = fo_p50_max(&own);
    let read_only: u64 = [&e_hap, &e_pgb, &e_pooled]
        .iter()
        .map(|e| e.get("read_only").copied().unwrap_or(0))
        .sum();
    println!(
        "RESULT failover/{} {} over {} runs: first write through :5000 after the node's own p50 \
         {} max {} ({} never); through PgBouncer p50 {} max {} ({} never); own write after the \
         event p50 {}; errors :5000 [{}], PgBouncer [{}], pooled [{}]",
        variant.name(),
        kind.name(),
        runs.len(),
        fo_fmt_ms(hp50),
        fo_fmt_ms(hmax),
        runs.len() - hap.len(),
        fo_fmt_ms(pp50),
        fo_fmt_ms(pmax),
        runs.len() - pgb.len(),
        fo_fmt_ms(op50),
        fo_fmt_errors(&e_hap),
        fo_fmt_errors(&e_pgb),
        fo_fmt_errors(&e_pooled),
    );
    json!({
        "runs": runs.len(),
        "haproxy_after_own_ms": {"p50": hp50, "max": hmax, "never": runs.len() - hap.len()},
        "pgbouncer_after_own_ms": {"p50": pp50, "max": pmax, "never": runs.len() - pgb.len()},
        "own_first_write_after_event_ms": {"p50": op50, "max": omax},
        "errors": {"haproxy": e_hap, "pgbouncer": e_pgb, "pooled": e_pooled},
        "read_only_errors": read_only,
    })
}

/// The failover and crash-hold scenarios' cluster: three members of the Patroni
/// `BENCH_PATRONI_VENV` names (Debian's without it), with the probe table; its version and
/// timing. ttl 20 s is the shortest Patroni allows (4.x raises a smaller one to 20; 3.0.2 does
/// not check): the harness's default timing.
fn fo_cluster(tag: &str) -> (PatroniCluster, String, patroni::Timing) {
    let timing = patroni::Timing::default();
    let cluster = PatroniCluster::start_with_binaries(
        &Etcd::shared().endpoint(),
        &unique_name(tag),
        3,
        timing,
        patroni::Binaries::from_env(),
    );
    let version = cluster
        .patroni_version()
        .unwrap_or_else(|e| format!("unknown ({e:#})"));
    cluster.create_probe_table();
    (cluster, version, timing)
}

/// Switchovers and crash failovers, each measured with the fast path on and with health
/// checks alone, on one Patroni cluster, one HAProxy and one PgBouncer (see docs/BENCHMARKS.md).
fn bench_failover() {
    let switchovers = env_usize("BENCH_FAILOVER_SWITCHOVERS", 5);
    let crashes = env_usize("BENCH_FAILOVER_CRASHES", 3);
    let max_secs = env_usize("BENCH_FAILOVER_MAX_SECS", 3600) as u64;
    let start = Instant::now();
    let (mut cluster, version, timing) = fo_cluster("bench-fo");
    println!(
        "failover: {version} ({}), ttl {} s, loop_wait {} s, retry_timeout {} s; cluster up in \
         {:.1} s; {switchovers} switchovers and {crashes} crashes per variant",
        cluster.binaries.patroni.display(),
        timing.ttl,
        timing.loop_wait,
        timing.retry_timeout,
        cluster.startup.as_secs_f64()
    );
    let mut stack = FoStack::start(&cluster, fo_variant(0));
    let plan: Vec<FoKind> = std::iter::repeat_n(FoKind::Switchover, 2 * switchovers)
        .chain(std::iter::repeat_n(FoKind::Crash, 2 * crashes))
        .collect();
    let mut runs = Vec::with_capacity(plan.len());
    let mut stopped_early = false;
    for (round, &kind) in plan.iter().enumerate() {
        if start.elapsed() > Duration::from_secs(max_secs) {
            eprintln!(
                "[failover] BENCH_FAILOVER_MAX_SECS={max_secs} reached: {} of {} rounds done",
                round,
                plan.len()
            );
            stopped_early = true;
            break;
        }
        let t = Instant::now();
        let run = failover_round(&mut cluster, &mut stack, kind, fo_variant(round), round);
        fo_print_run(&run);
        println!("       round took {:.1} s", t.elapsed().as_secs_f64());
        runs.push(run);
    }
    drop(stack);
    drop(cluster);

    let mut summary = serde_json::Map::new();
    for variant in [FoVariant::Fast, FoVariant::Checks] {
        let mut per_kind = serde_json::Map::new();
        for kind in [FoKind::Switchover, FoKind::Crash] {
            let rs: Vec<&FoRun> = runs
                .iter()
                .filter(|r| r.variant == variant && r.kind == kind)
                .collect();
            if !rs.is_empty() {
                per_kind.insert(kind.name().into(), fo_summary(&rs, variant, kind));
            }
        }
        summary.insert(variant.name().into(), per_kind.into());
    }
    let read_only = |probes: std::ops::Range<usize>| -> u64 {
        runs.iter()
            .filter(|r| r.variant == FoVariant::Fast)
            .flat_map(|r| r.errors[probes.clone()].iter())
            .map(|e| e.get("read_only").copied().unwrap_or(0))
            .sum()
    };
    let fast_read_only_haproxy = read_only(0..1);
    let fast_read_only_pgbouncer = read_only(1..4);
    let fast_switchover_haproxy_errors: u64 = runs
        .iter()
        .filter(|r| r.variant == FoVariant::Fast && r.kind == FoKind::Switchover)
        .map(|r| r.errors[0].values().sum::<u64>())
        .sum();
    let fixups = runs.iter().filter(|r| r.pgbouncer_fixup).count();
    let pgb_never_fast = runs
        .iter()
        .filter(|r| r.variant == FoVariant::Fast && r.pgbouncer_ms.is_none())
        .count();
    if pgb_never_fast > 0 {
        println!(
            "NOTE failover: in {pgb_never_fast} fast runs no write through PgBouncer reached the new \
             primary within {} s of its own first write; the bench SIGHUPed PgBouncer before {fixups} \
             rounds. With the placeholder admin console (src/pgbouncer.rs), haconfd's RELOAD does \
             nothing: the fast variant's PgBouncer figures wait for the console.",
            FO_REACH_BOUND.as_secs()
        );
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT failover: {} rounds in {secs:.0} s; fast variant: read-only errors through :5000 \
         {fast_read_only_haproxy} (expected 0), through PgBouncer {fast_read_only_pgbouncer} \
         (expected 0 with a real admin console), errors through :5000 in switchovers \
         {fast_switchover_haproxy_errors} (expected 0: held, not failed)",
        runs.len()
    );
    print_json(json!({
        "bench": "failover",
        "patroni": version,
        "patroni_bin": patroni::Binaries::from_env().patroni.display().to_string(),
        "ttl": timing.ttl,
        "loop_wait": timing.loop_wait,
        "retry_timeout": timing.retry_timeout,
        "switchovers_per_variant": switchovers,
        "crashes_per_variant": crashes,
        "order": "ABBA by round (fast, checks, checks, fast, ...); one cluster, one HAProxy, one PgBouncer; haconfd restarted with the variant's config when it changes",
        "probe_step_ms": FO_STEP.as_millis() as u64,
        "pooled_step_ms": FO_POOLED_STEP.as_millis() as u64,
        "reach_bound_s": FO_REACH_BOUND.as_secs(),
        "summary": summary,
        "runs": runs.iter().map(fo_run_json).collect::<Vec<_>>(),
        "fast_read_only_errors_haproxy": fast_read_only_haproxy,
        "fast_read_only_errors_pgbouncer": fast_read_only_pgbouncer,
        "fast_switchover_haproxy_errors": fast_switchover_haproxy_errors,
        "pgbouncer_sighups_by_bench": fixups,
        "stopped_early": stopped_early,
        "seconds": secs,
    }));
}

// ---------------------------------------------------------------------------------------------
// 7. clusters
// ---------------------------------------------------------------------------------------------

/// The bench's own haproxy template over every cluster (templates/haproxy-clusters.cfg.tera is
/// not on main yet): per configured cluster, the routing of the shipped one-cluster template,
/// `<scope>_primary` and `<scope>_replicas` with every member, on the cluster's ports. Nothing in
/// it depends on the leader or on WAL positions: a heartbeat or a leader change leaves it alone.
const CL_HAPROXY_TEMPLATE: &str = r#"# bench template: every configured cluster, its members in both listeners
global
    maxconn 1000
    stats timeout 30s

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s
{% for c in clusters %}{% if c.configured %}
listen {{ c.scope }}_primary
    bind 127.0.0.1:{{ c.settings.primary_port }}
    option httpchk HEAD /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
{%- for m in c.members %}
    server {{ m.name }} {{ m.address }} maxconn 100 check port {{ m.api_port }}
{%- endfor %}

listen {{ c.scope }}_replicas
    bind 127.0.0.1:{{ c.settings.replica_port }}
    option httpchk HEAD /replica
    http-check expect status 200
    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
{%- for m in c.members %}
    server {{ m.name }} {{ m.address }} maxconn 100 check port {{ m.api_port }}
{%- endfor %}
{% endif %}{% endfor %}"#;

/// The `[databases]` part of the bench's pgbouncer template over every cluster: one line per
/// database of each configured cluster with a leader, pointing at it. The `[pgbouncer]` section
/// of the PgBouncer under test follows it verbatim.
const CL_PGBOUNCER_DATABASES: &str = r#"; bench template: each cluster's databases at its leader
[databases]
{% for c in clusters -%}
{% if c.configured and c.leader -%}
{% for db in c.settings.databases -%}
{{ db }} = host={{ c.leader.host }} port={{ c.leader.port }} dbname={{ db }}
{% endfor -%}
{% endif -%}
{% endfor %}
"#;

/// Patroni's member keys are rewritten every `loop_wait` (10 s by default).
const CL_LOOP_WAIT: Duration = Duration::from_secs(10);
const CL_MEMBERS: usize = 3;

/// One variant of the `clusters` scenario: `n` clusters of three members under `ns`, followed
/// with `etcd.discover` (or `etcd.scope` for the one-cluster baseline).
struct ClLayout {
    name: &'static str,
    ns: String,
    scopes: Vec<String>,
    /// `etcd.scope` (the one-cluster baseline) instead of `etcd.discover`.
    single: bool,
}

impl ClLayout {
    fn new(name: &'static str, ns: &str, prefix: char, n: usize, single: bool) -> ClLayout {
        ClLayout {
            name,
            ns: ns.to_string(),
            scopes: (0..n).map(|c| format!("{prefix}{c:04}")).collect(),
            single,
        }
    }

    fn n(&self) -> usize {
        self.scopes.len()
    }

    fn primary_port(c: usize) -> u16 {
        10_000 + 2 * c as u16
    }

    fn member_port(c: usize, i: usize) -> u16 {
        20_000 + (CL_MEMBERS * c + i) as u16
    }

    fn api_port(c: usize, i: usize) -> u16 {
        35_000 + (CL_MEMBERS * c + i) as u16
    }

    fn member_key(&self, c: usize, i: usize) -> String {
        format!("{}/{}/members/m{}", self.ns, self.scopes[c], i + 1)
    }

    fn leader_key(&self, c: usize) -> String {
        format!("{}/{}/leader", self.ns, self.scopes[c])
    }

    fn member_value(c: usize, i: usize, leader: usize, xlog: u64) -> String {
        let role = if i == leader { "master" } else { "replica" };
        member_json(Self::member_port(c, i), Self::api_port(c, i), role, xlog)
    }

    /// Every cluster's leader key (m1) and member keys.
    fn load(&self, etcd: &Etcd) {
        for c in 0..self.n() {
            for i in 0..CL_MEMBERS {
                etcd.put(
                    &self.member_key(c, i),
                    &Self::member_value(c, i, 0, 50_331_816),
                );
            }
            etcd.put(&self.leader_key(c), "m1");
        }
    }

    /// The pgbouncer.ini line of cluster `c` with member `i` leading.
    fn db_line(&self, c: usize, i: usize) -> String {
        let db = format!("db_{}", self.scopes[c]);
        format!(
            "{db} = host=127.0.0.1 port={} dbname={db}",
            Self::member_port(c, i)
        )
    }

    /// haconfd's config: `check` runs `haproxy -c`, `admin` reloads PgBouncer through its
    /// console (socket dir, port).
    #[allow(clippy::too_many_arguments)]
    fn toml(
        &self,
        endpoint: &str,
        http_port: u16,
        htpl: &Path,
        hdest: &Path,
        check: bool,
        ptpl: &Path,
        pdest: &Path,
        admin: Option<(&Path, u16)>,
    ) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut s = format!(
            "[etcd]\nendpoints = [{endpoint:?}]\nnamespace = {:?}\n",
            self.ns
        );
        if self.single {
            s += &format!("scope = {:?}\n", self.scopes[0]);
        } else {
            s += "discover = true\n";
        }
        s += &format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n");
        for (c, scope) in self.scopes.iter().enumerate() {
            s += &format!(
                "[clusters.{scope}]\nprimary_port = {}\nreplica_port = {}\ndatabases = [\"db_{scope}\"]\n",
                Self::primary_port(c),
                Self::primary_port(c) + 1
            );
        }
        s += &format!(
            "\n[[template]]\nname = \"haproxy\"\nsrc = {}\ndest = {}\n",
            q(htpl),
            q(hdest)
        );
        if check {
            let check: Vec<String> = haproxy_check().iter().map(|a| format!("{a:?}")).collect();
            s += &format!("check = [{}]\n", check.join(", "));
        }
        s += &format!(
            "\n[[template]]\nname = \"pgbouncer\"\nsrc = {}\ndest = {}\nrequire_leader = true\n",
            q(ptpl),
            q(pdest)
        );
        if let Some((dir, port)) = admin {
            s += &format!(
                "pgbouncer_admin = {{ host = {}, port = {port}, user = \"pgbouncer\" }}\n",
                q(dir)
            );
        }
        s
    }
}

/// A haconfd's first pass after its spawn.
#[derive(Debug, Clone, Default)]
struct ClStart {
    /// Spawn → `listed` (the etcd list), ms.
    listed_ms: f64,
    /// Spawn → `pass applied`, ms.
    applied_ms: f64,
    /// The pass's own `took`, ms.
    took_ms: f64,
    /// `/metrics` after the first pass: render (model + render) and apply (stage, check, swap,
    /// reload) seconds, summed over the passes so far (`passes`).
    render_ms: f64,
    apply_ms: f64,
    passes: f64,
}

/// A value of haconfd's `/metrics` text (the sum over every series whose name and labels start
/// with `prefix`).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn metrics_text(port: u16) -> String {
    procs::http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Spawns `haconfd run` on `cfg` and waits (bounded) for its first `pass applied`.
fn cl_spawn(cfg: &Path, log_path: &Path, http_port: u16) -> (Haconfd, ClStart) {
    let t0 = unix_ms(SystemTime::now());
    let proc = Proc::spawn_logged(
        "haconfd",
        haconfd_cmd(cfg, &["run", "--log-format", "json"]),
        log_path,
    );
    let mut log = LogTail::new(log_path);
    let seen = log.wait_for(Duration::from_secs(120), |l| l.message == "pass applied");
    let Some(seen) = seen else {
        panic!(
            "haconfd applied no pass within 120 s; log tail:\n{}",
            tail(&std::fs::read_to_string(log_path).unwrap_or_default(), 40)
        );
    };
    let listed = seen.iter().find(|l| l.message == "listed");
    let applied = seen
        .iter()
        .find(|l| l.message == "pass applied")
        .expect("seen");
    let m = metrics_text(http_port);
    let start = ClStart {
        listed_ms: listed.map_or(f64::NAN, |l| l.ts_ms - t0),
        applied_ms: applied.ts_ms - t0,
        took_ms: applied.took_ms.unwrap_or(f64::NAN),
        render_ms: metric(&m, "haconfd_render_duration_seconds_sum") * 1000.0,
        apply_ms: metric(&m, "haconfd_apply_duration_seconds_sum") * 1000.0,
        passes: metric(&m, "haconfd_render_duration_seconds_count"),
    };
    (Haconfd { proc, log }, start)
}

/// One leader change as the bench timed it, ms after the leader key's put.
#[derive(Debug, Clone)]
struct ClChange {
    scope: String,
    /// haconfd's `file updated` (pgbouncer).
    file_log_ms: f64,
    /// The bench first read the new line in pgbouncer.ini (polled every 2 ms).
    file_seen_ms: f64,
    /// haconfd's `reloaded` (pgbouncer): PgBouncer answered `RELOAD` on its console.
    reloaded_ms: f64,
    /// PgBouncer's `SHOW DATABASES` gave the new port afterwards.
    pgbouncer_has_it: bool,
    /// Lines of pgbouncer.ini other than this cluster's that changed (must be 0).
    other_lines_changed: usize,
    /// The `took` of the pass that wrote the new line (haconfd's `pass applied`).
    pass_took_ms: f64,
    /// Renders of the haproxy template between just before the change and its reload (from
    /// `/metrics`, read outside the timed part): its output does not depend on the leader.
    haproxy_renders: f64,
}

/// What one variant measured.
struct ClResult {
    name: &'static str,
    clusters: usize,
    start_nocheck: ClStart,
    start_check: ClStart,
    haproxy_c_ms: f64,
    haproxy_cfg_bytes: u64,
    pgbouncer_ini_bytes: u64,
    window_s: f64,
    events: usize,
    late_events: usize,
    cpu_s: f64,
    sched_s: f64,
    rss_start: f64,
    rss_max: f64,
    rss_mean: f64,
    hwm: f64,
    passes_in_window: f64,
    renders_in_window: f64,
    writes_in_window: usize,
    changes: Vec<ClChange>,
}

fn bench_clusters() {
    let n = env_usize("BENCH_CLUSTERS", 1000).min(5000);
    let secs = env_usize("BENCH_CLUSTERS_SECS", 60);
    let changes = env_usize("BENCH_CLUSTERS_CHANGES", 20);
    // A fresh etcd of its own: `discover` follows every scope under the namespace, and the
    // shared one holds the other scenarios' clusters.
    let etcd = Etcd::start();
    let dir = temp_dir("bench-clusters");
    let htpl = dir.path().join("haproxy-clusters.cfg.tera");
    std::fs::write(&htpl, CL_HAPROXY_TEMPLATE).expect("write the haproxy template");
    let base = ClLayout::new("one-cluster", "/baseline", 'b', 1, true);
    let many = ClLayout::new("many", "/service", 'c', n, false);
    let r1 = cl_variant(&etcd, dir.path(), &htpl, &base, secs, changes);
    let rn = cl_variant(&etcd, dir.path(), &htpl, &many, secs, changes);
    cl_report(&[&r1, &rn]);
    drop(etcd);
}

fn cl_variant(
    etcd: &Etcd,
    root: &Path,
    htpl: &Path,
    layout: &ClLayout,
    secs: usize,
    changes: usize,
) -> ClResult {
    let n = layout.n();
    let dir = root.join(layout.name);
    std::fs::create_dir_all(dir.join("nocheck")).expect("mkdir");
    let t = Instant::now();
    layout.load(etcd);
    println!(
        "{}: {n} clusters × {CL_MEMBERS} members loaded into etcd in {:.1}s",
        layout.name,
        t.elapsed().as_secs_f64()
    );

    // PgBouncer with no databases yet; haconfd's first pass writes them and reloads it.
    let pgb = Pgbouncer::start_with("");
    let ini = pgb.owned_ini().expect("owned ini");
    let ptpl = dir.join("pgbouncer-clusters.ini.tera");
    std::fs::write(
        &ptpl,
        format!("{CL_PGBOUNCER_DATABASES}\n{}", ini.pgbouncer_section()),
    )
    .expect("write the pgbouncer template");

    // 2a. Start → first pass with nothing to check or reload: list, model, render, write.
    let http = free_port();
    let cfg = dir.join("nocheck/haconfd.toml");
    std::fs::write(
        &cfg,
        layout.toml(
            &etcd.endpoint(),
            http,
            htpl,
            &dir.join("nocheck/haproxy.cfg"),
            false,
            &ptpl,
            &dir.join("nocheck/pgbouncer.ini"),
            None,
        ),
    )
    .expect("write config");
    let (d, start_nocheck) = cl_spawn(&cfg, &dir.join("nocheck/haconfd.log"), http);
    drop(d);

    // 2b. The daemon under test: `haproxy -c` on its file, PgBouncer reloaded on its console.
    let http = free_port();
    let cfg = dir.join("haconfd.toml");
    let hdest = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        layout.toml(
            &etcd.endpoint(),
            http,
            htpl,
            &hdest,
            true,
            &ptpl,
            &ini.path,
            Some((ini.dir(), ini.port)),
        ),
    )
    .expect("write config");
    let (mut daemon, start_check) = cl_spawn(&cfg, &dir.join("haconfd.log"), http);
    let pid = daemon.pid();
    let pgb_reloaded =
        |l: &LogLine| l.message == "reloaded" && l.raw.contains("\"target\":\"pgbouncer\"");
    assert!(
        daemon.log.all.iter().any(pgb_reloaded)
            || daemon
                .log
                .wait_for(Duration::from_secs(30), pgb_reloaded)
                .is_some(),
        "the first pass did not reload PgBouncer; log tail:\n{}",
        tail(&daemon.log_text(), 30)
    );
    let dbs = pgb.show_databases();
    let want = layout.db_line(n - 1, 0);
    let last_db = format!("db_{}", layout.scopes[n - 1]);
    assert!(
        dbs.contains_key(&last_db),
        "PgBouncer does not list {last_db} after the first pass ({} databases); want {want:?}",
        dbs.len()
    );
    // The check alone, as haconfd runs it, on the file it wrote (median of 3).
    let mut checks: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let (ok, out) = Haproxy::check_config(&hdest);
            assert!(ok, "haproxy -c refuses the rendered file: {out}");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    checks.sort_by(|a, b| a.total_cmp(b));
    let haproxy_c_ms = checks[1];
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (haproxy_cfg_bytes, pgbouncer_ini_bytes) = (size(&hdest), size(&ini.path));
    println!(
        "{}: start → first applied pass {:.0} ms without the check, {:.0} ms with `haproxy -c` \
         and PgBouncer's RELOAD; haproxy -c alone {haproxy_c_ms:.0} ms; haproxy.cfg \
         {haproxy_cfg_bytes} B, pgbouncer.ini {pgbouncer_ini_bytes} B; {} databases in PgBouncer",
        layout.name,
        start_nocheck.applied_ms,
        start_check.applied_ms,
        dbs.len()
    );
    std::thread::sleep(Duration::from_secs(3));
    daemon.log.poll();

    // 1 and 3: every member key rewritten once per loop_wait, spread evenly, from a thread; the
    // CPU window first, then the leader changes under the same load.
    let keys = n * CL_MEMBERS;
    let period = CL_LOOP_WAIT / keys as u32;
    let leaders = std::sync::Mutex::new(vec![0usize; n]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let window = Duration::from_secs(secs as u64);
    // Bounded: the window, plus the changes (at most 12 s each), plus slack.
    let max_load = window + Duration::from_secs(12 * changes as u64 + 30);
    let pgb_ref = &pgb;
    let (result, events, late) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let t0 = Instant::now();
            let (mut events, mut late) = (0usize, 0usize);
            for k in 0..usize::MAX {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || t0.elapsed() > max_load {
                    break;
                }
                let at = period * k as u32;
                match at.checked_sub(t0.elapsed()) {
                    Some(rest) => std::thread::sleep(rest),
                    None if t0.elapsed() - at > Duration::from_millis(100) => late += 1,
                    None => {}
                }
                let (c, i) = ((k % keys) / CL_MEMBERS, k % CL_MEMBERS);
                let xlog = 50_331_816 + 4096 * (k / keys + 1) as u64;
                let leaders = leaders.lock().unwrap();
                etcd.put(
                    &layout.member_key(c, i),
                    &ClLayout::member_value(c, i, leaders[c], xlog),
                );
                events += 1;
            }
            (events, late)
        });

        let m0 = metrics_text(http);
        let rss_start = status_mb(pid, "VmRSS").unwrap_or(f64::NAN);
        let writes0 = daemon.log.count("pass applied");
        let cpu0 = cpu_seconds(pid);
        let sched0 = schedstat_seconds(pid);
        let t0 = Instant::now();
        let mut samples = Vec::new();
        for s in 1..=secs {
            if let Some(rest) = Duration::from_secs(s as u64).checked_sub(t0.elapsed()) {
                std::thread::sleep(rest);
            }
            match status_mb(pid, "VmRSS") {
                Some(mb) => samples.push(mb),
                None => panic!("haconfd (pid {pid}) is gone; log:\n{}", daemon.log_text()),
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu0;
        let sched = schedstat_seconds(pid) - sched0;
        let hwm = status_mb(pid, "VmHWM").unwrap_or(f64::NAN);
        let m1 = metrics_text(http);
        daemon.log.poll();
        let writes = daemon.log.count("pass applied") - writes0;
        let passes = metric(&m1, "haconfd_passes_total") - metric(&m0, "haconfd_passes_total");
        let renders = metric(&m1, "haconfd_renders_total") - metric(&m0, "haconfd_renders_total");
        println!(
            "{}: {wall:.1}s window: CPU {:.2} % of a core, RSS max {:.2} MB, VmHWM {hwm:.2} MB, \
             {passes} passes, {renders} renders",
            layout.name,
            cpu / wall * 100.0,
            samples.iter().copied().fold(f64::MIN, f64::max)
        );

        let mut done = Vec::new();
        for r in 0..changes {
            // Clusters spread over the range; with one cluster, the same one every time.
            let c = (r * 7919 + 13) % n;
            done.push(cl_change(
                etcd,
                http,
                layout,
                &leaders,
                &mut daemon,
                pgb_ref,
                &ini.path,
                c,
            ));
            std::thread::sleep(Duration::from_millis(1000));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (events, late) = load.join().expect("load thread");
        let max = samples.iter().copied().fold(f64::MIN, f64::max);
        let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
        (
            ClResult {
                name: layout.name,
                clusters: n,
                start_nocheck: start_nocheck.clone(),
                start_check: start_check.clone(),
                haproxy_c_ms,
                haproxy_cfg_bytes,
                pgbouncer_ini_bytes,
                window_s: wall,
                events: 0,
                late_events: 0,
                cpu_s: cpu,
                sched_s: sched,
                rss_start,
                rss_max: max,
                rss_mean: mean,
                hwm,
                passes_in_window: passes,
                renders_in_window: renders,
                writes_in_window: writes,
                changes: done,
            },
            events,
            late,
        )
    });
    drop(daemon);
    drop(pgb);
    ClResult {
        events,
        late_events: late,
        ..result
    }
}

/// Moves cluster `c`'s leader to the next member as Patroni's switchover ends: the old
/// leader's member key says replica, the new one's says master, then the leader key names it.
/// Times from that last put to the new line in pgbouncer.ini and PgBouncer's reload.
#[allow(clippy::too_many_arguments)]
fn cl_change(
    etcd: &Etcd,
    http: u16,
    layout: &ClLayout,
    leaders: &std::sync::Mutex<Vec<usize>>,
    daemon: &mut Haconfd,
    pgb: &Pgbouncer,
    ini: &Path,
    c: usize,
) -> ClChange {
    daemon.log.poll();
    let haproxy_renders0 = metric(
        &metrics_text(http),
        "haconfd_renders_total{target=\"haproxy\"}",
    );
    let before = std::fs::read_to_string(ini).unwrap_or_default();
    let t0;
    let new;
    {
        let mut l = leaders.lock().unwrap();
        let old = l[c];
        new = (old + 1) % CL_MEMBERS;
        etcd.put(
            &layout.member_key(c, old),
            &ClLayout::member_value(c, old, new, 50_331_816),
        );
        etcd.put(
            &layout.member_key(c, new),
            &ClLayout::member_value(c, new, new, 50_331_816),
        );
        t0 = unix_ms(SystemTime::now());
        etcd.put(&layout.leader_key(c), &format!("m{}", new + 1));
        l[c] = new;
    }
    let want = layout.db_line(c, new);
    let mut file_seen_ms = f64::NAN;
    let (mut file_log_ms, mut reloaded_ms) = (f64::NAN, f64::NAN);
    let mut pass_took_ms = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = String::new();
    while Instant::now() < deadline && (file_seen_ms.is_nan() || reloaded_ms.is_nan()) {
        if file_seen_ms.is_nan() {
            let now = unix_ms(SystemTime::now());
            let text = std::fs::read_to_string(ini).unwrap_or_default();
            if text.lines().any(|l| l == want) {
                file_seen_ms = now - t0;
                after = text;
            }
        }
        for l in daemon.log.poll() {
            if l.ts_ms >= t0 && l.message == "pass applied" && pass_took_ms.is_nan() {
                pass_took_ms = l.took_ms.unwrap_or(f64::NAN);
            }
            if l.ts_ms < t0 || !l.raw.contains("\"target\":\"pgbouncer\"") {
                continue;
            }
            if l.message == "file updated" && file_log_ms.is_nan() {
                file_log_ms = l.ts_ms - t0;
            }
            if l.message == "reloaded" && reloaded_ms.is_nan() {
                reloaded_ms = l.ts_ms - t0;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The `pass applied` line follows the reload.
    let until = Instant::now() + Duration::from_secs(2);
    while pass_took_ms.is_nan() && Instant::now() < until {
        for l in daemon.log.poll() {
            if l.ts_ms >= t0 && l.message == "pass applied" && pass_took_ms.is_nan() {
                pass_took_ms = l.took_ms.unwrap_or(f64::NAN);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let haproxy_renders = metric(
        &metrics_text(http),
        "haconfd_renders_total{target=\"haproxy\"}",
    ) - haproxy_renders0;
    let db = format!("db_{}", layout.scopes[c]);
    let port = ClLayout::member_port(c, new).to_string();
    let pgbouncer_has_it = pgb
        .show_databases()
        .get(&db)
        .is_some_and(|r| r.get("port") == Some(&port));
    let own = |l: &str| l.starts_with(&format!("{db} = "));
    let old_lines: Vec<&str> = before.lines().filter(|l| !own(l)).collect();
    let new_lines: Vec<&str> = after.lines().filter(|l| !own(l)).collect();
    let other_lines_changed = if after.is_empty() {
        usize::MAX
    } else {
        old_lines
            .iter()
            .zip(&new_lines)
            .filter(|(a, b)| a != b)
            .count()
            + old_lines.len().abs_diff(new_lines.len())
    };
    let ch = ClChange {
        scope: layout.scopes[c].clone(),
        file_log_ms,
        file_seen_ms,
        reloaded_ms,
        pgbouncer_has_it,
        other_lines_changed,
        pass_took_ms,
        haproxy_renders,
    };
    println!(
        "{}: leader of {} → m{}: file updated +{:.1} ms (haconfd's log), seen +{:.1} ms, \
         PgBouncer reloaded +{:.1} ms (pass took {:.1} ms, haproxy renders {}); PgBouncer has \
         it: {}; other lines changed: {}",
        layout.name,
        ch.scope,
        new + 1,
        ch.file_log_ms,
        ch.file_seen_ms,
        ch.reloaded_ms,
        ch.pass_took_ms,
        ch.haproxy_renders,
        ch.pgbouncer_has_it,
        ch.other_lines_changed
    );
    ch
}

fn cl_report(results: &[&ClResult]) {
    println!(
        "\nRESULT clusters (targets: CPU ≤ 5 % of a core and RSS ≤ 40 MB with 1,000 clusters, \
         one-cluster RSS ≤ 8 MB, start → first pass ≤ 1 s, leader change → PgBouncer reloaded ≤ 50 ms):"
    );
    for r in results {
        let reload: Vec<f64> = r
            .changes
            .iter()
            .map(|c| c.reloaded_ms)
            .filter(|v| v.is_finite())
            .collect();
        let seen: Vec<f64> = r
            .changes
            .iter()
            .map(|c| c.file_seen_ms)
            .filter(|v| v.is_finite())
            .collect();
        let file_log: Vec<f64> = r
            .changes
            .iter()
            .map(|c| c.file_log_ms)
            .filter(|v| v.is_finite())
            .collect();
        let took: Vec<f64> = r
            .changes
            .iter()
            .map(|c| c.pass_took_ms)
            .filter(|v| v.is_finite())
            .collect();
        let tk = summarize(&took);
        let hr: f64 = r.changes.iter().map(|c| c.haproxy_renders).sum();
        let (rl, sn, fl) = (summarize(&reload), summarize(&seen), summarize(&file_log));
        let cpu_pct = r.cpu_s / r.window_s * 100.0;
        let rate = r.clusters as f64 * CL_MEMBERS as f64 / CL_LOOP_WAIT.as_secs_f64();
        let missed = r.changes.len() - reload.len();
        let pgb_ok = r.changes.iter().filter(|c| c.pgbouncer_has_it).count();
        let untouched = r
            .changes
            .iter()
            .filter(|c| c.other_lines_changed == 0)
            .count();
        println!(
            "RESULT clusters {}: {} clusters × {CL_MEMBERS}; heartbeats {rate:.1}/s ({} events, \
             {} late > 100 ms) over {:.1} s: CPU {:.2} s = {cpu_pct:.2} % of one core \
             (schedstat {:.2} %), {} passes ({} renders, {} that wrote); RSS start {:.2} MB, \
             max {:.2} MB, mean {:.2} MB, VmHWM {:.2} MB",
            r.name,
            r.clusters,
            r.events,
            r.late_events,
            r.window_s,
            r.cpu_s,
            r.sched_s / r.window_s * 100.0,
            r.passes_in_window,
            r.renders_in_window,
            r.writes_in_window,
            r.rss_start,
            r.rss_max,
            r.rss_mean,
            r.hwm
        );
        println!(
            "RESULT clusters {}: start → first applied pass: {:.0} ms without a check (listed \
             at {:.0} ms, pass took {:.0} ms: render {:.0} ms, apply {:.0} ms), {:.0} ms with \
             `haproxy -c` and PgBouncer's RELOAD (listed at {:.0} ms, pass took {:.0} ms: render \
             {:.0} ms, apply {:.0} ms); `haproxy -c` alone {:.0} ms; haproxy.cfg {} B, \
             pgbouncer.ini {} B",
            r.name,
            r.start_nocheck.applied_ms,
            r.start_nocheck.listed_ms,
            r.start_nocheck.took_ms,
            r.start_nocheck.render_ms,
            r.start_nocheck.apply_ms,
            r.start_check.applied_ms,
            r.start_check.listed_ms,
            r.start_check.took_ms,
            r.start_check.render_ms,
            r.start_check.apply_ms,
            r.haproxy_c_ms,
            r.haproxy_cfg_bytes,
            r.pgbouncer_ini_bytes
        );
        println!(
            "RESULT clusters {}: {} leader changes: PgBouncer reloaded p50 {:.1} ms max {:.1} ms \
             ({missed} never); file updated (haconfd's log) p50 {:.1} max {:.1} ms; new line \
             seen in the file p50 {:.1} max {:.1} ms; PgBouncer's SHOW DATABASES had the new \
             port {pgb_ok}/{}; other lines untouched {untouched}/{}; the change's pass took p50 \
             {:.1} max {:.1} ms; haproxy template rendered {hr} times in the changes",
            r.name,
            r.changes.len(),
            rl.p50,
            rl.max,
            fl.p50,
            fl.max,
            sn.p50,
            sn.max,
            r.changes.len(),
            r.changes.len(),
            tk.p50,
            tk.max
        );
        let start = |s: &ClStart| {
            json!({"applied_ms": s.applied_ms, "listed_ms": s.listed_ms, "took_ms": s.took_ms,
                   "render_ms": s.render_ms, "apply_ms": s.apply_ms, "passes": s.passes})
        };
        print_json(json!({
            "bench": "clusters",
            "variant": r.name,
            "clusters": r.clusters,
            "heartbeat_events_per_s": rate,
            "events": r.events,
            "late_events": r.late_events,
            "window_s": r.window_s,
            "cpu_s": r.cpu_s,
            "cpu_percent": cpu_pct,
            "schedstat_cpu_percent": r.sched_s / r.window_s * 100.0,
            "passes": r.passes_in_window,
            "renders": r.renders_in_window,
            "passes_that_wrote": r.writes_in_window,
            "rss_start_mb": r.rss_start,
            "rss_max_mb": r.rss_max,
            "rss_mean_mb": r.rss_mean,
            "vmhwm_mb": r.hwm,
            "start_nocheck": start(&r.start_nocheck),
            "start_check": start(&r.start_check),
            "haproxy_c_ms": r.haproxy_c_ms,
            "haproxy_cfg_bytes": r.haproxy_cfg_bytes,
            "pgbouncer_ini_bytes": r.pgbouncer_ini_bytes,
            "change_reloaded_ms": summary_json(&rl),
            "change_file_log_ms": summary_json(&fl),
            "change_file_seen_ms": summary_json(&sn),
            "change_pass_took_ms": summary_json(&tk),
            "change_haproxy_renders": hr,
            "changes": r.changes.iter().map(|c| json!({
                "scope": c.scope, "file_log_ms": c.file_log_ms, "file_seen_ms": c.file_seen_ms,
                "reloaded_ms": c.reloaded_ms, "pgbouncer_has_it": c.pgbouncer_has_it,
                "pass_took_ms": c.pass_took_ms, "haproxy_renders": c.haproxy_renders,
                "other_lines_changed": c.other_lines_changed})).collect::<Vec<_>>(),
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// 8. membership: member changes through HAProxy's runtime API against reloads
// ---------------------------------------------------------------------------------------------

/// 50 member changes (25 joins, then the same 25 leaving) with 50 long-lived client sessions
/// open through the replica port, `server_state.membership = "runtime"` against `"reload"`,
/// ABBA in one run; then the same against 1,000 clusters behind one HAProxy.
fn bench_membership() {
    let changes = env_usize("BENCH_MEMBERSHIP_CHANGES", 50).max(2) / 2 * 2;
    let clients = env_usize("BENCH_MEMBERSHIP_CLIENTS", 50);
    let mut runs = Vec::new();
    // BENCH_MEMBERSHIP_ONE=0 leaves out the one-cluster runs.
    let one = std::env::var("BENCH_MEMBERSHIP_ONE").as_deref() != Ok("0");
    for (i, how) in ["runtime", "reload", "reload", "runtime"]
        .iter()
        .enumerate()
        .filter(|_| one)
    {
        let r = mb_variant(i, how, changes, clients);
        mb_print(&r);
        runs.push(r);
    }
    let n = env_usize("BENCH_MEMBERSHIP_CLUSTERS", 1000).min(5000);
    let per = env_usize("BENCH_MEMBERSHIP_CLUSTER_CHANGES", 20).max(2) / 2 * 2;
    let etcd = Etcd::start();
    let layout = ClLayout::new("members", "/service", 'm', n, false);
    let t = Instant::now();
    layout.load(&etcd);
    println!(
        "{n} clusters × {CL_MEMBERS} members loaded into etcd in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for how in ["runtime", "reload"] {
        let r = mb_many(&etcd, &layout, how, per);
        mb_print(&r);
        runs.push(r);
    }
    drop(etcd);
    print_json(
        json!({ "scenario": "membership", "runs": runs.iter().map(mb_json).collect::<Vec<_>>() }),
    );
}

/// One run of member changes.
struct MbRun {
    name: String,
    membership: &'static str,
    changes: usize,
    /// Member key put (or deleted) → the server listed (or gone) in HAProxy's live state, ms.
    listed_ms: Vec<f64>,
    reloads: u32,
    /// Workers alive at the end (the current one and those left by reloads).
    workers: usize,
    /// VmRSS of HAProxy's master and every worker at the end, MB.
    haproxy_rss_mb: f64,
    /// haconfd's CPU over the changes, per change, ms.
    cpu_ms_per_change: f64,
    /// Client sessions open before the changes, and those that no longer answer after.
    sessions: usize,
    sessions_cut: usize,
    runtime_updates: usize,
    fallbacks: usize,
}

/// The live servers of `backend` (`show servers state`); None when the socket does not answer
/// (a worker re-binding it during a reload).
fn mb_live(sock: &Path, backend: &str) -> Option<Vec<String>> {
    let dump = common::procs::unix_cmd(
        sock,
        &format!("show servers state {backend}"),
        Duration::from_millis(500),
    )
    .ok()?;
    if !dump.starts_with('1') {
        return None;
    }
    // A server in forced maintenance takes no connection: one that left, parked (HAProxy
    // before 2.9), is not listed.
    Some(
        dump.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 6 && f[6].parse::<u32>().unwrap_or(0) & 1 == 0)
            .map(|f| f[3].to_owned())
            .collect(),
    )
}

/// Polls the live list every 2 ms until `want` says yes; ms since `t0`, or None after `bound`.
fn mb_wait(
    sock: &Path,
    backend: &str,
    t0: Instant,
    bound: Duration,
    want: impl Fn(&[String]) -> bool,
) -> Option<f64> {
    while t0.elapsed() < bound {
        if mb_live(sock, backend).is_some_and(|l| want(&l)) {
            return Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// HAProxy's master and every worker (current and old), from `show proc`.
fn mb_haproxy_pids(h: &Haproxy) -> Vec<i32> {
    let p = h.proc_status();
    p.master
        .iter()
        .chain(&p.workers)
        .chain(&p.old_workers)
        .map(|l| l.pid)
        .collect()
}

fn mb_variant(i: usize, how: &'static str, changes: usize, clients: usize) -> MbRun {
    let rig = Rig::start(&format!("mb{i}"), |s| {
        s.membership = how;
        s.verify_reload = true;
    });
    let sock = rig.setup.stats_socket.clone();
    let settled = mb_wait(
        &sock,
        "replicas",
        Instant::now(),
        Duration::from_secs(10),
        |l| l.len() == 3,
    );
    assert!(
        settled.is_some(),
        "the replica backend never listed 3 servers"
    );
    // Wait for the replicas' checks, then open the long-lived sessions.
    let up = wait_until(Duration::from_secs(10), || {
        let s = Haproxy::servers_op_state(&sock);
        ["m2", "m3"]
            .iter()
            .all(|m| s.get(&("replicas".to_string(), m.to_string())) == Some(&2))
    });
    assert!(up, "m2 and m3 never came UP in the replica backend");
    use std::io::Write;
    let mut sessions = Vec::new();
    for _ in 0..clients {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", rig.setup.replica_port))
            .expect("connect through the replica port");
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut banner = [0u8; 3];
        c.read_exact(&mut banner).expect("banner");
        sessions.push(c);
    }
    let mut daemon = rig.daemon;
    daemon.log.poll();
    let reloads0 = rig.haproxy.reload_count();
    let cpu0 = schedstat_seconds(daemon.pid());
    let mut joined = Vec::new();
    let mut listed = Vec::new();
    for k in 0..changes {
        let mut t0 = Instant::now();
        let (name, gone) = if k < changes / 2 {
            let m = FakeMember::start(&format!("j{k:02}"), Role::Replica);
            t0 = Instant::now();
            Etcd::shared().put(
                &format!("{}members/{}", rig.cluster.prefix, m.name),
                &member_json(m.port(), m.api_port(), "replica", 50_331_816),
            );
            let name = m.name.clone();
            joined.push(m);
            (name, false)
        } else {
            let name = format!("j{:02}", k - changes / 2);
            Etcd::shared().delete(&format!("{}members/{name}", rig.cluster.prefix));
            (name, true)
        };
        let took = mb_wait(&sock, "replicas", t0, Duration::from_secs(10), |l| {
            l.contains(&name) != gone
        });
        let took = took.unwrap_or_else(|| {
            panic!(
                "{how}: change {k} ({name}) never reached HAProxy; log tail:\n{}",
                tail(&daemon.log_text(), 20)
            )
        });
        listed.push(took);
        // Past the pacer's min_interval (500 ms), so that each change is a pass of its own.
        std::thread::sleep(Duration::from_millis(600));
    }
    let mut r = mb_finish(
        &mut daemon,
        &rig.haproxy,
        (cpu0, reloads0),
        format!("one cluster, {how} #{i}"),
        how,
        listed,
    );
    r.sessions = sessions.len();
    r.sessions_cut = sessions
        .iter_mut()
        .filter(|c| {
            let mut c: &std::net::TcpStream = c;
            let alive = c.write_all(b"ping\n").is_ok() && {
                let mut echo = [0u8; 5];
                c.read_exact(&mut echo).is_ok() && &echo == b"ping\n"
            };
            !alive
        })
        .count();
    drop(sessions);
    drop(joined);
    r
}

/// The 1,000-cluster case: one HAProxy with a primary and a replica listener per cluster (the
/// bench template with a stats socket and server state), member m4 joining then leaving
/// `changes / 2` clusters spread over the range.
fn mb_many(etcd: &Etcd, layout: &ClLayout, how: &'static str, changes: usize) -> MbRun {
    let dir = temp_dir(&format!("bench-members-{how}"));
    let d = dir.path();
    let sock = d.join("admin.sock");
    let state = d.join("server-state");
    let htpl = d.join("haproxy-clusters.cfg.tera");
    let tpl = CL_HAPROXY_TEMPLATE
        .replace(
            "    stats timeout 30s\n",
            &format!(
                "    stats timeout 30s\n    stats socket {} mode 600 level admin\n    server-state-file {}\n",
                sock.display(),
                state.display()
            ),
        )
        .replace(
            "    timeout check 5s\n",
            "    timeout check 5s\n    load-server-state-from-file global\n",
        )
        .replace("inter 1s", "inter 10s");
    std::fs::write(&htpl, tpl).expect("write the haproxy template");
    let ptpl = d.join("pgbouncer.ini.tera");
    std::fs::write(&ptpl, "; no databases\n").expect("write the pgbouncer template");
    let hdest = d.join("haproxy.cfg");
    let cfg = d.join("haconfd.toml");
    let http = free_port();
    let write = |reload: Option<(&Path, &Path)>| {
        let mut t = layout.toml(
            &etcd.endpoint(),
            http,
            &htpl,
            &hdest,
            true,
            &ptpl,
            &d.join("pgbouncer.ini"),
            None,
        );
        let haproxy_end = t
            .find("\n[[template]]\nname = \"pgbouncer\"")
            .expect("pgbouncer target");
        let mut extra = format!(
            "server_state = {{ stats_socket = {:?}, file = {:?}, primary_backends = [\"{{scope}}_primary\"], replica_backends = [\"{{scope}}_replicas\"], membership = {how:?} }}\n",
            sock.display().to_string(),
            state.display().to_string()
        );
        if let Some((pidfile, master)) = reload {
            extra += &format!(
                "reload = {{ pidfile = {:?}, signal = \"SIGUSR2\", process = \"haproxy\", master_socket = {:?} }}\n",
                pidfile.display().to_string(),
                master.display().to_string()
            );
        }
        t.insert_str(haproxy_end + 1, &extra);
        // The bench's leaders have no REST API: with the fast path on, the start would probe
        // each of the 1,000 for failover.confirm_timeout, and that CPU is not a member change's.
        t.push_str("\n[failover]\nenabled = false\n");
        std::fs::write(&cfg, t).expect("write config");
    };
    write(None);
    render_once(&cfg);
    let haproxy = Haproxy::start(&hdest);
    write(Some((&haproxy.pidfile(), &haproxy.master_socket())));
    let mut daemon = Haconfd::start(&cfg, d, Duration::from_secs(3));
    daemon.log.poll();
    let reloads0 = haproxy.reload_count();
    let cpu0 = schedstat_seconds(daemon.pid());
    let n = layout.n();
    let mut listed = Vec::new();
    for k in 0..changes {
        let c = ((k % (changes / 2)) * 7919 + 13) % n;
        let key = format!("{}/{}/members/m4", layout.ns, layout.scopes[c]);
        let backend = format!("{}_replicas", layout.scopes[c]);
        let gone = k >= changes / 2;
        let t0 = Instant::now();
        if gone {
            etcd.delete(&key);
        } else {
            let port = 30_000 + k as u16;
            etcd.put(&key, &member_json(port, port, "replica", 50_331_816));
        }
        let took = mb_wait(&sock, &backend, t0, Duration::from_secs(30), |l| {
            l.iter().any(|s| s == "m4") != gone
        })
        .unwrap_or_else(|| {
            panic!(
                "{how}: change {k} in {backend} never reached HAProxy; log tail:\n{}",
                tail(&daemon.log_text(), 20)
            )
        });
        listed.push(took);
        std::thread::sleep(Duration::from_millis(600));
    }
    mb_finish(
        &mut daemon,
        &haproxy,
        (cpu0, reloads0),
        format!("{n} clusters, {how}"),
        how,
        listed,
    )
}

/// The run's figures once its changes are done: haconfd's CPU since `cpu0`, HAProxy's reloads
/// since `reloads0` and its workers, the RSS of its master and every worker; the passes and
/// fallbacks printed. No client sessions (the caller counts its own).
fn mb_finish(
    daemon: &mut Haconfd,
    haproxy: &Haproxy,
    (cpu0, reloads0): (f64, u32),
    name: String,
    membership: &'static str,
    listed_ms: Vec<f64>,
) -> MbRun {
    std::thread::sleep(Duration::from_millis(500));
    let cpu = schedstat_seconds(daemon.pid()) - cpu0;
    daemon.log.poll();
    mb_explain(daemon);
    let p = haproxy.proc_status();
    let changes = listed_ms.len();
    MbRun {
        name,
        membership,
        changes,
        listed_ms,
        reloads: p.reloads() - reloads0,
        workers: p.workers.len() + p.old_workers.len(),
        haproxy_rss_mb: mb_haproxy_pids(haproxy)
            .iter()
            .filter_map(|&p| status_mb(p, "VmRSS"))
            .sum(),
        cpu_ms_per_change: cpu * 1000.0 / changes.max(1) as f64,
        sessions: 0,
        sessions_cut: 0,
        runtime_updates: daemon
            .log
            .count("member change applied through HAProxy's runtime API, no reload"),
        fallbacks: daemon
            .log
            .count("member change not taken through HAProxy's runtime API: reloading instead"),
    }
}

/// The passes' own durations and every fallback's reason, from haconfd's log.
fn mb_explain(daemon: &Haconfd) {
    let mut took: Vec<f64> = (daemon.log.all.iter())
        .filter(|l| l.message == "pass applied")
        .filter_map(|l| l.took_ms)
        .collect();
    took.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  passes applied: {}, took p50 {:.1} ms max {:.1} ms",
        took.len(),
        pct(&took, 50.0),
        took.last().copied().unwrap_or(f64::NAN)
    );
    for l in (daemon.log.all.iter()).filter(|l| l.message.contains("reloading instead")) {
        let v: Value = serde_json::from_str(&l.raw).unwrap_or_default();
        println!("  fallback: {}", v["reason"].as_str().unwrap_or("?"));
    }
}

fn mb_print(r: &MbRun) {
    let mut v = r.listed_ms.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}: {} changes: key → server listed/gone in HAProxy p50 {:.1} ms max {:.1} ms; {} reloads, \
         {} worker(s) alive, HAProxy RSS {:.1} MB; haconfd CPU {:.2} ms per change; {} of {} \
         sessions cut; {} runtime passes, {} fallbacks",
        r.name,
        r.changes,
        pct(&v, 50.0),
        v.last().copied().unwrap_or(f64::NAN),
        r.reloads,
        r.workers,
        r.haproxy_rss_mb,
        r.cpu_ms_per_change,
        r.sessions_cut,
        r.sessions,
        r.runtime_updates,
        r.fallbacks
    );
}

fn mb_json(r: &MbRun) -> Value {
    let mut v = r.listed_ms.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    json!({
        "name": r.name,
        "membership": r.membership,
        "changes": r.changes,
        "listed_ms": summary_json(&summarize(&v)),
        "reloads": r.reloads,
        "workers": r.workers,
        "haproxy_rss_mb": r.haproxy_rss_mb,
        "cpu_ms_per_change": r.cpu_ms_per_change,
        "sessions": r.sessions,
        "sessions_cut": r.sessions_cut,
        "runtime_updates": r.runtime_updates,
        "fallbacks": r.fallbacks,
    })
}

// ---------------------------------------------------------------------------------------------
// 9. lag: lag-aware replicas against HAProxy's /replica?lag= check
// ---------------------------------------------------------------------------------------------

/// One listener's side of the lag benchmark.
#[derive(Default)]
struct LagSide {
    /// Times the lagging replica started or stopped taking new connections.
    state_changes: AtomicU64,
    /// Persistent read sessions that failed (killed by the listener or the server).
    sessions_killed: AtomicU64,
    /// New connections, and those served by the lagging replica while its true lag was over
    /// the limit.
    new_reads: AtomicU64,
    stale_new_reads: AtomicU64,
    /// 100 ms samples in which the lagging replica took new connections while over the limit.
    stale_samples: AtomicU64,
}

/// `[lag]` (haconfd, its own HAProxy) against the recipe it replaces (a second HAProxy checking
/// each node's `GET /replica?lag=<limit>`, `inter 1s fall 3 rise 2 on-marked-down
/// shutdown-sessions`), side by side on one Patroni cluster (`loop_wait` 10 s, maintenance mode so
/// that a paused replay stays paused), under a lag that oscillates around the limit: one replica's
/// replay paused for 2–12 s at a time while about 2.5 MB/s of WAL is written, then resumed.
fn bench_lag() {
    use std::sync::atomic::AtomicBool;
    let limit_mb = env_usize("BENCH_LAG_LIMIT_MB", 4) as u64;
    let pauses: Vec<u64> = std::env::var("BENCH_LAG_PAUSES")
        .ok()
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 3, 2, 10, 3, 12, 2, 9, 3, 12]);
    let etcd = Etcd::shared();
    let scope = unique_name("bench-lag");
    let timing = patroni::Timing {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 10,
    };
    let cluster = PatroniCluster::start_with_binaries(
        &etcd.endpoint(),
        &scope,
        3,
        timing,
        patroni::Binaries::from_env(),
    );
    cluster.patronictl(&["pause", "--wait"]);
    let leader = cluster.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap();
    let replicas = cluster.replicas();
    let lagger = replicas[0].clone();
    let lag_port = cluster.node(&lagger).pg_port;
    let leader_port = cluster.node(&leader).pg_port;

    let dir = temp_dir("bench-lag");
    let mut setup = Setup::new(dir.path(), &etcd.endpoint(), &scope);
    setup.extra = format!(
        "\n[lag]\nmax_bytes = \"{limit_mb}MB\"\nreadmit_bytes = \"{}MB\"\ndelay = \"3s\"\nreadmit_delay = \"3s\"\ninterval = \"1s\"\n",
        limit_mb / 2
    );
    let (haproxy, daemon) = start_stack(&mut setup, dir.path(), Duration::from_millis(500));
    // The recipe: every node checked on /replica?lag=, as autobase and Patroni's docs set it up.
    let recipe_port = free_port();
    let recipe_sock = dir.path().join("recipe.sock");
    let mut recipe_cfg = format!(
        "global\n    maxconn 1000\n    stats socket {} mode 600 level admin\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 30m\n    timeout server 30m\n\
         listen replicas\n    bind 127.0.0.1:{recipe_port}\n    balance roundrobin\n\
         \x20   option httpchk OPTIONS /replica?lag={limit_mb}MB\n    http-check expect status 200\n\
         \x20   default-server inter 1s fall 3 rise 2 on-marked-down shutdown-sessions\n",
        recipe_sock.display()
    );
    for n in cluster.nodes() {
        recipe_cfg += &format!(
            "    server {} 127.0.0.1:{} check port {}\n",
            n.name, n.pg_port, n.api_port
        );
    }
    let recipe_path = dir.path().join("recipe.cfg");
    std::fs::write(&recipe_path, recipe_cfg).unwrap();
    let recipe = Haproxy::start(&recipe_path);
    let reloads0 = haproxy.reload_count();

    let listeners = [
        (
            "haconfd [lag]",
            setup.replica_port,
            setup.stats_socket.clone(),
        ),
        ("recipe /replica?lag=", recipe_port, recipe_sock.clone()),
    ];
    for (name, port, _) in &listeners {
        assert!(
            wait_until(Duration::from_secs(60), || (0..6).any(|_| {
                patroni::connect(*port)
                    .ok()
                    .and_then(|mut c| c.query_one("SELECT inet_server_port()", &[]).ok())
                    .is_some_and(|r| r.get::<_, i32>(0) == i32::from(lag_port))
            })),
            "{name}: reads never reached {lagger}"
        );
    }

    // The recipe's HAProxy starts every server UP: its checks take the leader out (and, with
    // `shutdown-sessions`, any session on it) before the sessions below open.
    assert!(
        wait_until(Duration::from_secs(30), || {
            procs::server_state(&recipe_sock, "replicas", &leader).is_some_and(|(op, _)| op == 0)
        }),
        "the recipe's checks never took the leader {leader} out"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let over = Arc::new(AtomicBool::new(false));
    let max_lag = Arc::new(AtomicU64::new(0));
    let sides: Vec<Arc<LagSide>> = (0..2).map(|_| Arc::new(LagSide::default())).collect();
    let mut threads = Vec::new();
    // The true lag, from the nodes themselves, every 100 ms.
    {
        let (stop, over, max_lag) = (stop.clone(), over.clone(), max_lag.clone());
        let limit = limit_mb << 20;
        threads.push(std::thread::spawn(move || {
            let mut p = patroni::connect(leader_port).unwrap();
            let mut r = patroni::connect(lag_port).unwrap();
            while !stop.load(Ordering::SeqCst) {
                let head: i64 = p
                    .query_one(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
                        &[],
                    )
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                let done: i64 = r
                    .query_one(
                        "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint",
                        &[],
                    )
                    .map(|r| r.get(0))
                    .unwrap_or(head);
                let lag = (head - done).max(0) as u64;
                max_lag.fetch_max(lag, Ordering::SeqCst);
                over.store(lag > limit, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    for (i, (_, port, sock)) in listeners.iter().enumerate() {
        // The lagging replica's state in this listener, every 100 ms.
        let (stop_m, over_m, side, sock, name) = (
            stop.clone(),
            over.clone(),
            sides[i].clone(),
            sock.clone(),
            lagger.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut last = None;
            while !stop_m.load(Ordering::SeqCst) {
                if let Some((op, admin)) = procs::server_state(&sock, "replicas", &name) {
                    let serving = op == 2 && admin & 0x08 == 0 && admin & 0x01 == 0;
                    if last.is_some_and(|l| l != serving) {
                        side.state_changes.fetch_add(1, Ordering::SeqCst);
                    }
                    if serving && over_m.load(Ordering::SeqCst) {
                        side.stale_samples.fetch_add(1, Ordering::SeqCst);
                    }
                    last = Some(serving);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        // 10 persistent read sessions, a query every 200 ms; a failed one reconnects.
        for _ in 0..10 {
            let (stop, side, port) = (stop.clone(), sides[i].clone(), *port);
            threads.push(std::thread::spawn(move || {
                let mut c = None;
                while !stop.load(Ordering::SeqCst) {
                    if c.is_none() {
                        c = patroni::connect(port).ok();
                    }
                    if let Some(client) = c.as_mut() {
                        if let Err(e) = client.simple_query("SELECT 1") {
                            if side.sessions_killed.fetch_add(1, Ordering::SeqCst) < 3 {
                                println!("session error: {}", patroni::pg_err_text(&e));
                            }
                            c = None;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }));
        }
        // A new connection every 100 ms: where does it land, and is that node too far behind?
        let (stop, over, side, port) = (stop.clone(), over.clone(), sides[i].clone(), *port);
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(mut c) = patroni::connect(port) {
                    if let Ok(r) = c.query_one("SELECT inet_server_port()", &[]) {
                        side.new_reads.fetch_add(1, Ordering::SeqCst);
                        if r.get::<_, i32>(0) == i32::from(lag_port) && over.load(Ordering::SeqCst)
                        {
                            side.stale_new_reads.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    // WAL at about 2.5 MB/s while the cycles run.
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut p = patroni::connect(leader_port).unwrap();
            p.batch_execute("CREATE TABLE IF NOT EXISTS bench_lag_fill (x text)")
                .unwrap();
            while !stop.load(Ordering::SeqCst) {
                let _ = p.batch_execute(
                    "INSERT INTO bench_lag_fill SELECT repeat('x', 1000) FROM generate_series(1, 500)",
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    let mut node = patroni::connect(lag_port).unwrap();
    let t0 = Instant::now();
    for (k, p) in pauses.iter().enumerate() {
        node.batch_execute("SELECT pg_wal_replay_pause()").unwrap();
        std::thread::sleep(Duration::from_secs(*p));
        node.batch_execute("SELECT pg_wal_replay_resume()").unwrap();
        println!(
            "cycle {k}: replay paused {p} s, then resumed ({:.0} s in)",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(6));
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let took = t0.elapsed().as_secs_f64();
    let reloads = haproxy.reload_count() - reloads0;
    let mut runs = Vec::new();
    for (i, (name, _, _)) in listeners.iter().enumerate() {
        let s = &sides[i];
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let r = json!({
            "listener": name,
            "state_changes": g(&s.state_changes),
            "sessions_killed": g(&s.sessions_killed),
            "new_reads": g(&s.new_reads),
            "stale_new_reads": g(&s.stale_new_reads),
            "stale_serving_seconds": g(&s.stale_samples) as f64 / 10.0,
            "reloads": if i == 0 { reloads } else { 0 },
        });
        println!(
            "RESULT lag/{name}: state changes {}, persistent sessions killed {}, new reads {} of which {} to {lagger} while over {limit_mb} MB, {:.1} s serving new connections while over, reloads {}",
            r["state_changes"], r["sessions_killed"], r["new_reads"], r["stale_new_reads"], r["stale_serving_seconds"], r["reloads"]
        );
        runs.push(r);
    }
    print_json(json!({
        "scenario": "lag",
        "limit_mb": limit_mb,
        "pauses_s": pauses,
        "seconds": took,
        "max_lag_mb": max_lag.load(Ordering::SeqCst) as f64 / 1048576.0,
        "runs": runs,
    }));
    drop(daemon);
    drop(recipe);
    drop(haproxy);
}
