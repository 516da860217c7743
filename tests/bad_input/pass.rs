//! How a pass treats its targets: one consumer's bad file must not hold another consumer's
//! hostage, heartbeats that change nothing a template reads cost no render, and the messages of
//! `render`, `check` and a Citus layout say what really happened.

use super::*;

/// The shipped haproxy template without `init-addr`, as templates written before it are: an
/// unresolvable member makes `haproxy -c` refuse the whole file.
fn template_without_init_addr(ws: &Ws) -> PathBuf {
    let text = read(&shipped("haproxy.cfg.tera"));
    assert!(text.contains(" init-addr last,libc,none"), "{text}");
    let p = ws.path("haproxy-no-init-addr.cfg.tera");
    std::fs::write(&p, text.replace(" init-addr last,libc,none", "")).unwrap();
    p
}

/// A replica whose host does not resolve.
fn unresolvable_member() -> String {
    serde_json::json!({
        "conn_url": "postgres://pg9.invalid:5432/postgres",
        "api_url": "http://pg9.invalid:8008/patroni",
        "state": "streaming",
        "role": "replica",
        "version": "3.0.2",
        "timeline": 1
    })
    .to_string()
}

/// Class: one bad member blocked every target. HAProxy refuses the file with pg9.invalid in it,
/// and in the same pass the leader moves to pg2: pgbouncer.ini (another consumer) must follow
/// and PgBouncer be told, while haproxy.cfg keeps its last good bytes and HAProxy is not
/// signalled. The failure names the target and carries HAProxy's reason (no `-q`).
#[test]
fn a_target_refused_by_its_check_does_not_hold_another_consumers_target_hostage() {
    let mut ws = Ws::new("hostage");
    let tpl = template_without_init_addr(&ws);
    ws.reconfigure(|c| c.hap_src = tpl);
    ws.once(&["--no-reload"]).expect(0, &[]);
    let hap_before = file_state(&ws.hap);

    ws.put("members/pg9", &unresolvable_member());
    ws.put("members/pg1", &member(5441, "replica").to_string());
    ws.put("members/pg2", &member(5442, "master").to_string());
    ws.put("leader", "pg2");
    let run = ws.once(&[]);
    run.expect(
        6,
        &[
            "check of \"haproxy\" refused the new file",
            &format!("{} is unchanged", ws.hap.display()),
            "could not resolve address 'pg9.invalid'",
        ],
    );
    assert_file_unchanged(&ws.hap, &hap_before);
    let pgb = read(&ws.pgb);
    assert!(
        pgb.contains("host=127.0.0.1 port=5442"),
        "pgbouncer.ini must follow the new leader pg2 in the same pass:\n{pgb}"
    );
    assert_killed_by(&ws.pgb_sleep, nix::sys::signal::Signal::SIGHUP);
    assert_not_signalled(&ws.hap_sleep);
    ws.assert_no_staged_leftovers();
}

/// Class: one bad member blocked every target, the render side. With no leader, pgbouncer.ini
/// cannot render; a member that joined meanwhile must still reach haproxy.cfg (whose checks
/// decide who serves) and HAProxy be reloaded, while pgbouncer.ini and PgBouncer are left alone.
#[test]
fn a_target_that_cannot_render_does_not_hold_another_consumers_target_hostage() {
    let ws = Ws::new("renderhostage");
    let pgb_before = file_state(&ws.pgb);
    ws.delete("leader");
    ws.add_valid_member();
    let run = ws.once(&[]);
    run.expect(5, &["target \"pgbouncer\" needs a leader"]);
    assert!(
        read(&ws.hap).contains("server pg4 127.0.0.1:5444 "),
        "haproxy.cfg must take the new member although pgbouncer.ini cannot render:\n{}",
        read(&ws.hap)
    );
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_file_unchanged(&ws.pgb, &pgb_before);
    assert_not_signalled(&ws.pgb_sleep);
}

/// Class: one bad member blocked every target, the template side. The shipped template starts
/// an unresolvable member in maintenance (`init-addr last,libc,none`), so `haproxy -c` accepts
/// the file and the other members keep being routed.
#[test]
fn shipped_template_accepts_an_unresolvable_member_host_through_haproxy_check() {
    let ws = Ws::new("unresolvable");
    ws.put("members/pg9", &unresolvable_member());
    let run = ws.once(&[]);
    run.expect(0, &[]);
    assert!(
        read(&ws.hap).contains("server pg9 pg9.invalid:5432 "),
        "{}",
        read(&ws.hap)
    );
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_not_signalled(&ws.pgb_sleep);
}

/// Class: heartbeats cost a render. Patroni rewrites every member key every `loop_wait` with a
/// new WAL position; no shipped template reads it, so such an event must not render anything,
/// while a real change (a new leader) renders every target, and a template that does read the
/// WAL position is rendered again for it.
#[test]
fn heartbeat_that_changes_nothing_a_template_reads_costs_no_render() {
    let ws = Ws::new("heartbeat");
    let lag_tpl = ws.path("lag.tera");
    std::fs::write(
        &lag_tpl,
        "{% for m in members %}{{ m.name }} {{ m.xlog_location }}\n{% endfor %}",
    )
    .unwrap();
    let lag_dest = ws.path("lag.txt");
    let extra = format!(
        "\n[[template]]\nname = \"lag\"\nsrc = {}\ndest = {}\n",
        q(&lag_tpl),
        q(&lag_dest)
    );
    // A third target, appended to the workspace's config text.
    std::fs::write(&ws.cfg_path, ws.cfg.text() + &extra).unwrap();

    let (rt, mut engine) = engine_after_first_pass(&ws);
    let all = ["haproxy", "pgbouncer", "lag"].map(String::from).to_vec();
    assert_eq!(
        engine.last_stats().rendered,
        all,
        "the first pass renders everything"
    );

    // A heartbeat: the same members, a new WAL position.
    let mut beat = member(5442, "replica");
    beat["xlog_location"] = serde_json::json!(50331816u64 + 4096);
    ws.put("members/pg2", &beat.to_string());
    let snap = fetch(&rt, &engine);
    let outcome = rt.block_on(engine.pass(&snap, false)).unwrap();
    assert_eq!(
        engine.last_stats().rendered,
        vec!["lag".to_string()],
        "a heartbeat rendered a template that does not read the WAL position"
    );
    assert_eq!(outcome.written, vec!["lag".to_string()]);
    assert!(
        read(&lag_dest).contains("pg2 50335912"),
        "{}",
        read(&lag_dest)
    );

    // The same view again (a resync, or a key rewritten with the same value): nothing at all.
    let snap = fetch(&rt, &engine);
    let outcome = rt.block_on(engine.pass(&snap, false)).unwrap();
    assert!(
        engine.last_stats().rendered.is_empty(),
        "{:?}",
        engine.last_stats().rendered
    );
    assert!(outcome.is_noop());

    // A real change renders every target.
    ws.put("members/pg1", &member(5441, "replica").to_string());
    ws.put("members/pg2", &member(5442, "master").to_string());
    ws.put("leader", "pg2");
    let snap = fetch(&rt, &engine);
    rt.block_on(engine.pass(&snap, false)).unwrap();
    assert_eq!(engine.last_stats().rendered, all);
    assert!(read(&ws.pgb).contains("host=127.0.0.1 port=5442"));

    // A file edited behind haconfd's back is still put right by the next pass, render or not.
    std::fs::write(&ws.hap, "edited by hand\n").unwrap();
    let snap = fetch(&rt, &engine);
    let outcome = rt.block_on(engine.pass(&snap, false)).unwrap();
    assert!(engine.last_stats().rendered.is_empty());
    assert_eq!(outcome.written, vec!["haproxy".to_string()]);
    assert!(read(&ws.hap).contains("server pg2 127.0.0.1:5442 "));
}

/// Class: messages. `render` writes nothing, so it must not claim to keep a file.
#[test]
fn render_on_a_leaderless_cluster_says_nothing_is_written() {
    let ws = Ws::new("renderleaderless");
    ws.delete("leader");
    let run = ws.run(&["render", "--template", "pgbouncer"]);
    run.expect(
        5,
        &[
            "target \"pgbouncer\" needs a leader",
            &format!("nothing is written to {}", ws.pgb.display()),
        ],
    );
    assert!(!run.reason().contains("kept as it is"), "{}", run.reason());
}

/// Class: messages. `check` stages into a scratch directory; its errors must name the target's
/// real destination, never the scratch copy.
#[test]
fn check_mode_errors_name_the_destination_not_the_scratch_copy() {
    let mut ws = Ws::new("checkdest");
    let tpl = template_without_init_addr(&ws);
    ws.reconfigure(|c| c.hap_src = tpl);
    ws.put("members/pg9", &unresolvable_member());
    let before = ws.files();
    let run = ws.run(&["check"]);
    run.expect(
        6,
        &[
            "check of \"haproxy\" refused the new file",
            &format!("{} is unchanged", ws.hap.display()),
            "could not resolve address 'pg9.invalid'",
        ],
    );
    // The command line that ran may show the scratch copy it checked; what was refused, and
    // what stays unchanged, is the real destination.
    let reason = run.reason();
    let scratch = format!("{}/.tmp", std::env::temp_dir().display());
    let (head, _) = reason.split_once(" is unchanged").unwrap_or((&reason, ""));
    assert!(
        !head.contains(&scratch),
        "the error names the scratch copy as the destination: {reason}"
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

/// Class: layouts. Patroni's Citus mode keeps each group one level down; a scope with only
/// groups is followed as a Citus cluster (its coordinator in the flat context), not refused as
/// "0 valid member(s)" with the last good files frozen.
#[test]
fn a_citus_layout_is_followed_through_its_coordinator_group() {
    let ws = Ws::new("citus");
    for name in ["pg1", "pg2", "pg3"] {
        ws.delete(&format!("members/{name}"));
    }
    ws.delete("leader");
    for (group, port) in [("0", 5441), ("1", 5451)] {
        ws.put(&format!("{group}/leader"), "pg1");
        ws.put(
            &format!("{group}/members/pg1"),
            &member(port, "master").to_string(),
        );
    }
    let run = ws.once(&[]);
    run.expect(0, &[]);
    assert!(
        !run.stderr.contains("0 valid member(s)"),
        "a Citus layout was refused as empty:\n{}",
        run.stderr
    );
    let hap = read(&ws.hap);
    assert!(
        hap.contains(":5441"),
        "the coordinator is not routed:\n{hap}"
    );
    assert!(
        !hap.contains(":5451"),
        "a worker group leaked into the coordinator's flat context:\n{hap}"
    );
}

/// Class: one consumer's files are all or nothing, also when the swap itself fails half-way.
/// Both targets reload the same process; haproxy.cfg is swapped in first, then pgbouncer.ini's
/// rename fails (its destination became a non-empty directory while the checks ran). haproxy.cfg
/// must go back to its last good bytes, and the shared consumer must not be signalled: a restart
/// would otherwise load half a new set, and nothing would be left due for a reload.
#[test]
fn a_swap_failing_half_way_puts_back_the_consumers_files_already_swapped() {
    let mut ws = Ws::new("halfswap");
    let hap_before = read(&ws.hap);
    let pgb_dest = ws.pgb.clone();
    let shared_reload = signal_reload(&ws.hap_pidfile, "SIGUSR2", "sleep");
    ws.reconfigure(|c| {
        c.pgb_reload = shared_reload.clone();
        c.hap_check = vec![
            "sh".into(),
            "-c".into(),
            "rm -f \"$1\" && mkdir -p \"$1/in-the-way\" && exec haproxy -c -f \"$2\"".into(),
            "check".into(),
            pgb_dest.to_string_lossy().into_owned(),
            "{{staged}}".into(),
        ];
    });
    ws.put("members/pg1", &member(5441, "replica").to_string());
    ws.put("members/pg2", &member(5442, "master").to_string());
    ws.put("leader", "pg2");
    ws.add_valid_member();
    let run = ws.once(&[]);
    run.expect(7, &[&pgb_dest.display().to_string()]);
    assert_eq!(
        read(&ws.hap),
        hap_before,
        "haproxy.cfg must be put back when its consumer's other file could not be swapped in"
    );
    assert_not_signalled(&ws.hap_sleep);
    assert_not_signalled(&ws.pgb_sleep);
}
