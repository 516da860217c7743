//! The failover fast path's rig, shared by the tests that switch a cluster over for real
//! (tests/faults_fast_path.rs, tests/observe.rs): a real etcd, HAProxy (the shipped template,
//! health checks every 60 s so that every move seen is haconfd's), PgBouncer (the shipped
//! template, paused and resumed through its console) and one PostgreSQL that answers for every
//! member on the member's own loopback address (`inet_server_addr()` tells which member a
//! client reached), each member's Patroni REST API scripted by the test, and `haconfd run` with
//! its HTTP endpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::config::{ConfigBuilder, Reload, Template};
use super::procs::{
    free_port, give_to_postgres, haconfd_once_no_reload, haconfd_run_json, http_get,
    pgbouncer_run_dir, remove_at_exit, require_bin, server_state, temp_dir, unique_name, unix_cmd,
    wait_until, Etcd, Haproxy, HealthEndpoint, Pgbouncer, Postgres, Proc, Role,
};
use nix::sys::signal::Signal;

/// One PostgreSQL for the whole binary, listening on the members' addresses.
pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        let pg = Postgres::start_on(&["127.0.0.1", "127.0.0.11", "127.0.0.12", "127.0.0.13"]);
        remove_at_exit(pg.data_dir().parent().unwrap());
        pg
    })
}

/// A member: its address on the shared PostgreSQL, and its scripted REST API.
pub struct Member {
    pub name: &'static str,
    pub addr: &'static str,
    pub api: HealthEndpoint,
    /// Its PostgreSQL port: the shared PostgreSQL's, or a [`PgFront`]'s.
    pub pg_port: u16,
}

impl Member {
    pub fn json(&self, role: &str) -> String {
        self.json_with(role, serde_json::json!({}))
    }

    pub fn json_with(&self, role: &str, tags: serde_json::Value) -> String {
        serde_json::json!({
            "conn_url": format!("postgres://{}:{}/postgres", self.addr, self.pg_port),
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

pub const UP: u8 = 2;
pub const DOWN: u8 = 0;
pub const READY: u32 = 0;
pub const DRAIN: u32 = 8;
pub const MAINT: u32 = 1;

/// What a [`Rig`] is built with.
#[derive(Clone)]
pub struct Setup {
    /// `[failover]` settings.
    pub failover: Vec<(&'static str, &'static str)>,
    /// The PgBouncer target's check command (to hold a pass in its check).
    pub pgb_check: Option<Vec<String>>,
    /// The stats socket's level in haproxy.cfg (the shipped template says `admin`).
    pub socket_level: &'static str,
    /// More settings (hooks, `[vars]`), added to the config after the rig's own.
    pub more: Option<Arc<dyn Fn(ConfigBuilder) -> ConfigBuilder + Send + Sync>>,
    /// pg1's PostgreSQL behind a [`PgFront`] the test can crash and start again.
    pub front: bool,
    /// PgBouncer's `pool_mode` (`transaction` unless set).
    pub pool_mode: Option<&'static str>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            failover: vec![("confirm_interval", "10ms")],
            pgb_check: None,
            socket_level: "admin",
            more: None,
            front: false,
            pool_mode: None,
        }
    }
}

/// etcd keys of one scope, HAProxy and PgBouncer on haconfd's files, and haconfd itself.
pub struct Rig {
    pub prefix: String,
    pub members: Vec<Member>,
    pub setup: Setup,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub tpl_dir: PathBuf,
    pub admin_sock: PathBuf,
    pub primary_port: u16,
    pub replica_port: u16,
    pub stats_port: u16,
    pub pgb_port: u16,
    pub pgb_dir: PathBuf,
    pub http_port: u16,
    pub log: PathBuf,
    pub haproxy: Option<Haproxy>,
    pub pgbouncer: Option<Pgbouncer>,
    pub haconfd: Option<Proc>,
    /// pg1's PostgreSQL port, when [`Setup::front`] asked for one.
    pub front: Option<PgFront>,
}

impl Rig {
    /// pg1 the leader (REST `/primary` writable), pg2 a replica; both files rendered, HAProxy
    /// and PgBouncer started on them, then `haconfd run`.
    pub fn start(tag: &str, setup: Setup) -> Rig {
        require_bin("haproxy");
        require_bin("pgbouncer");
        let pg = postgres();
        let etcd = Etcd::shared();
        let prefix = format!("/service/{}/", unique_name(tag));
        let front = setup.front.then(|| PgFront::start("127.0.0.11", pg.port()));
        let members = vec![
            Member {
                name: "pg1",
                addr: "127.0.0.11",
                api: HealthEndpoint::start(Role::Primary),
                pg_port: front.as_ref().map_or(pg.port(), |f| f.port),
            },
            Member {
                name: "pg2",
                addr: "127.0.0.12",
                api: HealthEndpoint::start(Role::Replica),
                pg_port: pg.port(),
            },
        ];
        etcd.put(&format!("{prefix}members/pg1"), &members[0].json("primary"));
        etcd.put(&format!("{prefix}members/pg2"), &members[1].json("replica"));
        etcd.put(&format!("{prefix}leader"), "pg1");
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
            front,
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

    pub fn write_config(&self) {
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
        if let Some(mode) = self.setup.pool_mode {
            pgbouncer = pgbouncer.var("pool_mode", mode);
        }
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
        if let Some(more) = &self.setup.more {
            b = more(b);
        }
        b.template(haproxy)
            .template(pgbouncer)
            .write_atomic(&self.config);
    }

    /// Starts `haconfd run` (logging to the same file across restarts) and waits until its first
    /// pass has run.
    pub fn run(&mut self) {
        let before = self.log_text().matches("\"message\":\"pass").count();
        let cmd = haconfd_run_json(&self.config);
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

    pub fn haconfd(&self) -> &Proc {
        self.haconfd.as_ref().expect("haconfd runs")
    }

    /// Stops haconfd with `sig` and waits for it to exit (SIGTERM and SIGINT: gracefully).
    pub fn stop_with(&mut self, sig: Signal) {
        let p = self.haconfd.take().expect("haconfd runs");
        p.signal(sig).expect("signal haconfd");
        assert!(
            p.wait_timeout(Duration::from_secs(10)).is_some(),
            "haconfd did not exit on {sig:?}:\n{}",
            self.diag()
        );
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap()
    }

    pub fn put(&self, rel: &str, value: &str) {
        Etcd::shared().put(&format!("{}{rel}", self.prefix), value);
    }

    pub fn delete(&self, rel: &str) {
        Etcd::shared().delete(&format!("{}{rel}", self.prefix));
    }

    /// The switchover as Patroni makes it, once the old primary is down: the leader key to
    /// `new` (its REST API writable, its member key `primary`), the old one a replica.
    pub fn complete_switch(&self, old: &str, new: &str) {
        self.member(new).api.set_role(Role::Primary);
        self.member(old).api.set_role(Role::Replica);
        self.delete("leader");
        self.put("leader", new);
        self.put("failover", "{}");
        self.put(&format!("members/{new}"), &self.member(new).json("primary"));
        self.put(&format!("members/{old}"), &self.member(old).json("replica"));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (op state, admin state) of `backend/server`.
    pub fn server(&self, backend: &str, server: &str) -> Option<(u8, u32)> {
        server_state(&self.admin_sock, backend, server)
    }

    pub fn admin(&self, cmd: &str) -> String {
        unix_cmd(&self.admin_sock, cmd, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    pub fn status(&self) -> serde_json::Value {
        let (_, body) = http_get(self.http_port, "/status").expect("/status");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn diag(&self) -> String {
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

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `SELECT inet_server_addr()` through 127.0.0.1:`port` on a fresh connection: the member the
/// client reached. Err with the client's error; Err("no answer") when it did not answer within
/// `within` (a paused PgBouncer holds the query).
pub fn reached(port: u16, within: Duration) -> Result<String, String> {
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
pub fn wait_reach(port: u16, addr: &str, within: Duration) -> Result<Duration, String> {
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
    pub fn assert_writes_reach(&self, leader: &str, within: Duration, when: &str) {
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
    pub fn assert_pgbouncer_paused(&self, when: &str) {
        let r = reached(self.pgb_port, Duration::from_millis(500));
        assert_eq!(
            r,
            Err("no answer".to_owned()),
            "{when}: PgBouncer answered; not paused?\n{}",
            self.diag()
        );
    }

    pub fn wait_log(&self, needle: &str, within: Duration) {
        assert!(
            wait_until(within, || self.log_text().contains(needle)),
            "no {needle:?} in haconfd's log within {within:?}:\n{}",
            self.diag()
        );
    }

    pub fn wait_server(&self, backend: &str, server: &str, want: (u8, u32), within: Duration) {
        assert!(
            wait_until(within, || self.server(backend, server) == Some(want)),
            "{backend}/{server} is not {want:?} within {within:?}:\n{}",
            self.diag()
        );
    }
}

/// A member's PostgreSQL port in front of the shared PostgreSQL, which a test can crash (the
/// listener closed, every forwarded connection cut: connections are refused, as after a
/// postmaster's death), freeze (connections accepted by the kernel, never served: a node that is
/// merely slow) and start again on the same port.
pub struct PgFront {
    pub addr: &'static str,
    pub port: u16,
    backend: u16,
    state: Arc<std::sync::Mutex<FrontState>>,
}

#[derive(Default)]
struct FrontState {
    /// Bumped at every crash: the accept loop and the pipes of an older generation stop.
    generation: u64,
    frozen: bool,
    open: Vec<std::net::TcpStream>,
}

impl PgFront {
    pub fn start(addr: &'static str, backend: u16) -> PgFront {
        let listener = std::net::TcpListener::bind((addr, 0)).expect("bind the PostgreSQL front");
        let port = listener.local_addr().unwrap().port();
        let front = PgFront {
            addr,
            port,
            backend,
            state: Arc::default(),
        };
        front.serve(listener);
        front
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let state = Arc::clone(&self.state);
        let (addr, backend) = (self.addr, self.backend);
        let generation = state.lock().unwrap().generation;
        std::thread::spawn(move || {
            // Bounded: at most an hour of 5 ms steps.
            for _ in 0..720_000 {
                {
                    let st = state.lock().unwrap();
                    if st.generation != generation {
                        return;
                    }
                    if st.frozen {
                        drop(st);
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                }
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = std::net::TcpStream::connect((addr, backend)) else {
                            continue;
                        };
                        let mut st = state.lock().unwrap();
                        st.open.push(client.try_clone().unwrap());
                        st.open.push(server.try_clone().unwrap());
                        drop(st);
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }

    /// Closes the port (new connections are refused) and cuts every open connection.
    pub fn crash(&self) {
        let mut st = self.state.lock().unwrap();
        st.generation += 1;
        st.frozen = false;
        for c in st.open.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        drop(st);
        // The accept loop sees the generation within 5 ms and drops the listener.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Listens on the same port again.
    pub fn restart(&self) {
        let listener = (0..100)
            .find_map(|_| {
                std::net::TcpListener::bind((self.addr, self.port))
                    .map_err(|_| std::thread::sleep(Duration::from_millis(20)))
                    .ok()
            })
            .expect("bind the PostgreSQL front again");
        self.serve(listener);
    }

    /// Stops serving (or serves again): connections still complete in the kernel's backlog.
    pub fn freeze(&self, frozen: bool) {
        self.state.lock().unwrap().frozen = frozen;
    }
}

impl Drop for PgFront {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap();
        st.generation += 1;
        for c in st.open.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
