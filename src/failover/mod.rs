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

mod actuator;
mod change;
pub mod confirm;
mod crash;
mod drift;
mod fence;
mod timeline;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;

use crate::consumers::haproxy::runtime::Move;
use crate::consumers::pgbouncer::Pause;
use crate::model::Cluster;
use crate::target::Target;
use actuator::Actuator;
pub use crash::CrashHoldConfig;
use fence::Fence;
pub(crate) use timeline::round3;
pub use timeline::{FastPath, FenceView, HoldView, Observers, PauseView, Timeline, TimelineView};

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
    /// `[failover.crash_hold]`: a dead primary noticed from here, its clients held until a
    /// primary takes writes (see [`CrashHoldConfig`]).
    #[serde(default)]
    pub crash_hold: CrashHoldConfig,
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
            crash_hold: CrashHoldConfig::default(),
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
        self.crash_hold.validate()
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

#[derive(Default)]
struct Shared {
    /// Whether a pass has run: haconfd's own start moves nothing but repairs.
    started: bool,
    /// The leader key holder, per the last pass.
    leader: Option<String>,
    /// The standby leader confirmed through `GET /standby-leader`: targets with
    /// `standby_leader = "follow"` may point at it.
    standby_confirmed: Option<String>,
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
    /// The crash hold in force: the confirmed leader's PostgreSQL died (its fence is in
    /// `fences`, `Crash`).
    hold: Option<crash::Hold>,
    /// The bound of a hold that begins now: the cluster's lease, capped by the settings.
    hold_bound: Duration,
    /// The leader key holder's member, when it takes writes: the one the crash watcher probes
    /// once it is confirmed.
    leader_member: Option<crate::model::Member>,
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
    /// The standby leader last logged as such (once per leader, not at every pass).
    noted_standby: Option<String>,
    /// The probe of the standby leader's `/standby-leader`, while it runs.
    standby_probe: Option<AbortHandle>,
    drift: Option<AbortHandle>,
    /// Lifts fences at their bound; woken when the fences change.
    watchdog: Option<(Arc<Notify>, AbortHandle)>,
    /// The crash watcher and the member it probes.
    crash: Option<(crate::model::Member, AbortHandle)>,
    /// The cluster, for the crash hold's hook events.
    who: Option<crash::Who>,
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
        if let Some((_, t)) = self.crash.take() {
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
            noted_standby: None,
            standby_probe: None,
            drift: None,
            watchdog: None,
            crash: None,
            who: None,
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
                tokio::spawn(drift::drift_loop(
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
        // A crash hold in force is watched on by the new router.
        self.who = old.who.clone();
        if let Some((_, t)) = old.crash.take() {
            t.abort();
        }
        self.watch_primary();
    }

    /// Whether PgBouncer-like targets (`require_leader`) may be rendered for the cluster's
    /// leader: only once it is confirmed to take writes.
    pub fn gate_open(&self, cluster: &Cluster) -> bool {
        if cluster.standby_leader().is_some() {
            return false;
        }
        if !self.cfg.enabled {
            return true;
        }
        let Some(leader) = cluster.leader() else {
            return true;
        };
        lock(&self.shared).confirmed.as_deref() == Some(&leader.name)
    }

    /// Whether targets with `standby_leader = "follow"` may point at `cluster`'s leader: a
    /// leader that takes writes, as [`Router::gate_open`] says, or a standby cluster's leader
    /// that answered `GET /standby-leader` with 200.
    pub fn follow_gate_open(&self, cluster: &Cluster) -> bool {
        match cluster.standby_leader() {
            Some(m) => lock(&self.shared).standby_confirmed.as_deref() == Some(&m.name),
            None => self.gate_open(cluster),
        }
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
        TimelineView(
            Some(Arc::clone(&self.shared)),
            timeline::Reach {
                routes: Arc::clone(&self.routes),
                pauses: self
                    .pauses
                    .iter()
                    .map(|(t, p)| (t.clone(), p.watch()))
                    .collect(),
            },
        )
    }

    /// Undoes what the fast path holds on the consumers, for a graceful stop: every fence
    /// lifted, the moves already decided sent (in order, by the actuator, which then ends),
    /// every PgBouncer pause ended with `RESUME`. The caller bounds it.
    pub async fn shutdown(&mut self) {
        self.cancel_confirming();
        for t in [
            self.drift.take(),
            self.watchdog.take().map(|(_, t)| t),
            self.crash.take().map(|(_, t)| t),
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
        let (fenced, hold): (Vec<String>, _) = {
            let mut sh = lock(&self.shared);
            sh.changing_since = None;
            (
                std::mem::take(&mut sh.fences).into_keys().collect(),
                sh.hold.take(),
            )
        };
        if let Some(hold) = &hold {
            crash::released(hold, crash::Ended::Shutdown, None, &self.observers);
        }
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
