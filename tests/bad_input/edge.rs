//! The edges of haconfd's reach: a flood of idle HTTP connections under a low open-file limit,
//! what the HTTP endpoint shows and refuses, a scope larger than gRPC's default message limit,
//! and etcd refusing the credentials or the permission (the real cause, at once).

use super::*;

use std::io::Read as _;
use std::net::TcpStream;
use std::sync::OnceLock;

/// Reloads that succeed and signal nothing: these tests watch renders, not reloads.
const NOOP_RELOAD: &str = r#"{ command = ["true"] }"#;

/// `haconfd run` on `cfg` with JSON logs in `log`, its open-file limit (soft and hard) set to
/// `nofile` when given, so that raising the soft limit cannot help.
fn start_run(cfg: &Path, log: &Path, nofile: Option<u64>, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(haconfd_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HACONFD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.arg("-c").arg(cfg).args(["--log-format", "json", "run"]);
    if let Some(n) = nofile {
        // SAFETY: setrlimit is a plain syscall, async-signal-safe between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                    .map_err(std::io::Error::from)
            });
        }
    }
    Proc::spawn_logged("haconfd run", cmd, log)
}

/// The `[http]` table, placed through `daemon_extra` (it ends the `[daemon]` table).
fn http_listen(port: u16) -> String {
    format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// CPU time (user + system) of `pid` so far, from /proc/<pid>/stat.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// Open descriptors of `pid`.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// HTTP endpoint: exhaustion and exposure
// ---------------------------------------------------------------------------------------------

#[test]
fn http_connection_flood_cannot_starve_healthz_renders_or_cpu() {
    let mut ws = Ws::new("flood");
    let port = free_port();
    ws.reconfigure(|c| {
        c.daemon_extra = http_listen(port);
        c.hap_reload = NOOP_RELOAD.into();
        c.pgb_reload = NOOP_RELOAD.into();
    });
    let d = start_run(&ws.cfg_path, &ws.path("run.log"), Some(256), &[]);
    assert!(
        wait_until(Duration::from_secs(10), || http_get(port, "/readyz")
            .is_some_and(|(c, _)| c == 200)),
        "not ready:\n{}",
        d.log()
    );

    // More idle connections than the whole open-file limit; they send nothing.
    let idle: Vec<TcpStream> = (0..400)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| {
                panic!(
                    "connection {i} failed ({e}): haconfd stopped accepting\n{}",
                    d.log()
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let t = Instant::now();
    let health = http_request(port, "GET", "/healthz", Duration::from_secs(3));
    let took = t.elapsed();
    assert_eq!(
        health.as_ref().map(|(c, _)| *c),
        Some(200),
        "/healthz did not answer with 400 idle connections open (after {took:?}); fds open: {}\n{}",
        open_fds(d.pid()),
        d.log()
    );
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
    assert!(
        open_fds(d.pid()) < 160,
        "the endpoint holds {} of haconfd's 256 descriptors",
        open_fds(d.pid())
    );

    let before = cpu_time(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(d.pid()) - before;
    assert!(
        used < Duration::from_millis(300),
        "haconfd used {used:?} of CPU in 2 s with idle connections open"
    );

    // The pipeline still has descriptors: a member change reaches the rendered file.
    ws.add_valid_member();
    assert!(
        wait_until(Duration::from_secs(10), || read(&ws.hap)
            .contains("server pg4 127.0.0.1:5444 ")),
        "pg4 never reached haproxy.cfg:\n{}\n{}",
        read(&ws.hap),
        d.log()
    );
    assert!(
        !d.log().contains("Too many open files"),
        "haconfd ran out of descriptors:\n{}",
        d.log()
    );
    drop(idle);
}

#[test]
fn http_slow_client_is_cut_off_after_the_header_timeout() {
    let mut ws = Ws::new("slowloris");
    let port = free_port();
    ws.reconfigure(|c| {
        c.daemon_extra = http_listen(port);
        c.hap_reload = NOOP_RELOAD.into();
        c.pgb_reload = NOOP_RELOAD.into();
    });
    let d = start_run(&ws.cfg_path, &ws.path("run.log"), None, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || port_open(port)),
        "{}",
        d.log()
    );
    // Half a request line, then nothing: the server must close the connection by itself.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /status HT").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "a client that never finishes its headers kept its connection for {took:?}"
    );
}

/// One etcd with authentication on (users `root`, `haconfd` reading `/service/`, `stranger`
/// reading `/elsewhere/` only), shared by this module's auth tests.
struct AuthEtcd {
    etcd: Etcd,
}

impl AuthEtcd {
    fn get() -> &'static AuthEtcd {
        static E: OnceLock<AuthEtcd> = OnceLock::new();
        E.get_or_init(|| {
            let etcd = Etcd::start();
            remove_at_exit(&etcd.data_dir());
            let a = AuthEtcd { etcd };
            a.ctl(&["user", "add", "root:rootpw"]);
            a.ctl(&["user", "add", "haconfd:s3cret-etcd-pw"]);
            a.ctl(&["user", "add", "stranger:stranger-pw"]);
            a.ctl(&["role", "add", "reader"]);
            a.ctl(&[
                "role",
                "grant-permission",
                "reader",
                "--prefix=true",
                "read",
                "/service/",
            ]);
            a.ctl(&["role", "add", "elsewhere"]);
            a.ctl(&[
                "role",
                "grant-permission",
                "elsewhere",
                "--prefix=true",
                "read",
                "/elsewhere/",
            ]);
            a.ctl(&["user", "grant-role", "haconfd", "reader"]);
            a.ctl(&["user", "grant-role", "stranger", "elsewhere"]);
            a.ctl(&["auth", "enable"]);
            a
        })
    }

    fn ctl(&self, args: &[&str]) {
        let out = Command::new(require_bin("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.etcd.endpoint()))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    }

    fn put(&self, key: &str, value: &str) {
        self.ctl(&["--user=root:rootpw", "put", key, value]);
    }

    /// A scope holding pg1 (leader, its conn_url carrying credentials) and pg2.
    fn scope(&self, tag: &str) -> String {
        let scope = unique_name(tag);
        let mut m1 = member(5441, "master");
        m1["conn_url"] = "postgres://admin:pw-in-conn-url@127.0.0.1:5441/postgres".into();
        self.put(&format!("/service/{scope}/members/pg1"), &m1.to_string());
        self.put(
            &format!("/service/{scope}/members/pg2"),
            &member(5442, "replica").to_string(),
        );
        self.put(&format!("/service/{scope}/leader"), "pg1");
        scope
    }
}

/// A workspace pointed at the auth etcd, on a fresh scope there, as `user` (none: no
/// credentials), without reloads. Its files are not written yet.
fn auth_ws(tag: &str, user: Option<&str>, extra: &str) -> (Ws, String) {
    let mut ws = Ws::new(tag);
    std::fs::remove_file(&ws.hap).unwrap();
    std::fs::remove_file(&ws.pgb).unwrap();
    let a = AuthEtcd::get();
    let scope = a.scope(tag);
    ws.reconfigure(|c| {
        c.endpoint = a.etcd.endpoint();
        c.scope = scope.clone();
        c.username = user.map(String::from);
        c.hap_reload = NOOP_RELOAD.into();
        c.pgb_reload = NOOP_RELOAD.into();
        c.daemon_extra = extra.into();
    });
    (ws, scope)
}

fn with_password(ws: &Ws, args: &[&str], password: &str) -> Run {
    let env: &[(&str, &str)] = if password.is_empty() {
        &[]
    } else {
        &[("HACONFD_ETCD_PASSWORD", password)]
    };
    haconfd_with_env(&ws.cfg_path, args, None, env)
}

#[test]
fn http_endpoint_is_read_only_and_never_shows_credentials() {
    let port = free_port();
    let (ws, _) = auth_ws("exposure", Some("haconfd"), &http_listen(port));
    let d = start_run(
        &ws.cfg_path,
        &ws.path("run.log"),
        None,
        &[("HACONFD_ETCD_PASSWORD", "s3cret-etcd-pw")],
    );
    assert!(
        wait_until(Duration::from_secs(10), || http_get(port, "/readyz")
            .is_some_and(|(c, _)| c == 200)),
        "not ready:\n{}",
        d.log()
    );
    let mut seen = String::new();
    for path in ["/healthz", "/readyz", "/metrics", "/status", "/nothing"] {
        let (_, body) = http_get(port, path).unwrap_or_else(|| panic!("GET {path}"));
        seen.push_str(&body);
        for secret in ["s3cret-etcd-pw", "pw-in-conn-url", "admin:"] {
            assert!(
                !body.contains(secret),
                "GET {path} shows {secret:?}:\n{body}"
            );
        }
    }
    // What it does show, as documented: member names, hosts and ports.
    assert!(seen.contains("\"pg1\"") && seen.contains("5441"), "{seen}");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/status", "/healthz", "/metrics"] {
            let r = http_request(port, method, path, Duration::from_secs(2));
            assert_eq!(
                r.as_ref().map(|(c, _)| *c),
                Some(405),
                "{method} {path}: {r:?}"
            );
        }
    }
    let head = http_request(port, "HEAD", "/healthz", Duration::from_secs(2));
    assert_eq!(head.map(|(c, _)| c), Some(200));
    assert!(!d.log().contains("s3cret-etcd-pw"), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// etcd refusing access: the real cause, at once
// ---------------------------------------------------------------------------------------------

/// `once`, `check` and `render` each exit 3 well before `once_timeout` (5 s), naming every
/// needle.
fn assert_refused_in_every_one_shot_mode(ws: &Ws, password: &str, needles: &[&str]) {
    for mode in [&["once", "--no-reload"][..], &["check"], &["render"]] {
        let run = with_password(ws, mode, password);
        run.expect(3, needles);
        assert!(
            !run.reason().contains("did not answer"),
            "{}: the reason hides the cause behind a timeout:\n{}",
            run.what,
            run.reason()
        );
        assert!(
            run.elapsed < Duration::from_secs(3),
            "{}: took {:?}; a refusal is final and needs no retries",
            run.what,
            run.elapsed
        );
    }
    assert!(
        !ws.hap.exists() && !ws.pgb.exists(),
        "a refused read wrote files"
    );
}

#[test]
fn wrong_etcd_password_is_reported_as_refused_credentials_at_once() {
    let (ws, _) = auth_ws("badpw", Some("haconfd"), "");
    assert_refused_in_every_one_shot_mode(
        &ws,
        "wrong",
        &[
            "refused the credentials of user \"haconfd\"",
            "authentication failed",
        ],
    );
}

#[test]
fn missing_etcd_credentials_are_reported_as_refused_at_once() {
    let (ws, scope) = auth_ws("nocreds", None, "");
    assert_refused_in_every_one_shot_mode(
        &ws,
        "",
        &[
            &format!("refused reading /service/{scope}/ without credentials"),
            "set etcd.username",
        ],
    );
}

#[test]
fn etcd_permission_denied_is_reported_naming_the_prefix_at_once() {
    let (ws, scope) = auth_ws("denied", Some("stranger"), "");
    assert_refused_in_every_one_shot_mode(
        &ws,
        "stranger-pw",
        &[
            &format!("refused reading /service/{scope}/ to user \"stranger\""),
            "permission denied",
            "grant-permission",
        ],
    );
}

#[test]
fn run_with_a_wrong_etcd_password_says_so_in_its_log_and_readyz() {
    let port = free_port();
    let (ws, _) = auth_ws("runbadpw", Some("haconfd"), &http_listen(port));
    let d = start_run(
        &ws.cfg_path,
        &ws.path("run.log"),
        None,
        &[("HACONFD_ETCD_PASSWORD", "wrong")],
    );
    let mut body = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            body = http_get(port, "/readyz")
                .map(|(_, b)| b)
                .unwrap_or_default();
            body.contains("authentication failed")
        }),
        "/readyz does not say why: {body:?}\n{}",
        d.log()
    );
    assert!(
        body.contains("refused the credentials of user \"haconfd\""),
        "{body}"
    );
    let logged = d.log().lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            v["level"] == "ERROR"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("authentication failed"))
        })
    });
    assert!(logged, "no ERROR line naming the cause:\n{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// A scope beyond gRPC's default 4 MiB message
// ---------------------------------------------------------------------------------------------

#[test]
fn scope_larger_than_4_mib_is_listed_by_once_and_run() {
    let mut ws = Ws::new("huge");
    // 40 members with 110 KiB of tags each (440 custom tags of 250 characters, the most a tag
    // value may hold): about 4.4 MiB in one list answer.
    let tags: serde_json::Map<String, serde_json::Value> = (0..440)
        .map(|t| (format!("t{t:03}"), "x".repeat(250).into()))
        .collect();
    for i in 0..40 {
        let mut m = member(6000 + i, "replica");
        m["tags"] = tags.clone().into();
        ws.put(&format!("members/big{i:02}"), &m.to_string());
    }
    let run = ws.once(&["--no-reload"]);
    run.expect(0, &[]);
    let text = read(&ws.hap);
    assert!(
        text.contains("server big00 127.0.0.1:6000 ")
            && text.contains("server big39 127.0.0.1:6039 "),
        "{text}\n{}",
        run.stderr.chars().take(3000).collect::<String>()
    );

    // `run` lists it too, gets ready, and follows a change.
    std::fs::remove_file(&ws.hap).unwrap();
    let port = free_port();
    ws.reconfigure(|c| {
        c.daemon_extra = http_listen(port);
        c.hap_reload = NOOP_RELOAD.into();
        c.pgb_reload = NOOP_RELOAD.into();
    });
    let d = start_run(&ws.cfg_path, &ws.path("run.log"), None, &[]);
    assert!(
        wait_until(Duration::from_secs(15), || http_get(port, "/readyz")
            .is_some_and(|(c, _)| c == 200)),
        "run never got ready with a 4.4 MiB scope:\n{}",
        d.log()
    );
    assert!(read(&ws.hap).contains("server big39 127.0.0.1:6039 "));
    ws.add_valid_member();
    assert!(
        wait_until(Duration::from_secs(10), || read(&ws.hap)
            .contains("server pg4 127.0.0.1:5444 ")),
        "{}",
        d.log()
    );
}

// ---------------------------------------------------------------------------------------------
// The shipped container configs
// ---------------------------------------------------------------------------------------------

#[test]
fn shipped_container_checks_keep_haproxys_reason() {
    // `haproxy -c -q` in HAProxy 2.6 prints nothing on failure: the check then fails with "exit
    // status: 1" and no reason at all.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for rel in ["docker/haconfd.toml", "docker/k8s/haconfd-sidecar.yaml"] {
        let text = read(&root.join(rel));
        let checks: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("check ="))
            .collect();
        assert!(!checks.is_empty(), "{rel}: no check line");
        for l in checks {
            assert!(
                l.contains("\"haproxy\", \"-c\"") && !l.contains("\"-q\""),
                "{rel}: {l}"
            );
        }
    }
}

/// Something left a FIFO where pgbouncer.ini should be: reading it to compare would block the
/// pass for good (and, with it, every later change). It is refused at once, naming the file.
#[test]
fn a_fifo_at_a_destination_is_refused_at_once_instead_of_blocking_the_pass() {
    let ws = Ws::new("fifo");
    std::fs::remove_file(&ws.pgb).unwrap();
    nix::unistd::mkfifo(&ws.pgb, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    ws.add_valid_member();
    let t0 = Instant::now();
    ws.once(&["--no-reload"])
        .expect(7, &["pgbouncer.ini", "a FIFO, not a regular file"]);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The other consumer still followed the change.
    assert!(read(&ws.hap).contains("server pg4 "), "{}", read(&ws.hap));
}
