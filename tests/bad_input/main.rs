//! Named bad-input suite: one test per hostile or broken input (etcd keys, snapshot files,
//! templates, check commands, destinations, pidfiles, config, guard), each asserting the exact
//! error (naming the key, file:line:col, PID or command), that the last good files are untouched
//! (bytes, inode, mtime), and that no process was signalled wrongly.
//!
//! Every workspace first writes known-good `haproxy.cfg` and `pgbouncer.ini` with a successful
//! `haconfd once --no-reload`, then introduces the bad input and runs haconfd again. Reloads point
//! at `sleep 300` sentinels this file starts: SIGUSR2 and SIGHUP kill a `sleep`, so a sentinel
//! still running (with nothing pending) proves it got no signal, and one killed by exactly the
//! configured signal proves the rightful reload reached the right process. Scopes live on the
//! binary's shared etcd under `unique_name` prefixes, so the tests run in parallel.

#[path = "../common/mod.rs"]
mod common;

// One module per class of hostile input found after the first release; each test names its class.
mod config;
mod daemon;
mod edge;
mod events;
mod guard;
mod hooks;
mod pass;
mod scopes;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::config::{toml_str as q, ConfigBuilder, Raw, Reload, Template};
use common::procs::*;
use haconfd::pipeline::{Engine, PassError};

// ---------------------------------------------------------------------------------------------
// Helpers: TOML bits, member JSON, running haconfd, file states, sentinels
// ---------------------------------------------------------------------------------------------

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("templates")
        .join(name)
}

/// `reload = { pidfile, signal, process }` as an inline table.
fn signal_reload(pidfile: &Path, signal: &str, process: &str) -> String {
    Reload::signal(pidfile, signal, process).text()
}

/// Member JSON as Patroni 3 writes it, for a member nobody serves (config-only tests).
fn member(port: u16, role: &str) -> serde_json::Value {
    serde_json::json!({
        "conn_url": format!("postgres://127.0.0.1:{port}/postgres"),
        "api_url": format!("http://127.0.0.1:{}/patroni", port + 1000),
        "state": if role == "master" { "running" } else { "streaming" },
        "role": role,
        "version": "3.0.2",
        "xlog_location": 50331816u64,
        "timeline": 1
    })
}

/// A valid replica member with `field` replaced by `value`.
fn member_with(field: &str, value: serde_json::Value) -> String {
    let mut m = member(5460, "replica");
    m[field] = value;
    m.to_string()
}

/// One finished haconfd run.
struct Run {
    what: String,
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Run {
    /// Log lines (JSON, `--log-format json`).
    fn logs(&self) -> Vec<serde_json::Value> {
        self.stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// The one-line reason and its details: every stderr line that is not a JSON log line.
    fn reason(&self) -> String {
        self.stderr
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The `ignoring key` warning's reason for exactly `key`, if logged.
    fn warning_for(&self, key: &str) -> Option<String> {
        self.logs().into_iter().find_map(|v| {
            (v["level"] == "WARN" && v["message"] == "ignoring key" && v["key"] == key)
                .then(|| v["reason"].as_str().unwrap_or_default().to_owned())
        })
    }

    /// Whether a log line has this `message`.
    fn logged(&self, message: &str) -> bool {
        self.logs().iter().any(|v| v["message"] == message)
    }

    /// Asserts the exit code and that the reason names every needle.
    fn expect(&self, code: i32, needles: &[&str]) -> &Self {
        let reason = self.reason();
        assert_eq!(
            self.code, code,
            "{}: exit {} instead of {code}\nstderr:\n{}",
            self.what, self.code, self.stderr
        );
        for n in needles {
            assert!(
                reason.contains(n),
                "{}: the message does not name {n:?}\nmessage:\n{reason}\nstderr:\n{}",
                self.what,
                self.stderr
            );
        }
        self
    }
}

/// Runs the binary with `--log-format json` unless `args` choose a format (as `user` when given),
/// bounded to 30 s.
fn haconfd(cfg: &Path, args: &[&str], user: Option<(u32, u32)>) -> Run {
    haconfd_with_env(cfg, args, user, &[])
}

/// [`haconfd`] with `env` added to an environment cleared of `HACONFD_*`.
fn haconfd_with_env(
    cfg: &Path,
    args: &[&str],
    user: Option<(u32, u32)>,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new(haconfd_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HACONFD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.arg("-c").arg(cfg);
    if !args.contains(&"--log-format") {
        cmd.args(["--log-format", "json"]);
    }
    cmd.args(args);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let start = Instant::now();
    let out: Output = run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("haconfd {args:?}: {e}"));
    Run {
        what: format!("haconfd {}", args.join(" ")),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// What must not change when haconfd leaves a file alone.
#[derive(Debug, Clone, PartialEq)]
struct FileState {
    bytes: Vec<u8>,
    ino: u64,
    mtime: SystemTime,
    mode: u32,
    uid: u32,
}

fn file_state(path: &Path) -> FileState {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    FileState {
        bytes: std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
        ino: m.ino(),
        mtime: m.modified().unwrap(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
    }
}

fn assert_file_unchanged(path: &Path, before: &FileState) {
    let now = file_state(path);
    assert!(
        now.bytes == before.bytes,
        "{} changed:\n--- before\n{}\n--- after\n{}",
        path.display(),
        String::from_utf8_lossy(&before.bytes),
        String::from_utf8_lossy(&now.bytes)
    );
    assert_eq!(
        (now.ino, now.mtime, now.mode, now.uid),
        (before.ino, before.mtime, before.mode, before.uid),
        "{} was rewritten (inode, mtime, mode or owner changed) with the same bytes",
        path.display()
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A `sleep 300` whose death by SIGUSR2/SIGHUP reveals any signal sent to it.
fn sentinel(name: &str) -> Proc {
    Proc::spawn(name, command("sleep", &["300"]))
}

/// Signals pending for `pid` (thread and process-wide masks from /proc), 0 when unreadable.
fn pending_signals(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .fold(0, |a, b| a | b)
}

/// Asserts that `p` got no signal: still running a moment later, nothing pending.
fn assert_not_signalled(p: &Proc) {
    let st = p.wait_timeout(Duration::from_millis(100));
    assert!(
        st.is_none(),
        "{} (PID {}) was signalled wrongly: {st:?}",
        p.name(),
        p.pid()
    );
    assert_eq!(
        pending_signals(p.pid()),
        0,
        "{} (PID {}) has a pending signal",
        p.name(),
        p.pid()
    );
}

/// Asserts that `p` was killed by exactly `sig` (the rightful reload signal).
fn assert_killed_by(p: &Proc, sig: nix::sys::signal::Signal) {
    let st = p.wait_timeout(Duration::from_secs(5));
    assert_eq!(
        st.and_then(|s| s.signal()),
        Some(sig as i32),
        "{} (PID {}) should have received {sig} from the reload: {st:?}",
        p.name(),
        p.pid()
    );
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches users (setuid) and must run as root, e.g. `sudo cargo test --test bad_input`"
    );
}

// ---------------------------------------------------------------------------------------------
// The workspace builder
// ---------------------------------------------------------------------------------------------

/// The config a workspace writes; tests edit fields and call [`Ws::write_config`].
#[derive(Clone)]
struct Cfg {
    endpoint: String,
    /// `etcd.namespace`, before `scope` (none: haconfd's default).
    namespace: Option<String>,
    scope: String,
    /// `etcd.username`, after `scope`.
    username: Option<String>,
    daemon_extra: String,
    guard: String,
    hap_src: PathBuf,
    hap_dest: PathBuf,
    hap_check: Vec<String>,
    hap_extra: String,
    hap_reload: String,
    pgb_src: PathBuf,
    pgb_dest: PathBuf,
    pgb_reload: String,
    pgb_vars: String,
    stats_socket: PathBuf,
}

impl Cfg {
    fn text(&self) -> String {
        let mut b = ConfigBuilder::new().endpoint(&self.endpoint);
        if let Some(ns) = &self.namespace {
            b = b.namespace(ns);
        }
        b = b.scope(&self.scope);
        if let Some(u) = &self.username {
            b = b.etcd("username", u);
        }
        b.daemon("min_interval", "100ms")
            .daemon("once_timeout", "5s")
            .raw_in("daemon", &self.daemon_extra)
            .raw_in("guard", &self.guard)
            .var("bind_address", "127.0.0.1")
            .var("primary_port", 15000)
            .var("replica_port", 15001)
            .var("stats_port", 15002)
            .var("stats_socket", &self.stats_socket)
            .template(
                Template::new("haproxy", &self.hap_src, &self.hap_dest)
                    .check(&self.hap_check)
                    .raw(&self.hap_extra)
                    .set("reload", Raw(self.hap_reload.clone())),
            )
            .template(
                Template::new("pgbouncer", &self.pgb_src, &self.pgb_dest)
                    .require_leader(true)
                    .set("reload", Raw(self.pgb_reload.clone()))
                    .set("vars", Raw(format!("{{ {} }}", self.pgb_vars))),
            )
            .to_toml()
    }
}

/// One test's world: a scope on the shared etcd holding a good cluster, a temp dir with the
/// config and known-good destination files, and one sentinel `sleep` per reload target.
struct Ws {
    dir: tempfile::TempDir,
    scope: String,
    cfg_path: PathBuf,
    cfg: Cfg,
    hap: PathBuf,
    pgb: PathBuf,
    hap_pidfile: PathBuf,
    hap_sleep: Proc,
    pgb_sleep: Proc,
}

impl Ws {
    /// Members pg1 (leader), pg2, pg3.
    fn new(tag: &str) -> Ws {
        Self::with_members(tag, &["pg1", "pg2", "pg3"])
    }

    /// `names[0]` is the leader. Ends with the known-good files written by `once --no-reload`.
    fn with_members(tag: &str, names: &[&str]) -> Ws {
        let dir = temp_dir(tag);
        let d = dir.path().to_path_buf();
        let scope = unique_name(tag);
        let hap_sleep = sentinel("sleep (haproxy reload sentinel)");
        let pgb_sleep = sentinel("sleep (pgbouncer reload sentinel)");
        let hap_pidfile = d.join("haproxy.pid");
        let pgb_pidfile = d.join("pgbouncer.pid");
        std::fs::write(&hap_pidfile, format!("{}\n", hap_sleep.pid())).unwrap();
        std::fs::write(&pgb_pidfile, format!("{}\n", pgb_sleep.pid())).unwrap();
        let cfg = Cfg {
            endpoint: Etcd::shared().endpoint(),
            namespace: None,
            scope: scope.clone(),
            username: None,
            daemon_extra: String::new(),
            guard: String::new(),
            hap_src: shipped("haproxy.cfg.tera"),
            hap_dest: d.join("haproxy.cfg"),
            hap_check: ["haproxy", "-c", "-f", "{{staged}}"]
                .map(String::from)
                .to_vec(),
            hap_extra: String::new(),
            hap_reload: signal_reload(&hap_pidfile, "SIGUSR2", "sleep"),
            pgb_src: shipped("pgbouncer.ini.tera"),
            pgb_dest: d.join("pgbouncer.ini"),
            pgb_reload: signal_reload(&pgb_pidfile, "SIGHUP", "sleep"),
            pgb_vars: format!(
                "listen_addr = \"127.0.0.1\", listen_port = 16432, auth_type = \"trust\", \
                 unix_socket_dir = {dir}, pidfile = {pid}, logfile = {log}",
                dir = q(&d),
                pid = q(d.join("pgbouncer-run.pid")),
                log = q(d.join("pgbouncer.log")),
            ),
            stats_socket: d.join("admin.sock"),
        };
        let ws = Ws {
            hap: cfg.hap_dest.clone(),
            pgb: cfg.pgb_dest.clone(),
            cfg_path: d.join("haconfd.toml"),
            cfg,
            dir,
            scope,
            hap_pidfile,
            hap_sleep,
            pgb_sleep,
        };
        ws.write_config();
        for (i, name) in names.iter().enumerate() {
            let role = if i == 0 { "master" } else { "replica" };
            ws.put(
                &format!("members/{name}"),
                &member(5441 + i as u16, role).to_string(),
            );
        }
        ws.put("leader", names[0]);
        ws.once(&["--no-reload"]).expect(0, &[]);
        assert!(
            read(&ws.hap).contains(&format!("server {} 127.0.0.1:5441 ", names[0])),
            "baseline haproxy.cfg:\n{}",
            read(&ws.hap)
        );
        assert!(read(&ws.pgb).contains("host=127.0.0.1 port=5441"));
        ws
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self, rel: &str) -> String {
        format!("/service/{}/{rel}", self.scope)
    }

    fn put(&self, rel: &str, value: &str) {
        Etcd::shared().put(&self.key(rel), value);
    }

    fn delete(&self, rel: &str) {
        assert_eq!(Etcd::shared().delete(&self.key(rel)), 1, "delete {rel}");
    }

    /// A valid new member pg4: makes haproxy.cfg differ so that checks, writes and reloads run.
    fn add_valid_member(&self) {
        self.put("members/pg4", &member(5444, "replica").to_string());
    }

    fn write_config(&self) {
        std::fs::write(&self.cfg_path, self.cfg.text()).unwrap();
        std::fs::set_permissions(&self.cfg_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn reconfigure(&mut self, f: impl FnOnce(&mut Cfg)) {
        f(&mut self.cfg);
        self.write_config();
    }

    fn run(&self, args: &[&str]) -> Run {
        haconfd(&self.cfg_path, args, None)
    }

    fn once(&self, extra: &[&str]) -> Run {
        let mut args = vec!["once"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `haconfd run` on this workspace's config, `flags` before `run`, `env` added to an
    /// environment cleared of `HACONFD_*` and `NOTIFY_SOCKET`, logging to `daemon.log` here.
    fn start_run(&self, flags: &[&str], env: &[(&str, &Path)]) -> Proc {
        self.start_run_with(flags, &[], env)
    }

    /// [`Ws::start_run`] with `run_args` after `run`.
    fn start_run_with(&self, flags: &[&str], run_args: &[&str], env: &[(&str, &Path)]) -> Proc {
        let mut cmd = Command::new(haconfd_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HACONFD_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.arg("-c")
            .arg(&self.cfg_path)
            .args(flags)
            .arg("run")
            .args(run_args);
        Proc::spawn_logged("haconfd run", cmd, &self.path("daemon.log"))
    }

    /// [`Ws::start_run`] with JSON logs at debug (every pass logs its revision).
    fn start_debug_run(&self) -> Proc {
        self.start_run(
            &["--log-format", "json", "--log-level", "haconfd=debug"],
            &[],
        )
    }

    /// The states of both known-good destination files.
    fn files(&self) -> [FileState; 2] {
        [file_state(&self.hap), file_state(&self.pgb)]
    }

    fn assert_unchanged(&self, before: &[FileState; 2]) {
        assert_file_unchanged(&self.hap, &before[0]);
        assert_file_unchanged(&self.pgb, &before[1]);
        self.assert_no_staged_leftovers();
    }

    fn assert_no_staged_leftovers(&self) {
        let left: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".haconfd-"))
            .collect();
        assert!(left.is_empty(), "staged files left behind: {left:?}");
    }

    /// Neither destination holds the injected text.
    fn assert_no_evil(&self) {
        for p in [&self.hap, &self.pgb] {
            let text = read(p);
            assert!(
                !text.contains("evil"),
                "{} carries injected text:\n{text}",
                p.display()
            );
        }
    }

    fn assert_nothing_signalled(&self) {
        assert_not_signalled(&self.hap_sleep);
        assert_not_signalled(&self.pgb_sleep);
    }

    /// A member key or leader key the model must refuse: `once` skips it with a warning naming
    /// it, the render is unchanged ("up to date"), nothing is written or signalled.
    fn assert_refused_key(tag: &str, rel_key: &str, value: &str, reason_needles: &[&str]) {
        let ws = Ws::new(tag);
        let before = ws.files();
        ws.put(rel_key, value);
        let run = ws.once(&[]);
        run.expect(0, &[]);
        // Keys are logged escaped (a newline in a key must not start a forged log line).
        let key = ws.key(rel_key).escape_debug().to_string();
        let reason = run.warning_for(&key).unwrap_or_else(|| {
            panic!(
                "no `ignoring key` warning naming {key:?}\nstderr:\n{}",
                run.stderr
            )
        });
        for n in reason_needles {
            assert!(
                reason.contains(n),
                "reason for {key:?} lacks {n:?}: {reason}"
            );
        }
        assert!(run.logged("up to date"), "stderr:\n{}", run.stderr);
        ws.assert_unchanged(&before);
        ws.assert_no_evil();
        ws.assert_nothing_signalled();
    }

    /// A member key with one field that is odd or hostile: `once` keeps the member (it joins
    /// the files) with that field dropped, warns naming the key and the field, and no text of the
    /// field reaches a file.
    fn assert_field_dropped(tag: &str, value: &str, reason_needles: &[&str]) {
        let ws = Ws::new(tag);
        ws.put("members/pg4", value);
        let run = ws.once(&[]);
        run.expect(0, &[]);
        let key = ws.key("members/pg4");
        let reason = run
            .logs()
            .into_iter()
            .find_map(|v| {
                (v["level"] == "WARN"
                    && v["message"] == "ignoring a field of a member key (the member is kept)"
                    && v["key"] == key.as_str())
                .then(|| v["reason"].as_str().unwrap_or_default().to_owned())
            })
            .unwrap_or_else(|| panic!("no warning naming {key:?}\nstderr:\n{}", run.stderr));
        for n in reason_needles {
            assert!(
                reason.contains(n),
                "reason for {key:?} lacks {n:?}: {reason}"
            );
        }
        assert!(
            run.warning_for(&key).is_none(),
            "the member itself was refused:\n{}",
            run.stderr
        );
        assert!(
            read(&ws.hap).contains("server pg4 127.0.0.1:5460 "),
            "the member with a dropped field is not routed:\n{}",
            read(&ws.hap)
        );
        ws.assert_no_evil();
    }

    /// The haproxy target's reload points at `pidfile` (expecting `process`); a valid member
    /// joins; `once` must write haproxy.cfg, refuse the reload with exit 8 naming `needles`,
    /// keep pgbouncer.ini, and signal nothing.
    fn assert_reload_refused(mut self, pidfile: &Path, process: &str, needles: &[&str]) {
        let reload = signal_reload(pidfile, "SIGUSR2", process);
        self.reconfigure(|c| c.hap_reload = reload);
        let before = self.files();
        self.add_valid_member();
        let run = self.once(&[]);
        let pidfile_text = pidfile.display().to_string();
        let mut all = vec!["haproxy: file updated but reload failed", &pidfile_text];
        all.extend_from_slice(needles);
        run.expect(8, &all);
        assert!(
            read(&self.hap).contains("server pg4 127.0.0.1:5444 "),
            "haproxy.cfg must be updated even though the reload was refused:\n{}",
            read(&self.hap)
        );
        assert_file_unchanged(&self.pgb, &before[1]);
        self.assert_no_staged_leftovers();
        self.assert_nothing_signalled();
    }
}

/// Writes a snapshot file named `name` with `body` in `ws`'s dir.
fn flat_snapshot(ws: &Ws, name: &str, body: &str) -> PathBuf {
    let p = ws.path(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// The good cluster of [`Ws::new`] as flat-dump entries (`"key": "value"` lines).
fn flat_entries(ws: &Ws) -> Vec<String> {
    let mut v = vec![format!("{}: {}", q(ws.key("leader")), q("pg1"))];
    for (i, n) in ["pg1", "pg2", "pg3"].iter().enumerate() {
        let role = if i == 0 { "master" } else { "replica" };
        v.push(format!(
            "{}: {}",
            q(ws.key(&format!("members/{n}"))),
            q(member(5441 + i as u16, role).to_string())
        ));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Member and leader keys from etcd (binary `once`)
// ---------------------------------------------------------------------------------------------

#[test]
fn member_with_malformed_json_is_skipped_naming_its_key() {
    Ws::assert_refused_key(
        "malformed",
        "members/pg4",
        r#"{"conn_url":"postgres://127.0.0.1:5444/postgres","api_url":"#,
        &["member JSON does not parse", "line 1 column"],
    );
}

#[test]
fn member_without_conn_url_is_skipped_naming_its_key() {
    let mut m = member(5444, "replica");
    m.as_object_mut().unwrap().remove("conn_url");
    Ws::assert_refused_key(
        "noconnurl",
        "members/pg4",
        &m.to_string(),
        &["missing conn_url"],
    );
}

#[test]
fn member_with_non_numeric_port_is_skipped_naming_its_key() {
    Ws::assert_refused_key(
        "nonnumport",
        "members/pg4",
        &member_with("conn_url", "postgres://127.0.0.1:54x2/postgres".into()),
        &[
            "conn_url \"postgres://127.0.0.1:54x2/postgres\"",
            "invalid port",
        ],
    );
}

#[test]
fn member_with_port_0_is_skipped_naming_its_key() {
    Ws::assert_refused_key(
        "port0",
        "members/pg4",
        &member_with("conn_url", "postgres://127.0.0.1:0/postgres".into()),
        &["port 0 is not a valid port"],
    );
}

#[test]
fn member_with_port_70000_is_skipped_naming_its_key() {
    Ws::assert_refused_key(
        "port70000",
        "members/pg4",
        &member_with("conn_url", "postgres://127.0.0.1:70000/postgres".into()),
        &[
            "conn_url \"postgres://127.0.0.1:70000/postgres\"",
            "invalid port",
        ],
    );
}

#[test]
fn member_with_ipv6_host_is_accepted_rendered_bracketed_and_passes_haproxy_check() {
    let ws = Ws::new("ipv6");
    let pgb_before = file_state(&ws.pgb);
    let mut m = member(5444, "replica");
    m["conn_url"] = "postgres://[::1]:5432/postgres".into();
    m["api_url"] = "http://[::1]:8008/patroni".into();
    ws.put("members/pg4", &m.to_string());
    let run = ws.once(&[]);
    run.expect(0, &[]);
    assert!(
        run.warning_for(&ws.key("members/pg4")).is_none(),
        "an IPv6 member must not be refused:\n{}",
        run.stderr
    );
    let cfg = read(&ws.hap);
    assert_eq!(
        cfg.matches("server pg4 [::1]:5432 maxconn 100 check port 8008\n")
            .count(),
        2,
        "pg4 bracketed in both listeners:\n{cfg}"
    );
    let mut check = command("haproxy", &["-c", "-f"]);
    check.arg(&ws.hap);
    let out = run_with_timeout(&mut check, Duration::from_secs(20)).unwrap();
    assert!(
        out.status.success(),
        "haproxy -c refuses the rendered IPv6 server line:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rightful reload: SIGUSR2 to the haproxy target's process only.
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_not_signalled(&ws.pgb_sleep);
    assert_file_unchanged(&ws.pgb, &pgb_before);
}

#[test]
fn member_name_with_newline_and_server_directive_is_refused_naming_its_key() {
    Ws::assert_refused_key(
        "injname",
        "members/pg1\n    server evil 1.2.3.4:5432",
        &member(5444, "replica").to_string(),
        &["member name refused", "contains '\\n'"],
    );
}

#[test]
fn member_host_with_percent_encoded_newline_is_refused_naming_its_key() {
    Ws::assert_refused_key(
        "injpct",
        "members/pg4",
        &member_with("conn_url", "postgres://evil%0a%20server:5432/x".into()),
        &[
            "conn_url \"postgres://evil%0a%20server:5432/x\"",
            "not a valid hostname",
        ],
    );
}

#[test]
fn member_host_with_raw_newline_is_refused_naming_its_key() {
    Ws::assert_refused_key(
        "injraw",
        "members/pg4",
        &member_with(
            "conn_url",
            "postgres://127.0.0.1\n    server evil 1.2.3.4:5432/x".into(),
        ),
        &["conn_url", "contains whitespace or control characters"],
    );
}

#[test]
fn member_tag_value_with_newline_drops_the_tag_naming_its_key_and_field() {
    Ws::assert_field_dropped(
        "injtag",
        &member_with("tags", serde_json::json!({"x": "a\nserver evil"})),
        &["tags.x", "a\\nserver evil"],
    );
}

#[test]
fn member_api_url_with_newline_is_refused_naming_its_key() {
    Ws::assert_refused_key(
        "injapi",
        "members/pg4",
        &member_with(
            "api_url",
            "http://127.0.0.2\n    server evil 1.2.3.4:5432:8008/patroni".into(),
        ),
        &["api_url", "contains whitespace or control characters"],
    );
}

#[test]
fn member_api_url_with_percent_encoded_newline_is_refused_naming_its_key() {
    Ws::assert_refused_key(
        "injapipct",
        "members/pg4",
        &member_with("api_url", "http://evil%0a%20server:8008/patroni".into()),
        &["api_url \"http://evil%0a%20server:8008/patroni\""],
    );
}

#[test]
fn member_state_with_a_directive_drops_the_state_naming_its_key() {
    Ws::assert_field_dropped(
        "injstate",
        &member_with("state", "running\n    server evil 1.2.3.4:5432".into()),
        &[
            "field state dropped",
            "\"running\\n",
            "must be lowercase letters",
        ],
    );
}

#[test]
fn member_role_with_a_directive_drops_the_role_naming_its_key() {
    Ws::assert_field_dropped(
        "injrole",
        &member_with("role", "replica\nserver evil 1.2.3.4:5432".into()),
        &[
            "field role dropped",
            "\"replica\\n",
            "must be lowercase letters",
        ],
    );
}

#[test]
fn leader_key_with_newline_is_refused_and_pgbouncer_ini_is_kept() {
    let ws = Ws::new("injleader");
    let before = ws.files();
    ws.put("leader", "pg1\nserver evil 1.2.3.4:5432");
    let run = ws.once(&[]);
    let pgb = ws.pgb.display().to_string();
    run.expect(5, &["target \"pgbouncer\" needs a leader", &ws.scope, &pgb]);
    let reason = run
        .warning_for(&ws.key("leader"))
        .unwrap_or_else(|| panic!("no warning naming the leader key:\n{}", run.stderr));
    assert!(reason.contains("leader name refused"), "{reason}");
    ws.assert_unchanged(&before);
    ws.assert_no_evil();
    ws.assert_nothing_signalled();
}

#[test]
fn leader_key_naming_a_missing_member_renders_haproxy_but_pgbouncer_exits_5() {
    let ws = Ws::new("ghostleader");
    let before = ws.files();
    ws.put("leader", "pg9");
    let run = ws.once(&[]);
    let pgb = ws.pgb.display().to_string();
    run.expect(5, &["target \"pgbouncer\" needs a leader", &ws.scope, &pgb]);
    let reason = run.warning_for(&ws.key("leader")).unwrap_or_default();
    assert!(
        reason.contains("leader \"pg9\" is not a valid member"),
        "{}",
        run.stderr
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
    // haproxy.cfg itself still renders (every member, checks decide), and matches the file.
    let r = ws.run(&["render", "--template", "haproxy"]);
    r.expect(0, &[]);
    assert_eq!(r.stdout.as_bytes(), &before[0].bytes[..]);
    ws.run(&["render", "--template", "pgbouncer"])
        .expect(5, &["target \"pgbouncer\" needs a leader"]);
}

/// A key holding a newline is logged escaped by the text formatter: a hostile etcd writer cannot
/// start a forged log line.
#[test]
fn member_name_with_newline_cannot_forge_a_text_log_line() {
    let ws = Ws::new("logforge");
    let before = ws.files();
    ws.put(
        "members/pg1\n2026-01-01T00:00:00.000000Z  INFO haconfd: evil forged line",
        &member(5444, "replica").to_string(),
    );
    let run = ws.run(&["--log-format", "text", "once"]);
    run.expect(0, &[]);
    let warning = run
        .stderr
        .lines()
        .find(|l| l.contains("ignoring key"))
        .unwrap_or_else(|| panic!("no warning:\n{}", run.stderr));
    assert!(
        warning.contains(&format!("/service/{}/members/pg1", ws.scope)),
        "{warning}"
    );
    for line in run.stderr.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z"),
            "the member key's newline was logged raw and forged a log line:\n{}",
            run.stderr
        );
    }
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

// ---------------------------------------------------------------------------------------------
// Snapshot files (`render --snapshot`, `check --snapshot`)
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_key_in_a_flat_snapshot_exits_2_naming_the_key() {
    let ws = Ws::new("dupflat");
    let before = ws.files();
    let mut entries = flat_entries(&ws);
    entries.push(format!("{}: {}", q(ws.key("leader")), q("pg2")));
    let snap = flat_snapshot(&ws, "dup.json", &format!("{{\n{}\n}}", entries.join(",\n")));
    let key = format!("duplicate key {}", q(ws.key("leader")));
    let path = snap.display().to_string();
    let s = snap.to_str().unwrap();
    ws.run(&["render", "--snapshot", s])
        .expect(2, &[&key, &path]);
    ws.run(&["check", "--snapshot", s])
        .expect(2, &[&key, &path]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn duplicate_key_in_an_etcdctl_snapshot_exits_2_naming_the_key() {
    use base64::Engine as _;
    let ws = Ws::new("dupetcdctl");
    let before = ws.files();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kv = |k: &str, v: &str| serde_json::json!({"key": b64(k), "value": b64(v)});
    let m = member(5441, "master").to_string();
    let dump = serde_json::json!({
        "header": {"revision": 7},
        "kvs": [kv(&ws.key("members/pg1"), &m), kv(&ws.key("members/pg1"), &m)]
    });
    let snap = flat_snapshot(&ws, "etcdctl.json", &dump.to_string());
    let want = format!("kvs[1]: duplicate key {}", q(ws.key("members/pg1")));
    ws.run(&["render", "--snapshot", snap.to_str().unwrap()])
        .expect(2, &[&want]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn malformed_snapshot_json_exits_2_naming_line_and_column() {
    let ws = Ws::new("badsnapjson");
    let before = ws.files();
    let snap = flat_snapshot(
        &ws,
        "bad.json",
        "{\n  \"/service/x/leader\": \"pg1\",\n  oops\n}",
    );
    let path = snap.display().to_string();
    ws.run(&["render", "--snapshot", snap.to_str().unwrap()])
        .expect(2, &[&path, "invalid JSON", "line 3 column 3"]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn non_string_value_in_a_flat_snapshot_exits_2_naming_the_key() {
    let ws = Ws::new("nonstring");
    let before = ws.files();
    let mut entries = flat_entries(&ws);
    entries.push(format!("{}: {{\"conn_url\": 5}}", q(ws.key("members/pg4"))));
    let snap = flat_snapshot(&ws, "obj.json", &format!("{{{}}}", entries.join(",")));
    let want = format!("key {}: value must be a string", q(ws.key("members/pg4")));
    ws.run(&["render", "--snapshot", snap.to_str().unwrap()])
        .expect(2, &[&want, "got an object"]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// A template whose line 4 has a stray `}`; returns (path, expected "file:line:col").
fn broken_template(ws: &Ws) -> (PathBuf, String) {
    let line4 = "    server {{ m.name } {{ m.address }} check";
    let text =
        format!("global\n    maxconn 100\n{{% for m in members %}}\n{line4}\n{{% endfor %}}\n");
    let p = ws.path("broken.cfg.tera");
    std::fs::write(&p, text).unwrap();
    let col = line4.find("name }").unwrap() + "name ".len() + 1;
    let at = format!("{}:4:{col}", p.display());
    (p, at)
}

#[test]
fn template_syntax_error_fails_check_with_exit_2_naming_file_line_col() {
    let mut ws = Ws::new("tplsyntaxcheck");
    let before = ws.files();
    let (p, at) = broken_template(&ws);
    ws.reconfigure(|c| c.hap_src = p.clone());
    ws.run(&["check"])
        .expect(2, &["does not compile", &at, "{{ m.name }"]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn template_syntax_error_fails_once_with_exit_2_and_keeps_the_files() {
    let mut ws = Ws::new("tplsyntaxonce");
    let before = ws.files();
    let (p, at) = broken_template(&ws);
    ws.reconfigure(|c| c.hap_src = p.clone());
    ws.add_valid_member();
    ws.once(&[]).expect(2, &["does not compile", &at]);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn undefined_variable_fails_once_with_exit_5_naming_file_line_col() {
    let mut ws = Ws::new("tplundef");
    let before = ws.files();
    let line2 = "    maxconn {{ vars.no_such_var }}";
    let p = ws.path("undef.cfg.tera");
    std::fs::write(&p, format!("global\n{line2}\n")).unwrap();
    let at = format!(
        "{}:2:{}",
        p.display(),
        line2.find("no_such_var").unwrap() + 1
    );
    ws.reconfigure(|c| c.hap_src = p.clone());
    ws.once(&[]).expect(
        5,
        &[
            "failed to render for target \"haproxy\"",
            &at,
            "no_such_var",
        ],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

// ---------------------------------------------------------------------------------------------
// Check commands
// ---------------------------------------------------------------------------------------------

/// What the failing check prints on stderr, two lines, to be shown verbatim.
const CHECK_STDERR: &str =
    "[ALERT]    (4242) : config : parsing [staged:7] : unknown keyword 'bogus'.\n\
     [ALERT]    (4242) : config : Fatal errors found in configuration.";

/// `sh -c` printing [`CHECK_STDERR`] (passed as arguments: no quoting games) and exiting 3.
fn failing_check() -> Vec<String> {
    let (l1, l2) = CHECK_STDERR.split_once('\n').unwrap();
    [
        "sh",
        "-c",
        "printf '%s\\n' \"$1\" \"$2\" >&2; exit 3",
        "check",
        l1,
        l2,
        "{{staged}}",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn failing_check_exits_6_with_its_stderr_verbatim_and_keeps_the_files() {
    let mut ws = Ws::new("checkfail");
    ws.reconfigure(|c| c.hap_check = failing_check());
    let before = ws.files();
    ws.add_valid_member();
    let run = ws.once(&[]);
    run.expect(
        6,
        &[
            "check of \"haproxy\" refused the new file",
            &format!("{} is unchanged", ws.hap.display()),
            "exit status: 3",
            CHECK_STDERR,
        ],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn failing_check_in_check_mode_exits_6_and_writes_nothing() {
    let mut ws = Ws::new("checkmodefail");
    ws.reconfigure(|c| c.hap_check = failing_check());
    let before = ws.files();
    let snap = flat_snapshot(
        &ws,
        "good.json",
        &format!("{{{}}}", flat_entries(&ws).join(",")),
    );
    ws.run(&["check", "--snapshot", snap.to_str().unwrap()])
        .expect(
            6,
            &["check of \"haproxy\" refused the new file", CHECK_STDERR],
        );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn hanging_check_is_killed_after_check_timeout_with_exit_6() {
    let mut ws = Ws::new("checkhang");
    ws.reconfigure(|c| {
        c.hap_check = ["sh", "-c", "exec sleep 30", "check", "{{staged}}"]
            .map(String::from)
            .to_vec();
        c.hap_extra = "check_timeout = \"1s\"".into();
    });
    let before = ws.files();
    ws.add_valid_member();
    let run = ws.once(&[]);
    run.expect(
        6,
        &[
            "`sh -c 'exec sleep 30' check ",
            "` did not finish within 1s and was killed",
        ],
    );
    assert!(
        run.elapsed >= Duration::from_secs(1) && run.elapsed < Duration::from_secs(8),
        "took {:?}",
        run.elapsed
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn missing_check_binary_exits_6_naming_it() {
    let mut ws = Ws::new("checkmissing");
    ws.reconfigure(|c| {
        c.hap_check = ["/nonexistent/bin/haproxy-check", "-c", "{{staged}}"]
            .map(String::from)
            .to_vec()
    });
    let before = ws.files();
    ws.add_valid_member();
    ws.once(&[]).expect(
        6,
        &[
            "cannot run `/nonexistent/bin/haproxy-check -c ",
            "No such file or directory",
        ],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

// ---------------------------------------------------------------------------------------------
// Destinations
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_destination_directory_exits_7_naming_the_path() {
    let mut ws = Ws::new("destmissing");
    let missing = ws.path("missing");
    let dest = missing.join("haproxy.cfg");
    ws.reconfigure(|c| c.hap_dest = dest.clone());
    let before = ws.files();
    let run = ws.once(&[]);
    run.expect(
        7,
        &[
            &format!("cannot stage {}/.haproxy.cfg.haconfd-", missing.display()),
            "No such file or directory",
        ],
    );
    assert!(!missing.exists(), "haconfd must not create the directory");
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn read_only_destination_directory_exits_7_for_a_non_root_user() {
    require_root();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("OS user `nobody`");
    let ws = Ws::new("destreadonly");
    // The dir is root's 0755: everything is readable by nobody, nothing writable.
    let meta = std::fs::metadata(ws.dir.path()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));
    let before = ws.files();
    ws.add_valid_member();
    let run = haconfd(
        &ws.cfg_path,
        &["once"],
        Some((nobody.uid.as_raw(), nobody.gid.as_raw())),
    );
    run.expect(
        7,
        &[
            &format!(
                "cannot stage {}/.haproxy.cfg.haconfd-",
                ws.dir.path().display()
            ),
            "Permission denied",
        ],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

// ---------------------------------------------------------------------------------------------
// Pidfiles: the file is written, the reload is refused (exit 8), nothing is signalled
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_pidfile_exits_8_after_updating_the_file_and_signals_nothing() {
    let ws = Ws::new("pidmissing");
    let pidfile = ws.path("nowhere.pid");
    ws.assert_reload_refused(
        &pidfile,
        "sleep",
        &[
            "cannot read pidfile",
            "No such file",
            "nothing was signalled",
        ],
    );
}

/// A sidecar's first pass: HAProxy waits for haconfd's first file, so there is no pidfile or
/// master socket yet. Writing the first file with its consumer not started is no failure: the
/// consumer reads it when it starts. (With a file already in place, a missing pidfile is one:
/// `missing_pidfile_exits_8_after_updating_the_file_and_signals_nothing`.)
#[test]
fn first_file_for_a_consumer_not_started_yet_is_no_failed_reload() {
    let mut ws = Ws::new("coldstart");
    std::fs::remove_file(&ws.hap).unwrap();
    std::fs::remove_file(&ws.pgb).unwrap();
    let hap_pidfile = ws.path("not-started-haproxy.pid");
    let pgb_pidfile = ws.path("not-started-pgbouncer.pid");
    ws.reconfigure(|c| {
        c.hap_reload = signal_reload(&hap_pidfile, "SIGUSR2", "haproxy");
        c.pgb_reload = signal_reload(&pgb_pidfile, "SIGHUP", "pgbouncer");
    });
    let run = ws.once(&[]);
    run.expect(0, &[]);
    assert!(
        run.logged(
            "first file written; its consumer is not running yet and reads it when it starts"
        ),
        "{}",
        run.stderr
    );
    assert!(read(&ws.hap).contains("server pg1 "), "{}", read(&ws.hap));
    assert!(read(&ws.pgb).contains("port=5441"), "{}", read(&ws.pgb));
}

#[test]
fn empty_pidfile_exits_8_naming_it() {
    let ws = Ws::new("pidempty");
    let pidfile = ws.path("empty.pid");
    std::fs::write(&pidfile, "").unwrap();
    ws.assert_reload_refused(
        &pidfile,
        "sleep",
        &["holds \"\", not a PID", "nothing was signalled"],
    );
}

/// PID 1 is HAProxy's master for a sidecar sharing its PID namespace without an init: it is
/// checked like any other PID, and signalled only if it is the expected process. Here PID 1 is
/// this machine's init, not `sleep`: refused by name, not as "not a PID".
#[test]
fn pidfile_naming_pid_1_is_verified_like_any_pid_and_refused_when_it_is_another_program() {
    let ws = Ws::new("pidone");
    let pidfile = ws.path("one.pid");
    std::fs::write(&pidfile, "1\n").unwrap();
    let init = std::fs::read_to_string("/proc/1/comm").unwrap();
    assert_ne!(init.trim(), "sleep");
    ws.assert_reload_refused(
        &pidfile,
        "sleep",
        &["PID 1 from", "not \"sleep\"; refusing to signal it"],
    );
}

#[test]
fn garbage_pidfile_exits_8_naming_it_and_its_content() {
    let ws = Ws::new("pidgarbage");
    // Leading digits of a live `sleep`: a lax parser would signal the sentinel.
    let content = format!("{}x\n", ws.hap_sleep.pid());
    let pidfile = ws.path("garbage.pid");
    std::fs::write(&pidfile, &content).unwrap();
    let holds = format!("holds {content:?}, not a PID");
    ws.assert_reload_refused(&pidfile, "sleep", &[&holds, "nothing was signalled"]);
}

#[test]
fn pidfile_with_a_dead_pid_exits_8_naming_the_pid() {
    let ws = Ws::new("piddead");
    let mut child = Command::new(require_bin("true")).spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    assert!(!pid_alive(pid));
    let pidfile = ws.path("dead.pid");
    std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
    let who = format!("PID {pid} from {}", pidfile.display());
    ws.assert_reload_refused(
        &pidfile,
        "true",
        &[
            &who,
            "is not running (stale pidfile)",
            "nothing was signalled",
        ],
    );
}

#[test]
fn pidfile_with_a_zombie_pid_exits_8_as_not_running() {
    let ws = Ws::new("pidzombie");
    let mut child = Command::new(require_bin("true")).spawn().unwrap();
    let pid = child.id() as i32;
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(pid)),
        "`true` did not exit"
    );
    // Not reaped yet: a zombie with comm "true".
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let pidfile = ws.path("zombie.pid");
    std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
    let who = format!("PID {pid} from {}", pidfile.display());
    ws.assert_reload_refused(&pidfile, "true", &[&who, "is not running"]);
    child.wait().unwrap();
}

#[test]
fn pidfile_with_an_unrelated_process_exits_8_and_leaves_it_alive() {
    let ws = Ws::new("pidforeign");
    // The haproxy target's own pidfile holds the sentinel `sleep`; it expects "haproxy".
    let pidfile = ws.hap_pidfile.clone();
    let who = format!("PID {} from {}", ws.hap_sleep.pid(), pidfile.display());
    ws.assert_reload_refused(
        &pidfile,
        "haproxy",
        &[&who, "is \"sleep\", not \"haproxy\"; refusing to signal it"],
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration errors (exit 2)
// ---------------------------------------------------------------------------------------------

/// Applies `f` to the config after the baseline, runs `once` (a change is pending), expects exit
/// 2 naming `needles` (computed from the written config), files and sentinels untouched.
fn assert_config_refused(
    tag: &str,
    f: impl FnOnce(&mut Cfg),
    needles: impl FnOnce(&Ws) -> Vec<String>,
) {
    let mut ws = Ws::new(tag);
    let before = ws.files();
    ws.reconfigure(f);
    ws.add_valid_member();
    let needles = needles(&ws);
    let n: Vec<&str> = needles.iter().map(String::as_str).collect();
    ws.once(&[]).expect(2, &n);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

/// 1-based line of the first line of `ws`'s config containing `needle`.
fn config_line(ws: &Ws, needle: &str) -> usize {
    read(&ws.cfg_path)
        .lines()
        .position(|l| l.contains(needle))
        .expect("needle in config")
        + 1
}

#[test]
fn scope_with_a_slash_exits_2() {
    assert_config_refused(
        "cfgscope",
        |c| c.scope = "demo/evil".into(),
        |_| vec!["etcd.scope \"demo/evil\" must not contain '/'".into()],
    );
}

#[test]
fn unknown_config_key_exits_2_naming_file_and_line() {
    assert_config_refused(
        "cfgunknown",
        |c| c.daemon_extra = "min_intervall = \"1s\"\n".into(),
        |ws| {
            vec![
                format!("invalid config {}", ws.cfg_path.display()),
                format!("line {}", config_line(ws, "min_intervall")),
                "unknown field `min_intervall`".into(),
            ]
        },
    );
}

#[test]
fn bad_duration_exits_2_naming_the_key() {
    assert_config_refused(
        "cfgduration",
        |c| c.hap_extra = "check_timeout = \"fast\"".into(),
        |ws| {
            vec![
                format!("invalid config {}", ws.cfg_path.display()),
                format!("line {}", config_line(ws, "check_timeout")),
                "check_timeout = \"fast\"".into(),
                "expected a duration".into(),
            ]
        },
    );
}

#[test]
fn reload_with_both_pidfile_and_command_exits_2() {
    assert_config_refused(
        "cfgreloadboth",
        |c| {
            c.hap_reload = c.hap_reload.replace(
                " }",
                ", command = [\"systemctl\", \"reload\", \"haproxy\"] }",
            )
        },
        |_| vec!["template \"haproxy\": reload takes only one of `pidfile` or `command`".into()],
    );
}

#[test]
fn mode_that_is_not_octal_exits_2() {
    assert_config_refused(
        "cfgmode",
        |c| c.hap_extra = "mode = \"0999\"".into(),
        |_| vec!["template \"haproxy\": mode \"0999\" is not an octal file mode".into()],
    );
}

#[test]
fn check_given_as_a_shell_string_exits_2() {
    assert_config_refused(
        "cfgshellcheck",
        |c| c.hap_check = vec!["haproxy -c -q -f {{staged}}".into()],
        |_| {
            vec![
                "template \"haproxy\": check is an argv, not a shell string".into(),
                "\"haproxy -c -q -f {{staged}}\"".into(),
            ]
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The empty/shrink guard
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_store_is_refused_by_the_guard_with_exit_4() {
    let ws = Ws::new("guardempty");
    let before = ws.files();
    assert_eq!(
        Etcd::shared().delete_prefix(&ws.key("")),
        4,
        "leader and 3 members"
    );
    // An empty scope is named with what is there instead; forcing it is never the advice (it
    // would render files with no server).
    let empty = format!("no key under /service/{}/", ws.scope);
    let run = ws.once(&[]);
    run.expect(4, &[&empty]);
    assert!(!run.stderr.contains("--force"), "{}", run.stderr);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

/// An engine on `ws`'s config with the view of etcd applied once without reloading (the
/// "last applied" members), plus a runtime to drive it.
fn engine_after_first_pass(ws: &Ws) -> (tokio::runtime::Runtime, Engine) {
    let settings = haconfd::config::load_settings(&ws.cfg_path, &Default::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut engine = Engine::new(Arc::new(settings)).unwrap();
    let snap = fetch(&rt, &engine);
    rt.block_on(engine.pass(&snap, false)).unwrap();
    (rt, engine)
}

fn fetch(rt: &tokio::runtime::Runtime, engine: &Engine) -> haconfd::snapshot::Snapshot {
    rt.block_on(haconfd::source::fetch_once(
        &engine.settings().etcd,
        Duration::from_secs(5),
    ))
    .unwrap()
}

#[test]
fn shrink_from_4_to_1_members_without_a_leader_is_refused_by_the_guard() {
    let ws = Ws::with_members("shrink41", &["pg1", "pg2", "pg3", "pg4"]);
    let (rt, mut engine) = engine_after_first_pass(&ws);
    let before = ws.files();
    // The leader among them: a leader still there would vouch for the smaller view.
    for m in ["pg1", "pg2", "pg3"] {
        ws.delete(&format!("members/{m}"));
    }
    let snap = fetch(&rt, &engine);
    let err = rt.block_on(engine.pass(&snap, true)).unwrap_err();
    assert!(matches!(err, PassError::Guard(_)), "{err}");
    assert_eq!(
        err.reason(),
        "guard",
        "main maps PassError::Guard to exit 4"
    );
    let msg = err.to_string();
    let want = format!(
        "etcd shows 1 member(s) and no valid leader in cluster {} where the last view the guard accepted had 4 (3 gone at once",
        q(&ws.scope)
    );
    assert!(msg.contains(&want) && msg.contains("--force"), "{msg}");
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn shrink_from_3_to_2_members_is_accepted() {
    let ws = Ws::new("shrink32");
    let (rt, mut engine) = engine_after_first_pass(&ws);
    let pgb_before = file_state(&ws.pgb);
    ws.delete("members/pg3");
    let snap = fetch(&rt, &engine);
    let out = rt.block_on(engine.pass(&snap, true)).unwrap();
    assert_eq!(out.written, ["haproxy"]);
    assert_eq!(out.reloaded, ["haproxy"]);
    let cfg = read(&ws.hap);
    assert!(!cfg.contains("server pg3 "), "{cfg}");
    assert_eq!(
        cfg.matches("server pg2 127.0.0.1:5442 ").count(),
        2,
        "{cfg}"
    );
    assert_file_unchanged(&ws.pgb, &pgb_before);
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_not_signalled(&ws.pgb_sleep);
}

/// Three of four members deleted in one etcd revision (a range delete; a lease expiring deletes
/// a crashed node's `leader` and `members/<name>` the same way). Guards the watch applying every
/// event of a revision: it once applied only the first, and rendered a 3-member view etcd never
/// held instead of refusing the shrink.
#[test]
fn daemon_refuses_a_4_to_1_shrink_and_keeps_the_files() {
    let ws = Ws::with_members("shrinkdaemon", &["rm1", "rm2", "rm3", "pg4"]);
    let before = ws.files();
    let daemon = ws.start_debug_run();
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .log()
            .contains("pass: nothing changed")),
        "the daemon's first pass did not finish:\n{}",
        daemon.log()
    );
    // One etcd request, one revision: three of four members gone at once, the leader among them.
    assert_eq!(Etcd::shared().delete_prefix(&ws.key("members/rm")), 3);
    // The message quotes the scope; inside a JSON log line those quotes are escaped.
    let want = format!(
        "etcd shows 1 member(s) and no valid leader in cluster \\\"{}\\\" where the last view the guard accepted had 4 (3 gone at once",
        ws.scope
    );
    let settled = wait_until(Duration::from_secs(10), || {
        let log = daemon.log();
        log.contains(&want) || log.contains("pass applied")
    });
    let log = daemon.log();
    assert!(
        log.contains(&want) && !log.contains("pass applied"),
        "the daemon did not refuse the shrink (settled: {settled}); it rendered:\n{}\netcd holds: {:?}\nlog:\n{log}",
        read(&ws.hap),
        Etcd::shared()
            .get_prefix(&ws.key("members/"))
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
    daemon.kill();
}

#[test]
fn once_force_overrides_the_guard() {
    let mut ws = Ws::new("guardforce");
    ws.reconfigure(|c| c.guard = "min_members = 3".into());
    let before = ws.files();
    ws.delete("members/pg3");
    let refused = format!("etcd shows 2 valid member(s) in cluster {}", q(&ws.scope));
    ws.once(&[]).expect(
        4,
        &[&refused, "fewer than guard.min_members = 3", "--force"],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();

    let run = ws.once(&["--force"]);
    run.expect(0, &[]);
    assert!(run.logged("applied"), "{}", run.stderr);
    let cfg = read(&ws.hap);
    assert!(!cfg.contains("server pg3 "), "{cfg}");
    assert_eq!(
        cfg.matches("server pg2 127.0.0.1:5442 ").count(),
        2,
        "{cfg}"
    );
    assert_file_unchanged(&ws.pgb, &before[1]);
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_not_signalled(&ws.pgb_sleep);
}

// ---------------------------------------------------------------------------------------------
// Least privilege: haconfd as `postgres`
// ---------------------------------------------------------------------------------------------

/// A config with one pgbouncer target (shipped template) writing `dest`, reloading by `reload`.
fn pgbouncer_only_config(scope: &str, dest: &Path, reload: &str, vars: &str) -> String {
    ConfigBuilder::new()
        .endpoint(Etcd::shared().endpoint())
        .scope(scope)
        .daemon("once_timeout", "5s")
        .template(
            Template::new("pgbouncer", shipped("pgbouncer.ini.tera"), dest)
                .require_leader(true)
                .set("reload", Raw(reload.to_string()))
                .set("vars", Raw(format!("{{ {vars} }}"))),
        )
        .to_toml()
}

fn put_two_member_cluster(scope: &str) {
    let e = Etcd::shared();
    e.put(
        &format!("/service/{scope}/members/pg1"),
        &member(5441, "master").to_string(),
    );
    e.put(
        &format!("/service/{scope}/members/pg2"),
        &member(5442, "replica").to_string(),
    );
    e.put(&format!("/service/{scope}/leader"), "pg1");
}

#[test]
fn runs_as_a_non_root_user_and_reloads_a_process_of_that_user() {
    require_root();
    let (pg_uid, pg_gid) = postgres_ids();
    let ini = PgbouncerIni::new("* = host=127.0.0.1 port=5999");
    std::fs::set_permissions(&ini.path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let pgb = Pgbouncer::start(&ini.path);
    let scope = unique_name("nonroot");
    put_two_member_cluster(&scope);
    let vars = format!(
        "listen_addr = \"127.0.0.1\", listen_port = {}, unix_socket_dir = {}, auth_type = \"trust\", \
         auth_file = {}, admin_users = \"pgbouncer\", pidfile = {}, logfile = {}",
        ini.port,
        q(ini.dir()),
        q(&ini.auth_file),
        q(&ini.pidfile),
        q(&ini.logfile)
    );
    let cfg = ini.dir().join("haconfd.toml");
    std::fs::write(
        &cfg,
        pgbouncer_only_config(
            &scope,
            &ini.path,
            &signal_reload(&pgb.pidfile(), "SIGHUP", "pgbouncer"),
            &vars,
        ),
    )
    .unwrap();
    give_to_postgres(ini.dir());
    let before = file_state(&ini.path);
    assert_eq!((before.uid, before.mode), (pg_uid, 0o640));

    let run = haconfd(&cfg, &["once"], Some((pg_uid, pg_gid)));
    run.expect(0, &[]);
    assert!(run.logged("applied"), "{}", run.stderr);
    let text = read(&ini.path);
    assert!(text.contains("* = host=127.0.0.1 port=5441"), "{text}");
    let after = file_state(&ini.path);
    assert_ne!(after.ino, before.ino, "the file was swapped in");
    assert_eq!(
        (after.uid, after.mode),
        (pg_uid, 0o640),
        "owner and mode are kept"
    );
    assert!(
        wait_until(Duration::from_secs(5), || pgb
            .log()
            .contains("got SIGHUP, re-reading config")),
        "PgBouncer did not get its SIGHUP:\n{}",
        pgb.log()
    );
    assert!(pgb.proc().is_running(), "{}", pgb.log());
    pgb.try_admin_query("SHOW VERSION")
        .unwrap_or_else(|e| panic!("PgBouncer stopped answering after the reload: {e}"));
}

#[test]
fn non_root_pidfile_naming_a_root_process_exits_8_with_eperm() {
    require_root();
    let (pg_uid, pg_gid) = postgres_ids();
    let root_sleep = sentinel("sleep (root-owned)");
    let dir = temp_dir("eperm");
    let dest = dir.path().join("pgbouncer.ini");
    std::fs::write(&dest, "; old\n").unwrap();
    let pidfile = dir.path().join("pgbouncer.pid");
    std::fs::write(&pidfile, format!("{}\n", root_sleep.pid())).unwrap();
    let scope = unique_name("eperm");
    put_two_member_cluster(&scope);
    let cfg = dir.path().join("haconfd.toml");
    std::fs::write(
        &cfg,
        pgbouncer_only_config(
            &scope,
            &dest,
            &signal_reload(&pidfile, "SIGHUP", "sleep"),
            "listen_port = 16432",
        ),
    )
    .unwrap();
    give_to_postgres(dir.path());

    let run = haconfd(&cfg, &["once"], Some((pg_uid, pg_gid)));
    let who = format!("cannot send SIGHUP to PID {}", root_sleep.pid());
    run.expect(
        8,
        &[
            "pgbouncer: file updated but reload failed",
            &who,
            "EPERM",
            "Operation not permitted",
        ],
    );
    assert!(read(&dest).contains("host=127.0.0.1 port=5441"));
    assert_not_signalled(&root_sleep);
}
