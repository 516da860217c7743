//! Prometheus metrics through prometheus-client: counters and histograms updated after each pass,
//! and the cluster view (members by role and state, leader, lag) taken from [`Status`] at scrape
//! time, so a member that left stops being reported at once. The view is what etcd showed the
//! last pass, also when that pass was refused: during a failover no leader is reported, and
//! `haconfd_cluster_has_leader` is 0.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::model::Cluster;
use crate::pipeline::PassReport;
use crate::status::Status;

type Labels = Vec<(String, String)>;

fn failure_labels(target: &str, reason: &str) -> Labels {
    vec![
        ("target".to_owned(), target.to_owned()),
        ("reason".to_owned(), reason.to_owned()),
    ]
}

fn member_labels(target: &str, how: &str) -> Labels {
    vec![
        ("target".to_owned(), target.to_owned()),
        ("via".to_owned(), how.to_owned()),
    ]
}

/// Metrics that accumulate over the process's life.
#[derive(Debug, Clone)]
pub struct Metrics {
    passes: Family<Labels, Counter>,
    renders: Family<Labels, Counter>,
    writes: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    member_changes: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    events: Family<Labels, Counter>,
    render_seconds: Histogram,
    apply_seconds: Histogram,
    switch_seconds: Family<Labels, Histogram>,
    moves: Family<Labels, Counter>,
    fences_expired: Counter,
    crash_hold_seconds: Histogram,
    crash_holds: Family<Labels, Counter>,
    drift: Gauge,
    lag_bytes: Family<Labels, Gauge>,
    lag_drained: Family<Labels, Gauge>,
    hooks: crate::hooks::HookMetrics,
    /// Every name `renders`, `writes`, `reloads` and `failures` count under, with the failure
    /// reasons seen for it: the series of a name that is gone (a forgotten cluster) are removed.
    named: Arc<Mutex<BTreeMap<String, BTreeSet<&'static str>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        // 50 µs .. ~26 s: a render takes microseconds, an apply with `haproxy -c` tens of ms.
        let buckets = || Histogram::new(exponential_buckets(0.00005, 2.0, 20));
        Self {
            passes: Family::default(),
            renders: Family::default(),
            writes: Family::default(),
            reloads: Family::default(),
            member_changes: Family::default(),
            failures: Family::default(),
            events: Family::default(),
            render_seconds: buckets(),
            apply_seconds: buckets(),
            // 1 ms .. ~32 s: a fast-path switch takes milliseconds, health checks seconds.
            switch_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            moves: Family::default(),
            fences_expired: Counter::default(),
            // 50 ms .. ~100 s: a restart of PostgreSQL takes a second, a lease tens of seconds.
            crash_hold_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            // Every way a hold ends, at 0 from the start: an alert on `ended="bound"` has a
            // series to read before the first hold.
            crash_holds: {
                let f: Family<Labels, Counter> = Family::default();
                for ended in ["new_leader", "recovered", "bound", "shutdown"] {
                    drop(f.get_or_create(&vec![("ended".to_owned(), ended.to_owned())]));
                }
                f
            },
            drift: Gauge::default(),
            lag_bytes: Family::default(),
            lag_drained: Family::default(),
            hooks: crate::hooks::HookMetrics::default(),
            named: Arc::default(),
        }
    }

    /// The hook counters, shared with the hook dispatcher.
    pub fn hook_metrics(&self) -> crate::hooks::HookMetrics {
        self.hooks.clone()
    }

    /// The failover fast path's histograms and drift gauge, shared with it.
    pub fn failover_observers(&self) -> crate::failover::Observers {
        let consumer = |c: &str| {
            self.switch_seconds
                .get_or_create(&vec![("consumer".to_owned(), c.to_owned())])
                .clone()
        };
        crate::failover::Observers {
            haproxy: Some(consumer("haproxy")),
            pgbouncer: Some(consumer("pgbouncer")),
            drift: Some(self.drift.clone()),
            moves: Some(self.moves.clone()),
            fences_expired: Some(self.fences_expired.clone()),
            crash_hold: Some(self.crash_hold_seconds.clone()),
            crash_holds: Some(self.crash_holds.clone()),
            hook_events: None,
        }
    }

    /// The lag watchers' gauges, shared with them.
    pub fn lag_observers(&self) -> crate::lag::LagObservers {
        crate::lag::LagObservers {
            bytes: Some(self.lag_bytes.clone()),
            drained: Some(self.lag_drained.clone()),
        }
    }

    /// Records one pass.
    pub fn record(&self, report: &PassReport) {
        let (result, stats) = (&report.result, &report.stats);
        let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let ok = result.is_ok();
        self.passes
            .get_or_create(&label("result", if ok { "ok" } else { "error" }))
            .inc();
        self.render_seconds.observe(stats.render.as_secs_f64());
        self.apply_seconds.observe(stats.apply.as_secs_f64());
        // Targets whose last render was reused (nothing they read changed) are not counted.
        for t in &stats.rendered {
            self.renders.get_or_create(&label("target", t)).inc();
        }
        // Written and reloaded count also when another consumer's target failed in this pass.
        for t in &stats.outcome.written {
            self.writes.get_or_create(&label("target", t)).inc();
        }
        for t in &stats.outcome.reloaded {
            self.reloads.get_or_create(&label("target", t)).inc();
        }
        let runtime = (stats.outcome.runtime.iter().map(|t| (t, "runtime")))
            .chain(stats.outcome.fallbacks.iter().map(|t| (t, "reload")));
        for (t, how) in runtime {
            self.member_changes
                .get_or_create(&member_labels(t, how))
                .inc();
        }
        // Counted also when the pass was refused: a failover's events come in refused passes.
        for e in &stats.events {
            self.events.get_or_create(&label("event", e.kind())).inc();
        }
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        for t in (stats.rendered.iter())
            .chain(&stats.outcome.written)
            .chain(&stats.outcome.reloaded)
            .chain(&stats.outcome.runtime)
            .chain(&stats.outcome.fallbacks)
        {
            if !named.contains_key(t) {
                named.insert(t.clone(), BTreeSet::new());
            }
        }
        if let Err(e) = result {
            for (target, reason) in crate::status::failures(e, stats) {
                named.entry(target.clone()).or_default().insert(reason);
                self.failures
                    .get_or_create(&failure_labels(&target, reason))
                    .inc();
            }
        }
        let current = report.current_names();
        named.retain(|name, reasons| {
            if current.contains(name) {
                return true;
            }
            let l = label("target", name);
            self.renders.remove(&l);
            self.writes.remove(&l);
            self.reloads.remove(&l);
            for how in ["runtime", "reload"] {
                self.member_changes.remove(&member_labels(name, how));
            }
            for reason in reasons.iter() {
                self.failures.remove(&failure_labels(name, reason));
            }
            false
        });
    }

    /// Encodes every metric, with the cluster view from `status`, in the text format.
    pub fn encode(&self, status: &Status) -> String {
        let mut r = Registry::with_prefix("haconfd");
        self.register_counters(&mut r);
        register_state(&mut r, status);
        register_clusters(&mut r, status);
        let mut out = String::new();
        let _ = encode(&mut out, &r);
        out
    }

    /// What accumulates over the process's life: passes, renders, writes, reloads, failures,
    /// events, durations, the fast path's and the hooks'.
    fn register_counters(&self, r: &mut Registry) {
        r.register("passes", "Passes run, by result", self.passes.clone());
        r.register(
            "renders",
            "Targets rendered (a target whose inputs did not change reuses its last render)",
            self.renders.clone(),
        );
        r.register("writes", "Files swapped in, by target", self.writes.clone());
        r.register("reloads", "Reloads sent, by target", self.reloads.clone());
        r.register(
            "member_changes",
            "Member changes (servers added, removed or re-addressed in existing backends) by target and how they reached HAProxy: `runtime` (its runtime API, no reload) or `reload` (the runtime API refused or HAProxy's servers differed from the file: reloaded instead)",
            self.member_changes.clone(),
        );
        r.register(
            "failures",
            "Failed passes, by target and reason",
            self.failures.clone(),
        );
        r.register(
            "cluster_events",
            "Cluster events seen (leader lost or changed, switchover requested, member promoted, demoted, added, removed, down), by event",
            self.events.clone(),
        );
        r.register(
            "render_duration_seconds",
            "Time to build the model and render every target",
            self.render_seconds.clone(),
        );
        r.register(
            "apply_duration_seconds",
            "Time to stage, check, swap and reload",
            self.apply_seconds.clone(),
        );
        r.register(
            "failover_switch_seconds",
            "Per leader change: from the new leader key to HAProxy (runtime API) or PgBouncer (reloaded and resumed) sending writes to it, by consumer",
            self.switch_seconds.clone(),
        );
        r.register(
            "replica_lag_bytes",
            "Replay lag of each replica behind its leader, in bytes, as the lag watcher last read it from Patroni's REST API (only with lag.max_bytes set), by cluster and member",
            self.lag_bytes.clone(),
        );
        r.register(
            "replica_lag_drained",
            "1 while a replica is drained in HAProxy's replica backends for its replay lag, by cluster and member",
            self.lag_drained.clone(),
        );
        r.register(
            "failover_moves",
            "Moves of the failover fast path on a consumer (HAProxy runtime-API moves; PgBouncer PAUSE and RESUME), by consumer and result (ok, refused, unreachable, failed)",
            self.moves.clone(),
        );
        r.register(
            "failover_fences_expired",
            "Fences (drains of the old primary) lifted by their bound rather than by the end of a leader change: a switchover request nobody acted on within failover.fence_timeout, or no new leader confirmed within failover.confirm_timeout",
            self.fences_expired.clone(),
        );
        r.register(
            "crash_hold_seconds",
            "How long crash holds lasted: from a dead primary noticed (its PostgreSQL refusing or not answering) to the hold's release",
            self.crash_hold_seconds.clone(),
        );
        r.register(
            "crash_holds",
            "Crash holds by how they ended: new_leader (another member took writes), recovered (the same member took writes again), bound (the cluster's lease passed), shutdown",
            self.crash_holds.clone(),
        );
        r.register(
            "hook_runs",
            "Hook commands run, by hook and result (ok, failed, timeout)",
            self.hooks.runs.clone(),
        );
        r.register(
            "hook_dropped",
            "Hook runs dropped from a full queue (the oldest waiting), by hook",
            self.hooks.dropped.clone(),
        );
        r.register(
            "haproxy_primary_drift",
            "1 while HAProxy's live primary servers have disagreed with etcd's leader for longer than failover.drift_grace",
            self.drift.clone(),
        );
    }
}

/// The daemon's state now, from `status`: last success, etcd, readiness, leader changes.
fn register_state(r: &mut Registry, status: &Status) {
    let age: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    age.set(
        status
            .last_success
            .map_or(-1.0, |t| t.elapsed().as_secs_f64()),
    );
    r.register(
        "last_success_age_seconds",
        "Seconds since the last successful pass (-1 before the first)",
        age,
    );
    r.register(
        "etcd_connected",
        "1 while the etcd watch is established and current",
        gauge(status.etcd_connected as i64),
    );
    r.register(
        "watch_revision",
        "The etcd revision of the current view",
        gauge(status.revision),
    );
    r.register(
        "ready",
        "1 when /readyz answers 200",
        gauge(status.ready() as i64),
    );
    let leader_changes: Counter = Counter::default();
    leader_changes.inc_by(status.leader_changes);
    r.register("leader_changes", "Leader changes seen", leader_changes);
}

/// The cluster view from `status`: members by role and state, the leader, lag; with several
/// clusters each series carries its cluster.
fn register_clusters(r: &mut Registry, status: &Status) {
    let by_role: Family<Labels, Gauge> = Family::default();
    let leader: Family<Labels, Gauge> = Family::default();
    let lag: Family<Labels, Gauge> = Family::default();
    let has_leader: Family<Labels, Gauge> = Family::default();
    let configured: Family<Labels, Gauge> = Family::default();
    let refused: Family<Labels, Gauge> = Family::default();
    // One cluster: the series as they always were. Several: each carries its cluster.
    let clusters: Vec<(Labels, &Arc<Cluster>)> = if status.multi {
        status
            .clusters
            .iter()
            .filter_map(|c| {
                let mut labels = vec![("scope".to_owned(), c.scope.clone())];
                if let Some(g) = c.group {
                    labels.push(("group".to_owned(), g.to_string()));
                }
                configured.get_or_create(&labels).set(c.configured as i64);
                refused
                    .get_or_create(&labels)
                    .set(c.refused.is_some() as i64);
                c.model.as_ref().map(|m| (labels, m))
            })
            .collect()
    } else {
        status.cluster.iter().map(|c| (Vec::new(), c)).collect()
    };
    for (labels, c) in &clusters {
        let with = |more: &[(&str, &str)]| -> Labels {
            let mut l = labels.clone();
            l.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            l
        };
        for m in &c.members {
            by_role
                .get_or_create(&with(&[("role", &m.role), ("state", &m.state)]))
                .inc();
            if let Some(l) = m.lag {
                lag.get_or_create(&with(&[("member", &m.name)]))
                    .set(i64::try_from(l).unwrap_or(i64::MAX));
            }
        }
        if let Some(name) = &c.leader_name {
            leader.get_or_create(&with(&[("name", name)])).set(1);
        }
        if status.multi {
            has_leader
                .get_or_create(labels)
                .set(c.leader_name.is_some() as i64);
        }
    }
    r.register("cluster_members", "Members by role and state", by_role);
    r.register("cluster_leader", "1 for the current leader's name", leader);
    if status.multi {
        r.register(
            "cluster_has_leader",
            "1 when etcd shows a valid leader, 0 while the cluster has none",
            has_leader,
        );
        r.register(
            "cluster_configured",
            "1 when the cluster has a [clusters.<scope>] table; 0: followed but given no port or file",
            configured,
        );
        r.register(
            "cluster_refused",
            "1 while the guard refuses the cluster's view (its last good section stays)",
            refused,
        );
    } else if let Some(c) = &status.cluster {
        // An alert needs a series that is there while the leader is not.
        r.register(
            "cluster_has_leader",
            "1 when etcd shows a valid leader, 0 while the cluster has none",
            gauge(c.leader_name.is_some() as i64),
        );
    }
    r.register(
        "member_lag_bytes",
        "Bytes each member is behind the leader",
        lag,
    );
}

/// A gauge set to `v`.
fn gauge(v: i64) -> Gauge {
    let g: Gauge = Gauge::default();
    g.set(v);
    g
}
