//! The command line: global options shared by every mode, one subcommand per mode, and the
//! documented exit codes. Flags beat `HACONFD_*` env vars, which beat the config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Overrides, DEFAULT_CONFIG_PATH};
use crate::logging::LogFormat;
use crate::source::EtcdApi;

/// Exit codes, the same for every mode.
pub mod exit {
    /// Applied, or already up to date.
    pub const OK: u8 = 0;
    /// An unexpected failure.
    pub const FAILURE: u8 = 1;
    /// Bad usage or configuration.
    pub const CONFIG: u8 = 2;
    /// etcd unreachable within the timeout.
    pub const ETCD: u8 = 3;
    /// The empty/shrink guard refused the view.
    pub const GUARD: u8 = 4;
    /// A template failed to render (including "no leader").
    pub const RENDER: u8 = 5;
    /// A check command refused a staged file.
    pub const CHECK: u8 = 6;
    /// A file could not be written.
    pub const WRITE: u8 = 7;
    /// Files were written but a reload failed.
    pub const RELOAD: u8 = 8;
    /// `haconfd status`: the running haconfd did not answer.
    pub const UNREACHABLE: u8 = 9;
}

const LONG_ABOUT: &str = "\
haconfd watches a Patroni cluster's keys in etcd (/<namespace>/<scope>/leader and members/<name>)
and renders haproxy.cfg and pgbouncer.ini from Tera templates. Each changed file is staged next to
its destination, checked (e.g. `haproxy -c`), swapped in atomically, and its consumer reloaded: a
signal to the verified PID of a pidfile, HAProxy's master socket, or a command.";

const EXIT_CODES: &str = "\
Exit codes:
  0  applied, or already up to date
  1  unexpected failure
  2  bad usage or configuration
  3  etcd unreachable within daemon.once_timeout
  4  the empty/shrink guard refused the view (see --force)
  5  a template failed to render (including: no leader)
  6  a check command refused a staged file
  7  a file could not be written
  8  files were written but a reload failed
  9  haconfd status: the running haconfd did not answer at http.listen

Environment: HACONFD_CONFIG, HACONFD_ETCD_API, HACONFD_ETCD_ENDPOINTS, HACONFD_NAMESPACE,
HACONFD_SCOPE, HACONFD_ETCD_USERNAME, HACONFD_ETCD_PASSWORD, HACONFD_LOG_FORMAT, HACONFD_LOG_LEVEL.";

/// haconfd command line.
#[derive(Debug, Parser)]
#[command(
    name = "haconfd",
    version = crate::status::VERSION,
    about = "Render haproxy.cfg and pgbouncer.ini from Patroni's state in etcd, safely",
    long_about = LONG_ABOUT,
    after_long_help = EXIT_CODES,
)]
pub struct Cli {
    /// Options shared by every mode.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The mode.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every mode.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file (TOML).
    #[arg(short, long, global = true, env = "HACONFD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The etcd API Patroni writes to: v3 for its `etcd3:` section, v2 for `etcd:` (replaces
    /// etcd.api).
    #[arg(long, global = true, env = "HACONFD_ETCD_API", value_enum)]
    pub etcd_api: Option<EtcdApi>,
    /// etcd endpoints, comma-separated (replaces etcd.endpoints).
    #[arg(
        long,
        global = true,
        env = "HACONFD_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Option<Vec<String>>,
    /// Patroni namespace (replaces etcd.namespace).
    #[arg(long, global = true, env = "HACONFD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Patroni scope, the cluster name (replaces etcd.scope).
    #[arg(long, global = true, env = "HACONFD_SCOPE")]
    pub scope: Option<String>,
    /// etcd user (the password comes from HACONFD_ETCD_PASSWORD or the config, never a flag).
    #[arg(long, global = true, env = "HACONFD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// Log format.
    #[arg(long, global = true, env = "HACONFD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `info,haconfd=debug`; a word that is no level is refused.
    #[arg(long, global = true, env = "HACONFD_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as a daemon or sidecar: watch etcd and apply every change.
    #[command(
        long_about = "Run as a daemon or sidecar. Lists the prefix, watches it, and runs a pass \
        on every change: render, check, swap in, reload what changed. Changes arriving during a pass \
        merge into the next one; after a pass that wrote, the next waits for daemon.min_interval. \
        SIGHUP re-reads the config and templates and applies every setting (the etcd watch \
        restarted when etcd settings change, http.listen rebound, log output switched) or refuses \
        the new config as a whole, naming what failed; template files and their directories are \
        also watched. Under systemd (Type=notify), READY=1 follows the first listed snapshot and \
        the first pass, whatever its outcome. The first SIGTERM or SIGINT lets the pass in flight \
        finish, a second kills a running check and exits at once."
    )]
    Run(RunArgs),
    /// One pass from etcd, then exit: render, check, write and reload what changed.
    #[command(
        long_about = "One pass from etcd: render every template, check and swap in what changed, \
        reload its consumer, then exit. Exit 0 when applied or already up to date; otherwise a \
        non-zero code (see --help of haconfd) and a one-line reason on stderr."
    )]
    Once(OnceArgs),
    /// Print rendered files to stdout; writes nothing.
    #[command(
        long_about = "Render to stdout and write nothing. Reads etcd, or with --snapshot a JSON dump: \
        `etcdctl get --prefix -w json` output or a flat {\"key\": \"value\"} object. With several \
        templates each is preceded by a `==> name <==` line; --template selects one. --context \
        prints the template context as JSON instead. A view the guard would refuse in once and \
        run (an empty scope, too few members) is not printed: exit 4 with the reason, or print \
        it anyway with --force."
    )]
    Render(RenderArgs),
    /// Validate config and templates, render and run the checks on staged copies; writes nothing.
    #[command(
        long_about = "Validate the config and compile every template, render against etcd (or \
        --snapshot), and run each target's check command on a staged copy in a scratch directory. \
        Nothing is written next to the destinations and nothing is reloaded. Exit 0 when every \
        check passes; otherwise the code of the first failure (see --help of haconfd)."
    )]
    Check(CheckArgs),
    /// Show a running haconfd: each cluster's leader, members, HAProxy's view of them, what is
    /// held, the last failover.
    #[command(
        long_about = "Read a running haconfd's /status (at http.listen of the config, or --url) \
        and print, per cluster: the leader; each member with its role, state, address, lag and \
        HAProxy's live state of it (UP, DOWN, drained, maint: from the stats socket of each \
        template with server_state); any fence, PgBouncer pause or leader change in progress; \
        and the last failover's timeline in milliseconds after the new leader key (fence, \
        confirm, HAProxy, PgBouncer). --json prints the same as JSON. Exit 0 when it answered, \
        2 when the config names no http.listen, 9 when it did not answer."
    )]
    Status(StatusArgs),
    /// Print the man page (roff) to stdout.
    Manpage,
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// `run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Minimum time between passes that write (replaces daemon.min_interval), e.g. `500ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_interval: Option<Duration>,
    /// Address for /healthz, /readyz, /metrics and /status (replaces http.listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Disable the empty/shrink guard.
    #[arg(long)]
    pub force: bool,
    /// Log what each hook would run (argv, environment, stdin) instead of running it.
    #[arg(long)]
    pub dry_run_hooks: bool,
}

/// `once` options.
#[derive(Debug, Args)]
pub struct OnceArgs {
    /// Apply even if the empty/shrink guard would refuse.
    #[arg(long)]
    pub force: bool,
    /// Write files but do not reload anything.
    #[arg(long)]
    pub no_reload: bool,
}

/// `render` options.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Read this JSON dump instead of etcd.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// Render only this template (its `name`, by default the destination's file name).
    #[arg(long)]
    pub template: Option<String>,
    /// Print the template context as JSON instead of rendering.
    #[arg(long)]
    pub context: bool,
    /// Print the files even when the guard would refuse the view (exit 4 otherwise).
    #[arg(long)]
    pub force: bool,
}

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (the same data as the table) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where haconfd serves /status (`http://host:port` or `host:port`), instead of http.listen
    /// of the config.
    #[arg(long)]
    pub url: Option<String>,
    /// How long to wait for the connection (the answer: twice that), e.g. `2s`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub timeout: Duration,
}

/// `check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read this JSON dump instead of etcd.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
}

impl Cli {
    /// Flag and env overrides for the config.
    pub fn overrides(&self) -> Overrides {
        let g = &self.global;
        let mut o = Overrides {
            etcd_api: g.etcd_api,
            endpoints: g.endpoints.clone(),
            namespace: g.namespace.clone(),
            scope: g.scope.clone(),
            username: g.etcd_username.clone(),
            password: std::env::var("HACONFD_ETCD_PASSWORD").ok(),
            log_format: g.log_format,
            log_level: g.log_level.clone(),
            ..Default::default()
        };
        match &self.command {
            Command::Run(r) => {
                o.min_interval = r.min_interval;
                o.listen = r.listen.clone();
                o.force = r.force;
                o.dry_run_hooks = r.dry_run_hooks;
            }
            Command::Once(a) => o.force = a.force,
            _ => {}
        }
        o
    }
}
