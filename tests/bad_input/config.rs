//! Configuration that parsed but silently meant something else: relative paths taken from the
//! working directory, a check that never saw the staged file, one file written by two targets,
//! the root namespace, zero durations and an `http.listen` that only failed at bind.

use super::*;

/// Runs the binary from `cwd` (as [`haconfd`] does otherwise), bounded to 30 s.
fn haconfd_in(cwd: &Path, cfg: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(haconfd_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HACONFD_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(cwd)
        .arg("-c")
        .arg(cfg)
        .args(["--log-format", "json"])
        .args(args);
    let start = Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("haconfd {args:?}: {e}"));
    Run {
        what: format!("haconfd {} (in {})", args.join(" "), cwd.display()),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Writes `ws`'s config as `edit` changes its text (for keys [`Cfg`] has no field for).
fn write_edited(ws: &Ws, edit: impl FnOnce(String) -> String) {
    std::fs::write(&ws.cfg_path, edit(ws.cfg.text())).unwrap();
}

#[test]
fn relative_paths_are_taken_from_the_config_files_directory_not_the_working_directory() {
    let mut ws = Ws::new("cfgrelative");
    // The working directory holds a decoy pidfile naming another `sleep`: reading the pidfile
    // from there would signal the decoy, and files would land there.
    let cwd = temp_dir("cfgrelative-cwd");
    let decoy = sentinel("sleep (decoy in the working directory)");
    std::fs::write(cwd.path().join("haproxy.pid"), format!("{}\n", decoy.pid())).unwrap();
    ws.reconfigure(|c| {
        c.hap_dest = "haproxy.cfg".into();
        c.pgb_dest = "./pgbouncer.ini".into();
        c.hap_reload = signal_reload(Path::new("haproxy.pid"), "SIGUSR2", "sleep");
        c.pgb_reload = signal_reload(Path::new("pgbouncer.pid"), "SIGHUP", "sleep");
        c.hap_extra =
            "server_state = { stats_socket = \"admin.sock\", file = \"server-state\" }".into();
        c.guard = "state_file = \"members.json\"".into();
    });
    let pgb_before = file_state(&ws.pgb);
    ws.add_valid_member();
    let run = haconfd_in(cwd.path(), &ws.cfg_path, &["once"]);
    run.expect(0, &[]);
    assert!(
        read(&ws.hap).contains("server pg4 127.0.0.1:5444 "),
        "haproxy.cfg beside the config was not updated:\n{}",
        read(&ws.hap)
    );
    assert!(
        read(&ws.hap).contains(&format!(
            "server-state-file {}",
            ws.path("server-state").display()
        )),
        "the template must get the server-state file's real path:\n{}",
        read(&ws.hap)
    );
    assert!(ws.path("server-state").exists(), "server-state file");
    assert!(ws.path("members.json").exists(), "guard state file");
    assert_file_unchanged(&ws.pgb, &pgb_before);
    let strays: Vec<String> = std::fs::read_dir(cwd.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "haproxy.pid")
        .collect();
    assert!(
        strays.is_empty(),
        "files written in the working directory: {strays:?}"
    );
    assert_killed_by(&ws.hap_sleep, nix::sys::signal::Signal::SIGUSR2);
    assert_not_signalled(&decoy);
    assert_not_signalled(&ws.pgb_sleep);
    ws.assert_no_staged_leftovers();
}

#[test]
fn check_without_the_staged_placeholder_exits_2_naming_the_template_and_argv() {
    let mut ws = Ws::new("cfgnostaged");
    let before = ws.files();
    // The classic mistake: the check reads the live file, so a broken new one would pass.
    let live = ws.hap.display().to_string();
    ws.reconfigure(|c| {
        c.hap_check = ["haproxy", "-c", "-f", &live].map(String::from).to_vec();
    });
    ws.add_valid_member();
    let argv = format!("[\"haproxy\", \"-c\", \"-f\", {}]", q(&live));
    let needles = [
        "template \"haproxy\": check",
        argv.as_str(),
        "does not name the staged file",
        "{{staged}}",
    ];
    ws.once(&[]).expect(2, &needles);
    ws.run(&["check"]).expect(2, &needles);
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

#[test]
fn one_destination_spelled_two_ways_exits_2_naming_both_templates() {
    for (tag, spelling) in [("cfgdupdotdot", "sub/../"), ("cfgdupsymlink", "link/")] {
        let mut ws = Ws::new(tag);
        std::fs::create_dir(ws.path("sub")).unwrap();
        std::os::unix::fs::symlink(ws.dir.path(), ws.path("link")).unwrap();
        let before = ws.files();
        let other = ws.path(&format!("{spelling}haproxy.cfg"));
        ws.reconfigure(|c| c.pgb_dest = other.clone());
        ws.add_valid_member();
        ws.once(&[]).expect(
            2,
            &[
                &format!("template \"haproxy\" dest ({})", ws.hap.display()),
                &format!("template \"pgbouncer\" dest ({})", other.display()),
                "are the same file",
            ],
        );
        ws.assert_unchanged(&before);
        ws.assert_nothing_signalled();
    }
}

#[test]
fn root_namespace_finds_the_keys_patroni_writes_under_slash_scope() {
    let mut ws = Ws::new("cfgrootns");
    // Patroni with namespace "/" or "" collapses the slashes and writes /<scope>/...
    let scope = ws.scope.clone();
    let root = |rel: &str| format!("/{scope}/{rel}");
    Etcd::shared().put(&root("members/pg9"), &member(5449, "master").to_string());
    Etcd::shared().put(&root("leader"), "pg9");
    let renders_pg9 = |run: Run, how: &str| {
        run.expect(0, &[]);
        assert!(
            run.stdout.contains("host=127.0.0.1 port=5449"),
            "{how} did not find /{scope}/leader:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    };
    for ns in ["/", ""] {
        ws.reconfigure(|c| c.namespace = Some(ns.into()));
        renders_pg9(
            ws.run(&["render", "--template", "pgbouncer"]),
            &format!("namespace = {ns:?}"),
        );
    }
    ws.reconfigure(|c| c.namespace = None);
    renders_pg9(
        ws.run(&["--namespace", "/", "render", "--template", "pgbouncer"]),
        "--namespace /",
    );
}

#[test]
fn zero_durations_exit_2_naming_the_key_where_zero_makes_no_sense() {
    let ws = Ws::new("cfgzero");
    let before = ws.files();
    ws.add_valid_member();
    for (section, line, key) in [
        (
            "[daemon]",
            "retry_interval = \"0s\"",
            "daemon.retry_interval",
        ),
        ("[daemon]", "max_backoff = \"0ms\"", "daemon.max_backoff"),
        ("[daemon]", "once_timeout = \"0s\"", "daemon.once_timeout"),
        ("[etcd]", "connect_timeout = \"0s\"", "etcd.connect_timeout"),
        ("[etcd]", "request_timeout = \"0s\"", "etcd.request_timeout"),
        (
            "[etcd]",
            "keepalive_interval = \"0s\"",
            "etcd.keepalive_interval",
        ),
        (
            "[etcd]",
            "keepalive_timeout = \"0s\"",
            "etcd.keepalive_timeout",
        ),
        (
            "name = \"haproxy\"",
            "check_timeout = \"0s\"",
            "template \"haproxy\": check_timeout",
        ),
        (
            "name = \"pgbouncer\"",
            "reload = { command = [\"true\"], timeout = \"0s\" }",
            "template \"pgbouncer\": reload.timeout",
        ),
    ] {
        write_edited(&ws, |t| {
            let t = if line.starts_with("reload") {
                t.replace(&format!("reload = {}", ws.cfg.pgb_reload), "")
            } else {
                t
            };
            t.replace("once_timeout = \"5s\"\n", "").replacen(
                section,
                &format!("{section}\n{line}"),
                1,
            )
        });
        ws.once(&[])
            .expect(2, &[&format!("{key} must be more than 0s")]);
    }
    // "0s" keeps its meaning where it has one: no resync, no spacing between passes.
    write_edited(&ws, |t| {
        t.replacen("[daemon]", "[daemon]\nresync_interval = \"0s\"\n", 1)
            .replace("min_interval = \"100ms\"", "min_interval = \"0s\"")
    });
    ws.once(&["--no-reload"]).expect(0, &[]);
    assert!(read(&ws.hap).contains("server pg4 127.0.0.1:5444 "));
    assert_file_unchanged(&ws.pgb, &before[1]);
    ws.assert_nothing_signalled();
}

#[test]
fn invalid_http_listen_exits_2_in_check_and_run_naming_it() {
    let ws = Ws::new("cfglisten");
    let before = ws.files();
    for listen in ["127.0.0.1:notaport", "localhost", "300.1.2.3:9187"] {
        write_edited(&ws, |t| format!("{t}\n[http]\nlisten = {}\n", q(listen)));
        let needle = format!("http.listen {}", q(listen));
        ws.run(&["check"]).expect(2, &[&needle]);
        ws.run(&["run"]).expect(2, &[&needle]);
    }
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

/// Class: several clusters. Settings that would put two clusters on one port or one PgBouncer
/// database, mix the ways of naming clusters, share the fast path's backends between clusters or
/// scatter per-cluster files across directories are refused at load, naming the keys, and
/// nothing is written or signalled.
#[test]
fn cluster_settings_that_would_clash_exit_2_naming_the_keys() {
    let ws = Ws::new("cfgclusters");
    let before = ws.files();
    let scope_line = format!("scope = {}", q(&ws.scope));
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, Edit, Vec<String>)> = vec![
        (
            "two clusters on one port",
            Box::new(|t: String| {
                t + "\n[clusters.a]\nprimary_port = 5000\n[clusters.b]\nreplica_port = 5000\n"
            }),
            vec!["clusters.b.replica_port and clusters.a.primary_port are both port 5000".into()],
        ),
        (
            "one database in two clusters",
            Box::new(|t: String| {
                t + "\n[clusters.a]\ndatabases = [\"app\"]\n[clusters.b]\ndatabases = [\"app\"]\n"
            }),
            vec!["clusters.b.databases and clusters.a.databases both name \"app\"".into()],
        ),
        (
            "scope and scopes",
            Box::new(move |t: String| {
                t.replacen(
                    &scope_line,
                    &format!("{scope_line}\nscopes = [\"a\", \"b\"]"),
                    1,
                )
            }),
            vec![
                "set one of etcd.scope (one cluster), etcd.scopes (a list) and etcd.discover"
                    .into(),
            ],
        ),
    ];
    for (what, edit, needles) in cases {
        write_edited(&ws, edit);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let run = ws.run(&["check"]);
        assert_eq!(run.code, 2, "{what}: {}", run.stderr);
        run.expect(2, &needles);
        ws.once(&[]).expect(2, &needles);
    }
    // With several clusters, the fast path's backends must name `{scope}`.
    let mut ws = ws;
    ws.reconfigure(|c| {
        c.hap_extra =
            "server_state = { stats_socket = \"admin.sock\", file = \"server-state\" }".into();
    });
    let scope_line = format!("scope = {}", q(&ws.scope));
    write_edited(&ws, |t| {
        t.replacen(&scope_line, "scopes = [\"a\", \"b\"]", 1)
    });
    let needles = [
        "template \"haproxy\": server_state backend \"primary\" has no {scope}",
        "primary_backends = [\"{scope}_primary\"]",
    ];
    ws.run(&["check"]).expect(2, &needles);
    ws.once(&[]).expect(2, &needles);
    // A per-cluster file's `{scope}` belongs in the file name, one directory for them all.
    ws.reconfigure(|c| {
        c.hap_extra = String::new();
        c.hap_dest = "{scope}/haproxy.cfg".into();
    });
    ws.run(&["check"]).expect(
        2,
        &[
            "template \"haproxy\": dest",
            "{scope} may only be in the file name",
        ],
    );
    ws.assert_unchanged(&before);
    ws.assert_nothing_signalled();
}

/// A config of several clusters written as raw TOML into `dir`, with `body` after `[etcd]`.
fn clusters_config(dir: &Path, body: &str) -> PathBuf {
    std::fs::write(dir.join("t.tera"), "x\n").unwrap();
    let cfg = dir.join("haconfd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\ndiscover = true\n\n{body}",
            Etcd::shared().endpoint()
        ),
    )
    .unwrap();
    cfg
}

/// `{scope}` in a `dest` is one file per configured cluster: a cluster named like another
/// file's name (`[clusters.haproxy]` next to `mc/haproxy.cfg`, `[clusters.members]` next to
/// `guard.state_file = mc2/members.json`) would have two writers; refused at load, naming both.
#[test]
fn a_per_cluster_dest_that_names_another_file_for_a_configured_cluster_exits_2_naming_both() {
    let dir = temp_dir("cfgscopedest");
    let d = dir.path();
    std::fs::create_dir_all(d.join("mc")).unwrap();
    std::fs::create_dir_all(d.join("mc2")).unwrap();
    let cfg = clusters_config(
        d,
        "[clusters.haproxy]\nport = 15100\n\n\
         [[template]]\nname = \"main\"\nsrc = \"t.tera\"\ndest = \"mc/haproxy.cfg\"\n\n\
         [[template]]\nname = \"per\"\nsrc = \"t.tera\"\ndest = \"mc/{scope}.cfg\"\n",
    );
    let run = haconfd(&cfg, &["check"], None);
    run.expect(
        2,
        &[
            "template \"main\" dest",
            "template \"per\" dest for cluster \"haproxy\"",
            "are the same file",
        ],
    );
    let cfg = clusters_config(
        d,
        "[guard]\nstate_file = \"mc2/members.json\"\n\n[clusters.members]\nport = 15200\n\n\
         [[template]]\nname = \"per\"\nsrc = \"t.tera\"\ndest = \"mc2/{scope}.json\"\n",
    );
    haconfd(&cfg, &["check"], None).expect(
        2,
        &[
            "template \"per\" dest for cluster \"members\"",
            "guard.state_file",
            "are the same file",
        ],
    );
}

/// A port a template variable binds (`stats_port`) that a cluster's table binds too: `haproxy
/// -c` accepts two listeners on one port and the kernel splits the connections between them.
#[test]
fn a_template_port_that_a_cluster_binds_too_exits_2_naming_both() {
    let dir = temp_dir("cfgvarport");
    let cfg = clusters_config(
        dir.path(),
        "[vars]\nstats_port = 15300\n\n[clusters.alpha]\nprimary_port = 15300\n\n\
         [[template]]\nname = \"haproxy\"\nsrc = \"t.tera\"\ndest = \"haproxy.cfg\"\n",
    );
    haconfd(&cfg, &["check"], None).expect(
        2,
        &[
            "template \"haproxy\" var stats_port = 15300",
            "clusters.alpha.primary_port",
            "both port 15300",
        ],
    );
}
