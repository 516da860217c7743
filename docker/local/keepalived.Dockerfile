# keepalived for the load-balancer hosts of the container tests (tests/containers.rs: the VIP in
# front of several hosts, examples/keepalived/), on the local Debian 12 base
# (docker/local/mkbase.sh makes BASE):
#
#   docker build -f docker/local/keepalived.Dockerfile --build-arg BASE=haconfd-local/debian:bookworm \
#       -t haconfd-local/keepalived:bookworm docker/local
#
# Debian 12's keepalived (2.2), curl for the track script (examples/keepalived/haconfd-lb-check)
# and iproute2 to see where the VIP is. It runs as root: VRRP adds and removes the VIP on the
# interface, which needs the NET_ADMIN capability (`docker run --cap-add NET_ADMIN`); the raw
# socket VRRP speaks on needs NET_RAW, which Docker grants by default. The config is mounted at
# /etc/keepalived/. In the foreground, logging to stdout, VRRP only (no LVS). Give it a tmpfs at
# /run (`--tmpfs /run`), as a host has: a pidfile left there by a killed keepalived makes the next
# start exit with "daemon is already running".
ARG BASE=haconfd-local/debian:bookworm
FROM ${BASE}

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends keepalived curl iproute2; \
    rm -rf /var/lib/apt/lists/*; \
    keepalived --version 2>&1 | grep -q 'Keepalived v2\.'

CMD ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp"]
