//! The v3 store (Patroni's `etcd3:` section): gRPC through etcd-client. Lists the prefix in pages
//! at one revision; watches it from revision + 1 with progress notifications; a watch canceled
//! for compaction asks for a re-list, and after a broken stream the watch resumes from the last
//! applied revision (etcd keeps history until it is compacted). gRPC keepalive detects a hung
//! etcd on an open watch.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KvClient, TlsOptions,
    WatchOptions, WatchStream as Stream,
};

use super::{Batch, Change, Event, SourceError, Store, WatchStream, MAX_ANSWER};
use crate::snapshot::Snapshot;
use crate::source::EtcdSettings;

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

/// The largest single gRPC message accepted from etcd (list pages and watch responses).
const MAX_MESSAGE: usize = MAX_ANSWER;

/// Builds an etcd client from the settings (TLS, auth, keepalive, timeouts).
async fn connect(cfg: &EtcdSettings) -> Result<Client, SourceError> {
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
async fn list(client: &mut Client, cfg: &EtcdSettings) -> Result<Snapshot, SourceError> {
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

/// The v3 store: one etcd-client `Client` (it reconnects by itself, across the endpoints).
pub(super) struct Etcd3 {
    client: Client,
    cfg: EtcdSettings,
}

impl Store for Etcd3 {
    type Watch = Etcd3Watch;
    // etcd keeps v3 history until it is compacted: after an outage the watch resumes from the
    // held revision, and a compaction meanwhile cancels it with a re-list.
    const RELIST_AFTER_FAILURE: bool = false;
    const EMPTY_HINT: &'static str = "if Patroni is configured with its `etcd:` section (the v2 API), its keys are in etcd's v2 store, which the v3 API does not show: set etcd.api = \"v2\"";

    async fn connect(cfg: &EtcdSettings) -> Result<Self, SourceError> {
        Ok(Etcd3 {
            client: connect(cfg).await?,
            cfg: cfg.clone(),
        })
    }

    async fn list(&mut self) -> Result<Snapshot, SourceError> {
        list(&mut self.client, &self.cfg).await
    }

    async fn watch(&mut self, after: i64) -> Result<Etcd3Watch, SourceError> {
        let prefix = self.cfg.prefix();
        let failed = |message: String| SourceError::Watch {
            prefix: prefix.clone(),
            endpoints: self.cfg.endpoints.join(","),
            message,
        };
        let mut watch_client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1)
            .with_progress_notify();
        let stream = tokio::time::timeout(
            self.cfg.request_timeout,
            watch_client.watch(prefix.as_bytes(), Some(opts)),
        )
        .await
        .map_err(|_| failed(format!("no answer within {:?}", self.cfg.request_timeout)))?
        .map_err(|e| failed(describe(&e)))?;
        Ok(Etcd3Watch {
            stream,
            held: after,
            prefix: prefix.clone(),
            endpoints: self.cfg.endpoints.join(","),
        })
    }
}

/// An open v3 watch stream.
pub(super) struct Etcd3Watch {
    stream: Stream,
    /// The revision asked for, for the log of a compaction.
    held: i64,
    prefix: String,
    endpoints: String,
}

impl WatchStream for Etcd3Watch {
    async fn next(&mut self) -> Result<Batch, SourceError> {
        let failed = |message: String| SourceError::Watch {
            prefix: self.prefix.clone(),
            endpoints: self.endpoints.clone(),
            message,
        };
        // `message` is cancel-safe: a response is either returned or still in the stream.
        let resp = match self.stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(failed("the watch stream was closed by etcd".into())),
            Err(e) => return Err(failed(describe(&e))),
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Ok(Batch::Relist {
                    why: "watch revision was compacted",
                    held: self.held,
                    oldest: resp.compact_revision(),
                });
            }
            return Err(failed(format!(
                "the watch was canceled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        if resp.created() {
            return Ok(Batch::Started);
        }
        if resp.events().is_empty() {
            // Progress notification: every event up to this revision was sent.
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(Batch::Progress(revision));
        }
        let events = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                Some(Event {
                    revision: kv.mod_revision(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    change: match ev.event_type() {
                        EventType::Put => Change::Put(kv.value().to_vec()),
                        EventType::Delete => Change::Delete,
                    },
                })
            })
            .collect();
        Ok(Batch::Events(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/service/demo/"), b"/service/demo0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
