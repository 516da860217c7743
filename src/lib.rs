//! haconfd: watches Patroni's cluster state in etcd and renders haproxy.cfg and pgbouncer.ini from
//! Tera templates, checks each staged file, swaps it in atomically and reloads its consumer by a
//! verified signal, HAProxy's master socket or a command.
//!
//! The stages, each its own module, hand owned values down the pipe:
//! [`source`] (etcd snapshot + watch) → [`model`] (validated Patroni cluster) → [`render`] (bytes
//! per target) → [`apply`] (check, atomic write) → [`reload`] (verified PID, master socket).
//! [`pipeline`] runs one pass through them; [`daemon`] runs passes as events arrive.
#![warn(missing_docs)]

pub mod apply;
pub mod backoff;
pub mod cli;
pub mod command;
pub mod config;
pub mod confirm;
pub mod daemon;
pub mod events;
pub mod failover;
pub mod guard;
pub mod haproxy;
pub mod hooks;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pacer;
pub mod pgbouncer;
pub mod pipeline;
pub mod reload;
pub mod render;
pub mod server_state;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod target;
