# A local stand-in for the official haproxy:2.6-bookworm image, for machines that cannot pull it
# (the container tests build it; docker/local/mkbase.sh makes BASE):
#
#   docker build -f docker/local/haproxy.Dockerfile --build-arg BASE=haconfd-local/debian:bookworm \
#       -t haconfd-local/haproxy:2.6-bookworm docker/local
#
# HAProxy 2.6 from Debian 12's own package (built with Lua, like the official image), laid out as
# far as docker/Dockerfile, docker/compose.yml and docker/k8s/ rely on it:
# - the user `haproxy` is uid 99, group `haproxy` gid 99 (the official image's numbers; Debian's
#   package makes a dynamic system uid, renumbered here), home /var/lib/haproxy owned by it;
# - `haproxy` is on PATH (here /usr/sbin/haproxy; the official image has /usr/local/sbin/haproxy);
# - USER haproxy, WORKDIR /var/lib/haproxy, STOPSIGNAL SIGUSR1 (HAProxy's soft stop), and
#   /usr/local/etc/haproxy/haproxy.cfg as the default config, as in the official image.
# Debian's package would also start HAProxy from its init script and make /run/haproxy; neither
# happens in a container.
ARG BASE=haconfd-local/debian:bookworm
FROM ${BASE}

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends haproxy ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    old_uid=$(id -u haproxy); old_gid=$(id -g haproxy); \
    groupmod --gid 99 haproxy; \
    usermod --uid 99 --gid 99 --home /var/lib/haproxy haproxy; \
    find / -xdev \( -uid "$old_uid" -o -gid "$old_gid" \) -exec chown -h 99:99 {} +; \
    install -d -o 99 -g 99 -m 0755 /var/lib/haproxy; \
    install -d -m 0755 /usr/local/etc/haproxy; \
    cp /etc/haproxy/haproxy.cfg /usr/local/etc/haproxy/haproxy.cfg; \
    test "$(id -u haproxy):$(id -g haproxy)" = 99:99; \
    haproxy -vv | grep -q 'Built with Lua'

USER haproxy
WORKDIR /var/lib/haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
