//! What changed between two cluster models, as typed events: the leader lost or changed, a
//! switchover requested, members promoted, demoted, added, removed or down. The leader change is
//! detected here and nowhere else; the pipeline computes the events once per pass, and logs,
//! `/status` and `/metrics` consume them.
//!
//! A failover is seen as a sequence, never as one event: the leader key goes
//! ([`ClusterEvent::LeaderLost`]), then a new one names another member
//! ([`ClusterEvent::LeaderChanged`]). "Failover completed" is that `LeaderChanged`: its `old`
//! is the last leader seen, kept through the leaderless spell, so `old` → `new` names the
//! failover whether or not a pass saw the cluster without a leader. When the same member takes
//! the leader key back after a spell, that is [`ClusterEvent::LeaderRegained`], not a change.
//! A handover seen in one step (`leader` names another member, no pass in between) gives both:
//! `LeaderLost` for the old leader, then `LeaderChanged`.

use serde::Serialize;

use crate::model::{Cluster, Failover, Member};

/// One change seen between two consecutive models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClusterEvent {
    /// The `leader` key went away (or stopped naming a valid member): the cluster has no leader.
    LeaderLost {
        /// The leader the previous model had.
        old: String,
    },
    /// A member other than the last leader holds the leader key: a switchover or failover
    /// completed. `old` is the last leader seen, through any leaderless spell; None only when
    /// haconfd has seen no leader since it started (a cluster that was leaderless at start).
    LeaderChanged {
        /// The last leader seen.
        old: Option<String>,
        /// The new leader.
        new: String,
    },
    /// The last leader holds the leader key again after a leaderless spell.
    LeaderRegained {
        /// The leader.
        leader: String,
    },
    /// Patroni's `failover` key asks for a switchover (or a failover to a named member). A
    /// `{}` left behind after a switchover is no request.
    SwitchoverRequested {
        /// The leader to step down, when named.
        leader: Option<String>,
        /// The candidate, when named.
        candidate: Option<String>,
        /// When it is scheduled, for a planned switchover.
        scheduled_at: Option<String>,
    },
    /// A member's role became `master` or `primary`.
    MemberPromoted {
        /// The member.
        member: String,
        /// Its new role.
        role: String,
    },
    /// A member's role stopped being `master` or `primary` (e.g. `demoted`, `replica`).
    MemberDemoted {
        /// The member.
        member: String,
        /// Its new role.
        role: String,
    },
    /// A valid member key appeared.
    MemberAdded {
        /// The member.
        member: String,
    },
    /// A member key went away (deleted, its lease expired, or it became invalid).
    MemberRemoved {
        /// The member.
        member: String,
    },
    /// A member's state left `running`/`streaming`: `stopping`, `stopped`, `crashed`,
    /// `start failed`, ...
    MemberDown {
        /// The member.
        member: String,
        /// Its new state.
        state: String,
    },
}

impl ClusterEvent {
    /// The event's name, as in logs, `/status` and the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LeaderLost { .. } => "leader_lost",
            Self::LeaderChanged { .. } => "leader_changed",
            Self::LeaderRegained { .. } => "leader_regained",
            Self::SwitchoverRequested { .. } => "switchover_requested",
            Self::MemberPromoted { .. } => "member_promoted",
            Self::MemberDemoted { .. } => "member_demoted",
            Self::MemberAdded { .. } => "member_added",
            Self::MemberRemoved { .. } => "member_removed",
            Self::MemberDown { .. } => "member_down",
        }
    }

    /// Logs the event at info, with its fields as structured fields.
    pub fn log(&self) {
        let kind = self.kind();
        match self {
            Self::LeaderLost { old } => {
                tracing::info!(event = kind, old = %old, "cluster event: leader lost")
            }
            Self::LeaderChanged { old, new } => {
                tracing::info!(event = kind, old = ?old, new = %new, "cluster event: leader changed")
            }
            Self::LeaderRegained { leader } => {
                tracing::info!(event = kind, leader = %leader, "cluster event: leader regained")
            }
            Self::SwitchoverRequested {
                leader,
                candidate,
                scheduled_at,
            } => tracing::info!(
                event = kind,
                leader = ?leader,
                candidate = ?candidate,
                scheduled_at = ?scheduled_at,
                "cluster event: switchover requested"
            ),
            Self::MemberPromoted { member, role } | Self::MemberDemoted { member, role } => {
                tracing::info!(event = kind, member = %member, role = %role, "cluster event: member role changed")
            }
            Self::MemberAdded { member } | Self::MemberRemoved { member } => {
                tracing::info!(event = kind, member = %member, "cluster event: member key changed")
            }
            Self::MemberDown { member, state } => {
                tracing::info!(event = kind, member = %member, state = %state, "cluster event: member down")
            }
        }
    }
}

/// Turns consecutive models into events, remembering the last leader through leaderless spells.
#[derive(Debug, Default, Clone)]
pub struct Differ {
    last_leader: Option<String>,
}

impl Differ {
    /// The events from `prev` to `next`. With no `prev` (the first model haconfd sees) there is
    /// nothing to compare: no events, and `next` is the starting point. In order: the
    /// switchover request, the leader's events, then each member's by name (its key added or
    /// removed, its role, its state).
    pub fn diff(&mut self, prev: Option<&Cluster>, next: &Cluster) -> Vec<ClusterEvent> {
        let mut out = Vec::new();
        let Some(prev) = prev else {
            if next.leader_name.is_some() {
                self.last_leader = next.leader_name.clone();
            }
            return out;
        };
        if let Some(f) = next
            .failover
            .as_ref()
            .filter(|f| prev.failover.as_ref() != Some(*f))
        {
            let Failover {
                leader,
                member,
                scheduled_at,
            } = f.clone();
            out.push(ClusterEvent::SwitchoverRequested {
                leader,
                candidate: member,
                scheduled_at,
            });
        }
        match (&prev.leader_name, &next.leader_name) {
            (Some(old), None) => out.push(ClusterEvent::LeaderLost { old: old.clone() }),
            (_, Some(new)) if prev.leader_name.as_ref() != Some(new) => {
                if self.last_leader.as_ref() == Some(new) {
                    out.push(ClusterEvent::LeaderRegained {
                        leader: new.clone(),
                    });
                } else {
                    if let Some(old) = &prev.leader_name {
                        // A direct handover with no pass in between: the old key is lost too.
                        out.push(ClusterEvent::LeaderLost { old: old.clone() });
                    }
                    out.push(ClusterEvent::LeaderChanged {
                        old: self.last_leader.clone(),
                        new: new.clone(),
                    });
                }
            }
            _ => {}
        }
        if next.leader_name.is_some() {
            self.last_leader = next.leader_name.clone();
        }
        members(prev, next, &mut out);
        out
    }
}

fn is_primary(role: &str) -> bool {
    matches!(role, "master" | "primary")
}

fn is_up(state: &str) -> bool {
    matches!(state, "running" | "streaming")
}

/// Member events in name order (both lists are sorted by name).
fn members(prev: &Cluster, next: &Cluster, out: &mut Vec<ClusterEvent>) {
    let mut a = prev.members.iter().peekable();
    let mut b = next.members.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(old), Some(new)) if old.name == new.name => {
                member(old, new, out);
                a.next();
                b.next();
            }
            (Some(old), Some(new)) if old.name < new.name => {
                out.push(ClusterEvent::MemberRemoved {
                    member: old.name.clone(),
                });
                a.next();
            }
            (Some(old), None) => {
                out.push(ClusterEvent::MemberRemoved {
                    member: old.name.clone(),
                });
                a.next();
            }
            (_, Some(new)) => {
                out.push(ClusterEvent::MemberAdded {
                    member: new.name.clone(),
                });
                b.next();
            }
        }
    }
}

fn member(old: &Member, new: &Member, out: &mut Vec<ClusterEvent>) {
    match (is_primary(&old.role), is_primary(&new.role)) {
        (false, true) => out.push(ClusterEvent::MemberPromoted {
            member: new.name.clone(),
            role: new.role.clone(),
        }),
        (true, false) => out.push(ClusterEvent::MemberDemoted {
            member: new.name.clone(),
            role: new.role.clone(),
        }),
        _ => {}
    }
    if is_up(&old.state) && !is_up(&new.state) {
        out.push(ClusterEvent::MemberDown {
            member: new.name.clone(),
            state: new.state.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use ClusterEvent::*;

    /// A member value in the shape Patroni 4.1.5 writes (tests/fixtures/patroni4-kv.json).
    fn member(port: u16, role: &str, state: &str) -> String {
        format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"{state}","role":"{role}","version":"4.1.5","xlog_location":72122280,"timeline":4}}"#,
            port + 2570
        )
    }

    /// The keys of one moment: the leader, the `failover` value and members as (name, role, state).
    struct Moment<'a> {
        leader: Option<&'a str>,
        failover: Option<&'a str>,
        members: &'a [(&'a str, &'a str, &'a str)],
    }

    fn cluster(m: &Moment) -> Cluster {
        let mut s = Snapshot::new();
        if let Some(l) = m.leader {
            s.put("/service/demo/leader".into(), l.as_bytes().to_vec());
        }
        if let Some(f) = m.failover {
            s.put("/service/demo/failover".into(), f.as_bytes().to_vec());
        }
        for (i, (name, role, state)) in m.members.iter().enumerate() {
            s.put(
                format!("/service/demo/members/{name}"),
                member(5441 + i as u16, role, state).into_bytes(),
            );
        }
        let b = Cluster::build(&s, "/service", "demo");
        assert!(b.skipped.is_empty(), "{:?}", b.skipped);
        b.cluster
    }

    /// The events of each step of `moments`, after the first (the starting point).
    fn run(moments: &[Moment]) -> Vec<Vec<ClusterEvent>> {
        let mut differ = Differ::default();
        let mut prev: Option<Cluster> = None;
        let mut out = Vec::new();
        for m in moments {
            let next = cluster(m);
            let events = differ.diff(prev.as_ref(), &next);
            if prev.is_some() {
                out.push(events);
            } else {
                assert!(events.is_empty(), "the first model is the starting point");
            }
            prev = Some(next);
        }
        out
    }

    const UP3: &[(&str, &str, &str)] = &[
        ("pg1", "primary", "running"),
        ("pg2", "replica", "streaming"),
        ("pg3", "replica", "streaming"),
    ];

    fn steady(leader: &str) -> Moment<'_> {
        Moment {
            leader: Some(leader),
            failover: None,
            members: UP3,
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn a_heartbeat_changes_nothing() {
        assert_eq!(run(&[steady("pg1"), steady("pg1")]), [vec![]]);
    }

    #[test]
    fn leader_lost_then_changed_names_the_old_leader_through_the_spell() {
        let none = Moment {
            leader: None,
            failover: None,
            members: UP3,
        };
        let steps = run(&[steady("pg1"), none, steady("pg2")]);
        assert_eq!(steps[0], [LeaderLost { old: s("pg1") }]);
        assert_eq!(
            steps[1],
            [LeaderChanged {
                old: Some(s("pg1")),
                new: s("pg2")
            }]
        );
    }

    #[test]
    fn a_handover_in_one_step_loses_then_changes_the_leader() {
        let steps = run(&[steady("pg1"), steady("pg2")]);
        assert_eq!(
            steps[0],
            [
                LeaderLost { old: s("pg1") },
                LeaderChanged {
                    old: Some(s("pg1")),
                    new: s("pg2")
                }
            ]
        );
    }

    #[test]
    fn the_same_leader_back_after_a_spell_is_regained_not_changed() {
        let none = Moment {
            leader: None,
            failover: None,
            members: UP3,
        };
        let steps = run(&[steady("pg1"), none, steady("pg1")]);
        assert_eq!(steps[1], [LeaderRegained { leader: s("pg1") }]);
    }

    #[test]
    fn a_first_leader_after_a_leaderless_start_has_no_old_leader() {
        let none = Moment {
            leader: None,
            failover: None,
            members: UP3,
        };
        let steps = run(&[none, steady("pg1")]);
        assert_eq!(
            steps[0],
            [LeaderChanged {
                old: None,
                new: s("pg1")
            }]
        );
    }

    #[test]
    fn a_failover_request_is_a_switchover_and_its_reset_to_empty_is_nothing() {
        let put = Moment {
            failover: Some(r#"{"leader":"pg1","member":"pg2"}"#),
            ..steady("pg1")
        };
        let scheduled = Moment {
            failover: Some(
                r#"{"leader":"pg1","member":"pg3","scheduled_at":"2026-11-30T15:00:00+00:00"}"#,
            ),
            ..steady("pg1")
        };
        let reset = Moment {
            failover: Some("{}"),
            ..steady("pg1")
        };
        let steps = run(&[steady("pg1"), put, reset, scheduled]);
        assert_eq!(
            steps[0],
            [SwitchoverRequested {
                leader: Some(s("pg1")),
                candidate: Some(s("pg2")),
                scheduled_at: None
            }]
        );
        assert_eq!(steps[1], []);
        assert_eq!(
            steps[2],
            [SwitchoverRequested {
                leader: Some(s("pg1")),
                candidate: Some(s("pg3")),
                scheduled_at: Some(s("2026-11-30T15:00:00+00:00"))
            }]
        );
    }

    #[test]
    fn members_added_removed_promoted_demoted_and_down() {
        let before = Moment {
            leader: Some("pg1"),
            failover: None,
            members: &[
                ("pg1", "master", "running"),
                ("pg2", "replica", "running"),
                ("pg3", "replica", "streaming"),
            ],
        };
        let after = Moment {
            leader: Some("pg1"),
            failover: None,
            members: &[
                ("pg1", "demoted", "running"),
                ("pg2", "primary", "running"),
                ("pg4", "replica", "streaming"),
            ],
        };
        let steps = run(&[before, after]);
        assert_eq!(
            steps[0],
            [
                MemberDemoted {
                    member: s("pg1"),
                    role: s("demoted")
                },
                MemberPromoted {
                    member: s("pg2"),
                    role: s("primary")
                },
                MemberRemoved { member: s("pg3") },
                MemberAdded { member: s("pg4") },
            ]
        );
        for state in ["stopped", "crashed", "start failed", "stopping"] {
            let down = Moment {
                leader: Some("pg1"),
                failover: None,
                members: &[
                    ("pg1", "primary", "running"),
                    ("pg2", "replica", state),
                    ("pg3", "replica", "streaming"),
                ],
            };
            let steps = run(&[steady("pg1"), down]);
            assert_eq!(
                steps[0],
                [MemberDown {
                    member: s("pg2"),
                    state: s(state)
                }],
                "{state}"
            );
        }
        // A member already down going from `stopping` to `stopped` is not down again.
        let stopping = Moment {
            leader: Some("pg1"),
            failover: None,
            members: &[("pg1", "primary", "stopping")],
        };
        let stopped = Moment {
            leader: Some("pg1"),
            failover: None,
            members: &[("pg1", "primary", "stopped")],
        };
        assert_eq!(run(&[stopping, stopped]), [vec![]]);
    }

    /// `patronictl switchover --force` as an etcd watcher sees it (Patroni 4.1.5, times after the
    /// `failover` PUT): request, the old leader stopping, its leader key deleted and its member
    /// demoted, the new leader key with `failover` reset to `{}`, then the candidate's role.
    #[test]
    fn a_switchover_gives_request_lost_down_demoted_changed_promoted() {
        let steps = run(&[
            steady("pg1"),
            Moment {
                failover: Some(r#"{"leader":"pg1","member":"pg2"}"#),
                ..steady("pg1")
            },
            // +2.41 s: DELETE leader; pg1 says stopping
            Moment {
                leader: None,
                failover: Some(r#"{"leader":"pg1","member":"pg2"}"#),
                members: &[
                    ("pg1", "primary", "stopping"),
                    ("pg2", "replica", "streaming"),
                    ("pg3", "replica", "streaming"),
                ],
            },
            Moment {
                leader: None,
                failover: Some(r#"{"leader":"pg1","member":"pg2"}"#),
                members: &[
                    ("pg1", "demoted", "stopped"),
                    ("pg2", "replica", "streaming"),
                    ("pg3", "replica", "streaming"),
                ],
            },
            // +2.58 s: PUT leader = pg2, failover = {}
            Moment {
                leader: Some("pg2"),
                failover: Some("{}"),
                members: &[
                    ("pg1", "demoted", "stopped"),
                    ("pg2", "replica", "streaming"),
                    ("pg3", "replica", "streaming"),
                ],
            },
            // +3.88 s: pg2's member key says primary
            Moment {
                leader: Some("pg2"),
                failover: Some("{}"),
                members: &[
                    ("pg1", "replica", "streaming"),
                    ("pg2", "primary", "running"),
                    ("pg3", "replica", "streaming"),
                ],
            },
        ]);
        assert_eq!(
            steps,
            [
                vec![SwitchoverRequested {
                    leader: Some(s("pg1")),
                    candidate: Some(s("pg2")),
                    scheduled_at: None
                }],
                vec![
                    LeaderLost { old: s("pg1") },
                    MemberDown {
                        member: s("pg1"),
                        state: s("stopping")
                    }
                ],
                vec![MemberDemoted {
                    member: s("pg1"),
                    role: s("demoted")
                }],
                vec![LeaderChanged {
                    old: Some(s("pg1")),
                    new: s("pg2")
                }],
                vec![MemberPromoted {
                    member: s("pg2"),
                    role: s("primary")
                }],
            ]
        );
    }

    /// A crash: the old leader's `leader` and `members/` keys share one lease and vanish
    /// together when it expires; then a replica takes the leader key.
    #[test]
    fn a_crash_gives_lost_and_removed_together_then_changed() {
        let rest: &[(&str, &str, &str)] = &[
            ("pg2", "replica", "streaming"),
            ("pg3", "replica", "streaming"),
        ];
        let steps = run(&[
            steady("pg1"),
            Moment {
                leader: None,
                failover: None,
                members: rest,
            },
            Moment {
                leader: Some("pg3"),
                failover: None,
                members: rest,
            },
        ]);
        assert_eq!(
            steps,
            [
                vec![
                    LeaderLost { old: s("pg1") },
                    MemberRemoved { member: s("pg1") }
                ],
                vec![LeaderChanged {
                    old: Some(s("pg1")),
                    new: s("pg3")
                }],
            ]
        );
    }

    #[test]
    fn events_serialize_with_their_kind() {
        let e = LeaderChanged {
            old: None,
            new: s("pg2"),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], e.kind());
        assert_eq!(v["new"], "pg2");
        assert!(v["old"].is_null());
    }
}
