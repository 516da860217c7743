//! The HTTP endpoint (off unless `http.listen` is set): `/healthz` (alive), `/readyz` (etcd
//! reachable, watch current, last pass good), `/metrics` (Prometheus text) and `/status` (JSON).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::status::Status;

/// Binds `addr` and serves until the task is dropped. Binding errors are returned at once so a
/// mistyped address fails the start.
pub async fn bind(
    addr: &str,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz, /metrics, /status");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = Arc::clone(&status);
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let status = Arc::clone(&status);
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, Infallible>(handle(&req, &status, &metrics)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

fn handle(
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
    let st = status.lock().expect("status lock").snapshot();
    match req.uri().path() {
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
            "not found: try /healthz, /readyz, /metrics, /status\n".into(),
        ),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
