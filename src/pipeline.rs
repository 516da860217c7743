//! One pass through the stages: snapshot → model → guard → render every target → stage and check
//! every changed file → swap them all in → reload what changed. If any target fails before the
//! swap, nothing is swapped and nothing is reloaded. Every mode runs passes through [`Engine`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::{self, ApplyError};
use crate::config::{Settings, Target};
use crate::guard::{self, GuardError};
use crate::model::{Cluster, Skipped};
use crate::reload::{self, ReloadError};
use crate::render::{RenderError, Rendered, Renderer};
use crate::server_state;
use crate::snapshot::Snapshot;

/// Why a pass failed. Every variant leaves the last good files in place.
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
}

/// The pass runner, holding compiled templates and what was last applied.
pub struct Engine {
    settings: Arc<Settings>,
    renderer: Renderer,
    /// The guard's memory of the views it accepted.
    memory: guard::Memory,
    last_skipped: Vec<Skipped>,
    /// Whether leftovers of earlier runs were swept (first writing pass; `render` and `check`
    /// never touch the destination directories).
    swept: bool,
    /// The promoted leader HAProxy was last moved to (runtime API), per the last pass.
    promoted: Option<String>,
    /// Targets whose last reload failed: reloaded on the next pass even if unchanged.
    unreloaded: std::collections::BTreeSet<String>,
    /// Timings of the last pass.
    pub stats: PassStats,
    /// The model the last pass saw, accepted or refused: what etcd shows, for status and
    /// metrics.
    pub cluster: Option<Arc<Cluster>>,
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
            last_skipped: Vec::new(),
            unreloaded: Default::default(),
            swept: false,
            promoted: None,
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
        self.settings = settings;
        self.swept = false;
        Ok(())
    }

    /// Builds the model and logs skipped keys when the set of them changes (not on every
    /// heartbeat).
    pub fn model(&mut self, snap: &Snapshot) -> Cluster {
        let built = Cluster::build(
            snap,
            &self.settings.etcd.namespace,
            &self.settings.etcd.scope,
        );
        if built.skipped != self.last_skipped {
            for s in &built.skipped {
                // A key may carry newlines meant to forge log lines: escape it. The reason quotes
                // every value it takes from etcd with `{:?}` already.
                tracing::warn!(key = %s.key.escape_debug(), reason = %s.reason, "ignoring key");
            }
            self.last_skipped = built.skipped;
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
    /// `check`. Returns the names checked.
    pub async fn check_only(
        &mut self,
        snap: &Snapshot,
        scratch: &std::path::Path,
    ) -> Result<Vec<String>, PassError> {
        let cluster = self.model(snap);
        guard::check(&self.settings.guard, &cluster, None)?;
        let rendered = self.renderer.render_all(&self.settings.targets, &cluster)?;
        let mut names = Vec::new();
        for (t, r) in self.settings.targets.iter().zip(&rendered) {
            let mut copy = t.clone();
            copy.dest = scratch.join(&t.name);
            copy.owner = None;
            copy.group = None;
            let staged = apply::stage(&copy, r)?;
            apply::check(&copy, &staged).await?;
            names.push(t.name.clone());
        }
        Ok(names)
    }

    /// One full pass. `reload` false writes files but signals nothing.
    pub async fn pass(&mut self, snap: &Snapshot, reload: bool) -> Result<PassOutcome, PassError> {
        let started = Instant::now();
        self.stats = PassStats::default();
        let cluster = Arc::new(self.model(snap));
        self.cluster = Some(Arc::clone(&cluster));
        self.memory.admit(&self.settings.guard, &cluster)?;
        let rendered = self.renderer.render_all(&self.settings.targets, &cluster)?;
        self.stats.render = started.elapsed();
        let apply_start = Instant::now();

        let settings = Arc::clone(&self.settings);
        if !self.swept {
            self.swept = true;
            for t in &settings.targets {
                apply::sweep_leftovers(&t.dest);
            }
        }
        // Each changed target with what its file held before: the known-good bytes to put back
        // if its consumer refuses the new ones.
        let mut changed: Vec<(&Target, &Rendered)> = Vec::new();
        let mut previous: Vec<Option<Vec<u8>>> = Vec::new();
        for (t, r) in settings.targets.iter().zip(&rendered) {
            let old = apply::current(&t.dest)?;
            if old.as_deref() != Some(r.bytes.as_slice()) {
                changed.push((t, r));
                previous.push(old);
            }
        }
        // Stage and check everything before swapping anything in.
        let mut staged = Vec::with_capacity(changed.len());
        for (t, r) in &changed {
            staged.push(apply::stage(t, r)?);
        }
        for ((t, _), s) in changed.iter().zip(&staged) {
            apply::check(t, s).await?;
        }
        // The replaced files are released after the reloads, off the latency path.
        let mut retired = Vec::with_capacity(staged.len());
        for s in staged {
            retired.push(apply::commit(s)?);
        }
        let mut outcome = PassOutcome {
            written: changed.iter().map(|(t, _)| t.name.clone()).collect(),
            reloaded: Vec::new(),
        };
        for name in &outcome.written {
            tracing::info!(target = %name, "file updated");
        }

        let mut first_error = None;
        if reload {
            // Changed targets, and those whose last reload failed although their file is now up
            // to date: a refused PID must not turn into "nothing changed" on the retry.
            let due: Vec<(&Target, &Rendered, Option<&Vec<u8>>)> = settings
                .targets
                .iter()
                .zip(&rendered)
                .filter_map(
                    |(t, r)| match changed.iter().position(|(c, _)| c.name == t.name) {
                        Some(i) => Some((t, r, previous[i].as_ref())),
                        None if self.unreloaded.contains(&t.name) => Some((t, r, None)),
                        None => None,
                    },
                )
                .collect();
            for (t, r, old) in due {
                let Some(action) = &t.reload else { continue };
                if let Some(ss) = &t.server_state {
                    retired.extend(prepare_server_state(ss, r, &cluster).await);
                }
                match reload::reload(action).await {
                    Ok(()) => {
                        tracing::info!(target = %t.name, "reloaded");
                        self.unreloaded.remove(&t.name);
                        outcome.reloaded.push(t.name.clone());
                    }
                    Err(source) => {
                        tracing::error!(target = %t.name, error = %source, "reload failed");
                        self.unreloaded.insert(t.name.clone());
                        // HAProxy refused the new file and still runs the old one: put the old
                        // one back, so that the file on disk is the known-good one a restart
                        // would load. (When haconfd refused to signal — stale or foreign PID —
                        // the new file stays: a consumer starting now must read it.)
                        if let (Some(old), true) = (old, refused_by_consumer(&source)) {
                            let known_good = Rendered {
                                name: t.name.clone(),
                                bytes: old.clone(),
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
                        first_error.get_or_insert(PassError::Reload {
                            target: t.name.clone(),
                            source,
                        });
                    }
                }
            }
        }
        self.move_to_new_leader(&settings, &rendered, &cluster)
            .await;
        for r in retired {
            if let Err(e) = r.finish() {
                tracing::warn!(error = %e, "cannot fsync the directory after the swap");
            }
        }
        // Bookkeeping after the reloads, off the latency path: between reloads, the state file
        // holds etcd's view, for cold starts. Not for a target reloaded just now: its new worker
        // may still be reading the merged file.
        for (t, r) in settings.targets.iter().zip(&rendered) {
            if outcome.reloaded.contains(&t.name) {
                continue;
            }
            if let Some(ss) = &t.server_state {
                let content =
                    server_state::build(ss, &String::from_utf8_lossy(&r.bytes), &cluster, "");
                if let Err(e) = server_state::write_if_changed(&ss.file, &content) {
                    tracing::warn!(file = %ss.file.display(), error = %e, "cannot write the server-state file");
                }
            }
        }
        self.stats.apply = apply_start.elapsed();
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }
}

impl Engine {
    /// When a new leader is promoted, tells HAProxy at once through the runtime API rather than
    /// leaving it to the health checks (about 2–5 s at `inter 1s rise 2`). Only on a change of
    /// promoted leader after a first one was seen: haconfd's own start does not force anything.
    async fn move_to_new_leader(
        &mut self,
        settings: &Settings,
        rendered: &[Rendered],
        cluster: &Cluster,
    ) {
        let promoted = cluster
            .leader()
            .filter(|m| matches!(m.role.as_str(), "master" | "primary"))
            .map(|m| m.name.clone());
        let Some(now) = promoted else { return };
        let before = self.promoted.replace(now.clone());
        if before.is_none() || before.as_deref() == Some(now.as_str()) {
            return;
        }
        for (t, r) in settings.targets.iter().zip(rendered) {
            let Some(ss) = &t.server_state else { continue };
            let cmds = server_state::leader_moved_commands(
                ss,
                &String::from_utf8_lossy(&r.bytes),
                cluster,
            );
            if cmds.is_empty() {
                continue;
            }
            match server_state::apply_commands(&ss.stats_socket, &cmds, Duration::from_secs(2))
                .await
            {
                Ok(answer) if answer.trim().is_empty() => {
                    tracing::info!(target = %t.name, leader = %now, "moved HAProxy to the new leader through the runtime API")
                }
                Ok(answer) => {
                    tracing::warn!(target = %t.name, leader = %now, answer = %answer.trim(), "HAProxy answered the runtime API; its checks will settle the servers")
                }
                Err(e) => {
                    tracing::warn!(target = %t.name, socket = %ss.stats_socket.display(), error = %e, "cannot reach HAProxy's runtime API; its checks will move it to the new leader")
                }
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
    server_state::swap_in(&ss.file, &content)
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
