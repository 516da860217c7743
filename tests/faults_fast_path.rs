//! The failover fast path's faults. A real etcd, HAProxy (the shipped template, health checks
//! every 60 s so that every move seen is haconfd's), PgBouncer (the shipped template, paused and
//! resumed through its console) and one PostgreSQL that answers for every member on the member's
//! own loopback address (`inet_server_addr()` tells which member a client reached), with each
//! member's Patroni REST API scripted by the test. haconfd is stopped or killed at each step of a
//! switchover and started again; a switchover request nothing follows, a leader key that flaps,
//! odd member data and a stats socket below `level admin` must never leave writes blocked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::config::{ConfigBuilder, Reload, Template};
use common::procs::{
    free_port, give_to_postgres, haconfd_bin, haconfd_once_no_reload, http_get, pgbouncer_run_dir,
    remove_at_exit, require_bin, run_with_timeout, temp_dir, unique_name, unix_cmd, wait_until,
    Etcd, Haproxy, HealthEndpoint, Pgbouncer, Postgres, Proc, Role,
};
use nix::sys::signal::Signal;

/// One PostgreSQL for the whole binary, listening on the members' addresses.
fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Postgres::start_on(&["127.0.0.1", "127.0.0.11", "127.0.0.12", "127.0.0.13"]);
        remove_at_exit(pg.data_dir().parent().unwrap());
        pg
    })
}

/// A member: its address on the shared PostgreSQL, and its scripted REST API.
struct Member {
    name: &'static str,
    addr: &'static str,
    api: HealthEndpoint,
}

impl Member {
    fn json(&self, role: &str) -> String {
        self.json_with(role, serde_json::json!({}))
    }

    fn json_with(&self, role: &str, tags: serde_json::Value) -> String {
        serde_json::json!({
            "conn_url": format!("postgres://{}:{}/postgres", self.addr, postgres().port()),
            "api_url": format!("http://127.0.0.1:{}/patroni", self.api.port()),
            "state": "running",
            "role": role,
            "version": "4.1.5",
            "xlog_location": 50331816u64,
            "timeline": 1,
            "tags": tags,
        })
        .to_string()
    }
}

const UP: u8 = 2;
const DOWN: u8 = 0;
const READY: u32 = 0;
const DRAIN: u32 = 8;
const MAINT: u32 = 1;

/// What a [`Rig`] is built with.
#[derive(Clone)]
struct Setup {
    /// `[failover]` settings.
    failover: Vec<(&'static str, &'static str)>,
    /// The PgBouncer target's check command (to hold a pass in its check).
    pgb_check: Option<Vec<String>>,
    /// The stats socket's level in haproxy.cfg (the shipped template says `admin`).
    socket_level: &'static str,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            failover: vec![("confirm_interval", "10ms")],
            pgb_check: None,
            socket_level: "admin",
        }
    }
}

/// etcd keys of one scope, HAProxy and PgBouncer on haconfd's files, and haconfd itself.
struct Rig {
    prefix: String,
    members: Vec<Member>,
    setup: Setup,
    dir: tempfile::TempDir,
    config: PathBuf,
    tpl_dir: PathBuf,
    admin_sock: PathBuf,
    primary_port: u16,
    replica_port: u16,
    stats_port: u16,
    pgb_port: u16,
    pgb_dir: PathBuf,
    http_port: u16,
    log: PathBuf,
    haproxy: Option<Haproxy>,
    pgbouncer: Option<Pgbouncer>,
    haconfd: Option<Proc>,
}

impl Rig {
    /// pg1 the leader (REST `/primary` writable), pg2 a replica; both files rendered, HAProxy
    /// and PgBouncer started on them, then `haconfd run`.
    fn start(tag: &str, setup: Setup) -> Rig {
        require_bin("haproxy");
        require_bin("pgbouncer");
        let pg = postgres();
        let etcd = Etcd::shared();
        let prefix = format!("/service/{}/", unique_name(tag));
        let members = vec![
            Member {
                name: "pg1",
                addr: "127.0.0.11",
                api: HealthEndpoint::start(Role::Primary),
            },
            Member {
                name: "pg2",
                addr: "127.0.0.12",
                api: HealthEndpoint::start(Role::Replica),
            },
        ];
        etcd.put(&format!("{prefix}members/pg1"), &members[0].json("primary"));
        etcd.put(&format!("{prefix}members/pg2"), &members[1].json("replica"));
        etcd.put(&format!("{prefix}leader"), "pg1");
        let _ = pg;
        let dir = temp_dir(tag);
        let d = dir.path().to_path_buf();
        let tpl_dir = d.join("tpl");
        std::fs::create_dir(&tpl_dir).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let haproxy_tpl = std::fs::read_to_string(shipped.join("haproxy.cfg.tera")).unwrap();
        std::fs::write(
            tpl_dir.join("haproxy.cfg.tera"),
            haproxy_tpl.replace("level admin", &format!("level {}", setup.socket_level)),
        )
        .unwrap();
        std::fs::copy(
            shipped.join("pgbouncer.ini.tera"),
            tpl_dir.join("pgbouncer.ini.tera"),
        )
        .unwrap();
        let pgb_dir = pgbouncer_run_dir(&d);
        let mut rig = Rig {
            prefix,
            members,
            setup,
            config: d.join("haconfd.toml"),
            tpl_dir,
            admin_sock: d.join("admin.sock"),
            primary_port: free_port(),
            replica_port: free_port(),
            stats_port: free_port(),
            pgb_port: free_port(),
            pgb_dir,
            http_port: free_port(),
            log: d.join("haconfd.log"),
            dir,
            haproxy: None,
            pgbouncer: None,
            haconfd: None,
        };
        rig.write_config();
        haconfd_once_no_reload(&rig.config);
        rig.haproxy = Some(Haproxy::start(&d.join("haproxy.cfg")));
        give_to_postgres(&rig.pgb_dir);
        rig.pgbouncer = Some(Pgbouncer::start(&d.join("pgbouncer.ini")));
        rig.write_config();
        rig.run();
        rig
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let scope = self
            .prefix
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap();
        let haproxy_bin = require_bin("haproxy").display().to_string();
        let mut haproxy = Template::new(
            "haproxy",
            self.tpl_dir.join("haproxy.cfg.tera"),
            d.join("haproxy.cfg"),
        )
        .check([haproxy_bin.as_str(), "-c", "-f", "{{staged}}"])
        .server_state(&self.admin_sock, d.join("server-state"));
        if let Some(h) = &self.haproxy {
            haproxy = haproxy.reload(Reload::master_socket(h.master_socket()).timeout("10s"));
        }
        let mut pgbouncer = Template::new(
            "pgbouncer",
            self.tpl_dir.join("pgbouncer.ini.tera"),
            d.join("pgbouncer.ini"),
        )
        .require_leader(true)
        .pgbouncer_admin(&self.pgb_dir, self.pgb_port, "pgbouncer", Some("15s"))
        .pgbouncer_test_vars(&self.pgb_dir, self.pgb_port);
        if self.pgbouncer.is_some() {
            let pidfile = self.pgb_dir.join("pgbouncer.pid");
            pgbouncer = pgbouncer.reload(Reload::signal(pidfile, "SIGHUP", "pgbouncer"));
        }
        if let (Some(argv), true) = (&self.setup.pgb_check, self.pgbouncer.is_some()) {
            pgbouncer = pgbouncer.check(argv.iter().map(String::as_str));
        }
        let mut b = ConfigBuilder::new()
            .endpoint(Etcd::shared().endpoint())
            .scope(scope)
            .daemon("min_interval", "50ms")
            .daemon("retry_interval", "1s")
            .with_table("failover")
            .http_listen(format!("127.0.0.1:{}", self.http_port))
            .var("bind_address", "127.0.0.1")
            .var("primary_port", self.primary_port)
            .var("replica_port", self.replica_port)
            .var("stats_port", self.stats_port)
            .var("stats_socket", &self.admin_sock)
            .var("check_inter", "60s");
        for (k, v) in &self.setup.failover {
            b = b.failover(k, *v);
        }
        b.template(haproxy)
            .template(pgbouncer)
            .write_atomic(&self.config);
    }

    /// Starts `haconfd run` (logging to the same file across restarts) and waits until its first
    /// pass has run.
    fn run(&mut self) {
        let before = self.log_text().matches("\"message\":\"pass").count();
        let mut cmd = Command::new(haconfd_bin());
        cmd.arg("-c").arg(&self.config).args([
            "run",
            "--log-format",
            "json",
            "--log-level",
            "haconfd=debug",
        ]);
        self.haconfd = Some(Proc::spawn_logged("haconfd", cmd, &self.log));
        assert!(
            wait_until(Duration::from_secs(10), || self
                .log_text()
                .matches("\"message\":\"pass")
                .count()
                > before),
            "haconfd ran no first pass:\n{}",
            self.diag()
        );
    }

    fn haconfd(&self) -> &Proc {
        self.haconfd.as_ref().expect("haconfd runs")
    }

    /// Stops haconfd with `sig` and waits for it to exit (SIGTERM and SIGINT: gracefully).
    fn stop_with(&mut self, sig: Signal) {
        let p = self.haconfd.take().expect("haconfd runs");
        p.signal(sig).expect("signal haconfd");
        assert!(
            p.wait_timeout(Duration::from_secs(10)).is_some(),
            "haconfd did not exit on {sig:?}:\n{}",
            self.diag()
        );
    }

    fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap()
    }

    fn put(&self, rel: &str, value: &str) {
        Etcd::shared().put(&format!("{}{rel}", self.prefix), value);
    }

    fn delete(&self, rel: &str) {
        Etcd::shared().delete(&format!("{}{rel}", self.prefix));
    }

    /// The switchover as Patroni makes it, once the old primary is down: the leader key to
    /// `new` (its REST API writable, its member key `primary`), the old one a replica.
    fn complete_switch(&self, old: &str, new: &str) {
        self.member(new).api.set_role(Role::Primary);
        self.member(old).api.set_role(Role::Replica);
        self.delete("leader");
        self.put("leader", new);
        self.put("failover", "{}");
        self.put(&format!("members/{new}"), &self.member(new).json("primary"));
        self.put(&format!("members/{old}"), &self.member(old).json("replica"));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (op state, admin state) of `backend/server`.
    fn server(&self, backend: &str, server: &str) -> Option<(u8, u32)> {
        let dump = unix_cmd(
            &self.admin_sock,
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

    fn admin(&self, cmd: &str) -> String {
        unix_cmd(&self.admin_sock, cmd, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    fn status(&self) -> serde_json::Value {
        let (_, body) = http_get(self.http_port, "/status").expect("/status");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    fn diag(&self) -> String {
        format!(
            "--- show servers state:\n{}\n--- pgbouncer log (tail):\n{}\n--- haconfd log:\n{}",
            unix_cmd(
                &self.admin_sock,
                "show servers state",
                Duration::from_secs(2)
            )
            .unwrap_or_default(),
            self.pgbouncer
                .as_ref()
                .map(|p| tail(&p.log(), 15))
                .unwrap_or_default(),
            self.log_text()
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(p) = self.haconfd.take() {
            p.kill();
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `SELECT inet_server_addr()` through 127.0.0.1:`port` on a fresh connection: the member the
/// client reached. Err with the client's error; Err("no answer") when it did not answer within
/// `within` (a paused PgBouncer holds the query).
fn reached(port: u16, within: Duration) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(3))
            .connect(postgres::NoTls)
            .and_then(|mut c| c.simple_query("SELECT host(inet_server_addr())"))
            .map_err(|e| e.to_string())
            .map(|msgs| {
                msgs.iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .unwrap_or_default()
            });
        let _ = tx.send(r);
    });
    rx.recv_timeout(within)
        .unwrap_or_else(|_| Err("no answer".to_owned()))
}

/// Waits (bounded) until a fresh connection through `port` reaches `addr`; returns how long.
fn wait_reach(port: u16, addr: &str, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = String::new();
    for _ in 0..400 {
        let left = within.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        match reached(port, left.min(Duration::from_millis(700))) {
            Ok(a) if a == addr => return Ok(t0.elapsed()),
            Ok(a) => last = format!("reached {a}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "no connection through :{port} reached {addr} within {within:?} (last: {last})"
    ))
}

impl Rig {
    /// Writes through HAProxy's primary port and through PgBouncer reach `leader` within
    /// `within` of now; nothing is drained in the primary backend, PgBouncer is not paused.
    fn assert_writes_reach(&self, leader: &str, within: Duration, when: &str) {
        let addr = self.member(leader).addr;
        let t0 = Instant::now();
        let hap = wait_reach(self.primary_port, addr, within);
        let pgb = wait_reach(self.pgb_port, addr, within.saturating_sub(t0.elapsed()));
        assert!(
            hap.is_ok() && pgb.is_ok(),
            "{when}: HAProxy {hap:?}, PgBouncer {pgb:?}\n{}",
            self.diag()
        );
        for m in &self.members {
            let s = self.server("primary", m.name);
            assert!(
                s.is_some_and(|(_, admin)| admin & DRAIN == 0),
                "{when}: {} is drained in the primary backend: {s:?}\n{}",
                m.name,
                self.diag()
            );
        }
        println!(
            "RESULT {when}: writes on {leader} through HAProxy after {:?}, through PgBouncer after {:?}",
            hap.unwrap(),
            pgb.unwrap()
        );
    }

    /// PgBouncer holds a query (paused): it does not answer within half a second.
    fn assert_pgbouncer_paused(&self, when: &str) {
        let r = reached(self.pgb_port, Duration::from_millis(500));
        assert_eq!(
            r,
            Err("no answer".to_owned()),
            "{when}: PgBouncer answered; not paused?\n{}",
            self.diag()
        );
    }

    fn wait_log(&self, needle: &str, within: Duration) {
        assert!(
            wait_until(within, || self.log_text().contains(needle)),
            "no {needle:?} in haconfd's log within {within:?}:\n{}",
            self.diag()
        );
    }

    fn wait_server(&self, backend: &str, server: &str, want: (u8, u32), within: Duration) {
        assert!(
            wait_until(within, || self.server(backend, server) == Some(want)),
            "{backend}/{server} is not {want:?} within {within:?}:\n{}",
            self.diag()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Stopped or killed in the middle of a switch
// ---------------------------------------------------------------------------------------------

/// SIGTERM and SIGINT after the fence and PAUSE: haconfd exits having resumed PgBouncer and
/// lifted the drain; nothing waits for a process that is gone.
#[test]
fn stopped_in_the_middle_of_a_switch_haconfd_resumes_pgbouncer_and_lifts_the_drain() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut rig = Rig::start(&format!("stop{sig:?}").to_lowercase(), Setup::default());
        rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
        rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
        rig.wait_log("PgBouncer paused", Duration::from_secs(3));
        rig.assert_pgbouncer_paused("after PAUSE");
        rig.stop_with(sig);
        // Nothing of haconfd runs now: what it held is undone already.
        assert_eq!(
            rig.server("primary", "pg1"),
            Some((UP, READY)),
            "{sig:?}: the drain outlived haconfd:\n{}",
            rig.diag()
        );
        let r = reached(rig.pgb_port, Duration::from_secs(2));
        assert_eq!(
            r.as_deref(),
            Ok("127.0.0.11"),
            "{sig:?}: PgBouncer still paused after haconfd exited:\n{}",
            rig.diag()
        );
    }
}

/// One step of a switchover at which haconfd is SIGKILLed.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The old primary drained.
    AfterFence,
    /// PgBouncer's PAUSE answered.
    AfterPause,
    /// The leader key on the candidate, whose REST API does not say writable yet.
    DuringConfirmation,
    /// HAProxy moved to the confirmed primary; PgBouncer still paused (its pass held in the
    /// check of pgbouncer.ini), so not re-pointed and not resumed.
    AfterHaproxyMove,
}

/// haconfd SIGKILLed at each step of a switchover, the switchover completed (or cancelled) by
/// Patroni meanwhile, haconfd started again: within a second of the restart, writes through
/// HAProxy and PgBouncer reach the leader, and nothing stays drained or paused.
#[test]
fn killed_at_each_step_of_a_switchover_a_restart_puts_writes_on_the_leader_within_a_second() {
    let cells = [
        (Step::AfterFence, false),
        (Step::AfterFence, true),
        (Step::AfterPause, true),
        (Step::DuringConfirmation, true),
        (Step::AfterHaproxyMove, true),
    ];
    for (step, completed) in cells {
        let when = format!(
            "{step:?}, switchover {}",
            if completed { "completed" } else { "cancelled" }
        );
        let mut setup = Setup::default();
        if matches!(step, Step::AfterHaproxyMove) {
            // Holds PgBouncer's pass in its check while HAProxy moves (in its own task).
            setup.pgb_check = Some(
                ["sh", "-c", "sleep 5; test -s \"$0\"", "{{staged}}"]
                    .map(String::from)
                    .to_vec(),
            );
        }
        let mut rig = Rig::start(&format!("kill{}", step as u8), setup);
        rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
        rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
        match step {
            Step::AfterFence => {}
            Step::AfterPause => {
                rig.wait_log("PgBouncer paused", Duration::from_secs(3));
                rig.assert_pgbouncer_paused(&when);
            }
            Step::DuringConfirmation => {
                rig.member("pg2").api.set_role(Role::Promoting);
                rig.delete("leader");
                rig.put("leader", "pg2");
                rig.wait_log("\"new\":\"pg2\"", Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(200));
            }
            Step::AfterHaproxyMove => {
                rig.complete_switch("pg1", "pg2");
                rig.wait_log("HAProxy follows the new primary", Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(300));
                rig.assert_pgbouncer_paused(&when);
                assert!(!rig.log_text().contains("PgBouncer follows the new primary"));
            }
        }
        rig.haconfd().kill();
        rig.haconfd = None;
        let leader = if completed {
            rig.complete_switch("pg1", "pg2");
            "pg2"
        } else {
            rig.delete("failover");
            "pg1"
        };
        // The restart's own config: nothing holds its first pass.
        rig.setup.pgb_check = None;
        rig.write_config();
        let t0 = Instant::now();
        rig.run();
        // Within a second of the restart: the first pass, the repair and the re-pointing.
        let left = Duration::from_secs(1).saturating_sub(t0.elapsed());
        rig.assert_writes_reach(leader, left, &when);
        let other = if leader == "pg1" { "pg2" } else { "pg1" };
        assert_eq!(
            rig.server("primary", other).map(|s| s.0),
            Some(DOWN),
            "{when}: {other} takes writes in HAProxy:\n{}",
            rig.diag()
        );
    }
}

/// At start, a drain in a primary backend is haconfd's (its fence never outlives it) and is
/// lifted; an operator's `maint` is left as it is, even on the leader.
#[test]
fn at_start_a_drain_left_on_the_leader_is_lifted_and_an_operators_maint_is_left_alone() {
    let mut rig = Rig::start("startrepair", Setup::default());
    rig.stop_with(Signal::SIGTERM);
    rig.admin("set server primary/pg1 state drain");
    rig.admin("set server primary/pg2 state maint");
    rig.admin("set server replicas/pg2 state drain");
    rig.run();
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rig.server("primary", "pg2").map(|s| s.1),
        Some(MAINT),
        "an operator's maint was lifted:\n{}",
        rig.diag()
    );
    assert_eq!(
        rig.server("replicas", "pg2").map(|s| s.1),
        Some(DRAIN),
        "a drain in a replica backend is an operator's:\n{}",
        rig.diag()
    );
    assert!(
        rig.log_text()
            .contains("HAProxy moved through the runtime API"),
        "{}",
        rig.diag()
    );
    // The leader in maintenance: its writes are blocked by the operator, not by haconfd.
    rig.admin("set server primary/pg2 state ready");
    rig.stop_with(Signal::SIGTERM);
    rig.admin("set server primary/pg1 state maint");
    rig.run();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.server("primary", "pg1").map(|s| s.1),
        Some(MAINT),
        "{}",
        rig.diag()
    );
    // PgBouncer paused by hand (or by a run killed mid-switch) is resumed at start.
    rig.stop_with(Signal::SIGTERM);
    rig.pgbouncer.as_ref().unwrap().admin_query("PAUSE");
    rig.assert_pgbouncer_paused("PAUSE by hand");
    rig.run();
    assert_eq!(
        reached(rig.pgb_port, Duration::from_secs(2)).as_deref(),
        Ok("127.0.0.11"),
        "PgBouncer left paused at start:\n{}",
        rig.diag()
    );
    assert!(
        rig.log_text().contains("PgBouncer was left paused"),
        "{}",
        rig.diag()
    );
}

// ---------------------------------------------------------------------------------------------
// Fences nobody follows, fences in a row
// ---------------------------------------------------------------------------------------------

/// A `failover` key no Patroni acts on (a hung leader Patroni, a hand-written key): the drain
/// and the pause end at `failover.fence_timeout`, `/status` shows the fence while it lasts, and a
/// scheduled switchover fences nothing before its leader key moves.
#[test]
fn a_switchover_request_nothing_follows_drains_and_pauses_only_until_fence_timeout() {
    let mut setup = Setup::default();
    setup.failover.push(("fence_timeout", "1500ms"));
    setup.failover.push(("drift_interval", "200ms"));
    setup.failover.push(("drift_grace", "300ms"));
    let rig = Rig::start("fencebound", setup);
    rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
    let t0 = Instant::now();
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
    let during = rig.status();
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(3));
    let lifted = t0.elapsed();
    assert!(
        lifted >= Duration::from_millis(1300) && lifted < Duration::from_millis(2800),
        "the drain lasted {lifted:?} with fence_timeout 1.5s:\n{}",
        rig.diag()
    );
    let fences = &during["fast_path"]["fences"];
    assert_eq!(fences[0]["server"], "pg1", "{during}");
    assert_eq!(fences[0]["why"], "switchover requested", "{during}");
    // The drift warning named haconfd's own fence, not the health checks.
    assert!(
        rig.log_text().contains("drained by haconfd's fence"),
        "{}",
        rig.diag()
    );
    assert_eq!(
        reached(rig.pgb_port, Duration::from_secs(2)).as_deref(),
        Ok("127.0.0.11"),
        "PgBouncer still paused after the fence ended:\n{}",
        rig.diag()
    );
    rig.wait_log(
        "was not acted on within failover.fence_timeout",
        Duration::from_secs(1),
    );
    assert!(
        rig.metrics()
            .contains("haconfd_failover_fences_expired_total 1"),
        "{}",
        rig.metrics()
    );
    assert_eq!(rig.status()["fast_path"]["fences"], serde_json::json!([]));
    // The key stays: nothing fences again until it changes.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rig.server("primary", "pg1"), Some((UP, READY)));

    // A scheduled switchover: no fence before its leader key moves.
    rig.put(
        "failover",
        r#"{"leader":"pg1","member":"pg2","scheduled_at":"2099-01-01T00:00:00+00:00"}"#,
    );
    rig.wait_log("scheduled switchover", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.server("primary", "pg1"),
        Some((UP, READY)),
        "a scheduled switchover fenced the leader:\n{}",
        rig.diag()
    );
}

/// A candidate takes the leader key and never confirms, the old leader takes it back (two
/// fences: the old leader's, then the candidate's), then a real move: no leader is ever left
/// drained; and the leader key flapping between two members at 20 Hz leaves the last one UP
/// and ready.
#[test]
fn fences_in_a_row_never_leave_the_leader_drained() {
    let rig = Rig::start("twofences", Setup::default());
    rig.member("pg2").api.set_role(Role::Promoting);
    rig.put("leader", "pg2");
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    rig.put("leader", "pg1");
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2));
    rig.assert_writes_reach("pg1", Duration::from_secs(2), "old leader back");

    rig.complete_switch("pg1", "pg2");
    rig.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(2));
    rig.assert_writes_reach("pg2", Duration::from_secs(2), "after the real move");

    // 60 flips at 20 Hz; pg1's REST API says replica, pg2's primary all along: every flip to
    // pg1 fences pg2, every flip to pg2 confirms it.
    for i in 0..60 {
        rig.put("leader", if i % 2 == 0 { "pg1" } else { "pg2" });
        std::thread::sleep(Duration::from_millis(50));
    }
    rig.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(3));
    rig.assert_writes_reach("pg2", Duration::from_secs(2), "after 60 flips");
}

// ---------------------------------------------------------------------------------------------
// Odd member data, refused moves
// ---------------------------------------------------------------------------------------------

/// Patroni accepts any tag value: `zone = "eu-west/1a"` and `owner = "team db"` on the leader's
/// key keep it the leader: no fence, no pause, and it stays in haproxy.cfg.
#[test]
fn odd_tag_values_on_the_leader_fence_nothing_and_drop_no_member() {
    let rig = Rig::start("oddtags", Setup::default());
    rig.put(
        "members/pg1",
        &rig.member("pg1").json_with(
            "primary",
            serde_json::json!({"zone": "eu-west/1a", "owner": "team db", "nofailover": false}),
        ),
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !rig.log_text().contains("fencing the old primary"),
        "the leader was fenced for a tag:\n{}",
        rig.diag()
    );
    assert_eq!(rig.server("primary", "pg1"), Some((UP, READY)));
    rig.assert_writes_reach("pg1", Duration::from_secs(2), "odd tags on the leader");
    let cfg = std::fs::read_to_string(rig.dir.path().join("haproxy.cfg")).unwrap();
    assert_eq!(cfg.matches("server pg1 ").count(), 2, "{cfg}");
    rig.wait_log("ignoring a field of a member key", Duration::from_secs(1));
    assert!(rig.log_text().contains("tags.owner"), "{}", rig.diag());
}

/// A stats socket at `level user` refuses every move: each refusal is an error in the log, in
/// `/status` and in `haconfd_failover_moves_total{consumer="haproxy",result="refused"}`, the
/// switch is not recorded as done, and `haconfd check` names the socket and its level.
#[test]
fn moves_a_user_level_stats_socket_refuses_are_errors_never_switches() {
    let rig = Rig::start(
        "userlevel",
        Setup {
            socket_level: "user",
            ..Setup::default()
        },
    );
    rig.complete_switch("pg1", "pg2");
    rig.wait_log("PgBouncer follows the new primary", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(200));
    let st = rig.status();
    assert_eq!(st["last_failover"]["new"], "pg2", "{st}");
    assert!(
        st["last_failover"]["haproxy_after_ms"].is_null(),
        "a refused move was recorded as HAProxy's switch: {st}"
    );
    assert!(
        st["fast_path"]["moves_refused"].as_u64() >= Some(1)
            && st["fast_path"]["last_refused"]
                .as_str()
                .is_some_and(|t| t.contains("Permission denied")),
        "{st}"
    );
    rig.wait_log(
        "HAProxy refused runtime API commands",
        Duration::from_secs(1),
    );
    let m = rig.metrics();
    assert!(
        m.contains("haconfd_failover_moves_total{consumer=\"haproxy\",result=\"refused\"}"),
        "{m}"
    );
    assert!(
        !m.contains("haconfd_failover_switch_seconds_count{consumer=\"haproxy\"} 1"),
        "{m}"
    );
    assert!(
        rig.log_text().contains("\"level\":\"ERROR\""),
        "{}",
        rig.diag()
    );
    let mut check = Command::new(haconfd_bin());
    check.arg("-c").arg(&rig.config).arg("check");
    let out = run_with_timeout(&mut check, Duration::from_secs(20)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&rig.admin_sock.display().to_string())
            && err.contains("level \"user\"")
            && err.contains("level admin"),
        "{err}"
    );
}
