//! Configuration: the TOML file parsed into a raw struct (no I/O beyond reading it), overridden by
//! `HACONFD_*` env vars and flags, then resolved into [`Settings`] (paths made absolute, durations,
//! modes, owners and reload forms validated). Precedence, in one place: flag > env > file > default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::apply::STAGED_PLACEHOLDER;
use crate::consumers::haproxy::server_state::ServerStateConfig;
use crate::consumers::reload::Reload;
use crate::consumers::Consumer;
use crate::guard::GuardConfig;
use crate::logging::LogFormat;
use crate::source::{Clusters, EtcdApi, EtcdSettings, TlsConfig};
use crate::target::{default_command_timeout, ClusterSettings, Target, SCOPE_PLACEHOLDER};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/haconfd/haconfd.toml";

/// Errors raised while loading or resolving the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path of the config file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, bad duration...).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// Path of the config file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The configuration file as written, before overrides and resolution.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where Patroni's keys live.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Daemon timing: coalescing, resync, retries.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// Guards against an empty or shrunken store.
    #[serde(default)]
    pub guard: GuardConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// HTTP endpoint for health, readiness, metrics and status.
    #[serde(default)]
    pub http: HttpConfig,
    /// The failover fast path.
    #[serde(default)]
    pub failover: crate::failover::FailoverConfig,
    /// Lag-aware replicas (each cluster's `lag` table overrides it).
    #[serde(default)]
    pub lag: crate::lag::LagConfig,
    /// How event hooks run.
    #[serde(default)]
    pub hooks: crate::hooks::HooksConfig,
    /// Event hooks, one per `[[hook]]`.
    #[serde(default, rename = "hook")]
    pub hook_list: Vec<crate::hooks::HookConfig>,
    /// Template variables shared by every template (`vars.*` in the context).
    #[serde(default)]
    pub vars: toml::Table,
    /// Per-cluster settings, one `[clusters.<scope>]` table per cluster (`settings` in the
    /// context): listen ports, PgBouncer database names, anything a template reads.
    #[serde(default)]
    pub clusters: BTreeMap<String, toml::Table>,
    /// One entry per rendered output.
    #[serde(default, rename = "template")]
    pub templates: Vec<TemplateConfig>,
}

/// `[etcd]`: the store and the Patroni scope.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Which etcd API Patroni writes to: `v3` for its `etcd3:` section, `v2` for `etcd:`.
    pub api: EtcdApi,
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Patroni's `namespace` (default `/service`).
    pub namespace: String,
    /// Patroni's `scope` (the cluster name): one cluster. Exactly one of `scope`, `scopes` and
    /// `discover` is set.
    pub scope: Option<String>,
    /// Several clusters, by scope.
    pub scopes: Vec<String>,
    /// Every cluster found under the namespace, as it appears.
    pub discover: bool,
    /// Timeout of one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of one request (list, watch creation).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// gRPC keepalive ping interval; detects a hung etcd on an open watch.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// gRPC keepalive timeout.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// User for etcd auth.
    pub username: Option<String>,
    /// Password for etcd auth (prefer `password_file` or `HACONFD_ETCD_PASSWORD`).
    pub password: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// TLS to etcd.
    pub tls: Option<TlsConfig>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            api: EtcdApi::V3,
            endpoints: vec!["http://127.0.0.1:2379".into()],
            namespace: "/service".into(),
            scope: None,
            scopes: Vec::new(),
            discover: false,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(3),
            username: None,
            password: None,
            password_file: None,
            tls: None,
        }
    }
}

/// `[daemon]`: timing of passes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Minimum time between two passes that write or reload. Changes arriving in between are
    /// merged into the next pass; the first change after a quiet period runs at once.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Full re-list of the prefix as a safety net (0 disables).
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Cap of the reconnect backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long `once`, `check` and `render` wait for etcd before failing.
    #[serde(with = "humantime_serde")]
    pub once_timeout: Duration,
    /// Retry a failed pass after this long even if nothing changes.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(500),
            resync_interval: Duration::from_secs(300),
            max_backoff: Duration::from_millis(500),
            once_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(5),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `haconfd=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `[http]`: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address such as `127.0.0.1:9187`.
    pub listen: Option<String>,
}

/// One `[[template]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Name used in logs, metrics and `render --template`; defaults to the destination's file name.
    pub name: Option<String>,
    /// The Tera template, relative to the config file's directory.
    pub src: PathBuf,
    /// The rendered file.
    pub dest: PathBuf,
    /// Argv run on the staged file before it is swapped in; `{{staged}}` is replaced by its path.
    #[serde(default)]
    pub check: Vec<String>,
    /// Time limit of the check command.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Octal mode of the file, e.g. `"0644"`. Default: keep the existing file's, or 0644.
    pub mode: Option<String>,
    /// Owner user name or uid. Default: keep the existing file's.
    pub owner: Option<String>,
    /// Owner group name or gid. Default: keep the existing file's.
    pub group: Option<String>,
    /// How to reload the consumer once the file changed.
    pub reload: Option<ReloadConfig>,
    /// Refuse to render unless the cluster has a leader (default: true for pgbouncer-like
    /// templates is up to the template; this flag makes it explicit).
    #[serde(default)]
    pub require_leader: bool,
    /// With `require_leader`: what the target does in a Patroni standby cluster, whose leader
    /// takes no writes. `"keep"` (the default) keeps the last file and says so; `"follow"`
    /// points it at the standby leader once it answers `GET /standby-leader` (a read-only pool
    /// at a disaster-recovery site).
    #[serde(default)]
    pub standby_leader: StandbyLeader,
    /// Carry HAProxy server state over reloads; with `[failover]`, the HAProxy the fast path
    /// moves through its runtime API.
    pub server_state: Option<ServerStateConfig>,
    /// PgBouncer's admin console: reload through `RELOAD`, and PAUSE/RESUME around a leader
    /// change (the `reload` action, if any, is the fallback when the console cannot be reached).
    pub pgbouncer_admin: Option<crate::consumers::pgbouncer::AdminConfig>,
    /// Variables for this template only; they override the global `[vars]`.
    #[serde(default)]
    pub vars: toml::Table,
}

/// `standby_leader` of a `[[template]]` (see [`TemplateConfig::standby_leader`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StandbyLeader {
    /// Keep the last file while the leader is a standby leader.
    #[default]
    Keep,
    /// Point at the standby leader once `GET /standby-leader` answers 200.
    Follow,
}

/// `reload = {...}`: exactly one of `pidfile`, `master_socket` or `command`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Pidfile of the process to signal.
    pub pidfile: Option<PathBuf>,
    /// Signal name, e.g. `SIGUSR2` (HAProxy master) or `SIGHUP` (PgBouncer).
    pub signal: Option<String>,
    /// Expected process name (`/proc/<pid>/comm` or the basename of `/proc/<pid>/exe`).
    pub process: Option<String>,
    /// HAProxy master CLI socket: reload through it, or verify a signal-based reload with it.
    pub master_socket: Option<PathBuf>,
    /// Argv to run instead of signalling (never a shell string).
    pub command: Option<Vec<String>>,
    /// Time limit of the command or of the master-socket reload.
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
}

/// Overrides from flags and `HACONFD_*` env vars (clap merges the two, flag first).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces `etcd.api`.
    pub etcd_api: Option<EtcdApi>,
    /// Replaces `etcd.endpoints`.
    pub endpoints: Option<Vec<String>>,
    /// Replaces `etcd.namespace`.
    pub namespace: Option<String>,
    /// Replaces `etcd.scope`.
    pub scope: Option<String>,
    /// Replaces `etcd.username`.
    pub username: Option<String>,
    /// Replaces `etcd.password`.
    pub password: Option<String>,
    /// Replaces `log.format`.
    pub log_format: Option<LogFormat>,
    /// Replaces `log.level`.
    pub log_level: Option<String>,
    /// Replaces `daemon.min_interval`.
    pub min_interval: Option<Duration>,
    /// Replaces `http.listen`.
    pub listen: Option<String>,
    /// Sets `guard.force`.
    pub force: bool,
    /// Hooks are logged, not run (`run --dry-run-hooks`).
    pub dry_run_hooks: bool,
}

impl RawConfig {
    /// Parses TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_owned();
            if let Some(hint) = crate::confd::config_hint(&message, text) {
                message = format!("{message}\nhint: {hint}");
            }
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Applies flag/env overrides on top of the file.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.etcd_api {
            self.etcd.api = v;
        }
        if let Some(v) = &o.endpoints {
            self.etcd.endpoints = v.clone();
        }
        if let Some(v) = &o.namespace {
            self.etcd.namespace = v.clone();
        }
        if let Some(v) = &o.scope {
            // The flag names one cluster: it replaces a list or discovery too.
            self.etcd.scope = Some(v.clone());
            self.etcd.scopes.clear();
            self.etcd.discover = false;
        }
        if let Some(v) = &o.username {
            self.etcd.username = Some(v.clone());
        }
        if let Some(v) = &o.password {
            self.etcd.password = Some(v.clone());
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(v) = o.min_interval {
            self.daemon.min_interval = v;
        }
        if let Some(v) = &o.listen {
            self.http.listen = Some(v.clone());
        }
        if o.force {
            self.guard.force = true;
        }
        if o.dry_run_hooks {
            self.hooks.dry_run = true;
        }
    }

    /// Resolves into [`Settings`]; relative template paths are taken from `base_dir`.
    pub fn resolve(self, base_dir: &Path) -> Result<Settings, ConfigError> {
        let etcd = resolve_etcd(self.etcd, base_dir)?;
        check_daemon_durations(&self.daemon)?;
        if !(0.0..=1.0).contains(&self.guard.max_removed_fraction) {
            return Err(ConfigError::Invalid(format!(
                "guard.max_removed_fraction must be between 0 and 1, got {}",
                self.guard.max_removed_fraction
            )));
        }
        if let Some(listen) = &self.http.listen {
            check_listen(listen)?;
        }
        let mut guard = self.guard;
        guard.state_file = guard
            .state_file
            .map(|p| resolve_path(base_dir, &p).map_err(|m| invalid_path("guard.state_file", m)))
            .transpose()?;
        self.failover.validate().map_err(ConfigError::Invalid)?;
        self.lag.validate("lag").map_err(ConfigError::Invalid)?;
        self.hooks.validate().map_err(ConfigError::Invalid)?;
        let hooks = self
            .hook_list
            .into_iter()
            .enumerate()
            .map(|(i, h)| crate::hooks::Hook::resolve(h, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConfigError::Invalid)?;
        if let Some(dup) = hooks
            .iter()
            .enumerate()
            .find(|(i, h)| hooks[..*i].iter().any(|o| o.name == h.name))
        {
            return Err(ConfigError::Invalid(format!(
                "two [[hook]] entries are named {:?}; set distinct `name`s",
                dup.1.name
            )));
        }
        let vars = table_to_json(self.vars);
        let mut targets = Vec::with_capacity(self.templates.len());
        for (i, t) in self.templates.into_iter().enumerate() {
            let target = resolve_template(t, i, base_dir, &vars)?;
            if targets.iter().any(|o: &Target| o.name == target.name) {
                return Err(ConfigError::Invalid(format!(
                    "two [[template]] entries are named {:?}; set distinct `name`s",
                    target.name
                )));
            }
            targets.push(target);
        }
        if targets.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[template]] entries: nothing to render".into(),
            ));
        }
        let clusters = resolve_clusters(self.clusters, &self.lag)?;
        let scopes: Vec<&str> = match &etcd.clusters {
            Clusters::One(scope) => vec![scope.as_str()],
            _ => clusters.keys().map(String::as_str).collect(),
        };
        check_written_files(&targets, guard.state_file.as_deref(), &scopes)?;
        check_ports(&clusters, &targets)?;
        check_cluster_targets(&etcd, &targets)?;
        Ok(Settings {
            etcd,
            daemon: self.daemon,
            guard,
            log: self.log,
            http: self.http,
            failover: self.failover,
            lag: self.lag,
            hooks_config: self.hooks,
            hooks,
            clusters,
            targets,
        })
    }
}

/// The resolved, validated configuration every mode runs from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Store access.
    pub etcd: EtcdSettings,
    /// Timing.
    pub daemon: DaemonConfig,
    /// Empty/shrink guards.
    pub guard: GuardConfig,
    /// Logging.
    pub log: LogConfig,
    /// HTTP endpoint.
    pub http: HttpConfig,
    /// The failover fast path.
    pub failover: crate::failover::FailoverConfig,
    /// Lag-aware replicas, for clusters with no `lag` table of their own.
    pub lag: crate::lag::LagConfig,
    /// How hooks run.
    pub hooks_config: crate::hooks::HooksConfig,
    /// Event hooks, in config order.
    pub hooks: Vec<crate::hooks::Hook>,
    /// Per-cluster settings, by scope (`[clusters.<scope>]`).
    pub clusters: BTreeMap<String, ClusterSettings>,
    /// The outputs, in config order.
    pub targets: Vec<Target>,
}

/// Resolves `[clusters.*]`: scope names valid, `databases` a list of names, and every `port` or
/// `*_port` value a port that no other cluster (or other key) uses.
fn resolve_clusters(
    raw: BTreeMap<String, toml::Table>,
    lag: &crate::lag::LagConfig,
) -> Result<BTreeMap<String, ClusterSettings>, ConfigError> {
    let mut out = BTreeMap::new();
    let mut ports: BTreeMap<i64, String> = BTreeMap::new();
    for (scope, table) in raw {
        let key = |k: &str| format!("clusters.{scope}.{k}");
        if let Some(why) = crate::model::scope_refusal(&scope) {
            return Err(ConfigError::Invalid(format!("[clusters.{scope:?}]: {why}")));
        }
        let mut databases = Vec::new();
        let lag = match table.get("lag") {
            None => None,
            Some(toml::Value::Table(over)) => {
                Some(lag.with(over, &key("lag")).map_err(ConfigError::Invalid)?)
            }
            Some(v) => {
                return Err(ConfigError::Invalid(format!(
                    "{} = {v} must be a table ({{ max_bytes = \"64MB\", ... }})",
                    key("lag")
                )))
            }
        };
        for (k, v) in &table {
            if is_port_key(k) {
                let port = v
                    .as_integer()
                    .filter(|p| (1..=65535).contains(p))
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "{} = {v} is not a port (an integer from 1 to 65535)",
                            key(k)
                        ))
                    })?;
                if let Some(other) = ports.insert(port, key(k)) {
                    return Err(ConfigError::Invalid(format!(
                        "{} and {other} are both port {port}: each cluster needs its own ports",
                        key(k)
                    )));
                }
            }
            if k == "databases" {
                let list = v.as_array().ok_or_else(|| {
                    ConfigError::Invalid(format!("{} must be a list of names", key(k)))
                })?;
                for d in list {
                    let name = d
                        .as_str()
                        .filter(|n| {
                            !n.is_empty()
                                && n.len() <= 63
                                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        })
                        .ok_or_else(|| {
                            ConfigError::Invalid(format!(
                                "{}: {d} is not a database name (letters, digits, _)",
                                key(k)
                            ))
                        })?;
                    databases.push(name.to_owned());
                }
            }
        }
        out.insert(
            scope,
            ClusterSettings {
                vars: table_to_json(table),
                databases,
                lag,
            },
        );
    }
    for (i, (scope, c)) in out.iter().enumerate() {
        for d in &c.databases {
            if let Some((other, _)) = out.iter().take(i).find(|(_, o)| o.databases.contains(d)) {
                return Err(ConfigError::Invalid(format!(
                    "clusters.{scope}.databases and clusters.{other}.databases both name {d:?}: \
                     a PgBouncer database points at one cluster"
                )));
            }
        }
    }
    Ok(out)
}

fn resolve_etcd(e: EtcdConfig, base_dir: &Path) -> Result<EtcdSettings, ConfigError> {
    let clusters = resolve_clusters_of(e.scope.clone(), e.scopes.clone(), e.discover)?;
    let endpoints = resolve_endpoints(&e.endpoints)?;
    for (key, d) in [
        ("etcd.connect_timeout", e.connect_timeout),
        ("etcd.request_timeout", e.request_timeout),
        ("etcd.keepalive_interval", e.keepalive_interval),
        ("etcd.keepalive_timeout", e.keepalive_timeout),
    ] {
        positive(key, d).map_err(ConfigError::Invalid)?;
    }
    let namespace = normalize_namespace(&e.namespace);
    let auth = resolve_auth(&e, base_dir)?;
    let tls = resolve_tls(e.tls, base_dir)?;
    Ok(EtcdSettings {
        api: e.api,
        endpoints,
        namespace,
        clusters,
        connect_timeout: e.connect_timeout,
        request_timeout: e.request_timeout,
        keepalive_interval: e.keepalive_interval,
        keepalive_timeout: e.keepalive_timeout,
        auth,
        tls,
    })
}

/// Which clusters: exactly one of `etcd.scope`, `etcd.scopes` and `etcd.discover`.
fn resolve_clusters_of(
    scope: Option<String>,
    scopes: Vec<String>,
    discover: bool,
) -> Result<Clusters, ConfigError> {
    let check_scope = |key: &str, scope: &str| {
        if scope.contains('/') {
            return Err(ConfigError::Invalid(format!(
                "{key} {scope:?} must not contain '/' (Patroni's keys are <namespace>/<scope>/...)"
            )));
        }
        match crate::model::scope_refusal(scope) {
            Some(why) => Err(ConfigError::Invalid(format!("{key}: {why}"))),
            None => Ok(()),
        }
    };
    let scope = scope.filter(|s| !s.is_empty());
    let clusters = match (scope, scopes.is_empty(), discover) {
        (Some(scope), true, false) => {
            check_scope("etcd.scope", &scope)?;
            Clusters::One(scope)
        }
        (None, false, false) => {
            let mut scopes = scopes;
            for s in &scopes {
                check_scope("etcd.scopes entry", s)?;
            }
            scopes.sort();
            if let Some(w) = scopes.windows(2).find(|w| w[0] == w[1]) {
                return Err(ConfigError::Invalid(format!(
                    "etcd.scopes names {:?} twice",
                    w[0]
                )));
            }
            Clusters::List(scopes)
        }
        (None, true, true) => Clusters::Discover,
        (None, true, false) => {
            return Err(ConfigError::Invalid(
                "etcd.scope is not set (Patroni's `scope`; set it in [etcd], HACONFD_SCOPE or --scope; \
                 or etcd.scopes = [...] for several clusters, or etcd.discover = true for every \
                 cluster under the namespace)"
                    .into(),
            ))
        }
        _ => {
            return Err(ConfigError::Invalid(
                "set one of etcd.scope (one cluster), etcd.scopes (a list) and etcd.discover \
                 (every cluster under the namespace), not several"
                    .into(),
            ))
        }
    };
    Ok(clusters)
}

/// `etcd.endpoints`: comma-separated or a list, each `http(s)://host:port`.
fn resolve_endpoints(given: &[String]) -> Result<Vec<String>, ConfigError> {
    let endpoints: Vec<String> = given
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(ConfigError::Invalid("etcd.endpoints is empty".into()));
    }
    for ep in &endpoints {
        let u = url::Url::parse(ep)
            .map_err(|err| ConfigError::Invalid(format!("etcd endpoint {ep:?}: {err}")))?;
        if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
            return Err(ConfigError::Invalid(format!(
                "etcd endpoint {ep:?} must be http://host:port or https://host:port"
            )));
        }
    }
    Ok(endpoints)
}

/// `etcd.username` with its password (`password`, or the first line of `password_file`).
fn resolve_auth(e: &EtcdConfig, base_dir: &Path) -> Result<Option<(String, String)>, ConfigError> {
    let password = match (&e.password, &e.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(file)) => {
            let file =
                resolve_path(base_dir, file).map_err(|m| invalid_path("etcd.password_file", m))?;
            let text = std::fs::read_to_string(&file).map_err(|err| {
                ConfigError::Invalid(format!("etcd.password_file {}: {err}", file.display()))
            })?;
            Some(text.lines().next().unwrap_or("").to_owned())
        }
        (None, None) => None,
    };
    let auth = match (e.username.clone(), password) {
        (Some(u), Some(p)) => Some((u, p)),
        (Some(u), None) => {
            return Err(ConfigError::Invalid(format!(
                "etcd.username {u:?} is set but no password (password, password_file or HACONFD_ETCD_PASSWORD)"
            )))
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid(
                "an etcd password is set but etcd.username is not".into(),
            ))
        }
        (None, None) => None,
    };
    Ok(auth)
}

/// `[etcd.tls]`, its paths made absolute; a client certificate needs its key.
fn resolve_tls(tls: Option<TlsConfig>, base_dir: &Path) -> Result<Option<TlsConfig>, ConfigError> {
    let tls_path = |key: &str, p: Option<PathBuf>| {
        p.map(|p| resolve_path(base_dir, &p).map_err(|m| invalid_path(key, m)))
            .transpose()
    };
    let tls = match tls {
        Some(t) => Some(TlsConfig {
            ca: tls_path("etcd.tls.ca", t.ca)?,
            cert: tls_path("etcd.tls.cert", t.cert)?,
            key: tls_path("etcd.tls.key", t.key)?,
            domain: t.domain,
        }),
        None => None,
    };
    if let Some(t) = &tls {
        if t.cert.is_some() != t.key.is_some() {
            return Err(ConfigError::Invalid(
                "etcd.tls needs both cert and key for a client certificate".into(),
            ));
        }
    }
    Ok(tls)
}

fn resolve_template(
    t: TemplateConfig,
    index: usize,
    base_dir: &Path,
    global_vars: &serde_json::Map<String, serde_json::Value>,
) -> Result<Target, ConfigError> {
    let name = match t.name {
        Some(n) => n,
        None => t
            .dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "template #{}: dest {} has no file name",
                    index + 1,
                    t.dest.display()
                ))
            })?,
    };
    let ctx = |msg: String| ConfigError::Invalid(format!("template {name:?}: {msg}"));
    if t.dest.file_name().is_none() {
        return Err(ctx(format!("dest {} has no file name", t.dest.display())));
    }
    check_argv(&t.check).map_err(ctx)?;
    positive("check_timeout", t.check_timeout).map_err(ctx)?;
    let dest = resolve_path(base_dir, &t.dest).map_err(|m| ctx(format!("dest: {m}")))?;
    if t.standby_leader == StandbyLeader::Follow && !t.require_leader {
        return Err(ctx(
            "standby_leader = \"follow\" goes with require_leader = true (without it, the target renders whatever leader there is)".into(),
        ));
    }
    if let Some(parent) = dest.parent() {
        if parent.to_string_lossy().contains(SCOPE_PLACEHOLDER) {
            return Err(ctx(format!(
                "dest {}: {SCOPE_PLACEHOLDER} may only be in the file name (one file per cluster \
                 in one directory)",
                dest.display()
            )));
        }
    }
    let mode = t.mode.as_deref().map(parse_mode).transpose().map_err(ctx)?;
    let owner = t
        .owner
        .as_deref()
        .map(resolve_user)
        .transpose()
        .map_err(ctx)?;
    let group = t
        .group
        .as_deref()
        .map(resolve_group)
        .transpose()
        .map_err(ctx)?;
    let reload = t
        .reload
        .map(|r| resolve_reload(r, base_dir).map_err(&ctx))
        .transpose()?;
    let consumer = resolve_consumer(t.server_state, t.pgbouncer_admin, base_dir).map_err(ctx)?;
    let mut vars = global_vars.clone();
    vars.extend(table_to_json(t.vars));
    Ok(Target {
        per_cluster: dest.to_string_lossy().contains(SCOPE_PLACEHOLDER),
        src: resolve_path(base_dir, &t.src).map_err(|m| ctx(format!("src: {m}")))?,
        dest,
        check: t.check,
        check_timeout: t.check_timeout,
        mode,
        owner,
        group,
        reload,
        require_leader: t.require_leader,
        follow_standby: t.standby_leader == StandbyLeader::Follow,
        consumer,
        vars,
        name,
    })
}

/// A check is an argv that names the staged file: one that is not handed it checks whatever
/// else it reads, usually the live file, and the new one would go live unchecked.
fn check_argv(check: &[String]) -> Result<(), String> {
    let Some(first) = check.first() else {
        return Ok(());
    };
    if first.contains(char::is_whitespace) {
        return Err(format!(
            "check is an argv, not a shell string: split {first:?} into separate items"
        ));
    }
    if !check.iter().any(|a| a.contains(STAGED_PLACEHOLDER)) {
        return Err(format!(
            "check {check:?} does not name the staged file: put \"{STAGED_PLACEHOLDER}\" where \
             the file to check goes, or the new file goes live unchecked"
        ));
    }
    Ok(())
}

/// A file mode in octal (`"0644"`, `"0o640"`).
fn parse_mode(m: &str) -> Result<u32, String> {
    u32::from_str_radix(m.trim_start_matches("0o"), 8)
        .ok()
        .filter(|v| *v <= 0o7777)
        .ok_or_else(|| format!("mode {m:?} is not an octal file mode like \"0644\""))
}

/// Who reads a template's file: HAProxy with server state, PgBouncer with its console, or
/// another program (never both).
fn resolve_consumer(
    server_state: Option<ServerStateConfig>,
    pgbouncer_admin: Option<crate::consumers::pgbouncer::AdminConfig>,
    base_dir: &Path,
) -> Result<Consumer, String> {
    let server_state = server_state
        .map(|ss| {
            Ok::<_, String>(ServerStateConfig {
                stats_socket: resolve_path(base_dir, &ss.stats_socket)
                    .map_err(|m| format!("server_state.stats_socket: {m}"))?,
                file: resolve_path(base_dir, &ss.file)
                    .map_err(|m| format!("server_state.file: {m}"))?,
                ..ss
            })
        })
        .transpose()?;
    let pgbouncer_admin = pgbouncer_admin
        .map(|mut a| {
            a.validate()?;
            a.resolve_paths(base_dir);
            Ok::<_, String>(crate::consumers::pgbouncer::Admin::new(a))
        })
        .transpose()?;
    Ok(match (server_state, pgbouncer_admin) {
        (Some(ss), None) => Consumer::Haproxy(ss),
        (None, Some(a)) => Consumer::Pgbouncer(a),
        (None, None) => Consumer::Plain,
        (Some(_), Some(_)) => {
            return Err(
                "server_state (a HAProxy) and pgbouncer_admin (a PgBouncer) are both set: one \
                 program reads a template's file; give each its own [[template]]"
                    .to_string(),
            )
        }
    })
}

fn resolve_reload(r: ReloadConfig, base_dir: &Path) -> Result<Reload, String> {
    let timeout = r.timeout.unwrap_or_else(default_command_timeout);
    positive("reload.timeout", timeout)?;
    // `command` is an argv run as written (looked up in PATH), not a path setting.
    let pidfile = r
        .pidfile
        .as_deref()
        .map(|p| resolve_path(base_dir, p).map_err(|m| format!("reload.pidfile: {m}")))
        .transpose()?;
    let master_socket = r
        .master_socket
        .as_deref()
        .map(|p| resolve_path(base_dir, p).map_err(|m| format!("reload.master_socket: {m}")))
        .transpose()?;
    match (&pidfile, &r.command, &master_socket) {
        (Some(pidfile), None, socket) => {
            let signal_name = r.signal.as_deref().ok_or(
                "reload with a pidfile needs `signal` (SIGUSR2 for an HAProxy master, SIGHUP for PgBouncer)",
            )?;
            let signal = parse_signal(signal_name)?;
            let process = r.process.clone().ok_or(
                "reload with a pidfile needs `process`, the expected process name (e.g. \"haproxy\")",
            )?;
            Ok(Reload::Signal {
                pidfile: pidfile.clone(),
                signal,
                process,
                master_socket: socket.clone(),
                timeout,
            })
        }
        (None, Some(argv), None) => {
            if argv.is_empty() {
                return Err("reload.command is empty".into());
            }
            if r.signal.is_some() || r.process.is_some() {
                return Err("reload.command does not take `signal` or `process`".into());
            }
            Ok(Reload::Command {
                argv: argv.clone(),
                timeout,
            })
        }
        (None, None, Some(path)) => {
            if r.signal.is_some() || r.process.is_some() {
                return Err(
                    "reload through master_socket does not take `signal` or `process`".into(),
                );
            }
            Ok(Reload::MasterSocket {
                path: path.clone(),
                timeout,
            })
        }
        (None, None, None) => {
            Err("reload needs one of `pidfile`, `master_socket` or `command`".into())
        }
        _ => Err("reload takes only one of `pidfile` or `command` (master_socket may go with pidfile to verify)".into()),
    }
}

/// Takes a path setting from the config file's directory when it is relative, as every path in
/// the file is (an absolute `base_dir` makes the result independent of the working directory).
fn resolve_path(base_dir: &Path, path: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err("the path is empty".into());
    }
    Ok(base_dir.join(path))
}

fn invalid_path(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid(format!("{key}: {message}"))
}

/// Refuses a zero duration for a setting where zero makes no sense: a zero timeout fails every
/// attempt, a zero interval or backoff spins. `daemon.resync_interval` (`"0s"` is off) and
/// `daemon.min_interval` (`"0s"` is no spacing between passes) are not checked here.
fn positive(key: &str, d: Duration) -> Result<(), String> {
    if d.is_zero() {
        return Err(format!(
            "{key} must be more than 0s (\"0s\" means off only for daemon.resync_interval)"
        ));
    }
    Ok(())
}

fn check_daemon_durations(d: &DaemonConfig) -> Result<(), ConfigError> {
    for (key, value) in [
        ("daemon.max_backoff", d.max_backoff),
        ("daemon.once_timeout", d.once_timeout),
        ("daemon.retry_interval", d.retry_interval),
    ] {
        positive(key, value).map_err(ConfigError::Invalid)?;
    }
    Ok(())
}

/// `http.listen` must be an address `bind` can take: an IP socket address, or `host:port` with a
/// host that resolves. Checked here so that `check` refuses it and `run` exits 2, not at bind.
fn check_listen(listen: &str) -> Result<(), ConfigError> {
    use std::net::{SocketAddr, ToSocketAddrs};
    if listen.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = |why: String| {
        ConfigError::Invalid(format!(
            "http.listen {listen:?} is not an address to listen on ({why}); write it as \
             127.0.0.1:9187 or [::1]:9187"
        ))
    };
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(bad("no port".into()));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad(format!("host {host:?}, port {port:?}")));
    }
    match listen.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(bad(format!("{host} resolves to no address"))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Patroni joins `/`, namespace and scope and collapses repeated slashes (`dcs/__init__.py`), so
/// `"/"` and `""` mean the root and keys live at `/<scope>/`. Empty for the root, else one leading
/// slash and none doubled or trailing.
fn normalize_namespace(ns: &str) -> String {
    ns.split('/')
        .filter(|part| !part.is_empty())
        .map(|part| format!("/{part}"))
        .collect()
}

/// Whether a setting's key names a port: `port`, or ending in `_port`.
fn is_port_key(k: &str) -> bool {
    k == "port" || k.ends_with("_port")
}

/// Refuses a port a template variable binds (`stats_port`, PgBouncer's `listen_port`, ...) that
/// a cluster's `[clusters.<scope>]` table binds too: `haproxy -c` accepts two listeners on one
/// port, and the kernel then splits the connections between them.
fn check_ports(
    clusters: &BTreeMap<String, ClusterSettings>,
    targets: &[Target],
) -> Result<(), ConfigError> {
    let mut bound: BTreeMap<i64, String> = BTreeMap::new();
    for (scope, c) in clusters {
        for (k, v) in c.vars.iter().filter(|(k, _)| is_port_key(k)) {
            if let Some(p) = v.as_i64() {
                bound.insert(p, format!("clusters.{scope}.{k}"));
            }
        }
    }
    for t in targets {
        for (k, v) in t.vars.iter().filter(|(k, _)| is_port_key(k)) {
            let Some(other) = v.as_i64().and_then(|p| bound.get(&p)) else {
                continue;
            };
            return Err(ConfigError::Invalid(format!(
                "template {:?} var {k} = {v} and {other} are both port {v}: each listener needs \
                 its own port",
                t.name
            )));
        }
    }
    Ok(())
}

/// Refuses what cannot work with several clusters: a server-state file per cluster (HAProxy
/// has one), and fast-path backends that would be shared by every cluster.
fn check_cluster_targets(etcd: &EtcdSettings, targets: &[Target]) -> Result<(), ConfigError> {
    for t in targets {
        let Some(ss) = t.server_state() else { continue };
        if t.per_cluster {
            return Err(ConfigError::Invalid(format!(
                "template {:?}: server_state cannot be set on a per-cluster dest ({}): HAProxy \
                 has one server-state file; set it on the template of the main haproxy.cfg",
                t.name,
                t.dest.display()
            )));
        }
        if etcd.single_scope().is_none() {
            for b in ss.primary_backends.iter().chain(&ss.replica_backends) {
                if !b.contains(SCOPE_PLACEHOLDER) {
                    return Err(ConfigError::Invalid(format!(
                        "template {:?}: server_state backend {b:?} has no {SCOPE_PLACEHOLDER}: \
                         with several clusters each has its own backends (e.g. \
                         primary_backends = [\"{SCOPE_PLACEHOLDER}_primary\"])",
                        t.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Refuses two settings that write one file (two targets would overwrite each other's output),
/// however the paths are spelled: compared after `.`/`..` are removed and the directory is
/// canonicalized, so a symlinked directory is caught too. A per-cluster `dest` counts once per
/// cluster that gets a file (`scopes`: the one of `etcd.scope`, or every `[clusters.<scope>]`:
/// only a configured cluster gets a file of its own), `{scope}` spelled as it will be.
fn check_written_files(
    targets: &[Target],
    state_file: Option<&Path>,
    scopes: &[&str],
) -> Result<(), ConfigError> {
    let mut written: Vec<(String, PathBuf)> = Vec::new();
    for t in targets {
        if t.per_cluster {
            for scope in scopes {
                let owner = format!("template {:?} dest for cluster {scope:?}", t.name);
                written.push((owner, t.dest_for(scope)));
            }
        } else {
            written.push((format!("template {:?} dest", t.name), t.dest.clone()));
        }
        if let Some(ss) = t.server_state() {
            let owner = format!("template {:?} server_state.file", t.name);
            written.push((owner, ss.file.clone()));
        }
    }
    if let Some(p) = state_file {
        written.push(("guard.state_file".into(), p.to_owned()));
    }
    let ids: Vec<PathBuf> = written.iter().map(|(_, p)| file_identity(p)).collect();
    for (i, id) in ids.iter().enumerate() {
        if let Some(j) = ids[..i].iter().position(|other| other == id) {
            let ((first, first_path), (second, second_path)) = (&written[j], &written[i]);
            return Err(ConfigError::Invalid(format!(
                "{first} ({}) and {second} ({}) are the same file {}; each must write its own",
                first_path.display(),
                second_path.display(),
                id.display()
            )));
        }
    }
    Ok(())
}

/// What a path names, for comparison: the directory canonicalized when it exists (symlinks and
/// `..` resolved by the filesystem), else the path with `.` and `..` removed lexically.
pub fn file_identity(path: &Path) -> PathBuf {
    let lexical = normalize_lexically(path);
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => match std::fs::canonicalize(dir) {
            Ok(real) => real.join(name),
            Err(_) => lexical,
        },
        _ => lexical,
    }
}

fn normalize_lexically(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Parses `SIGHUP`, `HUP` or `hup`.
pub fn parse_signal(name: &str) -> Result<nix::sys::signal::Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map_err(|_| format!("unknown signal {name:?}"))
}

fn resolve_user(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(format!("owner {s:?} is not a known user")),
    }
}

fn resolve_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(format!("group {s:?} is not a known group")),
    }
}

/// Converts TOML variables into the JSON the template context carries.
pub fn table_to_json(t: toml::Table) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// Loads, overrides and resolves in one go (the path every mode takes).
pub fn load_settings(path: &Path, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let mut raw = RawConfig::load(path)?;
    raw.apply(overrides);
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    // Absolute once, at load: paths then name the same files whatever the working directory is
    // when they are used, and messages show where they really are.
    let base = std::path::absolute(&base).unwrap_or(base);
    raw.resolve(&base)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[etcd]
scope = "demo"
[[template]]
src = "haproxy.cfg.tera"
dest = "/tmp/x/haproxy.cfg"
reload = { pidfile = "/run/haproxy.pid", signal = "SIGUSR2", process = "haproxy" }
"#;

    #[test]
    fn minimal_config_resolves_with_defaults() {
        let raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
        let s = raw.resolve(Path::new("/etc/haconfd")).unwrap();
        assert_eq!(s.etcd.prefix(), "/service/demo/");
        assert_eq!(s.targets[0].name, "haproxy.cfg");
        assert_eq!(s.targets[0].src, Path::new("/etc/haconfd/haproxy.cfg.tera"));
        assert!(matches!(
            s.targets[0].reload,
            Some(Reload::Signal {
                signal: nix::sys::signal::Signal::SIGUSR2,
                ..
            })
        ));
    }

    #[test]
    fn unknown_key_is_an_error_with_its_position() {
        let err = RawConfig::parse("[etcd]\nscop = \"x\"\n", Path::new("c.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("c.toml") && msg.contains("scop"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn bad_duration_is_an_error() {
        let err = RawConfig::parse("[daemon]\nmin_interval = \"fast\"\n", Path::new("c.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("min_interval"), "{err}");
    }

    #[test]
    fn overrides_beat_the_file() {
        let mut raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
        raw.apply(&Overrides {
            scope: Some("other".into()),
            endpoints: Some(vec!["http://10.0.0.1:2379,http://10.0.0.2:2379".into()]),
            namespace: Some("ns/".into()),
            ..Default::default()
        });
        let s = raw.resolve(Path::new("/")).unwrap();
        assert_eq!(s.etcd.prefix(), "/ns/other/");
        assert_eq!(s.etcd.endpoints.len(), 2);
    }

    #[test]
    fn password_is_masked_in_debug_output() {
        let mut raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
        raw.etcd.username = Some("root".into());
        raw.etcd.password = Some("s3cret-pw".into());
        let s = raw.resolve(Path::new("/")).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("root"));
    }

    #[test]
    fn reload_needs_exactly_one_form() {
        for (text, want) in [
            ("{ signal = \"SIGHUP\" }", "one of"),
            ("{ pidfile = \"/p\", process = \"x\" }", "signal"),
            (
                "{ pidfile = \"/p\", signal = \"SIGNOPE\", process = \"x\" }",
                "unknown signal",
            ),
            ("{ pidfile = \"/p\", signal = \"HUP\" }", "process"),
            (
                "{ pidfile = \"/p\", signal = \"HUP\", process = \"x\", command = [\"a\"] }",
                "only one",
            ),
        ] {
            let toml = MINIMAL.replace(
                "{ pidfile = \"/run/haproxy.pid\", signal = \"SIGUSR2\", process = \"haproxy\" }",
                text,
            );
            let err = RawConfig::parse(&toml, Path::new("t.toml"))
                .unwrap()
                .resolve(Path::new("/"))
                .unwrap_err();
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn missing_scope_names_the_ways_to_set_it() {
        let err = RawConfig::parse("[[template]]\nsrc=\"a\"\ndest=\"/b\"\n", Path::new("t"))
            .unwrap()
            .resolve(Path::new("/"))
            .unwrap_err();
        assert!(err.to_string().contains("HACONFD_SCOPE"), "{err}");
    }

    #[test]
    fn check_given_as_a_shell_string_is_refused() {
        let toml = MINIMAL.replace("reload =", "check = [\"haproxy -c -f x\"]\nreload =");
        let err = RawConfig::parse(&toml, Path::new("t"))
            .unwrap()
            .resolve(Path::new("/"))
            .unwrap_err();
        assert!(err.to_string().contains("argv"), "{err}");
    }

    fn resolve_text(toml: &str, base: &str) -> Result<Settings, ConfigError> {
        RawConfig::parse(toml, Path::new("t.toml"))
            .unwrap()
            .resolve(Path::new(base))
    }

    #[test]
    fn every_relative_path_is_taken_from_the_config_directory() {
        let toml = r#"
[etcd]
scope = "demo"
password_file = "secret/pw"
tls = { ca = "tls/ca.pem", cert = "tls/c.pem", key = "tls/k.pem" }
[guard]
state_file = "state/members.json"
[[template]]
src = "haproxy.cfg.tera"
dest = "out/haproxy.cfg"
check = ["bin/check", "{{staged}}"]
reload = { pidfile = "run/haproxy.pid", signal = "SIGUSR2", process = "haproxy", master_socket = "run/master.sock" }
server_state = { stats_socket = "run/admin.sock", file = "state/server-state" }
[[template]]
src = "pgbouncer.ini.tera"
dest = "out/pgbouncer.ini"
reload = { command = ["bin/reload", "arg"] }
"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secret")).unwrap();
        std::fs::write(dir.path().join("secret/pw"), "pw\n").unwrap();
        let toml = toml.replace("password_file", "username = \"u\"\npassword_file");
        let s = RawConfig::parse(&toml, Path::new("t.toml"))
            .unwrap()
            .resolve(dir.path())
            .unwrap();
        let d = dir.path();
        let tls = s.etcd.tls.as_ref().unwrap();
        assert_eq!(tls.ca.as_deref(), Some(d.join("tls/ca.pem").as_path()));
        assert_eq!(tls.cert.as_deref(), Some(d.join("tls/c.pem").as_path()));
        assert_eq!(tls.key.as_deref(), Some(d.join("tls/k.pem").as_path()));
        assert_eq!(s.etcd.auth.as_ref().unwrap().1, "pw");
        assert_eq!(s.guard.state_file, Some(d.join("state/members.json")));
        let hap = &s.targets[0];
        assert_eq!(hap.src, d.join("haproxy.cfg.tera"));
        assert_eq!(hap.dest, d.join("out/haproxy.cfg"));
        // Argvs run as written: a relative program is looked up in PATH, not in the directory.
        assert_eq!(hap.check, ["bin/check", "{{staged}}"]);
        match &hap.reload {
            Some(Reload::Signal {
                pidfile,
                master_socket,
                ..
            }) => {
                assert_eq!(pidfile, &d.join("run/haproxy.pid"));
                assert_eq!(
                    master_socket.as_deref(),
                    Some(d.join("run/master.sock").as_path())
                );
            }
            other => panic!("{other:?}"),
        }
        let ss = hap.server_state().unwrap();
        assert_eq!(ss.stats_socket, d.join("run/admin.sock"));
        assert_eq!(ss.file, d.join("state/server-state"));
        assert_eq!(s.targets[1].dest, d.join("out/pgbouncer.ini"));
        assert!(matches!(
            &s.targets[1].reload,
            Some(Reload::Command { argv, .. }) if argv == &["bin/reload", "arg"]
        ));
    }

    #[test]
    fn master_socket_reload_path_is_taken_from_the_config_directory() {
        let toml = MINIMAL.replace(
            "{ pidfile = \"/run/haproxy.pid\", signal = \"SIGUSR2\", process = \"haproxy\" }",
            "{ master_socket = \"master.sock\" }",
        );
        let s = resolve_text(&toml, "/etc/haconfd").unwrap();
        assert!(matches!(
            &s.targets[0].reload,
            Some(Reload::MasterSocket { path, .. }) if path == Path::new("/etc/haconfd/master.sock")
        ));
    }

    #[test]
    fn load_settings_resolves_against_an_absolute_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haconfd.toml");
        std::fs::write(
            &cfg,
            MINIMAL.replace("/tmp/x/haproxy.cfg", "rel/haproxy.cfg"),
        )
        .unwrap();
        let s = load_settings(&cfg, &Overrides::default()).unwrap();
        assert_eq!(s.targets[0].dest, dir.path().join("rel/haproxy.cfg"));
        assert!(s.targets[0].src.is_absolute());
    }

    #[test]
    fn check_without_the_staged_placeholder_is_refused() {
        let toml = MINIMAL.replace(
            "reload =",
            "check = [\"haproxy\", \"-c\", \"-f\", \"/etc/haproxy/haproxy.cfg\"]\nreload =",
        );
        let err = resolve_text(&toml, "/").unwrap_err().to_string();
        assert!(err.contains("template \"haproxy.cfg\""), "{err}");
        assert!(
            err.contains(r#"["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"]"#),
            "{err}"
        );
        assert!(err.contains("{{staged}}"), "{err}");
        // Inside a larger argument (`--file={{staged}}`) it is replaced too, so that is fine.
        let ok = MINIMAL.replace(
            "reload =",
            "check = [\"x\", \"--file={{staged}}\"]\nreload =",
        );
        resolve_text(&ok, "/").unwrap();
    }

    #[test]
    fn zero_durations_are_refused_naming_the_key() {
        for (section, line, key) in [
            ("[etcd]", "connect_timeout = \"0s\"", "etcd.connect_timeout"),
            ("[etcd]", "request_timeout = \"0s\"", "etcd.request_timeout"),
            (
                "[etcd]",
                "keepalive_interval = \"0s\"",
                "etcd.keepalive_interval",
            ),
            (
                "[etcd]",
                "keepalive_timeout = \"0s\"",
                "etcd.keepalive_timeout",
            ),
            (
                "[daemon]",
                "retry_interval = \"0s\"",
                "daemon.retry_interval",
            ),
            ("[daemon]", "max_backoff = \"0ms\"", "daemon.max_backoff"),
            ("[daemon]", "once_timeout = \"0s\"", "daemon.once_timeout"),
            ("[[template]]", "check_timeout = \"0s\"", "check_timeout"),
        ] {
            let toml =
                format!("[daemon]\n{MINIMAL}").replace(section, &format!("{section}\n{line}"));
            let err = resolve_text(&toml, "/").unwrap_err().to_string();
            assert!(
                err.contains(&format!("{key} must be more than 0s")),
                "{line}: {err}"
            );
        }
        let toml = MINIMAL.replace(
            "process = \"haproxy\" }",
            "process = \"haproxy\", timeout = \"0s\" }",
        );
        let err = resolve_text(&toml, "/").unwrap_err().to_string();
        assert!(
            err.contains("template \"haproxy.cfg\": reload.timeout must be more than 0s"),
            "{err}"
        );
    }

    #[test]
    fn zero_resync_and_min_interval_are_accepted() {
        let toml = format!("[daemon]\nresync_interval = \"0s\"\nmin_interval = \"0s\"\n{MINIMAL}");
        let s = resolve_text(&toml, "/").unwrap();
        assert!(s.daemon.resync_interval.is_zero() && s.daemon.min_interval.is_zero());
    }

    #[test]
    fn root_namespace_gives_the_prefix_patroni_writes() {
        for (ns, want) in [
            ("/", "/demo/"),
            ("", "/demo/"),
            ("//", "/demo/"),
            ("service", "/service/demo/"),
            ("/service/", "/service/demo/"),
            ("//a//b/", "/a/b/demo/"),
        ] {
            let mut raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
            raw.etcd.namespace = ns.into();
            let s = raw.resolve(Path::new("/")).unwrap();
            assert_eq!(s.etcd.prefix(), want, "namespace {ns:?}");
            // The model builds its prefix as `{namespace}/{scope}/`: it must agree.
            assert_eq!(
                format!("{}/{}/", s.etcd.namespace, s.etcd.single_scope().unwrap()),
                want,
                "namespace {ns:?}"
            );
        }
    }

    #[test]
    fn one_file_written_by_two_settings_is_refused_however_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("real")).unwrap();
        std::fs::create_dir(d.join("real/sub")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        let two = |a: &str, b: &str, extra: &str| {
            format!(
                "[etcd]\nscope = \"demo\"\n{extra}\n[[template]]\nname = \"a\"\nsrc = \"t\"\ndest = {a:?}\n\
                 [[template]]\nname = \"b\"\nsrc = \"t\"\ndest = {b:?}\n"
            )
        };
        for (a, b) in [
            ("real/same.cfg", "real/sub/../same.cfg"),
            ("real/same.cfg", "./real/./same.cfg"),
            ("real/same.cfg", "link/same.cfg"),
            ("missing/same.cfg", "missing/x/../same.cfg"),
        ] {
            let err = RawConfig::parse(&two(a, b, ""), Path::new("t"))
                .unwrap()
                .resolve(d)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("template \"a\" dest") && err.contains("template \"b\" dest"),
                "{a} vs {b}: {err}"
            );
        }
        let err = RawConfig::parse(
            &two(
                "real/a.cfg",
                "real/b.cfg",
                "[guard]\nstate_file = \"link/a.cfg\"",
            ),
            Path::new("t"),
        )
        .unwrap()
        .resolve(d)
        .unwrap_err()
        .to_string();
        assert!(err.contains("guard.state_file"), "{err}");
        RawConfig::parse(&two("real/a.cfg", "link/b.cfg", ""), Path::new("t"))
            .unwrap()
            .resolve(d)
            .unwrap();
    }

    #[test]
    fn server_state_file_shared_with_another_target_is_refused() {
        let toml = format!(
            "{MINIMAL}server_state = {{ stats_socket = \"/run/a.sock\", file = \"/tmp/x/../x/other.cfg\" }}\n\
             [[template]]\nsrc = \"t\"\ndest = \"/tmp/x/other.cfg\"\n"
        );
        let err = resolve_text(&toml, "/").unwrap_err().to_string();
        assert!(
            err.contains("template \"haproxy.cfg\" server_state.file")
                && err.contains("template \"other.cfg\" dest"),
            "{err}"
        );
    }

    #[test]
    fn http_listen_must_be_an_address() {
        for bad in [
            "127.0.0.1",
            "127.0.0.1:http",
            "999.0.0.1:80",
            ":9187",
            "no-such-host.invalid:80",
            "127.0.0.1:70000",
        ] {
            let mut raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
            raw.http.listen = Some(bad.into());
            let err = raw.resolve(Path::new("/")).unwrap_err().to_string();
            assert!(
                err.contains(&format!("http.listen {bad:?}")),
                "{bad}: {err}"
            );
        }
        for good in [
            "127.0.0.1:9187",
            "[::1]:0",
            "0.0.0.0:9187",
            "localhost:9187",
        ] {
            let mut raw = RawConfig::parse(MINIMAL, Path::new("t.toml")).unwrap();
            raw.http.listen = Some(good.into());
            raw.resolve(Path::new("/")).unwrap();
        }
    }

    #[test]
    fn lexical_normalization_removes_dot_and_dot_dot() {
        for (p, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/./b", "/a/b"),
            ("/../a", "/a"),
            ("a/../../b", "../b"),
        ] {
            assert_eq!(normalize_lexically(Path::new(p)), Path::new(want), "{p}");
        }
    }
}
