#!/bin/sh
# Builds haconfd's Debian package with cargo-deb (`cargo install cargo-deb --locked`):
#
#   packaging/build-deb.sh                          # release build -> target/debian/haconfd_*.deb
#   packaging/build-deb.sh --binary PATH -o DIR     # package a binary built already (tests/deb.rs
#                                                   # packages its debug build, stripped, in seconds)
#
# The man page and the shell completions are generated from the binary's own command line
# (`haconfd manpage`, `haconfd completions SHELL`), and the Debian changelog from the version
# (the changes themselves are CHANGELOG.md, shipped beside it as changelog.gz), into
# <target>/release/pkg,
# where the assets of [package.metadata.deb] in Cargo.toml name them. With --binary, <target> is a scratch directory
# laid out as cargo-deb expects a release build, so a real release build is never touched.
# Other arguments go to `cargo deb`.
set -eu
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null 2>&1 || {
    echo "build-deb.sh: cargo-deb is not installed: cargo install cargo-deb --locked" >&2
    exit 2
}
if [ "${1:-}" = "--binary" ]; then
    binary="${2:?--binary needs a path}"
    shift 2
    stage=$(mktemp -d "${TMPDIR:-/tmp}/haconfd-deb.XXXXXX")
    trap 'rm -rf "$stage"' EXIT INT TERM
    mkdir "$stage/release"
    cp "$binary" "$stage/release/haconfd"
    CARGO_TARGET_DIR="$stage"
    export CARGO_TARGET_DIR
else
    cargo build --locked --release --bin haconfd
fi
release="${CARGO_TARGET_DIR:-target}/release"
mkdir -p "$release/pkg"
"$release/haconfd" manpage | gzip -9n >"$release/pkg/haconfd.1.gz"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
date=$(LC_ALL=C date -u -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
printf '%s\n' "haconfd ($version-1) unstable; urgency=medium" "" \
    "  * haconfd $version: see /usr/share/doc/haconfd/changelog.gz." "" \
    " -- $maintainer  $date" | gzip -9n >"$release/pkg/changelog.Debian.gz"
for shell in bash zsh fish; do
    "$release/haconfd" completions "$shell" >"$release/pkg/completion.$shell"
done
gzip -9n <CHANGELOG.md >"$release/pkg/changelog.gz"
mv "$release/pkg/completion.bash" "$release/pkg/haconfd.bash"
mv "$release/pkg/completion.zsh" "$release/pkg/_haconfd"
mv "$release/pkg/completion.fish" "$release/pkg/haconfd.fish"
cargo deb --no-build --strip "$@"
