//! Confirms that a new leader accepts writes, from its Patroni REST API: `GET /primary` answers
//! 200 as soon as the member holds the leader lock (about 0.2 s before PostgreSQL leaves
//! recovery), but the JSON body is built from a query on the node itself, and its `role` is
//! `master` (Patroni 3) or `primary` (Patroni 4) only when `pg_is_in_recovery()` was false, with
//! `xlog.location` (a replica reports `received_location`/`replayed_location` instead). So a 200
//! whose body says primary, with a write location, means the node takes writes now. Its `state`
//! is Patroni's own idea and may lag: after Patroni starts a crashed primary's PostgreSQL again,
//! it says `starting` for up to a `loop_wait` while the query already shows a primary.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::model::Member;

/// The largest body read from Patroni (its `/primary` JSON is well under 4 KiB).
const MAX_BODY: usize = 64 * 1024;

/// What one probe of a member's REST API says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The member holds the leader lock and PostgreSQL is out of recovery: it takes writes.
    Writable,
    /// Not yet, and why (status, role, state), for the log at the deadline.
    NotYet(String),
}

/// Why a member cannot be confirmed through its REST API at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// The API is served over HTTPS, which haconfd does not probe: the member key's role (which
    /// Patroni writes about a second later) confirms it instead.
    #[error("{member}'s REST API is https://{host}:{port}: haconfd probes plain HTTP only; its member key's role confirms it instead")]
    Https {
        /// Member name.
        member: String,
        /// API host.
        host: String,
        /// API port.
        port: u16,
    },
}

/// One `GET /primary` against `member`'s REST API, bounded by `timeout`.
pub async fn probe(member: &Member, timeout: Duration) -> Result<Probe, ConfirmError> {
    let answer = match get(member, "/primary", timeout).await? {
        Ok((status, body)) => verdict(status, &body),
        Err(e) => Probe::NotYet(e),
    };
    Ok(answer)
}

/// One `GET path` against `member`'s REST API (plain HTTP), bounded by `timeout`: its status
/// and body, or why there is none.
pub async fn get(
    member: &Member,
    path: &'static str,
    timeout: Duration,
) -> Result<Result<(u16, Bytes), String>, ConfirmError> {
    if member.api_scheme == "https" {
        return Err(ConfirmError::Https {
            member: member.name.clone(),
            host: member.api_host.clone(),
            port: member.api_port,
        });
    }
    let host = member.api_host.clone();
    let port = member.api_port;
    let work = async move {
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let req = Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        }
        .await;
        conn.abort();
        answer
    };
    Ok(match tokio::time::timeout(timeout, work).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    })
}

/// Reads a `/primary` answer: writable only with status 200 and a body saying primary, running,
/// with a write location.
pub fn verdict(status: u16, body: &[u8]) -> Probe {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let role = json.get("role").and_then(|v| v.as_str()).unwrap_or("?");
    let state = json.get("state").and_then(|v| v.as_str()).unwrap_or("?");
    let writes = json
        .get("xlog")
        .and_then(|x| x.get("location"))
        .is_some_and(|l| !l.is_null());
    if status == 200 && matches!(role, "master" | "primary") && writes {
        Probe::Writable
    } else {
        Probe::NotYet(format!(
            "GET /primary: {status}, role {role}, state {state}, write location {}",
            if writes { "present" } else { "absent" }
        ))
    }
}

/// Whether `member` answers `GET /standby-leader` with 200: the leader of a standby cluster,
/// replicating from its source (Patroni answers 503 on any other node). Probed every
/// `interval` until it does or `deadline` passes.
pub async fn until_standby_leader(
    member: &Member,
    interval: Duration,
    probe_timeout: Duration,
    deadline: Instant,
) -> Result<bool, ConfirmError> {
    loop {
        if let Ok((200, _)) = get(member, "/standby-leader", probe_timeout).await? {
            return Ok(true);
        }
        if Instant::now() + interval >= deadline {
            tracing::warn!(member = %member.name, "the standby leader did not answer GET /standby-leader with 200 before failover.confirm_timeout: targets with standby_leader = \"follow\" keep their files");
            return Ok(false);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Probes `member` every `interval` until it takes writes (the time it was seen writable) or
/// `deadline` passes (None, after logging the last answer). Cancel by aborting the task.
pub async fn until_writable(
    member: &Member,
    interval: Duration,
    probe_timeout: Duration,
    deadline: Instant,
) -> Result<Option<Instant>, ConfirmError> {
    let mut probes = 0u64;
    loop {
        probes += 1;
        let last = match probe(member, probe_timeout).await? {
            Probe::Writable => return Ok(Some(Instant::now())),
            Probe::NotYet(why) => why,
        };
        if Instant::now() + interval >= deadline {
            tracing::warn!(member = %member.name, probes, last = %last, "the new leader did not confirm it takes writes before failover.confirm_timeout; HAProxy's health checks decide");
            return Ok(None);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_primary_out_of_recovery_is_writable() {
        let primary3 =
            br#"{"state":"running","role":"master","xlog":{"location":67108960},"timeline":2}"#;
        let primary4 =
            br#"{"state":"running","role":"primary","xlog":{"location":1},"timeline":2}"#;
        assert_eq!(verdict(200, primary3), Probe::Writable);
        assert_eq!(verdict(200, primary4), Probe::Writable);
        // Patroni started a crashed primary again: its state lags, the query does not.
        let restarted =
            br#"{"state":"starting","role":"master","xlog":{"location":67108960},"timeline":2}"#;
        assert_eq!(verdict(200, restarted), Probe::Writable);
        // The leader lock is held but PostgreSQL is still in recovery: the body says replica.
        let promoting = br#"{"state":"running","role":"replica","xlog":{"received_location":5,"replayed_location":5}}"#;
        assert!(matches!(verdict(200, promoting), Probe::NotYet(_)));
        // The status query failed: Patroni falls back to its own idea of the role.
        assert!(matches!(
            verdict(200, br#"{"state":"unknown","role":"master"}"#),
            Probe::NotYet(_)
        ));
        // A demoted old primary answers 503 whatever its body.
        assert!(matches!(verdict(503, primary3), Probe::NotYet(_)));
        assert!(matches!(verdict(200, b"not json"), Probe::NotYet(_)));
    }
}
