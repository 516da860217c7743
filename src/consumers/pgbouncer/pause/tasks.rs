//! The background half of a pause: `PAUSE` and its answer, the deadline that resumes whatever
//! happens, a `RESUME` owed after the deadline's tries failed, and the end itself (`RESUME`, or
//! `RECONNECT` for session pools).

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{Active, Ender, Inner, Stage};
use crate::consumers::pgbouncer::{Admin, AdminError};

/// `RESUME` (or `RECONNECT` for session pools) for `active`, after making sure its `PAUSE`
/// connection is closed.
pub(super) async fn finish(
    admin: &Admin,
    active: &mut Active,
    why: &str,
    by: Ender,
) -> Result<Option<Duration>, AdminError> {
    if let Some(t) = active.pause_task.take() {
        t.abort();
        // Returns once the task is dropped, and with it the socket of a pending PAUSE.
        let _ = tokio::time::timeout(admin.cfg.connect_timeout, t).await;
    }
    let console = admin.console();
    let begun = humantime::format_duration(round_ms(active.began.elapsed()));
    let (sent, answered) = match active.stage {
        Stage::Session => {
            admin.reconnect().await?;
            if by == Ender::Caller {
                info!(
                    console,
                    why, began = %active.why,
                    "PgBouncer was not paused (session pool mode): RECONNECT sent {begun} after the switch began, so new server connections go to the new address",
                );
            } else {
                warn!(
                    console,
                    why, began = %active.why,
                    "PgBouncer was not paused (session pool mode): RECONNECT sent {begun} after the switch began, which did not end in time",
                );
            }
            return Ok(None);
        }
        Stage::Checking => (None, false),
        Stage::Pausing { sent } => (Some(sent), false),
        Stage::Paused { sent } => (Some(sent), true),
        Stage::Failed { sent } => (sent, false),
    };
    let mut conn = admin.connect().await?;
    let resumed = admin.resume_on(&mut conn).await?;
    if !resumed {
        if matches!(active.stage, Stage::Checking) {
            // The pool modes were not known yet: RECONNECT as session pools need it (harmless
            // for the others: server connections are replaced once released).
            admin
                .run(
                    &mut conn,
                    &admin.scoped("RECONNECT"),
                    Some(admin.cfg.connect_timeout),
                )
                .await?;
            info!(console, why, began = %active.why, "PgBouncer switch ended before PAUSE was sent: RECONNECT sent");
        } else {
            info!(console, why, began = %active.why, "PgBouncer was not paused at the end of the switch (RESUME: not paused)");
        }
        return Ok(None);
    }
    let paused = sent.unwrap_or(active.began).elapsed();
    let paused_text = humantime::format_duration(round_ms(paused));
    let paused_ms = paused.as_millis() as u64;
    match by {
        Ender::Caller if answered => info!(
            console, why, began = %active.why, paused_ms,
            "PgBouncer resumed after {paused_text} paused",
        ),
        Ender::Caller => info!(
            console, why, began = %active.why, paused_ms,
            "PgBouncer resumed after {paused_text}; its PAUSE had not answered yet (transactions were still running)",
        ),
        Ender::Deadline => warn!(
            console, began = %active.why, paused_ms,
            "PgBouncer resumed at {} ({}) after {paused_text} paused: the switch did not end in time{}",
            if active.bound == admin.cfg.pause_timeout { "pause_timeout" } else { "the crash hold's bound" },
            humantime::format_duration(active.bound),
            if answered { "" } else { " (its PAUSE never answered: transactions were still running)" },
        ),
        Ender::Dropped => warn!(
            console, began = %active.why, paused_ms,
            "PgBouncer resumed after {paused_text} paused: the pause was dropped without being ended",
        ),
    }
    Ok(Some(paused))
}

pub(super) fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The background half of [`Pause::begin`]: pool modes, then `PAUSE` and its answer.
pub(super) async fn run_pause(inner: Weak<Inner>, admin: Admin, gen: u64, sessions: bool) {
    let Some(transition) = inner.upgrade().map(|i| i.transition.clone()) else {
        return;
    };
    let ordering = transition.lock().await;
    let mut conn = match admin.connect().await {
        Ok(c) => c,
        Err(e) => return pause_failed(&inner, &admin, gen, None, e).await,
    };
    // The crash hold pauses whatever the pool modes (and asks nothing first: each round trip
    // is a moment in which a client's retry meets the dead server).
    if !sessions {
        match admin.session_pools_on(&mut conn).await {
            Err(e) => return pause_failed(&inner, &admin, gen, None, e).await,
            Ok(Some(pools)) => {
                if let Some(i) = inner.upgrade() {
                    i.set_stage(gen, Stage::Session);
                }
                info!(
                    console = admin.console(),
                    "PgBouncer not paused: {pools}, and PAUSE would wait for those clients to \
                     disconnect; the switch ends with RECONNECT instead",
                );
                return;
            }
            Ok(None) => {}
        }
    }
    let sent = Instant::now();
    match inner.upgrade() {
        Some(i) if i.set_stage(gen, Stage::Pausing { sent }) => {}
        _ => return,
    }
    info!(
        console = admin.console(),
        "PgBouncer: PAUSE sent (new transactions wait; it answers once running ones have finished)"
    );
    drop(ordering);
    // Unbounded here: the deadline task ends it.
    match admin.pause_on(&mut conn, None).await {
        Ok(fresh) => {
            let waited = sent.elapsed();
            if let Some(i) = inner.upgrade() {
                i.set_stage(gen, Stage::Paused { sent });
                i.count("ok");
            }
            info!(
                console = admin.console(),
                waited_ms = waited.as_millis() as u64,
                "PgBouncer paused: PAUSE answered after {}{}",
                humantime::format_duration(round_ms(waited)),
                if fresh {
                    ""
                } else {
                    " (it was already paused)"
                },
            );
        }
        Err(e) => pause_failed(&inner, &admin, gen, Some(sent), e).await,
    }
}

pub(super) async fn pause_failed(
    inner: &Weak<Inner>,
    admin: &Admin,
    gen: u64,
    sent: Option<Instant>,
    e: AdminError,
) {
    if let Some(i) = inner.upgrade() {
        i.set_stage(gen, Stage::Failed { sent });
        i.count("failed");
    }
    warn!(console = admin.console(), error = %e, "PgBouncer PAUSE failed; sending RESUME in case it took effect");
    match admin.resume().await {
        Ok(true) => info!(
            console = admin.console(),
            "PgBouncer resumed after its failed PAUSE"
        ),
        Ok(false) => {}
        Err(e) => {
            warn!(console = admin.console(), error = %e, "RESUME after a failed PAUSE failed too; the switch's end or the deadline tries again")
        }
    }
}

/// Resumes pause `gen` at its deadline unless it has ended; retries a failed `RESUME` a few
/// times, `connect_timeout` apart.
pub(super) async fn run_deadline(inner: Weak<Inner>, admin: Admin, gen: u64, after: Duration) {
    tokio::time::sleep(after).await;
    const TRIES: u32 = 3;
    for attempt in 1..=TRIES {
        let result = match inner.upgrade() {
            Some(i) => i.end("pause_timeout", Some(gen), Ender::Deadline).await,
            // Every handle was dropped where no runtime could take the RESUME: do it here.
            None => admin.resume().await.map(|_| None),
        };
        match result {
            Ok(_) => return,
            Err(e) if attempt < TRIES => {
                warn!(console = admin.console(), error = %e, attempt, "RESUME at pause_timeout failed; trying again");
                tokio::time::sleep(admin.cfg.connect_timeout).await;
            }
            Err(e) => {
                error!(
                    console = admin.console(),
                    error = %e,
                    "RESUME at pause_timeout failed {TRIES} times: PgBouncer may still be paused; \
                     haconfd keeps sending RESUME every {}s until it answers (by hand: RESUME on \
                     its admin console)",
                    OWED_RETRY.as_secs(),
                );
                if let Some(i) = inner.upgrade() {
                    let mut st = i.lock();
                    if st.current.as_ref().is_some_and(|a| a.gen == gen) {
                        st.current = None;
                    }
                }
                return resume_owed(inner, admin, gen).await;
            }
        }
    }
}

/// How often a `RESUME` that failed at the deadline is tried again.
pub(super) const OWED_RETRY: Duration = Duration::from_secs(5);

/// A `RESUME` still owed after the deadline's tries failed (PgBouncer's console unreachable
/// for a while): tried every [`OWED_RETRY`] until it answers, unless a newer pause took over
/// (its own end resumes) or the pause's owner is gone.
pub(super) async fn resume_owed(inner: Weak<Inner>, admin: Admin, gen: u64) {
    for attempt in 1u64.. {
        tokio::time::sleep(OWED_RETRY).await;
        let Some(i) = inner.upgrade() else { return };
        let _transition = i.transition.lock().await;
        if i.gens.load(Ordering::Relaxed) != gen || i.lock().current.is_some() {
            return;
        }
        match admin.resume().await {
            Ok(was_paused) => {
                i.count("ok");
                info!(
                    console = admin.console(),
                    was_paused, attempt, "the RESUME owed since pause_timeout answered"
                );
                return;
            }
            Err(e) => {
                i.count("failed");
                if attempt % 12 == 0 {
                    error!(console = admin.console(), error = %e, attempt, "RESUME still fails: PgBouncer may still be paused");
                }
            }
        }
    }
}
