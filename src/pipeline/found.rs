//! Which clusters a pass models: those the config names, or every scope under the namespace
//! (each ordinary cluster once, a Citus cluster once per group), with the ones known from
//! earlier passes or the guard's memory that the store no longer shows; and what to warn about
//! on the way (stray keys in a Citus scope, scopes that cannot be followed).

use std::collections::{BTreeMap, BTreeSet};

use super::Setup;
use crate::guard;
use crate::model::{self, ClusterId, Layout};
use crate::snapshot::Snapshot;
use crate::source::Clusters;

/// The clusters a pass models, and what it learnt finding them.
pub(super) struct Found {
    /// Every cluster to model, sorted.
    pub(super) ids: Vec<ClusterId>,
    /// Those of `ids` the store shows no leader or member key of (followed from earlier passes
    /// or the guard's memory), with `etcd.discover`: candidates to forget.
    pub(super) absent: BTreeSet<ClusterId>,
    pub(super) notes: Notes,
}

/// What a pass warns about once, not on every heartbeat.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Notes {
    /// Stray keys by Citus scope.
    strays: BTreeMap<String, Vec<String>>,
    /// Scopes that cannot be followed, and why.
    refused: BTreeMap<String, String>,
}

impl Notes {
    /// Logs what is new since `before`.
    pub(super) fn warn_new(&self, before: &Notes, ns: &str) {
        if self == before {
            return;
        }
        for (scope, keys) in &self.strays {
            if before.strays.get(scope) != Some(keys) {
                tracing::warn!(scope = ?scope, keys = ?keys, "ordinary Patroni keys in a Citus scope (a node without its citus: section?) under {ns}: ignored; the scope's groups are followed as before");
            }
        }
        for (scope, why) in &self.refused {
            if before.refused.get(scope) != Some(why) {
                tracing::warn!(scope = ?scope, "not following a scope under {ns}: {why}");
            }
        }
    }
}

/// The clusters to model (see the module docs), given the clusters of earlier passes (`known`)
/// and the guard's memory.
pub(super) fn find<V>(
    setup: &Setup,
    snap: &Snapshot,
    known: &BTreeMap<ClusterId, V>,
    memory: &guard::Memory,
) -> Found {
    let etcd = &setup.settings.etcd;
    let ns = &etcd.namespace;
    let layouts = match &etcd.clusters {
        Clusters::One(scope) => model::layouts(snap, ns, Some(std::slice::from_ref(scope))),
        Clusters::List(scopes) => model::layouts(snap, ns, Some(scopes)),
        Clusters::Discover => model::layouts(snap, ns, None),
    };
    let mut ids: BTreeSet<ClusterId> = BTreeSet::new();
    let mut notes = Notes::default();
    for (scope, layout) in &layouts {
        if let Some(why) = &layout.refused {
            notes.refused.insert(scope.clone(), why.clone());
            continue;
        }
        // This scope's clusters from earlier passes: one ordered range of the map.
        let earlier = known
            .range(ClusterId::plain(scope)..)
            .map(|(k, _)| k)
            .take_while(|k| k.scope == *scope);
        ids.extend(scope_ids(scope, layout, earlier, &mut notes));
    }
    let mut absent = BTreeSet::new();
    if matches!(etcd.clusters, Clusters::Discover) {
        // Clusters whose keys are all gone: still followed until the guard lets them go.
        let shown = |scope: &str| layouts.contains_key(scope);
        ids.extend(known.keys().filter(|id| !shown(&id.scope)).cloned());
        for (scope, group) in memory.remembered(ns).filter(|(s, _)| !shown(s)) {
            let scope = scope.to_owned();
            ids.insert(ClusterId { scope, group });
        }
        absent = ids
            .iter()
            .filter(|id| !has_keys(&layouts, id))
            .cloned()
            .collect();
    }
    Found {
        ids: ids.into_iter().collect(),
        absent,
        notes,
    }
}

/// One scope's clusters: its groups for a Citus scope, else the scope itself; with its clusters
/// of earlier passes (`earlier`) of the same kind. A Citus scope stays one: its groups that went
/// away stay for the guard to judge (their disappearance is a removal like any other), and
/// ordinary keys next to its groups are strays (noted), never a reason to drop the groups.
fn scope_ids<'a>(
    scope: &str,
    layout: &Layout,
    earlier: impl Iterator<Item = &'a ClusterId>,
    notes: &mut Notes,
) -> Vec<ClusterId> {
    let earlier: Vec<&ClusterId> = earlier.collect();
    if layout == &Layout::default() && !earlier.is_empty() {
        return earlier.into_iter().cloned().collect();
    }
    let citus = layout.is_citus() || earlier.iter().any(|k| k.group.is_some());
    if citus && layout.plain {
        let named = match layout.strays.is_empty() {
            true => vec!["leader/members".to_owned()],
            false => layout.strays.clone(),
        };
        notes.strays.insert(scope.to_owned(), named);
    }
    let mut ids: Vec<ClusterId> = earlier
        .into_iter()
        .filter(|k| k.group.is_some() == citus)
        .cloned()
        .collect();
    if citus {
        ids.extend(layout.groups.iter().map(|&g| ClusterId {
            scope: scope.to_owned(),
            group: Some(g),
        }));
    } else {
        ids.push(ClusterId::plain(scope));
    }
    ids
}

/// Whether the store shows a leader or member key of cluster `id` (of its Citus group).
fn has_keys(layouts: &BTreeMap<String, Layout>, id: &ClusterId) -> bool {
    layouts.get(&id.scope).is_some_and(|l| match id.group {
        Some(g) => l.groups.contains(&g),
        None => l.plain,
    })
}
