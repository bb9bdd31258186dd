"""Ping, and what callers see while a database is down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import bson
import grpc
import pytest

from tests.rpc import fails, find_all, open_stub, pb


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ping_all_reports_version_rtt_and_pool(broker):
    with open_stub(broker.unix_target) as stub:
        reply = stub.Ping(pb.PingRequest(), timeout=10)
    assert reply.version == broker.version
    (db,) = reply.databases
    assert db.database == broker.db_name and db.ok and not db.error
    assert db.rtt_ms > 0
    assert db.pool.max_pool_size == broker.max_pool_size
    assert 0 <= db.pool.connections_in_use <= db.pool.connections_open <= broker.max_pool_size


def test_ping_named_database(broker):
    with open_stub(broker.tcp_target) as stub:
        reply = stub.Ping(pb.PingRequest(database=broker.db_name), timeout=10)
    assert [d.database for d in reply.databases] == [broker.db_name]


def test_ping_unknown_database_is_not_found(broker):
    with (
        open_stub(broker.unix_target) as stub,
        fails(grpc.StatusCode.NOT_FOUND, "UNKNOWN_DATABASE") as f,
    ):
        stub.Ping(pb.PingRequest(database="missing"), timeout=10)
    assert "appdb" in f.message  # the message lists what is configured


@pytest.fixture
def broker_with_dead_database(start_broker):
    config = start_broker.base_config()
    config["databases"]["dead"] = {
        "uri": f"mongodb://127.0.0.1:{_closed_port()}/",
        "server_selection_timeout_ms": 1000,
        "heartbeat_frequency_ms": 500,
        "connect_timeout_ms": 500,
    }
    return start_broker(config)


def test_down_database_is_reported_and_refused_with_unavailable(broker_with_dead_database, collection_name):
    with open_stub(broker_with_dead_database.unix_target) as stub:
        reply = stub.Ping(pb.PingRequest(), timeout=10)
        status = {d.database: d for d in reply.databases}
        assert status["appdb"].ok
        assert not status["dead"].ok and "UNAVAILABLE" in status["dead"].error
        with fails(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE") as failure:
            stub.Ping(pb.PingRequest(database="dead"), timeout=10)
        assert "'dead' is unreachable" in failure.message
        with fails(grpc.StatusCode.UNAVAILABLE):
            find_all(stub, database="dead", collection=collection_name)
        with fails(grpc.StatusCode.UNAVAILABLE):
            stub.Insert(
                pb.InsertRequest(
                    database="dead", collection=collection_name, documents=[bson.encode({"a": 1})]
                ),
                timeout=10,
            )
        # The healthy database is not affected by its neighbour.
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})])
        )


def test_ping_cli_exit_codes(broker, broker_with_dead_database):
    ok = subprocess.run(
        [sys.executable, "-m", "broker", "ping", "--target", broker.unix_target],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "appdb" in ok.stdout and "ok" in ok.stdout
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "ping",
            "--target",
            broker_with_dead_database.unix_target,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert down.returncode == 1, down.stderr
    health = {d["database"]: d["ok"] for d in json.loads(down.stdout)["databases"]}
    assert health == {"appdb": True, "dead": False}
    nobody = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "ping",
            "--target",
            "unix:///nonexistent/broker.sock",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert nobody.returncode == 2
    assert "UNAVAILABLE" in nobody.stderr
