#!/usr/bin/env bash
# kvset vs etcd on this machine, end to end:
#   bench/compare.sh                 # writes bench/results/<date>-<host>.{md,png,json}
#   bench/compare.sh --duration 10   # any `kvset bench-compare` option
#
# Installs what is missing from Debian's packages (etcd-server; protobuf-compiler, which the
# etcd-client crate's build script needs; fonts-dejavu-core for the chart's text), builds kvset
# with the etcd target, then starts a 3-member etcd and a 3-member kvset on loopback (data on the
# same filesystem, fsync on for both) and runs the same matrix against each leader, alternating.
# Put and get also run through etcd's JSON gateway of each (same HTTP/1.1 client): the gateway
# column of the results.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ "${#need[@]}" -gt 0 ]; then
    echo "[compare] installing ${need[*]}"
    sudo_="" ; [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}"
fi
# Debian's etcd-server does not start a service in containers, but stop one if it did: the
# comparison runs its own members.
systemctl stop etcd >/dev/null 2>&1 || true

echo "[compare] building kvset with the etcd target"
cargo build --release --locked --features etcd -p kvset

echo "[compare] running (about 5 minutes)"
target/release/kvset bench-compare --out bench/results "$@"
