//! The fourth stage of a pass: per consumer, its changed files staged, checked and swapped in,
//! all or none, then the consumer told once however many of its files changed (HAProxy's
//! server state prepared first). A consumer whose file does not render, is refused by its check
//! or cannot be swapped keeps its last good files and does not hold the others back; a consumer
//! that refuses its new file gets its known-good file back.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::observe::{Observed, Views};
use super::plan::Plan;
use super::render::Rendering;
use super::report::{PassError, PassOutcome, PassStats};
use super::swap::{blocking, first_failure, restore, swap_in};
use super::Setup;
use crate::apply;
use crate::consumers::haproxy::membership::{self, Layout};
use crate::consumers::haproxy::server_state;
use crate::consumers::haproxy::settings::Membership;
use crate::files::Retired;
use crate::guard::GuardError;
use crate::model::Cluster;
use crate::target::Target;

/// What is kept about the consumers from one pass to the next.
#[derive(Default)]
pub(super) struct Consumers {
    /// Whether leftovers of earlier runs were swept (first writing pass; `render` and `check`
    /// never touch the destination directories).
    swept: bool,
    /// Targets whose last reload failed: reloaded on the next pass even if unchanged.
    unreloaded: BTreeSet<String>,
    /// Targets whose server-state file holds etcd's view of their current render.
    state_synced: BTreeSet<String>,
    /// Targets whose last swap failed (a check refused the file, or it could not be written):
    /// a member change reaches their HAProxy only once the file passed, not meanwhile.
    refused: BTreeSet<String>,
    /// Per HAProxy target, the servers its runtime member changes parked in maintenance
    /// (HAProxy before 2.9 deletes no server safely).
    parked: BTreeMap<String, membership::Parked>,
}

impl Consumers {
    /// Reloads `target`'s consumer at the next pass even if its file does not change: it has
    /// not read the file on disk.
    pub(super) fn mark_unread(&mut self, target: &str) {
        self.unreloaded.insert(target.to_owned());
    }

    /// At the first pass that may write: removes what an earlier run left beside each file.
    pub(super) fn sweep_once(&mut self, plan: &Plan) {
        if !self.swept {
            self.swept = true;
            for t in plan.targets.iter() {
                apply::sweep_leftovers(&t.dest);
            }
        }
    }
}

/// One pass's commit: what it rendered, changed, retired and reloaded, and what failed.
pub(super) struct Run<'p> {
    plan: &'p Plan,
    /// Each planned target's render, once its consumer's turn came.
    pub(super) rendered: Vec<Rendering>,
    pub(super) render_time: Duration,
    started: Instant,
    failures: Vec<(usize, PassError)>,
    /// Each changed target with what its file held before: the known-good bytes to put back if
    /// its consumer refuses the new ones.
    changed: Vec<(usize, Option<Vec<u8>>)>,
    /// The replaced files, released after the reloads, off the latency path.
    retired: Vec<Retired>,
    applied: Vec<Vec<usize>>,
    outcome: PassOutcome,
    /// Targets whose consumer did not take the new file (its reload failed).
    not_live: Vec<usize>,
    /// What HAProxy's server state is built from: each ordinary cluster's accepted view.
    ss_views: Vec<Arc<Cluster>>,
    /// Targets whose member change HAProxy took through its runtime API in this pass: not
    /// reloaded.
    runtime_done: Vec<usize>,
}

/// A member change for one HAProxy target, to send through its runtime API.
struct RuntimeWork {
    target: usize,
    socket: std::path::PathBuf,
    old: Layout,
    new: Layout,
    changes: Vec<(membership::Change, membership::Rules)>,
    /// The servers parked on this HAProxy by earlier changes.
    parked: membership::Parked,
    /// Whether a removed server is deleted (HAProxy 2.9 and later) or parked.
    deletes: bool,
}

impl<'p> Run<'p> {
    pub(super) fn new(plan: &'p Plan, seen: &Observed, views: &Views) -> Run<'p> {
        let failures = match seen.refusals.first() {
            Some(e) => plan
                .held_back
                .iter()
                .map(|&i| (i, PassError::from(e.clone())))
                .collect(),
            None => Vec::new(),
        };
        Run {
            plan,
            rendered: vec![None; plan.items.len()],
            render_time: Duration::ZERO,
            started: Instant::now(),
            failures,
            changed: Vec::new(),
            retired: Vec::new(),
            applied: Vec::new(),
            outcome: PassOutcome::default(),
            not_live: Vec::new(),
            ss_views: views
                .all
                .iter()
                .flat_map(|(_, g)| g.iter().filter(|c| c.group.is_none()).cloned())
                .collect(),
            runtime_done: Vec::new(),
        }
    }

    fn targets(&self) -> &'p Arc<Vec<Target>> {
        &self.plan.targets
    }

    /// Whether the pass takes this consumer now. Not when one of its targets is held back (all
    /// or nothing within a consumer), nor a HAProxy the fast path moves while a leader change
    /// is under way: it keeps its file and worker until the new leader is confirmed (see
    /// [`crate::failover::Router::defers_reloads`]).
    pub(super) fn admits(
        &self,
        group: &[usize],
        defer_haproxy: bool,
        stats: &mut PassStats,
    ) -> bool {
        if group.iter().any(|i| self.plan.held_back.contains(i)) {
            return false;
        }
        let targets = self.targets();
        if defer_haproxy && group.iter().any(|&i| targets[i].server_state().is_some()) {
            for &i in group {
                tracing::info!(target = %targets[i].name, "leader change under way: this consumer is updated once the new primary is confirmed");
                stats.awaiting.push(targets[i].name.clone());
            }
            return false;
        }
        true
    }

    /// Stages, checks and swaps in the consumer's changed files, all or none. False when it
    /// failed (the failure is recorded; nothing of the group was swapped).
    ///
    /// A HAProxy whose new files differ from the ones it runs only in the servers of existing
    /// backends takes the change through its runtime API meanwhile (`tell`: the pass may signal
    /// consumers), while the files are checked: the check of a member change costs no latency.
    /// Should the check refuse the file HAProxy already took, HAProxy is reloaded onto its
    /// known-good file, which stays in place, and runs exactly that again.
    pub(super) async fn swap(
        &mut self,
        group: &[usize],
        setup: &Setup,
        state: &mut Consumers,
        tell: bool,
    ) -> bool {
        let targets = Arc::clone(self.targets());
        let removals = Arc::clone(&self.plan.removals);
        let work = match tell {
            true => self.runtime_work(group, setup, state).await,
            false => None,
        };
        // After a refused file, the next member change waits for the check: a file that keeps
        // failing must not cost a reload at every retry.
        let meanwhile = !group
            .iter()
            .any(|&i| state.refused.contains(&targets[i].name));
        let sending = async {
            match &work {
                Some(w) if meanwhile => Some(send_runtime(w).await),
                _ => None,
            }
        };
        let (swapped, mut sent) =
            tokio::join!(swap_in(&targets, group, &self.rendered, &removals), sending);
        let (changed, retired) = match swapped {
            Ok(done) => done,
            Err(failure) => {
                // Whatever HAProxy took of the change (all of it, or part before a refusal)
                // goes: it is reloaded onto the last good file.
                if sent.is_some() {
                    self.revert_runtime(group, setup).await;
                }
                for &i in group {
                    state.refused.insert(targets[i].name.clone());
                }
                self.failures.push(failure);
                return false;
            }
        };
        for &i in group {
            state.refused.remove(&targets[i].name);
        }
        if let (None, Some(w)) = (&sent, &work) {
            sent = Some(send_runtime(w).await);
        }
        for (i, _) in &changed {
            let t = &targets[*i];
            if removals.contains(i) {
                tracing::warn!(target = %t.name, dest = %t.dest.display(), "file of a cluster that is gone removed");
            } else {
                tracing::info!(target = %t.name, "file updated");
            }
            self.outcome.written.push(t.name.clone());
        }
        self.changed.extend(changed);
        self.retired.extend(retired);
        self.applied.push(group.to_vec());
        match (sent, work) {
            (Some(Ok(parked)), Some(work)) => {
                for (w, parked) in work.into_iter().zip(parked) {
                    let t = &targets[w.target];
                    tracing::info!(target = %t.name, changes = w.changes.len(), parked = parked.len(), "member change applied through HAProxy's runtime API, no reload");
                    state.parked.insert(t.name.clone(), parked);
                    self.outcome.runtime.push(t.name.clone());
                    self.runtime_done.push(w.target);
                    self.keep_loaded_time(t).await;
                }
            }
            (Some(Err((i, why))), _) => {
                let t = &targets[i];
                tracing::warn!(target = %t.name, reason = %why, "member change not taken through HAProxy's runtime API: reloading instead");
                self.outcome.fallbacks.push(t.name.clone());
            }
            _ => {}
        }
        true
    }

    /// The member changes of the group's HAProxy targets, when they are all a runtime change
    /// can carry: every changed target is a HAProxy with `server_state.membership = "runtime"`
    /// that has read its file (its last reload did not fail), and its new file differs from the
    /// one on disk only in the servers of existing backends. None otherwise: the group reloads.
    async fn runtime_work(
        &self,
        group: &[usize],
        setup: &Setup,
        state: &Consumers,
    ) -> Option<Vec<RuntimeWork>> {
        let targets = self.targets();
        let mut work = Vec::new();
        for &i in group {
            let t = &targets[i];
            let new = self.rendered[i].as_ref()?.as_ref().ok()?;
            let dest = t.dest.clone();
            let old = blocking(move || apply::current(&dest)).await.ok()??;
            if old == new.bytes {
                continue;
            }
            let ss = t
                .server_state()
                .filter(|ss| ss.membership == Membership::Runtime)?;
            if self.plan.removals.contains(&i) || state.unreloaded.contains(&t.name) {
                return None;
            }
            let old = Layout::parse(&String::from_utf8_lossy(&old));
            let new = Layout::parse(&String::from_utf8_lossy(&new.bytes));
            let changes = match membership::diff(&old, &new) {
                Ok(c) => c,
                Err(why) => {
                    tracing::debug!(target = %t.name, reason = %why, "not only members changed: reloading");
                    return None;
                }
            };
            let deletes = !changes.iter().any(membership::Change::is_removal)
                || membership::deletes_safely(&ss.stats_socket).await;
            if !deletes {
                tracing::debug!(target = %t.name, "a server leaves: parked in maintenance until the next reload (this HAProxy is older than 2.9, whose `del server` can crash a worker that still has streams on the server)");
            }
            let per = server_state::per_cluster(ss, setup.mode.is_many(), &self.ss_views);
            let pairs = server_state::pairs(&per, &self.ss_views);
            let owners = server_state::Owners::new(&pairs);
            let changes = changes
                .into_iter()
                .map(|c| {
                    let (backend, server) = c.server();
                    let rules = owners.rules_for(backend, server);
                    (c, rules)
                })
                .collect();
            work.push(RuntimeWork {
                target: i,
                socket: ss.stats_socket.clone(),
                old,
                new,
                changes,
                parked: state.parked.get(&t.name).cloned().unwrap_or_default(),
                deletes,
            });
        }
        (!work.is_empty()).then_some(work)
    }

    /// HAProxy was sent a member change whose file its check then refused: it is reloaded onto
    /// the known-good file still in place (with its server state prepared), so that it runs
    /// what the file says. A failure leaves it due for a reload at the next pass.
    async fn revert_runtime(&mut self, group: &[usize], setup: &Setup) {
        let targets = Arc::clone(self.targets());
        let Some(&first) = group.first() else { return };
        for &i in group {
            let dest = targets[i].dest.clone();
            let on_disk = blocking(move || apply::current(&dest)).await;
            if let (Some(ss), Ok(Some(bytes))) = (targets[i].server_state(), on_disk) {
                let per_scope = setup.mode.is_many();
                let prepared = server_state::prepare(ss, per_scope, &bytes, &self.ss_views).await;
                self.retired.extend(prepared);
            }
        }
        let t = &targets[first];
        tracing::warn!(target = %t.name, "HAProxy took a member change whose file then failed its check: reloading HAProxy onto the last good file");
        match t.consumer.reload(&t.name, t.reload.as_ref()).await {
            Ok(()) => self.outcome.reloaded.push(t.name.clone()),
            Err(e) => {
                tracing::error!(target = %t.name, error = %e, "reload onto the last good file failed");
                self.not_live.extend(group.iter().copied());
            }
        }
    }

    /// The `[[template]]`s of the consumer's PgBouncer files now live for the confirmed leader:
    /// their pauses may end.
    pub(super) fn settled_pgbouncers(&self, group: &[usize]) -> Vec<String> {
        let mut bases: Vec<String> = group
            .iter()
            .filter(|&&i| {
                let ok = self.rendered[i].as_ref().is_some_and(|r| r.is_ok());
                self.targets()[i].require_leader && !self.not_live.contains(&i) && ok
            })
            .map(|&i| self.plan.items[i].0.base.clone())
            .collect();
        bases.dedup();
        bases
    }

    /// Reloads one consumer whose files were swapped in (or whose last reload failed): once,
    /// however many of its files changed, with HAProxy's server state prepared first. A refused
    /// reload puts HAProxy's known-good file back.
    pub(super) async fn reload(&mut self, group: &[usize], setup: &Setup, state: &mut Consumers) {
        let targets = Arc::clone(self.targets());
        // Changed targets, and those whose last reload failed although their file is now up to
        // date: a refused PID must not turn into "nothing changed" on the retry.
        let due: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| targets[i].consumer.is_told(targets[i].reload.as_ref()))
            .filter(|i| {
                (self.changed.iter().any(|(c, _)| c == i) && !self.runtime_done.contains(i))
                    || state.unreloaded.contains(&targets[*i].name)
            })
            .collect();
        let Some(&first) = due.first() else { return };
        for &i in &due {
            if let (Some(ss), Some(Ok(r))) = (targets[i].server_state(), &self.rendered[i]) {
                let per_scope = setup.mode.is_many();
                let prepared = server_state::prepare(ss, per_scope, &r.bytes, &self.ss_views).await;
                self.retired.extend(prepared);
            }
        }
        let t = &targets[first];
        let first_files = due
            .iter()
            .all(|i| self.changed.iter().any(|(c, old)| c == i && old.is_none()));
        match t.consumer.reload(&t.name, t.reload.as_ref()).await {
            Ok(()) => {
                for &i in &due {
                    let name = &targets[i].name;
                    tracing::info!(target = %name, "reloaded");
                    state.unreloaded.remove(name);
                    state.state_synced.remove(name);
                    self.outcome.reloaded.push(name.clone());
                }
            }
            // A cold start: the consumer has not started yet (no pidfile, no master socket) and
            // these files did not exist before this pass. It reads them when it starts; nothing
            // to reload, nothing failed (a sidecar whose HAProxy waits for haconfd's first file).
            Err(source) if crate::consumers::absent(t.reload.as_ref()) && first_files => {
                tracing::info!(target = %t.name, reason = %source, "first file written; its consumer is not running yet and reads it when it starts");
            }
            Err(source) => {
                tracing::error!(target = %t.name, error = %source, "reload failed");
                self.not_live.extend(due.iter().copied());
                for &i in &due {
                    state.unreloaded.insert(targets[i].name.clone());
                    self.put_back(i, &source).await;
                }
                let target = t.name.clone();
                self.failures
                    .push((first, PassError::Reload { target, source }));
            }
        }
    }

    /// After a runtime change, the file keeps the modification time of the one HAProxy's
    /// worker loaded: at haconfd's next start, a file newer than the worker means one HAProxy
    /// has not read (see [`crate::consumers::haproxy::loaded`]), and the servers changed since
    /// are already live. A failure only costs one reload at that start.
    async fn keep_loaded_time(&self, t: &Target) {
        let Some(when) = self
            .retired
            .iter()
            .find(|r| r.dest() == t.dest)
            .and_then(|r| r.replaced_modified())
        else {
            return;
        };
        let dest = t.dest.clone();
        let set = blocking(move || {
            std::fs::File::options()
                .write(true)
                .open(&dest)
                .and_then(|f| f.set_modified(when))
        })
        .await;
        if let Err(e) = set {
            tracing::debug!(target = %t.name, dest = %t.dest.display(), error = %e, "cannot keep the file's modification time; haconfd's next start reloads HAProxy once");
        }
    }

    /// HAProxy refused the new file and still runs the old one: the old one goes back, so that
    /// the file on disk is the known-good one a restart would load. (When haconfd refused to
    /// signal — stale or foreign PID — the new file stays: a consumer starting now must read
    /// it.)
    async fn put_back(&self, i: usize, source: &crate::consumers::reload::ReloadError) {
        let old = self.changed.iter().find(|(c, _)| *c == i).map(|(_, o)| o);
        if let (Some(Some(old)), true) = (old, crate::consumers::refused_new_file(source)) {
            let (s, old) = (Arc::clone(self.targets()), old.clone());
            blocking(move || restore(&s[i], &old)).await;
        }
    }

    /// After every consumer's turn: the replaced files released, HAProxy's server-state files
    /// brought to etcd's view between reloads, and the pass's timings and failures recorded.
    pub(super) async fn finish(
        &mut self,
        setup: &Setup,
        state: &mut Consumers,
        stats: &mut PassStats,
    ) {
        let retired = std::mem::take(&mut self.retired);
        blocking(move || {
            for r in retired {
                if let Err(e) = r.finish() {
                    tracing::warn!(error = %e, "cannot fsync the directory after the swap");
                }
            }
        })
        .await;
        self.sync_server_state(setup, state, stats).await;
        stats.render += self.render_time;
        // Rendered as each consumer's turn came; listed in config order.
        let order: std::collections::HashMap<&str, usize> = self
            .plan
            .items
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (p.target.name.as_str(), i))
            .collect();
        stats
            .rendered
            .sort_by_key(|n| order.get(n.as_str()).copied());
        stats.apply = self.started.elapsed().saturating_sub(self.render_time);
        let targets = self.targets();
        stats.failed = self
            .failures
            .iter()
            .map(|(i, e)| (targets[*i].name.clone(), e.reason()))
            .collect();
        stats.outcome = self.outcome.clone();
    }

    /// Bookkeeping after the reloads, off the latency path: between reloads, the state file
    /// holds etcd's view, for cold starts. Not for a target reloaded just now: its new worker
    /// may still be reading the merged file. Built again only when the target was rendered
    /// again: the state depends on nothing a heartbeat changes.
    async fn sync_server_state(&self, setup: &Setup, state: &mut Consumers, stats: &PassStats) {
        let targets = self.targets();
        for &i in self.applied.iter().flatten() {
            let t = &targets[i];
            let live = self.rendered[i].as_ref().and_then(|r| r.as_deref().ok());
            let (Some(ss), Some(r), false) = (t.server_state(), live, self.not_live.contains(&i))
            else {
                continue;
            };
            if self.outcome.reloaded.contains(&t.name)
                || (state.state_synced.contains(&t.name) && !stats.rendered.contains(&t.name))
            {
                continue;
            }
            let per_scope = setup.mode.is_many();
            let content = server_state::for_clusters(ss, per_scope, &r.bytes, &self.ss_views, "");
            let file = ss.file.clone();
            match blocking(move || server_state::write_if_changed(&file, &content)).await {
                Ok(_) => {
                    state.state_synced.insert(t.name.clone());
                }
                Err(e) => {
                    state.state_synced.remove(&t.name);
                    tracing::warn!(file = %ss.file.display(), error = %e, "cannot write the server-state file");
                }
            }
        }
    }

    /// The pass's result: the first failure in config order, else the first refusal of a
    /// cluster whose section the files keep, else what was applied.
    pub(super) fn result(self, mut refusals: Vec<GuardError>) -> Result<PassOutcome, PassError> {
        match first_failure(self.targets(), self.failures) {
            Some(e) => Err(e),
            None if !refusals.is_empty() => Err(refusals.swap_remove(0).into()),
            None => Ok(self.outcome),
        }
    }
}

/// Sends each target's member change through its HAProxy's runtime API (see
/// [`membership::apply`]): the servers each then has parked, or the first that HAProxy did not
/// take, with why.
async fn send_runtime(work: &[RuntimeWork]) -> Result<Vec<membership::Parked>, (usize, String)> {
    let mut parked = Vec::with_capacity(work.len());
    for w in work {
        let p = membership::apply(&w.socket, &w.old, &w.new, &w.changes, &w.parked, w.deletes)
            .await
            .map_err(|why| (w.target, why))?;
        parked.push(p);
    }
    Ok(parked)
}
