"""A shared broker tier: one Python client over three broker processes.

Each broker is its own process on its own loopback port in front of the one
test database. The client gets the list of the three addresses and must
spread its calls over all of them (gRPC's round_robin), keep working while
one of them drains (retries on the others, within the documented rules),
and stop sending to one whose health says NOT_SERVING (client-side health
checking) before that one closes its listener.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from broker_client import BrokerClient, BrokerError
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.brokerproc import BrokerProcess
from tests.conftest import DB_NAME, MAX_POOL_SIZE, MONGO_DB, BrokerFactory, count_connections

# pymongo's monitoring connections per server: the monitor, and the RTT
# monitor where the server streams heartbeats.
MONITORS = 2
DATA_METHODS = ("FindOne", "Insert", "Find", "Count")


def data_calls(process: BrokerProcess) -> int:
    """The data calls this broker has answered, from its own Stats (over its Unix socket)."""
    with grpc.insecure_channel(process.unix_target) as channel:
        response = broker_pb2_grpc.BrokerStub(channel).Stats(broker_pb2.StatsRequest(), timeout=10)
    (db,) = [d for d in response.databases if d.database == DB_NAME]
    return sum(db.rpcs.get(method, 0) for method in DATA_METHODS)


def replica_config(start_broker: BrokerFactory, **server: Any) -> dict[str, Any]:
    """The session broker's config without its listen table, so each broker
    started from it gets its own socket and loopback port; ``server`` is its
    [server] table."""
    config = {k: v for k, v in start_broker.base_config().items() if k != "listen"}
    if server:
        config["server"] = server
    return config


@pytest.fixture
def tier(start_broker) -> Callable[..., list[BrokerProcess]]:
    def start(count: int = 3, **server: Any) -> list[BrokerProcess]:
        config = replica_config(start_broker, **server)
        return [start_broker(config) for _ in range(count)]

    return start


@pytest.fixture
def tier_client() -> Iterator[Callable[[list[BrokerProcess]], BrokerClient[Any]]]:
    clients: list[BrokerClient[Any]] = []

    def make(brokers: list[BrokerProcess]) -> BrokerClient[Any]:
        client: BrokerClient[Any] = BrokerClient([b.tcp_target for b in brokers], timeout=15)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_calls_are_spread_over_every_replica(tier, tier_client, collection_name, db_server) -> None:
    brokers = tier()
    client = tier_client(brokers)
    items = client[DB_NAME][collection_name]
    items.insert_one({"_id": "k", "n": 1})
    before = [data_calls(b) for b in brokers]
    for i in range(300):
        if i % 3:
            assert items.find_one({"_id": "k"}) == {"_id": "k", "n": 1}
        else:
            assert items.count_documents({}) == 1
    shares = [data_calls(b) - n for b, n in zip(brokers, before, strict=True)]
    print(f"calls per replica: {shares}")
    assert sum(shares) == 300, shares
    # round_robin over three ready replicas: about 100 each. A replica whose
    # connection came up late may have missed the first few picks.
    assert min(shares) >= 60, f"calls per replica {shares}: not spread over all three"
    # One pool per replica: the database sees at most three brokers' worth.
    # (The session's own broker holds connections too: count the tier's.)
    per_replica = [count_connections(b.pid, db_server.port) for b in brokers]
    bound = 3 * (MAX_POOL_SIZE + MONITORS)
    assert all(n > 0 for n in per_replica), per_replica
    print(f"database connections per replica: {per_replica} (bound {bound})")
    assert sum(per_replica) <= bound, f"database connections per replica {per_replica}, bound {bound}"


def test_the_async_client_spreads_over_every_replica_too(tier, collection_name) -> None:
    import asyncio

    from broker_client import AsyncBrokerClient

    brokers = tier()
    before = [data_calls(b) for b in brokers]

    async def run() -> None:
        async with AsyncBrokerClient([b.tcp_target for b in brokers], timeout=15) as client:
            items = client[DB_NAME][collection_name]
            await items.insert_one({"_id": "k"})
            for _ in range(89):
                assert await items.find_one({"_id": "k"}) == {"_id": "k"}

    asyncio.run(run())
    shares = [data_calls(b) - n for b, n in zip(brokers, before, strict=True)]
    assert sum(shares) == 90, shares
    assert min(shares) >= 15, f"calls per replica {shares}: not spread over all three"


@dataclass
class Load:
    """Client threads inserting documents (ids made by the client) and reading each back."""

    client: BrokerClient[Any]
    collection: str
    threads: int = 4
    acknowledged: list[Any] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    retried_calls: int = 0
    calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, worker: int) -> None:
        items = self.client[DB_NAME][self.collection]
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                inserted = items.insert_one({"worker": worker, "n": n})
                with self._lock:
                    self.acknowledged.append(inserted.inserted_id)
                    self.calls += 1
                    self.retried_calls += inserted.attempts > 1
                found = items.find_one({"_id": inserted.inserted_id})
                assert found is not None and found["n"] == n, found
                with self._lock:
                    self.calls += 1
            except BrokerError as exc:
                with self._lock:
                    self.errors.append(exc)

    def __enter__(self) -> Load:
        for worker in range(self.threads):
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(30)


@pytest.mark.parametrize("drain_delay_s", [0.0, 1.0], ids=["closed-at-once", "drain-delay"])
def test_a_draining_replica_loses_no_call(tier, tier_client, collection_name, mongo, drain_delay_s) -> None:
    brokers = tier(drain_delay_s=drain_delay_s)
    client = tier_client(brokers)
    client.ping()
    with Load(client, collection_name) as load:
        time.sleep(1.5)
        others_before = [data_calls(b) for b in brokers[1:]]
        calls_at_signal = load.calls
        signalled = time.monotonic()
        os.kill(brokers[0].pid, signal.SIGTERM)
        assert brokers[0].wait(timeout=30) == 0
        exited_after = time.monotonic() - signalled
        time.sleep(1.5)
    print(
        f"drain: {load.calls} calls, {load.retried_calls} retried, {len(load.errors)} failed; "
        f"exited {exited_after:.1f} s after SIGTERM"
    )
    assert not load.errors, f"{len(load.errors)} call(s) failed: {load.errors[:3]!r}"
    assert load.calls - calls_at_signal > 20, "the load stopped when one replica went"
    # Clients' health Watch streams end with the connection: they must not
    # hold the stopping broker for its whole grace (10 s, then 3 s more).
    assert exited_after < drain_delay_s + 8, f"the replica took {exited_after:.1f} s to stop"
    others_after = [data_calls(b) for b in brokers[1:]]
    assert all(a > b for a, b in zip(others_after, others_before, strict=True)), (others_before, others_after)
    # Every acknowledged insert is stored exactly once, and nothing else is.
    stored = list(mongo[MONGO_DB][collection_name].find({}, {"_id": 1}))
    stored_ids = [doc["_id"] for doc in stored]
    assert len(stored_ids) == len(set(stored_ids))
    assert sorted(map(str, stored_ids)) == sorted(map(str, load.acknowledged))


def test_calls_cut_off_by_a_dying_replica_are_retried_on_the_others(
    tier, tier_client, collection_name, mongo
) -> None:
    brokers = tier()
    client = tier_client(brokers)
    client.ping()
    with Load(client, collection_name, threads=6) as load:
        time.sleep(1.5)
        calls_at_kill = load.calls
        # No drain at all: the calls it is running break with their connection.
        os.kill(brokers[0].pid, signal.SIGKILL)
        brokers[0].wait(timeout=10)
        time.sleep(1.5)
    print(f"replica killed: {load.calls} calls, {load.retried_calls} retried, {len(load.errors)} failed")
    assert not load.errors, f"{len(load.errors)} call(s) failed: {load.errors[:3]!r}"
    assert load.calls - calls_at_kill > 20, "the load stopped when one replica died"
    stored = [doc["_id"] for doc in mongo[MONGO_DB][collection_name].find({}, {"_id": 1})]
    # An insert retried after its first attempt landed reports success once.
    assert sorted(map(str, stored)) == sorted(map(str, load.acknowledged))


def test_a_not_serving_replica_gets_no_new_calls(tier, tier_client, collection_name) -> None:
    brokers = tier(drain_delay_s=6.0)
    client = tier_client(brokers)
    items = client[DB_NAME][collection_name]
    items.insert_one({"_id": 1})
    for _ in range(30):
        items.find_one({"_id": 1})
    os.kill(brokers[0].pid, signal.SIGTERM)
    # The replica says NOT_SERVING at once and keeps serving for 6 s.
    with grpc.insecure_channel(brokers[0].tcp_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="broker.v1.Broker")
        deadline = time.monotonic() + 5
        while health.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.05)
    # The client's health watch hears of it within a round trip or two.
    time.sleep(0.5)
    drained_before = data_calls(brokers[0])
    others_before = [data_calls(b) for b in brokers[1:]]
    for _ in range(90):
        assert items.find_one({"_id": 1}) == {"_id": 1}
    assert brokers[0].is_running(), "the replica closed before the test was done"
    assert data_calls(brokers[0]) == drained_before, "a NOT_SERVING replica still got calls"
    others_after = [data_calls(b) for b in brokers[1:]]
    assert sum(others_after) - sum(others_before) == 90
    assert brokers[0].wait(timeout=30) == 0


# --- the broker's side of a tier ------------------------------------------------


def test_stats_names_the_replica_and_its_callers(start_broker) -> None:
    config = replica_config(start_broker, instance="broker-7")
    process = start_broker(config)
    with BrokerClient(process.tcp_target) as tcp, BrokerClient(process.unix_target) as unix:
        for _ in range(3):
            tcp.ping()
        unix.ping()
        stats = tcp.stats()
        assert stats.instance == "broker-7"
        assert stats.caller.startswith("ipv4:127.0.0.1:"), stats.caller
        by_host = {p.host: p.calls for p in stats.peers}
        # 3 pings and this Stats over TCP, 1 ping over the socket.
        assert by_host == {"127.0.0.1": 4, "unix": 1}, by_host
        assert stats.peers[0].host == "127.0.0.1"  # most recently seen first
        assert unix.stats().caller.startswith("unix:")
    assert "peer=ipv4:127.0.0.1:" in process.log_text()


def test_only_a_token_for_every_database_sees_the_other_callers(start_broker) -> None:
    config = replica_config(start_broker)
    config["databases"]["otherdb"] = dict(config["databases"][DB_NAME])
    admin, scoped = "admin-token-0123456789", "scoped-token-0123456789"
    config["auth"] = {
        "tokens": [
            {"name": "admin", "token": admin},
            {"name": "app", "token": scoped, "databases": [DB_NAME]},
        ]
    }
    process = start_broker(config)
    with BrokerClient(process.unix_target, token=admin) as everything:
        assert [p.host for p in everything.stats().peers] == ["unix"]
    with BrokerClient(process.unix_target, token=scoped) as app:
        stats = app.stats()
        assert stats.peers == ()
        assert stats.caller.startswith("unix:")  # its own address it may know
        assert [d.database for d in stats.databases] == [DB_NAME]


def test_the_instance_defaults_to_the_host_name(broker) -> None:
    import socket

    with BrokerClient(broker.unix_target) as client:
        assert client.stats().instance == socket.gethostname()


def test_an_open_plaintext_listener_is_refused_at_start(start_broker) -> None:
    config = replica_config(start_broker)
    config["listen"] = {"tcp": "0.0.0.0:0"}
    process = start_broker(config, wait=False)
    assert process.wait(timeout=30) == 2
    assert "reachable from other hosts and has no TLS" in process.log_text()
    config["listen"] = {"tcp": "0.0.0.0:0", "allow_plaintext_tcp": True}
    opened = start_broker(config)
    port = opened.tcp_target.rsplit(":", 1)[1]
    with BrokerClient(f"127.0.0.1:{port}") as client:
        assert client.ping().ok


def test_a_second_signal_skips_the_drain_delay(tier) -> None:
    (process,) = tier(1, drain_delay_s=120.0)
    os.kill(process.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert process.is_running(), "the broker closed without its drain delay"
    with BrokerClient(process.unix_target) as client:
        assert client.ping().ok, "a broker in its drain delay must still serve"
    started = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - started < 20


def test_health_watches_past_the_bound_fall_back_to_no_health_checking(start_broker) -> None:
    config = replica_config(start_broker, max_health_watches=2)
    process = start_broker(config)
    request = health_pb2.HealthCheckRequest(service="broker.v1.Broker")
    with grpc.insecure_channel(process.unix_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(request, timeout=30) for _ in range(2)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(request, timeout=10))
        # UNIMPLEMENTED, not RESOURCE_EXHAUSTED: a gRPC client then treats the
        # broker as healthy instead of taking it out of its rotation.
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "server.max_health_watches" in (refused.value.details() or "")
        # A client that health-checks (a list is a tier) still gets its calls through.
        with BrokerClient([process.tcp_target]) as client:
            assert client.ping().ok
        watches[0].cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = next(health.Watch(request, timeout=10))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "a closed Watch never freed its place"
                time.sleep(0.1)
        watches[1].cancel()
    assert "health Watch refused" in process.log_text()


def test_max_connection_age_makes_clients_reconnect(start_broker) -> None:
    config = replica_config(start_broker, max_connection_age_s=1.0, max_connection_age_grace_s=1.0)
    process = start_broker(config)
    with BrokerClient(process.tcp_target) as client:
        first = client.stats().caller
        deadline = time.monotonic() + 20
        # The caller's port is the connection's: a new one after GOAWAY.
        while client.stats().caller == first:
            assert time.monotonic() < deadline, "the connection was never closed for its age"
            time.sleep(0.2)
        assert client.ping().ok
