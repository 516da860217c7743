//! The parts of the daemon a reload may replace: the etcd source task and its channels, and the
//! HTTP endpoint. Dropping either stops it.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::DaemonError;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::source::{self, SourceState};
use crate::status::Status;

/// The etcd source task in force and its channels; dropping it stops the task.
pub(super) struct Source {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    pub(super) rx: watch::Receiver<SourceState>,
    /// What the TLS files held when it started.
    pub(super) tls: Vec<Option<Vec<u8>>>,
}

/// The bytes of the etcd TLS files (CA, certificate, key); unreadable counts as empty, and the
/// source itself reports why it cannot read them.
pub(super) fn tls_contents(s: &Settings) -> Vec<Option<Vec<u8>>> {
    let Some(tls) = &s.etcd.tls else {
        return Vec::new();
    };
    [&tls.ca, &tls.cert, &tls.key]
        .into_iter()
        .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect()
}

impl Source {
    pub(super) fn start(s: &Settings) -> Source {
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
pub(super) struct HttpServer {
    task: JoinHandle<()>,
}

impl HttpServer {
    pub(super) async fn bind(
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
