#!/usr/bin/env bash
# haconfd end to end on one machine, on loopback, in about a minute.
#
#   bash examples/demo.sh            # run the demo, then stop everything it started
#   DEMO_KEEP=1 bash examples/demo.sh  # leave it all running; prints how to stop it
#   bash examples/demo.sh --stop DIR # stop a kept demo (DIR is printed by DEMO_KEEP=1)
#   bash examples/demo.sh --help
#
# What it does, in order:
#   1. installs what is missing (etcd, PostgreSQL, Patroni, HAProxy, PgBouncer, protoc) and builds
#      haconfd with `cargo build --release`;
#   2. starts, in a fresh work dir under /tmp and on fixed loopback ports (checked to be free first):
#      one etcd, a 3-node Patroni cluster (pg1..pg3, scope `demo`), renders the first haproxy.cfg and
#      pgbouncer.ini with `haconfd once`, starts HAProxy (master-worker) and PgBouncer on them, then
#      `haconfd run` in the background;
#   3. shows the rendered files and which node serves writes (:5000), reads (:5001) and PgBouncer;
#   4. adds a 4th member and waits for haconfd to re-render haproxy.cfg and reload HAProxy;
#   5. runs `patronictl switchover` and prints, twice a second, where writes and PgBouncer go;
#   6. stops everything it started, by PID (also on Ctrl-C or on any failure), and prints a summary.
#
# Every process is stopped by the PID recorded when it started (never by name), and every wait is
# bounded in time and in iterations.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
HACONFD="$REPO/target/release/haconfd"

# ---------------------------------------------------------------------------- settings
# Fixed ports, chosen away from the usual defaults (etcd 2379, PostgreSQL 5432) and below Linux's
# ephemeral range (32768+) so that no outgoing connection grabs one. Each can be overridden.
ETCD_PORT=${DEMO_ETCD_PORT:-23790}
ETCD_PEER_PORT=${DEMO_ETCD_PEER_PORT:-23800}
PG_PORT_BASE=${DEMO_PG_PORT_BASE:-5441}     # pgN's PostgreSQL listens on PG_PORT_BASE + N - 1
API_PORT_BASE=${DEMO_API_PORT_BASE:-8011}   # pgN's Patroni REST API on API_PORT_BASE + N - 1
PRIMARY_PORT=${DEMO_PRIMARY_PORT:-5000}     # HAProxy: writes (the leader)
REPLICA_PORT=${DEMO_REPLICA_PORT:-5001}     # HAProxy: reads (the replicas)
STATS_PORT=${DEMO_STATS_PORT:-7000}         # HAProxy: stats page
PGBOUNCER_PORT=${DEMO_PGBOUNCER_PORT:-6432} # PgBouncer, always pointed at the leader
WATCH_SECONDS=${DEMO_WATCH_SECONDS:-10}     # how long to watch the switchover
SCOPE=demo
NAMESPACE=/service
NODES=4 # pg1..pg3 at start, pg4 joins later

# Filled in as things start; `cleanup` only touches what is recorded here.
W=""                  # work dir
POLICY_RC_CREATED=0   # we created /usr/sbin/policy-rc.d and must remove it
CLEANED=0
STOPPED_COUNT=0
STARTED_PID=""
LEFT=""
T0_US=0

usage() {
    cat <<EOF
Usage: bash examples/demo.sh [--help | --stop DIR]

Runs haconfd against a real etcd + 3-node Patroni cluster + HAProxy + PgBouncer on this machine
(Debian 12, as root or with sudo), adds a 4th member, does a switchover and shows the routing
follow it. Everything runs on 127.0.0.1 in a fresh directory under /tmp and is stopped (by PID) at
the end, also on Ctrl-C. A run takes about a minute once haconfd is built.

Environment:
  DEMO_KEEP=1               leave everything running at the end and print how to stop it
  DEMO_ETCD_PORT=$ETCD_PORT       etcd client port   (DEMO_ETCD_PEER_PORT=$ETCD_PEER_PORT peer port)
  DEMO_PG_PORT_BASE=$PG_PORT_BASE     PostgreSQL ports pg1..pg4 = base..base+3
  DEMO_API_PORT_BASE=$API_PORT_BASE    Patroni REST ports pg1..pg4 = base..base+3
  DEMO_PRIMARY_PORT=$PRIMARY_PORT     HAProxy write port  (DEMO_REPLICA_PORT=$REPLICA_PORT read port,
                            DEMO_STATS_PORT=$STATS_PORT stats page)
  DEMO_PGBOUNCER_PORT=$PGBOUNCER_PORT   PgBouncer port
  DEMO_WATCH_SECONDS=$WATCH_SECONDS     how long to print the routing during the switchover
  DEMO_PG_BIN=DIR           PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)

Options:
  --stop DIR   stop a demo left running by DEMO_KEEP=1 (by the PIDs recorded in DIR) and remove DIR
  --help       this text
EOF
}

# ---------------------------------------------------------------------------- small helpers
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }            # microseconds, locale-proof
since() { local us=$(($(now_us) - $1)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }
if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; } # section header
info() { printf '    %s\n' "$*"; }
warn() { printf 'demo: %s\n' "$*" >&2; }
fail() { warn "ERROR: $*"; exit 1; }

# Polls COMMAND... every 0.25 s until it succeeds. Bounded by TIMEOUT seconds and by a loop count,
# so neither a slow check nor a clock jump can make it spin forever. Returns 1 on timeout.
wait_for() {
    local timeout=$1; shift
    local deadline=$(($(now_us) + timeout * 1000000)) max=$((timeout * 4 + 2)) i
    for ((i = 0; i < max; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        (($(now_us) >= deadline)) && break
        sleep 0.25
    done
    return 1
}

# Runs a command as `postgres` with a clean environment, like the service units do. An exported
# PGPASSWORD (or PGHOST, ...) would override Patroni's own settings and break replica bootstrap.
# setpriv execs (it does not fork), so `$!` of a backgrounded call is the program's own PID.
as_postgres() {
    setpriv --reuid=postgres --regid=postgres --init-groups \
        env -i PATH=/usr/bin:/bin HOME=/var/lib/postgresql LANG=C.UTF-8 "$@"
}

# One query on 127.0.0.1:PORT as postgres. Auth is `trust` on loopback everywhere in this demo
# (Patroni's pg_hba and PgBouncer's auth_type), so no password is needed or passed.
# PGCONNECT_TIMEOUT bounds the connection only; `timeout` bounds the whole call.
pg_query() {
    local rc=0
    timeout -k 1 3 env -i PATH="$PATH" PGCONNECT_TIMEOUT=2 PGSSLMODE=disable \
        psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" -Atc "$2" 2>&1 || rc=$?
    ((rc != 124 && rc != 137)) || echo "failed: no answer within 3 s"
    return "$rc"
}

node_pg_port() { echo $((PG_PORT_BASE + $1 - 1)); }
node_api_port() { echo $((API_PORT_BASE + $1 - 1)); }
# A PostgreSQL port back to its member name (pg1..pg4).
port_name() {
    local n=$(($1 - PG_PORT_BASE + 1))
    if ((n >= 1 && n <= NODES)); then echo "pg$n"; else echo "port $1"; fi
}

# Is PID alive (not a zombie) and is its /proc comm COMM? Guards every kill against PID reuse.
is_proc() {
    local pid=$1 comm=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# Records a started process: "label pid comm" lines in $W/pids, read back by cleanup/--stop.
record() { echo "$1 $2 $3" >>"$W/pids"; }

# start_bg LABEL COMM LOGFILE DIR COMMAND...: starts COMMAND in the background, in DIR, in a
# session of its own, and records its PID. The own session matters: Ctrl-C in a terminal sends
# SIGINT to the whole foreground process group, and etcd, haconfd and Python re-enable SIGINT even
# though bash ignores it for background jobs; they would die before the cleanup could stop them in
# order. setsid, setpriv and env all exec (none forks: a background subshell is no group leader),
# so `$!` ends up being COMMAND's own PID, which is checked before it is recorded.
start_bg() {
    local label=$1 comm=$2 log=$3 dir=$4 pid i
    shift 4
    (cd "$dir" && exec setsid "$@") >>"$log" 2>&1 &
    pid=$!
    for ((i = 0; i < 50; i++)); do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && break
        sleep 0.05
    done
    record "$label" "$pid" "$comm"
    is_proc "$pid" "$comm" || { tail -n 20 "$log" >&2; fail "$label did not start (see $log)"; }
    STARTED_PID=$pid
}

# stop_procs SIGNAL TIMEOUT LABEL:PID:COMM...
# Sends SIGNAL to each PID that still is COMM, all at once, waits up to TIMEOUT s for all of them,
# then SIGKILLs the ones left.
stop_procs() {
    local sig=$1 timeout=$2 e i label pid comm alive=()
    shift 2
    for e in "$@"; do
        IFS=: read -r label pid comm <<<"$e"
        is_proc "$pid" "$comm" || continue
        kill -s "$sig" "$pid" 2>/dev/null || true
        alive+=("$e")
    done
    ((${#alive[@]})) || return 0
    any_alive() {
        local x
        for x in "${alive[@]}"; do IFS=: read -r _ p c <<<"$x"; is_proc "$p" "$c" && return 0; done
        return 1
    }
    for ((i = 0; i < timeout * 10; i++)); do any_alive || break; sleep 0.1; done
    for e in "${alive[@]}"; do
        IFS=: read -r label pid comm <<<"$e"
        if is_proc "$pid" "$comm"; then
            warn "$label (PID $pid) still running after ${timeout}s: SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do is_proc "$pid" "$comm" || break; sleep 0.1; done
        fi
        STOPPED_COUNT=$((STOPPED_COUNT + 1))
        info "stopped $label (PID $pid)"
    done
}

# Python is there anyway (Patroni needs it); use the system one Patroni runs on.
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

# GET http://127.0.0.1:PORT/PATH, body on stdout; fails unless 200. Proxies are ignored on purpose.
http_get() {
    "$PY" - "$1" "$2" <<'EOF'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:
    sys.stderr.write(f"{e}\n")
    sys.exit(1)
EOF
}

# Sends one command to an HAProxy unix socket (master CLI or stats socket) and prints the answer.
# python3 rather than socat, which a fresh Debian does not have. The write side is shut after the
# command: HAProxy 2.6's master CLI keeps the connection open until the client does that.
haproxy_cli() {
    "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.write(out.decode())' "$1" "$2"
}

# Checks that 127.0.0.1:PORT can be bound the way the servers bind it (SO_REUSEADDR), which fails
# exactly when something listens on it (on 127.0.0.1 or on every address).
port_free() {
    "$PY" -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# ERR trap (with set -E it also fires in functions): names the first failing line, once.
ERR_SHOWN=0
on_err() {
    ((ERR_SHOWN)) && return
    ERR_SHOWN=1
    warn "ERROR: exit status $1 at line $2 of $SCRIPT: ${BASH_COMMAND%%$'\n'*}"
}

# ---------------------------------------------------------------------------- cleanup
# Stops everything recorded in DIR/pids, in dependency order: haconfd (so that it reloads nothing
# while the rest goes away) and a running patronictl, HAProxy, PgBouncer, Patroni, leftover
# postmasters, etcd last (Patroni needs it to shut down cleanly).
stop_all() {
    local dir=$1 label pid comm
    [[ -f $dir/pids ]] || return 0
    local first=()
    while read -r label pid comm <&3; do
        case $label in haconfd | patronictl) first+=("$label:$pid:$comm") ;; esac
    done 3<"$dir/pids"
    stop_procs TERM 10 "${first[@]}"

    # HAProxy: the master PID is in its pidfile (it stays the same across reloads). SIGTERM to the
    # master stops every worker, old ones included; their PIDs are noted first as a backstop.
    local master="" workers=""
    master=$(head -n1 "$dir/haproxy/haproxy.pid" 2>/dev/null || true)
    [[ -n $master ]] || master=$(awk '$1=="haproxy"{print $2}' "$dir/pids" | tail -n1)
    if [[ -n $master ]] && is_proc "$master" haproxy; then
        workers=$(haproxy_cli "$dir/haproxy/master.sock" "show proc" 2>/dev/null |
            awk '$2=="worker"{print $1}' || true)
        stop_procs TERM 10 "haproxy master:$master:haproxy"
        for pid in $workers; do stop_procs KILL 2 "haproxy worker:$pid:haproxy"; done
    fi

    # PgBouncer daemonized itself; its pidfile names it. In 1.18 SIGTERM is an immediate shutdown.
    pid=$(cat "$dir/pgbouncer/pgbouncer.pid" 2>/dev/null || true)
    [[ -n $pid ]] || pid=$(awk '$1=="pgbouncer"{print $2}' "$dir/pids" | tail -n1)
    [[ -n $pid ]] && stop_procs TERM 10 "pgbouncer:$pid:pgbouncer"

    # Patroni: SIGTERM all members together; each stops its PostgreSQL and exits.
    local patronis=()
    while read -r label pid comm <&3; do
        [[ $label == patroni-* ]] && patronis+=("$label:$pid:$comm")
    done 3<"$dir/pids"
    stop_procs TERM 30 "${patronis[@]}"
    # Backstop: a postmaster whose Patroni died (or was SIGKILLed) is still running; its PID is in
    # postmaster.pid. SIGQUIT = immediate shutdown, which also ends its backends.
    local pm
    for pm in "$dir"/pg*/data/postmaster.pid; do
        [[ -f $pm ]] || continue
        pid=$(head -n1 "$pm")
        stop_procs QUIT 10 "postmaster of ${pm#"$dir"/}:$pid:postgres"
    done

    while read -r label pid comm <&3; do
        [[ $label == etcd ]] && stop_procs TERM 10 "etcd:$pid:$comm"
    done 3<"$dir/pids"
    return 0
}

# Lists recorded processes that are still alive (empty output = all gone).
leftovers() {
    local dir=$1 label pid comm
    while read -r label pid comm <&3; do
        is_proc "$pid" "$comm" && echo "$label $pid"
    done 3<"$dir/pids"
    for pm in "$dir"/pg*/data/postmaster.pid; do
        [[ -f $pm ]] || continue
        pid=$(head -n1 "$pm")
        is_proc "$pid" postgres && echo "postmaster $pid"
    done
    return 0
}

# EXIT trap: runs on success, on any failure (set -e) and on Ctrl-C / SIGTERM.
cleanup() {
    local rc=${1:-0}
    trap '' INT TERM # a second Ctrl-C must not abort the cleanup halfway (every wait is bounded)
    trap - ERR
    [[ $CLEANED == 1 ]] && return 0
    CLEANED=1
    if [[ $POLICY_RC_CREATED == 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [[ -n $W && -d $W ]] || return 0
    if [[ ${DEMO_KEEP:-0} == 1 && $rc == 0 ]]; then
        say "DEMO_KEEP=1: everything is left running"
        info "work dir:   $W (logs: etcd.log, pg*/patroni.log, haproxy/, pgbouncer/, haconfd.log)"
        info "writes:     psql -h 127.0.0.1 -p $PRIMARY_PORT -U postgres"
        info "reads:      psql -h 127.0.0.1 -p $REPLICA_PORT -U postgres"
        info "pgbouncer:  psql -h 127.0.0.1 -p $PGBOUNCER_PORT -U postgres   (admin: ... -d pgbouncer)"
        info "stats:      http://127.0.0.1:$STATS_PORT/"
        info "patronictl: runuser -u postgres -- patronictl -c $W/pg1/patroni.yml list"
        info "stop it:    bash $SCRIPT --stop $W"
        return 0
    fi
    say "Stopping everything this demo started (by PID)"
    stop_all "$W"
    local left
    left=$(leftovers "$W")
    LEFT=$left
    if [[ -n $left ]]; then
        warn "still running (see $W/pids): $left"
    fi
    if [[ $rc == 0 && -z $left ]]; then
        rm -rf "$W"
        info "removed $W"
    else
        warn "kept $W for its logs: etcd.log, pg*/patroni.log, haproxy/, pgbouncer/pgbouncer.log, haconfd.log"
    fi
}

# ---------------------------------------------------------------------------- 1. install + build
# Re-runs this script with sudo when not root: it must start processes as `postgres`, run apt-get
# and signal daemons. DEMO_* settings are passed through explicitly (sudo resets the environment).
ensure_root() {
    ((EUID == 0)) && return
    command -v sudo >/dev/null || fail "run this as root (sudo is not installed)"
    local pass=() v
    for v in $(compgen -v DEMO_ || true); do pass+=("$v=${!v}"); done
    warn "not root: re-running with sudo"
    exec sudo env "${pass[@]}" bash "$SCRIPT" "$@"
}

pg_bin_dir() {
    if [[ -n ${DEMO_PG_BIN:-} ]]; then echo "$DEMO_PG_BIN"; return; fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    echo "${d:-/usr/lib/postgresql/15/bin}"
}

install_missing() {
    local missing=() c
    for c in protoc etcd etcdctl haproxy pgbouncer psql patroni patronictl python3 setpriv; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [[ -x $(pg_bin_dir)/postgres ]] || missing+=(postgres)
    if ((${#missing[@]} == 0)); then
        info "all components are installed"
        return
    fi
    say "Installing what is missing: ${missing[*]}"
    # Debian starts a package's service on install: a stock etcd on 2379, PostgreSQL on 5432,
    # PgBouncer on 6432 (our port). A policy-rc.d that exits 101 forbids that for the install.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, from haconfd examples/demo.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y \
        protobuf-compiler etcd-server etcd-client haproxy pgbouncer postgresql patroni
    if [[ $POLICY_RC_CREATED == 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
}

build_haconfd() {
    say "Building haconfd (cargo build --release)"
    # If the checkout belongs to a user with rustup, build as that user so target/ stays theirs.
    local owner home
    owner=$(stat -c %U "$REPO")
    home=$(getent passwd "$owner" | cut -d: -f6 || true)
    if [[ $owner != root && -n $home && -x $home/.cargo/bin/cargo ]]; then
        runuser -u "$owner" -- env HOME="$home" PATH="$home/.cargo/bin:/usr/local/bin:/usr/bin:/bin" \
            cargo build --release --manifest-path "$REPO/Cargo.toml"
    else
        local cargo
        cargo=$(command -v cargo || true)
        [[ -z $cargo && -x $HOME/.cargo/bin/cargo ]] && cargo=$HOME/.cargo/bin/cargo
        if [[ -z $cargo ]]; then
            warn "cargo is not installed. Install Rust with rustup, then run this again:"
            warn "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
            warn "  . \"\$HOME/.cargo/env\""
            exit 1
        fi
        "$cargo" build --release --manifest-path "$REPO/Cargo.toml"
    fi
    [[ -x $HACONFD ]] || fail "build finished but $HACONFD is missing"
    info "$("$HACONFD" --version)"
}

# ---------------------------------------------------------------------------- 2. start
check_ports() {
    local ports=("$ETCD_PORT" "$ETCD_PEER_PORT" "$PRIMARY_PORT" "$REPLICA_PORT" "$STATS_PORT" "$PGBOUNCER_PORT")
    local n p busy=()
    for ((n = 1; n <= NODES; n++)); do ports+=("$(node_pg_port $n)" "$(node_api_port $n)"); done
    for p in "${ports[@]}"; do
        [[ $p =~ ^[0-9]+$ ]] && ((p > 0 && p < 65536)) || fail "bad port number: $p"
    done
    local dups
    dups=$(printf '%s\n' "${ports[@]}" | sort | uniq -d)
    [[ -z $dups ]] || fail "the same port is configured twice: $dups"
    for p in "${ports[@]}"; do
        port_free "$p" || busy+=("$p")
    done
    if ((${#busy[@]})); then
        warn "these ports on 127.0.0.1 are already in use: ${busy[*]}"
        if command -v ss >/dev/null; then
            for p in "${busy[@]}"; do ss -Hltnp "sport = :$p" 2>/dev/null | sed 's/^/    /' >&2 || true; done
        fi
        warn "stop whatever holds them, or pick others, e.g. DEMO_PRIMARY_PORT=15000 DEMO_PG_PORT_BASE=15441 (see --help)"
        exit 1
    fi
    info "ports free: etcd $ETCD_PORT/$ETCD_PEER_PORT, PostgreSQL $(node_pg_port 1)-$(node_pg_port $NODES)," \
        "REST $(node_api_port 1)-$(node_api_port $NODES), HAProxy $PRIMARY_PORT/$REPLICA_PORT/$STATS_PORT, PgBouncer $PGBOUNCER_PORT"
}

make_workdir() {
    W=$(mktemp -d /tmp/haconfd-demo.XXXXXX)
    : >"$W/pids"
    mkdir -p "$W/haproxy" "$W/pgbouncer"
    # PostgreSQL, Patroni and PgBouncer run as postgres: they need to create files here.
    chown postgres:postgres "$W" "$W/pgbouncer"
    chmod 755 "$W"
    info "work dir: $W"
}

etcd_decided() {
    local v
    v=$(http_get "$ETCD_PORT" /version) && [[ $v == *'"etcdcluster"'* && $v != *not_decided* ]]
}

start_etcd() {
    say "Starting etcd on 127.0.0.1:$ETCD_PORT"
    # A clean environment: ETCD_* variables of the caller would otherwise change its config.
    start_bg etcd etcd "$W/etcd.log" "$W" env -i PATH=/usr/bin:/bin "$(command -v etcd)" \
        --name demo-etcd --data-dir "$W/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "demo-etcd=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
        --logger zap --log-outputs stderr
    # A just-started etcd answers "etcdcluster":"not_decided" for a moment; a Patroni 3.0.2 that
    # sees that fails ("Failed to get list of machines") and sleeps 5 s. So wait for a version.
    wait_for 20 etcd_decided || { tail -n 20 "$W/etcd.log" >&2; fail "etcd did not become ready in 20 s"; }
    info "etcd ready: $(http_get "$ETCD_PORT" /version)"
}

write_patroni_config() {
    local n=$1 dir="$W/pg$1"
    mkdir -p "$dir"
    # Loopback-only demo: `trust` for every local connection, so neither HAProxy's clients, nor
    # PgBouncer, nor psql below need a password. Do not copy that to a real network.
    cat >"$dir/patroni.yml" <<EOF
scope: $SCOPE
namespace: $NAMESPACE
name: pg$n
log:
  level: INFO
restapi:
  listen: 127.0.0.1:$(node_api_port "$n")
  connect_address: 127.0.0.1:$(node_api_port "$n")
etcd3:                        # the v3 API; an "etcd:" section would use v2, invisible to haconfd
  hosts: ["127.0.0.1:$ETCD_PORT"]
bootstrap:
  dcs:
    ttl: 20                   # rule: loop_wait + 2 * retry_timeout <= ttl
    loop_wait: 2              # short, so that members and roles show up quickly
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 64MB
        max_connections: 100
  initdb:
    - encoding: UTF8
    - locale: C
postgresql:
  listen: 127.0.0.1:$(node_pg_port "$n")
  connect_address: 127.0.0.1:$(node_pg_port "$n")
  data_dir: $dir/data
  bin_dir: $PG_BIN
  pgpass: $dir/pgpass
  authentication:
    superuser: {username: postgres, password: postgres}
    replication: {username: replicator, password: replicator}
  parameters:
    unix_socket_directories: $dir
    shared_buffers: 16MB
    fsync: "off"                        # a throwaway demo: speed over durability
    wal_retrieve_retry_interval: 500ms  # a new replica's slot appears on the leader's next loop;
                                        # retry quickly instead of the default 5 s
    log_min_messages: warning
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
EOF
    chown -R postgres:postgres "$dir"
}

start_patroni() {
    local n=$1
    write_patroni_config "$n"
    start_bg "patroni-pg$n" patroni "$W/pg$n/patroni.log" "$W/pg$n" \
        setpriv --reuid=postgres --regid=postgres --init-groups \
        env -i PATH=/usr/bin:/bin HOME=/var/lib/postgresql LANG=C.UTF-8 \
        "$(command -v patroni)" "$W/pg$n/patroni.yml"
    info "pg$n: Patroni PID $STARTED_PID, PostgreSQL 127.0.0.1:$(node_pg_port "$n"), REST 127.0.0.1:$(node_api_port "$n")"
}

# "name role state" for each member, from the REST API of the first node that answers.
members() {
    local n body
    for ((n = 1; n <= NODES; n++)); do
        body=$(http_get "$(node_api_port $n)" /cluster 2>/dev/null) || continue
        "$PY" -c '
import json, sys
for m in json.loads(sys.argv[1]).get("members", []):
    print(m.get("name"), m.get("role"), m.get("state"))' "$body" && return 0
    done
    return 1
}
leader() { members | awk '!f && ($2=="leader" || $2=="master" || $2=="primary") {print $1; f=1}'; }

# True once there is one running leader, writable, and each NAME given is streaming from it.
streaming() {
    local ms lead port repl name
    ms=$(members) || return 1
    lead=$(awk '($2=="leader"||$2=="master"||$2=="primary") && $3=="running" {print $1}' <<<"$ms")
    [[ $(wc -w <<<"$lead") == 1 ]] || return 1
    port=$(node_pg_port "${lead#pg}")
    [[ $(pg_query "$port" "select pg_is_in_recovery()") == f ]] || return 1
    repl=" $(pg_query "$port" "select string_agg(application_name, ' ') from pg_stat_replication where state = 'streaming'") "
    for name in "$@"; do
        [[ $name == "$lead" || $repl == *" $name "* ]] || return 1
    done
}

dump_patroni_logs() {
    local f
    for f in "$W"/pg*/patroni.log; do
        warn "----- last lines of $f"
        tail -n 15 "$f" >&2 || true
    done
}

patronictl_list() { as_postgres "$(command -v patronictl)" -c "$W/pg1/patroni.yml" list 2>&1 | sed 's/^/    /'; }

write_haconfd_config() {
    cat >"$W/haconfd.toml" <<EOF
# Written by examples/demo.sh. Same keys as examples/haconfd.toml, pointed at this work dir.
[etcd]
endpoints = ["http://127.0.0.1:$ETCD_PORT"]
namespace = "$NAMESPACE"
scope = "$SCOPE"

[daemon]
min_interval = "500ms"

[log]
level = "info"

[vars]
bind_address = "127.0.0.1"
primary_port = $PRIMARY_PORT
replica_port = $REPLICA_PORT
stats_port = $STATS_PORT
stats_socket = "$W/haproxy/admin.sock"
# During a switchover, a new connection to :$PRIMARY_PORT waits for the new primary instead of
# being closed while no server takes writes.
hold_lua = "$REPO/templates/hold.lua"

[[template]]
name = "haproxy"
src = "$REPO/templates/haproxy.cfg.tera"
dest = "$W/haproxy/haproxy.cfg"
check = ["haproxy", "-c", "-f", "{{staged}}"]
# HAProxy runs in master-worker mode: SIGUSR2 to the master (PID from its pidfile, checked to be
# "haproxy"), then haconfd confirms the reload with "show proc" on the master socket.
reload = { pidfile = "$W/haproxy/haproxy.pid", signal = "SIGUSR2", process = "haproxy", master_socket = "$W/haproxy/master.sock" }
# Dumped from the stats socket before each reload and corrected from etcd's view, so a new worker
# does not start every server UP (which would send writes to replicas for a moment).
server_state = { stats_socket = "$W/haproxy/admin.sock", file = "$W/haproxy/server-state" }

[[template]]
name = "pgbouncer"
src = "$REPO/templates/pgbouncer.ini.tera"
dest = "$W/pgbouncer/pgbouncer.ini"
check = []
require_leader = true
reload = { pidfile = "$W/pgbouncer/pgbouncer.pid", signal = "SIGHUP", process = "pgbouncer" }
# The admin console: PAUSE when the switchover is requested, RELOAD + RESUME once the new primary
# takes writes (the SIGHUP above is the fallback if the console cannot be reached).
pgbouncer_admin = { host = "$W/pgbouncer", port = $PGBOUNCER_PORT, user = "postgres" }
# auth_type trust: fine for a loopback-only demo, never on a network. PgBouncer still wants each
# user listed in auth_file.
vars = { listen_addr = "127.0.0.1", listen_port = $PGBOUNCER_PORT, unix_socket_dir = "$W/pgbouncer", auth_type = "trust", auth_file = "$W/pgbouncer/userlist.txt", admin_users = "postgres", pidfile = "$W/pgbouncer/pgbouncer.pid", logfile = "$W/pgbouncer/pgbouncer.log" }
EOF
    echo '"postgres" ""' >"$W/pgbouncer/userlist.txt"
    chown postgres:postgres "$W/pgbouncer/userlist.txt"
}

haconfd_once() {
    say "First render: haconfd once"
    # --no-reload: HAProxy and PgBouncer are not running yet; they start on these files next.
    info "\$ haconfd -c $W/haconfd.toml once --no-reload"
    local out rc=0
    out=$("$HACONFD" -c "$W/haconfd.toml" once --no-reload 2>&1) || rc=$?
    sed 's/^/    /' <<<"$out"
    ((rc == 0)) || fail "haconfd once failed (exit $rc; see haconfd --help for the codes)"
}

start_haproxy() {
    say "Starting HAProxy (master-worker) on :$PRIMARY_PORT (writes) and :$REPLICA_PORT (reads)"
    # -W master-worker, -D daemon, -p pidfile (master PID only), -S master CLI socket.
    haproxy -W -D -p "$W/haproxy/haproxy.pid" -S "$W/haproxy/master.sock" -f "$W/haproxy/haproxy.cfg" \
        >>"$W/haproxy/haproxy.log" 2>&1 || { cat "$W/haproxy/haproxy.log" >&2; fail "haproxy did not start"; }
    wait_for 10 test -s "$W/haproxy/haproxy.pid" || fail "no HAProxy pidfile"
    local pid
    pid=$(head -n1 "$W/haproxy/haproxy.pid")
    is_proc "$pid" haproxy || fail "HAProxy pidfile names PID $pid, which is not haproxy"
    record haproxy "$pid" haproxy
    wait_for 10 test -S "$W/haproxy/master.sock" || fail "no HAProxy master socket"
    info "HAProxy master PID $pid"
}

start_pgbouncer() {
    say "Starting PgBouncer on :$PGBOUNCER_PORT (as postgres; it refuses to run as root)"
    as_postgres "$(command -v pgbouncer)" -d "$W/pgbouncer/pgbouncer.ini" >>"$W/pgbouncer/stdout.log" 2>&1 ||
        { cat "$W/pgbouncer/stdout.log" "$W/pgbouncer/pgbouncer.log" >&2 2>/dev/null || true; fail "pgbouncer did not start"; }
    wait_for 10 test -s "$W/pgbouncer/pgbouncer.pid" || fail "no PgBouncer pidfile"
    local pid
    pid=$(cat "$W/pgbouncer/pgbouncer.pid")
    is_proc "$pid" pgbouncer || fail "PgBouncer pidfile names PID $pid, which is not pgbouncer"
    record pgbouncer "$pid" pgbouncer
    info "PgBouncer PID $pid"
}

start_haconfd() {
    say "Starting haconfd run (log: $W/haconfd.log)"
    start_bg haconfd haconfd "$W/haconfd.log" "$W" "$HACONFD" -c "$W/haconfd.toml" run
    # Its first pass finds the files up to date and reloads nothing; give it a moment to connect.
    sleep 1
    is_proc "$STARTED_PID" haconfd || { cat "$W/haconfd.log" >&2; fail "haconfd run exited"; }
    info "haconfd PID $STARTED_PID"
}

# ---------------------------------------------------------------------------- 3. show
show_files() {
    say "Rendered $W/haproxy/haproxy.cfg (listen sections)"
    sed -n '/^listen primary/,$p' "$W/haproxy/haproxy.cfg" | sed '/^$/d; s/^/    /'
    say "Rendered $W/pgbouncer/pgbouncer.ini ([databases])"
    sed -n '/^; Leader/p; /^\[databases\]/,/^\[pgbouncer\]/p' "$W/pgbouncer/pgbouncer.ini" |
        sed '/^\[pgbouncer\]/d; /^$/d; s/^/    /'
}

# Which node answers a new connection on PORT: "pg2 primary", "pg1 replica" or "none (why)".
who_serves() {
    local out role
    if out=$(pg_query "$1" "select inet_server_port(), pg_is_in_recovery()" "${2:-postgres}") &&
        [[ $out =~ ^([0-9]+)\|([tf])$ ]]; then
        if [[ ${BASH_REMATCH[2]} == t ]]; then role=replica; else role=primary; fi
        echo "$(port_name "${BASH_REMATCH[1]}") $role"
    else
        out=${out%%$'\n'*}
        out=${out##*failed: }
        echo "none (${out:0:50})"
    fi
}

# The node pgbouncer.ini points at ("* = host=... port=...").
pgbouncer_target() {
    local p
    p=$(sed -n 's/^\* = host=[^ ]* port=\([0-9]*\).*/\1/p' "$W/pgbouncer/pgbouncer.ini")
    if [[ -n $p ]]; then port_name "$p"; else echo "?"; fi
}

show_routing() {
    local reads=() i
    for ((i = 0; i < ${1:-4}; i++)); do reads+=("$(who_serves "$REPLICA_PORT" | cut -d' ' -f1)"); done
    info "writes  :$PRIMARY_PORT (HAProxy primary)   -> $(who_serves "$PRIMARY_PORT")"
    info "reads   :$REPLICA_PORT (HAProxy replicas)  -> ${reads[*]}   (${#reads[@]} new connections, round robin)"
    info "pooled  :$PGBOUNCER_PORT (PgBouncer)        -> $(who_serves "$PGBOUNCER_PORT")   (pgbouncer.ini: $(pgbouncer_target))"
}

writes_to() { [[ $(who_serves "$PRIMARY_PORT") == "$1 primary" ]]; }

reload_count() { haproxy_cli "$W/haproxy/master.sock" "show proc" | awk '!f && $2=="master" {print $3; f=1}'; }
reloaded_since() { local c; c=$(reload_count) && [[ $c =~ ^[0-9]+$ ]] && ((c > $1)); }

# Is SERVER up in HAProxy backend BACKEND? (srv_op_state 2 = running, from the stats socket)
haproxy_server_up() {
    haproxy_cli "$W/haproxy/admin.sock" "show servers state $1" | awk -v s="$2" '$4==s && $6==2 {f=1} END {exit !f}'
}

# ---------------------------------------------------------------------------- 5. switchover
watch_switchover() {
    local new=$1 t0 i w b ini t tick el left pw pb
    T_WRITES="" T_BOUNCER="" T_INI=""
    t0=$(now_us)
    info "time since patronictl started | who answers a new connection on :$PRIMARY_PORT | on PgBouncer :$PGBOUNCER_PORT | pgbouncer.ini"
    # Twice a second, bounded: WATCH_SECONDS, extended up to 25 s only while the new leader has not
    # taken writes yet; at most 100 lines whatever happens. Both probes run in parallel, so a
    # connection that hangs during the switch (psql gives up after 2 s) delays one line, not two.
    for ((i = 0; i < 100; i++)); do
        tick=$(now_us)
        t=$(since "$t0")
        who_serves "$PRIMARY_PORT" >"$W/probe.writes" &
        pw=$!
        who_serves "$PGBOUNCER_PORT" >"$W/probe.bouncer" &
        pb=$!
        wait "$pw" "$pb" || true
        w=$(<"$W/probe.writes")
        b=$(<"$W/probe.bouncer")
        ini=$(pgbouncer_target)
        [[ -z $T_WRITES && $w == "$new primary" ]] && T_WRITES=$t
        [[ -z $T_BOUNCER && $b == "$new primary" ]] && T_BOUNCER=$t
        [[ -z $T_INI && $ini == "$new" ]] && T_INI=$t
        printf '    +%5ss   :%s -> %-44s :%s -> %-28s ini -> %s\n' "$t" "$PRIMARY_PORT" "$w" "$PGBOUNCER_PORT" "$b" "$ini"
        el=$(($(now_us) - t0))
        if ((el >= WATCH_SECONDS * 1000000)) && [[ -n $T_WRITES && -n $T_BOUNCER ]]; then break; fi
        ((el >= 25000000)) && break
        left=$((500000 - ($(now_us) - tick))) # sleep what is left of this half second
        ((left > 0)) && sleep "0.$(printf '%06d' "$left")"
    done
}

# ---------------------------------------------------------------------------- main
main() {
    case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --stop)
        [[ -n ${2:-} && -f ${2:-}/pids ]] || fail "--stop needs the work dir of a kept demo (it has a pids file)"
        ensure_root "$@"
        W=$2
        CLEANED=1 # no EXIT cleanup in this mode
        say "Stopping the demo in $W"
        stop_all "$W"
        if [[ -z $(leftovers "$W") ]]; then
            [[ $(basename "$W") == haconfd-demo.* ]] && rm -rf "$W" && info "removed $W"
        else
            fail "still running: $(leftovers "$W")"
        fi
        exit 0
        ;;
    "") ;;
    *) warn "unknown argument: $1"; usage >&2; exit 2 ;;
    esac
    ensure_root "$@"
    trap 'cleanup $?' EXIT
    # Say where an unexpected failure (set -e) happened; the EXIT trap then cleans up.
    set -E
    trap 'on_err $? $LINENO' ERR
    trap 'exit 130' INT
    trap 'exit 143' TERM
    T0_US=$(now_us)

    say "Checking the machine"
    install_missing
    command -v python3 >/dev/null || fail "python3 is missing"
    [[ -x $PY ]] || PY=$(command -v python3)
    PG_BIN=$(pg_bin_dir)
    [[ -x $PG_BIN/postgres ]] || fail "no PostgreSQL server in $PG_BIN (set DEMO_PG_BIN)"
    id postgres >/dev/null 2>&1 || fail "no postgres user (apt-get install postgresql)"
    build_haconfd
    BUILD_TIME=$(since "$T0_US")
    T0_US=$(now_us) # the demo's own clock starts after the build
    check_ports
    make_workdir

    # -- 2. start
    start_etcd
    say "Starting a 3-node Patroni cluster (scope $SCOPE)"
    local t_cluster n
    t_cluster=$(now_us)
    for n in 1 2 3; do start_patroni "$n"; done
    info "waiting for a leader and two streaming replicas (usually 5-20 s)..."
    wait_for 90 streaming pg1 pg2 pg3 || { dump_patroni_logs; fail "the cluster did not come up in 90 s"; }
    CLUSTER_UP=$(since "$t_cluster")
    info "cluster up in ${CLUSTER_UP}s"
    patronictl_list
    info "Patroni's keys in etcd:"
    env -i PATH=/usr/bin:/bin ETCDCTL_API=3 etcdctl --endpoints="127.0.0.1:$ETCD_PORT" \
        get --prefix --keys-only "$NAMESPACE/$SCOPE/" | sed '/^$/d; s/^/      /'

    write_haconfd_config
    haconfd_once
    start_haproxy
    start_pgbouncer
    start_haconfd

    # -- 3. show
    show_files
    say "Routing"
    local lead
    lead=$(leader)
    # The server-state file written by haconfd makes HAProxy start the replicas DOWN in the write
    # listener; the leader comes UP at once. Wait for writes to work before looking.
    wait_for 20 writes_to "$lead" || fail "writes through :$PRIMARY_PORT do not reach the leader $lead"
    wait_for 20 pg_query "$PGBOUNCER_PORT" "select 1" || fail "PgBouncer :$PGBOUNCER_PORT does not answer"
    show_routing 4

    # -- 4. add pg4
    say "Adding a 4th member, pg4, to the running cluster"
    local before t_add log_mark
    log_mark=$(wc -l <"$W/haconfd.log")
    before=$(reload_count)
    info "HAProxy reloads so far: $before"
    t_add=$(now_us)
    start_patroni 4
    # pg4 registers its member key as soon as its Patroni starts (while it still clones): haconfd
    # re-renders haproxy.cfg, checks it with `haproxy -c`, swaps it in and reloads HAProxy.
    wait_for 60 grep -q '^ *server pg4 ' "$W/haproxy/haproxy.cfg" ||
        { tail -n 20 "$W/haconfd.log" >&2; fail "haproxy.cfg does not list pg4 after 60 s"; }
    PG4_LISTED=$(since "$t_add")
    info "haproxy.cfg lists pg4 after ${PG4_LISTED}s"
    wait_for 30 reloaded_since "$before" || { tail -n 20 "$W/haconfd.log" >&2; fail "HAProxy was not reloaded"; }
    info "HAProxy master CLI, show proc:"
    haproxy_cli "$W/haproxy/master.sock" "show proc" | sed '/^$/d; s/^/      /'
    info "haconfd's log since pg4 started:"
    tail -n "+$((log_mark + 1))" "$W/haconfd.log" | grep -E 'file updated|reloaded|ERROR|WARN' | cut -c1-200 | sed 's/^/      /'
    info "waiting for pg4 to stream and for HAProxy's checks to take it in..."
    wait_for 90 streaming pg1 pg2 pg3 pg4 || { dump_patroni_logs; fail "pg4 did not start streaming"; }
    wait_for 20 haproxy_server_up replicas pg4 || fail "HAProxy never marked pg4 UP in the read listener"
    PG4_READY=$(since "$t_add")
    info "pg4 streaming and serving reads ${PG4_READY}s after it started"
    sed -n '/^listen replicas/,$p' "$W/haproxy/haproxy.cfg" | sed '/^$/d; s/^/    /'
    show_routing 6
    RELOADS=$(reload_count)

    # -- 5. switchover
    local old new
    old=$(leader)
    new=$(members | awk -v l="$old" '$1!=l && ($3=="running"||$3=="streaming") {print $1}' | sort | head -n1)
    [[ -n $old && -n $new ]] || fail "cannot pick a leader and a candidate: $(members | tr '\n' ';')"
    log_mark=$(wc -l <"$W/haconfd.log")
    say "Switchover $old -> $new (patronictl switchover --force), watching :$PRIMARY_PORT and PgBouncer"
    # Patroni 3.0.2 wants the current leader named (--leader) along with --force.
    info "\$ patronictl -c $W/pg1/patroni.yml switchover --leader $old --candidate $new --force"
    as_postgres "$(command -v patronictl)" -c "$W/pg1/patroni.yml" switchover --leader "$old" --candidate "$new" --force \
        >"$W/switchover.log" 2>&1 &
    local sw=$!
    record patronictl "$sw" patronictl
    watch_switchover "$new"
    local i
    for ((i = 0; i < 300; i++)); do is_proc "$sw" patronictl || break; sleep 0.1; done
    if is_proc "$sw" patronictl; then
        warn "patronictl still running after 30 s: stopping it"
        stop_procs TERM 5 "patronictl:$sw:patronictl"
    fi
    wait "$sw" 2>/dev/null || warn "patronictl switchover reported a failure: $(tail -n 3 "$W/switchover.log")"
    info "patronictl: $(grep -m1 -iE 'success|error|fail' "$W/switchover.log" || tail -n1 "$W/switchover.log")"
    info "haconfd's log during the switchover (the fast path's timeline: fence, confirm, switch):"
    tail -n "+$((log_mark + 1))" "$W/haconfd.log" |
        grep -E 'fencing|pausing|takes writes|follows the new primary|resumed|file updated|reloaded|ERROR|WARN' |
        cut -c1-220 | sed 's/^/      /'
    info "waiting for $old to rejoin as a replica..."
    wait_for 60 streaming pg1 pg2 pg3 pg4 || warn "$old has not rejoined as a streaming replica within 60 s"
    patronictl_list
    show_routing 6
    SWITCH="$old -> $new"
    [[ $(leader) == "$new" ]] || fail "the leader is $(leader), not $new"

    # -- 6. stop + summary
    local keep=${DEMO_KEEP:-0} total master_then master_now master_note
    total=$(since "$T0_US")
    master_then=$(awk '$1=="haproxy"{print $2}' "$W/pids")
    master_now=$(head -n1 "$W/haproxy/haproxy.pid")
    master_note="master PID $master_now"
    if [[ $master_now == "$master_then" ]]; then master_note+=" throughout"; else master_note+=" (was $master_then)"; fi
    if [[ $keep != 1 ]]; then
        cleanup 0
    fi
    say "Summary"
    info "cluster:     3 Patroni nodes up in ${CLUSTER_UP}s; pg4 in haproxy.cfg after ${PG4_LISTED}s, serving reads after ${PG4_READY}s"
    info "HAProxy:     $RELOADS reload(s) by haconfd, each checked with haproxy -c first; $master_note"
    info "switchover:  $SWITCH (times from the patronictl call): writes via :$PRIMARY_PORT on $new after ${T_WRITES:-?}s;"
    info "             pgbouncer.ini re-pointed by haconfd after ${T_INI:-?}s, new connections via :$PGBOUNCER_PORT on $new after ${T_BOUNCER:-?}s"
    if [[ -n $T_INI && -n $T_BOUNCER ]] && ((${T_BOUNCER%.*} - ${T_INI%.*} >= 5)); then
        info "             (PgBouncer waits server_login_retry, 15 s by default, after a failed connect to the"
        info "             demoted leader before it tries the new one; the shipped template does not lower it)"
    fi
    info "time:        ${total}s for the demo itself (before cleanup), after ${BUILD_TIME}s of install checks and build"
    if [[ $keep == 1 ]]; then
        info "left running (DEMO_KEEP=1); see above for how to stop it"
    else
        if [[ -z $LEFT ]]; then
            info "cleanup:     $STOPPED_COUNT processes stopped by PID; none of the recorded ones is left"
        else
            info "cleanup:     $STOPPED_COUNT processes stopped by PID; STILL RUNNING: $LEFT"
        fi
    fi
}

main "$@"
