//! Several Patroni clusters behind one HAProxy and one PgBouncer, against a real etcd, HAProxy
//! and PgBouncer and the real `haconfd run` with `etcd.discover = true`: fake members (a TCP
//! banner server each) whose keys the test writes, several of them in one etcd transaction when
//! a test needs them in one pass. Three ordinary scopes and a Citus layout
//! (`<ns>/citus/<group>/...`) each get their listeners; a discovered scope with no
//! `[clusters.<scope>]` table gets none but shows in the log, `/status` and `/metrics`; an
//! emptied or leaderless cluster keeps its section while another cluster's change goes in; a
//! per-cluster `dest` gives one file per configured cluster, a new one without a restart.
//!
//! The templates are the test's own (written into each test's temp dir): the primary listener
//! names the leader alone and has no health check, so a banner read through a port tells where
//! HAProxy routes it without waiting for checks. One test renders the same store through the
//! shipped `haproxy-clusters.cfg.tera`, `haproxy-citus.cfg.tera` and
//! `pgbouncer-clusters.ini.tera` and checks the files with `haproxy -c`. Every test has its own namespace on the
//! binary's shared etcd, its own temp dir, ports and processes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{
    free_port, give_to_postgres, haconfd_bin, haconfd_once_no_reload, http_get, require_bin,
    run_with_timeout, temp_dir, unique_name, unix_cmd, wait_banner, wait_until, Etcd, Haproxy,
    Pgbouncer, Proc, TcpBackend,
};
use etcd_client::{DeleteOptions, Txn, TxnOp};
use nix::sys::signal::Signal;

// ------------------------------------------------------------------------------ the templates

/// One haproxy.cfg for every cluster: for each configured ordinary cluster a primary listener
/// (its leader) and a replica listener (its replicas); for a configured Citus cluster one
/// listener per group with that group's primary, on `settings.group_ports[group]`.
const HAPROXY_ALL: &str = r#"# Rendered by haconfd for every configured cluster.
global
    stats socket {{ vars.stats_socket }} mode 660 level admin
    stats timeout 30s
    hard-stop-after 5s

defaults
    mode tcp
    timeout client 30s
    timeout connect 2s
    timeout server 30s
{% for c in clusters %}{% if c.configured %}{% if c.citus %}{% for g in c.groups %}
listen {{ c.scope }}_g{{ g.group }}_primary
    bind 127.0.0.1:{{ c.settings.group_ports[g.group] }}
{%- if g.leader %}
    server {{ g.leader.name }} {{ g.leader.address }}
{%- endif %}
{% endfor %}{% else %}
listen {{ c.scope }}_primary
    bind 127.0.0.1:{{ c.settings.primary_port }}
{%- if c.leader %}
    server {{ c.leader.name }} {{ c.leader.address }}
{%- endif %}

listen {{ c.scope }}_replicas
    bind 127.0.0.1:{{ c.settings.replica_port }}
{%- for m in c.replicas %}
    server {{ m.name }} {{ m.address }}
{%- endfor %}
{% endif %}{% endif %}{% endfor %}"#;

/// The main file of the per-cluster layout: no cluster in it.
const HAPROXY_MAIN: &str = r#"# Rendered by haconfd: global settings; the clusters are in conf.d/.
global
    stats socket {{ vars.stats_socket }} mode 660 level admin
    stats timeout 30s
    hard-stop-after 5s

defaults
    mode tcp
    timeout client 30s
    timeout connect 2s
    timeout server 30s
"#;

/// One cluster's file (`conf.d/{scope}.cfg`), from its flat context.
const HAPROXY_ONE: &str = r#"# Rendered by haconfd for cluster {{ scope }}.
listen {{ scope }}_primary
    bind 127.0.0.1:{{ settings.primary_port }}
{%- if leader %}
    server {{ leader.name }} {{ leader.address }}
{%- endif %}

listen {{ scope }}_replicas
    bind 127.0.0.1:{{ settings.replica_port }}
{%- for m in replicas %}
    server {{ m.name }} {{ m.address }}
{%- endfor %}
"#;

/// pgbouncer.ini: each configured cluster's databases point at its leader (for a Citus
/// cluster, the coordinator's).
const PGBOUNCER: &str = r#";; Rendered by haconfd for every configured cluster.
[databases]
{%- for c in clusters %}{% if c.configured and c.leader %}{% for db in c.settings.databases %}
{{ db }} = host={{ c.leader.host }} port={{ c.leader.port }} dbname=postgres
{%- endfor %}{% endif %}{% endfor %}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {{ vars.pgb_port }}
unix_socket_dir = {{ vars.pgb_dir }}
auth_type = trust
auth_file = {{ vars.pgb_dir }}/userlist.txt
admin_users = pgbouncer
pidfile = {{ vars.pgb_dir }}/pgbouncer.pid
logfile = {{ vars.pgb_dir }}/pgbouncer.log
"#;

// ------------------------------------------------------------------------------- small helpers

fn toml_str(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `server` names of section `listen <name>` of a haproxy.cfg.
fn servers_of(cfg: &str, listen: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in cfg.lines() {
        if !line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            inside = line.trim() == format!("listen {listen}");
            continue;
        }
        let t = line.trim_start();
        if inside && t.starts_with("server ") {
            out.push(t.split_whitespace().nth(1).unwrap_or_default().to_string());
        }
    }
    out
}

/// The names of every `listen` section of a haproxy.cfg.
fn listeners(cfg: &str) -> Vec<String> {
    cfg.lines()
        .filter_map(|l| l.strip_prefix("listen "))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Runs one etcd transaction (every op in one revision: haconfd sees them in one pass).
fn txn(etcd: &Etcd, ops: Vec<TxnOp>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = etcd.client().await;
        tokio::time::timeout(Duration::from_secs(10), c.txn(Txn::new().and_then(ops)))
            .await
            .expect("etcd txn timed out")
            .expect("etcd txn");
    });
}

fn put(key: String, value: String) -> TxnOp {
    TxnOp::put(key, value, None)
}

fn delete_prefix(prefix: String) -> TxnOp {
    TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))
}

/// Member JSON as Patroni writes it, for a member listening on `port`.
fn member_json(port: u16, role: &str) -> String {
    serde_json::json!({
        "conn_url": format!("postgres://127.0.0.1:{port}/postgres"),
        "api_url": format!("http://127.0.0.1:{}/patroni", free_port()),
        "state": "running",
        "role": role,
        "version": "3.0.2",
        "xlog_location": 50331816u64,
        "timeline": 1
    })
    .to_string()
}

// ------------------------------------------------------------------------------------ the rig

/// One configured cluster's ports and databases (`[clusters.<scope>]`).
#[derive(Debug, Clone)]
struct Ports {
    primary: u16,
    replica: u16,
}

/// haconfd, HAProxy and PgBouncer for every cluster under one namespace. Field order is drop
/// order: haconfd goes first, so it never signals a process being torn down.
struct Rig {
    haconfd: Option<Proc>,
    haproxy: Option<Haproxy>,
    pgbouncer: Option<Pgbouncer>,
    /// The fake members, by name (the banner each answers with).
    backends: BTreeMap<String, TcpBackend>,
    ns: String,
    /// `[clusters.*]` of ordinary clusters, by scope.
    ports: BTreeMap<String, Ports>,
    /// `group_ports` of the Citus cluster `citus`, when configured.
    citus_ports: Vec<u16>,
    /// One file per cluster in `conf.d/` instead of one haproxy.cfg.
    per_cluster: bool,
    /// TOML added to every config the rig writes.
    extra: String,
    /// The shipped `haproxy-clusters.cfg.tera` with `server_state` per scope (member changes
    /// through the runtime API), instead of the rig's own template.
    shipped: bool,
    http_port: u16,
    pgb_port: u16,
    /// The shipped template's `stats_port`.
    stats_port: u16,
    dir: tempfile::TempDir,
}

impl Rig {
    /// Lays out the directory and the templates for clusters `scopes` (each `[clusters.x]`
    /// table gets fresh ports and a database `x_db`) and, with `citus`, a Citus cluster
    /// `citus` with groups 0..3. Starts nothing.
    fn new(tag: &str, scopes: &[&str], citus: bool, per_cluster: bool) -> Rig {
        require_bin("haproxy");
        require_bin("pgbouncer");
        let dir = temp_dir(tag);
        let d = dir.path();
        std::fs::write(d.join("all.cfg.tera"), HAPROXY_ALL).unwrap();
        std::fs::write(d.join("main.cfg.tera"), HAPROXY_MAIN).unwrap();
        std::fs::write(d.join("one.cfg.tera"), HAPROXY_ONE).unwrap();
        std::fs::write(d.join("pgbouncer.ini.tera"), PGBOUNCER).unwrap();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        let pgb = d.join("pgb");
        std::fs::create_dir(&pgb).unwrap();
        std::fs::write(
            pgb.join("userlist.txt"),
            "\"pgbouncer\" \"\"\n\"postgres\" \"\"\n",
        )
        .unwrap();
        give_to_postgres(&pgb);
        Rig {
            haconfd: None,
            haproxy: None,
            pgbouncer: None,
            backends: BTreeMap::new(),
            ns: format!("/{}", unique_name(tag)),
            ports: scopes
                .iter()
                .map(|s| {
                    (
                        s.to_string(),
                        Ports {
                            primary: free_port(),
                            replica: free_port(),
                        },
                    )
                })
                .collect(),
            citus_ports: if citus {
                (0..3).map(|_| free_port()).collect()
            } else {
                Vec::new()
            },
            per_cluster,
            extra: String::new(),
            shipped: false,
            http_port: free_port(),
            pgb_port: free_port(),
            stats_port: free_port(),
            dir,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn etcd(&self) -> &'static Etcd {
        Etcd::shared()
    }

    fn admin_sock(&self) -> PathBuf {
        self.path("admin.sock")
    }

    fn haproxy_cfg(&self) -> PathBuf {
        self.path("haproxy.cfg")
    }

    fn pgb_ini(&self) -> PathBuf {
        self.path("pgb/pgbouncer.ini")
    }

    fn confd(&self, scope: &str) -> PathBuf {
        self.path(&format!("conf.d/{scope}.cfg"))
    }

    fn log_path(&self) -> PathBuf {
        self.path("haconfd.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().expect("HAProxy started")
    }

    fn pgbouncer(&self) -> &Pgbouncer {
        self.pgbouncer.as_ref().expect("PgBouncer started")
    }

    /// A fake member `name` (a banner server) and its key value.
    fn member(&mut self, name: &str, role: &str) -> String {
        let b = self
            .backends
            .entry(name.to_string())
            .or_insert_with(|| TcpBackend::start(name));
        member_json(b.port(), role)
    }

    fn port_of(&self, name: &str) -> u16 {
        self.backends[name].port()
    }

    /// The ops putting cluster `at` (`scope` or `scope/group`) with members `names`, the first
    /// the leader (no leader key when `leader` is false).
    fn cluster_ops(&mut self, at: &str, names: &[&str], leader: bool) -> Vec<TxnOp> {
        let mut ops = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let role = if i == 0 && leader {
                "master"
            } else {
                "replica"
            };
            let v = self.member(n, role);
            ops.push(put(format!("{}/{at}/members/{n}", self.ns), v));
        }
        if leader {
            ops.push(put(
                format!("{}/{at}/leader", self.ns),
                names[0].to_string(),
            ));
        }
        ops
    }

    /// Puts cluster `at` with two members: `<prefix>1` the leader, `<prefix>2` a replica.
    fn put_cluster(&mut self, at: &str, prefix: &str) {
        let (a, b) = (format!("{prefix}1"), format!("{prefix}2"));
        let ops = self.cluster_ops(at, &[&a, &b], true);
        txn(self.etcd(), ops);
    }

    /// haconfd.toml, with reload actions once HAProxy and PgBouncer run. `extra_clusters` adds
    /// `[clusters.*]` text (a table added later by SIGHUP).
    fn write_config(&self, extra_clusters: &str) {
        let mut t = String::new();
        t.push_str(&format!(
            "[etcd]\nendpoints = [{}]\nnamespace = {}\ndiscover = true\n\
             connect_timeout = \"1s\"\nrequest_timeout = \"2s\"\n\n\
             [daemon]\nmin_interval = \"100ms\"\nretry_interval = \"1s\"\n\n\
             [http]\nlisten = \"127.0.0.1:{}\"\n\n\
             [failover]\nenabled = false\n\n\
             [vars]\nstats_socket = {}\npgb_port = {}\npgb_dir = {}\n\
             bind_address = \"127.0.0.1\"\nstats_port = {}\n\n",
            toml_str(self.etcd().endpoint()),
            toml_str(&self.ns),
            self.http_port,
            toml_str(self.admin_sock().display().to_string()),
            self.pgb_port,
            toml_str(self.path("pgb").display().to_string()),
            self.stats_port,
        ));
        for (scope, p) in &self.ports {
            t.push_str(&format!(
                "[clusters.{scope}]\nprimary_port = {}\nreplica_port = {}\ndatabases = [\"{scope}_db\"]\n\n",
                p.primary, p.replica
            ));
        }
        if !self.citus_ports.is_empty() {
            t.push_str(&format!(
                "[clusters.citus]\ngroup_ports = {:?}\ndatabases = [\"citus_db\"]\n\n",
                self.citus_ports
            ));
        }
        t.push_str(extra_clusters);
        t.push_str(&self.extra);
        let haproxy_bin = require_bin("haproxy").display().to_string();
        let hap_reload = self.haproxy.as_ref().map(|h| {
            format!(
                "reload = {{ master_socket = {}, timeout = \"10s\" }}\n",
                toml_str(h.master_socket().display().to_string())
            )
        });
        let main = |name: &str, src: &str, dest: PathBuf, check: String| {
            format!(
                "[[template]]\nname = \"{name}\"\nsrc = {}\ndest = {}\ncheck = {check}\n{}\n",
                toml_str(self.path(src).display().to_string()),
                toml_str(dest.display().to_string()),
                hap_reload.clone().unwrap_or_default()
            )
        };
        if self.per_cluster {
            let main_cfg = self.path("main.cfg").display().to_string();
            t.push_str(&main(
                "main",
                "main.cfg.tera",
                self.path("main.cfg"),
                format!(
                    "[{}, \"-c\", \"-f\", \"{{{{staged}}}}\"]",
                    toml_str(&haproxy_bin)
                ),
            ));
            t.push_str(&main(
                "haproxy",
                "one.cfg.tera",
                self.path("conf.d/{scope}.cfg"),
                format!(
                    "[{}, \"-c\", \"-f\", {}, \"-f\", \"{{{{staged}}}}\"]",
                    toml_str(&haproxy_bin),
                    toml_str(&main_cfg)
                ),
            ));
        } else if self.shipped {
            let src =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy-clusters.cfg.tera");
            t.push_str(&format!(
                "[[template]]\nname = \"haproxy\"\nsrc = {}\ndest = {}\n\
                 check = [{}, \"-c\", \"-f\", \"{{{{staged}}}}\"]\n{}\
                 server_state = {{ stats_socket = {}, file = {}, primary_backends = [\"{{scope}}_primary\"], replica_backends = [\"{{scope}}_replicas\"] }}\n\n",
                toml_str(src.display().to_string()),
                toml_str(self.haproxy_cfg().display().to_string()),
                toml_str(&haproxy_bin),
                hap_reload.clone().unwrap_or_default(),
                toml_str(self.admin_sock().display().to_string()),
                toml_str(self.path("server-state").display().to_string()),
            ));
        } else {
            t.push_str(&main(
                "haproxy",
                "all.cfg.tera",
                self.haproxy_cfg(),
                format!(
                    "[{}, \"-c\", \"-f\", \"{{{{staged}}}}\"]",
                    toml_str(&haproxy_bin)
                ),
            ));
        }
        t.push_str(&format!(
            "[[template]]\nname = \"pgbouncer\"\nsrc = {}\ndest = {}\nrequire_leader = true\n",
            toml_str(self.path("pgbouncer.ini.tera").display().to_string()),
            toml_str(self.pgb_ini().display().to_string()),
        ));
        if self.pgbouncer.is_some() {
            t.push_str(&format!(
                "reload = {{ pidfile = {}, signal = \"SIGHUP\", process = \"pgbouncer\" }}\n",
                toml_str(self.path("pgb/pgbouncer.pid").display().to_string())
            ));
        }
        let path = self.path("haconfd.toml");
        let tmp = self.path("haconfd.toml.tmp");
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// `haconfd once --no-reload` (the first files), HAProxy and PgBouncer on them, then
    /// `haconfd run` with the reload actions; waits for its first pass.
    fn start(&mut self) {
        self.write_config("");
        haconfd_once_no_reload(&self.path("haconfd.toml"));
        self.haproxy = Some(if self.per_cluster {
            let confd = self.path("conf.d").display().to_string();
            Haproxy::try_start(&self.path("main.cfg"), &["-f", &confd])
                .unwrap_or_else(|e| panic!("{e}"))
        } else {
            Haproxy::start(&self.haproxy_cfg())
        });
        give_to_postgres(&self.path("pgb"));
        self.pgbouncer = Some(Pgbouncer::start(&self.pgb_ini()));
        self.write_config("");
        let mut cmd = Command::new(haconfd_bin());
        cmd.arg("-c").arg(self.path("haconfd.toml")).args([
            "run",
            "--log-format",
            "json",
            "--log-level",
            "haconfd=debug",
        ]);
        self.haconfd = Some(Proc::spawn_logged("haconfd", cmd, &self.log_path()));
        assert!(
            wait_until(Duration::from_secs(15), || {
                let l = self.log();
                l.contains("pass: nothing changed") || l.contains("pass applied")
            }),
            "haconfd run did not finish a first pass:\n{}",
            self.diag()
        );
    }

    /// HAProxy's reload counter; retried while the master re-executes (its CLI drops
    /// connections for that moment).
    fn haproxy_reloads(&self) -> u32 {
        let mut n = None;
        wait_until(Duration::from_secs(5), || {
            n = self.haproxy().try_show_proc().map(|p| p.reloads());
            n.is_some()
        });
        n.unwrap_or_else(|| panic!("no `show proc` answer:\n{}", self.diag()))
    }

    /// SIGHUPs in PgBouncer's logfile (its stderr repeats each line: not counted).
    fn pgbouncer_reloads(&self) -> usize {
        std::fs::read_to_string(self.path("pgb/pgbouncer.log"))
            .unwrap_or_default()
            .matches("got SIGHUP")
            .count()
    }

    fn status(&self) -> serde_json::Value {
        let (_, body) = http_get(self.http_port, "/status").expect("/status answers");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics").expect("/metrics").1
    }

    /// haconfd's count of reloads of target `name` in `/status`.
    fn status_reloads(&self, name: &str) -> u64 {
        self.status()["targets"][name]["reloads"]
            .as_u64()
            .unwrap_or(0)
    }

    /// `/status`'s entry of cluster `scope` (the ordinary one, or group `group`).
    fn status_cluster(&self, scope: &str, group: Option<u64>) -> Option<serde_json::Value> {
        self.status()["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["scope"] == scope && c["group"].as_u64() == group)
            .cloned()
    }

    /// `SHOW DATABASES` port of PgBouncer's database `db`.
    fn pgb_port_of(&self, db: &str) -> Option<u16> {
        self.pgbouncer()
            .show_databases()
            .get(db)
            .and_then(|r| r.get("port"))
            .and_then(|p| p.parse().ok())
    }

    /// Waits until PgBouncer's live `db` points at port `want`.
    fn wait_pgb(&self, db: &str, want: u16) {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(10), || {
            last = self.pgb_port_of(db);
            last == Some(want)
        });
        assert!(
            ok,
            "PgBouncer's {db} points at {last:?}, not {want}:\n{}",
            self.diag()
        );
    }

    /// Waits (10 s) until `f` holds for haproxy.cfg (or `file`).
    fn wait_file(&self, file: &Path, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        let ok = wait_until(Duration::from_secs(10), || {
            text = std::fs::read_to_string(file).unwrap_or_default();
            f(&text)
        });
        assert!(
            ok,
            "{} never {what}:\n{text}\n{}",
            file.display(),
            self.diag()
        );
        text
    }

    /// Waits until HAProxy's reload counter reaches `n` (a new worker up), then a quiet spell
    /// in which it must not move further: exactly `n`.
    fn assert_haproxy_reloads(&self, n: u32, why: &str) {
        assert!(
            self.haproxy().wait_reloads(n, Duration::from_secs(10)),
            "HAProxy never reached {n} reloads ({why}):\n{}",
            self.diag()
        );
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            self.haproxy_reloads(),
            n,
            "HAProxy reloads ({why}):\n{}",
            self.diag()
        );
        assert_eq!(self.haproxy().failed_reloads(), 0, "{}", self.diag());
    }

    fn diag(&self) -> String {
        let files: Vec<String> = if self.per_cluster {
            std::fs::read_dir(self.path("conf.d"))
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .map(|e| format!("--- {}:\n{}", e.path().display(), read(&e.path())))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            vec![format!(
                "--- haproxy.cfg:\n{}",
                std::fs::read_to_string(self.haproxy_cfg()).unwrap_or_default()
            )]
        };
        format!(
            "{}\n--- pgbouncer.ini:\n{}\n--- haproxy log (tail):\n{}\n--- haconfd log (tail):\n{}",
            files.join("\n"),
            std::fs::read_to_string(self.pgb_ini()).unwrap_or_default(),
            self.haproxy
                .as_ref()
                .map(|h| tail(&h.log(), 15))
                .unwrap_or_default(),
            tail(&self.log(), 40)
        )
    }
}

/// The three ordinary clusters, the Citus one and (unconfigured) `stray`, as in the store.
fn populate(rig: &mut Rig, stray: bool) {
    for s in ["alpha", "beta", "gamma"] {
        if rig.ports.contains_key(s) {
            rig.put_cluster(s, s);
        }
    }
    if !rig.citus_ports.is_empty() {
        for g in 0..3 {
            rig.put_cluster(&format!("citus/{g}"), &format!("citus{g}w"));
        }
    }
    if stray {
        rig.put_cluster("stray", "stray");
    }
}

// ---------------------------------------------------------------------------------- the tests

#[test]
fn one_haproxy_cfg_holds_every_configured_cluster_and_no_port_for_an_unconfigured_one() {
    let t0 = Instant::now();
    let mut rig = Rig::new("clu-all", &["alpha", "beta", "gamma"], true, false);
    populate(&mut rig, true);
    rig.start();

    let cfg = read(&rig.haproxy_cfg());
    let mut want: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .flat_map(|s| [format!("{s}_primary"), format!("{s}_replicas")])
        .collect();
    want.extend((0..3).map(|g| format!("citus_g{g}_primary")));
    want.sort();
    let mut have = listeners(&cfg);
    have.sort();
    assert_eq!(have, want, "listeners of haproxy.cfg:\n{cfg}");
    assert!(
        !cfg.contains("stray"),
        "the unconfigured cluster is in haproxy.cfg:\n{cfg}"
    );
    let (ok, out) = Haproxy::check_config(&rig.haproxy_cfg());
    assert!(ok, "haproxy -c refused the file: {out}\n{cfg}");
    // Every configured cluster routes through its own ports, to its own leader and replicas.
    for s in ["alpha", "beta", "gamma"] {
        let p = rig.ports[s].clone();
        wait_banner(p.primary, &format!("{s}1"), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{s}: {e}\n{}", rig.diag()));
        wait_banner(p.replica, &format!("{s}2"), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{s}: {e}\n{}", rig.diag()));
        assert_eq!(
            rig.pgb_port_of(&format!("{s}_db")),
            Some(rig.port_of(&format!("{s}1")))
        );
    }
    assert_eq!(rig.pgb_port_of("citus_db"), Some(rig.port_of("citus0w1")));
    let ini = read(&rig.pgb_ini());
    assert!(!ini.contains("stray"), "pgbouncer.ini:\n{ini}");

    // The unconfigured cluster: in the log, /status and /metrics.
    let log = rig.log();
    assert!(
        log.lines()
            .any(|l| l.contains("no [clusters.stray] table") && l.contains("stray")),
        "no log line about the unconfigured cluster:\n{}",
        tail(&log, 40)
    );
    let stray = rig
        .status_cluster("stray", None)
        .unwrap_or_else(|| panic!("/status does not list stray:\n{}", rig.status()));
    assert_eq!(stray["configured"], false, "{stray}");
    assert_eq!(stray["leader"], "stray1", "{stray}");
    assert_eq!(stray["members"], 2, "{stray}");
    let alpha = rig.status_cluster("alpha", None).expect("alpha in /status");
    assert_eq!(alpha["configured"], true, "{alpha}");
    for g in 0..3 {
        let c = rig
            .status_cluster("citus", Some(g))
            .unwrap_or_else(|| panic!("/status lacks citus group {g}:\n{}", rig.status()));
        assert_eq!(c["leader"], format!("citus{g}w1"), "{c}");
    }
    let metrics = rig.metrics();
    assert!(
        metrics.lines().any(|l| l.contains("cluster_configured{")
            && l.contains("scope=\"stray\"")
            && l.ends_with(" 0")),
        "no cluster_configured 0 for stray in /metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("configured"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Changes in two clusters in one pass: one HAProxy reload, one PgBouncer reload.
    let hap0 = rig.haproxy_reloads();
    let pgb0 = rig.pgbouncer_reloads();
    let st_hap0 = rig.status_reloads("haproxy");
    let st_pgb0 = rig.status_reloads("pgbouncer");
    let mut ops = rig.cluster_ops("alpha", &["alpha3"], false);
    // beta: beta2 takes over.
    ops.extend(rig.cluster_ops("beta", &["beta2", "beta1"], true));
    txn(rig.etcd(), ops);
    let cfg = rig.wait_file(
        &rig.haproxy_cfg(),
        "listed alpha3 and beta2 as beta's primary",
        |c| {
            servers_of(c, "alpha_replicas").contains(&"alpha3".to_string())
                && servers_of(c, "beta_primary") == ["beta2"]
        },
    );
    rig.assert_haproxy_reloads(
        hap0 + 1,
        "alpha gained a member and beta changed leader in one pass",
    );
    assert!(
        wait_until(Duration::from_secs(5), || rig.pgbouncer_reloads() > pgb0),
        "PgBouncer was not reloaded:\n{}",
        rig.diag()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.pgbouncer_reloads(), pgb0 + 1, "{}", rig.diag());
    assert_eq!(
        rig.status_reloads("haproxy"),
        st_hap0 + 1,
        "{}",
        rig.status()
    );
    assert_eq!(
        rig.status_reloads("pgbouncer"),
        st_pgb0 + 1,
        "{}",
        rig.status()
    );
    rig.wait_pgb("beta_db", rig.port_of("beta2"));
    assert_eq!(rig.pgb_port_of("alpha_db"), Some(rig.port_of("alpha1")));
    wait_banner(rig.ports["beta"].primary, "beta2", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    assert!(!cfg.contains("stray"), "{cfg}");
    println!(
        "RESULT clusters_one_file listeners={} took={:.1}s",
        have.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn an_emptied_cluster_keeps_its_section_while_another_clusters_new_member_goes_in() {
    let mut rig = Rig::new("clu-empty", &["alpha", "beta", "gamma"], false, false);
    populate(&mut rig, false);
    rig.start();
    let hap0 = rig.haproxy_reloads();
    let pgb_ini = read(&rig.pgb_ini());

    // alpha's keys all go and beta gains a member, in one revision.
    let mut ops = vec![delete_prefix(format!("{}/alpha/", rig.ns))];
    ops.extend(rig.cluster_ops("beta", &["beta3"], false));
    txn(rig.etcd(), ops);
    let cfg = rig.wait_file(&rig.haproxy_cfg(), "listed beta3", |c| {
        servers_of(c, "beta_replicas").contains(&"beta3".to_string())
    });
    assert_eq!(servers_of(&cfg, "alpha_primary"), ["alpha1"], "{cfg}");
    assert_eq!(servers_of(&cfg, "alpha_replicas"), ["alpha2"], "{cfg}");
    rig.assert_haproxy_reloads(hap0 + 1, "beta gained a member");
    wait_banner(rig.ports["alpha"].primary, "alpha1", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("alpha's section must still route: {e}\n{}", rig.diag()));
    assert_eq!(read(&rig.pgb_ini()), pgb_ini, "pgbouncer.ini changed");
    assert_eq!(rig.pgb_port_of("alpha_db"), Some(rig.port_of("alpha1")));
    // /status says why alpha's section is held.
    let mut alpha = None;
    wait_until(Duration::from_secs(5), || {
        alpha = rig.status_cluster("alpha", None);
        alpha.as_ref().is_some_and(|a| a["refused"].is_string())
    });
    let alpha = alpha.unwrap_or_else(|| panic!("alpha gone from /status:\n{}", rig.status()));
    assert!(alpha["refused"].is_string(), "alpha not refused: {alpha}");
    assert_eq!(alpha["members"], 0, "{alpha}");

    // Still true a few passes later (a heartbeat in gamma runs another pass).
    let v = rig.member("gamma2", "replica");
    rig.etcd()
        .put(&format!("{}/gamma/members/gamma2", rig.ns), &v);
    std::thread::sleep(Duration::from_millis(500));
    let cfg = read(&rig.haproxy_cfg());
    assert_eq!(servers_of(&cfg, "alpha_primary"), ["alpha1"], "{cfg}");
}

#[test]
fn a_leaderless_cluster_keeps_pgbouncer_on_its_last_leader_while_another_leader_change_goes_in() {
    let mut rig = Rig::new("clu-lead", &["alpha", "beta", "gamma"], false, false);
    populate(&mut rig, false);
    rig.start();
    let pgb0 = rig.pgbouncer_reloads();

    // alpha loses its leader (alpha1 now a replica, no leader key) while beta2 takes over beta.
    let mut ops = vec![TxnOp::delete(format!("{}/alpha/leader", rig.ns), None)];
    ops.extend(rig.cluster_ops("alpha", &["alpha1", "alpha2"], false));
    ops.extend(rig.cluster_ops("beta", &["beta2", "beta1"], true));
    txn(rig.etcd(), ops);
    let ini = rig.wait_file(&rig.pgb_ini(), "pointed beta_db at beta2", |t| {
        t.contains(&format!(
            "beta_db = host=127.0.0.1 port={} ",
            rig.port_of("beta2")
        ))
    });
    assert!(
        ini.contains(&format!(
            "alpha_db = host=127.0.0.1 port={} ",
            rig.port_of("alpha1")
        )),
        "alpha_db must keep alpha's last leader:\n{ini}"
    );
    rig.wait_pgb("beta_db", rig.port_of("beta2"));
    assert_eq!(
        rig.pgb_port_of("alpha_db"),
        Some(rig.port_of("alpha1")),
        "{}",
        rig.diag()
    );
    assert_eq!(rig.pgb_port_of("gamma_db"), Some(rig.port_of("gamma1")));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.pgbouncer_reloads(), pgb0 + 1, "{}", rig.diag());
    // haproxy.cfg (no require_leader) shows what etcd shows: alpha has no primary now.
    let cfg = rig.wait_file(&rig.haproxy_cfg(), "followed both clusters", |c| {
        servers_of(c, "beta_primary") == ["beta2"] && servers_of(c, "alpha_primary").is_empty()
    });
    assert_eq!(servers_of(&cfg, "gamma_primary"), ["gamma1"], "{cfg}");
    let alpha = rig.status_cluster("alpha", None).expect("alpha in /status");
    assert!(alpha["leader"].is_null(), "{alpha}");
    assert!(alpha["refused"].is_null(), "{alpha}");
}

#[test]
fn a_per_cluster_dest_gives_each_configured_cluster_its_file_and_a_new_one_without_restart() {
    let mut rig = Rig::new("clu-dir", &["alpha", "beta", "gamma", "delta"], false, true);
    // delta is configured but not in the store yet; epsilon is in the store, not configured.
    for s in ["alpha", "beta", "gamma"] {
        rig.put_cluster(s, s);
    }
    rig.put_cluster("epsilon", "epsilon");
    rig.start();
    let pid = rig.haconfd.as_ref().unwrap().pid();
    for s in ["alpha", "beta", "gamma"] {
        let f = read(&rig.confd(s));
        assert_eq!(
            servers_of(&f, &format!("{s}_primary")),
            [format!("{s}1")],
            "{f}"
        );
        wait_banner(
            rig.ports[s].primary,
            &format!("{s}1"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    }
    for s in ["delta", "epsilon"] {
        assert!(!rig.confd(s).exists(), "{s} got a file:\n{}", rig.diag());
    }
    let mut names: Vec<String> = std::fs::read_dir(rig.path("conf.d"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["alpha.cfg", "beta.cfg", "gamma.cfg"],
        "no other file in conf.d"
    );

    // delta's keys appear: its file comes, HAProxy reloads once and routes to it.
    let hap0 = rig.haproxy_reloads();
    rig.put_cluster("delta", "delta");
    rig.wait_file(&rig.confd("delta"), "appeared", |f| {
        servers_of(f, "delta_primary") == ["delta1"]
    });
    rig.assert_haproxy_reloads(hap0 + 1, "delta appeared");
    wait_banner(rig.ports["delta"].primary, "delta1", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));

    // epsilon gets a [clusters.epsilon] table and haconfd a SIGHUP: its file comes.
    let (ep, er) = (free_port(), free_port());
    rig.write_config(&format!(
        "[clusters.epsilon]\nprimary_port = {ep}\nreplica_port = {er}\ndatabases = [\"epsilon_db\"]\n\n"
    ));
    rig.haconfd
        .as_ref()
        .unwrap()
        .signal(Signal::SIGHUP)
        .expect("SIGHUP haconfd");
    rig.wait_file(&rig.confd("epsilon"), "appeared after the SIGHUP", |f| {
        servers_of(f, "epsilon_primary") == ["epsilon1"]
    });
    wait_banner(ep, "epsilon1", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    rig.wait_pgb("epsilon_db", rig.port_of("epsilon1"));
    assert_eq!(rig.haconfd.as_ref().unwrap().pid(), pid);
    assert!(rig.haconfd.as_ref().unwrap().is_running(), "{}", rig.diag());
    // The others' files are untouched by all this and still route.
    for s in ["alpha", "beta", "gamma"] {
        wait_banner(
            rig.ports[s].primary,
            &format!("{s}1"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    }
    let (ok, out) = {
        let mut cmd = Command::new(require_bin("haproxy"));
        cmd.arg("-c")
            .arg("-f")
            .arg(rig.path("main.cfg"))
            .arg("-f")
            .arg(rig.path("conf.d"));
        let o = run_with_timeout(&mut cmd, Duration::from_secs(20)).expect("haproxy -c");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    assert!(ok, "haproxy -c -f main.cfg -f conf.d/: {out}");
}

#[test]
fn a_citus_cluster_routes_its_coordinator_and_every_worker_groups_primary() {
    let mut rig = Rig::new("clu-citus", &["alpha"], true, false);
    populate(&mut rig, false);
    rig.start();
    let cfg = read(&rig.haproxy_cfg());
    for g in 0..3 {
        assert_eq!(
            servers_of(&cfg, &format!("citus_g{g}_primary")),
            [format!("citus{g}w1")],
            "{cfg}"
        );
        wait_banner(
            rig.citus_ports[g],
            &format!("citus{g}w1"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("group {g}: {e}\n{}", rig.diag()));
    }
    assert_eq!(rig.pgb_port_of("citus_db"), Some(rig.port_of("citus0w1")));

    // Worker group 2 changes primary: only its port moves; the coordinator and group 1 stay.
    let hap0 = rig.haproxy_reloads();
    let ops = rig.cluster_ops("citus/2", &["citus2w2", "citus2w1"], true);
    txn(rig.etcd(), ops);
    rig.wait_file(&rig.haproxy_cfg(), "moved group 2", |c| {
        servers_of(c, "citus_g2_primary") == ["citus2w2"]
    });
    rig.assert_haproxy_reloads(hap0 + 1, "one group's leader changed");
    wait_banner(rig.citus_ports[2], "citus2w2", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    for g in 0..2 {
        wait_banner(
            rig.citus_ports[g],
            &format!("citus{g}w1"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("group {g}: {e}\n{}", rig.diag()));
    }
    // The coordinator changes primary: PgBouncer's citus database follows it.
    let ops = rig.cluster_ops("citus/0", &["citus0w2", "citus0w1"], true);
    txn(rig.etcd(), ops);
    rig.wait_pgb("citus_db", rig.port_of("citus0w2"));
    wait_banner(rig.citus_ports[0], "citus0w2", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.diag()));
    assert_eq!(rig.pgb_port_of("alpha_db"), Some(rig.port_of("alpha1")));
}

/// One stray key in a Citus scope (a node that joined without its `citus:` section), or
/// ordinary keys next to the groups: the groups stay, with their listeners and leaders, and the
/// stray keys are named in a warning.
#[test]
fn clusters_created_and_deleted_with_new_names_leave_status_metrics_templates_and_the_state_file() {
    let mut rig = Rig::new("clu-churn", &["alpha"], false, false);
    let (list, state) = (rig.path("list.txt"), rig.path("members.json"));
    std::fs::write(
        rig.path("list.tera"),
        "{% for c in clusters %}{{ c.scope }}:{% for m in c.members %} {{ m.name }}{% endfor %}\n{% endfor %}",
    )
    .unwrap();
    rig.extra = format!(
        "[guard]\ngone_after = \"1s\"\nstate_file = {}\n\n[[template]]\nname = \"list\"\nsrc = {}\ndest = {}\n\n",
        toml_str(state.display().to_string()),
        toml_str(rig.path("list.tera").display().to_string()),
        toml_str(list.display().to_string()),
    );
    populate(&mut rig, false);
    rig.start();
    // Twenty short-lived clusters, each with a name of its own: created, seen, deleted.
    for i in 0..20 {
        let scope = format!("t{i:02}");
        rig.put_cluster(&scope, &scope);
        let seen = wait_until(Duration::from_secs(5), || {
            read(&list).contains(&format!("{scope}: {scope}1"))
        });
        assert!(seen, "{scope} never rendered:\n{}", rig.diag());
        txn(
            rig.etcd(),
            vec![delete_prefix(format!("{}/{scope}/", rig.ns))],
        );
    }
    let mut last = String::new();
    let forgotten = wait_until(Duration::from_secs(15), || {
        last = read(&list);
        last == "alpha: alpha1 alpha2\n"
    });
    assert!(
        forgotten,
        "the deleted clusters stay in the template:\n{last}\n{}",
        rig.diag()
    );
    // The file is written within the pass, /status is updated when the pass is over.
    let mut scopes: Vec<String> = Vec::new();
    let only_alpha = wait_until(Duration::from_secs(5), || {
        scopes = rig.status()["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["scope"].as_str().unwrap().to_owned())
            .collect();
        scopes == ["alpha"]
    });
    assert!(only_alpha, "/status still lists them: {scopes:?}");
    let metrics = rig.metrics();
    assert!(
        !metrics.contains("scope=\"t0"),
        "label sets stay:\n{metrics}"
    );
    let remembered = read(&state);
    assert!(
        !remembered.contains("\"t0"),
        "the state file keeps them: {remembered}"
    );
    assert_eq!(rig.status()["last_pass_ok"], true, "{}", rig.diag());
    assert!(
        rig.log()
            .contains("cluster gone from the store for guard.gone_after: forgotten"),
        "{}",
        rig.diag()
    );
}

#[test]
fn a_stray_key_in_a_citus_scope_keeps_every_group_and_is_named_in_a_warning() {
    let mut rig = Rig::new("clu-stray", &["alpha"], true, false);
    populate(&mut rig, false);
    rig.start();
    let before = read(&rig.haproxy_cfg());
    for g in 0..3 {
        assert_eq!(
            servers_of(&before, &format!("citus_g{g}_primary")),
            [format!("citus{g}w1")]
        );
    }
    let stray = rig.member("citusstray", "replica");
    rig.etcd()
        .put(&format!("{}/citus/members/stray", rig.ns), &stray);
    std::thread::sleep(Duration::from_millis(1500));
    let after = read(&rig.haproxy_cfg());
    for g in 0..3 {
        assert_eq!(
            servers_of(&after, &format!("citus_g{g}_primary")),
            [format!("citus{g}w1")],
            "group {g} lost its listener after a stray key:\n{after}\n{}",
            rig.diag()
        );
        let c = rig
            .status_cluster("citus", Some(g))
            .unwrap_or_else(|| panic!("/status lacks citus group {g}:\n{}", rig.status()));
        assert_eq!(c["leader"], format!("citus{g}w1"), "{c}");
    }
    assert_eq!(rig.pgb_port_of("citus_db"), Some(rig.port_of("citus0w1")));
    let log = rig.log();
    assert!(
        log.contains("ordinary Patroni keys in a Citus scope") && log.contains("members/stray"),
        "no warning naming the stray key:\n{}",
        rig.diag()
    );
}

/// With the shipped `haproxy-clusters.cfg.tera` and `server_state` per scope, a member joining
/// one of the clusters behind one HAProxy reaches it through its runtime API: no reload, the
/// live servers of every backend as the file says. (The rig's members have no REST API, so the
/// shipped template's checks keep them DOWN: routing is `tests/e2e_clusters.rs`'s.)
#[test]
fn members_of_several_clusters_reach_one_haproxy_through_the_runtime_api_without_a_reload() {
    let mut rig = Rig::new("clu-members", &["alpha", "beta"], false, false);
    rig.shipped = true;
    populate(&mut rig, false);
    rig.start();
    let before = rig.haproxy_reloads();
    let agree = |rig: &Rig| {
        let dump = unix_cmd(
            &rig.admin_sock(),
            "show servers state",
            Duration::from_secs(2),
        )
        .unwrap_or_default();
        let cfg = read(&rig.haproxy_cfg());
        ["alpha", "beta"].iter().all(|s| {
            [format!("{s}_primary"), format!("{s}_replicas")]
                .iter()
                .all(|b| {
                    let mut live: Vec<String> = dump
                        .lines()
                        .map(|l| l.split_whitespace().collect::<Vec<_>>())
                        .filter(|f| f.len() >= 19 && f[1] == b.as_str())
                        // Parked when it left (forced maintenance, HAProxy before 2.9).
                        .filter(|f| f[6].parse::<u32>().unwrap_or(0) & 1 == 0)
                        .map(|f| f[3].to_owned())
                        .collect();
                    live.sort();
                    live == servers_of(&cfg, b)
                })
        })
    };
    let json = rig.member("alpha3", "replica");
    rig.etcd()
        .put(&format!("{}/alpha/members/alpha3", rig.ns), &json);
    assert!(
        wait_until(Duration::from_secs(10), || read(&rig.haproxy_cfg())
            .contains("server alpha3 ")
            && agree(&rig)),
        "alpha3 did not reach HAProxy:\n{}",
        rig.diag()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.haproxy_reloads(), before, "{}", rig.diag());
    assert!(rig
        .log()
        .contains("member change applied through HAProxy's runtime API"));
    // A member leaving: through the runtime API, deleted from HAProxy 2.9 on, parked in
    // maintenance before (its `del server` can crash a worker with streams on the server).
    rig.etcd().delete(&format!("{}/beta/members/beta2", rig.ns));
    assert!(
        wait_until(Duration::from_secs(10), || !read(&rig.haproxy_cfg())
            .contains("server beta2 ")
            && agree(&rig)),
        "beta2 did not leave HAProxy:\n{}",
        rig.diag()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rig.haproxy_reloads(), before, "{}", rig.diag());
}

#[test]
fn the_shipped_templates_give_every_configured_cluster_and_citus_group_its_listeners_and_pass_haproxy_check(
) {
    let mut rig = Rig::new("clu-shipped", &["alpha", "beta", "gamma"], true, false);
    populate(&mut rig, true);
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    let (cp, wp) = (free_port(), free_port());
    let haproxy_bin = toml_str(require_bin("haproxy").display().to_string());
    let p = |rel: &str| toml_str(rig.path(rel).display().to_string());
    let s = |name: &str| toml_str(shipped.join(name).display().to_string());
    let mut t = format!(
        "[etcd]\nendpoints = [{}]\nnamespace = {}\ndiscover = true\n\n\
         [vars]\nbind_address = \"127.0.0.1\"\nstats_port = {}\nstats_socket = {}\n\n",
        toml_str(rig.etcd().endpoint()),
        toml_str(&rig.ns),
        free_port(),
        p("admin.sock"),
    );
    for (scope, ports) in &rig.ports {
        t.push_str(&format!(
            "[clusters.{scope}]\nprimary_port = {}\nreplica_port = {}\ndatabases = [\"{scope}_db\"]\n\n",
            ports.primary, ports.replica
        ));
    }
    t.push_str(&format!(
        "[clusters.citus]\ncoordinator_port = {cp}\nworkers_port = {wp}\ndatabases = [\"citus_db\"]\n\n"
    ));
    for (name, src, dest) in [
        ("haproxy", "haproxy-clusters.cfg.tera", "haproxy.cfg"),
        ("citus", "haproxy-citus.cfg.tera", "citus.cfg"),
    ] {
        t.push_str(&format!(
            "[[template]]\nname = \"{name}\"\nsrc = {}\ndest = {}\n\
             check = [{haproxy_bin}, \"-c\", \"-f\", \"{{{{staged}}}}\"]\n\n",
            s(src),
            p(dest)
        ));
    }
    t.push_str(&format!(
        "[[template]]\nname = \"pgbouncer\"\nsrc = {}\ndest = {}\nrequire_leader = true\n",
        s("pgbouncer-clusters.ini.tera"),
        p("pgbouncer.ini")
    ));
    std::fs::write(rig.path("shipped.toml"), t).unwrap();
    haconfd_once_no_reload(&rig.path("shipped.toml"));
    let cfg = read(&rig.path("haproxy.cfg"));
    let mut have = listeners(&cfg);
    have.sort();
    let mut want: Vec<String> = ["alpha", "beta", "gamma"]
        .iter()
        .flat_map(|s| [format!("{s}_primary"), format!("{s}_replicas")])
        .collect();
    want.push("stats".into());
    want.sort();
    assert_eq!(
        have, want,
        "haproxy.cfg from haproxy-clusters.cfg.tera:\n{cfg}"
    );
    for s in ["alpha", "beta", "gamma"] {
        assert_eq!(
            servers_of(&cfg, &format!("{s}_primary")),
            [format!("{s}1"), format!("{s}2")],
            "{cfg}"
        );
        assert!(
            cfg.contains(&format!("bind 127.0.0.1:{}", rig.ports[s].primary)),
            "{cfg}"
        );
    }
    assert!(
        !cfg.lines().any(|l| l.starts_with("listen stray")),
        "the unconfigured cluster got a listener:\n{cfg}"
    );
    let (ok, out) = Haproxy::check_config(&rig.path("haproxy.cfg"));
    assert!(ok, "haproxy -c: {out}\n{cfg}");
    // The Citus template: the coordinator (group 0) and the workers of groups 1 and 2.
    let citus = read(&rig.path("citus.cfg"));
    assert_eq!(
        servers_of(&citus, "citus_coordinator"),
        ["citus0w1", "citus0w2"],
        "{citus}"
    );
    assert_eq!(
        servers_of(&citus, "citus_workers"),
        ["citus1w1", "citus1w2", "citus2w1", "citus2w2"],
        "{citus}"
    );
    for g in 0..3 {
        assert!(
            citus.contains(&format!("# group {g}, leader citus{g}w1")),
            "group {g}'s primary is not named:\n{citus}"
        );
    }
    let (ok, out) = Haproxy::check_config(&rig.path("citus.cfg"));
    assert!(ok, "haproxy -c on citus.cfg: {out}\n{citus}");
    let ini = read(&rig.path("pgbouncer.ini"));
    for (db, leader) in [
        ("alpha_db", "alpha1"),
        ("beta_db", "beta1"),
        ("gamma_db", "gamma1"),
        ("citus_db", "citus0w1"),
    ] {
        assert!(
            ini.contains(&format!(
                "{db} = host=127.0.0.1 port={} dbname={db}",
                rig.port_of(leader)
            )),
            "{db} not on {leader}:\n{ini}"
        );
    }
    assert!(!ini.contains("stray_db"), "{ini}");
}
