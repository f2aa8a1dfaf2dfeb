"""etcd3gw (OpenStack's etcd gateway client; Debian packages the same release, 2.0.0, as
python3-etcd3gw), unchanged, through etcd's JSON gateway: KV, transactions, watch, leases and its
lock helper. Run by tests/tests/gateway.rs with the tests' venv Python (scripts/check.sh installs
etcd3gw there from PyPI, pinned), against kvset's members and against a real etcd:

    target/tools/venv/bin/python etcd3gw_client.py HOST:PORT [HOST:PORT ...]

Asserts as it goes, and prints a transcript (one line per step, with what each server picks by
itself — lease ids, remaining TTLs, member ids — left out) that the test compares between etcd
and kvset. The last line is "ok".
"""
import sys

from etcd3gw.client import Etcd3Client


def client(endpoint):
    host, port = endpoint.rsplit(":", 1)
    # etcd3gw's default path is /v3alpha/ (etcd 3.2); etcd 3.4 and 3.5 serve /v3/.
    return Etcd3Client(host=host, port=int(port), timeout=10, api_path="/v3/")


def say(*parts):
    print(" ".join(str(p) for p in parts), flush=True)


def main(endpoints):
    clients = [client(e) for e in endpoints]
    c = clients[0]

    status = c.status()
    assert status["version"].startswith("3."), status
    say("status fields", sorted(k for k in status if k != "header"))
    members = c.members()
    assert len(members) >= 1, members
    say("member fields", sorted(members[0]))

    # KV through every member, read back through every member.
    for i, ci in enumerate(clients):
        assert ci.put(f"/gw/k{i}", f"v{i}") is True
    for ci in clients:
        for i in range(len(clients)):
            assert ci.get(f"/gw/k{i}") == [f"v{i}".encode()], ci.get(f"/gw/k{i}")
    say("get", c.get("/gw/k0"), c.get("/gw/missing"))
    value, meta = c.get("/gw/k0", metadata=True)[0]
    say("get with metadata", value, sorted(meta.items()))
    say("get_prefix", [(v, m["key"]) for v, m in c.get_prefix("/gw/")])
    say("get_prefix descending by create", [m["key"] for _, m in c.get_prefix("/gw/", sort_order="descend", sort_target="create")])
    say("get_all", [m["key"] for _, m in c.get_all()])

    # Transactions: create-if-absent, compare-and-swap, a raw txn.
    say("create new", c.create("/gw/new", "created"))
    say("create existing", c.create("/gw/new", "again"))
    say("replace matching", c.replace("/gw/new", "created", "replaced"))
    say("replace stale", c.replace("/gw/new", "created", "x"))
    say("get replaced", c.get("/gw/new"))
    txn = {
        "compare": [{"key": "L2d3L25ldw==", "result": "EQUAL", "target": "VALUE", "value": "cmVwbGFjZWQ="}],
        "success": [{"request_range": {"key": "L2d3L25ldw=="}}],
        "failure": [],
    }
    result = c.transaction(txn)
    say("transaction", result["succeeded"], result["responses"][0]["response_range"]["kvs"][0]["value"])
    say("delete", c.delete("/gw/new"), c.delete("/gw/new"))

    # Leases: grant, ttl, refresh, keys, revoke (keys go with it).
    lease = c.lease(ttl=30)
    assert lease.id > 0
    assert 0 < lease.ttl() <= 30, lease.ttl()
    assert 0 < lease.refresh() <= 30
    c.put("/gw/leased", "v", lease=lease)
    say("lease keys", lease.keys())
    say("lease revoke", lease.revoke(), c.get("/gw/leased"), lease.ttl())

    # Watch: one event, then a stream of events, canceled. Each watch starts at the revision
    # after the one read here, so the writes may come before or after it is created (no timing
    # assumed): the events come from the history either way.
    def next_revision():
        return int(c.status()["header"]["revision"]) + 1

    start = next_revision()
    clients[-1].put("/gw/watched", "w1")
    event = c.watch_once("/gw/watched", timeout=10, start_revision=start)
    say("watch_once", event["kv"]["key"], event["kv"]["value"], event["kv"]["version"])
    start = next_revision()
    events, cancel = c.watch_prefix("/gw/stream/", start_revision=start)
    for i in range(3):
        clients[-1].put(f"/gw/stream/{i}", f"s{i}")
    clients[-1].delete("/gw/stream/0")
    seen = []
    for e in events:
        seen.append((e.get("type", "PUT"), e["kv"]["key"], e["kv"].get("value")))
        if len(seen) == 4:
            cancel()
    say("watch_prefix", seen)
    start = next_revision()
    clients[-1].put("/gw/prefix/x", "p")
    event = c.watch_prefix_once("/gw/prefix/", timeout=10, start_revision=start)
    say("watch_prefix_once", event["kv"]["key"], event["kv"]["value"])

    # The lock helper: one holder at a time, through any member; released by the holder only.
    first = clients[0].lock("gwlock", ttl=30)
    second = clients[-1].lock("gwlock", ttl=30)
    say("lock acquire", first.acquire(), second.acquire())
    say("lock is_acquired", first.is_acquired(), second.is_acquired())
    say("lock refresh", 0 < first.refresh() <= 30)
    say("lock release by the other", second.release())
    say("lock release", first.release(), second.acquire(), second.is_acquired(), second.release())
    with clients[-1].lock("gwlock2", ttl=30) as held:
        say("lock context", held.is_acquired())
    say("lock after context", clients[-1].lock("gwlock2").acquire())

    say("delete_prefix", c.delete_prefix("/gw/"), c.get_prefix("/gw/"))
    say("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
