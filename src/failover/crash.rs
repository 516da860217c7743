//! The crash hold: a primary whose PostgreSQL stops taking connections is noticed from the load
//! balancer's side, and while Patroni's lease on it runs out the clients wait instead of
//! failing. haconfd keeps one connection open to the leader's PostgreSQL port without sending a
//! byte (its backend waits for a startup packet and dies with the postmaster; PostgreSQL logs
//! nothing for it unless `log_connections` is on), with TCP keepalive, and connects again every
//! `interval`. The leader is **dead** when:
//! - its port refuses connections, twice in a row or right after the open connection ended,
//!   for at least `refused_for` (0 by default): nothing listens, the postmaster is gone; this
//!   takes about a millisecond after PostgreSQL dies;
//! - or its port does not answer for `silent_for` (the host is gone, or the path to it) and its
//!   REST API does not say it takes writes (the second opinion). A node that is merely slow
//!   still accepts connections (the kernel does): it is never declared dead.
//!
//! Then:
//! - it is drained in the primary backends at once (a fence: `primary down`), so that
//!   `hold.lua` holds new connections to the write port;
//! - every PgBouncer database of the cluster is paused, so that queries queue instead of
//!   failing against a dead server, session-mode pools too (see
//!   [`crate::consumers::pgbouncer::Pause::begin_hold`]);
//! - all of it for at most the hold's bound: the cluster's lease (`ttl` + `retry_timeout` from
//!   its `config` key, see [`crate::model::Cluster::lease_bound`]), capped by
//!   `[failover.crash_hold] max`.
//!
//! It ends when a new leader is confirmed (the fast path's switch, then `RESUME`), when the old
//! primary takes writes again with its lock kept (Patroni restarting a crashed PostgreSQL: its
//! REST API confirms it as it confirms a new leader, then `RESUME`), at the bound (the drain
//! lifted, PgBouncer resumed: the health checks and the clients see the truth), or at shutdown.
//! A haconfd killed during a hold leaves a drain and a pause behind: the next start lifts the
//! drain ([`super::Move::Repair`]) and resumes PgBouncer, as for any fence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use super::actuator::Job;
use super::fence::{resume_pauses, Fence, FenceWhy};
use super::{confirm, lock, unix_now, Observers, Shared};
use crate::consumers::haproxy::runtime::Move;
use crate::consumers::pgbouncer::Pause;
use crate::hooks::HookEvent;
use crate::model::{Cluster, Member};

/// `[failover.crash_hold]`: noticing a dead primary and holding its clients.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrashHoldConfig {
    /// Probe the leader's PostgreSQL and hold its clients when it dies.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the leader's PostgreSQL port is connected to, besides the connection kept
    /// open (whose end is noticed at once, and whose keepalive notices a silent host). With
    /// `log_connections` on, PostgreSQL logs each of these connections.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long its connections must be refused (nothing listens: the postmaster is gone)
    /// before it is dead; at least two refusals (or the kept connection's end and a refusal)
    /// are needed in any case.
    #[serde(default = "default_refused_for", with = "humantime_serde")]
    pub refused_for: Duration,
    /// How long it may not answer at all (a host down, or the path to it) before it is dead.
    /// A node that is merely slow still accepts connections: it is never declared dead.
    #[serde(default = "default_silent_for", with = "humantime_serde")]
    pub silent_for: Duration,
    /// Time limit of one connect.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest a hold lasts. Default: the cluster's lease (Patroni's `ttl` +
    /// `retry_timeout`, 40 s without a `config` key); a value here caps it.
    #[serde(default, with = "humantime_serde")]
    pub max: Option<Duration>,
}

fn yes() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_refused_for() -> Duration {
    Duration::ZERO
}
fn default_silent_for() -> Duration {
    Duration::from_secs(3)
}
fn default_connect_timeout() -> Duration {
    Duration::from_millis(500)
}

/// The bound when the cluster's `config` key gives no `ttl`: Patroni's defaults (30 s + 10 s).
const DEFAULT_LEASE: Duration = Duration::from_secs(40);

impl Default for CrashHoldConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
            refused_for: default_refused_for(),
            silent_for: default_silent_for(),
            connect_timeout: default_connect_timeout(),
            max: None,
        }
    }
}

impl CrashHoldConfig {
    /// Refuses zero durations, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, d) in [
            ("interval", Some(self.interval)),
            ("silent_for", Some(self.silent_for)),
            ("connect_timeout", Some(self.connect_timeout)),
            ("max", self.max),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(format!("failover.crash_hold.{key} must be longer than 0s"));
            }
        }
        Ok(())
    }

    /// The hold's bound for `cluster`: its lease, capped by `max`.
    pub fn bound(&self, cluster: &Cluster) -> Duration {
        let lease = cluster.lease_bound().unwrap_or(DEFAULT_LEASE);
        self.max.map_or(lease, |m| m.min(lease))
    }
}

/// What one probe of PostgreSQL's port saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// The connection was accepted.
    Alive,
    /// Refused: nothing listens on the port.
    Refused,
    /// No answer within the connect timeout, or the host unreachable.
    Silent,
}

/// One TCP connect to `host:port`: the answer, and the connection when it was accepted (the
/// caller keeps it as its watch, or drops it; PostgreSQL logs nothing for a connection that
/// sends no byte).
pub(super) async fn probe(host: &str, port: u16, timeout: Duration) -> (Answer, Option<TcpStream>) {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => (Answer::Alive, Some(s)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => (Answer::Refused, None),
        Ok(Err(_)) | Err(_) => (Answer::Silent, None),
    }
}

/// Resolves when the watch connection ends (or sends anything: PostgreSQL only would to say
/// it is going away): true when its keepalive probes went unanswered (a silent host), false
/// when it was closed. Never without one.
async fn closed(watch: &mut Option<TcpStream>) -> bool {
    match watch.as_mut() {
        Some(s) => {
            let mut buf = [0u8; 256];
            matches!(s.read(&mut buf).await, Err(e) if e.kind() == std::io::ErrorKind::TimedOut)
        }
        None => std::future::pending().await,
    }
}

/// Keepalive on the watch connection: a probe after a second of silence, then one a second,
/// and the connection ends when about `silent_for` of them went unanswered.
fn keepalive(stream: &TcpStream, silent_for: Duration) {
    let retries = silent_for.as_secs().clamp(1, 60) as u32;
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(retries);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "crash watcher: no keepalive on the watch connection");
    }
}

/// How often a primary that has just failed a probe (or whose watch connection ended) is probed
/// until it is dead or answers.
const SUSPECT_STEP: Duration = Duration::from_millis(5);

/// How often a primary whose hold ended at its bound is probed until it answers again.
const SPENT_STEP: Duration = Duration::from_secs(1);

/// The confirmation window: consecutive failed probes and since when.
#[derive(Debug, Default)]
pub(super) struct Window {
    refused_since: Option<Instant>,
    failing_since: Option<Instant>,
    failed: u32,
}

impl Window {
    /// Whether the last probe failed.
    fn failing(&self) -> bool {
        self.failed > 0
    }

    /// Takes one probe's answer (`began` when it was sent, `now` when it answered); says why
    /// the node is dead once the window is full. At least two failed probes are needed.
    pub(super) fn see(
        &mut self,
        answer: Answer,
        began: Instant,
        now: Instant,
        cfg: &CrashHoldConfig,
    ) -> Option<String> {
        match answer {
            Answer::Alive => {
                *self = Window::default();
                return None;
            }
            Answer::Refused => {
                self.refused_since.get_or_insert(began);
            }
            Answer::Silent => self.refused_since = None,
        }
        self.failing_since.get_or_insert(began);
        self.failed += 1;
        if self.failed < 2 {
            return None;
        }
        let ms = |since: Instant| now.saturating_duration_since(since).as_millis();
        if let Some(since) = self.refused_since {
            if now.saturating_duration_since(since) >= cfg.refused_for {
                return Some(format!(
                    "PostgreSQL refused connections for {} ms ({} probes)",
                    ms(since),
                    self.failed
                ));
            }
        }
        let since = self.failing_since.expect("set above");
        (now.saturating_duration_since(since) >= cfg.silent_for).then(|| {
            format!(
                "PostgreSQL did not answer for {} ms ({} probes)",
                ms(since),
                self.failed
            )
        })
    }
}

/// A hold in force.
#[derive(Debug, Clone)]
pub(super) struct Hold {
    pub(super) member: Member,
    pub(super) why: String,
    pub(super) since: Instant,
    pub(super) since_unix: f64,
    pub(super) bound: Duration,
    who: Who,
}

/// Which cluster a hold's hook events name.
#[derive(Debug, Clone)]
pub(super) struct Who {
    namespace: String,
    scope: String,
    group: Option<u64>,
}

impl Who {
    pub(super) fn of(c: &Cluster) -> Who {
        Who {
            namespace: c.namespace.clone(),
            scope: c.scope.clone(),
            group: c.group,
        }
    }

    fn event(&self, event: &'static str, member: &str, detail: &str, reason: String) -> HookEvent {
        HookEvent {
            event,
            namespace: self.namespace.clone(),
            scope: self.scope.clone(),
            group: self.group,
            at: unix_now(),
            old_leader: Some(member.to_owned()),
            new_leader: None,
            member: Some(member.to_owned()),
            detail: Some(detail.to_owned()),
            scheduled_at: None,
            reason: Some(reason),
        }
    }
}

/// How a hold ended (the `ended` label of `haconfd_crash_holds_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Another member was confirmed to take writes.
    NewLeader,
    /// The same member takes writes again, its lock kept.
    Recovered,
    /// The bound passed.
    Bound,
    /// haconfd stopped.
    Shutdown,
}

impl Ended {
    pub(super) fn label(self) -> &'static str {
        match self {
            Ended::NewLeader => "new_leader",
            Ended::Recovered => "recovered",
            Ended::Bound => "bound",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// Reports the end of `hold`: the log, the histogram, the counter, the `hold_released` hook.
pub(super) fn released(hold: &Hold, how: Ended, by: Option<&str>, observers: &Observers) {
    let lasted = hold.since.elapsed();
    let lasted_text = humantime::format_duration(Duration::from_millis(lasted.as_millis() as u64));
    let server = &hold.member.name;
    match how {
        Ended::NewLeader => {
            tracing::info!(server = %server, new = ?by, lasted = %lasted_text, "crash hold released: a new primary takes writes")
        }
        Ended::Recovered => {
            tracing::info!(server = %server, lasted = %lasted_text, "crash hold released: the primary takes writes again (its lock kept)")
        }
        Ended::Bound => {
            tracing::warn!(server = %server, lasted = %lasted_text, bound = %humantime::format_duration(hold.bound), "crash hold released at its bound: no primary took writes; HAProxy's health checks and the clients see the cluster as it is")
        }
        Ended::Shutdown => {
            tracing::info!(server = %server, lasted = %lasted_text, "shutting down: crash hold released")
        }
    }
    if let Some(h) = &observers.crash_hold {
        h.observe(lasted.as_secs_f64());
    }
    if let Some(f) = &observers.crash_holds {
        f.get_or_create(&vec![("ended".to_owned(), how.label().to_owned())])
            .inc();
    }
    if let Some(tx) = &observers.hook_events {
        let reason = match by {
            Some(new) => format!("{}: {new} after {lasted_text}", how.label()),
            None => format!("{} after {lasted_text}", how.label()),
        };
        let _ = tx.send(hold.who.event("hold_released", server, how.label(), reason));
    }
}

impl super::Router {
    /// Starts, moves or stops the crash watcher: it probes the member a hold is on, else the
    /// confirmed leader that takes writes; nothing when the fast path or the hold is off, in
    /// `once`, or when the cluster has nothing to hold (a Citus group). Called after every
    /// pass's step of the cluster, and after a reload.
    pub fn watch_primary(&mut self) {
        let on = self.cfg.enabled
            && self.cfg.crash_hold.enabled
            && self.is_attached()
            && (!self.routes.is_empty() || !self.pauses.is_empty());
        let target = on.then(|| {
            let sh = lock(&self.shared);
            sh.hold.as_ref().map(|h| h.member.clone()).or_else(|| {
                sh.leader_member.clone().filter(|m| {
                    sh.confirmed.as_deref() == Some(m.name.as_str())
                        && sh.leader.as_deref() == Some(m.name.as_str())
                })
            })
        });
        let target = target.flatten().filter(|_| self.who.is_some());
        let same = |a: &Member, b: &Member| {
            a.name == b.name
                && a.host == b.host
                && a.port == b.port
                && a.api_host == b.api_host
                && a.api_port == b.api_port
                && a.api_scheme == b.api_scheme
        };
        match (&self.crash, &target) {
            (Some((m, _)), Some(t)) if same(m, t) => return,
            (None, None) => return,
            _ => {}
        }
        if let Some((_, t)) = self.crash.take() {
            t.abort();
        }
        let (Some(member), Some(who)) = (target, self.who.clone()) else {
            return;
        };
        self.wake_watchdog();
        let Some(wake) = self.watchdog.as_ref().map(|(w, _)| Arc::clone(w)) else {
            return;
        };
        let watcher = Watcher {
            shared: Arc::clone(&self.shared),
            actuator: self.actuator(),
            pauses: self.pauses.iter().map(|(_, p)| p.clone()).collect(),
            wake,
            observers: self.observers.clone(),
            cfg: self.cfg.crash_hold.clone(),
            confirm_interval: self.cfg.confirm_interval,
            probe_timeout: self.cfg.probe_timeout,
            who,
        };
        tracing::debug!(server = %member.name, address = %member.address, "crash watcher: probing the primary's PostgreSQL");
        let task = tokio::spawn(watcher.run(member.clone()));
        self.crash = Some((member, task.abort_handle()));
    }
}

/// What the watcher task needs of the router.
pub(super) struct Watcher {
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) actuator: Option<mpsc::UnboundedSender<Job>>,
    pub(super) pauses: Vec<Pause>,
    pub(super) wake: Arc<Notify>,
    pub(super) observers: Observers,
    pub(super) cfg: CrashHoldConfig,
    pub(super) confirm_interval: Duration,
    pub(super) probe_timeout: Duration,
    pub(super) who: Who,
}

impl Watcher {
    /// Watches `member` (the confirmed leader, or the one a hold is on) until aborted: probes
    /// its PostgreSQL, holds when it is dead, and, during its hold, waits for it to take writes
    /// again.
    pub(super) async fn run(self, member: Member) {
        let mut window = Window::default();
        let mut warned_https = false;
        // An accepted probe connection, kept open without a byte sent: PostgreSQL's backend
        // waits for the startup packet (up to `authentication_timeout`, then it leaves without
        // a log line), and dies with the postmaster. Its end is the first sign of a crash; a
        // connect right after it says whether PostgreSQL is gone.
        let mut watch: Option<TcpStream> = None;
        // The first connection at once: it is the watch.
        let mut now_please = true;
        // A hold on this member ended without it taking writes again (its bound): it is not
        // held again until its port has answered, so that a member down for good (or a
        // partition that lasts) costs one bounded hold, not one after another.
        let mut spent = false;
        loop {
            if self.holding(&member.name) {
                watch = None;
                spent = !self.until_recovered(&member).await;
                window = Window::default();
                now_please = true;
                continue;
            }
            if !now_please {
                let step = if window.failing() {
                    SUSPECT_STEP.min(self.cfg.interval)
                } else if spent {
                    // Looking for it to answer again, without hammering a dead port.
                    SPENT_STEP.min(self.cfg.interval)
                } else {
                    self.cfg.interval
                };
                tokio::select! {
                    silent = closed(&mut watch) => {
                        tracing::debug!(server = %member.name, silent, "crash watcher: the connection to the primary's PostgreSQL ended");
                        watch = None;
                        now_please = true;
                        if self.watching(&member.name) {
                            // Closed: as a refusal now. Keepalive unanswered: silent since
                            // about `silent_for`.
                            let t = Instant::now();
                            let (answer, since) = if silent {
                                (Answer::Silent, t.checked_sub(self.cfg.silent_for).unwrap_or(t))
                            } else {
                                (Answer::Refused, t)
                            };
                            let _ = window.see(answer, since, t, &self.cfg);
                        }
                        continue;
                    }
                    _ = tokio::time::sleep(step) => {}
                }
            }
            now_please = false;
            if !self.watching(&member.name) {
                // A change under way: looked at again shortly, probed once it is over.
                window = Window::default();
                tokio::time::sleep(SUSPECT_STEP * 20).await;
                now_please = true;
                continue;
            }
            let began = Instant::now();
            let (answer, stream) = probe(&member.host, member.port, self.cfg.connect_timeout).await;
            if answer == Answer::Alive && spent {
                spent = false;
                tracing::info!(server = %member.name, "the primary's PostgreSQL answers again: a crash hold may begin again");
            }
            if watch.is_none() {
                if let Some(s) = &stream {
                    keepalive(s, self.cfg.silent_for);
                }
                watch = stream;
            }
            let Some(why) = window.see(answer, began, Instant::now(), &self.cfg) else {
                continue;
            };
            if spent {
                // Held once already and not back since: the health checks decide.
                window = Window::default();
                continue;
            }
            if answer == Answer::Refused {
                // Nothing listens on its port: PostgreSQL is gone, whatever its REST API says.
                self.begin(&member, why);
                continue;
            }
            // The second opinion, for a port that does not answer: a primary its REST API
            // says takes writes is not dead (the path from here to its port is what failed),
            // and is left alone.
            match confirm::probe(&member, self.probe_timeout).await {
                Ok(confirm::Probe::Writable) => {
                    tracing::warn!(server = %member.name, probe = %why, "the primary's PostgreSQL port does not answer haconfd, but its REST API says it takes writes: no hold");
                    window = Window::default();
                    tokio::time::sleep(self.cfg.silent_for).await;
                }
                Ok(confirm::Probe::NotYet(rest)) => self.begin(&member, format!("{why}; {rest}")),
                Err(e) => {
                    if !warned_https {
                        warned_https = true;
                        tracing::info!("{e}");
                    }
                    self.begin(&member, why)
                }
            }
        }
    }

    /// Whether a hold on `name` is in force.
    fn holding(&self, name: &str) -> bool {
        lock(&self.shared)
            .hold
            .as_ref()
            .is_some_and(|h| h.member.name == name)
    }

    /// Whether `name` is the confirmed leader with no change under way: the one to watch.
    fn watching(&self, name: &str) -> bool {
        let sh = lock(&self.shared);
        sh.leader.as_deref() == Some(name)
            && sh.confirmed.as_deref() == Some(name)
            && sh.fences.is_empty()
            && sh.hold.is_none()
    }

    /// The primary is dead: drained at once, PgBouncer paused, both until the bound.
    fn begin(&self, member: &Member, why: String) {
        let now = Instant::now();
        let name = member.name.clone();
        let bound = {
            let mut sh = lock(&self.shared);
            if sh.leader.as_deref() != Some(name.as_str())
                || sh.confirmed.as_deref() != Some(name.as_str())
                || !sh.fences.is_empty()
                || sh.hold.is_some()
            {
                return;
            }
            let bound = sh.hold_bound;
            sh.fences.insert(
                name.clone(),
                Fence {
                    why: FenceWhy::Crash,
                    since: now,
                    since_unix: unix_now(),
                    until: now + bound,
                },
            );
            sh.changing_since.get_or_insert(now);
            sh.hold = Some(Hold {
                member: member.clone(),
                why: why.clone(),
                since: now,
                since_unix: unix_now(),
                bound,
                who: self.who.clone(),
            });
            bound
        };
        tracing::warn!(server = %name, why = %why, bound = %humantime::format_duration(bound), "the primary is down: holding its clients (drained in HAProxy, PgBouncer paused) until a primary takes writes, at most the bound");
        if let Some(a) = &self.actuator {
            let _ = a.send(Job {
                mv: Move::Fence { old: name.clone() },
                switch: false,
            });
        }
        self.wake.notify_one();
        for p in &self.pauses {
            p.begin_hold("primary down", bound);
        }
        if let Some(tx) = &self.observers.hook_events {
            let _ = tx.send(
                self.who
                    .event("primary_down_detected", &name, "primary down", why),
            );
        }
    }

    /// During the hold on `member`: its PostgreSQL port probed every `confirm_interval`, and,
    /// once it takes connections again, its REST API, until that says the member takes writes
    /// again (then the hold ends: HAProxy brings it UP, PgBouncer resumes) or the hold ends
    /// another way. A refused port costs neither PostgreSQL nor Patroni anything. Returns
    /// whether the member took writes again.
    async fn until_recovered(&self, member: &Member) -> bool {
        loop {
            tokio::time::sleep(self.confirm_interval).await;
            if !self.holding(&member.name) {
                return false;
            }
            let (port, _) = probe(&member.host, member.port, self.cfg.connect_timeout).await;
            if port != Answer::Alive {
                continue;
            }
            let writable = match confirm::probe(member, self.probe_timeout).await {
                Ok(p) => p == confirm::Probe::Writable,
                // No REST API to ask (HTTPS): its port taking connections again will do.
                Err(_) => true,
            };
            if writable {
                self.recovered(&member.name);
                return true;
            }
        }
    }

    /// The held primary takes writes again, its lock kept: UP in HAProxy, PgBouncer resumed
    /// (same address: no reload needed).
    fn recovered(&self, name: &str) {
        let hold = {
            let mut sh = lock(&self.shared);
            if sh.leader.as_deref() != Some(name)
                || sh.hold.as_ref().is_none_or(|h| h.member.name != name)
            {
                return;
            }
            sh.fences.remove(name);
            if sh.fences.is_empty() {
                sh.changing_since = None;
            }
            sh.confirmed = Some(name.to_owned());
            sh.moved = Some(name.to_owned());
            sh.hold.take()
        };
        if let Some(a) = &self.actuator {
            let _ = a.send(Job {
                mv: Move::Promote {
                    new: name.to_owned(),
                    demote: vec![],
                },
                switch: false,
            });
        }
        self.wake.notify_one();
        resume_pauses(
            self.pauses.clone(),
            "the primary takes writes again".to_owned(),
        );
        if let Some(hold) = hold {
            released(&hold, Ended::Recovered, None, &self.observers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CrashHoldConfig {
        CrashHoldConfig::default()
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn refused_connections_make_a_primary_dead_after_the_window_and_two_probes() {
        let t0 = Instant::now();
        // The default window: the second refusal.
        let mut w = Window::default();
        assert_eq!(w.see(Answer::Refused, t0, t0, &cfg()), None);
        assert!(w.see(Answer::Refused, t0, at(t0, 1), &cfg()).is_some());
        let cfg = || CrashHoldConfig {
            refused_for: Duration::from_millis(100),
            ..CrashHoldConfig::default()
        };
        let mut w = Window::default();
        // One refusal is never enough, however long it took.
        assert_eq!(
            w.see(Answer::Refused, t0, at(t0, 500), &cfg()),
            None,
            "one probe"
        );
        let dead = w.see(Answer::Refused, at(t0, 500), at(t0, 501), &cfg());
        assert!(
            dead.as_deref()
                .is_some_and(|d| d.contains("refused connections for 501 ms (2 probes)")),
            "{dead:?}"
        );
        // Two quick refusals inside the window: not yet; the third past it: dead.
        let mut w = Window::default();
        assert_eq!(w.see(Answer::Refused, t0, at(t0, 1), &cfg()), None);
        assert_eq!(w.see(Answer::Refused, at(t0, 50), at(t0, 51), &cfg()), None);
        assert!(w
            .see(Answer::Refused, at(t0, 100), at(t0, 101), &cfg())
            .is_some());
    }

    #[test]
    fn an_accepted_connection_resets_the_window() {
        let cfg = || CrashHoldConfig {
            refused_for: Duration::from_millis(100),
            ..CrashHoldConfig::default()
        };
        let t0 = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.see(Answer::Refused, t0, at(t0, 1), &cfg()), None);
        assert_eq!(w.see(Answer::Alive, at(t0, 60), at(t0, 61), &cfg()), None);
        assert_eq!(
            w.see(Answer::Refused, at(t0, 120), at(t0, 121), &cfg()),
            None
        );
        assert_eq!(
            w.see(Answer::Refused, at(t0, 170), at(t0, 171), &cfg()),
            None,
            "51 ms of refusals since the accepted connection"
        );
    }

    #[test]
    fn a_node_that_does_not_answer_is_dead_only_after_silent_for() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let mut dead = None;
        let mut t = 0;
        // Connects timing out after 500 ms each: a slow or unreachable node.
        while dead.is_none() && t < 10_000 {
            dead = w.see(Answer::Silent, at(t0, t), at(t0, t + 500), &cfg());
            t += 550;
        }
        assert!(
            dead.as_deref()
                .is_some_and(|d| d.contains("did not answer for 3250 ms (6 probes)")),
            "{dead:?} at {t}"
        );
        // A silent node that starts refusing (its host is back, PostgreSQL is not) is dead as
        // soon as the refusals fill their own window.
        let cfg = || CrashHoldConfig {
            refused_for: Duration::from_millis(100),
            ..CrashHoldConfig::default()
        };
        let mut w = Window::default();
        assert_eq!(w.see(Answer::Silent, t0, at(t0, 500), &cfg()), None);
        assert_eq!(
            w.see(Answer::Refused, at(t0, 550), at(t0, 551), &cfg()),
            None
        );
        assert!(w
            .see(Answer::Refused, at(t0, 650), at(t0, 651), &cfg())
            .is_some());
    }

    #[test]
    fn the_bound_is_the_clusters_lease_capped_by_max() {
        let mut c = Cluster::build(&crate::snapshot::Snapshot::new(), "/service", "demo").cluster;
        c.ttl = Some(20);
        c.retry_timeout = Some(5);
        assert_eq!(cfg().bound(&c), Duration::from_secs(25));
        c.retry_timeout = None;
        assert_eq!(cfg().bound(&c), Duration::from_secs(30));
        c.ttl = None;
        assert_eq!(cfg().bound(&c), DEFAULT_LEASE);
        let capped = CrashHoldConfig {
            max: Some(Duration::from_secs(12)),
            ..cfg()
        };
        assert_eq!(capped.bound(&c), Duration::from_secs(12));
        assert!(CrashHoldConfig {
            max: Some(Duration::ZERO),
            ..cfg()
        }
        .validate()
        .unwrap_err()
        .contains("failover.crash_hold.max"));
    }
}
