//! Real etcd, HAProxy and PgBouncer processes on free loopback ports, stopped by PID.
