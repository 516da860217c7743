//! Operating haconfd against a real etcd: the HTTP endpoint (/healthz, /readyz, /metrics,
//! /status), readiness through an etcd outage with catch-up, hot reload of config and templates
//! (SIGHUP and file watching; a bad new config is refused and the running one stays), and graceful
//! shutdown on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::config::{ConfigBuilder, Template};
use common::procs::{
    free_port, haconfd_bin, http_get, temp_dir, unique_name, wait_until, Etcd, Proc,
};
use nix::sys::signal::Signal;

fn member(port: u16) -> String {
    format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica","xlog_location":100}}"#,
        port + 1000
    )
}

/// A scope with a leader and three members.
fn seed(etcd: &Etcd, scope: &str) {
    for (i, n) in ["pg1", "pg2", "pg3"].iter().enumerate() {
        etcd.put(
            &format!("/service/{scope}/members/{n}"),
            &member(15441 + i as u16),
        );
    }
    etcd.put(&format!("/service/{scope}/leader"), "pg1");
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    http_port: u16,
}

impl Setup {
    fn new(etcd: &Etcd, scope: &str) -> Setup {
        Setup::with(etcd, scope, |t| t)
    }

    /// [`Setup::new`] with more settings of the `list` template from `template`.
    fn with(etcd: &Etcd, scope: &str, template: impl FnOnce(Template) -> Template) -> Setup {
        let dir = temp_dir("operate");
        let http_port = free_port();
        let tpl = dir.path().join("tpl");
        std::fs::create_dir(&tpl).unwrap();
        std::fs::write(
            tpl.join("list.tera"),
            "{% for m in members %}{{ m.name }} {{ m.address }}{% if m.is_leader %} leader{% endif %}\n{% endfor %}",
        )
        .unwrap();
        let config = ConfigBuilder::new()
            .endpoint(etcd.endpoint())
            .scope(scope)
            .etcd("keepalive_interval", "1s")
            .etcd("keepalive_timeout", "1s")
            .daemon("min_interval", "50ms")
            .daemon("max_backoff", "1s")
            .daemon("retry_interval", "1s")
            .http_listen(format!("127.0.0.1:{http_port}"))
            .template(template(Template::new(
                "list",
                "tpl/list.tera",
                dir.path().join("out.txt"),
            )))
            .write_in(dir.path());
        Setup {
            dir,
            config,
            http_port,
        }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out.txt")
    }

    fn start(&self) -> Proc {
        let mut cmd = std::process::Command::new(haconfd_bin());
        cmd.arg("-c").arg(&self.config).arg("run");
        let p = Proc::spawn_logged("haconfd", cmd, &self.dir.path().join("haconfd.log"));
        assert!(
            wait_until(Duration::from_secs(10), || http_get(
                self.http_port,
                "/healthz"
            )
            .is_some_and(|(c, _)| c == 200)),
            "haconfd did not serve /healthz:\n{}",
            p.log()
        );
        p
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path).unwrap_or((0, String::new()))
    }
}

fn file_has(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

#[test]
fn http_endpoints_report_health_readiness_metrics_and_status() {
    let etcd = Etcd::shared();
    let scope = unique_name("http");
    seed(etcd, &scope);
    let s = Setup::new(etcd, &scope);
    let p = s.start();
    assert!(
        wait_until(Duration::from_secs(10), || s.get("/readyz").0 == 200),
        "{}",
        p.log()
    );
    assert_eq!(s.get("/healthz").0, 200);

    // A leader change is counted and the leader gauge follows it.
    etcd.put(&format!("/service/{scope}/leader"), "pg2");
    assert!(wait_until(Duration::from_secs(10), || file_has(
        &s.out(),
        "pg2 127.0.0.1:15442 leader"
    )));
    let (code, metrics) = s.get("/metrics");
    assert_eq!(code, 200);
    for needle in [
        "haconfd_passes_total{result=\"ok\"}",
        "haconfd_writes_total{target=\"list\"}",
        "haconfd_render_duration_seconds_bucket",
        "haconfd_apply_duration_seconds_count",
        "haconfd_etcd_connected 1",
        "haconfd_cluster_leader{name=\"pg2\"} 1",
        "haconfd_cluster_members{role=\"replica\",state=\"running\"} 3",
        "haconfd_member_lag_bytes{member=\"pg1\"} 0",
        "haconfd_leader_changes_total 1",
        "haconfd_last_success_age_seconds",
        "haconfd_watch_revision",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    let (code, status) = s.get("/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["cluster"]["leader_name"], "pg2");
    assert_eq!(v["etcd_connected"], true);
    assert_eq!(v["targets"]["list"]["writes"], 2, "{status}");
    assert_eq!(s.get("/nope").0, 404);
}

#[test]
fn etcd_outage_marks_not_ready_keeps_files_and_catches_up() {
    let etcd = Etcd::start();
    let scope = unique_name("outage");
    seed(&etcd, &scope);
    let s = Setup::new(&etcd, &scope);
    let p = s.start();
    assert!(
        wait_until(Duration::from_secs(10), || s.get("/readyz").0 == 200),
        "{}",
        p.log()
    );
    let before = std::fs::read(s.out()).unwrap();

    etcd.stop();
    assert!(
        wait_until(Duration::from_secs(15), || s.get("/readyz").0 == 503),
        "not marked unready:\n{}",
        p.log()
    );
    assert!(
        s.get("/readyz").1.contains("etcd"),
        "{}",
        s.get("/readyz").1
    );
    assert_eq!(
        std::fs::read(s.out()).unwrap(),
        before,
        "files must stay during the outage"
    );
    assert!(p.log().contains("etcd unreachable"), "{}", p.log());

    etcd.restart();
    // A change made right after recovery (as by a second client) is applied within a second of
    // haconfd reconnecting.
    etcd.put(&format!("/service/{scope}/leader"), "pg3");
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || file_has(
            &s.out(),
            "pg3 127.0.0.1:15443 leader"
        )),
        "did not catch up:\n{}",
        p.log()
    );
    assert!(wait_until(Duration::from_secs(5), || s.get("/readyz").0 == 200));
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(p.log().contains("etcd reachable again"), "{}", p.log());
}

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let etcd = Etcd::shared();
    let scope = unique_name("hup");
    seed(etcd, &scope);
    let s = Setup::new(etcd, &scope);
    let p = s.start();
    let good = std::fs::read_to_string(&s.config).unwrap();

    // Bad config: refused, the running one stays and keeps working.
    std::fs::write(&s.config, format!("{good}\n[bogus]\nx = 1\n")).unwrap();
    p.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || p
            .log()
            .contains("new configuration refused")),
        "{}",
        p.log()
    );
    assert!(
        p.log().contains("bogus"),
        "the refusal names the bad key:\n{}",
        p.log()
    );
    etcd.put(&format!("/service/{scope}/leader"), "pg2");
    assert!(wait_until(Duration::from_secs(5), || file_has(
        &s.out(),
        "pg2 127.0.0.1:15442 leader"
    )));

    // Good config with a new template: applied.
    let tpl = s.dir.path().join("tpl/list2.tera");
    std::fs::write(&tpl, "leader={{ leader_name }}\n").unwrap();
    std::fs::write(&s.config, good.replace("tpl/list.tera", "tpl/list2.tera")).unwrap();
    p.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(s.out())
            .is_ok_and(|t| t == "leader=pg2\n")),
        "{}",
        p.log()
    );
    assert!(p.is_running());
}

#[test]
fn template_replaced_by_rename_is_picked_up_and_a_broken_one_refused() {
    let etcd = Etcd::shared();
    let scope = unique_name("notify");
    seed(etcd, &scope);
    let s = Setup::new(etcd, &scope);
    let p = s.start();

    // As an editor or a ConfigMap does: write aside, rename over.
    let tpl = s.dir.path().join("tpl/list.tera");
    let aside = s.dir.path().join("tpl/.list.tera.swp");
    std::fs::write(&aside, "count={{ members | length }}\n").unwrap();
    std::fs::rename(&aside, &tpl).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(s.out())
            .is_ok_and(|t| t == "count=3\n")),
        "{}",
        p.log()
    );

    std::fs::write(&aside, "{% for m in members %}broken\n").unwrap();
    std::fs::rename(&aside, &tpl).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || p
            .log()
            .contains("new configuration refused")),
        "{}",
        p.log()
    );
    assert!(
        p.log().contains("list.tera:2:1"),
        "the refusal names file:line:col:\n{}",
        p.log()
    );
    assert_eq!(std::fs::read_to_string(s.out()).unwrap(), "count=3\n");
}

#[test]
fn sigterm_stops_gracefully_and_a_second_signal_exits_at_once() {
    let etcd = Etcd::shared();
    let scope = unique_name("term");
    seed(etcd, &scope);
    let s = Setup::new(etcd, &scope);
    let p = s.start();
    p.signal(Signal::SIGTERM).unwrap();
    let status = p
        .wait_timeout(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", p.log());
    assert!(p.log().contains("stopped"), "{}", p.log());

    // With a check that hangs, the first SIGTERM waits for the pass; the second exits at once.
    let s2 = Setup::with(etcd, &scope, |t| {
        t.check(["sh", "-c", "exec sleep 30", "check", "{{staged}}"])
            .set("check_timeout", "60s")
    });
    let mut cmd = std::process::Command::new(haconfd_bin());
    cmd.arg("-c").arg(&s2.config).arg("run");
    let p2 = Proc::spawn_logged("haconfd", cmd, &s2.dir.path().join("haconfd.log"));
    assert!(
        wait_until(Duration::from_secs(10), || p2.log().contains("listed")),
        "{}",
        p2.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    p2.signal(Signal::SIGTERM).unwrap();
    assert!(
        p2.wait_timeout(Duration::from_millis(700)).is_none(),
        "must wait for the pass in flight"
    );
    p2.signal(Signal::SIGTERM).unwrap();
    let st = p2
        .wait_timeout(Duration::from_secs(3))
        .expect("second SIGTERM exits at once");
    assert!(!st.success());
    assert!(!s2.out().exists(), "the interrupted pass wrote nothing");
}
