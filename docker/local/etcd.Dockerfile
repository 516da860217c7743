# A local stand-in for the etcd image of docker/compose.yml (quay.io/coreos/etcd), for machines that
# cannot pull it (the container tests build it; docker/local/mkbase.sh makes BASE):
#
#   docker build -f docker/local/etcd.Dockerfile --build-arg BASE=haconfd-local/debian:bookworm \
#       -t haconfd-local/etcd:3.4-bookworm docker/local
#
# etcd and etcdctl from Debian 12's packages (etcd 3.4; the v3 API that haconfd and Patroni's
# etcd3 section use is the same), at the paths the official image has them, /usr/local/bin/etcd
# and /usr/local/bin/etcdctl, so that compose.yml's command and health check run unchanged.
# Runs as the package's `etcd` user, data under /var/lib/etcd.
ARG BASE=haconfd-local/debian:bookworm
FROM ${BASE}

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends etcd-server etcd-client; \
    rm -rf /var/lib/apt/lists/*; \
    ln -s /usr/bin/etcd /usr/local/bin/etcd; \
    ln -s /usr/bin/etcdctl /usr/local/bin/etcdctl; \
    install -d -o etcd -g etcd -m 0700 /var/lib/etcd

USER etcd
WORKDIR /var/lib/etcd
ENV ETCDCTL_API=3
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd", "--data-dir=/var/lib/etcd/data"]
