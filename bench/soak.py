"""Soak: mixed load through the broker for a long time, with a fault every few minutes.

    python -m bench.soak --minutes 30 --fault-every 120     (make soak)

The broker reaches its own database server through toxiproxy. Workers insert
documents with client-made `_id`s, read them back and stream small results;
every `--fault-every` seconds one fault from the schedule is injected and
then healed. At the end every acknowledged insert is looked up in the
database, and the trend (least-squares slope) of the broker's memory, file
descriptors, threads and open cursors is reported. Results go to
bench/results/soak.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bson
import grpc
import psutil
from broker_client.proto.broker.v1 import broker_pb2 as pb
from broker_client.proto.broker.v1 import broker_pb2_grpc
from pymongo import MongoClient

from harness.brokerproc import BrokerProcess, broker_config
from harness.dbserver import start_database_server
from harness.process import short_tmpdir
from harness.toxiproxy import Proxy, Toxiproxy, find_toxiproxy

RESULTS = Path(__file__).resolve().parent / "results"
COLLECTION = "soak"


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    acked: set[bytes] = field(default_factory=set)
    overran: int = 0  # calls that outlived their deadline by > 0.5 s
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, code: str, elapsed: float, deadline: float) -> None:
        with self.lock:
            self.ops[f"{kind}:{code}"] += 1
            if elapsed > deadline + 0.5:
                self.overran += 1


def _code(method: Callable[..., object], request: object, deadline: float, stream: bool = False) -> str:
    try:
        reply = method(request, timeout=deadline)
        if stream:
            list(reply)  # type: ignore[call-overload]
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _worker(target: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(target)
    stub = broker_pb2_grpc.BrokerStub(channel)
    mine: list[bson.ObjectId] = []
    deadline = 2.0
    while not stop.is_set():
        roll = rng.random()
        start = time.monotonic()
        if roll < 0.5 or not mine:
            oid = bson.ObjectId()
            request = pb.InsertRequest(
                database="appdb", collection=COLLECTION, documents=[bson.encode({"_id": oid, "v": seed})]
            )
            code = _code(stub.Insert, request, deadline)
            if code == "OK":
                mine.append(oid)
                with tally.lock:
                    tally.acked.add(oid.binary)
            kind = "insert"
        elif roll < 0.9:
            oid = rng.choice(mine)
            request_f = pb.FindRequest(
                database="appdb", collection=COLLECTION, filter=bson.encode({"_id": oid}), limit=1
            )
            code = _code(stub.Find, request_f, deadline, stream=True)
            kind = "find_one"
        else:
            request_s = pb.FindRequest(database="appdb", collection=COLLECTION, limit=500, batch_size=100)
            code = _code(stub.Find, request_s, deadline, stream=True)
            kind = "stream"
        tally.record(kind, code, time.monotonic() - start, deadline)
        # Steady, not saturating: the soak looks for leaks and losses.
        time.sleep(0.05 if code != "OK" else 0.01)
    channel.close()


def _faults(proxy: Proxy, server: object) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    # The server's pid is read when a fault fires: a restart gives it a new one.
    def pid() -> int | None:
        return getattr(server, "pid", None)

    def latency() -> None:
        proxy.add_toxic("latency", latency=1500)

    def blackhole() -> None:
        proxy.add_toxic("timeout", timeout=0)

    def reset() -> None:
        proxy.add_toxic("reset_peer", timeout=500)

    def stop_db() -> None:
        if (current := pid()) is not None:
            os.kill(current, signal.SIGSTOP)

    def cont_db() -> None:
        if (current := pid()) is not None:
            os.kill(current, signal.SIGCONT)

    def restart_db() -> None:
        server.restart()  # type: ignore[attr-defined]

    return [
        ("latency 1.5 s", latency, proxy.clear),
        ("blackhole", blackhole, proxy.clear),
        ("connection resets", reset, proxy.clear),
        ("database unreachable", proxy.disable, proxy.enable),
        ("database SIGSTOP", stop_db, cont_db),
        ("database killed and restarted", restart_db, lambda: None),
    ]


def _slope_per_hour(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [v for _, v in samples]
    return statistics.linear_regression(xs, ys).slope * 3600


def _drive(
    minutes: float,
    fault_every: float,
    *,
    fault_length: float,
    faults: list[tuple[str, Callable[[], None], Callable[[], None]]],
    stats_stub: broker_pb2_grpc.BrokerStub,
    process: psutil.Process,
) -> tuple[dict[str, list[tuple[float, float]]], list[dict[str, object]]]:
    """Inject and heal faults on schedule while sampling the broker every 5 s."""
    series: dict[str, list[tuple[float, float]]] = {"rss_mb": [], "fds": [], "threads": [], "cursors": []}
    injected: list[dict[str, object]] = []
    started = time.monotonic()
    end = started + minutes * 60
    next_fault = started + fault_every
    fault_index = 0
    active: tuple[str, Callable[[], None], float] | None = None
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if active is None and now >= next_fault:
                name, inject, heal = faults[fault_index % len(faults)]
                fault_index += 1
                inject()
                active = (name, heal, now)
            elif active is not None and now - active[2] >= fault_length:
                name, heal, began = active
                heal()
                recovered = _wait_recovered(stats_stub)
                injected.append({"fault": name, "at_s": round(began - started), "recovered_s": recovered})
                print(
                    f"[{(now - started) / 60:5.1f} min] {name}: healed, recovered in {recovered} s",
                    flush=True,
                )
                active = None
                next_fault = time.monotonic() + fault_every
            try:
                cursors = (
                    stats_stub.Stats(pb.StatsRequest(database="appdb"), timeout=2).databases[0].open_cursors
                )
            except grpc.RpcError:
                cursors = -1
            t = time.monotonic() - started
            series["rss_mb"].append((t, process.memory_info().rss / 2**20))
            series["fds"].append((t, process.num_fds()))
            series["threads"].append((t, process.num_threads()))
            if cursors >= 0:
                series["cursors"].append((t, cursors))
            time.sleep(5)
    finally:
        if active is not None:
            active[1]()
    return series, injected


def run(minutes: float, fault_every: float, fault_length: float, workers: int) -> dict[str, object]:
    toxi_binary = find_toxiproxy()
    if toxi_binary is None:
        raise SystemExit("toxiproxy-server not found: run `make tools`")
    server = start_database_server()
    toxi = Toxiproxy(toxi_binary).start()
    proxy = toxi.proxy("soak", f"{server.host}:{server.port}")
    workdir = short_tmpdir("mb-soak-")
    config = broker_config(
        db_uri=f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true",
        socket_path=workdir / "broker.sock",
        tcp=None,
        max_pool_size=10,
        heartbeat_frequency_ms=1000,
        server_selection_timeout_ms=2000,
    )
    broker = BrokerProcess(config, workdir=workdir).start()
    process = psutil.Process(broker.pid)
    tally = Tally()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_worker, args=(broker.unix_target, tally, stop, n), daemon=True)
        for n in range(workers)
    ]
    for thread in threads:
        thread.start()
    stats_stub = broker_pb2_grpc.BrokerStub(grpc.insecure_channel(broker.unix_target))
    try:
        series, injected = _drive(
            minutes,
            fault_every,
            fault_length=fault_length,
            faults=_faults(proxy, server),
            stats_stub=stats_stub,
            process=process,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    _wait_recovered(stats_stub)
    lost = _lost_writes(server.uri, tally.acked)
    broker.stop()
    broker.close()
    toxi.close()
    server.close()
    result: dict[str, object] = {
        "minutes": minutes,
        "workers": workers,
        "operations": sum(tally.ops.values()),
        "outcomes": dict(sorted(tally.ops.items())),
        "acknowledged_inserts": len(tally.acked),
        "acknowledged_lost": lost,
        "calls_past_deadline": tally.overran,
        "faults": injected,
        "broker_exit_code": broker.returncode,
        "slope_per_hour": {k: round(_slope_per_hour(v), 3) for k, v in series.items()},
        "first_last": {k: [v[0][1], v[-1][1]] if v else [] for k, v in series.items()},
        "max": {k: max(x for _, x in v) if v else None for k, v in series.items()},
    }
    return result


def _wait_recovered(stub: broker_pb2_grpc.BrokerStub, timeout: float = 60.0) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if stub.Ping(pb.PingRequest(database="appdb"), timeout=2).databases[0].ok:
                return round(time.monotonic() - start, 2)
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    return None


def _lost_writes(uri: str, acked: set[bytes]) -> int:
    client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=10000)
    try:
        collection = client["broker_test"][COLLECTION]
        ids = [bson.ObjectId(b) for b in acked]
        found = 0
        for start in range(0, len(ids), 5000):
            found += collection.count_documents({"_id": {"$in": ids[start : start + 5000]}})
        return len(ids) - found
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fault-every", type=float, default=120.0, help="seconds between faults")
    parser.add_argument("--fault-length", type=float, default=20.0, help="seconds each fault lasts")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    result = run(args.minutes, args.fault_every, args.fault_length, args.workers)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
