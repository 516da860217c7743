//! What a pass hands back: its result ([`PassOutcome`] or the first [`PassError`]), its timings
//! and counts ([`PassStats`]) and every cluster as it saw it ([`ClusterReport`]), together a
//! [`PassReport`] that says what should happen next ([`PassReport::next`]): the daemon hands
//! that to its pacer, status, metrics and hooks, and reads nothing of the engine.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::consumers::reload::ReloadError;
use crate::events::ClusterEvent;
use crate::failover;
use crate::files::ApplyError;
use crate::guard::GuardError;
use crate::model::{Cluster, ClusterId};
use crate::render::RenderError;

/// Why a pass failed: the first failure in config order. Every variant leaves the failed
/// target's last good file in place; other consumers' targets may have been applied (see
/// [`PassStats::outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The guard refused the view.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// A template did not render.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Staging, checking or swapping failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Files were swapped in but a reload failed.
    #[error("{target}: file updated but reload failed: {source}")]
    Reload {
        /// Target name.
        target: String,
        /// Cause.
        source: ReloadError,
    },
}

impl PassError {
    /// A short reason label for metrics and exit codes.
    pub fn reason(&self) -> &'static str {
        match self {
            PassError::Guard(_) => PassError::GUARD,
            PassError::Render(RenderError::NoLeader { .. }) => PassError::NO_LEADER,
            PassError::Render(_) => "render",
            PassError::Apply(ApplyError::Check { .. }) => "check",
            PassError::Apply(_) => "write",
            PassError::Reload { .. } => "reload",
        }
    }

    /// A cluster between leaders: an outage to ride out, which the leader key's next change
    /// ends (no retry timer needed for it).
    pub fn is_leaderless(&self) -> bool {
        matches!(self, PassError::Render(RenderError::NoLeader { .. }))
    }
}

/// What a successful pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Targets whose file was replaced.
    pub written: Vec<String>,
    /// Targets whose consumer was reloaded.
    pub reloaded: Vec<String>,
    /// Targets whose member changes reached HAProxy through its runtime API, without a reload.
    pub runtime: Vec<String>,
    /// Targets whose member changes HAProxy's runtime API did not take (a refused command, a
    /// live server list unlike the file): reloaded instead.
    pub fallbacks: Vec<String>,
}

impl PassOutcome {
    /// True when nothing was written.
    pub fn is_noop(&self) -> bool {
        self.written.is_empty()
    }
}

/// Timings and counts of the last pass, for logs, metrics and status.
#[derive(Debug, Clone, Default)]
pub struct PassStats {
    /// Time spent rendering.
    pub render: Duration,
    /// Time spent staging, checking, swapping and reloading.
    pub apply: Duration,
    /// Targets rendered (the others reused their last render: nothing they see changed).
    pub rendered: Vec<String>,
    /// What the pass wrote and reloaded, also when it failed for another target.
    pub outcome: PassOutcome,
    /// Targets that failed (render, check, write or reload) and kept their last good files,
    /// each with its reason label.
    pub failed: Vec<(String, &'static str)>,
    /// What changed in the cluster since the previous pass's model, also when this pass was
    /// refused (guard, no leader, a failed check).
    pub events: Vec<ClusterEvent>,
    /// `require_leader` targets kept as they are because the leader key's holder is not yet
    /// confirmed to take writes (the failover fast path; a pass follows the confirmation).
    pub awaiting: Vec<String>,
    /// Clusters with no leader now whose sections in `require_leader` templates keep their
    /// last leader (several clusters).
    pub leaderless: Vec<String>,
    /// Discovered clusters the store no longer shows, timed by `guard.gone_after` before they
    /// are forgotten: a pass must come when their time is up.
    pub forgetting: usize,
}

/// One cluster (or Citus group) as the last pass left it, for status, metrics and hooks.
#[derive(Debug, Clone)]
pub struct ClusterReport {
    /// Which cluster.
    pub id: ClusterId,
    /// What etcd shows, accepted or not.
    pub model: Arc<Cluster>,
    /// Events of the last pass.
    pub events: Vec<ClusterEvent>,
    /// Why the guard refused the last view (the files keep the cluster's last good section).
    pub refused: Option<String>,
    /// Whether `[clusters.<scope>]` is configured (always true with `etcd.scope`).
    pub configured: bool,
    /// The cluster's last leader change, as its fast path handled it.
    pub failover: failover::TimelineView,
    /// Its replicas' replay lag and lag drains, as the lag watcher last saw them.
    pub lag: Vec<crate::lag::ReplicaLag>,
}

/// What the daemon does after a pass: the stage says, the loop owns the timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing is owed: the next pass comes with the next change.
    AwaitChange,
    /// Something failed or waits (a target held for a confirmation that may never come): run
    /// again after the retry interval.
    Retry,
}

/// One pass as the daemon, status, metrics and hooks see it.
#[derive(Debug)]
pub struct PassReport {
    /// Applied, or the first failure.
    pub result: Result<PassOutcome, PassError>,
    /// Timings and counts.
    pub stats: PassStats,
    /// Every cluster (each Citus group) the pass saw, in order; the first is the one cluster of
    /// `etcd.scope`.
    pub clusters: Vec<ClusterReport>,
    /// Whether several clusters are followed (`etcd.scopes` or `etcd.discover`).
    pub multi: bool,
    /// Every target's name, in config order.
    pub targets: Vec<String>,
}

/// The name a refused cluster's failures are counted under in status and metrics.
pub fn cluster_subject(id: &ClusterId) -> String {
    format!("cluster {id}")
}

/// The names counters may stay under after a pass (see [`PassReport::current_names`]).
pub struct CurrentNames<'a> {
    report: &'a PassReport,
    /// Each cluster's id (`scope` or `scope/group`) and its file-name form, made at the first
    /// name that is not a configured target (most passes have none).
    clusters: std::cell::OnceCell<HashSet<String>>,
}

impl CurrentNames<'_> {
    /// Whether `name` (`*`, a target, `<target>:<scope id>` or `cluster <id>`) still exists.
    pub fn contains(&self, name: &str) -> bool {
        let targets = &self.report.targets;
        if name == "*" || targets.iter().any(|t| t == name) {
            return true;
        }
        let clusters = self.clusters.get_or_init(|| {
            self.report
                .clusters
                .iter()
                .flat_map(|r| [r.id.to_string(), crate::model::scope_id(&r.id.scope)])
                .collect()
        });
        if let Some(id) = name.strip_prefix("cluster ") {
            return clusters.contains(id);
        }
        targets.iter().any(|t| {
            name.strip_prefix(t.as_str())
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|id| clusters.contains(id))
        })
    }
}

impl PassReport {
    /// The names counters may be kept under after this pass: `*`, every configured target, and
    /// for each cluster the pass saw, its files (`<target>:<scope id>`) and its refusals
    /// (`cluster <id>`). A forgotten cluster's names go with it: kept, they would pile up
    /// with every cluster created and deleted (about 1.5 KB each in status and metrics).
    pub fn current_names(&self) -> CurrentNames<'_> {
        CurrentNames {
            report: self,
            clusters: std::cell::OnceCell::new(),
        }
    }

    /// Whether the pass wrote a file, also when it failed for another target (a failed reload
    /// wrote its file).
    pub fn wrote(&self) -> bool {
        !self.stats.outcome.is_noop() || matches!(self.result, Err(PassError::Reload { .. }))
    }

    /// A leaderless spell and nothing else: it ends with an etcd event (the leader key).
    pub fn is_leaderless(&self) -> bool {
        self.result
            .as_ref()
            .err()
            .is_some_and(PassError::is_leaderless)
    }

    /// What should happen next. Targets held for a leader change wait for the confirmation's
    /// own pass, with the retry as the backstop should it never come (the hold ends at
    /// `failover.confirm_timeout`); a leaderless spell waits for the leader key; any other
    /// failure, also in the same pass, needs the retry timer.
    pub fn next(&self) -> Next {
        let retry = match &self.result {
            Ok(_) => !self.stats.awaiting.is_empty() || self.stats.forgetting > 0,
            Err(e) if e.is_leaderless() => {
                !self.stats.awaiting.is_empty()
                    || self.stats.forgetting > 0
                    || !self
                        .stats
                        .failed
                        .iter()
                        .all(|(_, r)| *r == PassError::NO_LEADER)
            }
            Err(_) => true,
        };
        if retry {
            Next::Retry
        } else {
            Next::AwaitChange
        }
    }

    /// The model of the first cluster (the one cluster of `etcd.scope`).
    pub fn first_cluster(&self) -> Option<&Arc<Cluster>> {
        self.clusters.first().map(|r| &r.model)
    }

    /// The cluster a `pass_failed` hook names: the one the guard refused, else the first.
    pub fn failed_cluster(&self) -> Option<&Arc<Cluster>> {
        self.clusters
            .iter()
            .find(|r| r.refused.is_some())
            .map(|r| &r.model)
            .or(self.first_cluster())
    }

    /// The first cluster's last leader change, live.
    pub fn timeline(&self) -> failover::TimelineView {
        self.clusters
            .first()
            .map(|r| r.failover.clone())
            .unwrap_or_default()
    }
}

impl PassError {
    /// The reason label of a leaderless target.
    pub const NO_LEADER: &'static str = "no_leader";
    /// The reason label of a refused view.
    pub const GUARD: &'static str = "guard";
}
