//! End-to-end with several clusters: real Patroni clusters (2 members each) on one etcd, behind
//! ONE HAProxy and ONE PgBouncer rendered by the real `haconfd run` (`etcd.discover = true`)
//! with the shipped templates `haproxy-clusters.cfg.tera` and `pgbouncer-clusters.ini.tera`
//! and the failover fast path on (`{scope}_primary` / `{scope}_replicas` backends, PgBouncer
//! PAUSE/RESUME of the cluster's own databases). A switchover in cluster `ca` moves `ca`'s
//! writes, through HAProxy and PgBouncer, to its new primary within the bounds the
//! single-cluster end-to-end test uses, while writes to cluster `cb`, probed continuously
//! through both, see no error and `cb`'s routing stays as it was. A third cluster, configured
//! from the start, starts later and gets its listeners and database without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::patroni::{self, PatroniCluster};
use common::procs::{
    free_port, give_to_postgres, haconfd_bin, haconfd_once_no_reload, require_bin, temp_dir,
    wait_until, Etcd, Haproxy, Pgbouncer, Proc,
};
use common::switch::{self, Mode, WriteProbe};

/// Upper bound of one probe's life (probes stop by themselves after this).
const PROBE_MAX: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------------ helpers

fn toml_str(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn pg(port: u16, db: &str) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(patroni::SUPERUSER)
        .password(patroni::SUPERUSER_PASSWORD)
        .dbname(db)
        .connect_timeout(Duration::from_secs(2));
    c
}

/// Runs `sql` (simple protocol) on database `db` at 127.0.0.1:`port`, on its own thread.
fn exec(port: u16, db: &str, sql: &str) -> Result<(), String> {
    let (db, sql) = (db.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut c = pg(port, &db)
            .connect(postgres::NoTls)
            .map_err(|e| patroni::pg_err_text(&e))?;
        c.batch_execute(&sql).map_err(|e| patroni::pg_err_text(&e))
    })
    .join()
    .unwrap_or_else(|_| Err("exec thread panicked".into()))
}

/// One write on a new connection to database `db` at 127.0.0.1:`port`: the port of the server
/// that took it.
fn write_route(port: u16, db: &str) -> Result<u16, String> {
    let db = db.to_string();
    std::thread::spawn(move || {
        let mut c = pg(port, &db)
            .connect(postgres::NoTls)
            .map_err(|e| patroni::pg_err_text(&e))?;
        let msgs = c
            .simple_query("INSERT INTO haconfd_probe(v) VALUES (2) RETURNING inet_server_port()")
            .map_err(|e| patroni::pg_err_text(&e))?;
        let _ = c.close();
        msgs.iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .ok_or_else(|| "no row".to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("write thread panicked".into()))
}

/// Polls [`write_route`] until a write lands on `want`, within `timeout`; the time it took.
fn wait_write_to(port: u16, db: &str, want: u16, timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = String::from("(no attempt)");
    let ok = wait_until(timeout, || {
        let r = write_route(port, db);
        last = format!("{r:?}");
        let hit = r == Ok(want);
        if !hit {
            std::thread::sleep(Duration::from_millis(80));
        }
        hit
    });
    if ok {
        Ok(t0.elapsed())
    } else {
        Err(format!(
            "writes to {db} through 127.0.0.1:{port} did not land on port {want} within {timeout:?}; last {last}"
        ))
    }
}

/// The database each cluster's PgBouncer entry names, and the probe table in it and in
/// `postgres` (written through HAProxy), created on the leader.
fn prepare_cluster(c: &PatroniCluster) {
    c.create_probe_table();
    let leader = c
        .wait_leader(None, patroni::SWITCH_TIMEOUT)
        .expect("leader");
    let port = c.node(&leader).pg_port;
    let db = db_of(&c.scope);
    exec(port, "postgres", &format!("CREATE DATABASE {db}"))
        .unwrap_or_else(|e| panic!("create {db}: {e}"));
    exec(
        port,
        &db,
        "CREATE TABLE IF NOT EXISTS haconfd_probe \
         (id bigserial PRIMARY KEY, v bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    )
    .unwrap_or_else(|e| panic!("probe table in {db}: {e}"));
}

fn db_of(scope: &str) -> String {
    format!("{scope}_db")
}

/// (op state, admin state) of every server of `backend` on the stats socket, sorted.
fn backend_state(sock: &Path, backend: &str) -> Vec<(String, u8)> {
    let mut v: Vec<(String, u8)> = Haproxy::servers_op_state(sock)
        .into_iter()
        .filter(|((b, _), _)| b == backend)
        .map(|((_, s), st)| (s, st))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------- the stack

/// One cluster's listeners and database.
struct Ports {
    scope: String,
    primary: u16,
    replica: u16,
}

/// haconfd + HAProxy + PgBouncer for every cluster under `/service`. Field order is drop
/// order: haconfd goes first.
struct Stack {
    haconfd: Option<Proc>,
    haproxy: Option<Haproxy>,
    pgbouncer: Option<Pgbouncer>,
    endpoint: String,
    clusters: Vec<Ports>,
    stats_port: u16,
    pgb_port: u16,
    dir: tempfile::TempDir,
}

impl Stack {
    fn new(endpoint: &str, scopes: &[&str]) -> Stack {
        require_bin("haproxy");
        require_bin("pgbouncer");
        let dir = temp_dir("e2e-clusters");
        let d = dir.path();
        let tpl = d.join("tpl");
        std::fs::create_dir(&tpl).unwrap();
        // Copies of the shipped templates: haconfd watches their directory.
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        for t in [
            "haproxy-clusters.cfg.tera",
            "pgbouncer-clusters.ini.tera",
            "hold.lua",
        ] {
            std::fs::copy(shipped.join(t), tpl.join(t))
                .unwrap_or_else(|e| panic!("copy template {t}: {e}"));
        }
        let pgb = d.join("pgb");
        std::fs::create_dir(&pgb).unwrap();
        std::fs::write(
            pgb.join("userlist.txt"),
            "\"postgres\" \"\"\n\"pgbouncer\" \"\"\n",
        )
        .unwrap();
        give_to_postgres(&pgb);
        Stack {
            haconfd: None,
            haproxy: None,
            pgbouncer: None,
            endpoint: endpoint.to_string(),
            clusters: scopes
                .iter()
                .map(|s| Ports {
                    scope: s.to_string(),
                    primary: free_port(),
                    replica: free_port(),
                })
                .collect(),
            stats_port: free_port(),
            pgb_port: free_port(),
            dir,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn ports(&self, scope: &str) -> &Ports {
        self.clusters
            .iter()
            .find(|p| p.scope == scope)
            .unwrap_or_else(|| panic!("no cluster {scope}"))
    }

    fn admin_sock(&self) -> PathBuf {
        self.path("admin.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("haconfd.log")).unwrap_or_default()
    }

    fn pgbouncer(&self) -> &Pgbouncer {
        self.pgbouncer.as_ref().expect("PgBouncer started")
    }

    /// haconfd.toml (atomically), with the reload actions once HAProxy and PgBouncer run.
    fn write_config(&self) {
        let p = |rel: &str| toml_str(self.path(rel).display().to_string());
        let mut t = format!(
            "[etcd]\nendpoints = [{}]\ndiscover = true\n\n\
             [daemon]\nmin_interval = \"100ms\"\nretry_interval = \"1s\"\n\n\
             [failover]\nenabled = true\n\n\
             [vars]\nbind_address = \"127.0.0.1\"\nstats_port = {}\nstats_socket = {}\n\
             hold_lua = {}\n\n",
            toml_str(&self.endpoint),
            self.stats_port,
            p("admin.sock"),
            p("tpl/hold.lua"),
        );
        for c in &self.clusters {
            t.push_str(&format!(
                "[clusters.{s}]\nprimary_port = {}\nreplica_port = {}\ndatabases = [\"{}\"]\n\n",
                c.primary,
                c.replica,
                db_of(&c.scope),
                s = c.scope
            ));
        }
        let haproxy_bin = toml_str(require_bin("haproxy").display().to_string());
        t.push_str(&format!(
            "[[template]]\nname = \"haproxy\"\nsrc = {}\ndest = {}\n\
             check = [{haproxy_bin}, \"-c\", \"-f\", \"{{{{staged}}}}\"]\n\
             server_state = {{ stats_socket = {}, file = {}, primary_backends = [\"{{scope}}_primary\"], replica_backends = [\"{{scope}}_replicas\"] }}\n",
            p("tpl/haproxy-clusters.cfg.tera"),
            p("haproxy.cfg"),
            p("admin.sock"),
            p("server-state"),
        ));
        if let Some(h) = &self.haproxy {
            t.push_str(&format!(
                "reload = {{ pidfile = {}, signal = \"SIGUSR2\", process = \"haproxy\", master_socket = {}, timeout = \"10s\" }}\n",
                toml_str(h.pidfile().display().to_string()),
                toml_str(h.master_socket().display().to_string()),
            ));
        }
        t.push_str(&format!(
            "\n[[template]]\nname = \"pgbouncer\"\nsrc = {}\ndest = {}\nrequire_leader = true\n\
             pgbouncer_admin = {{ host = {}, port = {}, user = \"pgbouncer\", pause_timeout = \"15s\" }}\n",
            p("tpl/pgbouncer-clusters.ini.tera"),
            p("pgb/pgbouncer.ini"),
            p("pgb"),
            self.pgb_port,
        ));
        if self.pgbouncer.is_some() {
            t.push_str(&format!(
                "reload = {{ pidfile = {}, signal = \"SIGHUP\", process = \"pgbouncer\" }}\n",
                p("pgb/pgbouncer.pid")
            ));
        }
        t.push_str(&format!(
            "[template.vars]\nlisten_addr = \"127.0.0.1\"\nlisten_port = {}\nunix_socket_dir = {}\n\
             auth_type = \"trust\"\nauth_file = {}\nadmin_users = \"pgbouncer\"\n\
             pool_mode = \"transaction\"\npidfile = {}\nlogfile = {}\n",
            self.pgb_port,
            p("pgb"),
            p("pgb/userlist.txt"),
            p("pgb/pgbouncer.pid"),
            p("pgb/pgbouncer.log"),
        ));
        let tmp = self.path("haconfd.toml.tmp");
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, self.path("haconfd.toml")).unwrap();
    }

    /// First render, HAProxy, PgBouncer, then `haconfd run`; waits for its first pass.
    fn start(&mut self) {
        self.write_config();
        haconfd_once_no_reload(&self.path("haconfd.toml"));
        self.haproxy = Some(Haproxy::start(&self.path("haproxy.cfg")));
        give_to_postgres(&self.path("pgb"));
        self.pgbouncer = Some(Pgbouncer::start(&self.path("pgb/pgbouncer.ini")));
        self.write_config();
        let mut cmd = Command::new(haconfd_bin());
        cmd.arg("-c").arg(self.path("haconfd.toml")).args([
            "run",
            "--log-format",
            "json",
            "--log-level",
            "haconfd=debug",
        ]);
        self.haconfd = Some(Proc::spawn_logged(
            "haconfd",
            cmd,
            &self.path("haconfd.log"),
        ));
        assert!(
            wait_until(Duration::from_secs(20), || {
                let l = self.log();
                l.contains("pass: nothing changed") || l.contains("pass applied")
            }),
            "haconfd run did not finish a first pass:\n{}",
            self.diag()
        );
    }

    /// haconfd's log without the DEBUG lines.
    fn events(&self) -> String {
        self.log()
            .lines()
            .filter(|l| !l.contains("\"level\":\"DEBUG\""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `SHOW DATABASES` (host, port) of PgBouncer's `db`.
    fn pgb_target(&self, db: &str) -> Option<(String, String)> {
        let row = self.pgbouncer().show_databases().remove(db)?;
        Some((row.get("host")?.clone(), row.get("port")?.clone()))
    }

    fn diag(&self) -> String {
        let live = common::procs::unix_cmd(
            &self.admin_sock(),
            "show servers state",
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| format!("({e})"));
        format!(
            "--- live show servers state:\n{live}\n--- haproxy.cfg:\n{}\n--- pgbouncer.ini:\n{}\n--- haproxy log (tail):\n{}\n--- haconfd log (tail):\n{}",
            std::fs::read_to_string(self.path("haproxy.cfg")).unwrap_or_default(),
            std::fs::read_to_string(self.path("pgb/pgbouncer.ini")).unwrap_or_default(),
            self.haproxy
                .as_ref()
                .map(|h| tail(&h.log(), 20))
                .unwrap_or_default(),
            tail(&self.events(), 40)
        )
    }
}

// ----------------------------------------------------------------------------------- the test

#[test]
fn a_switchover_in_one_cluster_moves_only_its_routing_and_a_later_cluster_gets_listeners() {
    let t0 = Instant::now();
    let etcd = Etcd::start();
    let a = PatroniCluster::start(&etcd.endpoint(), "ca", 2);
    let b = PatroniCluster::start(&etcd.endpoint(), "cb", 2);
    prepare_cluster(&a);
    prepare_cluster(&b);
    let started = t0.elapsed();
    let mut stack = Stack::new(&etcd.endpoint(), &["ca", "cb", "cc"]);
    stack.start();
    let (ca, cb) = (stack.ports("ca").primary, stack.ports("cb").primary);
    let pgb = stack.pgb_port;
    let (da, dbb) = (db_of("ca"), db_of("cb"));

    let a_first = a.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap();
    let a_first_port = a.node(&a_first).pg_port;
    let b_leader = b.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap();
    let b_port = b.node(&b_leader).pg_port;
    for (port, db, want, what) in [
        (ca, "postgres", a_first_port, "ca through HAProxy"),
        (pgb, da.as_str(), a_first_port, "ca through PgBouncer"),
        (cb, "postgres", b_port, "cb through HAProxy"),
        (pgb, dbb.as_str(), b_port, "cb through PgBouncer"),
    ] {
        wait_write_to(port, db, want, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", stack.diag()));
    }
    let cfg = std::fs::read_to_string(stack.path("haproxy.cfg")).unwrap();
    assert!(
        cfg.contains("listen ca_primary") && cfg.contains("listen cb_primary"),
        "{cfg}"
    );
    assert!(
        !cfg.contains("listen cc_primary"),
        "cc is not in the store yet:\n{cfg}"
    );

    // cb's routing before: HAProxy's servers and PgBouncer's target, once its checks settled (a
    // replica new to HAProxy starts DOWN and comes UP after `rise` passing checks).
    let sock = stack.admin_sock();
    let settled = wait_until(Duration::from_secs(15), || {
        backend_state(&sock, "cb_replicas")
            .iter()
            .all(|(server, state)| (*server == b_leader) != (*state == 2))
    });
    assert!(
        settled,
        "cb's read backend never settled:\n{}",
        stack.diag()
    );
    let b_hap_before = backend_state(&sock, "cb_primary");
    let b_rep_before = backend_state(&sock, "cb_replicas");
    let b_pgb_before = stack.pgb_target(&dbb);
    assert_eq!(
        b_pgb_before.as_ref().map(|t| t.1.clone()),
        Some(b_port.to_string())
    );

    // Probes: cb continuously through both; ca's nodes directly and ca through both.
    let step = Duration::from_millis(5);
    let b_probes = vec![
        WriteProbe::start(cb, Mode::Reconnect, step, PROBE_MAX),
        WriteProbe::start_on_db(pgb, &dbb, Mode::Reconnect, step, PROBE_MAX),
        WriteProbe::start_on_db(pgb, &dbb, Mode::Persistent, step, PROBE_MAX),
    ];
    let a_nodes: Vec<(String, WriteProbe)> = a
        .nodes()
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                WriteProbe::start(n.pg_port, Mode::Persistent, step, PROBE_MAX),
            )
        })
        .collect();
    let a_hap = WriteProbe::start(ca, Mode::Reconnect, step, PROBE_MAX);
    let a_pgb = WriteProbe::start_on_db(pgb, &da, Mode::Reconnect, step, PROBE_MAX);
    std::thread::sleep(Duration::from_millis(500));

    // The switchover in ca.
    let sw = Instant::now();
    let a_second = a.switchover(None);
    let a_second_port = a.node(&a_second).pg_port;
    let bound = Duration::from_secs(10).saturating_sub(sw.elapsed());
    wait_write_to(ca, "postgres", a_second_port, bound).unwrap_or_else(|e| {
        panic!(
            "ca through HAProxy after {a_first} -> {a_second}: {e}\n{}",
            stack.diag()
        )
    });
    let bound = Duration::from_secs(10).saturating_sub(sw.elapsed());
    wait_write_to(pgb, &da, a_second_port, bound).unwrap_or_else(|e| {
        panic!(
            "ca through PgBouncer after {a_first} -> {a_second}: {e}\n{}",
            stack.diag()
        )
    });
    let took = sw.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let b_logs = switch::stop_all(b_probes);
    let a_own = a_nodes
        .into_iter()
        .find(|(n, _)| *n == a_second)
        .map(|(_, p)| p.stop())
        .expect("a probe on the new primary");
    let a_hap = a_hap.stop();
    let a_pgb = a_pgb.stop();

    // ca: after the new primary's own first write, HAProxy and PgBouncer follow within the
    // bound the single-cluster end-to-end test uses; never a write sent to a read-only node.
    let own = switch::first_on(&a_own, a_second_port, sw)
        .unwrap_or_else(|| panic!("{a_second} never took a direct write"));
    let first = |log: &[switch::Attempt], what: &str| {
        switch::first_on(log, a_second_port, sw).unwrap_or_else(|| {
            panic!(
                "no write to ca through {what} reached {a_second}; its first errors: {:?}\n{}",
                switch::first_errors(log, sw, 5),
                stack.diag()
            )
        })
    };
    let hap_after = switch::ms_between(own, first(&a_hap, "HAProxy"));
    let pgb_after = switch::ms_between(own, first(&a_pgb, "PgBouncer"));
    println!(
        "RESULT clusters_switchover ca {a_first}->{a_second} took={:.2}s haproxy=+{hap_after:.0}ms pgbouncer=+{pgb_after:.0}ms errors ca_haproxy={:?} ca_pgbouncer={:?}; cb errors {:?} over {:?} writes",
        took.as_secs_f64(),
        switch::errors_by_class(&a_hap, sw),
        switch::errors_by_class(&a_pgb, sw),
        b_logs.iter().map(|l| switch::errors_by_class(l, sw)).collect::<Vec<_>>(),
        b_logs.iter().map(|l| l.iter().filter(|x| x.at >= sw).count()).collect::<Vec<_>>(),
    );
    for (what, log) in [("HAProxy", &a_hap), ("PgBouncer", &a_pgb)] {
        assert_eq!(
            switch::errors_by_class(log, sw).get("read_only"),
            None,
            "ca's writes through {what} reached a read-only node: {:?}\n{}",
            switch::first_errors(log, sw, 5),
            stack.diag()
        );
    }
    assert!(
        hap_after < 500.0 && pgb_after < 500.0,
        "ca's writes reached {a_second} through HAProxy {hap_after:.0} ms and PgBouncer {pgb_after:.0} ms after its own first write\n{}",
        stack.diag()
    );
    let events = stack.events();
    assert!(
        events.contains("HAProxy follows the new primary")
            && events.contains("PgBouncer follows the new primary"),
        "the fast path did not report both switches:\n{}",
        stack.diag()
    );

    // cb: not one error through HAProxy or PgBouncer, every write on cb's leader, and its
    // routing as it was.
    for (what, log) in [
        "HAProxy",
        "PgBouncer (new connections)",
        "PgBouncer (pooled)",
    ]
    .iter()
    .zip(&b_logs)
    {
        let n = log.iter().filter(|x| x.at >= sw).count();
        assert!(n > 20, "cb's probe through {what} made only {n} writes");
        assert!(
            switch::errors_by_class(log, sw).is_empty(),
            "cb's writes through {what} failed during ca's switchover: {:?}\n{}",
            switch::first_errors(log, sw, 5),
            stack.diag()
        );
        let elsewhere: Vec<u16> = log
            .iter()
            .filter_map(|x| x.result.as_ref().ok().copied())
            .filter(|p| *p != b_port)
            .collect();
        assert!(
            elsewhere.is_empty(),
            "cb's writes through {what} landed on ports {elsewhere:?}, not cb's leader {b_port}"
        );
    }
    assert_eq!(
        b.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap(),
        b_leader
    );
    assert_eq!(
        backend_state(&sock, "cb_primary"),
        b_hap_before,
        "cb's write backend changed:\n{}",
        stack.diag()
    );
    assert_eq!(
        backend_state(&sock, "cb_replicas"),
        b_rep_before,
        "cb's read backend changed:\n{}",
        stack.diag()
    );
    assert_eq!(stack.pgb_target(&dbb), b_pgb_before, "cb's PgBouncer entry");

    // A third cluster, configured from the start, starts now: its listeners and database come
    // without a restart of haconfd.
    let pid = stack.haconfd.as_ref().unwrap().pid();
    let c3 = PatroniCluster::start(&etcd.endpoint(), "cc", 1);
    prepare_cluster(&c3);
    let c_leader = c3.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap();
    let c_port = c3.node(&c_leader).pg_port;
    let cc = stack.ports("cc").primary;
    wait_write_to(cc, "postgres", c_port, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("cc through HAProxy: {e}\n{}", stack.diag()));
    wait_write_to(pgb, &db_of("cc"), c_port, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("cc through PgBouncer: {e}\n{}", stack.diag()));
    let haconfd = stack.haconfd.as_ref().unwrap();
    assert!(haconfd.is_running(), "{}", stack.diag());
    assert_eq!(haconfd.pid(), pid);
    // And the two others still route to their leaders.
    wait_write_to(ca, "postgres", a_second_port, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("ca after cc appeared: {e}\n{}", stack.diag()));
    wait_write_to(pgb, &dbb, b_port, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cb after cc appeared: {e}\n{}", stack.diag()));
    println!(
        "RESULT clusters_e2e clusters_up_after={:.1}s took={:.1}s",
        started.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
