"""The processes ``bench.latency`` measures next to the broker.

    python -m bench.stubs serve aio|sync --unix PATH
    python -m bench.stubs direct async|sync --uri URI --op find_one|insert_one|ping ...

``serve`` runs a gRPC server of the broker's own service (its generated
stubs) whose only method is a Ping that returns a canned ``PingResponse``:
no database, no broker code. ``aio`` is a ``grpc.aio`` server on one asyncio
loop, as the broker is; ``sync`` is ``grpc.server`` with a thread pool. It
runs until SIGTERM. Its CPU is read from outside, from /proc.

``direct`` runs the operations itself with pymongo (``AsyncMongoClient`` on
an asyncio loop, or the sync ``MongoClient``): a warm-up, then ``--repeats``
rounds of ``--calls`` operations, ``--concurrency`` at a time (asyncio tasks,
or threads). It writes one JSON object to stdout: per round, the wall time of
every operation (ms), its own CPU for the round (``time.process_time``, all
threads) and, with ``--db-pid``, the database server's CPU ticks around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the trivial servers -----------------------------------------------------


def _canned_ping() -> Any:
    from broker_client.proto.broker.v1 import broker_pb2

    # Shaped like the broker's answer to a Ping of one database.
    return broker_pb2.PingResponse(
        version="stub",
        databases=[
            broker_pb2.DatabasePing(
                database="appdb",
                ok=True,
                rtt_ms=0.5,
                pool=broker_pb2.PoolSummary(connections_open=1, connections_in_use=0, max_pool_size=10),
            )
        ],
    )


def serve_aio(unix_path: str) -> None:
    import grpc
    from broker_client.proto.broker.v1 import broker_pb2_grpc

    answer = _canned_ping()

    class Servicer(broker_pb2_grpc.BrokerServicer):
        async def Ping(self, request: Any, context: Any) -> Any:
            return answer

    async def main() -> None:
        server = grpc.aio.server()
        # The methods it does not serve are the base servicer's (UNIMPLEMENTED).
        broker_pb2_grpc.add_BrokerServicer_to_server(Servicer(), server)  # type: ignore[abstract]
        server.add_insecure_port(f"unix:{unix_path}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


def serve_sync(unix_path: str, workers: int) -> None:
    import grpc
    from broker_client.proto.broker.v1 import broker_pb2_grpc

    answer = _canned_ping()

    class Servicer(broker_pb2_grpc.BrokerServicer):
        def Ping(self, request: Any, context: Any) -> Any:
            return answer

    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    broker_pb2_grpc.add_BrokerServicer_to_server(Servicer(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{unix_path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


# --- pymongo directly --------------------------------------------------------


def _db_cpu(db_pid: int | None) -> float | None:
    if db_pid is None:
        return None
    try:
        return proc_cpu_s(db_pid)
    except OSError:
        return None


def _round(run_all: Callable[[list[float]], None], db_pid: int | None) -> dict[str, Any]:
    samples: list[float] = []
    db0 = _db_cpu(db_pid)
    cpu0 = time.process_time()
    start = time.perf_counter()
    run_all(samples)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    db1 = _db_cpu(db_pid)
    return {
        "wall_ms": samples,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "db_cpu_s": None if db0 is None or db1 is None else db1 - db0,
    }


def _split(calls: int, concurrency: int) -> list[int]:
    return [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]


def direct_sync(args: argparse.Namespace) -> dict[str, Any]:
    import bson
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(args.uri, maxPoolSize=max(10, args.concurrency))
    collection = client[args.database][args.collection]
    oid = bson.ObjectId(args.oid) if args.oid else None
    ops: dict[str, Callable[[], Any]] = {
        "find_one": lambda: collection.find_one({"_id": oid}),
        "insert_one": lambda: collection.insert_one({"a": 1}),
        "ping": lambda: client.admin.command("ping"),
    }
    op = ops[args.op]

    def worker(n: int, samples: list[float]) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            op()
            samples.append((time.perf_counter() - t0) * 1000)

    def run_all(samples: list[float]) -> None:
        if args.concurrency == 1:
            worker(args.calls, samples)
            return
        threads = [
            threading.Thread(target=worker, args=(n, samples)) for n in _split(args.calls, args.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    worker(args.warmup, [])
    rounds = [_round(run_all, args.db_pid) for _ in range(args.repeats)]
    client.close()
    return {"rounds": rounds}


def direct_async(args: argparse.Namespace) -> dict[str, Any]:
    import bson
    from pymongo import AsyncMongoClient

    async def main() -> dict[str, Any]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            args.uri, maxPoolSize=max(10, args.concurrency)
        )
        collection = client[args.database][args.collection]
        oid = bson.ObjectId(args.oid) if args.oid else None
        ops: dict[str, Callable[[], Awaitable[Any]]] = {
            "find_one": lambda: collection.find_one({"_id": oid}),
            "insert_one": lambda: collection.insert_one({"a": 1}),
            "ping": lambda: client.admin.command("ping"),
        }
        op = ops[args.op]

        async def worker(n: int, samples: list[float]) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                await op()
                samples.append((time.perf_counter() - t0) * 1000)

        async def run_all(samples: list[float]) -> None:
            await asyncio.gather(*(worker(n, samples) for n in _split(args.calls, args.concurrency)))

        await worker(args.warmup, [])
        rounds = []
        for _ in range(args.repeats):
            samples: list[float] = []
            db0 = _db_cpu(args.db_pid)
            cpu0 = time.process_time()
            start = time.perf_counter()
            await run_all(samples)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            db1 = _db_cpu(args.db_pid)
            rounds.append(
                {
                    "wall_ms": samples,
                    "elapsed_s": elapsed,
                    "cpu_s": cpu,
                    "db_cpu_s": None if db0 is None or db1 is None else db1 - db0,
                }
            )
        await client.close()
        return {"rounds": rounds}

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="a trivial gRPC Ping server")
    serve.add_argument("kind", choices=["aio", "sync"])
    serve.add_argument("--unix", required=True, help="Unix socket path to listen on")
    serve.add_argument("--workers", type=int, default=10, help="sync server: thread pool size")
    direct = sub.add_parser("direct", help="time pymongo operations in this process")
    direct.add_argument("kind", choices=["async", "sync"])
    direct.add_argument("--uri", required=True)
    direct.add_argument("--op", choices=["find_one", "insert_one", "ping"], required=True)
    direct.add_argument("--database", default="broker_test")
    direct.add_argument("--collection", default="latency")
    direct.add_argument("--oid", default="", help="the _id find_one looks up (hex)")
    direct.add_argument("--calls", type=int, default=400)
    direct.add_argument("--warmup", type=int, default=50)
    direct.add_argument("--repeats", type=int, default=3)
    direct.add_argument("--concurrency", type=int, default=1)
    direct.add_argument("--db-pid", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.kind == "aio":
            serve_aio(args.unix)
        else:
            serve_sync(args.unix, args.workers)
        return 0
    result = direct_async(args) if args.kind == "async" else direct_sync(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
