#!/usr/bin/env bash
# TLS and access-control overhead: one 3-member cluster per mode (plain; mutual TLS with client
# certificates; the same plus access control, a non-root user with a prefix grant logging in
# with a password), `kvset bench` put and get at 64 clients for 10 s each. Needs etcdctl.
set -u
K="$(cd "$(dirname "$0")/.." && pwd)/target/release/kvset"   # cargo build --release -p kvset first
run() { # name base extra-up-args client-args...
  local name=$1 base=$2; shift 2
  local up=$1; shift
  rm -rf /tmp/tb-$name
  $K cluster up --dir /tmp/tb-$name --base-port $base $up > /tmp/tb-$name.log 2>&1 &
  local pid=$!
  sleep 4
  local ep=127.0.0.1:$base,127.0.0.1:$((base+10)),127.0.0.1:$((base+20))
  if [ "$name" = auth ]; then
    local T=/tmp/tb-$name/tls
    E="etcdctl --endpoints 127.0.0.1:$base --cacert $T/ca.pem --cert $T/client.pem --key $T/client-key.pem"
    $E user add root --new-user-password=rootpw --interactive=false >/dev/null
    $E user grant-role root root >/dev/null
    $E role add app >/dev/null; $E role grant-permission app readwrite key --prefix >/dev/null
    $E user add bench --new-user-password=benchpw --interactive=false >/dev/null; $E user grant-role bench app >/dev/null
    $E auth enable >/dev/null
  fi
  for w in put get; do
    echo "== $name $w"
    $K --endpoints $ep "$@" bench --workload $w -c 64 --duration 10 2>&1 | grep -E 'ops/s|p50|p99' | head -4
  done
  kill -TERM $pid; wait $pid 2>/dev/null
}
run plain 41379 ""
run tls 42379 "--tls" --cacert /tmp/tb-tls/tls/ca.pem --cert /tmp/tb-tls/tls/client.pem --key /tmp/tb-tls/tls/client-key.pem
run auth 43379 "--tls" --cacert /tmp/tb-auth/tls/ca.pem --cert /tmp/tb-auth/tls/client.pem --key /tmp/tb-auth/tls/client-key.pem --user bench:benchpw
