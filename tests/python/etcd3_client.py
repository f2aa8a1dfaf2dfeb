"""python-etcd3 (PyPI `etcd3`, unchanged) against kvset: KV, transactions, watch, leases and the
lock helper. Run by tests/tests/etcd_api.rs with the endpoints of a running cluster:

    python etcd3_client.py HOST:PORT [HOST:PORT ...]

Exits non-zero with the failed assertion on any mismatch.
"""
import sys
import threading
import time

import etcd3
import grpc


def client(endpoint):
    host, port = endpoint.rsplit(":", 1)
    return etcd3.client(host=host, port=int(port), timeout=10)


def main(endpoints):
    # One client per member: followers pass writes and linearizable reads to the leader.
    clients = [client(e) for e in endpoints]
    c = clients[0]

    # KV through every member, read back through every member.
    for i, ci in enumerate(clients):
        ci.put(f"/py/k{i}", f"v{i}")
    for ci in clients:
        for i in range(len(clients)):
            value, meta = ci.get(f"/py/k{i}")
            assert value == f"v{i}".encode(), (i, value)
            assert meta.version == 1 and meta.create_revision == meta.mod_revision
    keys = sorted(m.key for _, m in c.get_prefix("/py/"))
    assert keys == [f"/py/k{i}".encode() for i in range(len(clients))], keys
    assert c.get("/py/missing") == (None, None)
    # Sorted and limited ranges.
    newest = [m.key for _, m in c.get_prefix("/py/", sort_order="descend", sort_target="create")]
    assert newest[0] == f"/py/k{len(clients) - 1}".encode(), newest
    assert len(list(c.get_range("/py/k0", "/py/k9"))) == len(clients)
    assert c.delete("/py/k0") is True
    assert c.delete("/py/k0") is False

    # Transactions: compare-and-swap, both branches.
    ok, _ = c.transaction(
        compare=[c.transactions.value("/py/k1") == "v1"],
        success=[c.transactions.put("/py/k1", "swapped")],
        failure=[],
    )
    assert ok
    ok, responses = c.transaction(
        compare=[c.transactions.value("/py/k1") == "v1"],
        success=[],
        failure=[c.transactions.get("/py/k1")],
    )
    assert not ok and responses[0][0][0] == b"swapped", responses
    ok, _ = c.transaction(
        compare=[c.transactions.version("/py/new") == 0],
        success=[c.transactions.put("/py/new", "created")],
        failure=[],
    )
    assert ok and c.get("/py/new")[0] == b"created"
    assert c.put_if_not_exists("/py/new", "again") is False
    assert c.replace("/py/new", "created", "replaced") is True
    assert c.replace("/py/new", "created", "never") is False
    assert c.get("/py/new")[0] == b"replaced"

    # Watch a prefix on another member: every event, in order, with the right kinds.
    events = []
    iterator, cancel = clients[-1].watch_prefix("/py/w/")
    done = threading.Event()

    def consume():
        for event in iterator:
            events.append(event)
            if len(events) == 3:
                done.set()
                cancel()
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(0.5)  # the watch is created asynchronously; its start revision is "now"
    c.put("/py/w/a", "1")
    c.put("/py/w/a", "2")
    c.delete("/py/w/a")
    assert done.wait(10), f"only {len(events)} events arrived"
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["PutEvent", "PutEvent", "DeleteEvent"], kinds
    assert [e.value for e in events[:2]] == [b"1", b"2"]
    revisions = [e.mod_revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3, revisions

    # Watch from a past revision replays the history.
    first = events[0].mod_revision
    replayed, cancel = c.watch("/py/w/a", start_revision=first)
    got = [next(replayed).value for _ in range(2)]
    cancel()
    assert got == [b"1", b"2"], got

    # Leases: grant, attach, refresh, time to live with keys, revoke deletes the keys.
    lease = c.lease(30)
    c.put("/py/leased", "x", lease=lease)
    assert lease.granted_ttl == 30
    assert 25 <= lease.remaining_ttl <= 30, lease.remaining_ttl
    assert lease.keys == [b"/py/leased"], lease.keys
    refreshed = lease.refresh()
    assert refreshed[0].TTL == 30, refreshed
    info = clients[-1].get_lease_info(lease.id)
    assert (info.ID, info.grantedTTL, list(info.keys)) == (lease.id, 30, [b"/py/leased"]), info
    lease.revoke()
    assert c.get("/py/leased") == (None, None)
    # A lease that is not renewed expires on its own.
    short = c.lease(5)
    c.put("/py/short", "x", lease=short)
    deadline = time.time() + 20
    while c.get("/py/short")[0] is not None:
        assert time.time() < deadline, "the unrenewed lease did not expire"
        time.sleep(0.2)

    # The lock helper (a lease, a create-if-absent transaction, a watch on the holder).
    lock = c.lock("py-lock", ttl=10)
    assert lock.acquire(timeout=5)
    assert lock.is_acquired()
    other = clients[-1].lock("py-lock", ttl=10)
    assert not other.acquire(timeout=1), "a second holder got the lock"
    releaser = threading.Timer(1.0, lock.release)
    releaser.start()
    assert other.acquire(timeout=10), "the waiter did not get the released lock"
    other.release()
    with c.lock("py-lock-2", ttl=10) as held:
        assert held.is_acquired()

    # Compaction (physical: etcd waits until it is applied); compacting there again is
    # refused with etcd's error. (python-etcd3 0.12 drops `revision` from its range requests,
    # so reads of the history are checked with the other clients.)
    _, meta = c.get("/py/new")
    c.compact(meta.mod_revision, physical=True)
    try:
        c.compact(meta.mod_revision)
        raise AssertionError("compacting a compacted revision succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.OUT_OF_RANGE, e
        assert e.details() == "etcdserver: mvcc: required revision has been compacted", e.details()
    # Defragment: a kvset member answers, then stops to rewrite its database and starts
    # again (the harness leaves it stopped), so the rest talks to another member.
    c.defragment()
    c = client(endpoints[1])
    assert isinstance(c.hash(), int)

    # Cluster and maintenance.
    names = sorted(m.name for m in c.members)
    assert len(names) == len(endpoints), names
    status = c.status()
    assert status.version.startswith("3.5."), status.version
    # The defragmented member stopped a moment ago; if it led, the others may be between
    # leaders for an instant.
    deadline = time.monotonic() + 10
    while status.leader is None and time.monotonic() < deadline:
        time.sleep(0.1)
        status = c.status()
    assert status.leader is not None and status.leader.id in [m.id for m in c.members]
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
