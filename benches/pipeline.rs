//! Benchmark harness against a real etcd, HAProxy and Patroni (see docs/BENCHMARKS.md).
fn main() {}
