//! What one rendered output is: a resolved `[[template]]` ([`Target`]: its template, its
//! destination, how it is checked and how its consumer is reloaded) and the per-cluster settings
//! ([`ClusterSettings`]) its template sees. Render, apply, failover and the pipeline all read it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::consumers::haproxy::server_state::ServerStateConfig;
use crate::consumers::reload::Reload;
use crate::consumers::Consumer;

/// Resolved `[clusters.<scope>]`: what templates see as the cluster's `settings`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSettings {
    /// The whole table, for templates.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// `databases`: PgBouncer's database names for this cluster; the failover fast path pauses
    /// only these when this cluster's leader changes.
    pub databases: Vec<String>,
    /// `lag`: this cluster's lag-aware replica settings over `[lag]`; None: `[lag]`'s.
    pub lag: Option<crate::lag::LagConfig>,
}

pub use crate::model::SCOPE_PLACEHOLDER;

/// Resolved `[[template]]`.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in logs, metrics and `--template`.
    pub name: String,
    /// Absolute template path.
    pub src: PathBuf,
    /// Destination file.
    pub dest: PathBuf,
    /// Check argv (may be empty: no check).
    pub check: Vec<String>,
    /// Check time limit.
    pub check_timeout: Duration,
    /// File mode to set, if configured.
    pub mode: Option<u32>,
    /// Owner to set, if configured.
    pub owner: Option<u32>,
    /// Group to set, if configured.
    pub group: Option<u32>,
    /// Reload action.
    pub reload: Option<Reload>,
    /// Refuse to render with no leader.
    pub require_leader: bool,
    /// With `require_leader`: point at a standby cluster's leader once it answers
    /// `GET /standby-leader` (`standby_leader = "follow"`).
    pub follow_standby: bool,
    /// Which program reads the file: HAProxy with server state, PgBouncer with its console, or
    /// another told by `reload` only.
    pub consumer: Consumer,
    /// Merged variables (global, then per-template).
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// `dest` holds `{scope}`: one file per cluster, each rendered with that cluster's flat
    /// context.
    pub per_cluster: bool,
}

impl Target {
    /// A target with defaults and no check, reload or variables: a starting point for tests.
    pub fn bare(name: &str, src: &Path, dest: &Path) -> Self {
        Target {
            name: name.to_owned(),
            src: src.to_owned(),
            dest: dest.to_owned(),
            check: Vec::new(),
            check_timeout: default_command_timeout(),
            mode: None,
            owner: None,
            group: None,
            reload: None,
            require_leader: false,
            follow_standby: false,
            consumer: Consumer::Plain,
            vars: serde_json::Map::new(),
            per_cluster: false,
        }
    }
}

impl Target {
    /// HAProxy's server-state settings, when a HAProxy with server state reads this target.
    pub fn server_state(&self) -> Option<&ServerStateConfig> {
        self.consumer.server_state()
    }

    /// PgBouncer's console, when a PgBouncer with `pgbouncer_admin` reads this target.
    pub fn pgbouncer_admin(&self) -> Option<&crate::consumers::pgbouncer::Admin> {
        self.consumer.pgbouncer()
    }

    /// The file of a per-cluster target for `scope`: `{scope}` in `dest` replaced by the
    /// scope's [`crate::model::scope_id`] (a safe file name).
    pub fn dest_for(&self, scope: &str) -> PathBuf {
        let id = crate::model::scope_id(scope);
        self.dest
            .to_string_lossy()
            .replace(crate::model::SCOPE_PLACEHOLDER, &id)
            .into()
    }
}

/// The time limit of a check command or a reload when the configuration sets none.
pub(crate) fn default_command_timeout() -> Duration {
    Duration::from_secs(10)
}
