//! What a pass keeps about one Patroni cluster (or Citus group) from one pass to the next.

use std::sync::Arc;

use super::Setup;
use crate::events::{ClusterEvent, Differ};
use crate::failover::Router;
use crate::guard::{self, GuardError};
use crate::lag::LagWatch;
use crate::model::{Cluster, ClusterId, MemberCache, Skipped};

/// What haconfd keeps about one Patroni cluster (or Citus group) from one pass to the next: the
/// members already parsed, the keys it warned about, the previous model's events, the failover
/// fast path's state, and the views that the files hold.
pub(super) struct ClusterState {
    /// Members parsed by earlier passes: a heartbeat parses one member, not all.
    pub(super) parsed_members: MemberCache,
    /// The keys skipped by the last model, logged again only when they change.
    pub(super) last_skipped: Vec<Skipped>,
    /// Turns the previous pass's model and this one into [`PassStats::events`].
    pub(super) differ: Differ,
    /// The failover fast path: HAProxy moves, PgBouncer pauses, the confirmation gate.
    pub(super) router: Router,
    /// Lag-aware replicas: drains in the replica backends.
    pub(super) lag: LagWatch,
    /// The model the last pass saw.
    pub(super) seen: Option<Arc<Cluster>>,
    /// The model `parsed_members` was last built into: kept while nothing of it changes.
    pub(super) built: Option<Arc<Cluster>>,
    /// The last view the guard accepted: what this cluster's section is rendered from.
    pub(super) accepted: Option<Arc<Cluster>>,
    /// The last accepted view with a leader confirmed to take writes: what `require_leader`
    /// targets render this cluster from when several clusters are followed.
    pub(super) led: Option<Arc<Cluster>>,
    /// [`ClusterState::led`] for targets with `standby_leader = "follow"`: a standby leader
    /// confirmed through `/standby-leader` counts too.
    pub(super) led_follow: Option<Arc<Cluster>>,
    /// Why the guard refused the last view.
    pub(super) refused: Option<GuardError>,
    /// Whether its appearance was logged (several clusters).
    pub(super) announced: bool,
    /// Events of the last pass.
    pub(super) events: Vec<ClusterEvent>,
    /// Since when the store has shown no leader or member key of it (discovered clusters).
    pub(super) absent_since: Option<std::time::Instant>,
}

impl ClusterState {
    pub(super) fn new(setup: &Setup, id: &ClusterId) -> ClusterState {
        let s = &setup.settings;
        let router = match setup.mode.one() {
            Some(_) if id.group.is_none() => Router::new(&s.failover, &s.targets),
            _ => Router::for_cluster(
                &s.failover,
                &s.targets,
                Some((id, s.clusters.get(&id.scope))),
            ),
        };
        // A Citus group's servers share backends with the other groups: no lag drains there.
        let lag_targets = match id.group {
            None => s.targets.as_slice(),
            Some(_) => &[],
        };
        let lag_cfg = (s.clusters.get(&id.scope))
            .and_then(|c| c.lag.as_ref())
            .unwrap_or(&s.lag);
        let lag = LagWatch::new(
            lag_cfg,
            s.failover.probe_timeout,
            lag_targets,
            &id.scope,
            setup.mode.is_many(),
        );
        ClusterState {
            lag,
            parsed_members: MemberCache::default(),
            last_skipped: Vec::new(),
            differ: Differ::default(),
            router,
            seen: None,
            built: None,
            accepted: None,
            led: None,
            led_follow: None,
            refused: None,
            announced: false,
            events: Vec::new(),
            absent_since: None,
        }
    }

    /// The leader gate for `c`: None when `c` has no leader, else whether the fast path lets
    /// `require_leader` targets point at it (confirmed to take writes).
    pub(super) fn leader_gate(&self, c: &Cluster) -> Option<bool> {
        c.leader().map(|_| self.router.gate_open(c))
    }

    /// [`ClusterState::leader_gate`] for targets with `standby_leader = "follow"`.
    pub(super) fn follow_gate(&self, c: &Cluster) -> Option<bool> {
        c.leader().map(|_| self.router.follow_gate_open(c))
    }

    /// Whether the files hold a section for this cluster (see [`Setup::has_section`]).
    pub(super) fn has_section(&self, setup: &Setup, memory: &guard::Memory) -> bool {
        let remembered = self.seen.as_ref().is_some_and(|c| memory.knows(c));
        setup.has_section(self.accepted.is_some(), remembered)
    }
}
