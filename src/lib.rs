//! haconfd: watches Patroni's cluster state in etcd and renders haproxy.cfg and pgbouncer.ini from
//! Tera templates, checks each staged file, swaps it in atomically and reloads its consumer by a
//! verified signal, HAProxy's master socket or a command.
//!
//! The stages, each its own module owning its settings type, hand owned values down the pipe:
//! - [`source`] (`EtcdSettings`; one file per etcd protocol): a snapshot of Patroni's keys and a
//!   watch;
//! - [`model`] and [`events`]: validated Patroni clusters (one per scope, one per Citus group)
//!   and what changed in each;
//! - [`guard`] (`GuardConfig`): each cluster's view accepted or refused;
//! - [`render`]: bytes per [`target`], from every cluster's accepted view;
//! - [`apply`]: staged, checked, swapped in atomically;
//! - [`reload`] (`Reload`), [`server_state`] (`ServerStateConfig`), [`pgbouncer`]: the consumer
//!   told, by a verified signal, the master socket or the admin console;
//! - [`failover`] and [`confirm`]: the fast path that moves routing ahead of the files.
//!
//! [`pipeline`] runs one pass through them and keeps each cluster's state between passes;
//! [`pacer`] times the passes and [`daemon`] runs them as events arrive; [`config`] parses and
//! resolves the file into each stage's settings.
#![warn(missing_docs)]

pub mod apply;
pub mod backoff;
pub mod cli;
pub mod command;
pub mod config;
pub mod consumers;
pub mod daemon;
pub mod events;
pub mod failover;
pub mod files;
pub mod guard;
pub mod hooks;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod render;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod target;
