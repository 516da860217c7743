//! Probes that time a leader change from the client's side: a direct write probe on every node
//! (when does the new primary itself first take a write), reconnecting and persistent write
//! probes through HAProxy or PgBouncer (when do they first reach it, and which errors do they
//! see on the way). Every probe is a thread with its own bounded loop; times are `Instant`s so
//! that they compare across probes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::patroni::{pg_err_text, SUPERUSER, SUPERUSER_PASSWORD};

/// Hard cap on the iterations of one probe.
const MAX_ITERATIONS: u64 = 1_000_000;
/// Outcomes kept per probe (older ones are dropped).
const MAX_KEPT: usize = 200_000;

/// One write attempt: when it finished, and the port of the server that took it or the error.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the attempt began (before connecting, for a new connection).
    pub started: Instant,
    /// When the attempt finished.
    pub at: Instant,
    /// `inet_server_port()` of the server that took the write, or the error text.
    pub result: Result<u16, String>,
}

/// An error class, for the counts the benchmark reports.
pub fn error_class(e: &str) -> &'static str {
    let e = e.to_ascii_lowercase();
    if e.contains("read-only") || e.contains("read only") {
        "read_only"
    } else if e.contains("timeout") || e.contains("timed out") {
        "timeout"
    } else if e.contains("closed") || e.contains("terminat") || e.contains("reset") {
        "closed"
    } else if e.contains("refused") || e.contains("connect") {
        "connect"
    } else {
        "other"
    }
}

/// How a probe holds its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per write (an application that connects per request).
    Reconnect,
    /// One connection, kept while it works, replaced after an error (a pooled application).
    Persistent,
    /// One connection, kept through errors the server sent (a write refused by a read-only
    /// node leaves the session usable), replaced only when the connection itself failed. For a
    /// probe on a node that refuses writes for a long time: it asks every step without opening
    /// a new backend every step.
    Sticky,
}

/// A write probe against 127.0.0.1:`port`.
pub struct WriteProbe {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
    handle: Option<JoinHandle<()>>,
}

const WRITE: &str = "INSERT INTO haconfd_probe(v) VALUES (1) RETURNING inet_server_port()";

fn config(port: u16, db: &str) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname(db)
        .application_name("haconfd-switch-probe")
        .connect_timeout(Duration::from_secs(2));
    c
}

fn write_once(c: &mut postgres::Client) -> Result<u16, postgres::Error> {
    // Simple query protocol: PgBouncer in transaction mode has no prepared statements.
    for m in c.simple_query(WRITE)? {
        if let postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).and_then(|v| v.parse().ok()).unwrap_or(0));
        }
    }
    Ok(0)
}

impl WriteProbe {
    /// Starts writing every `pause` until stopped or `max` has passed.
    pub fn start(port: u16, mode: Mode, pause: Duration, max: Duration) -> WriteProbe {
        Self::start_on_db(port, "postgres", mode, pause, max)
    }

    /// [`WriteProbe::start`] on database `db` (a PgBouncer database of one of several clusters).
    pub fn start_on_db(
        port: u16,
        db: &str,
        mode: Mode,
        pause: Duration,
        max: Duration,
    ) -> WriteProbe {
        let db = db.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s2, l2) = (stop.clone(), log.clone());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let cfg = config(port, &db);
            let mut conn: Option<postgres::Client> = None;
            for _ in 0..MAX_ITERATIONS {
                if s2.load(Ordering::Relaxed) || start.elapsed() >= max {
                    break;
                }
                let started = Instant::now();
                let result = match conn.take() {
                    Some(c) => Ok(c),
                    None => cfg.connect(postgres::NoTls),
                }
                .and_then(|mut c| {
                    let r = write_once(&mut c);
                    let keep = match mode {
                        Mode::Reconnect => false,
                        Mode::Persistent => r.is_ok(),
                        Mode::Sticky => {
                            !c.is_closed()
                                && r.as_ref().err().is_none_or(|e| e.as_db_error().is_some())
                        }
                    };
                    if keep {
                        conn = Some(c);
                    } else {
                        let _ = c.close();
                    }
                    r
                });
                let attempt = Attempt {
                    started,
                    at: Instant::now(),
                    result: result.map_err(|e| pg_err_text(&e)),
                };
                {
                    let mut l = l2.lock().unwrap();
                    if l.len() == MAX_KEPT {
                        l.remove(0);
                    }
                    l.push(attempt);
                }
                std::thread::sleep(pause);
            }
        });
        WriteProbe {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    /// Stops (bounded join) and returns every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.halt();
        self.attempts()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            for _ in 0..200 {
                if h.is_finished() {
                    let _ = h.join();
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

impl Drop for WriteProbe {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Stops every probe at once and waits for them together (5 s at most in all, however many
/// hang in a query that a paused or dead server holds); returns each probe's attempts, in order.
/// A probe still busy then is left to end by itself at its next step (it is told to stop).
pub fn stop_all(probes: Vec<WriteProbe>) -> Vec<Vec<Attempt>> {
    for p in &probes {
        p.stop.store(true, Ordering::Relaxed);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..200 {
        let busy = probes
            .iter()
            .any(|p| p.handle.as_ref().is_some_and(|h| !h.is_finished()));
        if !busy || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    probes
        .into_iter()
        .map(|mut p| {
            // One still busy is detached: it sees the stop flag when its call returns.
            if let Some(h) = p.handle.take().filter(|h| h.is_finished()) {
                let _ = h.join();
            }
            p.attempts()
        })
        .collect()
}

/// The first write after `from` that reached the server on `port`.
pub fn first_on(attempts: &[Attempt], port: u16, from: Instant) -> Option<Instant> {
    attempts
        .iter()
        .find(|a| a.at >= from && a.result.as_ref().ok() == Some(&port))
        .map(|a| a.at)
}

/// Errors after `from`, by class.
pub fn errors_by_class(
    attempts: &[Attempt],
    from: Instant,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut out = std::collections::BTreeMap::new();
    for a in attempts.iter().filter(|a| a.at >= from) {
        if let Err(e) = &a.result {
            *out.entry(error_class(e)).or_default() += 1;
        }
    }
    out
}

/// The first few error texts after `from`, each with its time after `from`.
pub fn first_errors(attempts: &[Attempt], from: Instant, n: usize) -> Vec<String> {
    attempts
        .iter()
        .filter(|a| a.at >= from)
        .filter_map(|a| {
            a.result
                .as_ref()
                .err()
                .map(|e| format!("+{:.3}s {e}", a.at.duration_since(from).as_secs_f64()))
        })
        .take(n)
        .collect()
}

/// The longest attempt that began at or after `from` (a new connection: connect and write).
pub fn longest(attempts: &[Attempt], from: Instant) -> Duration {
    attempts
        .iter()
        .filter(|a| a.started >= from)
        .map(|a| a.at.duration_since(a.started))
        .max()
        .unwrap_or_default()
}

/// Milliseconds from `a` to `b` (negative when `b` came first).
pub fn ms_between(a: Instant, b: Instant) -> f64 {
    if b >= a {
        b.duration_since(a).as_secs_f64() * 1000.0
    } else {
        -(a.duration_since(b).as_secs_f64() * 1000.0)
    }
}
