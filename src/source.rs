//! The etcd source: lists Patroni's prefix (a [`Snapshot`] at a revision), then watches it from
//! revision + 1 and applies events to the snapshot. After a stream error it reconnects with backoff
//! and resumes from the last applied revision; on compaction it re-lists. Events at or below the
//! snapshot's revision are skipped, so nothing is lost or applied twice. It publishes complete
//! snapshots and its connection state on a `watch` channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KvClient, TlsOptions,
    WatchOptions,
};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::EtcdSettings;
use crate::snapshot::Snapshot;

/// Errors talking to etcd; each names the endpoints or prefix involved.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Building the client failed (bad TLS files, unreachable).
    #[error("cannot connect to etcd at {endpoints}: {message}")]
    Connect {
        /// Endpoints, comma-separated.
        endpoints: String,
        /// Cause.
        message: String,
    },
    /// etcd refused the credentials or the permission to read the prefix. Retrying cannot help
    /// until the configuration or etcd's users and roles change, so one-shot modes stop at once.
    #[error("etcd at {endpoints} refused {what}: {message}{hint}")]
    Denied {
        /// Endpoints.
        endpoints: String,
        /// What was refused ("the credentials of user \"x\"", "reading /service/demo/").
        what: String,
        /// etcd's own words.
        message: String,
        /// What to change, with a leading separator, or empty.
        hint: &'static str,
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
    /// Retries ran out of time; `last` is the real cause seen on the way.
    #[error("{last} (still failing after {timeout:?})")]
    GaveUp {
        /// The last error before the deadline.
        last: Box<SourceError>,
        /// The deadline.
        timeout: Duration,
    },
}

impl SourceError {
    /// Whether retrying cannot fix it: refused credentials or permissions, an unreadable TLS
    /// file. One-shot modes report these at once instead of retrying until their deadline.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SourceError::Denied { .. } | SourceError::TlsFile { .. }
        )
    }
}

/// etcd's words for an error, without tonic's metadata dump, and a hint when the words alone do
/// not say what to do.
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("message length too large") => {
            format!(
                "{} (one answer from etcd exceeded the gRPC message limit of {MAX_MESSAGE} bytes)",
                s.message()
            )
        }
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

/// The hint for an error that means access was refused (etcd's `rpctypes` messages), or `None`
/// for errors a retry may fix. An expired token ("invalid auth token") is not among them: the
/// client authenticates again.
fn refusal(e: &etcd_client::Error) -> Option<&'static str> {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return None;
    };
    let m = s.message();
    if m.contains("authentication failed") {
        Some("")
    } else if m.contains("permission denied") {
        Some(" (the user's role needs read permission on the prefix: etcdctl role grant-permission <role> --prefix=true read <prefix>)")
    } else if m.contains("user name is empty") {
        Some(" (etcd has authentication enabled: set etcd.username and the password)")
    } else if m.contains("authentication is not enabled") {
        Some(" (etcd.username is set but etcd has authentication off)")
    } else {
        None
    }
}

/// Keys per page of a list. Paging keeps each answer small whatever the scope holds (etcd's own
/// limits and gRPC's apply per message); all pages are read at one revision.
const PAGE_KEYS: i64 = 200;

/// The largest single gRPC message accepted from etcd (list pages and watch responses). tonic's
/// default is 4 MiB, and a scope with large member keys exceeded it in one list answer; a watch
/// catching up sends many revisions in one response. etcd itself caps a value at
/// `--max-request-bytes` (1.5 MiB by default), so a page of [`PAGE_KEYS`] keys fits comfortably.
const MAX_MESSAGE: usize = 512 << 20;

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
    /// Bumped each time the published snapshot changes: the same generation is the same view.
    /// (The snapshot may change in place, behind the same `Arc`, when no pass holds it.)
    pub generation: u64,
}

/// Builds an etcd client from the settings (TLS, auth, keepalive, timeouts).
pub async fn connect(cfg: &EtcdSettings) -> Result<Client, SourceError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        .with_timeout(cfg.request_timeout)
        .with_keep_alive(cfg.keepalive_interval, cfg.keepalive_timeout)
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &cfg.auth {
        // etcd's simple tokens expire (5 minutes idle by default); a long-running watcher must
        // authenticate again rather than fail every call after that.
        opts = opts
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
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
        Ok(Err(e)) => Err(match (refusal(&e), &cfg.auth) {
            (Some(hint), Some((user, _))) => SourceError::Denied {
                endpoints,
                what: format!("the credentials of user {user:?}"),
                message: describe(&e),
                hint,
            },
            _ => SourceError::Connect {
                endpoints,
                message: describe(&e),
            },
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

/// Lists the prefix into a snapshot at the response's revision, in pages of [`PAGE_KEYS`] keys,
/// every page after the first read at the first page's revision (one consistent view). Retries at
/// once on another endpoint a few times: with one of several endpoints dead, some requests fail
/// with `Unavailable` while the others answer. A compaction between two pages fails the page; the
/// retry lists afresh at the newest revision.
pub async fn list(client: &mut Client, cfg: &EtcdSettings) -> Result<Snapshot, SourceError> {
    let prefix = cfg.prefix();
    let endpoints = cfg.endpoints.join(",");
    let tries = cfg.endpoints.len() * 2 + 1;
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut last = String::new();
    for _ in 0..tries {
        match list_pages(&mut kv, prefix.as_bytes(), cfg.request_timeout).await {
            Ok(snap) => return Ok(snap),
            Err(ListFailure::Etcd(e)) => {
                if let Some(hint) = refusal(&e) {
                    let what = match &cfg.auth {
                        Some((user, _)) => format!("reading {prefix} to user {user:?}"),
                        None => format!("reading {prefix} without credentials"),
                    };
                    return Err(SourceError::Denied {
                        endpoints,
                        what,
                        message: describe(&e),
                        hint,
                    });
                }
                last = describe(&e);
            }
            Err(ListFailure::NoAnswer) => {
                last = format!("no answer within {:?}", cfg.request_timeout)
            }
        }
    }
    Err(SourceError::List {
        prefix,
        endpoints,
        message: last,
    })
}

enum ListFailure {
    Etcd(etcd_client::Error),
    NoAnswer,
}

async fn list_pages(
    kv: &mut KvClient,
    prefix: &[u8],
    request_timeout: Duration,
) -> Result<Snapshot, ListFailure> {
    let end = prefix_end(prefix);
    let mut from = prefix.to_vec();
    let mut snap = Snapshot::default();
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE_KEYS);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = tokio::time::timeout(request_timeout, kv.get(from.clone(), Some(opts)))
            .await
            .map_err(|_| ListFailure::NoAnswer)?
            .map_err(ListFailure::Etcd)?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            snap.revision = revision;
        }
        for kv in resp.kvs() {
            snap.put(
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            );
        }
        match resp.kvs().last() {
            // The next page starts right after the last key of this one.
            Some(kv) if resp.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return Ok(snap),
        }
    }
}

/// Connects and lists once, retrying with backoff until `timeout` (for `once`, `check`, `render`).
/// Refused credentials or permissions end it at once; otherwise the error at the deadline is the
/// last real one seen, not only "no answer".
pub async fn fetch_once(cfg: &EtcdSettings, timeout: Duration) -> Result<Snapshot, SourceError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut last: Option<SourceError> = None;
    loop {
        let attempt = async {
            let mut c = connect(cfg).await?;
            list(&mut c, cfg).await
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if e.is_permanent() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(match last {
                    Some(last) => SourceError::GaveUp {
                        last: Box::new(last),
                        timeout,
                    },
                    None => SourceError::Timeout {
                        endpoints: cfg.endpoints.join(","),
                        timeout,
                        what: "connect and list",
                    },
                })
            }
        };
        // Keep trying until the deadline itself, not until the next delay would pass it.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SourceError::GaveUp {
                last: Box::new(err),
                timeout,
            });
        }
        let wait = backoff.next_delay().min(left);
        tracing::warn!(error = %err, retry_in = ?wait, "etcd not reachable yet");
        last = Some(err);
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
        let mut watch_client = c.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(current.revision + 1)
            .with_progress_notify();
        let mut stream = match tokio::time::timeout(
            cfg.request_timeout,
            watch_client.watch(prefix.as_bytes(), Some(opts)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                fail(
                    &tx,
                    format!("watch {prefix}: {}", describe(&e)),
                    &mut down_since,
                );
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
                        let mut changes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
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
                            let value = match ev.event_type() {
                                EventType::Put => Some(kv.value().to_vec()),
                                EventType::Delete => None,
                            };
                            match &value {
                                Some(v) => current.put(key.clone(), v.clone()),
                                None => current.delete(&key),
                            }
                            changes.push((key, value));
                            current.revision = current.revision.max(kv.mod_revision());
                        }
                        if resp.events().is_empty() {
                            // Progress notification: every event up to this revision was sent.
                            if let Some(h) = resp.header() {
                                current.revision = current.revision.max(h.revision());
                            }
                        }
                        if !changes.is_empty() {
                            publish_changes(&tx, changes, current);
                        }
                    }
                    Ok(None) => {
                        fail(&tx, "watch stream closed by etcd".into(), &mut down_since);
                        break true;
                    }
                    Err(e) => {
                        fail(&tx, format!("watch {prefix}: {}", describe(&e)), &mut down_since);
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
                s.generation += 1;
            }
        }
        s.connected = connected;
        if connected {
            s.last_error = None;
        }
    });
}

/// Publishes the events of one watch response. The published snapshot is the source's view
/// before them, so they are applied to it in place: a heartbeat costs one key, not a copy of the
/// whole scope (3,000 members are about 1 MB). It is copied first only while a pass still holds
/// it (`Arc::make_mut`), which happens at most once per pass.
fn publish_changes(
    tx: &watch::Sender<SourceState>,
    changes: Vec<(String, Option<Vec<u8>>)>,
    current: &Snapshot,
) {
    tx.send_modify(|s| {
        match s.snapshot.as_mut() {
            Some(published) => {
                let p = Arc::make_mut(published);
                for (key, value) in changes {
                    match value {
                        Some(v) => p.put(key, v),
                        None => p.delete(&key),
                    }
                }
                p.revision = current.revision;
            }
            None => s.snapshot = Some(Arc::new(current.clone())),
        }
        debug_assert!(
            s.snapshot.as_deref() == Some(current),
            "the published snapshot drifted from the source's view"
        );
        s.generation += 1;
        s.connected = true;
        s.last_error = None;
    });
}

/// Sleeps, returning true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_change_the_published_snapshot_in_place_unless_a_pass_holds_it() {
        let mut current = Snapshot::new();
        current.put("/service/s/members/a".into(), b"1".to_vec());
        current.revision = 5;
        let (tx, rx) = watch::channel(SourceState::default());
        publish(&tx, Some(&current), true);
        let first = Arc::as_ptr(rx.borrow().snapshot.as_ref().unwrap());

        current.put("/service/s/members/b".into(), b"2".to_vec());
        current.revision = 6;
        publish_changes(
            &tx,
            vec![("/service/s/members/b".into(), Some(b"2".to_vec()))],
            &current,
        );
        assert_eq!(
            Arc::as_ptr(rx.borrow().snapshot.as_ref().unwrap()),
            first,
            "an event copied the whole scope although no pass held it"
        );

        // A pass holds the view: it keeps what it was given, the channel moves on.
        let held = rx.borrow().snapshot.clone().unwrap();
        current.delete("/service/s/members/a");
        current.revision = 7;
        publish_changes(&tx, vec![("/service/s/members/a".into(), None)], &current);
        assert_eq!(held.revision, 6);
        assert!(held.kvs.contains_key("/service/s/members/a"));
        assert_eq!(rx.borrow().snapshot.as_deref(), Some(&current));
        assert_eq!(rx.borrow().generation, 3);
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/service/demo/"), b"/service/demo0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
