//! Fences: the old primary drained in the primary backends while a leader change is under way,
//! each with its reason and its bound, lifted by the watchdog when the bound passes; and the
//! PgBouncer pauses that go with them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::actuator::Job;
use super::{lock, unix_now, Observers, Router, Shared};
use crate::consumers::haproxy::runtime::Move;
use crate::consumers::pgbouncer::Pause;

/// Why a server is fenced; each has its own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FenceWhy {
    /// A switchover was requested and the leader key has not moved yet: `fence_timeout`.
    Switchover,
    /// The leader key went away: `confirm_timeout`.
    LeaderLost,
    /// The fenced leader's key has moved to another member: `confirm_timeout`.
    KeyMoved,
    /// The leader's PostgreSQL is down (the crash hold): the cluster's lease.
    Crash,
}

impl FenceWhy {
    pub(super) fn text(self) -> &'static str {
        match self {
            FenceWhy::Switchover => "switchover requested",
            FenceWhy::LeaderLost => "leader lost",
            FenceWhy::KeyMoved => "leader key moved",
            FenceWhy::Crash => "primary down",
        }
    }
}

/// A server haconfd drained.
#[derive(Debug, Clone)]
pub(super) struct Fence {
    pub(super) why: FenceWhy,
    pub(super) since: Instant,
    pub(super) since_unix: f64,
    /// Lifted then unless the change has ended.
    pub(super) until: Instant,
}

impl Router {
    /// Drains `old` (once) with the bound its reason gives, and pauses every PgBouncer.
    pub(super) fn fence(&mut self, old: &str, why: FenceWhy) {
        let now = Instant::now();
        let bound = match why {
            FenceWhy::Switchover => self.cfg.fence_timeout,
            FenceWhy::LeaderLost | FenceWhy::KeyMoved => self.cfg.confirm_timeout,
            FenceWhy::Crash => lock(&self.shared).hold_bound,
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
    pub(super) fn wake_watchdog(&mut self) {
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

    pub(super) fn resume_all(&self, why: &str) {
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

    pub(super) fn record_pgbouncer(&self) {
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
}

/// Ends every pause in its own task (the caller does not wait).
pub(super) fn resume_pauses(pauses: Vec<Pause>, why: String) {
    for p in pauses {
        let why = why.clone();
        tokio::spawn(async move {
            if let Err(e) = p.end(&why).await {
                tracing::warn!(error = %e, "cannot resume PgBouncer; its pause deadline will");
            }
        });
    }
}

/// Lifts each fence at its bound: a switchover request whose leader key did not move within
/// `fence_timeout`, a lost leader not replaced by a confirmed one within `confirm_timeout`.
/// When no fence is left, the PgBouncer pauses they began end too.
pub(super) async fn watchdog(
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
        let (expired, none_left, hold) = {
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
            let hold = match &sh.hold {
                Some(h) if expired.iter().any(|(s, _)| *s == h.member.name) => sh.hold.take(),
                _ => None,
            };
            (expired, none_left, hold)
        };
        if let Some(hold) = &hold {
            super::crash::released(hold, super::crash::Ended::Bound, None, &observers);
        }
        if expired.is_empty() {
            continue;
        }
        for (server, f) in &expired {
            // A crash hold at its bound is counted as such (`haconfd_crash_holds_total`), not
            // twice.
            if let Some(c) = observers
                .fences_expired
                .as_ref()
                .filter(|_| f.why != FenceWhy::Crash)
            {
                c.inc();
            }
            let lasted = humantime::format_duration(Duration::from_millis(
                now.saturating_duration_since(f.since).as_millis() as u64,
            ));
            match f.why {
                // Logged by the hold's release.
                FenceWhy::Crash => {}
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
