//! One pass through the stages, in order:
//! - `observe`: every cluster modelled from the snapshot, diffed against the previous pass,
//!   shown to the failover fast path and judged by the guard;
//! - `plan`: which file each `[[template]]` becomes (one, or one per cluster) and which
//!   clusters each sees; which are held for a leader change;
//! - `render`: bytes per planned target, reusing the last render when nothing its template
//!   reads changed;
//! - `commit`: per consumer, its changed files staged, checked, swapped in and the consumer
//!   reloaded once, all or nothing; a consumer whose target fails keeps its last good files
//!   and does not hold the others back;
//! - `report`: what the pass did and what should happen next, handed back to the caller.
//!
//! Every mode (`run`, `once`, `render`, `check`) runs passes through [`Engine`]. The stages below
//! the pass (the guard, the Tera renderer, the consumers, the fast path) each take their own
//! settings type; only the pass reads the whole [`Settings`], with the one-cluster or
//! many-clusters [`Mode`] resolved once.

mod cluster;
mod commit;
mod found;
mod observe;
mod plan;
mod render;
mod report;
mod swap;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub use plan::consumers;
pub use report::{
    ClusterReport, CurrentNames, Next, PassError, PassOutcome, PassReport, PassStats,
};

use crate::config::Settings;
use crate::failover;
use crate::model::Cluster;
use crate::render::{RenderError, Rendered};
use crate::snapshot::Snapshot;
use crate::source::EtcdSettings;
use crate::target::Target;

/// Whether one cluster is followed (`etcd.scope`: the flat template context, unlabelled
/// metrics) or several (`etcd.scopes`, `etcd.discover`). Resolved once from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `etcd.scope`.
    One(String),
    /// `etcd.scopes` or `etcd.discover`.
    Many,
}

impl Mode {
    /// The mode the etcd settings give.
    pub fn of(etcd: &EtcdSettings) -> Mode {
        match etcd.single_scope() {
            Some(s) => Mode::One(s.to_owned()),
            None => Mode::Many,
        }
    }

    /// The one cluster's scope.
    pub fn one(&self) -> Option<&str> {
        match self {
            Mode::One(s) => Some(s),
            Mode::Many => None,
        }
    }

    /// Several clusters.
    pub fn is_many(&self) -> bool {
        matches!(self, Mode::Many)
    }
}

/// What every stage of a pass reads: the settings, with the mode resolved once.
pub(crate) struct Setup {
    settings: Arc<Settings>,
    mode: Mode,
}

impl Setup {
    fn new(settings: Arc<Settings>) -> Setup {
        let mode = Mode::of(&settings.etcd);
        Setup { settings, mode }
    }

    /// Whether the cluster of `scope` has settings (`[clusters.<scope>]`); the one cluster of
    /// `etcd.scope` always has.
    fn configured(&self, scope: &str) -> bool {
        !self.mode.is_many() || self.settings.clusters.contains_key(scope)
    }

    /// Whether the files hold a section for a cluster, so that a refusal of its view must keep
    /// that section (and fail the pass): its view was accepted once, the guard remembers it, or
    /// it is the one cluster of `etcd.scope`.
    fn has_section(&self, accepted: bool, remembered: bool) -> bool {
        accepted || remembered || !self.mode.is_many()
    }

    /// The file of per-cluster template `t` for `scope`: `{scope}` in its `dest` replaced by
    /// the scope's [`crate::model::scope_id`] (a safe file name), and, with several clusters,
    /// named `<template>:<scope id>` in logs, metrics and status.
    fn instance(&self, t: &Target, scope: &str) -> Target {
        let mut instance = t.clone();
        instance.dest = t.dest_for(scope);
        if self.mode.is_many() {
            instance.name = format!("{}:{}", t.name, crate::model::scope_id(scope));
        }
        instance
    }
}

/// The pass runner: the settings, and what is kept between passes about the clusters, the
/// renders and the consumers.
pub struct Engine {
    setup: Arc<Setup>,
    observe: observe::Observe,
    render: render::Renders,
    consumers: commit::Consumers,
    /// The last pass's timings and counts.
    last: PassStats,
}

impl Engine {
    /// Compiles the templates of `settings`.
    pub fn new(settings: Arc<Settings>) -> Result<Self, RenderError> {
        let setup = Arc::new(Setup::new(settings));
        Ok(Engine {
            render: render::Renders::new(&setup.settings.targets)?,
            observe: observe::Observe::new(&setup),
            consumers: commit::Consumers::default(),
            last: PassStats::default(),
            setup,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.setup.settings
    }

    /// Whether one cluster or several are followed.
    pub fn mode(&self) -> &Mode {
        &self.setup.mode
    }

    /// Swaps in new settings and templates (hot reload), keeping what was last applied and
    /// each cluster's fast-path state.
    pub fn replace(&mut self, settings: Arc<Settings>) -> Result<(), RenderError> {
        let setup = Arc::new(Setup::new(settings));
        self.render.replace(&setup.settings.targets)?;
        self.observe.replace(&setup);
        self.consumers = commit::Consumers::default();
        self.setup = setup;
        Ok(())
    }

    /// Connects the failover fast path to the daemon (see [`failover::Router::attach`]);
    /// clusters found later are attached as they appear.
    pub fn attach_router(
        &mut self,
        notify: tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        observers: failover::Observers,
        lag: crate::lag::LagObservers,
    ) {
        self.observe.attach(notify, observers, lag);
    }

    /// The last pass's timings and counts.
    pub fn last_stats(&self) -> &PassStats {
        &self.last
    }

    /// Builds the model of the first cluster (the one of `etcd.scope`), for `render --context`.
    pub fn model(&mut self, snap: &Snapshot) -> Cluster {
        self.observe
            .first_model(&self.setup, snap, self.render.reuse())
    }

    /// Renders the selected targets (all when `only` is None) without the guard: for `render`.
    pub fn render(
        &mut self,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<Vec<Rendered>, RenderError> {
        let models = self.observe.models(&self.setup, snap, self.render.reuse());
        plan::select(&self.setup.settings.targets, only)?;
        plan::plan(&self.setup, &models, &models, &models, &[])
            .iter()
            .filter(|(p, _)| only.is_none_or(|n| n == p.base))
            .map(|(p, view)| self.render.render_planned(&self.setup, p, view))
            .collect()
    }

    /// The context each selected target (all when `only` is None) would be rendered with, as
    /// JSON, by target name: for `render --context`.
    pub fn contexts(
        &mut self,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<Vec<(String, serde_json::Value)>, RenderError> {
        let models = self.observe.models(&self.setup, snap, self.render.reuse());
        plan::select(&self.setup.settings.targets, only)?;
        Ok(plan::plan(&self.setup, &models, &models, &models, &[])
            .iter()
            .filter(|(p, _)| only.is_none_or(|n| n == p.base))
            .map(|(p, view)| {
                let json = render::with_view(&self.setup, p, view, |v| {
                    serde_json::to_value(crate::render::context(v, &p.target))
                        .unwrap_or(serde_json::Value::Null)
                });
                (p.target.name.clone(), json)
            })
            .collect())
    }

    /// What the guard would say of `snap` on its own (no memory of an earlier view): the first
    /// cluster it refuses, if any. For `check` and `render`, which apply nothing.
    pub fn guard_refusal(&mut self, snap: &Snapshot) -> Option<crate::guard::GuardError> {
        let models = self.observe.models(&self.setup, snap, self.render.reuse());
        self.refusal_of(&models)
    }

    /// The first of `models` the guard refuses on its own.
    fn refusal_of(&self, models: &observe::ByScope) -> Option<crate::guard::GuardError> {
        models
            .iter()
            .flat_map(|(_, groups)| groups)
            .find_map(|c| crate::guard::check(&self.setup.settings.guard, c, None).err())
    }

    /// At start: every consumer onto the files haconfd manages. A HAProxy whose current worker
    /// started before its file was last written (`once --no-reload`, a run stopped between swap
    /// and reload) is reloaded by the next pass, as after a failed reload, with its server state
    /// prepared. Of other consumers haconfd cannot tell, and says so.
    pub async fn catch_up(&mut self) {
        use crate::consumers::haproxy::loaded::{has_loaded, Loaded};
        use crate::consumers::reload::Reload;
        let settings = Arc::clone(&self.setup.settings);
        for t in settings.targets.iter().filter(|t| !t.per_cluster) {
            if !t.consumer.is_told(t.reload.as_ref()) || !t.dest.exists() {
                continue;
            }
            let master = match &t.reload {
                Some(Reload::Signal { master_socket, .. }) => master_socket.as_deref(),
                Some(Reload::MasterSocket { path, .. }) => Some(path.as_path()),
                _ => None,
            };
            let stats = t.server_state().map(|s| s.stats_socket.as_path());
            if master.is_none() && stats.is_none() {
                tracing::info!(target = %t.name, dest = %t.dest.display(), "cannot tell whether its consumer has read this file: if it was written without a reload (once --no-reload), reload the consumer once");
                continue;
            }
            match has_loaded(&t.dest, master, stats).await {
                Loaded::Yes => self.runs_its_servers(t).await,
                Loaded::No {
                    worker_up,
                    file_age,
                } => {
                    tracing::info!(target = %t.name, dest = %t.dest.display(), worker_up_s = worker_up.as_secs(), file_age_s = file_age.as_secs(), "HAProxy's worker has not read this file as it is on disk: reloading it");
                    self.consumers.mark_unread(&t.name);
                }
                Loaded::Unknown(why) => {
                    tracing::info!(target = %t.name, reason = %why, "cannot tell whether HAProxy has read this file (not running yet?)");
                }
            }
        }
    }

    /// At start, for a HAProxy whose member changes go through its runtime API: its live
    /// servers must be the file's. An earlier run stopped in the middle of a member change (a
    /// server added or deleted, the file not yet swapped or HAProxy not yet told) leaves them
    /// apart; the first pass then reloads it onto the file, as after a failed reload.
    async fn runs_its_servers(&mut self, t: &Target) {
        use crate::consumers::haproxy::membership::{self, Layout};
        use crate::consumers::haproxy::settings::Membership;
        let Some(ss) = t
            .server_state()
            .filter(|s| s.membership == Membership::Runtime)
        else {
            return;
        };
        let dest = t.dest.clone();
        let Ok(Some(text)) = swap::blocking(move || crate::apply::current(&dest)).await else {
            return;
        };
        let layout = Layout::parse(&String::from_utf8_lossy(&text));
        if let Err(why) = membership::verify(&ss.stats_socket, &layout).await {
            tracing::warn!(target = %t.name, dest = %t.dest.display(), reason = %why, "HAProxy's live servers are not the file's (an earlier run stopped in a member change?): reloading it");
            self.consumers.mark_unread(&t.name);
        }
    }

    /// Renders, stages into `scratch` and runs every check without touching any destination: for
    /// `check`. Every target is checked; the first failure (in config order) is returned, the
    /// others logged. Errors name the target's real destination, not the scratch copy.
    pub async fn check_only(
        &mut self,
        snap: &Snapshot,
        scratch: &Path,
    ) -> Result<Vec<String>, PassError> {
        let models = self.observe.models(&self.setup, snap, self.render.reuse());
        if let Some(e) = self.refusal_of(&models) {
            return Err(e.into());
        }
        let plan = plan::plan(&self.setup, &models, &models, &models, &[]);
        let mut names = Vec::new();
        let mut failures = Vec::new();
        for (i, (p, view)) in plan.iter().enumerate() {
            let r = self.render.render_planned(&self.setup, p, view);
            match swap::check_one(&p.target, r, &scratch.join(i.to_string())).await {
                Ok(()) => names.push(p.target.name.clone()),
                Err(e) => failures.push((i, e)),
            }
        }
        let targets: Vec<Target> = plan.into_iter().map(|(p, _)| p.target).collect();
        swap::first_failure(&targets, failures).map_or(Ok(names), Err)
    }

    /// One full pass. `reload` false writes files but signals nothing.
    ///
    /// Every cluster is modelled and judged by the guard on its own: a refused or leaderless
    /// cluster keeps its last good section while the others update. Targets are applied per
    /// consumer (see [`consumers`]): the targets of one consumer are staged, checked, swapped in
    /// and reloaded together, all or nothing, and once however many of its files or clusters
    /// changed; a consumer whose target does not render or is refused by its check keeps its
    /// last good files without holding the others back. The pass fails if any cluster was
    /// refused or any consumer failed: the error is the first failure, the others are logged,
    /// and [`Engine::last_stats`] tells what was applied.
    pub async fn pass(&mut self, snap: &Snapshot, reload: bool) -> Result<PassOutcome, PassError> {
        let started = Instant::now();
        let mut stats = PassStats::default();
        let reuse = self.render.reuse();
        let observed = self
            .observe
            .pass(&self.setup, snap, reuse, &mut stats)
            .await;
        self.finish(observed, reload, started, stats).await.result
    }

    /// [`Engine::pass`] on the source's shared snapshot, let go of once every cluster is
    /// modelled (the source applies etcd's events to it in place while no pass holds it, and a
    /// pass holding it across its awaits would make the source copy the whole store at every
    /// event meanwhile), returning the whole report.
    pub async fn pass_shared(&mut self, snap: Arc<Snapshot>, reload: bool) -> PassReport {
        let started = Instant::now();
        let mut stats = PassStats::default();
        let reuse = self.render.reuse();
        let observed = self
            .observe
            .pass(&self.setup, &snap, reuse, &mut stats)
            .await;
        drop(snap);
        self.finish(observed, reload, started, stats).await
    }

    /// The rest of a pass once every cluster is observed, and its report.
    async fn finish(
        &mut self,
        observed: Result<observe::Observed, PassError>,
        reload: bool,
        started: Instant,
        mut stats: PassStats,
    ) -> PassReport {
        let result = match observed {
            Ok(seen) => self.apply(seen, reload, started, &mut stats).await,
            Err(e) => Err(e),
        };
        self.last = stats.clone();
        PassReport {
            result,
            stats,
            clusters: self.observe.take_reports(),
            multi: self.setup.mode.is_many(),
            targets: self
                .setup
                .settings
                .targets
                .iter()
                .map(|t| t.name.clone())
                .collect(),
        }
    }

    /// The second half of a pass: the plan, then each consumer in turn (PgBouncer first).
    async fn apply(
        &mut self,
        seen: observe::Observed,
        reload: bool,
        started: Instant,
        stats: &mut PassStats,
    ) -> Result<PassOutcome, PassError> {
        let views = self.observe.views(&self.setup, stats);
        let plan = plan::Plan::build(&self.setup, &views, &seen, stats);
        stats.render = started.elapsed();
        let defer_haproxy = self.observe.defers_reloads();
        let mut run = commit::Run::new(&plan, &seen, &views);
        self.consumers.sweep_once(&plan);
        for group in plan.consumer_groups() {
            if !run.admits(&group, defer_haproxy, stats) {
                continue;
            }
            let t0 = Instant::now();
            self.render
                .render_targets(&self.setup, &plan, &group, &mut run.rendered, stats);
            run.render_time += t0.elapsed();
            if !run
                .swap(&group, &self.setup, &mut self.consumers, reload)
                .await
            {
                continue;
            }
            if reload {
                run.reload(&group, &self.setup, &mut self.consumers).await;
            }
            // A PgBouncer now reading a file for the confirmed leader: resume it.
            for base in run.settled_pgbouncers(&group) {
                self.observe.pgbouncer_settled(&base).await;
            }
        }
        run.finish(&self.setup, &mut self.consumers, stats).await;
        stats.failed.extend(
            self.observe
                .refused_with_section(&self.setup)
                .map(|id| (report::cluster_subject(id), PassError::GUARD)),
        );
        run.result(seen.refusals)
    }

    /// Undoes what the fast path holds on HAProxy and PgBouncer (fences, pauses), for a
    /// graceful stop; the caller bounds it.
    pub async fn shutdown(&mut self) {
        self.observe.shutdown().await;
    }

    /// Whether a pass may reuse what did not change: members parsed from the same values, and a
    /// target's last render when nothing its template sees changed (the default). Off, every
    /// pass parses every member and renders every target, as haconfd did before: for benchmarks
    /// that compare the two.
    pub fn set_reuse_renders(&mut self, on: bool) {
        self.render.set_reuse(on);
    }
}
