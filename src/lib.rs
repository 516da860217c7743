//! haconfd: watches Patroni's cluster state in etcd and renders haproxy.cfg and pgbouncer.ini from
//! Tera templates, checks each staged file, swaps it in atomically and reloads its consumer by a
//! verified signal, HAProxy's master socket or a command.
//!
//! The layout, lowest first (a module imports only those above it in this list; see
//! `docs/ARCHITECTURE.md`):
//! - [`snapshot`], [`command`], [`backoff`], [`files`], [`confd`]: the store's keys at a revision, bounded
//!   commands, retry timing, atomic files, what a confd user brings along recognised;
//! - [`source`] (`EtcdSettings`; one file per etcd protocol): a snapshot of Patroni's keys and a
//!   watch;
//! - [`model`] and [`events`]: validated Patroni clusters (one per scope, one per Citus group)
//!   and what changed in each;
//! - [`consumers`]: what reads the files and how it is told: the reload mechanics, HAProxy (its
//!   server state and runtime API), PgBouncer (its console and the bounded pause);
//! - [`target`]: a resolved `[[template]]`: its file, its check, its consumer;
//! - [`guard`] (`GuardConfig`), [`render`], [`apply`]: a view accepted or refused, bytes from a
//!   template, a target's file staged and checked;
//! - [`failover`] (`FailoverConfig`): the fast path that moves routing ahead of the files, and
//!   what it holds on the consumers (fences, pauses), each with a bound and an undo;
//! - [`pipeline`]: one pass through the stages in order (observe, plan, render, commit) and the
//!   [`pipeline::PassReport`] it hands back;
//! - [`status`], [`metrics`], [`hooks`], [`http`]: what a pass's report feeds; [`overview`]:
//!   what people see of it (`haconfd status`, the page at `/`);
//! - [`daemon`]: the `run` loop (one trigger at a time, the pacer owning the timing), settings
//!   reloads, OS signals and systemd;
//! - [`config`], [`cli`], [`logging`]: the file, flags and environment resolved into each stage's
//!   settings, and the logs;
//! - [`init`], apart (it imports nothing of the crate): haconfd as PID 1 forks, the daemon goes
//!   on in the child, and PID 1 forwards signals to it and reaps orphans.
#![warn(missing_docs)]

pub mod apply;
pub mod backoff;
pub mod cli;
pub mod command;
pub mod confd;
pub mod config;
pub mod consumers;
pub mod daemon;
pub mod events;
pub mod failover;
pub mod files;
pub mod guard;
pub mod hooks;
pub mod http;
pub mod init;
pub mod lag;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod overview;
pub mod pipeline;
pub mod render;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod target;
