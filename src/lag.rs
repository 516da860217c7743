//! Lag-aware reads: a replica whose replay lag stays over `lag.max_bytes` for longer than
//! `lag.delay` is drained in HAProxy's replica backends through the runtime API (its open read
//! sessions go on; it takes no new one), and comes back once it stays under the lower
//! `lag.readmit_bytes` for `lag.readmit_delay`. Lag never renders or reloads anything.
//!
//! Where the figure comes from: every `lag.interval` (1 s), haconfd asks the leader's and each
//! replica's Patroni REST API (`GET /patroni`, at once) for the leader's WAL write location
//! (`xlog.location`) and the replica's replay location (`xlog.replayed_location`). The lag is
//! their difference, in bytes, at most `lag.interval` plus one probe old. Patroni's member keys
//! carry a figure too, but only every `loop_wait` (10 s), and Patroni's own `/replica?lag=`
//! compares the replica's replay location with the leader's location as etcd last holds it
//! (the `status` key's `optime`, also written every `loop_wait`): it sees a lag up to
//! `loop_wait` late, and under-reports it by whatever the leader wrote since.
//!
//! Ownership: the drains are haconfd's. Each HAProxy's drained servers of a cluster are written
//! to `<server_state.file>.lag-<scope>` as they change; a run killed while a replica is drained
//! finds them there at its next start and takes them over (lifted once the replica is back
//! under the re-admit level); a graceful stop lifts them all (with no one watching the lag,
//! the health checks decide again), and so does a start with `lag.max_bytes` unset. A server in
//! maintenance is never touched, and a drain haconfd did not make is never lifted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use crate::consumers::haproxy::runtime;
use crate::model::{Cluster, Member};
use crate::target::Target;

/// `[lag]`, and `lag = { ... }` in `[clusters.<scope>]` over it: lag-aware replicas.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LagConfig {
    /// Replay lag, in bytes (`"64MB"`, `"1GB"` or a number), above which a replica leaves the
    /// replica backends once `delay` has passed. Unset: lag is not watched.
    #[serde(
        default,
        deserialize_with = "de_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_bytes: Option<u64>,
    /// The lag under which a drained replica comes back. Unset: half of `max_bytes`.
    #[serde(
        default,
        deserialize_with = "de_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub readmit_bytes: Option<u64>,
    /// How long a replica stays over `max_bytes` before it is drained: shorter surges move
    /// nothing.
    #[serde(default = "default_delay", with = "humantime_serde")]
    pub delay: Duration,
    /// How long a drained replica stays under `readmit_bytes` before it comes back. Unset: `delay`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub readmit_delay: Option<Duration>,
    /// How often the lag is measured.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_delay() -> Duration {
    Duration::from_secs(10)
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for LagConfig {
    fn default() -> Self {
        LagConfig {
            max_bytes: None,
            readmit_bytes: None,
            delay: default_delay(),
            readmit_delay: None,
            interval: default_interval(),
        }
    }
}

/// A byte count: an integer, or a string with PostgreSQL's units (`B`, `kB`, `MB`, `GB`, `TB`,
/// 1024 apart), as Patroni's `/replica?lag=` takes it.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = (&t[..at], t[at..].trim());
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count (a number, or with kB, MB, GB, TB)"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (B, kB, MB, GB or TB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(Some(n)),
        Raw::Text(t) => parse_bytes(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

impl LagConfig {
    /// Refuses settings that make no sense, naming the key under `at` (`lag`, or
    /// `clusters.<scope>.lag`).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.interval.is_zero() {
            return Err(format!("{at}.interval must be longer than 0s"));
        }
        match (self.max_bytes, self.readmit_bytes) {
            (Some(0), _) => Err(format!("{at}.max_bytes must be more than 0")),
            (Some(max), Some(re)) if re > max => Err(format!(
                "{at}.readmit_bytes ({re}) must not be above {at}.max_bytes ({max})"
            )),
            (None, Some(_)) => Err(format!(
                "{at}.readmit_bytes is set but {at}.max_bytes is not: set the limit too"
            )),
            _ => Ok(()),
        }
    }

    /// These settings with a cluster's `lag` table over them (the keys it sets win).
    pub fn with(&self, over: &toml::Table, at: &str) -> Result<LagConfig, String> {
        let mut table = toml::Table::try_from(self).map_err(|e| format!("{at}: {e}"))?;
        for (k, v) in over {
            table.insert(k.clone(), v.clone());
        }
        let out: LagConfig = table.try_into().map_err(|e| format!("{at}: {e}"))?;
        out.validate(at)?;
        Ok(out)
    }

    fn limits(&self) -> Option<Limits> {
        let max = self.max_bytes?;
        Some(Limits {
            max,
            readmit: self.readmit_bytes.unwrap_or(max / 2),
            delay: self.delay,
            readmit_delay: self.readmit_delay.unwrap_or(self.delay),
        })
    }
}

/// The limits a [`Tracker`] decides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Over this (bytes), for `delay`: drained.
    pub max: u64,
    /// Under or at this, for `readmit_delay`: back.
    pub readmit: u64,
    /// See [`LagConfig::delay`].
    pub delay: Duration,
    /// See [`LagConfig::readmit_delay`].
    pub readmit_delay: Duration,
}

/// What the tracker decided for one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Over the limit for longer than the delay: no new read goes to it.
    Drain(String),
    /// Back under the re-admit level for long enough, no longer a replica, or lag no longer
    /// watched: its drain is lifted.
    Readmit(String),
}

#[derive(Debug, Clone, Default)]
struct Replica {
    lag: Option<u64>,
    over_since: Option<Instant>,
    under_since: Option<Instant>,
    drained_since: Option<Instant>,
}

/// The lag state machine of one cluster's replicas, with its hysteresis: pure, so that the
/// rules are tested without a cluster.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    replicas: BTreeMap<String, Replica>,
}

impl Tracker {
    /// Takes over drains an earlier run made (read from the ownership file).
    pub fn adopt<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, now: Instant) {
        for n in names {
            self.replicas.entry(n.to_owned()).or_default().drained_since = Some(now);
        }
    }

    /// One measurement: `lags` has every current replica, with its lag when it could be read
    /// (a replica whose figure is missing keeps its state, and its timers start again).
    /// `limits` None: lag is not watched, and every drain is lifted.
    pub fn step(
        &mut self,
        limits: Option<Limits>,
        now: Instant,
        lags: &BTreeMap<String, Option<u64>>,
    ) -> Vec<Step> {
        let mut out = Vec::new();
        let Some(l) = limits else {
            for (name, r) in std::mem::take(&mut self.replicas) {
                if r.drained_since.is_some() {
                    out.push(Step::Readmit(name));
                }
            }
            return out;
        };
        // No longer replicas (promoted, gone): their drains go, and so do they.
        let gone: Vec<String> = (self.replicas.keys())
            .filter(|n| !lags.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = self.replicas.remove(&name) {
                if r.drained_since.is_some() {
                    out.push(Step::Readmit(name));
                }
            }
        }
        for (name, lag) in lags {
            let r = self.replicas.entry(name.clone()).or_default();
            r.lag = *lag;
            let Some(lag) = *lag else {
                (r.over_since, r.under_since) = (None, None);
                continue;
            };
            match r.drained_since {
                None if lag > l.max => {
                    let since = *r.over_since.get_or_insert(now);
                    if now.duration_since(since) >= l.delay {
                        (r.over_since, r.drained_since) = (None, Some(now));
                        out.push(Step::Drain(name.clone()));
                    }
                }
                None => r.over_since = None,
                Some(_) if lag <= l.readmit => {
                    let since = *r.under_since.get_or_insert(now);
                    if now.duration_since(since) >= l.readmit_delay {
                        (r.under_since, r.drained_since) = (None, None);
                        out.push(Step::Readmit(name.clone()));
                    }
                }
                Some(_) => r.under_since = None,
            }
        }
        out
    }

    /// The replicas drained now.
    pub fn drained(&self) -> BTreeSet<String> {
        (self.replicas.iter())
            .filter(|(_, r)| r.drained_since.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Each replica's last figure and whether it is drained, for `/status`.
    pub fn view(&self) -> Vec<ReplicaLag> {
        (self.replicas.iter())
            .map(|(n, r)| ReplicaLag {
                member: n.clone(),
                lag_bytes: r.lag,
                drained: r.drained_since.is_some(),
                drained_for_s: r
                    .drained_since
                    .map(|s| (s.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            })
            .collect()
    }
}

/// One replica's lag as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaLag {
    /// Member name.
    pub member: String,
    /// Replay lag behind the leader, in bytes; null when it could not be read.
    pub lag_bytes: Option<u64>,
    /// Drained in the replica backends for its lag.
    pub drained: bool,
    /// For how long, in seconds.
    pub drained_for_s: Option<f64>,
}

/// The lag of each replica of `c` (every member but the leader), from their REST APIs and the
/// leader's, all asked at once. Empty when the leader's write location cannot be read (a
/// standby cluster, a leader not answering): no decision is made then.
pub async fn measure(c: &Cluster, timeout: Duration) -> BTreeMap<String, Option<u64>> {
    let Some(leader) = c
        .leader()
        .filter(|l| matches!(l.role.as_str(), "master" | "primary"))
    else {
        return BTreeMap::new();
    };
    let mut asks = tokio::task::JoinSet::new();
    for m in std::iter::once(leader).chain(c.members.iter().filter(|m| !m.is_leader)) {
        let m: Member = m.clone();
        asks.spawn(async move {
            let body = match crate::failover::confirm::get(&m, "/patroni", timeout).await {
                Ok(Ok((200, body))) => Some(body),
                _ => None,
            };
            (
                m.name,
                m.is_leader,
                body.and_then(|b| location(&b, m.is_leader)),
            )
        });
    }
    let mut head = None;
    let mut replayed = BTreeMap::new();
    while let Some(Ok((name, is_leader, loc))) = asks.join_next().await {
        match is_leader {
            true => head = loc,
            false => {
                replayed.insert(name, loc);
            }
        }
    }
    let Some(head) = head else {
        return BTreeMap::new();
    };
    replayed
        .into_iter()
        .map(|(n, loc)| (n, loc.map(|l| head.saturating_sub(l))))
        .collect()
}

/// From a `/patroni` answer: the leader's write location (`xlog.location`), or a replica's
/// replay location (`xlog.replayed_location`).
pub fn location(body: &[u8], leader: bool) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let key = if leader {
        "location"
    } else {
        "replayed_location"
    };
    json.get("xlog")?.get(key)?.as_u64()
}

/// One HAProxy whose replica backends the drains go to.
#[derive(Debug, Clone)]
struct Route {
    target: String,
    socket: PathBuf,
    backends: Vec<String>,
    /// The ownership file: the servers drained for lag, one name per line.
    owned: PathBuf,
}

/// Metrics the watcher keeps: `haconfd_replica_lag_bytes` and `haconfd_replica_lag_drained`,
/// by cluster and member.
#[derive(Clone, Default)]
pub struct LagObservers {
    /// Replay lag in bytes.
    pub bytes: Option<Family<Vec<(String, String)>, Gauge>>,
    /// 1 while drained for lag.
    pub drained: Option<Family<Vec<(String, String)>, Gauge>>,
}

#[derive(Default)]
struct Shared {
    cfg: LagConfig,
    cluster: Option<Arc<Cluster>>,
    tracker: Tracker,
    /// Whether the ownership files were read (the first tick).
    adopted: bool,
}

/// A cluster's lag watcher: inert until [`LagWatch::attach`] (the daemon), and then a task
/// that measures, decides and drains every `lag.interval`.
pub struct LagWatch {
    scope: String,
    probe_timeout: Duration,
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    task: Option<AbortHandle>,
    /// Set once attached (the daemon).
    observers: Option<LagObservers>,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl LagWatch {
    /// The watcher of cluster `scope` (a Citus group: none, its servers share backends), for
    /// every target with `server_state`; `per_scope` when several clusters share the HAProxy.
    pub fn new(
        cfg: &LagConfig,
        probe_timeout: Duration,
        targets: &[Target],
        scope: &str,
        per_scope: bool,
    ) -> LagWatch {
        let routes = targets
            .iter()
            .filter_map(|t| {
                let ss = t.server_state()?;
                let ss = match per_scope {
                    true => ss.for_scope(scope),
                    false => ss.clone(),
                };
                let mut owned = ss.file.clone().into_os_string();
                owned.push(format!(".lag-{}", crate::model::scope_id(scope)));
                Some(Route {
                    target: t.name.clone(),
                    socket: ss.stats_socket.clone(),
                    backends: ss.replica_backends.clone(),
                    owned: owned.into(),
                })
            })
            .collect();
        let shared = Shared {
            cfg: cfg.clone(),
            ..Shared::default()
        };
        LagWatch {
            scope: scope.to_owned(),
            probe_timeout,
            routes: Arc::new(routes),
            shared: Arc::new(Mutex::new(shared)),
            task: None,
            observers: None,
        }
    }

    /// Starts the task (the daemon): with `lag.max_bytes` set, or to lift the drains a killed
    /// run left (an ownership file). Nothing to watch or repair without a HAProxy.
    pub fn attach(&mut self, observers: LagObservers) {
        self.observers = Some(observers.clone());
        let running = self.task.as_ref().is_some_and(|t| !t.is_finished());
        if running || self.routes.is_empty() {
            return;
        }
        let watched = lock(&self.shared).cfg.limits().is_some();
        if !watched && !self.routes.iter().any(|r| r.owned.exists()) {
            return;
        }
        let work = Work {
            scope: self.scope.clone(),
            probe_timeout: self.probe_timeout,
            routes: Arc::clone(&self.routes),
            shared: Arc::clone(&self.shared),
            observers,
        };
        self.task = Some(tokio::spawn(work.run()).abort_handle());
    }

    /// The cluster as the last pass saw it.
    pub fn observe(&self, c: &Arc<Cluster>) {
        lock(&self.shared).cluster = Some(Arc::clone(c));
    }

    /// New settings (hot reload): the drains made so far carry over, and the task follows the
    /// new settings (started when lag is now watched, ended once nothing is drained when not).
    pub fn take_state_from(&mut self, old: &mut LagWatch) {
        let cfg = lock(&self.shared).cfg.clone();
        self.shared = Arc::clone(&old.shared);
        lock(&self.shared).cfg = cfg;
        let same = (self.routes.iter().map(|r| &r.owned)).eq(old.routes.iter().map(|r| &r.owned));
        match same {
            true => self.task = old.task.take(),
            false => {
                if let Some(t) = old.task.take() {
                    t.abort();
                }
            }
        }
        if let Some(obs) = old.observers.take() {
            self.attach(obs);
        }
    }

    /// Each replica's lag and drain, for `/status`.
    pub fn view(&self) -> Vec<ReplicaLag> {
        lock(&self.shared).tracker.view()
    }

    /// A graceful stop: the task ends and every drain haconfd made is lifted (no one watches
    /// the lag any more; the health checks decide).
    pub async fn shutdown(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        let drained = {
            let mut s = lock(&self.shared);
            let d = s.tracker.drained();
            s.tracker = Tracker::default();
            d
        };
        for r in self.routes.iter() {
            release(r, &drained, &self.scope).await;
        }
    }
}

/// The task's part of a [`LagWatch`].
struct Work {
    scope: String,
    probe_timeout: Duration,
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    observers: LagObservers,
}

impl Work {
    /// Ticks every `lag.interval`; ends once lag is not watched and nothing is drained.
    async fn run(self) {
        let mut written = vec![None; self.routes.len()];
        loop {
            let (interval, done) = self.tick(&mut written).await;
            if done {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One measurement, decision and enforcement; the time to the next, and whether the task
    /// is done. `written`: what each route's ownership file holds.
    async fn tick(&self, written: &mut [Option<BTreeSet<String>>]) -> (Duration, bool) {
        let (cfg, cluster, adopt) = {
            let mut s = lock(&self.shared);
            let adopt = !std::mem::replace(&mut s.adopted, true);
            (s.cfg.clone(), s.cluster.clone(), adopt)
        };
        if adopt {
            let mut names = BTreeSet::new();
            for r in self.routes.iter() {
                names.extend(read_owned(&r.owned));
            }
            if !names.is_empty() {
                tracing::info!(cluster = %self.scope, replicas = ?names, "replicas drained for lag by an earlier run: taken over");
                let mut s = lock(&self.shared);
                s.tracker
                    .adopt(names.iter().map(String::as_str), Instant::now());
            }
        }
        let limits = cfg.limits();
        let lags = match (&cluster, limits) {
            (Some(c), Some(_)) => Some(measure(c, self.probe_timeout).await),
            _ => None,
        };
        if let Some(l) = &lags {
            tracing::trace!(cluster = %self.scope, lags = ?l, "replay lag measured");
        }
        let steps = {
            let mut s = lock(&self.shared);
            match (&lags, limits) {
                // No leader write location to measure against: nothing is decided.
                (Some(l), Some(_)) if l.is_empty() => Vec::new(),
                (Some(l), lim) => s.tracker.step(lim, Instant::now(), l),
                (None, Some(_)) => Vec::new(),
                (None, None) => s.tracker.step(None, Instant::now(), &BTreeMap::new()),
            }
        };
        for st in &steps {
            let lag = |n: &str| lags.as_ref().and_then(|l| l.get(n).copied().flatten());
            match st {
                Step::Drain(n) => {
                    tracing::warn!(cluster = %self.scope, member = %n, lag_bytes = lag(n), limit_bytes = limits.map(|l| l.max), delay = ?cfg.delay, "replica over the lag limit for longer than lag.delay: no new reads go to it (its open sessions go on)");
                }
                Step::Readmit(n) => {
                    tracing::info!(cluster = %self.scope, member = %n, lag_bytes = lag(n), "replica drained for lag takes reads again");
                }
            }
        }
        let (drained, view) = {
            let s = lock(&self.shared);
            (s.tracker.drained(), s.tracker.view())
        };
        let released: BTreeSet<String> = (steps.iter())
            .filter_map(|s| match s {
                Step::Readmit(n) => Some(n.clone()),
                Step::Drain(_) => None,
            })
            .collect();
        for (r, w) in self.routes.iter().zip(written.iter_mut()) {
            if !drained.is_empty() || !released.is_empty() {
                enforce(r, &drained, &released, &self.scope).await;
            }
            if w.as_ref() != Some(&drained) {
                write_owned(&r.owned, &drained);
                *w = Some(drained.clone());
            }
        }
        self.record(&view);
        (cfg.interval, limits.is_none() && drained.is_empty())
    }

    fn record(&self, view: &[ReplicaLag]) {
        let labels = |m: &str| {
            vec![
                ("cluster".to_owned(), self.scope.clone()),
                ("member".to_owned(), m.to_owned()),
            ]
        };
        if let Some(f) = &self.observers.bytes {
            for r in view {
                match r.lag_bytes {
                    Some(b) => {
                        f.get_or_create(&labels(&r.member))
                            .set(i64::try_from(b).unwrap_or(i64::MAX));
                    }
                    None => {
                        f.remove(&labels(&r.member));
                    }
                }
            }
        }
        if let Some(f) = &self.observers.drained {
            for r in view {
                f.get_or_create(&labels(&r.member))
                    .set(i64::from(r.drained));
            }
        }
    }
}

/// Puts `route`'s HAProxy in line with the decisions: every `drained` replica drained in each
/// replica backend (again, if a reload or a hand lifted it), every `released` one out of the
/// drain haconfd put it in. Servers in maintenance are left alone.
async fn enforce(
    route: &Route,
    drained: &BTreeSet<String>,
    released: &BTreeSet<String>,
    scope: &str,
) {
    let timeout = Duration::from_secs(2);
    let dump_cmd = (route.backends.iter())
        .map(|b| format!("show servers state {b}"))
        .collect::<Vec<_>>()
        .join(";");
    let Ok(dump) = crate::consumers::haproxy::cli(&route.socket, &dump_cmd, timeout).await else {
        tracing::debug!(target = %route.target, "HAProxy not reachable: lag drains wait for it");
        return;
    };
    let live = runtime::parse_live(&dump);
    let mut cmds = Vec::new();
    for ((backend, name), s) in &live {
        if !route.backends.contains(backend) || s.in_maint() {
            continue;
        }
        if drained.contains(name) && !s.is_drained() {
            cmds.push(format!("set server {backend}/{name} state drain"));
        } else if released.contains(name) && s.is_drained() {
            cmds.push(format!("set server {backend}/{name} state ready"));
        }
    }
    if cmds.is_empty() {
        return;
    }
    match runtime::apply_commands(&route.socket, &cmds, timeout).await {
        Ok(refused) if refused.is_empty() => {}
        Ok(refused) => {
            for r in refused {
                tracing::warn!(target = %route.target, cluster = %scope, command = %r.command, answer = %r.answer, "HAProxy refused a lag drain command");
            }
        }
        Err(e) => {
            tracing::warn!(target = %route.target, cluster = %scope, error = %e, "cannot reach HAProxy for lag drains")
        }
    }
}

/// Lifts haconfd's lag drains of `names` on `route`'s HAProxy and empties its ownership file.
async fn release(route: &Route, names: &BTreeSet<String>, scope: &str) {
    if !names.is_empty() {
        tracing::info!(target = %route.target, cluster = %scope, replicas = ?names, "lifting the lag drains at stop");
        enforce(route, &BTreeSet::new(), names, scope).await;
    }
    write_owned(&route.owned, &BTreeSet::new());
}

/// The names an ownership file lists (none when it is missing or unreadable).
fn read_owned(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the ownership file when its names change; removes it when none is left.
fn write_owned(path: &Path, names: &BTreeSet<String>) {
    if names.is_empty() {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the lag drain file")
            }
        }
        return;
    }
    let mut text = String::from(
        "# replicas haconfd drained for replay lag; lifted at its next start if it is gone\n",
    );
    for n in names {
        text.push_str(n);
        text.push('\n');
    }
    if let Err(e) = crate::consumers::haproxy::server_state::write_if_changed(path, &text) {
        tracing::warn!(file = %path.display(), error = %e, "cannot write the lag drain file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max: 100,
            readmit: 50,
            delay: Duration::from_secs(10),
            readmit_delay: Duration::from_secs(5),
        }
    }

    fn lags(v: &[(&str, Option<u64>)]) -> BTreeMap<String, Option<u64>> {
        v.iter().map(|(n, l)| (n.to_string(), *l)).collect()
    }

    #[test]
    fn a_replica_leaves_only_after_the_delay_and_returns_under_the_readmit_level() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let l = Some(limits());
        assert!(t.step(l, at(0), &lags(&[("pg2", Some(500))])).is_empty());
        // A surge shorter than the delay moves nothing.
        assert!(t.step(l, at(5), &lags(&[("pg2", Some(10))])).is_empty());
        assert!(t.step(l, at(6), &lags(&[("pg2", Some(500))])).is_empty());
        assert!(t.step(l, at(15), &lags(&[("pg2", Some(500))])).is_empty());
        assert_eq!(
            t.step(l, at(16), &lags(&[("pg2", Some(500))])),
            [Step::Drain("pg2".into())]
        );
        // Between the two levels it stays out; under the re-admit level for readmit_delay,
        // it returns.
        assert!(t.step(l, at(20), &lags(&[("pg2", Some(80))])).is_empty());
        assert!(t.step(l, at(21), &lags(&[("pg2", Some(40))])).is_empty());
        assert!(t.step(l, at(23), &lags(&[("pg2", Some(60))])).is_empty());
        assert!(t.step(l, at(24), &lags(&[("pg2", Some(40))])).is_empty());
        assert!(t.step(l, at(28), &lags(&[("pg2", Some(40))])).is_empty());
        assert_eq!(
            t.step(l, at(29), &lags(&[("pg2", Some(40))])),
            [Step::Readmit("pg2".into())]
        );
        assert!(t.drained().is_empty());
    }

    #[test]
    fn an_unreadable_figure_decides_nothing_and_a_replica_no_more_is_readmitted() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let l = Some(Limits {
            delay: Duration::ZERO,
            ..limits()
        });
        assert_eq!(
            t.step(l, t0, &lags(&[("pg2", Some(500)), ("pg3", Some(0))])),
            [Step::Drain("pg2".into())]
        );
        // Unreadable: stays drained.
        assert!(t
            .step(l, t0, &lags(&[("pg2", None), ("pg3", Some(0))]))
            .is_empty());
        assert_eq!(t.drained(), BTreeSet::from(["pg2".to_owned()]));
        // Promoted (no longer a replica): its drain goes.
        assert_eq!(
            t.step(l, t0, &lags(&[("pg3", Some(0))])),
            [Step::Readmit("pg2".into())]
        );
        // Lag no longer watched: every drain goes.
        t.adopt(["pg3"], t0);
        assert_eq!(t.step(None, t0, &lags(&[])), [Step::Readmit("pg3".into())]);
    }

    #[test]
    fn byte_counts_take_postgres_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("64MB"), Ok(64 << 20));
        assert_eq!(parse_bytes("16 kB"), Ok(16 << 10));
        assert_eq!(parse_bytes("1GB"), Ok(1 << 30));
        assert!(parse_bytes("10 MiB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn a_cluster_table_overrides_the_global_settings_and_is_checked() {
        let global: LagConfig = toml::from_str("max_bytes = \"64MB\"\ndelay = \"5s\"").unwrap();
        let over: toml::Table = toml::from_str("max_bytes = 1000\nreadmit_bytes = 100").unwrap();
        let c = global.with(&over, "clusters.a.lag").unwrap();
        assert_eq!(c.max_bytes, Some(1000));
        assert_eq!(c.readmit_bytes, Some(100));
        assert_eq!(c.delay, Duration::from_secs(5));
        let bad: toml::Table = toml::from_str("readmit_bytes = \"1GB\"").unwrap();
        let err = global.with(&bad, "clusters.a.lag").unwrap_err();
        assert!(err.contains("clusters.a.lag.readmit_bytes"), "{err}");
        let unknown: toml::Table = toml::from_str("max_lag = 3").unwrap();
        assert!(global.with(&unknown, "clusters.a.lag").is_err());
    }

    #[test]
    fn the_figures_come_from_the_leader_write_and_the_replica_replay_location() {
        let leader = br#"{"role":"primary","xlog":{"location":5000}}"#;
        let replica =
            br#"{"role":"replica","xlog":{"received_location":4900,"replayed_location":3000,"paused":true}}"#;
        assert_eq!(location(leader, true), Some(5000));
        assert_eq!(location(replica, false), Some(3000));
        assert_eq!(location(replica, true), None);
    }
}
