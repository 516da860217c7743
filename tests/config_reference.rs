//! The README's configuration reference is tested against the real config struct: every key the
//! struct accepts is documented, and every documented key is one the struct accepts, so the two
//! cannot drift apart.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use haconfd::config::{RawConfig, ReloadConfig, TemplateConfig};
use haconfd::consumers::haproxy::server_state::ServerStateConfig;
use haconfd::source::TlsConfig;

/// A config with every optional field set, so that serializing it shows every key.
fn everything() -> RawConfig {
    let mut c = RawConfig::default();
    c.etcd.scope = Some("demo".into());
    c.etcd.username = Some("u".into());
    c.etcd.password = Some("p".into());
    c.etcd.password_file = Some("f".into());
    c.etcd.tls = Some(TlsConfig {
        ca: Some("ca".into()),
        cert: Some("c".into()),
        key: Some("k".into()),
        domain: Some("d".into()),
    });
    c.guard.state_file = Some("s".into());
    c.lag.max_bytes = Some(1 << 20);
    c.lag.readmit_bytes = Some(1 << 19);
    c.lag.readmit_delay = Some(Duration::from_secs(1));
    c.failover.crash_hold.max = Some(Duration::from_secs(30));
    c.http.listen = Some("127.0.0.1:1".into());
    c.vars.insert("x".into(), toml::Value::Integer(1));
    let mut vars = toml::Table::new();
    vars.insert("y".into(), toml::Value::Integer(2));
    c.templates.push(TemplateConfig {
        name: Some("n".into()),
        src: "a".into(),
        dest: "/b".into(),
        check: vec!["true".into(), "{{staged}}".into()],
        check_timeout: Duration::from_secs(1),
        mode: Some("0644".into()),
        owner: Some("root".into()),
        group: Some("root".into()),
        reload: Some(ReloadConfig {
            pidfile: Some("/p".into()),
            signal: Some("SIGHUP".into()),
            process: Some("x".into()),
            master_socket: Some("/m".into()),
            command: Some(vec!["true".into()]),
            timeout: Some(Duration::from_secs(1)),
        }),
        require_leader: true,
        standby_leader: haconfd::config::StandbyLeader::Follow,
        server_state: Some(ServerStateConfig {
            stats_socket: "/s".into(),
            file: "/f".into(),
            primary_backends: vec![],
            replica_backends: vec![],
            membership: Default::default(),
        }),
        pgbouncer_admin: Some(haconfd::consumers::pgbouncer::AdminConfig {
            host: "/run/postgresql".into(),
            port: 6432,
            user: "pgbouncer".into(),
            password_file: Some("/pw".into()),
            password_env: Some("PW".into()),
            pause_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        }),
        vars,
    });
    c.hook_list.push(haconfd::hooks::HookConfig {
        name: Some("h".into()),
        command: vec!["true".into()],
        events: vec!["leader_changed".into()],
        clusters: vec!["demo".into()],
        timeout: Duration::from_secs(1),
        debounce: Duration::from_secs(1),
    });
    c
}

/// Dotted key paths of a TOML value; arrays of tables contribute their element keys, free-form
/// `vars` tables only their own name.
fn paths(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                if k != "vars" {
                    paths(&p, v, out);
                }
            }
        }
        toml::Value::Array(a) => {
            for v in a.iter().filter(|v| v.is_table()) {
                paths(prefix, v, out);
            }
        }
        _ => {}
    }
}

/// The struct's keys, as the README names them: `[[template]]` keys by their own name, the
/// `reload` and `server_state` inline tables' keys as `reload.x`/`server_state.x`.
fn struct_keys() -> BTreeSet<String> {
    let v = toml::Value::try_from(everything()).unwrap();
    let mut all = BTreeSet::new();
    paths("", &v, &mut all);
    all.into_iter()
        .filter(|p| !["etcd", "daemon", "guard", "log", "http", "template"].contains(&p.as_str()))
        .map(|p| p.strip_prefix("template.").map(str::to_owned).unwrap_or(p))
        .collect()
}

/// Keys the README's reference documents: backticked words in the first column of the tables
/// between "## Configuration reference" and the next "## " heading, qualified by their section.
fn documented_keys() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let start = readme
        .find("## Configuration reference")
        .expect("README has a configuration reference");
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut keys = BTreeSet::new();
    let mut table = String::new();
    for line in section.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            // "### `[etcd]`" → "etcd"; "### `[[template]]` ..." → "" (keys stand alone)
            table = h
                .split('`')
                .nth(1)
                .unwrap_or("")
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned();
            // A heading naming several tables qualifies its keys in the rows themselves.
            if table == "template" || h.matches('`').count() > 2 {
                table.clear();
            }
            continue;
        }
        let Some(first) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        for key in first.split('`').skip(1).step_by(2) {
            let key = key.trim_end_matches(".*");
            if key.is_empty() || key == "key" {
                continue;
            }
            if table.starts_with("clusters.") {
                // `[clusters.<scope>]` is free-form, like `[vars]`: its rows document the keys
                // haconfd checks, the struct knows the table only.
                keys.insert("clusters".to_owned());
            } else if key.contains('.') || table.is_empty() {
                keys.insert(key.to_owned());
            } else {
                keys.insert(format!("{table}.{key}"));
            }
        }
    }
    // `tls.ca` under [etcd] means etcd.tls.ca.
    keys.into_iter()
        .map(|k| {
            if k.starts_with("tls.") {
                format!("etcd.{k}")
            } else {
                k
            }
        })
        .collect()
}

fn reference_section() -> String {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let start = readme.find("## Configuration reference").unwrap();
    let rest = &readme[start + 3..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
}

#[test]
fn every_config_key_is_documented_in_the_readme() {
    let documented = documented_keys();
    let section = reference_section();
    let is_documented = |k: &String| {
        if documented.contains(k) || documented.iter().any(|d| d.starts_with(&format!("{k}."))) {
            return true;
        }
        // Keys of inline tables (`reload = { pidfile, ... }`) are documented by their row and
        // named in the prose that describes the forms.
        let (head, leaf) = k.rsplit_once('.').unwrap_or(("", k));
        documented.contains(head)
            && section
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == leaf)
    };
    let missing: Vec<_> = struct_keys()
        .into_iter()
        .filter(|k| !is_documented(k))
        .collect();
    assert!(
        missing.is_empty(),
        "undocumented config keys: {missing:?}\ndocumented: {documented:?}"
    );
}

#[test]
fn every_documented_key_exists_in_the_config_struct() {
    let known = struct_keys();
    let unknown: Vec<_> = documented_keys()
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect();
    assert!(
        unknown.is_empty(),
        "the README documents keys the config does not have: {unknown:?}\nknown: {known:?}"
    );
}

#[test]
fn the_sample_config_resolves() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/haconfd.toml");
    let raw = RawConfig::load(&path).unwrap();
    let settings = raw.resolve(path.parent().unwrap()).unwrap();
    assert_eq!(settings.targets.len(), 2);
}
