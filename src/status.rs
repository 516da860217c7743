//! The daemon's state as operators see it: etcd connection, watch revision, the last pass and the
//! cluster view. The daemon writes it after every pass; logs, readiness and `/status` read it.
//! The cluster view is what etcd shows to the last pass, whether that pass was applied or refused
//! (guard, no leader, a failed check): during a failover dashboards show no leader, not the old
//! one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::events::ClusterEvent;
use crate::model::Cluster;
use crate::pipeline::{PassError, PassOutcome, PassReport, PassStats};

/// Shared daemon state.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    /// The watch is established and current.
    pub etcd_connected: bool,
    /// The last etcd error while disconnected.
    pub etcd_error: Option<String>,
    /// The snapshot's revision.
    pub revision: i64,
    /// Re-lists after compaction or drift.
    pub relists: u64,
    /// Passes run.
    pub passes: u64,
    /// Passes failed.
    pub failed_passes: u64,
    /// Whether the last pass succeeded.
    pub last_pass_ok: Option<bool>,
    /// The last pass's error.
    pub last_error: Option<String>,
    /// The last pass's failure reason label.
    pub last_error_reason: Option<String>,
    /// When the last pass succeeded.
    #[serde(skip)]
    pub last_success: Option<Instant>,
    /// Seconds since the last successful pass.
    pub last_success_age_seconds: Option<f64>,
    /// Per-target counters.
    pub targets: BTreeMap<String, TargetStatus>,
    /// Leader changes seen: a leader followed, possibly after a leaderless spell, by another
    /// (the `leader_changed` events that name an old leader).
    pub leader_changes: u64,
    /// The last [`EVENTS_KEPT`] cluster events, oldest first.
    pub events: VecDeque<TimedEvent>,
    /// The cluster the last pass saw (applied or refused).
    #[serde(serialize_with = "serialize_cluster")]
    pub cluster: Option<Arc<Cluster>>,
    /// Config hot reloads applied.
    pub config_reloads: u64,
    /// Error of the last refused config reload.
    pub config_error: Option<String>,
    /// Duration of the last pass.
    pub last_pass_seconds: f64,
    /// The last leader change as the failover fast path handled it (milliseconds after the new
    /// leader key: confirmed, HAProxy switched, PgBouncer switched).
    pub last_failover: crate::failover::TimelineView,
    /// What the fast path holds on the consumers now (the first cluster's): fences in force,
    /// moves refused.
    pub fast_path: FastPathView,
    /// `require_leader` targets waiting for the leader to confirm it takes writes.
    pub awaiting_confirmation: Vec<String>,
    /// Whether several clusters are followed (`etcd.scopes`, `etcd.discover`): `clusters` lists
    /// them, and metrics carry a `scope` label.
    pub multi: bool,
    /// Every cluster (each Citus group) the last pass saw.
    pub clusters: Vec<ClusterStatus>,
    /// haconfd's version (filled by [`Status::snapshot`]).
    pub version: &'static str,
}

/// haconfd's version and git revision, as `--version` prints it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("HACONFD_GIT_REV"),
    ")"
);

/// One cluster (or Citus group) in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Patroni's scope.
    pub scope: String,
    /// The Citus group, for a group of a Citus cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// Whether `[clusters.<scope>]` is configured: an unconfigured cluster is followed and shown
    /// but gets no port or file of its own.
    pub configured: bool,
    /// Why the guard refused its last view (its files keep the last good section), if it did.
    pub refused: Option<String>,
    /// The leader etcd shows, if any.
    pub leader: Option<String>,
    /// Valid members etcd shows.
    pub members: usize,
    /// Its last leader change as the fast path handled it.
    pub last_failover: crate::failover::TimelineView,
    /// What its fast path holds on the consumers now.
    pub fast_path: FastPathView,
    /// Its replicas' replay lag and lag drains as of the last pass (with `lag.max_bytes`; the
    /// `haconfd_replica_lag_*` metrics follow every measurement).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lag: Vec<crate::lag::ReplicaLag>,
    /// HAProxy's live state of the cluster's servers, read when `/status` is served (see
    /// [`Status::read_haproxy`]): one entry per HAProxy target with `server_state`.
    pub haproxy: Vec<HaproxyView>,
    /// The model, for metrics; in `/status`, its members as etcd shows them (`member_list`),
    /// made when `/status` is served: a pass only shares the model, and with thousands of
    /// members a line per member at every heartbeat's pass cost more than the pass's own work.
    #[serde(rename = "member_list", serialize_with = "serialize_members")]
    pub model: Option<Arc<Cluster>>,
}

/// One member of a cluster in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberLine {
    /// Patroni's member name (HAProxy's server name).
    pub name: String,
    /// Its role (`primary`, `master`, `replica`, `standby_leader`, ...).
    pub role: String,
    /// Its state (`running`, `streaming`, `starting`, ...).
    pub state: String,
    /// PostgreSQL's host and port.
    pub host: String,
    /// PostgreSQL's port.
    pub port: u16,
    /// Whether it holds the leader key.
    pub is_leader: bool,
    /// Its timeline.
    pub timeline: Option<u64>,
    /// Bytes behind the leader.
    pub lag: Option<u64>,
    /// `nofailover` and `noloadbalance` tags, when set.
    pub nofailover: bool,
    /// See `nofailover`.
    pub noloadbalance: bool,
}

/// HAProxy's live state of a cluster's servers, from one target's stats socket.
#[derive(Debug, Clone, Serialize)]
pub struct HaproxyView {
    /// The HAProxy target.
    pub target: String,
    /// Its stats socket.
    pub socket: std::path::PathBuf,
    /// Seconds since the reading (readings are shared for up to a quarter of a second).
    pub age_s: f64,
    /// Why there is no reading (HAProxy not answering).
    pub error: Option<String>,
    /// The cluster's servers in its primary and replica backends.
    pub servers: Vec<crate::consumers::haproxy::live::ServerView>,
}

/// The fences and refused moves of a cluster's fast path, read when `/status` is served.
#[derive(Debug, Clone, Default)]
pub struct FastPathView(crate::failover::TimelineView);

impl Serialize for FastPathView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.fast_path().serialize(s)
    }
}

/// How many cluster events `/status` keeps.
pub const EVENTS_KEPT: usize = 20;

/// A cluster event with when the pass that saw it ran.
#[derive(Debug, Clone, Serialize)]
pub struct TimedEvent {
    /// Unix time in seconds, with milliseconds.
    pub at: f64,
    /// The cluster (`scope` or `scope/group`) when several are followed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The event, its fields flattened next to `at`.
    #[serde(flatten)]
    pub event: ClusterEvent,
}

/// Counters for one target.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TargetStatus {
    /// Files written.
    pub writes: u64,
    /// Reloads sent.
    pub reloads: u64,
    /// Member changes HAProxy took through its runtime API, without a reload.
    pub runtime_updates: u64,
    /// Member changes its runtime API did not take: reloaded instead.
    pub runtime_fallbacks: u64,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
}

impl Status {
    /// Records a pass's report.
    pub fn record_pass(&mut self, report: &PassReport, took: Duration) {
        self.passes += 1;
        self.last_pass_seconds = took.as_secs_f64();
        for t in &report.targets {
            self.targets.entry(t.clone()).or_default();
        }
        // What was written and reloaded counts also when another consumer's target failed.
        self.count(&report.stats.outcome);
        match &report.result {
            Ok(_) => {
                self.last_pass_ok = Some(true);
                self.last_error = None;
                self.last_error_reason = None;
                self.last_success = Some(Instant::now());
            }
            Err(e) => {
                self.failed_passes += 1;
                self.last_pass_ok = Some(false);
                self.last_error = Some(format!("{e:#}"));
                self.last_error_reason = Some(e.reason().to_owned());
                for (target, reason) in failures(e, &report.stats) {
                    *self
                        .targets
                        .entry(target)
                        .or_default()
                        .failures
                        .entry(reason.to_owned())
                        .or_default() += 1;
                }
            }
        }
        let current = report.current_names();
        self.targets.retain(|name, _| current.contains(name));
        self.multi = report.multi;
        if self.multi {
            for r in &report.clusters {
                self.observe_in(&r.model, &r.events, Some(r.id.to_string()));
            }
            self.cluster = report.first_cluster().cloned();
        } else if let Some(c) = report.first_cluster() {
            self.observe(c, &report.stats.events);
        }
        self.clusters = report
            .clusters
            .iter()
            .map(|r| ClusterStatus {
                scope: r.id.scope.clone(),
                group: r.id.group,
                configured: r.configured,
                refused: r.refused.clone(),
                leader: r.model.leader_name.clone(),
                members: r.model.members.len(),
                last_failover: r.failover.clone(),
                fast_path: FastPathView(r.failover.clone()),
                lag: r.lag.clone(),
                haproxy: Vec::new(),
                model: Some(Arc::clone(&r.model)),
            })
            .collect();
        self.last_failover = report.timeline();
        self.fast_path = FastPathView(self.last_failover.clone());
        self.awaiting_confirmation = report.stats.awaiting.clone();
    }

    /// Takes `cluster` as the current view and records the events that led to it.
    fn observe(&mut self, cluster: &Arc<Cluster>, events: &[ClusterEvent]) {
        self.observe_in(cluster, events, None);
    }

    /// [`Status::observe`], the events marked with their cluster when several are followed.
    fn observe_in(&mut self, cluster: &Arc<Cluster>, events: &[ClusterEvent], id: Option<String>) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0);
        for e in events {
            if matches!(e, ClusterEvent::LeaderChanged { old: Some(_), .. }) {
                self.leader_changes += 1;
            }
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(TimedEvent {
                at,
                cluster: id.clone(),
                event: e.clone(),
            });
        }
        self.cluster = Some(Arc::clone(cluster));
    }

    fn count(&mut self, o: &PassOutcome) {
        for n in &o.written {
            self.targets.entry(n.clone()).or_default().writes += 1;
        }
        for n in &o.reloaded {
            self.targets.entry(n.clone()).or_default().reloads += 1;
        }
        for n in &o.runtime {
            self.targets.entry(n.clone()).or_default().runtime_updates += 1;
        }
        for n in &o.fallbacks {
            self.targets.entry(n.clone()).or_default().runtime_fallbacks += 1;
        }
    }

    /// Ready: etcd reachable, the watch current, and the last pass succeeded.
    pub fn ready(&self) -> bool {
        self.etcd_connected && self.last_pass_ok == Some(true)
    }

    /// A copy with the age fields filled, for `/status`.
    pub fn snapshot(&self) -> Status {
        let mut s = self.clone();
        s.last_success_age_seconds = self.last_success.map(|t| t.elapsed().as_secs_f64());
        s.version = VERSION;
        s
    }

    /// Fills each cluster's `haproxy` with HAProxy's live state of its servers, from the stats
    /// socket of every HAProxy target with `server_state` (read concurrently, each at most
    /// once per [`crate::consumers::haproxy::live::FRESH`] and within
    /// [`crate::consumers::haproxy::live::TIMEOUT`]).
    pub async fn read_haproxy(&mut self) {
        use crate::consumers::haproxy::live;
        let mut sockets: Vec<std::path::PathBuf> = self
            .clusters
            .iter()
            .flat_map(|c| c.last_failover.haproxy_routes())
            .map(|(_, ss)| ss.stats_socket)
            .collect();
        sockets.sort();
        sockets.dedup();
        let mut tasks = tokio::task::JoinSet::new();
        for s in sockets {
            tasks.spawn(async move {
                let r = live::readings().read(&s).await;
                (s, r)
            });
        }
        let mut read = BTreeMap::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok((s, r)) = done {
                read.insert(s, r);
            }
        }
        for c in &mut self.clusters {
            c.haproxy = c
                .last_failover
                .haproxy_routes()
                .into_iter()
                .map(|(target, ss)| {
                    let r = read.get(&ss.stats_socket);
                    let backends: Vec<String> = ss
                        .primary_backends
                        .iter()
                        .chain(&ss.replica_backends)
                        .cloned()
                        .collect();
                    HaproxyView {
                        target,
                        age_s: r.map_or(0.0, |r| {
                            crate::failover::round3(r.at.elapsed().as_secs_f64())
                        }),
                        error: match r.map(|r| &r.result) {
                            Some(Ok(_)) => None,
                            Some(Err(e)) => Some(e.clone()),
                            None => Some("not read".to_owned()),
                        },
                        servers: match r.map(|r| &r.result) {
                            Some(Ok(l)) => live::servers_of(l, &backends),
                            _ => Vec::new(),
                        },
                        socket: ss.stats_socket,
                    }
                })
                .collect();
        }
    }
}

impl From<&crate::model::Member> for MemberLine {
    fn from(m: &crate::model::Member) -> MemberLine {
        MemberLine {
            name: m.name.clone(),
            role: m.role.clone(),
            state: m.state.clone(),
            host: m.host.clone(),
            port: m.port,
            is_leader: m.is_leader,
            timeline: m.timeline,
            lag: m.lag,
            nofailover: m.nofailover,
            noloadbalance: m.noloadbalance,
        }
    }
}

/// A cluster's members as [`MemberLine`]s.
fn serialize_members<S: serde::Serializer>(
    cluster: &Option<Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let members = cluster.iter().flat_map(|c| c.members.iter());
    s.collect_seq(members.map(MemberLine::from))
}

/// The cluster as its plain JSON (the `Arc` is only there to share it without copying).
fn serialize_cluster<S: serde::Serializer>(
    cluster: &Option<Arc<Cluster>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    cluster.as_deref().serialize(s)
}

/// The failures of a pass by target and reason: each target that failed, or `*` when the pass
/// was refused before any target (the guard).
pub fn failures(e: &PassError, stats: &PassStats) -> Vec<(String, &'static str)> {
    if stats.failed.is_empty() {
        vec![("*".to_owned(), e.reason())]
    } else {
        stats.failed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    fn view(leader: Option<&str>) -> Arc<Cluster> {
        let mut s = Snapshot::new();
        for n in ["a", "b"] {
            s.put(
                format!("/service/demo/members/{n}"),
                br#"{"conn_url":"postgres://127.0.0.1:5432/postgres","api_url":"http://127.0.0.1:8008/patroni"}"#.to_vec(),
            );
        }
        if let Some(l) = leader {
            s.put("/service/demo/leader".into(), l.as_bytes().to_vec());
        }
        Arc::new(Cluster::build(&s, "/service", "demo").cluster)
    }

    #[test]
    fn a_failover_through_a_leaderless_spell_counts_one_leader_change() {
        let mut st = Status::default();
        let mut differ = crate::events::Differ::default();
        let mut prev: Option<Arc<Cluster>> = None;
        for leader in [Some("a"), Some("a"), None, None, Some("b"), None, Some("b")] {
            let next = view(leader);
            let events = differ.diff(prev.as_deref(), &next);
            st.observe(&next, &events);
            prev = Some(next);
            assert_eq!(
                st.cluster.as_ref().unwrap().leader_name.as_deref(),
                leader,
                "the view shown is the one seen"
            );
        }
        assert_eq!(st.leader_changes, 1);
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["cluster"]["leader_name"], "b");
        assert_eq!(json["leader_changes"], 1);
        let kinds: Vec<_> = json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "leader_lost",
                "leader_changed",
                "leader_lost",
                "leader_regained"
            ]
        );
        assert_eq!(json["events"][1]["old"], "a");
        assert_eq!(json["events"][1]["new"], "b");
    }

    #[test]
    fn status_keeps_the_last_events_only() {
        let mut st = Status::default();
        let c = view(Some("a"));
        let lost = ClusterEvent::LeaderLost { old: "a".into() };
        for _ in 0..EVENTS_KEPT + 5 {
            st.observe(&c, std::slice::from_ref(&lost));
        }
        assert_eq!(st.events.len(), EVENTS_KEPT);
    }
}
