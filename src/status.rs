//! The daemon's state as operators see it: etcd connection, watch revision, the last pass and the
//! cluster view. The daemon writes it after every pass; logs, readiness and `/status` read it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::Cluster;
use crate::pipeline::{Engine, PassError, PassOutcome};

/// Shared daemon state.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    /// The watch is established and current.
    pub etcd_connected: bool,
    /// The last etcd error while disconnected.
    pub etcd_error: Option<String>,
    /// The snapshot's revision.
    pub revision: i64,
    /// Re-lists after compaction or drift.
    pub relists: u64,
    /// Passes run.
    pub passes: u64,
    /// Passes failed.
    pub failed_passes: u64,
    /// Whether the last pass succeeded.
    pub last_pass_ok: Option<bool>,
    /// The last pass's error.
    pub last_error: Option<String>,
    /// The last pass's failure reason label.
    pub last_error_reason: Option<String>,
    /// When the last pass succeeded.
    #[serde(skip)]
    pub last_success: Option<Instant>,
    /// Seconds since the last successful pass.
    pub last_success_age_seconds: Option<f64>,
    /// Per-target counters.
    pub targets: BTreeMap<String, TargetStatus>,
    /// Leader changes seen.
    pub leader_changes: u64,
    /// The cluster of the last pass.
    pub cluster: Option<Cluster>,
    /// Config hot reloads applied.
    pub config_reloads: u64,
    /// Error of the last refused config reload.
    pub config_error: Option<String>,
    /// Duration of the last pass.
    pub last_pass_seconds: f64,
}

/// Counters for one target.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TargetStatus {
    /// Files written.
    pub writes: u64,
    /// Reloads sent.
    pub reloads: u64,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
}

impl Status {
    /// Records a pass's result.
    pub fn record_pass(
        &mut self,
        result: &Result<PassOutcome, PassError>,
        engine: &Engine,
        took: Duration,
    ) {
        self.passes += 1;
        self.last_pass_seconds = took.as_secs_f64();
        for t in &engine.settings().targets {
            self.targets.entry(t.name.clone()).or_default();
        }
        match result {
            Ok(o) => {
                self.last_pass_ok = Some(true);
                self.last_error = None;
                self.last_error_reason = None;
                self.last_success = Some(Instant::now());
                self.count(o);
            }
            Err(e) => {
                self.failed_passes += 1;
                self.last_pass_ok = Some(false);
                self.last_error = Some(format!("{e:#}"));
                self.last_error_reason = Some(e.reason().to_owned());
                let target = match e {
                    PassError::Reload { target, .. } => target.clone(),
                    _ => "*".to_owned(),
                };
                *self
                    .targets
                    .entry(target)
                    .or_default()
                    .failures
                    .entry(e.reason().to_owned())
                    .or_default() += 1;
            }
        }
        if let Some(c) = &engine.cluster {
            let old = self.cluster.as_ref().and_then(|c| c.leader_name.clone());
            if old.is_some() && old != c.leader_name && c.leader_name.is_some() {
                self.leader_changes += 1;
            }
            self.cluster = Some(c.clone());
        }
    }

    fn count(&mut self, o: &PassOutcome) {
        for n in &o.written {
            self.targets.entry(n.clone()).or_default().writes += 1;
        }
        for n in &o.reloaded {
            self.targets.entry(n.clone()).or_default().reloads += 1;
        }
    }

    /// Ready: etcd reachable, the watch current, and the last pass succeeded.
    pub fn ready(&self) -> bool {
        self.etcd_connected && self.last_pass_ok == Some(true)
    }

    /// A copy with the age fields filled, for `/status`.
    pub fn snapshot(&self) -> Status {
        let mut s = self.clone();
        s.last_success_age_seconds = self.last_success.map(|t| t.elapsed().as_secs_f64());
        s
    }
}
