//! Event hooks: `[[hook]]` entries run an operator's argv (never a shell string) when chosen
//! cluster events happen — a leader change, a completed failover, a switchover request, members
//! added, removed or down, a cluster leaderless for too long, a failed pass. The event reaches the
//! command as one line of JSON on stdin and as `HACONFD_*` environment variables.
//!
//! Hooks never delay routing: the daemon hands the events of a pass over after the pass, and
//! one dispatcher task runs them with a time limit each, at most `hooks.concurrency` at once, from
//! a queue of `hooks.queue` that drops (and counts) the oldest when full. Member events can be
//! debounced: a flapping member fires only if its change still holds after `debounce`.
//!
//! Everything the dispatcher keeps is per cluster and Citus group (`scope`, `group`): a debounced
//! member event, the `leaderless` timer, the latest view. A cluster the pass no longer reports is
//! forgotten here too. New hook settings (SIGHUP) reach the running dispatcher: waiting and
//! debounced runs carry over to the hook of the same name, and a run whose hook is gone or no
//! longer wants the event is dropped with a log line and counted.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::command::{self, CommandError};
use crate::events::ClusterEvent;
use crate::model::Cluster;

/// Every event a hook can ask for.
pub const EVENTS: &[&str] = &[
    "leader_changed",
    "failover_completed",
    "leader_lost",
    "leader_regained",
    "switchover_requested",
    "member_promoted",
    "member_demoted",
    "member_added",
    "member_removed",
    "member_down",
    "leaderless",
    "pass_failed",
    "primary_down_detected",
    "hold_released",
];

/// `[hooks]`: how hooks run, for all of them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// How many hook commands may run at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How many runs may wait; when full, the oldest waiting run is dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// A cluster without a leader for this long fires `leaderless` (once per spell).
    #[serde(default = "default_leaderless_after", with = "humantime_serde")]
    pub leaderless_after: Duration,
    /// Log each run (argv, environment, stdin) instead of running it (`run --dry-run-hooks`).
    #[serde(default)]
    pub dry_run: bool,
}

impl HooksConfig {
    /// Refuses settings that would never run anything, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("hooks.concurrency must be at least 1".into());
        }
        if self.queue == 0 {
            return Err("hooks.queue must be at least 1".into());
        }
        if self.leaderless_after.is_zero() {
            return Err("hooks.leaderless_after must be longer than 0s".into());
        }
        Ok(())
    }
}

fn default_concurrency() -> usize {
    2
}
fn default_queue() -> usize {
    100
}
fn default_leaderless_after() -> Duration {
    Duration::from_secs(30)
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            queue: default_queue(),
            leaderless_after: default_leaderless_after(),
            dry_run: false,
        }
    }
}

/// One `[[hook]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Name in logs and metrics; default `hook-N` (N from 1, in config order).
    pub name: Option<String>,
    /// The argv to run.
    pub command: Vec<String>,
    /// The events that run it (see [`EVENTS`]); empty: every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// The clusters (scopes) whose events run it; empty: every cluster.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// The command is killed after this.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Member events (`member_*`) fire only if they still hold this long after; `0s`: at once.
    #[serde(default, with = "humantime_serde")]
    pub debounce: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// A resolved hook.
#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    /// Its name.
    pub name: String,
    /// The argv.
    pub command: Vec<String>,
    /// Events that run it; empty: all.
    pub events: Vec<String>,
    /// Clusters whose events run it; empty: all.
    pub clusters: Vec<String>,
    /// Time limit.
    pub timeout: Duration,
    /// Debounce of member events.
    pub debounce: Duration,
}

impl Hook {
    /// Validates `c` (the `index`th `[[hook]]`, from 0); messages name the hook and the key.
    pub fn resolve(c: HookConfig, index: usize) -> Result<Hook, String> {
        let name = c.name.unwrap_or_else(|| format!("hook-{}", index + 1));
        let ctx = |m: String| format!("hook {name:?}: {m}");
        match c.command.first() {
            None => return Err(ctx("command is empty".into())),
            Some(first) if first.contains(char::is_whitespace) => {
                return Err(ctx(format!(
                    "command is an argv, not a shell string: split {first:?} into separate items"
                )))
            }
            Some(_) => {}
        }
        if let Some(bad) = c.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
            return Err(ctx(format!(
                "events: unknown event {bad:?}; known: {}",
                EVENTS.join(", ")
            )));
        }
        if c.timeout.is_zero() {
            return Err(ctx("timeout must be longer than 0s".into()));
        }
        Ok(Hook {
            name,
            command: c.command,
            events: c.events,
            clusters: c.clusters,
            timeout: c.timeout,
            debounce: c.debounce,
        })
    }

    /// Whether `e` runs this hook.
    fn wants(&self, e: &HookEvent) -> bool {
        (self.events.is_empty() || self.events.iter().any(|x| x == e.event))
            && (self.clusters.is_empty() || self.clusters.contains(&e.scope))
    }

    /// For `check`: the command's program must be runnable (an executable path, or found in
    /// `PATH`).
    pub fn check_runnable(&self) -> Result<(), String> {
        let prog = &self.command[0];
        let runnable = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        let found = if prog.contains('/') {
            runnable(Path::new(prog))
        } else {
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).any(|d| runnable(&d.join(prog))))
                .unwrap_or(false)
        };
        if found {
            Ok(())
        } else {
            Err(format!(
                "hook {:?}: command {:?} is not an executable file{}",
                self.name,
                prog,
                if prog.contains('/') { "" } else { " in PATH" }
            ))
        }
    }
}

/// One event as a hook sees it: the JSON on its stdin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookEvent {
    /// The event's name (see [`EVENTS`]).
    pub event: &'static str,
    /// Patroni's namespace.
    pub namespace: String,
    /// The cluster.
    pub scope: String,
    /// The Citus group, for an event of a Citus cluster's group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// When haconfd saw it (Unix seconds).
    pub at: f64,
    /// The leader before (leader events, switchover requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_leader: Option<String>,
    /// The leader after (leader events) or the requested candidate (switchover requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_leader: Option<String>,
    /// The member (member events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The member's new role or state (member events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When a switchover is scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
    /// Why a pass failed (`pass_failed`), or how long the cluster has had no leader
    /// (`leaderless`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl HookEvent {
    fn new(event: &'static str, cluster: &Cluster) -> HookEvent {
        HookEvent {
            event,
            namespace: cluster.namespace.clone(),
            scope: cluster.scope.clone(),
            group: cluster.group,
            at: now_unix(),
            old_leader: None,
            new_leader: None,
            member: None,
            detail: None,
            scheduled_at: None,
            reason: None,
        }
    }

    /// The hook events of one cluster event (a leader change that follows another leader is
    /// also a completed failover).
    pub fn from_cluster_event(e: &ClusterEvent, cluster: &Cluster) -> Vec<HookEvent> {
        let ev = |name| HookEvent::new(name, cluster);
        match e {
            ClusterEvent::LeaderLost { old } => vec![HookEvent {
                old_leader: Some(old.clone()),
                ..ev("leader_lost")
            }],
            ClusterEvent::LeaderChanged { old, new } => {
                let changed = HookEvent {
                    old_leader: old.clone(),
                    new_leader: Some(new.clone()),
                    ..ev("leader_changed")
                };
                let mut out = vec![changed.clone()];
                if old.is_some() {
                    out.push(HookEvent {
                        event: "failover_completed",
                        ..changed
                    });
                }
                out
            }
            ClusterEvent::LeaderRegained { leader } => vec![HookEvent {
                old_leader: Some(leader.clone()),
                new_leader: Some(leader.clone()),
                ..ev("leader_regained")
            }],
            ClusterEvent::SwitchoverRequested {
                leader,
                candidate,
                scheduled_at,
            } => vec![HookEvent {
                old_leader: leader.clone(),
                new_leader: candidate.clone(),
                scheduled_at: scheduled_at.clone(),
                ..ev("switchover_requested")
            }],
            ClusterEvent::MemberPromoted { member, role } => vec![HookEvent {
                member: Some(member.clone()),
                detail: Some(role.clone()),
                ..ev("member_promoted")
            }],
            ClusterEvent::MemberDemoted { member, role } => vec![HookEvent {
                member: Some(member.clone()),
                detail: Some(role.clone()),
                ..ev("member_demoted")
            }],
            ClusterEvent::MemberAdded { member } => vec![HookEvent {
                member: Some(member.clone()),
                ..ev("member_added")
            }],
            ClusterEvent::MemberRemoved { member } => vec![HookEvent {
                member: Some(member.clone()),
                ..ev("member_removed")
            }],
            ClusterEvent::MemberDown { member, state } => vec![HookEvent {
                member: Some(member.clone()),
                detail: Some(state.clone()),
                ..ev("member_down")
            }],
        }
    }

    /// A failed pass of `cluster`, with its reason label and message.
    pub fn pass_failed(cluster: &Cluster, reason: &str, message: &str) -> HookEvent {
        HookEvent {
            reason: Some(format!("{reason}: {message}")),
            ..HookEvent::new("pass_failed", cluster)
        }
    }

    /// The environment the command gets.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("HACONFD_EVENT".to_owned(), self.event.to_owned()),
            ("HACONFD_SCOPE".to_owned(), self.scope.clone()),
            ("HACONFD_NAMESPACE".to_owned(), self.namespace.clone()),
        ];
        if let Some(g) = self.group {
            env.push(("HACONFD_GROUP".to_owned(), g.to_string()));
        }
        for (k, v) in [
            ("HACONFD_OLD_LEADER", &self.old_leader),
            ("HACONFD_NEW_LEADER", &self.new_leader),
            ("HACONFD_MEMBER", &self.member),
        ] {
            if let Some(v) = v {
                env.push((k.to_owned(), v.clone()));
            }
        }
        env
    }

    /// Whether a member event still holds in `cluster` (for the debounce).
    fn still_holds(&self, cluster: &Cluster) -> bool {
        let Some(name) = &self.member else {
            return true;
        };
        let m = cluster.members.iter().find(|m| m.name == *name);
        match self.event {
            "member_added" => m.is_some(),
            "member_removed" => m.is_none(),
            "member_down" => {
                m.is_some_and(|m| !matches!(m.state.as_str(), "running" | "streaming"))
            }
            "member_promoted" => m.is_some_and(|m| matches!(m.role.as_str(), "master" | "primary")),
            "member_demoted" => m.is_some_and(|m| !matches!(m.role.as_str(), "master" | "primary")),
            _ => true,
        }
    }
}

/// Counters shared with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HookMetrics {
    /// Runs by hook and result (`ok`, `failed`, `timeout`).
    pub runs: Family<Vec<(String, String)>, Counter>,
    /// Runs dropped from a full queue, by hook.
    pub dropped: Family<Vec<(String, String)>, Counter>,
}

enum Msg {
    Event(Box<HookEvent>),
    /// Every cluster one pass saw: the latest views, and which clusters still exist.
    Clusters(Vec<Arc<Cluster>>),
    /// New settings (SIGHUP).
    Settings(HooksConfig, Vec<Hook>),
}

/// Which cluster an event or a timer belongs to: scope and Citus group.
type ClusterKey = (String, Option<u64>);

fn key_of(c: &Cluster) -> ClusterKey {
    (c.scope.clone(), c.group)
}

/// The running hooks: hand events over with [`Hooks::pass`] after each pass.
pub struct Hooks {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    metrics: HookMetrics,
}

impl Hooks {
    /// Starts the dispatcher (no task until there is a hook). With `hooks.dry_run`, each run
    /// is logged with its argv, environment and stdin instead of run.
    pub fn start(cfg: HooksConfig, hooks: Vec<Hook>, metrics: HookMetrics) -> Hooks {
        if hooks.is_empty() {
            return Hooks { tx: None, metrics };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(rx, Dispatcher::new(cfg, hooks, metrics.clone())));
        Hooks {
            tx: Some(tx),
            metrics,
        }
    }

    /// New hook settings: the running dispatcher takes them over with its waiting and debounced
    /// runs (see the module docs); with no dispatcher yet, one starts.
    pub fn replace(&mut self, cfg: HooksConfig, hooks: Vec<Hook>) {
        match &self.tx {
            Some(tx) if tx.send(Msg::Settings(cfg.clone(), hooks.clone())).is_ok() => {}
            _ => *self = Hooks::start(cfg, hooks, self.metrics.clone()),
        }
    }

    /// Hands over one pass: every cluster it saw, each with its events. Returns at once.
    pub fn pass<'a>(
        &self,
        clusters: impl IntoIterator<Item = (&'a Arc<Cluster>, &'a [ClusterEvent])> + Clone,
    ) {
        let Some(tx) = &self.tx else { return };
        let all = clusters.clone().into_iter().map(|(c, _)| Arc::clone(c));
        let _ = tx.send(Msg::Clusters(all.collect()));
        for (cluster, events) in clusters {
            for e in events {
                for h in HookEvent::from_cluster_event(e, cluster) {
                    let _ = tx.send(Msg::Event(Box::new(h)));
                }
            }
        }
    }

    /// Hands over one event made outside the cluster diff (`pass_failed`).
    pub fn event(&self, e: HookEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Event(Box::new(e)));
        }
    }
}

/// A run waiting in the queue.
struct Job {
    hook: usize,
    event: HookEvent,
}

/// A debounced member event's key: the hook (its index), the cluster and group, the member.
type PendingKey = (usize, ClusterKey, String);

struct Dispatcher {
    cfg: HooksConfig,
    hooks: Vec<Hook>,
    metrics: HookMetrics,
    queue: VecDeque<Job>,
    running: JoinSet<()>,
    /// Debounced member events: when they fire, and the latest one.
    pending: BTreeMap<PendingKey, (Instant, HookEvent)>,
    /// The latest view of each cluster and group.
    clusters: BTreeMap<ClusterKey, Arc<Cluster>>,
    /// Since when each cluster or group has had no leader, and whether `leaderless` fired.
    leaderless: BTreeMap<ClusterKey, (Instant, bool)>,
}

async fn dispatch(mut rx: mpsc::UnboundedReceiver<Msg>, mut d: Dispatcher) {
    let mut open = true;
    loop {
        d.start_runs();
        if !open && d.queue.is_empty() && d.running.is_empty() {
            break;
        }
        let next = d.next_deadline();
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(Msg::Event(e)) => d.accept(*e),
                Some(Msg::Clusters(c)) => d.observe(c),
                Some(Msg::Settings(cfg, hooks)) => d.reconfigure(cfg, hooks),
                None => {
                    open = false;
                    d.pending.clear();
                }
            },
            Some(_) = d.running.join_next(), if !d.running.is_empty() => {}
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => d.fire_due(),
        }
    }
}

impl Dispatcher {
    fn new(cfg: HooksConfig, hooks: Vec<Hook>, metrics: HookMetrics) -> Dispatcher {
        Dispatcher {
            cfg,
            hooks,
            metrics,
            queue: VecDeque::new(),
            running: JoinSet::new(),
            pending: BTreeMap::new(),
            clusters: BTreeMap::new(),
            leaderless: BTreeMap::new(),
        }
    }

    fn accept(&mut self, e: HookEvent) {
        for i in 0..self.hooks.len() {
            let h = &self.hooks[i];
            if !h.wants(&e) {
                continue;
            }
            match (&e.member, h.debounce.is_zero()) {
                (Some(member), false) => {
                    let due = Instant::now() + h.debounce;
                    // A later event of the same member (of the same cluster and group)
                    // replaces the waiting one.
                    let key = (i, (e.scope.clone(), e.group), member.clone());
                    self.pending.insert(key, (due, e.clone()));
                }
                _ => self.enqueue(i, e.clone()),
            }
        }
    }

    /// One pass's clusters: each one's latest view and leaderless timer; a cluster or group
    /// the pass no longer saw is forgotten (its timer too).
    fn observe(&mut self, all: Vec<Arc<Cluster>>) {
        let now = Instant::now();
        let mut clusters = BTreeMap::new();
        for c in all {
            let key = key_of(&c);
            if c.leader_name.is_some() {
                self.leaderless.remove(&key);
            } else {
                self.leaderless.entry(key.clone()).or_insert((now, false));
            }
            clusters.insert(key, c);
        }
        self.leaderless.retain(|k, _| clusters.contains_key(k));
        self.clusters = clusters;
    }

    /// New settings: waiting and debounced runs go to the hook of the same name if it still
    /// wants the event; the others are dropped, logged and counted.
    fn reconfigure(&mut self, cfg: HooksConfig, hooks: Vec<Hook>) {
        let old = std::mem::replace(&mut self.hooks, hooks);
        self.cfg = cfg;
        let now = Instant::now();
        let mut pending = BTreeMap::new();
        for ((i, cluster, member), (due, e)) in std::mem::take(&mut self.pending) {
            if let Some(n) = self.carried(&old[i].name, &e) {
                // A shorter debounce now shortens the wait; a longer one does not lengthen it.
                let due = due.min(now + self.hooks[n].debounce);
                pending.insert((n, cluster, member), (due, e));
            }
        }
        self.pending = pending;
        let queue = std::mem::take(&mut self.queue);
        for job in queue {
            if let Some(n) = self.carried(&old[job.hook].name, &job.event) {
                self.queue.push_back(Job {
                    hook: n,
                    event: job.event,
                });
            }
        }
    }

    /// The index, in the new settings, of hook `name` if it still wants `e`; else the run is
    /// dropped, logged and counted.
    fn carried(&self, name: &str, e: &HookEvent) -> Option<usize> {
        let found = self.hooks.iter().position(|h| h.name == name);
        let n = found.filter(|&n| self.hooks[n].wants(e));
        if n.is_none() {
            let why = match found {
                None => "the hook is no longer configured",
                Some(_) => "the hook no longer takes this event or cluster",
            };
            self.metrics
                .dropped
                .get_or_create(&vec![("hook".to_owned(), name.to_owned())])
                .inc();
            tracing::warn!(hook = %name, event = e.event, scope = %e.scope, group = ?e.group, member = ?e.member, "new hook settings: a waiting run is dropped ({why})");
        }
        n
    }

    fn next_deadline(&self) -> Option<Instant> {
        let debounce = self.pending.values().map(|(t, _)| *t).min();
        let leaderless = self
            .leaderless
            .values()
            .filter(|(_, fired)| !fired)
            .map(|(since, _)| *since + self.cfg.leaderless_after)
            .min();
        debounce.into_iter().chain(leaderless).min()
    }

    fn fire_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PendingKey> = self
            .pending
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let Some((_, e)) = self.pending.remove(&k) else {
                continue;
            };
            let holds = self.clusters.get(&k.1).is_none_or(|c| e.still_holds(c));
            if holds {
                self.enqueue(k.0, e);
            } else {
                tracing::info!(hook = %self.hooks[k.0].name, event = e.event, member = ?e.member, "debounced: the member's change did not hold");
            }
        }
        let limit = self.cfg.leaderless_after;
        let mut fire = Vec::new();
        for (key, (since, fired)) in &mut self.leaderless {
            if !*fired && now >= *since + limit {
                *fired = true;
                fire.push(key.clone());
            }
        }
        for key in fire {
            let Some(c) = self.clusters.get(&key).cloned() else {
                continue;
            };
            let e = HookEvent {
                reason: Some(format!("no leader for {}s", limit.as_secs_f64())),
                ..HookEvent::new("leaderless", &c)
            };
            self.accept(e);
        }
    }

    fn enqueue(&mut self, hook: usize, event: HookEvent) {
        if self.queue.len() >= self.cfg.queue {
            if let Some(old) = self.queue.pop_front() {
                let name = &self.hooks[old.hook].name;
                self.metrics
                    .dropped
                    .get_or_create(&vec![("hook".to_owned(), name.clone())])
                    .inc();
                tracing::warn!(hook = %name, event = old.event.event, scope = %old.event.scope, queue = self.cfg.queue, "hook queue full: dropped the oldest waiting run");
            }
        }
        self.queue.push_back(Job { hook, event });
    }

    fn start_runs(&mut self) {
        while self.running.len() < self.cfg.concurrency.max(1) {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let hook = self.hooks[job.hook].clone();
            let dry_run = self.cfg.dry_run;
            let runs = self.metrics.runs.clone();
            self.running.spawn(run(hook, job.event, dry_run, runs));
        }
    }
}

async fn run(
    hook: Hook,
    e: HookEvent,
    dry_run: bool,
    runs: Family<Vec<(String, String)>, Counter>,
) {
    let json = serde_json::to_string(&e).unwrap_or_default();
    let env = e.env();
    if dry_run {
        tracing::info!(hook = %hook.name, event = e.event, scope = %e.scope, command = %command::display_argv(&hook.command), env = ?env, stdin = %json, "dry run: would run hook");
        return;
    }
    // One line: a command that appends its input to a log keeps one event per line.
    let json = json + "\n";
    let started = std::time::Instant::now();
    let result = command::run_with(&hook.command, hook.timeout, Some(json.as_bytes()), &env).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(CommandError::Timeout { .. }) => "timeout",
        Err(_) => "failed",
    };
    runs.get_or_create(&vec![
        ("hook".to_owned(), hook.name.clone()),
        ("result".to_owned(), label.to_owned()),
    ])
    .inc();
    match result {
        Ok(output) => {
            tracing::info!(hook = %hook.name, event = e.event, scope = %e.scope, took = ?started.elapsed(), "hook ran");
            if !output.trim().is_empty() {
                tracing::debug!(hook = %hook.name, output = %output.trim(), "hook output");
            }
        }
        Err(err) => {
            tracing::warn!(hook = %hook.name, event = e.event, scope = %e.scope, "hook failed: {err}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    fn cluster(leader: Option<&str>, members: &[(&str, &str)]) -> Arc<Cluster> {
        cluster_at("demo", None, leader, members)
    }

    /// Cluster `scope` (or its Citus group `group`) with `members` (name, state) and `leader`.
    fn cluster_at(
        scope: &str,
        group: Option<u64>,
        leader: Option<&str>,
        members: &[(&str, &str)],
    ) -> Arc<Cluster> {
        let id = crate::model::ClusterId {
            scope: scope.to_owned(),
            group,
        };
        let at = match group {
            Some(g) => format!("/service/{scope}/{g}"),
            None => format!("/service/{scope}"),
        };
        let mut s = Snapshot::new();
        if let Some(l) = leader {
            s.put(format!("{at}/leader"), l.as_bytes().to_vec());
        }
        for (i, (n, state)) in members.iter().enumerate() {
            s.put(format!("{at}/members/{n}"), format!(r#"{{"conn_url":"postgres://127.0.0.1:{}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"{state}","role":"replica"}}"#, 5432 + i, 8008 + i).into_bytes());
        }
        let mut cache = crate::model::MemberCache::default();
        Arc::new(Cluster::build_with(&s, "/service", &id, &mut cache).cluster)
    }

    fn down(member: &str) -> ClusterEvent {
        ClusterEvent::MemberDown {
            member: member.into(),
            state: "stopped".into(),
        }
    }

    fn hook(events: &[&str], debounce_ms: u64, file: &Path) -> Hook {
        Hook::resolve(
            HookConfig {
                name: Some("h".into()),
                command: vec!["tee".into(), "-a".into(), file.display().to_string()],
                events: events.iter().map(|s| s.to_string()).collect(),
                clusters: vec![],
                timeout: Duration::from_secs(5),
                debounce: Duration::from_millis(debounce_ms),
            },
            0,
        )
        .unwrap()
    }

    fn lines(file: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn settle(file: &Path, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let l = lines(file);
            if l.len() >= n {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lines(file)
    }

    #[test]
    fn unknown_events_and_shell_strings_are_refused_naming_the_hook() {
        let c = |command: &[&str], events: &[&str]| HookConfig {
            name: Some("page".into()),
            command: command.iter().map(|s| s.to_string()).collect(),
            events: events.iter().map(|s| s.to_string()).collect(),
            clusters: vec![],
            timeout: Duration::from_secs(1),
            debounce: Duration::ZERO,
        };
        let e = Hook::resolve(c(&["curl -X POST x"], &[]), 0).unwrap_err();
        assert!(e.contains("hook \"page\"") && e.contains("argv"), "{e}");
        let e = Hook::resolve(c(&["true"], &["leader_change"]), 0).unwrap_err();
        assert!(e.contains("unknown event \"leader_change\""), "{e}");
        let e = Hook::resolve(c(&[], &[]), 0).unwrap_err();
        assert!(e.contains("command is empty"), "{e}");
        let h = Hook::resolve(c(&["/nonexistent/notify"], &[]), 0).unwrap();
        assert!(h
            .check_runnable()
            .unwrap_err()
            .contains("/nonexistent/notify"));
        assert!(Hook::resolve(c(&["true"], &[]), 0)
            .unwrap()
            .check_runnable()
            .is_ok());
    }

    #[test]
    fn a_failover_is_a_leader_change_and_a_completed_failover_with_both_leaders() {
        let c = cluster(Some("pg2"), &[("pg1", "running"), ("pg2", "running")]);
        let out = HookEvent::from_cluster_event(
            &ClusterEvent::LeaderChanged {
                old: Some("pg1".into()),
                new: "pg2".into(),
            },
            &c,
        );
        let names: Vec<_> = out.iter().map(|e| e.event).collect();
        assert_eq!(names, ["leader_changed", "failover_completed"]);
        assert_eq!(out[1].old_leader.as_deref(), Some("pg1"));
        assert_eq!(out[1].new_leader.as_deref(), Some("pg2"));
        let env = out[1].env();
        assert!(env.contains(&("HACONFD_OLD_LEADER".into(), "pg1".into())));
        assert!(env.contains(&("HACONFD_SCOPE".into(), "demo".into())));
    }

    #[tokio::test]
    async fn a_flapping_member_fires_only_if_its_change_holds_after_the_debounce() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        let hooks = Hooks::start(
            HooksConfig::default(),
            vec![hook(&["member_down"], 150, &file)],
            HookMetrics::default(),
        );
        // pg2 goes down and comes back within the debounce: nothing runs.
        let down = cluster(Some("pg1"), &[("pg1", "running"), ("pg2", "stopped")]);
        let up = cluster(Some("pg1"), &[("pg1", "running"), ("pg2", "running")]);
        let ev = ClusterEvent::MemberDown {
            member: "pg2".into(),
            state: "stopped".into(),
        };
        hooks.pass([(&down, std::slice::from_ref(&ev))]);
        hooks.pass([(&up, &[][..])]);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(lines(&file).is_empty(), "{:?}", lines(&file));
        // It goes down and stays down: one run, after the debounce.
        hooks.pass([(&down, std::slice::from_ref(&ev))]);
        let out = settle(&file, 1).await;
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["event"], "member_down");
        assert_eq!(out[0]["member"], "pg2");
        assert_eq!(out[0]["detail"], "stopped");
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_run_and_counts_it() {
        let metrics = HookMetrics::default();
        let slow = Hook::resolve(
            HookConfig {
                name: Some("slow".into()),
                command: vec!["sleep".into(), "0.3".into()],
                events: vec![],
                clusters: vec![],
                timeout: Duration::from_secs(5),
                debounce: Duration::ZERO,
            },
            0,
        )
        .unwrap();
        let hooks = Hooks::start(
            HooksConfig {
                concurrency: 1,
                queue: 2,
                ..Default::default()
            },
            vec![slow],
            metrics.clone(),
        );
        let c = cluster(Some("pg1"), &[("pg1", "running")]);
        let evs: Vec<ClusterEvent> = (0..5)
            .map(|i| ClusterEvent::MemberAdded {
                member: format!("m{i}"),
            })
            .collect();
        hooks.pass([(&c, &evs[..])]);
        // One runs, two wait, two were dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let dropped = metrics
            .dropped
            .get_or_create(&vec![("hook".to_owned(), "slow".to_owned())])
            .get();
        assert_eq!(dropped, 2);
        drop(hooks);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let ok = metrics
            .runs
            .get_or_create(&vec![
                ("hook".to_owned(), "slow".to_owned()),
                ("result".to_owned(), "ok".to_owned()),
            ])
            .get();
        assert_eq!(
            ok, 3,
            "the runs queued before the hooks were dropped still run"
        );
    }

    /// A hook on `leaderless` after 100 ms, writing to `out` in the returned dir.
    fn leaderless_hook() -> (tempfile::TempDir, Hooks) {
        let dir = tempfile::tempdir().unwrap();
        let hooks = Hooks::start(
            HooksConfig {
                leaderless_after: Duration::from_millis(100),
                ..Default::default()
            },
            vec![hook(&["leaderless"], 0, &dir.path().join("out"))],
            HookMetrics::default(),
        );
        (dir, hooks)
    }

    #[tokio::test]
    async fn a_cluster_without_a_leader_for_long_fires_leaderless_once() {
        let (dir, hooks) = leaderless_hook();
        let file = dir.path().join("out");
        let none = cluster(None, &[("pg1", "running")]);
        for _ in 0..5 {
            hooks.pass([(&none, &[][..])]);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let out = settle(&file, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(lines(&file).len(), 1, "{out:?}");
        assert_eq!(out[0]["event"], "leaderless");
        assert_eq!(out[0]["scope"], "demo");
    }

    #[tokio::test]
    async fn debounced_events_of_one_member_name_in_two_clusters_both_fire() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        let hooks = Hooks::start(
            HooksConfig::default(),
            vec![hook(&["member_down"], 100, &file)],
            HookMetrics::default(),
        );
        let sick = [("pg1", "running"), ("pg2", "stopped")];
        let a = cluster_at("a", None, Some("pg1"), &sick);
        let b = cluster_at("b", None, Some("pg1"), &sick);
        let (g1, g2) = (
            cluster_at("cit", Some(1), Some("pg1"), &sick),
            cluster_at("cit", Some(2), Some("pg1"), &sick),
        );
        let ev = [down("pg2")];
        hooks.pass([(&a, &ev[..]), (&b, &ev[..]), (&g1, &ev[..]), (&g2, &ev[..])]);
        let out = settle(&file, 4).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut seen: Vec<(String, Option<u64>)> = lines(&file)
            .iter()
            .map(|e| (e["scope"].as_str().unwrap().to_owned(), e["group"].as_u64()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("a".to_owned(), None),
                ("b".to_owned(), None),
                ("cit".to_owned(), Some(1)),
                ("cit".to_owned(), Some(2))
            ],
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn new_hook_settings_keep_a_debounced_event_and_drop_a_removed_hooks_runs_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (file, other) = (dir.path().join("out"), dir.path().join("other"));
        let metrics = HookMetrics::default();
        let mut second = hook(&["member_down"], 300, &other);
        second.name = "second".into();
        let mut hooks = Hooks::start(
            HooksConfig::default(),
            vec![hook(&["member_down"], 300, &file), second],
            metrics.clone(),
        );
        let c = cluster(Some("pg1"), &[("pg1", "running"), ("pg2", "stopped")]);
        hooks.pass([(&c, &[down("pg2")][..])]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A SIGHUP that changes `h`'s timeout and removes `second`.
        let mut changed = hook(&["member_down"], 300, &file);
        changed.timeout = Duration::from_secs(9);
        hooks.replace(
            HooksConfig {
                concurrency: 3,
                ..Default::default()
            },
            vec![changed],
        );
        let out = settle(&file, 1).await;
        assert_eq!(out.len(), 1, "the debounced event was lost");
        assert_eq!(out[0]["member"], "pg2");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(lines(&other).is_empty(), "the removed hook ran");
        let dropped = metrics
            .dropped
            .get_or_create(&vec![("hook".to_owned(), "second".to_owned())])
            .get();
        assert_eq!(dropped, 1, "the removed hook's waiting run is counted");
    }

    #[tokio::test]
    async fn a_citus_worker_group_without_a_leader_fires_leaderless_with_its_group() {
        let (dir, hooks) = leaderless_hook();
        let file = dir.path().join("out");
        let up = [("w1", "running")];
        let coordinator = cluster_at("cit", Some(0), Some("w1"), &up);
        let worker = cluster_at("cit", Some(1), None, &up);
        // Passes keep coming (the coordinator's heartbeats): the worker group's timer runs on.
        for _ in 0..10 {
            hooks.pass([(&coordinator, &[][..]), (&worker, &[][..])]);
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let out = lines(&file);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0]["scope"], "cit");
        assert_eq!(out[0]["group"], 1);
        // A group the passes no longer report is forgotten: it never fires.
        let gone = cluster_at("cit", Some(2), None, &up);
        hooks.pass([(&coordinator, &[][..]), (&gone, &[][..])]);
        tokio::time::sleep(Duration::from_millis(30)).await;
        hooks.pass([(&coordinator, &[][..])]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(lines(&file).len(), 1, "{:?}", lines(&file));
    }

    #[test]
    fn a_citus_events_json_and_environment_name_its_group() {
        let c = cluster_at("cit", Some(2), Some("pg1"), &[("pg1", "running")]);
        let out = HookEvent::from_cluster_event(&down("pg1"), &c);
        let json: serde_json::Value = serde_json::to_value(&out[0]).unwrap();
        assert_eq!(json["group"], 2, "{json}");
        assert!(out[0].env().contains(&("HACONFD_GROUP".into(), "2".into())));
        let plain = cluster(Some("pg1"), &[("pg1", "running")]);
        let out = HookEvent::from_cluster_event(&down("pg1"), &plain);
        let json = serde_json::to_value(&out[0]).unwrap();
        assert!(json.get("group").is_none(), "{json}");
    }
}
