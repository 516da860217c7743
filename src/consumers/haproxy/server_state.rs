//! Keeps HAProxy's `server-state-file` right, so that no server takes traffic its role forbids
//! after a reload or a cold start. A new worker starts every server UP (measured: 297 failed writes
//! in 20 reloads without this). Just before a reload haconfd dumps `show servers state`, drops the
//! lines whose address or port no longer match the new config (a saved port would override the
//! configured one), forces DOWN every server that etcd says must not serve in its backend, and adds
//! a DOWN line for each forbidden server HAProxy has never seen. Between reloads the file holds the
//! same etcd view, so a cold start after a switchover or a stale file from an earlier run cannot
//! send writes to a replica either. A server new to a running HAProxy's replica backend (a member
//! that just joined, or one whose address changed: the live dump has no state for it) starts DOWN
//! too, and takes reads only once `rise` checks pass: a node still starting, or behind a firewall
//! not yet opened, gets no read it cannot serve. At HAProxy's first start (no live state at all)
//! permitted servers start UP, as HAProxy would, and their checks confirm them; the leader always
//! does in the primary backends (the failover fast path confirms it).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::files::{ApplyError, Retired};
use crate::model::Cluster;

use super::runtime::StateLine;
pub use super::settings::ServerStateConfig;

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
    /// It tracks another server (`track`): its state is that server's, not its own.
    pub tracks: bool,
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
        let tracks = words.any(|w| w == "track");
        if let Some((host, port)) = split_addr(addr) {
            out.push(ConfigServer {
                backend: backend.clone(),
                name: name.to_owned(),
                addr: host,
                port,
                tracks,
            });
        }
    }
    out
}

/// `host:port` (brackets around an IPv6 address, an `ipv4@`/`ipv6@` prefix) split in host and
/// port.
pub(super) fn split_addr(addr: &str) -> Option<(String, u16)> {
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

/// Which cluster's settings name each backend, and whether as a primary or a replica backend:
/// the first cluster that names it, its primary backends before its replica backends. Built
/// once per file, so that a thousand clusters' servers are each looked up, not searched for.
pub struct Owners<'a> {
    by_backend: HashMap<&'a str, (Kind, &'a Cluster)>,
    clusters: Vec<&'a Cluster>,
}

/// What a backend routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Primary,
    Replica,
}

impl<'a> Owners<'a> {
    /// The owners of the backends of `clusters`' settings.
    pub fn new(clusters: &[(&'a ServerStateConfig, &'a Cluster)]) -> Owners<'a> {
        let mut by_backend = HashMap::new();
        for (cfg, c) in clusters {
            for b in &cfg.primary_backends {
                by_backend.entry(b.as_str()).or_insert((Kind::Primary, *c));
            }
            for b in &cfg.replica_backends {
                by_backend.entry(b.as_str()).or_insert((Kind::Replica, *c));
            }
        }
        Owners {
            by_backend,
            clusters: clusters.iter().map(|(_, c)| *c).collect(),
        }
    }

    fn kind(&self, backend: &str) -> Option<Kind> {
        self.by_backend.get(backend).map(|(k, _)| *k)
    }

    /// Whether etcd's view lets `server` serve in `backend`: the leader (not a standby
    /// cluster's) only in primary backends; healthy members without `noloadbalance` in replica
    /// backends, but the leader of an ordinary cluster. A standby cluster's leader takes no
    /// writes and serves reads. Other backends: no view.
    fn permitted(&self, backend: &str, server: &str) -> Option<bool> {
        let (kind, cluster) = self.by_backend.get(backend)?;
        let member = cluster.members.iter().find(|m| m.name == server);
        let standby = cluster.standby_cluster;
        Some(match kind {
            Kind::Primary => member.is_some_and(|m| m.is_leader && !standby),
            Kind::Replica => member.is_some_and(|m| {
                (!m.is_leader || standby)
                    && !m.noloadbalance
                    && matches!(m.state.as_str(), "running" | "streaming")
            }),
        })
    }

    /// Whether a server HAProxy has no state for must start DOWN and wait for its checks: one
    /// etcd's view forbids in its backend (a replica in a primary backend), and one new to a
    /// replica backend of a running HAProxy (`known`: HAProxy's state is known; at its first
    /// start every server would look new).
    fn starts_down(&self, backend: &str, server: &str, known: bool) -> bool {
        match self.permitted(backend, server) {
            Some(false) => true,
            Some(true) => known && self.kind(backend) == Some(Kind::Replica),
            None => false,
        }
    }

    /// The state rules for a server added to or changed in a running HAProxy (see
    /// [`super::membership`]): whether it starts DOWN, and whether its member is still in
    /// etcd (in the cluster owning the backend; any cluster for a backend none names).
    pub fn rules_for(&self, backend: &str, server: &str) -> super::membership::Rules {
        let has = |c: &Cluster| c.members.iter().any(|m| m.name == server);
        let in_etcd = match self.by_backend.get(backend) {
            Some((_, c)) => has(c),
            None => self.clusters.iter().any(|c| has(c)),
        };
        super::membership::Rules {
            starts_down: self.starts_down(backend, server, true),
            in_etcd,
        }
    }
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
    // A server HAProxy has no state for is new to it only when its state is known at all: at
    // HAProxy's first start (or with its socket unreachable) every server would look new.
    let known = !live.is_empty();
    let owners = Owners::new(clusters);
    let mut out = format!("{VERSION}\n{HEADER}\n");
    // A server that tracks another (the primary as a replica backend's fallback) takes that
    // server's state: it gets no line of its own.
    for s in config_servers(rendered_cfg)
        .into_iter()
        .filter(|s| !s.tracks)
    {
        let allowed = owners.permitted(&s.backend, &s.name);
        let saved = live
            .remove(&(s.backend.clone(), s.name.clone()))
            // A saved line with another address or port would override the new config.
            .filter(|l| l.addr() == s.addr && l.port() == Some(s.port));
        let line = match (saved, allowed) {
            (Some(mut l), allowed) => {
                if allowed == Some(false) && !l.is_down() {
                    l.force_down();
                }
                if owners.kind(&s.backend) == Some(Kind::Primary) {
                    l.clear_drain();
                }
                l.clear_agent_port();
                Some(l.render())
            }
            (None, _) if owners.starts_down(&s.backend, &s.name, known) => Some(down_line(&s)),
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

/// The state file's content for one HAProxy: from the one cluster, or, `per_scope`, from every
/// ordinary cluster with its own backends (`{scope}` in the backend names).
pub fn for_clusters(
    ss: &ServerStateConfig,
    per_scope: bool,
    rendered: &[u8],
    clusters: &[Arc<Cluster>],
    live: &str,
) -> String {
    let text = String::from_utf8_lossy(rendered);
    let per = per_cluster(ss, per_scope, clusters);
    build_many(&pairs(&per, clusters), &text, live)
}

/// Each cluster's settings: the target's, or, `per_scope`, the ones naming the cluster's own
/// backends.
pub fn per_cluster(
    ss: &ServerStateConfig,
    per_scope: bool,
    clusters: &[Arc<Cluster>],
) -> Vec<ServerStateConfig> {
    clusters
        .iter()
        .map(|c| match per_scope {
            false => ss.clone(),
            true => ss.for_scope(&c.scope),
        })
        .collect()
}

/// Each cluster with its settings, as [`build_many`] and [`rules_for`] take them.
pub fn pairs<'a>(
    per: &'a [ServerStateConfig],
    clusters: &'a [Arc<Cluster>],
) -> Vec<(&'a ServerStateConfig, &'a Cluster)> {
    per.iter().zip(clusters).map(|(s, c)| (s, &**c)).collect()
}

/// Dumps the live state, merges it with etcd's view and swaps in the file HAProxy's new worker
/// will load. Failure to reach HAProxy falls back to etcd's view alone. The replaced file is
/// released after the reload.
pub async fn prepare(
    ss: &ServerStateConfig,
    per_scope: bool,
    rendered: &[u8],
    clusters: &[Arc<Cluster>],
) -> Option<Retired> {
    let live = match super::runtime::dump(&ss.stats_socket, Duration::from_secs(2)).await {
        Some(live) => live,
        None => {
            tracing::warn!(socket = %ss.stats_socket.display(), "cannot read `show servers state`; the state file carries etcd's view only");
            String::new()
        }
    };
    let content = for_clusters(ss, per_scope, rendered, clusters, &live);
    let file = ss.file.clone();
    let swapped = tokio::task::spawn_blocking(move || swap_in(&file, &content))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    swapped
        .map_err(|e| tracing::warn!(error = %e, "cannot write the server-state file before reload"))
        .ok()
}

/// Settings for unit tests: backends `primary` and `replicas`.
#[cfg(test)]
pub(super) fn test_config() -> ServerStateConfig {
    ServerStateConfig {
        stats_socket: "/s".into(),
        file: "/f".into(),
        primary_backends: vec!["primary".into()],
        replica_backends: vec!["replicas".into()],
        membership: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    const CFG: &str = "global\n    server-state-file /x\nlisten primary\n    bind *:5000\n    server pg1 127.0.0.1:5441 maxconn 100 check port 8011\n    server pg2 127.0.0.1:5442 maxconn 100 check port 8012\nlisten replicas\n    bind *:5001\n    server pg1 127.0.0.1:5441 check port 8011\n    server pg2 127.0.0.1:5442 check port 8012\n";

    fn cfg() -> ServerStateConfig {
        test_config()
    }

    fn cluster() -> Cluster {
        let mut s = Snapshot::new();
        s.put("/service/demo/leader".into(), b"pg1".to_vec());
        for (n, p) in [("pg1", 5441), ("pg2", 5442)] {
            s.put(format!("/service/demo/members/{n}"), format!(r#"{{"conn_url":"postgres://127.0.0.1:{p}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica"}}"#, p + 2570).into_bytes());
        }
        Cluster::build(&s, "/service", "demo").cluster
    }

    /// In a standby cluster the leader takes no writes and serves reads: DOWN in the primary
    /// backends, allowed in the replica backends; promoted, the reverse.
    #[test]
    fn a_standby_leader_serves_reads_and_no_writes() {
        let mut standby = cluster();
        standby.standby_cluster = true;
        let per = [cfg()];
        let pairs = [(&per[0], &standby)];
        let owners = Owners::new(&pairs);
        assert_eq!(owners.permitted("primary", "pg1"), Some(false));
        assert_eq!(owners.permitted("replicas", "pg1"), Some(true));
        assert_eq!(owners.permitted("replicas", "pg2"), Some(true));
        let promoted = cluster();
        let pairs = [(&per[0], &promoted)];
        let owners = Owners::new(&pairs);
        assert_eq!(owners.permitted("primary", "pg1"), Some(true));
        assert_eq!(owners.permitted("replicas", "pg1"), Some(false));
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
    fn a_server_that_tracks_another_gets_no_state_line() {
        let cfg_text = CFG.to_owned()
            + "    server pg1-primary 127.0.0.1:5441 maxconn 100 backup track primary/pg1\n";
        let live = "1\n# header\n4 replicas 3 pg1-primary 127.0.0.1 0 0 1 1 20 15 3 4 6 0 0 0 - 5441 - 0 0 - - 0\n";
        for dump in ["", live] {
            let out = build(&cfg(), &cfg_text, &cluster(), dump);
            assert!(!out.contains("pg1-primary"), "{out}");
        }
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
                port: 5442,
                tracks: false,
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
    fn a_replica_new_to_its_backend_or_readdressed_starts_down_and_a_known_one_keeps_its_state() {
        // pg2 is known and UP in the replica backend; pg3 joins; pg2's twin in another address
        // is new.
        let live = "1\n# header\n4 replicas 2 pg2 127.0.0.1 2 0 1 1 20 15 3 4 6 0 0 0 - 5442 - 0 0 - - 0\n";
        let cfg_text = CFG.to_owned() + "    server pg3 127.0.0.1:5443 check port 8013\n";
        let mut s = Snapshot::new();
        s.put("/service/demo/leader".into(), b"pg1".to_vec());
        for (n, p) in [("pg1", 5441), ("pg2", 5442), ("pg3", 5443)] {
            s.put(format!("/service/demo/members/{n}"), format!(r#"{{"conn_url":"postgres://127.0.0.1:{p}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica"}}"#, p + 2570).into_bytes());
        }
        let c = Cluster::build(&s, "/service", "demo").cluster;
        let out = build(&cfg(), &cfg_text, &c, live);
        assert!(out.contains("4 replicas 2 pg2 127.0.0.1 2 0"), "{out}");
        assert!(out.contains("0 replicas 0 pg3 127.0.0.1 0 "), "{out}");
        // Re-addressed: the saved line is dropped and the server starts DOWN on its new port.
        let moved = live.replace(" 5442 ", " 6442 ");
        let out = build(&cfg(), &cfg_text, &c, &moved);
        assert!(out.contains("0 replicas 0 pg2 127.0.0.1 0 "), "{out}");
        assert!(!out.contains("6442"), "{out}");
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
