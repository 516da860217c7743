//! End-to-end tests of the real `haconfd` binary against a real etcd, HAProxy (master-worker) and
//! PgBouncer on loopback: member joins, leader changes, heartbeat no-ops, failed checks, foreign
//! pidfiles, `once` exit codes, `render --snapshot`, and coalescing of change bursts.
//!
//! Every test uses its own Patroni scope on the binary's shared etcd (`Etcd::shared()` +
//! `unique_name`), and its own temp dir, ports and sockets, so tests run in parallel.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::config::{golden_config, toml_str, ConfigBuilder, Raw, Reload, Template};
use common::procs::*;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn template_path(name: &str) -> String {
    manifest_dir()
        .join("templates")
        .join(name)
        .display()
        .to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// (inode, mtime) of a file: both stay the same when haconfd leaves it alone.
fn file_id(path: &Path) -> (u64, SystemTime) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.ino(), m.modified().unwrap())
}

fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Member JSON as Patroni writes it, for a fake member, with a chosen `xlog_location`.
fn member_json(m: &FakeMember, role: &str, xlog: u64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&m.member_json(role)).unwrap();
    v["xlog_location"] = serde_json::json!(xlog);
    v.to_string()
}

/// Member JSON for a member nobody serves (ports are never opened): for config-only tests.
fn paper_member_json(port: u16, api_port: u16, role: &str) -> String {
    serde_json::json!({
        "conn_url": format!("postgres://127.0.0.1:{port}/postgres"),
        "api_url": format!("http://127.0.0.1:{api_port}/patroni"),
        "state": "running",
        "role": role,
        "version": "3.0.2",
        "xlog_location": 50331816u64,
        "timeline": 1
    })
    .to_string()
}

/// The `server` lines of one `listen` section of a rendered haproxy.cfg.
fn servers_in(cfg: &str, listen: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in cfg.lines() {
        if !line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            inside = line.trim() == format!("listen {listen}");
            continue;
        }
        if inside && line.trim_start().starts_with("server ") {
            out.push(line.trim().to_string());
        }
    }
    out
}

/// Whether `server <name> 127.0.0.1:<port> ` is listed in both listeners.
fn lists_server_in_both(cfg: &str, name: &str, port: u16) -> bool {
    let prefix = format!("server {name} 127.0.0.1:{port} ");
    ["primary", "replicas"]
        .iter()
        .all(|l| servers_in(cfg, l).iter().any(|s| s.starts_with(&prefix)))
}

/// One test's world: a scope on the shared etcd, a temp dir holding every file and socket, and
/// the loopback ports of its HAProxy and PgBouncer.
struct World {
    dir: tempfile::TempDir,
    scope: String,
    endpoint: String,
    primary_port: u16,
    replica_port: u16,
    stats_port: u16,
    pgb_port: u16,
}

impl World {
    fn new(tag: &str) -> World {
        Self::with_endpoint(tag, Etcd::shared().endpoint())
    }

    fn with_endpoint(tag: &str, endpoint: String) -> World {
        let dir = temp_dir(tag);
        let pgb = dir.path().join("pgb");
        std::fs::create_dir(&pgb).unwrap();
        // auth_type trust still needs the users listed.
        write(
            &pgb.join("userlist.txt"),
            "\"pgbouncer\" \"\"\n\"postgres\" \"\"\n",
        );
        give_to_postgres(&pgb);
        World {
            dir,
            scope: unique_name(tag),
            endpoint,
            primary_port: free_port(),
            replica_port: free_port(),
            stats_port: free_port(),
            pgb_port: free_port(),
        }
    }

    fn etcd(&self) -> &'static Etcd {
        Etcd::shared()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self, rest: &str) -> String {
        format!("/service/{}/{rest}", self.scope)
    }

    fn put_member(&self, name: &str, json: &str) -> i64 {
        self.etcd().put(&self.key(&format!("members/{name}")), json)
    }

    fn put_leader(&self, name: &str) -> i64 {
        self.etcd().put(&self.key("leader"), name)
    }

    fn haproxy_cfg(&self) -> PathBuf {
        self.path("haproxy.cfg")
    }

    fn admin_sock(&self) -> PathBuf {
        self.path("admin.sock")
    }

    fn server_state(&self) -> PathBuf {
        self.path("server-state")
    }

    fn pgb_dir(&self) -> PathBuf {
        self.path("pgb")
    }

    fn pgbouncer_ini(&self) -> PathBuf {
        self.pgb_dir().join("pgbouncer.ini")
    }

    fn pgbouncer_log(&self) -> PathBuf {
        self.pgb_dir().join("pgbouncer.log")
    }

    /// The haproxy.cfg target with `check` (an argv) and `reload` (none: no reload).
    fn haproxy_block<S: AsRef<str>>(&self, check: &[S], reload: Option<Reload>) -> Template {
        Template::new(
            "haproxy",
            template_path("haproxy.cfg.tera"),
            self.haproxy_cfg(),
        )
        .check(check)
        .reload_if(reload)
        .server_state(self.admin_sock(), self.server_state())
    }

    /// [`World::haproxy_block`] whose member changes reach HAProxy as `membership` says
    /// (`"runtime"`, the default, or `"reload"`).
    fn haproxy_block_via<S: AsRef<str>>(
        &self,
        check: &[S],
        reload: Option<Reload>,
        membership: &str,
    ) -> Template {
        self.haproxy_block(check, reload).server_state_via(
            self.admin_sock(),
            self.server_state(),
            membership,
        )
    }

    /// The real check: `haproxy -c -f {{staged}}`.
    fn haproxy_check() -> [&'static str; 4] {
        ["haproxy", "-c", "-f", "{{staged}}"]
    }

    /// Reload of the harness' HAProxy master: SIGUSR2 to the verified pidfile PID, outcome
    /// verified on the master socket.
    fn haproxy_reload(h: &Haproxy) -> Reload {
        Reload::signal(h.pidfile(), "SIGUSR2", "haproxy").verify_on(h.master_socket())
    }

    fn pgbouncer_block(&self, reload: Option<Reload>) -> Template {
        let t = Template::new(
            "pgbouncer",
            template_path("pgbouncer.ini.tera"),
            self.pgbouncer_ini(),
        )
        .require_leader(true)
        .reload_if(reload);
        let d = self.pgb_dir();
        t.var("listen_addr", "127.0.0.1")
            .var("listen_port", self.pgb_port)
            .var("unix_socket_dir", &d)
            .var("auth_type", "trust")
            .var("auth_file", d.join("userlist.txt"))
            .var("admin_users", "pgbouncer")
            .var("pidfile", d.join("pgbouncer.pid"))
            .var("logfile", self.pgbouncer_log())
    }

    fn pgbouncer_reload(&self) -> Reload {
        Reload::signal(self.pgb_dir().join("pgbouncer.pid"), "SIGHUP", "pgbouncer")
    }

    /// This world's etcd and scope.
    fn config(&self) -> ConfigBuilder {
        ConfigBuilder::new()
            .endpoint(&self.endpoint)
            .scope(&self.scope)
    }

    /// Writes `haconfd.toml` with this world's etcd, scope and HAProxy vars, `daemon` settings
    /// and the given targets; returns its path.
    fn write_config(&self, daemon: &[(&str, &str)], blocks: &[Template]) -> PathBuf {
        self.write_config_with(daemon, blocks, |b| b)
    }

    /// [`World::write_config`] with more settings from `extra`.
    fn write_config_with(
        &self,
        daemon: &[(&str, &str)],
        blocks: &[Template],
        extra: impl Fn(ConfigBuilder) -> ConfigBuilder,
    ) -> PathBuf {
        let mut b = extra(self.config()).with_table("daemon");
        for (k, v) in daemon {
            b = b.daemon(k, v);
        }
        b = b
            .var("bind_address", "127.0.0.1")
            .var("primary_port", self.primary_port)
            .var("replica_port", self.replica_port)
            .var("stats_port", self.stats_port)
            .var("stats_socket", self.admin_sock())
            .var("check_inter", "300ms")
            .var("check_rise", 1)
            .var("check_fall", 1)
            .var("hard_stop_after", "5s");
        for t in blocks {
            b = b.template(t.clone());
        }
        b.write(self.path("haconfd.toml"))
    }

    /// `haconfd -c <cfg> <args>`, bounded to 30 s.
    fn haconfd(&self, cfg: &Path, args: &[&str]) -> Output {
        haconfd_cmd(cfg, args)
    }

    /// `haconfd once`, asserting exit 0.
    fn once_ok(&self, cfg: &Path, args: &[&str]) -> Output {
        let mut all = vec!["once"];
        all.extend_from_slice(args);
        let out = self.haconfd(cfg, &all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "haconfd once {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            stdout_of(&out),
            stderr_of(&out)
        );
        out
    }
}

fn haconfd_cmd(cfg: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(haconfd_bin());
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .arg("-c")
        .arg(cfg)
        .args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("run haconfd")
}

/// `haconfd run` in the background with JSON logs (debug for haconfd), stopped by PID on drop.
struct Daemon {
    proc: Proc,
}

impl Daemon {
    /// Starts `haconfd run` and waits (15 s) for its first pass.
    fn start(cfg: &Path) -> Daemon {
        let log = cfg.with_file_name("haconfd.log");
        let mut cmd = Command::new(haconfd_bin());
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg("-c")
            .arg(cfg)
            .args([
                "run",
                "--log-format",
                "json",
                "--log-level",
                "info,haconfd=debug",
            ]);
        let d = Daemon {
            proc: Proc::spawn_logged("haconfd", cmd, &log),
        };
        d.wait_pass(0, Duration::from_secs(15));
        d
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    /// Log lines as JSON objects (non-JSON lines are skipped).
    fn events(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a pass ("pass ..." message) ran at `revision` or later. Panics with the log.
    fn wait_pass(&self, revision: i64, timeout: Duration) -> serde_json::Value {
        let mut found = None;
        let ok = wait_until(timeout, || {
            assert!(
                self.proc.is_running(),
                "haconfd exited early; log:\n{}",
                self.log()
            );
            found = self.events().into_iter().find(|e| {
                e["message"].as_str().is_some_and(|m| m.starts_with("pass"))
                    && e["revision"].as_i64().is_some_and(|r| r >= revision)
            });
            found.is_some()
        });
        assert!(
            ok,
            "no pass at revision >= {revision} within {timeout:?}; log:\n{}",
            self.log()
        );
        found.unwrap()
    }

    /// Messages of every event, joined (for "appears verbatim" checks).
    fn messages(&self) -> String {
        self.events()
            .iter()
            .map(|e| {
                let mut s = e["message"].as_str().unwrap_or("").to_string();
                if let Some(err) = e["error"].as_str() {
                    s.push_str(" error=");
                    s.push_str(err);
                }
                s
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Starts HAProxy (master-worker, foreground) on the rendered config.
/// The file written by `once --no-reload`, HAProxy started on it, then the daemon with
/// HAProxy's reload.
fn haproxy_and_daemon(w: &World, daemon_cfg: &[(&str, &str)]) -> (Haproxy, Daemon) {
    haproxy_and_daemon_via(w, daemon_cfg, "runtime")
}

/// [`haproxy_and_daemon`] with member changes reaching HAProxy as `membership` says.
fn haproxy_and_daemon_via(
    w: &World,
    daemon_cfg: &[(&str, &str)],
    membership: &str,
) -> (Haproxy, Daemon) {
    let blocks = [w.haproxy_block_via(&World::haproxy_check(), None, membership)];
    let cfg = w.write_config(daemon_cfg, &blocks);
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(w);
    let reload = Some(World::haproxy_reload(&h));
    let blocks = [w.haproxy_block_via(&World::haproxy_check(), reload, membership)];
    let cfg = w.write_config(daemon_cfg, &blocks);
    let d = Daemon::start(&cfg);
    (h, d)
}

/// HAProxy's live servers (`show servers state` on the admin socket) of `backend` but those in
/// forced maintenance (parked: see [`parked_servers`]): name, address and port, sorted.
fn live_servers(w: &World, backend: &str) -> Vec<String> {
    servers_where(w, backend, false)
}

/// The servers of `backend` in forced maintenance: those haconfd parked when they left
/// (HAProxy before 2.9), by name, sorted.
fn parked_servers(w: &World, backend: &str) -> Vec<String> {
    let mut names: Vec<String> = servers_where(w, backend, true)
        .into_iter()
        .map(|s| s.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    names.dedup();
    names
}

fn servers_where(w: &World, backend: &str, in_maint: bool) -> Vec<String> {
    let dump = unix_cmd(
        &w.admin_sock(),
        &format!("show servers state {backend}"),
        Duration::from_secs(2),
    )
    .unwrap_or_default();
    let mut out: Vec<String> = dump
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 19 && !f[0].starts_with('#'))
        .filter(|f| (f[6].parse::<u32>().unwrap_or(0) & 1 != 0) == in_maint)
        .map(|f| format!("{} {}:{}", f[3], f[4], f[18]))
        .collect();
    out.sort();
    out
}

/// The servers of `listen` in the file, as [`live_servers`] gives them.
fn file_servers(cfg: &str, listen: &str) -> Vec<String> {
    let mut out: Vec<String> = servers_in(cfg, listen)
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", f[1], f[2])
        })
        .collect();
    out.sort();
    out
}

fn start_haproxy(w: &World) -> Haproxy {
    let h = Haproxy::start(&w.haproxy_cfg());
    assert!(
        wait_until(Duration::from_secs(5), || w.admin_sock().exists()),
        "stats socket {} missing; log:\n{}",
        w.admin_sock().display(),
        h.log()
    );
    h
}

// ---------------------------------------------------------------------------------------------
// 1. A member joins
// ---------------------------------------------------------------------------------------------

/// A member that joins, moves and leaves reaches HAProxy through its runtime API: the file and
/// the live server list agree after each change, reads and writes keep their nodes, and the
/// master never forks a new worker. A server deleted by hand (HAProxy no longer runs the file)
/// is repaired by a reload at the next change.
#[test]
fn a_member_that_joins_moves_and_leaves_reaches_haproxy_without_a_reload() {
    let w = World::new("join");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);

    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "300ms"), ("retry_interval", "1s")];
    let (h, d) = haproxy_and_daemon(&w, daemon_cfg);

    // Before: the leader serves writes, nobody serves reads.
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();
    assert!(
        tcp_banner(w.replica_port, Duration::from_millis(500)).is_err(),
        "the replica port served something before any replica joined"
    );
    let check = w.haconfd(&w.path("haconfd.toml"), &["check"]);
    assert!(
        stdout_of(&check).contains(&format!(
            "members of \"haproxy\": HAProxy's runtime API on {} (",
            w.admin_sock().display()
        )),
        "{}{}",
        stdout_of(&check),
        stderr_of(&check)
    );
    let before = h.reload_count();
    let worker = h.proc_status().workers;
    assert_eq!(worker.len(), 1, "{}", h.show_proc());
    // The file is swapped in before HAProxy is told: wait (bounded) for the live list.
    let agree = |what: &str, d: &Daemon| {
        let same = |listen: &str| {
            live_servers(&w, listen) == file_servers(&read(&w.haproxy_cfg()), listen)
        };
        wait_until(Duration::from_secs(5), || {
            same("primary") && same("replicas")
        });
        let text = read(&w.haproxy_cfg());
        for listen in ["primary", "replicas"] {
            assert_eq!(
                live_servers(&w, listen),
                file_servers(&text, listen),
                "{what}: HAProxy's live {listen} servers differ from the file:\n{text}\nhaconfd log:\n{}",
                d.log()
            );
        }
    };

    // Joins (pgc too: the guard would refuse losing half the members at the leave below).
    let c = FakeMember::start("pgc", Role::Replica);
    w.put_member(&c.name, &c.member_json("replica"));
    let rev = w.put_member(&b.name, &b.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    let text = read(&w.haproxy_cfg());
    assert!(
        lists_server_in_both(&text, &b.name, b.port()),
        "new member missing from a listener:\n{text}"
    );
    agree("after the join", &d);
    wait_banner(w.replica_port, &b.name, Duration::from_secs(5)).unwrap();
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();
    assert!(b.backend.connections() >= 1);

    // Moves: the same member name at another port.
    let b2 = FakeMember::start("pgb", Role::Replica);
    let rev = w.put_member(&b2.name, &b2.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(lists_server_in_both(
        &read(&w.haproxy_cfg()),
        "pgb",
        b2.port()
    ));
    agree("after the move", &d);
    let moved = b2.backend.connections();
    wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();
    assert!(
        b2.backend.connections() > moved,
        "reads did not reach pgb's new address"
    );
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();

    // Through the join and the move: no reload, the same one worker.
    std::thread::sleep(Duration::from_millis(500));
    let status = h.proc_status();
    assert_eq!(
        status.reloads(),
        before,
        "member changes reloaded HAProxy; show proc:\n{}\nhaconfd log:\n{}",
        h.show_proc(),
        d.log()
    );
    assert_eq!(status.workers.len(), 1, "{}", h.show_proc());
    assert_eq!(status.workers[0].pid, worker[0].pid, "{}", h.show_proc());
    assert!(status.old_workers.is_empty(), "{}", h.show_proc());
    let runtime = d
        .events()
        .iter()
        .filter(|e| {
            e["message"].as_str()
                == Some("member change applied through HAProxy's runtime API, no reload")
        })
        .count();
    assert!((2..=3).contains(&runtime), "log:\n{}", d.log());

    // Leaves: through the runtime API, with no reload. From HAProxy 2.9 on the server is
    // deleted; before, `del server` can crash a worker with streams on the server, and it is
    // parked in maintenance instead.
    assert_eq!(w.etcd().delete(&w.key("members/pgb")), 1);
    assert!(
        wait_until(Duration::from_secs(10), || !read(&w.haproxy_cfg())
            .contains("server pgb ")),
        "pgb is still in the file; haconfd log:\n{}",
        d.log()
    );
    agree("after the leave", &d);
    let parks = common::procs::parks_removed_servers(&w.admin_sock());
    for listen in ["primary", "replicas"] {
        let want: &[&str] = if parks { &["pgb"] } else { &[] };
        assert_eq!(parked_servers(&w, listen), want, "{}", d.log());
    }
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.proc_status().reloads(), before, "{}", d.log());

    // It comes back with the same line: brought back by address (parked) or added (deleted),
    // again with no reload, and serves reads once its checks pass.
    let rev = w.put_member(&b2.name, &b2.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    agree("after the rejoin", &d);
    assert!(parked_servers(&w, "replicas").is_empty(), "{}", d.log());
    let served = b2.backend.connections();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let _ = tcp_banner(w.replica_port, Duration::from_millis(300));
            b2.backend.connections() > served
        }),
        "pgb does not serve reads after coming back:\n{}",
        d.log()
    );
    assert_eq!(h.proc_status().reloads(), before, "{}", d.log());
    assert_eq!(h.proc_status().workers.len(), 1, "{}", h.show_proc());

    // pgb leaves again, and haconfd restarts: HAProxy runs the file (its servers changed at
    // runtime; pgb parked or deleted), so the start reloads nothing.
    assert_eq!(w.etcd().delete(&w.key("members/pgb")), 1);
    assert!(wait_until(Duration::from_secs(10), || {
        !read(&w.haproxy_cfg()).contains("server pgb ")
            && parked_servers(&w, "replicas").len() == usize::from(parks)
    }));
    drop(d);
    let d = Daemon::start(&w.path("haconfd.toml"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        h.proc_status().reloads(),
        before,
        "a restart of haconfd after runtime member changes reloaded HAProxy:\n{}",
        d.log()
    );
    // It comes back: the new run does not know the line pgb was parked with, so it reloads
    // (before 2.9), and pgb, parked in maintenance until then, serves reads again after it.
    let rev = w.put_member(&b2.name, &b2.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    let before = before + u32::from(parks);
    assert!(
        h.wait_reloads(before, Duration::from_secs(5)),
        "{}",
        d.log()
    );
    agree("after the rejoin through a reload", &d);
    let served = b2.backend.connections();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let _ = tcp_banner(w.replica_port, Duration::from_millis(300));
            b2.backend.connections() > served
        }),
        "pgb, parked before a restart, does not serve reads after coming back:\n{}",
        d.log()
    );

    // Stopped in the middle of a member change (here: a server gone from HAProxy while haconfd
    // was away), the next start finds HAProxy's servers unlike the file and reloads it.
    drop(d);
    let by_hand = unix_cmd(
        &w.admin_sock(),
        "set server replicas/pgc state maint;del server replicas/pgc",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(by_hand.contains("Server deleted"), "{by_hand}");
    let d = Daemon::start(&w.path("haconfd.toml"));
    assert!(
        h.wait_reloads(before + 1, Duration::from_secs(5)),
        "the start did not repair HAProxy's servers:\n{}",
        d.log()
    );
    agree("after the repair at start", &d);
    let before = before + 1;

    // A server deleted by hand: HAProxy no longer runs the file. The next member change finds
    // it out and reloads; the reload brings the server back.
    let by_hand = unix_cmd(
        &w.admin_sock(),
        "set server primary/pga state maint;del server primary/pga",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(by_hand.contains("Server deleted"), "{by_hand}");
    let e = FakeMember::start("pge", Role::Replica);
    let rev = w.put_member(&e.name, &e.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        h.wait_reloads(before + 1, Duration::from_secs(5)),
        "the mismatch was not repaired by a reload; show proc:\n{}\nhaconfd log:\n{}",
        h.show_proc(),
        d.log()
    );
    assert!(
        d.messages()
            .contains("member change not taken through HAProxy's runtime API: reloading instead"),
        "{}",
        d.log()
    );
    assert!(wait_until(Duration::from_secs(5), || live_servers(
        &w, "primary"
    ) == file_servers(
        &read(&w.haproxy_cfg()),
        "primary"
    )));
    agree("after the repair", &d);
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();
    assert_eq!(h.proc_status().failed, 0);
    assert!(h.is_running());
}

/// HAProxy (started from `once --no-reload`) and the daemon, the shipped template with `var`
/// set and `extra` named in `server_state.replica_backends` next to `replicas`.
fn haproxy_and_daemon_for_reads(w: &World, var: (&str, Raw), extra: &str) -> (Haproxy, Daemon) {
    let block = |reload: Option<Reload>| {
        w.haproxy_block(&World::haproxy_check(), reload)
            .var(var.0, Raw(var.1 .0.clone()))
            .set(
                "server_state",
                Raw(format!(
                    "{{ stats_socket = {}, file = {}, replica_backends = [\"replicas\", {}] }}",
                    toml_str(w.admin_sock()),
                    toml_str(w.server_state()),
                    toml_str(extra)
                )),
            )
    };
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "1s")];
    let cfg = w.write_config(daemon_cfg, &[block(None)]);
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(w);
    let cfg = w.write_config(daemon_cfg, &[block(Some(World::haproxy_reload(&h)))]);
    (h, Daemon::start(&cfg))
}

/// `tag_routes` (reads by tag): a replica that gains the route's tag joins its listener through
/// the runtime API, with no reload, waits DOWN for its checks there (the route is a replica
/// backend), and serves reads through it once `/replica?tag_workload=olap` answers.
#[test]
fn a_replica_tagged_for_a_read_route_joins_its_listener_without_a_reload() {
    let w = World::new("tags");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);
    let olap = free_port();
    let route =
        format!("[{{ name = \"olap\", port = {olap}, tag = \"workload\", value = \"olap\" }}]");
    let (h, d) = haproxy_and_daemon_for_reads(&w, ("tag_routes", Raw(route)), "olap");
    assert!(servers_in(&read(&w.haproxy_cfg()), "olap").is_empty());
    let before = h.reload_count();

    let mut tagged: serde_json::Value = serde_json::from_str(&b.member_json("replica")).unwrap();
    tagged["tags"] = serde_json::json!({ "workload": "olap" });
    let rev = w.put_member(&b.name, &tagged.to_string());
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || live_servers(&w, "olap")
            == file_servers(&read(&w.haproxy_cfg()), "olap")
            && !live_servers(&w, "olap").is_empty()),
        "pgb did not join the olap listener:\n{}",
        d.log()
    );
    wait_banner(olap, &b.name, Duration::from_secs(5)).unwrap();
    assert_eq!(h.reload_count(), before, "{}", d.log());
}

/// pga (the leader), pgb and pgc (replicas), their keys in `w`'s etcd.
fn leader_and_two_replicas(w: &World) -> (FakeMember, FakeMember, FakeMember) {
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    let c = FakeMember::start("pgc", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_member(&c.name, &c.member_json("replica"));
    w.put_leader(&a.name);
    (a, b, c)
}

/// `sync_port`: the sync listener serves the leader's synchronous standby only (Patroni's `sync`
/// key), and follows a change of synchronous standby (the new one through the runtime API).
#[test]
fn the_sync_listener_follows_the_synchronous_standby() {
    let w = World::new("sync");
    let (_a, _b, _c) = leader_and_two_replicas(&w);
    w.etcd()
        .put(&w.key("sync"), r#"{"leader":"pga","sync_standby":"pgb"}"#);
    let sync_port = free_port();
    let (h, d) =
        haproxy_and_daemon_for_reads(&w, ("sync_port", Raw(sync_port.to_string())), "sync");
    assert_eq!(servers_in(&read(&w.haproxy_cfg()), "sync").len(), 1);
    wait_banner(sync_port, "pgb", Duration::from_secs(5)).unwrap();
    let before = h.reload_count();

    let rev = w
        .etcd()
        .put(&w.key("sync"), r#"{"leader":"pga","sync_standby":"pgc"}"#);
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || {
            let live = live_servers(&w, "sync");
            live.len() == 1 && live[0].starts_with("pgc ")
        }),
        "the sync listener did not follow pgc:\n{}",
        d.log()
    );
    // pgc waits for its checks there (a replica backend), then serves. pgb leaving the
    // listener is a removal: deleted from HAProxy 2.9 on, parked in maintenance before; no
    // reload either way.
    wait_banner(sync_port, "pgc", Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.reload_count(), before, "{}", d.log());
}

/// Drained by `set server … state drain` (`SRV_ADMF_FDRAIN`).
fn is_drained(w: &World, backend: &str, server: &str) -> bool {
    server_state(&w.admin_sock(), backend, server).is_some_and(|(_, a)| a & 0x08 != 0)
}

/// Lag-aware replicas (`[lag]`): a replica over `max_bytes` for longer than `delay` is drained
/// in the replica backend (an open session on it goes on, new reads go elsewhere, nothing is
/// reloaded), a shorter surge moves nothing, a figure between the two levels keeps it out, and
/// it comes back under `readmit_bytes`. The drain is owned: a run killed while it holds one hands
/// it to the next (taken over, lifted once the lag is back down), a graceful stop lifts it, a
/// start with `[lag]` gone lifts what a killed run left, and an operator's own drain is never
/// lifted.
#[test]
fn a_replica_over_the_lag_limit_is_drained_after_the_delay_and_returns_under_the_readmit_level() {
    let w = World::new("lag");
    let (_a, b, _c) = leader_and_two_replicas(&w);
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "1s")];
    let with_lag = |b: ConfigBuilder| {
        b.set("lag", "max_bytes", "1MB")
            .set("lag", "readmit_bytes", "512kB")
            .set("lag", "delay", "1500ms")
            .set("lag", "readmit_delay", "500ms")
            .set("lag", "interval", "100ms")
    };
    let block = |reload: Option<Reload>| w.haproxy_block(&World::haproxy_check(), reload);
    let cfg = w.write_config(daemon_cfg, &[block(None)]);
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let reload = || Some(World::haproxy_reload(&h));
    let cfg = w.write_config_with(daemon_cfg, &[block(reload())], with_lag);
    let d = Daemon::start(&cfg);
    wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();
    wait_banner(w.replica_port, "pgc", Duration::from_secs(5)).unwrap();
    let before = h.reload_count();
    let owned = w.server_state().with_file_name(format!(
        "{}.lag-{}",
        w.server_state().file_name().unwrap().to_string_lossy(),
        w.scope
    ));

    // An open read session on pgb.
    let session = (0..20)
        .find_map(|_| {
            let s = std::net::TcpStream::connect(("127.0.0.1", w.replica_port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).ok()?;
            line.contains("pgb").then_some(s)
        })
        .expect("no session landed on pgb");

    // A surge shorter than the delay moves nothing.
    b.health.set_lag(4 << 20);
    std::thread::sleep(Duration::from_millis(700));
    b.health.set_lag(0);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!is_drained(&w, "replicas", "pgb"), "{}", d.log());

    // Over the limit for longer than the delay: drained within delay + 3 s.
    let t0 = Instant::now();
    b.health.set_lag(4 << 20);
    assert!(
        wait_until(Duration::from_millis(4500), || is_drained(
            &w, "replicas", "pgb"
        )),
        "pgb was not drained for its lag:\n{}",
        d.log()
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "drained before the delay: {took:?}"
    );
    for _ in 0..6 {
        let banner = tcp_banner(w.replica_port, Duration::from_secs(1)).unwrap();
        assert!(
            banner.contains("pgc"),
            "a new read went to the lagging pgb: {banner}"
        );
    }
    session.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut &session, &mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the open session on pgb was closed by its drain"
    );
    assert!(
        read(&owned).contains("pgb"),
        "no ownership file at {}",
        owned.display()
    );

    // Between the levels it stays out, through a SIGKILL of haconfd: the next run takes the
    // drain over.
    b.health.set_lag(800 << 10);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(is_drained(&w, "replicas", "pgb"), "{}", d.log());
    d.proc.kill();
    let d = Daemon::start(&cfg);
    assert!(
        wait_until(Duration::from_secs(3), || d
            .messages()
            .contains("replicas drained for lag by an earlier run: taken over")),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(is_drained(&w, "replicas", "pgb"), "{}", d.log());

    // Under the re-admit level: back within readmit_delay + 3 s.
    b.health.set_lag(0);
    assert!(
        wait_until(Duration::from_millis(3500), || !is_drained(
            &w, "replicas", "pgb"
        )),
        "pgb did not come back:\n{}",
        d.log()
    );
    wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();
    assert!(wait_until(Duration::from_secs(2), || !owned.exists()));

    // An operator's drain is not haconfd's to lift.
    let by_hand = unix_cmd(
        &w.admin_sock(),
        "set server replicas/pgc state drain",
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(by_hand.trim(), "");
    std::thread::sleep(Duration::from_millis(800));
    assert!(is_drained(&w, "replicas", "pgc"), "{}", d.log());
    unix_cmd(
        &w.admin_sock(),
        "set server replicas/pgc state ready",
        Duration::from_secs(2),
    )
    .unwrap();

    // A graceful stop lifts haconfd's drains: nobody watches the lag after it.
    b.health.set_lag(4 << 20);
    assert!(wait_until(Duration::from_millis(4500), || is_drained(
        &w, "replicas", "pgb"
    )));
    d.proc.stop(Duration::from_secs(10));
    assert!(
        !is_drained(&w, "replicas", "pgb"),
        "the stop left pgb drained:\n{}",
        d.log()
    );
    assert!(!owned.exists());

    // Killed while it holds a drain, then started with `[lag]` gone: the drain is lifted.
    let d = Daemon::start(&cfg);
    assert!(wait_until(Duration::from_millis(4500), || is_drained(
        &w, "replicas", "pgb"
    )));
    d.proc.kill();
    let plain = w.write_config(daemon_cfg, &[block(reload())]);
    let d = Daemon::start(&plain);
    assert!(
        wait_until(Duration::from_secs(3), || !is_drained(
            &w, "replicas", "pgb"
        )),
        "a drain left by a killed run stayed with [lag] unset:\n{}",
        d.log()
    );
    assert!(!owned.exists());

    // Lag moved servers through the runtime API only.
    assert_eq!(h.reload_count(), before, "{}", d.log());
    drop(d);
}

/// `replica_fallback`: with its only replica failing its checks, reads go to the primary (a
/// `backup` server tracking the primary listener's leader), and back to the replica once it
/// passes again. Without it, the replica port serves nothing meanwhile.
#[test]
fn reads_fall_back_to_the_primary_only_while_no_replica_is_up() {
    for fallback in [true, false] {
        let w = World::new("fallback");
        let a = FakeMember::start("pga", Role::Primary);
        let b = FakeMember::start("pgb", Role::Replica);
        w.put_member(&a.name, &a.member_json("master"));
        w.put_member(&b.name, &b.member_json("replica"));
        w.put_leader(&a.name);
        let block = |reload: Option<Reload>| {
            w.haproxy_block(&World::haproxy_check(), reload)
                .var("replica_fallback", fallback)
        };
        let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "1s")];
        let cfg = w.write_config(daemon_cfg, &[block(None)]);
        w.once_ok(&cfg, &["--no-reload"]);
        let h = start_haproxy(&w);
        let cfg = w.write_config(daemon_cfg, &[block(Some(World::haproxy_reload(&h)))]);
        let d = Daemon::start(&cfg);
        wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();
        // pgb's Patroni says it is down: its checks fail (inter 300ms, fall 1).
        b.health.set_role(Role::Down);
        std::thread::sleep(Duration::from_millis(1200));
        let read = tcp_banner(w.replica_port, Duration::from_millis(800));
        match fallback {
            true => assert_eq!(read.ok().as_deref(), Some("pga"), "{}", d.log()),
            false => assert!(read.is_err(), "{read:?}"),
        }
        b.health.set_role(Role::Replica);
        wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();
        assert_eq!(h.failed_reloads(), 0);
    }
}

/// `server_state.membership = "reload"`: a joining member costs one reload, as before.
#[test]
fn with_membership_reload_a_joining_member_reloads_haproxy_once() {
    let w = World::new("joinreload");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "300ms"), ("retry_interval", "1s")];
    let (h, d) = haproxy_and_daemon_via(&w, daemon_cfg, "reload");
    let check = w.haconfd(&w.path("haconfd.toml"), &["check"]);
    assert!(
        stdout_of(&check).contains(
            "members of \"haproxy\": a reload for every change (server_state.membership = \"reload\")"
        ),
        "{}{}",
        stdout_of(&check),
        stderr_of(&check)
    );
    wait_banner(w.primary_port, &a.name, Duration::from_secs(5)).unwrap();
    let before = h.reload_count();
    let rev = w.put_member(&b.name, &b.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        h.wait_reloads(before + 1, Duration::from_secs(5)),
        "HAProxy was not reloaded; show proc:\n{}\nhaconfd log:\n{}",
        h.show_proc(),
        d.log()
    );
    wait_banner(w.replica_port, &b.name, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(h.proc_status().reloads(), before + 1, "{}", d.log());
}

/// Reads a banner through `port` every 20 ms from its own thread until stopped: (when, what).
struct Readers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(Instant, Result<String, String>)>>,
}

impl Readers {
    fn start(port: u16) -> Readers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..3000 {
                if s.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = tcp_banner(port, Duration::from_secs(2)).map_err(|e| e.to_string());
                out.push((Instant::now(), r));
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        });
        Readers { stop, handle }
    }

    fn stop(self) -> Vec<(Instant, Result<String, String>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// A member key naming an address nobody listens on (a node whose PostgreSQL is still starting,
/// a firewall not yet opened, a wrong `conn_url`): it joins the replica backend out of rotation
/// and gets no read, while reads go on through the other replica. A reachable member joining
/// serves reads once its checks pass.
#[test]
fn a_member_that_joins_unreachable_gets_no_reads_and_a_reachable_one_serves_after_its_checks() {
    let w = World::new("newreads");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "1s")];
    let (h, d) = haproxy_and_daemon(&w, daemon_cfg);
    wait_banner(w.replica_port, &b.name, Duration::from_secs(10)).unwrap();

    // pgx: neither its PostgreSQL nor its REST API answers.
    let (dead_pg, dead_api) = (free_port(), free_port());
    let readers = Readers::start(w.replica_port);
    std::thread::sleep(Duration::from_millis(300));
    let before = h.reload_count();
    let rev = w.put_member("pgx", &paper_member_json(dead_pg, dead_api, "replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || live_servers(&w, "replicas")
            .iter()
            .any(|s| s.starts_with("pgx "))),
        "the new member never reached HAProxy:\n{}",
        d.log()
    );
    assert_eq!(h.reload_count(), before, "{}", d.log());
    // Through the checks' first failures (inter 1s, fall 2) and well past them.
    std::thread::sleep(Duration::from_secs(4));
    let reads = readers.stop();
    let failed: Vec<_> = reads
        .iter()
        .filter(|(_, r)| r.as_deref() != Ok("pgb"))
        .collect();
    println!(
        "RESULT unreachable member joins: {} reads through the replica port, {} failed",
        reads.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} reads failed while an unreachable member joined, first: {:?}\nhaconfd log:\n{}",
        failed.len(),
        reads.len(),
        failed.first(),
        d.log()
    );

    // A reachable member: it takes reads once `rise` checks pass.
    let c = FakeMember::start("pgc", Role::Replica);
    let t0 = Instant::now();
    w.put_member(&c.name, &c.member_json("replica"));
    wait_banner_among(w.replica_port, &c.name, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\nhaconfd log:\n{}", d.log()));
    println!(
        "RESULT reachable member joins: first read on it {} ms after its key (checks inter 1s rise 2)",
        t0.elapsed().as_millis()
    );
}

/// Polls banners through `port` until one is `want` (others may answer meanwhile: round robin).
fn wait_banner_among(port: u16, want: &str, timeout: Duration) -> Result<(), String> {
    let ok = wait_until(timeout, || {
        tcp_banner(port, Duration::from_millis(500)).is_ok_and(|b| b == want)
    });
    ok.then_some(())
        .ok_or_else(|| format!("port {port}: no read reached {want} within {timeout:?}"))
}

// ---------------------------------------------------------------------------------------------
// 2. The leader changes
// ---------------------------------------------------------------------------------------------

/// Opens a client connection to PgBouncer for `db` (a raw v3 StartupMessage as `postgres`),
/// which makes PgBouncer create the database from its `*` entry and connect to the backend.
/// The fake backend does not speak the protocol; what matters is where PgBouncer goes. Waits
/// (5 s) until `backend` has accepted a new connection, then drops the client.
fn connect_through_pgbouncer(p: &Pgbouncer, db: &str, backend: &TcpBackend) {
    use std::io::Write;
    let before = backend.connections();
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for s in ["user", "postgres", "database", db] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port())).expect("connect PgBouncer");
    s.write_all(&msg).expect("send StartupMessage");
    let ok = wait_until(Duration::from_secs(5), || backend.connections() > before);
    drop(s);
    assert!(
        ok,
        "PgBouncer did not connect to {} ({}) for database {db}; SHOW DATABASES: {:?}\nlog:\n{}",
        backend.name(),
        backend.addr(),
        p.show_databases(),
        p.log()
    );
}

fn db_host_port(p: &Pgbouncer, db: &str) -> Option<(String, String)> {
    let dbs = p.show_databases();
    let row = dbs.get(db)?;
    Some((row.get("host")?.clone(), row.get("port")?.clone()))
}

#[test]
fn leader_change_repoints_pgbouncer_and_reloads_it() {
    let w = World::new("leader");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);

    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "300ms"), ("retry_interval", "1s")];
    let cfg = w.write_config(daemon_cfg, &[w.pgbouncer_block(None)]);
    w.once_ok(&cfg, &["--no-reload"]);
    let ini = read(&w.pgbouncer_ini());
    assert!(
        ini.contains(&format!("* = host=127.0.0.1 port={}\n", a.port())),
        "{ini}"
    );
    let p = Pgbouncer::start(&w.pgbouncer_ini());
    let cfg = w.write_config(daemon_cfg, &[w.pgbouncer_block(Some(w.pgbouncer_reload()))]);
    let d = Daemon::start(&cfg);

    // Before: a new database goes to the leader.
    connect_through_pgbouncer(&p, "before_db", &a.backend);
    assert_eq!(
        db_host_port(&p, "before_db"),
        Some(("127.0.0.1".into(), a.port().to_string())),
        "SHOW DATABASES: {:?}",
        p.show_databases()
    );
    let pid = p.pid();
    assert_eq!(b.backend.connections(), 0);

    // Patroni's switchover: the new leader takes the key, then both rewrite their member keys.
    let rev = w.put_leader(&b.name);
    w.put_member(&b.name, &b.member_json("master"));
    w.put_member(&a.name, &a.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || read(&w.pgbouncer_ini())
            .contains(&format!("* = host=127.0.0.1 port={}\n", b.port()))),
        "pgbouncer.ini not re-pointed:\n{}\nhaconfd log:\n{}",
        read(&w.pgbouncer_ini()),
        d.log()
    );
    // PgBouncer re-read its config (same process, SIGHUP) and now sends new databases to the
    // new leader.
    assert!(
        wait_until(Duration::from_secs(5), || p.log().contains("got SIGHUP")),
        "PgBouncer did not log a SIGHUP; log:\n{}",
        p.log()
    );
    // The database PgBouncer created from `*` before the switch is re-pointed too.
    let want = Some(("127.0.0.1".to_string(), b.port().to_string()));
    assert!(
        wait_until(Duration::from_secs(5), || db_host_port(&p, "before_db")
            == want),
        "SHOW DATABASES still shows the old leader: {:?}",
        p.show_databases()
    );
    connect_through_pgbouncer(&p, "after_db", &b.backend);
    assert_eq!(
        db_host_port(&p, "after_db"),
        Some(("127.0.0.1".into(), b.port().to_string())),
        "SHOW DATABASES: {:?}",
        p.show_databases()
    );
    assert_eq!(p.pid(), pid);
    assert!(p.proc().is_running(), "PgBouncer died; log:\n{}", p.log());
}

// ---------------------------------------------------------------------------------------------
// 3. Heartbeats
// ---------------------------------------------------------------------------------------------

#[test]
fn heartbeat_rewrites_of_member_keys_write_nothing_and_reload_nothing() {
    let w = World::new("beat");
    let members = [
        FakeMember::start("pga", Role::Primary),
        FakeMember::start("pgb", Role::Replica),
        FakeMember::start("pgc", Role::Replica),
    ];
    for (i, m) in members.iter().enumerate() {
        let role = if i == 0 { "master" } else { "replica" };
        w.put_member(&m.name, &member_json(m, role, 50_000_000));
    }
    w.put_leader(&members[0].name);

    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "1s")];
    let cfg = w.write_config(
        daemon_cfg,
        &[
            w.haproxy_block(&World::haproxy_check(), None),
            w.pgbouncer_block(None),
        ],
    );
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let p = Pgbouncer::start(&w.pgbouncer_ini());
    let cfg = w.write_config(
        daemon_cfg,
        &[
            w.haproxy_block(&World::haproxy_check(), Some(World::haproxy_reload(&h))),
            w.pgbouncer_block(Some(w.pgbouncer_reload())),
        ],
    );
    let d = Daemon::start(&cfg);

    let hap_id = file_id(&w.haproxy_cfg());
    let pgb_id = file_id(&w.pgbouncer_ini());
    let hap_bytes = std::fs::read(w.haproxy_cfg()).unwrap();
    let pgb_bytes = std::fs::read(w.pgbouncer_ini()).unwrap();
    let reloads = h.reload_count();
    let pid = p.pid();
    let hup_lines = p.log().matches("got SIGHUP").count();

    // Three Patroni heartbeat rounds: every member key rewritten with a new xlog_location.
    let mut rev = 0;
    for round in 1..=3u64 {
        for (i, m) in members.iter().enumerate() {
            let role = if i == 0 { "master" } else { "replica" };
            rev = w.put_member(&m.name, &member_json(m, role, 50_000_000 + round * 4096));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let pass = d.wait_pass(rev, Duration::from_secs(10));
    assert_eq!(
        pass["message"].as_str(),
        Some("pass: nothing changed"),
        "{pass}"
    );
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(file_id(&w.haproxy_cfg()), hap_id, "haproxy.cfg rewritten");
    assert_eq!(
        file_id(&w.pgbouncer_ini()),
        pgb_id,
        "pgbouncer.ini rewritten"
    );
    assert_eq!(std::fs::read(w.haproxy_cfg()).unwrap(), hap_bytes);
    assert_eq!(std::fs::read(w.pgbouncer_ini()).unwrap(), pgb_bytes);
    assert_eq!(h.reload_count(), reloads, "HAProxy reloaded on a heartbeat");
    assert_eq!(p.pid(), pid);
    assert!(p.proc().is_running());
    assert_eq!(
        p.log().matches("got SIGHUP").count(),
        hup_lines,
        "PgBouncer got a SIGHUP on a heartbeat; log:\n{}",
        p.log()
    );
    let log = d.log();
    assert!(
        !log.contains("\"file updated\"") && !log.contains("\"reloaded\""),
        "haconfd wrote or reloaded on a heartbeat:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A failing check
// ---------------------------------------------------------------------------------------------

#[test]
fn failing_check_keeps_the_old_file_sends_no_signal_and_logs_its_stderr() {
    let w = World::new("check");
    let a = FakeMember::start("pga", Role::Primary);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);

    // The real check, except that a staged file listing a member named "doomed" is refused
    // with a two-line message on stderr.
    let script = "if grep -q 'server doomed ' \"$1\"; then \
                  printf 'boom: refusing member doomed\\n  second line, verbatim\\n' >&2; exit 1; fi; \
                  exec haproxy -c -f \"$1\"";
    let check = ["sh", "-c", script, "check", "{{staged}}"];
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "500ms")];
    // Member changes by reload: with the runtime API, see
    // `a_member_change_whose_file_fails_its_check_is_undone_by_one_reload_onto_the_last_good_file`.
    let cfg = w.write_config(daemon_cfg, &[w.haproxy_block_via(&check, None, "reload")]);
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block_via(&check, Some(World::haproxy_reload(&h)), "reload")],
    );
    let d = Daemon::start(&cfg);

    let old = std::fs::read(w.haproxy_cfg()).unwrap();
    let old_id = file_id(&w.haproxy_cfg());
    let reloads = h.reload_count();

    let doomed = FakeMember::start("doomed", Role::Replica);
    let rev = w.put_member(&doomed.name, &doomed.member_json("replica"));
    let pass = d.wait_pass(rev, Duration::from_secs(10));
    assert_eq!(pass["reason"].as_str(), Some("check"), "{pass}");
    // It keeps failing on retries, and keeps refusing.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(d.proc.is_running(), "haconfd exited; log:\n{}", d.log());

    assert_eq!(
        std::fs::read(w.haproxy_cfg()).unwrap(),
        old,
        "old file replaced"
    );
    assert_eq!(file_id(&w.haproxy_cfg()), old_id);
    assert_eq!(h.reload_count(), reloads, "HAProxy was signalled");
    assert_eq!(h.failed_reloads(), 0);
    let msgs = d.messages();
    assert!(
        msgs.contains("boom: refusing member doomed\n  second line, verbatim"),
        "the check's stderr is not in haconfd's log verbatim:\n{}",
        d.log()
    );
    let failures = d
        .events()
        .iter()
        .filter(|e| e["reason"].as_str() == Some("check"))
        .count();
    assert!(
        failures >= 2,
        "the failed pass was not retried:\n{}",
        d.log()
    );
    // No staged leftovers next to the destination.
    let leftovers: Vec<_> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".haconfd-") && n.starts_with(".haproxy.cfg"))
        .collect();
    assert!(leftovers.is_empty(), "staged files left: {leftovers:?}");
}

/// A member change reaches HAProxy through its runtime API while its file is checked. When the
/// check then refuses the file, HAProxy is reloaded once onto the last good file (which stays in
/// place) and runs exactly that again; the retries check first and send nothing.
#[test]
fn a_member_change_whose_file_fails_its_check_is_undone_by_one_reload_onto_the_last_good_file() {
    let w = World::new("checkrt");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);
    let script =
        "if grep -q 'server doomed ' \"$1\"; then echo 'refusing doomed' >&2; exit 1; fi; \
                  exec haproxy -c -f \"$1\"";
    let check = ["sh", "-c", script, "check", "{{staged}}"];
    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "300ms")];
    let cfg = w.write_config(daemon_cfg, &[w.haproxy_block(&check, None)]);
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block(&check, Some(World::haproxy_reload(&h)))],
    );
    let d = Daemon::start(&cfg);
    let old = std::fs::read(w.haproxy_cfg()).unwrap();
    let reloads = h.reload_count();

    let doomed = FakeMember::start("doomed", Role::Replica);
    let rev = w.put_member(&doomed.name, &doomed.member_json("replica"));
    let pass = d.wait_pass(rev, Duration::from_secs(10));
    assert_eq!(pass["reason"].as_str(), Some("check"), "{pass}");
    assert!(
        h.wait_reloads(reloads + 1, Duration::from_secs(5)),
        "HAProxy was not put back onto the last good file:\n{}",
        d.log()
    );
    // Retries meanwhile (every 300 ms) check first: no more reloads.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(h.reload_count(), reloads + 1, "{}", d.log());
    assert_eq!(h.failed_reloads(), 0);
    assert_eq!(
        std::fs::read(w.haproxy_cfg()).unwrap(),
        old,
        "old file replaced"
    );
    let text = read(&w.haproxy_cfg());
    assert!(
        wait_until(Duration::from_secs(5), || {
            ["primary", "replicas"]
                .iter()
                .all(|l| live_servers(&w, l) == file_servers(&text, l))
        }),
        "HAProxy does not run the last good file:\n{}",
        d.log()
    );
    assert!(
        d.messages()
            .contains("HAProxy took a member change whose file then failed its check"),
        "{}",
        d.log()
    );
    // A member change that passes goes through the runtime API again.
    drop(doomed);
    w.etcd().delete(&w.key("members/doomed"));
    let c = FakeMember::start("pgc", Role::Replica);
    let rev = w.put_member(&c.name, &c.member_json("replica"));
    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || live_servers(&w, "replicas")
            .iter()
            .any(|s| s.starts_with("pgc "))),
        "{}",
        d.log()
    );
    assert_eq!(h.reload_count(), reloads + 1, "{}", d.log());
}

/// A Patroni standby cluster: the leader key's holder has role `standby_leader` and takes no
/// writes. `once` does not report success for the PgBouncer file it could not point at a
/// primary (it said "up to date" and exited 0), no server takes writes in HAProxy's state, and
/// `run` neither probes it for writes nor warns about drift. The standby leader serves reads
/// with the replica. Promoted (`standby_cluster` gone from the `config` key), it takes writes
/// through the fast path as soon as its REST API says PostgreSQL does, with no config edit, and
/// PgBouncer follows; demoted again, it leaves the write port and serves reads.
#[test]
fn a_standby_cluster_reads_from_its_leader_follows_promotion_and_demotion_and_once_says_what_it_did_not_write(
) {
    let w = World::new("standby");
    let a = FakeMember::start("pga", Role::StandbyLeader);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("standby_leader"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);
    let fast = |c: ConfigBuilder| {
        c.failover("drift_interval", "100ms")
            .failover("drift_grace", "100ms")
    };
    let blocks = [
        w.haproxy_block(&World::haproxy_check(), None),
        w.pgbouncer_block(None),
    ];
    let cfg = w.write_config_with(&[], &blocks, fast);
    let out = w.haconfd(&cfg, &["once", "--no-reload"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("pgbouncer not written") && err.contains("standby_leader"),
        "{err}"
    );
    assert!(!w.pgbouncer_ini().exists(), "pgbouncer.ini written");
    // With `standby_leader = "follow"`, the PgBouncer file points at the standby leader once
    // it answers /standby-leader (a read-only pool at a disaster-recovery site).
    let follow = [
        w.haproxy_block(&World::haproxy_check(), None),
        w.pgbouncer_block(None).set("standby_leader", "follow"),
    ];
    let follow_cfg = w.write_config_with(&[], &follow, fast);
    let out = w.haconfd(&follow_cfg, &["once", "--no-reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        read(&w.pgbouncer_ini()).contains(&format!("port={}", a.port())),
        "{}",
        read(&w.pgbouncer_ini())
    );
    std::fs::remove_file(w.pgbouncer_ini()).unwrap();
    // haproxy.cfg is written, and its state file starts the standby leader DOWN where writes
    // go.
    assert!(w.haproxy_cfg().exists());
    let state = read(&w.server_state());
    assert!(
        state
            .lines()
            .any(|l| l.starts_with("0 primary 0 pga 127.0.0.1 0 ")),
        "{state}"
    );

    let h = start_haproxy(&w);
    let blocks = [
        w.haproxy_block(&World::haproxy_check(), Some(World::haproxy_reload(&h))),
        w.pgbouncer_block(None),
    ];
    let cfg = w.write_config_with(&[("retry_interval", "300ms")], &blocks, fast);
    let d = Daemon::start(&cfg);
    std::thread::sleep(Duration::from_millis(1500));
    let msgs = d.messages();
    assert_eq!(
        msgs.matches("the leader is a standby leader").count(),
        1,
        "{}",
        d.log()
    );
    for noise in [
        "did not confirm it takes writes",
        "disagree with etcd's leader",
    ] {
        assert!(!msgs.contains(noise), "{noise}:\n{}", d.log());
    }
    assert_eq!(
        common::procs::server_state(&w.admin_sock(), "primary", "pga").map(|s| s.0),
        Some(0),
        "the standby leader is UP where writes go"
    );
    // It serves reads with the replica (the read port checks /read-only).
    wait_banner(w.replica_port, "pga", Duration::from_secs(5)).unwrap();
    wait_banner(w.replica_port, "pgb", Duration::from_secs(5)).unwrap();

    // Promotion: Patroni's config key loses `standby_cluster` first; PostgreSQL leaves recovery
    // a moment later; the member key follows at Patroni's next loop. Writes go to pga once its
    // REST API says it takes them.
    a.set_role(Role::Promoting);
    w.etcd()
        .put(&w.key("config"), r#"{"ttl":30,"loop_wait":10}"#);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !d.messages().contains("the new primary takes writes"),
        "pga confirmed before PostgreSQL left recovery:\n{}",
        d.log()
    );
    let t0 = Instant::now();
    a.set_role(Role::Primary);
    wait_banner(w.primary_port, "pga", Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("writes did not reach the promoted pga: {e}\n{}", d.log()));
    assert!(
        wait_until(Duration::from_secs(2), || d
            .messages()
            .contains("the new primary takes writes")),
        "the promoted leader was not confirmed:\n{}",
        d.log()
    );
    println!(
        "RESULT standby promotion: pga confirmed within {:?} of taking writes",
        t0.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(5), || w.pgbouncer_ini().exists()
            && read(&w.pgbouncer_ini()).contains(&a.port().to_string())),
        "PgBouncer was not pointed at the promoted leader:\n{}",
        d.log()
    );

    // Demotion: `standby_cluster` back in the config key; pga restarts as a standby leader.
    w.etcd().put(
        &w.key("config"),
        r#"{"ttl":30,"loop_wait":10,"standby_cluster":{"host":"10.0.0.1","port":5432}}"#,
    );
    a.set_role(Role::StandbyLeader);
    assert!(
        wait_until(Duration::from_secs(2), || {
            common::procs::server_state(&w.admin_sock(), "primary", "pga").is_some_and(|s| s.0 == 0)
        }),
        "the demoted leader still takes writes:\n{}",
        d.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || d
            .messages()
            .contains("the cluster became a standby cluster")),
        "{}",
        d.log()
    );
    wait_banner(w.replica_port, "pga", Duration::from_secs(5)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. A pidfile naming another program
// ---------------------------------------------------------------------------------------------

#[test]
fn pidfile_of_another_process_is_refused_in_once_and_run() {
    let w = World::new("pidfile");
    let a = FakeMember::start("pga", Role::Primary);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);

    let sleeper = Proc::spawn("sleep", command("sleep", &["300"]));
    let spid = sleeper.pid();
    let pidfile = w.path("haproxy.pid");
    write(&pidfile, &format!("{spid}\n"));
    // SIGUSR2's default action kills `sleep`: a wrongly sent signal would show.
    let reload = Reload::signal(&pidfile, "SIGUSR2", "haproxy");
    let cfg = w.write_config(
        &[("min_interval", "100ms"), ("retry_interval", "300ms")],
        &[w.haproxy_block(&World::haproxy_check(), Some(reload))],
    );

    // once: the file is written, the reload refused, exit 8.
    let out = w.haconfd(&cfg, &["once"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(8), "stderr:\n{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("haconfd: "))
        .unwrap_or_else(|| panic!("no `haconfd:` reason line:\n{err}"));
    assert!(
        line.contains(&spid.to_string()) && line.contains(&pidfile.display().to_string()),
        "reason does not name the PID and the pidfile: {line}"
    );
    assert!(w.haproxy_cfg().exists());
    std::thread::sleep(Duration::from_millis(100));
    assert!(sleeper.is_running(), "the foreign process was signalled");

    // run: the file is written, the reload refused and logged, the daemon keeps running and
    // the foreign process is never signalled.
    std::fs::remove_file(w.haproxy_cfg()).unwrap();
    let d = Daemon::start(&cfg);
    let msgs = || d.messages();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = msgs();
            m.contains(&format!("PID {spid} from {}", pidfile.display()))
                && m.contains("refusing to signal it")
        }),
        "haconfd run did not name the PID and pidfile; log:\n{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(d.proc.is_running(), "haconfd exited; log:\n{}", d.log());
    assert!(sleeper.is_running(), "the foreign process was signalled");
    assert!(pid_alive(spid));
}

/// README: "retry_interval: a failed pass (check, write, reload) is retried this often". A reload
/// refused after the file was swapped in must be retried once the pidfile is right again, or
/// HAProxy keeps serving the old config while the file on disk says otherwise.
#[test]
fn refused_reload_is_retried_once_the_pidfile_is_fixed() {
    let w = World::new("retry");
    let a = FakeMember::start("pga", Role::Primary);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);

    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "100ms"), ("retry_interval", "300ms")];
    // Member changes reloaded (not taken through the runtime API), to keep this about the retry.
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block_via(&World::haproxy_check(), None, "reload")],
    );
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let sleeper = Proc::spawn("sleep", command("sleep", &["300"]));
    let pidfile = w.path("haproxy.pid");
    write(&pidfile, &format!("{}\n", sleeper.pid()));
    // Signal only (no master socket), to keep this about the retry.
    let reload = Reload::signal(&pidfile, "SIGUSR2", "haproxy");
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block_via(&World::haproxy_check(), Some(reload), "reload")],
    );
    let d = Daemon::start(&cfg);
    let before = h.reload_count();

    let b = FakeMember::start("pgb", Role::Replica);
    let rev = w.put_member(&b.name, &b.member_json("replica"));
    let pass = d.wait_pass(rev, Duration::from_secs(10));
    assert_eq!(pass["reason"].as_str(), Some("reload"), "{pass}");
    assert!(lists_server_in_both(
        &read(&w.haproxy_cfg()),
        &b.name,
        b.port()
    ));
    assert!(sleeper.is_running());
    assert_eq!(h.reload_count(), before);

    // The operator fixes the pidfile; the next retry must reload HAProxy.
    write(&pidfile, &format!("{}\n", h.pid()));
    let reloaded = h.wait_reloads(before + 1, Duration::from_secs(5));
    assert!(
        reloaded,
        "HAProxy was never reloaded after the pidfile was fixed: it still serves the old \
         config although {} lists {}; haconfd log:\n{}",
        w.haproxy_cfg().display(),
        b.name,
        d.log()
    );
    wait_banner(w.replica_port, &b.name, Duration::from_secs(5)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. `once` exit codes
// ---------------------------------------------------------------------------------------------

#[test]
fn once_exit_codes_applied_up_to_date_unreachable_guard_no_leader_bad_config() {
    let w = World::new("once");
    let a = FakeMember::start("pga", Role::Primary);
    let b = FakeMember::start("pgb", Role::Replica);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_member(&b.name, &b.member_json("replica"));
    w.put_leader(&a.name);
    let blocks = [
        w.haproxy_block(&World::haproxy_check(), None),
        w.pgbouncer_block(None),
    ];
    let cfg = w.write_config(&[("once_timeout", "1s")], &blocks);

    // 0: applied.
    let out = w.once_ok(&cfg, &[]);
    assert!(stderr_of(&out).contains("applied"), "{}", stderr_of(&out));
    let hap = std::fs::read(w.haproxy_cfg()).unwrap();
    let pgb = std::fs::read(w.pgbouncer_ini()).unwrap();
    assert!(lists_server_in_both(
        &String::from_utf8_lossy(&hap),
        &b.name,
        b.port()
    ));
    let ids = (file_id(&w.haproxy_cfg()), file_id(&w.pgbouncer_ini()));
    std::thread::sleep(Duration::from_millis(20));

    // 0 again: up to date, nothing written.
    let out = w.once_ok(&cfg, &[]);
    assert!(
        stderr_of(&out).contains("up to date"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(
        (file_id(&w.haproxy_cfg()), file_id(&w.pgbouncer_ini())),
        ids,
        "an up-to-date once rewrote a file"
    );

    // 5: no leader (pgbouncer requires one): nothing is touched.
    w.etcd().delete(&w.key("leader"));
    let out = w.haconfd(&cfg, &["once"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("leader"),
        "reason does not mention the leader:\n{}",
        stderr_of(&out)
    );
    assert_eq!(std::fs::read(w.pgbouncer_ini()).unwrap(), pgb);
    assert_eq!(std::fs::read(w.haproxy_cfg()).unwrap(), hap);
    assert_eq!(
        (file_id(&w.haproxy_cfg()), file_id(&w.pgbouncer_ini())),
        ids
    );

    // 4: no members at all (the guard): nothing is touched.
    w.etcd().delete_prefix(&w.key("members/"));
    w.put_leader(&a.name);
    let out = w.haconfd(&cfg, &["once"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("min_members"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(std::fs::read(w.haproxy_cfg()).unwrap(), hap);
    assert_eq!(std::fs::read(w.pgbouncer_ini()).unwrap(), pgb);
    assert_eq!(
        (file_id(&w.haproxy_cfg()), file_id(&w.pgbouncer_ini())),
        ids
    );

    // 3: etcd unreachable (a closed port), within once_timeout plus a little.
    let closed = free_port();
    let w3 = World::with_endpoint("once3", format!("http://127.0.0.1:{closed}"));
    let cfg3 = w3.write_config(
        &[("once_timeout", "1s")],
        &[w3.haproxy_block(&World::haproxy_check(), None)],
    );
    let started = Instant::now();
    let out = w3.haconfd(&cfg3, &["once"]);
    let took = started.elapsed();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let reason: Vec<&str> = err.lines().filter(|l| l.starts_with("haconfd: ")).collect();
    assert_eq!(reason.len(), 1, "want one reason line:\n{err}");
    assert!(
        reason[0].contains(&format!("127.0.0.1:{closed}")),
        "reason does not name the endpoint: {}",
        reason[0]
    );
    assert!(!w3.haproxy_cfg().exists());

    // 2: a bad config (unknown key) names the file and the line.
    let bad = w
        .config()
        .daemon("min_intervall", "1s")
        .write(w.path("bad.toml"));
    let out = haconfd_cmd(&bad, &["once"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("line 6"),
        "message does not name the file and line 6:\n{err}"
    );
    assert!(err.contains("min_intervall"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 7. render --snapshot
// ---------------------------------------------------------------------------------------------

#[test]
fn render_snapshot_prints_to_stdout_writes_nothing_and_reports_errors() {
    let w = World::new("render");
    // The golden tests' settings, with this test's paths for the socket and state file.
    let admin = w.path("run/admin.sock");
    let state = w.path("lib/server-state");
    let cfg = golden_config(
        &manifest_dir().join("templates"),
        &admin,
        &state,
        &w.haproxy_cfg(),
        &w.pgbouncer_ini(),
    )
    .write(w.path("haconfd.toml"));
    let golden = |name: &str| {
        read(&manifest_dir().join("tests/golden").join(name))
            .replace("/run/haproxy/admin.sock", &admin.display().to_string())
            .replace(
                "/var/lib/haproxy/server-state",
                &state.display().to_string(),
            )
    };
    let fixture = |name: &str| manifest_dir().join("tests/fixtures").join(name);
    let entries_before: Vec<_> = std::fs::read_dir(w.dir.path()).unwrap().flatten().collect();

    for (fx, hap_golden, pgb_golden, leader) in [
        (
            "patroni4-kv.json",
            "patroni4-haproxy.cfg",
            "patroni4-pgbouncer.ini",
            "pg2",
        ),
        ("patroni3-etcdctl.json", "patroni3-haproxy.cfg", "", "pg1"),
    ] {
        let snap = fixture(fx).display().to_string();
        // Only haproxy.
        let out = haconfd_cmd(
            &cfg,
            &["render", "--snapshot", &snap, "--template", "haproxy"],
        );
        assert_eq!(out.status.code(), Some(0), "{fx}: {}", stderr_of(&out));
        let hap = stdout_of(&out);
        assert_eq!(hap, golden(hap_golden), "{fx}: haproxy.cfg");
        for port in [5441, 5442, 5443] {
            let name = format!("pg{}", port - 5440);
            assert!(lists_server_in_both(&hap, &name, port), "{fx}: {name}");
        }

        // Only pgbouncer.
        let out = haconfd_cmd(
            &cfg,
            &["render", "--snapshot", &snap, "--template", "pgbouncer"],
        );
        assert_eq!(out.status.code(), Some(0), "{fx}: {}", stderr_of(&out));
        let pgb = stdout_of(&out);
        let leader_port = 5440 + leader[2..].parse::<u16>().unwrap();
        assert!(
            pgb.contains(&format!("* = host=127.0.0.1 port={leader_port}\n"))
                && pgb.contains(&format!("; Leader: {leader}\n")),
            "{fx}: {pgb}"
        );
        assert!(
            !pgb.contains("listen ") && !pgb.contains("==>"),
            "{fx}: {pgb}"
        );
        if !pgb_golden.is_empty() {
            assert_eq!(pgb, golden(pgb_golden), "{fx}: pgbouncer.ini");
        }

        // Both, each under a header.
        let out = haconfd_cmd(&cfg, &["render", "--snapshot", &snap]);
        assert_eq!(out.status.code(), Some(0), "{fx}: {}", stderr_of(&out));
        assert_eq!(
            stdout_of(&out),
            format!("==> haproxy <==\n{hap}==> pgbouncer <==\n{pgb}"),
            "{fx}"
        );

        // The context, as JSON.
        let out = haconfd_cmd(
            &cfg,
            &[
                "render",
                "--snapshot",
                &snap,
                "--context",
                "--template",
                "pgbouncer",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{fx}: {}", stderr_of(&out));
        let ctx: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{fx}: --context is not JSON: {e}\n{}", stdout_of(&out)));
        assert_eq!(ctx["leader"]["name"], leader, "{fx}: {ctx}");
        assert_eq!(ctx["scope"], "demo");
        assert_eq!(ctx["members"].as_array().map(|m| m.len()), Some(3));
        let out = haconfd_cmd(&cfg, &["render", "--snapshot", &snap, "--context"]);
        assert_eq!(out.status.code(), Some(0), "{fx}: {}", stderr_of(&out));
        let ctx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ctx["haproxy"]["leader"]["name"], leader, "{fx}: {ctx}");
    }

    // An unknown template: exit 2, named.
    let snap = fixture("patroni4-kv.json").display().to_string();
    let out = haconfd_cmd(
        &cfg,
        &["render", "--snapshot", &snap, "--template", "nginx"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("nginx"), "{}", stderr_of(&out));
    assert!(out.stdout.is_empty());

    // A malformed snapshot: exit 2, naming the file and the line.
    let bad = w.path("bad-snapshot.json");
    write(
        &bad,
        "{\n  \"/service/demo/leader\": \"pg1\",\n  \"/service/demo/members/pg1\": oops\n}\n",
    );
    let out = haconfd_cmd(&cfg, &["render", "--snapshot", &bad.display().to_string()]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("line 3"),
        "message does not name the file and line 3:\n{err}"
    );
    assert!(out.stdout.is_empty());

    // Nothing was written anywhere: no destination, no state file, no socket dir.
    assert!(!w.haproxy_cfg().exists());
    assert!(!w.pgbouncer_ini().exists());
    assert!(!state.exists() && !state.parent().unwrap().exists());
    let entries_after: Vec<_> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries_after.len(),
        entries_before.len() + 1, // bad-snapshot.json
        "render created files: {entries_after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Coalescing
// ---------------------------------------------------------------------------------------------

#[test]
fn burst_of_30_changes_gives_at_most_3_passes_no_reload_and_the_final_state() {
    let w = World::new("burst");
    let a = FakeMember::start("pga", Role::Primary);
    w.put_member(&a.name, &a.member_json("master"));
    w.put_leader(&a.name);

    let daemon_cfg: &[(&str, &str)] = &[("min_interval", "500ms"), ("retry_interval", "1s")];
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block(&World::haproxy_check(), None)],
    );
    w.once_ok(&cfg, &["--no-reload"]);
    let h = start_haproxy(&w);
    let cfg = w.write_config(
        daemon_cfg,
        &[w.haproxy_block(&World::haproxy_check(), Some(World::haproxy_reload(&h)))],
    );
    let d = Daemon::start(&cfg);
    let before = h.reload_count();

    // 30 members join one by one, 10 ms apart. Nobody listens on their ports.
    let base_port = 20000 + (std::process::id() % 1000) as u16 * 30;
    let started = Instant::now();
    let mut rev = 0;
    for i in 0..30u16 {
        rev = w.put_member(
            &format!("burst{i:02}"),
            &paper_member_json(base_port + i, 1, "replica"),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let burst = started.elapsed();

    d.wait_pass(rev, Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || {
            let text = read(&w.haproxy_cfg());
            (0..30u16).all(|i| lists_server_in_both(&text, &format!("burst{i:02}"), base_port + i))
        }),
        "final state not rendered:\n{}",
        read(&w.haproxy_cfg())
    );
    let text = read(&w.haproxy_cfg());
    assert_eq!(servers_in(&text, "primary").len(), 31, "{text}");
    assert_eq!(servers_in(&text, "replicas").len(), 31, "{text}");
    // Let any pass still due run, then count.
    std::thread::sleep(Duration::from_millis(900));
    let status = h.proc_status();
    let reloads = status.reloads() - before;
    let applied = d
        .events()
        .iter()
        .filter(|e| e["message"].as_str() == Some("pass applied"))
        .count();
    eprintln!(
        "burst of 30 puts took {burst:?}: {reloads} HAProxy reload(s), {applied} applied pass(es)"
    );
    assert!(
        (1..=3).contains(&applied),
        "{applied} applied passes for 30 changes in {burst:?}; log:\n{}",
        d.log()
    );
    // Members only: HAProxy takes them through its runtime API.
    assert_eq!(reloads, 0, "log:\n{}", d.log());
    for listen in ["primary", "replicas"] {
        assert_eq!(
            live_servers(&w, listen),
            file_servers(&text, listen),
            "{}",
            d.log()
        );
    }
    assert_eq!(status.failed, 0);
    assert!(h.is_running());
}
