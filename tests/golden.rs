//! Golden render tests: the shipped templates against real Patroni 3.x (`master`) and 4.x
//! (`primary`) etcd dumps, compared byte for byte with files in tests/golden/. Regenerate with
//! `UPDATE_GOLDEN=1 cargo test --test golden` and review the diff.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use haconfd::config::{RawConfig, Settings};
use haconfd::pipeline::Engine;
use haconfd::snapshot::Snapshot;

use common::config::golden_config;
use common::procs::Haproxy;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn settings() -> Settings {
    let text = golden_config(
        Path::new("templates"),
        Path::new("/run/haproxy/admin.sock"),
        Path::new("/var/lib/haproxy/server-state"),
        Path::new("/etc/haproxy/haproxy.cfg"),
        Path::new("/etc/pgbouncer/pgbouncer.ini"),
    )
    .to_toml();
    RawConfig::parse(&text, Path::new("golden.toml"))
        .unwrap()
        .resolve(&root())
        .unwrap()
}

fn golden(fixture: &str, target: &str, expected: &str) {
    let snap = Snapshot::from_file(&root().join("tests/fixtures").join(fixture)).unwrap();
    let mut engine = Engine::new(Arc::new(settings())).unwrap();
    let out = engine.render(&snap, Some(target)).unwrap().remove(0).bytes;
    let path = root().join("tests/golden").join(expected);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&want),
        "{fixture} → {target} differs from {}",
        path.display()
    );
}

/// `haproxy -c` on a rendered config. It names system paths: the state file is checked at a
/// path that exists.
fn haproxy_check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = text.replace(
        "/var/lib/haproxy/server-state",
        &dir.path().join("state").display().to_string(),
    );
    let cfg = dir.path().join("h.cfg");
    std::fs::write(&cfg, text).unwrap();
    Haproxy::check_config(&cfg)
}

/// The haproxy target rendered from `snap` with `vars` added.
fn render_haproxy_with(snap: &Snapshot, vars: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut s = settings();
    for (k, v) in vars {
        s.targets[0].vars.insert((*k).into(), v.clone());
    }
    let mut engine = Engine::new(Arc::new(s)).unwrap();
    engine
        .render(snap, Some("haproxy"))
        .unwrap()
        .remove(0)
        .bytes
}

/// Renders the haproxy target from `snap` with `vars` added, compares it with the golden file
/// `expected` (written anew with `UPDATE_GOLDEN=1`), checks it with `haproxy -c`, and returns it.
fn golden_haproxy_with(
    snap: &Snapshot,
    vars: &[(&str, serde_json::Value)],
    expected: &str,
) -> String {
    let out = render_haproxy_with(snap, vars);
    let path = root().join("tests/golden").join(expected);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text, want, "differs from {}", path.display());
    let (ok, output) = haproxy_check(&text);
    assert!(ok, "haproxy -c: {output}");
    text
}

#[test]
fn patroni3_haproxy_lists_every_member_in_both_listeners() {
    golden("patroni3-kv.json", "haproxy", "patroni3-haproxy.cfg");
}

#[test]
fn patroni3_etcdctl_dump_renders_the_same_as_the_flat_dump() {
    golden("patroni3-etcdctl.json", "haproxy", "patroni3-haproxy.cfg");
    golden(
        "patroni3-etcdctl.json",
        "pgbouncer",
        "patroni3-pgbouncer.ini",
    );
}

#[test]
fn patroni3_pgbouncer_points_at_master_pg1() {
    golden("patroni3-kv.json", "pgbouncer", "patroni3-pgbouncer.ini");
}

#[test]
fn patroni4_haproxy_lists_every_member_in_both_listeners() {
    golden("patroni4-kv.json", "haproxy", "patroni4-haproxy.cfg");
}

#[test]
fn patroni4_pgbouncer_points_at_primary_pg2() {
    golden("patroni4-kv.json", "pgbouncer", "patroni4-pgbouncer.ini");
}

#[test]
fn golden_haproxy_configs_pass_haproxy_check() {
    for f in ["patroni3-haproxy.cfg", "patroni4-haproxy.cfg"] {
        let text = std::fs::read_to_string(root().join("tests/golden").join(f)).unwrap();
        let (ok, output) = haproxy_check(&text);
        assert!(ok, "{f}: {output}");
    }
}

/// A member whose host does not resolve (a typo, a DNS outage, a node not yet in DNS) must not
/// make `haproxy -c` refuse the whole file: the shipped template starts such a server in
/// maintenance (`init-addr last,libc,none`), and every other member keeps being routed.
#[test]
fn shipped_haproxy_template_survives_an_unresolvable_member_host() {
    let mut snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    snap.put(
        "/service/demo/members/pg9".into(),
        br#"{"conn_url":"postgres://pg9.invalid:5432/postgres","api_url":"http://pg9.invalid:8008/patroni","state":"running","role":"replica"}"#.to_vec(),
    );
    let mut engine = Engine::new(Arc::new(settings())).unwrap();
    let out = engine
        .render(&snap, Some("haproxy"))
        .unwrap()
        .remove(0)
        .bytes;
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("server pg9 pg9.invalid:5432 "), "{text}");
    let (ok, output) = haproxy_check(&text);
    assert!(ok, "haproxy -c refuses the unresolvable member:\n{output}");
    assert!(output.contains("pg9.invalid"), "{output}");
}

/// With `hold_lua` set, the primary listener holds new connections while no server takes
/// writes (the failover fast path's gap): the Lua action must load and the rules must parse in
/// a real HAProxy, with the inspect delay longer than the longest hold.
#[test]
fn shipped_haproxy_template_with_the_hold_action_passes_haproxy_check() {
    let snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    let mut s = settings();
    let lua = root().join("templates/hold.lua");
    s.targets[0]
        .vars
        .insert("hold_lua".into(), lua.display().to_string().into());
    s.targets[0].vars.insert("hold_max_ms".into(), 5000.into());
    let mut engine = Engine::new(Arc::new(s)).unwrap();
    let out = engine
        .render(&snap, Some("haproxy"))
        .unwrap()
        .remove(0)
        .bytes;
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains(&format!("lua-load {}", lua.display())),
        "{text}"
    );
    assert!(text.contains("tcp-request inspect-delay 6000ms"), "{text}");
    assert!(
        text.contains("tcp-request content lua.haconfd_hold primary 5000 10"),
        "{text}"
    );
    // Only the write port holds: the read port has no hold rule.
    let replicas = text.split("listen replicas").nth(1).unwrap();
    assert!(!replicas.contains("haconfd_hold"), "{text}");
    let (ok, output) = haproxy_check(&text);
    assert!(ok, "haproxy -c refuses the hold action:\n{output}");
}

/// Without `hold_max_ms`, the hold lasts the cluster's lease: Patroni's `ttl` plus its
/// `retry_timeout` (from its `config` key; 10 s when the key has no `retry_timeout`): a crashed
/// leader's key lives up to `ttl`, and the new leader's operations take up to `retry_timeout`, so
/// a new write connection waits for the next leader instead of being closed in the middle of the
/// lease (10 s without a `ttl`).
#[test]
fn the_hold_lasts_the_clusters_lease_unless_set() {
    let lua = root().join("templates/hold.lua");
    let render = |snap: &Snapshot| {
        let vars = [("hold_lua", lua.display().to_string().into())];
        String::from_utf8(render_haproxy_with(snap, &vars)).unwrap()
    };
    let mut snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    let text = render(&snap);
    assert!(text.contains("tcp-request inspect-delay 41000ms"), "{text}");
    assert!(
        text.contains("tcp-request content lua.haconfd_hold primary 40000 10"),
        "{text}"
    );
    let (ok, output) = haproxy_check(&text);
    assert!(ok, "{output}");
    snap.kvs.insert(
        "/service/demo/config".into(),
        br#"{"ttl":20,"loop_wait":2}"#.to_vec(),
    );
    let text = render(&snap);
    assert!(
        text.contains("tcp-request content lua.haconfd_hold primary 30000 10"),
        "{text}"
    );
    snap.kvs.remove("/service/demo/config");
    let text = render(&snap);
    assert!(
        text.contains("tcp-request content lua.haconfd_hold primary 10000 10"),
        "{text}"
    );
}

/// `tag_routes`: a listener for the members tagged `workload: olap` (tag routing), checked with
/// Patroni's `/replica?tag_workload=olap`; a tagged member with `noloadbalance` stays out, and
/// so does every member without the tag. The file passes `haproxy -c`.
#[test]
fn patroni4_tag_route_lists_the_tagged_members_without_noloadbalance() {
    let mut snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    let tag = |name: &str, tags: &str| {
        let key = format!("/service/demo/members/{name}");
        let mut v: serde_json::Value = serde_json::from_slice(&snap.kvs[&key]).unwrap();
        v["tags"] = serde_json::from_str(tags).unwrap();
        (key, serde_json::to_vec(&v).unwrap())
    };
    let puts = [
        tag("pg1", r#"{"workload": "olap"}"#),
        tag("pg3", r#"{"workload": "olap", "noloadbalance": true}"#),
    ];
    for (k, v) in puts {
        snap.put(k, v);
    }
    let route =
        serde_json::json!([{ "name": "olap", "port": 5003, "tag": "workload", "value": "olap" }]);
    let text = golden_haproxy_with(&snap, &[("tag_routes", route)], "patroni4-tags-haproxy.cfg");
    let olap = text.split("listen olap").nth(1).expect("the olap listener");
    assert!(olap.contains("HEAD /replica?tag_workload=olap"), "{olap}");
    assert!(olap.contains("server pg1 "), "{olap}");
    assert!(
        !olap.contains("server pg2 ") && !olap.contains("server pg3 "),
        "{olap}"
    );
}

/// `sync_port`: a listener for the leader's synchronous standbys only (Patroni's `sync` key),
/// checked with `/sync`. The file passes `haproxy -c`.
#[test]
fn patroni4_sync_listener_lists_the_synchronous_standby_only() {
    let mut snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    snap.put(
        "/service/demo/sync".into(),
        br#"{"leader":"pg2","sync_standby":"pg3"}"#.to_vec(),
    );
    let text = golden_haproxy_with(
        &snap,
        &[("sync_port", 5002.into())],
        "patroni4-sync-haproxy.cfg",
    );
    let sync = text.split("listen sync").nth(1).expect("the sync listener");
    let sync = sync.split("\nlisten ").next().unwrap();
    assert!(
        sync.contains("bind *:5002") && sync.contains("HEAD /sync"),
        "{sync}"
    );
    assert!(sync.contains("server pg3 "), "{sync}");
    assert!(
        !sync.contains("server pg1 ") && !sync.contains("server pg2 "),
        "{sync}"
    );
}

/// `replica_fallback`: the leader joins the replica listener as a `backup` server that tracks
/// its server in the primary listener (reads go to it only while no replica is UP, and only
/// while it takes writes). The file passes `haproxy -c`.
#[test]
fn patroni4_replica_fallback_adds_the_leader_as_a_tracking_backup() {
    let snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    let text = golden_haproxy_with(
        &snap,
        &[("replica_fallback", true.into())],
        "patroni4-fallback-haproxy.cfg",
    );
    let replicas = text.split("listen replicas").nth(1).unwrap();
    assert!(
        replicas.contains("server pg2-primary 127.0.0.1:5442 maxconn 100 backup track primary/pg2"),
        "{replicas}"
    );
}

/// A Patroni standby cluster (`standby_cluster` in its `config` key, its leader's role
/// `standby_leader`): the read port checks `/read-only`, so that the standby leader serves reads
/// with the replicas, and the fallback to the leader is left out (it takes no writes). The file
/// passes `haproxy -c`.
#[test]
fn patroni4_standby_cluster_reads_from_the_standby_leader_and_its_replicas() {
    let mut snap = Snapshot::from_file(&root().join("tests/fixtures/patroni4-kv.json")).unwrap();
    let key = "/service/demo/members/pg2".to_owned();
    let mut leader: serde_json::Value = serde_json::from_slice(&snap.kvs[&key]).unwrap();
    leader["role"] = "standby_leader".into();
    snap.put(key, serde_json::to_vec(&leader).unwrap());
    let config_key = "/service/demo/config".to_owned();
    let mut config: serde_json::Value = snap
        .kvs
        .get(&config_key)
        .map(|v| serde_json::from_slice(v).unwrap())
        .unwrap_or_else(|| serde_json::json!({}));
    config["standby_cluster"] = serde_json::json!({ "host": "10.0.1.5", "port": 5432 });
    snap.put(config_key, serde_json::to_vec(&config).unwrap());
    let text = golden_haproxy_with(
        &snap,
        &[("replica_fallback", true.into())],
        "patroni4-standby-haproxy.cfg",
    );
    let replicas = text
        .split("listen replicas")
        .nth(1)
        .expect("the replica listener");
    assert!(replicas.contains("HEAD /read-only"), "{replicas}");
    assert!(!replicas.contains("-primary "), "{replicas}");
    let primary = text.split("listen primary").nth(1).unwrap();
    assert!(primary.contains("HEAD /primary"), "{primary}");
}
