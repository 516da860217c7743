//! Self-test of the process harness in `tests/common/procs.rs`: real etcd, HAProxy and PgBouncer
//! start on free loopback ports, answer, reload, and die by PID on drop.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn free_ports_are_unique() {
    let ports: std::collections::HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
#[should_panic(expected = "not found: install the test dependencies with `sudo apt-get install -y")]
fn require_bin_panics_with_the_setup_command() {
    require_bin("surely-not-a-real-binary-haconfd");
}

#[test]
fn require_bin_finds_the_components() {
    for b in [
        "etcd",
        "etcdctl",
        "haproxy",
        "pgbouncer",
        "psql",
        "pg_ctl",
        "initdb",
    ] {
        assert!(require_bin(b).is_absolute(), "{b}");
    }
}

#[test]
fn proc_is_killed_and_reaped_on_drop() {
    let p = Proc::spawn("sleep", command("sleep", &["300"]));
    let pid = p.pid();
    assert!(pid_alive(pid));
    drop(p);
    assert!(!pid_alive(pid), "pid {pid} still alive after drop");
}

#[test]
fn proc_spawned_from_a_finished_thread_survives() {
    // PDEATHSIG is tied to the spawner thread, not to the (short-lived) caller thread.
    let p = std::thread::spawn(|| Proc::spawn("sleep", command("sleep", &["300"])))
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        p.is_running(),
        "child died with the thread that asked for it"
    );
}

#[test]
fn etcd_shared_put_get_delete_lease_compact() {
    let etcd = Etcd::shared();
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let pre = format!("/{}/", unique_name("harness"));
    let r0 = etcd.revision();
    let r1 = etcd.put(&format!("{pre}leader"), "pg1");
    assert!(r1 > r0);
    assert_eq!(etcd.get(&format!("{pre}leader")).as_deref(), Some("pg1"));
    etcd.put(&format!("{pre}members/pg1"), "{}");
    assert_eq!(etcd.get_prefix(&pre).len(), 2);
    assert_eq!(etcd.delete(&format!("{pre}leader")), 1);
    assert_eq!(etcd.get(&format!("{pre}leader")), None);
    let lease = etcd.put_with_lease(&format!("{pre}members/pg2"), "{}", 30);
    assert!(lease != 0);
    etcd.revoke(lease);
    assert_eq!(etcd.get(&format!("{pre}members/pg2")), None);
    let rev = etcd.revision();
    etcd.compact(rev);
    assert_eq!(etcd.delete_prefix(&pre), 1);
}

#[tokio::test]
async fn etcd_helpers_work_inside_a_tokio_runtime() {
    let etcd = Etcd::start();
    etcd.put("/k", "v");
    let mut c = etcd.client().await;
    let r = c.get("/k", None).await.unwrap();
    assert_eq!(r.kvs()[0].value_str().unwrap(), "v");
    drop(etcd); // dropping inside the runtime must not panic
}

#[test]
fn etcd_stop_restart_keeps_data_and_pause_hangs() {
    let etcd = Etcd::start();
    let pid = etcd.pid().unwrap();
    etcd.put("/outage/k", "before");
    etcd.stop();
    assert!(!pid_alive(pid));
    assert!(etcd.try_put("/outage/k", "during").is_err());
    etcd.restart();
    assert_eq!(etcd.get("/outage/k").as_deref(), Some("before"));
    etcd.put("/outage/k", "after");

    etcd.pause();
    assert!(!etcd.is_healthy());
    etcd.resume();
    assert!(etcd.wait_healthy(Duration::from_secs(10)));
    assert_eq!(etcd.get("/outage/k").as_deref(), Some("after"));
}

#[test]
fn etcd_cluster_of_three_survives_one_member_down() {
    let c = EtcdCluster::start(3);
    assert_eq!(c.endpoints().len(), 3);
    c.member(0).put("/c/k", "v1");
    assert_eq!(c.member(2).get("/c/k").as_deref(), Some("v1"));
    c.member(1).stop();
    assert!(c.put("/c/k", "v2") > 0);
    assert_eq!(c.member(2).get("/c/k").as_deref(), Some("v2"));
    c.member(2).pause();
    // Two of three down: no quorum.
    assert!(c.member(0).try_put("/c/k", "v3").is_err());
    c.member(2).resume();
    c.member(1).restart_nowait();
    assert!(c.wait_healthy(Duration::from_secs(30)));
    // The failed put may still commit once quorum is back (an ambiguous etcd failure).
    let v = c.member(1).get("/c/k");
    assert!(matches!(v.as_deref(), Some("v2" | "v3")), "{v:?}");
}

fn haproxy_cfg(dir: &Path, stats: &Path, fe_port: u16, servers: &[(&FakeMember, &str)]) -> String {
    let _ = dir;
    let mut s = format!(
        "global\n    stats socket {} mode 600 level admin\n\
         defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\
         listen primary\n    bind 127.0.0.1:{fe_port}\n    option httpchk HEAD /primary\n\
         \x20   http-check expect status 200\n\
         \x20   default-server inter 200ms fall 2 rise 2 on-marked-down shutdown-sessions\n",
        stats.display()
    );
    for (m, name) in servers {
        s += &format!(
            "    server {name} {} check port {}\n",
            m.backend.addr(),
            m.api_port()
        );
    }
    s
}

#[test]
fn haproxy_routes_to_the_primary_and_counts_reloads() {
    let pg1 = FakeMember::start("pg1", Role::Primary);
    let pg2 = FakeMember::start("pg2", Role::Replica);
    let dir = temp_dir("harness-haproxy");
    let cfg = dir.path().join("haproxy.cfg");
    let stats = dir.path().join("stats.sock");
    let fe = free_port();
    write(
        &cfg,
        &haproxy_cfg(dir.path(), &stats, fe, &[(&pg1, "pg1"), (&pg2, "pg2")]),
    );
    assert!(Haproxy::check_config(&cfg).0);

    let h = Haproxy::start(&cfg);
    assert_eq!(read_pidfile(&h.pidfile()), Some(h.pid()));
    let p = h.proc_status();
    assert_eq!(p.master.as_ref().unwrap().pid, h.pid());
    assert_eq!((p.reloads(), p.failed, p.workers.len()), (0, 0, 1));

    let up = |b: &str, s: &str| {
        Haproxy::servers_op_state(&stats)
            .get(&(b.into(), s.into()))
            .copied()
    };
    assert!(wait_until(Duration::from_secs(5), || up("primary", "pg2") == Some(0)));
    assert_eq!(up("primary", "pg1"), Some(2));
    for _ in 0..4 {
        assert_eq!(tcp_banner(fe, Duration::from_secs(2)).unwrap(), "pg1");
    }
    assert!(pg2.health.hits() > 0);

    // Failover: pg2 becomes primary.
    pg1.set_role(Role::Replica);
    pg2.set_role(Role::Primary);
    assert!(wait_until(Duration::from_secs(5), || up("primary", "pg1")
        == Some(0)
        && up("primary", "pg2") == Some(2)));
    assert_eq!(tcp_banner(fe, Duration::from_secs(2)).unwrap(), "pg2");

    let w0 = h.worker_pids();
    assert_eq!(h.reload(), "", "2.6 `reload` prints nothing");
    assert!(
        h.wait_reloads(1, Duration::from_secs(10)),
        "{}",
        h.show_proc()
    );
    assert!(wait_until(Duration::from_secs(5), || h.worker_pids() != w0));
    h.sigusr2();
    assert!(
        h.wait_reloads(2, Duration::from_secs(10)),
        "{}",
        h.show_proc()
    );
    assert_eq!(h.failed_reloads(), 0);
    assert_eq!(
        read_pidfile(&h.pidfile()),
        Some(h.pid()),
        "master PID survives reloads"
    );

    // A broken config: the counter still moves, `[failed: 1]`, the old worker keeps serving.
    let good = std::fs::read_to_string(&cfg).unwrap();
    write(&cfg, &format!("{good}    bogus_directive\n"));
    h.reload();
    assert!(wait_until(Duration::from_secs(10), || h
        .try_show_proc()
        .is_some_and(|p| p.reloads() >= 3 && p.failed == 1)));
    assert_eq!(tcp_banner(fe, Duration::from_secs(2)).unwrap(), "pg2");
    write(&cfg, &good);
    h.reload();
    assert!(wait_until(Duration::from_secs(10), || h
        .try_show_proc()
        .is_some_and(|p| p.reloads() >= 4 && p.failed == 0)));

    let (master, workers) = (h.pid(), h.worker_pids());
    drop(h);
    assert!(!pid_alive(master));
    assert!(wait_until(Duration::from_secs(2), || workers
        .iter()
        .all(|&w| !pid_alive(w))));
}

#[test]
fn health_endpoint_answers_like_patroni() {
    let h = HealthEndpoint::start(Role::Replica);
    assert_eq!(http_get(h.port(), "/replica").unwrap().0, 200);
    assert_eq!(http_get(h.port(), "/primary").unwrap().0, 503);
    assert_eq!(
        http_request(h.port(), "HEAD", "/primary", Duration::from_secs(2)).unwrap(),
        (503, String::new())
    );
    h.set_role(Role::Primary);
    assert_eq!(http_get(h.port(), "/master").unwrap().0, 200);
    assert_eq!(http_get(h.port(), "/replica?lag=16MB").unwrap().0, 503);
    let port = h.port();
    let t = Instant::now();
    drop(h);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(!port_open(port));
}

#[test]
fn pgbouncer_answers_show_databases_and_rereads_on_sighup() {
    let (a, b) = (free_port(), free_port());
    let pgb = Pgbouncer::start_with(&format!(
        "* = host=127.0.0.1 port={a}\nappdb = host=127.0.0.1 port={a} dbname=postgres"
    ));
    assert_eq!(read_pidfile(&pgb.pidfile()), Some(pgb.pid()));
    let dbs = pgb.show_databases();
    assert_eq!(dbs["appdb"]["port"], a.to_string());
    assert_eq!(dbs["appdb"]["host"], "127.0.0.1");
    assert!(dbs.contains_key("pgbouncer"));
    assert!(pgb.admin_query("SHOW VERSION").contains("PgBouncer 1.18"));

    pgb.owned_ini().unwrap().write_databases(&format!(
        "* = host=127.0.0.1 port={b}\nappdb = host=127.0.0.1 port={b} dbname=postgres"
    ));
    pgb.sighup();
    assert!(wait_until(Duration::from_secs(5), || pgb.show_databases()
        ["appdb"]["port"]
        == b.to_string()));
    let pid = pgb.pid();
    drop(pgb);
    assert!(!pid_alive(pid));
}
