//! What the fast path shows and counts: the last leader change's timeline ([`Timeline`], read
//! live through [`TimelineView`]), the fences in force and the moves refused ([`FastPath`]), and
//! the metrics it feeds ([`Observers`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use super::{lock, Shared};
use crate::consumers::haproxy::server_state::ServerStateConfig;
use crate::consumers::pgbouncer::pause::{PauseState, PauseWatch};

/// One leader change as the fast path handled it, for `/status`: times in milliseconds after
/// the pass that saw the new leader key.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// The leader before.
    pub old: Option<String>,
    /// The new leader.
    pub new: String,
    /// When the new leader key was seen (Unix seconds).
    pub leader_key_at: f64,
    /// How long before the leader key the switchover was requested, if it was.
    pub switchover_requested_ms_before: Option<f64>,
    /// When the candidate was confirmed to take writes.
    pub confirmed_after_ms: Option<f64>,
    /// What confirmed it: `rest` (its `/primary` answer) or `member key` (its role).
    pub confirmed_by: Option<&'static str>,
    /// When HAProxy's runtime API took the move (every command answered as carried out).
    pub haproxy_after_ms: Option<f64>,
    /// When PgBouncer was re-pointed (reloaded on the new file, resumed).
    pub pgbouncer_after_ms: Option<f64>,
    #[serde(skip)]
    pub(super) seen: Option<Instant>,
}

impl Timeline {
    /// The timeline of a change to `new`, whose leader key the pass at `now` saw.
    pub(super) fn begin(sh: &Shared, new: &str, now: Instant) -> Timeline {
        Timeline {
            old: sh.moved.clone().filter(|o| *o != new),
            new: new.to_owned(),
            leader_key_at: super::unix_now(),
            switchover_requested_ms_before: sh
                .switchover_at
                .map(|s| now.saturating_duration_since(s).as_secs_f64() * 1000.0),
            confirmed_after_ms: None,
            confirmed_by: None,
            haproxy_after_ms: None,
            pgbouncer_after_ms: None,
            seen: Some(now),
        }
    }

    pub(super) fn ms_since_key(&self, t: Instant) -> Option<f64> {
        self.seen
            .map(|s| t.saturating_duration_since(s).as_secs_f64() * 1000.0)
    }
}

/// The last leader change, serialized as it is when read (see [`super::Router::view`]), and
/// what the fast path acts on (HAProxy's stats sockets, PgBouncer's pauses) for `/status`.
#[derive(Clone, Default)]
pub struct TimelineView(pub(super) Option<Arc<Mutex<Shared>>>, pub(super) Reach);

/// The consumers a cluster's fast path acts on: its HAProxy routes, and a weak watch on each
/// PgBouncer pause (a view never keeps a pause alive).
#[derive(Clone, Default)]
pub(super) struct Reach {
    pub(super) routes: Arc<Vec<super::Route>>,
    pub(super) pauses: Vec<(String, PauseWatch)>,
}

impl TimelineView {
    /// The timeline now.
    pub fn get(&self) -> Option<Timeline> {
        self.0.as_ref().and_then(|s| lock(s).timeline.clone())
    }

    /// The fences in force now, and the last move a consumer refused.
    pub fn fast_path(&self) -> FastPath {
        let Some(shared) = &self.0 else {
            return FastPath::default();
        };
        let sh = lock(shared);
        let now = Instant::now();
        FastPath {
            fences: sh
                .fences
                .iter()
                .map(|(server, f)| FenceView {
                    server: server.clone(),
                    why: f.why.text(),
                    since: f.since_unix,
                    for_s: round3(now.saturating_duration_since(f.since).as_secs_f64()),
                    lifted_in_s: round3(f.until.saturating_duration_since(now).as_secs_f64()),
                })
                .collect(),
            moves_refused: sh.moves_refused,
            last_refused: sh.last_refused.clone(),
            crash_hold: sh.hold.as_ref().map(|h| HoldView {
                server: h.member.name.clone(),
                why: h.why.clone(),
                since: h.since_unix,
                for_s: round3(now.saturating_duration_since(h.since).as_secs_f64()),
                bound_s: round3(h.bound.as_secs_f64()),
                released_in_s: round3(
                    (h.since + h.bound)
                        .saturating_duration_since(now)
                        .as_secs_f64(),
                ),
            }),
            change_under_way_s: sh
                .changing_since
                .map(|t| round3(now.saturating_duration_since(t).as_secs_f64())),
            pauses: self
                .1
                .pauses
                .iter()
                .filter_map(|(target, w)| {
                    w.state().map(|state| PauseView {
                        target: target.clone(),
                        state,
                    })
                })
                .collect(),
        }
    }

    /// The HAProxy targets the fast path moves for this cluster, with their stats socket and
    /// this cluster's backends.
    pub fn haproxy_routes(&self) -> Vec<(String, ServerStateConfig)> {
        self.1
            .routes
            .iter()
            .map(|r| (r.target.clone(), r.ss.clone()))
            .collect()
    }
}

/// Rounds seconds to the millisecond, as `/status` shows them.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl std::fmt::Debug for TimelineView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Serialize for TimelineView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

/// What the fast path holds on the consumers now, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FastPath {
    /// Servers haconfd has drained in the primary backends, and why.
    pub fences: Vec<FenceView>,
    /// Runtime-API moves HAProxy refused or could not be sent since start.
    pub moves_refused: u64,
    /// The last of them.
    pub last_refused: Option<String>,
    /// Seconds since a leader change began (a fence, or a candidate not yet confirmed), while
    /// one is under way: HAProxy's reloads wait, and hold.lua (where configured) holds new
    /// connections to the primary port.
    pub change_under_way_s: Option<f64>,
    /// PgBouncer pauses in progress.
    pub pauses: Vec<PauseView>,
    /// The crash hold in force: the primary's PostgreSQL is down and its clients wait.
    pub crash_hold: Option<HoldView>,
}

/// A crash hold in force, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct HoldView {
    /// The primary whose PostgreSQL is down.
    pub server: String,
    /// What the probes saw (and its REST API's answer).
    pub why: String,
    /// When it began (Unix seconds).
    pub since: f64,
    /// Seconds it has lasted.
    pub for_s: f64,
    /// Its bound: the cluster's lease, capped by `failover.crash_hold.max`.
    pub bound_s: f64,
    /// Seconds until the bound releases it, unless a primary takes writes first.
    pub released_in_s: f64,
}

/// A PgBouncer pause in progress.
#[derive(Debug, Clone, Serialize)]
pub struct PauseView {
    /// The PgBouncer target.
    pub target: String,
    /// Where the pause stands.
    #[serde(flatten)]
    pub state: PauseState,
}

/// One fence in force.
#[derive(Debug, Clone, Serialize)]
pub struct FenceView {
    /// The drained server.
    pub server: String,
    /// Why: `switchover requested`, `leader lost`, `leader key moved`.
    pub why: &'static str,
    /// When it began (Unix seconds).
    pub since: f64,
    /// Seconds it has lasted.
    pub for_s: f64,
    /// Seconds until its bound lifts it, unless the change ends first.
    pub lifted_in_s: f64,
}

/// What the fast path observes into `/metrics`: histograms and counters shared with
/// [`crate::metrics`].
#[derive(Clone, Default)]
pub struct Observers {
    /// Leader key → HAProxy switched, seconds.
    pub haproxy: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Leader key → PgBouncer switched, seconds.
    pub pgbouncer: Option<prometheus_client::metrics::histogram::Histogram>,
    /// 1 while HAProxy's live primaries disagree with etcd's leader past the grace.
    pub drift: Option<prometheus_client::metrics::gauge::Gauge>,
    /// Moves by consumer and result (`ok`, `refused`, `unreachable`, `failed`).
    pub moves: Option<Family<Vec<(String, String)>, Counter>>,
    /// Fences lifted by their bound, not by the end of a change.
    pub fences_expired: Option<Counter>,
    /// How long crash holds lasted, seconds.
    pub crash_hold: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Crash holds by how they ended (`new_leader`, `recovered`, `bound`, `shutdown`).
    pub crash_holds: Option<Family<Vec<(String, String)>, Counter>>,
    /// The crash hold's hook events (`primary_down_detected`, `hold_released`), to the daemon.
    pub hook_events: Option<tokio::sync::mpsc::UnboundedSender<crate::hooks::HookEvent>>,
}

impl Observers {
    /// Counts one move of `consumer` with `result`.
    pub fn count_move(&self, consumer: &str, result: &str) {
        if let Some(f) = &self.moves {
            f.get_or_create(&vec![
                ("consumer".to_owned(), consumer.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .inc();
        }
    }
}
