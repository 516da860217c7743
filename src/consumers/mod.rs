//! The programs that read haconfd's files, and how each is told: the reload mechanics every
//! consumer shares ([`reload`]: a verified signal, HAProxy's master socket, a command), HAProxy
//! with its server state and runtime API ([`haproxy`]), PgBouncer with its admin console
//! ([`pgbouncer`]). [`Consumer`] says which kind a target's consumer is; nothing here knows the
//! pass.

pub mod haproxy;
pub mod pgbouncer;
pub mod reload;

use haproxy::server_state::ServerStateConfig;
use pgbouncer::Admin;
use reload::{Reload, ReloadError};

/// Which program reads a target's files, as far as haconfd does more with it than its `reload`
/// action.
#[derive(Debug, Clone)]
pub enum Consumer {
    /// HAProxy whose server state haconfd keeps across reloads (`server_state`), and which the
    /// failover fast path moves through its runtime API.
    Haproxy(ServerStateConfig),
    /// PgBouncer, reloaded through its admin console (`pgbouncer_admin`) and paused around a
    /// leader change.
    Pgbouncer(Admin),
    /// Any other program (or a HAProxy without server state): told by the `reload` action only.
    Plain,
}

impl Consumer {
    /// HAProxy's server-state settings, for a HAProxy.
    pub fn server_state(&self) -> Option<&ServerStateConfig> {
        match self {
            Consumer::Haproxy(ss) => Some(ss),
            _ => None,
        }
    }

    /// PgBouncer's console, for a PgBouncer.
    pub fn pgbouncer(&self) -> Option<&Admin> {
        match self {
            Consumer::Pgbouncer(a) => Some(a),
            _ => None,
        }
    }

    /// Whether haconfd can tell the consumer anything after a swap: a console to `RELOAD`, or a
    /// reload action.
    pub fn is_told(&self, action: Option<&Reload>) -> bool {
        action.is_some() || self.pgbouncer().is_some()
    }

    /// What identifies the process: its pidfile, master socket, command or console. Two targets
    /// sharing one identifier are read by the same process.
    pub fn ids(&self, action: Option<&Reload>) -> Vec<String> {
        let mut ids = match action {
            Some(Reload::Signal {
                pidfile,
                master_socket,
                ..
            }) => std::iter::once(format!("pidfile {}", pidfile.display()))
                .chain(
                    master_socket
                        .iter()
                        .map(|m| format!("master socket {}", m.display())),
                )
                .collect(),
            Some(Reload::MasterSocket { path, .. }) => {
                vec![format!("master socket {}", path.display())]
            }
            Some(Reload::Command { argv, .. }) => vec![format!("command {argv:?}")],
            None => Vec::new(),
        };
        if let Some(a) = self.pgbouncer() {
            ids.push(format!("pgbouncer console {}", a.config().address()));
        }
        ids
    }

    /// Tells the consumer of target `name` to read its files again: `RELOAD` on PgBouncer's
    /// console when there is one (the `reload` action is the fallback when the console fails),
    /// else the `reload` action.
    pub async fn reload(&self, name: &str, action: Option<&Reload>) -> Result<(), ReloadError> {
        if let Some(admin) = self.pgbouncer() {
            match admin.reload().await {
                Ok(()) => return Ok(()),
                Err(e) => match action {
                    Some(_) => {
                        tracing::warn!(target = %name, error = %e, "PgBouncer's console did not take RELOAD; using the reload action")
                    }
                    None => return Err(ReloadError::Console(e.to_string())),
                },
            }
        }
        match action {
            Some(action) => reload::reload(action).await,
            None => Ok(()),
        }
    }
}

/// Whether the process a reload acts on is not there at all: its pidfile or master socket does
/// not exist (it has not started, or it stopped and cleaned up).
pub fn absent(action: Option<&Reload>) -> bool {
    match action {
        Some(Reload::Signal { pidfile, .. }) => !pidfile.exists(),
        Some(Reload::MasterSocket { path, .. }) => !path.exists(),
        _ => false,
    }
}

/// Whether the consumer itself rejected the new file (HAProxy's failed reload), as opposed to
/// haconfd refusing to signal: only then is the file on disk known not to be in use.
pub fn refused_new_file(e: &ReloadError) -> bool {
    matches!(e, ReloadError::ReloadFailed { .. })
}
