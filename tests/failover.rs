//! The failover fast path against a real etcd and a real HAProxy, with members whose Patroni REST
//! API the test controls: HAProxy's health checks run every 60 s (two needed to change a state),
//! so every move seen here is haconfd's. A switchover request drains the old primary; a new
//! leader is set UP only once its REST API says it takes writes; a cancelled switchover is
//! undone; two members claiming `primary` resolve by the leader key; a flapping store moves
//! nothing twice; HAProxy's live state drifting from etcd's leader is reported.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::config::{ConfigBuilder, Reload, Template};
use common::procs::{
    free_port, haconfd_bin, haconfd_once_no_reload, http_get, temp_dir, unique_name, unix_cmd,
    wait_until, Etcd, FakeMember, Haproxy, Proc, Role,
};

struct Lb {
    primary_port: u16,
    _dir: tempfile::TempDir,
    config: PathBuf,
    admin_sock: PathBuf,
    http_port: u16,
    log: PathBuf,
    haproxy: Haproxy,
    haconfd: Proc,
}

fn member_key(prefix: &str, m: &FakeMember) -> String {
    format!("{prefix}members/{}", m.name)
}

/// Writes the config (without a reload action until HAProxy runs), renders once, starts HAProxy
/// on the result, then `haconfd run` with `[failover]` settings `failover`.
fn start(scope_prefix: &str, failover: &[(&str, &str)]) -> Lb {
    start_with(scope_prefix, |mut b| {
        for (k, v) in failover {
            b = b.failover(k, v);
        }
        b
    })
}

/// [`start`] with more settings (`[vars]`) from `extra`.
fn start_with(scope_prefix: &str, extra: impl Fn(ConfigBuilder) -> ConfigBuilder) -> Lb {
    let dir = temp_dir("failover");
    let d = dir.path().to_path_buf();
    let config = d.join("haconfd.toml");
    let admin_sock = d.join("admin.sock");
    let http_port = free_port();
    let primary_port = free_port();
    let write = |reload: Option<Reload>| {
        let b = ConfigBuilder::new()
            .endpoint(Etcd::shared().endpoint())
            .scope(
                scope_prefix
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap(),
            )
            .daemon("min_interval", "100ms")
            .daemon("retry_interval", "1s")
            .with_table("failover")
            .http_listen(format!("127.0.0.1:{http_port}"))
            .var("bind_address", "127.0.0.1")
            .var("primary_port", primary_port)
            // Fresh ports on every write, as this fixture always had: the config with the
            // reload action also moves the replica and stats listeners.
            .var("replica_port", free_port())
            .var("stats_port", free_port())
            .var("stats_socket", &admin_sock)
            .var("check_inter", "60s");
        let t = Template::new(
            "haproxy",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy.cfg.tera"),
            d.join("haproxy.cfg"),
        )
        .server_state(&admin_sock, d.join("server-state"))
        .reload_if(reload);
        extra(b).template(t).write(&config);
    };
    write(None);
    haconfd_once_no_reload(&config);
    let haproxy = Haproxy::start(&d.join("haproxy.cfg"));
    write(Some(
        Reload::master_socket(haproxy.master_socket()).timeout("10s"),
    ));
    let log = d.join("haconfd.log");
    let mut cmd = Command::new(haconfd_bin());
    cmd.arg("-c")
        .arg(&config)
        .args(["run", "--log-format", "json"]);
    let haconfd = Proc::spawn_logged("haconfd", cmd, &log);
    let lb = Lb {
        primary_port,
        _dir: dir,
        config,
        admin_sock,
        http_port,
        log,
        haproxy,
        haconfd,
    };
    assert!(
        wait_until(Duration::from_secs(10), || lb.log_text().contains("pass")),
        "haconfd did not run a first pass:\n{}",
        lb.log_text()
    );
    lb
}

impl Lb {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (op state, admin state) of `backend/server`.
    fn server(&self, backend: &str, server: &str) -> Option<(u8, u8)> {
        common::procs::server_state(&self.admin_sock, backend, server)
            .map(|(op, admin)| (op, admin as u8))
    }

    fn wait_server(&self, backend: &str, server: &str, want: (u8, u8), within: Duration) -> bool {
        wait_until(within, || self.server(backend, server) == Some(want))
    }

    fn status(&self) -> serde_json::Value {
        let (_, body) = http_get(self.http_port, "/status").expect("/status");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics").expect("/metrics").1
    }

    /// HAProxy's reload counter; retried while the master re-executes itself (its CLI resets
    /// connections for that moment).
    fn reloads(&self) -> u32 {
        let mut n = None;
        wait_until(Duration::from_secs(5), || {
            n = self.haproxy.try_show_proc().map(|p| p.reloads());
            n.is_some()
        });
        n.unwrap_or_else(|| panic!("no `show proc` answer:\n{}", self.diag()))
    }

    /// `primary` (within 3 s) UP and ready in the write backend, `other` DOWN there.
    fn assert_only_primary(&self, primary: &str, other: &str) {
        assert!(
            self.wait_server("primary", primary, (UP, READY), Duration::from_secs(3)),
            "{primary} not UP in the write backend:\n{}",
            self.diag()
        );
        assert_eq!(
            self.server("primary", other).map(|s| s.0),
            Some(DOWN),
            "{other} not DOWN in the write backend:\n{}",
            self.diag()
        );
    }

    fn admin(&self, cmd: &str) {
        unix_cmd(&self.admin_sock, cmd, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }

    /// Waits until `/metrics` reports the drift gauge at `value`.
    fn wait_drift(&self, value: u8) {
        let want = format!("haconfd_haproxy_primary_drift {value}");
        assert!(
            wait_until(Duration::from_secs(5), || self
                .metrics()
                .lines()
                .any(|l| l == want)),
            "no {want}:\n{}",
            self.diag()
        );
    }

    fn moves(&self) -> usize {
        self.log_text()
            .matches("HAProxy moved through the runtime API")
            .count()
    }

    fn diag(&self) -> String {
        format!(
            "--- show servers state:\n{}\n--- haconfd log:\n{}\n--- config {}",
            unix_cmd(
                &self.admin_sock,
                "show servers state",
                Duration::from_secs(2)
            )
            .unwrap_or_default(),
            self.log_text(),
            self.config.display()
        )
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.haconfd.stop(Duration::from_secs(5));
    }
}

const UP: u8 = 2;
const DOWN: u8 = 0;
const READY: u8 = 0;
const DRAIN: u8 = 8;

/// Two members, pg1 the leader (member key `master`, as Patroni 3 writes it), in a fresh scope.
fn two_members(tag: &str) -> (String, FakeMember, FakeMember) {
    let etcd = Etcd::shared();
    let prefix = format!("/service/{}/", unique_name(tag));
    let pg1 = FakeMember::start("pg1", Role::Primary);
    let pg2 = FakeMember::start("pg2", Role::Replica);
    etcd.put(&member_key(&prefix, &pg1), &pg1.member_json("master"));
    etcd.put(&member_key(&prefix, &pg2), &pg2.member_json("replica"));
    etcd.put(&format!("{prefix}leader"), "pg1");
    (prefix, pg1, pg2)
}

#[test]
fn a_new_leader_takes_writes_in_haproxy_only_once_it_confirms_it_takes_them() {
    let etcd = Etcd::shared();
    let (prefix, pg1, pg2) = two_members("fastpath");
    let lb = start(&prefix, &[("confirm_interval", "10ms")]);
    assert_eq!(
        lb.server("primary", "pg1"),
        Some((UP, READY)),
        "{}",
        lb.diag()
    );
    assert_eq!(lb.server("primary", "pg2").map(|s| s.0), Some(DOWN));

    // Switchover requested: the old primary takes no new connection.
    etcd.put(
        &format!("{prefix}failover"),
        r#"{"leader":"pg1","member":"pg2"}"#,
    );
    assert!(
        lb.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2)),
        "pg1 not drained after the switchover request:\n{}",
        lb.diag()
    );

    // The leader key moves to pg2 while PostgreSQL on it is still in recovery: its /primary
    // answers 200 already, but it must not take writes through HAProxy.
    pg2.set_role(Role::Promoting);
    etcd.delete(&format!("{prefix}leader"));
    etcd.put(&format!("{prefix}leader"), "pg2");
    etcd.put(&format!("{prefix}failover"), "{}");
    pg1.set_role(Role::Replica);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        lb.server("primary", "pg2").map(|s| s.0),
        Some(DOWN),
        "pg2 was set UP before it took writes:\n{}",
        lb.diag()
    );

    // It leaves recovery: HAProxy follows within milliseconds, the old primary is out and its
    // drain undone, and the new one leaves the replica backend.
    pg2.set_role(Role::Primary);
    let t0 = Instant::now();
    assert!(
        lb.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(2)),
        "pg2 not UP after it took writes:\n{}",
        lb.diag()
    );
    let took = t0.elapsed();
    assert_eq!(
        lb.server("primary", "pg1"),
        Some((DOWN, READY)),
        "{}",
        lb.diag()
    );
    assert_eq!(lb.server("replicas", "pg2").map(|s| s.0), Some(DOWN));
    println!(
        "RESULT fast path: pg2 UP {} ms after it took writes",
        took.as_millis()
    );
    assert!(took < Duration::from_millis(500), "took {took:?}");

    let st = lb.status();
    let tl = &st["last_failover"];
    assert_eq!(tl["new"], "pg2", "{st}");
    assert_eq!(tl["old"], "pg1", "{st}");
    assert_eq!(tl["confirmed_by"], "rest", "{st}");
    assert!(tl["haproxy_after_ms"].as_f64().is_some(), "{st}");
    assert!(
        lb.metrics()
            .contains("haconfd_failover_switch_seconds_count{consumer=\"haproxy\"} 1"),
        "{}",
        lb.metrics()
    );

    // The next member change keeps that state: pg3 joins through the runtime API (no reload),
    // DOWN in the primary backend, and pg2 stays the only primary.
    let before = lb.reloads();
    let pg3 = FakeMember::start("pg3", Role::Replica);
    etcd.put(&member_key(&prefix, &pg3), &pg3.member_json("replica"));
    assert!(
        wait_until(Duration::from_secs(10), || lb
            .server("replicas", "pg3")
            .is_some()),
        "pg3 never reached HAProxy:\n{}",
        lb.diag()
    );
    assert_eq!(lb.reloads(), before, "{}", lb.diag());
    lb.assert_only_primary("pg2", "pg1");
    assert_eq!(
        lb.server("primary", "pg3").map(|s| s.0),
        Some(DOWN),
        "{}",
        lb.diag()
    );
}

#[test]
fn a_candidate_that_never_takes_writes_is_never_forced_up() {
    let etcd = Etcd::shared();
    let (prefix, _pg1, pg2) = two_members("neverup");
    let lb = start(
        &prefix,
        &[("confirm_interval", "20ms"), ("confirm_timeout", "1s")],
    );
    pg2.set_role(Role::Promoting);
    etcd.put(&format!("{prefix}leader"), "pg2");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        lb.server("primary", "pg2").map(|s| s.0),
        Some(DOWN),
        "{}",
        lb.diag()
    );
    assert!(
        lb.log_text()
            .contains("did not confirm it takes writes before failover.confirm_timeout"),
        "{}",
        lb.diag()
    );
}

#[test]
fn a_cancelled_switchover_undoes_the_drain() {
    let etcd = Etcd::shared();
    let (prefix, _pg1, _pg2) = two_members("cancel");
    let lb = start(&prefix, &[]);
    etcd.put(
        &format!("{prefix}failover"),
        r#"{"leader":"pg1","member":"pg2"}"#,
    );
    assert!(
        lb.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2)),
        "{}",
        lb.diag()
    );
    // Patroni refuses the candidate and clears the request; pg1 keeps the leader key.
    etcd.delete(&format!("{prefix}failover"));
    assert!(
        lb.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2)),
        "drain not undone after the request was cleared:\n{}",
        lb.diag()
    );
}

#[test]
fn two_members_claiming_primary_resolve_by_the_leader_key_and_a_flapping_store_moves_once() {
    let etcd = Etcd::shared();
    let (prefix, pg1, pg2) = two_members("twoprim");
    let lb = start(&prefix, &[]);
    // pg2 takes the leader key in one step; both member keys say primary for a while.
    pg2.set_role(Role::Primary);
    etcd.put(&member_key(&prefix, &pg2), &pg2.member_json("primary"));
    etcd.put(&format!("{prefix}leader"), "pg2");
    lb.assert_only_primary("pg2", "pg1");
    let settled = lb.moves();
    // The store flaps: pg1's member key says primary, replica, primary ...; pg2's is rewritten.
    for i in 0..6 {
        let role = if i % 2 == 0 { "primary" } else { "replica" };
        etcd.put(&member_key(&prefix, &pg1), &pg1.member_json(role));
        etcd.put(&member_key(&prefix, &pg2), &pg2.member_json("primary"));
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lb.moves(), settled, "moves repeated:\n{}", lb.diag());
    assert_eq!(
        lb.server("primary", "pg2"),
        Some((UP, READY)),
        "{}",
        lb.diag()
    );
    assert_eq!(
        lb.server("primary", "pg1").map(|s| s.0),
        Some(DOWN),
        "{}",
        lb.diag()
    );
}

#[test]
fn haproxy_drifting_from_the_leader_is_reported_after_the_grace() {
    let (prefix, _pg1, _pg2) = two_members("drift");
    let lb = start(
        &prefix,
        &[("drift_interval", "100ms"), ("drift_grace", "500ms")],
    );
    // An operator (or anything else) sets a replica UP in the write backend.
    lb.admin("set server primary/pg2 health up");
    lb.wait_drift(1);
    assert!(
        lb.log_text()
            .contains("HAProxy's live primary servers disagree with etcd's leader"),
        "{}",
        lb.diag()
    );
    lb.admin("set server primary/pg2 health down");
    lb.wait_drift(0);
}

/// A crash: the leader's lease expires, taking its leader key and its member key with it, so
/// haproxy.cfg changes while the new leader is still promoting. A reload then would hand the
/// listeners to a new worker while the old one keeps the connections the hold action is holding,
/// and the runtime-API move reaches the new worker only: those clients would wait out the hold
/// and be closed. The reload waits for the confirmation instead, and a held client is served by
/// the new primary.
#[test]
fn a_crash_that_drops_members_changes_haproxy_only_after_the_new_primary_is_confirmed() {
    let etcd = Etcd::shared();
    let (prefix, pg1, pg2) = two_members("crashhold");
    let pg3 = FakeMember::start("pg3", Role::Replica);
    etcd.put(&member_key(&prefix, &pg3), &pg3.member_json("replica"));
    // As Patroni keeps them: the leader key and its member key on the leader's lease.
    let lease = etcd.put_with_lease(&format!("{prefix}leader"), "pg1", 60);
    etcd.put_on_lease(
        &member_key(&prefix, &pg1),
        &pg1.member_json("master"),
        lease,
    );
    let hold_lua = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/hold.lua");
    let lb = start_with(&prefix, |b| {
        b.var("hold_lua", &hold_lua).var("hold_max_ms", 8000)
    });
    assert!(
        lb.wait_server("primary", "pg3", (DOWN, READY), Duration::from_secs(5)),
        "{}",
        lb.diag()
    );
    let reloads = lb.reloads();

    // The lease of pg1 expires: its leader key and member key go in one revision; pg2 takes
    // the leader key while still in recovery.
    drop(pg1);
    pg2.set_role(Role::Promoting);
    etcd.revoke(lease);
    assert!(
        lb.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2)),
        "the lost leader was not fenced:\n{}",
        lb.diag()
    );
    etcd.put(&format!("{prefix}leader"), "pg2");

    // A client connects in the gap: no server takes writes, the hold action keeps it waiting.
    let port = lb.primary_port;
    let client = std::thread::spawn(move || -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(8)))?;
        s.write_all(b"hello\n")?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    });
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        lb.reloads(),
        reloads,
        "HAProxy was reloaded before the new primary was confirmed:\n{}",
        lb.diag()
    );

    pg2.set_role(Role::Primary);
    let served = client.join().unwrap();
    assert_eq!(
        served.as_ref().ok().map(String::as_str),
        Some("pg2"),
        "the held client was not handed to the new primary: {served:?}\n{}",
        lb.diag()
    );
    // The change waiting for the confirmation is applied after it: pg1 leaves the file and
    // HAProxy (deleted from HAProxy 2.9 on, parked in maintenance before), and pg2 stays the
    // only primary.
    let gone = |d: &str| {
        d.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 6 && f[3] == "pg1")
            .all(|f| f[6].parse::<u32>().unwrap_or(0) & 1 != 0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            unix_cmd(&lb.admin_sock, "show servers state", Duration::from_secs(2))
                .is_ok_and(|d| d.starts_with('1') && gone(&d))
        }),
        "haproxy.cfg change never applied:\n{}",
        lb.diag()
    );
    assert!(
        lb.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(3)),
        "{}",
        lb.diag()
    );
}
