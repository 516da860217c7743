//! A leader change as the fast path follows it: the pass's events (a switchover requested, the
//! leader lost, the leader key moved) fence the old primary; the candidate the leader key names
//! is confirmed through its REST API (or its member key) and HAProxy promoted to it; at start,
//! what an earlier run left is repaired.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::actuator::Job;
use super::confirm;
use super::fence::FenceWhy;
use super::{is_primary_role, lock, Confirmed, Router, Shared, Timeline};
use crate::consumers::haproxy::runtime::Move;
use crate::events::ClusterEvent;
use crate::model::{Cluster, Member};

impl Router {
    /// Acts on one pass's model and events: fences on a switchover request or a lost leader,
    /// starts or confirms the candidate named by the leader key, undoes a cancelled
    /// switchover's fence; at the first pass, repairs what an earlier run left. Returns at once:
    /// HAProxy moves and PgBouncer pauses run in tasks.
    pub fn observe(&mut self, cluster: &Cluster, events: &[ClusterEvent]) {
        if !self.cfg.enabled {
            return;
        }
        let now = Instant::now();
        {
            let mut sh = lock(&self.shared);
            sh.hold_bound = self.cfg.crash_hold.bound(cluster);
            sh.leader_member = cluster.writable_leader().cloned();
        }
        self.who = Some(super::crash::Who::of(cluster));
        for e in events {
            self.on_event(cluster, e, now);
        }
        self.key_moved(cluster, now);
        let mut sh = lock(&self.shared);
        let first = !sh.started;
        sh.started = true;
        // A standby cluster's leader takes no writes: for the write path the cluster has no
        // leader (nothing to confirm, no HAProxy server to bring UP, no drift to report). Its
        // promotion (the `config` key without `standby_cluster`) makes it a leader to confirm
        // like any new one; a demotion takes the leader that took writes out.
        let standby = cluster.standby_leader();
        if self.noted_standby.as_deref() != standby.map(|m| m.name.as_str()) {
            self.noted_standby = standby.map(|m| m.name.clone());
            sh.standby_confirmed = None;
            if let Some(p) = self.standby_probe.take() {
                p.abort();
            }
            if let Some(m) = standby {
                tracing::info!(cluster = %cluster.scope, leader = %m.name, "the leader is a standby leader (a Patroni standby cluster): it takes no writes, so no server takes writes in HAProxy; it serves reads with the replicas");
                self.standby_probe = self.probe_standby(m);
            }
        }
        let Some(m) = cluster.writable_leader() else {
            sh.leader = None;
            let demoted = standby
                .filter(|m| sh.confirmed.as_deref() == Some(m.name.as_str()))
                .map(|m| m.name.clone());
            if demoted.is_some() {
                sh.confirmed = None;
                sh.moved = None;
            }
            drop(sh);
            self.cancel_confirming();
            if let Some(old) = demoted {
                tracing::warn!(cluster = %cluster.scope, leader = %old, "the cluster became a standby cluster: its leader takes no writes any more and leaves the primary backends");
                self.send(Move::Demote { old });
            }
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
            drop(sh);
            self.leader_in_place(cluster, &m.name);
            return;
        }
        if sh.timeline.as_ref().is_none_or(|t| t.new != m.name) || previous.is_none() {
            let timeline = Timeline::begin(&sh, &m.name, now);
            sh.timeline = Some(timeline);
        }
        sh.changing_since.get_or_insert(now);
        drop(sh);
        self.follow(m);
    }

    /// One event of the pass: a switchover request fences the leader that holds the key (a
    /// scheduled one does not), a lost leader key fences its last holder.
    fn on_event(&mut self, cluster: &Cluster, e: &ClusterEvent, now: Instant) {
        match e {
            ClusterEvent::SwitchoverRequested {
                leader,
                scheduled_at: None,
                ..
            } => {
                let old = leader.clone().or_else(|| cluster.leader_name.clone());
                // Only the leader still holding the key steps down; a request naming another is
                // Patroni's to refuse.
                if let Some(old) = old.filter(|o| cluster.leader().is_some_and(|l| l.name == *o)) {
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
                // The leader key still names it (its member key became unusable): it is the
                // leader still, and a leader whose key is present is never fenced.
                if cluster.leader_key.as_deref() == Some(old.as_str()) {
                    tracing::warn!(leader = %old, "the leader key still names this member but its member key is missing or unusable: routing left as it is");
                    return;
                }
                self.fence(old, FenceWhy::LeaderLost);
                lock(&self.shared).confirmed = None;
            }
            _ => {}
        }
    }

    /// The confirmed leader keeps the key: a switchover that was requested and then cleared
    /// with the leader in place undoes its fence.
    fn leader_in_place(&mut self, cluster: &Cluster, leader: &str) {
        let mut sh = lock(&self.shared);
        // Only a switchover's fence: a crash hold on the leader ends when it takes writes.
        let switchover = sh
            .fences
            .get(leader)
            .is_some_and(|f| f.why == FenceWhy::Switchover);
        if cluster.failover.is_some() || !switchover {
            return;
        }
        sh.fences.remove(leader);
        let done = sh.fences.is_empty();
        if done {
            sh.changing_since = None;
        }
        drop(sh);
        tracing::info!(leader = %leader, "switchover request cleared with the leader in place: undoing the drain");
        self.send(Move::Unfence {
            servers: vec![leader.to_owned()],
        });
        if done {
            self.resume_all("switchover cancelled");
        }
    }

    /// A new leader key: confirmed at once when its member key says promoted, else probed
    /// through its REST API until it takes writes.
    fn follow(&mut self, m: &Member) {
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
    pub(super) fn key_moved(&mut self, cluster: &Cluster, now: Instant) {
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
    pub(super) fn repair(&mut self, leader: Option<&Member>) {
        if !self.is_attached() || self.routes.is_empty() {
            return;
        }
        self.send(Move::Repair { leader: None });
        if let Some(m) = leader {
            self.start_confirming(m, true);
        }
    }

    /// Probes a standby leader's `GET /standby-leader` until it answers 200 (the daemon: a
    /// pass follows), for targets with `standby_leader = "follow"`.
    fn probe_standby(&self, m: &Member) -> Option<tokio::task::AbortHandle> {
        let notify = self.notify.clone()?;
        let (member, cfg, shared) = (m.clone(), self.cfg.clone(), Arc::clone(&self.shared));
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + cfg.confirm_timeout;
            let interval = cfg.confirm_interval.max(Duration::from_millis(100));
            match confirm::until_standby_leader(&member, interval, cfg.probe_timeout, deadline)
                .await
            {
                Ok(true) => {
                    lock(&shared).standby_confirmed = Some(member.name.clone());
                    tracing::info!(leader = %member.name, "the standby leader answers /standby-leader: targets with standby_leader = \"follow\" point at it");
                    let _ = notify.send(Confirmed {
                        leader: member.name.clone(),
                    });
                }
                Ok(false) => {}
                Err(e) => tracing::info!("{e}"),
            }
        });
        Some(task.abort_handle())
    }

    /// For `once` (no daemon to wake): probes the leader once if it is not confirmed yet, so
    /// that a one-shot render does not wait for Patroni to rewrite its member key.
    pub async fn confirm_now(&mut self, cluster: &Cluster) {
        if self.notify.is_some() {
            return;
        }
        if let Some(m) = cluster.standby_leader() {
            let answer = confirm::get(m, "/standby-leader", self.cfg.probe_timeout).await;
            if matches!(answer, Ok(Ok((200, _)))) {
                lock(&self.shared).standby_confirmed = Some(m.name.clone());
            }
            return;
        }
        if !self.cfg.enabled || self.gate_open(cluster) {
            return;
        }
        let Some(m) = cluster.writable_leader() else {
            return;
        };
        match confirm::probe(m, self.cfg.probe_timeout).await {
            Ok(confirm::Probe::Writable) => self.confirm(&m.name, "rest", Instant::now()),
            Ok(confirm::Probe::NotYet(why)) => {
                tracing::info!(leader = %m.name, answer = %why, "the leader does not take writes yet")
            }
            Err(e) => tracing::info!("{e}"),
        }
    }

    pub(super) fn cancel_confirming(&mut self) {
        if let Some((_, t)) = self.confirming.take() {
            t.abort();
        }
    }

    /// Probes `m` until it takes writes: then confirms it (a leader change), or, for the
    /// `repair` at start, makes HAProxy agree with it.
    pub(super) fn start_confirming(&mut self, m: &Member, repair: bool) {
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

    pub(super) fn confirm(&mut self, name: &str, by: &'static str, at: Instant) {
        self.core().confirm(name, by, at);
    }

    pub(super) fn core(&mut self) -> Core {
        Core {
            shared: Arc::clone(&self.shared),
            actuator: self.actuator(),
            observers: self.observers.clone(),
        }
    }
}

/// What the confirmation task needs of the router.
pub(super) struct Core {
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) actuator: Option<mpsc::UnboundedSender<Job>>,
    pub(super) observers: super::Observers,
}

impl Core {
    /// Records `name` as confirmed (unless the leader key has moved on) and sends HAProxy its
    /// move, once. Returns whether this confirmation is news.
    pub(super) fn confirm(&self, name: &str, by: &'static str, at: Instant) -> bool {
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
        let hold = sh.hold.take();
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
        if let Some(hold) = &hold {
            let how = if hold.member.name == name {
                super::crash::Ended::Recovered
            } else {
                super::crash::Ended::NewLeader
            };
            super::crash::released(hold, how, Some(name), &self.observers);
        }
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
    pub(super) fn repair(&self, name: &str) {
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
