//! Golden render tests of the shipped many-cluster templates (`haproxy-clusters.cfg.tera`,
//! `pgbouncer-clusters.ini.tera`, `haproxy-citus.cfg.tera`) against one etcd dump holding three
//! ordinary Patroni clusters and one Citus cluster (tests/fixtures/clusters-kv.json), compared
//! byte for byte with files in tests/golden/. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test --test golden_clusters` and review the diff.
//!
//! The fixture: `alpha` (Patroni 4.1.5, primary alpha-2 of three), `beta` (Patroni 3.0.2,
//! `master` beta-1 of two), `gamma` (Patroni 4.1.5, two replicas, no leader key) and `citus`
//! (Patroni 4.1.5 in Citus mode: groups 0, 1 and 2, each a primary and a replica).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use haconfd::config::{RawConfig, Settings};
use haconfd::pipeline::Engine;
use haconfd::snapshot::Snapshot;

use common::config::{ConfigBuilder, Raw, Template};
use common::procs::{Haproxy, Pgbouncer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `[clusters.*]` for alpha, gamma and citus; beta is found by discovery but has no table.
fn clusters(b: ConfigBuilder) -> ConfigBuilder {
    b.set("clusters.alpha", "primary_port", 5000)
        .set("clusters.alpha", "replica_port", 5001)
        .set("clusters.alpha", "databases", ["app"])
        .set("clusters.gamma", "primary_port", 5010)
        .set("clusters.gamma", "replica_port", 5011)
        .set("clusters.gamma", "databases", ["billing", "ledger"])
        .set("clusters.citus", "coordinator_port", 5020)
        .set("clusters.citus", "workers_port", 5021)
        .set("clusters.citus", "databases", ["citus"])
}

/// The three shipped templates: one haproxy.cfg for the ordinary clusters, another HAProxy's
/// for the Citus clusters (its own stats socket, stats port and state file), one pgbouncer.ini.
fn templates(b: ConfigBuilder) -> ConfigBuilder {
    b.var("stats_socket", "/run/haproxy/admin.sock")
        .template(
            Template::new(
                "haproxy",
                "templates/haproxy-clusters.cfg.tera",
                "/etc/haproxy/haproxy.cfg",
            )
            .set(
                "server_state",
                Raw(r#"{ stats_socket = "/run/haproxy/admin.sock", file = "/var/lib/haproxy/server-state", primary_backends = ["{scope}_primary"], replica_backends = ["{scope}_replicas"] }"#.into()),
            ),
        )
        .template(
            Template::new(
                "citus",
                "templates/haproxy-citus.cfg.tera",
                "/etc/haproxy-citus/haproxy.cfg",
            )
            .set(
                "server_state",
                Raw(r#"{ stats_socket = "/run/haproxy-citus/admin.sock", file = "/var/lib/haproxy/citus-server-state", primary_backends = ["{scope}_coordinator"], replica_backends = [] }"#.into()),
            )
            .var("stats_socket", "/run/haproxy-citus/admin.sock")
            .var("stats_port", 7001),
        )
        .template(
            Template::new(
                "pgbouncer",
                "templates/pgbouncer-clusters.ini.tera",
                "/etc/pgbouncer/pgbouncer.ini",
            )
            .require_leader(true),
        )
}

fn resolve(b: ConfigBuilder) -> Settings {
    RawConfig::parse(&b.to_toml(), Path::new("golden-clusters.toml"))
        .unwrap()
        .resolve(&root())
        .unwrap()
}

/// `[etcd] discover = true`: every scope of the dump.
fn discover() -> Settings {
    resolve(templates(clusters(
        ConfigBuilder::new().etcd("discover", true),
    )))
}

fn snapshot() -> Snapshot {
    Snapshot::from_file(&root().join("tests/fixtures/clusters-kv.json")).unwrap()
}

fn render(settings: Settings, target: &str) -> String {
    render_from(settings, &snapshot(), target)
}

fn render_from(settings: Settings, snap: &Snapshot, target: &str) -> String {
    let mut engine = Engine::new(Arc::new(settings)).unwrap();
    let mut out = engine.render(snap, Some(target)).unwrap();
    assert_eq!(out.len(), 1, "{target}: one file for every cluster");
    String::from_utf8(out.remove(0).bytes).unwrap()
}

fn golden(target: &str, expected: &str) {
    let out = render(discover(), target);
    let path = root().join("tests/golden").join(expected);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        out,
        want,
        "clusters-kv.json → {target} differs from {}",
        path.display()
    );
}

fn read_golden(name: &str) -> String {
    std::fs::read_to_string(root().join("tests/golden").join(name)).unwrap()
}

/// `haproxy -c` on a rendered config; the state files are checked in a directory that exists.
fn haproxy_check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = text.replace("/var/lib/haproxy/", &format!("{}/", dir.path().display()));
    let cfg = dir.path().join("h.cfg");
    std::fs::write(&cfg, text).unwrap();
    Haproxy::check_config(&cfg)
}

/// The `listen` sections of a rendered haproxy.cfg: name → (bind line, server lines).
fn listeners(text: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("listen ") {
            out.push((name.to_string(), String::new(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            if let Some(bind) = t.strip_prefix("bind ") {
                last.1 = bind.to_string();
            } else if t.starts_with("server ") {
                last.2
                    .push(t.split_whitespace().nth(1).unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn clusters_haproxy_gives_each_configured_cluster_its_two_listeners() {
    golden("haproxy", "clusters-haproxy.cfg");
    let text = read_golden("clusters-haproxy.cfg");
    let l = listeners(&text);
    let names: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "stats",
            "alpha_primary",
            "alpha_replicas",
            "gamma_primary",
            "gamma_replicas"
        ],
        "{text}"
    );
    let alpha = ["alpha-1", "alpha-2", "alpha-3"];
    let gamma = ["gamma-1", "gamma-2"];
    for (name, bind, servers) in &l[1..] {
        let (port, members): (&str, &[&str]) = match name.as_str() {
            "alpha_primary" => ("*:5000", &alpha),
            "alpha_replicas" => ("*:5001", &alpha),
            "gamma_primary" => ("*:5010", &gamma),
            _ => ("*:5011", &gamma),
        };
        assert_eq!(bind, port, "{name}");
        assert_eq!(servers, members, "{name}");
    }
    // beta has no [clusters.beta]: it is named, and given no port; citus has no primary_port.
    assert!(
        text.contains("# cluster \"beta\": skipped, no [clusters.beta]"),
        "{text}"
    );
    assert!(
        text.contains("# cluster \"citus\": skipped, [clusters.citus] has no primary_port"),
        "{text}"
    );
    assert!(
        !text.contains("beta-1") && !text.contains("coord1"),
        "{text}"
    );
}

#[test]
fn clusters_pgbouncer_points_each_database_at_its_clusters_leader() {
    golden("pgbouncer", "clusters-pgbouncer.ini");
    let text = read_golden("clusters-pgbouncer.ini");
    assert!(
        text.contains("\napp = host=10.0.1.12 port=5432 dbname=app\n"),
        "alpha's primary is alpha-2:\n{text}"
    );
    assert!(
        text.contains("\ncitus = host=172.27.0.4 port=5432 dbname=citus\n"),
        "citus's coordinator primary is coord1:\n{text}"
    );
    // gamma has no leader: its databases are left out, not pointed anywhere.
    assert!(
        !text.contains("billing =") && !text.contains("ledger ="),
        "{text}"
    );
    assert!(text.contains("; cluster \"gamma\" has no leader"), "{text}");
    assert!(!text.contains("10.0.2."), "beta is not configured:\n{text}");
}

#[test]
fn citus_haproxy_routes_the_coordinator_and_every_workers_primary() {
    golden("citus", "clusters-citus.cfg");
    let text = read_golden("clusters-citus.cfg");
    let l = listeners(&text);
    let names: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["stats", "citus_coordinator", "citus_workers"],
        "{text}"
    );
    assert_eq!(l[0].1, "*:7001", "the template's own stats port");
    assert_eq!(l[1].1, "*:5020");
    assert_eq!(l[1].2, ["coord1", "coord2"]);
    assert_eq!(l[2].1, "*:5021");
    assert_eq!(l[2].2, ["work1-1", "work1-2", "work2-1", "work2-2"]);
    // Both listeners send traffic only to a group's primary, as Patroni's template does.
    assert_eq!(text.matches("option httpchk HEAD /primary").count(), 2);
    assert!(!text.contains("/replica"), "{text}");
    assert!(
        text.contains("stats socket /run/haproxy-citus/admin.sock"),
        "{text}"
    );
}

/// `scopes = [...]` follows exactly those clusters: the Citus cluster is not in `clusters` at
/// all, and beta (Patroni 3.0.2, role `master`), configured here, gets its listeners and its
/// databases.
#[test]
fn a_scope_list_renders_only_the_listed_clusters() {
    let s = || {
        let b = ConfigBuilder::new().etcd("scopes", ["gamma", "alpha", "beta"]);
        let b = clusters(b)
            .set("clusters.beta", "primary_port", 5030)
            .set("clusters.beta", "replica_port", 5031)
            .set("clusters.beta", "databases", ["reports"]);
        resolve(templates(b))
    };
    let haproxy = render(s(), "haproxy");
    let names: Vec<String> = listeners(&haproxy).into_iter().map(|l| l.0).collect();
    assert_eq!(
        names,
        [
            "stats",
            "alpha_primary",
            "alpha_replicas",
            "beta_primary",
            "beta_replicas",
            "gamma_primary",
            "gamma_replicas"
        ],
        "{haproxy}"
    );
    assert!(!haproxy.contains("citus"), "{haproxy}");
    let (ok, output) = haproxy_check(&haproxy);
    assert!(ok, "{output}");

    let pgbouncer = render(s(), "pgbouncer");
    assert!(
        pgbouncer.contains("\nreports = host=10.0.2.11 port=5432 dbname=reports\n"),
        "beta's leader is beta-1 (role master):\n{pgbouncer}"
    );
    assert!(!pgbouncer.contains("citus"), "{pgbouncer}");

    let citus = render(s(), "citus");
    assert_eq!(
        listeners(&citus).len(),
        1,
        "no Citus cluster listed: only the stats listener:\n{citus}"
    );
}

#[test]
fn golden_clusters_haproxy_configs_pass_haproxy_check() {
    for f in ["clusters-haproxy.cfg", "clusters-citus.cfg"] {
        let (ok, output) = haproxy_check(&read_golden(f));
        assert!(ok, "{f}: {output}");
    }
}

/// With `hold_lua` set, each cluster's primary (and the Citus coordinator) holds new
/// connections, naming its own backend; the replica and worker ports do not hold.
#[test]
fn clusters_templates_with_the_hold_action_pass_haproxy_check() {
    let lua = root().join("templates/hold.lua");
    for (target, holds, free) in [
        (
            "haproxy",
            &["alpha_primary", "gamma_primary"][..],
            &["alpha_replicas", "gamma_replicas"][..],
        ),
        ("citus", &["citus_coordinator"][..], &["citus_workers"][..]),
    ] {
        let mut s = discover();
        let t = s.targets.iter_mut().find(|t| t.name == target).unwrap();
        t.vars
            .insert("hold_lua".into(), lua.display().to_string().into());
        t.vars.insert("hold_max_ms".into(), 5000.into());
        let text = render(s, target);
        assert!(
            text.contains(&format!("lua-load {}", lua.display())),
            "{text}"
        );
        for backend in holds {
            let section = text.split(&format!("listen {backend}\n")).nth(1).unwrap();
            let section = section.split("\nlisten ").next().unwrap();
            assert!(
                section.contains(&format!(
                    "tcp-request content lua.haconfd_hold {backend} 5000 10"
                )),
                "{text}"
            );
            assert!(
                section.contains("tcp-request inspect-delay 6000ms"),
                "{text}"
            );
        }
        for backend in free {
            let section = text.split(&format!("listen {backend}\n")).nth(1).unwrap();
            let section = section.split("\nlisten ").next().unwrap();
            assert!(!section.contains("haconfd_hold"), "{text}");
        }
        let (ok, output) = haproxy_check(&text);
        assert!(ok, "{target} with the hold action:\n{output}");
    }
    // Without `hold_max_ms`: each cluster's own lease (`ttl` 30 + `retry_timeout` 10 in its
    // config key).
    let mut s = discover();
    let t = s.targets.iter_mut().find(|t| t.name == "haproxy").unwrap();
    t.vars
        .insert("hold_lua".into(), lua.display().to_string().into());
    let text = render(s, "haproxy");
    assert!(
        text.contains("tcp-request content lua.haconfd_hold alpha_primary 40000 10"),
        "{text}"
    );
}

/// Without its coordinator in the view (group 0's keys gone, or refused at first sight) a Citus
/// cluster's `leader` and `members` are another group's: the core takes the lowest group. The
/// shipped templates take the coordinator from `groups`, so the cluster's databases and its
/// primary listener are left out rather than pointed at a worker.
#[test]
fn a_citus_cluster_without_its_coordinator_is_never_routed_to_a_worker() {
    let text = std::fs::read_to_string(root().join("tests/fixtures/clusters-kv.json")).unwrap();
    let kv: BTreeMap<String, String> = serde_json::from_str(&text).unwrap();
    let kv: BTreeMap<String, String> = kv
        .into_iter()
        .filter(|(k, _)| !k.starts_with("/service/citus/0/"))
        .collect();
    let snap = Snapshot::from_json_bytes(&serde_json::to_vec(&kv).unwrap()).unwrap();
    let s = || {
        let b = clusters(ConfigBuilder::new().etcd("discover", true))
            .set("clusters.citus", "primary_port", 5022)
            .set("clusters.citus", "replica_port", 5023);
        resolve(templates(b))
    };

    let pgbouncer = render_from(s(), &snap, "pgbouncer");
    assert!(
        pgbouncer.contains("; cluster \"citus\" has no coordinator leader: citus left out\n"),
        "{pgbouncer}"
    );
    assert!(!pgbouncer.contains("citus = "), "{pgbouncer}");

    let haproxy = render_from(s(), &snap, "haproxy");
    assert!(
        haproxy.contains("# Citus cluster \"citus\": skipped, no coordinator (group 0)"),
        "{haproxy}"
    );
    assert!(!haproxy.contains("work1-1"), "{haproxy}");

    let citus = render_from(s(), &snap, "citus");
    let l = listeners(&citus);
    assert_eq!(l[1].0, "citus_coordinator");
    assert!(l[1].2.is_empty(), "no coordinator, no server:\n{citus}");
    assert_eq!(l[2].2, ["work1-1", "work1-2", "work2-1", "work2-2"]);
    let (ok, output) = haproxy_check(&citus);
    assert!(ok, "{output}");
}

/// A Citus cluster alone may take its ports from `vars` instead of `[clusters.citus]`.
#[test]
fn citus_ports_may_come_from_vars_for_a_single_citus_cluster() {
    let b = ConfigBuilder::new()
        .etcd("scopes", ["alpha", "citus"])
        .set("clusters.alpha", "primary_port", 5000)
        .set("clusters.citus", "databases", ["citus"]);
    let mut s = resolve(templates(b));
    let t = s.targets.iter_mut().find(|t| t.name == "citus").unwrap();
    t.vars.insert("coordinator_port".into(), 6000.into());
    t.vars.insert("workers_port".into(), 6001.into());
    let text = render(s, "citus");
    let binds: Vec<String> = listeners(&text).into_iter().map(|l| l.1).collect();
    assert_eq!(binds, ["*:7001", "*:6000", "*:6001"], "{text}");
}

/// The golden ini's `[databases]` as PgBouncer reads it: every entry parses, and points where
/// the golden file says.
#[test]
fn golden_clusters_pgbouncer_databases_load_in_pgbouncer() {
    let text = read_golden("clusters-pgbouncer.ini");
    let databases = text
        .split("[databases]\n")
        .nth(1)
        .and_then(|s| s.split("\n[pgbouncer]").next())
        .unwrap();
    let pgb = Pgbouncer::start_with(databases);
    let dbs = pgb.show_databases();
    for (db, host, port) in [
        ("app", "10.0.1.12", "5432"),
        ("citus", "172.27.0.4", "5432"),
    ] {
        let row = dbs
            .get(db)
            .unwrap_or_else(|| panic!("{db} not in SHOW DATABASES: {dbs:?}"));
        assert_eq!(row.get("host").map(String::as_str), Some(host), "{row:?}");
        assert_eq!(row.get("port").map(String::as_str), Some(port), "{row:?}");
        assert_eq!(row.get("database").map(String::as_str), Some(db), "{row:?}");
    }
    assert!(!dbs.contains_key("billing") && !dbs.contains_key("ledger"));
}

/// A template that names a member's WAL fields (or anything reaching them) is rendered again on
/// every Patroni heartbeat; the shipped ones must not, comments included.
#[test]
fn shipped_clusters_templates_do_not_read_wal_positions() {
    for f in [
        "haproxy-clusters.cfg.tera",
        "pgbouncer-clusters.ini.tera",
        "haproxy-citus.cfg.tera",
    ] {
        let text = std::fs::read_to_string(root().join("templates").join(f)).unwrap();
        assert!(!haconfd::render::reads_wal(&text), "{f}");
    }
}
