//! Watching haconfd the way operators do, against the real tools: the alert rules
//! (deploy/prometheus/haconfd-rules.yml) through `promtool check rules` and their unit tests;
//! Debian's Prometheus scraping a real haconfd through a switchover (the fast path's rig: real
//! etcd, HAProxy, PgBouncer, PostgreSQL, scripted REST APIs), where every query of the Grafana
//! dashboard (deploy/grafana/haconfd.json) must return data and every alert expression must
//! evaluate without error; `haconfd status` and the page at `/` in Debian's headless Chromium,
//! before, during and after the switchover.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::config::Hook;
use common::fastpath::*;
use common::procs::{
    free_port, haconfd_bin, http_request, require_bin, run_capture as run, run_with_timeout,
    temp_dir, wait_until, Proc,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules() -> PathBuf {
    root().join("deploy/prometheus/haconfd-rules.yml")
}

fn dashboard() -> serde_json::Value {
    let p = root().join("deploy/grafana/haconfd.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `(title, expr)` of the dashboard's panels (rows have none).
fn panel_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let e = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            v.push((title.clone(), e.to_owned()));
        }
    }
    v
}

/// Every `(alert, expr)` of the rules file.
fn alert_exprs() -> Vec<(String, String)> {
    use yaml_rust2::YamlLoader;
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(rules()).unwrap()).unwrap();
    let mut v = Vec::new();
    for g in docs[0]["groups"].as_vec().expect("groups") {
        for r in g["rules"].as_vec().expect("rules") {
            v.push((
                r["alert"].as_str().expect("alert").to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    v
}

/// The `haconfd_*` series names a PromQL expression reads.
fn series_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("haconfd_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The dashboard's variables as Prometheus takes them: every instance, a one-minute rate
/// window, the whole test as the range.
fn concrete(expr: &str, range_s: u64) -> String {
    expr.replace("$instance", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", &format!("{range_s}s"))
}

/// The rules pass `promtool check rules`, and their unit tests (series that fire each alert and
/// series that do not) pass `promtool test rules`; the dashboard is well formed: unique panel
/// ids, a query on every panel, the data source and `$instance` variables it uses defined.
#[test]
fn the_rules_pass_promtool_and_the_dashboard_is_well_formed() {
    let t = Instant::now();
    let promtool = require_bin("promtool");
    let (ok, out) = run(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(rules()),
        Duration::from_secs(60),
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(
        Command::new(&promtool)
            .args(["test", "rules", "haconfd-rules.test.yml"])
            .current_dir(root().join("deploy/prometheus")),
        Duration::from_secs(120),
    );
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    // Each alert has a unit test.
    let tests =
        std::fs::read_to_string(root().join("deploy/prometheus/haconfd-rules.test.yml")).unwrap();
    for (alert, _) in alert_exprs() {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "no unit test for {alert}"
        );
    }

    let d = dashboard();
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "panel {id} without gridPos"
        );
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        }
    }
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);
    for (title, e) in panel_queries(&d) {
        let leftover = concrete(&e, 60);
        assert!(
            !leftover.contains('$'),
            "panel {title:?}: an unknown variable in {e}"
        );
    }
    println!(
        "TIMING promtool and dashboard checks: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// Percent-encodes a query parameter.
fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Debian's Prometheus on loopback, scraping haconfd every second and evaluating the rules
/// every second.
struct Prometheus {
    port: u16,
    _dir: tempfile::TempDir,
    proc: Proc,
}

impl Prometheus {
    fn start(haconfd_port: u16) -> Prometheus {
        let bin = require_bin("prometheus");
        let dir = temp_dir("prometheus");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: haconfd\n    static_configs:\n      - targets: ['127.0.0.1:{haconfd_port}']\n",
                rules().display()
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn_logged("prometheus", cmd, &dir.path().join("prometheus.log"));
        let p = Prometheus {
            port,
            _dir: dir,
            proc,
        };
        assert!(
            wait_until(Duration::from_secs(30), || p
                .get("/-/ready")
                .is_some_and(|(c, _)| c == 200)),
            "Prometheus not ready:\n{}",
            p.proc.log()
        );
        p
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_request(self.port, "GET", path, Duration::from_secs(10))
    }

    /// An API call's `data`, panicking with Prometheus' error.
    fn api(&self, path: &str) -> serde_json::Value {
        let (code, body) = self
            .get(path)
            .unwrap_or_else(|| panic!("Prometheus did not answer {path}"));
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(
            code == 200 && v["status"] == "success",
            "{path}: HTTP {code}: {body}"
        );
        v["data"].clone()
    }

    fn query(&self, q: &str) -> serde_json::Value {
        self.api(&format!("/api/v1/query?query={}", enc(q)))
    }

    fn query_range(&self, q: &str, start: f64, end: f64) -> serde_json::Value {
        self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            enc(q)
        ))
    }

    /// The first sample value of an instant query, if it has one.
    fn value(&self, q: &str) -> Option<f64> {
        self.query(q)["result"].as_array()?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Hooks that cannot keep up (one at a time, one waiting, each a second long): a switchover's
/// events drop runs, so the hook series are there for the dashboard and the alert.
fn slow_hooks() -> Setup {
    Setup {
        more: Some(Arc::new(|b| {
            b.hooks("concurrency", 1)
                .hooks("queue", 1)
                .hook(Hook::new("slow", ["sleep", "1"]).timeout("5s"))
        })),
        ..Setup::default()
    }
}

/// A switchover as Patroni makes it: the request (haconfd fences pg1, pauses PgBouncer), the
/// leader key deleted and a pass without a leader (which the failures panel shows: the rig's
/// `complete_switch` writes both keys within a millisecond, and one pass may take them
/// together), then the leader key on pg2 with its REST API writable; writes reach pg2 through
/// both.
fn switchover_with_a_leaderless_pass(rig: &Rig) {
    rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
    rig.wait_log("PgBouncer paused", Duration::from_secs(3));
    rig.delete("leader");
    assert!(
        wait_until(Duration::from_secs(5), || rig
            .metrics()
            .contains("haconfd_failures_total{")),
        "no pass failed without a leader:\n{}",
        rig.metrics()
    );
    rig.complete_switch("pg1", "pg2");
    rig.assert_writes_reach("pg2", Duration::from_secs(5), "after the switchover");
}

/// Prometheus scrapes a real haconfd before, through and after a switchover: every query of
/// the dashboard returns data over that span, every alert expression evaluates without error,
/// every rule's health is ok, every series the rules and the dashboard read is one haconfd
/// exposes, and the alerts that the switchover's real series must fire (the slow hook dropped
/// runs) and must not fire (drift, no leader, slow switch) do as they should.
#[test]
fn prometheus_scrapes_a_switchover_every_panel_has_data_and_every_alert_evaluates() {
    let t0 = Instant::now();
    let rig = Rig::start("prom", slow_hooks());
    let prom = Prometheus::start(rig.http_port);
    let start = unix_now() - 1.0;
    assert!(
        wait_until(Duration::from_secs(20), || prom
            .value("up{job=\"haconfd\"}")
            == Some(1.0)),
        "Prometheus does not scrape haconfd:\n{}",
        prom.proc.log()
    );
    // A few scrapes before the switchover, so that rates have a before.
    std::thread::sleep(Duration::from_secs(3));
    switchover_with_a_leaderless_pass(&rig);
    assert!(
        wait_until(Duration::from_secs(20), || prom.value(
            "haconfd_failover_switch_seconds_count{consumer=\"pgbouncer\"}"
        ) == Some(1.0)
            && prom.value("sum(haconfd_hook_dropped_total)").unwrap_or(0.0)
                > 0.0),
        "the switchover and the dropped hook runs do not reach Prometheus:\n{}\n{}",
        rig.metrics(),
        prom.proc.log()
    );
    // Rates over a minute need a few samples after the change.
    std::thread::sleep(Duration::from_secs(3));
    let end = unix_now();
    let range_s = (end - start).ceil() as u64;

    // Every series read is one haconfd exposes.
    let metrics = rig.metrics();
    let exposed: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let d = dashboard();
    let panels = panel_queries(&d);
    let alerts = alert_exprs();
    for (what, e) in panels.iter().chain(alerts.iter()) {
        for name in series_names(e) {
            assert!(
                exposed.contains(&name),
                "{what:?} reads {name}, which haconfd does not expose:\n{metrics}"
            );
        }
    }

    // Every panel's query has data over the test's span.
    let mut empty = Vec::new();
    for (title, e) in &panels {
        let q = concrete(e, range_s);
        let data = prom.query_range(&q, start, end);
        let finite = data["result"].as_array().is_some_and(|series| {
            series.iter().any(|s| {
                s["values"].as_array().is_some_and(|vs| {
                    vs.iter().any(|v| {
                        v[1].as_str()
                            .and_then(|x| x.parse::<f64>().ok())
                            .is_some_and(f64::is_finite)
                    })
                })
            })
        });
        println!("PANEL {title:?}: {}", if finite { "data" } else { "EMPTY" });
        if !finite {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // Every alert expression evaluates, and every rule is healthy once evaluated.
    for (alert, e) in &alerts {
        let data = prom.query(e);
        println!(
            "ALERT {alert}: evaluates, {} series",
            data["result"].as_array().map_or(0, Vec::len)
        );
    }
    let mut last = serde_json::Value::Null;
    let healthy = wait_until(Duration::from_secs(15), || {
        last = prom.api("/api/v1/rules");
        let rules: Vec<&serde_json::Value> = last["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == alerts.len() && rules.iter().all(|r| r["health"] == "ok")
    });
    assert!(healthy, "rules not all healthy: {last:#}");
    let firing = |name: &str| -> String {
        let data = prom.api("/api/v1/alerts");
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    assert!(
        wait_until(Duration::from_secs(10), || firing("HaconfdHooksDropped")
            == "firing"),
        "HaconfdHooksDropped not firing on real dropped runs: {:#}",
        prom.api("/api/v1/alerts")
    );
    for quiet in [
        "HaconfdHAProxyPrimaryDrift",
        "HaconfdClusterLeaderless",
        "HaconfdFailoverSwitchSlow",
        "HaconfdFailoverMovesRefused",
        "HaconfdFenceExpired",
        "HaconfdDown",
    ] {
        assert_eq!(firing(quiet), "", "{quiet} after a clean switchover");
    }
    println!(
        "TIMING prometheus end to end: {:.1} s ({} panel queries, {} alert expressions)",
        t0.elapsed().as_secs_f64(),
        panels.len(),
        alerts.len()
    );
}

// ---------------------------------------------------------------------------------------------
// haconfd status and the page at /
// ---------------------------------------------------------------------------------------------

/// `haconfd status ARGS` against `config`; (exit code, stdout, stderr).
fn status_cmd(config: &Path, args: &[&str]) -> (i32, String, String) {
    let o = run_with_timeout(
        Command::new(haconfd_bin())
            .arg("-c")
            .arg(config)
            .arg("status")
            .args(args),
        Duration::from_secs(20),
    )
    .expect("haconfd status");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The page at `/` as headless Chromium renders it (its DOM after load), and a screenshot.
fn chromium_dom(port: u16, shot: &Path) -> String {
    let bin = require_bin("chromium");
    let profile = temp_dir("chromium");
    let url = format!("http://127.0.0.1:{port}/");
    let base = |c: &mut Command| {
        c.args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .env("HOME", profile.path());
    };
    let mut dump = Command::new(&bin);
    base(&mut dump);
    dump.arg("--dump-dom").arg(&url);
    let o = run_with_timeout(&mut dump, Duration::from_secs(60)).expect("chromium --dump-dom");
    let dom = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && dom.contains("</html>"),
        "chromium --dump-dom {url}: {}\n{dom}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut snap = Command::new(&bin);
    base(&mut snap);
    snap.arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1100,700")
        .arg(&url);
    let o = run_with_timeout(&mut snap, Duration::from_secs(60)).expect("chromium --screenshot");
    assert!(
        o.status.success() && shot.exists(),
        "chromium --screenshot: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    dom
}

/// `haconfd status` and the page at `/` through a switchover. Before: pg1 leads, UP in the
/// primary backend. During the request: pg1 drained, PgBouncer paused, a change under way.
/// After: pg2 leads, UP in the primary backend and pg1 DOWN there, nothing held, and the
/// timeline (fence, confirm, HAProxy, PgBouncer); the page, reloaded in Chromium, shows the new
/// leader. `--json` says the same to scripts; a daemon that does not answer is exit 9 with a
/// message, a config without http.listen exit 2.
#[test]
fn haconfd_status_and_the_page_follow_a_switchover() {
    let t0 = Instant::now();
    let rig = Rig::start("status", Setup::default());
    let shots = temp_dir("shots");

    let (code, before, err) = status_cmd(&rig.config, &[]);
    assert_eq!(code, 0, "{before}{err}");
    println!("STATUS before:\n{before}");
    assert!(before.contains(": ready\n"), "{before}");
    assert!(before.contains("leader pg1\n"), "{before}");
    let row = |text: &str, m: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{m} ")))
            .unwrap_or_else(|| panic!("no row for {m}:\n{text}"))
            .to_owned()
    };
    assert!(row(&before, "pg1").contains("primary UP"), "{before}");
    assert!(row(&before, "pg2").contains("primary DOWN"), "{before}");
    assert!(before.contains("in progress: nothing"), "{before}");
    let dom = chromium_dom(rig.http_port, &shots.path().join("before.png"));
    assert!(dom.contains("data-leader=\"pg1\""), "{dom}");

    // The request: pg1 fenced, PgBouncer paused.
    rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
    rig.wait_log("PgBouncer paused", Duration::from_secs(3));
    // HAProxy's state is read at most every 250 ms: the drain shows within that.
    let mut during = String::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            during = status_cmd(&rig.config, &[]).1;
            row(&during, "pg1").contains("primary UP (drained)")
        }),
        "{during}"
    );
    println!("STATUS during:\n{during}");
    assert!(
        during.contains("fence: pg1 drained (switchover requested)"),
        "{during}"
    );
    assert!(
        during.contains("pause: PgBouncer pgbouncer paused"),
        "{during}"
    );
    assert!(
        during.contains("hold: a leader change under way"),
        "{during}"
    );

    rig.complete_switch("pg1", "pg2");
    rig.assert_writes_reach("pg2", Duration::from_secs(5), "after the switchover");
    let mut after = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            after = status_cmd(&rig.config, &[]).1;
            after.contains("leader pg2\n")
                && after.contains("PgBouncer +")
                && after.contains("in progress: nothing")
                && row(&after, "pg2").contains("primary UP")
                && row(&after, "pg1").contains("primary DOWN")
        }),
        "{after}"
    );
    println!("STATUS after:\n{after}");
    let timeline = after
        .lines()
        .find(|l| l.contains("last failover: pg1 -> pg2"))
        .unwrap_or_else(|| panic!("{after}"));
    for part in ["fence -", "confirm +", "HAProxy +", "PgBouncer +"] {
        assert!(timeline.contains(part), "{part:?} missing: {timeline}");
    }
    // Confirmed by its REST API, or by its member key when the key saying `primary` came in
    // the same pass as the leader key (the rig writes both within a millisecond).
    assert!(
        timeline.contains("(rest)") || timeline.contains("(member key)"),
        "how it was confirmed is missing: {timeline}"
    );
    let dom = chromium_dom(rig.http_port, &shots.path().join("after.png"));
    assert!(dom.contains("data-leader=\"pg2\""), "{dom}");
    assert!(dom.contains("pg1 -&gt; pg2"), "{dom}");
    assert!(
        dom.contains("primary UP") && dom.contains("primary DOWN"),
        "the HAProxy column: {dom}"
    );

    let (code, json, err) = status_cmd(&rig.config, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("--json is JSON");
    assert_eq!(v["ready"], true);
    assert_eq!(v["clusters"][0]["leader"], "pg2");
    let pg2 = v["clusters"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "pg2")
        .unwrap();
    assert!(
        pg2["haproxy"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["backend"] == "primary" && h["state"] == "UP"),
        "{json}"
    );
    // By REST, or by the member key when it came in the same pass as the leader key.
    let by = &v["clusters"][0]["last_failover"]["confirmed_by"];
    assert!(by == "rest" || by == "member key", "{by}");

    // The page is read-only and loads nothing from elsewhere.
    let (code, _) = http_request(rig.http_port, "POST", "/", Duration::from_secs(2)).unwrap();
    assert_eq!(code, 405);

    // Not reachable: a clear message and exit 9.
    let closed = free_port();
    let (code, out, err) = status_cmd(&rig.config, &["--url", &format!("127.0.0.1:{closed}")]);
    assert_eq!(code, 9, "{out}{err}");
    assert!(
        err.contains(&format!("cannot read http://127.0.0.1:{closed}/status"))
            && err.contains("haconfd run"),
        "{err}"
    );
    // No http.listen in the config: exit 2, naming the setting.
    let bare = rig.dir.path().join("no-http.toml");
    std::fs::write(
        &bare,
        std::fs::read_to_string(&rig.config)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("listen"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let (code, _, err) = status_cmd(&bare, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("http.listen is not set"), "{err}");
    if let Ok(dir) = std::env::var("HACONFD_SHOTS") {
        for f in ["before.png", "after.png"] {
            let _ = std::fs::copy(shots.path().join(f), Path::new(&dir).join(f));
        }
    }
    println!(
        "TIMING status and page end to end: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
