//! The failover fast path's faults. A real etcd, HAProxy (the shipped template, health checks
//! every 60 s so that every move seen is haconfd's), PgBouncer (the shipped template, paused and
//! resumed through its console) and one PostgreSQL that answers for every member on the member's
//! own loopback address (`inet_server_addr()` tells which member a client reached), with each
//! member's Patroni REST API scripted by the test. haconfd is stopped or killed at each step of a
//! switchover and started again; a switchover request nothing follows, a leader key that flaps,
//! odd member data and a stats socket below `level admin` must never leave writes blocked.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fastpath::*;
use common::procs::{haconfd_bin, run_with_timeout, Role};
use nix::sys::signal::Signal;

// ---------------------------------------------------------------------------------------------
// Stopped or killed in the middle of a switch
// ---------------------------------------------------------------------------------------------

/// SIGTERM and SIGINT after the fence and PAUSE: haconfd exits having resumed PgBouncer and
/// lifted the drain; nothing waits for a process that is gone.
#[test]
fn stopped_in_the_middle_of_a_switch_haconfd_resumes_pgbouncer_and_lifts_the_drain() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut rig = Rig::start(&format!("stop{sig:?}").to_lowercase(), Setup::default());
        rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
        rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
        rig.wait_log("PgBouncer paused", Duration::from_secs(3));
        rig.assert_pgbouncer_paused("after PAUSE");
        rig.stop_with(sig);
        // Nothing of haconfd runs now: what it held is undone already.
        assert_eq!(
            rig.server("primary", "pg1"),
            Some((UP, READY)),
            "{sig:?}: the drain outlived haconfd:\n{}",
            rig.diag()
        );
        let r = reached(rig.pgb_port, Duration::from_secs(2));
        assert_eq!(
            r.as_deref(),
            Ok("127.0.0.11"),
            "{sig:?}: PgBouncer still paused after haconfd exited:\n{}",
            rig.diag()
        );
    }
}

/// One step of a switchover at which haconfd is SIGKILLed.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The old primary drained.
    AfterFence,
    /// PgBouncer's PAUSE answered.
    AfterPause,
    /// The leader key on the candidate, whose REST API does not say writable yet.
    DuringConfirmation,
    /// HAProxy moved to the confirmed primary; PgBouncer still paused (its pass held in the
    /// check of pgbouncer.ini), so not re-pointed and not resumed.
    AfterHaproxyMove,
}

/// haconfd SIGKILLed at each step of a switchover, the switchover completed (or cancelled) by
/// Patroni meanwhile, haconfd started again: within a second of the restart, writes through
/// HAProxy and PgBouncer reach the leader, and nothing stays drained or paused.
#[test]
fn killed_at_each_step_of_a_switchover_a_restart_puts_writes_on_the_leader_within_a_second() {
    let cells = [
        (Step::AfterFence, false),
        (Step::AfterFence, true),
        (Step::AfterPause, true),
        (Step::DuringConfirmation, true),
        (Step::AfterHaproxyMove, true),
    ];
    for (step, completed) in cells {
        let when = format!(
            "{step:?}, switchover {}",
            if completed { "completed" } else { "cancelled" }
        );
        let mut setup = Setup::default();
        if matches!(step, Step::AfterHaproxyMove) {
            // Holds PgBouncer's pass in its check while HAProxy moves (in its own task).
            setup.pgb_check = Some(
                ["sh", "-c", "sleep 5; test -s \"$0\"", "{{staged}}"]
                    .map(String::from)
                    .to_vec(),
            );
        }
        let mut rig = Rig::start(&format!("kill{}", step as u8), setup);
        rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
        rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(3));
        match step {
            Step::AfterFence => {}
            Step::AfterPause => {
                rig.wait_log("PgBouncer paused", Duration::from_secs(3));
                rig.assert_pgbouncer_paused(&when);
            }
            Step::DuringConfirmation => {
                rig.member("pg2").api.set_role(Role::Promoting);
                rig.delete("leader");
                rig.put("leader", "pg2");
                rig.wait_log("\"new\":\"pg2\"", Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(200));
            }
            Step::AfterHaproxyMove => {
                rig.complete_switch("pg1", "pg2");
                rig.wait_log("HAProxy follows the new primary", Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(300));
                rig.assert_pgbouncer_paused(&when);
                assert!(!rig.log_text().contains("PgBouncer follows the new primary"));
            }
        }
        rig.haconfd().kill();
        rig.haconfd = None;
        let leader = if completed {
            rig.complete_switch("pg1", "pg2");
            "pg2"
        } else {
            rig.delete("failover");
            "pg1"
        };
        // The restart's own config: nothing holds its first pass.
        rig.setup.pgb_check = None;
        rig.write_config();
        let t0 = Instant::now();
        rig.run();
        // Within a second of the restart: the first pass, the repair and the re-pointing.
        let left = Duration::from_secs(1).saturating_sub(t0.elapsed());
        rig.assert_writes_reach(leader, left, &when);
        let other = if leader == "pg1" { "pg2" } else { "pg1" };
        assert_eq!(
            rig.server("primary", other).map(|s| s.0),
            Some(DOWN),
            "{when}: {other} takes writes in HAProxy:\n{}",
            rig.diag()
        );
    }
}

/// At start, a drain in a primary backend is haconfd's (its fence never outlives it) and is
/// lifted; an operator's `maint` is left as it is, even on the leader.
#[test]
fn at_start_a_drain_left_on_the_leader_is_lifted_and_an_operators_maint_is_left_alone() {
    let mut rig = Rig::start("startrepair", Setup::default());
    rig.stop_with(Signal::SIGTERM);
    rig.admin("set server primary/pg1 state drain");
    rig.admin("set server primary/pg2 state maint");
    rig.admin("set server replicas/pg2 state drain");
    rig.run();
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rig.server("primary", "pg2").map(|s| s.1),
        Some(MAINT),
        "an operator's maint was lifted:\n{}",
        rig.diag()
    );
    assert_eq!(
        rig.server("replicas", "pg2").map(|s| s.1),
        Some(DRAIN),
        "a drain in a replica backend is an operator's:\n{}",
        rig.diag()
    );
    assert!(
        rig.log_text()
            .contains("HAProxy moved through the runtime API"),
        "{}",
        rig.diag()
    );
    // The leader in maintenance: its writes are blocked by the operator, not by haconfd.
    rig.admin("set server primary/pg2 state ready");
    rig.stop_with(Signal::SIGTERM);
    rig.admin("set server primary/pg1 state maint");
    rig.run();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.server("primary", "pg1").map(|s| s.1),
        Some(MAINT),
        "{}",
        rig.diag()
    );
    // PgBouncer paused by hand (or by a run killed mid-switch) is resumed at start.
    rig.stop_with(Signal::SIGTERM);
    rig.pgbouncer.as_ref().unwrap().admin_query("PAUSE");
    rig.assert_pgbouncer_paused("PAUSE by hand");
    rig.run();
    assert_eq!(
        reached(rig.pgb_port, Duration::from_secs(2)).as_deref(),
        Ok("127.0.0.11"),
        "PgBouncer left paused at start:\n{}",
        rig.diag()
    );
    assert!(
        rig.log_text().contains("PgBouncer was left paused"),
        "{}",
        rig.diag()
    );
}

// ---------------------------------------------------------------------------------------------
// Fences nobody follows, fences in a row
// ---------------------------------------------------------------------------------------------

/// A `failover` key no Patroni acts on (a hung leader Patroni, a hand-written key): the drain
/// and the pause end at `failover.fence_timeout`, `/status` shows the fence while it lasts, and a
/// scheduled switchover fences nothing before its leader key moves.
#[test]
fn a_switchover_request_nothing_follows_drains_and_pauses_only_until_fence_timeout() {
    let mut setup = Setup::default();
    setup.failover.push(("fence_timeout", "1500ms"));
    setup.failover.push(("drift_interval", "200ms"));
    setup.failover.push(("drift_grace", "300ms"));
    let rig = Rig::start("fencebound", setup);
    rig.put("failover", r#"{"leader":"pg1","member":"pg2"}"#);
    let t0 = Instant::now();
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
    let during = rig.status();
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(3));
    let lifted = t0.elapsed();
    assert!(
        lifted >= Duration::from_millis(1300) && lifted < Duration::from_millis(2800),
        "the drain lasted {lifted:?} with fence_timeout 1.5s:\n{}",
        rig.diag()
    );
    let fences = &during["fast_path"]["fences"];
    assert_eq!(fences[0]["server"], "pg1", "{during}");
    assert_eq!(fences[0]["why"], "switchover requested", "{during}");
    // The drift warning named haconfd's own fence, not the health checks.
    assert!(
        rig.log_text().contains("drained by haconfd's fence"),
        "{}",
        rig.diag()
    );
    assert_eq!(
        reached(rig.pgb_port, Duration::from_secs(2)).as_deref(),
        Ok("127.0.0.11"),
        "PgBouncer still paused after the fence ended:\n{}",
        rig.diag()
    );
    rig.wait_log(
        "was not acted on within failover.fence_timeout",
        Duration::from_secs(1),
    );
    assert!(
        rig.metrics()
            .contains("haconfd_failover_fences_expired_total 1"),
        "{}",
        rig.metrics()
    );
    assert_eq!(rig.status()["fast_path"]["fences"], serde_json::json!([]));
    // The key stays: nothing fences again until it changes.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rig.server("primary", "pg1"), Some((UP, READY)));

    // A scheduled switchover: no fence before its leader key moves.
    rig.put(
        "failover",
        r#"{"leader":"pg1","member":"pg2","scheduled_at":"2099-01-01T00:00:00+00:00"}"#,
    );
    rig.wait_log("scheduled switchover", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.server("primary", "pg1"),
        Some((UP, READY)),
        "a scheduled switchover fenced the leader:\n{}",
        rig.diag()
    );
}

/// A candidate takes the leader key and never confirms, the old leader takes it back (two
/// fences: the old leader's, then the candidate's), then a real move: no leader is ever left
/// drained; and the leader key flapping between two members at 20 Hz leaves the last one UP
/// and ready.
#[test]
fn fences_in_a_row_never_leave_the_leader_drained() {
    let rig = Rig::start("twofences", Setup::default());
    rig.member("pg2").api.set_role(Role::Promoting);
    rig.put("leader", "pg2");
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    rig.put("leader", "pg1");
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2));
    rig.assert_writes_reach("pg1", Duration::from_secs(2), "old leader back");

    rig.complete_switch("pg1", "pg2");
    rig.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(2));
    rig.assert_writes_reach("pg2", Duration::from_secs(2), "after the real move");

    // 60 flips at 20 Hz; pg1's REST API says replica, pg2's primary all along: every flip to
    // pg1 fences pg2, every flip to pg2 confirms it.
    for i in 0..60 {
        rig.put("leader", if i % 2 == 0 { "pg1" } else { "pg2" });
        std::thread::sleep(Duration::from_millis(50));
    }
    rig.wait_server("primary", "pg2", (UP, READY), Duration::from_secs(3));
    rig.assert_writes_reach("pg2", Duration::from_secs(2), "after 60 flips");
}

// ---------------------------------------------------------------------------------------------
// Odd member data, refused moves
// ---------------------------------------------------------------------------------------------

/// Patroni accepts any tag value: `zone = "eu-west/1a"` and `owner = "team db"` on the leader's
/// key keep it the leader: no fence, no pause, and it stays in haproxy.cfg.
#[test]
fn odd_tag_values_on_the_leader_fence_nothing_and_drop_no_member() {
    let rig = Rig::start("oddtags", Setup::default());
    rig.put(
        "members/pg1",
        &rig.member("pg1").json_with(
            "primary",
            serde_json::json!({"zone": "eu-west/1a", "owner": "team db", "nofailover": false}),
        ),
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !rig.log_text().contains("fencing the old primary"),
        "the leader was fenced for a tag:\n{}",
        rig.diag()
    );
    assert_eq!(rig.server("primary", "pg1"), Some((UP, READY)));
    rig.assert_writes_reach("pg1", Duration::from_secs(2), "odd tags on the leader");
    let cfg = std::fs::read_to_string(rig.dir.path().join("haproxy.cfg")).unwrap();
    assert_eq!(cfg.matches("server pg1 ").count(), 2, "{cfg}");
    rig.wait_log("ignoring a field of a member key", Duration::from_secs(1));
    assert!(rig.log_text().contains("tags.owner"), "{}", rig.diag());
}

/// A stats socket at `level user` refuses every move: each refusal is an error in the log, in
/// `/status` and in `haconfd_failover_moves_total{consumer="haproxy",result="refused"}`, the
/// switch is not recorded as done, and `haconfd check` names the socket and its level.
#[test]
fn moves_a_user_level_stats_socket_refuses_are_errors_never_switches() {
    let rig = Rig::start(
        "userlevel",
        Setup {
            socket_level: "user",
            ..Setup::default()
        },
    );
    rig.complete_switch("pg1", "pg2");
    rig.wait_log("PgBouncer follows the new primary", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(200));
    let st = rig.status();
    assert_eq!(st["last_failover"]["new"], "pg2", "{st}");
    assert!(
        st["last_failover"]["haproxy_after_ms"].is_null(),
        "a refused move was recorded as HAProxy's switch: {st}"
    );
    assert!(
        st["fast_path"]["moves_refused"].as_u64() >= Some(1)
            && st["fast_path"]["last_refused"]
                .as_str()
                .is_some_and(|t| t.contains("Permission denied")),
        "{st}"
    );
    rig.wait_log(
        "HAProxy refused runtime API commands",
        Duration::from_secs(1),
    );
    let m = rig.metrics();
    assert!(
        m.contains("haconfd_failover_moves_total{consumer=\"haproxy\",result=\"refused\"}"),
        "{m}"
    );
    assert!(
        !m.contains("haconfd_failover_switch_seconds_count{consumer=\"haproxy\"} 1"),
        "{m}"
    );
    assert!(
        rig.log_text().contains("\"level\":\"ERROR\""),
        "{}",
        rig.diag()
    );
    let mut check = Command::new(haconfd_bin());
    check.arg("-c").arg(&rig.config).arg("check");
    let out = run_with_timeout(&mut check, Duration::from_secs(20)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&rig.admin_sock.display().to_string())
            && err.contains("level \"user\"")
            && err.contains("level admin"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// A primary that dies: the crash hold
// ---------------------------------------------------------------------------------------------

/// pg1's PostgreSQL behind a front the test crashes (its port refuses connections, its sessions
/// are cut, its REST API answers 503) and starts again, with `failover.crash_hold.max = "2s"`:
/// - frozen (connections accepted, never served), it is slow, not dead: nothing is held;
/// - crashed, it is drained in HAProxy and PgBouncer pauses at once (`/status` shows the hold),
///   until it takes writes again (Patroni restarting PostgreSQL with its lock kept);
/// - crashed with haconfd SIGKILLed during the hold: the next start lifts the drain and resumes
///   PgBouncer, holds again (PostgreSQL is still down) and releases at the bound;
/// - crashed with haconfd stopped (SIGTERM) during the hold: nothing stays drained or paused.
#[test]
fn a_dead_primary_is_held_until_it_takes_writes_again_or_the_bound_and_nothing_outlives_haconfd() {
    let setup = Setup {
        front: true,
        more: Some(Arc::new(|b| b.set("failover.crash_hold", "max", "2s"))),
        ..Setup::default()
    };
    let mut rig = Rig::start("crashhold", setup);
    rig.assert_writes_reach("pg1", Duration::from_secs(3), "before the crash");
    let crash = |rig: &Rig, when: &str| -> Duration {
        rig.member("pg1").api.set_role(Role::Down);
        let t0 = Instant::now();
        rig.front.as_ref().unwrap().crash();
        rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
        let noticed = t0.elapsed();
        rig.assert_pgbouncer_paused(when);
        noticed
    };
    let back = |rig: &Rig| {
        rig.front.as_ref().unwrap().restart();
        rig.member("pg1").api.set_role(Role::Primary);
    };

    // Slow is not dead.
    rig.front.as_ref().unwrap().freeze(true);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        rig.server("primary", "pg1"),
        Some((UP, READY)),
        "a frozen PostgreSQL was held:\n{}",
        rig.diag()
    );
    assert!(rig.status()["fast_path"]["crash_hold"].is_null());
    rig.front.as_ref().unwrap().freeze(false);

    // 1. Dead, then back with its lock kept.
    let noticed = crash(&rig, "during the hold");
    let st = rig.status();
    let hold = &st["fast_path"]["crash_hold"];
    assert_eq!(hold["server"], "pg1", "{st}");
    assert!(hold["why"].as_str().unwrap().contains("refused"), "{st}");
    assert_eq!(hold["bound_s"], 2.0, "{st}");
    assert_eq!(st["fast_path"]["fences"][0]["why"], "primary down", "{st}");
    back(&rig);
    rig.wait_log(
        "crash hold released: the primary takes writes again",
        Duration::from_secs(2),
    );
    rig.assert_writes_reach("pg1", Duration::from_secs(2), "back with its lock");
    assert!(
        rig.metrics()
            .contains("haconfd_crash_holds_total{ended=\"recovered\"} 1"),
        "{}",
        rig.metrics()
    );
    assert!(rig.status()["fast_path"]["crash_hold"].is_null());
    println!("RESULT crash hold: the dead primary was drained {noticed:?} after its port closed");

    // 2. Dead, haconfd killed during the hold, started again while PostgreSQL is still down.
    crash(&rig, "before the kill");
    rig.stop_with(Signal::SIGKILL);
    let log_before = rig.log_text().len();
    rig.run();
    rig.wait_log("crash hold released at its bound", Duration::from_secs(6));
    let run2 = rig.log_text()[log_before..].to_owned();
    assert!(
        run2.contains("PgBouncer was left paused") && run2.contains("the primary is down"),
        "the new run did not resume what the killed one left, or did not hold again:\n{run2}"
    );
    rig.wait_server("primary", "pg1", (UP, READY), Duration::from_secs(2));
    let r = reached(rig.pgb_port, Duration::from_secs(2));
    assert_ne!(
        r,
        Err("no answer".to_owned()),
        "PgBouncer still paused after the bound:\n{}",
        rig.diag()
    );
    let metrics = rig.metrics();
    assert!(
        metrics.contains("haconfd_crash_holds_total{ended=\"bound\"} 1")
            && metrics.contains("haconfd_failover_fences_expired_total 0"),
        "a hold at its bound counts as that, and not as a fence past its bound too:\n{metrics}"
    );
    back(&rig);
    rig.assert_writes_reach("pg1", Duration::from_secs(3), "back after the bound");
    // Held once to its bound, it is held again only once its port has answered since.
    rig.wait_log(
        "the primary's PostgreSQL answers again",
        Duration::from_secs(3),
    );

    // 3. Dead, haconfd stopped during the hold: nothing outlives it.
    crash(&rig, "before the stop");
    rig.stop_with(Signal::SIGTERM);
    assert_eq!(
        rig.server("primary", "pg1"),
        Some((UP, READY)),
        "the hold's drain outlived haconfd:\n{}",
        rig.diag()
    );
    let r = reached(rig.pgb_port, Duration::from_secs(2));
    assert_ne!(
        r,
        Err("no answer".to_owned()),
        "PgBouncer still paused after haconfd stopped:\n{}",
        rig.diag()
    );
    assert!(
        rig.log_text()
            .contains("shutting down: crash hold released"),
        "{}",
        rig.diag()
    );
}

/// Session pool mode: a switchover does not `PAUSE` a session pool (it would wait for every
/// client to disconnect), but the crash hold does: the sessions were on the dead primary and
/// PgBouncer has closed them, so `PAUSE` answers at once, and a new session waits for the
/// primary instead of failing to connect.
#[test]
fn a_crash_hold_pauses_a_session_pool_and_new_sessions_wait() {
    let setup = Setup {
        front: true,
        pool_mode: Some("session"),
        ..Setup::default()
    };
    let rig = Rig::start("crashsession", setup);
    rig.assert_writes_reach("pg1", Duration::from_secs(3), "session pool, before");
    rig.member("pg1").api.set_role(Role::Down);
    rig.front.as_ref().unwrap().crash();
    rig.wait_server("primary", "pg1", (UP, DRAIN), Duration::from_secs(2));
    rig.wait_log("PgBouncer paused: PAUSE answered", Duration::from_secs(2));
    let st = rig.status();
    assert_eq!(
        st["fast_path"]["pauses"][0]["stage"], "paused",
        "the session pool is not paused during the hold: {st}"
    );
    // A new session waits through the hold and reaches pg1 once it is back.
    let waiting = std::thread::spawn({
        let port = rig.pgb_port;
        move || reached(port, Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(500));
    rig.front.as_ref().unwrap().restart();
    rig.member("pg1").api.set_role(Role::Primary);
    assert_eq!(
        waiting.join().unwrap().as_deref(),
        Ok("127.0.0.11"),
        "a session opened during the hold did not reach the primary once it was back:\n{}",
        rig.diag()
    );
}
