#!/bin/sh
# Entrypoint of the demo Patroni image (docker/patroni/Dockerfile): writes Patroni's YAML from
# environment variables, then runs the command (by default `patroni <that file>`).
#
# The variables are Patroni's own names (Patroni also reads them directly, so the file and the
# environment can never disagree):
#   PATRONI_SCOPE (required)         the cluster name; haconfd's [etcd] scope must be the same
#   PATRONI_NAME                     member name, default: the container's hostname
#   PATRONI_NAMESPACE                default /service; haconfd's [etcd] namespace must be the same
#   PATRONI_ETCD3_HOSTS              etcd client host:port list, default etcd:2379: the etcd3
#                                    section, the v3 API that haconfd watches. Never set
#                                    PATRONI_ETCD_HOSTS: that is the v2 API, invisible to haconfd.
#   PATRONI_SUPERUSER_USERNAME / _PASSWORD, PATRONI_REPLICATION_USERNAME / _PASSWORD
# And two of this script's own (no PATRONI_ prefix: Patroni parses every PATRONI_* name):
#   CONNECT_HOST                     the address other nodes and HAProxy use for this member,
#                                    default: this container's IP. An IP, not the hostname: HAProxy
#                                    resolves server names when it loads a config, and the name of
#                                    a stopped container no longer resolves, which would make
#                                    every new haproxy.cfg fail `haproxy -c` until its key expires.
#   CONNECT_CIDR                     instead of CONNECT_HOST, for a node on several networks: its
#                                    address in this IPv4 network (e.g. 172.30.0.0/16). The default
#                                    takes the first address `hostname -i` gives, whose order is the
#                                    order of /etc/hosts, not of the networks.
#   CONFIG_FILE                      where to write the YAML,
#                                    default /var/lib/postgresql/patroni.yml
set -eu

: "${PATRONI_SCOPE:?set PATRONI_SCOPE, the Patroni cluster name}"
: "${PATRONI_SUPERUSER_PASSWORD:?set PATRONI_SUPERUSER_PASSWORD}"
: "${PATRONI_REPLICATION_PASSWORD:?set PATRONI_REPLICATION_PASSWORD}"
name="${PATRONI_NAME:-$(hostname)}"
namespace="${PATRONI_NAMESPACE:-/service}"
etcd_hosts="${PATRONI_ETCD3_HOSTS:-etcd:2379}"
superuser="${PATRONI_SUPERUSER_USERNAME:-postgres}"
replicator="${PATRONI_REPLICATION_USERNAME:-replicator}"
config="${CONFIG_FILE:-/var/lib/postgresql/patroni.yml}"
# This node's IPv4 address in the network $1 (a.b.c.d/n), if it has one.
address_in() {
    hostname -I | tr ' ' '\n' | awk -v cidr="$1" '
        function num(ip, o) { split(ip, o, "."); return ((o[1] * 256 + o[2]) * 256 + o[3]) * 256 + o[4] }
        BEGIN { split(cidr, c, "/"); size = 2 ^ (32 - c[2]); net = num(c[1]); net -= net % size }
        /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$/ { n = num($0); if (n >= net && n < net + size) { print; exit } }'
}
if [ -n "${CONNECT_HOST:-}" ]; then
    address="$CONNECT_HOST"
elif [ -n "${CONNECT_CIDR:-}" ]; then
    address=$(address_in "$CONNECT_CIDR")
    [ -n "$address" ] || { echo "no address of this node is in CONNECT_CIDR=$CONNECT_CIDR: $(hostname -I)" >&2; exit 2; }
else
    address=$(hostname -i | cut -d' ' -f1)
fi
data_dir="${PGDATA:-/var/lib/postgresql/data}"
bin_dir="${PG_BIN_DIR:-/usr/lib/postgresql/15/bin}"

# A single-quoted YAML scalar: the only escape is '' for '.
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }
# A pg_hba.conf name: double-quoted, the only escape is "" for ". (A YAML quote inside a pg_hba line
# would reach pg_hba.conf as part of the name: the rule would then match no user.)
hba_name() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

umask 077
cat >"$config" <<YAML
scope: $(q "$PATRONI_SCOPE")
namespace: $(q "$namespace")
name: $(q "$name")
restapi:
  listen: 0.0.0.0:8008
  connect_address: $(q "$address:8008")
etcd3:
  hosts: $(q "$etcd_hosts")
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 64MB
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
postgresql:
  listen: 0.0.0.0:5432
  connect_address: $(q "$address:5432")
  data_dir: $(q "$data_dir")
  bin_dir: $(q "$bin_dir")
  pgpass: /tmp/pgpass
  authentication:
    superuser:
      username: $(q "$superuser")
      password: $(q "$PATRONI_SUPERUSER_PASSWORD")
    replication:
      username: $(q "$replicator")
      password: $(q "$PATRONI_REPLICATION_PASSWORD")
  parameters:
    unix_socket_directories: /var/run/postgresql
  pg_hba:
    - local all all trust
    - $(q "host replication $(hba_name "$replicator") 0.0.0.0/0 scram-sha-256")
    - host all all 0.0.0.0/0 scram-sha-256
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
YAML

if [ "$#" -eq 0 ]; then
    set -- patroni "$config"
fi
exec "$@"
