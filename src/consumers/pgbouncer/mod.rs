//! PgBouncer's admin console: `SHOW CONFIG`, `RELOAD`, `PAUSE`, `RESUME`, `RECONNECT`; the
//! bounded pause of a failover switch is [`pause`]'s.
//!
//! The console speaks only the simple-query protocol, so every command goes through
//! [`tokio_postgres::Client::simple_query`]. Each call opens its own connection (a unix socket in
//! PgBouncer's `unix_socket_dir`, or TCP), reads the password afresh from its file or environment
//! variable (so a rotated password is picked up), and is bounded by `connect_timeout`; only
//! `PAUSE` itself may wait longer, and [`Pause`] bounds that by `pause_timeout`.
//!
//! The connection future is driven inside the call that owns the client rather than spawned, so
//! dropping a call (a timeout, an aborted task) closes the socket at once: a `PAUSE` that has not
//! answered yet never lingers on a connection nobody reads.
//!
//! PgBouncer 1.18 facts this relies on: `PAUSE` closes idle server connections and answers only
//! once no server connection is active (transaction mode: running transactions have finished;
//! session mode: clients have disconnected, which is why session pools are never paused); a
//! global pause survives the disconnect of the console that asked for it; `RESUME` answers
//! "pooler is not paused/suspended" when there is nothing to resume, and resumes a `PAUSE` that
//! is still waiting (whose own console then never gets an answer). 1.18 has no `SHOW STATE`: a
//! global pause shows nowhere, so a `RESUME` is how to find out.

pub mod pause;
mod settings;

pub use pause::{MoveObserver, Pause};
pub use settings::{AdminConfig, PoolMode};

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, SimpleQueryMessage, Socket};

/// An admin-console call that failed. The message names the console (socket path or
/// `host:port`) and the user, and carries PgBouncer's own text when it answered with an error.
/// It never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The password file or environment variable could not be read.
    #[error("PgBouncer admin console {console}: cannot read the password: {detail}")]
    Password {
        /// Console address and user.
        console: String,
        /// Which file or variable, and why.
        detail: String,
    },
    /// Connecting or logging in failed.
    #[error("PgBouncer admin console {console}: cannot connect: {detail}")]
    Connect {
        /// Console address and user.
        console: String,
        /// The cause, with PgBouncer's answer when it gave one.
        detail: String,
    },
    /// Connecting or a command took longer than `connect_timeout`.
    #[error("PgBouncer admin console {console}: {what} did not finish within {after:?}")]
    Timeout {
        /// Console address and user.
        console: String,
        /// `connecting` or the command.
        what: String,
        /// The bound that ran out.
        after: Duration,
    },
    /// PgBouncer answered the command with an error.
    #[error("PgBouncer admin console {console}: {command} refused: {message}")]
    Refused {
        /// Console address and user.
        console: String,
        /// The command sent.
        command: String,
        /// PgBouncer's error text.
        message: String,
    },
    /// The connection broke during the command.
    #[error("PgBouncer admin console {console}: {command} failed: {detail}")]
    Failed {
        /// Console address and user.
        console: String,
        /// The command sent.
        command: String,
        /// The cause.
        detail: String,
    },
    /// PgBouncer's answer did not have the expected shape.
    #[error("PgBouncer admin console {console}: unexpected answer to {command}: {detail}")]
    Unexpected {
        /// Console address and user.
        console: String,
        /// The command sent.
        command: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl AdminError {
    /// PgBouncer's own error text, when it answered a command with one.
    pub fn pgbouncer_message(&self) -> Option<&str> {
        match self {
            AdminError::Refused { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A `tokio_postgres::Error` as text: PgBouncer's answer when it sent one, else the error and its
/// causes (which never include the password: it is only ever sent, in a startup exchange).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "PgBouncer answered {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        );
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Why a command on an open connection did not succeed (before the console is named).
enum CommandFailure {
    Db(String),
    Other(String),
    TimedOut(Duration),
}

/// One admin-console connection whose connection future is polled only while a command runs on
/// it: dropping it closes the socket immediately, whatever is pending.
struct Conn {
    client: Client,
    connection: Connection<Socket, NoTlsStream>,
    closed: Option<String>,
}

impl Conn {
    async fn query(&mut self, sql: &str) -> Result<Vec<SimpleQueryMessage>, CommandFailure> {
        if let Some(why) = &self.closed {
            return Err(CommandFailure::Other(why.clone()));
        }
        let Conn {
            client, connection, ..
        } = self;
        let query = client.simple_query(sql);
        tokio::pin!(query);
        tokio::select! {
            r = &mut query => r.map_err(|e| match e.as_db_error() {
                Some(db) => CommandFailure::Db(db.message().to_string()),
                None => CommandFailure::Other(describe(&e)),
            }),
            r = connection => {
                let why = match r {
                    Ok(()) => "PgBouncer closed the connection".to_string(),
                    Err(e) => describe(&e),
                };
                self.closed = Some(why.clone());
                Err(CommandFailure::Other(why))
            }
        }
    }
}

/// PgBouncer's admin console. Cheap to clone; holds only the settings (the password is read at
/// each connect and kept nowhere).
#[derive(Debug, Clone)]
pub struct Admin {
    cfg: Arc<AdminConfig>,
    console: Arc<str>,
    /// The one database `PAUSE`, `RESUME` and `RECONNECT` act on (one cluster's, when a
    /// PgBouncer fronts several); None: every database.
    database: Option<Arc<str>>,
}

impl Admin {
    /// A console client for `cfg` (call [`AdminConfig::validate`] first).
    pub fn new(cfg: AdminConfig) -> Admin {
        let console = format!("{} as user {}", cfg.address(), cfg.user);
        Admin {
            cfg: Arc::new(cfg),
            console: console.into(),
            database: None,
        }
    }

    /// The same console, with `PAUSE`, `RESUME` and `RECONNECT` for `database` only (a name
    /// validated by the config: letters, digits and `_`).
    pub fn for_database(&self, database: &str) -> Admin {
        Admin {
            cfg: Arc::clone(&self.cfg),
            console: format!("{} (database {database})", self.console).into(),
            database: Some(database.into()),
        }
    }

    /// The database this console's pauses act on, if one.
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// `verb`, for this console's database when it has one.
    fn scoped(&self, verb: &str) -> String {
        match &self.database {
            Some(db) => format!("{verb} {db}"),
            None => verb.to_owned(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdminConfig {
        &self.cfg
    }

    /// The console's address and user, as messages name them.
    pub fn console(&self) -> &str {
        &self.console
    }

    /// The password, read now from its file (first line) or environment variable.
    async fn password(&self) -> Result<Option<Vec<u8>>, AdminError> {
        let fail = |detail: String| AdminError::Password {
            console: self.console.to_string(),
            detail,
        };
        if let Some(file) = &self.cfg.password_file {
            let bytes = tokio::fs::read(file)
                .await
                .map_err(|e| fail(format!("password_file {}: {e}", file.display())))?;
            let mut line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.is_empty() {
                return Err(fail(format!(
                    "password_file {}: the first line is empty",
                    file.display()
                )));
            }
            return Ok(Some(line.to_vec()));
        }
        if let Some(var) = &self.cfg.password_env {
            return match std::env::var_os(var) {
                Some(v) if !v.is_empty() => {
                    use std::os::unix::ffi::OsStrExt;
                    Ok(Some(v.as_bytes().to_vec()))
                }
                Some(_) => Err(fail(format!("password_env {var} is empty"))),
                None => Err(fail(format!("password_env {var} is not set"))),
            };
        }
        Ok(None)
    }

    async fn connect(&self) -> Result<Conn, AdminError> {
        let limit = self.cfg.connect_timeout;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&self.cfg.host)
            .port(self.cfg.port)
            .user(&self.cfg.user)
            .dbname("pgbouncer")
            .application_name("haconfd")
            .connect_timeout(limit);
        if let Some(password) = self.password().await? {
            pg.password(password);
        }
        match tokio::time::timeout(limit, pg.connect(NoTls)).await {
            Err(_) => Err(AdminError::Timeout {
                console: self.console.to_string(),
                what: "connecting".to_string(),
                after: limit,
            }),
            Ok(Err(e)) => Err(AdminError::Connect {
                console: self.console.to_string(),
                detail: describe(&e),
            }),
            Ok(Ok((client, connection))) => Ok(Conn {
                client,
                connection,
                closed: None,
            }),
        }
    }

    /// Runs `sql` on `conn`, bounded by `limit` (`None`: unbounded, for `PAUSE`).
    async fn run(
        &self,
        conn: &mut Conn,
        sql: &str,
        limit: Option<Duration>,
    ) -> Result<Vec<SimpleQueryMessage>, AdminError> {
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, conn.query(sql))
                .await
                .unwrap_or(Err(CommandFailure::TimedOut(limit))),
            None => conn.query(sql).await,
        };
        result.map_err(|f| match f {
            CommandFailure::Db(message) => AdminError::Refused {
                console: self.console.to_string(),
                command: sql.to_string(),
                message,
            },
            CommandFailure::Other(detail) => AdminError::Failed {
                console: self.console.to_string(),
                command: sql.to_string(),
                detail,
            },
            CommandFailure::TimedOut(after) => AdminError::Timeout {
                console: self.console.to_string(),
                what: sql.to_string(),
                after,
            },
        })
    }

    /// Connects and runs one bounded command.
    async fn one(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, AdminError> {
        let mut conn = self.connect().await?;
        self.run(&mut conn, sql, Some(self.cfg.connect_timeout))
            .await
    }

    /// The global `pool_mode`, from `SHOW CONFIG`.
    pub async fn pool_mode(&self) -> Result<PoolMode, AdminError> {
        let mut conn = self.connect().await?;
        self.pool_mode_on(&mut conn).await
    }

    async fn pool_mode_on(&self, conn: &mut Conn) -> Result<PoolMode, AdminError> {
        let rows = self
            .run(conn, "SHOW CONFIG", Some(self.cfg.connect_timeout))
            .await?;
        let unexpected = |detail: String| AdminError::Unexpected {
            console: self.console.to_string(),
            command: "SHOW CONFIG".to_string(),
            detail,
        };
        for msg in &rows {
            if let SimpleQueryMessage::Row(row) = msg {
                if row.try_get("key").ok().flatten() == Some("pool_mode") {
                    let value =
                        row.try_get("value").ok().flatten().ok_or_else(|| {
                            unexpected("the pool_mode row has no value".to_string())
                        })?;
                    return value.parse().map_err(unexpected);
                }
            }
        }
        Err(unexpected("no pool_mode row".to_string()))
    }

    /// Which pools run in session mode, on `conn`: the global `pool_mode` and any database or
    /// user override of it (`SHOW DATABASES` / `SHOW USERS`). `None` when no pool does.
    async fn session_pools_on(&self, conn: &mut Conn) -> Result<Option<String>, AdminError> {
        if self.pool_mode_on(conn).await? == PoolMode::Session {
            return Ok(Some("pool_mode = session".to_string()));
        }
        let mut overrides = Vec::new();
        for (command, kind) in [("SHOW DATABASES", "database"), ("SHOW USERS", "user")] {
            let rows = self
                .run(conn, command, Some(self.cfg.connect_timeout))
                .await?;
            for msg in &rows {
                if let SimpleQueryMessage::Row(row) = msg {
                    let mode = row.try_get("pool_mode").ok().flatten();
                    if mode.and_then(|m| m.parse().ok()) == Some(PoolMode::Session) {
                        let name = row.try_get("name").ok().flatten().unwrap_or("?");
                        overrides.push(format!("{kind} {name}"));
                    }
                }
            }
        }
        Ok((!overrides.is_empty())
            .then(|| format!("pool_mode = session for {}", overrides.join(", "))))
    }

    /// `RELOAD`: PgBouncer rereads its ini (and auth file).
    pub async fn reload(&self) -> Result<(), AdminError> {
        self.one("RELOAD").await.map(drop)
    }

    /// `RESUME`. Returns `true` when PgBouncer was paused and now is not, `false` when it answered
    /// "pooler is not paused/suspended" (which counts as success).
    pub async fn resume(&self) -> Result<bool, AdminError> {
        let mut conn = self.connect().await?;
        self.resume_on(&mut conn).await
    }

    async fn resume_on(&self, conn: &mut Conn) -> Result<bool, AdminError> {
        match self
            .run(conn, &self.scoped("RESUME"), Some(self.cfg.connect_timeout))
            .await
        {
            Ok(_) => Ok(true),
            Err(AdminError::Refused { message, .. }) if message.contains("not paused") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Resumes what an earlier run of haconfd left paused (killed between its `PAUSE` and its
    /// `RESUME`): with `databases` None (one cluster: haconfd pauses the whole pooler) a global
    /// `RESUME`, else `RESUME <db>` for each of `databases` that `SHOW DATABASES` shows paused.
    /// Returns what was resumed (`*` for the whole pooler); nothing when nothing was paused.
    /// haconfd owns the pauses of the databases it manages: a pause an operator set on them by
    /// hand is lifted too (documented).
    pub async fn resume_left_paused(
        &self,
        databases: Option<&[String]>,
    ) -> Result<Vec<String>, AdminError> {
        let mut conn = self.connect().await?;
        let limit = Some(self.cfg.connect_timeout);
        let Some(dbs) = databases else {
            return match self.run(&mut conn, "RESUME", limit).await {
                Ok(_) => Ok(vec!["*".to_owned()]),
                Err(AdminError::Refused { message, .. }) if message.contains("not paused") => {
                    Ok(Vec::new())
                }
                Err(e) => Err(e),
            };
        };
        let rows = self.run(&mut conn, "SHOW DATABASES", limit).await?;
        let paused: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .filter(|r| r.try_get("paused").ok().flatten() == Some("1"))
            .filter_map(|r| r.try_get("name").ok().flatten().map(str::to_owned))
            .filter(|n| dbs.contains(n))
            .collect();
        let mut resumed = Vec::new();
        for db in paused {
            match self.run(&mut conn, &format!("RESUME {db}"), limit).await {
                Ok(_) => resumed.push(db),
                Err(AdminError::Refused { message, .. }) if message.contains("not paused") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(resumed)
    }

    /// `RECONNECT`: every server connection is closed once released, so new server connections
    /// go to the address in the current ini (PgBouncer 1.15 and later).
    pub async fn reconnect(&self) -> Result<(), AdminError> {
        self.one(&self.scoped("RECONNECT")).await.map(drop)
    }

    /// `PAUSE`, waiting for the answer (bounded by `pause_timeout`; on timeout the pause is left
    /// in place: call [`Admin::resume`]). PgBouncer answers only once no server connection is
    /// active: in transaction mode when running transactions have finished, in session mode when
    /// clients have disconnected. Returns `true` when it paused now, `false` when it answered
    /// "already suspended/paused" (which counts as success). [`Pause`] is the bounded form.
    pub async fn pause(&self) -> Result<bool, AdminError> {
        let mut conn = self.connect().await?;
        self.pause_on(&mut conn, Some(self.cfg.pause_timeout)).await
    }

    async fn pause_on(&self, conn: &mut Conn, limit: Option<Duration>) -> Result<bool, AdminError> {
        match self.run(conn, &self.scoped("PAUSE"), limit).await {
            Ok(_) => Ok(true),
            Err(AdminError::Refused { message, .. }) if message.contains("already") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// [`Admin::resume_left_paused`] on each distinct console of `consoles` (target name, console),
/// logging what was resumed: at start, what an earlier run killed mid-switch left paused.
pub async fn resume_all_left_paused<'a>(
    consoles: impl Iterator<Item = (&'a str, &'a Admin)>,
    databases: Option<&[String]>,
) {
    let mut seen: Vec<&AdminConfig> = Vec::new();
    for (target, admin) in consoles {
        if seen.contains(&admin.config()) {
            continue;
        }
        seen.push(admin.config());
        match admin.resume_left_paused(databases).await {
            Ok(r) if r.is_empty() => {}
            Ok(r) => {
                tracing::warn!(target = %target, console = admin.console(), resumed = ?r, "PgBouncer was left paused (by an earlier run stopped mid-switch, or by hand): resumed")
            }
            Err(e) => {
                tracing::warn!(target = %target, error = %e, "cannot ask PgBouncer whether it was left paused")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn defaults_fill_in_and_unknown_keys_are_refused() {
        let cfg: AdminConfig = toml::from_str(r#"host = "/run/postgresql""#).unwrap();
        assert_eq!(cfg, AdminConfig::new("/run/postgresql"));
        assert_eq!(cfg.port, 6432);
        assert_eq!(cfg.user, "pgbouncer");
        assert_eq!(cfg.pause_timeout, Duration::from_secs(10));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(2));
        let cfg: AdminConfig =
            toml::from_str("host = \"10.0.0.1\"\npause_timeout = \"300ms\"\nport = 7000").unwrap();
        assert_eq!(cfg.pause_timeout, Duration::from_millis(300));
        assert_eq!(cfg.address(), "10.0.0.1:7000");
        assert!(toml::from_str::<AdminConfig>("host = \"h\"\npasword_file = \"x\"").is_err());
        let back: AdminConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn validate_names_the_key() {
        let ok = AdminConfig::new("/run/pgbouncer");
        assert_eq!(ok.validate(), Ok(()));
        let cases: Vec<(AdminConfig, &str)> = vec![
            (
                AdminConfig {
                    pause_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "pgbouncer_admin.pause_timeout",
            ),
            (
                AdminConfig {
                    connect_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "pgbouncer_admin.connect_timeout",
            ),
            (
                AdminConfig {
                    password_file: Some("p".into()),
                    password_env: Some("P".into()),
                    ..ok.clone()
                },
                "pgbouncer_admin.password_file",
            ),
            (AdminConfig::new(""), "pgbouncer_admin.host"),
            (AdminConfig::new("run/pgbouncer"), "pgbouncer_admin.host"),
            (
                AdminConfig {
                    port: 0,
                    ..ok.clone()
                },
                "pgbouncer_admin.port",
            ),
            (
                AdminConfig {
                    password_env: Some(String::new()),
                    ..ok.clone()
                },
                "pgbouncer_admin.password_env",
            ),
        ];
        for (cfg, key) in cases {
            let e = cfg.validate().unwrap_err();
            assert!(e.contains(key), "{e:?} should name {key}");
        }
    }

    #[test]
    fn relative_password_file_is_resolved_against_the_base() {
        let mut cfg = AdminConfig {
            password_file: Some("secrets/pgb".into()),
            ..AdminConfig::new("/run/pgbouncer")
        };
        cfg.resolve_paths(Path::new("/etc/haconfd"));
        assert_eq!(
            cfg.password_file.as_deref(),
            Some(Path::new("/etc/haconfd/secrets/pgb"))
        );
        cfg.resolve_paths(Path::new("/elsewhere"));
        assert_eq!(
            cfg.password_file.as_deref(),
            Some(Path::new("/etc/haconfd/secrets/pgb"))
        );
    }

    #[test]
    fn addresses_name_the_socket_or_host_and_port() {
        let mut cfg = AdminConfig::new("/run/pgbouncer/");
        assert_eq!(cfg.address(), "/run/pgbouncer/.s.PGSQL.6432");
        cfg.host = "::1".into();
        assert_eq!(cfg.address(), "[::1]:6432");
        let admin = Admin::new(cfg);
        assert_eq!(admin.console(), "[::1]:6432 as user pgbouncer");
    }

    #[test]
    fn pool_modes_parse() {
        assert_eq!("session".parse(), Ok(PoolMode::Session));
        assert_eq!("Transaction".parse(), Ok(PoolMode::Transaction));
        assert_eq!("statement".parse(), Ok(PoolMode::Statement));
        assert!("sessions".parse::<PoolMode>().is_err());
    }

    #[tokio::test]
    async fn the_password_is_the_first_line_read_at_each_connect() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\r\nsecond line\n").unwrap();
        let admin = Admin::new(AdminConfig {
            password_file: Some(file.clone()),
            ..AdminConfig::new("/nonexistent")
        });
        assert_eq!(admin.password().await.unwrap().unwrap(), b"s3cret");
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(admin.password().await.unwrap().unwrap(), b"rotated");
        std::fs::write(&file, "\nx").unwrap();
        let e = admin.password().await.unwrap_err().to_string();
        assert!(e.contains("first line is empty"), "{e}");
        assert!(!format!("{admin:?}").contains("rotated"));

        let var = "HACONFD_PGBOUNCER_UNIT_TEST_PASSWORD_UNSET";
        let admin = Admin::new(AdminConfig {
            password_env: Some(var.into()),
            ..AdminConfig::new("/nonexistent")
        });
        let e = admin.password().await.unwrap_err().to_string();
        assert!(e.contains(var) && e.contains("not set"), "{e}");
    }
}
