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

use crate::files::{ApplyError, Retired};
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
    /// Lifts a forced drain (haconfd's fence) unless the server is in maintenance too: reloads
    /// are deferred while a fence is in force, so a drain in a primary backend's dump is one that
    /// outlived its fence (a SIGKILL mid-switch) and must not reach the new worker.
    fn clear_drain(&mut self) {
        let flags: u32 = self.fields[6].parse().unwrap_or(0);
        if flags & admin::FDRAIN != 0 && flags & admin::MAINT == 0 {
            self.fields[6] = (flags & !admin::FDRAIN).to_string();
        }
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
                if clusters
                    .iter()
                    .any(|(cfg, _)| cfg.primary_backends.contains(&s.backend))
                {
                    l.clear_drain();
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
///
/// Who owns which state: in the primary backends, a forced drain (`state drain`) is haconfd's
/// fence and never outlives it: every move but a fence lifts a drain that no fence in force
/// accounts for. Maintenance (`state maint`, or any other maintenance flag) is an operator's and
/// is never set, lifted or drained over by haconfd. The replica backends are never drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// The leader is stepping down (switchover requested, or its leader key is gone): no new
    /// connection goes to it (`state drain`); its open sessions go on until it is demoted.
    Fence {
        /// The leader stepping down.
        old: String,
    },
    /// Fences that ended without a new leader (a switchover cancelled, a fence past its
    /// bound, shutdown): the drain of each of `servers` is lifted.
    Unfence {
        /// The servers haconfd drained.
        servers: Vec<String>,
    },
    /// `new` is confirmed to take writes: UP in the primary backends and DOWN in the replica
    /// backends; each of `demote` DOWN in the primary backends (its sessions shut); every drain
    /// no fence in force accounts for lifted.
    Promote {
        /// The confirmed leader.
        new: String,
        /// Earlier leaders to take out of the primary backends.
        demote: Vec<String>,
    },
    /// haconfd's start, or HAProxy reachable again: HAProxy made to agree with etcd. With a
    /// leader confirmed to take writes: the leader UP in the primary backends and DOWN in the
    /// replica backends, every other server UP in a primary backend set DOWN (its sessions
    /// shut), then every drain no fence in force accounts for lifted. With none: only the drains
    /// of servers that are DOWN are lifted.
    Repair {
        /// The leader, confirmed to take writes.
        leader: Option<String>,
    },
}

/// `srv_admin_state` flags of `show servers state` (HAProxy's `SRV_ADMF_*`).
mod admin {
    /// Forced maintenance (`set server … state maint`).
    pub const FMAINT: u32 = 0x01;
    /// Maintenance inherited from a tracked server.
    pub const IMAINT: u32 = 0x02;
    /// Maintenance from the configuration (`disabled`).
    pub const CMAINT: u32 = 0x04;
    /// Forced drain (`set server … state drain`): haconfd's fence.
    pub const FDRAIN: u32 = 0x08;
    /// Maintenance because the address did not resolve.
    pub const RMAINT: u32 = 0x20;
    /// Maintenance because the address is not set (`init-addr none`).
    pub const HMAINT: u32 = 0x40;
    /// Any maintenance.
    pub const MAINT: u32 = FMAINT | IMAINT | CMAINT | RMAINT | HMAINT;
}

/// One server of a live `show servers state` dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveServer {
    /// `srv_op_state`: 0 stopped (DOWN), 1 starting, 2 running (UP), 3 stopping.
    pub op: u8,
    /// `srv_admin_state` flags.
    pub admin: u32,
}

impl LiveServer {
    /// UP by its checks or by `health up`.
    pub fn is_up(&self) -> bool {
        self.op == 2
    }

    /// Forced into drain (haconfd's fence, in the primary backends).
    pub fn is_drained(&self) -> bool {
        self.admin & admin::FDRAIN != 0
    }

    /// In any maintenance: an operator's, or HAProxy's own (an address that did not resolve).
    pub fn in_maint(&self) -> bool {
        self.admin & admin::MAINT != 0
    }
}

/// The servers of a live dump, by backend and server name.
pub type Live = BTreeMap<(String, String), LiveServer>;

/// Reads a `show servers state` dump (of one backend, several, or all).
pub fn parse_live(dump: &str) -> Live {
    dump.lines()
        .filter_map(StateLine::parse)
        .map(|l| {
            let server = LiveServer {
                op: l.fields[5].parse().unwrap_or(0),
                admin: l.fields[6].parse().unwrap_or(0),
            };
            ((l.backend().to_owned(), l.server().to_owned()), server)
        })
        .collect()
}

/// The runtime API commands for `mv`, for the servers HAProxy has (`live`) in the backends of
/// `cfg`. `fenced` are the servers whose fence is in force: their drain stays. A server in
/// maintenance is never touched but by `health` commands, which do not lift maintenance.
///
/// The order matters to connections the hold action is holding (they go to the first server
/// that becomes usable): the new leader comes UP first, the servers leaving go DOWN next, and
/// only then are drains lifted, so that no held connection is ever handed to a server on its
/// way out.
pub fn move_commands(
    cfg: &ServerStateConfig,
    live: &Live,
    mv: &Move,
    fenced: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let (mut up, mut down, mut lift, mut replica_down) = (vec![], vec![], vec![], vec![]);
    for ((backend, name), s) in live {
        let primary = cfg.primary_backends.contains(backend);
        let replica = cfg.replica_backends.contains(backend);
        let at = format!("{backend}/{name}");
        if primary {
            // Lift a drain no fence in force accounts for (not for a fence, which sets one).
            let lifts = match mv {
                Move::Fence { .. } => false,
                Move::Unfence { servers } => servers.contains(name),
                Move::Promote { .. }
                | Move::Repair {
                    leader: Some(_), ..
                } => true,
                // No leader confirmed yet: a server UP stays drained until one is (it may be
                // an old primary the checks have not caught).
                Move::Repair { leader: None } => !s.is_up(),
            };
            if lifts && s.is_drained() && !s.in_maint() && !fenced.contains(name) {
                lift.push(format!("set server {at} state ready"));
            }
        }
        let leaving = |down: &mut Vec<String>| {
            down.push(format!("set server {at} health down"));
            down.push(format!("shutdown sessions server {at}"));
        };
        match mv {
            Move::Fence { old } if primary && name == old && !s.is_drained() && !s.in_maint() => {
                down.push(format!("set server {at} state drain"));
            }
            Move::Promote { new, demote } => {
                if name == new {
                    if primary {
                        up.push(format!("set server {at} health up"));
                    } else if replica {
                        replica_down.push(format!("set server {at} health down"));
                    }
                } else if primary && demote.contains(name) {
                    leaving(&mut down);
                }
            }
            Move::Repair {
                leader: Some(leader),
            } => {
                if name == leader {
                    if primary && !s.is_up() {
                        up.push(format!("set server {at} health up"));
                    } else if replica && s.is_up() {
                        replica_down.push(format!("set server {at} health down"));
                    }
                } else if primary && s.is_up() && !s.in_maint() {
                    leaving(&mut down);
                }
            }
            _ => {}
        }
    }
    [up, down, lift, replica_down].concat()
}

/// The backends a move acts on, as one `show servers state` command per backend (HAProxy runs
/// `;`-separated commands in order, on one connection).
pub fn dump_command(cfg: &ServerStateConfig) -> String {
    cfg.primary_backends
        .iter()
        .chain(&cfg.replica_backends)
        .map(|b| format!("show servers state {b}"))
        .collect::<Vec<_>>()
        .join(";")
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

/// A runtime API command HAProxy answered with an error (`Permission denied` from a stats
/// socket below `level admin`, `No such server.`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The command sent.
    pub command: String,
    /// HAProxy's answer.
    pub answer: String,
}

/// Sends the commands on one connection (HAProxy runs `;`-separated commands in order) and
/// checks each answer: HAProxy ends each command's answer with an empty line, and answers a
/// command it carried out with nothing but that line, one it refused with the reason. Returns
/// the refused commands; an error when the socket cannot be reached.
pub async fn apply_commands(
    stats_socket: &Path,
    cmds: &[String],
    timeout: Duration,
) -> std::io::Result<Vec<Refused>> {
    let answer = crate::haproxy::cli(stats_socket, &cmds.join(";"), timeout).await?;
    Ok(refusals(cmds, &answer))
}

/// The commands of `cmds` whose answer in `answer` (one answer per command, each ended by an
/// empty line) is not empty. An answer that cannot be split so is laid on every command.
fn refusals(cmds: &[String], answer: &str) -> Vec<Refused> {
    let mut answers: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in answer.lines() {
        if line.trim().is_empty() {
            answers.push(current.join(" "));
            current.clear();
        } else {
            current.push(line.trim());
        }
    }
    if !current.is_empty() {
        answers.push(current.join(" "));
    }
    if answers.len() != cmds.len() {
        let all = answer.trim();
        return if all.is_empty() {
            Vec::new()
        } else {
            cmds.iter()
                .map(|c| Refused {
                    command: c.clone(),
                    answer: all.to_owned(),
                })
                .collect()
        };
    }
    cmds.iter()
        .zip(answers)
        .filter(|(_, a)| !a.is_empty())
        .map(|(c, a)| Refused {
            command: c.clone(),
            answer: a,
        })
        .collect()
}

/// The level of `stats_socket` (`show cli level`: `admin`, `operator` or `user`); None when
/// HAProxy is not reachable there. The fast path's moves need `admin`.
pub async fn socket_level(stats_socket: &Path, timeout: Duration) -> Option<String> {
    crate::haproxy::cli(stats_socket, "show cli level", timeout)
        .await
        .ok()
        .map(|a| a.trim().to_owned())
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
    let staged = crate::files::stage_bytes(
        path,
        "server-state",
        content.as_bytes(),
        0o644,
        (None, None),
        false,
    )?;
    crate::files::commit(staged)
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

    /// A live dump line: backend, server, op state, admin state.
    fn live_line(backend: &str, server: &str, op: u8, admin: u32) -> String {
        format!("3 {backend} 1 {server} 127.0.0.1 {op} {admin} 1 1 20 15 3 4 6 0 0 0 - 5441 - 0 0 - - 0\n")
    }

    fn live(lines: &[(&str, &str, u8, u32)]) -> Live {
        let dump: String = lines
            .iter()
            .map(|(b, s, o, a)| live_line(b, s, *o, *a))
            .collect();
        parse_live(&format!("1\n# header\n{dump}"))
    }

    fn none() -> std::collections::BTreeSet<String> {
        Default::default()
    }

    #[test]
    fn moves_name_only_the_servers_each_backend_lists() {
        let up = live(&[
            ("primary", "pg1", 2, 0),
            ("primary", "pg2", 0, 0),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
            ("stats", "pg2", 2, 0),
        ]);
        let fence = move_commands(&cfg(), &up, &Move::Fence { old: "pg1".into() }, &none());
        assert_eq!(fence, ["set server primary/pg1 state drain"]);
        let drained = live(&[
            ("primary", "pg1", 2, 8),
            ("primary", "pg2", 0, 0),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
        ]);
        let unfence = Move::Unfence {
            servers: vec!["pg1".into()],
        };
        assert_eq!(
            move_commands(&cfg(), &drained, &unfence, &none()),
            ["set server primary/pg1 state ready"]
        );
        let promote = Move::Promote {
            new: "pg2".into(),
            demote: vec!["pg1".into()],
        };
        assert_eq!(
            move_commands(&cfg(), &drained, &promote, &none()),
            [
                "set server primary/pg2 health up",
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1",
                "set server primary/pg1 state ready",
                "set server replicas/pg2 health down",
            ]
        );
        // A member HAProxy does not have gets no command.
        let gone = Move::Promote {
            new: "pg9".into(),
            demote: vec![],
        };
        assert!(move_commands(&cfg(), &up, &gone, &none()).is_empty());
    }

    #[test]
    fn each_answer_is_read_against_its_command() {
        let cmds: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert!(refusals(&cmds, "\n\n\n").is_empty());
        assert_eq!(
            refusals(&cmds, "\nNo such server.\n\n\n"),
            [Refused {
                command: "b".into(),
                answer: "No such server.".into()
            }]
        );
        let denied = refusals(
            &cmds,
            "Permission denied\n\nPermission denied\n\nPermission denied\n\n",
        );
        assert_eq!(denied.len(), 3);
        assert!(denied.iter().all(|r| r.answer == "Permission denied"));
        // Not one answer per command: the whole answer is laid on each.
        assert_eq!(refusals(&cmds, "Unknown command\n").len(), 3);
    }

    #[test]
    fn a_drain_stays_while_its_fence_is_in_force_and_maintenance_is_never_touched() {
        let fenced: std::collections::BTreeSet<String> = ["pg1".to_string()].into();
        let drained = live(&[("primary", "pg1", 2, 8), ("primary", "pg3", 2, 8)]);
        let promote = Move::Promote {
            new: "pg2".into(),
            demote: vec![],
        };
        // pg1's fence is in force (a second change began): only pg3's stale drain goes.
        assert_eq!(
            move_commands(&cfg(), &drained, &promote, &fenced),
            ["set server primary/pg3 state ready"]
        );
        // An operator's maintenance (alone, or over a drain) is left as it is, and a server in
        // maintenance is not drained over.
        let maint = live(&[("primary", "pg1", 2, 1), ("primary", "pg2", 2, 9)]);
        for mv in [
            Move::Fence { old: "pg1".into() },
            Move::Unfence {
                servers: vec!["pg1".into(), "pg2".into()],
            },
            Move::Repair { leader: None },
            Move::Repair {
                leader: Some("pg1".into()),
            },
        ] {
            assert!(
                move_commands(&cfg(), &maint, &mv, &none()).is_empty(),
                "{mv:?}"
            );
        }
    }

    #[test]
    fn repair_makes_haproxy_agree_with_the_confirmed_leader() {
        let after_kill = live(&[
            ("primary", "pg1", 2, 8),
            ("primary", "pg2", 0, 8),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
        ]);
        // No leader confirmed yet: pg1, UP, may be an old primary the checks have not caught.
        assert_eq!(
            move_commands(&cfg(), &after_kill, &Move::Repair { leader: None }, &none()),
            ["set server primary/pg2 state ready"]
        );
        assert_eq!(
            move_commands(
                &cfg(),
                &after_kill,
                &Move::Repair {
                    leader: Some("pg2".into())
                },
                &none()
            ),
            [
                "set server primary/pg2 health up",
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1",
                "set server primary/pg1 state ready",
                "set server primary/pg2 state ready",
                "set server replicas/pg2 health down",
            ]
        );
        // Already as it should be: nothing to send.
        let settled = live(&[
            ("primary", "pg1", 0, 0),
            ("primary", "pg2", 2, 0),
            ("replicas", "pg1", 2, 0),
            ("replicas", "pg2", 0, 0),
        ]);
        assert!(move_commands(
            &cfg(),
            &settled,
            &Move::Repair {
                leader: Some("pg2".into())
            },
            &none()
        )
        .is_empty());
    }

    #[test]
    fn a_saved_drain_in_a_primary_backend_does_not_reach_the_next_worker() {
        let saved =
            "1\n# header\n3 primary 1 pg1 127.0.0.1 2 8 1 1 20 15 3 4 6 0 0 0 - 5441 - 0 0 - - 0\n\
                     3 primary 2 pg2 127.0.0.1 0 9 1 1 20 15 3 4 6 0 0 0 - 5442 - 0 0 - - 0\n";
        let out = build(&cfg(), CFG, &cluster(), saved);
        assert!(out.contains("3 primary 1 pg1 127.0.0.1 2 0 "), "{out}");
        // Maintenance and the drain under it are an operator's: kept.
        assert!(out.contains("3 primary 2 pg2 127.0.0.1 0 9 "), "{out}");
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
