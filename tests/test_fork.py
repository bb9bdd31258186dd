"""Fork safety of the bundled client: a parent uses it, then forks workers.

Each child must work through a channel of its own, never the parent's
HTTP/2 connection, and the parent must keep working afterwards. Children
run under a hard time limit, so a hang fails the test instead of blocking
it. The design these tests check is described in
clients/python/broker_client/_channel.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from broker_client import BrokerClient, Collection, InvalidOperation, _channel
from bson import ObjectId

# Python 3.12+ warns about forking a multi-threaded process (pymongo's and
# gRPC's threads are running). Forking under them is exactly what we test.
pytestmark = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")

N_CHILDREN = 20
# Generous: a child normally finishes in well under a second.
CHILD_TIMEOUT_S = 60.0
_REPORT_LIMIT = 16_000  # bytes; well under a pipe's buffer, so a child never blocks writing

Report = dict[str, Any]


@pytest.fixture(params=["unix", "tcp"])
def target(request: pytest.FixtureRequest, broker: Any) -> str:
    return str(broker.unix_target if request.param == "unix" else broker.tcp_target)


@pytest.fixture
def client(target: str) -> Iterator[BrokerClient[dict[str, Any]]]:
    with BrokerClient(target, timeout=30) as c:
        yield c


def _fork_children(n: int, work: Callable[[int], Report]) -> dict[int, Report]:
    """Fork ``n`` children running ``work(i)``; each one's report, or a failure."""
    children: dict[int, tuple[int, int]] = {}
    for i in range(n):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            os.close(read_fd)
            status = 1
            try:
                # Backstop: a child that hangs past the parent's wait kills itself.
                signal.alarm(int(CHILD_TIMEOUT_S) + 30)
                report: Report = {"ok": True, **work(i)}
                status = 0
            except BaseException:
                report = {"ok": False, "error": traceback.format_exc()[-4000:]}
            finally:
                try:
                    os.write(write_fd, json.dumps(report, default=str).encode()[:_REPORT_LIMIT])
                finally:
                    os._exit(status)
        os.close(write_fd)
        children[pid] = (i, read_fd)

    statuses: dict[int, int | str] = {}
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(statuses) < len(children) and time.monotonic() < deadline:
        for pid in children:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in children:
        if pid not in statuses:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            statuses[pid] = f"hung: killed after {CHILD_TIMEOUT_S:.0f} s"

    reports: dict[int, Report] = {}
    for pid, (i, read_fd) in children.items():
        with os.fdopen(read_fd, "rb") as pipe:
            raw = pipe.read()
        try:
            report = json.loads(raw) if raw else {"ok": False, "error": "no report"}
        except ValueError:
            report = {"ok": False, "error": f"unreadable report {raw[:200]!r}"}
        report["pid"] = pid
        report["exit"] = statuses[pid]
        reports[i] = report
    failed = {i: r for i, r in reports.items() if not r.get("ok") or r["exit"] != 0}
    assert not failed, "children failed:\n" + "\n".join(
        f"child {i} (pid {r['pid']}, exit {r['exit']}): {r.get('error', r)}"
        for i, r in sorted(failed.items())
    )
    return reports


def _broker_ports(target: str) -> set[int]:
    """Local ports of this process's TCP connections to the broker's TCP port."""
    port = int(target.rsplit(":", 1)[1])
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def _child_work(client: BrokerClient[dict[str, Any]], items: Collection[dict[str, Any]], i: int) -> Report:
    """What each child does: insert and find through the client it inherited."""
    holder = client._holder
    parent_channel_id = id(_PARENT_CHANNEL[0])
    # The at-fork hook has already retired the parent's channel, untouched.
    assert holder.channel is None, "the parent's channel is still in use in the child"
    assert any(obj is _PARENT_CHANNEL[0] for obj in _channel._RETIRED)

    one = items.insert_one({"child": i, "n": 0})
    many = items.insert_many([{"child": i, "n": 1}, {"child": i, "n": 2}])
    found = list(items.find({"child": i}, sort=[("n", 1)]))
    first = items.find_one({"child": i, "n": 0})

    assert [d["_id"] for d in found] == [one.inserted_id, *many.inserted_ids], found
    assert [d["n"] for d in found] == [0, 1, 2]
    assert first is not None
    assert first["_id"] == one.inserted_id
    channel = holder.channel
    assert channel is not None
    assert id(channel) != parent_channel_id
    assert holder.pid == os.getpid()
    report: Report = {
        "channel_pid": holder.pid,
        "channels_created": holder.channels_created,
        "ids": [str(d["_id"]) for d in found],
    }
    if not client.target.startswith("unix"):
        report["ports"] = sorted(_broker_ports(client.target))
    return report


# The parent's channel object, visible to the children (they inherit memory).
_PARENT_CHANNEL: list[Any] = [None]


def _expected_and_stored(items: Collection[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(items.find({}, sort=[("child", 1), ("n", 1)]))


def test_children_of_a_parent_that_used_the_client_get_their_own_channels(
    client: BrokerClient[dict[str, Any]], broker: Any, collection_name: str
) -> None:
    items = client[broker.db_name][collection_name]
    before = items.insert_one({"child": -1, "n": 0})
    assert items.find_one({"_id": before.inserted_id}) is not None
    holder = client._holder
    parent_channel = holder.channel
    assert parent_channel is not None
    assert holder.pid == os.getpid()
    created_before = holder.channels_created
    _PARENT_CHANNEL[0] = parent_channel
    parent_ports = set() if client.target.startswith("unix") else _broker_ports(client.target)

    reports = _fork_children(N_CHILDREN, lambda i: _child_work(client, items, i))

    pids = {r["channel_pid"] for r in reports.values()}
    assert len(pids) == N_CHILDREN
    assert os.getpid() not in pids
    assert all(r["channels_created"] == created_before + 1 for r in reports.values())
    if parent_ports:
        for i, r in reports.items():
            # The child also holds the parent's inherited socket; it must
            # have opened one of its own besides.
            assert set(r["ports"]) - parent_ports, f"child {i} has no connection of its own: {r}"

    # The parent is untouched: same channel, still working.
    after = items.insert_one({"child": 99, "n": 0})
    assert holder.channel is parent_channel
    assert holder.channels_created == created_before
    assert items.find_one({"_id": after.inserted_id}) is not None

    stored = _expected_and_stored(items)
    expected_ids = [str(before.inserted_id)]
    for i in range(N_CHILDREN):
        expected_ids += reports[i]["ids"]
    expected_ids.append(str(after.inserted_id))
    assert [str(d["_id"]) for d in stored] == expected_ids
    assert len(stored) == 2 + 3 * N_CHILDREN


def test_fork_while_other_threads_are_calling(
    client: BrokerClient[dict[str, Any]], broker: Any, collection_name: str
) -> None:
    """The hard case for gRPC: a fork while another thread is in a call.

    Without the client's fork gate, 1-25% of such children failed or hung
    (see _channel.py). With it, fork() waits for the calls in flight.
    """
    items = client[broker.db_name][collection_name]
    busy = client[broker.db_name][f"{collection_name}_busy"]
    items.insert_one({"child": -1, "n": 0})
    _PARENT_CHANNEL[0] = client._holder.channel
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                oid = busy.insert_one({"n": calls[0]}).inserted_id
                assert busy.find_one({"_id": oid}) is not None
                calls[0] += 1
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        while calls[0] < 5:  # the threads are in full swing
            time.sleep(0.01)
        reports = _fork_children(N_CHILDREN, lambda i: _child_work(client, items, i))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    assert calls[0] >= 5
    assert len({r["channel_pid"] for r in reports.values()}) == N_CHILDREN
    assert len(_expected_and_stored(items)) == 1 + 3 * N_CHILDREN


def test_cursor_open_across_fork_stays_with_the_parent(
    client: BrokerClient[dict[str, Any]], broker: Any, collection_name: str
) -> None:
    items = client[broker.db_name][collection_name]
    items.insert_many([{"child": -1, "n": n} for n in range(30)])
    cursor = items.find({}, sort=[("n", 1)], batch_size=5)
    assert next(cursor)["n"] == 0
    _PARENT_CHANNEL[0] = client._holder.channel

    def work(i: int) -> Report:
        # Draining the inherited buffer is harmless, but the next batch would
        # need the parent's call: refused.
        with pytest.raises(InvalidOperation, match="before a fork"):
            for _ in range(100):
                next(cursor)
        cursor.close()  # must not cancel the parent's call
        return _child_work(client, items, i)

    _fork_children(4, work)
    # The parent's cursor carries on where it was.
    assert [d["n"] for d in cursor] == list(range(1, 30))


# --- multiprocessing's "fork" start method -----------------------------------

_POOL_CLIENT: list[Any] = [None, None]  # client, collection: inherited by the workers


def _pool_init() -> None:
    client, _ = _POOL_CLIENT
    assert client._holder.channel is None  # retired at fork
    client.ping()


def _pool_task(i: int) -> Report:
    client, items = _POOL_CLIENT
    oid = ObjectId()
    assert items.insert_one({"_id": oid, "task": i}).inserted_id == oid
    found = items.find_one({"_id": oid})
    assert found is not None
    assert found["task"] == i
    holder = client._holder
    return {"pid": os.getpid(), "channel_pid": holder.pid, "channels_created": holder.channels_created}


def test_multiprocessing_fork_pool(
    client: BrokerClient[dict[str, Any]], broker: Any, collection_name: str
) -> None:
    items = client[broker.db_name][collection_name]
    items.insert_one({"task": -1})
    created = client._holder.channels_created
    _POOL_CLIENT[:] = [client, items]
    ctx = multiprocessing.get_context("fork")
    try:
        with ctx.Pool(processes=4, initializer=_pool_init) as pool:
            reports = pool.map_async(_pool_task, range(N_CHILDREN)).get(timeout=CHILD_TIMEOUT_S)
    finally:
        _POOL_CLIENT[:] = [None, None]
    assert all(r["pid"] == r["channel_pid"] != os.getpid() for r in reports)
    # One channel per worker process, made in the initializer and reused.
    assert all(r["channels_created"] == created + 1 for r in reports)
    assert items.find_one({"task": -1}) is not None
    assert sorted(d["task"] for d in items.find({})) == list(range(-1, N_CHILDREN))
    assert client._holder.channels_created == created
