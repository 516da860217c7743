//! The source: Patroni's keys in etcd as complete snapshots, published with the connection state
//! on a `watch` channel.
//!
//! Each etcd protocol is one file behind [`Store`]: `etcd3` (the v3 gRPC API, Patroni's `etcd3:`
//! section) and `etcd2` (the v2 HTTP API, Patroni's `etcd:` section). A store lists the prefix at
//! one revision and watches it from there. Everything else is here, once: one fallible session
//! (connect, list, watch until something breaks) inside one retry loop with backoff; applying
//! events to the snapshot, skipping those it already holds, so that nothing is lost or applied
//! twice; re-lists when etcd's history no longer reaches back far enough; the periodic resync; the
//! outage log; and what is published. `etcd.api` picks the store; nothing downstream knows which
//! one fed it.

mod etcd2;
mod etcd3;
pub mod scopes;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::snapshot::Snapshot;

/// The etcd API haconfd reads Patroni's keys through. Each keeps its own keys: a v3 reader never
/// sees what Patroni's `etcd:` (v2) section writes, nor the reverse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EtcdApi {
    /// The v3 (gRPC) API: Patroni's `etcd3:` section.
    #[default]
    V3,
    /// The v2 (HTTP/JSON) API: Patroni's `etcd:` section (etcd 3.4/3.5 with `--enable-v2`).
    V2,
}

/// `[etcd.tls]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle (PEM) that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub key: Option<PathBuf>,
    /// Server name to verify, when it differs from the endpoint's host.
    pub domain: Option<String>,
}

/// Resolved `[etcd]`.
#[derive(Clone)]
pub struct EtcdSettings {
    /// The API Patroni's keys are read through.
    pub api: EtcdApi,
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Normalised namespace: `/service` style (one leading `/`, no trailing or doubled `/`), or
    /// empty for the root (`"/"` or `""`), so that `<namespace>/<scope>/` is the path Patroni uses.
    pub namespace: String,
    /// Which clusters are followed.
    pub clusters: Clusters,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Request timeout.
    pub request_timeout: Duration,
    /// Keepalive interval.
    pub keepalive_interval: Duration,
    /// Keepalive timeout.
    pub keepalive_timeout: Duration,
    /// `(user, password)` when auth is on.
    pub auth: Option<(String, String)>,
    /// TLS files when TLS is on.
    pub tls: Option<TlsConfig>,
}

/// The clusters a haconfd follows under the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clusters {
    /// `etcd.scope`: one cluster; templates see its flat context.
    One(String),
    /// `etcd.scopes`: these clusters, sorted.
    List(Vec<String>),
    /// `etcd.discover`: every cluster under the namespace, found from the keys.
    Discover,
}

impl EtcdSettings {
    /// The key prefix read from etcd: `<namespace>/<scope>/` for one cluster (e.g.
    /// `/service/demo/`, or `/demo/` with the root namespace), `<namespace>/` for several.
    pub fn prefix(&self) -> String {
        match &self.clusters {
            Clusters::One(scope) => format!("{}/{scope}/", self.namespace),
            _ => format!("{}/", self.namespace),
        }
    }

    /// The scope when one cluster is followed.
    pub fn single_scope(&self) -> Option<&str> {
        match &self.clusters {
            Clusters::One(s) => Some(s),
            _ => None,
        }
    }

    /// How the clusters are chosen, for logs: the scope, the list, or `*` for discovery.
    pub fn describe_clusters(&self) -> String {
        match &self.clusters {
            Clusters::One(s) => s.clone(),
            Clusters::List(l) => l.join(","),
            Clusters::Discover => "*".into(),
        }
    }
}

impl fmt::Debug for EtcdSettings {
    // Secrets never reach a log line: the password is masked here, where every log of the
    // effective settings goes through.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("api", &self.api)
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("clusters", &self.clusters)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("auth", &self.auth.as_ref().map(|(u, _)| (u, "********")))
            .field("tls", &self.tls)
            .finish()
    }
}

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
    /// A TLS file was read but holds no usable certificate or key.
    #[error("etcd TLS file {path}: {message}")]
    TlsInvalid {
        /// File.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
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
    /// Watching the prefix failed, or the watch broke.
    #[error("cannot watch {prefix} on etcd at {endpoints}: {message}")]
    Watch {
        /// Prefix.
        prefix: String,
        /// Endpoints.
        endpoints: String,
        /// Cause.
        message: String,
    },
    /// `etcd.api = "v2"`, but the endpoint does not serve the v2 API: etcd 3.4 and 3.5 serve it
    /// only with `--enable-v2`, and etcd 3.6 removed it.
    #[error("etcd at {endpoint} does not serve the v2 API (404 on /v2/keys): start etcd 3.4 or 3.5 with --enable-v2 (Patroni's `etcd:` section needs it too), or move Patroni to its `etcd3:` section and set etcd.api = \"v3\"")]
    NoV2 {
        /// The endpoint that answered 404.
        endpoint: String,
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
    /// Whether retrying cannot fix it: refused credentials or permissions, an unusable TLS file,
    /// an etcd without the configured API. One-shot modes report these at once instead of
    /// retrying until their deadline.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SourceError::Denied { .. }
                | SourceError::TlsFile { .. }
                | SourceError::TlsInvalid { .. }
                | SourceError::NoV2 { .. }
        )
    }
}

/// The largest single answer accepted from etcd (a list page, a watch response, a v2 listing).
/// tonic's default is 4 MiB, and a scope with large member keys exceeded it in one list answer; a
/// watch catching up sends many revisions in one response. etcd itself caps a value at
/// `--max-request-bytes` (1.5 MiB by default).
const MAX_ANSWER: usize = 512 << 20;

/// What the source publishes.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// The latest complete snapshot, once one was listed.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Whether the watch is established and current.
    pub connected: bool,
    /// The last error, while disconnected.
    pub last_error: Option<Arc<SourceError>>,
    /// Re-lists done after compaction or drift (for metrics and tests).
    pub relists: u64,
    /// Bumped each time the published snapshot changes: the same generation is the same view.
    /// (The snapshot may change in place, behind the same `Arc`, when no pass holds it.)
    pub generation: u64,
    /// Bumped by every change of a `leader` or `failover` key (and every whole new listing):
    /// such a change is urgent, its pass runs without waiting for `min_interval`.
    pub routing: u64,
}

/// One protocol's access to etcd: connect, list the prefix at one revision, watch after one.
trait Store: Sized + Send {
    /// The watch it opens.
    type Watch: WatchStream;
    /// After a failed session, list again instead of resuming the watch from the held revision.
    const RELIST_AFTER_FAILURE: bool;
    /// What to check when the prefix is empty, for the log (the other API's keys are invisible).
    const EMPTY_HINT: &'static str;

    /// A client for the settings' endpoints, TLS and credentials.
    fn connect(cfg: &EtcdSettings) -> impl Future<Output = Result<Self, SourceError>> + Send;
    /// Every key under the prefix, at one revision.
    fn list(&mut self) -> impl Future<Output = Result<Snapshot, SourceError>> + Send;
    /// A watch of the prefix delivering every event after revision `after`. It owns what it
    /// needs, so that the store can list again while it runs.
    fn watch(
        &mut self,
        after: i64,
    ) -> impl Future<Output = Result<Self::Watch, SourceError>> + Send;
}

/// An open watch.
trait WatchStream: Send {
    /// The next batch. Cancel-safe: dropping the future loses nothing.
    fn next(&mut self) -> impl Future<Output = Result<Batch, SourceError>> + Send;
}

/// What a watch delivers.
#[derive(Debug)]
enum Batch {
    /// The watch is established: etcd answered it.
    Started,
    /// Changes in etcd's order. Events of one revision come in one batch.
    Events(Vec<Event>),
    /// Every event up to this revision was delivered.
    Progress(i64),
    /// etcd's history no longer holds the events after `held`: list again.
    Relist {
        /// For the log: why.
        why: &'static str,
        /// The revision asked for.
        held: i64,
        /// The oldest revision etcd still holds, or 0 if it did not say.
        oldest: i64,
    },
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    /// The revision (v2: index) of the change.
    revision: i64,
    /// The full key.
    key: String,
    /// What happened to it.
    change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// The key now holds this value.
    Put(Vec<u8>),
    /// The key is gone.
    Delete,
    /// The key and every key under `key/` are gone (a v2 directory).
    DeleteTree,
}

/// Runs the source until `shutdown` flips to true, publishing on `tx`.
pub async fn run(
    cfg: EtcdSettings,
    resync_interval: Duration,
    max_backoff: Duration,
    tx: watch::Sender<SourceState>,
    shutdown: watch::Receiver<bool>,
) {
    match cfg.api {
        EtcdApi::V3 => {
            Runner::<etcd3::Etcd3>::new(cfg, resync_interval, max_backoff, tx)
                .run(shutdown)
                .await
        }
        EtcdApi::V2 => {
            Runner::<etcd2::Etcd2>::new(cfg, resync_interval, max_backoff, tx)
                .run(shutdown)
                .await
        }
    }
}

/// Connects and lists once, retrying with backoff until `timeout` (for `once`, `check`, `render`).
/// Refused credentials or permissions end it at once; otherwise the error at the deadline is the
/// last real one seen, not only "no answer".
pub async fn fetch_once(cfg: &EtcdSettings, timeout: Duration) -> Result<Snapshot, SourceError> {
    match cfg.api {
        EtcdApi::V3 => fetch_with::<etcd3::Etcd3>(cfg, timeout).await,
        EtcdApi::V2 => fetch_with::<etcd2::Etcd2>(cfg, timeout).await,
    }
}

async fn fetch_with<S: Store>(
    cfg: &EtcdSettings,
    timeout: Duration,
) -> Result<Snapshot, SourceError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut last: Option<SourceError> = None;
    loop {
        let attempt = async {
            let mut store = S::connect(cfg).await?;
            store.list().await
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(s)) => {
                if s.kvs.is_empty() {
                    tracing::warn!(prefix = %cfg.prefix(), "no keys under the prefix: {}", S::EMPTY_HINT);
                }
                return Ok(s);
            }
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

/// The state of a running source: the store, the view it keeps current, and the outage.
struct Runner<S> {
    cfg: EtcdSettings,
    prefix: String,
    resync_interval: Duration,
    backoff: Backoff,
    tx: watch::Sender<SourceState>,
    store: Option<S>,
    /// The view, once listed: what the published snapshot holds too.
    snap: Option<Snapshot>,
    need_list: bool,
    /// Since when etcd has been failing, if it is.
    down_since: Option<Instant>,
    last_reminder: Instant,
    warned_empty: bool,
}

impl<S: Store> Runner<S> {
    fn new(
        cfg: EtcdSettings,
        resync_interval: Duration,
        max_backoff: Duration,
        tx: watch::Sender<SourceState>,
    ) -> Self {
        Runner {
            prefix: cfg.prefix(),
            cfg,
            resync_interval,
            backoff: Backoff::new(Duration::from_millis(100), max_backoff),
            tx,
            store: None,
            snap: None,
            need_list: true,
            down_since: None,
            last_reminder: Instant::now(),
            warned_empty: false,
        }
    }

    /// One session after another, backing off after each failure, until shutdown.
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let err = tokio::select! {
                r = self.session() => match r {
                    Err(e) => e,
                    Ok(never) => match never {},
                },
                _ = shutdown.changed() => return,
            };
            self.failed(err);
            if sleep_or_shutdown(self.backoff.next_delay(), &mut shutdown).await {
                return;
            }
        }
    }

    /// Connects if needed, lists if needed, then watches, applying what arrives, until something
    /// fails: it returns only with the failure.
    async fn session(&mut self) -> Result<Infallible, SourceError> {
        if self.store.is_none() {
            self.store = Some(S::connect(&self.cfg).await?);
        }
        let store = self.store.as_mut().expect("connected above");
        loop {
            if self.need_list || self.snap.is_none() {
                let s = store.list().await?;
                self.need_list = false;
                tracing::info!(revision = s.revision, keys = s.kvs.len(), prefix = %self.prefix, "listed");
                if s.kvs.is_empty() && !self.warned_empty {
                    self.warned_empty = true;
                    warn_empty::<S>(&self.cfg, &self.prefix);
                }
                self.snap = Some(s);
                publish(&self.tx, self.snap.as_ref(), true);
            }
            let current = self.snap.as_mut().expect("listed above");
            let mut watch = store.watch(current.revision).await?;
            let period = nonzero(self.resync_interval);
            let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            // Watch until etcd's history no longer reaches back to the view: then list again.
            loop {
                tokio::select! {
                    batch = watch.next() => match batch? {
                        Batch::Started => {
                            if let Some(since) = self.down_since.take() {
                                tracing::info!(outage = ?since.elapsed(), revision = current.revision, "etcd reachable again: watching");
                            } else {
                                tracing::debug!(revision = current.revision, "watching");
                            }
                            self.backoff.reset();
                            publish(&self.tx, Some(current), true);
                        }
                        Batch::Events(events) => {
                            let changes = apply(current, &self.prefix, events);
                            if !changes.is_empty() {
                                publish_changes(&self.tx, changes, current);
                            }
                        }
                        Batch::Progress(revision) => {
                            current.revision = current.revision.max(revision);
                        }
                        Batch::Relist { why, held, oldest } => {
                            tracing::warn!(revision = current.revision, asked = held, oldest, "{why}: re-listing");
                            self.need_list = true;
                            self.tx.send_modify(|s| s.relists += 1);
                            break;
                        }
                    },
                    _ = resync.tick(), if !self.resync_interval.is_zero() => {
                        match store.list().await {
                            Ok(fresh) if fresh.revision >= current.revision => {
                                if fresh.kvs != current.kvs {
                                    tracing::warn!(revision = fresh.revision, "periodic resync found a difference: taking the listed view");
                                    self.tx.send_modify(|s| s.relists += 1);
                                    *current = fresh;
                                    publish(&self.tx, Some(current), true);
                                } else {
                                    current.revision = fresh.revision;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "periodic resync failed; the watch goes on"),
                        }
                    }
                }
            }
        }
    }

    /// Records a failed session: the first failure is an error; while it lasts, a reminder every
    /// 30 s rather than one line per retry.
    fn failed(&mut self, err: SourceError) {
        if S::RELIST_AFTER_FAILURE {
            self.need_list = true;
        }
        // The next session connects afresh: a client kept from before the failure can fail once
        // more on its own cached state (a name that did not resolve while the network was cut),
        // which costs one more backoff step after etcd is back.
        self.store = None;
        match self.down_since {
            None => {
                self.down_since = Some(Instant::now());
                self.last_reminder = Instant::now();
                tracing::error!(error = %err, "etcd unreachable: not ready; keeping the last good files");
            }
            Some(since) if self.last_reminder.elapsed() >= Duration::from_secs(30) => {
                self.last_reminder = Instant::now();
                tracing::warn!(error = %err, down_for = ?since.elapsed(), "etcd still unreachable; retrying");
            }
            Some(_) => tracing::debug!(error = %err, "etcd still unreachable"),
        }
        let err = Arc::new(err);
        self.tx.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(err);
        });
    }
}

/// Says once that the followed prefix holds no key. For one scope the message names the
/// scopes that exist under the namespace, in both etcd APIs, and the likely one, as `once`
/// does; they are looked up off the watch loop, each API within 2 s.
fn warn_empty<S: Store>(cfg: &EtcdSettings, prefix: &str) {
    if cfg.single_scope().is_none() {
        tracing::warn!(prefix = %prefix, "no keys under the prefix: {}", S::EMPTY_HINT);
        return;
    }
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let found = scopes::look_around(&cfg, Duration::from_secs(2)).await;
        tracing::warn!(prefix = %cfg.prefix(), "{}", scopes::empty_scope_message(&cfg, &found));
    });
}

/// Applies one batch of events to `current` and returns the changes to publish. Events at or
/// below the revision held when the batch arrived are skipped: the view has them (after a
/// re-list or a resync). The bound is taken once per batch: the events of one revision (a range
/// delete, a lease expiring under a member and the leader key) share it.
fn apply(
    current: &mut Snapshot,
    prefix: &str,
    events: Vec<Event>,
) -> Vec<(String, Option<Vec<u8>>)> {
    let held = current.revision;
    let mut changes = Vec::new();
    for ev in events {
        if ev.revision <= held {
            continue;
        }
        current.revision = current.revision.max(ev.revision);
        match ev.change {
            Change::Put(value) => {
                if ev.key.starts_with(prefix) {
                    current.put(ev.key.clone(), value.clone());
                    changes.push((ev.key, Some(value)));
                }
            }
            Change::Delete => {
                if current.kvs.contains_key(&ev.key) {
                    current.delete(&ev.key);
                    changes.push((ev.key, None));
                }
            }
            Change::DeleteTree => {
                let under = format!("{}/", ev.key.trim_end_matches('/'));
                let gone: Vec<String> = current
                    .kvs
                    .range(under.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(&under))
                    .chain(current.kvs.get_key_value(&ev.key).map(|(k, _)| k))
                    .cloned()
                    .collect();
                for key in gone {
                    current.delete(&key);
                    changes.push((key, None));
                }
            }
        }
    }
    changes
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
                s.routing += 1;
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
        if changes.iter().any(|(key, _)| is_routing_key(key)) {
            s.routing += 1;
        }
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

/// Whether `key` is a cluster's (or Citus group's) `leader` or `failover` key: who takes writes.
fn is_routing_key(key: &str) -> bool {
    key.ends_with("/leader") || key.ends_with("/failover")
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

    fn ev(revision: i64, key: &str, change: Change) -> Event {
        Event {
            revision,
            key: key.into(),
            change,
        }
    }

    #[test]
    fn events_the_view_holds_are_skipped_and_directories_delete_what_is_under_them() {
        let mut s = Snapshot::new();
        for k in ["leader", "members/a", "members/b", "config"] {
            s.put(format!("/service/s/{k}"), b"x".to_vec());
        }
        s.put("/service/s2/leader".into(), b"y".to_vec());
        s.revision = 10;
        let changes = apply(
            &mut s,
            "/service/s/",
            vec![
                // Already in the view (listed at 10).
                ev(9, "/service/s/members/c", Change::Put(b"old".to_vec())),
                ev(11, "/service/s/members", Change::DeleteTree),
                // Not under the prefix: a v2 watch of the directory sees the directory itself.
                ev(12, "/service/s", Change::Put(Vec::new())),
                ev(13, "/service/s/members/c", Change::Put(b"new".to_vec())),
                ev(14, "/service/s/nothing", Change::Delete),
            ],
        );
        assert_eq!(
            changes,
            vec![
                ("/service/s/members/a".to_string(), None),
                ("/service/s/members/b".to_string(), None),
                ("/service/s/members/c".to_string(), Some(b"new".to_vec())),
            ]
        );
        assert_eq!(s.revision, 14);
        assert_eq!(
            s.kvs.keys().collect::<Vec<_>>(),
            [
                "/service/s/config",
                "/service/s/leader",
                "/service/s/members/c",
                "/service/s2/leader"
            ]
        );
        // The whole namespace deleted at once (v2: `rm -r /service`).
        let changes = apply(
            &mut s,
            "/service/s/",
            vec![ev(15, "/service", Change::DeleteTree)],
        );
        assert_eq!(changes.len(), 4);
        assert!(s.kvs.is_empty());
    }
}
