//! Event hooks under hostile conditions: a hook that hangs or fails delays no routing and runs
//! no twice; each event reaches the command once, as JSON on stdin and as `HACONFD_*` variables;
//! `check` names a hook whose program cannot run; `--dry-run-hooks` runs nothing.

use super::*;

use nix::sys::signal::Signal;

/// `[[hook]]` entries and a `[failover]` section for [`Cfg::daemon_extra`] (tables may follow
/// the `[daemon]` keys in any order).
fn hooks_toml(ws: &Ws, extra: &str) -> String {
    format!(
        r#"
[failover]
enabled = false

[hooks]
concurrency = 4

[[hook]]
name = "record"
command = ["tee", "-a", {events}]

[[hook]]
name = "env"
command = ["sh", "-c", "echo \"$HACONFD_EVENT $HACONFD_SCOPE $HACONFD_OLD_LEADER $HACONFD_NEW_LEADER\" >> {env}"]
events = ["failover_completed"]
{extra}
"#,
        events = q(ws.path("events.jsonl")),
        env = ws.path("env.txt").display(),
    )
}

fn recorded(ws: &Ws) -> Vec<serde_json::Value> {
    std::fs::read_to_string(ws.path("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn count(events: &[serde_json::Value], name: &str) -> usize {
    events.iter().filter(|e| e["event"] == name).count()
}

#[test]
fn each_event_reaches_a_hook_once_and_a_hanging_hook_delays_no_routing() {
    let mut ws = Ws::new("hookrun");
    let extra = hooks_toml(
        &ws,
        r#"
[[hook]]
name = "hang"
command = ["sleep", "30"]
timeout = "300ms"

[[hook]]
name = "fail"
command = ["false"]
"#,
    );
    ws.reconfigure(|c| c.daemon_extra = extra);
    let daemon = ws.start_debug_run();
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().contains("pass")),
        "{}",
        daemon.log()
    );

    // A switchover as Patroni makes it.
    ws.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
    ws.delete("leader");
    let t0 = Instant::now();
    ws.put("leader", "pg2");
    ws.put("members/pg2", &member(5442, "master").to_string());
    // Routing does not wait for the hooks (the hanging ones run 300 ms each).
    assert!(
        wait_until(Duration::from_secs(3), || read(&ws.pgb)
            .contains("host=127.0.0.1 port=5442")),
        "pgbouncer.ini not re-pointed:\n{}",
        daemon.log()
    );
    let repointed = t0.elapsed();
    assert!(
        repointed < Duration::from_millis(1000),
        "re-pointed after {repointed:?}"
    );

    let want = [
        "switchover_requested",
        "leader_lost",
        "leader_changed",
        "failover_completed",
        "member_promoted",
    ];
    assert!(
        wait_until(Duration::from_secs(5), || want
            .iter()
            .all(|w| count(&recorded(&ws), w) >= 1)),
        "hook saw {:?}\n{}",
        recorded(&ws),
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let events = recorded(&ws);
    for w in want {
        assert_eq!(count(&events, w), 1, "{w} ran more than once: {events:?}");
    }
    let done = events
        .iter()
        .find(|e| e["event"] == "failover_completed")
        .unwrap();
    assert_eq!(done["old_leader"], "pg1", "{done}");
    assert_eq!(done["new_leader"], "pg2", "{done}");
    assert_eq!(done["scope"], ws.scope.as_str(), "{done}");
    assert_eq!(done["namespace"], "/service", "{done}");
    assert_eq!(
        read(&ws.path("env.txt")).trim(),
        format!("failover_completed {} pg1 pg2", ws.scope)
    );
    let log = daemon.log();
    assert!(
        log.contains("did not finish within 300ms and was killed"),
        "{log}"
    );
    assert!(log.contains("`false` failed"), "{log}");
}

#[test]
fn check_names_a_hook_whose_program_cannot_run() {
    let mut ws = Ws::new("hookcheck");
    ws.reconfigure(|c| {
        c.daemon_extra =
            "\n[[hook]]\nname = \"page\"\ncommand = [\"/nonexistent/page-oncall\"]\n".into()
    });
    ws.run(&["check"])
        .expect(2, &["hook \"page\"", "/nonexistent/page-oncall"]);
    ws.reconfigure(|c| {
        c.daemon_extra =
            "\n[[hook]]\nname = \"page\"\ncommand = [\"true\"]\nevents = [\"failover\"]\n".into()
    });
    ws.run(&["check"])
        .expect(2, &["hook \"page\"", "unknown event \"failover\""]);
}

#[test]
fn dry_run_hooks_log_what_would_run_and_run_nothing() {
    let mut ws = Ws::new("hookdry");
    let marker = ws.path("ran");
    ws.reconfigure(|c| {
        c.daemon_extra = format!(
            "\n[[hook]]\nname = \"touch\"\ncommand = [\"touch\", {}]\n",
            q(&marker)
        )
    });
    let daemon = ws.start_run_with(
        &["--log-format", "json", "--log-level", "haconfd=debug"],
        &["--dry-run-hooks"],
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().contains("pass")),
        "{}",
        daemon.log()
    );
    ws.add_valid_member();
    assert!(
        wait_until(Duration::from_secs(5), || daemon
            .log()
            .contains("dry run: would run hook")),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("member_added"), "{log}");
    assert!(log.contains("HACONFD_MEMBER"), "{log}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "the hook ran in a dry run");
}

#[test]
fn a_sighup_that_changes_a_hook_keeps_its_debounced_member_down() {
    let mut ws = Ws::new("hookhup");
    let out = q(ws.path("events.jsonl"));
    let hook = |timeout: &str| {
        format!(
            "\n[failover]\nenabled = false\n\n[[hook]]\nname = \"down\"\ncommand = [\"tee\", \"-a\", {out}]\nevents = [\"member_down\"]\ndebounce = \"2s\"\ntimeout = \"{timeout}\"\n"
        )
    };
    let first = hook("10s");
    ws.reconfigure(|c| c.daemon_extra = first);
    let daemon = ws.start_debug_run();
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().contains("pass")),
        "{}",
        daemon.log()
    );
    let mut stopped = member(5442, "replica");
    stopped["state"] = "stopped".into();
    ws.put("members/pg2", &stopped.to_string());
    // One second into the debounce, a SIGHUP that changes only the hook's timeout.
    std::thread::sleep(Duration::from_secs(1));
    let second = hook("20s");
    ws.reconfigure(|c| c.daemon_extra = second);
    daemon.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(6), || count(
            &recorded(&ws),
            "member_down"
        ) == 1),
        "the debounced member_down never ran after the SIGHUP: {:?}\n{}",
        recorded(&ws),
        daemon.log()
    );
    assert_eq!(recorded(&ws)[0]["member"], "pg2");
}
