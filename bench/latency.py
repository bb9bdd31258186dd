"""One call at a time: where a broker call's latency goes, next to pymongo's own.

    python -m bench.latency [--calls 400]

Starts the database server (as ``make bench`` does) and one broker, then
times the same operations one after another: pymongo directly, the raw gRPC
contract, and the bundled client. The gaps between the rows are the cost of
each layer (gRPC, the broker, the client), with no concurrency to blur
them. Medians and p90 of ``--calls`` calls after a warm-up; a quick look,
not the benchmark (``make bench`` is that).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import grpc
from broker_client import BrokerClient
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc
from pymongo import MongoClient

from harness.brokerproc import BrokerProcess, broker_config
from harness.dbserver import database_server

log = logging.getLogger("bench.latency")

_WARMUP = 30


def _time(call: Callable[[], Any], calls: int) -> str:
    for _ in range(_WARMUP):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return f"p50 {samples[len(samples) // 2]:6.2f} ms   p90 {samples[int(len(samples) * 0.9)]:6.2f} ms"


def run(calls: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with database_server() as db, tempfile.TemporaryDirectory(prefix="mb-lat-") as workdir:
        config = broker_config(db_uri=db.uri, socket_path=Path(workdir) / "broker.sock")
        with BrokerProcess(config, workdir=Path(workdir)).start() as broker:
            mongo: MongoClient[dict[str, Any]] = MongoClient(db.uri)
            collection = mongo.broker_test.latency
            oid = collection.insert_one({"a": 1}).inserted_id
            rows.append(("pymongo find_one", _time(lambda: collection.find_one({"_id": oid}), calls)))
            rows.append(("pymongo insert_one", _time(lambda: collection.insert_one({"a": 1}), calls)))
            rows.append(("pymongo ping", _time(lambda: mongo.admin.command("ping"), calls)))

            channel = grpc.insecure_channel(broker.unix_target)
            stub = broker_pb2_grpc.BrokerStub(channel)
            by_id = broker_pb2.FindRequest(
                database="appdb", collection="latency", filter=bson.encode({"_id": oid})
            )
            one_doc = broker_pb2.InsertRequest(
                database="appdb", collection="latency", documents=[bson.encode({"a": 1})]
            )
            rows += [
                (
                    "grpc Stats (no database)",
                    _time(lambda: stub.Stats(broker_pb2.StatsRequest(), timeout=5), calls),
                ),
                (
                    "grpc Ping appdb",
                    _time(lambda: stub.Ping(broker_pb2.PingRequest(database="appdb"), timeout=5), calls),
                ),
                ("grpc Insert", _time(lambda: stub.Insert(one_doc, timeout=5), calls)),
            ]
            # Absent from brokers before FindOne: this script also times older code.
            if hasattr(stub, "FindOne"):
                rows.append(("grpc FindOne", _time(lambda: stub.FindOne(by_id, timeout=5), calls)))
            channel.close()

            with BrokerClient(broker.unix_target) as client:
                items = client["appdb"]["latency"]
                rows.append(("client find_one", _time(lambda: items.find_one({"_id": oid}), calls)))
                rows.append(("client insert_one", _time(lambda: items.insert_one({"a": 1}), calls)))
            mongo.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=400, help="timed calls per row (after a warm-up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for label, figures in run(args.calls):
        sys.stdout.write(f"{label:<26} {figures}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
