//! Refuses a [`Cluster`] that looks like a lying or emptied store, and remembers the views it
//! accepted ([`Memory`], saved to `guard.state_file`).
//!
//! The rule, for each view a pass builds (`--force` / `guard.force` accepts every view):
//! 1. Fewer valid members than `guard.min_members`: refused. An emptied store, a wrong scope or
//!    namespace, a restore gone wrong all look like this. The floor is the operator's own: it
//!    applies with a leader too, so it must not exceed what a failover can leave.
//! 2. A view with a valid leader (the `leader` key names a member whose own key is present and
//!    valid) is never refused for a shrink. Patroni's leader renews the leader key and its member
//!    key every `loop_wait` on its own lease, so such a view comes from a live store that says who
//!    is gone; keeping a departed member in the files would route to a dead node.
//! 3. A leaderless view is compared with the last view the guard *accepted* for the same
//!    namespace and scope (not the last render that was applied: a leaderless pass is accepted
//!    here and then fails in a template with `require_leader`). More than
//!    `guard.max_removed_fraction` of those members gone at once and the view is refused. Because
//!    every accepted view becomes the new reference, members leaving one by one (each lease
//!    expiring on its own, a few seconds apart) are never a mass removal; only a revision in
//!    which most members vanish at once with no leader is. A refused view never becomes the
//!    reference: the refusal ends when the members come back, when a leader is elected (rule 2),
//!    or with `--force`.
//!
//! 4. With `etcd.discover`, a cluster with no `[clusters.<scope>]` table whose scope (or Citus
//!    group) has held no leader or member key for `guard.gone_after` is forgotten: its section,
//!    its entry in this memory and the state file, its place in `/status`. Only while another
//!    cluster under the namespace shows a valid leader: that live cluster vouches that the store
//!    answers truly (an emptied store or a wrong namespace forgets nothing). A configured cluster
//!    is never forgotten this way: its table says the operator wants it.
//!
//! The memory is kept per namespace and scope, so that several haconfd instances (or a scope
//! changed by SIGHUP) sharing one `guard.state_file` never compare one cluster with another. The
//! file holds `{"clusters": [{"namespace", "scope", "members"}]}`; a file written by an older
//! haconfd (`{"members": [...]}`, no cluster named) is ignored with a note and replaced.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::Cluster;

/// `[guard]`: refuse renders from an empty or suddenly shrunken store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Fewer valid members than this and the pass is refused.
    pub min_members: usize,
    /// Refuse a leaderless view that lost more than this fraction of the members of the last
    /// view the guard accepted (see `guard.rs` for the whole rule).
    pub max_removed_fraction: f64,
    /// Disable both guards.
    pub force: bool,
    /// Where the member names of the last accepted view are kept, per namespace and scope, so
    /// that the shrink guard also holds for `once` and across restarts. Unset: in memory only.
    pub state_file: Option<PathBuf>,
    /// With `etcd.discover`: how long a cluster without a `[clusters.<scope>]` table may show
    /// no leader or member key before it is forgotten (rule 4 of the module docs).
    #[serde(with = "humantime_serde")]
    pub gone_after: std::time::Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            min_members: 1,
            max_removed_fraction: 0.5,
            force: false,
            state_file: None,
            gone_after: std::time::Duration::from_secs(60),
        }
    }
}

/// Why a pass was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardError {
    /// Too few members.
    #[error("{}", too_few(scope, *found, *min))]
    TooFew {
        /// Scope.
        scope: String,
        /// Members found.
        found: usize,
        /// The minimum.
        min: usize,
    },
    /// Too many members removed at once, with no leader to vouch for the view.
    #[error("etcd shows {found} member(s) and no valid leader in cluster {scope:?} where the last view the guard accepted had {last} ({removed} gone at once, more than guard.max_removed_fraction = {fraction}); keeping the last good files until a leader or the members are back (override with --force or guard.force)")]
    Shrunk {
        /// Scope.
        scope: String,
        /// Members found now.
        found: usize,
        /// Members in the last accepted view.
        last: usize,
        /// Members missing now that were there.
        removed: usize,
        /// The configured fraction.
        fraction: f64,
    },
    /// Several clusters are followed and none has a view to render: an emptied store or a wrong
    /// namespace, which would empty every file.
    #[error("etcd shows no cluster with a valid view under {prefix} (etcd.scopes / etcd.discover); keeping the last good files (override with --force or guard.force)")]
    NoCluster {
        /// The prefix read.
        prefix: String,
    },
}

/// The refusal of too few members. An empty view gets no advice to force it: forcing renders
/// files with no server, and a wrong scope, namespace or API is the usual cause.
fn too_few(scope: &str, found: usize, min: usize) -> String {
    if found == 0 {
        return format!(
            "etcd shows no valid member in cluster {scope:?}, fewer than guard.min_members = \
             {min}: a wrong etcd.scope, etcd.namespace or etcd.api looks like this (`haconfd \
             check` lists the scopes that exist); keeping the last good files"
        );
    }
    format!(
        "etcd shows {found} valid member(s) in cluster {scope:?}, fewer than guard.min_members = \
         {min}; keeping the last good files (override with --force or guard.force)"
    )
}

/// Checks `cluster` against the guard's rule (see the module docs), given the member names of
/// the last view accepted for the same cluster, if any.
pub fn check(
    cfg: &GuardConfig,
    cluster: &Cluster,
    last_accepted: Option<&[String]>,
) -> Result<(), GuardError> {
    if cfg.force {
        return Ok(());
    }
    let found = cluster.members.len();
    if found < cfg.min_members {
        return Err(GuardError::TooFew {
            scope: cluster.scope.clone(),
            found,
            min: cfg.min_members,
        });
    }
    if cluster.leader().is_some() {
        return Ok(());
    }
    if let Some(last) = last_accepted.filter(|l| !l.is_empty()) {
        let removed = last
            .iter()
            // Members are sorted by name: a search, not a scan, per name (3,000 members).
            .filter(|name| {
                cluster
                    .members
                    .binary_search_by(|m| m.name.as_str().cmp(name.as_str()))
                    .is_err()
            })
            .count();
        if removed as f64 > cfg.max_removed_fraction * last.len() as f64 {
            return Err(GuardError::Shrunk {
                scope: cluster.scope.clone(),
                found,
                last: last.len(),
                removed,
                fraction: cfg.max_removed_fraction,
            });
        }
    }
    Ok(())
}

/// The member names of the last view the guard accepted for one cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    namespace: String,
    scope: String,
    /// The Citus group, for a group of a Citus cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<u64>,
    members: Vec<String>,
}

impl Entry {
    fn is_of(&self, cluster: &Cluster) -> bool {
        self.namespace == cluster.namespace
            && self.scope == cluster.scope
            && self.group == cluster.group
    }
}

/// The content of `guard.state_file`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    clusters: Vec<Entry>,
}

/// The member names last accepted, by namespace, scope and Citus group: looked up by borrowed
/// names, once per cluster and pass (thousands of clusters).
type Entries = std::collections::HashMap<
    String,
    std::collections::HashMap<String, std::collections::BTreeMap<Option<u64>, Vec<String>>>,
>;

/// The guard's memory: per cluster, the members of the last view it accepted, kept in
/// `guard.state_file` when one is set so that `once` runs and restarts share it.
#[derive(Debug, Default)]
pub struct Memory {
    /// Every cluster known, this process's own included.
    entries: Entries,
    /// The file this process last wrote its entry to (a SIGHUP may name another one).
    saved_to: Option<PathBuf>,
}

fn index(list: Vec<Entry>) -> Entries {
    let mut out = Entries::new();
    for e in list {
        out.entry(e.namespace)
            .or_default()
            .entry(e.scope)
            .or_default()
            .insert(e.group, e.members);
    }
    out
}

impl Memory {
    /// Reads the memory saved in `cfg.state_file`; empty when unset, absent or unreadable.
    pub fn load(cfg: &GuardConfig) -> Memory {
        let Some(path) = cfg.state_file.as_deref() else {
            return Memory::default();
        };
        match read_state(path) {
            Some(entries) => Memory {
                entries: index(entries),
                saved_to: Some(path.to_owned()),
            },
            None => Memory::default(),
        }
    }

    /// The member names last accepted for `cluster`'s namespace and scope.
    pub fn members_of(&self, cluster: &Cluster) -> Option<&[String]> {
        self.entries
            .get(cluster.namespace.as_str())?
            .get(cluster.scope.as_str())?
            .get(&cluster.group)
            .map(Vec::as_slice)
    }

    /// Checks `cluster` against the guard and, when it passes, remembers it as the last accepted
    /// view (saved to `guard.state_file` when its members changed).
    pub fn admit(&mut self, cfg: &GuardConfig, cluster: &Cluster) -> Result<(), GuardError> {
        let last = self.members_of(cluster);
        check(cfg, cluster, last)?;
        // Compared without copying: heartbeats admit the same names again and again.
        let same = last.is_some_and(|l| l.iter().eq(cluster.members.iter().map(|m| &m.name)));
        let known = last.is_some();
        let file_current = self.saved_to.as_deref() == cfg.state_file.as_deref();
        if same && file_current {
            return Ok(());
        }
        let names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
        if !known {
            // Another haconfd sharing the file, or a scope changed by SIGHUP: the other
            // clusters' members are kept, never compared with this one.
            tracing::debug!(
                namespace = %cluster.namespace,
                scope = %cluster.scope,
                group = ?cluster.group,
                "the guard starts remembering this cluster; memory of other clusters is kept apart"
            );
        }
        self.entries
            .entry(cluster.namespace.clone())
            .or_default()
            .entry(cluster.scope.clone())
            .or_default()
            .insert(cluster.group, names);
        if let Some(path) = cfg.state_file.as_deref() {
            self.save(path, cluster);
        }
        Ok(())
    }

    /// Whether the guard accepted a view with members for `cluster` before (in this process or,
    /// through `guard.state_file`, an earlier one): its files hold a section for it.
    pub fn knows(&self, cluster: &Cluster) -> bool {
        self.members_of(cluster).is_some_and(|m| !m.is_empty())
    }

    /// The clusters remembered under `namespace` (scope and Citus group) with members, for
    /// finding again the clusters an emptied store no longer shows.
    pub fn remembered<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = (&'a str, Option<u64>)> + 'a {
        self.entries
            .get(namespace)
            .into_iter()
            .flat_map(|scopes| scopes.iter())
            .flat_map(|(scope, groups)| {
                groups
                    .iter()
                    .filter(|(_, m)| !m.is_empty())
                    .map(move |(g, _)| (scope.as_str(), *g))
            })
    }

    /// Forgets a cluster that is gone (its empty view was accepted, with `--force`).
    pub fn forget(&mut self, cfg: &GuardConfig, cluster: &Cluster) {
        let Some(scopes) = self.entries.get_mut(cluster.namespace.as_str()) else {
            return;
        };
        let Some(groups) = scopes.get_mut(cluster.scope.as_str()) else {
            return;
        };
        if groups.remove(&cluster.group).is_none() {
            return;
        }
        // Nothing of a forgotten scope stays (clusters come and go under new names all day).
        if groups.is_empty() {
            scopes.remove(cluster.scope.as_str());
            if scopes.is_empty() {
                self.entries.remove(cluster.namespace.as_str());
            }
        }
        if let Some(path) = cfg.state_file.as_deref() {
            let mut state = StateFile {
                clusters: read_state(path).unwrap_or_default(),
            };
            state.clusters.retain(|e| !e.is_of(cluster));
            let json = serde_json::to_string(&state).unwrap_or_default();
            if let Err(e) = crate::files::write_atomic(path, json.as_bytes(), 0o644) {
                tracing::warn!(file = %path.display(), error = %e, "cannot save the guard's memory (guard.state_file)");
            }
        }
    }

    /// Writes this cluster's entry to `path`, keeping the entries other processes wrote there
    /// since (re-read just before: two instances sharing a file only write when their members
    /// change, so a lost update needs two such changes within the same milliseconds, and costs
    /// no more than one instance's memory being one view older).
    fn save(&mut self, path: &Path, cluster: &Cluster) {
        let Some(members) = self.members_of(cluster) else {
            return;
        };
        let ours = Entry {
            namespace: cluster.namespace.clone(),
            scope: cluster.scope.clone(),
            group: cluster.group,
            members: members.to_vec(),
        };
        let mut state = StateFile {
            clusters: read_state(path).unwrap_or_default(),
        };
        state.clusters.retain(|e| !e.is_of(cluster));
        state.clusters.push(ours);
        state.clusters.sort_by(|a, b| {
            (&a.namespace, &a.scope, a.group).cmp(&(&b.namespace, &b.scope, b.group))
        });
        let json = serde_json::to_string(&state).unwrap_or_default();
        if let Err(e) = crate::files::write_atomic(path, json.as_bytes(), 0o644) {
            tracing::warn!(file = %path.display(), error = %e, "cannot save the guard's memory (guard.state_file); it is kept in memory and saved again at the next change of members");
        }
        // Also after a failure: an unwritable file is retried at the next change of members, not
        // on every heartbeat.
        self.saved_to = Some(path.to_owned());
    }
}

/// The entries saved in `path`; None when there is nothing usable (logged, except absence).
fn read_state(path: &Path) -> Option<Vec<Entry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read guard.state_file; the guard starts without memory");
            return None;
        }
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable guard.state_file");
            return None;
        }
    };
    if value.get("clusters").is_none() && value.get("members").is_some() {
        tracing::info!(file = %path.display(), "guard.state_file was written by an older haconfd and does not name its cluster; ignored and replaced at the next accepted view");
        return None;
    }
    match serde_json::from_value::<StateFile>(value) {
        Ok(s) => Some(s.clusters),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable guard.state_file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cluster;
    use crate::snapshot::Snapshot;

    /// A cluster of `names` in scope `scope`, led by `leader` when given.
    fn cluster_in(scope: &str, names: &[&str], leader: Option<&str>) -> Cluster {
        let mut s = Snapshot::new();
        for (i, n) in names.iter().enumerate() {
            let role = if Some(*n) == leader {
                "master"
            } else {
                "replica"
            };
            s.put(
                format!("/service/{scope}/members/{n}"),
                format!(r#"{{"conn_url":"postgres://127.0.0.1:{}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"{role}"}}"#, 5000 + i, 8000 + i).into_bytes(),
            );
        }
        if let Some(l) = leader {
            s.put(format!("/service/{scope}/leader"), l.as_bytes().to_vec());
        }
        Cluster::build(&s, "/service", scope).cluster
    }

    fn cluster(names: &[&str]) -> Cluster {
        cluster_in("demo", names, None)
    }

    fn led(names: &[&str], leader: &str) -> Cluster {
        cluster_in("demo", names, Some(leader))
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn empty_store_is_refused() {
        let err = check(&GuardConfig::default(), &cluster(&[]), None).unwrap_err();
        assert!(matches!(err, GuardError::TooFew { found: 0, .. }));
    }

    #[test]
    fn one_of_three_leaving_is_normal() {
        let last = names(&["a", "b", "c"]);
        check(&GuardConfig::default(), &cluster(&["a", "b"]), Some(&last)).unwrap();
        let last = names(&["a", "b"]);
        check(&GuardConfig::default(), &cluster(&["a"]), Some(&last)).unwrap();
    }

    #[test]
    fn most_of_the_cluster_vanishing_without_a_leader_is_refused() {
        let last = names(&["a", "b", "c", "d"]);
        let err = check(&GuardConfig::default(), &cluster(&["a"]), Some(&last)).unwrap_err();
        assert!(
            matches!(err, GuardError::Shrunk { removed: 3, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("no valid leader") && msg.contains("--force"),
            "{msg}"
        );
    }

    #[test]
    fn replacement_without_a_leader_counts_as_removal() {
        let last = names(&["a", "b", "c"]);
        let err = check(
            &GuardConfig::default(),
            &cluster(&["x", "y", "z"]),
            Some(&last),
        )
        .unwrap_err();
        assert!(matches!(err, GuardError::Shrunk { .. }));
    }

    #[test]
    fn a_valid_leader_vouches_for_a_shrunken_view() {
        let last = names(&["a", "b", "c", "d"]);
        check(&GuardConfig::default(), &led(&["d"], "d"), Some(&last)).unwrap();
    }

    #[test]
    fn a_leader_key_naming_a_missing_member_does_not_vouch() {
        // The leader key survives but its member is gone: no valid leader, the shrink counts.
        let last = names(&["a", "b", "c", "d"]);
        let mut s = Snapshot::new();
        s.put(
            "/service/demo/members/d".into(),
            br#"{"conn_url":"postgres://127.0.0.1:5000/postgres","api_url":"http://127.0.0.1:8000/patroni"}"#.to_vec(),
        );
        s.put("/service/demo/leader".into(), b"a".to_vec());
        let c = Cluster::build(&s, "/service", "demo").cluster;
        assert!(c.leader().is_none());
        let err = check(&GuardConfig::default(), &c, Some(&last)).unwrap_err();
        assert!(
            matches!(err, GuardError::Shrunk { removed: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn min_members_holds_even_with_a_leader() {
        let cfg = GuardConfig {
            min_members: 2,
            ..Default::default()
        };
        let err = check(&cfg, &led(&["a"], "a"), None).unwrap_err();
        assert!(matches!(
            err,
            GuardError::TooFew {
                found: 1,
                min: 2,
                ..
            }
        ));
    }

    #[test]
    fn force_overrides() {
        let cfg = GuardConfig {
            force: true,
            ..Default::default()
        };
        check(&cfg, &cluster(&[]), Some(&names(&["a"]))).unwrap();
    }

    /// Admits each view in turn, returning which were refused.
    #[test]
    fn a_forgotten_cluster_leaves_no_entry_behind() {
        let cfg = GuardConfig::default();
        let mut memory = Memory::default();
        let c = led(&["a", "b"], "a");
        memory.admit(&cfg, &c).unwrap();
        assert!(memory.knows(&c));
        memory.forget(&cfg, &c);
        assert!(memory.entries.is_empty(), "{:?}", memory.entries);
    }

    fn admit_all(memory: &mut Memory, cfg: &GuardConfig, views: &[Cluster]) -> Vec<bool> {
        views
            .iter()
            .map(|v| memory.admit(cfg, v).is_err())
            .collect()
    }

    #[test]
    fn leader_lost_then_a_second_member_then_promotion_is_never_refused() {
        let cfg = GuardConfig::default();
        let mut memory = Memory::default();
        let views = [
            led(&["a", "b", "c"], "a"),
            cluster(&["b", "c"]), // the leader's lease expired
            cluster(&["c"]),      // a few seconds later, a replica's
            led(&["c"], "c"),     // the survivor is promoted
        ];
        assert_eq!(admit_all(&mut memory, &cfg, &views), [false; 4]);
        assert_eq!(memory.members_of(&views[3]), Some(&names(&["c"])[..]));
    }

    #[test]
    fn leader_and_replica_crashing_together_then_promotion_is_accepted_at_promotion() {
        let cfg = GuardConfig::default();
        let mut memory = Memory::default();
        let views = [
            led(&["a", "b", "c"], "a"),
            cluster(&["c"]), // both leases expired in one revision: a mass vanish, no leader
            led(&["c"], "c"), // the survivor is promoted: a leader vouches for the view
        ];
        assert_eq!(admit_all(&mut memory, &cfg, &views), [false, true, false]);
    }

    #[test]
    fn a_refused_view_does_not_become_the_reference() {
        let cfg = GuardConfig::default();
        let mut memory = Memory::default();
        let views = [
            led(&["a", "b", "c", "d"], "a"),
            cluster(&["d"]),
            cluster(&["d"]), // the same lie again is refused again
            cluster(&["c", "d"]),
        ];
        assert_eq!(
            admit_all(&mut memory, &cfg, &views),
            [false, true, true, false]
        );
    }

    #[test]
    fn memory_is_kept_per_scope() {
        let cfg = GuardConfig::default();
        let mut memory = Memory::default();
        let a = cluster_in("a", &["a1", "a2", "a3", "a4"], Some("a1"));
        memory.admit(&cfg, &a).unwrap();
        // Another scope is never compared with the first one's members...
        memory.admit(&cfg, &cluster_in("b", &["b1"], None)).unwrap();
        // ...and does not replace them.
        let err = memory
            .admit(&cfg, &cluster_in("a", &["a4"], None))
            .unwrap_err();
        assert!(matches!(err, GuardError::Shrunk { last: 4, .. }), "{err}");
    }

    #[test]
    fn state_file_keeps_each_cluster_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GuardConfig {
            state_file: Some(dir.path().join("members.json")),
            ..Default::default()
        };
        // Two instances sharing one file, each with its own memory object.
        let mut one = Memory::load(&cfg);
        let mut two = Memory::load(&cfg);
        one.admit(&cfg, &cluster_in("a", &["a1", "a2", "a3"], Some("a1")))
            .unwrap();
        two.admit(&cfg, &cluster_in("b", &["b1", "b2"], Some("b1")))
            .unwrap();
        let restarted = Memory::load(&cfg);
        let a = cluster_in("a", &[], None);
        let b = cluster_in("b", &[], None);
        assert_eq!(
            restarted.members_of(&a),
            Some(&names(&["a1", "a2", "a3"])[..])
        );
        assert_eq!(restarted.members_of(&b), Some(&names(&["b1", "b2"])[..]));
    }

    #[test]
    fn state_file_of_an_older_haconfd_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        std::fs::write(&path, r#"{"members":["a","b","c","d"]}"#).unwrap();
        let cfg = GuardConfig {
            state_file: Some(path.clone()),
            ..Default::default()
        };
        let mut memory = Memory::load(&cfg);
        memory.admit(&cfg, &cluster(&["d"])).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            saved,
            serde_json::json!({"clusters": [{"namespace": "/service", "scope": "demo", "members": ["d"]}]})
        );
    }

    #[test]
    fn an_unwritable_state_file_keeps_the_memory_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GuardConfig {
            state_file: Some(dir.path().join("missing-dir").join("members.json")),
            ..Default::default()
        };
        let mut memory = Memory::load(&cfg);
        memory
            .admit(&cfg, &led(&["a", "b", "c", "d"], "a"))
            .unwrap();
        let err = memory.admit(&cfg, &cluster(&["d"])).unwrap_err();
        assert!(matches!(err, GuardError::Shrunk { last: 4, .. }), "{err}");
    }

    #[test]
    fn unchanged_members_do_not_rewrite_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        let cfg = GuardConfig {
            state_file: Some(path.clone()),
            ..Default::default()
        };
        let mut memory = Memory::load(&cfg);
        memory.admit(&cfg, &led(&["a", "b"], "a")).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        // A promotion changes roles, not names: nothing to save on the failover's latency path.
        memory.admit(&cfg, &led(&["a", "b"], "b")).unwrap();
        let again = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        assert_eq!(ino, again);
    }
}
