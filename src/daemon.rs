//! The `run` mode: wires the etcd source to passes with coalescing (leading edge, then at most one
//! pass that writes per `min_interval`; events arriving during a pass merge into the next),
//! retries failed passes, hot-reloads config and templates (SIGHUP, file changes), and shuts down
//! gracefully (first SIGTERM/SIGINT finishes the pass in flight, a second exits at once).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::{self, Overrides, Settings};
use crate::metrics::Metrics;
use crate::pipeline::{Engine, PassError};
use crate::snapshot::Snapshot;
use crate::source::{self, SourceState};
use crate::status::Status;

/// Runs until a shutdown signal. Returns an error only if nothing could start.
pub async fn run(
    config_path: PathBuf,
    overrides: Overrides,
    settings: Settings,
    status: Arc<Mutex<Status>>,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let mut engine = Engine::new(Arc::clone(&settings))?;
    let metrics = Arc::new(Metrics::new());
    let http_task = match &settings.http.listen {
        Some(addr) => Some(
            crate::http::bind(addr, Arc::clone(&status), Arc::clone(&metrics))
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on http.listen {addr}: {e}"))?,
        ),
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    spawn_signal_handler(shutdown_tx.clone())?;

    let (src_tx, mut src_rx) = watch::channel(SourceState::default());
    let source_task = tokio::spawn(source::run(
        settings.etcd.clone(),
        settings.daemon.resync_interval,
        settings.daemon.max_backoff,
        src_tx,
        shutdown_rx.clone(),
    ));

    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(8);
    let mut hup = signal(SignalKind::hangup())?;
    let mut _template_watcher = watch_templates(&settings, reload_tx.clone());

    let mut shutdown = shutdown_rx.clone();
    let mut last_snapshot: Option<Arc<Snapshot>> = None;
    let mut last_write: Option<Instant> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut pending = false;
    let mut notified_ready = false;
    let mut leaderless = false;

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = src_rx.changed() => {
                if r.is_err() { break; }
                let state = src_rx.borrow_and_update().clone();
                update_source_status(&status, &state);
                if state.connected {
                    if let Some(snap) = &state.snapshot {
                        if last_snapshot.as_ref().is_none_or(|l| !Arc::ptr_eq(l, snap)) {
                            pending = true;
                        }
                    }
                }
            }
            _ = hup.recv() => {
                reload_config(&config_path, &overrides, &mut engine, &status, "SIGHUP");
                _template_watcher = watch_templates(engine.settings(), reload_tx.clone());
                pending = last_snapshot.is_some();
            }
            Some(why) = reload_rx.recv() => {
                // Editors and ConfigMaps replace files in several steps: let them settle.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while reload_rx.try_recv().is_ok() {}
                reload_config(&config_path, &overrides, &mut engine, &status, why);
                pending = last_snapshot.is_some();
            }
            _ = retry => { retry_at = None; pending = true; }
        }
        if !pending {
            continue;
        }
        // Leading edge: the first change after a quiet spell runs at once; after a pass that
        // wrote, wait out `min_interval` and take whatever is newest then.
        let min_interval = engine.settings().daemon.min_interval;
        if let Some(last) = last_write {
            let wait = min_interval.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        let state = src_rx.borrow_and_update().clone();
        update_source_status(&status, &state);
        let Some(snap) = state.snapshot.filter(|_| state.connected) else {
            continue;
        };
        pending = false;
        last_snapshot = Some(Arc::clone(&snap));
        let started = Instant::now();
        let result = engine.pass(&snap, true).await;
        let elapsed = started.elapsed();
        let wrote = match &result {
            Ok(o) => !o.is_noop(),
            Err(PassError::Reload { .. }) => true,
            Err(_) => false,
        };
        if wrote {
            last_write = Some(Instant::now());
        }
        {
            let mut st = status.lock().expect("status lock");
            st.record_pass(&result, &engine, elapsed);
        }
        let names: Vec<String> = engine
            .settings()
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect();
        metrics.record(&names, &result, &engine.stats);
        match &result {
            Ok(o) if o.is_noop() => {
                tracing::debug!(revision = snap.revision, took = ?elapsed, "pass: nothing changed");
                retry_at = None;
            }
            Ok(o) => {
                tracing::info!(revision = snap.revision, written = ?o.written, reloaded = ?o.reloaded, took = ?elapsed, "pass applied");
                retry_at = None;
            }
            Err(e @ PassError::Render(crate::render::RenderError::NoLeader { .. })) => {
                // Once per leaderless spell, not once per etcd event during it.
                if !leaderless {
                    tracing::warn!(revision = snap.revision, "{e}");
                } else {
                    tracing::debug!(revision = snap.revision, "{e}");
                }
                retry_at = None; // the leader key's arrival is an etcd event
            }
            Err(e) => {
                tracing::error!(
                    revision = snap.revision,
                    reason = e.reason(),
                    "pass failed; last good files kept: {e:#}"
                );
                retry_at =
                    Some(tokio::time::Instant::now() + engine.settings().daemon.retry_interval);
            }
        }
        leaderless = matches!(
            &result,
            Err(PassError::Render(
                crate::render::RenderError::NoLeader { .. }
            ))
        );
        if !notified_ready && result.is_ok() {
            notified_ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), source_task).await;
    if let Some(h) = http_task {
        h.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

fn update_source_status(status: &Arc<Mutex<Status>>, state: &SourceState) {
    let mut st = status.lock().expect("status lock");
    st.etcd_connected = state.connected;
    st.etcd_error = state.last_error.clone();
    st.revision = state.snapshot.as_ref().map(|s| s.revision).unwrap_or(0);
    st.relists = state.relists;
}

/// First SIGTERM/SIGINT: request a graceful stop. Second: exit at once.
fn spawn_signal_handler(tx: watch::Sender<bool>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

fn reload_config(
    path: &Path,
    overrides: &Overrides,
    engine: &mut Engine,
    status: &Arc<Mutex<Status>>,
    why: &str,
) {
    let result = config::load_settings(path, overrides)
        .map_err(anyhow::Error::from)
        .and_then(|s| engine.replace(Arc::new(s)).map_err(anyhow::Error::from));
    let mut st = status.lock().expect("status lock");
    match result {
        Ok(()) => {
            tracing::info!(trigger = why, config = %path.display(), "configuration and templates reloaded");
            st.config_reloads += 1;
            st.config_error = None;
        }
        Err(e) => {
            tracing::error!(
                trigger = why,
                "new configuration refused, the running one stays: {e:#}"
            );
            st.config_error = Some(format!("{e:#}"));
        }
    }
}

/// Watches the directories holding the templates (not the files: editors and ConfigMaps replace
/// files by renaming, which a file watch would lose).
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
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, notify::EventKind::Access(_)) {
            return;
        }
        // ConfigMaps swap a `..data` symlink; count any change to it as a template change.
        let relevant = ev.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.iter().any(|x| x == n) || n == "..data")
        });
        if relevant {
            let _ = tx.try_send("template change");
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch template files; SIGHUP still reloads"))
    .ok()?;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if let Err(e) = watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch template directory");
        }
    }
    Some(watcher)
}
