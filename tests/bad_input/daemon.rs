//! The daemon under operators' hands: SIGHUP with changed etcd, HTTP and log settings, systemd's
//! notify socket during an outage, template directories replaced by rename, a second SIGTERM
//! during a check, and log levels that would silently log something else.

use super::*;

use std::os::unix::net::UnixDatagram;

use nix::sys::signal::Signal;

/// JSON logs at debug; returns once the first pass (a no-op after the workspace's `once`) ran.
fn start_debug(ws: &Ws) -> Proc {
    let p = ws.start_debug_run();
    assert!(
        wait_until(Duration::from_secs(10), || p
            .log()
            .contains("pass: nothing changed")),
        "the daemon's first pass did not finish:\n{}",
        p.log()
    );
    p
}

/// The JSON log lines of `p` whose message contains `needle`.
fn log_lines(p: &Proc, needle: &str) -> Vec<serde_json::Value> {
    p.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

/// Waits for the `n`th "configuration and templates reloaded" line and returns its `changed`.
fn reloaded(p: &Proc, n: usize) -> String {
    let ok = wait_until(Duration::from_secs(10), || {
        log_lines(p, "configuration and templates reloaded").len() >= n
    });
    assert!(ok, "reload #{n} not logged:\n{}", p.log());
    log_lines(p, "configuration and templates reloaded")[n - 1]["changed"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits for the `n`th refusal of a new configuration and returns its message.
fn refused(p: &Proc, n: usize) -> String {
    let ok = wait_until(Duration::from_secs(10), || {
        log_lines(p, "new configuration refused").len() >= n
    });
    assert!(ok, "refusal #{n} not logged:\n{}", p.log());
    log_lines(p, "new configuration refused")[n - 1]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Puts a leader and members `names` (the first the leader) from `port` on under `prefix`.
fn seed(etcd: &Etcd, prefix: &str, names: &[&str], port: u16) {
    for (i, n) in names.iter().enumerate() {
        let role = if i == 0 { "master" } else { "replica" };
        etcd.put(
            &format!("{prefix}members/{n}"),
            &member(port + i as u16, role).to_string(),
        );
    }
    etcd.put(&format!("{prefix}leader"), names[0]);
}

/// A haproxy check that keeps a copy of every staged file it is shown (in `renders.log`), then
/// runs `haproxy -c` on it: what a pass would have put live.
fn recording_check(ws: &Ws) -> Vec<String> {
    let script = format!(
        "cat \"$1\" >> {rec}; printf '\\n=====\\n' >> {rec}; exec haproxy -c -f \"$1\"",
        rec = ws.path("renders.log").display()
    );
    ["sh", "-c", &script, "sh", "{{staged}}"]
        .map(String::from)
        .to_vec()
}

/// SIGHUP moving to another scope: the new scope's members are rendered after its first list,
/// never the new names applied to the old scope's snapshot (0 members: refused forever, or with
/// the guard forced, `listen` sections with no servers put live).
fn assert_scope_change_follows_the_new_cluster(tag: &str, guard: &str) {
    let mut ws = Ws::new(tag);
    let check = recording_check(&ws);
    ws.reconfigure(|c| {
        c.hap_check = check;
        c.guard = guard.into();
    });
    let daemon = start_debug(&ws);
    let other = unique_name(tag);
    seed(
        Etcd::shared(),
        &format!("/service/{other}/"),
        &["qb1", "qb2", "qb3"],
        5451,
    );
    ws.reconfigure(|c| c.scope = other.clone());
    daemon.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || read(&ws.hap)
            .contains("server qb1 127.0.0.1:5451 ")
            && read(&ws.pgb).contains("host=127.0.0.1 port=5451")),
        "the files do not follow the new scope:\n{}\nlog:\n{}",
        read(&ws.hap),
        daemon.log()
    );
    let cfg = read(&ws.hap);
    assert!(!cfg.contains("server pg1 "), "{cfg}");
    assert!(reloaded(&daemon, 1).contains("etcd.scope"));
    let renders = std::fs::read_to_string(ws.path("renders.log")).unwrap_or_default();
    for r in renders.split("\n=====\n").filter(|r| !r.trim().is_empty()) {
        assert!(
            r.contains("server qb1 "),
            "a render other than the new scope's cluster reached the check:\n{r}\nlog:\n{}",
            daemon.log()
        );
    }
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[test]
fn sighup_scope_change_follows_the_new_scopes_cluster() {
    assert_scope_change_follows_the_new_cluster("hupscope", "");
}

#[test]
fn sighup_scope_change_with_forced_guard_never_renders_zero_servers() {
    assert_scope_change_follows_the_new_cluster("hupscopeforce", "force = true");
}

/// The same cluster reached through another etcd (as after moving the store): the second etcd
/// holds it after a switchover to pg2 and with a new member qe4, which the first one never saw.
#[test]
fn sighup_endpoints_change_reconnects_to_the_new_etcd() {
    let mut ws = Ws::new("hupendpoints");
    let daemon = start_debug(&ws);
    let second = Etcd::start();
    let prefix = format!("/service/{}/", ws.scope);
    for (name, port, role) in [
        ("pg1", 5441, "replica"),
        ("pg2", 5442, "master"),
        ("pg3", 5443, "replica"),
        ("qe4", 5464, "replica"),
    ] {
        second.put(
            &format!("{prefix}members/{name}"),
            &member(port, role).to_string(),
        );
    }
    second.put(&format!("{prefix}leader"), "pg2");
    ws.reconfigure(|c| c.endpoint = second.endpoint());
    daemon.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || read(&ws.hap)
            .contains("server qe4 127.0.0.1:5464 ")
            && read(&ws.pgb).contains("host=127.0.0.1 port=5442")),
        "the files do not show the second etcd's view:\n{}\nlog:\n{}",
        read(&ws.hap),
        daemon.log()
    );
    assert!(reloaded(&daemon, 1).contains("etcd.endpoints"));
    // It watches the second etcd from now on.
    second.put(
        &format!("{prefix}members/qe5"),
        &member(5465, "replica").to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || read(&ws.hap)
            .contains("server qe5 127.0.0.1:5465 ")),
        "a change on the second etcd was not followed:\n{}",
        daemon.log()
    );
}

/// `[http]` and `[log]` sections smuggled into the config after `[daemon]`'s extra lines.
fn http_and_log(timing: &str, listen: &str, format: &str, level: &str) -> String {
    format!(
        "{timing}\n[http]\nlisten = {}\n[log]\nformat = {}\nlevel = {}\n",
        q(listen),
        q(format),
        q(level)
    )
}

#[test]
fn sighup_rebinds_http_and_applies_log_and_timings_or_refuses_naming_the_setting() {
    let mut ws = Ws::new("huphttp");
    let (p1, p2) = (free_port(), free_port());
    let first = format!("127.0.0.1:{p1}");
    ws.reconfigure(|c| c.daemon_extra = http_and_log("", &first, "json", "info"));
    let daemon = ws.start_run(&[], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || http_get(p1, "/readyz")
            .is_some_and(|(c, _)| c == 200)),
        "not ready on {first}:\n{}",
        daemon.log()
    );

    // An address that cannot be bound: the whole new config is refused naming http.listen.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    ws.reconfigure(|c| c.daemon_extra = http_and_log("", &taken_addr, "json", "info"));
    daemon.signal(Signal::SIGHUP).unwrap();
    let msg = refused(&daemon, 1);
    assert!(
        msg.contains(&format!("http.listen {taken_addr}")),
        "the refusal does not name http.listen {taken_addr}: {msg}"
    );
    assert_eq!(http_get(p1, "/healthz").map(|r| r.0), Some(200));

    // A level that is no level: refused naming log.level and the value.
    ws.reconfigure(|c| c.daemon_extra = http_and_log("", &first, "json", "loud"));
    daemon.signal(Signal::SIGHUP).unwrap();
    let msg = refused(&daemon, 2);
    assert!(
        msg.contains("log.level") && msg.contains("\"loud\""),
        "the refusal does not name log.level \"loud\": {msg}"
    );

    // All of it at once, and every part takes effect.
    let second = format!("127.0.0.1:{p2}");
    let timing = "resync_interval = \"60s\"\nmax_backoff = \"2s\"";
    ws.reconfigure(|c| c.daemon_extra = http_and_log(timing, &second, "json", "haconfd=debug"));
    daemon.signal(Signal::SIGHUP).unwrap();
    let changed = reloaded(&daemon, 1);
    for name in [
        "daemon.resync_interval",
        "daemon.max_backoff",
        "log.level",
        "http.listen",
    ] {
        assert!(changed.contains(name), "{name} not among {changed}");
    }
    assert_eq!(http_get(p2, "/healthz").map(|r| r.0), Some(200));
    assert!(
        wait_until(Duration::from_secs(5), || http_get(p1, "/healthz")
            .is_none()),
        "the old address {first} still answers"
    );
    // The source restarted with the new timings and listed again; the pass after it is logged
    // at the new level.
    assert!(
        wait_until(Duration::from_secs(10), || !log_lines(
            &daemon,
            "pass: nothing changed"
        )
        .is_empty()),
        "no debug line after log.level = haconfd=debug:\n{}",
        daemon.log()
    );
    assert!(!log_lines(&daemon, "etcd source restarted").is_empty());

    // The format too: text lines from now on.
    ws.reconfigure(|c| c.daemon_extra = http_and_log(timing, &second, "text", "haconfd=debug"));
    daemon.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_err()
                && l.contains("configuration and templates reloaded")
                && l.contains("log.format")
        })),
        "log.format = text not applied:\n{}",
        daemon.log()
    );
    drop(taken);
}

/// Reads datagrams from `sock` for up to `timeout` until one holds `READY=1`; returns all.
fn notifications_until_ready(sock: &UnixDatagram, timeout: Duration) -> (bool, Vec<String>) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let ready = msg.lines().any(|l| l == "READY=1");
            got.push(msg);
            if ready {
                return (true, got);
            }
        }
    }
    (false, got)
}

/// systemd (Type=notify) must hear READY=1 once the config is loaded, a snapshot listed and a
/// first pass attempted, even when that pass fails: else it kills haconfd at TimeoutStartSec
/// during the very outage it should ride out.
fn assert_ready_despite(ws: &Ws, status_needle: &str) {
    let sock_path = ws.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let daemon = ws.start_run(&["--log-format", "json"], &[("NOTIFY_SOCKET", &sock_path)]);
    let (ready, got) = notifications_until_ready(&sock, Duration::from_secs(15));
    assert!(
        ready,
        "no READY=1 on the notify socket; got {got:?}\nlog:\n{}",
        daemon.log()
    );
    assert!(
        got.iter()
            .any(|m| m.contains("STATUS=") && m.contains(status_needle)),
        "no STATUS= line saying {status_needle:?}: {got:?}"
    );
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[test]
fn systemd_hears_ready_while_the_cluster_is_leaderless() {
    let ws = Ws::new("readyleaderless");
    ws.delete("leader");
    assert_ready_despite(&ws, "no leader");
}

#[test]
fn systemd_hears_ready_while_the_guard_refuses_at_start() {
    let mut ws = Ws::new("readyguard");
    ws.reconfigure(|c| c.guard = "min_members = 5".into());
    assert_ready_despite(&ws, "last pass failed (guard)");
}

#[test]
fn template_directory_replaced_by_rename_is_picked_up_and_later_edits_too() {
    let mut ws = Ws::new("tpldir");
    let shipped_tpl = read(&shipped("pgbouncer.ini.tera"));
    let base = ws.path("");
    let version = |dir: &str, mark: &str| {
        let d = base.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("pgbouncer.ini.tera"),
            format!("{shipped_tpl}\n; {mark}\n"),
        )
        .unwrap();
    };
    // `tpl` is a symlink to a versioned directory, as a ConfigMap volume's `..data` is.
    version("v1", "mark-1");
    std::os::unix::fs::symlink("v1", ws.path("tpl")).unwrap();
    let src = ws.path("tpl/pgbouncer.ini.tera");
    ws.reconfigure(|c| {
        c.pgb_src = src;
        c.pgb_reload = "{ command = [\"true\"] }".into();
    });
    let daemon = ws.start_debug_run();
    let shows = |mark: &str| {
        let ok = wait_until(Duration::from_secs(5), || read(&ws.pgb).contains(mark));
        assert!(
            ok,
            "pgbouncer.ini does not show {mark}:\n{}\nlog:\n{}",
            read(&ws.pgb),
            daemon.log()
        );
    };
    shows("mark-1");

    // The symlink swapped by rename.
    version("v2", "mark-2");
    std::os::unix::fs::symlink("v2", ws.path("tpl.tmp")).unwrap();
    std::fs::rename(ws.path("tpl.tmp"), ws.path("tpl")).unwrap();
    shows("mark-2");
    // Then an edit in the directory now in place.
    version("v2", "mark-3");
    shows("mark-3");

    // The whole directory renamed over (the symlink moved aside first).
    version("v4", "mark-4");
    std::fs::rename(ws.path("tpl"), ws.path("tpl.old")).unwrap();
    std::fs::rename(ws.path("v4"), ws.path("tpl")).unwrap();
    shows("mark-4");
    version("tpl", "mark-5");
    shows("mark-5");
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[test]
fn second_sigterm_kills_the_running_check_and_its_children() {
    let mut ws = Ws::new("term2");
    let (sh_pid, sleep_pid) = (ws.path("check-sh.pid"), ws.path("check-sleep.pid"));
    let script = format!(
        "echo $$ > {}; sleep 30 & echo $! > {}; wait",
        sh_pid.display(),
        sleep_pid.display()
    );
    ws.reconfigure(|c| {
        c.hap_check = ["sh", "-c", &script, "{{staged}}"]
            .map(String::from)
            .to_vec();
        c.hap_extra = "check_timeout = \"60s\"".into();
    });
    let daemon = start_debug(&ws);
    ws.add_valid_member();
    assert!(
        wait_until(Duration::from_secs(10), || read_pidfile(&sleep_pid)
            .is_some()),
        "the check did not start:\n{}",
        daemon.log()
    );
    let pids = [
        read_pidfile(&sh_pid).unwrap(),
        read_pidfile(&sleep_pid).unwrap(),
    ];
    daemon.signal(Signal::SIGTERM).unwrap();
    assert!(
        daemon.wait_timeout(Duration::from_millis(500)).is_none(),
        "the first SIGTERM must let the pass in flight finish"
    );
    daemon.signal(Signal::SIGTERM).unwrap();
    assert!(
        daemon.wait_timeout(Duration::from_secs(3)).is_some(),
        "the second SIGTERM must exit at once"
    );
    let orphans: Vec<i32> = pids
        .into_iter()
        .filter(|p| {
            // Killed orphans are reaped by init: give it a moment.
            !wait_until(Duration::from_secs(2), || !pid_alive(*p))
        })
        .collect();
    for p in &orphans {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
    }
    assert!(
        orphans.is_empty(),
        "the check's processes {orphans:?} outlived haconfd:\n{}",
        daemon.log()
    );
}

#[test]
fn invalid_log_level_exits_2_naming_the_value_and_where_it_came_from() {
    let mut ws = Ws::new("loglevel");
    ws.run(&["--log-level", "loud", "check"])
        .expect(2, &["invalid log level \"loud\"", "--log-level"]);
    ws.run(&["--log-level", "haconfd=loud", "check"])
        .expect(2, &["\"haconfd=loud\"", "--log-level"]);
    ws.reconfigure(|c| c.daemon_extra = "[log]\nlevel = \"verbose\"".into());
    let cfg = ws.cfg_path.display().to_string();
    ws.run(&["check"])
        .expect(2, &["invalid log level \"verbose\"", "log.level", &cfg]);
    ws.run(&["--log-level", "info", "check"]).expect(0, &[]);
}
