//! The failover fast path: routing follows Patroni's leader key instead of waiting for health
//! checks. On a switchover request or the loss of the leader, HAProxy stops sending new
//! connections to the old primary (a fence: `drain`) and PgBouncer pauses; on a new leader key,
//! the candidate is confirmed through its REST API (it answers writable about 0.2 s before its
//! member key says so) and, the moment it is, HAProxy sends writes to it and the pipeline
//! re-points PgBouncer, reloads it and resumes it. The health checks stay the backstop: a
//! candidate that never confirms is never forced UP, two members claiming `primary` resolve by
//! the leader key alone, and a move is made once and undone only by a later leader change.
//!
//! Every state the fast path puts on a consumer has an owner, a bound and an undo:
//! - a fence is haconfd's `drain` in the primary backends (an operator's `maint` is never
//!   touched); it lasts while its switchover request is pending, at most `fence_timeout` when
//!   the leader key does not move, and at most `confirm_timeout` once it has moved; it is lifted
//!   at the confirmation, the cancellation, its bound, or shutdown;
//! - a PgBouncer pause ends with the switch, with the last fence, at `pause_timeout`, or at
//!   shutdown;
//! - at start, and whenever HAProxy is reachable again after it was not, HAProxy is repaired to
//!   etcd's view ([`Move::Repair`]): drains no fence accounts for are lifted, and the leader,
//!   once its REST API confirms it, is UP in the primary backends; PgBouncer pauses left behind
//!   are resumed before the first pass (see [`crate::consumers::pgbouncer::Admin::resume_left_paused`]).
//!
//! The state lives behind one mutex shared by the pass (which sees the events), the
//! confirmation task (which sees the candidate answer), the watchdog (which lifts fences at
//! their bound) and the actuator task (the one writer to HAProxy's runtime API, so that moves
//! reach it in the order they were decided).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::task::{AbortHandle, JoinHandle};

use crate::confirm;
use crate::consumers::haproxy::runtime::{self, Move};
use crate::consumers::pgbouncer::Pause;
use crate::events::ClusterEvent;
use crate::model::{Cluster, Member};
use crate::target::Target;

/// `[failover]`: the fast path's settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// Follow leader changes at once (HAProxy runtime API, PgBouncer PAUSE/RESUME) instead of
    /// waiting for health checks; PgBouncer is pointed only at a confirmed primary.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the candidate's REST API is asked whether it takes writes.
    #[serde(default = "default_confirm_interval", with = "humantime_serde")]
    pub confirm_interval: Duration,
    /// How long a candidate may take to confirm; then the health checks decide.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Time limit of one REST probe.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// The longest a switchover request drains the leader while its leader key does not move:
    /// a `failover` key nobody acts on (a hung Patroni, a hand-written key) must not keep writes
    /// out. Patroni moves the key about 2.4 s after the request (FACTS: +2.41 s).
    #[serde(default = "default_fence_timeout", with = "humantime_serde")]
    pub fence_timeout: Duration,
    /// How often HAProxy's live primary servers are compared with etcd's leader.
    #[serde(default = "default_drift_interval", with = "humantime_serde")]
    pub drift_interval: Duration,
    /// How long they may disagree (health checks catching up) before haconfd warns.
    #[serde(default = "default_drift_grace", with = "humantime_serde")]
    pub drift_grace: Duration,
}

fn yes() -> bool {
    true
}
fn default_confirm_interval() -> Duration {
    Duration::from_millis(10)
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_probe_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_fence_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_drift_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_drift_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            confirm_interval: default_confirm_interval(),
            confirm_timeout: default_confirm_timeout(),
            probe_timeout: default_probe_timeout(),
            fence_timeout: default_fence_timeout(),
            drift_interval: default_drift_interval(),
            drift_grace: default_drift_grace(),
        }
    }
}

impl FailoverConfig {
    /// Refuses zero durations, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, d) in [
            ("confirm_interval", self.confirm_interval),
            ("confirm_timeout", self.confirm_timeout),
            ("probe_timeout", self.probe_timeout),
            ("fence_timeout", self.fence_timeout),
            ("drift_interval", self.drift_interval),
            ("drift_grace", self.drift_grace),
        ] {
            if d.is_zero() {
                return Err(format!("failover.{key} must be longer than 0s"));
            }
        }
        Ok(())
    }
}

/// One leader change as the fast path handled it, for `/status`: times in milliseconds after
/// the pass that saw the new leader key.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// The leader before.
    pub old: Option<String>,
    /// The new leader.
    pub new: String,
    /// When the new leader key was seen (Unix seconds).
    pub leader_key_at: f64,
    /// How long before the leader key the switchover was requested, if it was.
    pub switchover_requested_ms_before: Option<f64>,
    /// When the candidate was confirmed to take writes.
    pub confirmed_after_ms: Option<f64>,
    /// What confirmed it: `rest` (its `/primary` answer) or `member key` (its role).
    pub confirmed_by: Option<&'static str>,
    /// When HAProxy's runtime API took the move (every command answered as carried out).
    pub haproxy_after_ms: Option<f64>,
    /// When PgBouncer was re-pointed (reloaded on the new file, resumed).
    pub pgbouncer_after_ms: Option<f64>,
    #[serde(skip)]
    seen: Option<Instant>,
}

impl Timeline {
    fn ms_since_key(&self, t: Instant) -> Option<f64> {
        self.seen
            .map(|s| t.saturating_duration_since(s).as_secs_f64() * 1000.0)
    }
}

/// The last leader change, serialized as it is when read (see [`Router::view`]).
#[derive(Clone, Default)]
pub struct TimelineView(Option<Arc<Mutex<Shared>>>);

impl TimelineView {
    /// The timeline now.
    pub fn get(&self) -> Option<Timeline> {
        self.0.as_ref().and_then(|s| lock(s).timeline.clone())
    }

    /// The fences in force now, and the last move a consumer refused.
    pub fn fast_path(&self) -> FastPath {
        let Some(shared) = &self.0 else {
            return FastPath::default();
        };
        let sh = lock(shared);
        let now = Instant::now();
        FastPath {
            fences: sh
                .fences
                .iter()
                .map(|(server, f)| FenceView {
                    server: server.clone(),
                    why: f.why.text(),
                    since: f.since_unix,
                    for_s: round3(now.saturating_duration_since(f.since).as_secs_f64()),
                    lifted_in_s: round3(f.until.saturating_duration_since(now).as_secs_f64()),
                })
                .collect(),
            moves_refused: sh.moves_refused,
            last_refused: sh.last_refused.clone(),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl std::fmt::Debug for TimelineView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Serialize for TimelineView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

/// What the fast path holds on the consumers now, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FastPath {
    /// Servers haconfd has drained in the primary backends, and why.
    pub fences: Vec<FenceView>,
    /// Runtime-API moves HAProxy refused or could not be sent since start.
    pub moves_refused: u64,
    /// The last of them.
    pub last_refused: Option<String>,
}

/// One fence in force.
#[derive(Debug, Clone, Serialize)]
pub struct FenceView {
    /// The drained server.
    pub server: String,
    /// Why: `switchover requested`, `leader lost`, `leader key moved`.
    pub why: &'static str,
    /// When it began (Unix seconds).
    pub since: f64,
    /// Seconds it has lasted.
    pub for_s: f64,
    /// Seconds until its bound lifts it, unless the change ends first.
    pub lifted_in_s: f64,
}

/// What the fast path observes into `/metrics`: histograms and counters shared with
/// [`crate::metrics`].
#[derive(Clone, Default)]
pub struct Observers {
    /// Leader key → HAProxy switched, seconds.
    pub haproxy: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Leader key → PgBouncer switched, seconds.
    pub pgbouncer: Option<prometheus_client::metrics::histogram::Histogram>,
    /// 1 while HAProxy's live primaries disagree with etcd's leader past the grace.
    pub drift: Option<prometheus_client::metrics::gauge::Gauge>,
    /// Moves by consumer and result (`ok`, `refused`, `unreachable`, `failed`).
    pub moves: Option<Family<Vec<(String, String)>, Counter>>,
    /// Fences lifted by their bound, not by the end of a change.
    pub fences_expired: Option<Counter>,
}

impl Observers {
    /// Counts one move of `consumer` with `result`.
    pub fn count_move(&self, consumer: &str, result: &str) {
        if let Some(f) = &self.moves {
            f.get_or_create(&vec![
                ("consumer".to_owned(), consumer.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
        }
    }
}

/// The confirmation of a new leader, sent to the daemon so that it runs a pass at once.
#[derive(Debug, Clone)]
pub struct Confirmed {
    /// The confirmed leader.
    pub leader: String,
}

/// A HAProxy the fast path moves: a target with `server_state`.
#[derive(Debug, Clone)]
struct Route {
    target: String,
    ss: crate::consumers::haproxy::server_state::ServerStateConfig,
}

/// Why a server is fenced; each has its own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceWhy {
    /// A switchover was requested and the leader key has not moved yet: `fence_timeout`.
    Switchover,
    /// The leader key went away: `confirm_timeout`.
    LeaderLost,
    /// The fenced leader's key has moved to another member: `confirm_timeout`.
    KeyMoved,
}

impl FenceWhy {
    fn text(self) -> &'static str {
        match self {
            FenceWhy::Switchover => "switchover requested",
            FenceWhy::LeaderLost => "leader lost",
            FenceWhy::KeyMoved => "leader key moved",
        }
    }
}

/// A server haconfd drained.
#[derive(Debug, Clone)]
struct Fence {
    why: FenceWhy,
    since: Instant,
    since_unix: f64,
    /// Lifted then unless the change has ended.
    until: Instant,
}

#[derive(Default)]
struct Shared {
    /// Whether a pass has run: haconfd's own start moves nothing but repairs.
    started: bool,
    /// The leader key holder, per the last pass.
    leader: Option<String>,
    /// The leader confirmed to take writes: PgBouncer may point at it.
    confirmed: Option<String>,
    /// The leader HAProxy was last moved to (or found on at start).
    moved: Option<String>,
    /// The servers haconfd drained, each with its bound: every one is lifted or deliberately
    /// left down (demoted), never forgotten.
    fences: BTreeMap<String, Fence>,
    /// When the last switchover request was seen.
    switchover_at: Option<Instant>,
    /// Since when a leader change is under way (a fence, or a candidate not yet confirmed).
    changing_since: Option<Instant>,
    timeline: Option<Timeline>,
    /// Moves a consumer refused or could not take.
    moves_refused: u64,
    last_refused: Option<String>,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// One job for the actuator: a move, for every HAProxy.
struct Job {
    mv: Move,
    /// Whether its completion is the leader change's "HAProxy switched" moment.
    switch: bool,
}

/// The actuator task and the way to it.
struct Actuator {
    tx: mpsc::UnboundedSender<Job>,
    task: JoinHandle<()>,
}

/// The fast path of one cluster. Inert (every method a no-op, the gate always open) when
/// `failover.enabled` is false.
pub struct Router {
    cfg: FailoverConfig,
    shared: Arc<Mutex<Shared>>,
    routes: Arc<Vec<Route>>,
    pauses: Vec<(String, Pause)>,
    actuator: Option<Actuator>,
    notify: Option<mpsc::UnboundedSender<Confirmed>>,
    confirming: Option<(String, AbortHandle)>,
    drift: Option<AbortHandle>,
    /// Lifts fences at their bound; woken when the fences change.
    watchdog: Option<(Arc<Notify>, AbortHandle)>,
    observers: Observers,
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some((_, t)) = self.confirming.take() {
            t.abort();
        }
        if let Some(t) = self.drift.take() {
            t.abort();
        }
        if let Some((_, t)) = self.watchdog.take() {
            t.abort();
        }
    }
}

fn is_primary_role(role: &str) -> bool {
    matches!(role, "master" | "primary")
}

impl Router {
    /// The fast path for `targets`: every target with `server_state` is a HAProxy to move, every
    /// target with `pgbouncer_admin` a PgBouncer to pause.
    pub fn new(cfg: &FailoverConfig, targets: &[Target]) -> Router {
        Router::for_cluster(cfg, targets, None)
    }

    /// The fast path of one cluster among several behind the same HAProxy and PgBouncer:
    /// HAProxy moves act on its own backends (`{scope}` in the backend names replaced), and
    /// PgBouncer pauses on its own `databases` only, so that the other clusters' clients never
    /// wait. A Citus group has no fast path (its servers share backends with the other groups):
    /// the health checks route it.
    pub fn for_cluster(
        cfg: &FailoverConfig,
        targets: &[Target],
        cluster: Option<(
            &crate::model::ClusterId,
            Option<&crate::target::ClusterSettings>,
        )>,
    ) -> Router {
        let citus = cluster.is_some_and(|(id, _)| id.group.is_some());
        let routes = targets
            .iter()
            .filter(|_| !citus)
            .filter_map(|t| {
                t.server_state().map(|ss| Route {
                    target: t.name.clone(),
                    ss: match cluster {
                        Some((id, _)) => ss.for_scope(&id.scope),
                        None => ss.clone(),
                    },
                })
            })
            .collect();
        let pauses = targets
            .iter()
            .filter(|_| !citus)
            .filter_map(|t| t.pgbouncer_admin().map(|a| (t, a)))
            .flat_map(|(t, a)| match cluster {
                None => vec![(t.name.clone(), Pause::new(a.clone()))],
                Some((_, settings)) => settings
                    .map(|s| s.databases.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|db| (t.name.clone(), Pause::new(a.for_database(db))))
                    .collect(),
            })
            .collect();
        Router {
            cfg: cfg.clone(),
            shared: Arc::default(),
            routes: Arc::new(routes),
            pauses,
            actuator: None,
            notify: None,
            confirming: None,
            drift: None,
            watchdog: None,
            observers: Observers::default(),
        }
    }

    /// Connects the router to the daemon: confirmations arrive on `notify`, the drift check
    /// (which also repairs HAProxy when it is reachable again) runs every
    /// `failover.drift_interval`. Without it (`once`), candidates are confirmed by their member
    /// key only, and nothing is repaired.
    pub fn attach(&mut self, notify: mpsc::UnboundedSender<Confirmed>, observers: Observers) {
        self.notify = Some(notify);
        self.observers = observers;
        for (_, p) in &self.pauses {
            let observers = self.observers.clone();
            p.set_observer(Arc::new(move |result| {
                observers.count_move("pgbouncer", result)
            }));
        }
        if self.cfg.enabled && !self.routes.is_empty() && self.drift.is_none() {
            let actuator = self.actuator();
            self.drift = Some(
                tokio::spawn(drift_loop(
                    Arc::clone(&self.routes),
                    Arc::clone(&self.shared),
                    self.cfg.clone(),
                    self.observers.drift.clone(),
                    actuator,
                ))
                .abort_handle(),
            );
        }
    }

    /// Whether [`Router::attach`] connected it to the daemon.
    pub fn is_attached(&self) -> bool {
        self.notify.is_some()
    }

    /// Carries the state over to a router built for new settings (SIGHUP), so that a reload in
    /// the middle of a leader change neither repeats nor forgets a move.
    pub fn take_state_from(&mut self, old: &mut Router) {
        self.shared = Arc::clone(&old.shared);
        if let (Some(n), obs) = (old.notify.clone(), old.observers.clone()) {
            self.attach(n, obs);
        }
        // The same PgBouncer keeps its pause (and its deadline) across the reload.
        for (name, p) in &mut self.pauses {
            if let Some((_, kept)) = old.pauses.iter().find(|(n, o)| {
                n == name
                    && o.admin().config() == p.admin().config()
                    && o.admin().database() == p.admin().database()
            }) {
                *p = kept.clone();
            }
        }
        for (name, p) in &old.pauses {
            if p.is_active() && !self.pauses.iter().any(|(n, _)| n == name) {
                // The deadline ends it; the new config no longer names this PgBouncer.
                tracing::warn!(target = %name, "PgBouncer is paused and no longer configured; its pause deadline resumes it");
            }
        }
        // The fences in force keep their bounds under the new router's watchdog.
        if !lock(&self.shared).fences.is_empty() {
            self.wake_watchdog();
        }
    }

    /// Whether PgBouncer-like targets (`require_leader`) may be rendered for the cluster's
    /// leader: only once it is confirmed to take writes.
    pub fn gate_open(&self, cluster: &Cluster) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let Some(leader) = cluster.leader() else {
            return true;
        };
        lock(&self.shared).confirmed.as_deref() == Some(&leader.name)
    }

    /// Whether HAProxy's reloads wait: while a leader change is under way (at most
    /// `failover.confirm_timeout`). A new worker would take over the listeners, and the runtime
    /// API reaches the new worker only: connections the old one holds (the hold action) would
    /// never see the new primary come UP. The reload follows the confirmation, in the pass it
    /// triggers, with the move in its server state.
    pub fn defers_reloads(&self) -> bool {
        self.cfg.enabled
            && !self.routes.is_empty()
            && lock(&self.shared)
                .changing_since
                .is_some_and(|t| t.elapsed() < self.cfg.confirm_timeout)
    }

    /// A live view of the last leader change and the fences in force, read when `/status` is
    /// served: the moves that finish after the pass (HAProxy's, in its task) show without
    /// waiting for another pass.
    pub fn view(&self) -> TimelineView {
        TimelineView(Some(Arc::clone(&self.shared)))
    }

    /// Acts on one pass's model and events: fences on a switchover request or a lost leader,
    /// starts or confirms the candidate named by the leader key, undoes a cancelled
    /// switchover's fence; at the first pass, repairs what an earlier run left. Returns at once:
    /// HAProxy moves and PgBouncer pauses run in tasks.
    pub fn observe(&mut self, cluster: &Cluster, events: &[ClusterEvent]) {
        if !self.cfg.enabled {
            return;
        }
        let now = Instant::now();
        for e in events {
            match e {
                ClusterEvent::SwitchoverRequested {
                    leader,
                    scheduled_at: None,
                    ..
                } => {
                    let old = leader.clone().or_else(|| cluster.leader_name.clone());
                    // Only the leader still holding the key steps down; a request naming
                    // another is Patroni's to refuse.
                    if let Some(old) =
                        old.filter(|o| cluster.leader().is_some_and(|l| l.name == *o))
                    {
                        lock(&self.shared).switchover_at = Some(now);
                        self.fence(&old, FenceWhy::Switchover);
                    }
                }
                ClusterEvent::SwitchoverRequested {
                    scheduled_at: Some(at),
                    ..
                } => {
                    // Patroni acts on it at the first HA loop after its time (up to `loop_wait`
                    // later): a fence then would only keep writes out for nothing. The leader key
                    // moving fences, as for any change.
                    tracing::info!(scheduled_at = %at, "scheduled switchover: no fence before its leader key moves");
                }
                ClusterEvent::LeaderLost { old } => {
                    // The leader key still names it (its member key became unusable): it is
                    // the leader still, and a leader whose key is present is never fenced.
                    if cluster.leader_key.as_deref() == Some(old.as_str()) {
                        tracing::warn!(leader = %old, "the leader key still names this member but its member key is missing or unusable: routing left as it is");
                        continue;
                    }
                    self.fence(old, FenceWhy::LeaderLost);
                    lock(&self.shared).confirmed = None;
                }
                _ => {}
            }
        }
        self.key_moved(cluster, now);
        let leader = cluster.leader();
        let mut sh = lock(&self.shared);
        let first = !sh.started;
        sh.started = true;
        let Some(m) = leader else {
            sh.leader = None;
            drop(sh);
            self.cancel_confirming();
            if first {
                self.repair(None);
            }
            return;
        };
        let previous = sh.leader.replace(m.name.clone());
        if first {
            // haconfd's own start: HAProxy is repaired (stale drains lifted now, the leader
            // made UP once its REST API confirms it); PgBouncer may follow a leader Patroni
            // already reports promoted.
            sh.moved = Some(m.name.clone());
            if is_primary_role(&m.role) {
                sh.confirmed = Some(m.name.clone());
            }
            drop(sh);
            self.repair(Some(m));
            return;
        }
        if sh.confirmed.as_deref() == Some(&m.name) {
            // A switchover that was requested and then cleared with the leader in place.
            if cluster.failover.is_none() && sh.fences.contains_key(&m.name) {
                sh.fences.remove(&m.name);
                let done = sh.fences.is_empty();
                if done {
                    sh.changing_since = None;
                }
                drop(sh);
                tracing::info!(leader = %m.name, "switchover request cleared with the leader in place: undoing the drain");
                self.send(Move::Unfence {
                    servers: vec![m.name.clone()],
                });
                if done {
                    self.resume_all("switchover cancelled");
                }
            }
            return;
        }
        if sh.timeline.as_ref().is_none_or(|t| t.new != m.name) || previous.is_none() {
            let old = sh.moved.clone().filter(|o| *o != m.name);
            sh.timeline = Some(Timeline {
                old,
                new: m.name.clone(),
                leader_key_at: unix_now(),
                switchover_requested_ms_before: sh
                    .switchover_at
                    .map(|s| now.saturating_duration_since(s).as_secs_f64() * 1000.0),
                confirmed_after_ms: None,
                confirmed_by: None,
                haproxy_after_ms: None,
                pgbouncer_after_ms: None,
                seen: Some(now),
            });
        }
        sh.changing_since.get_or_insert(now);
        drop(sh);
        if is_primary_role(&m.role) {
            self.cancel_confirming();
            self.confirm(&m.name, "member key", Instant::now());
            return;
        }
        if self.confirming.as_ref().is_some_and(|(n, _)| *n == m.name) {
            return;
        }
        self.start_confirming(m, false);
    }

    /// A fenced leader whose key has moved to another member (or away) no longer waits on
    /// `fence_timeout`: the change is under way, and it stays drained until the new leader is
    /// confirmed, at most `confirm_timeout`.
    fn key_moved(&mut self, cluster: &Cluster, now: Instant) {
        let mut sh = lock(&self.shared);
        let mut changed = false;
        for (server, f) in sh.fences.iter_mut() {
            if f.why == FenceWhy::Switchover && cluster.leader_key.as_deref() != Some(server) {
                f.why = FenceWhy::KeyMoved;
                f.until = now + self.cfg.confirm_timeout;
                changed = true;
            }
        }
        drop(sh);
        if changed {
            self.wake_watchdog();
        }
    }

    /// At start: drains an earlier run left are lifted now; the leader, once its REST API says
    /// it takes writes, is made UP in the primary backends and every other server there DOWN.
    /// Only when attached to the daemon (`once` moves nothing).
    fn repair(&mut self, leader: Option<&Member>) {
        if !self.is_attached() || self.routes.is_empty() {
            return;
        }
        self.send(Move::Repair { leader: None });
        if let Some(m) = leader {
            self.start_confirming(m, true);
        }
    }

    /// For `once` (no daemon to wake): probes the leader once if it is not confirmed yet, so
    /// that a one-shot render does not wait for Patroni to rewrite its member key.
    pub async fn confirm_now(&mut self, cluster: &Cluster) {
        if !self.cfg.enabled || self.notify.is_some() || self.gate_open(cluster) {
            return;
        }
        let Some(m) = cluster.leader() else { return };
        match confirm::probe(m, self.cfg.probe_timeout).await {
            Ok(confirm::Probe::Writable) => self.confirm(&m.name, "rest", Instant::now()),
            Ok(confirm::Probe::NotYet(why)) => {
                tracing::info!(leader = %m.name, answer = %why, "the leader does not take writes yet")
            }
            Err(e) => tracing::info!("{e}"),
        }
    }

    fn cancel_confirming(&mut self) {
        if let Some((_, t)) = self.confirming.take() {
            t.abort();
        }
    }

    /// Probes `m` until it takes writes: then confirms it (a leader change), or, for the
    /// `repair` at start, makes HAProxy agree with it.
    fn start_confirming(&mut self, m: &Member, repair: bool) {
        self.cancel_confirming();
        let member = m.clone();
        let cfg = self.cfg.clone();
        let notify = self.notify.clone();
        let core = self.core();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + cfg.confirm_timeout;
            match confirm::until_writable(
                &member,
                cfg.confirm_interval,
                cfg.probe_timeout,
                deadline,
            )
            .await
            {
                Ok(Some(at)) => {
                    if core.confirm(&member.name, "rest", at) {
                        if let Some(n) = notify {
                            let _ = n.send(Confirmed {
                                leader: member.name.clone(),
                            });
                        }
                    }
                    if repair {
                        core.repair(&member.name);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::info!("{e}");
                    // A REST API haconfd cannot probe (HTTPS): a leader its member key says is
                    // promoted is the one to repair HAProxy to.
                    if repair {
                        core.repair(&member.name);
                    }
                }
            }
        });
        self.confirming = Some((m.name.clone(), task.abort_handle()));
    }

    fn confirm(&mut self, name: &str, by: &'static str, at: Instant) {
        self.core().confirm(name, by, at);
    }

    fn core(&mut self) -> Core {
        Core {
            shared: Arc::clone(&self.shared),
            actuator: self.actuator(),
        }
    }

    /// The way to the actuator, started on first use (None when there is no HAProxy to move).
    fn actuator(&mut self) -> Option<mpsc::UnboundedSender<Job>> {
        if self.routes.is_empty() {
            return None;
        }
        if self.actuator.as_ref().is_none_or(|a| a.tx.is_closed()) {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(actuate(
                rx,
                Arc::clone(&self.routes),
                Arc::clone(&self.shared),
                self.observers.clone(),
            ));
            self.actuator = Some(Actuator { tx, task });
        }
        self.actuator.as_ref().map(|a| a.tx.clone())
    }

    fn send(&mut self, mv: Move) {
        if let Some(a) = self.actuator() {
            let _ = a.send(Job { mv, switch: false });
        }
    }

    /// Drains `old` (once) with the bound its reason gives, and pauses every PgBouncer.
    fn fence(&mut self, old: &str, why: FenceWhy) {
        let now = Instant::now();
        let bound = match why {
            FenceWhy::Switchover => self.cfg.fence_timeout,
            FenceWhy::LeaderLost | FenceWhy::KeyMoved => self.cfg.confirm_timeout,
        };
        let mut sh = lock(&self.shared);
        let first_fence = !sh.fences.contains_key(old);
        let fence = sh.fences.entry(old.to_owned()).or_insert(Fence {
            why,
            since: now,
            since_unix: unix_now(),
            until: now + bound,
        });
        if !first_fence && fence.why == FenceWhy::Switchover && why != FenceWhy::Switchover {
            fence.why = why;
            fence.until = now + bound;
        }
        sh.changing_since.get_or_insert(now);
        drop(sh);
        if first_fence {
            tracing::info!(old = %old, why = why.text(), bound = %humantime::format_duration(bound), "fencing the old primary: no new connection goes to it");
            self.send(Move::Fence {
                old: old.to_owned(),
            });
        }
        self.wake_watchdog();
        for (name, p) in &self.pauses {
            if !p.is_active() {
                tracing::debug!(target = %name, why = why.text(), "pausing PgBouncer");
            }
            p.begin(why.text());
        }
    }

    /// Starts the watchdog (once) or tells it the fences changed.
    fn wake_watchdog(&mut self) {
        if !self.cfg.enabled {
            return;
        }
        if self.watchdog.is_none() {
            let wake = Arc::new(Notify::new());
            let task = tokio::spawn(watchdog(
                Arc::clone(&self.shared),
                Arc::clone(&wake),
                self.actuator(),
                self.pauses.iter().map(|(_, p)| p.clone()).collect(),
                self.observers.clone(),
            ));
            self.watchdog = Some((wake, task.abort_handle()));
        }
        if let Some((wake, _)) = &self.watchdog {
            wake.notify_one();
        }
    }

    fn resume_all(&self, why: &str) {
        resume_pauses(
            self.pauses.iter().map(|(_, p)| p.clone()).collect(),
            why.to_owned(),
        );
    }

    /// After a pass that rendered `target` (a PgBouncer) for the confirmed leader and reloaded
    /// it, or found it already pointing there: ends its pause and records the switch.
    pub async fn pgbouncer_settled(&self, target: &str) {
        // A fence still up means the leader change is under way (switchover requested, leader
        // lost): the pause it began holds until a new leader is confirmed or the fence ends.
        if !self.cfg.enabled || !lock(&self.shared).fences.is_empty() {
            return;
        }
        // One pause per PgBouncer, or one per database of this cluster.
        let mut ok = true;
        for (_, p) in self
            .pauses
            .iter()
            .filter(|(n, p)| n == target && p.is_active())
        {
            if let Err(e) = p.end("new primary confirmed").await {
                ok = false;
                tracing::warn!(target = %target, error = %e, "cannot resume PgBouncer; its pause deadline will")
            }
        }
        if ok {
            self.record_pgbouncer();
        }
    }

    fn record_pgbouncer(&self) {
        let now = Instant::now();
        let mut sh = lock(&self.shared);
        let confirmed = sh.confirmed.clone();
        if let Some(t) = sh.timeline.as_mut() {
            if t.pgbouncer_after_ms.is_none() && confirmed.as_deref() == Some(&t.new) {
                t.pgbouncer_after_ms = t.ms_since_key(now);
                if let (Some(h), Some(ms)) = (&self.observers.pgbouncer, t.pgbouncer_after_ms) {
                    h.observe(ms / 1000.0);
                }
                tracing::info!(leader = %t.new, after_ms = ?t.pgbouncer_after_ms, "PgBouncer follows the new primary");
            }
        }
    }

    /// Undoes what the fast path holds on the consumers, for a graceful stop: every fence
    /// lifted, the moves already decided sent (in order, by the actuator, which then ends),
    /// every PgBouncer pause ended with `RESUME`. The caller bounds it.
    pub async fn shutdown(&mut self) {
        self.cancel_confirming();
        for t in [self.drift.take(), self.watchdog.take().map(|(_, t)| t)]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
        let fenced: Vec<String> = {
            let mut sh = lock(&self.shared);
            sh.changing_since = None;
            std::mem::take(&mut sh.fences).into_keys().collect()
        };
        if !fenced.is_empty() {
            tracing::info!(servers = ?fenced, "shutting down: lifting the fast path's drains");
            self.send(Move::Unfence { servers: fenced });
        }
        if let Some(Actuator { tx, task }) = self.actuator.take() {
            // The actuator ends once it has sent every move queued before this.
            drop(tx);
            let _ = task.await;
        }
        for (name, p) in &self.pauses {
            if p.is_active() {
                match p.end("shutting down").await {
                    Ok(_) => {
                        tracing::info!(target = %name, console = p.admin().console(), "shutting down: PgBouncer resumed")
                    }
                    Err(e) => {
                        tracing::error!(target = %name, error = %e, "shutting down: cannot resume PgBouncer; the next start resumes it")
                    }
                }
            }
        }
    }
}

/// Ends every pause in its own task (the caller does not wait).
fn resume_pauses(pauses: Vec<Pause>, why: String) {
    for p in pauses {
        let why = why.clone();
        tokio::spawn(async move {
            if let Err(e) = p.end(&why).await {
                tracing::warn!(error = %e, "cannot resume PgBouncer; its pause deadline will");
            }
        });
    }
}

/// What the confirmation task needs of the router.
struct Core {
    shared: Arc<Mutex<Shared>>,
    actuator: Option<mpsc::UnboundedSender<Job>>,
}

impl Core {
    /// Records `name` as confirmed (unless the leader key has moved on) and sends HAProxy its
    /// move, once. Returns whether this confirmation is news.
    fn confirm(&self, name: &str, by: &'static str, at: Instant) -> bool {
        let mut sh = lock(&self.shared);
        if sh.leader.as_deref() != Some(name) || sh.confirmed.as_deref() == Some(name) {
            return false;
        }
        sh.confirmed = Some(name.to_owned());
        if let Some(t) = sh.timeline.as_mut().filter(|t| t.new == name) {
            t.confirmed_after_ms = t.ms_since_key(at);
            t.confirmed_by = Some(by);
        }
        tracing::info!(leader = %name, by, "the new primary takes writes");
        // Every fence ends here: each fenced server is un-drained, and every earlier leader is
        // set DOWN in the primary backends (deliberately left down, never forgotten).
        let fenced: Vec<String> = std::mem::take(&mut sh.fences).into_keys().collect();
        sh.changing_since = None;
        let demote: Vec<String> = sh
            .moved
            .iter()
            .chain(fenced.iter())
            .filter(|o| *o != name)
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let repeat = sh.moved.as_deref() == Some(name) && fenced.is_empty();
        sh.moved = Some(name.to_owned());
        drop(sh);
        if !repeat {
            if let Some(a) = &self.actuator {
                let _ = a.send(Job {
                    mv: Move::Promote {
                        new: name.to_owned(),
                        demote,
                    },
                    switch: true,
                });
            }
        }
        true
    }

    /// At start: `name`, the leader, answered writable through its REST API (or, for one
    /// haconfd cannot probe, its member key says it is promoted): HAProxy is made to agree with
    /// it.
    fn repair(&self, name: &str) {
        {
            let sh = lock(&self.shared);
            if sh.leader.as_deref() != Some(name) || sh.confirmed.as_deref() != Some(name) {
                return;
            }
        }
        if let Some(a) = &self.actuator {
            let _ = a.send(Job {
                mv: Move::Repair {
                    leader: Some(name.to_owned()),
                },
                switch: false,
            });
        }
    }
}

/// What a move did on one HAProxy.
enum Moved {
    /// Every command answered as carried out (or none was needed).
    Done(Vec<String>),
    /// HAProxy answered some commands with an error.
    Refused(Vec<runtime::Refused>),
    /// The socket could not be reached.
    Unreachable(std::io::Error),
}

/// One move on one HAProxy: its live state (`show servers state` of the route's backends, on
/// one connection), then each command on its own connection, each answer checked.
async fn move_one(r: &Route, mv: &Move, fenced: &BTreeSet<String>) -> Moved {
    const LIMIT: Duration = Duration::from_secs(2);
    let dump = match crate::consumers::haproxy::cli(
        &r.ss.stats_socket,
        &runtime::dump_command(&r.ss),
        LIMIT,
    )
    .await
    {
        Ok(d) => d,
        Err(e) => return Moved::Unreachable(e),
    };
    let live = runtime::parse_live(&dump);
    let cmds = runtime::move_commands(&r.ss, &live, mv, fenced);
    if let Move::Fence { old } = mv {
        let maint = live
            .iter()
            .any(|((b, s), l)| s == old && r.ss.primary_backends.contains(b) && l.in_maint());
        if maint {
            tracing::warn!(target = %r.target, server = %old, "the old primary is in maintenance (an operator's): not drained, left as it is");
        }
    }
    if cmds.is_empty() {
        return Moved::Done(cmds);
    }
    match runtime::apply_commands(&r.ss.stats_socket, &cmds, LIMIT).await {
        Ok(refused) if refused.is_empty() => Moved::Done(cmds),
        Ok(refused) => Moved::Refused(refused),
        Err(e) => Moved::Unreachable(e),
    }
}

/// The one writer to HAProxy's runtime API: applies each move to every HAProxy, in order, and
/// checks every answer. A refused or undeliverable move is an error in the log, in `/status`
/// and in `haconfd_failover_moves_total`; the health checks stay in charge then.
async fn actuate(
    mut rx: mpsc::UnboundedReceiver<Job>,
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    observers: Observers,
) {
    while let Some(job) = rx.recv().await {
        let mut ok = true;
        // The fences in force when the move is made: a fence decided after this move was
        // queued is in the set already, and its own move follows this one.
        let fenced: BTreeSet<String> = lock(&shared).fences.keys().cloned().collect();
        for r in routes.iter() {
            match move_one(r, &job.mv, &fenced).await {
                Moved::Done(cmds) => {
                    if !cmds.is_empty() {
                        observers.count_move("haproxy", "ok");
                        tracing::info!(target = %r.target, commands = ?cmds, "HAProxy moved through the runtime API");
                    }
                }
                Moved::Refused(refused) => {
                    ok = false;
                    observers.count_move("haproxy", "refused");
                    let text = refused
                        .iter()
                        .map(|f| format!("{:?}: {}", f.command, f.answer))
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::error!(target = %r.target, socket = %r.ss.stats_socket.display(), refused = %text, "HAProxy refused runtime API commands (the stats socket needs `level admin`); its health checks stay in charge");
                    record_refusal(&shared, format!("{}: {text}", r.target));
                }
                Moved::Unreachable(e) => {
                    ok = false;
                    observers.count_move("haproxy", "unreachable");
                    tracing::error!(target = %r.target, socket = %r.ss.stats_socket.display(), error = %e, "cannot reach HAProxy's runtime API; its health checks stay in charge");
                    record_refusal(
                        &shared,
                        format!(
                            "{}: {} unreachable: {e}",
                            r.target,
                            r.ss.stats_socket.display()
                        ),
                    );
                }
            }
        }
        if job.switch && ok {
            let now = Instant::now();
            let mut sh = lock(&shared);
            if let (Move::Promote { new, .. }, Some(t)) = (&job.mv, sh.timeline.as_mut()) {
                if t.new == *new {
                    t.haproxy_after_ms = t.ms_since_key(now);
                    if let (Some(h), Some(ms)) = (&observers.haproxy, t.haproxy_after_ms) {
                        h.observe(ms / 1000.0);
                    }
                    tracing::info!(leader = %new, after_ms = ?t.haproxy_after_ms, "HAProxy follows the new primary");
                }
            }
        }
    }
}

fn record_refusal(shared: &Mutex<Shared>, what: String) {
    let mut sh = lock(shared);
    sh.moves_refused += 1;
    sh.last_refused = Some(what);
}

/// Lifts each fence at its bound: a switchover request whose leader key did not move within
/// `fence_timeout`, a lost leader not replaced by a confirmed one within `confirm_timeout`.
/// When no fence is left, the PgBouncer pauses they began end too.
async fn watchdog(
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    actuator: Option<mpsc::UnboundedSender<Job>>,
    pauses: Vec<Pause>,
    observers: Observers,
) {
    loop {
        let next = lock(&shared).fences.values().map(|f| f.until).min();
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let now = Instant::now();
        let (expired, none_left) = {
            let mut sh = lock(&shared);
            let expired: Vec<(String, Fence)> = sh
                .fences
                .iter()
                .filter(|(_, f)| f.until <= now)
                .map(|(s, f)| (s.clone(), f.clone()))
                .collect();
            for (s, _) in &expired {
                sh.fences.remove(s);
            }
            let none_left = sh.fences.is_empty();
            if none_left && !expired.is_empty() {
                sh.changing_since = None;
            }
            (expired, none_left)
        };
        if expired.is_empty() {
            continue;
        }
        for (server, f) in &expired {
            if let Some(c) = &observers.fences_expired {
                c.inc();
            }
            let lasted = humantime::format_duration(Duration::from_millis(
                now.saturating_duration_since(f.since).as_millis() as u64,
            ));
            match f.why {
                FenceWhy::Switchover => {
                    tracing::warn!(server = %server, lasted = %lasted, "the switchover request was not acted on within failover.fence_timeout (its leader key did not move): the drain is lifted and the leader takes new connections again; the failover key stays until Patroni or an operator clears it")
                }
                _ => {
                    tracing::warn!(server = %server, why = f.why.text(), lasted = %lasted, "no new leader confirmed within failover.confirm_timeout: the drain is lifted, HAProxy's health checks decide")
                }
            }
        }
        if let Some(a) = &actuator {
            let _ = a.send(Job {
                mv: Move::Unfence {
                    servers: expired.into_iter().map(|(s, _)| s).collect(),
                },
                switch: false,
            });
        }
        if none_left {
            resume_pauses(pauses.clone(), "fence lifted at its bound".to_owned());
        }
    }
}

/// Compares HAProxy's live primary servers (`show servers state`) with etcd's leader every
/// `drift_interval`; warns, and sets the gauge, when they disagree for longer than
/// `drift_grace`, naming haconfd's own fence when it is the cause. Repairs HAProxy when it is
/// reachable again after it was not (a restart loads whatever state it had), and lifts a drain
/// that no fence accounts for.
async fn drift_loop(
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    cfg: FailoverConfig,
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    actuator: Option<mpsc::UnboundedSender<Job>>,
) {
    let mut since: Option<Instant> = None;
    let mut warned = false;
    let mut unreachable = vec![false; routes.len()];
    loop {
        tokio::time::sleep(cfg.drift_interval).await;
        let (leader, confirmed) = {
            let sh = lock(&shared);
            (sh.leader.clone(), sh.confirmed.clone())
        };
        let mut disagree = Vec::new();
        let mut repair = false;
        for (i, r) in routes.iter().enumerate() {
            let Some(dump) = runtime::dump(&r.ss.stats_socket, Duration::from_secs(2)).await else {
                unreachable[i] = true;
                continue;
            };
            if std::mem::take(&mut unreachable[i]) {
                tracing::info!(target = %r.target, "HAProxy's runtime API answers again: repairing it to etcd's view");
                repair = true;
            }
            let live = runtime::parse_live(&dump);
            // Read after the dump: a fence decided meanwhile is in the set already.
            let fenced: BTreeMap<String, Fence> = lock(&shared)
                .fences
                .iter()
                .map(|(s, f)| (s.clone(), f.clone()))
                .collect();
            let stale = live.iter().any(|((b, s), l)| {
                r.ss.primary_backends.contains(b)
                    && l.is_drained()
                    && !l.in_maint()
                    && !fenced.contains_key(s)
            });
            if stale {
                tracing::warn!(target = %r.target, "a server is drained in a primary backend with no fence of haconfd's in force: lifting it (take a server out by hand with `state maint`)");
                repair = true;
            }
            let Some(leader) = &leader else { continue };
            let primaries = runtime::live_primaries(&r.ss, &dump);
            if primaries != [leader.clone()] {
                let fence = fenced
                    .get(leader)
                    .map(|f| {
                        format!(
                            " ({leader} is drained by haconfd's fence: {}, {:.1}s ago)",
                            f.why.text(),
                            f.since.elapsed().as_secs_f64()
                        )
                    })
                    .unwrap_or_default();
                disagree.push(if primaries.is_empty() {
                    if fence.is_empty() {
                        format!(
                            "{}: no primary server UP (the leader fails its checks)",
                            r.target
                        )
                    } else {
                        format!("{}: no primary server takes connections{fence}", r.target)
                    }
                } else {
                    format!("{}: {} UP{fence}", r.target, primaries.join(", "))
                });
            }
        }
        if repair {
            if let Some(a) = &actuator {
                let leader = confirmed.clone().filter(|c| Some(c) == leader.as_ref());
                let _ = a.send(Job {
                    mv: Move::Repair { leader },
                    switch: false,
                });
            }
        }
        let Some(leader) = leader else {
            since = None;
            continue;
        };
        if disagree.is_empty() {
            if warned {
                tracing::info!(leader = %leader, "HAProxy's primary agrees with etcd's leader again");
            }
            since = None;
            warned = false;
            if let Some(g) = &gauge {
                g.set(0);
            }
            continue;
        }
        let start = *since.get_or_insert_with(Instant::now);
        if start.elapsed() >= cfg.drift_grace && !warned {
            warned = true;
            if let Some(g) = &gauge {
                g.set(1);
            }
            tracing::warn!(leader = %leader, live = ?disagree, for_s = start.elapsed().as_secs(), "HAProxy's live primary servers disagree with etcd's leader");
        }
    }
}
