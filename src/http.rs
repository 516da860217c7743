//! The HTTP endpoint (off unless `http.listen` is set): `/healthz` (alive), `/readyz` (etcd
//! reachable, watch current, last pass good), `/metrics` (Prometheus text), `/status` (JSON)
//! and `/`, a status page for people (the same data as `haconfd status`).
//! Read-only: GET and HEAD only, one request per connection, connections capped and timed out so
//! that no client can starve the pipeline of descriptors or CPU (docs/SECURITY.md).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::status::Status;

/// Connections open at once, at most. Probes and scrapers need a handful; the cap keeps a flood
/// of idle connections from using up the descriptors the pipeline needs (etcd, staged files,
/// checks, sockets). It shrinks further under a low open-file limit, see [`connection_cap`].
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection lives, request and answer together. Each connection serves one
/// request (no keep-alive), so this also bounds a slow reader of a large `/status`.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. EMFILE). The refused connection stays in the kernel's
/// backlog, so without a pause the loop retries it at once, forever, at a full core.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Raises the soft open-file limit to the hard one (systemd's default soft limit is 1024, the
/// hard one far higher) and returns the soft limit now in force. Failure leaves the limit as it
/// was: the connection cap is sized from whatever is in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::debug!(from = soft, to = hard, "raised the open-file limit");
        return hard;
    }
    soft
}

/// The connection cap for an open-file limit: [`MAX_CONNECTIONS`], but never more than a quarter
/// of the limit, so that at least three quarters stay for the pipeline.
pub fn connection_cap(fd_limit: u64) -> usize {
    let quarter = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX);
    quarter.clamp(4, MAX_CONNECTIONS)
}

/// The open connections, oldest first, each with the way to close it.
#[derive(Default)]
struct Open {
    next_id: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

/// Binds `addr` and serves until the task is dropped. Binding errors are returned at once so a
/// mistyped address fails the start.
///
/// At most [`connection_cap`] connections are open at once: a new one closes the oldest, so a
/// pile of idle or slow clients can never lock out a probe (a well-behaved client is done in
/// milliseconds, so the oldest connection is the one doing nothing).
pub async fn bind(
    addr: &str,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let cap = connection_cap(raise_fd_limit());
    tracing::info!(
        address = %listener.local_addr()?,
        max_connections = cap,
        "serving /, /healthz, /readyz, /metrics, /status"
    );
    Ok(tokio::spawn(async move {
        let open = Arc::new(Mutex::new(Open::default()));
        let mut failing: u64 = 0;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Once per episode: a line per failure would flood the log at 10 a second.
                    if failing == 0 {
                        tracing::warn!(error = %e, pause = ?ACCEPT_PAUSE, "http: cannot accept a connection; pausing between attempts");
                    }
                    failing += 1;
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            if failing > 0 {
                tracing::info!(
                    failed_attempts = failing,
                    "http: accepting connections again"
                );
                failing = 0;
            }
            let (close_tx, close_rx) = oneshot::channel();
            let id = {
                let mut o = open.lock().expect("http connection table");
                if o.conns.len() >= cap {
                    // Dropping the sender wakes the oldest connection's task, which closes it.
                    o.conns.pop_first();
                }
                let id = o.next_id;
                o.next_id += 1;
                o.conns.insert(id, close_tx);
                id
            };
            let status = Arc::clone(&status);
            let metrics = Arc::clone(&metrics);
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                tokio::select! {
                    _ = serve(stream, status, metrics) => {}
                    _ = close_rx => {}
                }
                open.lock()
                    .expect("http connection table")
                    .conns
                    .remove(&id);
            });
        }
    }))
}

/// Serves one request on `stream` within [`CONNECTION_TIMEOUT`].
async fn serve(stream: TcpStream, status: Arc<Mutex<Status>>, metrics: Arc<Metrics>) {
    let svc = hyper::service::service_fn(move |req| {
        let status = Arc::clone(&status);
        let metrics = Arc::clone(&metrics);
        async move { Ok::<_, Infallible>(handle(&req, &status, &metrics).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

async fn handle(
    req: &Request<Incoming>,
    status: &Mutex<Status>,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD\n".into(),
        );
    }
    let mut st = status.lock().expect("status lock").snapshot();
    if matches!(req.uri().path(), "/status" | "/") {
        // HAProxy's live state of each cluster's servers: at most four readings a second per
        // stats socket, each bounded (a hung socket costs this request 0.8 s at most).
        st.read_haproxy().await;
    }
    match req.uri().path() {
        "/" => page(&st, req.uri().query()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if st.ready() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                let why = if !st.etcd_connected {
                    format!(
                        "not ready: etcd not reachable ({})\n",
                        st.etcd_error.as_deref().unwrap_or("connecting")
                    )
                } else {
                    match &st.last_error {
                        Some(e) => format!("not ready: last pass failed: {e}\n"),
                        None => "not ready: no pass yet\n".to_owned(),
                    }
                };
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(&st),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&st).unwrap_or_default() + "\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /healthz, /readyz, /metrics, /status\n".into(),
        ),
    }
}

/// The status page: the overview `haconfd status` prints, as HTML with no script and no
/// external asset (its Content-Security-Policy lets the browser load nothing but the page and
/// its inline style). `?refresh=N` reloads it every N seconds (1 to 3600).
fn page(st: &Status, query: Option<&str>) -> Response<Full<Bytes>> {
    let refresh = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("refresh="))
        .and_then(|v| v.parse::<u32>().ok())
        .map(|n| n.clamp(1, 3600));
    let html = crate::overview::Overview::from(st).html(refresh);
    let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", html);
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        r.headers_mut()
            .insert(k, hyper::header::HeaderValue::from_static(v));
    }
    r
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_three_quarters_of_the_descriptors_to_the_pipeline() {
        assert_eq!(connection_cap(1024), MAX_CONNECTIONS);
        assert_eq!(connection_cap(256), 64);
        assert_eq!(connection_cap(100), 25);
        assert_eq!(connection_cap(8), 4);
    }
}
