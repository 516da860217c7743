//! etcd faults and security against real etcd processes: a 60 s outage of haconfd's endpoint while
//! a second client writes through another member, a hung etcd (SIGSTOP) detected by keepalive, one
//! dead endpoint of three, compaction past haconfd's revision, starting with etcd down, and TLS and
//! user/password auth. Throughout, the last good file stays and nothing is lost.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{write_list_config, ConfigBuilder};
use common::procs::{
    free_port, haconfd_bin, http_get, require_bin, temp_dir, unique_name, wait_until, Etcd,
    EtcdCluster, Proc,
};

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
    /// A config rendering one line per member into `out.txt`.
    fn new(endpoints: &[String], scope: &str) -> Daemon {
        Daemon::with(endpoints, scope, |b| b)
    }

    /// [`Daemon::new`] with more settings (credentials, `[etcd.tls]`) from `extra`.
    fn with(
        endpoints: &[String],
        scope: &str,
        extra: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> Daemon {
        let dir = temp_dir("faults");
        let http_port = free_port();
        let config = write_list_config(dir.path(), endpoints, scope, http_port, extra);
        Daemon {
            dir,
            config,
            http_port,
        }
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

#[test]
fn sixty_second_outage_keeps_files_and_catches_up_with_writes_made_meanwhile() {
    let cluster = EtcdCluster::start(3);
    let scope = unique_name("outage60");
    seed(|k, v| cluster.put(k, v), &scope, 3);
    // haconfd talks to member 0 only; a second client keeps writing through member 1.
    let d = Daemon::new(&[cluster.member(0).endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    let before = d.out();

    cluster.member(0).stop();
    assert!(
        wait_until(Duration::from_secs(10), || d.ready() == 503),
        "{}",
        p.log()
    );
    cluster
        .member(1)
        .put(&format!("/service/{scope}/leader"), "pg2");
    cluster
        .member(1)
        .put(&format!("/service/{scope}/members/pg4"), &member(15444));
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(60) {
        assert_eq!(d.out(), before, "the file changed during the outage");
        assert!(p.is_running());
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(p.log().contains("etcd unreachable"), "{}", p.log());

    cluster.member(0).restart();
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || d.out().contains("leader=pg2")
            && d.out().contains("pg4 ")),
        "did not catch up:\n{}",
        p.log()
    );
    let caught_up = back.elapsed();
    println!("RESULT outage=60s caught_up_after={caught_up:?}");
    assert!(
        caught_up < Duration::from_millis(1500),
        "caught up after {caught_up:?}"
    );
    assert!(wait_until(Duration::from_secs(3), || d.ready() == 200));
}

#[test]
fn hung_etcd_is_detected_by_keepalive_and_treated_as_an_outage() {
    let etcd = Etcd::start();
    let scope = unique_name("hung");
    seed(|k, v| etcd.put(k, v), &scope, 2);
    let d = Daemon::new(&[etcd.endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));
    let before = d.out();

    etcd.pause();
    let t0 = Instant::now();
    let detected = wait_until(Duration::from_secs(12), || d.ready() == 503);
    let took = t0.elapsed();
    assert!(detected, "a hung etcd was not detected:\n{}", p.log());
    println!("RESULT hang_detected_after={took:?}");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(took));
    assert_eq!(d.out(), before);
    etcd.resume();
    etcd.put(&format!("/service/{scope}/leader"), "pg2");
    assert!(
        wait_until(Duration::from_secs(10), || d.out().contains("leader=pg2")),
        "{}",
        p.log()
    );
    assert!(wait_until(Duration::from_secs(3), || d.ready() == 200));
}

#[test]
fn one_dead_endpoint_of_three_fails_no_pass() {
    let cluster = EtcdCluster::start(3);
    let scope = unique_name("deadep");
    seed(|k, v| cluster.put(k, v), &scope, 3);
    cluster.member(2).stop();
    let d = Daemon::new(&cluster.endpoints(), &scope);
    let p = d.run_ready(Duration::from_secs(15));
    for i in 0..20u16 {
        let port = 16000 + i;
        cluster.put(&format!("/service/{scope}/members/pg3"), &member(port));
        assert!(
            wait_until(Duration::from_secs(10), || d
                .out()
                .contains(&format!("pg3 127.0.0.1:{port}"))),
            "change {i} not applied:\n{}",
            p.log()
        );
    }
    let st = d.status();
    assert_eq!(st["failed_passes"], 0, "{st}");
    assert!(st["passes"].as_u64().unwrap_or(0) >= 20, "{st}");
}

#[test]
fn compaction_past_the_watch_revision_relists_without_losing_state() {
    let cluster = EtcdCluster::start(3);
    let scope = unique_name("compact");
    seed(|k, v| cluster.put(k, v), &scope, 3);
    let d = Daemon::new(&[cluster.member(0).endpoint()], &scope);
    let p = d.run_ready(Duration::from_secs(10));

    cluster.member(0).stop();
    assert!(wait_until(Duration::from_secs(10), || d.ready() == 503));
    let m1 = cluster.member(1);
    m1.put(&format!("/service/{scope}/leader"), "pg3");
    m1.delete(&format!("/service/{scope}/members/pg2"));
    let rev = m1.put(&format!("/service/{scope}/members/pg5"), &member(15445));
    m1.compact(rev);
    cluster.member(0).restart();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let o = d.out();
            o.contains("leader=pg3") && o.contains("pg5 ") && !o.contains("pg2 ")
        }),
        "{}\n{}",
        d.out(),
        p.log()
    );
    assert!(p.log().contains("compacted: re-listing"), "{}", p.log());
    assert_eq!(d.status()["relists"], 1);
}

#[test]
fn run_waits_for_etcd_at_start_and_once_fails_within_its_timeout() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let scope = unique_name("late");
    let d = Daemon::new(std::slice::from_ref(&endpoint), &scope);

    let t0 = Instant::now();
    let out = std::process::Command::new(haconfd_bin())
        .arg("-c")
        .arg(&d.config)
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("haconfd: ") && last.contains(&endpoint),
        "{stderr}"
    );

    let p = d.run();
    assert!(
        wait_until(Duration::from_secs(5), || p
            .log()
            .contains("etcd unreachable")),
        "{}",
        p.log()
    );
    assert_eq!(d.ready(), 503);
    // etcd comes up on that port later; haconfd notices within its capped backoff.
    let etcd = Etcd::start_on(port);
    seed(|k, v| etcd.put(k, v), &scope, 2);
    assert!(
        wait_until(Duration::from_secs(5), || d.out().contains("pg2 ")),
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
fn tls_with_client_certificates_and_user_password_auth() {
    require_bin("etcdctl");
    let certs = temp_dir("certs");
    write_certs(certs.path());
    let c = |n: &str| certs.path().join(n).display().to_string();
    let etcd = Etcd::start_tls(&c("server.pem"), &c("server-key.pem"), &c("ca.pem"));
    let scope = unique_name("tls");
    // Enable auth through etcdctl over TLS, then seed as root.
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints={}", etcd.endpoint()),
                &format!("--cacert={}", c("ca.pem")),
                &format!("--cert={}", c("client.pem")),
                &format!("--key={}", c("client-key.pem")),
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    };
    ctl(&["user", "add", "root:rootpw"]);
    ctl(&["user", "add", "haconfd:s3cret-pw"]);
    ctl(&["role", "add", "reader"]);
    ctl(&[
        "role",
        "grant-permission",
        "reader",
        "--prefix=true",
        "read",
        "/service/",
    ]);
    ctl(&["user", "grant-role", "haconfd", "reader"]);
    ctl(&["auth", "enable"]);
    for (k, v) in [
        (format!("/service/{scope}/members/pg1"), member(15441)),
        (format!("/service/{scope}/leader"), "pg1".into()),
    ] {
        ctl(&["--user=root:rootpw", "put", &k, &v]);
    }

    let endpoint = etcd.endpoint();
    let d = Daemon::with(std::slice::from_ref(&endpoint), &scope, |b| {
        b.etcd("username", "haconfd")
            .etcd_tls("ca", c("ca.pem"))
            .etcd_tls("cert", c("client.pem"))
            .etcd_tls("key", c("client-key.pem"))
    });
    let once = |password: &str| {
        std::process::Command::new(haconfd_bin())
            .arg("-c")
            .arg(&d.config)
            .args(["--log-level", "debug", "once"])
            .env("HACONFD_ETCD_PASSWORD", password)
            .output()
            .unwrap()
    };
    let ok = once("s3cret-pw");
    let log = String::from_utf8_lossy(&ok.stderr).into_owned();
    assert_eq!(ok.status.code(), Some(0), "{log}");
    assert!(d.out().contains("pg1 127.0.0.1:15441"), "{}", d.out());
    assert!(
        !log.contains("s3cret-pw"),
        "the password leaked into the log:\n{log}"
    );
    assert!(
        log.contains("********"),
        "the effective settings are logged masked:\n{log}"
    );

    let bad = once("wrong");
    let log = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{log}");
    assert!(
        log.contains("authentication failed") || log.contains("invalid"),
        "{log}"
    );

    // Without the CA, TLS fails with a clear error and nothing is written.
    let before = d.out();
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace(&format!("ca = \"{}\"\n", c("ca.pem")), ""),
    )
    .unwrap();
    let notrust = once("s3cret-pw");
    assert_eq!(notrust.status.code(), Some(3), "{notrust:?}");
    assert_eq!(d.out(), before);
}
