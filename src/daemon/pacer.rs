//! When the daemon runs its next pass: the coalescing and retry timing, apart from the loop that
//! waits for it. A change runs at once after a quiet spell (leading edge); after a pass that
//! wrote, the next waits out `daemon.min_interval`, taking whatever is newest then; after a pass
//! that wrote nothing (a Patroni heartbeat) the next waits 29× as long as that pass took, at most
//! 400 ms, so that no-op passes use at most a thirtieth of a core however fast events arrive (a
//! thousand clusters: 300 heartbeats a second, passes of about 10 ms); a
//! failed pass is retried after `daemon.retry_interval`. An urgent change (the `leader` or
//! `failover` key, a confirmed new leader) skips both waits: the failover fast path must not sit
//! behind a coalescing delay.

use std::time::Duration;

use tokio::time::Instant;

/// How many times its own duration a no-op pass waits before the next pass.
pub const NO_OP_DUTY_FACTOR: u32 = 29;
/// The longest such wait, whatever one pass took.
pub const MAX_NO_OP_PAUSE: Duration = Duration::from_millis(400);

/// The pass timing state.
#[derive(Debug, Clone)]
pub struct Pacer {
    min_interval: Duration,
    retry_interval: Duration,
    /// A change arrived since the last pass started.
    pending: bool,
    /// One of those changes is urgent.
    urgent: bool,
    /// When the last pass that wrote ended.
    last_write: Option<Instant>,
    /// No pass before this (after a no-op pass).
    quiet_until: Option<Instant>,
    /// A failed pass is retried at this time.
    retry_at: Option<Instant>,
}

/// How a pass ended, for the timing of the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It wrote a file (or a consumer's reload was attempted).
    Wrote,
    /// It wrote nothing, in `took`.
    NoOp {
        /// How long the pass took.
        took: Duration,
    },
}

impl Pacer {
    /// A pacer with nothing pending.
    pub fn new(min_interval: Duration, retry_interval: Duration) -> Pacer {
        Pacer {
            min_interval,
            retry_interval,
            pending: false,
            urgent: false,
            last_write: None,
            quiet_until: None,
            retry_at: None,
        }
    }

    /// New settings (a config reload); what is pending stays.
    pub fn set_intervals(&mut self, min_interval: Duration, retry_interval: Duration) {
        self.min_interval = min_interval;
        self.retry_interval = retry_interval;
    }

    /// A change to apply; `urgent` ones skip the waits.
    pub fn changed(&mut self, urgent: bool) {
        self.pending = true;
        self.urgent |= urgent;
    }

    /// Forgets what is pending and any retry (the input was replaced, e.g. a new source).
    pub fn reset(&mut self) {
        self.pending = false;
        self.urgent = false;
        self.retry_at = None;
    }

    /// When the next pass should run: None while there is nothing to do.
    pub fn due(&self) -> Option<Instant> {
        if !self.pending {
            return self.retry_at;
        }
        if self.urgent {
            return Some(Instant::now());
        }
        let after_write = self.last_write.map(|t| t + self.min_interval);
        let at = after_write.into_iter().chain(self.quiet_until).max();
        Some(at.unwrap_or_else(Instant::now))
    }

    /// Whether the retry timer is what makes the next pass due (for the log).
    pub fn retrying(&self) -> bool {
        !self.pending && self.retry_at.is_some()
    }

    /// A pass starts: everything pending is in it.
    pub fn start(&mut self) {
        self.pending = false;
        self.urgent = false;
        self.retry_at = None;
    }

    /// A pass ended at `now`; `retry` says whether it failed in a way worth retrying.
    pub fn finished(&mut self, now: Instant, outcome: Outcome, retry: bool) {
        match outcome {
            Outcome::Wrote => {
                self.last_write = Some(now);
                self.quiet_until = None;
            }
            Outcome::NoOp { took } => {
                self.quiet_until = Some(now + (took * NO_OP_DUTY_FACTOR).min(MAX_NO_OP_PAUSE));
            }
        }
        self.retry_at = retry.then(|| now + self.retry_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(500);
    const RETRY: Duration = Duration::from_secs(5);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_change_runs_at_once_and_the_next_after_min_interval() {
        let mut p = Pacer::new(MIN, RETRY);
        assert_eq!(p.due(), None);
        let t0 = Instant::now();
        p.changed(false);
        assert!(p.due().unwrap() <= t0);
        p.start();
        p.finished(t0, Outcome::Wrote, false);
        assert_eq!(p.due(), None);
        tokio::time::advance(ms(100)).await;
        p.changed(false);
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + MIN), "coalesced until min_interval");
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_change_does_not_wait_for_min_interval_or_the_no_op_pause() {
        let mut p = Pacer::new(MIN, RETRY);
        let t0 = Instant::now();
        p.changed(false);
        p.start();
        p.finished(t0, Outcome::Wrote, false);
        tokio::time::advance(ms(10)).await;
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + MIN));
        // The leader key moves while the coalescing wait is on: the pass runs at once.
        p.changed(true);
        assert!(p.due().unwrap() <= Instant::now());
        p.start();
        p.finished(Instant::now(), Outcome::NoOp { took: ms(5) }, false);
        p.changed(true);
        assert!(p.due().unwrap() <= Instant::now());
        // Urgency is spent by the pass that ran: the next ordinary change waits for
        // min_interval after the last write again.
        p.start();
        p.finished(Instant::now(), Outcome::NoOp { took: ms(5) }, false);
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn no_op_passes_keep_a_thirtieth_of_a_core_at_most_400ms_apart() {
        let mut p = Pacer::new(MIN, RETRY);
        let t0 = Instant::now();
        p.changed(false);
        p.start();
        p.finished(t0, Outcome::NoOp { took: ms(4) }, false);
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + ms(116)));
        p.start();
        p.finished(t0, Outcome::NoOp { took: ms(20) }, false);
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + MAX_NO_OP_PAUSE));
        // A write since lifts the no-op pause; min_interval applies instead.
        p.start();
        p.finished(t0, Outcome::Wrote, false);
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pass_is_retried_after_retry_interval_and_a_success_cancels_it() {
        let mut p = Pacer::new(MIN, RETRY);
        let t0 = Instant::now();
        p.changed(false);
        p.start();
        p.finished(t0, Outcome::NoOp { took: ms(1) }, true);
        assert_eq!(p.due(), Some(t0 + RETRY));
        assert!(p.retrying());
        // A change comes first: it runs (after the no-op pause), and the retry is in it.
        p.changed(false);
        assert_eq!(p.due(), Some(t0 + ms(1) * NO_OP_DUTY_FACTOR));
        p.start();
        p.finished(t0 + ms(1) * NO_OP_DUTY_FACTOR, Outcome::Wrote, false);
        assert_eq!(p.due(), None);
        // A reload of the source forgets a pending retry.
        p.changed(false);
        p.start();
        p.finished(t0, Outcome::Wrote, true);
        p.reset();
        assert_eq!(p.due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_sleeping_until_due_coalesces_a_burst_into_two_passes() {
        let mut p = Pacer::new(MIN, RETRY);
        let start = Instant::now();
        let mut passes = Vec::new();
        // 30 changes 10 ms apart; a pass takes 20 ms and writes.
        for i in 0..30u64 {
            tokio::time::sleep_until(start + ms(10 * i)).await;
            p.changed(false);
            while let Some(due) = p.due().filter(|d| *d <= Instant::now()) {
                let _ = due;
                p.start();
                tokio::time::advance(ms(20)).await;
                passes.push(Instant::now() - start);
                p.finished(Instant::now(), Outcome::Wrote, false);
            }
        }
        if let Some(due) = p.due() {
            tokio::time::sleep_until(due).await;
            p.start();
            passes.push(Instant::now() - start);
            p.finished(Instant::now(), Outcome::Wrote, false);
        }
        assert_eq!(passes.len(), 2, "{passes:?}");
        assert_eq!(passes[0], ms(20));
        assert_eq!(passes[1], ms(520));
    }
}
