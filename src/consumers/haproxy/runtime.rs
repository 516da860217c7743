//! HAProxy's runtime API as the failover fast path uses it: the live state of a route's
//! backends (`show servers state`), the commands a [`Move`] takes against it, and the answers
//! checked one by one. Who owns which state: in the primary backends a forced drain is haconfd's
//! fence; maintenance is an operator's and is never touched.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::settings::ServerStateConfig;

/// A change of who takes writes, made through HAProxy's runtime API ahead of the health checks
/// (about 2 s at `inter 1s fall 2 rise 2`). The checks keep running and agree once the move is
/// made (the confirmed leader answers 200 on `/primary`, the others 503), so nothing flaps; if
/// one disagrees, the checks win within `fall` intervals.
///
/// Who owns which state: in the primary backends, a forced drain (`state drain`) is haconfd's
/// fence and never outlives it: every move but a fence lifts a drain that no fence in force
/// accounts for. Maintenance (`state maint`, or any other maintenance flag) is an operator's and
/// is never set, lifted or drained over by haconfd. The replica backends are never drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// The leader is stepping down (switchover requested, or its leader key is gone): no new
    /// connection goes to it (`state drain`); its open sessions go on until it is demoted.
    Fence {
        /// The leader stepping down.
        old: String,
    },
    /// Fences that ended without a new leader (a switchover cancelled, a fence past its
    /// bound, shutdown): the drain of each of `servers` is lifted.
    Unfence {
        /// The servers haconfd drained.
        servers: Vec<String>,
    },
    /// `new` is confirmed to take writes: UP in the primary backends and DOWN in the replica
    /// backends; each of `demote` DOWN in the primary backends (its sessions shut); every drain
    /// no fence in force accounts for lifted.
    Promote {
        /// The confirmed leader.
        new: String,
        /// Earlier leaders to take out of the primary backends.
        demote: Vec<String>,
    },
    /// haconfd's start, or HAProxy reachable again: HAProxy made to agree with etcd. With a
    /// leader confirmed to take writes: the leader UP in the primary backends and DOWN in the
    /// replica backends, every other server UP in a primary backend set DOWN (its sessions
    /// shut), then every drain no fence in force accounts for lifted. With none: only the drains
    /// of servers that are DOWN are lifted.
    Repair {
        /// The leader, confirmed to take writes.
        leader: Option<String>,
    },
    /// The cluster became a standby cluster (`standby_cluster` added to its `config` key): its
    /// leader, which took writes, is set DOWN in the primary backends (its sessions shut: it
    /// restarts as a standby).
    Demote {
        /// The leader that took writes.
        old: String,
    },
}

/// `srv_admin_state` flags of `show servers state` (HAProxy's `SRV_ADMF_*`).
pub(super) mod admin {
    /// Forced maintenance (`set server … state maint`).
    pub const FMAINT: u32 = 0x01;
    /// Maintenance inherited from a tracked server.
    pub const IMAINT: u32 = 0x02;
    /// Maintenance from the configuration (`disabled`).
    pub const CMAINT: u32 = 0x04;
    /// Forced drain (`set server … state drain`): haconfd's fence.
    pub const FDRAIN: u32 = 0x08;
    /// Maintenance because the address did not resolve.
    pub const RMAINT: u32 = 0x20;
    /// Maintenance because the address is not set (`init-addr none`).
    pub const HMAINT: u32 = 0x40;
    /// Any maintenance.
    pub const MAINT: u32 = FMAINT | IMAINT | CMAINT | RMAINT | HMAINT;
}

/// One server of a live `show servers state` dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveServer {
    /// `srv_op_state`: 0 stopped (DOWN), 1 starting, 2 running (UP), 3 stopping.
    pub op: u8,
    /// `srv_admin_state` flags.
    pub admin: u32,
}

impl LiveServer {
    /// UP by its checks or by `health up`.
    pub fn is_up(&self) -> bool {
        self.op == 2
    }

    /// Forced into drain (haconfd's fence, in the primary backends).
    pub fn is_drained(&self) -> bool {
        self.admin & admin::FDRAIN != 0
    }

    /// In any maintenance: an operator's, or HAProxy's own (an address that did not resolve).
    pub fn in_maint(&self) -> bool {
        self.admin & admin::MAINT != 0
    }
}

/// The servers of a live dump, by backend and server name.
pub type Live = BTreeMap<(String, String), LiveServer>;

/// Reads a `show servers state` dump (of one backend, several, or all).
pub fn parse_live(dump: &str) -> Live {
    dump.lines()
        .filter_map(StateLine::parse)
        .map(|l| {
            let server = LiveServer {
                op: l.fields[5].parse().unwrap_or(0),
                admin: l.fields[6].parse().unwrap_or(0),
            };
            ((l.backend().to_owned(), l.server().to_owned()), server)
        })
        .collect()
}

/// The runtime API commands for `mv`, for the servers HAProxy has (`live`) in the backends of
/// `cfg`. `fenced` are the servers whose fence is in force: their drain stays. A server in
/// maintenance is never touched but by `health` commands, which do not lift maintenance.
///
/// The order matters to connections the hold action is holding (they go to the first server
/// that becomes usable): the new leader comes UP first, the servers leaving go DOWN next, and
/// only then are drains lifted, so that no held connection is ever handed to a server on its
/// way out.
pub fn move_commands(
    cfg: &ServerStateConfig,
    live: &Live,
    mv: &Move,
    fenced: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let (mut up, mut down, mut lift, mut replica_down) = (vec![], vec![], vec![], vec![]);
    for ((backend, name), s) in live {
        let primary = cfg.primary_backends.contains(backend);
        let replica = cfg.replica_backends.contains(backend);
        let at = format!("{backend}/{name}");
        if primary {
            // Lift a drain no fence in force accounts for (not for a fence, which sets one).
            let lifts = match mv {
                Move::Fence { .. } | Move::Demote { .. } => false,
                Move::Unfence { servers } => servers.contains(name),
                Move::Promote { .. }
                | Move::Repair {
                    leader: Some(_), ..
                } => true,
                // No leader confirmed yet: a server UP stays drained until one is (it may be
                // an old primary the checks have not caught).
                Move::Repair { leader: None } => !s.is_up(),
            };
            if lifts && s.is_drained() && !s.in_maint() && !fenced.contains(name) {
                lift.push(format!("set server {at} state ready"));
            }
        }
        let leaving = |down: &mut Vec<String>| {
            down.push(format!("set server {at} health down"));
            down.push(format!("shutdown sessions server {at}"));
        };
        match mv {
            Move::Fence { old } if primary && name == old && !s.is_drained() && !s.in_maint() => {
                down.push(format!("set server {at} state drain"));
            }
            Move::Demote { old } if primary && name == old => leaving(&mut down),
            Move::Promote { new, demote } => {
                if name == new {
                    if primary {
                        up.push(format!("set server {at} health up"));
                    } else if replica {
                        replica_down.push(format!("set server {at} health down"));
                    }
                } else if primary && demote.contains(name) {
                    leaving(&mut down);
                }
            }
            Move::Repair {
                leader: Some(leader),
            } => {
                if name == leader {
                    if primary && !s.is_up() {
                        up.push(format!("set server {at} health up"));
                    } else if replica && s.is_up() {
                        replica_down.push(format!("set server {at} health down"));
                    }
                } else if primary && s.is_up() && !s.in_maint() {
                    leaving(&mut down);
                }
            }
            _ => {}
        }
    }
    [up, down, lift, replica_down].concat()
}

/// The backends a move acts on, as one `show servers state` command per backend (HAProxy runs
/// `;`-separated commands in order, on one connection).
pub fn dump_command(cfg: &ServerStateConfig) -> String {
    cfg.primary_backends
        .iter()
        .chain(&cfg.replica_backends)
        .map(|b| format!("show servers state {b}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The servers that take new connections in the primary backends of a `show servers state`
/// dump: UP (`srv_op_state` 2) with no administrative state (maint or drain). Sorted, once
/// each.
pub fn live_primaries(cfg: &ServerStateConfig, dump: &str) -> Vec<String> {
    let live: std::collections::BTreeSet<String> = dump
        .lines()
        .filter_map(StateLine::parse)
        .filter(|l| cfg.primary_backends.iter().any(|b| b == l.backend()))
        .filter(|l| l.fields[5] == "2" && l.fields[6] == "0")
        .map(|l| l.server().to_owned())
        .collect();
    live.into_iter().collect()
}

/// A runtime API command HAProxy answered with an error (`Permission denied` from a stats
/// socket below `level admin`, `No such server.`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The command sent.
    pub command: String,
    /// HAProxy's answer.
    pub answer: String,
}

/// Sends the commands on one connection (HAProxy runs `;`-separated commands in order) and
/// checks each answer: HAProxy ends each command's answer with an empty line, and answers a
/// command it carried out with nothing but that line, one it refused with the reason. Returns
/// the refused commands; an error when the socket cannot be reached.
pub async fn apply_commands(
    stats_socket: &Path,
    cmds: &[String],
    timeout: Duration,
) -> std::io::Result<Vec<Refused>> {
    let answer = crate::consumers::haproxy::cli(stats_socket, &cmds.join(";"), timeout).await?;
    Ok(refusals(cmds, &answer))
}

/// The commands of `cmds` whose answer in `answer` (one answer per command, each ended by an
/// empty line) is not empty. An answer that cannot be split so is laid on every command.
fn refusals(cmds: &[String], answer: &str) -> Vec<Refused> {
    let answers = super::split_answers(answer);
    if answers.len() != cmds.len() {
        let all = answer.trim();
        return if all.is_empty() {
            Vec::new()
        } else {
            cmds.iter()
                .map(|c| Refused {
                    command: c.clone(),
                    answer: all.to_owned(),
                })
                .collect()
        };
    }
    cmds.iter()
        .zip(answers)
        .filter(|(_, a)| !a.is_empty())
        .map(|(c, a)| Refused {
            command: c.clone(),
            answer: a,
        })
        .collect()
}

/// The level of `stats_socket` (`show cli level`: `admin`, `operator` or `user`); None when
/// HAProxy is not reachable there. The fast path's moves need `admin`.
pub async fn socket_level(stats_socket: &Path, timeout: Duration) -> Option<String> {
    crate::consumers::haproxy::cli(stats_socket, "show cli level", timeout)
        .await
        .ok()
        .map(|a| a.trim().to_owned())
}

/// Dumps `show servers state` from the admin socket; None when HAProxy is not reachable.
pub async fn dump(stats_socket: &Path, timeout: Duration) -> Option<String> {
    match crate::consumers::haproxy::cli(stats_socket, "show servers state", timeout).await {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::debug!(socket = %stats_socket.display(), error = %e, "no live server state");
            None
        }
    }
}

/// One line of `show servers state`, split in fields.
#[derive(Debug, Clone)]
pub(super) struct StateLine {
    pub(super) fields: Vec<String>,
}

impl StateLine {
    pub(super) fn parse(line: &str) -> Option<Self> {
        let fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        // be_id .. srv_port are the first 19 fields in every 2.x version.
        (fields.len() >= 19 && !line.starts_with('#')).then_some(Self { fields })
    }
    pub(super) fn backend(&self) -> &str {
        &self.fields[1]
    }
    pub(super) fn server(&self) -> &str {
        &self.fields[3]
    }
    pub(super) fn addr(&self) -> &str {
        &self.fields[4]
    }
    pub(super) fn port(&self) -> Option<u16> {
        self.fields[18].parse().ok()
    }
    /// srv_op_state 0 = stopped (DOWN).
    pub(super) fn is_down(&self) -> bool {
        self.fields[5] == "0"
    }
    pub(super) fn force_down(&mut self) {
        // As HAProxy dumps a server that failed its checks: stopped, result "failed", health 0,
        // so it needs `rise` good checks to come UP. A check status of 0 would keep it DOWN for
        // good, so an unknown status becomes 1.
        self.fields[5] = "0".into();
        if self.fields[10] == "0" {
            self.fields[10] = "1".into();
        }
        self.fields[11] = "2".into();
        self.fields[12] = "0".into();
    }
    /// Lifts a forced drain (haconfd's fence) unless the server is in maintenance too: reloads
    /// are deferred while a fence is in force, so a drain in a primary backend's dump is one that
    /// outlived its fence (a SIGKILL mid-switch) and must not reach the new worker.
    pub(super) fn clear_drain(&mut self) {
        let flags: u32 = self.fields[6].parse().unwrap_or(0);
        if flags & admin::FDRAIN != 0 && flags & admin::MAINT == 0 {
            self.fields[6] = (flags & !admin::FDRAIN).to_string();
        }
    }
    /// The dump repeats the check port as the agent port; loaded back into a server without agent
    /// checks, HAProxy warns "server-state partially applied" on every reload. The agent's port
    /// comes from the config anyway.
    pub(super) fn clear_agent_port(&mut self) {
        if let Some(port) = self.fields.get_mut(24) {
            *port = "0".into();
        }
    }
    pub(super) fn render(&self) -> String {
        self.fields.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServerStateConfig {
        super::super::server_state::test_config()
    }

    /// A live dump line: backend, server, op state, admin state.
    fn live_line(backend: &str, server: &str, op: u8, admin: u32) -> String {
        format!("3 {backend} 1 {server} 127.0.0.1 {op} {admin} 1 1 20 15 3 4 6 0 0 0 - 5441 - 0 0 - - 0\n")
    }

    fn live(lines: &[(&str, &str, u8, u32)]) -> Live {
        let dump: String = lines
            .iter()
            .map(|(b, s, o, a)| live_line(b, s, *o, *a))
            .collect();
        parse_live(&format!("1\n# header\n{dump}"))
    }

    fn none() -> std::collections::BTreeSet<String> {
        Default::default()
    }

    #[test]
    fn moves_name_only_the_servers_each_backend_lists() {
        let up = live(&[
            ("primary", "pg1", 2, 0),
            ("primary", "pg2", 0, 0),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
            ("stats", "pg2", 2, 0),
        ]);
        let fence = move_commands(&cfg(), &up, &Move::Fence { old: "pg1".into() }, &none());
        assert_eq!(fence, ["set server primary/pg1 state drain"]);
        let drained = live(&[
            ("primary", "pg1", 2, 8),
            ("primary", "pg2", 0, 0),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
        ]);
        let unfence = Move::Unfence {
            servers: vec!["pg1".into()],
        };
        assert_eq!(
            move_commands(&cfg(), &drained, &unfence, &none()),
            ["set server primary/pg1 state ready"]
        );
        let promote = Move::Promote {
            new: "pg2".into(),
            demote: vec!["pg1".into()],
        };
        assert_eq!(
            move_commands(&cfg(), &drained, &promote, &none()),
            [
                "set server primary/pg2 health up",
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1",
                "set server primary/pg1 state ready",
                "set server replicas/pg2 health down",
            ]
        );
        // A member HAProxy does not have gets no command.
        let gone = Move::Promote {
            new: "pg9".into(),
            demote: vec![],
        };
        assert!(move_commands(&cfg(), &up, &gone, &none()).is_empty());
    }

    #[test]
    fn each_answer_is_read_against_its_command() {
        let cmds: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert!(refusals(&cmds, "\n\n\n").is_empty());
        assert_eq!(
            refusals(&cmds, "\nNo such server.\n\n\n"),
            [Refused {
                command: "b".into(),
                answer: "No such server.".into()
            }]
        );
        let denied = refusals(
            &cmds,
            "Permission denied\n\nPermission denied\n\nPermission denied\n\n",
        );
        assert_eq!(denied.len(), 3);
        assert!(denied.iter().all(|r| r.answer == "Permission denied"));
        // Not one answer per command: the whole answer is laid on each.
        assert_eq!(refusals(&cmds, "Unknown command\n").len(), 3);
    }

    #[test]
    fn a_drain_stays_while_its_fence_is_in_force_and_maintenance_is_never_touched() {
        let fenced: std::collections::BTreeSet<String> = ["pg1".to_string()].into();
        let drained = live(&[("primary", "pg1", 2, 8), ("primary", "pg3", 2, 8)]);
        let promote = Move::Promote {
            new: "pg2".into(),
            demote: vec![],
        };
        // pg1's fence is in force (a second change began): only pg3's stale drain goes.
        assert_eq!(
            move_commands(&cfg(), &drained, &promote, &fenced),
            ["set server primary/pg3 state ready"]
        );
        // An operator's maintenance (alone, or over a drain) is left as it is, and a server in
        // maintenance is not drained over.
        let maint = live(&[("primary", "pg1", 2, 1), ("primary", "pg2", 2, 9)]);
        for mv in [
            Move::Fence { old: "pg1".into() },
            Move::Unfence {
                servers: vec!["pg1".into(), "pg2".into()],
            },
            Move::Repair { leader: None },
            Move::Repair {
                leader: Some("pg1".into()),
            },
        ] {
            assert!(
                move_commands(&cfg(), &maint, &mv, &none()).is_empty(),
                "{mv:?}"
            );
        }
    }

    /// A cluster that became a standby cluster: its leader leaves the primary backends (its
    /// sessions shut), and nothing else moves.
    #[test]
    fn a_demoted_leader_leaves_the_primary_backends_only() {
        let up = live(&[
            ("primary", "pg1", 2, 0),
            ("primary", "pg2", 0, 0),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
        ]);
        let demote = Move::Demote { old: "pg1".into() };
        assert_eq!(
            move_commands(&cfg(), &up, &demote, &none()),
            [
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1"
            ]
        );
    }

    #[test]
    fn repair_makes_haproxy_agree_with_the_confirmed_leader() {
        let after_kill = live(&[
            ("primary", "pg1", 2, 8),
            ("primary", "pg2", 0, 8),
            ("replicas", "pg1", 0, 0),
            ("replicas", "pg2", 2, 0),
        ]);
        // No leader confirmed yet: pg1, UP, may be an old primary the checks have not caught.
        assert_eq!(
            move_commands(&cfg(), &after_kill, &Move::Repair { leader: None }, &none()),
            ["set server primary/pg2 state ready"]
        );
        assert_eq!(
            move_commands(
                &cfg(),
                &after_kill,
                &Move::Repair {
                    leader: Some("pg2".into())
                },
                &none()
            ),
            [
                "set server primary/pg2 health up",
                "set server primary/pg1 health down",
                "shutdown sessions server primary/pg1",
                "set server primary/pg1 state ready",
                "set server primary/pg2 state ready",
                "set server replicas/pg2 health down",
            ]
        );
        // Already as it should be: nothing to send.
        let settled = live(&[
            ("primary", "pg1", 0, 0),
            ("primary", "pg2", 2, 0),
            ("replicas", "pg1", 2, 0),
            ("replicas", "pg2", 0, 0),
        ]);
        assert!(move_commands(
            &cfg(),
            &settled,
            &Move::Repair {
                leader: Some("pg2".into())
            },
            &none()
        )
        .is_empty());
    }
}
