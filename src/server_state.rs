//! Keeps HAProxy's `server-state-file` right, so that no server takes traffic its role forbids
//! after a reload or a cold start. A new worker starts every server UP (measured: 297 failed writes
//! in 20 reloads without this). Just before a reload haconfd dumps `show servers state`, drops the
//! lines whose address or port no longer match the new config (a saved port would override the
//! configured one), forces DOWN every server that etcd says must not serve in its backend, and adds
//! a DOWN line for each forbidden server HAProxy has never seen. Between reloads the file holds the
//! same etcd view, so a cold start after a switchover or a stale file from an earlier run cannot
//! send writes to a replica either. Permitted servers without saved state get no line: they start
//! UP, and their checks confirm them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, Retired};
use crate::model::Cluster;
use crate::target::SCOPE_PLACEHOLDER;

/// `server_state = {...}`: HAProxy's `server-state-file` kept right across reloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerStateConfig {
    /// The admin stats socket (`stats socket ... level admin`).
    pub stats_socket: PathBuf,
    /// The file named by `server-state-file` in the global section.
    pub file: PathBuf,
    /// Backends that must route to the leader only.
    #[serde(default = "default_primary_backends")]
    pub primary_backends: Vec<String>,
    /// Backends that must route to replicas only.
    #[serde(default = "default_replica_backends")]
    pub replica_backends: Vec<String>,
}

impl ServerStateConfig {
    /// The settings for one cluster's backends: `{scope}` in their names replaced.
    pub fn for_scope(&self, scope: &str) -> ServerStateConfig {
        let fill = |names: &[String]| {
            names
                .iter()
                .map(|b| b.replace(SCOPE_PLACEHOLDER, scope))
                .collect()
        };
        ServerStateConfig {
            primary_backends: fill(&self.primary_backends),
            replica_backends: fill(&self.replica_backends),
            ..self.clone()
        }
    }
}

fn default_primary_backends() -> Vec<String> {
    vec!["primary".into()]
}

fn default_replica_backends() -> Vec<String> {
    vec!["replicas".into()]
}

/// Version line HAProxy expects at the top of the file.
const VERSION: &str = "1";
/// Column header, as HAProxy 2.6 prints it.
const HEADER: &str = "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port";

/// A `server` line of the rendered config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigServer {
    /// Backend (or listen section) name.
    pub backend: String,
    /// Server name.
    pub name: String,
    /// Address as written (no brackets).
    pub addr: String,
    /// Port.
    pub port: u16,
}

/// Reads `listen`/`backend` sections and their `server NAME ADDR:PORT` lines from a rendered
/// haproxy.cfg.
pub fn config_servers(cfg: &str) -> Vec<ConfigServer> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    for line in cfg.lines() {
        let trimmed = line.trim();
        let mut words = trimmed.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !line.starts_with(char::is_whitespace) {
            section = match first {
                "listen" | "backend" => words.next().map(str::to_owned),
                _ => None,
            };
            continue;
        }
        if first != "server" {
            continue;
        }
        let (Some(backend), Some(name), Some(addr)) = (&section, words.next(), words.next()) else {
            continue;
        };
        if let Some((host, port)) = split_addr(addr) {
            out.push(ConfigServer {
                backend: backend.clone(),
                name: name.to_owned(),
                addr: host,
                port,
            });
        }
    }
    out
}

fn split_addr(addr: &str) -> Option<(String, u16)> {
    let addr = addr
        .strip_prefix("ipv4@")
        .or(addr.strip_prefix("ipv6@"))
        .unwrap_or(addr);
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_owned(), port.parse().ok()?));
    }
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

/// One line of `show servers state`, split in fields.
#[derive(Debug, Clone)]
struct StateLine {
    fields: Vec<String>,
}

impl StateLine {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        // be_id .. srv_port are the first 19 fields in every 2.x version.
        (fields.len() >= 19 && !line.starts_with('#')).then_some(Self { fields })
    }
    fn backend(&self) -> &str {
        &self.fields[1]
    }
    fn server(&self) -> &str {
        &self.fields[3]
    }
    fn addr(&self) -> &str {
        &self.fields[4]
    }
    fn port(&self) -> Option<u16> {
        self.fields[18].parse().ok()
    }
    /// srv_op_state 0 = stopped (DOWN).
    fn is_down(&self) -> bool {
        self.fields[5] == "0"
    }
    fn force_down(&mut self) {
        // As HAProxy dumps a server that failed its checks: stopped, result "failed", health 0,
        // so it needs `rise` good checks to come UP. A check status of 0 would keep it DOWN for
        // good, so an unknown status becomes 1.
        self.fields[5] = "0".into();
        if self.fields[10] == "0" {
            self.fields[10] = "1".into();
        }
        self.fields[11] = "2".into();
        self.fields[12] = "0".into();
    }
    /// The dump repeats the check port as the agent port; loaded back into a server without agent
    /// checks, HAProxy warns "server-state partially applied" on every reload. The agent's port
    /// comes from the config anyway.
    fn clear_agent_port(&mut self) {
        if let Some(port) = self.fields.get_mut(24) {
            *port = "0".into();
        }
    }
    fn render(&self) -> String {
        self.fields.join(" ")
    }
}

/// Whether etcd's view lets `member` serve in `backend`: the leader only in primary backends,
/// healthy non-leaders without `noloadbalance` only in replica backends. Other backends: no view.
fn permitted(
    cfg: &ServerStateConfig,
    cluster: &Cluster,
    backend: &str,
    server: &str,
) -> Option<bool> {
    let member = cluster.members.iter().find(|m| m.name == server);
    if cfg.primary_backends.iter().any(|b| b == backend) {
        return Some(member.is_some_and(|m| m.is_leader));
    }
    if cfg.replica_backends.iter().any(|b| b == backend) {
        return Some(member.is_some_and(|m| {
            !m.is_leader && !m.noloadbalance && matches!(m.state.as_str(), "running" | "streaming")
        }));
    }
    None
}

/// Builds the state file from a live dump (may be empty), the new config and etcd's view.
pub fn build(
    cfg: &ServerStateConfig,
    rendered_cfg: &str,
    cluster: &Cluster,
    live_dump: &str,
) -> String {
    build_many(&[(cfg, cluster)], rendered_cfg, live_dump)
}

/// [`build`] for a HAProxy fronting several clusters: each cluster with the settings naming its
/// own backends (see [`ServerStateConfig::for_scope`]).
pub fn build_many(
    clusters: &[(&ServerStateConfig, &Cluster)],
    rendered_cfg: &str,
    live_dump: &str,
) -> String {
    let mut live: BTreeMap<(String, String), StateLine> = BTreeMap::new();
    for line in live_dump.lines().filter_map(StateLine::parse) {
        live.insert((line.backend().to_owned(), line.server().to_owned()), line);
    }
    let mut out = format!("{VERSION}\n{HEADER}\n");
    for s in config_servers(rendered_cfg) {
        let allowed = clusters
            .iter()
            .find_map(|(cfg, cluster)| permitted(cfg, cluster, &s.backend, &s.name));
        let saved = live
            .remove(&(s.backend.clone(), s.name.clone()))
            // A saved line with another address or port would override the new config.
            .filter(|l| l.addr() == s.addr && l.port() == Some(s.port));
        let line = match (saved, allowed) {
            (Some(mut l), allowed) => {
                if allowed == Some(false) && !l.is_down() {
                    l.force_down();
                }
                l.clear_agent_port();
                Some(l.render())
            }
            (None, Some(false)) => Some(down_line(&s)),
            (None, _) => None,
        };
        if let Some(l) = line {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// A line that makes HAProxy start `s` DOWN: the 20 fields HAProxy 2.6 requires (fewer and it
/// calls the file corrupted). IDs are 0 with their `forced` flags off, so HAProxy matches the line by
/// backend and server name; `srv_port` is the configured port (a saved port would override it).
fn down_line(s: &ConfigServer) -> String {
    format!(
        "0 {} 0 {} {} 0 0 1 1 0 1 0 0 6 0 0 0 - {} -",
        s.backend, s.name, s.addr, s.port
    )
}

/// A change of who takes writes, made through HAProxy's runtime API ahead of the health checks
/// (about 2 s at `inter 1s fall 2 rise 2`). The checks keep running and agree once the move is
/// made (the confirmed leader answers 200 on `/primary`, the others 503), so nothing flaps; if
/// one disagrees, the checks win within `fall` intervals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// The leader is stepping down (switchover requested, or its leader key is gone): no new
    /// connection goes to it (`state drain`); its open sessions go on until it is demoted.
    Fence {
        /// The leader stepping down.
        old: String,
    },
    /// The fenced leader keeps the leader key (the switchover was cancelled): undo the drain.
    Unfence {
        /// The leader.
        leader: String,
    },
    /// `new` is confirmed to take writes: UP in the primary backends and DOWN in the replica
    /// backends; each of `demote` DOWN in the primary backends (its sessions shut); `unfence`,
    /// the server haconfd drained, ready again (still DOWN where `demote` says so).
    Promote {
        /// The confirmed leader.
        new: String,
        /// Earlier leaders to take out of the primary backends.
        demote: Vec<String>,
        /// The server haconfd drained, if any.
        unfence: Option<String>,
    },
}

/// The runtime API commands for `mv`, for the servers `rendered_cfg` lists in the backends of
/// `cfg` (a server missing from a backend gets no command there). A server an operator put in
/// maintenance stays there: `health up` does not lift `maint`, and only a drain haconfd set is
/// undone.
pub fn move_commands(cfg: &ServerStateConfig, rendered_cfg: &str, mv: &Move) -> Vec<String> {
    let mut cmds = Vec::new();
    for s in config_servers(rendered_cfg) {
        let primary = cfg.primary_backends.contains(&s.backend);
        let replica = cfg.replica_backends.contains(&s.backend);
        let at = format!("{}/{}", s.backend, s.name);
        match mv {
            Move::Fence { old } if primary && s.name == *old => {
                cmds.push(format!("set server {at} state drain"));
            }
            Move::Unfence { leader } if primary && s.name == *leader => {
                cmds.push(format!("set server {at} state ready"));
            }
            Move::Promote {
                new,
                demote,
                unfence,
            } => {
                if unfence.as_deref() == Some(s.name.as_str()) && primary {
                    cmds.push(format!("set server {at} state ready"));
                }
                if s.name == *new {
                    if primary {
                        cmds.push(format!("set server {at} health up"));
                    } else if replica {
                        cmds.push(format!("set server {at} health down"));
                    }
                } else if primary && demote.contains(&s.name) {
                    cmds.push(format!("set server {at} health down"));
                    cmds.push(format!("shutdown sessions server {at}"));
                }
            }
            _ => {}
        }
    }
    cmds
}

/// The servers that take new connections in the primary backends of a `show servers state`
/// dump: UP (`srv_op_state` 2) with no administrative state (maint or drain). Sorted, once
/// each.
pub fn live_primaries(cfg: &ServerStateConfig, dump: &str) -> Vec<String> {
    let live: std::collections::BTreeSet<String> = dump
        .lines()
        .filter_map(StateLine::parse)
        .filter(|l| cfg.primary_backends.iter().any(|b| b == l.backend()))
        .filter(|l| l.fields[5] == "2" && l.fields[6] == "0")
        .map(|l| l.server().to_owned())
        .collect();
    live.into_iter().collect()
}

/// Sends runtime API commands in one connection (HAProxy runs `;`-separated commands in order).
pub async fn apply_commands(
    stats_socket: &Path,
    cmds: &[String],
    timeout: Duration,
) -> std::io::Result<String> {
    crate::haproxy::cli(stats_socket, &cmds.join(";"), timeout).await
}

/// Dumps `show servers state` from the admin socket; None when HAProxy is not reachable.
pub async fn dump(stats_socket: &Path, timeout: Duration) -> Option<String> {
    match crate::haproxy::cli(stats_socket, "show servers state", timeout).await {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::debug!(socket = %stats_socket.display(), error = %e, "no live server state");
            None
        }
    }
}

/// Swaps `content` in as the state file, atomically but without fsync: HAProxy reads it at its
/// next start or reload, and haconfd rewrites it on every pass, so only visibility matters. The
/// returned [`Retired`] releases the replaced file; finish it after the reload.
pub fn swap_in(path: &Path, content: &str) -> Result<Retired, ApplyError> {
    let staged = crate::apply::stage_bytes(
        path,
        "server-state",
        content.as_bytes(),
        0o644,
        (None, None),
        false,
    )?;
    crate::apply::commit(staged)
}

/// Writes the file if its content differs; returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &str) -> Result<bool, ApplyError> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(false);
    }
    swap_in(path, content)?.finish()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    const CFG: &str = "global\n    server-state-file /x\nlisten primary\n    bind *:5000\n    server pg1 127.0.0.1:5441 maxconn 100 check port 8011\n    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\nlisten replicas\n    bind *:5001\n    server pg1 127.0.0.1:5441 check port 8011\n    server pg2 127.0.0.1:5442 check port 8012\n";

    fn cfg() -> ServerStateConfig {
        ServerStateConfig {
            stats_socket: "/s".into(),
            file: "/f".into(),
            primary_backends: vec!["primary".into()],
            replica_backends: vec!["replicas".into()],
        }
    }

    fn cluster() -> Cluster {
        let mut s = Snapshot::new();
        s.put("/service/demo/leader".into(), b"pg1".to_vec());
        for (n, p) in [("pg1", 5441), ("pg2", 5442)] {
            s.put(format!("/service/demo/members/{n}"), format!(r#"{{"conn_url":"postgres://127.0.0.1:{p}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica"}}"#, p + 2570).into_bytes());
        }
        Cluster::build(&s, "/service", "demo").cluster
    }

    #[test]
    fn moves_name_only_the_servers_each_backend_lists() {
        let fence = move_commands(&cfg(), CFG, &Move::Fence { old: "pg1".into() });
        assert_eq!(fence, ["set server primary/pg1 state drain"]);
        let unfence = move_commands(
            &cfg(),
            CFG,
            &Move::Unfence {
                leader: "pg1".into(),
            },
        );
        assert_eq!(unfence, ["set server primary/pg1 state ready"]);
        let promote = Move::Promote {
            new: "pg2".into(),
            demote: vec!["pg1".into()],
            unfence: Some("pg1".into()),
        };
        assert_eq!(
            move_commands(&cfg(), CFG, &promote),
            [
                "set server primary/pg1 state ready",
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1",
                "set server primary/pg2 health up",
                "set server replicas/pg2 health down",
            ]
        );
        // A member the file does not list gets no command.
        let gone = Move::Promote {
            new: "pg9".into(),
            demote: vec![],
            unfence: None,
        };
        assert!(move_commands(&cfg(), CFG, &gone).is_empty());
    }

    #[test]
    fn config_servers_are_read_per_section() {
        let s = config_servers(CFG);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[3],
            ConfigServer {
                backend: "replicas".into(),
                name: "pg2".into(),
                addr: "127.0.0.1".into(),
                port: 5442
            }
        );
        assert_eq!(split_addr("[::1]:5432"), Some(("::1".into(), 5432)));
    }

    #[test]
    fn cold_start_marks_forbidden_servers_down_only() {
        let out = build(&cfg(), CFG, &cluster(), "");
        let lines: Vec<_> = out.lines().skip(2).collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].starts_with("0 primary 0 pg2 127.0.0.1 0 "),
            "{out}"
        );
        assert!(
            lines[1].starts_with("0 replicas 0 pg1 127.0.0.1 0 "),
            "{out}"
        );
    }

    #[test]
    fn live_up_line_for_a_demoted_server_is_forced_down_and_moved_port_dropped() {
        let live =
            "1\n# header\n3 primary 1 pg2 127.0.0.1 2 0 1 1 20 15 3 4 6 0 0 0 - 5442 - 0 0 - - 0\n\
                    3 primary 2 pg1 127.0.0.1 2 0 1 1 20 15 3 4 6 0 0 0 - 9999 - 0 0 - - 0\n\
                    4 replicas 1 pg2 127.0.0.1 2 0 1 1 20 15 3 4 6 0 0 0 - 5442 - 0 0 - - 0\n";
        let out = build(&cfg(), CFG, &cluster(), live);
        assert!(
            out.contains("3 primary 1 pg2 127.0.0.1 0 0 1 1 20 15 2 0 6"),
            "{out}"
        );
        assert!(!out.contains("9999"), "{out}");
        assert!(out.contains("4 replicas 1 pg2 127.0.0.1 2 0"), "{out}");
    }
}
