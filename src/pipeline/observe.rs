//! The first stage of a pass: which clusters there are, each one's model (kept while its keys do
//! not change), what changed since the previous pass, the failover fast path shown the change,
//! and the guard's verdict. Keeps, per cluster, what the next pass needs ([`ClusterState`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::cluster::ClusterState;
use super::found::{self, Found, Notes};
use super::report::{ClusterReport, PassError, PassStats};
use super::Setup;
use crate::failover;
use crate::guard::{self, GuardError};
use crate::model::{Cluster, ClusterId, MemberCache};
use crate::snapshot::Snapshot;
use crate::source::Clusters;

/// Models by scope, in scope order: one model for an ordinary cluster, one per group of a Citus
/// cluster.
pub(super) type ByScope = Vec<(String, Vec<Arc<Cluster>>)>;

/// Groups `(id, model)` pairs, in id order, by scope.
pub(super) fn by_scope<'a>(
    models: impl Iterator<Item = (&'a ClusterId, &'a Arc<Cluster>)>,
) -> ByScope {
    let mut out: ByScope = Vec::new();
    for (id, c) in models {
        match out.last_mut() {
            Some((scope, groups)) if *scope == id.scope => groups.push(Arc::clone(c)),
            _ => out.push((id.scope.clone(), vec![Arc::clone(c)])),
        }
    }
    out
}

/// What the clusters offer to render this pass (see [`Observe::views`]).
#[derive(Default)]
pub(super) struct Views {
    /// Every cluster's accepted view.
    pub(super) all: ByScope,
    /// Every cluster's last accepted view with a confirmed leader.
    pub(super) led: ByScope,
    /// Clusters refused at first sight whose sections the files hold (the guard remembers
    /// them).
    pub(super) held: Vec<String>,
    /// Whether some cluster's leader key names a member not yet confirmed to take writes.
    pub(super) gates_closed: bool,
    /// [`Views::led`] and [`Views::gates_closed`] for targets with `standby_leader =
    /// "follow"`: a standby cluster's leader confirmed through `/standby-leader` counts.
    pub(super) led_follow: ByScope,
    pub(super) follow_gates_closed: bool,
    /// Whether some cluster is a standby cluster (for the log).
    pub(super) standby: bool,
}

/// What the first half of a pass leaves to the second.
pub(super) struct Observed {
    /// The guard's refusals that fail the pass.
    pub(super) refusals: Vec<GuardError>,
    /// Clusters whose empty view the guard accepted: their files go.
    pub(super) gone: Vec<ClusterId>,
}

/// Every cluster's state, the guard's memory, and the way to the daemon for routers of clusters
/// found later.
pub(super) struct Observe {
    clusters: BTreeMap<ClusterId, ClusterState>,
    memory: guard::Memory,
    attach: Option<(
        tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        failover::Observers,
        crate::lag::LagObservers,
    )>,
    /// Whether the PgBouncer pauses an earlier run left were looked for.
    repaired: bool,
    /// Every cluster as the last pass saw it (a gone cluster too, once).
    reports: Vec<ClusterReport>,
    /// What the last pass warned about.
    notes: Notes,
}

impl Observe {
    pub(super) fn new(setup: &Setup) -> Observe {
        Observe {
            clusters: BTreeMap::new(),
            memory: guard::Memory::load(&setup.settings.guard),
            attach: None,
            repaired: false,
            reports: Vec::new(),
            notes: Notes::default(),
        }
    }

    /// New settings (hot reload): each cluster's router is rebuilt for them and takes over the
    /// state of a leader change under way.
    pub(super) fn replace(&mut self, setup: &Setup) {
        for (id, st) in &mut self.clusters {
            let mut fresh = ClusterState::new(setup, id);
            fresh.router.take_state_from(&mut st.router);
            st.router = fresh.router;
            fresh.lag.take_state_from(&mut st.lag);
            st.lag = fresh.lag;
        }
    }

    pub(super) fn attach(
        &mut self,
        notify: tokio::sync::mpsc::UnboundedSender<failover::Confirmed>,
        observers: failover::Observers,
        lag: crate::lag::LagObservers,
    ) {
        for st in self.clusters.values_mut() {
            st.router.attach(notify.clone(), observers.clone());
            st.lag.attach(lag.clone());
        }
        self.attach = Some((notify, observers, lag));
    }

    /// The clusters to model this pass: those the config names (or every one under the
    /// namespace), each ordinary cluster once and a Citus cluster once per group; with the ones
    /// known from earlier passes or the guard's memory that the store no longer shows, for the
    /// guard to judge.
    fn cluster_ids(&self, setup: &Setup, snap: &Snapshot) -> Vec<ClusterId> {
        self.found(setup, snap).ids
    }

    /// [`Observe::cluster_ids`], with those the store no longer shows and what to warn about
    /// (see [`found::find`]).
    fn found(&self, setup: &Setup, snap: &Snapshot) -> Found {
        found::find(setup, snap, &self.clusters, &self.memory)
    }

    /// Builds one cluster's model and logs skipped keys when the set of them changes (not on
    /// every heartbeat).
    fn model_of(
        &mut self,
        setup: &Setup,
        snap: &Snapshot,
        id: &ClusterId,
        reuse: bool,
    ) -> Arc<Cluster> {
        let st = self
            .clusters
            .entry(id.clone())
            .or_insert_with(|| ClusterState::new(setup, id));
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
        let ns = &setup.settings.etcd.namespace;
        let built = Cluster::build_with(snap, ns, id, &mut st.parsed_members);
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

    /// The model of the first cluster (the one of `etcd.scope`), for `render --context`.
    pub(super) fn first_model(&mut self, setup: &Setup, snap: &Snapshot, reuse: bool) -> Cluster {
        match self.cluster_ids(setup, snap).first() {
            Some(id) => (*self.model_of(setup, snap, id, reuse)).clone(),
            None => Cluster::build(snap, &setup.settings.etcd.namespace, "").cluster,
        }
    }

    /// Every cluster's model, unguarded, grouped by scope: for `render` and `check`.
    pub(super) fn models(
        &mut self,
        setup: &Setup,
        snap: &Snapshot,
        reuse: bool,
    ) -> Vec<(String, Vec<Arc<Cluster>>)> {
        let ids = self.cluster_ids(setup, snap);
        let models: Vec<(ClusterId, Arc<Cluster>)> = ids
            .into_iter()
            .map(|id| {
                let c = self.model_of(setup, snap, &id, reuse);
                (id, c)
            })
            .collect();
        by_scope(models.iter().map(|(id, c)| (id, c)))
    }

    /// Before the daemon's first pass: resumes the PgBouncer pauses an earlier run left (killed
    /// between `PAUSE` and `RESUME`), on every PgBouncer the fast path pauses: the whole pooler
    /// with one cluster, the databases of the configured clusters with several.
    async fn resume_left_paused(&mut self, setup: &Setup) {
        let s = &setup.settings;
        if self.repaired || self.attach.is_none() || !s.failover.enabled {
            return;
        }
        self.repaired = true;
        let databases: Option<Vec<String>> = setup.mode.is_many().then(|| {
            s.clusters
                .values()
                .flat_map(|c| c.databases.iter().cloned())
                .collect()
        });
        let consoles = s
            .targets
            .iter()
            .filter_map(|t| Some((t.name.as_str(), t.pgbouncer_admin()?)));
        crate::consumers::pgbouncer::resume_all_left_paused(consoles, databases.as_deref()).await;
    }

    /// The first half of a pass: every cluster modelled, diffed, shown to the fast path and
    /// judged by the guard. Fails when nothing can be rendered (every cluster refused, or none at
    /// all with several clusters).
    pub(super) async fn pass(
        &mut self,
        setup: &Setup,
        snap: &Snapshot,
        reuse: bool,
        stats: &mut PassStats,
    ) -> Result<Observed, PassError> {
        self.resume_left_paused(setup).await;
        let Found { ids, absent, notes } = self.found(setup, snap);
        self.warn(setup, notes);
        // Clusters no longer followed (the config changed): forgotten.
        self.clusters.retain(|id, _| ids.binary_search(id).is_ok());
        let mut refusals: Vec<(ClusterId, GuardError)> = Vec::new();
        let mut accepted_now = 0;
        let mut gone: Vec<ClusterId> = Vec::new();
        for id in &ids {
            let model = self.model_of(setup, snap, id, reuse);
            match self.step(setup, id, model).await {
                Verdict::Accepted { gone: true } => {
                    accepted_now += 1;
                    gone.push(id.clone());
                }
                Verdict::Accepted { gone: false } => accepted_now += 1,
                Verdict::Refused(Some(e)) => refusals.push((id.clone(), e)),
                Verdict::Refused(None) => {}
            }
            stats
                .events
                .extend(self.clusters[id].events.iter().cloned());
        }
        let left = self.forget_absent(setup, &absent, stats);
        refusals.retain(|(id, _)| !left.contains(id));
        let mut refusals: Vec<GuardError> = refusals.into_iter().map(|(_, e)| e).collect();
        self.reports = self.cluster_reports(setup);
        self.forget(setup, &gone);
        if accepted_now == 0 && !refusals.is_empty() {
            // Nothing new to render: every cluster keeps its last good files.
            return Err(refusals.swap_remove(0).into());
        }
        // Several clusters and not one with a view to render (none found, or every one refused
        // at first sight): rendering would write files with no cluster in them.
        let nothing = self.clusters.values().all(|st| st.accepted.is_none());
        if setup.mode.is_many() && !setup.settings.guard.force && nothing {
            return Err(GuardError::NoCluster {
                prefix: setup.settings.etcd.prefix(),
            }
            .into());
        }
        Ok(Observed { refusals, gone })
    }

    /// One cluster's step of a pass: its events, the fast path, the guard.
    async fn step(&mut self, setup: &Setup, id: &ClusterId, model: Arc<Cluster>) -> Verdict {
        let st = self.clusters.get_mut(id).expect("modelled above");
        if let Some((n, o, lag)) = &self.attach {
            if !st.router.is_attached() {
                st.router.attach(n.clone(), o.clone());
                st.lag.attach(lag.clone());
            }
        }
        if setup.mode.is_many() && !st.announced {
            st.announced = true;
            if setup.configured(&id.scope) {
                tracing::info!(cluster = %id, members = model.members.len(), leader = ?model.leader_name, "following cluster");
            } else {
                tracing::warn!(cluster = %id, members = model.members.len(), "following cluster with no [clusters.{}] table: it is in every template's `clusters` list with configured = false, and gets no port or file of its own", id.scope);
            }
        }
        let previous = st.seen.replace(Arc::clone(&model));
        let unchanged = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, &model));
        // Before the guard: a refused view (a failover's leaderless spell) still tells what
        // changed. Routing follows the leader key even while the files wait; the same model
        // again was observed already.
        st.events = if unchanged {
            Vec::new()
        } else {
            st.differ.diff(previous.as_deref(), &model)
        };
        for e in &st.events {
            let _scope = setup
                .mode
                .is_many()
                .then(|| tracing::info_span!("cluster", scope = %id).entered());
            e.log();
        }
        if !unchanged {
            st.router.observe(&model, &st.events);
            st.lag.observe(&model);
        }
        st.router.confirm_now(&model).await;
        st.router.watch_primary();
        match self.memory.admit(&setup.settings.guard, &model) {
            Ok(()) => {
                st.refused = None;
                let had_members = st.accepted.as_ref().is_some_and(|a| !a.members.is_empty());
                st.accepted = Some(Arc::clone(&model));
                if st.leader_gate(&model) == Some(true) {
                    st.led = Some(Arc::clone(&model));
                }
                if st.follow_gate(&model) == Some(true) {
                    st.led_follow = Some(Arc::clone(&model));
                }
                // Discovered clusters come and go with their keys; an emptied one goes only
                // when the guard lets it (`--force`, or a `min_members` of 0).
                let discovered = matches!(setup.settings.etcd.clusters, Clusters::Discover);
                Verdict::Accepted {
                    gone: model.members.is_empty() && had_members && discovered,
                }
            }
            Err(e) => {
                // Logged when the refusal starts or changes, not on every heartbeat.
                if setup.mode.is_many() && st.refused.as_ref() != Some(&e) {
                    tracing::warn!(cluster = %id, "{e}");
                }
                st.refused = Some(e.clone());
                // A cluster never accepted and not remembered (listed before it exists, or
                // found while it bootstraps) has no section in any file: nothing is kept back
                // for it, so the pass does not fail for it. /status shows it.
                Verdict::Refused(st.has_section(setup, &self.memory).then_some(e))
            }
        }
    }

    /// Warns about the stray keys of Citus scopes and the scopes that cannot be followed, when
    /// they change (not on every heartbeat).
    fn warn(&mut self, setup: &Setup, notes: Notes) {
        notes.warn_new(&self.notes, &setup.settings.etcd.namespace);
        self.notes = notes;
    }

    /// Rule 4 of the guard (see `guard.rs`): each discovered cluster without a table that the
    /// store no longer shows is timed; one gone for `guard.gone_after` is forgotten while
    /// another cluster shows a valid leader. Returns the clusters forgotten; counts those
    /// still timed in `stats.forgetting` (a pass must come when their time is up).
    fn forget_absent(
        &mut self,
        setup: &Setup,
        absent: &BTreeSet<ClusterId>,
        stats: &mut PassStats,
    ) -> BTreeSet<ClusterId> {
        let now = std::time::Instant::now();
        let after = setup.settings.guard.gone_after;
        let prefix = setup.settings.etcd.prefix();
        let live = self.clusters.iter().any(|(id, st)| {
            !absent.contains(id) && st.seen.as_ref().is_some_and(|c| c.leader().is_some())
        });
        let mut left = BTreeSet::new();
        for (id, st) in &mut self.clusters {
            if !absent.contains(id) || setup.configured(&id.scope) {
                st.absent_since = None;
                continue;
            }
            let since = *st.absent_since.get_or_insert_with(|| {
                tracing::info!(cluster = %id, gone_after = ?after, "no leader or member key of this cluster is left under {prefix}: it is forgotten after guard.gone_after while another cluster shows a leader");
                now
            });
            if live && now.duration_since(since) >= after {
                left.insert(id.clone());
            } else {
                stats.forgetting += 1;
            }
        }
        for id in &left {
            if let Some(st) = self.clusters.remove(id) {
                if let Some(c) = &st.seen {
                    self.memory.forget(&setup.settings.guard, c);
                }
                tracing::warn!(cluster = %id, gone_after = ?after, "cluster gone from the store for guard.gone_after: forgotten (its section, the guard's memory of it, its status)");
            }
        }
        left
    }

    /// Clusters gone from the store whose empty view the guard accepted: forgotten.
    fn forget(&mut self, setup: &Setup, gone: &[ClusterId]) {
        for id in gone {
            if let Some(st) = self.clusters.remove(id) {
                if let Some(c) = &st.seen {
                    self.memory.forget(&setup.settings.guard, c);
                }
                tracing::warn!(cluster = %id, "cluster gone from the store and its empty view accepted: its section is removed");
            }
        }
    }

    /// Every cluster the last pass saw, for status, metrics and hooks.
    pub(super) fn take_reports(&mut self) -> Vec<ClusterReport> {
        std::mem::take(&mut self.reports)
    }

    fn cluster_reports(&self, setup: &Setup) -> Vec<ClusterReport> {
        self.clusters
            .iter()
            .filter_map(|(id, st)| {
                Some(ClusterReport {
                    id: id.clone(),
                    model: Arc::clone(st.seen.as_ref()?),
                    events: st.events.clone(),
                    refused: st.refused.as_ref().map(ToString::to_string),
                    configured: setup.configured(&id.scope),
                    failover: st.router.view(),
                    lag: st.lag.view(),
                })
            })
            .collect()
    }

    /// What each target renders: every cluster's accepted view, or for `require_leader` targets
    /// (several clusters) its last view with a confirmed leader; the clusters whose section
    /// must not be dropped; and whether a leader change is under way anywhere. Clusters with no
    /// leader now whose sections keep their last leader go to `stats.leaderless`.
    pub(super) fn views(&self, setup: &Setup, stats: &mut PassStats) -> Views {
        let mut views = Views::default();
        let accepted = self
            .clusters
            .iter()
            .filter_map(|(id, st)| Some((id, st.accepted.as_ref()?)));
        views.all = by_scope(accepted);
        let led = self
            .clusters
            .iter()
            .filter_map(|(id, st)| Some((id, st.led.as_ref()?)));
        views.led = by_scope(led);
        let led_follow = self
            .clusters
            .iter()
            .filter_map(|(id, st)| Some((id, st.led_follow.as_ref()?)));
        views.led_follow = by_scope(led_follow);
        for (id, st) in &self.clusters {
            let seen = st.seen.as_deref();
            // Refused at first sight, but the files hold a section for it (the guard's memory
            // says so): templates over every cluster wait rather than drop it.
            if st.accepted.is_none() && seen.is_some_and(|c| self.memory.knows(c)) {
                views.held.push(id.to_string());
            }
            if let Some(c) = seen {
                views.gates_closed |= st.leader_gate(c) == Some(false);
                views.follow_gates_closed |= st.follow_gate(c) == Some(false);
                views.standby |= c.standby_leader().is_some();
                if setup.mode.is_many() && c.leader().is_none() && st.led.is_some() {
                    stats.leaderless.push(id.to_string());
                }
            }
        }
        views
    }

    /// Whether a HAProxy the fast path moves must keep its worker: a leader change is under way.
    pub(super) fn defers_reloads(&self) -> bool {
        self.clusters.values().any(|st| st.router.defers_reloads())
    }

    /// After a pass reloaded the PgBouncer of template `base` on a file for each confirmed
    /// leader: every cluster whose leader is confirmed ends its pause there.
    pub(super) async fn pgbouncer_settled(&self, base: &str) {
        for st in self.clusters.values() {
            if st.seen.as_deref().and_then(|c| st.leader_gate(c)) == Some(true) {
                st.router.pgbouncer_settled(base).await;
            }
        }
    }

    /// The clusters the guard refused whose sections the files keep: the pass failed for them.
    pub(super) fn refused_with_section<'a>(
        &'a self,
        setup: &'a Setup,
    ) -> impl Iterator<Item = &'a ClusterId> + 'a {
        self.clusters
            .iter()
            .filter(move |(_, st)| st.refused.is_some() && st.has_section(setup, &self.memory))
            .map(|(id, _)| id)
    }

    /// Undoes what every cluster's fast path holds, for a graceful stop.
    pub(super) async fn shutdown(&mut self) {
        for st in self.clusters.values_mut() {
            st.router.shutdown().await;
            st.lag.shutdown().await;
        }
    }
}

/// The guard's verdict on one cluster's view.
enum Verdict {
    /// Accepted; `gone` when it is an emptied discovered cluster whose section goes.
    Accepted { gone: bool },
    /// Refused; the error when the files hold a section for it (the pass fails for it).
    Refused(Option<GuardError>),
}
