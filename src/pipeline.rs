//! One pass through the stages: snapshot → model → guard → render every target (reusing the last
//! render when nothing a template sees changed) → per consumer: stage and check its changed
//! files, swap them in, reload it once. A consumer whose target fails keeps its last good files
//! and is not reloaded; the other consumers go ahead. Every mode runs passes through [`Engine`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::{self, ApplyError};
use std::path::PathBuf;

use crate::config::Settings;
use crate::consumers::haproxy::server_state;
use crate::consumers::reload::ReloadError;
use crate::events::{ClusterEvent, Differ};
use crate::failover::{self, Router};
use crate::guard::{self, GuardError};
use crate::model::{self, Cluster, ClusterId, MemberCache, Skipped};
use crate::render::{RenderError, Rendered, Renderer, ScopeView, View};
use crate::snapshot::Snapshot;
use crate::source::Clusters;
use crate::target::{ClusterSettings, Target};

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
            PassError::Guard(_) => "guard",
            PassError::Render(RenderError::NoLeader { .. }) => "no_leader",
            PassError::Render(_) => "render",
            PassError::Apply(ApplyError::Check { .. }) => "check",
            PassError::Apply(_) => "write",
            PassError::Reload { .. } => "reload",
        }
    }
}

/// What a successful pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Targets whose file was replaced.
    pub written: Vec<String>,
    /// Targets whose consumer was reloaded.
    pub reloaded: Vec<String>,
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
}

/// A target's last render, kept to skip the next one when nothing its template sees changed.
#[derive(Debug, Clone)]
struct CachedRender {
    /// Every model the render saw, in the order of its view.
    view: Vec<Arc<Cluster>>,
    rendered: Arc<Rendered>,
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
}

/// The pass runner, holding compiled templates and what was last applied.
pub struct Engine {
    settings: Arc<Settings>,
    renderer: Renderer,
    /// The guard's memory of the views it accepted.
    memory: guard::Memory,
    /// What is kept about each cluster (each Citus group) between passes.
    clusters: std::collections::BTreeMap<ClusterId, ClusterState>,
    /// Whether leftovers of earlier runs were swept (first writing pass; `render` and `check`
    /// never touch the destination directories).
    swept: bool,
    /// Targets whose last reload failed: reloaded on the next pass even if unchanged.
    unreloaded: std::collections::BTreeSet<String>,
    /// Each target's last render and the cluster it was rendered from.
    renders: std::collections::HashMap<String, CachedRender>,
    /// Whether unchanged views reuse the last render (see [`Engine::set_reuse_renders`]).
    reuse_renders: bool,
    /// Targets whose server-state file holds etcd's view of their current render.
    state_synced: std::collections::BTreeSet<String>,
    /// Timings of the last pass.
    pub stats: PassStats,
    /// The model the last pass saw of the first cluster (the one cluster of `etcd.scope`),
    /// accepted or refused: what etcd shows, for status and metrics.
    pub cluster: Option<Arc<Cluster>>,
    /// Every cluster the last pass saw.
    pub reports: Vec<ClusterReport>,
    /// Whether the PgBouncer pauses an earlier run left were looked for (the first pass of
    /// the daemon).
    repaired: bool,
    /// Where the fast path reports confirmations, for routers of clusters found later.
    attach: Option<(
        tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        failover::Observers,
    )>,
}

/// What haconfd keeps about one Patroni cluster (or Citus group) from one pass to the next: the
/// members already parsed, the keys it warned about, the previous model's events, the failover
/// fast path's state, and the views that the files hold.
struct ClusterState {
    /// Members parsed by earlier passes: a heartbeat parses one member, not all.
    parsed_members: MemberCache,
    /// The keys skipped by the last model, logged again only when they change.
    last_skipped: Vec<Skipped>,
    /// Turns the previous pass's model and this one into [`PassStats::events`].
    differ: Differ,
    /// The failover fast path: HAProxy moves, PgBouncer pauses, the confirmation gate.
    router: Router,
    /// The model the last pass saw.
    seen: Option<Arc<Cluster>>,
    /// The model `parsed_members` was last built into: kept while nothing of it changes.
    built: Option<Arc<Cluster>>,
    /// The last view the guard accepted: what this cluster's section is rendered from.
    accepted: Option<Arc<Cluster>>,
    /// The last accepted view with a leader confirmed to take writes: what `require_leader`
    /// targets render this cluster from when several clusters are followed.
    led: Option<Arc<Cluster>>,
    /// Why the guard refused the last view.
    refused: Option<GuardError>,
    /// Whether its appearance was logged (several clusters).
    announced: bool,
}

impl ClusterState {
    fn new(settings: &Settings, id: &ClusterId) -> ClusterState {
        let router = match settings.etcd.single_scope() {
            Some(_) if id.group.is_none() => Router::new(&settings.failover, &settings.targets),
            _ => Router::for_cluster(
                &settings.failover,
                &settings.targets,
                Some((id, settings.clusters.get(&id.scope))),
            ),
        };
        ClusterState {
            parsed_members: MemberCache::default(),
            last_skipped: Vec::new(),
            differ: Differ::default(),
            router,
            seen: None,
            built: None,
            accepted: None,
            led: None,
            refused: None,
            announced: false,
        }
    }
}

/// One target as a pass applies it: a `[[template]]`, or one cluster's file of a per-cluster
/// template, with what it renders.
struct Planned {
    target: Target,
    /// The scope of a per-cluster file.
    scope: Option<String>,
    /// The `[[template]]` it comes from (the fast path knows PgBouncer by that name).
    base: String,
    /// The file of a cluster that is gone: removed (its consumer reloaded), not rendered.
    remove: bool,
}

impl Engine {
    /// Compiles the templates of `settings`.
    pub fn new(settings: Arc<Settings>) -> Result<Self, RenderError> {
        let renderer = Renderer::load(&settings.targets)?;
        let memory = guard::Memory::load(&settings.guard);
        Ok(Self {
            settings,
            renderer,
            memory,
            clusters: Default::default(),
            unreloaded: Default::default(),
            swept: false,
            renders: Default::default(),
            reuse_renders: true,
            state_synced: Default::default(),
            stats: PassStats::default(),
            cluster: None,
            reports: Vec::new(),
            repaired: false,
            attach: None,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Swaps in new settings and templates (hot reload), keeping what was last applied.
    pub fn replace(&mut self, settings: Arc<Settings>) -> Result<(), RenderError> {
        self.renderer = Renderer::load(&settings.targets)?;
        for (id, st) in &mut self.clusters {
            let mut fresh = ClusterState::new(&settings, id);
            fresh.router.take_state_from(&mut st.router);
            st.router = fresh.router;
        }
        self.settings = settings;
        self.swept = false;
        self.renders.clear();
        self.state_synced.clear();
        Ok(())
    }

    /// Connects the failover fast path to the daemon (see [`Router::attach`]); clusters found
    /// later are attached as they appear.
    pub fn attach_router(
        &mut self,
        notify: tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        observers: failover::Observers,
    ) {
        self.attach = Some((notify.clone(), observers.clone()));
        for st in self.clusters.values_mut() {
            st.router.attach(notify.clone(), observers.clone());
        }
    }

    /// The last leader change as the fast path handled it, live: the first cluster's (the one
    /// cluster of `etcd.scope`).
    pub fn failover_timeline(&self) -> failover::TimelineView {
        self.clusters
            .values()
            .next()
            .map(|st| st.router.view())
            .unwrap_or_default()
    }

    /// The clusters to model this pass: those the config names (or every one under the
    /// namespace), each ordinary cluster once and a Citus cluster once per group; with the ones
    /// known from earlier passes or the guard's memory that the store no longer shows, for the
    /// guard to judge.
    fn cluster_ids(&self, snap: &Snapshot) -> Vec<ClusterId> {
        let ns = &self.settings.etcd.namespace;
        let found = match &self.settings.etcd.clusters {
            Clusters::One(scope) => model::layouts(snap, ns, Some(std::slice::from_ref(scope))),
            Clusters::List(scopes) => model::layouts(snap, ns, Some(scopes)),
            Clusters::Discover => model::layouts(snap, ns, None),
        };
        let mut ids: std::collections::BTreeSet<ClusterId> = std::collections::BTreeSet::new();
        for (scope, layout) in &found {
            // This scope's clusters from earlier passes: one ordered range of the map.
            let known: Vec<&ClusterId> = self
                .clusters
                .range(ClusterId::plain(scope)..)
                .map(|(k, _)| k)
                .take_while(|k| k.scope == *scope)
                .collect();
            if layout == &model::Layout::default() && !known.is_empty() {
                ids.extend(known.into_iter().cloned());
                continue;
            }
            let now = layout.ids(scope);
            // A Citus group that went away stays, for the guard to judge.
            let citus = now.iter().any(|i| i.group.is_some());
            ids.extend(
                known
                    .into_iter()
                    .filter(|k| k.group.is_some() == citus)
                    .cloned(),
            );
            ids.extend(now);
        }
        if matches!(self.settings.etcd.clusters, Clusters::Discover) {
            // Clusters whose keys are all gone: still followed until the guard lets them go.
            for id in self.clusters.keys() {
                if !found.contains_key(&id.scope) {
                    ids.insert(id.clone());
                }
            }
            for (scope, group) in self.memory.remembered(ns) {
                if !found.contains_key(scope) {
                    ids.insert(ClusterId {
                        scope: scope.to_owned(),
                        group,
                    });
                }
            }
        }
        ids.into_iter().collect()
    }

    /// Builds one cluster's model and logs skipped keys when the set of them changes (not on
    /// every heartbeat).
    fn model_of(&mut self, snap: &Snapshot, id: &ClusterId) -> Arc<Cluster> {
        let settings = Arc::clone(&self.settings);
        let reuse = self.reuse_renders;
        let st = self
            .clusters
            .entry(id.clone())
            .or_insert_with(|| ClusterState::new(&settings, id));
        if !reuse {
            st.parsed_members = MemberCache::default();
            st.built = None;
        }
        // Nothing of this cluster changed (most clusters, in most passes): the same model.
        if let Some(b) = st
            .built
            .as_ref()
            .filter(|b| b.built_from(snap, id, &st.parsed_members))
        {
            return Arc::clone(b);
        }
        let built = Cluster::build_with(snap, &settings.etcd.namespace, id, &mut st.parsed_members);
        if built.skipped != st.last_skipped {
            for s in &built.skipped {
                // A key may carry newlines meant to forge log lines: escape it. The reason quotes
                // every value it takes from etcd with `{:?}` already.
                if s.member_kept {
                    tracing::warn!(key = %s.key.escape_debug(), reason = %s.reason, "ignoring a field of a member key (the member is kept)");
                } else {
                    tracing::warn!(key = %s.key.escape_debug(), reason = %s.reason, "ignoring key");
                }
            }
            st.last_skipped = built.skipped;
        }
        let model = Arc::new(built.cluster);
        st.built = Some(Arc::clone(&model));
        model
    }

    /// Builds the model of the first cluster (the one of `etcd.scope`), for `render --context`.
    pub fn model(&mut self, snap: &Snapshot) -> Cluster {
        let ids = self.cluster_ids(snap);
        match ids.first() {
            Some(id) => (*self.model_of(snap, id)).clone(),
            None => Cluster::build(snap, &self.settings.etcd.namespace, "").cluster,
        }
    }

    /// Every cluster's model, unguarded, grouped by scope: for `render` and `check`.
    fn models(&mut self, snap: &Snapshot) -> Vec<(String, Vec<Arc<Cluster>>)> {
        let mut out: Vec<(String, Vec<Arc<Cluster>>)> = Vec::new();
        for id in self.cluster_ids(snap) {
            let c = self.model_of(snap, &id);
            match out.last_mut() {
                Some((scope, groups)) if *scope == id.scope => groups.push(c),
                _ => out.push((id.scope.clone(), vec![c])),
            }
        }
        out
    }

    /// Renders the selected targets (all when `only` is None) without the guard: for `render`.
    pub fn render(
        &mut self,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<Vec<Rendered>, RenderError> {
        let models = self.models(snap);
        select(&self.settings.targets, only)?;
        let settings = Arc::clone(&self.settings);
        let plan = plan(&settings, &models, &models, &[]);
        plan.iter()
            .filter(|(p, _)| only.is_none_or(|n| n == p.base))
            .map(|(p, view)| self.render_planned(p, view))
            .collect()
    }

    /// The context each selected target (all when `only` is None) would be rendered with, as
    /// JSON, by target name: for `render --context`.
    pub fn contexts(
        &mut self,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<Vec<(String, serde_json::Value)>, RenderError> {
        let models = self.models(snap);
        select(&self.settings.targets, only)?;
        let settings = Arc::clone(&self.settings);
        let plan = plan(&settings, &models, &models, &[]);
        Ok(plan
            .iter()
            .filter(|(p, _)| only.is_none_or(|n| n == p.base))
            .map(|(p, view)| {
                let json = self.with_view(p, view, |v| {
                    serde_json::to_value(crate::render::context(v, &p.target))
                        .unwrap_or(serde_json::Value::Null)
                });
                (p.target.name.clone(), json)
            })
            .collect())
    }

    /// Renders one planned target from its view.
    fn render_planned(&self, p: &Planned, view: &ViewOf) -> Result<Rendered, RenderError> {
        self.with_view(p, view, |v| self.renderer.render_view(&p.target, v))
    }

    /// Calls `f` with the render view of one planned target.
    fn with_view<R>(&self, p: &Planned, view: &ViewOf, f: impl FnOnce(&View<'_>) -> R) -> R {
        let settings = &self.settings;
        let scopes: Vec<ScopeView<'_>> = view
            .clusters
            .iter()
            .map(|(scope, groups)| ScopeView {
                scope,
                groups,
                settings: settings.clusters.get(scope.as_str()),
            })
            .collect();
        let flat = match (&p.scope, settings.etcd.single_scope()) {
            (Some(s), _) => scopes.iter().find(|v| v.scope == s.as_str()).copied(),
            (None, Some(s)) => scopes
                .iter()
                .find(|v| v.scope == s)
                .copied()
                .or(Some(ScopeView {
                    scope: s,
                    groups: &[],
                    settings: None,
                })),
            (None, None) => None,
        };
        let flat = flat.map(|mut f| {
            if settings.etcd.single_scope().is_some() {
                // One cluster: the flat context is as it always was, configured or not.
                f.settings = f.settings.or(Some(&NO_CLUSTER_SETTINGS));
            }
            f
        });
        f(&View {
            namespace: &settings.etcd.namespace,
            clusters: &scopes,
            flat,
        })
    }

    /// Renders, stages into `scratch` and runs every check without touching any destination: for
    /// `check`. Every target is checked; the first failure (in config order) is returned, the
    /// others logged. Errors name the target's real destination, not the scratch copy.
    pub async fn check_only(
        &mut self,
        snap: &Snapshot,
        scratch: &std::path::Path,
    ) -> Result<Vec<String>, PassError> {
        let models = self.models(snap);
        let mut refused = None;
        for (_, groups) in &models {
            for c in groups {
                if let Err(e) = guard::check(&self.settings.guard, c, None) {
                    refused.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refused {
            return Err(e.into());
        }
        let settings = Arc::clone(&self.settings);
        let plan = plan(&settings, &models, &models, &[]);
        let mut names = Vec::new();
        let mut failures = Vec::new();
        for (i, (p, view)) in plan.iter().enumerate() {
            let r = self.render_planned(p, view);
            match check_one(&p.target, r, &scratch.join(i.to_string())).await {
                Ok(()) => names.push(p.target.name.clone()),
                Err(e) => failures.push((i, e)),
            }
        }
        let targets: Vec<Target> = plan.into_iter().map(|(p, _)| p.target).collect();
        first_failure(&targets, failures).map_or(Ok(names), Err)
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
    /// and [`PassStats`] tells what was applied.
    pub async fn pass(&mut self, snap: &Snapshot, reload: bool) -> Result<PassOutcome, PassError> {
        let seen = self.observe(snap).await?;
        self.apply(seen, reload).await
    }

    /// [`Engine::pass`] on the source's shared snapshot, let go of once every cluster is
    /// modelled: the source applies etcd's events to it in place while no pass holds it, and
    /// a pass holding it across its awaits (checks, reloads) would make the source copy the
    /// whole store (a thousand clusters: megabytes) at every event meanwhile.
    pub async fn pass_shared(
        &mut self,
        snap: Arc<Snapshot>,
        reload: bool,
    ) -> Result<PassOutcome, PassError> {
        let seen = self.observe(&snap).await?;
        drop(snap);
        self.apply(seen, reload).await
    }

    /// Undoes what the fast path holds on HAProxy and PgBouncer (fences, pauses), for a
    /// graceful stop; the caller bounds it.
    pub async fn shutdown(&mut self) {
        for st in self.clusters.values_mut() {
            st.router.shutdown().await;
        }
    }

    /// Before the daemon's first pass: resumes the PgBouncer pauses an earlier run left (killed
    /// between `PAUSE` and `RESUME`), on every PgBouncer the fast path pauses: the whole pooler
    /// with one cluster, the databases of the configured clusters with several.
    async fn resume_left_paused(&mut self) {
        if self.repaired || self.attach.is_none() || !self.settings.failover.enabled {
            return;
        }
        self.repaired = true;
        let databases: Option<Vec<String>> = match self.settings.etcd.single_scope() {
            Some(_) => None,
            None => Some(
                self.settings
                    .clusters
                    .values()
                    .flat_map(|c| c.databases.iter().cloned())
                    .collect(),
            ),
        };
        let mut seen = Vec::new();
        for t in &self.settings.targets {
            let Some(admin) = t.pgbouncer_admin() else {
                continue;
            };
            if seen.contains(&admin.config()) {
                continue;
            }
            seen.push(admin.config());
            match admin.resume_left_paused(databases.as_deref()).await {
                Ok(r) if r.is_empty() => {}
                Ok(r) => {
                    tracing::warn!(target = %t.name, console = admin.console(), resumed = ?r, "PgBouncer was left paused (by an earlier run stopped mid-switch, or by hand): resumed")
                }
                Err(e) => {
                    tracing::warn!(target = %t.name, error = %e, "cannot ask PgBouncer whether it was left paused")
                }
            }
        }
    }

    /// The first half of a pass: every cluster modelled, diffed, shown to the fast path and
    /// judged by the guard.
    async fn observe(&mut self, snap: &Snapshot) -> Result<Observed, PassError> {
        let started = Instant::now();
        self.resume_left_paused().await;
        self.stats = PassStats::default();
        let settings = Arc::clone(&self.settings);
        let single = settings.etcd.single_scope().is_some();
        let ids = self.cluster_ids(snap);
        // Clusters no longer followed (the config changed): forgotten.
        self.clusters.retain(|id, _| ids.binary_search(id).is_ok());
        let mut refusals: Vec<GuardError> = Vec::new();
        let mut accepted_now = 0;
        let mut gone: Vec<ClusterId> = Vec::new();
        let mut reports = Vec::with_capacity(ids.len());
        for id in &ids {
            let model = self.model_of(snap, id);
            let st = self.clusters.get_mut(id).expect("modelled above");
            if let Some((n, o)) = &self.attach {
                if !st.router.is_attached() {
                    st.router.attach(n.clone(), o.clone());
                }
            }
            let configured = single || settings.clusters.contains_key(&id.scope);
            if !single && !st.announced {
                st.announced = true;
                if configured {
                    tracing::info!(cluster = %id, members = model.members.len(), leader = ?model.leader_name, "following cluster");
                } else {
                    tracing::warn!(cluster = %id, members = model.members.len(), "following cluster with no [clusters.{}] table: it is in every template's `clusters` list with configured = false, and gets no port or file of its own", id.scope);
                }
            }
            let previous = st.seen.replace(Arc::clone(&model));
            let unchanged = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, &model));
            // Before the guard: a refused view (a failover's leaderless spell) still tells what
            // changed.
            let events = if unchanged {
                Vec::new()
            } else {
                st.differ.diff(previous.as_deref(), &model)
            };
            for e in &events {
                if single {
                    e.log();
                } else {
                    let _scope = tracing::info_span!("cluster", scope = %id).entered();
                    e.log();
                }
            }
            // Before the guard too: routing follows the leader key even while the files wait.
            // (The same model again was observed already.)
            if !unchanged {
                st.router.observe(&model, &events);
            }
            st.router.confirm_now(&model).await;
            match self.memory.admit(&settings.guard, &model) {
                Ok(()) => {
                    accepted_now += 1;
                    st.refused = None;
                    let had_members = st.accepted.as_ref().is_some_and(|a| !a.members.is_empty());
                    st.accepted = Some(Arc::clone(&model));
                    if model.leader().is_some() && st.router.gate_open(&model) {
                        st.led = Some(Arc::clone(&model));
                    }
                    // Discovered clusters come and go with their keys; an emptied one goes only
                    // when the guard lets it (`--force`, or a `min_members` of 0).
                    if model.members.is_empty()
                        && had_members
                        && matches!(settings.etcd.clusters, Clusters::Discover)
                    {
                        gone.push(id.clone());
                    }
                }
                Err(e) => {
                    // Logged when the refusal starts or changes, not on every heartbeat.
                    if !single && st.refused.as_ref() != Some(&e) {
                        tracing::warn!(cluster = %id, "{e}");
                    }
                    st.refused = Some(e.clone());
                    // A cluster never accepted and not remembered (listed before it exists, or
                    // found while it bootstraps) has no section in any file: nothing is kept
                    // back for it, so the pass does not fail for it. /status shows it.
                    let has_section = st.accepted.is_some() || self.memory.knows(&model) || single;
                    if has_section {
                        refusals.push(e);
                    }
                }
            }
            self.stats.events.extend(events.iter().cloned());
            reports.push(ClusterReport {
                id: id.clone(),
                model,
                events,
                refused: st.refused.as_ref().map(ToString::to_string),
                configured,
                failover: st.router.view(),
            });
        }
        for id in &gone {
            if let Some(st) = self.clusters.remove(id) {
                if let Some(c) = &st.seen {
                    self.memory.forget(&settings.guard, c);
                }
                tracing::warn!(cluster = %id, "cluster gone from the store and its empty view accepted: its section is removed");
            }
        }
        self.cluster = reports.first().map(|r| Arc::clone(&r.model));
        self.reports = reports;
        if accepted_now == 0 && !refusals.is_empty() {
            // Nothing new to render: every cluster keeps its last good files.
            return Err(refusals.swap_remove(0).into());
        }
        // Several clusters and not one with a view to render (none found, or every one refused
        // at first sight): rendering would write files with no cluster in them.
        if !single
            && !settings.guard.force
            && self.clusters.values().all(|st| st.accepted.is_none())
        {
            return Err(GuardError::NoCluster {
                prefix: settings.etcd.prefix(),
            }
            .into());
        }
        Ok(Observed {
            started,
            refusals,
            gone,
        })
    }

    /// The second half of a pass: what each target renders, then each consumer's files staged,
    /// checked, swapped in and reloaded.
    async fn apply(&mut self, seen: Observed, reload: bool) -> Result<PassOutcome, PassError> {
        let Observed {
            started,
            mut refusals,
            gone,
        } = seen;
        let settings = Arc::clone(&self.settings);
        let single = settings.etcd.single_scope().is_some();

        // What each target renders: every cluster's accepted view, or for `require_leader`
        // targets (several clusters) its last view with a confirmed leader.
        let mut all: Vec<(String, Vec<Arc<Cluster>>)> = Vec::new();
        let mut led: Vec<(String, Vec<Arc<Cluster>>)> = Vec::new();
        let mut held: Vec<String> = Vec::new();
        let mut gates_closed = false;
        for (id, st) in &self.clusters {
            let push = |list: &mut Vec<(String, Vec<Arc<Cluster>>)>, c: &Arc<Cluster>| match list
                .last_mut()
            {
                Some((scope, groups)) if *scope == id.scope => groups.push(Arc::clone(c)),
                _ => list.push((id.scope.clone(), vec![Arc::clone(c)])),
            };
            match &st.accepted {
                Some(a) => push(&mut all, a),
                // Refused at first sight, but the files hold a section for it (the guard's
                // memory says so): templates over every cluster wait rather than drop it.
                None => {
                    if st.seen.as_ref().is_some_and(|c| self.memory.knows(c)) {
                        held.push(id.to_string());
                    }
                }
            }
            if let Some(l) = &st.led {
                push(&mut led, l);
            }
            let seen = st.seen.as_deref();
            if let Some(c) = seen.filter(|c| c.leader().is_some()) {
                gates_closed |= !st.router.gate_open(c);
            }
            if !single && seen.is_some_and(|c| c.leader().is_none()) && st.led.is_some() {
                self.stats.leaderless.push(id.to_string());
            }
        }
        let mut plan = plan(&settings, &all, &led, &held);
        // The per-cluster files of clusters that are gone (the guard accepted their empty view):
        // removed, their consumers reloaded.
        for scope in gone
            .iter()
            .map(|id| id.scope.as_str())
            .filter(|s| !all.iter().any(|(a, _)| a == s))
        {
            for t in settings.targets.iter().filter(|t| t.per_cluster) {
                let mut target = t.clone();
                target.dest = PathBuf::from(
                    t.dest
                        .to_string_lossy()
                        .replace(crate::target::SCOPE_PLACEHOLDER, scope),
                );
                target.name = format!("{}:{scope}", t.name);
                plan.push((
                    Planned {
                        target,
                        scope: Some(scope.to_owned()),
                        base: t.name.clone(),
                        remove: true,
                    },
                    ViewOf {
                        clusters: Arc::default(),
                    },
                ));
            }
        }
        for (p, _) in plan.iter().filter(|(p, _)| p.target.require_leader) {
            if !single && !self.stats.leaderless.is_empty() {
                tracing::info!(target = %p.target.name, clusters = ?self.stats.leaderless, "no leader in these clusters: their sections keep their last leader");
            }
        }
        // PgBouncer-like targets point at a leader only once it takes writes.
        let gate_open = !single || !gates_closed;
        let awaiting: Vec<usize> = (0..plan.len())
            .filter(|&i| !gate_open && plan[i].0.target.require_leader)
            .collect();
        for &i in &awaiting {
            let t = &plan[i].0.target;
            tracing::info!(target = %t.name, leader = ?self.cluster.as_ref().and_then(|c| c.leader_name.clone()), "the new leader does not take writes yet: this target keeps pointing where it did");
            self.stats.awaiting.push(t.name.clone());
        }
        if !single && gates_closed {
            for (p, _) in plan.iter().filter(|(p, _)| p.target.require_leader) {
                self.stats.awaiting.push(p.target.name.clone());
            }
        }
        // Rendered per consumer, as its turn comes: PgBouncer's small file does not wait for a
        // HAProxy file of a thousand clusters to render.
        let mut rendered: Vec<Rendering> = vec![None; plan.len()];
        let mut render_time = Duration::ZERO;
        let removals: Arc<Vec<usize>> = Arc::new(
            plan.iter()
                .enumerate()
                .filter(|(_, (p, _))| p.remove)
                .map(|(i, _)| i)
                .collect(),
        );
        let targets: Arc<Vec<Target>> =
            Arc::new(plan.iter().map(|(p, _)| p.target.clone()).collect());
        self.stats.render = started.elapsed();
        let apply_start = Instant::now();

        if !self.swept {
            self.swept = true;
            for t in targets.iter() {
                apply::sweep_leftovers(&t.dest);
            }
        }
        let mut failures: Vec<(usize, PassError)> = Vec::new();
        // Templates over every cluster held back for a cluster the guard refused at first
        // sight: they would drop its section. (A held cluster is one the guard remembers, so its
        // refusal is among those that fail the pass.)
        if let (false, Some(e)) = (single || held.is_empty(), refusals.first()) {
            for (i, _) in plan
                .iter()
                .enumerate()
                .filter(|(_, (p, _))| p.scope.is_none())
            {
                failures.push((i, e.clone().into()));
            }
        }
        let held_back: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
        // Each changed target with what its file held before: the known-good bytes to put back
        // if its consumer refuses the new ones.
        let mut changed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        // The replaced files are released after the reloads, off the latency path.
        let mut retired = Vec::new();
        let mut applied: Vec<Vec<usize>> = Vec::new();
        let mut outcome = PassOutcome::default();
        // Targets whose consumer did not take the new file (its reload failed).
        let mut not_live: Vec<usize> = Vec::new();
        let defer_haproxy = self.clusters.values().any(|st| st.router.defers_reloads());
        // What HAProxy's server state is built from: each ordinary cluster's accepted view.
        let ss_views: Vec<Arc<Cluster>> = all
            .iter()
            .flat_map(|(_, g)| g.iter().filter(|c| c.group.is_none()).cloned())
            .collect();
        // Consumers that point at the leader alone (PgBouncer) first: after a leader change
        // their clients wait (paused) for this pass, while HAProxy was moved already through its
        // runtime API and its check and reload would only delay them. Config order otherwise.
        let mut groups = consumers(&targets);
        groups.sort_by_key(|g| !g.iter().any(|&i| targets[i].require_leader));
        for mut group in groups {
            group.retain(|i| !awaiting.contains(i));
            if group.iter().any(|i| held_back.contains(i)) {
                // All or nothing within a consumer.
                continue;
            }
            if group.is_empty() {
                continue;
            }
            // A HAProxy the fast path moves keeps its file and worker until the new leader is
            // confirmed (see `Router::defers_reloads`).
            if defer_haproxy && group.iter().any(|&i| targets[i].server_state().is_some()) {
                for &i in &group {
                    tracing::info!(target = %targets[i].name, "leader change under way: this consumer is updated once the new primary is confirmed");
                    self.stats.awaiting.push(targets[i].name.clone());
                }
                continue;
            }
            // Each consumer in turn: stage, check, swap, reload, and (PgBouncer) resume, before
            // the next one's check runs.
            let t0 = Instant::now();
            self.render_targets(&plan, &group, &mut rendered);
            render_time += t0.elapsed();
            let (c, r) = match swap_in(&targets, &group, &rendered, &removals).await {
                Ok(done) => done,
                Err(failure) => {
                    failures.push(failure);
                    continue;
                }
            };
            for (i, _) in &c {
                if removals.contains(i) {
                    tracing::warn!(target = %targets[*i].name, dest = %targets[*i].dest.display(), "file of a cluster that is gone removed");
                } else {
                    tracing::info!(target = %targets[*i].name, "file updated");
                }
                outcome.written.push(targets[*i].name.clone());
            }
            changed.extend(c);
            retired.extend(r);
            applied.push(group.clone());
            if reload {
                self.reload_group(
                    &targets,
                    &group,
                    &rendered,
                    &ss_views,
                    &changed,
                    &mut retired,
                    &mut outcome,
                    &mut not_live,
                    &mut failures,
                )
                .await;
            }
            // A PgBouncer now reading a file for the confirmed leader: resume it.
            for &i in &group {
                let t = &targets[i];
                let ok = rendered[i].as_ref().is_some_and(|r| r.is_ok());
                if !(t.require_leader && !not_live.contains(&i) && ok) {
                    continue;
                }
                for st in self.clusters.values() {
                    let Some(c) = st.seen.as_deref() else {
                        continue;
                    };
                    if c.leader().is_some() && st.router.gate_open(c) {
                        st.router.pgbouncer_settled(&plan[i].0.base).await;
                    }
                }
            }
        }

        // What each target's consumer reads now: its new render, where it was applied.
        let mut live: Vec<Option<&Rendered>> = vec![None; targets.len()];
        for &i in applied.iter().flatten() {
            if !not_live.contains(&i) {
                live[i] = rendered[i].as_ref().and_then(|r| r.as_deref().ok());
            }
        }
        blocking(move || {
            for r in retired {
                if let Err(e) = r.finish() {
                    tracing::warn!(error = %e, "cannot fsync the directory after the swap");
                }
            }
        })
        .await;
        // Bookkeeping after the reloads, off the latency path: between reloads, the state file
        // holds etcd's view, for cold starts. Not for a target reloaded just now: its new worker
        // may still be reading the merged file. Built again only when the target was rendered
        // again: the state depends on nothing a heartbeat changes.
        for (t, r) in targets.iter().zip(&live) {
            let (Some(ss), Some(r)) = (t.server_state(), r) else {
                continue;
            };
            if outcome.reloaded.contains(&t.name)
                || (self.state_synced.contains(&t.name) && !self.stats.rendered.contains(&t.name))
            {
                continue;
            }
            let content = build_server_state(&settings, ss, r, &ss_views, "");
            let file = ss.file.clone();
            match blocking(move || server_state::write_if_changed(&file, &content)).await {
                Ok(_) => {
                    self.state_synced.insert(t.name.clone());
                }
                Err(e) => {
                    self.state_synced.remove(&t.name);
                    tracing::warn!(file = %ss.file.display(), error = %e, "cannot write the server-state file");
                }
            }
        }
        self.stats.render += render_time;
        // Rendered as each consumer's turn came; listed in config order.
        let order: std::collections::HashMap<&str, usize> = plan
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (p.target.name.as_str(), i))
            .collect();
        self.stats
            .rendered
            .sort_by_key(|n| order.get(n.as_str()).copied());
        self.stats.apply = apply_start.elapsed().saturating_sub(render_time);
        self.stats.failed = failures
            .iter()
            .map(|(i, e)| (targets[*i].name.clone(), e.reason()))
            .collect();
        let memory = &self.memory;
        for id in self
            .clusters
            .iter()
            .filter(|(_, st)| {
                st.refused.is_some()
                    && (st.accepted.is_some()
                        || single
                        || st.seen.as_ref().is_some_and(|c| memory.knows(c)))
            })
            .map(|(id, _)| id)
        {
            self.stats.failed.push((format!("cluster {id}"), "guard"));
        }
        self.stats.outcome = outcome.clone();
        match first_failure(&targets, failures) {
            Some(e) => Err(e),
            None if !refusals.is_empty() => Err(refusals.swap_remove(0).into()),
            None => Ok(outcome),
        }
    }

    /// Renders every planned target, or reuses its last render when nothing its template can
    /// see has changed since (see [`Cluster::same_for_templates`] and [`Renderer::reads_wal`]):
    /// rendering thousands of members costs tens of milliseconds, comparing them a fraction of
    /// one, and most etcd events are heartbeats. Sound because a render depends on the context
    /// alone (no clock or random functions are registered), and the context on the clusters and
    /// the settings, which [`Engine::replace`] resets the cache with.
    fn render_targets(
        &mut self,
        plan: &[(Planned, ViewOf)],
        which: &[usize],
        out: &mut [Rendering],
    ) {
        for &i in which {
            if out[i].is_some() {
                continue;
            }
            let (p, view) = &plan[i];
            let t = &p.target;
            if p.remove {
                out[i] = Some(Ok(Arc::new(Rendered {
                    name: t.name.clone(),
                    bytes: Vec::new(),
                })));
                continue;
            }
            let reads_wal = self.renderer.reads_wal(t);
            let models: Vec<Arc<Cluster>> = view
                .clusters
                .iter()
                .flat_map(|(_, g)| g.iter().cloned())
                .collect();
            if let Some(c) = self.renders.get(&t.name).filter(|_| self.reuse_renders) {
                if c.view.len() == models.len()
                    && c.view
                        .iter()
                        .zip(&models)
                        .all(|(a, b)| Arc::ptr_eq(a, b) || a.same_for_templates(b, reads_wal))
                {
                    out[i] = Some(Ok(Arc::clone(&c.rendered)));
                    continue;
                }
            }
            self.stats.rendered.push(t.name.clone());
            let result = self.render_planned(p, view).map(Arc::new);
            match &result {
                Ok(r) => {
                    self.renders.insert(
                        t.name.clone(),
                        CachedRender {
                            view: models,
                            rendered: Arc::clone(r),
                        },
                    );
                }
                Err(_) => {
                    self.renders.remove(&t.name);
                }
            }
            out[i] = Some(result);
        }
    }

    /// Whether a pass may reuse what did not change: members parsed from the same values, and a
    /// target's last render when nothing its template sees changed (the default). Off, every
    /// pass parses every member and renders every target, as haconfd did before: for benchmarks
    /// that compare the two.
    pub fn set_reuse_renders(&mut self, on: bool) {
        self.reuse_renders = on;
        self.renders.clear();
    }
}

/// What the first half of a pass leaves to the second.
struct Observed {
    started: Instant,
    /// The guard's refusals that fail the pass.
    refusals: Vec<GuardError>,
    /// Clusters whose empty view the guard accepted: their files go.
    gone: Vec<ClusterId>,
}

/// A planned target's render, once its consumer's turn came (None before).
type Rendering = Option<Result<Arc<Rendered>, RenderError>>;

/// Settings of a cluster that has no `[clusters.<scope>]` table, with `etcd.scope`.
static NO_CLUSTER_SETTINGS: std::sync::LazyLock<ClusterSettings> =
    std::sync::LazyLock::new(ClusterSettings::default);

/// The clusters one target renders: by scope, each with its models (one, or one per Citus
/// group).
#[derive(Debug, Clone)]
struct ViewOf {
    /// Shared by every target that sees the same clusters: not copied per target.
    clusters: Arc<Vec<(String, Vec<Arc<Cluster>>)>>,
}

/// Expands the `[[template]]`s into what a pass applies: a per-cluster template once per
/// cluster in its view (its `dest` naming the scope), the others once. `all` is every cluster's
/// accepted view, `led` the views with a leader (for `require_leader` templates over several
/// clusters); `held` the clusters whose section must not be dropped.
fn plan(
    settings: &Settings,
    all: &[(String, Vec<Arc<Cluster>>)],
    led: &[(String, Vec<Arc<Cluster>>)],
    held: &[String],
) -> Vec<(Planned, ViewOf)> {
    let single = settings.etcd.single_scope();
    let (all_view, led_view) = (Arc::new(all.to_vec()), Arc::new(led.to_vec()));
    let mut out = Vec::new();
    for t in &settings.targets {
        let source = if t.require_leader && single.is_none() {
            &led_view
        } else {
            &all_view
        };
        let view = ViewOf {
            clusters: Arc::clone(source),
        };
        if !t.per_cluster {
            out.push((
                Planned {
                    target: t.clone(),
                    scope: None,
                    base: t.name.clone(),
                    remove: false,
                },
                view,
            ));
            continue;
        }
        let scopes: Vec<&str> = match single {
            Some(s) => vec![s],
            None => source
                .iter()
                .map(|(s, _)| s.as_str())
                .filter(|s| {
                    !held
                        .iter()
                        .any(|h| h == s || h.starts_with(&format!("{s}/")))
                })
                // A cluster with no `[clusters.<scope>]` gets no file of its own: it has no
                // settings (ports, databases) to render with.
                .filter(|s| settings.clusters.contains_key(*s))
                .collect(),
        };
        for scope in scopes {
            let mut instance = t.clone();
            instance.dest = PathBuf::from(
                t.dest
                    .to_string_lossy()
                    .replace(crate::target::SCOPE_PLACEHOLDER, scope),
            );
            if single.is_none() {
                instance.name = format!("{}:{scope}", t.name);
            }
            out.push((
                Planned {
                    target: instance,
                    scope: Some(scope.to_owned()),
                    base: t.name.clone(),
                    remove: false,
                },
                view.clone(),
            ));
        }
    }
    out
}

/// Renders, stages into `dir` and checks one target for `check`. Errors name the target's real
/// destination, not the scratch copy.
async fn check_one(
    t: &Target,
    r: Result<Rendered, RenderError>,
    dir: &std::path::Path,
) -> Result<(), PassError> {
    let r = r?;
    let mut copy = t.clone();
    // The staged file is named as beside the real destination, so a check's own output
    // (`parsing [.haproxy.cfg.haconfd-…:12]`) reads as it does in `once` and `run`.
    let file_name = t.dest.file_name().unwrap_or(t.name.as_ref());
    copy.dest = dir.join(file_name);
    copy.owner = None;
    copy.group = None;
    std::fs::create_dir_all(dir).map_err(|source| ApplyError::Stage {
        path: dir.to_owned(),
        source,
    })?;
    let staged = apply::stage(&copy, &r)?;
    apply::check(&copy, &staged).await.map_err(|e| match e {
        ApplyError::Check { target, source, .. } => ApplyError::Check {
            target,
            dest: t.dest.clone(),
            source,
        },
        other => other,
    })?;
    Ok(())
}

/// The server-state file's content for one HAProxy target: with `etcd.scope` from the one
/// cluster, else from every ordinary cluster with its own backends.
fn build_server_state(
    settings: &Settings,
    ss: &server_state::ServerStateConfig,
    rendered: &Rendered,
    clusters: &[Arc<Cluster>],
    live: &str,
) -> String {
    let text = String::from_utf8_lossy(&rendered.bytes);
    if settings.etcd.single_scope().is_some() {
        let pairs: Vec<(&server_state::ServerStateConfig, &Cluster)> =
            clusters.iter().map(|c| (ss, &**c)).collect();
        return server_state::build_many(&pairs, &text, live);
    }
    let per: Vec<server_state::ServerStateConfig> =
        clusters.iter().map(|c| ss.for_scope(&c.scope)).collect();
    let pairs: Vec<(&server_state::ServerStateConfig, &Cluster)> =
        per.iter().zip(clusters).map(|(s, c)| (s, &**c)).collect();
    server_state::build_many(&pairs, &text, live)
}

/// Runs file-system work (reads, fsync, rename, directory syncs) on the blocking pool, off the
/// runtime's one thread: a slow disk must not stall the etcd keepalive, the fast path or
/// `/healthz`.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A changed target of one consumer: its index, its previous bytes, its staged file.
type StagedGroup = (
    Vec<(usize, Option<Vec<u8>>)>,
    Vec<apply::Staged>,
    Vec<(usize, Vec<u8>)>,
);

/// Stages, checks and swaps in the changed files of one consumer's targets (`group`), all or
/// none. Returns each changed target with its previous bytes, and what the swaps retired; or the
/// first failure with the index of the target it concerns. Reading, staging and swapping run on
/// the blocking pool; the checks are commands, awaited here.
async fn swap_in(
    targets: &Arc<Vec<Target>>,
    group: &[usize],
    rendered: &[Rendering],
    removals: &Arc<Vec<usize>>,
) -> Result<(Vec<(usize, Option<Vec<u8>>)>, Vec<apply::Retired>), (usize, PassError)> {
    let mut wanted = Vec::with_capacity(group.len());
    for &i in group {
        let r = rendered[i]
            .as_ref()
            .expect("rendered before its consumer's turn")
            .as_ref()
            .map_err(|e| (i, e.clone().into()))?;
        wanted.push((i, Arc::clone(r)));
    }
    let s = Arc::clone(targets);
    let rm = Arc::clone(removals);
    // Stage everything before checking or swapping anything.
    let (changed, staged, removed): StagedGroup = blocking(move || {
        let mut changed = Vec::new();
        let mut staged = Vec::new();
        let mut removed = Vec::new();
        for (i, r) in wanted {
            let t = &s[i];
            let fail = |e: ApplyError| Box::new((i, PassError::from(e)));
            if rm.contains(&i) {
                if let Some(old) = apply::current(&t.dest).map_err(fail)? {
                    removed.push((i, old));
                }
                continue;
            }
            if apply::holds(&t.dest, &r.bytes).map_err(fail)? {
                continue;
            }
            let old = apply::current(&t.dest).map_err(fail)?;
            staged.push(apply::stage(t, &r).map_err(fail)?);
            changed.push((i, old));
        }
        Ok::<_, Box<(usize, PassError)>>((changed, staged, removed))
    })
    .await
    .map_err(|b| *b)?;
    for ((i, _), st) in changed.iter().zip(&staged) {
        apply::check(&targets[*i], st)
            .await
            .map_err(|e| (*i, e.into()))?;
    }
    let s = Arc::clone(targets);
    blocking(move || {
        let mut changed = changed;
        let mut retired = Vec::with_capacity(staged.len());
        for (k, st) in staged.into_iter().enumerate() {
            match apply::commit(st) {
                Ok(r) => retired.push(r),
                Err(e) => {
                    // All or nothing within a consumer: the files of this group already swapped
                    // in go back, or a restart of the consumer would load half a new set, and
                    // nothing would be left due for a reload.
                    for (j, old) in &changed[..k] {
                        if let Some(old) = old {
                            restore(&s[*j], old);
                        }
                    }
                    return Err(Box::new((changed[k].0, PassError::from(e))));
                }
            }
        }
        // Then the files of clusters that are gone; one that cannot be removed puts the group
        // back as it was.
        for (k, (i, old)) in removed.iter().enumerate() {
            if let Err(source) = std::fs::remove_file(&s[*i].dest) {
                for (j, old) in changed
                    .iter()
                    .map(|(j, o)| (j, o.as_ref()))
                    .chain(removed[..k].iter().map(|(j, o)| (j, Some(o))))
                {
                    if let Some(old) = old {
                        restore(&s[*j], old);
                    }
                }
                let e = ApplyError::Commit {
                    dest: s[*i].dest.clone(),
                    source,
                };
                return Err(Box::new((*i, PassError::from(e))));
            }
            changed.push((*i, Some(old.clone())));
        }
        Ok((changed, retired))
    })
    .await
    .map_err(|b| *b)
}

/// Puts a target's known-good bytes back after its consumer refused the new ones.
fn restore(t: &Target, old: &[u8]) {
    let known_good = Rendered {
        name: t.name.clone(),
        bytes: old.to_vec(),
    };
    match apply::stage(t, &known_good)
        .and_then(apply::commit)
        .map(drop)
    {
        Ok(()) => {
            tracing::warn!(target = %t.name, dest = %t.dest.display(), "restored the last good file")
        }
        Err(e) => {
            tracing::error!(target = %t.name, dest = %t.dest.display(), error = %e, "cannot restore the last good file")
        }
    }
}

/// The first failure in config order; the others are logged, each naming its target.
fn first_failure(targets: &[Target], mut failures: Vec<(usize, PassError)>) -> Option<PassError> {
    failures.sort_by_key(|(i, _)| *i);
    let mut failures = failures.into_iter();
    let (_, first) = failures.next()?;
    for (i, e) in failures {
        tracing::error!(target = %targets[i].name, reason = e.reason(), "this target failed too; its last good file stays: {e:#}");
    }
    Some(first)
}

/// Groups targets by the consumer that reads them: indices into `targets`, in config order.
/// Targets whose reload acts on the same process (one pidfile, master socket or command) are
/// one consumer: that process reads their files together, so they are checked, swapped and
/// reloaded together, all or nothing, and reloaded once. Every other target stands alone —
/// a target with no reload too, since nothing says who reads it — so that a failure of one does
/// not keep the others from following the cluster.
pub fn consumers(targets: &[Target]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let ids = target_consumer_ids(t);
        let mut merged = (ids, vec![i]);
        // Merge every group sharing an identifier (a signal verified on a master socket and a
        // master-socket reload of that socket are the same HAProxy).
        let mut k = 0;
        while k < groups.len() {
            if groups[k].0.iter().any(|id| merged.0.contains(id)) {
                let (ids, members) = groups.remove(k);
                merged.0.extend(ids);
                merged.1.extend(members);
            } else {
                k += 1;
            }
        }
        merged.1.sort_unstable();
        groups.push(merged);
    }
    let mut out: Vec<Vec<usize>> = groups.into_iter().map(|(_, m)| m).collect();
    out.sort_by_key(|m| m[0]);
    out
}

/// What identifies the process a reload acts on.
fn target_consumer_ids(t: &Target) -> Vec<String> {
    t.consumer.ids(t.reload.as_ref())
}

impl Engine {
    /// Reloads one consumer whose files were swapped in (or whose last reload failed): once,
    /// however many of its files changed, with HAProxy's server state prepared first. A refused
    /// reload puts HAProxy's known-good file back.
    #[allow(clippy::too_many_arguments)]
    async fn reload_group(
        &mut self,
        targets: &Arc<Vec<Target>>,
        group: &[usize],
        rendered: &[Rendering],
        clusters: &[Arc<Cluster>],
        changed: &[(usize, Option<Vec<u8>>)],
        retired: &mut Vec<apply::Retired>,
        outcome: &mut PassOutcome,
        not_live: &mut Vec<usize>,
        failures: &mut Vec<(usize, PassError)>,
    ) {
        // Changed targets, and those whose last reload failed although their file is now up to
        // date: a refused PID must not turn into "nothing changed" on the retry.
        let due: Vec<usize> = group
            .iter()
            .copied()
            .filter(|i| {
                let t = &targets[*i];
                t.consumer.is_told(t.reload.as_ref())
            })
            .filter(|i| {
                changed.iter().any(|(c, _)| c == i) || self.unreloaded.contains(&targets[*i].name)
            })
            .collect();
        let Some(&first) = due.first() else { return };
        let settings = Arc::clone(&self.settings);
        for &i in &due {
            let t = &targets[i];
            if let (Some(ss), Some(Ok(r))) = (t.server_state(), &rendered[i]) {
                retired.extend(prepare_server_state(&settings, ss, r, clusters).await);
            }
        }
        match targets[first]
            .consumer
            .reload(&targets[first].name, targets[first].reload.as_ref())
            .await
        {
            Ok(()) => {
                for &i in &due {
                    let name = &targets[i].name;
                    tracing::info!(target = %name, "reloaded");
                    self.unreloaded.remove(name);
                    self.state_synced.remove(name);
                    outcome.reloaded.push(name.clone());
                }
            }
            // A cold start: the consumer has not started yet (no pidfile, no master socket) and
            // these files did not exist before this pass. It reads them when it starts; nothing
            // to reload, nothing failed (a sidecar whose HAProxy waits for haconfd's first file).
            Err(source)
                if crate::consumers::absent(targets[first].reload.as_ref())
                    && due
                        .iter()
                        .all(|i| changed.iter().any(|(c, old)| c == i && old.is_none())) =>
            {
                let t = &targets[first];
                tracing::info!(target = %t.name, reason = %source, "first file written; its consumer is not running yet and reads it when it starts");
            }
            Err(source) => {
                let t = &targets[first];
                tracing::error!(target = %t.name, error = %source, "reload failed");
                not_live.extend(due.iter().copied());
                for &i in &due {
                    self.unreloaded.insert(targets[i].name.clone());
                    // HAProxy refused the new file and still runs the old one: put the old one
                    // back, so that the file on disk is the known-good one a restart would load.
                    // (When haconfd refused to signal — stale or foreign PID — the new file
                    // stays: a consumer starting now must read it.)
                    let old = changed.iter().find(|(c, _)| *c == i).map(|(_, o)| o);
                    if let (Some(Some(old)), true) =
                        (old, crate::consumers::refused_new_file(&source))
                    {
                        let (s, old) = (Arc::clone(targets), old.clone());
                        blocking(move || restore(&s[i], &old)).await;
                    }
                }
                failures.push((
                    first,
                    PassError::Reload {
                        target: t.name.clone(),
                        source,
                    },
                ));
            }
        }
    }
}

/// Dumps the live state, merges it with etcd's view and swaps in the file HAProxy's new worker
/// will load. Failure to reach HAProxy falls back to etcd's view alone. The replaced file is
/// released after the reload.
async fn prepare_server_state(
    settings: &Settings,
    ss: &server_state::ServerStateConfig,
    rendered: &Rendered,
    clusters: &[Arc<Cluster>],
) -> Option<apply::Retired> {
    let live = match crate::consumers::haproxy::runtime::dump(
        &ss.stats_socket,
        Duration::from_secs(2),
    )
    .await
    {
        Some(live) => live,
        None => {
            tracing::warn!(socket = %ss.stats_socket.display(), "cannot read `show servers state`; the state file carries etcd's view only");
            String::new()
        }
    };
    let content = build_server_state(settings, ss, rendered, clusters, &live);
    let file = ss.file.clone();
    blocking(move || server_state::swap_in(&file, &content))
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot write the server-state file before reload"))
        .ok()
}

fn select<'a>(targets: &'a [Target], only: Option<&str>) -> Result<Vec<&'a Target>, RenderError> {
    match only {
        None => Ok(targets.iter().collect()),
        Some(name) => targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| vec![t])
            .ok_or_else(|| RenderError::UnknownTarget(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::reload::Reload;
    use std::path::{Path, PathBuf};

    fn target(name: &str, reload: Option<Reload>) -> Target {
        let mut t = Target::bare(name, Path::new("/dev/null"), Path::new("/tmp/none"));
        t.reload = reload;
        t
    }

    fn signal(pidfile: &str, master_socket: Option<&str>) -> Option<Reload> {
        Some(Reload::Signal {
            pidfile: PathBuf::from(pidfile),
            signal: nix::sys::signal::Signal::SIGUSR2,
            process: "haproxy".into(),
            master_socket: master_socket.map(PathBuf::from),
            timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn targets_of_one_consumer_go_together_and_the_others_alone() {
        let targets = [
            target(
                "haproxy",
                signal("/run/haproxy.pid", Some("/run/master.sock")),
            ),
            target("pgbouncer", signal("/run/pgbouncer.pid", None)),
            target("plain", None),
            target("haproxy-maps", signal("/run/haproxy.pid", None)),
            target(
                "haproxy-extra",
                Some(Reload::MasterSocket {
                    path: PathBuf::from("/run/master.sock"),
                    timeout: Duration::from_secs(1),
                }),
            ),
            target("also-plain", None),
        ];
        assert_eq!(
            consumers(&targets),
            vec![vec![0, 3, 4], vec![1], vec![2], vec![5]]
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    //! Several clusters through [`Engine::pass`] with plain files (no consumer to reload): each
    //! cluster judged on its own, per-cluster files, sections kept.
    use super::*;
    use crate::config::RawConfig;
    use std::path::Path;

    const ALL: &str = "{% for c in clusters %}{{ c.scope }} configured={{ c.configured }} \
        leader={{ c.leader_name | default(value=\"none\") }} members={% for m in c.members %}{{ m.name }},{% endfor %}\n{% endfor %}";
    const ONE: &str = "{{ scope }} port={{ settings.port }} leader={{ leader_name }}\n";

    fn member(port: u16, role: &str) -> Vec<u8> {
        format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","role":"{role}","state":"running"}}"#,
            port + 1000
        )
        .into_bytes()
    }

    struct Rig {
        dir: tempfile::TempDir,
        engine: Engine,
        snap: Snapshot,
    }

    impl Rig {
        fn new(extra: &str) -> Rig {
            Rig::with("discover = true", extra)
        }

        fn with(etcd: &str, extra: &str) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("all.tera"), ALL).unwrap();
            std::fs::write(dir.path().join("one.tera"), ONE).unwrap();
            std::fs::create_dir(dir.path().join("conf.d")).unwrap();
            let text = format!(
                r#"
[etcd]
{etcd}
[clusters.a]
port = 5000
[clusters.b]
port = 5010
[[template]]
name = "all"
src = "all.tera"
dest = "all.txt"
[[template]]
name = "leaders"
src = "all.tera"
dest = "leaders.txt"
require_leader = true
[[template]]
name = "one"
src = "one.tera"
dest = "conf.d/{{scope}}.txt"
{extra}
"#
            );
            let settings = RawConfig::parse(&text, Path::new("t.toml"))
                .unwrap()
                .resolve(dir.path())
                .unwrap();
            let engine = Engine::new(Arc::new(settings)).unwrap();
            Rig {
                dir,
                engine,
                snap: Snapshot::new(),
            }
        }

        fn put(&mut self, key: &str, value: &[u8]) {
            self.snap.put(format!("/service/{key}"), value.to_vec());
        }

        fn delete(&mut self, key: &str) {
            self.snap.delete(&format!("/service/{key}"));
        }

        fn cluster(&mut self, scope: &str, port: u16, leader: Option<&str>) {
            for (i, name) in ["pg1", "pg2"].iter().enumerate() {
                // The leader's member key says primary: the fast path confirms it by that.
                let role = if leader == Some(*name) {
                    "primary"
                } else {
                    "replica"
                };
                self.put(
                    &format!("{scope}/members/{name}"),
                    &member(port + i as u16, role),
                );
            }
            if let Some(l) = leader {
                self.put(&format!("{scope}/leader"), l.as_bytes());
            }
        }

        async fn pass(&mut self) -> Result<PassOutcome, PassError> {
            let snap = self.snap.clone();
            self.engine.pass(&snap, false).await
        }

        fn read(&self, rel: &str) -> Option<String> {
            std::fs::read_to_string(self.dir.path().join(rel)).ok()
        }
    }

    #[tokio::test]
    async fn an_emptied_cluster_keeps_its_section_while_another_updates_in_the_same_pass() {
        let mut rig = Rig::new("");
        rig.cluster("a", 5432, Some("pg1"));
        rig.cluster("b", 6432, Some("pg1"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg1 members=pg1,pg2,\n"
        );
        // a's store empties while b gains a member: b's change goes in, a's section stays.
        for k in ["a/leader", "a/members/pg1", "a/members/pg2"] {
            rig.delete(k);
        }
        rig.put("b/members/pg3", &member(6434, "replica"));
        let err = rig.pass().await.unwrap_err();
        assert!(matches!(err, PassError::Guard(_)), "{err}");
        assert!(err.to_string().contains("\"a\""), "{err}");
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg1 members=pg1,pg2,pg3,\n"
        );
        assert_eq!(
            rig.read("conf.d/a.txt").unwrap(),
            "a port=5000 leader=pg1\n"
        );
        assert!(rig.engine.stats.outcome.written.contains(&"all".to_owned()));
    }

    #[tokio::test]
    async fn a_leaderless_cluster_keeps_its_last_leader_in_require_leader_files_only() {
        let mut rig = Rig::new("");
        rig.cluster("a", 5432, Some("pg1"));
        rig.cluster("b", 6432, Some("pg1"));
        rig.pass().await.unwrap();
        rig.delete("a/leader");
        rig.put("b/leader", b"pg2");
        rig.put("b/members/pg1", &member(6432, "replica"));
        rig.put("b/members/pg2", &member(6433, "primary"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("leaders.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\nb configured=true leader=pg2 members=pg1,pg2,\n",
            "a keeps its last leader, b follows its new one"
        );
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader= members=pg1,pg2,\nb configured=true leader=pg2 members=pg1,pg2,\n",
            "a template without require_leader shows what etcd shows"
        );
        assert_eq!(rig.engine.stats.leaderless, ["a"]);
    }

    #[tokio::test]
    async fn per_cluster_files_come_with_a_configured_cluster_and_go_only_through_the_guard() {
        let mut rig = Rig::new("");
        rig.cluster("a", 5432, Some("pg1"));
        rig.cluster("zz", 7432, Some("pg1"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("conf.d/a.txt").unwrap(),
            "a port=5000 leader=pg1\n"
        );
        assert_eq!(
            rig.read("conf.d/zz.txt"),
            None,
            "an unconfigured cluster gets no file"
        );
        assert!(rig.read("all.txt").unwrap().contains("zz configured=false"));
        // b appears: its file comes in the next pass.
        rig.cluster("b", 6432, Some("pg2"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("conf.d/b.txt").unwrap(),
            "b port=5010 leader=pg2\n"
        );
        // b's keys all go: refused, its file and section stay.
        for k in ["b/leader", "b/members/pg1", "b/members/pg2"] {
            rig.delete(k);
        }
        assert!(rig.pass().await.is_err());
        assert_eq!(
            rig.read("conf.d/b.txt").unwrap(),
            "b port=5010 leader=pg2\n"
        );
        assert!(rig
            .read("all.txt")
            .unwrap()
            .contains("b configured=true leader=pg2"));
    }

    #[tokio::test]
    async fn a_gone_cluster_accepted_by_the_guard_loses_its_file_and_section() {
        let mut rig = Rig::new("[guard]\nforce = true\n");
        rig.cluster("a", 5432, Some("pg1"));
        rig.cluster("b", 6432, Some("pg1"));
        rig.pass().await.unwrap();
        assert!(rig.read("conf.d/b.txt").is_some());
        for k in ["b/leader", "b/members/pg1", "b/members/pg2"] {
            rig.delete(k);
        }
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("conf.d/b.txt"),
            None,
            "the gone cluster's file is removed"
        );
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\n"
        );
        assert_eq!(
            rig.read("conf.d/a.txt").unwrap(),
            "a port=5000 leader=pg1\n"
        );
    }

    #[tokio::test]
    async fn a_listed_cluster_not_in_the_store_yet_fails_no_pass_and_comes_when_it_appears() {
        let mut rig = Rig::with("scopes = [\"a\", \"b\"]", "");
        rig.cluster("a", 5432, Some("pg1"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\n"
        );
        let b = rig
            .engine
            .reports
            .iter()
            .find(|r| r.id.scope == "b")
            .unwrap();
        assert!(b.refused.as_deref().unwrap().contains("0 valid member(s)"));
        rig.cluster("b", 6432, Some("pg1"));
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("conf.d/b.txt").unwrap(),
            "b port=5010 leader=pg1\n"
        );
    }

    #[tokio::test]
    async fn no_cluster_at_all_under_the_namespace_writes_no_empty_file() {
        let mut rig = Rig::new("");
        // An emptied store or a wrong namespace: nothing found.
        let err = rig.pass().await.unwrap_err();
        assert!(err.to_string().contains("etcd shows no cluster"), "{err}");
        assert_eq!(rig.read("all.txt"), None);
        // Only a bootstrapping cluster (a leader key, no member yet): still nothing to render.
        rig.put("a/leader", b"pg1");
        assert!(rig.pass().await.is_err());
        assert_eq!(rig.read("all.txt"), None);
        rig.cluster("a", 5432, Some("pg1"));
        rig.pass().await.unwrap();
        assert!(rig
            .read("all.txt")
            .unwrap()
            .starts_with("a configured=true"));
    }

    #[tokio::test]
    async fn after_a_restart_a_remembered_cluster_whose_keys_are_gone_keeps_its_section() {
        let mut rig = Rig::new("[guard]\nstate_file = \"members.json\"\n");
        rig.cluster("a", 5432, Some("pg1"));
        rig.cluster("b", 6432, Some("pg1"));
        rig.pass().await.unwrap();
        let both = rig.read("all.txt").unwrap();
        // haconfd restarts (a new engine, the guard's memory from its file) while b's keys are
        // gone and a changes.
        let settings = Arc::clone(rig.engine.settings());
        rig.engine = Engine::new(settings).unwrap();
        for k in ["b/leader", "b/members/pg1", "b/members/pg2"] {
            rig.delete(k);
        }
        rig.put("a/leader", b"pg2");
        let err = rig.pass().await.unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
        assert_eq!(
            rig.read("all.txt").unwrap(),
            both,
            "b's section was dropped"
        );
        assert_eq!(
            rig.read("conf.d/a.txt").unwrap(),
            "a port=5000 leader=pg2\n",
            "a's own file follows a"
        );
    }

    #[tokio::test]
    async fn citus_groups_render_under_one_cluster() {
        let mut rig = Rig::new("");
        for g in ["0", "1", "2"] {
            rig.cluster(
                &format!("a/{g}"),
                5432,
                Some(if g == "1" { "pg2" } else { "pg1" }),
            );
        }
        rig.pass().await.unwrap();
        assert_eq!(
            rig.read("all.txt").unwrap(),
            "a configured=true leader=pg1 members=pg1,pg2,\n",
            "the coordinator is the cluster's own leader and members"
        );
        let ctx = rig
            .engine
            .contexts(&rig.snap.clone(), Some("all"))
            .unwrap()
            .remove(0)
            .1;
        let groups: Vec<(u64, String)> = ctx["clusters"][0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["group"].as_u64().unwrap(),
                    g["leader_name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            [(0, "pg1".into()), (1, "pg2".into()), (2, "pg1".into())]
        );
        assert_eq!(ctx["clusters"][0]["citus"], true);
    }
}
