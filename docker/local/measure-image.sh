#!/bin/bash
# Measures haconfd's runtime image (docs/BENCHMARKS.md, "The container image"): its size, how
# long `docker run` takes to a serving /healthz and to the first haproxy.cfg swapped in, and the
# idle memory of haconfd in the container, as the HAProxy sidecar of docker/compose.yml (HAProxy
# in its own container, the shared directory, docker/haconfd.toml with etcd in a third container
# and three Patroni member keys).
#
#   docker/local/measure-image.sh BIN DEBIAN_IMAGE HAPROXY_IMAGE ETCD_IMAGE [RUNS]
#
# BIN is a haconfd binary (the release build: target/release/haconfd); the images are the local
# bases (docker/local/mkbase.sh, haproxy.Dockerfile, etcd.Dockerfile), e.g. the ones the container
# tests built (`docker images haconfd-local/*`). Everything it makes is named hcdm-$$-* and removed
# at the end. Needs root (the idle RSS is read from /proc of the host).
set -euo pipefail
bin="${1:?usage: measure-image.sh BIN DEBIAN_IMAGE HAPROXY_IMAGE ETCD_IMAGE [RUNS]}"
debian="${2:?}"
haproxy_image="${3:?}"
etcd_image="${4:?}"
runs="${5:-5}"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
p="hcdm-$$"
work=$(mktemp -d)
cleanup() {
    docker rm -f "$p-etcd" "$p-haproxy" "$p-haconfd" >/dev/null 2>&1 || true
    docker network rm "$p-net" >/dev/null 2>&1 || true
    docker rmi "$p/haconfd" "$p/prebuilt" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }

# The image, from docker/Dockerfile with the binary as PREBUILT.
mkdir "$work/ctx"
cp "$bin" "$work/ctx/haconfd"
docker build -q -f "$here/prebuilt.Dockerfile" --build-arg "BASE=$debian" -t "$p/prebuilt" \
    "$work/ctx" >/dev/null
docker build -q -f "$repo/docker/Dockerfile" --build-arg "BUILD_BASE=$p/prebuilt" \
    --build-arg PREBUILT=/usr/local/lib/haconfd/haconfd --build-arg "RUNTIME_BASE=$haproxy_image" \
    -t "$p/haconfd" "$repo" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$p/haconfd")
base=$(docker image inspect -f '{{.Size}}' "$haproxy_image")
echo "image: $((size / 1000000)) MB ($size bytes); its base $((base / 1000000)) MB; haconfd's layers $(((size - base) / 1000)) kB; binary $(stat -c %s "$bin") bytes"

# etcd with three member keys.
docker network create "$p-net" >/dev/null
docker run -d --name "$p-etcd" --network "$p-net" --network-alias etcd "$etcd_image" \
    /usr/local/bin/etcd --data-dir=/var/lib/etcd/data --listen-client-urls=http://0.0.0.0:2379 \
    --advertise-client-urls=http://etcd:2379 >/dev/null
for _ in $(seq 100); do docker exec "$p-etcd" etcdctl endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
for i in 1 2 3; do
    role=replica
    [ "$i" = 1 ] && role=master
    docker exec "$p-etcd" etcdctl put "/service/demo/members/pg$i" \
        "{\"conn_url\":\"postgres://192.0.2.1$i:5432/postgres\",\"api_url\":\"http://192.0.2.1$i:8008/patroni\",\"state\":\"running\",\"role\":\"$role\"}" >/dev/null
done
docker exec "$p-etcd" etcdctl put /service/demo/leader pg1 >/dev/null

# Start: `docker run -d` (create + start) to /healthz, and to haproxy.cfg on the shared directory.
health=()
first=()
for r in $(seq "$runs"); do
    vol="$work/vol$r"
    mkdir "$vol"
    chown 99:99 "$vol"
    t0=$(now)
    docker run -d --name "$p-haconfd" --network "$p-net" -v "$vol:/var/lib/haproxy" \
        -v "$repo/docker/haconfd.toml:/etc/haconfd/haconfd.toml:ro" "$p/haconfd" run >/dev/null
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$p-haconfd")
    th=""
    tf=""
    for _ in $(seq 2000); do
        [ -z "$th" ] && curl -fsS -o /dev/null --max-time 1 "http://$ip:9187/healthz" 2>/dev/null && th=$(now)
        [ -z "$tf" ] && [ -s "$vol/haproxy.cfg" ] && tf=$(now)
        [ -n "$th" ] && [ -n "$tf" ] && break
        sleep 0.005
    done
    health+=("$(ms "$t0" "$th")")
    first+=("$(ms "$t0" "$tf")")
    if [ "$r" != "$runs" ]; then docker rm -f "$p-haconfd" >/dev/null; fi
done
echo "start, ms (docker run -d → /healthz 200): ${health[*]}"
echo "start, ms (docker run -d → first haproxy.cfg swapped in): ${first[*]}"

# Idle: HAProxy up beside it, haconfd settled; 60 s later, its RSS and the container's memory.
docker run -d --name "$p-haproxy" --network "$p-net" --user 99:99 -v "$vol:/var/lib/haproxy" \
    --entrypoint /bin/sh "$haproxy_image" -c \
    'exec haproxy -W -db -S /var/lib/haproxy/master.sock -f /var/lib/haproxy/haproxy.cfg' >/dev/null
for _ in $(seq 300); do
    curl -fsS -o /dev/null --max-time 1 "http://$ip:9187/readyz" 2>/dev/null && break
    sleep 0.1
done
curl -fsS -o /dev/null --max-time 1 "http://$ip:9187/readyz" || echo "(not ready: $(curl -s "http://$ip:9187/readyz"))"
sleep 60
pid=$(docker inspect -f '{{.State.Pid}}' "$p-haconfd")
grep -E '^(VmRSS|RssAnon|RssFile|VmHWM)' "/proc/$pid/status" | tr -s ' \t' ' ' | paste -sd ';' | sed 's/^/idle haconfd: /'
echo "idle container: $(docker stats --no-stream --format '{{.MemUsage}} {{.CPUPerc}}' "$p-haconfd")"
cpu=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
sleep 60
cpu2=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
echo "idle CPU over 60 s: $((cpu2 - cpu)) ticks of $(getconf CLK_TCK)/s"
