//! A bounded pause of one PgBouncer for a failover switch ([`Pause`]): `PAUSE` in the
//! background, `RESUME` (or `RECONNECT` in session pool mode) at the end of the switch, and a
//! deadline that resumes it whatever happens; a `RESUME` that fails then is owed and sent again
//! until it answers.
//!
//! ```text
//! pause.begin("leader changed")     // PAUSE in the background: new transactions wait
//! … render pgbouncer.ini …
//! admin.reload().await?             // RELOAD: the new [databases] address
//! pause.end("switched").await?      // RESUME (session pool mode: RECONNECT)
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

mod tasks;

use super::{Admin, AdminError};
use tasks::{finish, run_deadline, run_pause};

/// Where one pause stands.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Connecting and asking for the pool modes; `PAUSE` not sent.
    Checking,
    /// `PAUSE` sent, not answered yet (transactions still running).
    Pausing { sent: Instant },
    /// `PAUSE` answered: no server connection is in use.
    Paused { sent: Instant },
    /// A pool runs in session mode: not paused; the switch ends with `RECONNECT`.
    Session,
    /// `PAUSE` failed (logged); ending still sends `RESUME` in case it took effect.
    Failed { sent: Option<Instant> },
}

/// One pause, from [`Pause::begin`] to its end.
struct Active {
    gen: u64,
    why: String,
    began: Instant,
    /// When the deadline resumes it (`pause_timeout`, or the crash hold's bound).
    bound: Duration,
    stage: Stage,
    pause_task: Option<JoinHandle<()>>,
    deadline_task: Option<JoinHandle<()>>,
}

/// Told the result of each `PAUSE` and `RESUME` (`ok` or `failed`), for metrics.
pub type MoveObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// The pause under way, and how many ends of earlier ones are still sending their `RESUME`.
#[derive(Default)]
struct State {
    current: Option<Active>,
    ending: usize,
}

struct Inner {
    admin: Admin,
    state: Mutex<State>,
    gens: AtomicU64,
    /// Held by whoever ends a pause for the whole `RESUME` / `RECONNECT`, and by a starting pause
    /// until it sends `PAUSE`: a new `PAUSE` never races the `RESUME` of the previous one.
    transition: Arc<tokio::sync::Mutex<()>>,
    observer: Mutex<Option<MoveObserver>>,
}

/// Who ends a pause, for the logs.
#[derive(Clone, Copy, PartialEq)]
enum Ender {
    Caller,
    Deadline,
    Dropped,
}

/// A bounded pause of one PgBouncer for a failover switch: [`Pause::begin`] starts `PAUSE` in
/// the background and returns at once; [`Pause::end`] (after the caller's `RELOAD`) sends
/// `RESUME`, or `RECONNECT` when a pool runs in session mode. Whatever happens, PgBouncer is
/// resumed within `pause_timeout` of `begin` by a deadline task, and dropping the last handle
/// resumes it too. Clones share the pause. `begin` and dropping need a tokio runtime.
#[derive(Clone)]
pub struct Pause {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = self.inner.lock().current.as_ref().map(|a| a.stage);
        f.debug_struct("Pause")
            .field("console", &self.inner.admin.console())
            .field("stage", &stage)
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, result: &'static str) {
        let observer = self
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(f) = observer {
            f(result);
        }
    }

    /// Sets the stage of pause `gen` if it is still the current one.
    fn set_stage(&self, gen: u64, stage: Stage) -> bool {
        match self.lock().current.as_mut() {
            Some(a) if a.gen == gen => {
                a.stage = stage;
                true
            }
            _ => false,
        }
    }

    /// Ends the current pause (or only pause `gen`): aborts a pending `PAUSE` (closing its
    /// connection), then `RESUME` / `RECONNECT` on a fresh connection. On failure the pause is
    /// put back so that the deadline tries again.
    async fn end(
        &self,
        why: &str,
        gen: Option<u64>,
        by: Ender,
    ) -> Result<Option<Duration>, AdminError> {
        // First close a pending PAUSE (its task holds `transition` until it has sent PAUSE).
        if let Some(a) = self.lock().current.as_ref() {
            if gen.is_none_or(|g| g == a.gen) {
                if let Some(t) = &a.pause_task {
                    t.abort();
                }
            }
        }
        // Then wait for an end in flight: if its RESUME fails, it puts the pause back for us.
        let _transition = self.transition.lock().await;
        let mut active = {
            let mut st = self.lock();
            match st.current.as_ref() {
                Some(a) if gen.is_none_or(|g| g == a.gen) => {
                    st.ending += 1;
                    st.current.take().expect("checked")
                }
                _ => return Ok(None),
            }
        };
        let _ending = Ending(self);
        let deadline_task = active.deadline_task.take();
        let result = finish(&self.admin, &mut active, why, by).await;
        self.count(if result.is_ok() { "ok" } else { "failed" });
        match &result {
            Ok(_) => {
                if by != Ender::Deadline {
                    if let Some(t) = deadline_task {
                        t.abort();
                    }
                }
            }
            Err(_) => {
                let mut st = self.lock();
                if st.current.is_none() {
                    active.deadline_task = deadline_task;
                    st.current = Some(active);
                }
            }
        }
        result
    }
}

/// Counts an end in flight (so that [`Pause::is_active`] stays true until its `RESUME` has
/// answered), also when it is dropped half-way.
struct Ending<'a>(&'a Inner);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.ending = st.ending.saturating_sub(1);
    }
}

impl Pause {
    /// A pause controller for the PgBouncer behind `admin`.
    pub fn new(admin: Admin) -> Pause {
        Pause {
            inner: Arc::new(Inner {
                admin,
                state: Mutex::new(State::default()),
                gens: AtomicU64::new(0),
                transition: Arc::new(tokio::sync::Mutex::new(())),
                observer: Mutex::new(None),
            }),
        }
    }

    /// Reports the result of each `PAUSE` and `RESUME` of this pause (and its clones) to `f`.
    pub fn set_observer(&self, f: MoveObserver) {
        *self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// The console this pause drives.
    pub fn admin(&self) -> &Admin {
        &self.inner.admin
    }

    /// Starts `PAUSE` in a spawned task unless already paused or pausing; returns at once
    /// (never blocks the caller). When a pool runs in session mode it does not pause (`PAUSE`
    /// would wait for clients to disconnect): it records that the switch must end with
    /// `RECONNECT` instead, and logs that at info. A deadline task resumes after
    /// `pause_timeout` whatever happens (logged at warn with how long it was paused).
    /// Must be called within a tokio runtime.
    pub fn begin(&self, why: &str) {
        self.begin_with(why, self.inner.admin.cfg.pause_timeout, false);
    }

    /// The crash hold's pause: [`Pause::begin`] bounded by `bound` (the cluster's lease)
    /// instead of `pause_timeout`, and sent to session-mode pools too. Their sessions were on
    /// the dead primary, whose server connections PgBouncer has closed already, so `PAUSE`
    /// answers at once and new sessions wait instead of failing to connect; with the primary's
    /// host gone silent, `PAUSE` stays pending (new sessions wait all the same) until the hold
    /// ends with `RESUME`.
    pub fn begin_hold(&self, why: &str, bound: Duration) {
        self.begin_with(why, bound, true);
    }

    fn begin_with(&self, why: &str, bound: Duration, sessions: bool) {
        let mut st = self.inner.lock();
        if let Some(a) = st.current.as_ref() {
            debug!(
                console = self.inner.admin.console(),
                why,
                began = %a.why,
                "PgBouncer pause already under way"
            );
            return;
        }
        let gen = self.inner.gens.fetch_add(1, Ordering::Relaxed) + 1;
        let admin = self.inner.admin.clone();
        info!(
            console = admin.console(),
            why,
            bound = %humantime::format_duration(bound),
            "PgBouncer: pausing for a switch"
        );
        let weak = Arc::downgrade(&self.inner);
        let pause_task = tokio::spawn(run_pause(weak.clone(), admin.clone(), gen, sessions));
        let after = bound;
        let deadline_task = tokio::spawn(run_deadline(weak, admin, gen, after));
        st.current = Some(Active {
            gen,
            why: why.to_string(),
            began: Instant::now(),
            bound,
            stage: Stage::Checking,
            pause_task: Some(pause_task),
            deadline_task: Some(deadline_task),
        });
    }

    /// Ends the pause: `RESUME` (or `RECONNECT` in session pool mode, after the caller's
    /// `RELOAD`). Idempotent; a pending `PAUSE` that has not answered yet is ended too (its
    /// connection is closed, then `RESUME` on a fresh one). Returns how long PgBouncer was
    /// paused (from `PAUSE` sent to `RESUME` answered), `None` if it was not. On error the
    /// deadline still tries again. The work runs in its own task: dropping this future (a
    /// caller's timeout) does not stop the `RESUME`.
    pub async fn end(&self, why: &str) -> Result<Option<Duration>, AdminError> {
        let inner = self.inner.clone();
        let why = why.to_string();
        match tokio::spawn(async move { inner.end(&why, None, Ender::Caller).await }).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(AdminError::Failed {
                console: self.inner.admin.console().to_string(),
                command: "RESUME".to_string(),
                detail: format!("the task ending the pause was cancelled: {e}"),
            }),
        }
    }

    /// True from [`Pause::begin`] until the pause has ended (by [`Pause::end`] or the deadline)
    /// and its `RESUME` / `RECONNECT` has answered.
    pub fn is_active(&self) -> bool {
        let st = self.inner.lock();
        st.current.is_some() || st.ending > 0
    }

    /// True once PgBouncer has answered this pause's `PAUSE`: no server connection is in use.
    pub fn is_paused(&self) -> bool {
        matches!(
            self.inner.lock().current.as_ref().map(|a| a.stage),
            Some(Stage::Paused { .. })
        )
    }

    /// A handle that shows this pause to `/status` without keeping it alive: the last handle's
    /// drop still resumes PgBouncer.
    pub fn watch(&self) -> PauseWatch {
        PauseWatch(Arc::downgrade(&self.inner))
    }
}

/// A pause in progress as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PauseState {
    /// PgBouncer's console.
    pub console: String,
    /// The one database paused, when PgBouncer fronts several clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Why it began.
    pub why: String,
    /// `checking`, `pausing` (`PAUSE` sent, transactions finishing), `paused`, `session` (a
    /// session-mode pool: not paused, the switch ends with `RECONNECT`), `failed` or `resuming`.
    pub stage: &'static str,
    /// Seconds since it began.
    pub for_s: f64,
}

/// A weak handle on a [`Pause`], see [`Pause::watch`].
#[derive(Clone)]
pub struct PauseWatch(std::sync::Weak<Inner>);

impl fmt::Debug for PauseWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state().fmt(f)
    }
}

impl PauseWatch {
    /// The pause in progress now, if one is (begun and not yet resumed).
    pub fn state(&self) -> Option<PauseState> {
        let inner = self.0.upgrade()?;
        let st = inner.lock();
        let (why, began, stage) = match st.current.as_ref() {
            Some(a) => (
                a.why.clone(),
                Some(a.began),
                match a.stage {
                    Stage::Checking => "checking",
                    Stage::Pausing { .. } => "pausing",
                    Stage::Paused { .. } => "paused",
                    Stage::Session => "session",
                    Stage::Failed { .. } => "failed",
                },
            ),
            None if st.ending > 0 => (String::new(), None, "resuming"),
            None => return None,
        };
        Some(PauseState {
            console: inner.admin.console().to_owned(),
            database: inner.admin.database().map(str::to_owned),
            why,
            stage,
            for_s: began.map_or(0.0, |b| {
                (b.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
            }),
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(mut active) = self
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .take()
        else {
            return;
        };
        if let Some(t) = &active.pause_task {
            t.abort();
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                if let Some(t) = active.deadline_task.take() {
                    t.abort();
                }
                let admin = self.admin.clone();
                let transition = self.transition.clone();
                rt.spawn(async move {
                    let _transition = transition.lock().await;
                    if let Err(e) = finish(&admin, &mut active, "dropped", Ender::Dropped).await {
                        warn!(console = admin.console(), error = %e, "RESUME of a dropped pause failed: PgBouncer may still be paused");
                    }
                });
            }
            Err(_) => warn!(
                console = self.admin.console(),
                "PgBouncer pause dropped outside a tokio runtime: its deadline task resumes it"
            ),
        }
    }
}
