//! Reloading HAProxy through its master CLI socket (the form that works without a shared PID
//! namespace), and detecting a reload HAProxy refused: `once` exits 8, the failure is logged, the
//! previous worker keeps serving, and the last good file is put back on disk.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::{ConfigBuilder, Reload, Template};
use common::procs::{
    free_port, haconfd_bin, tcp_banner, temp_dir, unique_name, wait_until, Etcd, FakeMember,
    Haproxy, Role,
};

struct Stack {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    primary_port: u16,
    haproxy: Option<Haproxy>,
}

/// `reload` gets the temp dir's path (haconfd is pointed at the harness' HAProxy later).
fn stack(etcd: &Etcd, scope: &str, reload: impl FnOnce(&Path) -> Reload) -> Stack {
    let dir = temp_dir("msock");
    let d = dir.path();
    let primary_port = free_port();
    let config = ConfigBuilder::new()
        .endpoint(etcd.endpoint())
        .scope(scope)
        .var("bind_address", "127.0.0.1")
        .var("primary_port", primary_port)
        .var("replica_port", free_port())
        .var("stats_port", free_port())
        .var("stats_socket", d.join("admin.sock"))
        .var("maxconn", 1000)
        .template(
            Template::new(
                "haproxy",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy.cfg.tera"),
                d.join("haproxy.cfg"),
            )
            .reload(reload(d)),
        )
        .write_in(d);
    Stack {
        dir,
        config,
        primary_port,
        haproxy: None,
    }
}

fn once(config: &Path) -> std::process::Output {
    std::process::Command::new(haconfd_bin())
        .arg("-c")
        .arg(config)
        .arg("once")
        .output()
        .unwrap()
}

fn set_maxconn(config: &Path, value: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let start = text.find("maxconn = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(
        config,
        format!("{}maxconn = {value}{}", &text[..start], &text[end..]),
    )
    .unwrap();
}

fn failed_reload_is_reported_and_the_good_file_restored(reload: impl FnOnce(&Path) -> Reload) {
    let etcd = Etcd::shared();
    let scope = unique_name("msock");
    let pg1 = FakeMember::start("pg1", Role::Primary);
    etcd.put(
        &format!("/service/{scope}/members/pg1"),
        &pg1.member_json("primary"),
    );
    etcd.put(&format!("/service/{scope}/leader"), "pg1");
    let mut s = stack(etcd, &scope, reload);

    // First render, then HAProxy starts from it; the master socket path is the harness's.
    // No HAProxy yet and no file before: the consumer reads the first file when it starts,
    // which is no failed reload.
    let out = once(&s.config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no HAProxy yet: the first file is written, nothing to reload: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("its consumer is not running yet"),
        "{out:?}"
    );
    let cfg = s.dir.path().join("haproxy.cfg");
    let h = Haproxy::start(&cfg);
    // Point haconfd at this HAProxy's master socket and pidfile.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let d = s.dir.path().display().to_string();
    let text = text
        .replace(
            &format!("{d}/master.sock"),
            &h.master_socket().display().to_string(),
        )
        .replace(
            &format!("{d}/haproxy.pid"),
            &h.pidfile().display().to_string(),
        );
    std::fs::write(&s.config, text).unwrap();
    assert!(wait_until(Duration::from_secs(10), || tcp_banner(
        s.primary_port,
        Duration::from_secs(1)
    )
    .is_ok_and(|b| b.starts_with("pg1"))));
    s.haproxy = Some(h);
    let h = s.haproxy.as_ref().unwrap();

    // A good change reloads through the master socket: counter +1, no failure.
    set_maxconn(&s.config, "1001");
    let before = h.reload_count();
    let out = once(&s.config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.reload_count(), before + 1);
    assert_eq!(h.failed_reloads(), 0);
    let good = std::fs::read(&cfg).unwrap();

    // A change HAProxy refuses at reload: an address this host does not have cannot be bound
    // (no check is configured, and `haproxy -c` would not bind anyway).
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace(
            "bind_address = \"127.0.0.1\"",
            "bind_address = \"192.0.2.1\"",
        ),
    )
    .unwrap();
    let out = once(&s.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("HAProxy reload failed"), "{stderr}");
    assert!(stderr.contains("master.sock"), "names the socket: {stderr}");
    assert!(stderr.contains("restored the last good file"), "{stderr}");
    assert_eq!(
        std::fs::read(&cfg).unwrap(),
        good,
        "the known-good file is back on disk"
    );
    assert_eq!(h.failed_reloads(), 1);
    // The previous worker keeps serving.
    assert!(tcp_banner(s.primary_port, Duration::from_secs(2)).is_ok_and(|b| b.starts_with("pg1")));
}

#[test]
fn master_socket_reload_detects_a_refused_config_and_restores_the_last_good_file() {
    failed_reload_is_reported_and_the_good_file_restored(|d| {
        Reload::master_socket(d.join("master.sock")).timeout("10s")
    });
}

#[test]
fn signal_reload_verified_through_the_master_socket_detects_a_refused_config() {
    failed_reload_is_reported_and_the_good_file_restored(|d| {
        Reload::signal(d.join("haproxy.pid"), "SIGUSR2", "haproxy")
            .verify_on(d.join("master.sock"))
            .timeout("10s")
    });
}
