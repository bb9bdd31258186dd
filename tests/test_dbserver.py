"""The test infrastructure itself: database server, broker launcher, counters, fleet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from bench.dbprofiles import make_pki, tls_uri
from harness.brokerproc import BrokerProcess, BrokerStartError, broker_config, render_toml
from harness.dbserver import (
    KINDS,
    DatabaseServer,
    DatabaseServerError,
    ProcessServer,
    TLSListener,
    start_database_server,
)
from harness.fleet import run_fleet
from harness.netconns import (
    ConnectionSampler,
    _proc_established,
    _socket_inodes,
    connections_from_pid,
    connections_to_port,
)


def test_session_server_answers_ping(db_server: DatabaseServer, mongo: MongoClient[Any]) -> None:
    assert db_server.kind in KINDS
    assert db_server.uri.startswith(("mongodb://", "mongodb+srv://"))
    assert mongo.admin.command("ping")["ok"] == 1


def test_restart_keeps_port_and_data(db_server: DatabaseServer) -> None:
    if not db_server.managed:
        pytest.skip(f"the session server ({db_server.kind}) was not started here")
    # A server of its own: restarting the session's would disturb the broker.
    with start_database_server(db_server.kind) as server:
        port = server.port
        with MongoClient[dict[str, Any]](server.uri, serverSelectionTimeoutMS=10_000) as client:
            client.restart_db.c.insert_one({"_id": 1, "kept": True})
        server.stop()
        assert not server.is_running()
        server.start()
        assert server.port == port
        with MongoClient[dict[str, Any]](server.uri, serverSelectionTimeoutMS=10_000) as client:
            assert client.restart_db.c.find_one({"_id": 1}) == {"_id": 1, "kept": True}
    assert not server.is_running()


def test_server_that_dies_at_start_is_reported_with_its_log() -> None:
    script = "import sys; print('bad flag --sqlite-url', flush=True); sys.exit(3)"
    server = ProcessServer("ferretdb", lambda port, data: [sys.executable, "-c", script], "test")
    try:
        with pytest.raises(DatabaseServerError, match="exited before answering ping") as caught:
            server.start(ready_timeout=20)
        assert "bad flag --sqlite-url" in str(caught.value)
    finally:
        server.close()
    assert not server.workdir.exists()


def test_unknown_or_unavailable_kind_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSERVER_KIND", "oracle")
    with pytest.raises(DatabaseServerError, match="DBSERVER_KIND='oracle' is not one of"):
        start_database_server()
    monkeypatch.delenv("MONGODB_URI", raising=False)
    with pytest.raises(DatabaseServerError, match="MONGODB_URI is not set"):
        start_database_server("uri")
    if shutil.which("mongod") is None:
        with pytest.raises(DatabaseServerError, match="no mongod on PATH"):
            start_database_server("mongod")


def test_ferretdb_opens_a_tls_listener_beside_the_plain_one(
    db_server: DatabaseServer, tmp_path: Path
) -> None:
    """bench/ferretdb's --listen-tls: the bench's tls-latency profile reaches the server through it."""
    if db_server.kind != "ferretdb":
        pytest.skip(f"the session server is {db_server.kind}; only bench/ferretdb opens a TLS listener")
    pki = make_pki(tmp_path / "pki")
    with start_database_server("ferretdb", tls=pki.listener) as server:
        assert server.tls_port is not None and server.tls_port != server.port
        tls = tls_uri(server.host, server.tls_port, pki.ca_file)
        with MongoClient[dict[str, Any]](tls, serverSelectionTimeoutMS=10_000) as client:
            assert client.admin.command("ping")["ok"] == 1
            client.tls_db.c.insert_one({"_id": 1, "over": "tls"})
        # The plain listener is the same server, and stays what uri names.
        with MongoClient[dict[str, Any]](server.uri, serverSelectionTimeoutMS=10_000) as client:
            assert client.tls_db.c.find_one({"_id": 1}) == {"_id": 1, "over": "tls"}
        # The TLS port serves no plaintext, and a client that does not trust the CA gets nothing.
        for uri in (
            f"mongodb://{server.host}:{server.tls_port}/",
            f"mongodb://{server.host}:{server.tls_port}/?tls=true",
        ):
            with (
                MongoClient[dict[str, Any]](uri, serverSelectionTimeoutMS=1500) as client,
                pytest.raises(PyMongoError),
            ):
                client.admin.command("ping")


def test_a_tls_listener_is_refused_where_it_cannot_be_had(
    db_server: DatabaseServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = TLSListener(tmp_path / "server.pem", tmp_path / "server.key")
    with pytest.raises(DatabaseServerError, match="only bench/ferretdb's FerretDB opens one"):
        start_database_server("mongod", tls=files)
    # MONGODB_URI names the server to measure: never quietly replaced by a FerretDB with TLS.
    monkeypatch.setenv("MONGODB_URI", db_server.uri)
    with pytest.raises(DatabaseServerError, match="MONGODB_URI is set, but a TLS listener was asked for"):
        start_database_server(tls=files)


def test_uri_server_is_used_as_given(db_server: DatabaseServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", db_server.uri)
    with start_database_server("uri") as server:
        assert (server.kind, server.managed) == ("uri", False)
        assert (server.host, server.port, server.uri) == (
            db_server.host,
            db_server.port,
            db_server.uri,
        )
        with pytest.raises(DatabaseServerError, match="not started here"):
            server.stop()


def test_toml_config_round_trips() -> None:
    config = broker_config(
        db_uri='mongodb://u:p"w@127.0.0.1:1/?appname=x',
        socket_path=Path("/tmp/mb-x/broker.sock"),
        min_pool_size=0,
        retry_writes=False,
        heartbeat_frequency_ms=500,
    )
    config["databases"]["odd.name"] = {"uri": "mongodb://h/", "socket_timeout_ms": None}
    config["server"] = {"shutdown_grace_s": 2.5}
    parsed = tomllib.loads(render_toml(config))
    del config["databases"]["odd.name"]["socket_timeout_ms"]  # TOML has no null
    assert parsed == config


def test_connection_count_sees_this_process_and_agrees_with_proc(
    db_server: DatabaseServer,
) -> None:
    me = os.getpid()
    before = connections_from_pid(me, db_server.port)
    with MongoClient[dict[str, Any]](db_server.uri, maxPoolSize=3) as client:
        client.admin.command("ping")
        during = connections_from_pid(me, db_server.port)
        assert len(during) > len(before)
        # The /proc fallback sees exactly what psutil sees.
        mine = _socket_inodes(me)
        from_proc = {ep for ino, ep in _proc_established(db_server.port).items() if ino in mine}
        assert from_proc == during
        assert during <= connections_to_port(db_server.port)
        assert not during & connections_to_port(db_server.port, exclude_pids=[me])
        with ConnectionSampler(lambda: connections_from_pid(me, db_server.port)) as sampler:
            client.admin.command("ping")
        assert sampler.peak >= len(during) - 1 and sampler.samples >= 1


def test_fleet_bounds_concurrency_and_reports_failures() -> None:
    ok = [sys.executable, "-c", "import time; time.sleep(0.2); print('{\"fine\": 1}')"]
    bad = [sys.executable, "-c", "import sys; sys.exit('worker broke')"]
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    fleet = run_fleet([ok, ok, bad, ok, slow, ok], concurrency=2, timeout_per_worker=3)
    assert fleet.max_alive == 2
    assert [r.index for r in fleet.results] == list(range(6))
    assert [r.index for r in fleet.failed] == [2, 4]
    assert "worker broke" in fleet.failed[0].describe()
    assert fleet.failed[1].returncode == -9  # killed at its timeout
    assert fleet.reports == [{"fine": 1}] * 4


def test_broker_that_exits_at_start_is_reported_with_its_log(db_server: DatabaseServer) -> None:
    config = broker_config(db_uri=db_server.uri, socket_path=None)
    with BrokerProcess(config, extra_args=["--no-such-flag"]) as proc:
        with pytest.raises(BrokerStartError) as caught:
            proc.start(timeout=30)
        assert caught.value.returncode == 2
        assert "--no-such-flag" in caught.value.stderr_tail
        workdir = proc.workdir
    assert not workdir.exists()


def test_demo_runs_end_to_end_on_a_small_scale() -> None:
    # `make run` is the README's main job; keep it working. Small numbers:
    # the full-size figures come from running the demo itself.
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "bench.demo", "--workers", "6", "--concurrency", "3", "--ops", "2"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "workers ok" in result.stdout and "6/6" in result.stdout
    assert "through the broker" in result.stdout and "own MongoClient each" in result.stdout
    assert "demo finished" in result.stdout
