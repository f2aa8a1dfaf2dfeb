#!/usr/bin/env bash
# Builds the kvset image with no registry: a statically linked release binary in a FROM scratch
# image, tagged kvset:<version> and kvset:dev.
#
#   deploy/docker/build.sh                          build the binary and the image
#   KVSET_IMAGE_SKIP_BUILD=1 ...                    reuse an already built static binary
#   KVSET_IMAGE_BINARY=target/debug/kvset ...       put that binary in the image instead, with
#                                                   the shared libraries it needs (scripts/check.sh
#                                                   tests the chaos suite on the debug build it
#                                                   already made, rather than compiling again)
#
# Prints the image size at the end.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

target=x86_64-unknown-linux-gnu
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
binary="${KVSET_IMAGE_BINARY:-target/$target/release/kvset}"

if [ -n "${KVSET_IMAGE_BINARY:-}" ]; then
    [ -x "$binary" ] || { echo "[image] $binary is not an executable" >&2; exit 1; }
    echo "[image] using $binary"
elif [ "${KVSET_IMAGE_SKIP_BUILD:-0}" != 1 ] || [ ! -x "$binary" ]; then
    echo "[image] building a static kvset $version (release)"
    # The explicit --target keeps proc-macros (host) dynamically linked while the binary is
    # static; symbols and debug info stay out of the image.
    RUSTFLAGS='-C target-feature=+crt-static' \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release --locked --target "$target" -p kvset
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/context/data" "$context/context/root"
# A FROM scratch image has no dynamic loader or libraries: a static binary needs none; a
# dynamic one (KVSET_IMAGE_BINARY) gets exactly the ones it is linked against, from this host.
if ldd "$binary" >/dev/null 2>&1; then
    if [ -z "${KVSET_IMAGE_BINARY:-}" ]; then
        echo "[image] $binary is dynamically linked; refusing to put it in a scratch image" >&2
        exit 1
    fi
    for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
        cp --parents -L "$lib" "$context/context/root/"
    done
    echo "[image] with its shared libraries: $(cd "$context/context/root" && find . -type f | sort | tr '\n' ' ')"
fi
cp "$binary" "$context/context/kvset"
# CA certificates: the Kubernetes client (rustls) loads the system roots when it builds its
# TLS configuration, and a scratch image has none.
cacerts=/etc/ssl/certs/ca-certificates.crt
if [ ! -f "$cacerts" ]; then
    echo "[image] $cacerts is missing (Debian: apt-get install ca-certificates)" >&2
    exit 1
fi
cp "$cacerts" "$context/context/ca-certificates.crt"
cp deploy/docker/Dockerfile "$context/Dockerfile"

echo "[image] docker build kvset:$version kvset:dev"
docker build --quiet -t "kvset:$version" -t kvset:dev "$context" >/dev/null
size="$(docker image inspect kvset:dev --format '{{.Size}}')"
echo "[image] kvset:dev ($version): $((size / 1024 / 1024)) MiB"
