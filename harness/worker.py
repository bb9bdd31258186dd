"""The one worker program: every application process the tests, the demo and the bench start.

Run as a script, so that a worker starts as a real one does: a fresh
interpreter that imports only the standard library and then the one client
library its mode needs (nothing else from this repository)::

    python harness/worker.py storm  '{"mode": "per-process", "uri": ..., "database": ..., ...}'
    python harness/worker.py steady '{"mode": "broker-uds", "target": ..., "concurrency": 16, ...}'
    python harness/worker.py stream '{"mode": "direct-shared", "uri": ..., "limit": 100000, ...}'

``fleet.worker_command`` builds the command line. A *mode* is how the worker
reaches the database:

==============  ==========================================================
churn           a new ``MongoClient`` for every operation
per-process     one ``MongoClient`` per worker process (the forked-app status quo)
mongobetween    one ``MongoClient`` per worker process, pointed at mongobetween
broker-uds      the bundled ``broker_client`` against mongo-broker's Unix socket
broker-tcp      the same, against the broker's loopback TCP listener
direct-shared   one ``MongoClient`` in one process, shared by threads (the limit)
==============  ==========================================================

Roles, each printing JSON lines on stdout, the last one its result:

storm          one short-lived worker: ``ops`` operations (insert, find it by
               ``_id``, insert, ...), keep the client ``hold_ms`` more as a job
               does while it works, close, report its timings and how many TCP
               connections it opened to ``db_port``.
storm-threads  direct-shared's storm: ``workers`` such tasks on threads of one
               process, ``concurrency`` at once, sharing one warm client.
steady         ``concurrency`` long-lived workers mixing find_one and insert_one
               for ``windows`` x ``duration_s``; first prints ``READY <t0>`` (a
               ``time.monotonic()`` value, which Linux keeps system-wide) once
               every worker is warm, so the harness can read the broker's CPU
               time at each window boundary.
stream         one find of ``limit`` documents, ``repeats`` times.

Times are ``time.monotonic()`` values, latencies milliseconds.
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
from collections.abc import Callable
from typing import Any, Final

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

# No compressors: FerretDB rejects OP_COMPRESSED. A short server selection keeps a broken run short.
_PYMONGO_OPTIONS: Final[dict[str, Any]] = {"serverSelectionTimeoutMS": 10_000, "connectTimeoutMS": 10_000}


# --- the operations, per mode ---------------------------------------------------------------


class Ops:
    """insert_one / find_one by _id / find over one collection, the same way in every mode."""

    def insert(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def find_one(self, _id: Any) -> Any:
        raise NotImplementedError

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        """Read ``limit`` documents in batches of ``batch_size``; return (documents, bytes seen)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _PymongoOps(Ops):
    """A pymongo client of the worker's own: per-process, mongobetween, direct-shared."""

    def __init__(self, uri: str, database: str, collection: str, appname: str) -> None:
        from pymongo import MongoClient

        self._client: Any = MongoClient(uri, appname=appname, **_PYMONGO_OPTIONS)
        self._coll = self._client[database][collection]

    def insert(self, doc: dict[str, Any]) -> None:
        self._coll.insert_one(doc)

    def find_one(self, _id: Any) -> Any:
        return self._coll.find_one({"_id": _id})

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        # Decoded into dicts, as a pymongo application reads a result; the
        # bytes are not seen here (the harness knows the documents' size).
        return sum(1 for _ in self._coll.find({}, limit=limit, batch_size=batch_size)), 0

    def raw_stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        """``find_raw_batches``: undecoded BSON, the fastest way pymongo reads a result."""
        docs = size = 0
        for batch in self._coll.find_raw_batches({}, limit=limit, batch_size=batch_size):
            size += len(batch)
            pos = 0
            while pos < len(batch):  # BSON documents end to end, each led by its int32 length
                pos += int.from_bytes(batch[pos : pos + 4], "little")
                docs += 1
        return docs, size

    def close(self) -> None:
        self._client.close()


class _ChurnOps(Ops):
    """A new MongoClient for every operation, closed right after it."""

    def __init__(self, *args: str) -> None:
        self._args = args

    def _once(self, name: str, *args: Any) -> Any:
        ops = _PymongoOps(*self._args)
        try:
            return getattr(ops, name)(*args)
        finally:
            ops.close()

    def insert(self, doc: dict[str, Any]) -> None:
        self._once("insert", doc)

    def find_one(self, _id: Any) -> Any:
        return self._once("find_one", _id)

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        return self._once("stream", limit, batch_size)


class _BrokerOps(Ops):
    """The bundled client through the broker (Unix socket or TCP).

    ``raw``: documents come back as RawBSONDocument, undecoded bytes, the
    client-side equivalent of find_raw_batches (a goal compares the two).
    """

    def __init__(self, target: str, database: str, collection: str, raw: bool) -> None:
        from broker_client import BrokerClient
        from bson.raw_bson import RawBSONDocument

        extra: dict[str, Any] = {"document_class": RawBSONDocument} if raw else {}
        self._client: Any = BrokerClient(target, timeout=300.0 if raw else 30.0, **extra)
        self._coll = self._client[database][collection]

    def insert(self, doc: dict[str, Any]) -> None:
        self._coll.insert_one(doc)

    def find_one(self, _id: Any) -> Any:
        return self._coll.find_one({"_id": _id})

    def stream(self, limit: int, batch_size: int) -> tuple[int, int]:
        docs = size = 0
        for doc in self._coll.find({}, limit=limit, batch_size=batch_size):
            docs += 1
            size += len(doc.raw)
        return docs, size

    def close(self) -> None:
        self._client.close()


def make_ops(spec: dict[str, Any], worker: int = 0, raw: bool = False) -> Ops:
    """The ``Ops`` for ``spec["mode"]``, pointed at ``spec``'s target/uri, database and collection."""
    mode = spec["mode"]
    database, collection = spec["database"], spec["collection"]
    if mode in BROKER_MODES:
        return _BrokerOps(spec["target"], database, collection, raw)
    appname = f"bench-{mode}-{worker}"
    if mode == CHURN:
        return _ChurnOps(spec["uri"], database, collection, appname)
    if mode in (PER_PROCESS, MONGOBETWEEN, DIRECT_SHARED):
        return _PymongoOps(spec["uri"], database, collection, appname)
    raise SystemExit(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def import_client_library(mode: str) -> None:
    """Import what the mode's client needs, and nothing else.

    Imports come first so that a worker's latencies are the same kind of thing
    in every mode: they include connecting, not loading modules.
    """
    if mode in BROKER_MODES:
        import broker_client  # noqa: F401
        import grpc  # noqa: F401  # broker_client imports it on the first call anyway
        from broker_client.proto.broker.v1 import broker_pb2_grpc  # noqa: F401
    else:
        import pymongo  # noqa: F401
    import bson  # noqa: F401


def seed_id(index: int) -> Any:
    """The ``_id`` of seeded document ``index``: a fixed ObjectId.

    ObjectIds, not ints: FerretDB's SQLite backend pushes an ``_id`` equality
    on an ObjectId down to an index lookup, but scans the collection for an
    int (1.3 ms against 10 ms at 1,000 documents, measured here).
    """
    from bson import ObjectId

    return ObjectId(b"seed" + index.to_bytes(8, "big"))


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS in MiB (VmHWM); NaN when it cannot be read.

    VmHWM, not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across ``execve``, so
    a worker spawned by a large harness would report the harness's size.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return math.nan


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- storm: short-lived workers ---------------------------------------------------------------


def _storm_ops(ops: Ops, worker: int, count: int, hold_ms: float) -> dict[str, Any]:
    """insert, find it, insert, ... (``count`` operations), then hold the client ``hold_ms``."""
    from bson import ObjectId

    insert_ms: list[float] = []
    find_ms: list[float] = []
    t_first = math.nan
    doc: dict[str, Any] = {}
    for op in range(count):
        t0 = time.monotonic()
        if op % 2 == 0:
            doc = {"_id": ObjectId(), "worker": worker, "op": op, "value": f"storm-{worker}-{op}"}
            ops.insert(doc)
        else:
            found = ops.find_one(doc["_id"])
            if found is None or found["value"] != doc["value"]:
                raise LookupError(f"worker {worker}: inserted {doc!r} but found {found!r}")
        t1 = time.monotonic()
        t_first = t1 if op == 0 else t_first
        (insert_ms if op % 2 == 0 else find_ms).append((t1 - t0) * 1000)
    if hold_ms > 0:
        time.sleep(hold_ms / 1000)
    return {"worker": worker, "t_first": t_first, "insert_ms": insert_ms, "find_ms": find_ms}


def storm(spec: dict[str, Any]) -> int:
    """One short-lived worker; the harness subtracts its spawn time from ``t_first``."""
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
    mode, worker = spec["mode"], int(spec["worker"])
    import_client_library(mode)
    t_imported = time.monotonic()
    ops = make_ops(spec, worker)
    try:
        result = _storm_ops(ops, worker, int(spec.get("ops", 2)), float(spec.get("hold_ms", 0)))
    finally:
        ops.close()
    _emit(
        {
            **result,
            "mode": mode,
            "t_main": t_main,
            "t_imported": t_imported,
            "t_done": time.monotonic(),
            "connects": connects,
            "peak_rss_mb": peak_rss_mb(),
            # The process's own CPU from its start (interpreter, imports,
            # connecting, the operations): on few cores, what a storm costs.
            "cpu_ms": (os.times().user + os.times().system) * 1000,
        }
    )
    return 0


def storm_threads(spec: dict[str, Any]) -> int:
    """W short tasks on threads, at most C at once, sharing one client connected beforehand.

    A task's "spawn" is the moment a thread starts it, so spawn-to-first-result
    is the operation alone: the physical limit the process modes pay
    interpreter start, imports and connecting on top of.
    """
    from concurrent.futures import ThreadPoolExecutor

    import_client_library(spec["mode"])
    shared = make_ops(spec)
    shared.find_one(seed_id(0))  # connected and warm before the clock starts
    count, hold_ms = int(spec.get("ops", 2)), float(spec.get("hold_ms", 0))

    def task(worker: int) -> dict[str, Any]:
        t_spawn = time.monotonic()
        return {"t_spawn": t_spawn, **_storm_ops(shared, worker, count, hold_ms)}

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=int(spec["concurrency"])) as pool:
        futures = [pool.submit(task, i) for i in range(int(spec["workers"]))]
    elapsed = time.monotonic() - started
    shared.close()
    errors = [f.exception() for f in futures]
    _emit(
        {
            "elapsed_s": elapsed,
            "tasks": [f.result() for f, e in zip(futures, errors, strict=True) if e is None],
            "failures": [f"{type(e).__name__}: {e}"[:300] for e in errors if e is not None],
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    return 0


# --- steady: C long-lived workers -------------------------------------------------------------


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
    windows: list[dict[str, Any]] = [{"latencies": [], "errors": 0} for _ in range(int(spec["windows"]))]
    end = t0 + duration * len(windows)
    errors: list[str] = []
    while (now := time.monotonic()) < t0:
        time.sleep(min(0.01, t0 - now))
    op = 0
    while (start := time.monotonic()) < end:
        window = windows[int((start - t0) // duration)]
        try:
            if op % insert_every == insert_every - 1:
                ops.insert({"_id": ObjectId(), "w": worker, "op": op, "pad": "x" * 100})
            elif ops.find_one(seed_id(rng.randrange(seeds))) is None:
                raise LookupError("a seeded document was not found")
            window["latencies"].append(round((time.monotonic() - start) * 1000, 4))
        except Exception as exc:
            window["errors"] += 1
            if len(errors) < 3:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        op += 1
    return {"windows": windows, "error_samples": errors}


def _announce_start() -> float:
    t0 = time.monotonic() + 0.3
    sys.stdout.write(f"READY {t0!r}\n")
    sys.stdout.flush()
    return t0


def _steady_threads(spec: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    """direct-shared: one client, ``concurrency`` threads."""
    shared = make_ops(spec)
    ready = threading.Semaphore(0)
    go = threading.Event()
    start: list[float] = []
    results: list[dict[str, Any]] = [{} for _ in range(concurrency)]

    def wait() -> float:
        go.wait()
        return start[0]

    def run(index: int) -> None:
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
    start.append(_announce_start())
    go.set()
    for thread in threads:
        thread.join()
    shared.close()
    return results


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the launcher went away")
        data += chunk
    return data


def _steady_forks(spec: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
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

            def wait() -> float:
                return float(_read_exact(go_r, 32).decode().strip())

            def ready() -> None:
                os.write(ready_w, b"r")

            try:
                ops = make_ops(spec, index)
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
    t0 = _announce_start()
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
    return results


def steady(spec: dict[str, Any]) -> int:
    """C workers mixing find_one by _id and insert_one; each window's latencies, merged."""
    mode, concurrency = spec["mode"], int(spec["concurrency"])
    import_client_library(mode)  # before fork: every child would import it anyway
    run = _steady_threads if mode == DIRECT_SHARED else _steady_forks
    results = run(spec, concurrency)
    crashes = [r["crash"] for r in results if "crash" in r]
    ok = [r for r in results if "crash" not in r]
    windows = [
        {
            "latencies": [v for r in ok for v in r["windows"][i]["latencies"]],
            "errors": sum(r["windows"][i]["errors"] for r in ok),
        }
        for i in range(int(spec["windows"]))
    ]
    _emit(
        {
            "workers_ok": len(ok),
            "crashes": crashes[:3],
            "error_samples": [e for r in ok for e in r["error_samples"]][:5],
            "windows": windows,
        }
    )
    return 0 if not crashes else 1


# --- stream: one large find -------------------------------------------------------------------


def stream(spec: dict[str, Any]) -> int:
    """Read ``limit`` documents with an explicit batch size, ``repeats`` times."""
    mode = spec["mode"]
    import_client_library(mode)
    ops = make_ops(spec, raw=True)
    limit, batch_size = int(spec["limit"]), int(spec["batch_size"])
    read = ops.raw_stream if isinstance(ops, _PymongoOps) and mode == DIRECT_SHARED else ops.stream
    runs = []
    try:
        ops.find_one(seed_id(0))  # warm: connections made, code paths loaded
        for _ in range(int(spec.get("repeats", 1))):
            started = time.perf_counter()
            docs, size = read(limit, batch_size)
            elapsed = time.perf_counter() - started
            runs.append(
                {"docs": docs, "bytes": size or int(spec.get("expected_bytes", 0)), "elapsed_s": elapsed}
            )
    finally:
        ops.close()
    _emit({"runs": runs, "client_peak_rss_mb": peak_rss_mb()})
    return 0


ROLES: Final[dict[str, Callable[[dict[str, Any]], int]]] = {
    "storm": storm,
    "storm-threads": storm_threads,
    "steady": steady,
    "stream": stream,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ROLES:
        sys.stderr.write(f"usage: python harness/worker.py {'|'.join(ROLES)} SPEC_JSON\n")
        return 2
    return ROLES[argv[1]](json.loads(argv[2]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
