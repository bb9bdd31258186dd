"""The benchmark's modes: how a worker reaches the database, and the worker side of each workload.

A *mode* is one way an application's workers get to MongoDB:

==============  ==========================================================
churn           a new ``MongoClient`` for every operation
per-process     one ``MongoClient`` per worker process (the forked-app status quo)
mongobetween    one ``MongoClient`` per worker process, pointed at mongobetween
broker-uds      the bundled ``broker_client`` against mongo-broker's Unix socket
broker-tcp      the same, against the broker's loopback TCP listener
direct-shared   one ``MongoClient`` in one process, shared by threads (the limit)
==============  ==========================================================

This file is also the worker program, run as a script so that a storm worker
starts as a real one does: a fresh interpreter that imports only the standard
library and then the one client library its mode needs::

    python bench/modes.py storm  '{"mode": "per-process", "uri": ..., ...}'
    python bench/modes.py steady '{"mode": "broker-uds", "target": ..., "concurrency": 16, ...}'
    python bench/modes.py stream '{"mode": "direct-shared", "uri": ..., "limit": 100000, ...}'

Each prints JSON lines on stdout; the last one is the result. ``steady``
first prints ``READY <t0>`` (a ``time.monotonic()`` value, which Linux keeps
system-wide) once every worker is connected and warmed up, so the harness can
read the broker's CPU time at the start of each measurement window.
Nothing here imports the harness or the repository's other modules.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BROKER_MODES",
    "CLIENT_MODES",
    "MODES",
    "MODE_HELP",
    "Ops",
    "make_ops",
    "percentiles",
]

CHURN: Final = "churn"
PER_PROCESS: Final = "per-process"
MONGOBETWEEN: Final = "mongobetween"
BROKER_UDS: Final = "broker-uds"
BROKER_TCP: Final = "broker-tcp"
DIRECT_SHARED: Final = "direct-shared"

MODES: Final = (CHURN, PER_PROCESS, MONGOBETWEEN, BROKER_UDS, BROKER_TCP, DIRECT_SHARED)
BROKER_MODES: Final = (BROKER_UDS, BROKER_TCP)
# Modes whose workers hold a pymongo client of their own (to the database or to mongobetween).
CLIENT_MODES: Final = (CHURN, PER_PROCESS, MONGOBETWEEN)

MODE_HELP: Final = {
    CHURN: "a new MongoClient for every operation",
    PER_PROCESS: "one MongoClient per worker process (the forked-app status quo)",
    MONGOBETWEEN: "one MongoClient per worker process, pointed at mongobetween",
    BROKER_UDS: "bundled broker_client, broker's Unix socket",
    BROKER_TCP: "bundled broker_client, broker's loopback TCP listener",
    DIRECT_SHARED: "one in-process MongoClient shared by threads (the physical limit)",
}

# pymongo options every worker-side client gets. No compressors: FerretDB
# rejects OP_COMPRESSED. A short server selection keeps a broken run short.
_PYMONGO_OPTIONS: Final = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 10_000}
_CALL_TIMEOUT_S: Final = 30.0


# --- the operations, per mode ---------------------------------------------------------------


class Ops:
    """insert_one / find_one by _id / find over one collection, the same way in every mode."""

    def insert(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def find_one(self, _id: Any) -> Any:
        raise NotImplementedError

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        """Read ``limit`` documents in batches of ``batch_size``; return (documents, bytes)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _PymongoOps(Ops):
    """A pymongo client of the worker's own: per-process, mongobetween, direct-shared."""

    def __init__(self, uri: str, database: str, collection: str, appname: str, **options: Any) -> None:
        from pymongo import MongoClient

        self._client: Any = MongoClient(uri, appname=appname, **{**_PYMONGO_OPTIONS, **options})
        self._coll = self._client[database][collection]

    def insert(self, doc: dict[str, Any]) -> None:
        self._coll.insert_one(doc)

    def find_one(self, _id: Any) -> Any:
        return self._coll.find_one({"_id": _id})

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        # Decoded into dicts, as a pymongo application reads a result. The
        # byte count is not seen here: the harness knows the documents' size.
        docs = 0
        for _doc in self._coll.find({}, limit=limit, batch_size=batch_size):
            docs += 1
        return docs, 0

    def raw_stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        """``find_raw_batches``: undecoded BSON, the fastest way pymongo reads a result."""
        docs = size = 0
        for batch in self._coll.find_raw_batches({}, limit=limit, batch_size=batch_size):
            size += len(batch)
            docs += count_bson_documents(batch)
        return docs, size

    def close(self) -> None:
        self._client.close()


class _ChurnOps(Ops):
    """A new MongoClient for every operation, closed right after it."""

    def __init__(self, uri: str, database: str, collection: str, appname: str) -> None:
        self._args = (uri, database, collection, appname)

    def _once(self) -> _PymongoOps:
        return _PymongoOps(*self._args)

    def insert(self, doc: dict[str, Any]) -> None:
        ops = self._once()
        try:
            ops.insert(doc)
        finally:
            ops.close()

    def find_one(self, _id: Any) -> Any:
        ops = self._once()
        try:
            return ops.find_one(_id)
        finally:
            ops.close()

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        ops = self._once()
        try:
            return ops.stream(limit, batch_size)
        finally:
            ops.close()

    def close(self) -> None:
        pass


class _BrokerOps(Ops):
    """The bundled client through the broker (Unix socket or TCP)."""

    def __init__(self, target: str, database: str, collection: str) -> None:
        from broker_client import BrokerClient

        self._client: Any = BrokerClient(target, timeout=_CALL_TIMEOUT_S)
        self._target = target
        self._coll = self._client[database][collection]
        self._database = database
        self._collection = collection

    def insert(self, doc: dict[str, Any]) -> None:
        self._coll.insert_one(doc)

    def find_one(self, _id: Any) -> Any:
        return self._coll.find_one({"_id": _id})

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        # RawBSONDocument: documents stay undecoded bytes, the client-side
        # equivalent of find_raw_batches (the goal compares the two).
        from broker_client import BrokerClient
        from bson.raw_bson import RawBSONDocument

        raw: Any = BrokerClient(self._target, timeout=300.0, document_class=RawBSONDocument)
        try:
            docs = size = 0
            coll = raw[self._database][self._collection]
            for doc in coll.find({}, limit=limit, batch_size=batch_size):
                docs += 1
                size += len(doc.raw)
            return docs, size
        finally:
            raw.close()

    def close(self) -> None:
        self._client.close()


def make_ops(spec: dict[str, Any], worker: int = 0, shared: Ops | None = None) -> Ops:
    """The ``Ops`` for ``spec["mode"]``; ``shared`` is reused by direct-shared threads."""
    mode = spec["mode"]
    database, collection = spec["database"], spec["collection"]
    appname = f"bench-{mode}-{worker}"
    if mode == CHURN:
        return _ChurnOps(spec["uri"], database, collection, appname)
    if mode in (PER_PROCESS, MONGOBETWEEN):
        return _PymongoOps(spec["uri"], database, collection, appname)
    if mode == DIRECT_SHARED:
        return shared if shared is not None else _PymongoOps(spec["uri"], database, collection, appname)
    if mode in BROKER_MODES:
        return _BrokerOps(spec["target"], database, collection)
    raise SystemExit(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def import_client_library(mode: str) -> None:
    """Import what the mode's client needs, and nothing else."""
    if mode in BROKER_MODES:
        import broker_client  # noqa: F401
        import grpc  # noqa: F401  # broker_client imports it on the first call anyway
        from broker_client.proto.broker.v1 import broker_pb2_grpc  # noqa: F401
    else:
        import pymongo  # noqa: F401


def seed_id(index: int) -> Any:
    """The ``_id`` of seeded document ``index``: a fixed ObjectId.

    ObjectIds, not ints: FerretDB's SQLite backend pushes an ``_id`` equality
    on an ObjectId down to an index lookup, but scans the collection for an
    int (1.3 ms against 10 ms at 1,000 documents, measured here).
    """
    from bson import ObjectId

    return ObjectId(b"seed" + index.to_bytes(8, "big"))


def count_bson_documents(batch: bytes) -> int:
    """How many BSON documents lie end to end in ``batch`` (each starts with its int32 length)."""
    count = pos = 0
    end = len(batch)
    while pos < end:
        pos += int.from_bytes(batch[pos : pos + 4], "little")
        count += 1
    return count


def percentile(values: Sequence[float], point: float) -> float:
    """Nearest-rank percentile of ``values``; NaN for none. The bench's one definition."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(point / 100 * len(ordered))) - 1]


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` as {"p50": ..., "p99": ..., "p99.9": ...}."""
    ordered = sorted(values)
    return {f"p{point:g}": percentile(ordered, point) for point in points}


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB.

    VmHWM, not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across ``execve``, so
    a worker spawned by a large harness would report the harness's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- storm: one short-lived worker ------------------------------------------------------------


def storm(spec: dict[str, Any]) -> int:
    """Connect, do ``ops`` operations (insert, then find it, ...), hold, close, report.

    Times are ``time.monotonic()`` values: the harness subtracts the moment it
    spawned this process to get spawn-to-first-result.
    """
    t_main = time.monotonic()
    db_port = spec.get("db_port")
    connects = 0

    # Every TCP connect made from Python passes this audit hook, so the count
    # of database connections this process opened is exact however briefly
    # one lives (gRPC's sockets are made in C, but go to the broker).
    def audit(event: str, args: tuple[Any, ...]) -> None:
        nonlocal connects
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and len(address) >= 2 and address[1] == db_port:
                connects += 1

    sys.addaudithook(audit)
    mode = spec["mode"]
    worker = int(spec["worker"])
    import_client_library(mode)
    from bson import ObjectId

    t_imported = time.monotonic()
    ops = make_ops(spec, worker)
    latencies: list[float] = []
    t_first = math.nan
    try:
        last: Any = None
        for op in range(int(spec.get("ops", 4))):
            t0 = time.monotonic()
            if op % 2 == 0:
                last = ObjectId()
                ops.insert({"_id": last, "worker": worker, "op": op, "value": f"storm-{worker}-{op}"})
            else:
                found = ops.find_one(last)
                if found is None:
                    raise SystemExit(f"worker {worker}: inserted {last} but did not find it")
            t1 = time.monotonic()
            if op == 0:
                t_first = t1
            latencies.append((t1 - t0) * 1000)
        hold_ms = float(spec.get("hold_ms", 0))
        if hold_ms > 0:
            time.sleep(hold_ms / 1000)
    finally:
        ops.close()
    _emit(
        {
            "worker": worker,
            "t_main": t_main,
            "t_imported": t_imported,
            "t_first": t_first,
            "t_done": time.monotonic(),
            "op_ms": latencies,
            "connects": connects,
            "peak_rss_mb": _peak_rss_mb(),
        }
    )
    return 0


def storm_threads(spec: dict[str, Any]) -> int:
    """direct-shared's storm: W short tasks on threads, at most C at once, one warm shared client.

    A task's "spawn" is the moment a thread starts it, so spawn-to-first-result
    is the operation alone: the physical limit the process modes pay
    interpreter start, imports and connecting on top of.
    """
    from concurrent.futures import ThreadPoolExecutor

    import_client_library(DIRECT_SHARED)
    from bson import ObjectId

    shared = make_ops(spec)
    shared.find_one(seed_id(0))  # connected and warm before the clock starts
    ops_per_task = int(spec.get("ops", 4))
    hold_s = float(spec.get("hold_ms", 0)) / 1000

    def task(worker: int) -> dict[str, Any]:
        t_spawn = time.monotonic()
        latencies: list[float] = []
        t_first = math.nan
        last: Any = None
        for op in range(ops_per_task):
            t0 = time.monotonic()
            if op % 2 == 0:
                last = ObjectId()
                shared.insert({"_id": last, "worker": worker, "op": op, "value": f"storm-{worker}-{op}"})
            elif shared.find_one(last) is None:
                raise LookupError(f"task {worker}: inserted {last} but did not find it")
            t1 = time.monotonic()
            if op == 0:
                t_first = t1
            latencies.append((t1 - t0) * 1000)
        if hold_s > 0:
            time.sleep(hold_s)
        return {
            "worker": worker,
            "t_spawn": t_spawn,
            "t_first": t_first,
            "t_done": time.monotonic(),
            "op_ms": latencies,
        }

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=int(spec["concurrency"])) as pool:
        futures = [pool.submit(task, i) for i in range(int(spec["workers"]))]
    elapsed = time.monotonic() - started
    tasks, failures = [], []
    for future in futures:
        error = future.exception()
        if error is None:
            tasks.append(future.result())
        else:
            failures.append(f"{type(error).__name__}: {error}"[:300])
    shared.close()
    _emit({"elapsed_s": elapsed, "tasks": tasks, "failures": failures, "peak_rss_mb": _peak_rss_mb()})
    return 0


# --- steady: C long-lived workers -------------------------------------------------------------


@dataclass
class _Window:
    latencies: list[float]
    errors: int = 0


def _steady_loop(
    ops: Ops,
    spec: dict[str, Any],
    worker: int,
    wait_for_start: Callable[[], float],
    signal_ready: Callable[[], None],
) -> dict[str, Any]:
    """Warm up, wait for the common start, then run ``windows`` windows of ``duration_s`` each."""
    from bson import ObjectId

    seeds = int(spec["seed_docs"])
    insert_every = int(spec.get("insert_every", 4))
    rng = random.Random(worker)
    for i in range(int(spec.get("warmup_ops", 4))):
        if i % 2:
            ops.find_one(seed_id(rng.randrange(seeds)))
        else:
            ops.insert({"_id": ObjectId(), "w": worker})
    signal_ready()
    t0 = wait_for_start()
    duration = float(spec["duration_s"])
    windows = [_Window([]) for _ in range(int(spec["windows"]))]
    end = t0 + duration * len(windows)
    errors: list[str] = []
    while (now := time.monotonic()) < t0:
        time.sleep(min(0.01, t0 - now))
    op = 0
    while True:
        start = time.monotonic()
        if start >= end:
            break
        window = windows[int((start - t0) // duration)]
        try:
            if op % insert_every == insert_every - 1:
                ops.insert({"_id": ObjectId(), "w": worker, "op": op, "pad": "x" * 100})
            elif ops.find_one(seed_id(rng.randrange(seeds))) is None:
                raise LookupError("a seeded document was not found")
            window.latencies.append((time.monotonic() - start) * 1000)
        except Exception as exc:
            window.errors += 1
            if len(errors) < 3:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        op += 1
    return {
        "windows": [{"latencies": w.latencies, "errors": w.errors} for w in windows],
        "error_samples": errors,
    }


def _summarise_windows(results: list[dict[str, Any]], duration: float, windows: int) -> list[dict[str, Any]]:
    out = []
    for index in range(windows):
        merged: list[float] = []
        errors = 0
        for result in results:
            window = result["windows"][index]
            merged.extend(window["latencies"])
            errors += window["errors"]
        stats = percentiles(merged)
        out.append(
            {
                "ops": len(merged),
                "errors": errors,
                "ops_per_s": len(merged) / duration,
                "p50_ms": stats["p50"],
                "p99_ms": stats["p99"],
                "p99.9_ms": stats["p99.9"],
                "mean_ms": sum(merged) / len(merged) if merged else math.nan,
            }
        )
    return out


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the launcher went away")
        data += chunk
    return data


def _steady_threads(spec: dict[str, Any], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """direct-shared: one client, ``concurrency`` threads."""
    shared = make_ops(spec)
    ready = threading.Semaphore(0)
    go = threading.Event()
    start: list[float] = []
    results: list[dict[str, Any]] = [{} for _ in range(concurrency)]

    def run(index: int) -> None:
        def wait() -> float:
            go.wait()
            return start[0]

        try:
            results[index] = _steady_loop(shared, spec, index, wait, ready.release)
        except BaseException:
            results[index] = {"crash": traceback.format_exc()}
            ready.release()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    t0 = time.monotonic() + 0.3
    start.append(t0)
    sys.stdout.write(f"READY {t0!r}\n")
    sys.stdout.flush()
    go.set()
    for thread in threads:
        thread.join()
    shared.close()
    return results, t0


def _steady_forks(spec: dict[str, Any], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """Every other mode: ``concurrency`` forked worker processes, a client each (as gunicorn does)."""
    result_dir = spec["result_dir"]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for index in range(concurrency):
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(ready_r)
            os.close(go_w)
            code = 0
            try:
                ops = make_ops(spec, index)

                def wait() -> float:
                    return float(_read_exact(go_r, 32).decode().strip())

                def ready() -> None:
                    os.write(ready_w, b"r")

                result = _steady_loop(ops, spec, index, wait, ready)
                ops.close()
            except BaseException:
                result = {"crash": traceback.format_exc()}
                os.write(ready_w, b"r")
                code = 1
            with open(os.path.join(result_dir, f"{index}.json"), "w", encoding="utf-8") as handle:
                json.dump(result, handle)
            os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    _read_exact(ready_r, concurrency)
    t0 = time.monotonic() + 0.3
    sys.stdout.write(f"READY {t0!r}\n")
    sys.stdout.flush()
    os.write(go_w, f"{t0!r}".ljust(32).encode() * concurrency)
    for pid in pids:
        os.waitpid(pid, 0)
    results = []
    for index in range(concurrency):
        try:
            with open(os.path.join(result_dir, f"{index}.json"), encoding="utf-8") as handle:
                results.append(json.load(handle))
        except (OSError, ValueError) as exc:
            results.append({"crash": f"no result from worker {index}: {exc}"})
    return results, t0


def steady(spec: dict[str, Any]) -> int:
    """C workers mixing find_one by _id and insert_one for ``windows`` x ``duration_s``."""
    mode = spec["mode"]
    concurrency = int(spec["concurrency"])
    import_client_library(mode)
    import bson  # noqa: F401  # before fork: every child would import it anyway

    if mode == DIRECT_SHARED:
        results, t0 = _steady_threads(spec, concurrency)
    else:
        results, t0 = _steady_forks(spec, concurrency)
    crashes = [r["crash"] for r in results if "crash" in r]
    ok = [r for r in results if "crash" not in r]
    samples = [e for r in ok for e in r.get("error_samples", [])]
    _emit(
        {
            "t0": t0,
            "workers": concurrency,
            "workers_ok": len(ok),
            "crashes": crashes[:3],
            "error_samples": samples[:5],
            "windows": _summarise_windows(ok, float(spec["duration_s"]), int(spec["windows"])),
            "launcher_peak_rss_mb": _peak_rss_mb(),
        }
    )
    return 0 if not crashes else 1


# --- stream: one large find -------------------------------------------------------------------


def stream(spec: dict[str, Any]) -> int:
    """Read ``limit`` ~1 KB documents with an explicit batch size, ``repeats`` times."""
    mode = spec["mode"]
    import_client_library(mode)
    ops = make_ops(spec)
    limit, batch_size = int(spec["limit"]), int(spec["batch_size"])
    runs = []
    try:
        # Warm up: connections made, code paths loaded. An ObjectId that is
        # not there: FerretDB looks it up by index (an int would be a scan).
        ops.find_one(seed_id(0))
        for _ in range(int(spec.get("repeats", 1))):
            started = time.perf_counter()
            if mode == DIRECT_SHARED:
                assert isinstance(ops, _PymongoOps)
                docs, size = ops.raw_stream(limit, batch_size)
            elif mode in BROKER_MODES:
                docs, size = ops.stream(limit, batch_size)
            else:
                docs, _ = ops.stream(limit, batch_size)
                size = int(spec.get("expected_bytes", 0))
            elapsed = time.perf_counter() - started
            runs.append({"docs": docs, "bytes": size, "elapsed_s": elapsed})
    finally:
        ops.close()
    _emit({"runs": runs, "client_peak_rss_mb": _peak_rss_mb()})
    return 0


def main(argv: list[str]) -> int:
    roles: dict[str, Callable[[dict[str, Any]], int]] = {
        "storm": storm,
        "storm-threads": storm_threads,
        "steady": steady,
        "stream": stream,
    }
    if len(argv) != 3 or argv[1] not in roles:
        sys.stderr.write(f"usage: python bench/modes.py {'|'.join(roles)} SPEC_JSON\n")
        return 2
    return roles[argv[1]](json.loads(argv[2]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
