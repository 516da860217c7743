//! End-to-end with Patroni's `etcd:` section (the v2 API), the setup that step-by-step guides
//! still write: a real Patroni 3.0.2 cluster (python3-etcd) on a 3-member etcd 3.4 cluster
//! started with `--enable-v2`, and the real `haconfd run` with `etcd.api = "v2"` rendering the
//! shipped `haproxy.cfg` template (checked by `haproxy -c`) and a leader/members list. One test
//! (it runs up to three PostgreSQL servers and three etcd members on two cores) walks through the
//! first render, a member joining, a switchover, an outage of haconfd's etcd member with a
//! switchover during it, and a stall of haconfd while more than etcd's 1000 remembered v2 events
//! go by, with a switchover among them. After each step the files name the leader Patroni
//! reports; `RESULT` lines give the timings.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::config::{ConfigBuilder, Template};
use common::patroni::{self, DcsSection, PatroniCluster, Timing};
use common::procs::{
    free_port, haconfd_bin, haconfd_once_no_reload, http_get, require_bin, temp_dir, wait_until,
    EtcdCluster, Proc,
};
use nix::sys::signal::Signal;

/// haconfd with the shipped haproxy.cfg template and a list template, reading etcd member 0.
struct Haconfd {
    dir: tempfile::TempDir,
    config: PathBuf,
    http_port: u16,
    proc: Option<Proc>,
}

impl Haconfd {
    fn new(endpoint: &str, scope: &str) -> Haconfd {
        let dir = temp_dir("e2e-v2");
        let d = dir.path();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        std::fs::copy(shipped.join("haproxy.cfg.tera"), d.join("haproxy.cfg.tera")).unwrap();
        std::fs::write(
            d.join("list.tera"),
            "leader={{ leader_name }}\n{% for m in members %}{{ m.name }} {{ m.role }} {{ m.address }}\n{% endfor %}",
        )
        .unwrap();
        let http_port = free_port();
        let config = ConfigBuilder::new()
            .api("v2")
            .endpoint(endpoint)
            .scope(scope)
            .etcd("keepalive_interval", "2s")
            .etcd("request_timeout", "2s")
            .etcd("connect_timeout", "1s")
            .daemon("min_interval", "100ms")
            .daemon("retry_interval", "1s")
            .http_listen(format!("127.0.0.1:{http_port}"))
            .var("bind_address", "127.0.0.1")
            .var("primary_port", free_port())
            .var("replica_port", free_port())
            .var("stats_port", free_port())
            .var("stats_socket", d.join("admin.sock"))
            .template(
                Template::new("haproxy", "haproxy.cfg.tera", d.join("haproxy.cfg")).check([
                    require_bin("haproxy").display().to_string().as_str(),
                    "-c",
                    "-f",
                    "{{staged}}",
                ]),
            )
            .template(Template::new("list", "list.tera", d.join("list.txt")))
            .write_in(d);
        Haconfd {
            dir,
            config,
            http_port,
            proc: None,
        }
    }

    fn once(&self) {
        haconfd_once_no_reload(&self.config);
    }

    fn run(&mut self) {
        let mut cmd = Command::new(haconfd_bin());
        cmd.arg("-c").arg(&self.config).arg("run");
        self.proc = Some(Proc::spawn_logged(
            "haconfd",
            cmd,
            &self.dir.path().join("haconfd.log"),
        ));
        assert!(
            wait_until(Duration::from_secs(20), || self.ready() == 200),
            "{}",
            self.log()
        );
    }

    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("haconfd running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haconfd.log")).unwrap_or_default()
    }

    fn list(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("list.txt")).unwrap_or_default()
    }

    fn haproxy_cfg(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.cfg")).unwrap_or_default()
    }

    fn ready(&self) -> u16 {
        http_get(self.http_port, "/readyz").map_or(0, |(c, _)| c)
    }

    fn status(&self) -> serde_json::Value {
        http_get(self.http_port, "/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// Waits until the list names `leader` as leader and every one of `members`; returns how
    /// long that took.
    fn wait_leader(&self, leader: &str, members: &[String], timeout: Duration) -> Duration {
        let t0 = Instant::now();
        let want = format!("leader={leader}\n");
        let ok = wait_until(timeout, || {
            let l = self.list();
            l.starts_with(&want)
                && members
                    .iter()
                    .all(|m| l.lines().any(|line| line.starts_with(&format!("{m} "))))
        });
        assert!(
            ok,
            "the list did not name leader {leader} and members {members:?} within {timeout:?}:\n{}\n--- haconfd log (tail):\n{}",
            self.list(),
            tail(&self.log(), 40)
        );
        t0.elapsed()
    }

    /// The file's leader line and server lines for `leader` in haproxy.cfg.
    fn assert_files_name(&self, leader: &str, members: &[String]) {
        let list = self.list();
        assert!(list.starts_with(&format!("leader={leader}\n")), "{list}");
        let cfg = self.haproxy_cfg();
        for m in members {
            assert!(
                cfg.contains(&format!("server {m} ")),
                "haproxy.cfg has no server {m}:\n{cfg}"
            );
        }
    }
}

impl Drop for Haconfd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[e2e-v2] haconfd in {}:\n{}",
                self.dir.path().display(),
                tail(&self.log(), 60)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `action` while a thread polls `key_changed` and `file_changed` every 2 ms, and returns
/// what `action` returned and how long after the key's change the file changed (`None` if either
/// was not seen within 15 s).
fn key_to_file<T>(
    key_changed: impl Fn() -> bool + Sync,
    file_changed: impl Fn() -> bool + Sync,
    action: impl FnOnce() -> T,
) -> (T, Option<Duration>) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let t0 = Instant::now();
            let (mut key, mut file) = (None, None);
            while t0.elapsed() < Duration::from_secs(60) {
                if key.is_none() && key_changed() {
                    key = Some(Instant::now());
                }
                if file.is_none() && file_changed() {
                    file = Some(Instant::now());
                }
                let done = key.is_some() && file.is_some();
                if done
                    || stop.load(std::sync::atomic::Ordering::Relaxed)
                        && t0.elapsed() > Duration::from_secs(15)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Some(file?.saturating_duration_since(key?))
        });
        let out = action();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, poller.join().expect("poller"))
    })
}

fn names(cluster: &PatroniCluster) -> Vec<String> {
    cluster.nodes().iter().map(|n| n.name.clone()).collect()
}

#[test]
fn patroni_etcd_v2_render_join_switchover_outage_and_cleared_history() {
    let t0 = Instant::now();
    let etcd = EtcdCluster::start_v2(3);
    let scope = "e2ev2";
    let mut cluster = PatroniCluster::start_with_dcs(
        &etcd.endpoints_csv(),
        scope,
        2,
        Timing::default(),
        DcsSection::Etcd,
    );
    let prefix = cluster.key_prefix();
    // Patroni's keys are in the v2 store, under the same paths, and not in the v3 one.
    let v2_keys: Vec<String> = etcd
        .member(0)
        .v2_get_prefix(&prefix)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    println!("RESULT patroni_v2_keys {v2_keys:?}");
    for k in ["leader", "members/", "config", "initialize"] {
        assert!(
            v2_keys
                .iter()
                .any(|key| key.starts_with(&format!("{prefix}{k}"))),
            "no {prefix}{k} among Patroni's v2 keys {v2_keys:?}"
        );
    }
    assert!(etcd.member(0).get_prefix(&prefix).is_empty());

    // The first render, then the daemon.
    let leader = cluster.wait_leader(None, patroni::SWITCH_TIMEOUT).unwrap();
    let mut h = Haconfd::new(&etcd.member(0).endpoint(), scope);
    h.once();
    h.assert_files_name(&leader, &names(&cluster));
    h.run();
    h.wait_leader(&leader, &names(&cluster), Duration::from_secs(5));

    // A member joins: from its member key in etcd to the files.
    let list_path = h.dir.path().join("list.txt");
    let read_list = || std::fs::read_to_string(&list_path).unwrap_or_default();
    let joining = format!("pg{}", cluster.nodes().len() + 1);
    let member_key = format!("{prefix}members/{joining}");
    let (new, join) = key_to_file(
        || etcd.member(1).v2_get(&member_key).is_some(),
        || read_list().contains(&format!("\n{joining} ")),
        || cluster.add_member(),
    );
    assert_eq!(new, joining);
    h.wait_leader(&leader, &names(&cluster), Duration::from_secs(20));
    h.assert_files_name(&leader, &names(&cluster));
    println!("RESULT member_join {new} member_key_to_files={join:?}");

    // A switchover: from the leader key's change in etcd to the files.
    let leader_key = format!("{prefix}leader");
    let moved = |l: Option<String>| l.is_some_and(|l| l != leader && !l.is_empty());
    let file_leader = || {
        read_list()
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("leader="))
            .map(String::from)
    };
    let (second, sw) = key_to_file(
        || moved(etcd.member(1).v2_get(&leader_key)),
        || moved(file_leader()),
        || cluster.switchover(None),
    );
    h.wait_leader(&second, &names(&cluster), Duration::from_secs(10));
    h.assert_files_name(&second, &names(&cluster));
    println!("RESULT switchover {leader}->{second} leader_key_to_files={sw:?}");
    cluster
        .wait_healthy(patroni::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("cluster not healthy after the switchover: {e:#}"));

    // haconfd's etcd member goes away; Patroni goes on with the other two, and switches over.
    let before = (h.list(), h.haproxy_cfg());
    etcd.member(0).stop();
    assert!(
        wait_until(Duration::from_secs(10), || h.ready() == 503),
        "{}",
        tail(&h.log(), 30)
    );
    let third = cluster.switchover(None);
    assert_eq!(
        (h.list(), h.haproxy_cfg()),
        before,
        "the files changed while haconfd's etcd was down"
    );
    cluster
        .wait_healthy(patroni::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("cluster not healthy after the switchover: {e:#}"));
    assert_eq!(h.list(), before.0);
    etcd.member(0).restart();
    let back = Instant::now();
    h.wait_leader(&third, &names(&cluster), Duration::from_secs(10));
    let caught_up = back.elapsed();
    h.assert_files_name(&third, &names(&cluster));
    assert!(wait_until(Duration::from_secs(5), || h.ready() == 200));
    println!(
        "RESULT etcd_outage switchover_during_it {second}->{third} caught_up_after={caught_up:?}"
    );

    // haconfd stalls while more than the 1000 events etcd's v2 history keeps go by, a switchover
    // among them: its watch index is cleared, and it lists again.
    let relists = h.status()["relists"].as_u64().unwrap_or(0);
    h.proc().signal(Signal::SIGSTOP).unwrap();
    let start = etcd.member(1).v2_index();
    for i in 0..600 {
        etcd.member(1).v2_put("/elsewhere/noise", &i.to_string());
    }
    let fourth = cluster.switchover(None);
    for i in 0..600 {
        etcd.member(2).v2_put("/elsewhere/noise", &i.to_string());
    }
    assert!(etcd.member(1).v2_index() - start > 1000);
    h.proc().signal(Signal::SIGCONT).unwrap();
    let resumed = Instant::now();
    h.wait_leader(&fourth, &names(&cluster), Duration::from_secs(10));
    let cleared_after = resumed.elapsed();
    h.assert_files_name(&fourth, &names(&cluster));
    let log = h.log();
    assert!(
        log.contains("cleared from etcd's v2 event history"),
        "{}",
        tail(&log, 30)
    );
    let st = h.status();
    assert!(
        st["relists"].as_u64().unwrap_or(0) > relists,
        "no re-list counted: {st}"
    );
    println!(
        "RESULT history_cleared switchover {third}->{fourth} files_after_resume={cleared_after:?}"
    );

    // Patroni's REST API and the files agree at the end, and no pass failed.
    let rest_leader = cluster.leader().expect("a leader");
    h.assert_files_name(&rest_leader, &names(&cluster));
    assert_eq!(st["failed_passes"], 0, "{st}");
    println!(
        "RESULT e2e_patroni_v2 passes={} took={:.1}s",
        st["passes"],
        t0.elapsed().as_secs_f64()
    );
}
