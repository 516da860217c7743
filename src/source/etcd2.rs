//! The v2 store (Patroni's `etcd:` section): etcd's v2 HTTP/JSON API, served by etcd 3.4 and 3.5
//! with `--enable-v2` (etcd 3.6 removed it). Its keys live in a store of their own that the v3
//! API does not show.
//!
//! - **List**: `GET /v2/keys/<namespace>/<scope>?recursive=true&quorum=true` (a linearizable
//!   read), flattened to the same full keys Patroni's v3 section writes; its revision is the
//!   answer's `X-Etcd-Index`. An absent directory is an empty view at that index.
//! - **Watch**: long polls, `?wait=true&recursive=true&waitIndex=<index + 1>`; each answers one
//!   event (its `modifiedIndex` is the revision), and the next asks for the index after it. etcd
//!   answers the headers of a long poll at once and the body when an event comes, so a poll lasts
//!   at most `etcd.keepalive_interval`: a hung etcd is noticed when the next poll's headers do not
//!   come within `etcd.request_timeout`. A poll that ends without an event is re-issued from the
//!   index after its `X-Etcd-Index` (the store's index when etcd took it, having found no event
//!   under the prefix up to there), so a quiet scope's watch index keeps up with a busy etcd.
//! - **Gaps**: v2 keeps only the last 1000 events. A poll from an index older than that is
//!   answered with errorCode 401 ("event index cleared"), and the view is listed again; after a
//!   lost connection it is listed again too.
//! - Several endpoints (a list tries each in turn and the watch follows the one that answered),
//!   TLS with rustls (the CA, or the system's bundle; client certificates; `tls.domain`), and
//!   basic auth.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Batch, Change, Event, SourceError, Store, WatchStream, MAX_ANSWER};
use crate::snapshot::Snapshot;
use crate::source::EtcdSettings;

/// Where a v2 client finds the system's trust roots when `etcd.tls.ca` is not set (Debian's
/// `ca-certificates`).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The v2 store: the endpoints and how to reach them. Connections are made per request (a list)
/// or per watch and kept while they answer.
pub(super) struct Etcd2 {
    http: Arc<Http>,
    /// The endpoint that answered last: lists start there, watches use it.
    current: usize,
}

impl Store for Etcd2 {
    type Watch = Etcd2Watch;
    // v2 keeps 1000 events only, and a reconnect may land on another member: list again.
    const RELIST_AFTER_FAILURE: bool = true;
    const EMPTY_HINT: &'static str = "if Patroni is configured with its `etcd3:` section (the v3 API), its keys are in etcd's v3 store, which the v2 API does not show: set etcd.api = \"v3\"";

    async fn connect(cfg: &EtcdSettings) -> Result<Self, SourceError> {
        Ok(Etcd2 {
            http: Arc::new(Http::new(cfg)?),
            current: 0,
        })
    }

    async fn list(&mut self) -> Result<Snapshot, SourceError> {
        let http = &self.http;
        let n = http.endpoints.len();
        let mut last = String::new();
        let mut no_v2 = None;
        for i in 0..n {
            let at = (self.current + i) % n;
            let ep = &http.endpoints[at];
            let path = format!("{}?recursive=true&quorum=true", http.dir_path);
            match http.get(ep, &path, http.cfg.request_timeout).await {
                Ok(answer) => match answer.status {
                    StatusCode::OK => {
                        let snap = http
                            .snapshot(&answer)
                            .map_err(|message| SourceError::List {
                                prefix: http.prefix.clone(),
                                endpoints: ep.url.clone(),
                                message,
                            })?;
                        self.current = at;
                        return Ok(snap);
                    }
                    _ => match http.refusal(&answer, ep) {
                        Refusal::Denied(e) => return Err(e),
                        Refusal::NoV2 => {
                            no_v2.get_or_insert_with(|| ep.url.clone());
                            last = format!("{}: 404 on /v2/keys (no v2 API)", ep.url);
                        }
                        Refusal::NotFound(index) => {
                            // No directory yet: an empty scope, current at etcd's index.
                            self.current = at;
                            return Ok(Snapshot {
                                revision: index,
                                ..Snapshot::default()
                            });
                        }
                        Refusal::Other(message) => last = format!("{}: {message}", ep.url),
                    },
                },
                Err(message) => last = format!("{}: {message}", ep.url),
            }
        }
        if let Some(endpoint) = no_v2 {
            return Err(SourceError::NoV2 { endpoint });
        }
        Err(SourceError::List {
            prefix: http.prefix.clone(),
            endpoints: http.endpoints_csv(),
            message: last,
        })
    }

    async fn watch(&mut self, after: i64) -> Result<Etcd2Watch, SourceError> {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(watch_loop(
            Arc::clone(&self.http),
            self.current,
            after + 1,
            tx,
        ));
        Ok(Etcd2Watch { rx, task })
    }
}

/// An open v2 watch: a task issuing the long polls, handing batches over a channel (so that
/// `next` is cancel-safe whatever state a poll is in). Dropping it stops the task.
pub(super) struct Etcd2Watch {
    rx: mpsc::Receiver<Result<Batch, SourceError>>,
    task: JoinHandle<()>,
}

impl Drop for Etcd2Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WatchStream for Etcd2Watch {
    async fn next(&mut self) -> Result<Batch, SourceError> {
        match self.rx.recv().await {
            Some(b) => b,
            // The task ended without saying why: it only ends after sending an error.
            None => Err(SourceError::Watch {
                prefix: String::new(),
                endpoints: String::new(),
                message: "the watch task stopped".into(),
            }),
        }
    }
}

/// Issues long polls from `wait_index` on endpoint `at` until one fails, sending what they answer.
async fn watch_loop(
    http: Arc<Http>,
    at: usize,
    mut wait_index: i64,
    tx: mpsc::Sender<Result<Batch, SourceError>>,
) {
    let ep = &http.endpoints[at];
    let failed = |message: String| SourceError::Watch {
        prefix: http.prefix.clone(),
        endpoints: ep.url.clone(),
        message,
    };
    let mut conn: Option<Conn> = None;
    let mut started = false;
    loop {
        let path = format!(
            "{}?wait=true&recursive=true&waitIndex={wait_index}",
            http.dir_path
        );
        let poll_end = Instant::now() + http.cfg.keepalive_interval;
        let (c, resp) = match long_poll(&http, ep, conn.take(), &path).await {
            Ok(r) => r,
            Err(message) => {
                let _ = tx.send(Err(failed(message))).await;
                return;
            }
        };
        let status = resp.status();
        if status != StatusCode::OK {
            let _ = tx
                .send(refused_poll(&http, ep, resp, wait_index).await)
                .await;
            return;
        }
        let store_index = etcd_index(&resp);
        if !started {
            started = true;
            if tx.send(Ok(Batch::Started)).await.is_err() {
                return;
            }
        }
        // The body comes with the event; the poll ends at `poll_end` without one. Dropping the
        // unfinished answer closes its connection.
        let body = match tokio::time::timeout_at(
            poll_end,
            Limited::new(resp.into_body(), MAX_ANSWER).collect(),
        )
        .await
        {
            Err(_) => {
                // Nothing under the prefix up to the index etcd had when it took the poll: the
                // next poll asks from the index after it, so that the writes of other prefixes
                // in the meantime do not push the watch index out of etcd's history. An event
                // cut off in transit is after that index, and answered again from the history.
                if let Some(index) = store_index.filter(|i| *i >= wait_index) {
                    wait_index = index + 1;
                    if tx.send(Ok(Batch::Progress(index))).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(Err(e)) => {
                let _ = tx
                    .send(Err(failed(format!("the long poll broke: {e}"))))
                    .await;
                return;
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
        conn = Some(c);
        let (batch, index) = match event_of(&http.prefix, &body) {
            Ok(b) => b,
            Err(message) => {
                let _ = tx.send(Err(failed(message))).await;
                return;
            }
        };
        wait_index = index + 1;
        if tx.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}

/// A long poll's `X-Etcd-Index`: the store's index when etcd took the poll. etcd had looked
/// through its history from `waitIndex` up to this index before it sent the headers, so a poll
/// that ends without an event says that nothing under the prefix changed up to it.
fn etcd_index(resp: &hyper::Response<hyper::body::Incoming>) -> Option<i64> {
    resp.headers()
        .get("x-etcd-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Sends one long poll on `conn` (when it is still open; else on a new connection), bounded by
/// `request_timeout` until its answer's head arrives.
async fn long_poll(
    http: &Http,
    ep: &Endpoint,
    conn: Option<Conn>,
    path: &str,
) -> Result<(Conn, hyper::Response<hyper::body::Incoming>), String> {
    let head = tokio::time::timeout(http.cfg.request_timeout, async {
        let mut c = match conn {
            Some(mut c) => {
                if c.reusable().await {
                    c
                } else {
                    http.open(ep).await?
                }
            }
            None => http.open(ep).await?,
        };
        let resp = c
            .sender
            .send_request(http.request(ep, path)?)
            .await
            .map_err(|e| format!("long poll: {e}"))?;
        Ok::<_, String>((c, resp))
    })
    .await;
    head.unwrap_or_else(|_| {
        Err(format!(
            "no answer to a long poll within {:?}",
            http.cfg.request_timeout
        ))
    })
}

/// What a long poll that did not answer 200 means: a re-list when the watch index fell out of
/// etcd's event history, else the error.
async fn refused_poll(
    http: &Http,
    ep: &Endpoint,
    resp: hyper::Response<hyper::body::Incoming>,
    wait_index: i64,
) -> Result<Batch, SourceError> {
    let status = resp.status();
    let failed = |message: String| SourceError::Watch {
        prefix: http.prefix.clone(),
        endpoints: ep.url.clone(),
        message,
    };
    let answer = match tokio::time::timeout(http.cfg.request_timeout, Answer::read(resp)).await {
        Ok(Ok(a)) => a,
        Ok(Err(message)) => return Err(failed(message)),
        Err(_) => return Err(failed(format!("{status} without a whole body"))),
    };
    match answer.etcd_error() {
        Some(e) if e.error_code == EVENT_INDEX_CLEARED => Ok(Batch::Relist {
            why: "the watch index was cleared from etcd's v2 event history (it keeps the last 1000 events)",
            held: wait_index - 1,
            oldest: e.oldest_index().unwrap_or(0),
        }),
        _ => Err(match http.refusal(&answer, ep) {
            Refusal::Denied(e) => e,
            Refusal::NoV2 => SourceError::NoV2 {
                endpoint: ep.url.clone(),
            },
            Refusal::NotFound(_) => failed(format!("{status}")),
            Refusal::Other(message) => failed(message),
        }),
    }
}

/// The batch a long poll's answer carries (an event under the prefix, or progress past one
/// elsewhere), and its index.
fn event_of(prefix: &str, body: &[u8]) -> Result<(Batch, i64), String> {
    let action = serde_json::from_slice::<Action>(body)
        .map_err(|e| format!("a long poll answered {e}: {}", snippet(body)))?;
    let (event, index) = action.event(prefix).ok_or_else(|| {
        format!(
            "a long poll answered an event without a node: {}",
            snippet(body)
        )
    })?;
    let batch = match event {
        Some(ev) => Batch::Events(vec![ev]),
        None => Batch::Progress(index),
    };
    Ok((batch, index))
}

/// etcd's v2 errorCode for a watch index older than the event history holds.
const EVENT_INDEX_CLEARED: i64 = 401;
/// etcd's v2 errorCode for an absent key.
const KEY_NOT_FOUND: i64 = 100;

/// One endpoint, parsed.
struct Endpoint {
    /// As configured, for messages.
    url: String,
    tls: bool,
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
}

/// What the store and its watches share: endpoints, TLS, credentials, the paths of the prefix.
struct Http {
    cfg: EtcdSettings,
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Basic ...` when etcd.username is set.
    authorization: Option<String>,
    /// `/service/demo/`.
    prefix: String,
    /// `/v2/keys/service/demo`, each segment percent-encoded.
    dir_path: String,
}

impl Http {
    fn new(cfg: &EtcdSettings) -> Result<Http, SourceError> {
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|raw| {
                let url = url::Url::parse(raw).map_err(|e| SourceError::Connect {
                    endpoints: raw.clone(),
                    message: e.to_string(),
                })?;
                let host = url
                    .host_str()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = url.port_or_known_default().unwrap_or(2379);
                let authority = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                Ok(Endpoint {
                    url: raw.clone(),
                    tls: url.scheme() == "https",
                    host,
                    port,
                    authority,
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        let tls = if cfg.tls.is_some() || endpoints.iter().any(|e| e.tls) {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(cfg)?)))
        } else {
            None
        };
        let authorization = cfg.auth.as_ref().map(|(user, password)| {
            let b64 = base64::engine::general_purpose::STANDARD;
            format!("Basic {}", b64.encode(format!("{user}:{password}")))
        });
        let prefix = cfg.prefix();
        let mut dir = url::Url::parse("http://etcd/v2/keys").expect("a valid URL");
        dir.path_segments_mut()
            .expect("an http URL has a path")
            .extend(prefix.split('/').filter(|s| !s.is_empty()));
        let dir_path = dir.path().to_owned();
        Ok(Http {
            cfg: cfg.clone(),
            endpoints,
            tls,
            authorization,
            prefix,
            dir_path,
        })
    }

    fn endpoints_csv(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    /// A new connection to `ep` (TCP, TLS if https, HTTP/1.1), within `connect_timeout`.
    async fn open(&self, ep: &Endpoint) -> Result<Conn, String> {
        let work = async {
            let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match (&self.tls, ep.tls) {
                (Some(tls), true) => {
                    let name = self.cfg.tls.as_ref().and_then(|t| t.domain.clone());
                    let name = ServerName::try_from(name.unwrap_or_else(|| ep.host.clone()))
                        .map_err(|e| format!("TLS server name: {e}"))?;
                    Box::new(
                        tls.connect(name, tcp)
                            .await
                            .map_err(|e| format!("TLS: {e}"))?,
                    )
                }
                _ => Box::new(tcp),
            };
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            Ok::<_, String>(Conn {
                sender,
                task: tokio::spawn(async move {
                    let _ = conn.await;
                }),
            })
        };
        tokio::time::timeout(self.cfg.connect_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no connection within {:?}",
                    self.cfg.connect_timeout
                ))
            })
    }

    fn request(&self, ep: &Endpoint, path: &str) -> Result<Request<Empty<Bytes>>, String> {
        let mut req = Request::get(path).header(hyper::header::HOST, &ep.authority);
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        req.body(Empty::new()).map_err(|e| format!("request: {e}"))
    }

    /// One GET on a new connection, answered whole within `timeout`.
    async fn get(&self, ep: &Endpoint, path: &str, timeout: Duration) -> Result<Answer, String> {
        let work = async {
            let mut c = self.open(ep).await?;
            let resp = c
                .sender
                .send_request(self.request(ep, path)?)
                .await
                .map_err(|e| format!("request: {e}"))?;
            Answer::read(resp).await
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    /// The snapshot in a list's answer, at its `X-Etcd-Index`.
    fn snapshot(&self, answer: &Answer) -> Result<Snapshot, String> {
        let revision = answer
            .index
            .ok_or("the answer has no X-Etcd-Index header")?;
        let listed: Action = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("the answer is not v2 JSON ({e}): {}", snippet(&answer.body)))?;
        let node = listed.node.ok_or("the answer has no node")?;
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        node.leaves(&self.prefix, &mut snap);
        Ok(snap)
    }

    /// What an answer other than 200 means.
    fn refusal(&self, answer: &Answer, ep: &Endpoint) -> Refusal {
        let e = answer.etcd_error();
        match (answer.status, &e) {
            (StatusCode::NOT_FOUND, Some(e)) if e.error_code == KEY_NOT_FOUND => {
                Refusal::NotFound(answer.index.unwrap_or(e.index))
            }
            // etcd without the v2 API: Go's "404 page not found", not a v2 JSON error.
            (StatusCode::NOT_FOUND, None) => Refusal::NoV2,
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                let message = match &e {
                    Some(e) if e.cause.is_empty() => e.message.clone(),
                    Some(e) => format!("{} ({})", e.message, e.cause),
                    None => format!("{} {}", answer.status, snippet(&answer.body)),
                };
                // etcd's v2 auth answers the same for a wrong password, an unknown user and a
                // role without read permission on the prefix.
                let (what, hint) = match &self.cfg.auth {
                    Some((user, _)) => (
                        format!("reading {} to user {user:?}", self.prefix),
                        " (a wrong password, an unknown user, or no role granting read on the prefix: etcd's v2 auth does not say which; grant it with PUT /v2/auth/roles/<role> {\"grant\":{\"kv\":{\"read\":[\"<prefix>*\"]}}})",
                    ),
                    None => (
                        format!("reading {} without credentials", self.prefix),
                        " (etcd has v2 authentication enabled and its guest role may not read the prefix: set etcd.username and the password)",
                    ),
                };
                Refusal::Denied(SourceError::Denied {
                    endpoints: ep.url.clone(),
                    what,
                    message,
                    hint,
                })
            }
            (status, Some(e)) => Refusal::Other(format!(
                "{status}: {} ({}, errorCode {})",
                e.message, e.cause, e.error_code
            )),
            (status, None) => Refusal::Other(format!("{status}: {}", snippet(&answer.body))),
        }
    }
}

enum Refusal {
    Denied(SourceError),
    NoV2,
    /// The directory does not exist; etcd's index.
    NotFound(i64),
    Other(String),
}

/// The rustls configuration for https endpoints: `etcd.tls.ca` (or the system's bundle) and the
/// client certificate, if any.
fn tls_config(cfg: &EtcdSettings) -> Result<rustls::ClientConfig, SourceError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| SourceError::TlsFile {
            path: p.to_owned(),
            source,
        })
    };
    let invalid = |p: &std::path::Path, message: String| SourceError::TlsInvalid {
        path: p.to_owned(),
        message,
    };
    let certs = |p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, SourceError> {
        let pem = read(p)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(p, format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(invalid(p, "holds no PEM certificate".into()));
        }
        Ok(certs)
    };
    let tls = cfg.tls.clone().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| invalid(ca, format!("not a CA certificate: {e}")))?;
            }
        }
        None => {
            if let Ok(pem) = std::fs::read(SYSTEM_ROOTS) {
                let (_added, _ignored) = roots.add_parsable_certificates(
                    CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Connect {
            endpoints: cfg.endpoints.join(","),
            message: format!("TLS: {e}"),
        })?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert)?;
            let pem = read(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| invalid(key, format!("no PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| invalid(key, format!("does not fit the certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An HTTP/1.1 connection; dropping it closes the connection.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    task: JoinHandle<()>,
}

impl Conn {
    /// Whether the connection can carry the next request (etcd may have closed it).
    async fn reusable(&mut self) -> bool {
        !self.sender.is_closed() && self.sender.ready().await.is_ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A whole answer.
struct Answer {
    status: StatusCode,
    /// `X-Etcd-Index`.
    index: Option<i64>,
    body: Bytes,
}

impl Answer {
    async fn read(resp: hyper::Response<hyper::body::Incoming>) -> Result<Answer, String> {
        let status = resp.status();
        let index = etcd_index(&resp);
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            index,
            body,
        })
    }

    /// The v2 error in the body, if it is one.
    fn etcd_error(&self) -> Option<EtcdError> {
        serde_json::from_slice::<EtcdError>(&self.body).ok()
    }
}

/// A v2 error answer: `{"errorCode":100,"message":"Key not found","cause":"/x","index":7}`.
#[derive(Debug, Deserialize)]
struct EtcdError {
    #[serde(rename = "errorCode")]
    error_code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    cause: String,
    #[serde(default)]
    index: i64,
}

impl EtcdError {
    /// For "event index cleared": the oldest index the history holds, from the cause
    /// `the requested history has been cleared [<oldest>/<asked>]`.
    fn oldest_index(&self) -> Option<i64> {
        let inner = self.cause.rsplit_once('[')?.1.split_once('/')?.0;
        inner.parse().ok()
    }
}

/// A v2 answer: a list (`get`) or one watched event.
#[derive(Debug, Deserialize)]
struct Action {
    action: String,
    node: Option<Node>,
    #[serde(rename = "prevNode")]
    prev_node: Option<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(default)]
    key: String,
    #[serde(default)]
    dir: bool,
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: i64,
}

impl Node {
    /// Puts every value under `prefix` into `snap` (directories hold no value).
    fn leaves(self, prefix: &str, snap: &mut Snapshot) {
        if self.dir {
            for n in self.nodes {
                n.leaves(prefix, snap);
            }
        } else if self.key.starts_with(prefix) {
            snap.put(self.key, self.value.unwrap_or_default().into_bytes());
        }
    }
}

impl Action {
    /// The change a watched event makes, and its index; `None` for the change when it touches
    /// nothing the view holds (a directory made). `None` altogether without a node.
    fn event(self, prefix: &str) -> Option<(Option<Event>, i64)> {
        let node = self.node?;
        let index = node.modified_index;
        let was_dir = self.prev_node.as_ref().is_some_and(|p| p.dir);
        let change = match self.action.as_str() {
            "delete" | "expire" | "compareAndDelete" if node.dir || was_dir => {
                Some(Change::DeleteTree)
            }
            "delete" | "expire" | "compareAndDelete" => Some(Change::Delete),
            // A directory made or its TTL changed: no value. One made where a key was replaces it.
            _ if node.dir => (!was_dir && self.prev_node.is_some()).then_some(Change::Delete),
            // set, create, update, compareAndSwap.
            _ => Some(Change::Put(node.value.unwrap_or_default().into_bytes())),
        };
        // A recursive watch also sees its own directory and the parents of it deleted.
        let relevant = node.key.starts_with(prefix)
            || (matches!(change, Some(Change::DeleteTree))
                && prefix.starts_with(&format!("{}/", node.key.trim_end_matches('/'))));
        let event = change.filter(|_| relevant).map(|change| Event {
            revision: index,
            key: node.key,
            change,
        });
        Some((event, index))
    }
}

/// The start of a body, for messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(json: &str) -> Action {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_listing_flattens_to_patronis_full_keys() {
        let body = br#"{"action":"get","node":{"key":"/service/demo","dir":true,"nodes":[{"key":"/service/demo/members","dir":true,"nodes":[{"key":"/service/demo/members/pg1","value":"{\"a\":1}","expiration":"2026-11-30T15:50:40Z","ttl":30,"modifiedIndex":4,"createdIndex":4}],"modifiedIndex":4,"createdIndex":4},{"key":"/service/demo/leader","value":"pg1","modifiedIndex":5,"createdIndex":5},{"key":"/service/demo/initialize","value":"","modifiedIndex":3,"createdIndex":3}],"modifiedIndex":4,"createdIndex":4}}"#;
        let listed: Action = serde_json::from_slice(body).unwrap();
        let mut snap = Snapshot::default();
        listed.node.unwrap().leaves("/service/demo/", &mut snap);
        assert_eq!(
            snap.kvs.keys().collect::<Vec<_>>(),
            [
                "/service/demo/initialize",
                "/service/demo/leader",
                "/service/demo/members/pg1"
            ]
        );
        assert_eq!(snap.kvs["/service/demo/leader"], b"pg1");
        assert_eq!(snap.kvs["/service/demo/initialize"], b"");
    }

    #[test]
    fn watched_actions_become_changes() {
        let p = "/service/demo/";
        let (ev, index) = action(r#"{"action":"compareAndSwap","node":{"key":"/service/demo/leader","value":"pg1","ttl":30,"modifiedIndex":9,"createdIndex":5},"prevNode":{"key":"/service/demo/leader","value":"pg1","modifiedIndex":7,"createdIndex":5}}"#).event(p).unwrap();
        assert_eq!(index, 9);
        assert_eq!(
            ev,
            Some(Event {
                revision: 9,
                key: "/service/demo/leader".into(),
                change: Change::Put(b"pg1".to_vec())
            })
        );
        // A member's TTL ran out: Patroni's crashed node.
        let (ev, _) = action(r#"{"action":"expire","node":{"key":"/service/demo/members/pg2","modifiedIndex":12,"createdIndex":8},"prevNode":{"key":"/service/demo/members/pg2","value":"{}","modifiedIndex":8,"createdIndex":8}}"#).event(p).unwrap();
        assert_eq!(ev.unwrap().change, Change::Delete);
        // `patronictl remove`: the whole scope, recursively.
        let (ev, _) = action(r#"{"action":"delete","node":{"key":"/service/demo","dir":true,"modifiedIndex":20,"createdIndex":3},"prevNode":{"key":"/service/demo","dir":true,"modifiedIndex":3,"createdIndex":3}}"#).event(p).unwrap();
        assert_eq!(ev.unwrap().change, Change::DeleteTree);
        // The namespace above it.
        let (ev, _) = action(r#"{"action":"delete","node":{"key":"/service","dir":true,"modifiedIndex":21,"createdIndex":2},"prevNode":{"key":"/service","dir":true,"modifiedIndex":2,"createdIndex":2}}"#).event(p).unwrap();
        assert_eq!(ev.unwrap().key, "/service");
        // A directory made holds no value: only the index moves.
        let (ev, index) = action(r#"{"action":"set","node":{"key":"/service/demo/members","dir":true,"modifiedIndex":22,"createdIndex":22}}"#).event(p).unwrap();
        assert_eq!((ev, index), (None, 22));
        // A sibling scope's directory deleted is not ours.
        let (ev, _) = action(r#"{"action":"delete","node":{"key":"/service/demo2","dir":true,"modifiedIndex":23,"createdIndex":2},"prevNode":{"key":"/service/demo2","dir":true,"modifiedIndex":2,"createdIndex":2}}"#).event(p).unwrap();
        assert_eq!(ev, None);
        assert!(action(r#"{"action":"set"}"#).event(p).is_none());
    }

    #[test]
    fn errors_and_their_oldest_index_are_read() {
        let e: EtcdError = serde_json::from_str(r#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [16/6]","index":1015}"#).unwrap();
        assert_eq!(e.error_code, EVENT_INDEX_CLEARED);
        assert_eq!(e.oldest_index(), Some(16));
    }

    #[test]
    fn the_prefix_is_a_percent_encoded_v2_path() {
        let settings = EtcdSettings {
            api: crate::source::EtcdApi::V2,
            endpoints: vec!["http://[::1]:2379".into(), "https://etcd.example".into()],
            namespace: "/ns é".into(),
            clusters: crate::source::Clusters::One("my%scope?".into()),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            auth: Some(("u".into(), "p".into())),
            tls: None,
        };
        let http = Http::new(&settings).unwrap();
        assert_eq!(http.dir_path, "/v2/keys/ns%20%C3%A9/my%25scope%3F");
        assert_eq!(http.endpoints[0].authority, "[::1]:2379");
        assert_eq!(http.endpoints[1].authority, "etcd.example:443");
        assert!(http.tls.is_some());
        assert_eq!(http.authorization.as_deref(), Some("Basic dTpw"));
    }
}
