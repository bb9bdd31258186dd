"""One short-lived worker process: connect, insert and read back, report, exit.

Run as a script with one JSON argument (see ``fleet.worker_command``)::

    python harness/worker.py '{"mode": "broker", "target": "unix:///tmp/mb-x/broker.sock",
                             "database": "appdb", "collection": "c", "worker": 7}'

``mode`` is ``broker`` (the bundled client, through the broker) or ``pymongo``
(its own MongoClient straight to the database, as workers do without a
broker). For each of ``ops`` rounds it inserts ``{"_id", "worker", "op",
"value"}`` and finds that document by ``_id``, checking it came back. It
keeps the client open ``hold_ms`` more milliseconds, as a job does while it
works, then closes it and prints one JSON line on stdout: its latencies and
how many TCP connections it opened to ``db_port``.

It imports nothing from this repository but the client package, so that it
starts as a real worker would: a fresh interpreter each time.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = json.loads(argv[1])
    mode = spec["mode"]
    worker = int(spec["worker"])
    ops = int(spec.get("ops", 1))
    db_port = spec.get("db_port")
    prefix = spec.get("prefix", "w")

    # Every TCP connect made from Python code passes this audit hook, so the
    # count is exact however briefly a connection lives. gRPC's sockets are
    # made in C and not seen, but those go to the broker, not the database.
    connects = 0

    def audit(event: str, args: tuple[Any, ...]) -> None:
        nonlocal connects
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and len(address) >= 2 and address[1] == db_port:
                connects += 1

    sys.addaudithook(audit)

    from bson import ObjectId

    # Imports first, so that the latencies measured below are the same kind
    # of thing in both modes: they include connecting (the first operation
    # pays for the channel or the TCP connections and handshakes), not
    # loading modules. broker_client would import grpc on its first call.
    client: Any
    if mode == "broker":
        import grpc  # noqa: F401
        from broker_client import BrokerClient

        started = time.perf_counter()
        client = BrokerClient(spec["target"])
    elif mode == "pymongo":
        from pymongo import MongoClient

        started = time.perf_counter()
        client = MongoClient(spec["uri"], appname=f"worker-{worker}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    try:
        collection = client[spec["database"]][spec["collection"]]
        insert_ms: list[float] = []
        find_ms: list[float] = []
        for op in range(ops):
            doc = {
                "_id": ObjectId(),
                "worker": worker,
                "op": op,
                "value": f"{prefix}-{worker}-{op}",
            }
            t0 = time.perf_counter()
            collection.insert_one(doc)
            t1 = time.perf_counter()
            found = collection.find_one({"_id": doc["_id"]})
            t2 = time.perf_counter()
            if found is None or found["value"] != doc["value"]:
                raise SystemExit(f"worker {worker}: inserted {doc!r} but found {found!r}")
            insert_ms.append((t1 - t0) * 1000)
            find_ms.append((t2 - t1) * 1000)
        work_ms = (time.perf_counter() - started) * 1000 if ops else 0.0
        hold_ms = float(spec.get("hold_ms", 0))
        if hold_ms > 0:
            time.sleep(hold_ms / 1000)
    finally:
        client.close()
    report = {
        "worker": worker,
        "mode": mode,
        "insert_ms": insert_ms,
        "find_ms": find_ms,
        "work_ms": work_ms,
        "connects": connects,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
