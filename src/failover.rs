//! The failover fast path: routing follows Patroni's leader key instead of waiting for health
//! checks. On a switchover request or the loss of the leader, HAProxy stops sending new
//! connections to the old primary (drain) and PgBouncer pauses; on a new leader key, the
//! candidate is confirmed through its REST API (it answers writable about 0.2 s after its
//! leader key) and, the moment it is, HAProxy sends writes to it and the pipeline re-points
//! PgBouncer, reloads it and resumes it. The health checks stay the backstop: a candidate that
//! never confirms is never forced UP, two members claiming `primary` resolve by the leader key
//! alone, and a move is made once and undone only by a later leader change.
//!
//! The state lives behind one mutex shared by the pass (which sees the events), the
//! confirmation task (which sees the candidate answer) and the actuator task (the one writer to
//! HAProxy's runtime API, so that moves reach it in the order they were decided).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::confirm;
use crate::events::ClusterEvent;
use crate::model::{Cluster, Member};
use crate::pgbouncer::Pause;
use crate::server_state::{self, Move};
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
    /// When HAProxy's runtime API took the move.
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
        self.0
            .as_ref()
            .and_then(|s| s.lock().expect("failover lock").timeline.clone())
    }
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

/// What the fast path observes into `/metrics`: histograms are shared with [`crate::metrics`].
#[derive(Clone, Default)]
pub struct Observers {
    /// Leader key → HAProxy switched, seconds.
    pub haproxy: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Leader key → PgBouncer switched, seconds.
    pub pgbouncer: Option<prometheus_client::metrics::histogram::Histogram>,
    /// 1 while HAProxy's live primaries disagree with etcd's leader past the grace.
    pub drift: Option<prometheus_client::metrics::gauge::Gauge>,
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
    ss: crate::server_state::ServerStateConfig,
    dest: PathBuf,
}

#[derive(Default)]
struct Shared {
    /// Whether a pass has run: haconfd's own start moves nothing.
    started: bool,
    /// The leader key holder, per the last pass.
    leader: Option<String>,
    /// The leader confirmed to take writes: PgBouncer may point at it.
    confirmed: Option<String>,
    /// The leader HAProxy was last moved to (or found on at start).
    moved: Option<String>,
    /// The old primary haconfd drained.
    fenced: Option<String>,
    /// When the last switchover request was seen.
    switchover_at: Option<Instant>,
    /// Since when a leader change is under way (a fence, or a candidate not yet confirmed).
    changing_since: Option<Instant>,
    timeline: Option<Timeline>,
}

/// One job for the actuator: a move, for every HAProxy.
struct Job {
    mv: Move,
    /// Whether its completion is the leader change's "HAProxy switched" moment.
    switch: bool,
}

/// The fast path of one cluster. Inert (every method a no-op, the gate always open) when
/// `failover.enabled` is false.
pub struct Router {
    cfg: FailoverConfig,
    shared: Arc<Mutex<Shared>>,
    routes: Arc<Vec<Route>>,
    pauses: Vec<(String, Pause)>,
    actuator: Option<mpsc::UnboundedSender<Job>>,
    notify: Option<mpsc::UnboundedSender<Confirmed>>,
    confirming: Option<(String, tokio::task::AbortHandle)>,
    drift: Option<tokio::task::AbortHandle>,
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
                t.server_state.as_ref().map(|ss| Route {
                    target: t.name.clone(),
                    ss: match cluster {
                        Some((id, _)) => ss.for_scope(&id.scope),
                        None => ss.clone(),
                    },
                    dest: t.dest.clone(),
                })
            })
            .collect();
        let pauses = targets
            .iter()
            .filter(|_| !citus)
            .filter_map(|t| t.pgbouncer_admin.as_ref().map(|a| (t, a)))
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
            observers: Observers::default(),
        }
    }

    /// Connects the router to the daemon: confirmations arrive on `notify`, and the drift check
    /// runs every `failover.drift_interval`. Without it (`once`), candidates are confirmed by
    /// their member key only.
    pub fn attach(&mut self, notify: mpsc::UnboundedSender<Confirmed>, observers: Observers) {
        self.notify = Some(notify);
        self.observers = observers;
        if self.cfg.enabled && !self.routes.is_empty() && self.drift.is_none() {
            self.drift = Some(
                tokio::spawn(drift_loop(
                    Arc::clone(&self.routes),
                    Arc::clone(&self.shared),
                    self.cfg.clone(),
                    self.observers.drift.clone(),
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
        self.shared
            .lock()
            .expect("failover lock")
            .confirmed
            .as_deref()
            == Some(&leader.name)
    }

    /// Whether HAProxy's reloads wait: while a leader change is under way (at most
    /// `failover.confirm_timeout`). A new worker would take over the listeners, and the runtime
    /// API reaches the new worker only: connections the old one holds (the hold action) would
    /// never see the new primary come UP. The reload follows the confirmation, in the pass it
    /// triggers, with the move in its server state.
    pub fn defers_reloads(&self) -> bool {
        self.cfg.enabled
            && !self.routes.is_empty()
            && self
                .shared
                .lock()
                .expect("failover lock")
                .changing_since
                .is_some_and(|t| t.elapsed() < self.cfg.confirm_timeout)
    }

    /// A live view of the last leader change, read when `/status` is served: the moves that
    /// finish after the pass (HAProxy's, in its task) show without waiting for another pass.
    pub fn view(&self) -> TimelineView {
        TimelineView(Some(Arc::clone(&self.shared)))
    }

    /// Acts on one pass's model and events: fences on a switchover request or a lost leader,
    /// starts or confirms the candidate named by the leader key, undoes a cancelled
    /// switchover's fence. Returns at once: HAProxy moves and PgBouncer pauses run in tasks.
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
                        self.shared.lock().expect("failover lock").switchover_at = Some(now);
                        self.fence(&old, "switchover requested");
                    }
                }
                ClusterEvent::LeaderLost { old } => {
                    self.fence(old, "leader lost");
                    self.shared.lock().expect("failover lock").confirmed = None;
                }
                _ => {}
            }
        }
        let leader = cluster.leader();
        let mut sh = self.shared.lock().expect("failover lock");
        let first = !sh.started;
        sh.started = true;
        let Some(m) = leader else {
            sh.leader = None;
            drop(sh);
            self.cancel_confirming();
            return;
        };
        let previous = sh.leader.replace(m.name.clone());
        if sh.confirmed.as_deref() == Some(&m.name) {
            // A switchover that was requested and then cleared with the leader in place.
            if cluster.failover.is_none() && sh.fenced.as_deref() == Some(&m.name) {
                sh.fenced = None;
                sh.changing_since = None;
                drop(sh);
                tracing::info!(leader = %m.name, "switchover request cleared with the leader in place: undoing the drain");
                self.send(Move::Unfence {
                    leader: m.name.clone(),
                });
                self.resume_all("switchover cancelled");
            }
            return;
        }
        if first {
            // haconfd's own start: HAProxy runs on its checks and the state file; PgBouncer
            // may follow a leader Patroni already reports promoted.
            sh.moved = Some(m.name.clone());
            if is_primary_role(&m.role) {
                sh.confirmed = Some(m.name.clone());
                return;
            }
        }
        if sh.timeline.as_ref().is_none_or(|t| t.new != m.name) || previous.is_none() {
            let old = sh.moved.clone().filter(|o| *o != m.name);
            sh.timeline = Some(Timeline {
                old,
                new: m.name.clone(),
                leader_key_at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default(),
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
        self.start_confirming(m);
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

    fn start_confirming(&mut self, m: &Member) {
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
                }
                Ok(None) => {}
                Err(e) => tracing::info!("{e}"),
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

    fn actuator(&mut self) -> Option<mpsc::UnboundedSender<Job>> {
        if self.routes.is_empty() {
            return None;
        }
        if self.actuator.as_ref().is_none_or(|a| a.is_closed()) {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(actuate(
                rx,
                Arc::clone(&self.routes),
                Arc::clone(&self.shared),
                self.observers.haproxy.clone(),
            ));
            self.actuator = Some(tx);
        }
        self.actuator.clone()
    }

    fn send(&mut self, mv: Move) {
        if let Some(a) = self.actuator() {
            let _ = a.send(Job { mv, switch: false });
        }
    }

    fn fence(&mut self, old: &str, why: &str) {
        let mut sh = self.shared.lock().expect("failover lock");
        let first_fence = sh.fenced.as_deref() != Some(old);
        if first_fence {
            sh.fenced = Some(old.to_owned());
        }
        sh.changing_since.get_or_insert_with(Instant::now);
        drop(sh);
        if first_fence {
            tracing::info!(old = %old, why, "fencing the old primary: no new connection goes to it");
            self.send(Move::Fence {
                old: old.to_owned(),
            });
        }
        for (name, p) in &self.pauses {
            if !p.is_active() {
                tracing::debug!(target = %name, why, "pausing PgBouncer");
            }
            p.begin(why);
        }
    }

    fn resume_all(&self, why: &str) {
        for (_, p) in &self.pauses {
            let p = p.clone();
            let why = why.to_owned();
            tokio::spawn(async move {
                if let Err(e) = p.end(&why).await {
                    tracing::warn!(error = %e, "cannot resume PgBouncer; its pause deadline will");
                }
            });
        }
    }

    /// After a pass that rendered `target` (a PgBouncer) for the confirmed leader and reloaded
    /// it, or found it already pointing there: ends its pause and records the switch.
    pub async fn pgbouncer_settled(&self, target: &str) {
        // A fence still up means the leader change is under way (switchover requested, leader
        // lost): the pause it began holds until a new leader is confirmed.
        if !self.cfg.enabled || self.shared.lock().expect("failover lock").fenced.is_some() {
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
        let mut sh = self.shared.lock().expect("failover lock");
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
        let mut sh = self.shared.lock().expect("failover lock");
        if sh.leader.as_deref() != Some(name) || sh.confirmed.as_deref() == Some(name) {
            return false;
        }
        sh.confirmed = Some(name.to_owned());
        if let Some(t) = sh.timeline.as_mut().filter(|t| t.new == name) {
            t.confirmed_after_ms = t.ms_since_key(at);
            t.confirmed_by = Some(by);
        }
        tracing::info!(leader = %name, by, "the new primary takes writes");
        let unfence = sh.fenced.take();
        sh.changing_since = None;
        let demote: Vec<String> = sh
            .moved
            .iter()
            .chain(unfence.iter())
            .filter(|o| *o != name)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let repeat = sh.moved.as_deref() == Some(name) && unfence.is_none();
        sh.moved = Some(name.to_owned());
        drop(sh);
        if !repeat {
            if let Some(a) = &self.actuator {
                let _ = a.send(Job {
                    mv: Move::Promote {
                        new: name.to_owned(),
                        demote,
                        unfence,
                    },
                    switch: true,
                });
            }
        }
        true
    }
}

/// The one writer to HAProxy's runtime API: applies each move to every HAProxy, in order.
async fn actuate(
    mut rx: mpsc::UnboundedReceiver<Job>,
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    observe: Option<prometheus_client::metrics::histogram::Histogram>,
) {
    while let Some(job) = rx.recv().await {
        let mut ok = true;
        for r in routes.iter() {
            let cfg = match tokio::fs::read_to_string(&r.dest).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(target = %r.target, dest = %r.dest.display(), error = %e, "cannot read the live file; HAProxy's checks will follow the leader");
                    ok = false;
                    continue;
                }
            };
            let cmds = server_state::move_commands(&r.ss, &cfg, &job.mv);
            if cmds.is_empty() {
                continue;
            }
            match server_state::apply_commands(&r.ss.stats_socket, &cmds, Duration::from_secs(2))
                .await
            {
                Ok(answer) if answer.trim().is_empty() => {
                    tracing::info!(target = %r.target, commands = ?cmds, "HAProxy moved through the runtime API")
                }
                Ok(answer) => {
                    tracing::warn!(target = %r.target, commands = ?cmds, answer = %answer.trim(), "HAProxy answered the runtime API; its checks will settle the servers")
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(target = %r.target, socket = %r.ss.stats_socket.display(), error = %e, "cannot reach HAProxy's runtime API; its checks will follow the leader");
                }
            }
        }
        if job.switch && ok {
            let now = Instant::now();
            let mut sh = shared.lock().expect("failover lock");
            if let (Move::Promote { new, .. }, Some(t)) = (&job.mv, sh.timeline.as_mut()) {
                if t.new == *new {
                    t.haproxy_after_ms = t.ms_since_key(now);
                    if let (Some(h), Some(ms)) = (&observe, t.haproxy_after_ms) {
                        h.observe(ms / 1000.0);
                    }
                    tracing::info!(leader = %new, after_ms = ?t.haproxy_after_ms, "HAProxy follows the new primary");
                }
            }
        }
    }
}

/// Compares HAProxy's live primary servers (`show servers state`) with etcd's leader every
/// `drift_interval`; warns, and sets the gauge, when they disagree for longer than
/// `drift_grace`.
async fn drift_loop(
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    cfg: FailoverConfig,
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
) {
    let mut since: Option<Instant> = None;
    let mut warned = false;
    loop {
        tokio::time::sleep(cfg.drift_interval).await;
        let leader = shared.lock().expect("failover lock").leader.clone();
        let Some(leader) = leader else {
            since = None;
            continue;
        };
        let mut disagree = Vec::new();
        for r in routes.iter() {
            let Some(dump) = server_state::dump(&r.ss.stats_socket, Duration::from_secs(2)).await
            else {
                continue;
            };
            let live = server_state::live_primaries(&r.ss, &dump);
            if live != [leader.clone()] {
                disagree.push(if live.is_empty() {
                    format!(
                        "{}: no primary server UP (the leader fails its checks)",
                        r.target
                    )
                } else {
                    format!("{}: {} UP", r.target, live.join(", "))
                });
            }
        }
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
