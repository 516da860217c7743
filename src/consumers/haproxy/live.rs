//! HAProxy's live server states as people see them (`/status`, the page at `/`, `haconfd
//! status`): read from a stats socket at most once per [`FRESH`], one reading at a time per
//! socket, each within [`TIMEOUT`]. However many requests come, they add at most four
//! connections a second to the socket the fast path moves HAProxy through, and a hung socket
//! holds a request for [`TIMEOUT`] at most.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::runtime::{self, Live, LiveServer};

/// How long a reading is shown before the socket is asked again.
pub const FRESH: Duration = Duration::from_millis(250);

/// The longest one reading may take (connect, `show servers state`, the answer).
pub const TIMEOUT: Duration = Duration::from_millis(800);

/// Sockets not asked for this long are forgotten (a reload may have renamed them).
const FORGET: Duration = Duration::from_secs(300);

/// One reading of a socket: the servers, or why there are none.
#[derive(Debug, Clone)]
pub struct Reading {
    /// When it was taken.
    pub at: Instant,
    /// The servers by backend and name, or the error.
    pub result: Result<Live, String>,
}

#[derive(Default)]
struct Slot {
    last: Mutex<Option<Reading>>,
    /// Held by the one request reading the socket now.
    busy: tokio::sync::Mutex<()>,
    asked: Mutex<Option<Instant>>,
}

/// The readings of every socket asked about, shared by all requests.
#[derive(Default)]
pub struct Readings {
    sockets: Mutex<HashMap<PathBuf, Arc<Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's readings.
pub fn readings() -> &'static Readings {
    static READINGS: OnceLock<Readings> = OnceLock::new();
    READINGS.get_or_init(Readings::default)
}

impl Readings {
    fn slot(&self, socket: &Path) -> Arc<Slot> {
        let mut map = lock(&self.sockets);
        map.retain(|_, s| lock(&s.asked).is_none_or(|t| t.elapsed() < FORGET));
        let slot = Arc::clone(map.entry(socket.to_path_buf()).or_default());
        *lock(&slot.asked) = Some(Instant::now());
        slot
    }

    /// The servers HAProxy shows on `socket`: the last reading when it is younger than
    /// [`FRESH`], else a new one. While another request reads the socket, this one waits for
    /// that reading (at most [`TIMEOUT`]) instead of opening a second connection.
    pub async fn read(&self, socket: &Path) -> Reading {
        let slot = self.slot(socket);
        let fresh = |slot: &Slot| {
            lock(&slot.last)
                .as_ref()
                .filter(|r| r.at.elapsed() < FRESH)
                .cloned()
        };
        if let Some(r) = fresh(&slot) {
            return r;
        }
        let _busy = match slot.busy.try_lock() {
            Ok(g) => g,
            Err(_) => {
                // Someone is reading: take theirs when it comes.
                let waited = tokio::time::timeout(TIMEOUT, slot.busy.lock()).await;
                if let Some(r) = fresh(&slot) {
                    return r;
                }
                match waited {
                    Ok(g) => g,
                    Err(_) => {
                        return Reading {
                            at: Instant::now(),
                            result: Err(format!(
                                "{} did not answer within {TIMEOUT:?}",
                                socket.display()
                            )),
                        }
                    }
                }
            }
        };
        let result = match super::cli(socket, "show servers state", TIMEOUT).await {
            Ok(text) => Ok(runtime::parse_live(&text)),
            Err(e) => Err(format!("{}: {e}", socket.display())),
        };
        let r = Reading {
            at: Instant::now(),
            result,
        };
        *lock(&slot.last) = Some(r.clone());
        r
    }
}

/// One server as people read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerView {
    /// The backend (`primary`, `replicas`, or a cluster's own).
    pub backend: String,
    /// The server: the member's name.
    pub server: String,
    /// `UP`, `DOWN`, `STARTING` or `STOPPING` (HAProxy's operational state).
    pub state: &'static str,
    /// `drain` (haconfd's fence, in a primary backend) or `maint` (an operator's, or an address
    /// that did not resolve), when set.
    pub admin: Option<&'static str>,
}

impl ServerView {
    /// `backend`/`server` in the state `s` HAProxy shows.
    pub fn new(backend: &str, server: &str, s: &LiveServer) -> ServerView {
        ServerView {
            backend: backend.to_owned(),
            server: server.to_owned(),
            state: match s.op {
                0 => "DOWN",
                1 => "STARTING",
                2 => "UP",
                _ => "STOPPING",
            },
            admin: if s.in_maint() {
                Some("maint")
            } else if s.is_drained() {
                Some("drain")
            } else {
                None
            },
        }
    }
}

/// The servers of `backends` in a reading, in the order of `backends`, then by name.
pub fn servers_of(live: &Live, backends: &[String]) -> Vec<ServerView> {
    backends
        .iter()
        .flat_map(|b| {
            live.iter()
                .filter(move |((backend, _), _)| backend == b)
                .map(|((backend, server), s)| ServerView::new(backend, server, s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
3 primary 1 pg1 127.0.0.11 2 8 1 1 5 15 3 4 6 0 0 0 - 5432 - 0 8008 - - 0\n\
3 primary 2 pg2 127.0.0.12 0 0 1 1 5 15 3 4 6 0 0 0 - 5432 - 0 8008 - - 0\n\
4 replicas 1 pg1 127.0.0.11 0 1 1 1 5 15 3 4 6 0 0 0 - 5432 - 0 8008 - - 0\n\
4 replicas 2 pg2 127.0.0.12 2 0 1 1 5 15 3 4 6 0 0 0 - 5432 - 0 8008 - - 0\n\
5 other 1 x 127.0.0.13 2 0 1 1 5 15 3 4 6 0 0 0 - 5432 - 0 8008 - - 0\n";

    #[test]
    fn servers_show_up_down_drain_and_maint_in_the_backends_asked_for() {
        let live = runtime::parse_live(DUMP);
        let v = servers_of(&live, &["primary".into(), "replicas".into()]);
        let shown: Vec<(String, &str, Option<&str>)> = v
            .iter()
            .map(|s| (format!("{}/{}", s.backend, s.server), s.state, s.admin))
            .collect();
        assert_eq!(
            shown,
            [
                ("primary/pg1".to_owned(), "UP", Some("drain")),
                ("primary/pg2".to_owned(), "DOWN", None),
                ("replicas/pg1".to_owned(), "DOWN", Some("maint")),
                ("replicas/pg2".to_owned(), "UP", None),
            ]
        );
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_an_error_kept_while_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let r = Readings::default();
        let first = r.read(&sock).await;
        assert!(first.result.is_err());
        let second = r.read(&sock).await;
        assert_eq!(first.at, second.at, "the same reading within FRESH");
    }

    #[tokio::test]
    async fn a_hung_socket_holds_a_reading_for_the_timeout_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hung.sock");
        // Accepts (the kernel's backlog) and never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = Instant::now();
        let r = Readings::default().read(&sock).await;
        assert!(r.result.is_err());
        assert!(
            t.elapsed() < TIMEOUT + Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
