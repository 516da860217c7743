//! The one writer to HAProxy's runtime API: moves applied to every HAProxy in the order they
//! were decided, each against HAProxy's live state, every answer checked.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{lock, Observers, Route, Router, Shared};
use crate::consumers::haproxy::runtime::{self, Move};

/// One job for the actuator: a move, for every HAProxy.
pub(super) struct Job {
    pub(super) mv: Move,
    /// Whether its completion is the leader change's "HAProxy switched" moment.
    pub(super) switch: bool,
}

/// The actuator task and the way to it.
pub(super) struct Actuator {
    pub(super) tx: mpsc::UnboundedSender<Job>,
    pub(super) task: JoinHandle<()>,
}

impl Router {
    /// The way to the actuator, started on first use (None when there is no HAProxy to move).
    pub(super) fn actuator(&mut self) -> Option<mpsc::UnboundedSender<Job>> {
        if self.routes.is_empty() {
            return None;
        }
        if self.actuator.as_ref().is_none_or(|a| a.tx.is_closed()) {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(actuate(
                rx,
                Arc::clone(&self.routes),
                Arc::clone(&self.shared),
                self.observers.clone(),
            ));
            self.actuator = Some(Actuator { tx, task });
        }
        self.actuator.as_ref().map(|a| a.tx.clone())
    }

    pub(super) fn send(&mut self, mv: Move) {
        if let Some(a) = self.actuator() {
            let _ = a.send(Job { mv, switch: false });
        }
    }
}

/// What a move did on one HAProxy.
pub(super) enum Moved {
    /// Every command answered as carried out (or none was needed).
    Done(Vec<String>),
    /// HAProxy answered some commands with an error.
    Refused(Vec<runtime::Refused>),
    /// The socket could not be reached.
    Unreachable(std::io::Error),
}

/// One move on one HAProxy: its live state (`show servers state` of the route's backends, on
/// one connection), then each command on its own connection, each answer checked.
pub(super) async fn move_one(r: &Route, mv: &Move, fenced: &BTreeSet<String>) -> Moved {
    const LIMIT: Duration = Duration::from_secs(2);
    let dump = match crate::consumers::haproxy::cli(
        &r.ss.stats_socket,
        &runtime::dump_command(&r.ss),
        LIMIT,
    )
    .await
    {
        Ok(d) => d,
        Err(e) => return Moved::Unreachable(e),
    };
    let live = runtime::parse_live(&dump);
    let cmds = runtime::move_commands(&r.ss, &live, mv, fenced);
    if let Move::Fence { old } = mv {
        let maint = live
            .iter()
            .any(|((b, s), l)| s == old && r.ss.primary_backends.contains(b) && l.in_maint());
        if maint {
            tracing::warn!(target = %r.target, server = %old, "the old primary is in maintenance (an operator's): not drained, left as it is");
        }
    }
    if cmds.is_empty() {
        return Moved::Done(cmds);
    }
    match runtime::apply_commands(&r.ss.stats_socket, &cmds, LIMIT).await {
        Ok(refused) if refused.is_empty() => Moved::Done(cmds),
        Ok(refused) => Moved::Refused(refused),
        Err(e) => Moved::Unreachable(e),
    }
}

/// The one writer to HAProxy's runtime API: applies each move to every HAProxy, in order, and
/// checks every answer. A refused or undeliverable move is an error in the log, in `/status`
/// and in `haconfd_failover_moves_total`; the health checks stay in charge then.
pub(super) async fn actuate(
    mut rx: mpsc::UnboundedReceiver<Job>,
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    observers: Observers,
) {
    while let Some(job) = rx.recv().await {
        let mut ok = true;
        // The fences in force when the move is made: a fence decided after this move was
        // queued is in the set already, and its own move follows this one.
        let fenced: BTreeSet<String> = lock(&shared).fences.keys().cloned().collect();
        for r in routes.iter() {
            match move_one(r, &job.mv, &fenced).await {
                Moved::Done(cmds) => {
                    if !cmds.is_empty() {
                        observers.count_move("haproxy", "ok");
                        tracing::info!(target = %r.target, commands = ?cmds, "HAProxy moved through the runtime API");
                    }
                }
                Moved::Refused(refused) => {
                    ok = false;
                    observers.count_move("haproxy", "refused");
                    let text = refused
                        .iter()
                        .map(|f| format!("{:?}: {}", f.command, f.answer))
                        .collect::<Vec<_>>()
                        .join("; ");
                    tracing::error!(target = %r.target, socket = %r.ss.stats_socket.display(), refused = %text, "HAProxy refused runtime API commands (the stats socket needs `level admin`); its health checks stay in charge");
                    record_refusal(&shared, format!("{}: {text}", r.target));
                }
                Moved::Unreachable(e) => {
                    ok = false;
                    observers.count_move("haproxy", "unreachable");
                    tracing::error!(target = %r.target, socket = %r.ss.stats_socket.display(), error = %e, "cannot reach HAProxy's runtime API; its health checks stay in charge");
                    record_refusal(
                        &shared,
                        format!(
                            "{}: {} unreachable: {e}",
                            r.target,
                            r.ss.stats_socket.display()
                        ),
                    );
                }
            }
        }
        if job.switch && ok {
            let now = Instant::now();
            let mut sh = lock(&shared);
            if let (Move::Promote { new, .. }, Some(t)) = (&job.mv, sh.timeline.as_mut()) {
                if t.new == *new {
                    t.haproxy_after_ms = t.ms_since_key(now);
                    if let (Some(h), Some(ms)) = (&observers.haproxy, t.haproxy_after_ms) {
                        h.observe(ms / 1000.0);
                    }
                    tracing::info!(leader = %new, after_ms = ?t.haproxy_after_ms, "HAProxy follows the new primary");
                }
            }
        }
    }
}

pub(super) fn record_refusal(shared: &Mutex<Shared>, what: String) {
    let mut sh = lock(shared);
    sh.moves_refused += 1;
    sh.last_refused = Some(what);
}
