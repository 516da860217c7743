//! Cluster events end to end: a switchover's key changes, as Patroni makes them, reach `/status`
//! as typed events in order, and `/metrics` counts them by event.

use super::*;

fn status(port: u16) -> Option<serde_json::Value> {
    http_get(port, "/status").and_then(|(_, b)| serde_json::from_str(&b).ok())
}

/// The event kinds `/status` lists, oldest first.
fn kinds(st: &serde_json::Value) -> Vec<String> {
    st["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Makes one change and waits until `/status` lists `n` events in all.
fn step(port: u16, daemon: &Proc, n: usize, change: impl FnOnce()) {
    change();
    assert!(
        wait_until(Duration::from_secs(10), || status(port)
            .is_some_and(|st| kinds(&st).len() >= n)),
        "no {n}th event: {:?}\n{}",
        status(port),
        daemon.log()
    );
}

#[test]
fn a_switchover_is_listed_as_events_in_order_and_counted() {
    let mut ws = Ws::new("events");
    let port = free_port();
    ws.reconfigure(|c| {
        c.daemon_extra = format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n");
    });
    let daemon = ws.start_run(&[], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || status(port)
            .is_some_and(|st| st["cluster"]["leader_name"] == "pg1")),
        "{}",
        daemon.log()
    );

    // As `patronictl switchover` does it (Patroni 3 names the leader `master`).
    step(port, &daemon, 1, || {
        ws.put("failover", r#"{"leader":"pg1","member":"pg2"}"#)
    });
    step(port, &daemon, 2, || ws.delete("leader"));
    let mut demoted = member(5441, "demoted");
    demoted["state"] = "stopped".into();
    step(port, &daemon, 4, || {
        ws.put("members/pg1", &demoted.to_string())
    });
    step(port, &daemon, 5, || {
        ws.put("leader", "pg2");
        ws.put("failover", "{}");
    });
    step(port, &daemon, 6, || {
        ws.put("members/pg2", &member(5442, "master").to_string())
    });

    let st = status(port).unwrap();
    assert_eq!(
        kinds(&st),
        [
            "switchover_requested",
            "leader_lost",
            "member_demoted",
            "member_down",
            "leader_changed",
            "member_promoted"
        ],
        "{st}"
    );
    let ev = &st["events"];
    assert_eq!(ev[0]["leader"], "pg1", "{st}");
    assert_eq!(ev[0]["candidate"], "pg2", "{st}");
    assert_eq!(ev[1]["old"], "pg1", "{st}");
    assert_eq!(ev[3]["state"], "stopped", "{st}");
    assert_eq!(ev[4]["old"], "pg1", "{st}");
    assert_eq!(ev[4]["new"], "pg2", "{st}");
    assert_eq!(ev[5]["member"], "pg2", "{st}");
    assert!(ev[0]["at"].as_f64().unwrap() <= ev[5]["at"].as_f64().unwrap());
    assert_eq!(st["leader_changes"], 1, "{st}");

    let (_, m) = http_get(port, "/metrics").expect("/metrics answers");
    for kind in kinds(&st) {
        assert!(
            m.contains(&format!(
                "haconfd_cluster_events_total{{event=\"{kind}\"}} 1"
            )),
            "{kind}:\n{m}"
        );
    }
    let logs = daemon.log();
    assert!(logs.contains("cluster event: leader changed"), "{logs}");
}
