//! The second stage of a pass: which files the `[[template]]`s become and what each renders.
//! A template becomes one file, or one per configured cluster when its `dest` holds `{scope}`;
//! a file of a cluster that is gone is planned for removal. Each sees every cluster's accepted
//! view, or, for a `require_leader` template over several clusters, each cluster's last view
//! with a confirmed leader. With one cluster, `require_leader` files wait while a new leader is
//! not yet confirmed (the failover fast path).

use std::sync::Arc;

use super::observe::{ByScope, Observed, Views};
use super::report::PassStats;
use super::Setup;
use crate::model::Cluster;
use crate::render::RenderError;
use crate::target::Target;

/// Groups targets by the consumer that reads them: indices into `targets`, in config order.
/// Targets whose reload acts on the same process (one pidfile, master socket, command or
/// console) are one consumer: that process reads their files together, so they are checked,
/// swapped and reloaded together, all or nothing, and reloaded once. Every other target stands
/// alone — a target with no reload too, since nothing says who reads it — so that a failure of
/// one does not keep the others from following the cluster.
pub fn consumers(targets: &[Target]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let mut merged = (t.consumer.ids(t.reload.as_ref()), vec![i]);
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

/// One target as a pass applies it: a `[[template]]`, or one cluster's file of a per-cluster
/// template, with what it renders.
pub(super) struct Planned {
    pub(super) target: Target,
    /// The scope of a per-cluster file.
    pub(super) scope: Option<String>,
    /// The `[[template]]` it comes from (the fast path knows PgBouncer by that name).
    pub(super) base: String,
    /// The file of a cluster that is gone: removed (its consumer reloaded), not rendered.
    pub(super) remove: bool,
}

/// The clusters one target renders. Shared by every target that sees the same clusters: not
/// copied per target.
#[derive(Debug, Clone)]
pub(super) struct ViewOf {
    pub(super) clusters: Arc<ByScope>,
}

/// Expands the `[[template]]`s into what a pass applies: a per-cluster template once per
/// cluster in its view (its `dest` naming the scope), the others once. `all` is every cluster's
/// accepted view, `led` the views with a leader (for `require_leader` templates over several
/// clusters); `held` the clusters whose section must not be dropped.
pub(super) fn plan(
    setup: &Setup,
    all: &[(String, Vec<Arc<Cluster>>)],
    led: &[(String, Vec<Arc<Cluster>>)],
    led_follow: &[(String, Vec<Arc<Cluster>>)],
    held: &[String],
) -> Vec<(Planned, ViewOf)> {
    let (all_view, led_view) = (Arc::new(all.to_vec()), Arc::new(led.to_vec()));
    let follow_view = Arc::new(led_follow.to_vec());
    let mut out = Vec::new();
    for t in &setup.settings.targets {
        let source = match (t.require_leader && setup.mode.is_many(), t.follow_standby) {
            (true, true) => &follow_view,
            (true, false) => &led_view,
            (false, _) => &all_view,
        };
        let view = ViewOf {
            clusters: Arc::clone(source),
        };
        if !t.per_cluster {
            out.push((planned(t.clone(), None, &t.name), view));
            continue;
        }
        let scopes: Vec<&str> = match setup.mode.one() {
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
                .filter(|s| setup.configured(s))
                .collect(),
        };
        for scope in scopes {
            let target = setup.instance(t, scope);
            out.push((planned(target, Some(scope), &t.name), view.clone()));
        }
    }
    out
}

fn planned(target: Target, scope: Option<&str>, base: &str) -> Planned {
    Planned {
        target,
        scope: scope.map(str::to_owned),
        base: base.to_owned(),
        remove: false,
    }
}

/// The targets `--template NAME` selects (all when None).
pub(super) fn select<'a>(
    targets: &'a [Target],
    only: Option<&str>,
) -> Result<Vec<&'a Target>, RenderError> {
    match only {
        None => Ok(targets.iter().collect()),
        Some(name) => targets
            .iter()
            .find(|t| t.name == name)
            .map(|t| vec![t])
            .ok_or_else(|| RenderError::UnknownTarget(name.to_owned())),
    }
}

/// What one pass applies, and what it holds back.
pub(super) struct Plan {
    pub(super) items: Vec<(Planned, ViewOf)>,
    /// Every planned target, as the commit stage takes them.
    pub(super) targets: Arc<Vec<Target>>,
    /// The planned removals (files of clusters that are gone).
    pub(super) removals: Arc<Vec<usize>>,
    /// `require_leader` targets kept as they are until the new leader is confirmed.
    pub(super) awaiting: Vec<usize>,
    /// Templates over every cluster held back for a cluster the guard refused at first sight:
    /// they would drop its section.
    pub(super) held_back: Vec<usize>,
}

impl Plan {
    pub(super) fn build(
        setup: &Setup,
        views: &Views,
        seen: &Observed,
        stats: &mut PassStats,
    ) -> Plan {
        let mut items = plan(
            setup,
            &views.all,
            &views.led,
            &views.led_follow,
            &views.held,
        );
        // The per-cluster files of clusters that are gone (the guard accepted their empty view):
        // removed, their consumers reloaded.
        for scope in seen
            .gone
            .iter()
            .map(|id| id.scope.as_str())
            .filter(|s| !views.all.iter().any(|(a, _)| a == s))
        {
            for t in setup.settings.targets.iter().filter(|t| t.per_cluster) {
                let mut p = planned(setup.instance(t, scope), Some(scope), &t.name);
                p.remove = true;
                items.push((
                    p,
                    ViewOf {
                        clusters: Arc::default(),
                    },
                ));
            }
        }
        let leader_targets = || items.iter().filter(|(p, _)| p.target.require_leader);
        if setup.mode.is_many() && !stats.leaderless.is_empty() {
            for (p, _) in leader_targets() {
                tracing::info!(target = %p.target.name, clusters = ?stats.leaderless, "no leader in these clusters: their sections keep their last leader");
            }
        }
        // PgBouncer-like targets point at a leader only once it takes writes: with one cluster
        // they wait; with several, they render each cluster's last confirmed leader.
        // A target with `standby_leader = "follow"` also takes a standby leader confirmed
        // through `/standby-leader`.
        let closed = |t: &Target| match t.follow_standby {
            true => views.follow_gates_closed,
            false => views.gates_closed,
        };
        let awaiting: Vec<usize> = if setup.mode.is_many() {
            Vec::new()
        } else {
            (0..items.len())
                .filter(|&i| items[i].0.target.require_leader && closed(&items[i].0.target))
                .collect()
        };
        for &i in &awaiting {
            let t = &items[i].0.target;
            match views.standby {
                true => {
                    tracing::info!(target = %t.name, "this target keeps its file: a standby cluster's leader takes no writes (standby_leader = \"follow\" points it at the standby leader)")
                }
                false => {
                    tracing::info!(target = %t.name, "the new leader does not take writes yet: this target keeps pointing where it did")
                }
            }
        }
        stats.awaiting.extend(
            leader_targets()
                .filter(|(p, _)| closed(&p.target))
                .map(|(p, _)| p.target.name.clone()),
        );
        let held_back =
            if setup.mode.is_many() && !views.held.is_empty() && !seen.refusals.is_empty() {
                (0..items.len())
                    .filter(|&i| items[i].0.scope.is_none())
                    .collect()
            } else {
                Vec::new()
            };
        Plan {
            targets: Arc::new(items.iter().map(|(p, _)| p.target.clone()).collect()),
            removals: Arc::new((0..items.len()).filter(|&i| items[i].0.remove).collect()),
            items,
            awaiting,
            held_back,
        }
    }

    /// The consumers in the order a pass takes them: those that point at the leader alone
    /// (PgBouncer) first (after a leader change their clients wait, paused, for this pass, while
    /// HAProxy was moved already through its runtime API and its check and reload would only
    /// delay them), config order otherwise. Targets awaiting a confirmation are left out.
    pub(super) fn consumer_groups(&self) -> Vec<Vec<usize>> {
        let mut groups = consumers(&self.targets);
        groups.sort_by_key(|g| !g.iter().any(|&i| self.targets[i].require_leader));
        for g in &mut groups {
            g.retain(|i| !self.awaiting.contains(i));
        }
        groups.retain(|g| !g.is_empty());
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumers::reload::Reload;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

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
