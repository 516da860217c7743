//! The `run` mode: wires the etcd source to passes with coalescing (leading edge, then at most one
//! pass that writes per `min_interval`; events arriving during a pass merge into the next),
//! retries failed passes, hot-reloads config and templates (SIGHUP, file changes) with every
//! setting taking effect or the whole new config refused, tells systemd when it has started and
//! what it is doing, and shuts down gracefully (first SIGTERM/SIGINT finishes the pass in flight
//! and undoes what the fast path holds, a second kills the command in flight and exits at once).
//!
//! The loop waits for one trigger at a time; a pass hands back a [`PassReport`] that says
//! what should happen next, and the [`pacer`] owns the timing.

pub mod pacer;
mod parts;
mod settings;
mod signals;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::{ConfigError, Overrides, Settings};
use crate::failover::Confirmed;
use crate::hooks::{HookEvent, Hooks};
use crate::logging::{LogError, Logging};
use crate::metrics::Metrics;
use crate::pipeline::{Engine, Next, PassReport};
use crate::render::RenderError;
use crate::source::SourceState;
use crate::status::Status;
use pacer::{Outcome, Pacer};
use parts::{HttpServer, Source};
use signals::Systemd;

/// Why `run` could not start, or why a new configuration was refused (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file did not load or resolve.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `log.level` or `log.format` cannot be applied.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A template did not compile.
    #[error(transparent)]
    Templates(#[from] RenderError),
    /// `http.listen` could not be bound.
    #[error("cannot listen on http.listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot handle {signal}: {source}")]
    Signal {
        /// Which signal.
        signal: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// The longest a graceful stop spends undoing the fast path's moves (well inside systemd's
/// `TimeoutStopSec`, 30 s in the shipped unit): a RESUME and a few runtime-API commands take
/// milliseconds; an unreachable console is bounded by its `connect_timeout`.
const SHUTDOWN_UNDO: Duration = Duration::from_secs(5);

/// Runs until a shutdown signal. Returns an error only if nothing could start.
pub async fn run(
    config_path: PathBuf,
    overrides: Overrides,
    settings: Settings,
    status: Arc<Mutex<Status>>,
    logging: Logging,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let mut d = Daemon::start(config_path, overrides, &settings, status, logging).await?;
    let mut passes = Passes::new(&settings);
    passes.systemd.status(format!(
        "listing {} from etcd at {}",
        settings.etcd.prefix(),
        settings.etcd.endpoints.join(",")
    ));
    loop {
        match d.wait(&mut passes).await {
            Trigger::Stop => break,
            Trigger::Seen => {}
            Trigger::Reload(why) => d.reload_settings(why, &mut passes).await,
            Trigger::Pass => d.pass(&mut passes).await,
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Undo what the fast path holds (a drain, a PgBouncer pause) before exiting: nothing else
    // would. A second signal exits at once; the next start repairs what is left.
    if tokio::time::timeout(SHUTDOWN_UNDO, d.engine.shutdown())
        .await
        .is_err()
    {
        tracing::error!(
            "the fast path's moves were not all undone within {}s: the next start repairs them",
            SHUTDOWN_UNDO.as_secs()
        );
    }
    drop(d);
    tracing::info!("stopped");
    Ok(())
}

/// What woke the loop.
enum Trigger {
    /// A shutdown signal (or the source is gone).
    Stop,
    /// Something was noted (an etcd change, a confirmation): the pacer decides when to pass.
    Seen,
    /// The config or templates may have changed: why.
    Reload(&'static str),
    /// The pacer says a pass is due.
    Pass,
}

/// What the loop remembers from one pass to the next.
struct Passes {
    pacer: Pacer,
    /// The generation of the snapshot the last pass ran on (not the snapshot itself: holding
    /// it would make the source copy the whole scope on its next event, see
    /// `source::publish_changes`).
    last_generation: Option<u64>,
    /// The source's count of `leader`/`failover` changes at the last pass: a change is urgent.
    last_routing: Option<u64>,
    /// Whether the last pass found a cluster between leaders (logged once per spell).
    leaderless: bool,
    /// The reason of the failure spell `pass_failed` hooks were told about.
    failed_reason: Option<&'static str>,
    systemd: Systemd,
}

impl Passes {
    fn new(settings: &Settings) -> Passes {
        Passes {
            pacer: Pacer::new(settings.daemon.min_interval, settings.daemon.retry_interval),
            last_generation: None,
            last_routing: None,
            leaderless: false,
            failed_reason: None,
            systemd: Systemd::default(),
        }
    }
}

/// The daemon's parts: what a reload may replace, and the channels the loop waits on.
struct Daemon {
    /// Runs `[[hook]]` commands on the events of each pass, after it.
    hooks: Hooks,
    confirm_tx: mpsc::UnboundedSender<Confirmed>,
    /// The failover fast path's confirmations of a new leader: each runs a pass at once.
    confirm_rx: mpsc::UnboundedReceiver<Confirmed>,
    /// Hook events made outside a pass (the crash hold's), run as they come.
    hook_rx: mpsc::UnboundedReceiver<HookEvent>,
    hook_tx: mpsc::UnboundedSender<HookEvent>,
    config_path: PathBuf,
    overrides: Overrides,
    engine: Engine,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
    http: Option<HttpServer>,
    source: Source,
    logging: Logging,
    watcher: Option<notify::RecommendedWatcher>,
    reload_tx: mpsc::Sender<&'static str>,
    reload_rx: mpsc::Receiver<&'static str>,
    hup: Signal,
    shutdown: watch::Receiver<bool>,
}

/// The fast path's metrics, and the way its hook events reach the dispatcher.
fn failover_observers(
    metrics: &Metrics,
    hook_tx: &mpsc::UnboundedSender<HookEvent>,
) -> crate::failover::Observers {
    crate::failover::Observers {
        hook_events: Some(hook_tx.clone()),
        ..metrics.failover_observers()
    }
}

impl Daemon {
    async fn start(
        config_path: PathBuf,
        overrides: Overrides,
        settings: &Arc<Settings>,
        status: Arc<Mutex<Status>>,
        logging: Logging,
    ) -> Result<Daemon, DaemonError> {
        let mut engine = Engine::new(Arc::clone(settings))?;
        engine.catch_up().await;
        let metrics = Arc::new(Metrics::new());
        let http = match &settings.http.listen {
            Some(addr) => Some(HttpServer::bind(addr, &status, &metrics).await?),
            None => None,
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        signals::spawn_signal_handler(shutdown_tx)?;
        let hup = signal(SignalKind::hangup()).map_err(|source| DaemonError::Signal {
            signal: "SIGHUP",
            source,
        })?;
        let (reload_tx, reload_rx) = mpsc::channel::<&'static str>(8);
        let (confirm_tx, confirm_rx) = mpsc::unbounded_channel();
        let (hook_tx, hook_rx) = mpsc::unbounded_channel();
        engine.attach_router(
            confirm_tx.clone(),
            failover_observers(&metrics, &hook_tx),
            metrics.lag_observers(),
        );
        let hooks = Hooks::start(
            settings.hooks_config.clone(),
            settings.hooks.clone(),
            metrics.hook_metrics(),
        );
        Ok(Daemon {
            hooks,
            confirm_tx,
            confirm_rx,
            hook_rx,
            hook_tx,
            config_path,
            overrides,
            source: Source::start(settings),
            watcher: settings::watch_templates(settings, reload_tx.clone()),
            engine,
            status,
            metrics,
            http,
            logging,
            reload_tx,
            reload_rx,
            hup,
            shutdown,
        })
    }

    fn update_source_status(&self, state: &SourceState) {
        let mut st = self.status.lock().expect("status lock");
        st.etcd_connected = state.connected;
        st.etcd_error = state.last_error.as_ref().map(|e| e.to_string());
        st.revision = state.snapshot.as_ref().map(|s| s.revision).unwrap_or(0);
        st.relists = state.relists;
    }

    /// Waits for the next trigger. Level-triggered: every branch updates the pacer (or the
    /// config); the pass runs when the pacer says it is due, and a change arriving during a
    /// coalescing wait (a leader key, say) is seen at once.
    async fn wait(&mut self, p: &mut Passes) -> Trigger {
        let due = p.pacer.due();
        let wake = async {
            match due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.shutdown.changed() => Trigger::Stop,
            r = self.source.rx.changed() => {
                if r.is_err() {
                    return Trigger::Stop;
                }
                let state = self.source.rx.borrow_and_update().clone();
                self.update_source_status(&state);
                if state.connected {
                    if state.snapshot.is_some() && p.last_generation != Some(state.generation) {
                        p.pacer.changed(p.last_routing != Some(state.routing));
                    }
                } else if let Some(e) = &state.last_error {
                    p.systemd.status(format!("etcd unreachable: {e}; last good files kept"));
                }
                Trigger::Seen
            }
            _ = self.hup.recv() => Trigger::Reload("SIGHUP"),
            Some(why) = self.reload_rx.recv() => {
                // Editors and ConfigMaps replace files in several steps: let them settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while self.reload_rx.try_recv().is_ok() {}
                Trigger::Reload(why)
            }
            Some(c) = self.confirm_rx.recv() => {
                tracing::debug!(leader = %c.leader, "confirmed: running a pass at once");
                p.pacer.changed(true);
                Trigger::Seen
            }
            Some(e) = self.hook_rx.recv() => {
                self.hooks.event(e);
                Trigger::Seen
            }
            _ = wake => Trigger::Pass,
        }
    }

    /// A SIGHUP or a template change: the settings read again and applied, or refused whole.
    async fn reload_settings(&mut self, why: &'static str, p: &mut Passes) {
        // Watch anew before reading: a directory renamed over the old one is a new inode the
        // old watch never sees, and an edit made during the reload must still count.
        self.watcher = settings::watch_templates(self.engine.settings(), self.reload_tx.clone());
        if self.reload(why).await {
            // The snapshot in hand is from the old source: wait for the new one's list.
            p.last_generation = None;
            p.last_routing = None;
            p.pacer.reset();
            p.leaderless = false;
            let s = self.engine.settings();
            p.systemd.status(format!(
                "etcd settings changed: listing {} from etcd at {}",
                s.etcd.prefix(),
                s.etcd.endpoints.join(",")
            ));
        }
        self.watcher = settings::watch_templates(self.engine.settings(), self.reload_tx.clone());
        let s = self.engine.settings();
        p.pacer
            .set_intervals(s.daemon.min_interval, s.daemon.retry_interval);
        if p.last_generation.is_some() {
            p.pacer.changed(false);
        }
    }

    /// One pass on the newest complete snapshot, its report handed to the pacer, status,
    /// metrics, hooks, the log and systemd.
    async fn pass(&mut self, p: &mut Passes) {
        p.pacer.start();
        let state = self.source.rx.borrow_and_update().clone();
        self.update_source_status(&state);
        // A snapshot newer than the last pass's is complete even if the watch broke since
        // (the source publishes whole revisions only): apply it rather than wait for etcd.
        let fresh = p.last_generation != Some(state.generation);
        let Some(snap) = state.snapshot.filter(|_| state.connected || fresh) else {
            return;
        };
        p.last_generation = Some(state.generation);
        p.last_routing = Some(state.routing);
        let started = Instant::now();
        let revision = snap.revision;
        let report = self.engine.pass_shared(snap, true).await;
        let elapsed = started.elapsed();
        let outcome = if report.wrote() {
            Outcome::Wrote
        } else {
            Outcome::NoOp { took: elapsed }
        };
        let retry = report.next() == Next::Retry;
        p.pacer
            .finished(tokio::time::Instant::now(), outcome, retry);
        self.status
            .lock()
            .expect("status lock")
            .record_pass(&report, elapsed);
        self.metrics.record(&report);
        // After the pass, so that a hook never delays routing.
        self.tell_hooks(&report, p);
        self.log_pass(&report, revision, elapsed, p);
        p.leaderless = report.is_leaderless();
        // Started means: config loaded, a complete snapshot listed, a first pass attempted. Its
        // outcome is for /readyz: a leaderless cluster or a guard refusal is an outage to ride
        // out, and a restart by a start timeout would not end it.
        p.systemd.ready();
    }

    /// Each cluster's events to the hooks; `pass_failed` once per spell of failures (again if
    /// the reason changes), naming the cluster the guard refused, else the first.
    fn tell_hooks(&mut self, report: &PassReport, p: &mut Passes) {
        let clusters = report.clusters.iter();
        self.hooks
            .pass(clusters.map(|r| (&r.model, r.events.as_slice())));
        let Some(c) = report.failed_cluster() else {
            return;
        };
        match &report.result {
            Err(e) if !e.is_leaderless() => {
                if p.failed_reason != Some(e.reason()) {
                    self.hooks
                        .event(HookEvent::pass_failed(c, e.reason(), &format!("{e:#}")));
                }
                p.failed_reason = Some(e.reason());
            }
            _ => p.failed_reason = None,
        }
    }

    fn log_pass(&self, report: &PassReport, revision: i64, took: Duration, p: &mut Passes) {
        match &report.result {
            Ok(o) if o.is_noop() => {
                tracing::debug!(revision = revision, took = ?took, "pass: nothing changed");
            }
            Ok(o) => {
                tracing::info!(revision = revision, written = ?o.written, reloaded = ?o.reloaded, runtime = ?o.runtime, took = ?took, "pass applied");
            }
            // Once per leaderless spell, not once per etcd event during it.
            Err(e) if e.is_leaderless() && !p.leaderless => {
                tracing::warn!(revision = revision, "{e}")
            }
            Err(e) if e.is_leaderless() => tracing::debug!(revision = revision, "{e}"),
            Err(e) => {
                tracing::error!(
                    revision = revision,
                    reason = e.reason(),
                    "pass failed; last good files kept: {e:#}"
                );
            }
        }
        let prefix = self.engine.settings().etcd.prefix();
        p.systemd.status(match &report.result {
            Ok(_) => format!("watching {prefix}: files up to date"),
            Err(_) if report.is_leaderless() => {
                format!("no leader in {prefix}: last good files kept until one is elected")
            }
            Err(e) => format!(
                "last pass failed ({}): last good files kept; retrying",
                e.reason()
            ),
        });
    }
}
