//! How to reach PgBouncer's admin console (`pgbouncer_admin = { … }` in a `[[template]]`), as
//! the config file gives it and checked, and PgBouncer's `pool_mode`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

fn default_port() -> u16 {
    6432
}

fn default_user() -> String {
    "pgbouncer".to_string()
}

fn default_pause_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

/// How to reach PgBouncer's admin console (`pgbouncer_admin = { … }` in a `[[template]]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix-socket directory (an absolute path, PgBouncer's `unix_socket_dir`) or a host name / IP.
    pub host: String,
    /// PgBouncer's `listen_port` (also names the unix socket `.s.PGSQL.<port>`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// A user listed in PgBouncer's `admin_users`.
    #[serde(default = "default_user")]
    pub user: String,
    /// File whose first line is the password (trailing newline trimmed); read at each connect.
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password; read at each connect.
    pub password_env: Option<String>,
    /// The longest PgBouncer stays paused: `RESUME` is sent then whatever happens.
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    pub pause_timeout: Duration,
    /// Bounds connecting and each command (except the wait for `PAUSE` to answer).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl AdminConfig {
    /// The console at `host` (socket dir or host name) with every other setting at its default.
    pub fn new(host: impl Into<String>) -> AdminConfig {
        AdminConfig {
            host: host.into(),
            port: default_port(),
            user: default_user(),
            password_file: None,
            password_env: None,
            pause_timeout: default_pause_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }

    /// Refuses settings that cannot work; the message names the key as `pgbouncer_admin.<key>`.
    pub fn validate(&self) -> Result<(), String> {
        let host = self.host.trim();
        if host.is_empty() {
            return Err(
                "pgbouncer_admin.host is empty: give PgBouncer's unix_socket_dir (an \
                        absolute path) or a host name / IP"
                    .to_string(),
            );
        }
        if host.contains('/') && !host.starts_with('/') {
            return Err(format!(
                "pgbouncer_admin.host = {:?} looks like a relative path: a unix-socket directory \
                 must be absolute",
                self.host
            ));
        }
        if self.port == 0 {
            return Err("pgbouncer_admin.port must be 1-65535".to_string());
        }
        if self.user.is_empty() {
            return Err(
                "pgbouncer_admin.user is empty: give a user listed in PgBouncer's \
                        admin_users"
                    .to_string(),
            );
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(
                "pgbouncer_admin.password_file and pgbouncer_admin.password_env are both \
                        set: give one"
                    .to_string(),
            );
        }
        if let Some(var) = &self.password_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(format!(
                    "pgbouncer_admin.password_env = {var:?} is not an environment variable name"
                ));
            }
        }
        if let Some(file) = &self.password_file {
            if file.as_os_str().is_empty() {
                return Err("pgbouncer_admin.password_file is empty".to_string());
            }
        }
        if self.pause_timeout.is_zero() {
            return Err(
                "pgbouncer_admin.pause_timeout must be above zero (the longest PgBouncer \
                        stays paused)"
                    .to_string(),
            );
        }
        if self.connect_timeout.is_zero() {
            return Err("pgbouncer_admin.connect_timeout must be above zero".to_string());
        }
        Ok(())
    }

    /// Makes a relative `password_file` relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = &self.password_file {
            if file.is_relative() {
                self.password_file = Some(base.join(file));
            }
        }
    }

    /// Where the console is, as error messages and logs name it: the socket path for a socket
    /// directory, else `host:port`.
    pub fn address(&self) -> String {
        if self.host.starts_with('/') {
            format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port)
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// A server connection per client session.
    Session,
    /// A server connection per transaction.
    Transaction,
    /// A server connection per statement.
    Statement,
}

impl PoolMode {
    /// The name PgBouncer uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PoolMode {
    type Err = String;

    fn from_str(s: &str) -> Result<PoolMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            "statement" => Ok(PoolMode::Statement),
            other => Err(format!("unknown pool_mode {other:?}")),
        }
    }
}
