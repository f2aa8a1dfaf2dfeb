#!/usr/bin/env bash
# Peak memory of a big unpaged Range (issue 28, item 5): loads KEYS keys of VALUE bytes into a
# local 3-member cluster (`kvset cluster up`, one process per member), then reads them all
# with one etcd Range without a limit through a follower, and reports each member's resident
# memory before the read and its peak (VmHWM) after it, and the answer's size.
#
#   bench/big-range.sh                 # 50,000 keys × 4 KiB = 200 MB, the debug binary
#   KVSET_BIN=target/release/kvset KEYS=100000 VALUE=2048 bench/big-range.sh
#
# Needs python3 with the `etcd3` package (scripts/check.sh installs it into
# target/tools/venv) and the ports 2379-2401 free.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${KVSET_BIN:-target/debug/kvset}
keys=${KEYS:-50000}
value=${VALUE:-4096}
python=${PYTHON:-target/tools/venv/bin/python}
dir=$(mktemp -d)
trap 'kill "$up" 2>/dev/null; wait "$up" 2>/dev/null; rm -rf "$dir"' EXIT

"$bin" cluster up --dir "$dir" >"$dir/up.log" 2>&1 &
up=$!
for _ in $(seq 1 120); do
    "$bin" --endpoints 127.0.0.1:2379,127.0.0.1:2389,127.0.0.1:2399 put ready 1 >/dev/null 2>&1 && break
    sleep 0.5
done

member_pids() { pgrep -P "$up"; }
# A follower: etcdctl's endpoint status names each endpoint's member and its leader.
follower=$(ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:2379,127.0.0.1:2389,127.0.0.1:2399 endpoint status -w json |
    "$python" -c 'import json,sys; s=json.load(sys.stdin); print(next(e["Endpoint"] for e in s if e["Status"]["header"]["member_id"] != e["Status"]["leader"]))')
leader=127.0.0.1:2379
[ "$follower" = "$leader" ] && leader=127.0.0.1:2389

echo "loading $keys keys of $value bytes through $leader ..."
"$python" - "$leader" "$keys" "$value" <<'EOF'
import sys, etcd3
host, port = sys.argv[1].split(":")
keys, value = int(sys.argv[2]), int(sys.argv[3])
c = etcd3.client(host=host, port=int(port))
for start in range(0, keys, 100):
    ops = [c.transactions.put("big/%08d" % i, b"v" * value) for i in range(start, min(keys, start + 100))]
    c.transaction(compare=[], success=ops, failure=[])
EOF

report() {
    for pid in $(member_pids); do
        name=$(tr '\0' ' ' </proc/"$pid"/cmdline | grep -o 'kvset-[0-9]' | head -1 || true)
        printf '  %-8s pid %-7s VmRSS %8s kB  VmHWM %8s kB\n' "${name:-?}" "$pid" \
            "$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status)" "$(awk '/VmHWM/ {print $2}' /proc/"$pid"/status)"
    done
}
echo "before the read:"
report
echo "one Range without a limit through $follower ..."
start=$(date +%s.%N)
bytes=$("$python" - "$follower" <<'EOF'
import sys, etcd3
host, port = sys.argv[1].split(":")
c = etcd3.client(host=host, port=int(port), grpc_options=[("grpc.max_receive_message_length", 2**31 - 1)])
total = n = 0
for v, meta in c.get_prefix("big/"):
    total += len(v) + len(meta.key)
    n += 1
print(n, total)
EOF
)
end=$(date +%s.%N)
echo "  answered: $bytes (keys, bytes of keys and values) in $(echo "$end - $start" | bc) s"
echo "after the read (VmHWM is each member's peak since it started):"
report
