#!/bin/sh
# Makes a Debian 12 (bookworm) base image on this machine, from Debian's own packages, for places
# where no image can be pulled (the container tests, tests/containers.rs, run it; so can you):
#
#   sudo docker/local/mkbase.sh haconfd-local/debian:bookworm
#
# debootstrap --variant=minbase into a temporary directory, trimmed the way the official
# debian:12-slim image is (no documentation, manual pages or translations, no apt caches), then
# `docker import`ed under TAG. The packages come from the mirror of this machine's own
# /etc/apt/sources.list.d/debian.sources (debootstrap's default mirror if there is none), and the
# image gets that same file, so `apt-get install` in an image built on it uses the same mirror,
# updates and security suites as the machine.
#
# The other local bases are built on it: haproxy.Dockerfile (the runtime base of docker/Dockerfile
# and the haproxy service), etcd.Dockerfile (the etcd service), docker/patroni/Dockerfile
# (BASE=...), prebuilt.Dockerfile (the build-stage base with a haconfd built on the host).
# Needs root (debootstrap) and the debootstrap package.
set -eu

tag="${1:?usage: mkbase.sh TAG}"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || {
    echo "mkbase.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
}
PATH="$PATH:/usr/sbin:/sbin"

sources=/etc/apt/sources.list.d/debian.sources
mirror=""
if [ -f "$sources" ]; then
    # The first URIs: line of the stanza that carries the main suite.
    mirror=$(awk '/^URIs:/ { print $2; exit }' "$sources")
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/haconfd-base.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root="$work/rootfs"

# shellcheck disable=SC2086 # $mirror is one word or nothing
debootstrap --variant=minbase bookworm "$root" $mirror >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "mkbase.sh: debootstrap failed (log above)" >&2
    exit 1
}

# What debian:12-slim sets: later installs leave documentation, manual pages and translations
# out, and apt keeps neither the downloaded packages nor its binary caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'CFG'
Acquire::Languages "none";
CFG
if [ -f "$sources" ]; then
    cp "$sources" "$root/etc/apt/sources.list.d/debian.sources"
    rm -f "$root/etc/apt/sources.list"
fi
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/groff/* "$root"/usr/share/info/* \
    "$root"/usr/share/lintian/* "$root"/usr/share/linda/* "$root"/var/cache/man/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
rm -f "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/etc/hostname "$root"/etc/resolv.conf
: >"$root/etc/machine-id"

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --message "debootstrap --variant=minbase bookworm (docker/local/mkbase.sh)" \
    - "$tag" >/dev/null
echo "$tag"
