//! One pass through the stages: snapshot → model → guard → render every target (reusing the last
//! render when nothing a template sees changed) → per consumer: stage and check its changed
//! files, swap them in, reload it once. A consumer whose target fails keeps its last good files
//! and is not reloaded; the other consumers go ahead. Every mode runs passes through [`Engine`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::{self, ApplyError};
use crate::config::{Reload, Settings, Target};
use crate::events::{ClusterEvent, Differ};
use crate::failover::{self, Router};
use crate::guard::{self, GuardError};
use crate::model::{Cluster, MemberCache, Skipped};
use crate::reload::{self, ReloadError};
use crate::render::{RenderError, Rendered, Renderer};
use crate::server_state;
use crate::snapshot::Snapshot;

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
}

/// A target's last render, kept to skip the next one when nothing its template sees changed.
#[derive(Debug, Clone)]
struct CachedRender {
    view: Arc<Cluster>,
    rendered: Arc<Rendered>,
}

/// The pass runner, holding compiled templates and what was last applied.
pub struct Engine {
    settings: Arc<Settings>,
    renderer: Renderer,
    /// The guard's memory of the views it accepted.
    memory: guard::Memory,
    /// What is kept about the cluster between passes.
    state: ClusterState,
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
    /// The model the last pass saw, accepted or refused: what etcd shows, for status and
    /// metrics.
    pub cluster: Option<Arc<Cluster>>,
}

/// What haconfd keeps about one Patroni cluster from one pass to the next: the members already
/// parsed, the keys it warned about, the previous model's events, and the failover fast path's
/// state.
struct ClusterState {
    /// Members parsed by earlier passes: a heartbeat parses one member, not all.
    parsed_members: MemberCache,
    /// The keys skipped by the last model, logged again only when they change.
    last_skipped: Vec<Skipped>,
    /// Turns the previous pass's model and this one into [`PassStats::events`].
    differ: Differ,
    /// The failover fast path: HAProxy moves, PgBouncer pauses, the confirmation gate.
    router: Router,
    /// The raw `leader` and `failover` values the last pass saw: a change is urgent.
    routing_keys: (Option<Vec<u8>>, Option<Vec<u8>>),
}

impl ClusterState {
    fn new(settings: &Settings) -> ClusterState {
        ClusterState {
            parsed_members: MemberCache::default(),
            last_skipped: Vec::new(),
            differ: Differ::default(),
            router: Router::new(&settings.failover, &settings.targets),
            routing_keys: (None, None),
        }
    }
}

impl Engine {
    /// Compiles the templates of `settings`.
    pub fn new(settings: Arc<Settings>) -> Result<Self, RenderError> {
        let renderer = Renderer::load(&settings.targets)?;
        let memory = guard::Memory::load(&settings.guard);
        let state = ClusterState::new(&settings);
        Ok(Self {
            settings,
            renderer,
            memory,
            state,
            unreloaded: Default::default(),
            swept: false,
            renders: Default::default(),
            reuse_renders: true,
            state_synced: Default::default(),
            stats: PassStats::default(),
            cluster: None,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Swaps in new settings and templates (hot reload), keeping what was last applied.
    pub fn replace(&mut self, settings: Arc<Settings>) -> Result<(), RenderError> {
        self.renderer = Renderer::load(&settings.targets)?;
        let mut router = Router::new(&settings.failover, &settings.targets);
        router.take_state_from(&mut self.state.router);
        self.state.router = router;
        self.settings = settings;
        self.swept = false;
        self.renders.clear();
        self.state_synced.clear();
        Ok(())
    }

    /// Connects the failover fast path to the daemon (see [`Router::attach`]).
    pub fn attach_router(
        &mut self,
        notify: tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        observers: failover::Observers,
    ) {
        self.state.router.attach(notify, observers);
    }

    /// The last leader change as the fast path handled it, live.
    pub fn failover_timeline(&self) -> failover::TimelineView {
        self.state.router.view()
    }

    /// Whether `snap` changes the `leader` or `failover` key since the last pass: such a pass
    /// runs at once, not after `min_interval`.
    pub fn is_urgent(&self, snap: &Snapshot) -> bool {
        let prefix = self.settings.etcd.prefix();
        let leader = snap.kvs.get(&format!("{prefix}leader"));
        let failover = snap.kvs.get(&format!("{prefix}failover"));
        leader != self.state.routing_keys.0.as_ref()
            || failover != self.state.routing_keys.1.as_ref()
    }

    /// Builds the model and logs skipped keys when the set of them changes (not on every
    /// heartbeat).
    pub fn model(&mut self, snap: &Snapshot) -> Cluster {
        if !self.reuse_renders {
            self.state.parsed_members = MemberCache::default();
        }
        let built = Cluster::build_with(
            snap,
            &self.settings.etcd.namespace,
            &self.settings.etcd.scope,
            &mut self.state.parsed_members,
        );
        if built.skipped != self.state.last_skipped {
            for s in &built.skipped {
                // A key may carry newlines meant to forge log lines: escape it. The reason quotes
                // every value it takes from etcd with `{:?}` already.
                tracing::warn!(key = %s.key.escape_debug(), reason = %s.reason, "ignoring key");
            }
            self.state.last_skipped = built.skipped;
        }
        built.cluster
    }

    /// Renders the selected targets (all when `only` is None) without the guard: for `render`.
    pub fn render(
        &mut self,
        snap: &Snapshot,
        only: Option<&str>,
    ) -> Result<Vec<Rendered>, RenderError> {
        let cluster = self.model(snap);
        let targets = select(&self.settings.targets, only)?;
        targets
            .iter()
            .map(|t| self.renderer.render(t, &cluster))
            .collect()
    }

    /// Renders, stages into `scratch` and runs every check without touching any destination: for
    /// `check`. Every target is checked; the first failure (in config order) is returned, the
    /// others logged. Errors name the target's real destination, not the scratch copy.
    pub async fn check_only(
        &mut self,
        snap: &Snapshot,
        scratch: &std::path::Path,
    ) -> Result<Vec<String>, PassError> {
        let cluster = self.model(snap);
        guard::check(&self.settings.guard, &cluster, None)?;
        let mut names = Vec::new();
        let mut failures = Vec::new();
        for (i, t) in self.settings.targets.iter().enumerate() {
            match self
                .check_one(t, &cluster, &scratch.join(i.to_string()))
                .await
            {
                Ok(()) => names.push(t.name.clone()),
                Err(e) => failures.push((i, e)),
            }
        }
        first_failure(&self.settings.targets, failures).map_or(Ok(names), Err)
    }

    async fn check_one(
        &self,
        t: &Target,
        cluster: &Cluster,
        dir: &std::path::Path,
    ) -> Result<(), PassError> {
        let r = self.renderer.render(t, cluster)?;
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

    /// One full pass. `reload` false writes files but signals nothing.
    ///
    /// Targets are applied per consumer (see [`consumers`]): the targets of one consumer are
    /// staged, checked, swapped in and reloaded together, all or nothing, and a consumer whose
    /// target does not render or is refused by its check keeps its last good files without
    /// holding the others back. The pass fails if any consumer failed: the error is the first
    /// failure in config order, the others are logged, and [`PassStats`] tells what was applied.
    pub async fn pass(&mut self, snap: &Snapshot, reload: bool) -> Result<PassOutcome, PassError> {
        let started = Instant::now();
        self.stats = PassStats::default();
        let cluster = Arc::new(self.model(snap));
        let previous = self.cluster.replace(Arc::clone(&cluster));
        // Before the guard: a refused view (a failover's leaderless spell) still tells what
        // changed.
        self.stats.events = self.state.differ.diff(previous.as_deref(), &cluster);
        for e in &self.stats.events {
            e.log();
        }
        let prefix = self.settings.etcd.prefix();
        self.state.routing_keys = (
            snap.kvs.get(&format!("{prefix}leader")).cloned(),
            snap.kvs.get(&format!("{prefix}failover")).cloned(),
        );
        // Before the guard too: routing follows the leader key even while the files wait.
        self.state.router.observe(&cluster, &self.stats.events);
        self.state.router.confirm_now(&cluster).await;
        self.memory.admit(&self.settings.guard, &cluster)?;
        let settings = Arc::clone(&self.settings);
        let rendered = self.render_targets(&settings.targets, &cluster);
        // PgBouncer-like targets point at a leader only once it takes writes.
        let gate_open = self.state.router.gate_open(&cluster);
        let awaiting: Vec<usize> = (0..settings.targets.len())
            .filter(|&i| !gate_open && settings.targets[i].require_leader)
            .collect();
        for &i in &awaiting {
            let t = &settings.targets[i];
            tracing::info!(target = %t.name, leader = ?cluster.leader_name, "the new leader does not take writes yet: this target keeps pointing where it did");
            self.stats.awaiting.push(t.name.clone());
        }
        self.stats.render = started.elapsed();
        let apply_start = Instant::now();

        if !self.swept {
            self.swept = true;
            for t in &settings.targets {
                apply::sweep_leftovers(&t.dest);
            }
        }
        let mut failures: Vec<(usize, PassError)> = Vec::new();
        // Each changed target with what its file held before: the known-good bytes to put back
        // if its consumer refuses the new ones.
        let mut changed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        // The replaced files are released after the reloads, off the latency path.
        let mut retired = Vec::new();
        let mut applied: Vec<Vec<usize>> = Vec::new();
        let mut outcome = PassOutcome::default();
        // Targets whose consumer did not take the new file (its reload failed).
        let mut not_live: Vec<usize> = Vec::new();
        let defer_haproxy = self.state.router.defers_reloads();
        // Consumers that point at the leader alone (PgBouncer) first: after a leader change
        // their clients wait (paused) for this pass, while HAProxy was moved already through its
        // runtime API and its check and reload would only delay them. Config order otherwise.
        let mut groups = consumers(&settings.targets);
        groups.sort_by_key(|g| !g.iter().any(|&i| settings.targets[i].require_leader));
        for mut group in groups {
            group.retain(|i| !awaiting.contains(i));
            if group.is_empty() {
                continue;
            }
            // A HAProxy the fast path moves keeps its file and worker until the new leader is
            // confirmed (see `Router::defers_reloads`).
            if defer_haproxy
                && group
                    .iter()
                    .any(|&i| settings.targets[i].server_state.is_some())
            {
                for &i in &group {
                    tracing::info!(target = %settings.targets[i].name, "leader change under way: this consumer is updated once the new primary is confirmed");
                    self.stats.awaiting.push(settings.targets[i].name.clone());
                }
                continue;
            }
            // Each consumer in turn: stage, check, swap, reload, and (PgBouncer) resume, before
            // the next one's check runs.
            let (c, r) = match swap_in(&settings, &group, &rendered).await {
                Ok(done) => done,
                Err(failure) => {
                    failures.push(failure);
                    continue;
                }
            };
            for (i, _) in &c {
                tracing::info!(target = %settings.targets[*i].name, "file updated");
                outcome.written.push(settings.targets[*i].name.clone());
            }
            changed.extend(c);
            retired.extend(r);
            applied.push(group.clone());
            if reload {
                self.reload_group(
                    &settings,
                    &group,
                    &rendered,
                    &cluster,
                    &changed,
                    &mut retired,
                    &mut outcome,
                    &mut not_live,
                    &mut failures,
                )
                .await;
            }
            // A PgBouncer now reading a file for the confirmed leader: resume it.
            if gate_open && cluster.leader().is_some() {
                for &i in &group {
                    let t = &settings.targets[i];
                    if t.require_leader && !not_live.contains(&i) && rendered[i].is_ok() {
                        self.state.router.pgbouncer_settled(&t.name).await;
                    }
                }
            }
        }

        // What each target's consumer reads now: its new render, where it was applied.
        let mut live: Vec<Option<&Rendered>> = vec![None; settings.targets.len()];
        for &i in applied.iter().flatten() {
            if !not_live.contains(&i) {
                live[i] = rendered[i].as_deref().ok();
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
        for (t, r) in settings.targets.iter().zip(&live) {
            let (Some(ss), Some(r)) = (&t.server_state, r) else {
                continue;
            };
            if outcome.reloaded.contains(&t.name)
                || (self.state_synced.contains(&t.name) && !self.stats.rendered.contains(&t.name))
            {
                continue;
            }
            let content = server_state::build(ss, &String::from_utf8_lossy(&r.bytes), &cluster, "");
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
        self.stats.apply = apply_start.elapsed();
        self.stats.failed = failures
            .iter()
            .map(|(i, e)| (settings.targets[*i].name.clone(), e.reason()))
            .collect();
        self.stats.outcome = outcome.clone();
        first_failure(&settings.targets, failures).map_or(Ok(outcome), Err)
    }

    /// Renders every target, or reuses its last render when nothing its template can see has
    /// changed since (see [`Cluster::same_for_templates`] and [`Renderer::reads_wal`]):
    /// rendering thousands of members costs tens of milliseconds, comparing them a fraction of
    /// one, and most etcd events are heartbeats. Sound because a render depends on the context
    /// alone (no clock or random functions are registered), and the context on the cluster and
    /// the settings, which [`Engine::replace`] resets the cache with.
    fn render_targets(
        &mut self,
        targets: &[Target],
        cluster: &Arc<Cluster>,
    ) -> Vec<Result<Arc<Rendered>, RenderError>> {
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let reads_wal = self.renderer.reads_wal(t);
            if let Some(c) = self.renders.get(&t.name).filter(|_| self.reuse_renders) {
                if c.view.same_for_templates(cluster, reads_wal) {
                    out.push(Ok(Arc::clone(&c.rendered)));
                    continue;
                }
            }
            self.stats.rendered.push(t.name.clone());
            let result = self.renderer.render(t, cluster).map(Arc::new);
            match &result {
                Ok(r) => {
                    self.renders.insert(
                        t.name.clone(),
                        CachedRender {
                            view: Arc::clone(cluster),
                            rendered: Arc::clone(r),
                        },
                    );
                }
                Err(_) => {
                    self.renders.remove(&t.name);
                }
            }
            out.push(result);
        }
        out
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
type StagedGroup = (Vec<(usize, Option<Vec<u8>>)>, Vec<apply::Staged>);

/// Stages, checks and swaps in the changed files of one consumer's targets (`group`), all or
/// none. Returns each changed target with its previous bytes, and what the swaps retired; or the
/// first failure with the index of the target it concerns. Reading, staging and swapping run on
/// the blocking pool; the checks are commands, awaited here.
async fn swap_in(
    settings: &Arc<Settings>,
    group: &[usize],
    rendered: &[Result<Arc<Rendered>, RenderError>],
) -> Result<(Vec<(usize, Option<Vec<u8>>)>, Vec<apply::Retired>), (usize, PassError)> {
    let mut wanted = Vec::with_capacity(group.len());
    for &i in group {
        let r = rendered[i].as_ref().map_err(|e| (i, e.clone().into()))?;
        wanted.push((i, Arc::clone(r)));
    }
    let s = Arc::clone(settings);
    // Stage everything before checking or swapping anything.
    let (changed, staged): StagedGroup = blocking(move || {
        let mut changed = Vec::new();
        let mut staged = Vec::new();
        for (i, r) in wanted {
            let t = &s.targets[i];
            let fail = |e: ApplyError| Box::new((i, PassError::from(e)));
            if apply::holds(&t.dest, &r.bytes).map_err(fail)? {
                continue;
            }
            let old = apply::current(&t.dest).map_err(fail)?;
            staged.push(apply::stage(t, &r).map_err(fail)?);
            changed.push((i, old));
        }
        Ok::<_, Box<(usize, PassError)>>((changed, staged))
    })
    .await
    .map_err(|b| *b)?;
    let targets = &settings.targets;
    for ((i, _), st) in changed.iter().zip(&staged) {
        apply::check(&targets[*i], st)
            .await
            .map_err(|e| (*i, e.into()))?;
    }
    let s = Arc::clone(settings);
    blocking(move || {
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
                            restore(&s.targets[*j], old);
                        }
                    }
                    return Err(Box::new((changed[k].0, PassError::from(e))));
                }
            }
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
    let mut ids = t.reload.as_ref().map(consumer_ids).unwrap_or_default();
    if let Some(a) = &t.pgbouncer_admin {
        ids.push(format!("pgbouncer console {}", a.config().address()));
    }
    ids
}

/// Whether the consumer a reload acts on is not there at all: its pidfile or master socket does
/// not exist (it has not started, or it stopped and cleaned up).
fn consumer_absent(t: &Target) -> bool {
    match &t.reload {
        Some(Reload::Signal { pidfile, .. }) => !pidfile.exists(),
        Some(Reload::MasterSocket { path, .. }) => !path.exists(),
        _ => false,
    }
}

/// Reloads the consumer of `t`: through PgBouncer's admin console when one is configured
/// (falling back to the `reload` action if the console fails), else by its `reload` action.
async fn reload_consumer(t: &Target) -> Result<(), ReloadError> {
    if let Some(admin) = &t.pgbouncer_admin {
        match admin.reload().await {
            Ok(()) => return Ok(()),
            Err(e) => match &t.reload {
                Some(_) => {
                    tracing::warn!(target = %t.name, error = %e, "PgBouncer's console did not take RELOAD; using the reload action")
                }
                None => return Err(ReloadError::Console(e.to_string())),
            },
        }
    }
    match &t.reload {
        Some(action) => reload::reload(action).await,
        None => Ok(()),
    }
}

fn consumer_ids(r: &Reload) -> Vec<String> {
    match r {
        Reload::Signal {
            pidfile,
            master_socket,
            ..
        } => std::iter::once(format!("pidfile {}", pidfile.display()))
            .chain(
                master_socket
                    .iter()
                    .map(|m| format!("master socket {}", m.display())),
            )
            .collect(),
        Reload::MasterSocket { path, .. } => vec![format!("master socket {}", path.display())],
        Reload::Command { argv, .. } => vec![format!("command {argv:?}")],
    }
}

impl Engine {
    /// Reloads one consumer whose files were swapped in (or whose last reload failed): once,
    /// however many of its files changed, with HAProxy's server state prepared first. A refused
    /// reload puts HAProxy's known-good file back.
    #[allow(clippy::too_many_arguments)]
    async fn reload_group(
        &mut self,
        settings: &Arc<Settings>,
        group: &[usize],
        rendered: &[Result<Arc<Rendered>, RenderError>],
        cluster: &Cluster,
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
                let t = &settings.targets[*i];
                t.reload.is_some() || t.pgbouncer_admin.is_some()
            })
            .filter(|i| {
                changed.iter().any(|(c, _)| c == i)
                    || self.unreloaded.contains(&settings.targets[*i].name)
            })
            .collect();
        let Some(&first) = due.first() else { return };
        for &i in &due {
            let t = &settings.targets[i];
            if let (Some(ss), Ok(r)) = (&t.server_state, &rendered[i]) {
                retired.extend(prepare_server_state(ss, r, cluster).await);
            }
        }
        match reload_consumer(&settings.targets[first]).await {
            Ok(()) => {
                for &i in &due {
                    let name = &settings.targets[i].name;
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
                if consumer_absent(&settings.targets[first])
                    && due
                        .iter()
                        .all(|i| changed.iter().any(|(c, old)| c == i && old.is_none())) =>
            {
                let t = &settings.targets[first];
                tracing::info!(target = %t.name, reason = %source, "first file written; its consumer is not running yet and reads it when it starts");
            }
            Err(source) => {
                let t = &settings.targets[first];
                tracing::error!(target = %t.name, error = %source, "reload failed");
                not_live.extend(due.iter().copied());
                for &i in &due {
                    self.unreloaded.insert(settings.targets[i].name.clone());
                    // HAProxy refused the new file and still runs the old one: put the old one
                    // back, so that the file on disk is the known-good one a restart would load.
                    // (When haconfd refused to signal — stale or foreign PID — the new file
                    // stays: a consumer starting now must read it.)
                    let old = changed.iter().find(|(c, _)| *c == i).map(|(_, o)| o);
                    if let (Some(Some(old)), true) = (old, refused_by_consumer(&source)) {
                        let (s, old) = (Arc::clone(settings), old.clone());
                        blocking(move || restore(&s.targets[i], &old)).await;
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
    ss: &crate::config::ServerStateConfig,
    rendered: &Rendered,
    cluster: &Cluster,
) -> Option<apply::Retired> {
    let live = match server_state::dump(&ss.stats_socket, Duration::from_secs(2)).await {
        Some(live) => live,
        None => {
            tracing::warn!(socket = %ss.stats_socket.display(), "cannot read `show servers state`; the state file carries etcd's view only");
            String::new()
        }
    };
    let content = server_state::build(
        ss,
        &String::from_utf8_lossy(&rendered.bytes),
        cluster,
        &live,
    );
    let file = ss.file.clone();
    blocking(move || server_state::swap_in(&file, &content))
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot write the server-state file before reload"))
        .ok()
}

/// Whether the consumer itself rejected the new file (HAProxy's failed reload), as opposed to
/// haconfd refusing to signal: only then is the file on disk known not to be in use.
fn refused_by_consumer(e: &ReloadError) -> bool {
    matches!(e, ReloadError::ReloadFailed { .. })
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
