//! The etcd v2 source (`etcd.api = "v2"`, Patroni's `etcd:` section) against real etcd 3.4
//! processes started with `--enable-v2`: list and watch (puts, deletes, TTL expiry, a deleted
//! directory), the setting through the file, `HACONFD_ETCD_API` and `--etcd-api`, one clear error
//! from an etcd without v2, several endpoints with the one in use stopping, an outage of
//! haconfd's endpoint, the event history cleared past the watch index, a quiet scope next to a
//! busy prefix (no re-list), a hung etcd, TLS with client certificates, and basic auth.
//! Throughout, the last good file stays and nothing is lost.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{write_list_config, ConfigBuilder};
use common::procs::{
    free_port, haconfd_bin, http_get, require_bin, temp_dir, unique_name, wait_until, Etcd,
    EtcdCluster, Proc,
};
use nix::sys::signal::Signal;

fn member(port: u16) -> String {
    format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica"}}"#,
        port + 1000
    )
}

struct Daemon {
    dir: tempfile::TempDir,
    config: PathBuf,
    http_port: u16,
}

impl Daemon {
    /// A config rendering the leader and one line per member into `out.txt`, on etcd's default
    /// API.
    fn new(endpoints: &[String], scope: &str) -> Daemon {
        Daemon::with(endpoints, scope, |b| b)
    }

    /// [`Daemon::new`] with more `[etcd]` settings (`api`, credentials, `[etcd.tls]`) from
    /// `extra`.
    fn with(
        endpoints: &[String],
        scope: &str,
        extra: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Daemon {
        let dir = temp_dir("etcd-v2");
        let http_port = free_port();
        let config = write_list_config(dir.path(), endpoints, scope, http_port, extra);
        Daemon {
            dir,
            config,
            http_port,
        }
    }

    fn v2(endpoints: &[String], scope: &str) -> Daemon {
        Daemon::with(endpoints, scope, |b| b.api("v2"))
    }

    fn run(&self) -> Proc {
        let mut cmd = std::process::Command::new(haconfd_bin());
        cmd.arg("-c").arg(&self.config).arg("run");
        Proc::spawn_logged("haconfd", cmd, &self.dir.path().join("haconfd.log"))
    }

    /// Runs the daemon and waits until it reports ready.
    fn run_ready(&self, timeout: Duration) -> Proc {
        let p = self.run();
        assert!(wait_until(timeout, || self.ready() == 200), "{}", p.log());
        p
    }

    /// A one-shot mode with extra arguments and environment.
    fn oneshot(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = std::process::Command::new(haconfd_bin());
        cmd.arg("-c").arg(&self.config).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn out(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("out.txt")).unwrap_or_default()
    }

    fn ready(&self) -> u16 {
        http_get(self.http_port, "/readyz").map_or(0, |(c, _)| c)
    }

    fn status(&self) -> serde_json::Value {
        http_get(self.http_port, "/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }
}

fn seed(put: impl Fn(&str, &str) -> i64, scope: &str, n: u16) {
    for i in 1..=n {
        put(
            &format!("/service/{scope}/members/pg{i}"),
            &member(15440 + i),
        );
    }
    put(&format!("/service/{scope}/leader"), "pg1");
}

/// A v2 etcd whose scope (named after `tag`) holds `n` members with pg1 leading, and haconfd
/// following it, ready.
fn v2_scope_followed(tag: &str, n: u16) -> (Etcd, String, Daemon, Proc) {
    let etcd = Etcd::start_v2();
    let scope = unique_name(tag);
    seed(|k, v| etcd.v2_put(k, v), &scope, n);
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    (etcd, scope, d, p)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Median and maximum of a sample.
fn spread(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    (d[d.len() / 2], d[d.len() - 1])
}

/// Puts a new leader every 300 ms, alternating pg3 and pg1 (the file starts at pg1), and
/// measures how long each takes to reach the file, polling it every millisecond.
fn change_latencies(d: &Daemon, put: impl Fn(&str, &str), scope: &str, n: u16) -> Vec<Duration> {
    let key = format!("/service/{scope}/leader");
    (0..n)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(300));
            let who = if i % 2 == 0 { "pg3" } else { "pg1" };
            let want = format!("leader={who}\n");
            let t0 = Instant::now();
            put(&key, who);
            while !d.out().starts_with(&want) {
                assert!(t0.elapsed() < Duration::from_secs(5), "{}", d.out());
                std::thread::sleep(Duration::from_millis(1));
            }
            t0.elapsed()
        })
        .collect()
}

#[test]
fn run_follows_v2_keys_puts_deletes_expiry_and_directories_and_its_latency_matches_v3() {
    let etcd = Etcd::start_v2();
    let scope = unique_name("v2run");
    seed(|k, v| etcd.v2_put(k, v), &scope, 3);
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(3), || d
            .out()
            .contains("pg3 127.0.0.1:15443")),
        "{}\n{}",
        d.out(),
        p.log()
    );
    assert!(d.out().starts_with("leader=pg1\n"), "{}", d.out());

    // A put, a delete, and a member key whose TTL runs out (Patroni's crashed node).
    etcd.v2_put(&format!("/service/{scope}/members/pg4"), &member(15444));
    assert!(wait_until(Duration::from_secs(3), || d
        .out()
        .contains("pg4 ")));
    etcd.v2_delete(&format!("/service/{scope}/members/pg2"));
    assert!(wait_until(Duration::from_secs(3), || !d
        .out()
        .contains("pg2 ")));
    etcd.v2_put_ttl(&format!("/service/{scope}/members/pg5"), &member(15445), 1);
    assert!(wait_until(Duration::from_secs(3), || d
        .out()
        .contains("pg5 ")));
    assert!(
        wait_until(Duration::from_secs(5), || !d.out().contains("pg5 ")),
        "an expired member stayed:\n{}\n{}",
        d.out(),
        p.log()
    );
    // Keys outside the scope and in a sibling scope change nothing.
    let before = d.out();
    etcd.v2_put(&format!("/service/{scope}x/members/pg9"), &member(15449));
    etcd.v2_put("/elsewhere/k", "v");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.out(), before);

    // Latency of a leader change to the file, v2 here, v3 on the same etcd and machine.
    let v2 = change_latencies(
        &d,
        |k, v| {
            etcd.v2_put(k, v);
        },
        &scope,
        15,
    );
    let scope3 = unique_name("v3run");
    seed(|k, v| etcd.put(k, v), &scope3, 3);
    let d3 = Daemon::new(&[etcd.endpoint()], &scope3);
    let p3 = d3.run_ready(Duration::from_secs(10));
    let v3 = change_latencies(
        &d3,
        |k, v| {
            etcd.put(k, v);
        },
        &scope3,
        15,
    );
    drop(p3);
    let ((m2, x2), (m3, x3)) = (spread(v2), spread(v3));
    println!("RESULT change_to_file v2 median={m2:?} max={x2:?} v3 median={m3:?} max={x3:?}");
    assert!(x2 < Duration::from_secs(1), "v2 change to file took {x2:?}");

    // The whole scope deleted at once (`patronictl remove`): the guard keeps the last file.
    let before = d.out();
    etcd.v2_delete_dir(&format!("/service/{scope}"));
    assert!(
        wait_until(Duration::from_secs(5), || d.status()["failed_passes"]
            .as_u64()
            .unwrap_or(0)
            >= 1),
        "{}\n{}",
        d.status(),
        p.log()
    );
    assert_eq!(d.out(), before);
    assert!(
        p.log().contains("etcd shows no valid member in cluster"),
        "{}",
        p.log()
    );
    assert_eq!(d.status()["relists"], 0, "{}", d.status());
}

#[test]
fn the_setting_comes_from_the_file_haconfd_etcd_api_or_etcd_api_and_the_wrong_one_says_so() {
    let etcd = Etcd::start_v2();
    let scope = unique_name("v2once");
    seed(|k, v| etcd.v2_put(k, v), &scope, 2);

    // In the file.
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let out = d.oneshot(&["once"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(d.out().contains("pg2 127.0.0.1:15442"), "{}", d.out());

    // Not in the file (v3 by default): the environment, and the flag above it.
    let d = Daemon::new(&[etcd.endpoint()], &scope);
    let out = d.oneshot(&["render"], &[("HACONFD_ETCD_API", "v2")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("leader=pg1\n"));
    let out = d.oneshot(
        &["--etcd-api", "v2", "check"],
        &[("HACONFD_ETCD_API", "v3")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = d.oneshot(&["--etcd-api", "v4", "check"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // The v3 API does not see v2 keys: the guard refuses the empty view, and the log says why.
    let out = d.oneshot(&["once"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("set etcd.api = \\\"v2\\\"") || err.contains("set etcd.api = \"v2\""),
        "{err}"
    );
    // And the reverse: v3 keys, read through v2.
    let scope3 = unique_name("v3only");
    seed(|k, v| etcd.put(k, v), &scope3, 2);
    let d = Daemon::v2(&[etcd.endpoint()], &scope3);
    let out = d.oneshot(&["once"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("etcd3:"), "{err}");
}

#[test]
fn an_etcd_without_v2_is_one_clear_error_that_says_what_to_change() {
    // etcd 3.4 without --enable-v2 answers 404 on /v2/keys, as etcd 3.6 does.
    let etcd = Etcd::start();
    let scope = unique_name("nov2");
    seed(|k, v| etcd.put(k, v), &scope, 2);
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    for mode in [&["once"][..], &["render"], &["check"]] {
        let t0 = Instant::now();
        let out = d.oneshot(mode, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{mode:?}: {err}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{mode:?} retried a permanent error: {:?}",
            t0.elapsed()
        );
        let last = err.lines().last().unwrap_or("");
        for needle in [
            "does not serve the v2 API",
            "--enable-v2",
            "`etcd3:`",
            "etcd.api = \"v3\"",
            &etcd.endpoint(),
        ] {
            assert!(last.contains(needle), "{mode:?}: no {needle:?} in {last}");
        }
    }
    // `run` keeps trying and shows the same reason in /readyz.
    let p = d.run();
    let mut body = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            body = http_get(d.http_port, "/readyz")
                .map(|(_, b)| b)
                .unwrap_or_default();
            body.contains("--enable-v2")
        }),
        "{body}\n{}",
        p.log()
    );
    assert!(p.log().contains("does not serve the v2 API"), "{}", p.log());
}

#[test]
fn several_endpoints_a_dead_one_then_the_one_in_use_stopped_fail_no_change() {
    let cluster = EtcdCluster::start_v2(3);
    let scope = unique_name("v2eps");
    seed(|k, v| cluster.v2_put(k, v), &scope, 3);
    // A dead endpoint first: nothing listens there.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let endpoints: Vec<String> = std::iter::once(dead).chain(cluster.endpoints()).collect();
    let d = Daemon::v2(&endpoints, &scope);
    let p = d.run_ready(Duration::from_secs(15));
    for i in 0..10u16 {
        let port = 16000 + i;
        cluster.v2_put(&format!("/service/{scope}/members/pg3"), &member(port));
        assert!(
            wait_until(Duration::from_secs(5), || d
                .out()
                .contains(&format!("pg3 127.0.0.1:{port}"))),
            "change {i} not applied:\n{}",
            p.log()
        );
    }
    // The member haconfd lists and watches from goes away: it moves to the next one.
    cluster.member(0).stop();
    let t0 = Instant::now();
    cluster
        .member(1)
        .v2_put(&format!("/service/{scope}/leader"), "pg2");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .out()
            .starts_with("leader=pg2\n")),
        "{}\n{}",
        d.out(),
        p.log()
    );
    println!(
        "RESULT endpoint_in_use_stopped change_applied_after={:?}",
        t0.elapsed()
    );
    let st = d.status();
    assert_eq!(st["failed_passes"], 0, "{st}");
}

#[test]
fn outage_of_haconfds_endpoint_keeps_files_then_relists_and_catches_up() {
    let cluster = EtcdCluster::start_v2(3);
    let scope = unique_name("v2outage");
    seed(|k, v| cluster.v2_put(k, v), &scope, 3);
    // haconfd talks to member 0 only; a second client writes through member 1.
    let d = Daemon::v2(&[cluster.member(0).endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    let before = d.out();

    cluster.member(0).stop();
    assert!(
        wait_until(Duration::from_secs(10), || d.ready() == 503),
        "{}",
        p.log()
    );
    let m1 = cluster.member(1);
    m1.v2_put(&format!("/service/{scope}/leader"), "pg2");
    m1.v2_put(&format!("/service/{scope}/members/pg4"), &member(15444));
    m1.v2_delete(&format!("/service/{scope}/members/pg3"));
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(15) {
        assert_eq!(d.out(), before, "the file changed during the outage");
        assert!(p.is_running());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(p.log().contains("etcd unreachable"), "{}", p.log());

    cluster.member(0).restart();
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let o = d.out();
            o.starts_with("leader=pg2\n") && o.contains("pg4 ") && !o.contains("pg3 ")
        }),
        "did not catch up:\n{}\n{}",
        d.out(),
        p.log()
    );
    let caught_up = back.elapsed();
    println!("RESULT v2 outage=15s caught_up_after={caught_up:?}");
    assert!(
        caught_up < Duration::from_millis(1500),
        "caught up after {caught_up:?}"
    );
    assert!(wait_until(Duration::from_secs(3), || d.ready() == 200));
    assert!(p.log().contains("etcd reachable again"), "{}", p.log());
}

#[test]
fn history_cleared_past_the_watch_index_relists_without_losing_state() {
    let etcd = Etcd::start_v2();
    let scope = unique_name("v2cleared");
    seed(|k, v| etcd.v2_put(k, v), &scope, 3);
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));

    // haconfd stalls while more than the 1000 events etcd's v2 history keeps are written: a
    // heartbeat-like rewrite of one member in the scope and writes elsewhere, then real changes.
    p.signal(Signal::SIGSTOP).unwrap();
    let start = etcd.v2_index();
    for i in 0..1100 {
        if i % 2 == 0 {
            etcd.v2_put(&format!("/service/{scope}/members/pg1"), &member(15441));
        } else {
            etcd.v2_put("/elsewhere/noise", &i.to_string());
        }
    }
    etcd.v2_put(&format!("/service/{scope}/leader"), "pg3");
    etcd.v2_delete(&format!("/service/{scope}/members/pg2"));
    etcd.v2_put(&format!("/service/{scope}/members/pg5"), &member(15445));
    assert!(etcd.v2_index() - start > 1000);
    p.signal(Signal::SIGCONT).unwrap();

    assert!(
        wait_until(Duration::from_secs(10), || {
            let o = d.out();
            o.starts_with("leader=pg3\n") && o.contains("pg5 ") && !o.contains("pg2 ")
        }),
        "{}\n{}",
        d.out(),
        p.log()
    );
    assert!(
        p.log().contains("cleared from etcd's v2 event history") && p.log().contains("re-listing"),
        "{}",
        p.log()
    );
    let st = d.status();
    assert!(st["relists"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert_eq!(st["failed_passes"], 0, "{st}");
    // The watch goes on after the re-list.
    etcd.v2_put(&format!("/service/{scope}/leader"), "pg1");
    assert!(wait_until(Duration::from_secs(3), || d
        .out()
        .starts_with("leader=pg1\n")));
}

/// A quiet scope next to a busy neighbour: 1500 writes to another scope's prefix (more than the
/// 1000 events etcd's v2 history keeps, at most about 300 per 2 s long poll), none in the scope.
/// A poll that ends without an event moves the watch index to etcd's index when it took the poll,
/// so no poll falls out of the history: no re-list, and the scope's next change comes through the
/// watch.
#[test]
fn a_quiet_scope_next_to_a_busy_prefix_keeps_up_without_relisting() {
    let (etcd, scope, d, p) = v2_scope_followed("v2quiet", 3);
    let start = etcd.v2_index();
    let t0 = Instant::now();
    let per_second = 150;
    for i in 0..1500u32 {
        let due = t0 + Duration::from_millis(u64::from(i) * 1000 / per_second);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        etcd.v2_put(
            &format!("/service/{scope}-busy/members/pg{}", i % 10),
            &member(15450 + (i % 10) as u16),
        );
        assert!(t0.elapsed() < Duration::from_secs(60), "writes too slow");
    }
    let written = etcd.v2_index() - start;
    assert!(written > 1000, "only {written} events");
    // The scope's own change, through the watch.
    etcd.v2_put(&format!("/service/{scope}/leader"), "pg3");
    let pg3 = |out: String| out.starts_with("leader=pg3\n");
    let followed = wait_until(Duration::from_secs(5), || pg3(d.out()));
    assert!(followed, "{}\n{}", d.out(), p.log());
    let st = d.status();
    println!(
        "RESULT v2 busy_neighbour events={written} over {:?} relists={}",
        t0.elapsed(),
        st["relists"]
    );
    assert_eq!(st["relists"], 0, "{st}\n{}", p.log());
    assert!(!p.log().contains("re-listing"), "{}", p.log());
    assert_eq!(st["failed_passes"], 0, "{st}");
}

#[test]
fn hung_etcd_is_detected_within_a_poll_and_a_request_timeout() {
    let etcd = Etcd::start_v2();
    let scope = unique_name("v2hung");
    seed(|k, v| etcd.v2_put(k, v), &scope, 2);
    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    let before = d.out();

    etcd.pause();
    let t0 = Instant::now();
    // keepalive_interval 2 s (one long poll) + request_timeout 2 s (the next poll's headers).
    let detected = wait_until(Duration::from_secs(8), || d.ready() == 503);
    let took = t0.elapsed();
    assert!(detected, "a hung etcd was not detected:\n{}", p.log());
    println!("RESULT v2 hang_detected_after={took:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.out(), before);
    etcd.resume();
    etcd.v2_put(&format!("/service/{scope}/leader"), "pg2");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .out()
            .starts_with("leader=pg2\n")),
        "{}",
        p.log()
    );
    assert!(wait_until(Duration::from_secs(3), || d.ready() == 200));
}

fn write_certs(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    };
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
    leaf(vec!["haconfd".into()], "client");
}

#[test]
fn tls_with_client_certificates() {
    require_bin("etcdctl");
    let certs = temp_dir("certs");
    write_certs(certs.path());
    let c = |n: &str| certs.path().join(n).display().to_string();
    let etcd = Etcd::start_tls_v2(&c("server.pem"), &c("server-key.pem"), &c("ca.pem"));
    let scope = unique_name("v2tls");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "2")
            .args([
                &format!("--endpoints={}", etcd.endpoint()),
                &format!("--ca-file={}", c("ca.pem")),
                &format!("--cert-file={}", c("client.pem")),
                &format!("--key-file={}", c("client-key.pem")),
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    };
    for i in 1..=2 {
        ctl(&[
            "set",
            &format!("/service/{scope}/members/pg{i}"),
            &member(15440 + i),
        ]);
    }
    ctl(&["set", &format!("/service/{scope}/leader"), "pg1"]);
    // v2 over TLS, trusting the CA or not, with a client key file.
    let tls = |with_ca: bool, key: String| {
        move |b: ConfigBuilder| {
            let b = b.api("v2");
            let b = if with_ca {
                b.etcd_tls("ca", c("ca.pem"))
            } else {
                b
            };
            b.etcd_tls("cert", c("client.pem")).etcd_tls("key", key)
        }
    };
    let d = Daemon::with(&[etcd.endpoint()], &scope, tls(true, c("client-key.pem")));
    let ok = d.oneshot(&["once"], &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert!(d.out().contains("pg1 127.0.0.1:15441"), "{}", d.out());

    // `run` watches over TLS too.
    let p = d.run_ready(Duration::from_secs(10));
    ctl(&["set", &format!("/service/{scope}/leader"), "pg2"]);
    assert!(
        wait_until(Duration::from_secs(5), || d
            .out()
            .starts_with("leader=pg2\n")),
        "{}",
        p.log()
    );
    drop(p);

    // Without the CA the server is not trusted: exit 3, nothing written.
    let before = d.out();
    let d2 = Daemon::with(&[etcd.endpoint()], &scope, tls(false, c("client-key.pem")));
    let out = d2.oneshot(&["once"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    assert_eq!(d.out(), before);
    // A key file that holds no key is a clear error at once.
    let d3 = Daemon::with(&[etcd.endpoint()], &scope, tls(true, c("ca.pem")));
    let t0 = Instant::now();
    let out = d3.oneshot(&["once"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        stderr(&out).contains("ca.pem") && stderr(&out).contains("private key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn basic_auth_reads_with_the_password_and_refusals_are_clear_at_once() {
    let etcd = Etcd::start_v2();
    let scope = unique_name("v2auth");
    seed(|k, v| etcd.v2_put(k, v), &scope, 2);
    // etcd's v2 auth: root, a reader of /service/*, and a guest role that may read nothing.
    let admin = |method: &str, path: &str, json: &str| {
        let a = etcd
            .v2_request_json(method, path, json, Some(("root", "rootpw")))
            .unwrap();
        assert!((200..300).contains(&a.status), "{method} {path}: {a:?}");
    };
    let anon = |method: &str, path: &str, json: &str| {
        let a = etcd.v2_request_json(method, path, json, None).unwrap();
        assert!((200..300).contains(&a.status), "{method} {path}: {a:?}");
    };
    anon(
        "PUT",
        "/v2/auth/users/root",
        r#"{"user":"root","password":"rootpw"}"#,
    );
    anon(
        "PUT",
        "/v2/auth/users/haconfd",
        r#"{"user":"haconfd","password":"s3cret-pw"}"#,
    );
    anon(
        "PUT",
        "/v2/auth/roles/reader",
        r#"{"role":"reader","permissions":{"kv":{"read":["/service/*"],"write":[]}}}"#,
    );
    anon(
        "PUT",
        "/v2/auth/users/haconfd",
        r#"{"user":"haconfd","grant":["reader"]}"#,
    );
    anon("PUT", "/v2/auth/enable", "");
    // Enabling auth gives the guest role read and write on everything; take it back.
    admin(
        "PUT",
        "/v2/auth/roles/guest",
        r#"{"role":"guest","revoke":{"kv":{"read":["/*"],"write":["/*"]}}}"#,
    );

    let d = Daemon::with(&[etcd.endpoint()], &scope, |b| {
        b.api("v2").etcd("username", "haconfd")
    });
    let once = |password: &str| {
        d.oneshot(
            &["--log-level", "debug", "once"],
            &[("HACONFD_ETCD_PASSWORD", password)],
        )
    };
    let ok = once("s3cret-pw");
    let log = stderr(&ok);
    assert_eq!(ok.status.code(), Some(0), "{log}");
    assert!(d.out().contains("pg2 127.0.0.1:15442"), "{}", d.out());
    assert!(!log.contains("s3cret-pw"), "the password leaked:\n{log}");

    let t0 = Instant::now();
    let bad = once("wrong");
    let log = stderr(&bad);
    assert_eq!(bad.status.code(), Some(3), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        log.contains(&format!(
            "refused reading /service/{scope}/ to user \"haconfd\""
        )) && log.contains("Insufficient credentials"),
        "{log}"
    );

    let d = Daemon::v2(&[etcd.endpoint()], &scope);
    let out = d.oneshot(&["once"], &[]);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(
        log.contains(&format!(
            "refused reading /service/{scope}/ without credentials"
        )) && log.contains("set etcd.username"),
        "{log}"
    );
}
