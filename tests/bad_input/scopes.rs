//! Scopes Patroni accepts but config files do not like: a space, non-ASCII letters, 70
//! characters, leading dots, `..`. Discovery follows every one; where a scope becomes a file name
//! (`{scope}` in `dest`) or a config identifier (`scope_id` in the context, `{scope}` in
//! `server_state`'s backend names) it is spelled safely and reversibly, and no file lands outside
//! its directory. A scope nothing can carry unchanged (control characters) is refused, named.

use super::*;

/// The scopes under test, with the file name each gets.
fn odd_scopes() -> Vec<(String, String)> {
    let long = "x".repeat(70);
    vec![
        ("bad scope".into(), "bad:20scope".into()),
        ("zürich".into(), "z:C3:BCrich".into()),
        ("..dots".into(), ":2E.dots".into()),
        ("..".into(), ":2E.".into()),
        (long.clone(), long),
    ]
}

#[test]
fn discovery_follows_odd_scope_names_with_safe_file_names_and_identifiers() {
    let etcd = Etcd::shared();
    let dir = temp_dir("oddscopes");
    let ns = format!("/{}", unique_name("odd"));
    let d = dir.path();
    std::fs::create_dir(d.join("conf.d")).unwrap();
    let mut tables = String::new();
    for (i, (scope, _)) in odd_scopes().iter().enumerate() {
        for (n, role) in [("pg1", "master"), ("pg2", "replica")] {
            let port = 6000 + 10 * i as u16 + u16::from(n == "pg2");
            etcd.put(
                &format!("{ns}/{scope}/members/{n}"),
                &member(port, role).to_string(),
            );
        }
        etcd.put(&format!("{ns}/{scope}/leader"), "pg1");
        tables.push_str(&format!(
            "[clusters.{}]\nprimary_port = {}\nreplica_port = {}\n\n",
            serde_json::to_string(scope).unwrap(),
            20000 + 10 * i,
            20001 + 10 * i
        ));
    }
    // A scope nothing can carry unchanged: refused, named, the others go on.
    etcd.put(
        &format!("{ns}/ctl\u{7}x/members/pg1"),
        &member(6900, "master").to_string(),
    );
    std::fs::write(
        d.join("one.tera"),
        "{{ scope }} {{ scope_id }} leader={{ leader_name }}\n",
    )
    .unwrap();
    let cfg = d.join("haconfd.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[etcd]
endpoints = ["{}"]
namespace = "{ns}"
discover = true

{tables}
[[template]]
name = "haproxy"
src = "{}"
dest = "{}"
check = ["{}", "-c", "-f", "{{{{staged}}}}"]
vars = {{ bind_address = "127.0.0.1", stats_port = 21999, stats_socket = "{}" }}

[[template]]
name = "one"
src = "{}"
dest = "{}"
"#,
            etcd.endpoint(),
            shipped("haproxy-clusters.cfg.tera").display(),
            d.join("haproxy.cfg").display(),
            require_bin("haproxy").display(),
            d.join("admin.sock").display(),
            d.join("one.tera").display(),
            d.join("conf.d/{scope}.cfg").display(),
        ),
    )
    .unwrap();
    let run = haconfd(&cfg, &["once", "--no-reload"], None);
    run.expect(0, &[]);
    let hap = read(&d.join("haproxy.cfg"));
    let mut files: Vec<String> = std::fs::read_dir(d.join("conf.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut want: Vec<String> = odd_scopes()
        .iter()
        .map(|(_, id)| format!("{id}.cfg"))
        .collect();
    want.sort();
    assert_eq!(files, want, "per-cluster files:\n{}", run.stderr);
    for (scope, id) in odd_scopes() {
        assert!(
            hap.contains(&format!("listen {id}_primary")),
            "no listener for {scope:?} as {id}:\n{hap}"
        );
        let one = read(&d.join("conf.d").join(format!("{id}.cfg")));
        assert_eq!(one, format!("{scope} {id} leader=pg1\n"));
    }
    // Nothing was written beside the directories haconfd writes in.
    let mut top: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["conf.d", "haconfd.toml", "haproxy.cfg", "one.tera"]);
    let refused = run.logs().into_iter().find(|v| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("not following a scope"))
    });
    let refused =
        refused.unwrap_or_else(|| panic!("no warning naming the refused scope:\n{}", run.stderr));
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("control characters"))
            && refused["scope"].as_str().is_some_and(|s| s.contains("ctl")),
        "{refused}"
    );
}
