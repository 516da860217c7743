//! HAProxy's settings as a template's `server_state = {...}` gives them: the admin socket, the
//! `server-state-file`, which backends route to the leader and which to replicas, and how
//! member changes reach HAProxy.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::SCOPE_PLACEHOLDER;

/// `server_state = {...}`: HAProxy's `server-state-file` kept right across reloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerStateConfig {
    /// The admin stats socket (`stats socket ... level admin`).
    pub stats_socket: PathBuf,
    /// The file named by `server-state-file` in the global section.
    pub file: PathBuf,
    /// Backends that must route to the leader only.
    #[serde(default = "default_primary_backends")]
    pub primary_backends: Vec<String>,
    /// Backends that must route to replicas only.
    #[serde(default = "default_replica_backends")]
    pub replica_backends: Vec<String>,
    /// How a change of members only reaches HAProxy: its runtime API (the default), or a
    /// reload.
    #[serde(default)]
    pub membership: Membership,
}

/// `server_state.membership`: how a member that joins, leaves or moves reaches HAProxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// `add server`, `del server` and `set server … addr` on the admin socket, checked with
    /// `show servers state`; a reload when anything else changed or HAProxy refuses.
    #[default]
    Runtime,
    /// A reload for every change, as for any other change of the file.
    Reload,
}

impl ServerStateConfig {
    /// The settings for one cluster's backends: `{scope}` in their names replaced by the
    /// scope's [`crate::model::scope_id`], as templates name them (`scope_id` in the context).
    pub fn for_scope(&self, scope: &str) -> ServerStateConfig {
        let id = crate::model::scope_id(scope);
        let fill = |names: &[String]| {
            names
                .iter()
                .map(|b| b.replace(SCOPE_PLACEHOLDER, &id))
                .collect()
        };
        ServerStateConfig {
            primary_backends: fill(&self.primary_backends),
            replica_backends: fill(&self.replica_backends),
            ..self.clone()
        }
    }
}

fn default_primary_backends() -> Vec<String> {
    vec!["primary".into()]
}

fn default_replica_backends() -> Vec<String> {
    vec!["replicas".into()]
}
