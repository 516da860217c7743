//! The etcd source: lists Patroni's prefix (a [`Snapshot`] at a revision), then watches it from
//! revision + 1 and applies events to the snapshot. After a stream error it reconnects with backoff
//! and resumes from the last applied revision; on compaction it re-lists. Events at or below the
//! snapshot's revision are skipped, so nothing is lost or applied twice. It publishes complete
//! snapshots and its connection state on a `watch` channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::EtcdSettings;
use crate::snapshot::Snapshot;

/// Errors talking to etcd; each names the endpoints or prefix involved.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Building the client failed (bad TLS files, auth refused, unreachable).
    #[error("cannot connect to etcd at {endpoints}: {message}")]
    Connect {
        /// Endpoints, comma-separated.
        endpoints: String,
        /// Cause.
        message: String,
    },
    /// A TLS file could not be read.
    #[error("cannot read etcd TLS file {path}: {source}")]
    TlsFile {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Listing the prefix failed.
    #[error("cannot list {prefix} from etcd at {endpoints}: {message}")]
    List {
        /// Prefix.
        prefix: String,
        /// Endpoints.
        endpoints: String,
        /// Cause.
        message: String,
    },
    /// etcd did not answer in time.
    #[error("etcd at {endpoints} did not answer within {timeout:?} ({what})")]
    Timeout {
        /// Endpoints.
        endpoints: String,
        /// Limit.
        timeout: Duration,
        /// Which step.
        what: &'static str,
    },
}

/// What the source publishes.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// The latest complete snapshot, once one was listed.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Whether the watch is established and current.
    pub connected: bool,
    /// The last error, while disconnected.
    pub last_error: Option<String>,
    /// Re-lists done after compaction or drift (for metrics and tests).
    pub relists: u64,
}

/// Builds an etcd client from the settings (TLS, auth, keepalive, timeouts).
pub async fn connect(cfg: &EtcdSettings) -> Result<Client, SourceError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        .with_timeout(cfg.request_timeout)
        .with_keep_alive(cfg.keepalive_interval, cfg.keepalive_timeout)
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &cfg.auth {
        opts = opts.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &cfg.tls {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|source| SourceError::TlsFile {
                path: p.clone(),
                source,
            })
        };
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(d) = &tls.domain {
            t = t.domain_name(d.clone());
        }
        opts = opts.with_tls(t);
    }
    let endpoints = cfg.endpoints.join(",");
    let limit = cfg.connect_timeout + cfg.request_timeout;
    match tokio::time::timeout(limit, Client::connect(&cfg.endpoints, Some(opts))).await {
        Err(_) => Err(SourceError::Timeout {
            endpoints,
            timeout: limit,
            what: "connect",
        }),
        Ok(Err(e)) => Err(SourceError::Connect {
            endpoints,
            message: e.to_string(),
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

/// Lists the prefix into a snapshot at the response's revision. Retries at once on another
/// endpoint a few times: with one of several endpoints dead, some requests fail with
/// `Unavailable` while the others answer.
pub async fn list(client: &mut Client, cfg: &EtcdSettings) -> Result<Snapshot, SourceError> {
    let prefix = cfg.prefix();
    let endpoints = cfg.endpoints.join(",");
    let tries = cfg.endpoints.len() * 2 + 1;
    let mut last = String::new();
    for _ in 0..tries {
        let req = client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()));
        match tokio::time::timeout(cfg.request_timeout, req).await {
            Err(_) => last = format!("no answer within {:?}", cfg.request_timeout),
            Ok(Err(e)) => last = e.to_string(),
            Ok(Ok(resp)) => {
                let mut snap = Snapshot {
                    revision: resp.header().map(|h| h.revision()).unwrap_or(0),
                    ..Snapshot::default()
                };
                for kv in resp.kvs() {
                    snap.put(
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    );
                }
                return Ok(snap);
            }
        }
    }
    Err(SourceError::List {
        prefix,
        endpoints,
        message: last,
    })
}

/// Connects and lists once, retrying with backoff until `timeout` (for `once`, `check`, `render`).
pub async fn fetch_once(cfg: &EtcdSettings, timeout: Duration) -> Result<Snapshot, SourceError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let attempt = async {
            let mut c = connect(cfg).await?;
            list(&mut c, cfg).await
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e,
            Err(_) => SourceError::Timeout {
                endpoints: cfg.endpoints.join(","),
                timeout,
                what: "connect and list",
            },
        };
        // Keep trying until the deadline itself, not until the next delay would pass it.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(err);
        }
        let wait = backoff.next_delay().min(left);
        tracing::warn!(error = %err, retry_in = ?wait, "etcd not reachable yet");
        tokio::time::sleep(wait).await;
    }
}

/// Runs the source until `shutdown` flips to true, publishing on `tx`.
pub async fn run(
    cfg: EtcdSettings,
    resync_interval: Duration,
    max_backoff: Duration,
    tx: watch::Sender<SourceState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), max_backoff);
    let mut client: Option<Client> = None;
    let mut snap: Option<Snapshot> = None;
    let mut need_list = true;
    let mut down_since: Option<Instant> = None;
    let prefix = cfg.prefix();

    // The first failure is an error; while it lasts, a reminder every 30 s rather than one line
    // per retry.
    let mut last_reminder = Instant::now();
    let mut fail = |tx: &watch::Sender<SourceState>,
                    err: String,
                    down_since: &mut Option<Instant>| {
        match down_since {
            None => {
                *down_since = Some(Instant::now());
                last_reminder = Instant::now();
                tracing::error!(error = %err, "etcd unreachable: not ready; keeping the last good files");
            }
            Some(since) if last_reminder.elapsed() >= Duration::from_secs(30) => {
                last_reminder = Instant::now();
                tracing::warn!(error = %err, down_for = ?since.elapsed(), "etcd still unreachable; retrying");
            }
            Some(_) => tracing::debug!(error = %err, "etcd still unreachable"),
        }
        tx.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(err);
        });
    };

    loop {
        if *shutdown.borrow() {
            return;
        }
        if client.is_none() {
            match connect(&cfg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    fail(&tx, e.to_string(), &mut down_since);
                    if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("client set above");
        if need_list {
            match list(c, &cfg).await {
                Ok(s) => {
                    need_list = false;
                    tracing::info!(revision = s.revision, keys = s.kvs.len(), prefix = %prefix, "listed");
                    snap = Some(s);
                    publish(&tx, snap.as_ref(), true);
                }
                Err(e) => {
                    fail(&tx, e.to_string(), &mut down_since);
                    if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let current = snap.as_mut().expect("listed above");
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(current.revision + 1)
            .with_progress_notify();
        let mut stream =
            match tokio::time::timeout(cfg.request_timeout, c.watch(prefix.as_bytes(), Some(opts)))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    fail(&tx, format!("watch {prefix}: {e}"), &mut down_since);
                    if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    fail(
                        &tx,
                        format!("watch {prefix}: no answer within {:?}", cfg.request_timeout),
                        &mut down_since,
                    );
                    if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            };
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + nonzero(resync_interval),
            nonzero(resync_interval),
        );
        // Watch until the stream ends; `broken` says whether to back off before re-watching.
        let broken = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                tracing::warn!(
                                    revision = current.revision,
                                    compact_revision = resp.compact_revision(),
                                    "watch revision was compacted: re-listing"
                                );
                                need_list = true;
                                tx.send_modify(|s| s.relists += 1);
                                break false;
                            }
                            fail(&tx, format!("watch canceled by etcd: {}", resp.cancel_reason()), &mut down_since);
                            break true;
                        }
                        if resp.created() {
                            if let Some(since) = down_since.take() {
                                tracing::info!(outage = ?since.elapsed(), revision = current.revision, "etcd reachable again: watching");
                            } else {
                                tracing::debug!(revision = current.revision, "watching");
                            }
                            backoff.reset();
                            publish(&tx, Some(current), true);
                            continue;
                        }
                        let mut changed = false;
                        // Skip what the snapshot already holds (after a re-list or resync). The
                        // bound is taken once per response: the events of one revision (a range
                        // delete, a lease expiring under a member and the leader key) share it.
                        let held = current.revision;
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            if kv.mod_revision() <= held {
                                continue;
                            }
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            match ev.event_type() {
                                EventType::Put => current.put(key, kv.value().to_vec()),
                                EventType::Delete => current.delete(&key),
                            }
                            current.revision = current.revision.max(kv.mod_revision());
                            changed = true;
                        }
                        if resp.events().is_empty() {
                            // Progress notification: every event up to this revision was sent.
                            if let Some(h) = resp.header() {
                                current.revision = current.revision.max(h.revision());
                            }
                        }
                        if changed {
                            publish(&tx, Some(current), true);
                        }
                    }
                    Ok(None) => {
                        fail(&tx, "watch stream closed by etcd".into(), &mut down_since);
                        break true;
                    }
                    Err(e) => {
                        fail(&tx, format!("watch {prefix}: {e}"), &mut down_since);
                        break true;
                    }
                },
                _ = resync.tick(), if !resync_interval.is_zero() => {
                    match list(c, &cfg).await {
                        Ok(fresh) if fresh.revision >= current.revision => {
                            if fresh.kvs != current.kvs {
                                tracing::warn!(revision = fresh.revision, "periodic resync found a difference: taking the listed view");
                                tx.send_modify(|s| s.relists += 1);
                                *current = fresh;
                                publish(&tx, Some(current), true);
                            } else {
                                current.revision = fresh.revision;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "periodic resync failed; the watch goes on"),
                    }
                }
                _ = shutdown.changed() => return,
            }
        };
        if broken && sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
            return;
        }
    }
}

fn nonzero(d: Duration) -> Duration {
    if d.is_zero() {
        Duration::from_secs(3600)
    } else {
        d
    }
}

fn publish(tx: &watch::Sender<SourceState>, snap: Option<&Snapshot>, connected: bool) {
    tx.send_modify(|s| {
        if let Some(snap) = snap {
            let same = s.snapshot.as_deref() == Some(snap);
            if !same {
                s.snapshot = Some(Arc::new(snap.clone()));
            }
        }
        s.connected = connected;
        if connected {
            s.last_error = None;
        }
    });
}

/// Sleeps, returning true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
