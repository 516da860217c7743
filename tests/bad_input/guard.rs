//! The shrink guard against the sequences real failovers produce (leases expiring one by one or
//! together, then a promotion), its memory in `guard.state_file` (restarts, scopes sharing one
//! file), and `/status` and `/metrics` showing what etcd says while a pass is refused.

use super::*;

/// A workspace whose guard remembers accepted views in `members.json` (its known-good files are
/// written first, before the file is configured).
fn guarded(tag: &str, names: &[&str]) -> Ws {
    let mut ws = Ws::with_members(tag, names);
    let state = ws.path("members.json");
    ws.reconfigure(|c| c.guard = format!("state_file = {}\n", q(&state)));
    ws
}

/// Re-puts each member (the first also holding the `leader` key) on a lease of its own, as
/// Patroni's etcd3 backend does: revoking a lease is a lease expiring, every key of it gone in one
/// revision. Returns the leases in the order of `names`.
fn on_leases(ws: &Ws, names: &[&str]) -> Vec<i64> {
    let e = Etcd::shared();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let key = ws.key(&format!("members/{n}"));
            let value = e
                .get(&key)
                .unwrap_or_else(|| panic!("{key} is not in etcd"));
            let lease = e.put_with_lease(&key, &value, 120);
            if i == 0 {
                e.put_on_lease(&ws.key("leader"), n, lease);
            }
            lease
        })
        .collect()
}

/// Patroni promoting `name` (member number `index` of the workspace, for its port): its member
/// key says `master`, then it takes the leader key.
fn promote(ws: &Ws, name: &str, index: u16) {
    ws.put(
        &format!("members/{name}"),
        &member(5441 + index, "master").to_string(),
    );
    ws.put("leader", name);
}

/// pgbouncer.ini routes to the member on `port`.
fn routes_to(ws: &Ws, port: u16) -> bool {
    read(&ws.pgb).contains(&format!("host=127.0.0.1 port={port}"))
}

/// `haconfd run` on `ws`'s config with debug logs (every pass logs its revision).
fn start_daemon(ws: &Ws) -> Proc {
    let daemon = ws.start_debug_run();
    assert!(
        wait_until(Duration::from_secs(10), || !passes_after(&daemon, 0)
            .is_empty()),
        "the daemon's first pass did not finish:\n{}",
        daemon.log()
    );
    daemon
}

/// The daemon's pass log lines over a snapshot newer than `revision`. Other tests write to the
/// shared etcd, but this scope's snapshot only moves with this scope's events, so a pass past
/// the revision read before a change has seen it.
fn passes_after(daemon: &Proc, revision: i64) -> Vec<serde_json::Value> {
    daemon
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "haconfd::daemon")
        .filter(|v| v["revision"].as_i64().is_some_and(|r| r > revision))
        .collect()
}

/// Runs `change` and waits for the daemon's first pass over it; returns that pass's log line.
fn pass_over(daemon: &Proc, change: impl FnOnce()) -> serde_json::Value {
    let before = Etcd::shared().revision();
    change();
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(10), || {
        seen = passes_after(daemon, before);
        !seen.is_empty()
    });
    seen.into_iter().next().unwrap_or_else(|| {
        panic!(
            "no pass over the change after revision {before}:\n{}",
            daemon.log()
        )
    })
}

fn saved_memory(ws: &Ws) -> serde_json::Value {
    serde_json::from_str(&read(&ws.path("members.json"))).unwrap()
}

#[test]
fn guard_lets_a_failover_through_when_members_leave_one_by_one() {
    let ws = guarded("failover1by1", &["pg1", "pg2", "pg3"]);
    let leases = on_leases(&ws, &["pg1", "pg2", "pg3"]);
    let daemon = start_daemon(&ws);

    // The leader's lease expires: its member and the leader key go, the pass is leaderless.
    let pass = pass_over(&daemon, || Etcd::shared().revoke(leases[0]));
    assert!(
        !pass.to_string().contains("gone at once"),
        "losing the leader was refused: {pass}"
    );
    // A few seconds later a replica's lease expires too.
    let pass = pass_over(&daemon, || Etcd::shared().revoke(leases[1]));
    assert!(
        !pass.to_string().contains("gone at once"),
        "the second departure was counted with the first: {pass}\n{}",
        daemon.log()
    );
    // The survivor is promoted: pgbouncer.ini must follow it.
    promote(&ws, "pg3", 2);
    assert!(
        wait_until(Duration::from_secs(10), || routes_to(&ws, 5443)),
        "pgbouncer.ini stayed on the dead leader:\n{}\nlog:\n{}",
        read(&ws.pgb),
        daemon.log()
    );
    assert!(!daemon.log().contains("gone at once"), "{}", daemon.log());
    assert_killed_by(&ws.pgb_sleep, nix::sys::signal::Signal::SIGHUP);
    assert_eq!(
        saved_memory(&ws)["clusters"][0]["members"],
        serde_json::json!(["pg3"]),
        "the last accepted view is remembered"
    );
    daemon.kill();
}

#[test]
fn guard_lets_a_failover_through_one_by_one_across_once_runs() {
    // Every `once` is a restart: the memory lives in the state file only.
    let ws = guarded("failoveronce", &["pg1", "pg2", "pg3"]);
    let leases = on_leases(&ws, &["pg1", "pg2", "pg3"]);
    ws.once(&["--no-reload"]).expect(0, &[]);
    Etcd::shared().revoke(leases[0]);
    ws.once(&["--no-reload"]).expect(5, &["needs a leader"]);
    Etcd::shared().revoke(leases[1]);
    ws.once(&["--no-reload"]).expect(5, &["needs a leader"]);
    promote(&ws, "pg3", 2);
    ws.once(&["--no-reload"]).expect(0, &[]);
    assert!(routes_to(&ws, 5443), "{}", read(&ws.pgb));
}

#[test]
fn guard_refuses_leader_and_replica_vanishing_together_until_the_survivor_is_promoted() {
    let ws = guarded("crash2of3", &["pg1", "pg2", "pg3"]);
    let e = Etcd::shared();
    // Leader and replica crash together: one lease holding both, one revision deleting both.
    let both = e.put_with_lease(
        &ws.key("members/pg1"),
        &member(5441, "master").to_string(),
        120,
    );
    e.put_on_lease(
        &ws.key("members/pg2"),
        &member(5442, "replica").to_string(),
        both,
    );
    e.put_on_lease(&ws.key("leader"), "pg1", both);
    ws.once(&["--no-reload"]).expect(0, &[]);
    let before = ws.files();
    e.revoke(both);
    // Two of three gone at once with no leader: what an emptied store looks like, refused...
    let refused = "etcd shows 1 member(s) and no valid leader";
    ws.once(&[]).expect(4, &[refused, "2 gone at once"]);
    // ...and still refused after a restart: a refused view never becomes the reference.
    ws.once(&[]).expect(4, &[refused, "2 gone at once"]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
    // The survivor is promoted: a leader vouches for the view.
    promote(&ws, "pg3", 2);
    ws.once(&[]).expect(0, &[]);
    assert!(routes_to(&ws, 5443), "{}", read(&ws.pgb));
    assert_killed_by(&ws.pgb_sleep, nix::sys::signal::Signal::SIGHUP);
}

#[test]
fn guard_block_does_not_survive_a_restart() {
    let ws = guarded("blockrestart", &["pg1", "pg2", "pg3"]);
    ws.once(&["--no-reload"]).expect(0, &[]);
    // The failover runs its course while haconfd is down: the state file still remembers three.
    ws.delete("members/pg1");
    ws.delete("members/pg2");
    promote(&ws, "pg3", 2);
    let memory = read(&ws.path("members.json"));
    assert!(
        memory.contains("\"pg1\"") && memory.contains("\"pg2\""),
        "{memory}"
    );
    let daemon = start_daemon(&ws);
    assert!(
        wait_until(Duration::from_secs(10), || routes_to(&ws, 5443)),
        "the restarted daemon kept pgbouncer.ini on the dead leader:\n{}\nlog:\n{}",
        read(&ws.pgb),
        daemon.log()
    );
    assert!(!daemon.log().contains("gone at once"), "{}", daemon.log());
    daemon.kill();

    // A state file an older haconfd left behind while blocked (no cluster named) is ignored.
    std::fs::write(
        ws.path("members.json"),
        r#"{"members":["pg1","pg2","pg3","pg4"]}"#,
    )
    .unwrap();
    ws.delete("leader");
    let run = ws.once(&["--no-reload"]);
    run.expect(5, &["needs a leader"]);
    assert!(
        run.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.contains("written by an older haconfd"))),
        "{}",
        run.stderr
    );
    assert_eq!(
        saved_memory(&ws)["clusters"][0]["members"],
        serde_json::json!(["pg3"])
    );
}

#[test]
fn guard_state_file_shared_by_two_scopes_keeps_each_scope_apart() {
    let b = guarded("sharedb", &["pg1", "pg2", "pg3"]);
    let mut a = Ws::with_members("shareda", &["a1", "a2", "a3", "a4"]);
    let shared = b.path("members.json");
    a.reconfigure(|c| c.guard = format!("state_file = {}\n", q(&shared)));
    b.once(&["--no-reload"]).expect(0, &[]);
    a.once(&["--no-reload"]).expect(0, &[]);

    // B loses its leader key only: its own three members are all there.
    b.delete("leader");
    let run = b.once(&["--no-reload"]);
    assert!(
        run.code != 4 && !run.stderr.contains("gone at once"),
        "B's view was compared with A's members:\n{}",
        run.stderr
    );
    run.expect(5, &["needs a leader"]);

    // A keeps its own memory through B's writes: its members vanishing at once is still refused.
    for m in ["a1", "a2", "a3"] {
        a.delete(&format!("members/{m}"));
    }
    a.once(&["--no-reload"]).expect(4, &["3 gone at once"]);
    let memory = saved_memory(&b);
    let scopes: Vec<&str> = memory["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["scope"].as_str().unwrap())
        .collect();
    assert!(
        scopes.contains(&a.scope.as_str()) && scopes.contains(&b.scope.as_str()),
        "{memory}"
    );
}

/// `/status` as JSON, once the endpoint answers.
fn status_json(port: u16) -> serde_json::Value {
    let (code, body) = http_get(port, "/status").expect("/status answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metrics_text(port: u16) -> String {
    http_get(port, "/metrics").expect("/metrics answers").1
}

#[test]
fn status_and_metrics_show_no_leader_while_the_pass_is_refused() {
    let mut ws = guarded("statusview", &["rm1", "rm2", "pg3"]);
    let port = free_port();
    ws.reconfigure(|c| {
        c.daemon_extra = format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n");
    });
    let daemon = start_daemon(&ws);
    assert!(
        wait_until(Duration::from_secs(5), || http_get(port, "/status")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|st| st["cluster"]["leader_name"] == "rm1")),
        "{}",
        daemon.log()
    );

    // The leader key goes: the pass is refused (no leader), and dashboards must say so.
    let pass = pass_over(&daemon, || ws.delete("leader"));
    assert!(pass.to_string().contains("needs a leader"), "{pass}");
    let st = status_json(port);
    assert_eq!(st["last_pass_ok"], false, "{st}");
    assert_eq!(st["last_error_reason"], "no_leader", "{st}");
    assert!(st["cluster"]["leader_name"].is_null(), "{st}");
    let m = metrics_text(port);
    assert!(!m.contains("haconfd_cluster_leader{"), "{m}");
    assert!(m.contains("haconfd_cluster_has_leader 0"), "{m}");

    // Two members vanish at once with no leader: the guard refuses, the view is still shown.
    let pass = pass_over(&daemon, || {
        assert_eq!(Etcd::shared().delete_prefix(&ws.key("members/rm")), 2);
    });
    assert!(pass.to_string().contains("2 gone at once"), "{pass}");
    let st = status_json(port);
    assert_eq!(st["last_error_reason"], "guard", "{st}");
    let members: Vec<&str> = st["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["pg3"], "{st}");
    assert!(
        metrics_text(port)
            .contains("haconfd_cluster_members{role=\"replica\",state=\"streaming\"} 1"),
        "{}",
        metrics_text(port)
    );

    // pg3 is promoted: one leader change, rm1 → pg3, through the leaderless spell.
    promote(&ws, "pg3", 2);
    assert!(
        wait_until(Duration::from_secs(10), || status_json(port)
            ["last_pass_ok"]
            == true),
        "{}",
        daemon.log()
    );
    let st = status_json(port);
    assert_eq!(st["cluster"]["leader_name"], "pg3", "{st}");
    assert_eq!(st["leader_changes"], 1, "{st}");
    let m = metrics_text(port);
    assert!(m.contains("haconfd_cluster_leader{name=\"pg3\"} 1"), "{m}");
    assert!(m.contains("haconfd_cluster_has_leader 1"), "{m}");
    assert!(m.contains("haconfd_leader_changes_total 1"), "{m}");
    daemon.kill();
}
