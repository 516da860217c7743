//! `haconfd::consumers::pgbouncer` against a real PgBouncer (1.18 on Debian 12) and real PostgreSQL servers
//! on loopback: the bounded pause of the failover fast path (PAUSE, RELOAD onto another server,
//! RESUME), its deadline, session pool mode (no pause, RECONNECT), a PAUSE stuck behind an open
//! transaction, and the errors of a wrong password or an unreachable console.
//!
//! Clients are the synchronous `postgres` crate on their own threads (it runs its own runtime);
//! the admin calls run on the test's current-thread tokio runtime, as in the daemon. Every loop
//! is bounded in count and time.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::procs::*;
use haconfd::consumers::pgbouncer::{Admin, AdminConfig, AdminError, Pause, PoolMode};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The `[databases]` body pointing the `postgres` database at 127.0.0.1:`port`.
fn databases(port: u16) -> String {
    format!("postgres = host=127.0.0.1 port={port} dbname=postgres")
}

/// The console of the PgBouncer started on `ini`, through its unix socket.
fn admin_config(ini: &PgbouncerIni) -> AdminConfig {
    AdminConfig {
        port: ini.port,
        ..AdminConfig::new(ini.dir().display().to_string())
    }
}

/// Log lines of this test's thread (the current-thread runtime runs every task there), also
/// echoed to the test's captured stderr.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(buf));
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// Polls `f` every 10 ms on the runtime (other tasks keep running) for up to `timeout`.
async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A synchronous client connection through PgBouncer as `postgres` on database `postgres`.
fn connect(port: u16) -> Result<postgres::Client, String> {
    postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(postgres::NoTls)
        .map_err(|e| format!("{e:?}"))
}

/// The port of the PostgreSQL server that answered (simple protocol: transaction pooling).
fn server_port(c: &mut postgres::Client) -> Result<u16, String> {
    let msgs = c
        .simple_query("SELECT current_setting('port')")
        .map_err(|e| format!("{e:?}"))?;
    msgs.iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .ok_or_else(|| "no row".to_string())
}

/// One query of a [`QueryLoop`].
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    end: Instant,
    /// The answering server's port, or the error.
    result: Result<u16, String>,
}

impl Sample {
    fn latency(&self) -> Duration {
        self.end - self.start
    }
}

/// One persistent client running `SELECT current_setting('port')` through PgBouncer in a loop
/// (2 ms apart) on its own thread, recording every query. Bounded: 60 s or 100 000 queries.
struct QueryLoop {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl QueryLoop {
    fn start(pgbouncer_port: u16) -> QueryLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let mut client = match connect(pgbouncer_port) {
                Ok(c) => c,
                Err(e) => {
                    let now = Instant::now();
                    v.lock().unwrap().push(Sample {
                        start: now,
                        end: now,
                        result: Err(format!("connect: {e}")),
                    });
                    return;
                }
            };
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) || began.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let start = Instant::now();
                let result = server_port(&mut client);
                v.lock().unwrap().push(Sample {
                    start,
                    end: Instant::now(),
                    result,
                });
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        QueryLoop {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    fn answered(&self) -> usize {
        self.samples().iter().filter(|s| s.result.is_ok()).count()
    }

    fn answered_by(&self, port: u16) -> usize {
        self.samples()
            .iter()
            .filter(|s| s.result == Ok(port))
            .count()
    }

    fn errors(&self) -> Vec<Sample> {
        self.samples()
            .into_iter()
            .filter(|s| s.result.is_err())
            .collect()
    }

    /// Stops the loop and returns every sample; panics when the client is stuck for 10 s.
    fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the query loop is stuck in a query for 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().expect("query loop panicked");
        self.samples()
    }
}

impl Drop for QueryLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// PostgreSQL servers and a PgBouncer in front of the first one, with `pool_mode`.
struct Setup {
    servers: Vec<Postgres>,
    ini: PgbouncerIni,
    pgbouncer: Pgbouncer,
}

impl Setup {
    fn start(servers: usize, pool_mode: &str) -> Setup {
        let servers: Vec<Postgres> = (0..servers).map(|_| Postgres::start()).collect();
        let ini = PgbouncerIni::with_extra(
            &databases(servers[0].port()),
            &format!("pool_mode = {pool_mode}"),
        );
        let pgbouncer = Pgbouncer::start(&ini.path);
        Setup {
            servers,
            ini,
            pgbouncer,
        }
    }

    fn port(&self, server: usize) -> u16 {
        self.servers[server].port()
    }

    fn admin(&self) -> Admin {
        Admin::new(admin_config(&self.ini))
    }
}

/// The longest query and when it ended, relative to `t0`.
fn longest(samples: &[Sample], t0: Instant) -> (Duration, Duration) {
    let s = samples
        .iter()
        .max_by_key(|s| s.latency())
        .expect("some samples");
    (s.latency(), s.end.saturating_duration_since(t0))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The fast path end to end: queries of a persistent client wait during the pause instead of
/// failing, and after RELOAD + RESUME the same client session is served by the new server.
#[tokio::test]
async fn pause_then_end_resumes_and_queries_never_error() {
    let (logs, _guard) = capture_logs();
    let s = Setup::start(2, "transaction");
    let (old, new) = (s.port(0), s.port(1));
    let admin = s.admin();
    assert_eq!(admin.pool_mode().await.unwrap(), PoolMode::Transaction);

    let load = QueryLoop::start(s.pgbouncer.port());
    assert!(
        eventually(Duration::from_secs(10), || load.answered_by(old) >= 20).await,
        "the client never got answers from the first server: {:?}",
        load.errors()
    );

    let pause = Pause::new(admin.clone());
    let t0 = Instant::now();
    pause.begin("test: the leader moved");
    assert!(pause.is_active());
    assert!(
        eventually(Duration::from_secs(5), || pause.is_paused()).await,
        "PAUSE did not answer within 5 s"
    );
    let paused_after = t0.elapsed();
    pause.begin("test: a second begin while paused");
    // Queries answered before PAUSE did may be recorded a moment later; then nothing moves.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = load.answered();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(load.answered(), before, "a query was answered while paused");

    s.ini.write_databases(&databases(new));
    admin.reload().await.unwrap();
    let t_end = Instant::now();
    let paused = pause
        .end("test: switched")
        .await
        .unwrap()
        .expect("it was paused");
    let end_took = t_end.elapsed();
    assert!(!pause.is_active());
    assert_eq!(pause.end("test: ended twice").await.unwrap(), None);
    assert!(
        eventually(Duration::from_secs(5), || load.answered_by(new) >= 20).await,
        "the client never reached the new server: {:?}",
        load.errors()
    );
    let samples = load.stop();

    let errors: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(errors.is_empty(), "queries failed: {errors:?}");
    let first_new = samples
        .iter()
        .position(|s| s.result == Ok(new))
        .expect("answered by the new server");
    assert!(
        samples[first_new..].iter().all(|s| s.result == Ok(new)),
        "the old server answered again after the new one"
    );
    let (max_latency, ended_at) = longest(&samples, t0);
    assert!(
        max_latency >= Duration::from_millis(400) && max_latency <= paused + Duration::from_secs(1),
        "the blocked query took {max_latency:?}, paused {paused:?}"
    );
    assert!(!admin.resume().await.unwrap(), "still paused after end()");
    assert!(logs.text().contains("PgBouncer resumed after"));
    // PgBouncer's own logfile (its stderr repeats it).
    let log = std::fs::read_to_string(&s.ini.logfile).unwrap();
    assert_eq!(log.matches("PAUSE command issued").count(), 1, "{log}");
    eprintln!(
        "timings: PAUSE answered after {paused_after:?}; paused {paused:?}; end() took \
         {end_took:?}; longest query {max_latency:?}, answered {ended_at:?} after begin(); \
         {} queries, {} on the new server",
        samples.len(),
        samples.len() - first_new
    );
}

/// Nobody calls end(): the deadline task RESUMEs at pause_timeout, and a query issued during the
/// pause is answered right after it.
#[tokio::test]
async fn pause_is_resumed_at_the_deadline_when_nobody_ends_it() {
    let (logs, _guard) = capture_logs();
    let s = Setup::start(1, "transaction");
    let port = s.port(0);
    let pause_timeout = Duration::from_millis(300);
    let admin = Admin::new(AdminConfig {
        pause_timeout,
        ..admin_config(&s.ini)
    });
    let load = QueryLoop::start(s.pgbouncer.port());
    assert!(eventually(Duration::from_secs(10), || load.answered_by(port) >= 10).await);

    let pause = Pause::new(admin.clone());
    let t0 = Instant::now();
    pause.begin("test: nobody ends this");
    assert!(eventually(Duration::from_secs(2), || pause.is_paused()).await);
    assert!(
        eventually(Duration::from_secs(5), || !pause.is_active()).await,
        "the deadline did not end the pause"
    );
    let inactive_after = t0.elapsed();
    let answered = load.answered();
    assert!(eventually(Duration::from_secs(5), || load.answered() >= answered + 10).await);
    let samples = load.stop();

    assert!(samples.iter().all(|s| s.result.is_ok()), "{samples:?}");
    // Queries in flight during the pause were answered only after the deadline.
    let blocked: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.start < t0 + Duration::from_millis(200) && s.end > t0 + Duration::from_millis(100)
        })
        .collect();
    assert!(!blocked.is_empty(), "no query ran during the pause");
    for b in &blocked {
        let ended_at = b.end - t0;
        assert!(
            ended_at >= pause_timeout && ended_at <= pause_timeout + Duration::from_millis(1500),
            "a query in flight during the pause was answered {ended_at:?} after begin(), \
             pause_timeout {pause_timeout:?}"
        );
    }
    let (max_latency, ended_at) = longest(&samples, t0);
    assert!(inactive_after >= pause_timeout);
    assert!(
        !admin.resume().await.unwrap(),
        "still paused after the deadline"
    );
    assert_eq!(pause.end("late").await.unwrap(), None);
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("resumed at pause_timeout"),
        "{text}"
    );
    eprintln!(
        "timings: pause inactive {inactive_after:?} after begin(); the blocked query took \
         {max_latency:?} and was answered {ended_at:?} after begin()"
    );
}

/// Session pool mode: PAUSE would wait for clients to disconnect, so begin() does not pause
/// (queries keep flowing), and end() sends RECONNECT; new sessions reach the new server while
/// the open session is left alone.
#[tokio::test]
async fn session_mode_does_not_pause_and_reconnect_moves_new_sessions() {
    let (logs, _guard) = capture_logs();
    let s = Setup::start(2, "session");
    let (old, new) = (s.port(0), s.port(1));
    let admin = s.admin();
    assert_eq!(admin.pool_mode().await.unwrap(), PoolMode::Session);
    let load = QueryLoop::start(s.pgbouncer.port());
    assert!(eventually(Duration::from_secs(10), || load.answered_by(old) >= 10).await);

    let pause = Pause::new(admin.clone());
    let t0 = Instant::now();
    pause.begin("test: session mode");
    assert!(
        eventually(Duration::from_secs(5), || logs
            .text()
            .contains("the switch ends with RECONNECT"))
        .await
    );
    let answered = load.answered();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        load.answered() >= answered + 10,
        "queries stalled in session mode"
    );
    assert!(pause.is_active() && !pause.is_paused());
    let pgb_port = s.pgbouncer.port();
    let other = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        (
            connect(pgb_port).and_then(|mut c| server_port(&mut c)),
            t.elapsed(),
        )
    })
    .await
    .unwrap();
    assert_eq!(other.0, Ok(old));
    assert!(other.1 < Duration::from_secs(1), "{:?}", other.1);

    s.ini.write_databases(&databases(new));
    admin.reload().await.unwrap();
    assert_eq!(pause.end("test: switched").await.unwrap(), None);
    let switched_after = t0.elapsed();
    assert!(!pause.is_active());
    let fresh = tokio::task::spawn_blocking(move || {
        connect(pgb_port).and_then(|mut c| server_port(&mut c))
    })
    .await
    .unwrap();
    assert_eq!(fresh, Ok(new), "a new session did not reach the new server");
    let answered = load.answered_by(old);
    assert!(
        eventually(Duration::from_secs(5), || load.answered_by(old)
            >= answered + 5)
        .await
    );
    let samples = load.stop();
    assert!(
        samples.iter().all(|s| s.result == Ok(old)),
        "the open session was disturbed"
    );
    let (max_latency, _) = longest(&samples, t0);
    assert!(max_latency < Duration::from_secs(1), "{max_latency:?}");

    let log = s.pgbouncer.log();
    assert!(log.contains("RECONNECT command issued"), "{log}");
    assert!(!log.contains("PAUSE command issued"), "{log}");
    assert!(!admin.resume().await.unwrap());
    eprintln!(
        "timings: begin() to end() {switched_after:?}; longest query of the open session \
         {max_latency:?}"
    );
}

/// A wrong password (from a file or an environment variable) and an unreachable console give
/// errors that name the console address and the user, carry PgBouncer's answer, and never
/// contain the password; a rotated password file is read at the next call; a pause against a
/// console that refuses us ends in bounded time.
#[tokio::test]
async fn wrong_password_or_unreachable_console_is_a_clear_error_without_the_password() {
    let (logs, _guard) = capture_logs();
    let wrong = "wr0ng-Secret-4711";
    let right = "r1ght-Secret-0815";
    let ini = PgbouncerIni::with_extra(&databases(free_port()), "auth_type = scram-sha-256");
    std::fs::write(
        &ini.auth_file,
        format!("\"pgbouncer\" \"{right}\"\n\"postgres\" \"\"\n"),
    )
    .unwrap();
    let pgbouncer = Pgbouncer::start(&ini.path);
    let secrets = temp_dir("pgb-secret");
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, format!("{wrong}\n")).unwrap();
    let socket = format!("{}/.s.PGSQL.{}", ini.dir().display(), ini.port);

    let admin = Admin::new(AdminConfig {
        password_file: Some(password_file.clone()),
        connect_timeout: Duration::from_millis(500),
        pause_timeout: Duration::from_millis(500),
        ..admin_config(&ini)
    });
    let e = admin.pool_mode().await.unwrap_err();
    let text = e.to_string();
    eprintln!("wrong password: {text}");
    assert!(matches!(e, AdminError::Connect { .. }), "{e:?}");
    assert!(text.contains(&socket), "{text}");
    assert!(text.contains("user pgbouncer"), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(wrong) && !format!("{e:?}").contains(wrong));
    assert!(!format!("{admin:?}").contains(wrong));

    // The password is read at each connect: a rotated file works without a new Admin.
    std::fs::write(&password_file, format!("{right}\n")).unwrap();
    assert_eq!(admin.pool_mode().await.unwrap(), PoolMode::Session);
    std::fs::write(&password_file, format!("{wrong}\n")).unwrap();

    // A pause that cannot connect: end() fails clearly, the deadline retries and gives up
    // within a bounded time, and no log line carries the password.
    let pause = Pause::new(admin.clone());
    pause.begin("test: wrong password");
    assert!(
        eventually(Duration::from_secs(2), || logs
            .text()
            .contains("PAUSE failed"))
        .await
    );
    let e = pause.end("test").await.unwrap_err();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(
        pause.is_active(),
        "a failed end() leaves the pause to the deadline"
    );
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(5), || !pause.is_active()).await);
    eprintln!("the deadline gave up {:?} after end() failed", t.elapsed());
    let text = logs.text();
    assert!(
        text.contains("RESUME at pause_timeout failed 3 times"),
        "{text}"
    );
    assert!(text.contains("PgBouncer may still be paused"), "{text}");

    // The password from an environment variable (PATH: set in every process, never mutated
    // here) is sent and never shown either.
    let path_value = std::env::var("PATH").unwrap();
    let by_env = Admin::new(AdminConfig {
        password_env: Some("PATH".into()),
        ..admin_config(&ini)
    });
    let e = by_env.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("authentication failed") && e.contains(&socket),
        "{e}"
    );
    assert!(!e.contains(&path_value), "{e}");

    // Nothing listening on a TCP port; a socket directory that does not exist.
    let port = free_port();
    let tcp = Admin::new(AdminConfig {
        port,
        ..AdminConfig::new("127.0.0.1")
    });
    let e = tcp.resume().await.unwrap_err();
    let text = e.to_string();
    eprintln!("refused: {text}");
    assert!(matches!(e, AdminError::Connect { .. }), "{e:?}");
    assert!(
        text.contains(&format!("127.0.0.1:{port} as user pgbouncer")),
        "{text}"
    );
    let missing = Admin::new(AdminConfig::new("/nonexistent/haconfd-test"));
    let text = missing.reload().await.unwrap_err().to_string();
    assert!(
        text.contains("/nonexistent/haconfd-test/.s.PGSQL.6432 as user pgbouncer"),
        "{text}"
    );

    // A listener that never answers: connecting is bounded by connect_timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let hung = Admin::new(AdminConfig {
        port,
        connect_timeout: Duration::from_millis(300),
        ..AdminConfig::new("127.0.0.1")
    });
    let t = Instant::now();
    let e = hung.pause().await.unwrap_err();
    let took = t.elapsed();
    eprintln!("silent listener: {e} after {took:?}");
    assert!(matches!(e, AdminError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")));
    assert!(took < Duration::from_secs(2), "{took:?}");

    let all = logs.text();
    assert!(!all.contains(wrong) && !all.contains(right) && !all.contains(&path_value));
    drop(pgbouncer);
}

/// In transaction mode PAUSE waits for an open transaction, and meanwhile every new transaction
/// waits too. end() closes the pending PAUSE's connection and RESUMEs on a fresh one: queries
/// flow again, the open transaction commits, nothing stays paused and no console connection is
/// left waiting.
#[tokio::test]
async fn pause_waiting_on_an_open_transaction_is_ended_by_end() {
    let (_logs, _guard) = capture_logs();
    let s = Setup::start(1, "transaction");
    let port = s.port(0);
    let pgb_port = s.pgbouncer.port();
    let admin = s.admin();

    // A client holding a transaction open until told to commit (bounded: 30 s).
    let (commit_tx, commit_rx) = std::sync::mpsc::channel::<()>();
    let (open_tx, open_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let holder = std::thread::spawn(move || -> Result<Instant, String> {
        let mut c = connect(pgb_port)?;
        let opened = c
            .simple_query("BEGIN; SELECT 1")
            .map(drop)
            .map_err(|e| format!("{e:?}"));
        let _ = open_tx.send(opened.clone());
        opened?;
        commit_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| format!("never told to commit: {e}"))?;
        c.simple_query("COMMIT").map_err(|e| format!("{e:?}"))?;
        Ok(Instant::now())
    });
    open_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the holder answered")
        .expect("BEGIN worked");
    let load = QueryLoop::start(pgb_port);
    assert!(eventually(Duration::from_secs(10), || load.answered_by(port) >= 10).await);

    let pause = Pause::new(admin.clone());
    let t0 = Instant::now();
    pause.begin("test: a transaction is open");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = load.answered();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pause.is_active());
    assert!(
        !pause.is_paused(),
        "PAUSE answered although a transaction was open"
    );
    assert_eq!(
        load.answered(),
        before,
        "new transactions ran while PAUSE was pending"
    );

    let t_end = Instant::now();
    let paused = pause
        .end("test: end while PAUSE is pending")
        .await
        .unwrap()
        .expect("RESUME ended a pause");
    let end_took = t_end.elapsed();
    assert!(!pause.is_active());
    assert!(
        eventually(Duration::from_secs(5), || load.answered() >= before + 10).await,
        "queries did not flow again after end()"
    );
    commit_tx.send(()).unwrap();
    let committed = tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    assert!(committed.is_ok(), "{committed:?}");

    // Nothing stays paused, and the pending PAUSE's console connection is gone.
    assert!(!admin.resume().await.unwrap());
    let consoles: Vec<_> = s
        .pgbouncer
        .admin_rows("SHOW CLIENTS")
        .into_iter()
        .filter(|r| r.get("database").map(String::as_str) == Some("pgbouncer"))
        .collect();
    assert_eq!(consoles.len(), 1, "only psql itself: {consoles:?}");

    // With the transaction gone, a new pause answers at once and ends cleanly.
    let t1 = Instant::now();
    pause.begin("test: again");
    assert!(eventually(Duration::from_secs(2), || pause.is_paused()).await);
    let second_paused_after = t1.elapsed();
    assert!(pause.end("test: again").await.unwrap().is_some());
    let samples = load.stop();
    assert!(
        samples.iter().all(|s| s.result.is_ok()),
        "{:?}",
        load_errors(&samples)
    );
    let (max_latency, _) = longest(&samples, t0);
    let log = s.pgbouncer.log();
    assert!(log.contains("RESUME command issued"), "{log}");
    eprintln!(
        "timings: paused {paused:?} while PAUSE was pending; end() took {end_took:?}; longest \
         query {max_latency:?}; a second PAUSE answered after {second_paused_after:?}"
    );
}

fn load_errors(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

/// The caller drops its last handle while PgBouncer is paused (no end(), deadline far away):
/// the drop RESUMEs at once.
#[tokio::test]
async fn a_pause_dropped_without_end_is_resumed_at_once() {
    let (logs, _guard) = capture_logs();
    let s = Setup::start(1, "transaction");
    let admin = s.admin();
    assert_eq!(admin.config().pause_timeout, Duration::from_secs(10));
    let load = QueryLoop::start(s.pgbouncer.port());
    assert!(eventually(Duration::from_secs(10), || load.answered() >= 10).await);

    let pause = Pause::new(admin.clone());
    pause.begin("test: dropped");
    assert!(eventually(Duration::from_secs(2), || pause.is_paused()).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = load.answered();
    let t = Instant::now();
    drop(pause);
    assert!(
        eventually(Duration::from_secs(3), || load.answered() >= before + 10).await,
        "queries did not flow after the pause was dropped"
    );
    let flowing_after = t.elapsed();
    let samples = load.stop();
    assert!(
        samples.iter().all(|s| s.result.is_ok()),
        "{:?}",
        load_errors(&samples)
    );
    assert!(!admin.resume().await.unwrap());
    assert!(logs.text().contains("dropped without being ended"));
    eprintln!("timings: queries flowed again {flowing_after:?} after the drop");
}
