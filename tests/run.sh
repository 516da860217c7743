#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it: installs what the tests need on a
# Debian 12 machine, then runs fmt, clippy and every test (unit, golden, integration against real
# etcd/HAProxy/PgBouncer, end-to-end against a real Patroni cluster, and the images built here and run
# in containers: tests/containers.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-etcd: Patroni's `etcd:` (v2) section, for the v2 end-to-end test.
# debootstrap: the container tests (tests/containers.rs) build their Debian 12 base image with it.
# prometheus (with promtool) and chromium: tests/observe.rs (the alert rules, the dashboard, the
# status page); lintian: tests/deb.rs (the Debian package).
packages=(protobuf-compiler etcd-server etcd-client haproxy pgbouncer postgresql patroni python3-etcd debootstrap prometheus chromium lintian)
# Docker itself is part of the machine (engine and docker-compose); installed only where missing.
command -v docker >/dev/null 2>&1 || packages+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
need_install=0
for bin in protoc etcd etcdctl haproxy pgbouncer patroni patronictl psql debootstrap docker docker-compose prometheus promtool chromium lintian; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then need_install=1; fi
done
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_install=1
python3 -c 'import etcd' 2>/dev/null || need_install=1
if [ "$need_install" = 1 ]; then
    echo "== installing test dependencies: ${packages[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # policy-rc.d keeps the packaged services (etcd, haproxy, pgbouncer, postgresql) from starting:
    # the tests start their own copies on free loopback ports.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
    if [ "$made_policy" = 1 ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
fi

# The packager of tests/deb.rs, from crates.io (a few minutes to build, once per machine).
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "== installing cargo-deb: cargo install cargo-deb --locked (at most 20 minutes)"
    timeout 1200 cargo install cargo-deb --locked --quiet
fi

# The container tests need the Docker engine; start it if it is installed but not running.
if ! docker version >/dev/null 2>&1; then
    echo "== starting the Docker engine"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo service docker start >/dev/null 2>&1 || $sudo systemctl start docker >/dev/null 2>&1 || true
    for _ in $(seq 30); do docker version >/dev/null 2>&1 && break; sleep 1; done
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
# Library, binary and integration tests (doc tests: none; benches: `cargo bench`, see the README).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set -o pipefail
cargo test --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
# One closing line for the whole suite.
awk '/^test result:/ { p += $4; f += $6 } END { printf "suite: %d passed, %d failed\n", p, f }' "$log"
