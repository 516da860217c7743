//! The Debian package as an operator meets it: built with cargo-deb from this run's binary
//! (packaging/build-deb.sh --binary: the debug build, stripped), checked by lintian (no error),
//! then installed with apt into a clean Debian 12 container built here (the debootstrapped base
//! of tests/common/docker.rs, on the host's network so that it reaches the shared etcd on
//! loopback): `haconfd --version`, `haconfd check` on the shipped config with the shipped
//! templates against that etcd (as root and as the packaged user), the man page and the
//! completions in place; then removed (the conffile stays) and purged (nothing of it stays).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{images, serial, Container};
use common::procs::{find_bin, haconfd_bin, run_capture as run, temp_dir, unique_name, Etcd};

/// What to run when the packager or lintian is missing.
const DEB_HINT: &str = "the package test needs cargo-deb and lintian: `cargo install cargo-deb \
--locked` and `sudo apt-get install -y lintian` (or run `bash tests/run.sh`, which installs both)";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn need(bin: &str) {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let found = find_bin(bin).is_some() || home.is_some_and(|h| h.join("bin").join(bin).is_file());
    assert!(found, "`{bin}` not found: {DEB_HINT}");
}

/// Builds the package from `binary` into `out`; its path.
fn build_deb(binary: &Path, out: &Path) -> PathBuf {
    need("cargo-deb");
    let mut cmd = Command::new("sh");
    cmd.arg(root().join("packaging/build-deb.sh"))
        .arg("--binary")
        .arg(binary)
        .arg("--fast")
        .arg("-o")
        .arg(out);
    if let Some(home) = std::env::var_os("HOME") {
        // cargo-deb where `cargo install` puts it, also when ~/.cargo/bin is not on PATH.
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env(
            "PATH",
            format!(
                "{path}:{}",
                PathBuf::from(home).join(".cargo/bin").display()
            ),
        );
    }
    let (ok, text) = run(&mut cmd, Duration::from_secs(600));
    assert!(ok, "packaging/build-deb.sh failed:\n{text}");
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "one .deb in {}: {debs:?}\n{text}",
        out.display()
    );
    debs[0].clone()
}

/// The unit the package installs is examples/haconfd.service but for its header and the
/// binary's path.
fn assert_unit_matches_example() {
    let body = |p: &str| -> Vec<String> {
        std::fs::read_to_string(root().join(p))
            .unwrap()
            .lines()
            .skip_while(|l| !l.starts_with("[Unit]"))
            .map(|l| l.replace("/usr/local/bin/haconfd", "/usr/bin/haconfd"))
            .collect()
    };
    assert_eq!(
        body("packaging/deb/haconfd.service"),
        body("examples/haconfd.service"),
        "packaging/deb/haconfd.service drifted from examples/haconfd.service"
    );
}

/// `sh -c SCRIPT` in the container, within 10 minutes (apt's downloads included).
fn sh(c: &Container, script: &str) -> Result<String, String> {
    c.exec_try(&["sh", "-c", script], Duration::from_secs(600))
}

#[test]
fn the_deb_passes_lintian_installs_checks_the_shipped_config_and_purges_cleanly() {
    let t0 = Instant::now();
    need("lintian");
    assert_unit_matches_example();
    let out = temp_dir("deb");
    let deb = build_deb(&haconfd_bin(), out.path());
    let built = t0.elapsed();

    let t = Instant::now();
    let (ok, lint) = run(
        Command::new(find_bin("lintian").unwrap())
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(&deb),
        Duration::from_secs(300),
    );
    let linted = t.elapsed();
    println!("LINTIAN ({:.1} s):\n{lint}", linted.as_secs_f64());
    assert!(
        ok && !lint.lines().any(|l| l.starts_with("E:")),
        "lintian reports errors:\n{lint}"
    );

    // A clean Debian 12 on the host's network (the shared etcd listens on loopback).
    let _serial = serial();
    let img = images();
    let t = Instant::now();
    let c = Container::run("deb", &["--network", "host", &img.debian, "sleep", "1200"]);
    c.exec(&["mkdir", "-p", "/tmp/pkg"]);
    common::docker::docker(&[
        "cp",
        deb.to_str().unwrap(),
        &format!("{}:/tmp/pkg/haconfd.deb", c.name),
    ]);
    // The base image leaves documentation and manual pages out, as slim images do; a host
    // installs them.
    let install = sh(
        &c,
        "rm -f /etc/dpkg/dpkg.cfg.d/docker && apt-get update -qq && \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq /tmp/pkg/haconfd.deb 2>&1",
    );
    assert!(
        install.is_ok(),
        "apt-get install ./haconfd.deb: {install:?}"
    );
    let installed = t.elapsed();

    let version = c.exec(&["haconfd", "--version"]);
    assert!(
        version.starts_with(&format!("haconfd {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let files = c.exec(&["dpkg", "-L", "haconfd"]);
    for f in [
        "/usr/bin/haconfd",
        "/usr/share/haconfd/templates/haproxy.cfg.tera",
        "/usr/share/haconfd/templates/pgbouncer.ini.tera",
        "/usr/share/haconfd/templates/hold.lua",
        "/etc/haconfd/haconfd.toml",
        "/usr/lib/systemd/system/haconfd.service",
        "/usr/share/man/man1/haconfd.1.gz",
        "/usr/share/bash-completion/completions/haconfd",
        "/usr/share/zsh/vendor-completions/_haconfd",
        "/usr/share/fish/vendor_completions.d/haconfd.fish",
        "/usr/share/haconfd/prometheus/haconfd-rules.yml",
        "/usr/share/haconfd/grafana/haconfd.json",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} not in the package:\n{files}"
        );
        c.exec(&["test", "-e", f]);
    }
    assert_eq!(
        c.exec(&["dpkg-query", "-W", "-f", "${Conffiles}", "haconfd"])
            .split_whitespace()
            .next(),
        Some("/etc/haconfd/haconfd.toml"),
        "the config is a conffile"
    );
    let man = c.exec(&[
        "sh",
        "-c",
        "zcat /usr/share/man/man1/haconfd.1.gz | head -n 5",
    ]);
    assert!(man.contains(".TH haconfd"), "man page: {man}");
    let comp = sh(
        &c,
        "bash -c '. /usr/share/bash-completion/completions/haconfd && complete -p haconfd'",
    );
    assert!(
        comp.as_ref().is_ok_and(|o| o.contains("haconfd")),
        "bash completion: {comp:?}"
    );
    let user = c.exec(&["id", "haconfd"]);
    assert!(
        user.contains("(haproxy)"),
        "haconfd in group haproxy: {user}"
    );
    assert_eq!(
        c.exec(&["stat", "-c", "%U %a", "/var/lib/haconfd"]).trim(),
        "haconfd 750"
    );

    // `haconfd check` on the shipped config and templates, against a real etcd.
    let etcd = Etcd::shared();
    let scope = unique_name("deb");
    for (m, role) in [("pg1", "primary"), ("pg2", "replica")] {
        etcd.put(
            &format!("/service/{scope}/members/{m}"),
            &common::docker::fake_member(
                &format!("10.9.0.{}", if m == "pg1" { 1 } else { 2 }),
                role,
            ),
        );
    }
    etcd.put(&format!("/service/{scope}/leader"), "pg1");
    let env = format!(
        "HACONFD_ETCD_ENDPOINTS={} HACONFD_SCOPE={scope}",
        etcd.endpoint()
    );
    let check = sh(&c, &format!("{env} haconfd check 2>&1"));
    assert!(
        check.as_ref().is_ok_and(
            |o| o.contains("ok: config, templates and checks pass for haproxy, pgbouncer")
        ),
        "haconfd check on the shipped config: {check:?}"
    );
    let as_user = sh(
        &c,
        &format!("runuser -u haconfd -- env {env} haconfd check 2>&1"),
    );
    assert!(
        as_user.is_ok(),
        "haconfd check as the haconfd user: {as_user:?}"
    );
    // Nothing runs yet (the unit is not enabled at install): status says so.
    let status = sh(&c, "haconfd status 2>&1; echo exit=$?").unwrap();
    assert!(
        status.contains("exit=9") && status.contains("cannot read http://127.0.0.1:9187/status"),
        "{status}"
    );

    // Remove: the binary goes, the edited conffile stays. Purge: nothing stays.
    let t = Instant::now();
    sh(&c, "echo '# edited' >> /etc/haconfd/haconfd.toml").unwrap();
    let r = sh(
        &c,
        "DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq haconfd 2>&1",
    );
    assert!(r.is_ok(), "apt-get remove: {r:?}");
    assert!(c
        .exec_try(&["test", "-e", "/usr/bin/haconfd"], Duration::from_secs(10))
        .is_err());
    c.exec(&["test", "-f", "/etc/haconfd/haconfd.toml"]);
    let p = sh(
        &c,
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq haconfd 2>&1",
    );
    assert!(p.is_ok(), "apt-get purge: {p:?}");
    // Shared directories (/usr, /etc, /usr/share/man/man1, ...) stay, as they should.
    let left: Vec<&str> = files
        .lines()
        .filter(|f| f.contains("haconfd"))
        .filter(|f| {
            c.exec_try(&["test", "-e", f], Duration::from_secs(10))
                .is_ok()
        })
        .collect();
    assert!(left.is_empty(), "left behind after purge: {left:?}");
    for gone in ["/etc/haconfd", "/var/lib/haconfd"] {
        assert!(
            c.exec_try(&["test", "-e", gone], Duration::from_secs(10))
                .is_err(),
            "{gone} after purge"
        );
    }
    let state = sh(&c, "dpkg -l haconfd 2>&1 | tail -n 1; true").unwrap();
    assert!(
        !state.starts_with("rc") && !state.starts_with("ii"),
        "{state}"
    );
    println!(
        "TIMING deb: built {:.1} s, lintian {:.1} s, installed into Debian 12 {:.1} s, removed and purged {:.1} s; {:.1} s in all",
        built.as_secs_f64(),
        linted.as_secs_f64(),
        installed.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
