//! The `run` mode: wires the etcd source to passes with coalescing (leading edge, then at most one
//! pass that writes per `min_interval`; events arriving during a pass merge into the next),
//! retries failed passes, hot-reloads config and templates (SIGHUP, file changes) with every
//! setting taking effect or the whole new config refused, tells systemd when it has started and
//! what it is doing, and shuts down gracefully (first SIGTERM/SIGINT finishes the pass in flight,
//! a second kills the command in flight and exits at once).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{self, ConfigError, Overrides, Settings};
use crate::hooks::{HookEvent, Hooks};
use crate::logging::{self, LogError, Logging};
use crate::metrics::Metrics;
use crate::pacer::{Outcome, Pacer};
use crate::pipeline::{Engine, PassError};
use crate::render::RenderError;
use crate::source::{self, SourceState};
use crate::status::Status;

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

/// Runs until a shutdown signal. Returns an error only if nothing could start.
pub async fn run(
    config_path: PathBuf,
    overrides: Overrides,
    settings: Settings,
    status: Arc<Mutex<Status>>,
    logging: Logging,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let engine = Engine::new(Arc::clone(&settings))?;
    let metrics = Arc::new(Metrics::new());
    let http = match &settings.http.listen {
        Some(addr) => Some(HttpServer::bind(addr, &status, &metrics).await?),
        None => None,
    };
    let (shutdown_tx, mut shutdown) = watch::channel(false);
    spawn_signal_handler(shutdown_tx)?;
    let mut hup = signal(SignalKind::hangup()).map_err(|source| DaemonError::Signal {
        signal: "SIGHUP",
        source,
    })?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(8);
    // The failover fast path's confirmations of a new leader: each runs a pass at once.
    let (confirm_tx, mut confirm_rx) = mpsc::unbounded_channel();
    let mut systemd = Systemd::default();
    systemd.status(format!(
        "listing {} from etcd at {}",
        settings.etcd.prefix(),
        settings.etcd.endpoints.join(",")
    ));
    let mut engine = engine;
    engine.attach_router(confirm_tx.clone(), metrics.failover_observers());
    let hooks = Hooks::start(
        settings.hooks_config.clone(),
        settings.hooks.clone(),
        metrics.hook_metrics(),
    );
    let mut d = Daemon {
        hooks,
        confirm_tx,
        config_path,
        overrides,
        source: Source::start(&settings),
        watcher: watch_templates(&settings, reload_tx.clone()),
        engine,
        status,
        metrics,
        http,
        logging,
    };

    // The generation of the snapshot the last pass ran on (not the snapshot itself: holding it
    // would make the source copy the whole scope on its next event, see `source::publish_changes`).
    let mut last_generation: Option<u64> = None;
    // The source's count of `leader`/`failover` changes at the last pass: a change is urgent.
    let mut last_routing: Option<u64> = None;
    let mut pacer = Pacer::new(settings.daemon.min_interval, settings.daemon.retry_interval);
    let mut leaderless = false;
    // The reason of the failure spell `pass_failed` hooks were told about.
    let mut failed_reason: Option<&'static str> = None;

    loop {
        let due = pacer.due();
        let wake = async {
            match due {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // Level-triggered: every branch updates the pacer (or the config); the pass runs when
        // the pacer says it is due, and a change arriving during a coalescing wait (a leader
        // key, say) is seen at once.
        let trigger = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = d.source.rx.changed() => {
                if r.is_err() { break; }
                let state = d.source.rx.borrow_and_update().clone();
                d.update_source_status(&state);
                if state.connected {
                    if state.snapshot.is_some() && last_generation != Some(state.generation) {
                        pacer.changed(last_routing != Some(state.routing));
                    }
                } else if let Some(e) = &state.last_error {
                    systemd.status(format!("etcd unreachable: {e}; last good files kept"));
                }
                continue;
            }
            _ = hup.recv() => "SIGHUP",
            Some(why) = reload_rx.recv() => {
                // Editors and ConfigMaps replace files in several steps: let them settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while reload_rx.try_recv().is_ok() {}
                why
            }
            Some(c) = confirm_rx.recv() => {
                tracing::debug!(leader = %c.leader, "confirmed: running a pass at once");
                pacer.changed(true);
                continue;
            }
            _ = wake => "",
        };
        if !trigger.is_empty() {
            // Watch anew before reading: a directory renamed over the old one is a new inode
            // the old watch never sees, and an edit made during the reload must still count.
            d.watcher = watch_templates(d.engine.settings(), reload_tx.clone());
            if d.reload(trigger).await {
                // The snapshot in hand is from the old source: wait for the new one's list.
                last_generation = None;
                last_routing = None;
                pacer.reset();
                leaderless = false;
                let s = d.engine.settings();
                systemd.status(format!(
                    "etcd settings changed: listing {} from etcd at {}",
                    s.etcd.prefix(),
                    s.etcd.endpoints.join(",")
                ));
            }
            d.watcher = watch_templates(d.engine.settings(), reload_tx.clone());
            let s = d.engine.settings();
            pacer.set_intervals(s.daemon.min_interval, s.daemon.retry_interval);
            if last_generation.is_some() {
                pacer.changed(false);
            }
            continue;
        }
        pacer.start();
        let state = d.source.rx.borrow_and_update().clone();
        d.update_source_status(&state);
        // A snapshot newer than the last pass's is complete even if the watch broke since
        // (the source publishes whole revisions only): apply it rather than wait for etcd.
        let fresh = last_generation != Some(state.generation);
        let Some(snap) = state.snapshot.filter(|_| state.connected || fresh) else {
            continue;
        };
        last_generation = Some(state.generation);
        last_routing = Some(state.routing);
        let started = Instant::now();
        let revision = snap.revision;
        let result = d.engine.pass_shared(snap, true).await;
        let elapsed = started.elapsed();
        // A failed pass may still have written another consumer's files.
        let wrote =
            !d.engine.stats.outcome.is_noop() || matches!(result, Err(PassError::Reload { .. }));
        // A leaderless spell ends with an etcd event (the leader key); any other failure, also
        // in the same pass, needs the retry timer.
        let retry = match &result {
            // Targets held for a leader change: the confirmation runs a pass; if it never
            // comes, the hold ends by failover.confirm_timeout and the retry applies them.
            Ok(_) => !d.engine.stats.awaiting.is_empty(),
            Err(PassError::Render(RenderError::NoLeader { .. })) => {
                !d.engine.stats.awaiting.is_empty()
                    || !d.engine.stats.failed.iter().all(|(_, r)| *r == "no_leader")
            }
            Err(_) => true,
        };
        pacer.finished(
            tokio::time::Instant::now(),
            if wrote {
                Outcome::Wrote
            } else {
                Outcome::NoOp { took: elapsed }
            },
            retry,
        );
        {
            let mut st = d.status.lock().expect("status lock");
            st.record_pass(&result, &d.engine, elapsed);
        }
        d.metrics.record(&result, &d.engine.stats);
        // After the pass, so that a hook never delays routing.
        for r in &d.engine.reports {
            d.hooks.events(&r.model, &r.events);
        }
        // `pass_failed` names the cluster the guard refused, else the first one.
        let failed_cluster = d
            .engine
            .reports
            .iter()
            .find(|r| r.refused.is_some())
            .map(|r| &r.model)
            .or(d.engine.cluster.as_ref());
        if let Some(c) = failed_cluster {
            match &result {
                // Once per spell of failures (and again if the reason changes), not per retry.
                Err(e) if !matches!(e, PassError::Render(RenderError::NoLeader { .. })) => {
                    if failed_reason != Some(e.reason()) {
                        d.hooks
                            .event(HookEvent::pass_failed(c, e.reason(), &format!("{e:#}")));
                    }
                    failed_reason = Some(e.reason());
                }
                _ => failed_reason = None,
            }
        }
        let prefix = d.engine.settings().etcd.prefix();
        match &result {
            Ok(o) if o.is_noop() => {
                tracing::debug!(revision = revision, took = ?elapsed, "pass: nothing changed");
            }
            Ok(o) => {
                tracing::info!(revision = revision, written = ?o.written, reloaded = ?o.reloaded, took = ?elapsed, "pass applied");
            }
            Err(e @ PassError::Render(RenderError::NoLeader { .. })) => {
                // Once per leaderless spell, not once per etcd event during it.
                if !leaderless {
                    tracing::warn!(revision = revision, "{e}");
                } else {
                    tracing::debug!(revision = revision, "{e}");
                }
            }
            Err(e) => {
                tracing::error!(
                    revision = revision,
                    reason = e.reason(),
                    "pass failed; last good files kept: {e:#}"
                );
            }
        }
        leaderless = matches!(
            &result,
            Err(PassError::Render(RenderError::NoLeader { .. }))
        );
        systemd.status(match &result {
            Ok(_) => format!("watching {prefix}: files up to date"),
            Err(_) if leaderless => {
                format!("no leader in {prefix}: last good files kept until one is elected")
            }
            Err(e) => format!(
                "last pass failed ({}): last good files kept; retrying",
                e.reason()
            ),
        });
        // Started means: config loaded, a complete snapshot listed, a first pass attempted. Its
        // outcome is for /readyz: a leaderless cluster or a guard refusal is an outage to ride
        // out, and a restart by a start timeout would not end it.
        systemd.ready();
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

/// The longest a graceful stop spends undoing the fast path's moves (well inside systemd's
/// `TimeoutStopSec`, 30 s in the shipped unit): a RESUME and a few runtime-API commands take
/// milliseconds; an unreachable console is bounded by its `connect_timeout`.
const SHUTDOWN_UNDO: Duration = Duration::from_secs(5);

/// The state a reload may replace.
struct Daemon {
    /// Runs `[[hook]]` commands on the events of each pass, after it.
    hooks: Hooks,
    confirm_tx: mpsc::UnboundedSender<crate::failover::Confirmed>,
    config_path: PathBuf,
    overrides: Overrides,
    engine: Engine,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
    http: Option<HttpServer>,
    source: Source,
    logging: Logging,
    watcher: Option<notify::RecommendedWatcher>,
}

impl Daemon {
    fn update_source_status(&self, state: &SourceState) {
        let mut st = self.status.lock().expect("status lock");
        st.etcd_connected = state.connected;
        st.etcd_error = state.last_error.as_ref().map(|e| e.to_string());
        st.revision = state.snapshot.as_ref().map(|s| s.revision).unwrap_or(0);
        st.relists = state.relists;
    }

    /// Re-reads the config and templates and applies all of it, or none of it. Returns true
    /// when the etcd source was restarted (so the snapshot in hand is stale).
    async fn reload(&mut self, why: &str) -> bool {
        let result = self.try_reload(why).await;
        let mut st = self.status.lock().expect("status lock");
        match result {
            Ok(restarted) => {
                st.config_reloads += 1;
                st.config_error = None;
                restarted
            }
            Err(e) => {
                tracing::error!(
                    trigger = why,
                    config = %self.config_path.display(),
                    "new configuration refused, the running one stays: {e:#}"
                );
                st.config_error = Some(format!("{e:#}"));
                false
            }
        }
    }

    async fn try_reload(&mut self, why: &str) -> Result<bool, DaemonError> {
        // Reading the files and resolving user and group names (NSS may ask LDAP) run on the
        // blocking pool: a slow look-up must not stall the etcd keepalive or the fast path.
        let (path, overrides) = (self.config_path.clone(), self.overrides.clone());
        let loaded = tokio::task::spawn_blocking(move || config::load_settings(&path, &overrides))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let new = Arc::new(loaded?);
        let old = Arc::clone(self.engine.settings());
        let mut changed = changed_settings(&old, &new);
        // Certificates are rotated in place, under the same paths: compare what they hold.
        let tls = tls_contents(&new);
        if tls != self.source.tls && !changed.iter().any(|c| c == "etcd.tls") {
            changed.push("etcd.tls".into());
        }
        let has = |name: &str| changed.iter().any(|c| c == name);
        // Everything that can fail comes first; nothing is committed until all of it passed.
        let log = if has("log.level") || has("log.format") {
            let origin = format!("log.level of {}", self.config_path.display());
            Some(logging::parse_level(&new.log.level, &origin)?)
        } else {
            None
        };
        let http = if has("http.listen") {
            Some(match &new.http.listen {
                Some(addr) => Some(HttpServer::bind(addr, &self.status, &self.metrics).await?),
                None => None,
            })
        } else {
            None
        };
        let other_cluster = has("etcd.namespace") || has("etcd.scope");
        if other_cluster {
            // Another cluster: what the guard remembers of the old one says nothing about it.
            self.engine = Engine::new(Arc::clone(&new))?;
            self.engine
                .attach_router(self.confirm_tx.clone(), self.metrics.failover_observers());
        } else {
            self.engine.replace(Arc::clone(&new))?;
        }
        if let Some(h) = http {
            self.http = h; // dropping the old server closes its listener
        }
        if has("hooks") {
            // The old dispatcher finishes the runs it holds; new events go to the new one.
            self.hooks = Hooks::start(
                new.hooks_config.clone(),
                new.hooks.clone(),
                self.metrics.hook_metrics(),
            );
        }
        if let Some(filter) = log {
            if let Err(e) = self.logging.apply(new.log.format, filter) {
                tracing::warn!("{e}");
            }
        }
        let restart = changed.iter().any(|c| {
            c.starts_with("etcd.") || c == "daemon.resync_interval" || c == "daemon.max_backoff"
        });
        if restart {
            self.source = Source::start(&new);
            self.update_source_status(&SourceState::default());
            if other_cluster {
                let mut st = self.status.lock().expect("status lock");
                st.cluster = None;
                st.last_pass_ok = None;
            }
        }
        tracing::info!(trigger = why, config = %self.config_path.display(), changed = ?changed, "configuration and templates reloaded");
        if restart {
            tracing::info!(
                endpoints = ?new.etcd.endpoints,
                prefix = %new.etcd.prefix(),
                "etcd source restarted with the new settings; the next pass waits for its first list"
            );
        }
        Ok(restart)
    }
}

/// The etcd source task in force and its channels; dropping it stops the task.
struct Source {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    rx: watch::Receiver<SourceState>,
    /// What the TLS files held when it started.
    tls: Vec<Option<Vec<u8>>>,
}

/// The bytes of the etcd TLS files (CA, certificate, key); unreadable counts as empty, and the
/// source itself reports why it cannot read them.
fn tls_contents(s: &Settings) -> Vec<Option<Vec<u8>>> {
    let Some(tls) = &s.etcd.tls else {
        return Vec::new();
    };
    [&tls.ca, &tls.cert, &tls.key]
        .into_iter()
        .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect()
}

impl Source {
    fn start(s: &Settings) -> Source {
        let (tx, rx) = watch::channel(SourceState::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(source::run(
            s.etcd.clone(),
            s.daemon.resync_interval,
            s.daemon.max_backoff,
            tx,
            stop_rx,
        ));
        Source {
            task,
            stop,
            rx,
            tls: tls_contents(s),
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // The source holds nothing worth finishing: stop it now, wherever it is waiting.
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// The HTTP endpoint in force; dropping it closes the listener.
struct HttpServer {
    task: JoinHandle<()>,
}

impl HttpServer {
    async fn bind(
        addr: &str,
        status: &Arc<Mutex<Status>>,
        metrics: &Arc<Metrics>,
    ) -> Result<HttpServer, DaemonError> {
        let task = crate::http::bind(addr, Arc::clone(status), Arc::clone(metrics))
            .await
            .map_err(|source| DaemonError::Listen {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(HttpServer { task })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What systemd hears (nothing when not run under it): READY=1 once, STATUS= when it changes.
#[derive(Default)]
struct Systemd {
    ready: bool,
    status: String,
}

impl Systemd {
    fn status(&mut self, text: String) {
        if text != self.status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
            self.status = text;
        }
    }

    fn ready(&mut self) {
        if !self.ready {
            self.ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::debug!("started (READY=1)");
        }
    }
}

/// The names of the settings that differ, as the config file spells them (`template "name"`
/// for anything of one template). Secrets are compared, never shown.
fn changed_settings(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let mut diff = |name: &str, differs: bool| {
        if differs {
            out.push(name.to_owned());
        }
    };
    let (a, b) = (&old.etcd, &new.etcd);
    diff("etcd.api", a.api != b.api);
    diff("etcd.endpoints", a.endpoints != b.endpoints);
    diff("etcd.namespace", a.namespace != b.namespace);
    // Another single cluster, or one cluster ↔ several: the guard's memory says nothing of it.
    let one = |s: &crate::source::EtcdSettings| s.single_scope().map(str::to_owned);
    diff(
        "etcd.scope",
        one(a) != one(b) && (one(a).is_some() || one(b).is_some()),
    );
    // Another list of clusters (or discovery): each cluster keeps its own state.
    diff(
        "etcd.scopes",
        a.clusters != b.clusters && one(a).is_none() && one(b).is_none(),
    );
    diff(
        "etcd.connect_timeout",
        a.connect_timeout != b.connect_timeout,
    );
    diff(
        "etcd.request_timeout",
        a.request_timeout != b.request_timeout,
    );
    diff(
        "etcd.keepalive_interval",
        a.keepalive_interval != b.keepalive_interval,
    );
    diff(
        "etcd.keepalive_timeout",
        a.keepalive_timeout != b.keepalive_timeout,
    );
    let user = |e: &crate::source::EtcdSettings| e.auth.as_ref().map(|(u, _)| u.clone());
    let password = |e: &crate::source::EtcdSettings| e.auth.as_ref().map(|(_, p)| p.clone());
    diff("etcd.username", user(a) != user(b));
    diff("etcd.password", password(a) != password(b));
    diff("etcd.tls", format!("{:?}", a.tls) != format!("{:?}", b.tls));
    let (a, b) = (&old.daemon, &new.daemon);
    diff("daemon.min_interval", a.min_interval != b.min_interval);
    diff(
        "daemon.resync_interval",
        a.resync_interval != b.resync_interval,
    );
    diff("daemon.max_backoff", a.max_backoff != b.max_backoff);
    diff("daemon.once_timeout", a.once_timeout != b.once_timeout);
    diff(
        "daemon.retry_interval",
        a.retry_interval != b.retry_interval,
    );
    let (a, b) = (&old.guard, &new.guard);
    diff("guard.min_members", a.min_members != b.min_members);
    diff(
        "guard.max_removed_fraction",
        a.max_removed_fraction != b.max_removed_fraction,
    );
    diff("guard.force", a.force != b.force);
    diff("guard.state_file", a.state_file != b.state_file);
    diff("log.format", old.log.format != new.log.format);
    diff("log.level", old.log.level != new.log.level);
    diff("http.listen", old.http.listen != new.http.listen);
    diff("clusters", old.clusters != new.clusters);
    // Applied by the engine's new router, which keeps the state of a leader change under way.
    diff("failover", old.failover != new.failover);
    diff(
        "hooks",
        old.hooks != new.hooks || old.hooks_config != new.hooks_config,
    );
    let mut names: Vec<&str> = old
        .targets
        .iter()
        .chain(&new.targets)
        .map(|t| t.name.as_str())
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let find = |s: &Settings| {
            s.targets
                .iter()
                .find(|t| t.name == name)
                .map(|t| format!("{t:?}"))
        };
        diff(&format!("template {name:?}"), find(old) != find(new));
    }
    out
}

/// First SIGTERM/SIGINT: request a graceful stop. Second: kill the command in flight (a check
/// or reload command, with its children) and exit at once.
fn spawn_signal_handler(tx: watch::Sender<bool>) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            count += 1;
            if count == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down after the pass in flight (send again to exit at once)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!(signal = name, "exiting at once");
                crate::command::kill_running();
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// Watches the directories holding the templates (not the files: editors and ConfigMaps replace
/// files by renaming, which a file watch would lose) and the directories above them (a template
/// directory renamed over, or a symlink to it swapped, is a new inode that only its parent sees).
/// Call again after each reload: the watch of a replaced directory is dead.
fn watch_templates(
    settings: &Settings,
    tx: mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let files: Vec<PathBuf> = settings.targets.iter().map(|t| t.src.clone()).collect();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_owned()))
        .collect();
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let template_dirs = dirs.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        // ConfigMaps swap a `..data` symlink; count any change to it as a template change.
        let relevant = ev.paths.iter().any(|p| {
            template_dirs.iter().any(|d| p == d)
                || p.file_name()
                    .is_some_and(|n| names.iter().any(|x| x == n) || n == "..data")
        });
        if relevant {
            let _ = tx.try_send("template change");
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch template files; SIGHUP still reloads"))
    .ok()?;
    let mut parents: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .filter(|p| !dirs.contains(p))
        .collect();
    parents.sort();
    parents.dedup();
    for d in &dirs {
        if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
            // Possibly mid-swap: the parent's watch sees it come back.
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch template directory");
        }
    }
    for p in &parents {
        if let Err(e) = watcher.watch(p, notify::RecursiveMode::NonRecursive) {
            tracing::debug!(dir = %p.display(), error = %e, "cannot watch the directory above the templates");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Settings {
        let raw = config::RawConfig::parse(toml, Path::new("t.toml")).unwrap();
        raw.resolve(Path::new("/etc/haconfd")).unwrap()
    }

    const BASE: &str = r#"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
scope = "a"
password = "secret1"
username = "u"
[[template]]
name = "t"
src = "x.tera"
dest = "/tmp/x.cfg"
"#;

    #[test]
    fn changed_settings_name_each_difference_and_never_a_secret() {
        let a = settings(BASE);
        assert!(changed_settings(&a, &a).is_empty());
        let b = settings(
            &(BASE
                .replace("\"a\"", "\"b\"")
                .replace("secret1", "secret2")
                .replace("x.cfg", "y.cfg")
                + "[daemon]\nmax_backoff = \"3s\"\n[http]\nlisten = \"127.0.0.1:1\"\n[log]\nlevel = \"debug\"\n"),
        );
        let changed = changed_settings(&a, &b);
        assert_eq!(
            changed,
            [
                "etcd.scope",
                "etcd.password",
                "daemon.max_backoff",
                "log.level",
                "http.listen",
                "template \"t\""
            ]
            .map(String::from)
        );
        assert!(!format!("{changed:?}").contains("secret"));
    }
}
