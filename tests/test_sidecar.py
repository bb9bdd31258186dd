"""Production sidecar behaviour: health, reflection, real third-party clients, drain, reload."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import bson
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.process import free_port
from harness.toxiproxy import Toxiproxy, find_toxiproxy
from tests.rpc import fails, find_all, open_stub, pb

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "bin"


def _tool(name: str) -> str:
    path = TOOLS / name if (TOOLS / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `make tools`", pytrace=False)
    return str(path)


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _health_config(start_broker, **db):
    config = start_broker.base_config(**db)
    config["health"] = {"tcp": f"127.0.0.1:{free_port()}"}
    return config


# --- health ---------------------------------------------------------------------


def test_grpc_health_probe_binary_sees_overall_and_per_database_status(start_broker):
    config = _health_config(start_broker)
    config["databases"]["dead"] = {
        "uri": f"mongodb://127.0.0.1:{free_port()}/",
        "heartbeat_frequency_ms": 500,
        "connect_timeout_ms": 300,
    }
    proc = start_broker(config)
    probe = _tool("grpc-health-probe")
    address = config["health"]["tcp"]
    overall = _run([probe, f"-addr={address}"])
    assert overall.returncode == 0, overall.stdout + overall.stderr
    assert "status: SERVING" in overall.stdout + overall.stderr
    # A database is SERVING once the driver has found it (moments after start).
    deadline = time.monotonic() + 10
    while _run([probe, f"-addr={address}", "-service=appdb"]).returncode != 0:
        assert time.monotonic() < deadline, "appdb never became SERVING"
        time.sleep(0.1)
    # The dead database: NOT_SERVING (exit 4 is grpc-health-probe's "unhealthy").
    deadline = time.monotonic() + 10
    while (result := _run([probe, f"-addr={address}", "-service=dead"])).returncode == 0:
        assert time.monotonic() < deadline, "dead database still SERVING"
        time.sleep(0.2)
    assert result.returncode == 4 and "NOT_SERVING" in result.stderr + result.stdout
    # Health needs no token and works on the data-plane socket as well.
    socket_probe = _run([probe, f"-addr=unix://{proc.unix_path}"])
    assert socket_probe.returncode == 0
    # The CLI used by Docker's HEALTHCHECK.
    cli = _run([sys.executable, "-m", "broker", "health", "--config", str(proc.config_path)])
    assert cli.returncode == 0 and "SERVING" in cli.stdout
    down = _run([sys.executable, "-m", "broker", "health", "--target", address, "--service", "dead"])
    assert down.returncode == 1 and "NOT_SERVING" in down.stdout


def test_database_health_follows_the_database(start_broker, db_server):
    binary = find_toxiproxy()
    assert binary, "run `make tools`"
    toxi = Toxiproxy(binary).start()
    try:
        proxy = toxi.proxy("health", f"{db_server.host}:{db_server.port}")
        config = _health_config(start_broker, heartbeat_frequency_ms=500, connect_timeout_ms=500)
        config["databases"]["appdb"]["uri"] = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        start_broker(config)
        channel = grpc.insecure_channel(config["health"]["tcp"])
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service="appdb"), timeout=5).status

        def wait_for(wanted: int) -> None:
            deadline = time.monotonic() + 15
            while status() != wanted:
                assert time.monotonic() < deadline, f"health never became {wanted}"
                time.sleep(0.1)

        wait_for(health_pb2.HealthCheckResponse.SERVING)
        proxy.disable()
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert overall == health_pb2.HealthCheckResponse.SERVING  # the broker itself is fine
        proxy.enable()
        wait_for(health_pb2.HealthCheckResponse.SERVING)
        channel.close()
    finally:
        toxi.close()


# --- reflection and grpcurl ------------------------------------------------------


def test_grpcurl_lists_describes_and_calls_ping(broker):
    grpcurl = _tool("grpcurl")
    target = ["-plaintext", broker.tcp_target]
    listed = _run([grpcurl, *target, "list"])
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"broker.v1.Broker", "grpc.health.v1.Health"} <= services
    described = _run([grpcurl, *target, "describe", "broker.v1.Broker"])
    assert described.returncode == 0, described.stderr
    for rpc in ("rpc Find", "rpc Insert", "rpc Ping", "rpc Stats"):
        assert rpc in described.stdout
    pinged = _run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            json.dumps({"database": "appdb"}),
            broker.tcp_target,
            "broker.v1.Broker/Ping",
        ]
    )
    assert pinged.returncode == 0, pinged.stderr
    reply = json.loads(pinged.stdout)
    assert reply["version"] == broker.version and reply["databases"][0]["ok"] is True
    # Over the Unix socket too.
    over_socket = _run([grpcurl, "-plaintext", broker.unix_target, "broker.v1.Broker/Ping"])
    assert over_socket.returncode == 0, over_socket.stderr


def test_reflection_can_be_switched_off(start_broker):
    config = start_broker.base_config()
    config["server"] = {"reflection": False}
    proc = start_broker(config)
    listed = _run([_tool("grpcurl"), "-plaintext", proc.tcp_target, "list"])
    assert listed.returncode != 0
    assert "does not support the reflection API" in listed.stderr or "Unimplemented" in listed.stderr


# --- lifecycle --------------------------------------------------------------------


def test_sigterm_drains_in_flight_calls_and_refuses_late_ones(
    start_broker, db_server, collection_name, mongo
):
    binary = find_toxiproxy()
    assert binary, "run `make tools`"
    toxi = Toxiproxy(binary).start()
    try:
        proxy = toxi.proxy("drain", f"{db_server.host}:{db_server.port}")
        # Five warm connections, so the slow inserts spend their time in
        # flight rather than in connection set-up through the slow proxy.
        config = _health_config(start_broker, min_pool_size=5)
        config["databases"]["appdb"]["uri"] = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        config["server"] = {"shutdown_grace_s": 2.0}
        proc = start_broker(config)
        with open_stub(proc.unix_target) as stub:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"warm": 1})]
                )
            )
            deadline = time.monotonic() + 10
            while stub.Stats(pb.StatsRequest(), timeout=5).databases[0].connections_open < 5:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proxy.add_toxic("latency", latency=800)
            results: list[tuple[str, str]] = []

            def insert(n: int) -> None:
                try:
                    stub.Insert(
                        pb.InsertRequest(
                            database="appdb", collection=collection_name, documents=[bson.encode({"_id": n})]
                        ),
                        timeout=20,
                    )
                    results.append(("OK", str(n)))
                except grpc.RpcError as exc:
                    results.append((exc.code().name, str(n)))

            threads = [threading.Thread(target=insert, args=(n,)) for n in range(5)]
            for t in threads:
                t.start()
            # Wait until the five are in flight, held up by the latency.
            deadline = time.monotonic() + 10
            while stub.Stats(pb.StatsRequest(database="appdb"), timeout=5).databases[0].rpcs_in_flight < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            start = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
            # Health flips at once; new calls are refused.
            probe = _run([_tool("grpc-health-probe"), f"-addr={config['health']['tcp']}"], timeout=10)
            assert probe.returncode != 0
            with pytest.raises(grpc.RpcError) as late:
                stub.Insert(
                    pb.InsertRequest(
                        database="appdb", collection=collection_name, documents=[bson.encode({"late": 1})]
                    ),
                    timeout=5,
                )
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE
            for t in threads:
                t.join(20)
            code = proc.wait(timeout=10)
            elapsed = time.monotonic() - start
        assert code == 0
        assert elapsed <= 2.0 + 1.0 + 0.5, elapsed
        assert sorted(results) == [("OK", str(n)) for n in range(5)]
        # Every acknowledged insert is stored; the refused one is not.
        stored = {d["_id"] for d in mongo["broker_test"][collection_name].find({"_id": {"$type": "int"}})}
        assert stored == set(range(5))
        assert mongo["broker_test"][collection_name].count_documents({"late": 1}) == 0
        assert "drained 5 call(s), aborted 0" in proc.log_text()
    finally:
        toxi.close()


def test_calls_still_running_after_the_grace_get_unavailable(start_broker, db_server, collection_name):
    binary = find_toxiproxy()
    assert binary, "run `make tools`"
    toxi = Toxiproxy(binary).start()
    try:
        proxy = toxi.proxy("grace", f"{db_server.host}:{db_server.port}")
        config = start_broker.base_config()
        config["databases"]["appdb"]["uri"] = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        config["server"] = {"shutdown_grace_s": 0.5}
        proc = start_broker(config)
        with open_stub(proc.unix_target) as stub:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]
                )
            )
            proxy.add_toxic("latency", latency=4000)
            outcome: list[grpc.StatusCode] = []

            def slow() -> None:
                try:
                    find_all(stub, database="appdb", collection=collection_name)
                    outcome.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcome.append(exc.code())

            thread = threading.Thread(target=slow)
            thread.start()
            time.sleep(0.3)
            start = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            thread.join(10)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - start <= 0.5 + 1.0 + 0.5
        assert outcome == [grpc.StatusCode.UNAVAILABLE]
        assert "drained 0 call(s), aborted 1 with UNAVAILABLE" in proc.log_text()
    finally:
        toxi.close()


def test_sighup_adds_a_database_and_rejects_a_broken_config(start_broker, db_server, collection_name):
    config = start_broker.base_config()
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        with fails(grpc.StatusCode.NOT_FOUND):
            stub.Ping(pb.PingRequest(database="second"), timeout=5)
        from harness.brokerproc import render_toml

        config["databases"]["second"] = {"uri": db_server.uri, "database": "broker_test_second"}
        config["databases"]["appdb"]["max_pool_size"] = 3  # re-tuned
        proc.config_path.write_text(render_toml(config))
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in proc.log_text():
            assert time.monotonic() < deadline, proc.log_text()
            time.sleep(0.05)
        assert stub.Ping(pb.PingRequest(database="second"), timeout=10).databases[0].ok
        stub.Insert(
            pb.InsertRequest(database="second", collection=collection_name, documents=[bson.encode({"x": 1})])
        )
        assert stub.Stats(pb.StatsRequest(database="appdb"), timeout=5).databases[0].max_pool_size == 3

        # A broken config is rejected and the running one kept.
        proc.config_path.write_text('[databases.appdb]\nuri = "not-a-uri"\n')
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload rejected" not in proc.log_text():
            assert time.monotonic() < deadline, proc.log_text()
            time.sleep(0.05)
        assert "databases.appdb.uri" in proc.log_text()
        assert stub.Ping(pb.PingRequest(database="second"), timeout=10).databases[0].ok
        assert proc.is_running()


def test_unix_socket_gets_the_configured_mode(start_broker):
    config = start_broker.base_config()
    config["listen"]["unix_mode"] = "0600"
    proc = start_broker(config)
    mode = stat.S_IMODE(os.stat(proc.unix_path).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(Path(proc.unix_path).parent).st_mode) & 0o007 == 0
