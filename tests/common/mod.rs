//! Shared harness for the integration tests: real etcd, HAProxy, PgBouncer and Patroni on loopback.
#![allow(dead_code)]

pub mod config;
pub mod docker;
pub mod docs;
pub mod fastpath;
pub mod patroni;
pub mod procs;
pub mod switch;
