//! Starts a real Patroni + PostgreSQL cluster on loopback for the end-to-end tests.
//!
//! Verified against Patroni 3.0.2 (Debian 12 package), PostgreSQL 15 and etcd 3.4.
//!
//! # What it does
//! [`PatroniCluster::start`] makes a tempdir (chowned to `postgres`), writes one config per node
//! (JSON, which is valid YAML, so Patroni and patronictl read it), and starts each node as
//! `/usr/bin/patroni <cfg>` with uid/gid `postgres` and a clean environment
//! (`PATH=/usr/bin:/bin`, `HOME=/var/lib/postgresql`, nothing else: an exported `PGPASSWORD` breaks
//! replica bootstrap). Each node uses the **`etcd3:`** section (v3 API; `etcd:` would be v2 and
//! invisible to a v3 watcher), namespace `/service`, trust auth on 127.0.0.1 and its own pgpass file.
//! Patroni's stdout/stderr (which also carries PostgreSQL's log) go to `<tempdir>/<name>.log`.
//!
//! # Timing settings ([`Timing`], default `ttl 20, loop_wait 2, retry_timeout 5`)
//! Patroni 3.0.2 does not validate these; the rule to respect is `loop_wait + 2*retry_timeout <= ttl`.
//! `ttl` is the lease TTL of the leader + member keys, so after [`PatroniCluster::crash_leader`] the
//! old leader's keys stay in etcd for about `ttl` seconds (measured ~20 s with the default) before a
//! replica takes over. A graceful stop or a switchover moves the leader key in well under a second.
//! A `loop_wait` of 2 s means every member key is rewritten every ~2 s (heartbeat noise for watchers).
//! Patroni 4.x (e.g. 4.1.5) does check them: a smaller `ttl` than 20, `loop_wait` than 1 or
//! `retry_timeout` than 3 is raised to that minimum with a warning, so 20 s is the shortest lease.
//!
//! # Another Patroni
//! [`PatroniCluster::start_with_binaries`] runs other `patroni`/`patronictl` binaries, e.g. the
//! newest from PyPI in a virtualenv ([`Binaries::from_venv`]; [`Binaries::from_env`] reads
//! `BENCH_PATRONI_VENV`, which only the benchmarks use).
//!
//! # Process lifetime
//! Everything is killed by PID in `Drop`: SIGTERM to each Patroni (which stops its PostgreSQL),
//! a bounded wait, then SIGKILL to leftover Patroni processes and to each postmaster whose PID is in
//! `<data_dir>/postmaster.pid` (checked to be a `postgres` process first).
//! If the test process dies without running `Drop`, two safety nets apply:
//! - each Patroni has `PR_SET_PDEATHSIG = SIGTERM` (SIGTERM rather than SIGKILL so it stops its own
//!   PostgreSQL, which it forked and which would otherwise survive);
//! - a small `sh` guardian (also with PDEATHSIG) kills the postmasters by PID after a grace period.
//!
//! **Caveat:** PDEATHSIG fires when the *thread* that spawned the child exits, not the process.
//! Create and drop the cluster within one test (the test's own thread), or from a long-lived thread.
//! Do **not** call `start`/`add_member`/`restart_member` from `tokio::task::spawn_blocking` (its
//! threads exit after being idle, which would SIGTERM the cluster). Calling them directly from a
//! `#[tokio::test]` body is fine (the body runs on the test thread), but they block; use
//! `flavor = "multi_thread"` if other tasks must progress meanwhile.
//!
//! The `postgres` sync client spins its own tokio runtime and panics inside an async context. The
//! helpers here that only return data ([`is_in_recovery`], [`PatroniCluster::create_probe_table`],
//! the loads) run their client on a separate OS thread, so they work anywhere; [`connect`] returns a
//! `postgres::Client` that must be used outside async code.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use serde_json::{json, Value};

pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
pub const PATRONI_BIN: &str = "/usr/bin/patroni";
pub const PATRONICTL_BIN: &str = "/usr/bin/patronictl";
/// Opt-in for the benchmarks: a virtualenv holding another Patroni (e.g. the newest from PyPI),
/// read by [`Binaries::from_env`]. Clusters started with [`PatroniCluster::start`] or
/// [`PatroniCluster::start_with`] never look at it: they run [`PATRONI_BIN`] and [`PATRONICTL_BIN`].
pub const PATRONI_VENV_ENV: &str = "BENCH_PATRONI_VENV";
pub const NAMESPACE: &str = "/service";
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";
pub const REPLICATION_USER: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = "replicator";
/// Bound for "the cluster (or a new member) is up and streaming".
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for "a new leader is established" after a switchover / graceful stop.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for "a new leader is established" after a crash (must exceed `ttl`).
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(75);
/// Bound for Patroni to stop after SIGTERM before we SIGKILL it (and its postmaster).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the guardian waits after the test process died before SIGKILLing postmasters.
const GUARDIAN_GRACE_SECS: u32 = 15;
/// Upper bound of the guardian's own lifetime (it is SIGKILLed by `Drop` long before normally).
const GUARDIAN_MAX_SECS: u32 = 4 * 3600;

/// Patroni's DCS timing (goes into `bootstrap.dcs`, so it applies to the whole cluster).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: 20,
            loop_wait: 2,
            retry_timeout: 5,
        }
    }
}

/// The `patroni` and `patronictl` a cluster runs. The default is Debian's ([`PATRONI_BIN`],
/// [`PATRONICTL_BIN`]); [`PatroniCluster::start_with_binaries`] takes others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub patroni: PathBuf,
    pub patronictl: PathBuf,
}

impl Default for Binaries {
    fn default() -> Self {
        Binaries {
            patroni: PathBuf::from(PATRONI_BIN),
            patronictl: PathBuf::from(PATRONICTL_BIN),
        }
    }
}

impl Binaries {
    /// `<venv>/bin/patroni` and `<venv>/bin/patronictl`. The venv must be runnable by the
    /// `postgres` user, so make it with a system Python (`/usr/bin/python3 -m venv DIR`), not
    /// one under a home directory `postgres` cannot enter.
    pub fn from_venv(venv: &Path) -> Binaries {
        Binaries {
            patroni: venv.join("bin/patroni"),
            patronictl: venv.join("bin/patronictl"),
        }
    }

    /// `$BENCH_PATRONI_VENV`'s binaries when that variable is set (and not empty), else the
    /// default ones.
    pub fn from_env() -> Binaries {
        match std::env::var_os(PATRONI_VENV_ENV) {
            Some(v) if !v.is_empty() => Self::from_venv(Path::new(&v)),
            _ => Binaries::default(),
        }
    }

    /// `patroni --version` (e.g. `patroni 3.0.2`), run as `uid`/`gid` with the clean
    /// environment the cluster uses, bounded to 30 s.
    pub fn version_as(&self, uid: Uid, gid: Gid) -> Result<String> {
        let mut cmd = Command::new(&self.patroni);
        cmd.arg("--version").uid(uid.as_raw()).gid(gid.as_raw());
        clean_env(&mut cmd);
        let (ok, out) = run_bounded(cmd, Duration::from_secs(30))?;
        if !ok {
            bail!(
                "{} --version failed: {}",
                self.patroni.display(),
                out.trim()
            );
        }
        Ok(out.trim().to_string())
    }
}

/// One Patroni member as started by the harness.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    /// PID of the Patroni process (stale after [`PatroniCluster::crash_leader`] / stop).
    pub pid: u32,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
}

/// A member as reported by Patroni's REST `GET /cluster`.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub name: String,
    /// `leader`, `replica`, `sync_standby`, `standby_leader` (REST naming, even in 3.x).
    pub role: String,
    /// `running`, `starting`, `stopped`, `creating replica`, ...
    pub state: String,
    pub port: Option<u16>,
    pub timeline: Option<u64>,
    pub lag: Option<Value>,
}

impl MemberStatus {
    pub fn is_leader(&self) -> bool {
        matches!(
            self.role.as_str(),
            "leader" | "master" | "primary" | "standby_leader"
        )
    }
}

/// Which section of Patroni's config names etcd, and so which of etcd's APIs its keys go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DcsSection {
    /// `etcd3:`, the v3 API (the default here).
    #[default]
    Etcd3,
    /// `etcd:`, the v2 API (python3-etcd; etcd started with `--enable-v2`). Its keys live in
    /// etcd's v2 store: same paths, invisible to a v3 reader.
    Etcd,
}

pub struct PatroniCluster {
    pub etcd_endpoint: String,
    pub scope: String,
    pub timing: Timing,
    /// The etcd section each node's config has.
    pub dcs: DcsSection,
    dir: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
    children: Vec<Option<Child>>,
    used_ports: HashSet<u16>,
    uid: Uid,
    gid: Gid,
    guardian: Option<Child>,
    /// Time `start` took until every member was streaming.
    pub startup: Duration,
    /// The `patroni` and `patronictl` this cluster runs.
    pub binaries: Binaries,
    /// A standby cluster's source: the PostgreSQL port its standby leader replicates from.
    standby_source: Option<u16>,
}

/// How a cluster is started beyond its size and timing.
#[derive(Default)]
struct Shape {
    /// The etcd section of each node's config.
    dcs: DcsSection,
    /// The `patroni` and `patronictl` to run.
    binaries: Binaries,
    /// A standby cluster's source port (see [`PatroniCluster::start_standby`]).
    standby_source: Option<u16>,
}

impl PatroniCluster {
    /// Starts an `n`-node cluster with the default [`Timing`]; panics (with log tails) on failure.
    pub fn start(etcd_endpoint: &str, scope: &str, n: usize) -> PatroniCluster {
        Self::start_with(etcd_endpoint, scope, n, Timing::default())
    }

    pub fn start_with(
        etcd_endpoint: &str,
        scope: &str,
        n: usize,
        timing: Timing,
    ) -> PatroniCluster {
        Self::start_full(etcd_endpoint, scope, n, timing, Shape::default())
    }

    /// [`PatroniCluster::start_with`] with the given etcd section (`etcd:` for the v2 API).
    pub fn start_with_dcs(
        etcd_endpoint: &str,
        scope: &str,
        n: usize,
        timing: Timing,
        dcs: DcsSection,
    ) -> PatroniCluster {
        let shape = Shape {
            dcs,
            ..Shape::default()
        };
        Self::start_full(etcd_endpoint, scope, n, timing, shape)
    }

    /// Like [`Self::start_with`], running `binaries` (e.g. [`Binaries::from_env`]) instead of
    /// Debian's Patroni.
    pub fn start_with_binaries(
        etcd_endpoint: &str,
        scope: &str,
        n: usize,
        timing: Timing,
        binaries: Binaries,
    ) -> PatroniCluster {
        let shape = Shape {
            binaries,
            ..Shape::default()
        };
        Self::start_full(etcd_endpoint, scope, n, timing, shape)
    }

    /// A Patroni standby cluster of `n` nodes replicating from the PostgreSQL at 127.0.0.1:
    /// `source_port` (another cluster's primary): its bootstrap `standby_cluster` section makes
    /// its leader a `standby_leader`, taken with `pg_basebackup`.
    pub fn start_standby(
        etcd_endpoint: &str,
        scope: &str,
        n: usize,
        timing: Timing,
        binaries: Binaries,
        source_port: u16,
    ) -> PatroniCluster {
        let shape = Shape {
            binaries,
            standby_source: Some(source_port),
            ..Shape::default()
        };
        Self::start_full(etcd_endpoint, scope, n, timing, shape)
    }

    fn start_full(
        etcd_endpoint: &str,
        scope: &str,
        n: usize,
        timing: Timing,
        shape: Shape,
    ) -> PatroniCluster {
        let Shape {
            dcs,
            binaries,
            standby_source,
        } = shape;
        assert!(n >= 1, "need at least one node");
        let t0 = Instant::now();
        let user = User::from_name("postgres")
            .expect("getpwnam(postgres)")
            .expect("no `postgres` user (apt-get install postgresql)");
        for bin in [&binaries.patroni, &binaries.patronictl] {
            assert!(
                bin.exists(),
                "{} missing (apt-get install patroni, or see {PATRONI_VENV_ENV} in docs/BENCHMARKS.md)",
                bin.display()
            );
        }
        assert!(
            Path::new(PG_BIN_DIR).join("postgres").exists(),
            "{PG_BIN_DIR}/postgres missing (apt-get install postgresql-15)"
        );
        let dir = tempfile::Builder::new()
            .prefix("haconfd-patroni-")
            .tempdir()
            .expect("tempdir");
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown tempdir");
        if let Err(e) = wait_etcd_ready(etcd_endpoint, Duration::from_secs(15)) {
            panic!("etcd at {etcd_endpoint} not ready: {e:#}");
        }
        let mut c = PatroniCluster {
            etcd_endpoint: etcd_endpoint.to_string(),
            scope: scope.to_string(),
            timing,
            dcs,
            dir: Some(dir),
            nodes: Vec::new(),
            children: Vec::new(),
            used_ports: HashSet::new(),
            uid: user.uid,
            gid: user.gid,
            guardian: None,
            startup: Duration::ZERO,
            binaries,
            standby_source,
        };
        for _ in 0..n {
            c.spawn_new_node();
        }
        c.spawn_guardian();
        let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
        if let Err(e) = c.wait_streaming(&names, READY_TIMEOUT) {
            c.dump_logs();
            panic!("Patroni cluster {scope} did not come up: {e:#}");
        }
        c.startup = t0.elapsed();
        eprintln!(
            "[patroni] cluster {scope} with {n} nodes up in {:.1}s (dir {})",
            c.startup.as_secs_f64(),
            c.dir().display()
        );
        c
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("tempdir").path()
    }

    /// `patroni --version` of this cluster's binary, run as `postgres` (e.g. `patroni 3.0.2`).
    pub fn patroni_version(&self) -> Result<String> {
        self.binaries.version_as(self.uid, self.gid)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// etcd v3 key prefix of this cluster: `/service/<scope>/`.
    pub fn key_prefix(&self) -> String {
        format!("{NAMESPACE}/{}/", self.scope)
    }

    /// Whether the harness believes the node's Patroni is running (not crashed/stopped by us).
    pub fn is_running(&self, name: &str) -> bool {
        let i = self.index(name);
        self.children[i].is_some()
    }

    /// `GET /cluster` from the first running node that answers.
    pub fn cluster_json(&self) -> Option<Value> {
        for (i, n) in self.nodes.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            if let Ok((200, body)) = http_get(n.api_port, "/cluster", Duration::from_secs(2)) {
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Members as seen by Patroni (REST `/cluster`); empty if no node answers.
    pub fn members(&self) -> Vec<MemberStatus> {
        let Some(v) = self.cluster_json() else {
            return Vec::new();
        };
        let Some(arr) = v.get("members").and_then(|m| m.as_array()) else {
            return Vec::new();
        };
        arr.iter()
            .map(|m| MemberStatus {
                name: m["name"].as_str().unwrap_or_default().to_string(),
                role: m["role"].as_str().unwrap_or_default().to_string(),
                state: m["state"].as_str().unwrap_or_default().to_string(),
                port: m["port"].as_u64().map(|p| p as u16),
                timeline: m["timeline"].as_u64(),
                lag: m.get("lag").cloned(),
            })
            .collect()
    }

    /// The leader's name according to Patroni (it mirrors `/service/<scope>/leader`).
    /// After a crash it still names the dead node until its lease expires (~`ttl`).
    pub fn leader(&self) -> Option<String> {
        self.members()
            .into_iter()
            .find(|m| m.is_leader())
            .map(|m| m.name)
    }

    /// Names of non-leader members according to Patroni.
    pub fn replicas(&self) -> Vec<String> {
        self.members()
            .into_iter()
            .filter(|m| !m.is_leader())
            .map(|m| m.name)
            .collect()
    }

    /// Adds node n+1 and waits until it streams from the leader; returns its name.
    pub fn add_member(&mut self) -> String {
        let name = self.spawn_new_node();
        self.respawn_guardian();
        if let Err(e) = self.wait_streaming(std::slice::from_ref(&name), READY_TIMEOUT) {
            self.dump_logs();
            panic!("new member {name} did not start streaming: {e:#}");
        }
        name
    }

    /// `patronictl switchover --leader <cur> [--candidate X] --force`; waits until a different,
    /// writable leader holds the lock, and returns its name. The old leader rejoins as a replica a
    /// few seconds later; use [`Self::wait_healthy`] if the test needs it streaming again.
    pub fn switchover(&self, candidate: Option<&str>) -> String {
        let old = self
            .wait_leader(None, SWITCH_TIMEOUT)
            .unwrap_or_else(|e| panic!("switchover: no leader: {e:#}"));
        let cfg = self.node(&old).config_path.clone();
        let mut cmd = Command::new(&self.binaries.patronictl);
        cmd.arg("-c")
            .arg(&cfg)
            .arg("switchover")
            .arg("--leader")
            .arg(&old);
        if let Some(c) = candidate {
            cmd.arg("--candidate").arg(c);
        }
        cmd.arg("--force");
        clean_env(&mut cmd);
        eprintln!("[patroni] running {cmd:?}");
        let out = run_bounded(cmd, Duration::from_secs(60)).expect("run patronictl switchover");
        if !out.0 {
            self.dump_logs();
            panic!("patronictl switchover failed:\n{}", out.1);
        }
        let new = match self.wait_leader(Some(&old), SWITCH_TIMEOUT) {
            Ok(n) => n,
            Err(e) => {
                self.dump_logs();
                panic!(
                    "switchover from {old}: no new leader: {e:#}\npatronictl said:\n{}",
                    out.1
                );
            }
        };
        if let Some(c) = candidate {
            assert_eq!(new, c, "switchover went to {new}, not the candidate {c}");
        }
        new
    }

    /// SIGKILLs the leader's Patroni, then its postmaster (PID from `postmaster.pid`). Returns the
    /// old leader's name. Its leader + member keys stay in etcd until the lease expires (~`ttl` s),
    /// then a replica takes over: use [`Self::wait_leader`] with `Some(old)` and
    /// [`FAILOVER_TIMEOUT`]. [`Self::restart_member`] brings the node back (it rejoins as replica).
    pub fn crash_leader(&mut self) -> String {
        let old = self
            .wait_leader(None, SWITCH_TIMEOUT)
            .unwrap_or_else(|e| panic!("crash_leader: no leader: {e:#}"));
        self.crash_member(&old);
        old
    }

    /// SIGKILL a member's Patroni and its postmaster.
    pub fn crash_member(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(10));
        }
        let data_dir = self.nodes[i].data_dir.clone();
        kill_postmaster(&data_dir, Signal::SIGKILL);
        // Backends notice postmaster death on their own; wait for the port to close (bounded).
        let port = self.nodes[i].pg_port;
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..100 {
            if !port_open(port) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Graceful stop: SIGTERM the member's Patroni (it stops PostgreSQL and, if leader, releases
    /// the leader key at once), bounded wait, then SIGKILL leftovers.
    pub fn stop_member(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut child) = self.children[i].take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if !matches!(wait_child(&mut child, STOP_TIMEOUT), Ok(true)) {
                let _ = child.kill();
                let _ = wait_child(&mut child, Duration::from_secs(5));
            }
        }
        kill_postmaster(&self.nodes[i].data_dir.clone(), Signal::SIGKILL);
    }

    /// Starts a crashed/stopped member again (same ports, same data dir) and waits until it streams.
    pub fn restart_member(&mut self, name: &str) {
        let i = self.index(name);
        assert!(self.children[i].is_none(), "{name} is still running");
        let child = self.spawn_patroni(&self.nodes[i]).expect("spawn patroni");
        self.nodes[i].pid = child.id();
        self.children[i] = Some(child);
        if let Err(e) = self.wait_streaming(&[name.to_string()], READY_TIMEOUT) {
            self.dump_logs();
            panic!("restarted member {name} did not start streaming: {e:#}");
        }
    }

    /// `patronictl edit-config --set <setting> --force` (e.g. `synchronous_mode=true`): the
    /// cluster's dynamic configuration, applied by every member at its next HA loop.
    pub fn edit_config(&self, setting: &str) {
        self.patronictl(&["edit-config", "--set", setting, "--force"]);
    }

    /// `patronictl <args>` with the leader's config (any node's in a cluster with no leader
    /// that takes writes: a standby cluster), bounded to 60 s; panics with its output when it
    /// fails.
    pub fn patronictl(&self, args: &[&str]) {
        let config = match self.leader() {
            Some(l) => self.node(&l).config_path.clone(),
            None => self.nodes[0].config_path.clone(),
        };
        let mut cmd = Command::new(&self.binaries.patronictl);
        cmd.arg("-c").arg(&config).args(args);
        clean_env(&mut cmd);
        let out = run_bounded(cmd, Duration::from_secs(60)).expect("run patronictl");
        assert!(out.0, "patronictl {args:?} failed:\n{}", out.1);
    }

    /// Moves a member's PostgreSQL to `host` (another loopback address, same port), as a node
    /// re-addressed by its operator: stops it, rewrites its config (PostgreSQL listens on
    /// 127.0.0.1 and `host`, `connect_address` is `host`), starts it again and waits until it
    /// streams. Its member key then carries the new `conn_url`.
    pub fn readdress_member(&mut self, name: &str, host: &str) {
        self.stop_member(name);
        let n = self.node(name).clone();
        let text = fs::read_to_string(&n.config_path).expect("read member config");
        let mut cfg: Value = serde_json::from_str(&text).expect("member config is JSON");
        cfg["postgresql"]["listen"] = json!(format!("127.0.0.1,{host}:{}", n.pg_port));
        cfg["postgresql"]["connect_address"] = json!(format!("{host}:{}", n.pg_port));
        fs::write(&n.config_path, serde_json::to_string_pretty(&cfg).unwrap())
            .expect("write member config");
        self.restart_member(name);
    }

    /// Waits until a leader exists that is not `not` (if given), reports `running`, and whose
    /// PostgreSQL is out of recovery. Returns its name.
    pub fn wait_leader(&self, not: Option<&str>, timeout: Duration) -> Result<String> {
        let mut last = String::new();
        let r = wait_until(timeout, Duration::from_millis(100), || {
            let ms = self.members();
            let l = ms.iter().find(|m| m.is_leader())?;
            last = format!("{ms:?}");
            if Some(l.name.as_str()) == not || l.state != "running" {
                return None;
            }
            let port = self.nodes.iter().find(|n| n.name == l.name)?.pg_port;
            match is_in_recovery(port) {
                Ok(false) => Some(l.name.clone()),
                _ => None,
            }
        });
        r.with_context(|| format!("waiting for a leader other than {not:?}; last members: {last}"))
    }

    /// Waits until every running member is up with one writable leader and all others streaming.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let names: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.children[i].is_some())
            .map(|i| self.nodes[i].name.clone())
            .collect();
        self.wait_streaming(&names, timeout)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres?connect_timeout=2`
    pub fn pg_url(port: u16) -> String {
        pg_url(port)
    }

    /// A sync client to 127.0.0.1:`port` (use outside async code; see module docs).
    pub fn connect(&self, port: u16) -> postgres::Client {
        connect(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e:#}"))
    }

    /// Creates `haconfd_probe` on the leader (for [`WriteLoad`]); it replicates to the replicas.
    pub fn create_probe_table(&self) {
        let leader = self.wait_leader(None, SWITCH_TIMEOUT).expect("leader");
        let port = self.node(&leader).pg_port;
        on_thread(move || {
            let mut c = connect(port)?;
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS haconfd_probe \
                 (id bigserial PRIMARY KEY, v bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
            )?;
            Ok(())
        })
        .expect("create haconfd_probe");
    }

    /// Prints the last lines of every node log to stderr.
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = fs::read_to_string(&n.log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!(
                "----- {} ({}) last {} lines -----",
                n.name,
                n.log_path.display(),
                lines.len() - from
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }

    // ---------------------------------------------------------------- internals

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    fn alloc_port(&mut self) -> u16 {
        for _ in 0..50 {
            let p = free_port();
            if self.used_ports.insert(p) {
                return p;
            }
        }
        panic!("could not allocate a free port");
    }

    fn spawn_new_node(&mut self) -> String {
        let idx = self.nodes.len() + 1;
        let name = format!("pg{idx}");
        let pg_port = self.alloc_port();
        let api_port = self.alloc_port();
        let dir = self.dir().to_path_buf();
        let node = Node {
            name: name.clone(),
            pg_port,
            api_port,
            pid: 0,
            config_path: dir.join(format!("{name}.yml")),
            data_dir: dir.join(format!("{name}-data")),
            log_path: dir.join(format!("{name}.log")),
        };
        let cfg = self.config_for(&node);
        fs::write(
            &node.config_path,
            serde_json::to_string_pretty(&cfg).unwrap(),
        )
        .expect("write config");
        nix::unistd::chown(&node.config_path, Some(self.uid), Some(self.gid))
            .expect("chown config");
        let child = self.spawn_patroni(&node).expect("spawn patroni");
        let mut node = node;
        node.pid = child.id();
        self.nodes.push(node);
        self.children.push(Some(child));
        name
    }

    fn config_for(&self, n: &Node) -> Value {
        let dir = self.dir();
        let hosts: Vec<String> = self
            .etcd_endpoint
            .split(',')
            .map(|h| {
                h.trim()
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string()
            })
            .filter(|h| !h.is_empty())
            .collect();
        let t = self.timing;
        let section = match self.dcs {
            DcsSection::Etcd3 => "etcd3",
            DcsSection::Etcd => "etcd",
        };
        let mut cfg = json!({
            "scope": self.scope,
            "namespace": NAMESPACE,
            "name": n.name,
            "log": { "level": "INFO" },
            "restapi": {
                "listen": format!("127.0.0.1:{}", n.api_port),
                "connect_address": format!("127.0.0.1:{}", n.api_port),
            },
            "bootstrap": {
                "dcs": {
                    "ttl": t.ttl,
                    "loop_wait": t.loop_wait,
                    "retry_timeout": t.retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {
                        "use_pg_rewind": true,
                        "use_slots": true,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "64MB",
                            "max_connections": 100
                        }
                    }
                },
                "initdb": [ { "encoding": "UTF8" }, { "locale": "C" } ]
            },
            "postgresql": {
                "listen": format!("127.0.0.1:{}", n.pg_port),
                "connect_address": format!("127.0.0.1:{}", n.pg_port),
                "data_dir": n.data_dir,
                "bin_dir": PG_BIN_DIR,
                "pgpass": dir.join(format!("{}.pgpass", n.name)),
                "authentication": {
                    "superuser": { "username": SUPERUSER, "password": SUPERUSER_PASSWORD },
                    "replication": { "username": REPLICATION_USER, "password": REPLICATION_PASSWORD }
                },
                "parameters": {
                    "unix_socket_directories": dir,
                    "shared_buffers": "16MB",
                    "fsync": "off",
                    // A new replica's slot is created by the leader on its next HA loop; until then
                    // the walreceiver fails ("replication slot does not exist") and retries after
                    // this interval (default 5s), which dominated startup time.
                    "wal_retrieve_retry_interval": "500ms",
                    "log_min_messages": "warning"
                },
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust"
                ]
            },
            "tags": { "nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false }
        });
        cfg[section] = json!({ "hosts": hosts });
        if let Some(port) = self.standby_source {
            cfg["bootstrap"]["dcs"]["standby_cluster"] = json!({
                "host": "127.0.0.1",
                "port": port,
                "create_replica_methods": ["basebackup"]
            });
        }
        cfg
    }

    fn spawn_patroni(&self, n: &Node) -> Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&n.log_path)
            .with_context(|| format!("open {}", n.log_path.display()))?;
        let log2 = log.try_clone()?;
        let mut cmd = Command::new(&self.binaries.patroni);
        cmd.arg(&n.config_path)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .uid(self.uid.as_raw())
            .gid(self.gid.as_raw());
        clean_env(&mut cmd);
        set_pdeathsig(&mut cmd, Signal::SIGTERM);
        cmd.spawn().with_context(|| {
            format!(
                "spawn {} {}",
                self.binaries.patroni.display(),
                n.config_path.display()
            )
        })
    }

    /// A tiny `sh` that sleeps (bounded) and, when the test process dies (PDEATHSIG=SIGTERM),
    /// waits a grace period for Patroni to stop PostgreSQL, then SIGKILLs leftover postmasters.
    fn spawn_guardian(&mut self) {
        let pidfiles: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.data_dir.join("postmaster.pid").display().to_string())
            .collect();
        let script = format!(
            r#"cleanup() {{
  sleep {grace}
  for f in {files}; do
    [ -f "$f" ] || continue
    p=$(head -n 1 "$f")
    [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = postgres ] && kill -9 "$p"
  done
  exit 0
}}
trap cleanup TERM
i=0
while [ $i -lt {max} ]; do sleep 1; i=$((i+1)); done
"#,
            grace = GUARDIAN_GRACE_SECS,
            files = pidfiles.join(" "),
            max = GUARDIAN_MAX_SECS
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        clean_env(&mut cmd);
        set_pdeathsig(&mut cmd, Signal::SIGTERM);
        match cmd.spawn() {
            Ok(c) => self.guardian = Some(c),
            Err(e) => eprintln!("[patroni] could not start guardian: {e}"),
        }
    }

    fn respawn_guardian(&mut self) {
        if let Some(mut g) = self.guardian.take() {
            let _ = g.kill();
            let _ = wait_child(&mut g, Duration::from_secs(2));
        }
        self.spawn_guardian();
    }

    /// Waits until: exactly one leader, every name in `names` is `running` (or `streaming`), and
    /// every non-leader in `names` appears in the leader's `pg_stat_replication` as `streaming`.
    fn wait_streaming(&self, names: &[String], timeout: Duration) -> Result<()> {
        let mut last = String::from("(no answer from any REST API)");
        let r = wait_until(timeout, Duration::from_millis(250), || {
            // Fail fast if a Patroni process died.
            for (i, c) in self.children.iter().enumerate() {
                if let Some(c) = c {
                    if !pid_alive(c.id()) {
                        last = format!("patroni {} (pid {}) exited", self.nodes[i].name, c.id());
                        return Some(Err(()));
                    }
                }
            }
            let ms = self.members();
            if ms.is_empty() {
                return None;
            }
            last = format!("{ms:?}");
            let leaders: Vec<&MemberStatus> = ms.iter().filter(|m| m.is_leader()).collect();
            if leaders.len() != 1 || leaders[0].state != "running" {
                return None;
            }
            let leader = leaders[0].name.clone();
            for name in names {
                let m = ms.iter().find(|m| &m.name == name)?;
                if m.state != "running" && m.state != "streaming" {
                    return None;
                }
            }
            let want: Vec<String> = names.iter().filter(|n| **n != leader).cloned().collect();
            if want.is_empty() {
                return Some(Ok(()));
            }
            let port = self.nodes.iter().find(|n| n.name == leader)?.pg_port;
            let streaming = on_thread(move || {
                let mut c = connect(port)?;
                let rows = c.query(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<String>>())
            })
            .ok()?;
            last = format!("{ms:?}; streaming to leader {leader}: {streaming:?}");
            if want.iter().all(|w| streaming.contains(w)) {
                Some(Ok(()))
            } else {
                None
            }
        });
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => bail!("{last}"),
            Err(e) => Err(e).with_context(|| format!("last seen: {last}")),
        }
    }

    fn shutdown(&mut self) {
        // SIGTERM every running Patroni; each stops its PostgreSQL (fast) and exits.
        for c in self.children.iter().flatten() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for slot in self.children.iter_mut() {
            if let Some(mut c) = slot.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                if !matches!(wait_child(&mut c, left), Ok(true)) {
                    let _ = c.kill();
                    let _ = wait_child(&mut c, Duration::from_secs(5));
                }
            }
        }
        // Postmasters orphaned by a crash (or a Patroni that did not stop in time).
        for n in &self.nodes {
            kill_postmaster(&n.data_dir, Signal::SIGKILL);
        }
        if let Some(mut g) = self.guardian.take() {
            let _ = g.kill();
            let _ = wait_child(&mut g, Duration::from_secs(2));
        }
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_logs();
        }
        self.shutdown();
        if panicking || std::env::var_os("HACONFD_KEEP_PATRONI").is_some() {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!("[patroni] kept {}", p.display());
            }
        }
    }
}

// -------------------------------------------------------------------- free helpers

/// `postgres://postgres@127.0.0.1:<port>/postgres?connect_timeout=2`
pub fn pg_url(port: u16) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/postgres?connect_timeout=2")
}

fn pg_config(port: u16, user: &str, dbname: &str) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(user)
        .password(SUPERUSER_PASSWORD)
        .dbname(dbname)
        .application_name("haconfd-test")
        .connect_timeout(Duration::from_secs(2));
    c
}

/// A sync client to 127.0.0.1:`port` as `postgres` (not usable inside an async context).
pub fn connect(port: u16) -> Result<postgres::Client> {
    pg_config(port, SUPERUSER, "postgres")
        .connect(postgres::NoTls)
        .with_context(|| format!("connect 127.0.0.1:{port}"))
}

/// `SELECT pg_is_in_recovery()` on a new connection (run on its own thread; works anywhere).
pub fn is_in_recovery(port: u16) -> Result<bool> {
    on_thread(move || {
        let mut c = connect(port)?;
        let row = c.query_one("SELECT pg_is_in_recovery()", &[])?;
        Ok(row.get::<_, bool>(0))
    })
}

/// `SQLSTATE: message` for server errors, else the error and its sources (`postgres::Error`'s
/// own Display is just "db error" / "error connecting to server").
pub fn pg_err_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    for _ in 0..8 {
        let Some(x) = src else { break };
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Runs `f` on a fresh OS thread (no tokio context), joins it.
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(f)
        .join()
        .map_err(|_| anyhow!("helper thread panicked"))?
}

/// A free TCP port on 127.0.0.1 (bind :0 and release; racy but fine for tests).
pub use super::procs::{free_port, port_open};

/// Waits until every etcd endpoint answers `GET /version` with a decided cluster version. A just
/// started etcd answers `"etcdcluster":"not_decided"` for a moment, and a Patroni 3.0.2 that sees
/// that logs `Failed to get list of machines ... not_decided`, then sleeps 5 s ("waiting on etcd").
pub fn wait_etcd_ready(endpoint: &str, timeout: Duration) -> Result<()> {
    for ep in endpoint.split(',') {
        let hp = ep
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let port: u16 = hp
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| anyhow!("cannot parse port of etcd endpoint {ep:?}"))?;
        let mut last = String::new();
        wait_until(timeout, Duration::from_millis(100), || {
            match http_get(port, "/version", Duration::from_secs(1)) {
                Ok((200, body)) if !body.contains("not_decided") => Some(()),
                Ok((code, body)) => {
                    last = format!("{code} {body}");
                    None
                }
                Err(e) => {
                    last = format!("{e:#}");
                    None
                }
            }
        })
        .with_context(|| format!("etcd {ep}: last answer {last}"))?;
    }
    Ok(())
}

/// Minimal HTTP/1.0 GET against 127.0.0.1:`port`. Returns (status, body).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(4 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Polls `f` every `interval` until it returns `Some`, bounded by `timeout` and an iteration cap.
fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    let max_iter = (timeout.as_millis() / interval.as_millis().max(1)) as usize + 2;
    for _ in 0..max_iter {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(interval);
    }
    bail!("timed out after {:.1}s", start.elapsed().as_secs_f64())
}

fn clean_env(cmd: &mut Command) {
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/var/lib/postgresql");
}

fn set_pdeathsig(cmd: &mut Command, sig: Signal) {
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe syscalls (prctl, getppid, kill) between fork and exec.
    // std applies uid/gid *before* pre_exec closures, so PDEATHSIG is not cleared by setuid.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(sig).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != parent {
                // Parent already gone before prctl took effect.
                let _ = kill(nix::unistd::getpid(), sig);
            }
            Ok(())
        });
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, r)| !r.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Reads the postmaster PID from `<data_dir>/postmaster.pid` and signals it if it is a live
/// `postgres` process. Returns the PID if signalled.
pub fn kill_postmaster(data_dir: &Path, sig: Signal) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() != "postgres" || !pid_alive(pid as u32) {
        return None;
    }
    kill(Pid::from_raw(pid), sig).ok()?;
    Some(pid)
}

/// Waits for a child to exit (bounded). Ok(true) if it exited.
fn wait_child(c: &mut Child, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    for _ in 0..(timeout.as_millis() / 50 + 2) {
        if c.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

/// Runs a command with a time bound; returns (success, combined output).
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("out");
    let f = File::create(&out_path)?;
    cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    let mut child = cmd.spawn()?;
    let ok = if wait_child(&mut child, timeout)? {
        child.wait()?.success()
    } else {
        let _ = child.kill();
        let _ = child.wait();
        false
    };
    Ok((ok, fs::read_to_string(&out_path).unwrap_or_default()))
}

// -------------------------------------------------------------------- load generators

/// Counters of a [`WriteLoad`] / [`ReadLoad`].
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Successful operations (for `ReadLoad`: served by a replica).
    pub ok: u64,
    /// Connect or query errors.
    pub failed: u64,
    /// `ReadLoad` only: reads answered by a primary (`pg_is_in_recovery() = false`).
    pub misrouted: u64,
    /// The first few error messages (at most [`MAX_KEPT_ERRORS`]), prefixed with the time since start.
    pub errors: Vec<String>,
    /// Time since start of the first and last failure (or misroute).
    pub first_bad_at: Option<Duration>,
    pub last_bad_at: Option<Duration>,
    pub elapsed: Duration,
}

pub const MAX_KEPT_ERRORS: usize = 5;
/// Hard cap on iterations of a load loop.
pub const MAX_LOAD_ITERATIONS: u64 = 2_000_000;

impl LoadStats {
    fn bad(&mut self, t: Duration, msg: Option<String>) {
        self.first_bad_at.get_or_insert(t);
        self.last_bad_at = Some(t);
        if let Some(m) = msg {
            self.failed += 1;
            if self.errors.len() < MAX_KEPT_ERRORS {
                self.errors.push(format!("+{:.3}s {m}", t.as_secs_f64()));
            }
        }
    }
}

/// Where a load connects and how fast it runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub port: u16,
    pub user: String,
    pub dbname: String,
    /// Stop by itself after this long.
    pub max_duration: Duration,
    /// Pause between iterations.
    pub pause: Duration,
}

impl LoadOptions {
    pub fn new(port: u16, max_duration: Duration) -> Self {
        LoadOptions {
            port,
            user: SUPERUSER.into(),
            dbname: "postgres".into(),
            max_duration,
            pause: Duration::from_millis(10),
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
    handle: Option<JoinHandle<()>>,
}

impl Load {
    fn start(
        opts: LoadOptions,
        op: fn(&mut postgres::Client, u64) -> Result<bool, postgres::Error>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let (s2, st2) = (stop.clone(), stats.clone());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let cfg = pg_config(opts.port, &opts.user, &opts.dbname);
            for i in 0..MAX_LOAD_ITERATIONS {
                if s2.load(Ordering::Relaxed) || start.elapsed() >= opts.max_duration {
                    break;
                }
                // A NEW connection per iteration, closed right after.
                let res = cfg.connect(postgres::NoTls).and_then(|mut c| {
                    let r = op(&mut c, i);
                    let _ = c.close();
                    r
                });
                let t = start.elapsed();
                {
                    let mut st = st2.lock().unwrap();
                    match res {
                        Ok(true) => st.ok += 1,
                        Ok(false) => {
                            st.misrouted += 1;
                            st.bad(t, None);
                        }
                        Err(e) => st.bad(t, Some(pg_err_text(&e))),
                    }
                    st.elapsed = t;
                }
                std::thread::sleep(opts.pause);
            }
            st2.lock().unwrap().elapsed = start.elapsed();
        });
        Load {
            stop,
            stats,
            handle: Some(handle),
        }
    }

    fn snapshot(&self) -> LoadStats {
        self.stats.lock().unwrap().clone()
    }

    fn stop(&mut self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // Bounded join: an iteration takes at most ~connect_timeout unless a server hangs
            // mid-query; in that case we return what we have and leave the thread detached.
            for _ in 0..200 {
                if h.is_finished() {
                    let _ = h.join();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.snapshot()
    }
}

/// Reconnecting write load: each iteration opens a new connection to 127.0.0.1:`port` (e.g.
/// HAProxy's primary port or PgBouncer), `INSERT INTO haconfd_probe(v) VALUES (i)`, closes.
/// Create the table first with [`PatroniCluster::create_probe_table`].
pub struct WriteLoad(Load);

impl WriteLoad {
    pub fn start(port: u16, max_duration: Duration) -> WriteLoad {
        Self::start_with(LoadOptions::new(port, max_duration))
    }
    pub fn start_with(opts: LoadOptions) -> WriteLoad {
        WriteLoad(Load::start(opts, |c, i| {
            c.execute("INSERT INTO haconfd_probe(v) VALUES ($1)", &[&(i as i64)])
                .map(|_| true)
        }))
    }
    /// Current counters without stopping.
    pub fn snapshot(&self) -> LoadStats {
        self.0.snapshot()
    }
    /// Stops the load (bounded) and returns the final counters.
    pub fn stop(mut self) -> LoadStats {
        self.0.stop()
    }
}

/// Reconnecting read load through a replica port: each iteration opens a new connection,
/// `SELECT pg_is_in_recovery()`, closes. `false` (served by the primary) counts as misrouted.
pub struct ReadLoad(Load);

impl ReadLoad {
    pub fn start(port: u16, max_duration: Duration) -> ReadLoad {
        Self::start_with(LoadOptions::new(port, max_duration))
    }
    pub fn start_with(opts: LoadOptions) -> ReadLoad {
        ReadLoad(Load::start(opts, |c, _| {
            c.query_one("SELECT pg_is_in_recovery()", &[])
                .map(|r| r.get::<_, bool>(0))
        }))
    }
    pub fn snapshot(&self) -> LoadStats {
        self.0.snapshot()
    }
    pub fn stop(mut self) -> LoadStats {
        self.0.stop()
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Drop for ReadLoad {
    fn drop(&mut self) {
        self.0.stop();
    }
}
