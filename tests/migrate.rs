//! Migrating from confd, as docs/MIGRATING-FROM-CONFD.md walks a confd user through it: the
//! shipped templates with the guide's Patroni values against Patroni's recipe (golden files and
//! the exact list of differences), the messages a confd setup carried over too literally meets
//! (one test each), `run` bringing a HAProxy onto the file `once --no-reload` wrote (real
//! HAProxy), and every command of the guide's steps run as written against a real etcd holding a
//! Patroni dump and a real HAProxy running confd's file.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::docs::{doc_files, doc_steps};
use common::procs::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn guide() -> String {
    read(&root().join("docs/MIGRATING-FROM-CONFD.md"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// `haconfd -c cfg args...` with a clean environment plus `env`.
fn haconfd(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(haconfd_bin());
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .envs(env.iter().copied())
        .arg("-c")
        .arg(cfg)
        .args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("run haconfd")
}

fn outputs(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The guide's files written into `dir`, the shipped templates' install path pointed at this
/// tree's `templates/`.
fn write_guide_files(dir: &Path) {
    let shipped = root().join("templates").display().to_string();
    for (name, body) in doc_files(&guide()) {
        let p = dir.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body.replace("/usr/share/haconfd/templates", &shipped)).unwrap();
    }
}

/// `render --template name` of the dump `snap` (scope `demo`) with `cfg`.
fn render(cfg: &Path, snap: &Path, name: &str) -> String {
    let out = haconfd(
        cfg,
        &[
            "--scope",
            "demo",
            "render",
            "--snapshot",
            snap.to_str().unwrap(),
            "--template",
            name,
        ],
        &[],
    );
    let (stdout, stderr) = outputs(&out);
    assert!(
        out.status.success(),
        "render {name} with {}: {stderr}",
        cfg.display()
    );
    stdout
}

// ---------------------------------------------------------------------------------------------
// What differs from Patroni's recipe
// ---------------------------------------------------------------------------------------------

/// A file's settings as sets of `section: directive` lines, whitespace collapsed, comments out.
fn settings(text: &str, comment: char) -> Vec<String> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if t.is_empty() || t.starts_with(comment) || t.starts_with('#') {
            continue;
        }
        let top = !line.starts_with(char::is_whitespace);
        if top && (t.starts_with('[') || comment == '#') {
            section = t;
            continue;
        }
        out.push(format!("{section}: {t}"));
    }
    out.sort();
    out
}

/// What `ours` has that `recipe` lacks, and the reverse.
fn differences(recipe: &[String], ours: &[String]) -> (Vec<String>, Vec<String>) {
    let added = ours
        .iter()
        .filter(|l| !recipe.contains(l))
        .cloned()
        .collect();
    let removed = recipe
        .iter()
        .filter(|l| !ours.contains(l))
        .cloned()
        .collect();
    (added, removed)
}

/// The differences the guide lists for the shipped templates with Patroni's values: added lines
/// (by their directive), and the recipe's `default-server` lines that gain `init-addr`.
fn unexplained(recipe: &str, ours: &str, comment: char) -> Vec<String> {
    const LISTED: &[&str] = &[
        "global: stats socket ",
        "global: stats timeout ",
        "global: server-state-file ",
        "defaults: load-server-state-from-file ",
        "ignore_startup_parameters = ",
        "server_login_retry = ",
        "server_reset_query = ",
    ];
    let (added, removed) = differences(&settings(recipe, comment), &settings(ours, comment));
    let init_addr = " init-addr last,libc,none";
    let mut left: Vec<String> = added
        .into_iter()
        .filter(|a| !LISTED.iter().any(|l| a.contains(l)))
        .filter(|a| {
            !a.strip_suffix(init_addr)
                .is_some_and(|r| removed.iter().any(|x| x == r))
        })
        .map(|a| format!("added: {a}"))
        .collect();
    left.extend(
        removed
            .into_iter()
            .filter(|r| !LISTED.iter().any(|l| r.contains(l)))
            .filter(|r| !settings(ours, comment).contains(&format!("{r}{init_addr}")))
            .map(|r| format!("missing: {r}")),
    );
    left
}

#[test]
fn shipped_templates_with_the_guides_patroni_values_match_patronis_recipe() {
    let dir = temp_dir("migrate-recipe");
    write_guide_files(dir.path());
    let recipe_cfg = dir.path().join("haconfd.toml");
    let shipped_cfg = dir.path().join("shipped/haconfd.toml");
    let table = guide();
    for directive in [
        "stats socket",
        "stats timeout",
        "server-state-file",
        "load-server-state-from-file",
        "init-addr last,libc,none",
        "ignore_startup_parameters",
        "server_login_retry",
        "server_reset_query",
    ] {
        assert!(
            table.contains(&format!("| `{directive}"))
                || table.contains(&format!("`, `{directive}")),
            "the guide's table of differences does not list `{directive}`"
        );
    }
    for (fixture_name, tag) in [
        ("patroni3-kv.json", "patroni3"),
        ("patroni4-kv.json", "patroni4"),
    ] {
        for (name, file, comment) in [
            ("haproxy", "haproxy.cfg", '#'),
            ("pgbouncer", "pgbouncer.ini", ';'),
        ] {
            let ours = render(&shipped_cfg, &fixture(fixture_name), name);
            let recipe = render(&recipe_cfg, &fixture(fixture_name), name);
            let left = unexplained(&recipe, &ours, comment);
            assert!(
                left.is_empty(),
                "{tag} {file}: differences from Patroni's recipe the guide does not list: {left:#?}\n--- ours:\n{ours}"
            );
            let golden = root().join(format!("tests/golden/{tag}-recipe-{file}"));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&golden, &ours).unwrap();
            }
            assert_eq!(
                ours,
                read(&golden),
                "{tag} {file} differs from {}",
                golden.display()
            );
            if name == "haproxy" {
                let staged = dir.path().join(format!("{tag}.cfg"));
                let state = dir.path().join("state").display().to_string();
                std::fs::write(
                    &staged,
                    ours.replace("/var/lib/haproxy/server-state", &state),
                )
                .unwrap();
                let (ok, out) = Haproxy::check_config(&staged);
                assert!(ok, "haproxy -c refuses the {tag} file:\n{out}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages a confd setup meets
// ---------------------------------------------------------------------------------------------

/// A config in `dir` with the shipped HAProxy template, `extra` added to its target, and
/// `head` before it.
fn shipped_haproxy_config(dir: &Path, head: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("haconfd.toml");
    let text = format!(
        "{head}\n[etcd]\nnamespace = \"/service\"\nscope = \"demo\"\n\n[[template]]\nname = \"haproxy\"\n\
         src = {src:?}\ndest = {dest:?}\ncheck = [\"haproxy\", \"-c\", \"-f\", \"{{{{staged}}}}\"]\n{extra}\n",
        src = root().join("templates/haproxy.cfg.tera"),
        dest = dir.join("haproxy.cfg"),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn expect(out: &Output, code: i32, has: &[&str], lacks: &[&str]) -> String {
    let (stdout, stderr) = outputs(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for h in has {
        assert!(stderr.contains(h), "stderr lacks {h:?}:\n{stderr}");
    }
    for l in lacks {
        assert!(!stderr.contains(l), "stderr has {l:?}:\n{stderr}");
    }
    stdout
}

fn snapshot_args(extra: &[&'static str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.extend([
        "--snapshot".into(),
        fixture("patroni3-kv.json").display().to_string(),
    ]);
    v
}

fn run_args(cfg: &Path, args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    haconfd(cfg, &a, &[])
}

#[test]
fn render_of_a_wrong_scope_is_refused_naming_the_scopes_of_the_dump() {
    let dir = temp_dir("migrate-scope");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let out = run_args(&cfg, &snapshot_args(&["--scope", "demx", "render"]));
    let stdout = expect(
        &out,
        4,
        &[
            "no key under /service/demx/",
            "Under /service/: \"demo\"",
            "Did you mean scope = \"demo\"",
        ],
        &["--force"],
    );
    assert!(stdout.is_empty(), "a refused view was printed:\n{stdout}");
    // Forced, it prints the zero-server file it would have refused, and says so.
    let out = run_args(
        &cfg,
        &snapshot_args(&["--scope", "demx", "render", "--force"]),
    );
    let stdout = expect(&out, 0, &["warning: no key under /service/demx/"], &[]);
    assert!(
        stdout.contains("listen primary") && !stdout.contains("    server "),
        "{stdout}"
    );
}

#[test]
fn confd_prefix_pasted_into_namespace_is_split_into_namespace_and_scope() {
    let dir = temp_dir("migrate-prefix");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let out = run_args(
        &cfg,
        &snapshot_args(&["--namespace", "/service/demo", "render"]),
    );
    expect(
        &out,
        4,
        &[
            "confd's whole -prefix",
            "namespace = \"/service\" and scope = \"demo\"",
        ],
        &["--force"],
    );
}

#[test]
fn once_with_a_wrong_scope_lists_the_scopes_of_both_etcd_apis_and_never_suggests_force() {
    let etcd = Etcd::start_v2();
    let ns = format!("/{}", unique_name("mig"));
    let member = |port: u16| {
        serde_json::json!({
            "conn_url": format!("postgres://127.0.0.1:{port}/postgres"),
            "api_url": format!("http://127.0.0.1:{}/patroni", port + 1000),
            "state": "running", "role": "master", "version": "3.0.2"
        })
        .to_string()
    };
    etcd.put(&format!("{ns}/alpha/leader"), "pg1");
    etcd.put(&format!("{ns}/alpha/members/pg1"), &member(5441));
    etcd.v2_put(&format!("{ns}/beta/leader"), "pg1");
    etcd.v2_put(&format!("{ns}/beta/members/pg1"), &member(5451));
    let dir = temp_dir("migrate-once-scope");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let env = [
        ("HACONFD_ETCD_ENDPOINTS", etcd.endpoint()),
        ("HACONFD_NAMESPACE", ns.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = haconfd(&cfg, &["--scope", "alpah", "once"], &env);
    expect(
        &out,
        4,
        &[
            &format!("no key under {ns}/alpah/"),
            "\"alpha\" (etcd v3 store)",
            "\"beta\" (etcd v2 store)",
            "Did you mean scope = \"alpha\" (--scope alpha)?",
        ],
        &["--force"],
    );
    assert!(
        !dir.path().join("haproxy.cfg").exists(),
        "a file was written for an empty scope"
    );
    let out = haconfd(&cfg, &["--scope", "beta", "once"], &env);
    expect(
        &out,
        4,
        &["Did you mean scope = \"beta\" (--scope beta) with etcd.api = \"v2\""],
        &["--force"],
    );
}

/// `run` on a scope with no key keeps waiting for one (Patroni may not have started yet), and
/// says once which scopes exist and which it likely meant, as `once` does.
#[test]
fn run_with_a_wrong_scope_logs_the_scopes_that_exist_and_the_likely_one() {
    let etcd = Etcd::start();
    let ns = format!("/{}", unique_name("mig"));
    etcd.put(&format!("{ns}/alpha/leader"), "pg1");
    let dir = temp_dir("migrate-run-scope");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let mut cmd = Command::new(haconfd_bin());
    cmd.env("HACONFD_ETCD_ENDPOINTS", etcd.endpoint())
        .env("HACONFD_NAMESPACE", &ns)
        .arg("-c")
        .arg(&cfg)
        .args(["--scope", "alpah", "run"]);
    let daemon = Proc::spawn_logged("haconfd run", cmd, &dir.path().join("run.log"));
    let said = wait_until(Duration::from_secs(15), || {
        daemon
            .log()
            .contains("Did you mean scope = \"alpha\" (--scope alpha)?")
    });
    assert!(said, "no likely scope named; log:\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains(&format!("no key under {ns}/alpah/")), "{log}");
    assert!(daemon.is_running(), "run gave up on an empty scope:\n{log}");
}

#[test]
fn render_of_a_view_the_guard_refuses_exits_4_unless_forced() {
    let dir = temp_dir("migrate-guard");
    let cfg = shipped_haproxy_config(dir.path(), "[guard]\nmin_members = 4\n", "");
    let out = run_args(&cfg, &snapshot_args(&["render"]));
    let stdout = expect(
        &out,
        4,
        &["the guard would refuse this view", "guard.min_members = 4"],
        &[],
    );
    assert!(stdout.is_empty(), "{stdout}");
    let out = run_args(&cfg, &snapshot_args(&["render", "--force"]));
    let stdout = expect(&out, 0, &["warning: the guard would refuse this view"], &[]);
    assert!(stdout.contains("server pg1 "), "{stdout}");
}

#[test]
fn check_refuses_a_destination_whose_directory_does_not_exist() {
    let dir = temp_dir("migrate-dest");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let text = read(&cfg).replace(
        &format!("dest = {:?}", dir.path().join("haproxy.cfg")),
        &format!("dest = {:?}", dir.path().join("missing/haproxy.cfg")),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = run_args(&cfg, &snapshot_args(&["check"]));
    let missing = dir.path().join("missing").display().to_string();
    expect(
        &out,
        7,
        &[
            "template \"haproxy\": dest ",
            &format!("the directory {missing} does not exist"),
        ],
        &[],
    );
}

#[test]
fn check_refuses_a_stats_socket_the_rendered_file_does_not_declare() {
    let dir = temp_dir("migrate-socket");
    let sock = dir.path().join("admin.sock");
    let state = dir.path().join("state");
    let server_state = format!("server_state = {{ stats_socket = {sock:?}, file = {state:?} }}");
    let vars = "[vars]\nstats_socket = \"/run/haproxy/admin.sock\"\n";
    let cfg = shipped_haproxy_config(dir.path(), vars, &server_state);
    let out = run_args(&cfg, &snapshot_args(&["check"]));
    expect(
        &out,
        2,
        &[
            &format!("server_state.stats_socket is {}", sock.display()),
            "declares `stats socket /run/haproxy/admin.sock`",
        ],
        &[],
    );
    // Without [vars] stats_socket the template declares server_state's socket.
    let cfg = shipped_haproxy_config(dir.path(), "", &server_state);
    let out = run_args(&cfg, &snapshot_args(&["check"]));
    expect(&out, 0, &[], &["server_state.stats_socket is"]);
    let out = run_args(&cfg, &snapshot_args(&["render"]));
    let stdout = expect(&out, 0, &[], &[]);
    assert!(
        stdout.contains(&format!(
            "stats socket {} mode 660 level admin",
            sock.display()
        )),
        "{stdout}"
    );
}

#[test]
fn a_single_bracket_template_table_names_the_double_brackets() {
    let dir = temp_dir("migrate-table");
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    std::fs::write(&cfg, read(&cfg).replace("[[template]]", "[template]")).unwrap();
    let out = run_args(&cfg, &snapshot_args(&["check"]));
    expect(
        &out,
        2,
        &[
            "expected a sequence",
            "hint: write `[[template]]` (two brackets)",
        ],
        &[],
    );
}

#[test]
fn confd_prefix_and_keys_in_a_template_point_at_namespace_and_scope() {
    let dir = temp_dir("migrate-keys");
    for (line, hint) in [
        (
            "prefix = \"/service/demo\"",
            "namespace = \"/service\", scope = \"batman\"",
        ),
        (
            "keys = [\"/members/\", \"/leader\"]",
            "set `[etcd] namespace` and `scope`",
        ),
    ] {
        let cfg = shipped_haproxy_config(dir.path(), "", line);
        let out = run_args(&cfg, &snapshot_args(&["check"]));
        expect(
            &out,
            2,
            &["unknown field", hint, "MIGRATING-FROM-CONFD.md"],
            &[],
        );
    }
}

/// `render` with a config like [`shipped_haproxy_config`] whose HAProxy target renders `body`,
/// written to `file`, instead of the shipped template.
fn render_own_template(tag: &str, file: &str, body: &str) -> Output {
    let dir = temp_dir(tag);
    let tmpl = dir.path().join(file);
    std::fs::write(&tmpl, body).unwrap();
    let cfg = shipped_haproxy_config(dir.path(), "", "");
    let text = read(&cfg).replace(
        &format!("src = {:?}", root().join("templates/haproxy.cfg.tera")),
        &format!("src = {tmpl:?}"),
    );
    std::fs::write(&cfg, text).unwrap();
    run_args(&cfg, &snapshot_args(&["render"]))
}

#[test]
fn a_confd_go_template_is_named_as_confd_syntax() {
    // Patroni's extras/confd/templates/haproxy.tmpl, its server loop.
    let body = "listen primary\n{{range gets \"/members/*\"}}\tserver {{base .Key}} {{$data := json .Value}}\n{{end}}\n";
    let out = render_own_template("migrate-go", "haproxy.tmpl", body);
    let hint = "hint: this is confd's Go template syntax";
    expect(&out, 2, &["haproxy.tmpl does not compile", hint], &[]);
}

#[test]
fn patronis_conn_url_in_a_template_says_what_stands_for_it() {
    let body = "{% for m in members %}{{ m.conn_url }}\n{% endfor %}";
    let out = render_own_template("migrate-field", "t.tera", body);
    let hint = "hint: Patroni's `conn_url` arrives parsed: a member's host, port and address";
    expect(&out, 5, &["Field `conn_url` is not defined", hint], &[]);
}

// ---------------------------------------------------------------------------------------------
// The guide's steps, run as written
// ---------------------------------------------------------------------------------------------

/// One walk through the guide: a private etcd holding the Patroni 4.1.5 dump under
/// `/service/batman/` (the guide's scope), HAProxy running confd's file (Patroni's recipe, with
/// tabs, as confd writes it) in master-worker mode, and the guide's recommended `haconfd.toml`
/// in the working directory. Paths under /etc, /run and /var/lib, and the listeners' ports,
/// are moved into the walk's temp dir; nothing else of the guide's files is changed.
struct Walk {
    dir: tempfile::TempDir,
    etcd: Etcd,
    haproxy: Haproxy,
    bin_dir: PathBuf,
}

impl Walk {
    fn new() -> Walk {
        let etcd = Etcd::start();
        let kv: BTreeMap<String, String> =
            serde_json::from_str(&read(&fixture("patroni4-kv.json"))).unwrap();
        for (k, v) in kv.iter().filter(|(k, _)| k.starts_with("/service/demo/")) {
            etcd.put(&k.replacen("/service/demo/", "/service/batman/", 1), v);
        }
        let dir = temp_dir("migrate-walk");
        let d = dir.path();
        for sub in [
            "etc/haproxy",
            "etc/pgbouncer",
            "run/haproxy",
            "var/lib/haproxy",
            "files",
            "bin",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        write_guide_files(&d.join("files"));
        let ports = [free_port(), free_port(), free_port()];
        let bind = |t: &str| {
            t.replace("*:7000", &format!("127.0.0.1:{}", ports[0]))
                .replace("*:5000", &format!("127.0.0.1:{}", ports[1]))
                .replace("*:5001", &format!("127.0.0.1:{}", ports[2]))
        };
        // confd's files: the literal translation's render, indented with tabs as Patroni's
        // templates are.
        let recipe_cfg = d.join("files/haconfd.toml");
        let snap = d.join("files/dump.json");
        std::fs::write(&snap, serde_json::to_string(&kv).unwrap()).unwrap();
        for (name, dest) in [
            ("haproxy", "etc/haproxy/haproxy.cfg"),
            ("pgbouncer", "etc/pgbouncer/pgbouncer.ini"),
        ] {
            let confd: String = render(&recipe_cfg, &snap, name)
                .lines()
                .map(|l| l.replacen("    ", "\t", 1) + "\n")
                .collect();
            std::fs::write(d.join(dest), bind(&confd)).unwrap();
        }
        let haproxy = Haproxy::start(&d.join("etc/haproxy/haproxy.cfg"));
        let real = |p: &str| d.join(p.trim_start_matches('/')).display().to_string();
        let config = read(&d.join("files/shipped/haconfd.toml"))
            .replace("dest = \"/etc/", &format!("dest = \"{}/", real("/etc")))
            .replace("/run/haproxy/admin.sock", &real("/run/haproxy/admin.sock"))
            .replace("/var/lib/haproxy/", &real("/var/lib/haproxy/"))
            .replace("/run/haproxy.pid", &haproxy.pidfile().display().to_string())
            .replace("/run/haproxy/master.sock", &haproxy.master_socket().display().to_string())
            .replace("/run/postgresql/", &real("/run/postgresql/"))
            .replace(
                "[template.vars]                          # Patroni's haproxy.tmpl\n",
                &format!(
                    "[template.vars]\nbind_address = \"127.0.0.1\"\nstats_port = {}\nprimary_port = {}\nreplica_port = {}\n",
                    ports[0], ports[1], ports[2]
                ),
            )
            .replace("owner = \"postgres\"\n", "");
        std::fs::write(d.join("haconfd.toml"), config).unwrap();
        let bin_dir = d.join("bin");
        std::os::unix::fs::symlink(haconfd_bin(), bin_dir.join("haconfd")).unwrap();
        Walk {
            dir,
            etcd,
            haproxy,
            bin_dir,
        }
    }

    /// A guide command line as the walk runs it: its /etc paths moved into the temp dir.
    fn line(&self, line: &str) -> String {
        let etc = self.dir.path().join("etc").display().to_string();
        line.replace(" /etc/", &format!(" {etc}/"))
    }

    fn shell(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(self.line(line))
            .current_dir(self.dir.path())
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    self.bin_dir.display()
                ),
            )
            .env("ETCDCTL_ENDPOINTS", self.etcd.endpoint())
            .env("HACONFD_ETCD_ENDPOINTS", self.etcd.endpoint())
            .env("HACONFD_ETCD_API", "v3");
        cmd
    }
}

/// `diff confd's haconfd's`: it exits 1, and every changed line is one the guide lists.
fn assert_listed_diff(line: &str, out: &Output, walk: &Walk) {
    let files: Vec<&str> = line.split_whitespace().skip(1).collect();
    let confd = read(&walk.dir.path().join(files[0].trim_start_matches('/')));
    let ours = read(&walk.dir.path().join(files[1]));
    let comment = if files[1].contains("pgbouncer") {
        ';'
    } else {
        '#'
    };
    let left = unexplained(&confd, &ours, comment);
    assert!(
        out.status.code() == Some(1) && left.is_empty(),
        "`{line}`: {:?}, differences the guide does not list: {left:#?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn migration_guide_steps_run_as_written_against_etcd_and_haproxy() {
    let t0 = Instant::now();
    let walk = Walk::new();
    let steps = doc_steps(&guide());
    let lines: Vec<&String> = steps.iter().flatten().collect();
    assert!(lines.len() >= 8, "the guide's steps: {lines:?}");
    for line in lines {
        if line.ends_with(" run") {
            run_step(&walk, line);
            continue;
        }
        let out = run_with_timeout(&mut walk.shell(line), Duration::from_secs(30)).unwrap();
        if line.starts_with("diff ") {
            assert_listed_diff(line, &out, &walk);
            continue;
        }
        assert!(
            out.status.success(),
            "`{line}`: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "TIMING migration guide walk: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `haconfd run` after `once --no-reload`: HAProxy, still on confd's file, is reloaded onto the
/// file haconfd wrote (its stats socket answers), PgBouncer's file is named as one to reload by
/// hand; a second start finds HAProxy up to date and reloads nothing.
fn run_step(walk: &Walk, line: &str) {
    // The file `once --no-reload` wrote is older than any worker a reload starts now by more
    // than HAProxy's whole-second uptime (the master socket's answer), so that the second start
    // below can tell, whether or not /proc shows the worker.
    std::thread::sleep(Duration::from_millis(1500));
    let before = walk.haproxy.reload_count();
    let admin = walk.dir.path().join("run/haproxy/admin.sock");
    assert!(
        !admin.exists(),
        "HAProxy already serves haconfd's file before `run`"
    );
    let log = walk.dir.path().join("run.log");
    // `exec`: the daemon takes the shell's PID, which is what stop() signals (a daemon behind
    // `sh -c` outlived the test).
    let line = &format!("exec {line}");
    let daemon = Proc::spawn_logged("haconfd run", walk.shell(line), &log);
    let reloaded = wait_until(Duration::from_secs(15), || {
        // The master re-executes on a reload and resets connections to its socket meanwhile.
        walk.haproxy
            .try_show_proc()
            .is_some_and(|p| p.reloads() > before)
    });
    assert!(
        reloaded,
        "`{line}` did not reload HAProxy onto the file once --no-reload wrote; log:\n{}",
        daemon.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || unix_cmd(
            &admin,
            "show info",
            Duration::from_secs(1)
        )
        .is_ok()),
        "HAProxy does not serve haconfd's stats socket after the reload; log:\n{}",
        walk.haproxy.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || daemon
            .log()
            .contains("cannot tell whether its consumer has read this file")),
        "nothing says PgBouncer may need a reload by hand; log:\n{}",
        daemon.log()
    );
    daemon.stop(Duration::from_secs(10));
    // Started again: the worker is newer than the file, nothing to reload.
    let count = walk.haproxy.reload_count();
    let again = Proc::spawn_logged(
        "haconfd run",
        walk.shell(line),
        &walk.dir.path().join("run2.log"),
    );
    assert!(
        wait_until(Duration::from_secs(15), || again.log().contains("listed")),
        "etcd not listed; log:\n{}",
        again.log()
    );
    // The first pass follows the listing within milliseconds; a reload would show by now.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        walk.haproxy.reload_count(),
        count,
        "a second start reloaded HAProxy again; log:\n{}",
        again.log()
    );
    assert!(
        !again.log().contains("has not read this file"),
        "{}",
        again.log()
    );
    again.stop(Duration::from_secs(10));
}
