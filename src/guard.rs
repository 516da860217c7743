//! Refuses a [`Cluster`] that looks like a lying or emptied store: fewer members than
//! `min_members`, or more than `max_removed_fraction` of the last applied members gone at once.
//! One member of three leaving (a lease expiring) passes; everything vanishing does not.

use crate::config::GuardConfig;
use crate::model::Cluster;

/// Why a pass was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardError {
    /// Too few members.
    #[error("etcd shows {found} valid member(s) in cluster {scope:?}, fewer than guard.min_members = {min}; keeping the last good files (override with --force or guard.force)")]
    TooFew {
        /// Scope.
        scope: String,
        /// Members found.
        found: usize,
        /// The minimum.
        min: usize,
    },
    /// Too many members removed at once.
    #[error("etcd shows {found} member(s) in cluster {scope:?} where the last applied render had {last} ({removed} gone at once, more than guard.max_removed_fraction = {fraction}); keeping the last good files (override with --force or guard.force)")]
    Shrunk {
        /// Scope.
        scope: String,
        /// Members found now.
        found: usize,
        /// Members in the last applied render.
        last: usize,
        /// Members missing now that were there.
        removed: usize,
        /// The configured fraction.
        fraction: f64,
    },
}

/// Checks `cluster` against the guard, given the member names of the last applied render.
pub fn check(
    cfg: &GuardConfig,
    cluster: &Cluster,
    last_applied: Option<&[String]>,
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
    if let Some(last) = last_applied.filter(|l| !l.is_empty()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Cluster;
    use crate::snapshot::Snapshot;

    fn cluster(names: &[&str]) -> Cluster {
        let mut s = Snapshot::new();
        for (i, n) in names.iter().enumerate() {
            s.put(
                format!("/service/demo/members/{n}"),
                format!(r#"{{"conn_url":"postgres://127.0.0.1:{}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"replica"}}"#, 5000 + i, 8000 + i).into_bytes(),
            );
        }
        Cluster::build(&s, "/service", "demo").cluster
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
    fn most_of_the_cluster_vanishing_is_refused() {
        let last = names(&["a", "b", "c", "d"]);
        let err = check(&GuardConfig::default(), &cluster(&["a"]), Some(&last)).unwrap_err();
        assert!(
            matches!(err, GuardError::Shrunk { removed: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn replacement_counts_as_removal() {
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
    fn force_overrides() {
        let cfg = GuardConfig {
            force: true,
            ..Default::default()
        };
        check(&cfg, &cluster(&[]), Some(&names(&["a"]))).unwrap();
    }
}
