//! The drift check: HAProxy's live primary servers compared with etcd's leader every
//! `drift_interval`, a warning (naming haconfd's own fence when it is the cause) when they
//! disagree past `drift_grace`, and a repair when HAProxy answers again or a drain no fence
//! accounts for is found.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::actuator::Job;
use super::fence::Fence;
use super::{lock, FailoverConfig, Route, Shared};
use crate::consumers::haproxy::runtime::{self, Move};

/// Compares HAProxy's live primary servers (`show servers state`) with etcd's leader every
/// `drift_interval`; warns, and sets the gauge, when they disagree for longer than
/// `drift_grace`, naming haconfd's own fence when it is the cause. Repairs HAProxy when it is
/// reachable again after it was not (a restart loads whatever state it had), and lifts a drain
/// that no fence accounts for.
pub(super) async fn drift_loop(
    routes: Arc<Vec<Route>>,
    shared: Arc<Mutex<Shared>>,
    cfg: FailoverConfig,
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    actuator: Option<mpsc::UnboundedSender<Job>>,
) {
    let mut drift = Drift {
        since: None,
        warned: false,
        gauge,
        grace: cfg.drift_grace,
    };
    let mut unreachable = vec![false; routes.len()];
    loop {
        tokio::time::sleep(cfg.drift_interval).await;
        // A leader under a crash hold is not UP for the repair: its PostgreSQL is down.
        let (leader, confirmed) = {
            let sh = lock(&shared);
            let held = sh.hold.as_ref().map(|h| h.member.name.clone());
            (
                sh.leader.clone(),
                sh.confirmed.clone().filter(|c| held.as_ref() != Some(c)),
            )
        };
        let mut disagree = Vec::new();
        let mut repair = false;
        for (i, r) in routes.iter().enumerate() {
            let Some(dump) = runtime::dump(&r.ss.stats_socket, Duration::from_secs(2)).await else {
                unreachable[i] = true;
                continue;
            };
            if std::mem::take(&mut unreachable[i]) {
                tracing::info!(target = %r.target, "HAProxy's runtime API answers again: repairing it to etcd's view");
                repair = true;
            }
            let seen = look(r, &dump, &shared, leader.as_deref());
            repair |= seen.stale_drain;
            disagree.extend(seen.disagreement);
        }
        if let (true, Some(a)) = (repair, &actuator) {
            let leader = confirmed.filter(|c| Some(c) == leader.as_ref());
            let _ = a.send(Job {
                mv: Move::Repair { leader },
                switch: false,
            });
        }
        drift.judge(leader.as_deref(), disagree);
    }
}

/// What one HAProxy's dump shows.
struct Seen {
    /// A drain in a primary backend that no fence accounts for.
    stale_drain: bool,
    /// How its live primaries disagree with the leader, if they do.
    disagreement: Option<String>,
}

fn look(r: &Route, dump: &str, shared: &Mutex<Shared>, leader: Option<&str>) -> Seen {
    let live = runtime::parse_live(dump);
    // Read after the dump: a fence decided meanwhile is in the set already.
    let fenced: BTreeMap<String, Fence> = lock(shared)
        .fences
        .iter()
        .map(|(s, f)| (s.clone(), f.clone()))
        .collect();
    let stale_drain = live.iter().any(|((b, s), l)| {
        r.ss.primary_backends.contains(b)
            && l.is_drained()
            && !l.in_maint()
            && !fenced.contains_key(s)
    });
    if stale_drain {
        tracing::warn!(target = %r.target, "a server is drained in a primary backend with no fence of haconfd's in force: lifting it (take a server out by hand with `state maint`)");
    }
    let disagreement = leader.and_then(|leader| {
        let primaries = runtime::live_primaries(&r.ss, dump);
        if primaries == [leader] {
            return None;
        }
        let fence = fenced
            .get(leader)
            .map(|f| {
                format!(
                    " ({leader} is drained by haconfd's fence: {}, {:.1}s ago)",
                    f.why.text(),
                    f.since.elapsed().as_secs_f64()
                )
            })
            .unwrap_or_default();
        Some(match (primaries.is_empty(), fence.is_empty()) {
            (true, true) => format!(
                "{}: no primary server UP (the leader fails its checks)",
                r.target
            ),
            (true, false) => format!("{}: no primary server takes connections{fence}", r.target),
            (false, _) => format!("{}: {} UP{fence}", r.target, primaries.join(", ")),
        })
    });
    Seen {
        stale_drain,
        disagreement,
    }
}

/// Whether HAProxy has disagreed with etcd's leader, since when, and whether that was told.
struct Drift {
    since: Option<Instant>,
    warned: bool,
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    grace: Duration,
}

impl Drift {
    /// One check's verdict: agreement ends a spell; a disagreement that outlasts the grace is
    /// warned about once and shown on the gauge.
    fn judge(&mut self, leader: Option<&str>, disagree: Vec<String>) {
        let Some(leader) = leader else {
            self.since = None;
            return;
        };
        if disagree.is_empty() {
            if self.warned {
                tracing::info!(leader = %leader, "HAProxy's primary agrees with etcd's leader again");
            }
            self.since = None;
            self.warned = false;
            if let Some(g) = &self.gauge {
                g.set(0);
            }
            return;
        }
        let start = *self.since.get_or_insert_with(Instant::now);
        if start.elapsed() >= self.grace && !self.warned {
            self.warned = true;
            if let Some(g) = &self.gauge {
                g.set(1);
            }
            tracing::warn!(leader = %leader, live = ?disagree, for_s = start.elapsed().as_secs(), "HAProxy's live primary servers disagree with etcd's leader");
        }
    }
}
