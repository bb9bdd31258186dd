"""The layer table: wall time and CPU per call of each layer a broker call goes through.

    python -m bench.latency [--calls 400] [--repeats 3] [--concurrency C] [--json PATH] [--smoke]

Starts the database server (as ``make bench`` does), one broker, a trivial
grpc.aio server and a trivial sync gRPC server (both ``bench.stubs``: the
broker's own generated service, whose Ping returns a canned answer), then
times the same kinds of call, one at a time (and, with ``--concurrency C``,
C at a time from C client threads):

- Ping of the grpc.aio stub and of the sync gRPC stub (no database);
- the broker's Ping of one database, FindOne by ``_id`` and Insert of one
  small document (the raw gRPC contract, no client library), and find_one
  and insert_one through the bundled Python client;
- ping, find_one by ``_id`` and insert_one with pymongo's AsyncMongoClient
  and its sync MongoClient directly, each in a subprocess of its own that
  runs the operations itself.

For every row: wall p50/p90 per call; CPU per call of the serving process
(utime+stime from /proc/PID/stat around the timed calls); CPU per call of
the calling process (``time.process_time``); CPU per call of the database
server (/proc/PID/stat of the server process, when this run started it).
For the direct pymongo rows the database is the server, so pymongo's own
CPU is in the client column. A derived block subtracts rows from one another
to attribute the broker's CPU per call to gRPC, pymongo and the rest.

Figures are from one machine and one run; nothing asserts them. See
docs/BENCHMARKS.md ("The layer table") for what each column means.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
import grpc
import pymongo
from broker_client import BrokerClient
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc

from bench.stubs import proc_cpu_s
from harness.brokerproc import BrokerProcess, broker_config
from harness.dbserver import DatabaseServer, ProcessServer, database_server
from harness.process import spawn_logged, terminate

log = logging.getLogger("bench.latency")

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("wall_p50_ms", "wall_p90_ms", "server_cpu_us", "client_cpu_us", "db_cpu_us")
NOTE = (
    "Figures from one machine and one run, not asserted anywhere. CPU is read from "
    "/proc/PID/stat in clock ticks (1/{tck} s): per call it is the total over all timed calls "
    "divided by their number, so its resolution is 1/{tck} s over that total."
)
DIRECT_SERVER_REASON = "the database is the server here: pymongo's own CPU is in the client column"


@dataclass(frozen=True)
class Settings:
    calls: int
    warmup: int
    repeats: int
    idle_s: float


# --- measuring ---------------------------------------------------------------


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _cpu_or_none(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return proc_cpu_s(pid)
    except OSError:
        return None


def _split(calls: int, concurrency: int) -> list[int]:
    return [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]


def _run_calls(call: Callable[[], Any], calls: int, concurrency: int, samples: list[float]) -> None:
    def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1000)

    if concurrency == 1:
        worker(calls)
        return
    threads = [threading.Thread(target=worker, args=(n,)) for n in _split(calls, concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _rounds_of_calls(
    call: Callable[[], Any],
    settings: Settings,
    concurrency: int,
    server_pid: int | None,
    db_pid: int | None,
) -> list[dict[str, Any]]:
    """Warm up, then ``repeats`` rounds of ``calls`` calls; per round the samples and CPU deltas."""
    _run_calls(call, settings.warmup, concurrency, [])
    rounds = []
    for _ in range(settings.repeats):
        samples: list[float] = []
        server0, db0 = _cpu_or_none(server_pid), _cpu_or_none(db_pid)
        client0 = time.process_time()
        _run_calls(call, settings.calls, concurrency, samples)
        client = time.process_time() - client0
        server1, db1 = _cpu_or_none(server_pid), _cpu_or_none(db_pid)
        rounds.append(
            {
                "wall_ms": samples,
                "cpu_s": client,
                "server_cpu_s": None if server0 is None or server1 is None else server1 - server0,
                "db_cpu_s": None if db0 is None or db1 is None else db1 - db0,
            }
        )
    return rounds


def _per_call_us(rounds: list[dict[str, Any]], key: str) -> tuple[float | None, list[float]]:
    """Total over the rounds ÷ total calls (µs), and each round's own figure."""
    if not rounds or any(r.get(key) is None for r in rounds):
        return None, []
    calls = sum(len(r["wall_ms"]) for r in rounds)
    total = sum(r[key] for r in rounds)
    return total / calls * 1e6, [r[key] / len(r["wall_ms"]) * 1e6 for r in rounds]


def make_row(
    key: str,
    label: str,
    rounds: list[dict[str, Any]],
    reasons: dict[str, str],
    client_note: str = "",
) -> dict[str, Any]:
    samples = [s for r in rounds for s in r["wall_ms"]]
    row: dict[str, Any] = {"key": key, "label": label, "calls": len(samples), "reasons": dict(reasons)}
    if samples:
        row["wall_p50_ms"] = _pct(samples, 0.5)
        row["wall_p90_ms"] = _pct(samples, 0.9)
        row["wall_p50_ms_rounds"] = [statistics.median(r["wall_ms"]) for r in rounds]
    else:
        row["wall_p50_ms"] = row["wall_p90_ms"] = None
        reason = reasons.get("row", "no calls were timed")
        row["reasons"].setdefault("wall_p50_ms", reason)
        row["reasons"].setdefault("wall_p90_ms", reason)
    for field, source in (
        ("server_cpu_us", "server_cpu_s"),
        ("client_cpu_us", "cpu_s"),
        ("db_cpu_us", "db_cpu_s"),
    ):
        value, per_round = _per_call_us(rounds, source)
        row[field] = value
        row[f"{field}_rounds"] = per_round
        if value is None:
            row["reasons"].setdefault(field, reasons.get("row", "not read"))
    if client_note:
        row["client_note"] = client_note
    return row


def failed_row(key: str, label: str, reason: str) -> dict[str, Any]:
    return make_row(key, label, [], {"row": reason})


# --- the processes -------------------------------------------------------------


@contextmanager
def stub_server(kind: str, workdir: Path) -> Iterator[tuple[int, str]]:
    """A ``bench.stubs`` gRPC Ping server; yields its pid and gRPC target."""
    sock = workdir / f"stub-{kind}.sock"
    log_path = workdir / f"stub-{kind}.log"
    proc = spawn_logged(
        [sys.executable, "-m", "bench.stubs", "serve", kind, "--unix", str(sock)],
        log_path,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    target = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{kind} stub did not start: {log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.02)
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        yield proc.pid, target
    finally:
        terminate(proc, grace=5.0, name=f"{kind} stub")


def _db_pid(db: DatabaseServer) -> tuple[int | None, str]:
    if isinstance(db, ProcessServer) and db.pid is not None:
        return db.pid, ""
    return None, (
        f"the database server ({db.kind}) was not started by this run, so its process cannot be read"
    )


def _direct_rounds(
    kind: str,
    op: str,
    *,
    uri: str,
    oid: bson.ObjectId,
    settings: Settings,
    concurrency: int,
    db_pid: int | None,
) -> list[dict[str, Any]]:
    argv = [
        sys.executable,
        "-m",
        "bench.stubs",
        "direct",
        kind,
        "--uri",
        uri,
        "--op",
        op,
        "--oid",
        str(oid),
        "--calls",
        str(settings.calls),
        "--warmup",
        str(settings.warmup),
        "--repeats",
        str(settings.repeats),
        "--concurrency",
        str(concurrency),
    ]
    if db_pid is not None:
        argv += ["--db-pid", str(db_pid)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.stubs direct {kind} {op} exited {done.returncode}: {done.stderr[-1500:]}")
    rounds: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])["rounds"]
    # The subprocess reports its own CPU as cpu_s: it goes in the client column.
    for r in rounds:
        r["server_cpu_s"] = None
    return rounds


def _idle(pids: dict[str, int | None], seconds: float) -> dict[str, float | None]:
    """CPU of each process over ``seconds`` of nothing, in ms per second."""
    before = {name: _cpu_or_none(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    out: dict[str, float | None] = {}
    for name, pid in pids.items():
        after = _cpu_or_none(pid)
        b = before[name]
        out[name] = None if b is None or after is None else (after - b) / seconds * 1000
    return out


# --- the run -------------------------------------------------------------------


def _grpc_row(
    *,
    key: str,
    label: str,
    target: str,
    invoke: Callable[[broker_pb2_grpc.BrokerStub], Any],
    settings: Settings,
    concurrency: int,
    server_pid: int,
    db_pid: int | None,
    db_reason: str,
    no_db: bool = False,
) -> dict[str, Any]:
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        rounds = _rounds_of_calls(lambda: invoke(stub), settings, concurrency, server_pid, db_pid)
    reasons = {"db_cpu_us": db_reason} if db_reason else {}
    row = make_row(key, label, rounds, reasons)
    if no_db:
        row["db_note"] = "no database call: what the database server did meanwhile is background"
    return row


def _client_rows(
    broker: BrokerProcess,
    filter_bson: bytes,
    *,
    settings: Settings,
    concurrency: int,
    db_pid: int | None,
    db_reason: str,
) -> list[dict[str, Any]]:
    """find_one and insert_one through the bundled Python client (``broker_client``)."""
    rows = []
    reasons = {"db_cpu_us": db_reason} if db_reason else {}
    query = bson.decode(filter_bson)
    with BrokerClient(broker.unix_target) as client:
        items = client["appdb"]["latency"]
        for key, label, call in (
            ("client_find_one", "broker_client find_one by _id", lambda: items.find_one(query)),
            ("client_insert_one", "broker_client insert_one", lambda: items.insert_one({"a": 1})),
        ):
            try:
                rounds = _rounds_of_calls(call, settings, concurrency, broker.pid, db_pid)
            except Exception as exc:  # any client error: the row says so instead of the run failing
                rows.append(failed_row(key, label, f"the call failed: {type(exc).__name__}"))
                continue
            rows.append(make_row(key, label, rounds, reasons))
    return rows


def run(settings: Settings, concurrencies: list[int]) -> dict[str, Any]:
    tables: list[dict[str, Any]] = []
    with (
        database_server() as db,
        tempfile.TemporaryDirectory(prefix="mb-lat-") as tmp,
    ):
        workdir = Path(tmp)
        db_pid, db_reason = _db_pid(db)
        config = broker_config(db_uri=db.uri, socket_path=workdir / "broker.sock")
        with (
            BrokerProcess(config, workdir=workdir).start() as broker,
            stub_server("aio", workdir) as (aio_pid, aio_target),
            stub_server("sync", workdir) as (sync_pid, sync_target),
        ):
            oid = bson.ObjectId()
            with grpc.insecure_channel(broker.unix_target) as channel:
                broker_pb2_grpc.BrokerStub(channel).Insert(
                    broker_pb2.InsertRequest(
                        database="appdb", collection="latency", documents=[bson.encode({"_id": oid, "a": 1})]
                    ),
                    timeout=10,
                )
            idle = _idle(
                {"broker": broker.pid, "aio_stub": aio_pid, "sync_stub": sync_pid, "database": db_pid},
                settings.idle_s,
            )
            by_id = broker_pb2.FindRequest(
                database="appdb", collection="latency", filter=bson.encode({"_id": oid})
            )
            one_doc = broker_pb2.InsertRequest(
                database="appdb", collection="latency", documents=[bson.encode({"a": 1})]
            )
            ping_stub = broker_pb2.PingRequest(database="appdb")
            for concurrency in concurrencies:
                rows: list[dict[str, Any]] = []
                grpc_rows: list[tuple[str, str, str, Callable[[Any], Any], int, bool]] = [
                    (
                        "stub_aio_ping",
                        "grpc.aio stub Ping (no database)",
                        aio_target,
                        lambda s: s.Ping(ping_stub, timeout=10),
                        aio_pid,
                        True,
                    ),
                    (
                        "stub_sync_ping",
                        "sync gRPC stub Ping (no database)",
                        sync_target,
                        lambda s: s.Ping(ping_stub, timeout=10),
                        sync_pid,
                        True,
                    ),
                    (
                        "broker_ping",
                        "broker Ping appdb",
                        broker.unix_target,
                        lambda s: s.Ping(ping_stub, timeout=10),
                        broker.pid,
                        False,
                    ),
                    (
                        "broker_find_one",
                        "broker FindOne by _id",
                        broker.unix_target,
                        lambda s: s.FindOne(by_id, timeout=10),
                        broker.pid,
                        False,
                    ),
                    (
                        "broker_insert",
                        "broker Insert one document",
                        broker.unix_target,
                        lambda s: s.Insert(one_doc, timeout=10),
                        broker.pid,
                        False,
                    ),
                ]
                for key, label, target, invoke, pid, no_db in grpc_rows:
                    try:
                        rows.append(
                            _grpc_row(
                                key=key,
                                label=label,
                                target=target,
                                invoke=invoke,
                                settings=settings,
                                concurrency=concurrency,
                                server_pid=pid,
                                db_pid=db_pid,
                                db_reason=db_reason,
                                no_db=no_db,
                            )
                        )
                    except grpc.RpcError as exc:
                        rows.append(failed_row(key, label, f"the call failed: {exc.code().name}"))
                rows += _client_rows(
                    broker,
                    by_id.filter,
                    settings=settings,
                    concurrency=concurrency,
                    db_pid=db_pid,
                    db_reason=db_reason,
                )
                for kind, client_name in (("async", "AsyncMongoClient"), ("sync", "MongoClient")):
                    for op in ("ping", "find_one", "insert_one"):
                        key, label = f"{kind}_{op}", f"{client_name} {op} (direct)"
                        try:
                            rounds = _direct_rounds(
                                kind,
                                op,
                                uri=db.uri,
                                oid=oid,
                                settings=settings,
                                concurrency=concurrency,
                                db_pid=db_pid,
                            )
                        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                            rows.append(failed_row(key, label, f"not measured: {exc}"))
                            continue
                        reasons = {"server_cpu_us": DIRECT_SERVER_REASON}
                        if db_reason:
                            reasons["db_cpu_us"] = db_reason
                        rows.append(
                            make_row(key, label, rounds, reasons, client_note="the pymongo process itself")
                        )
                tables.append({"concurrency": concurrency, "rows": rows, "derived": derive(rows)})
    return {
        "note": NOTE.format(tck=os.sysconf("SC_CLK_TCK")),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "pymongo": pymongo.__version__,
            "database": db.kind,
            "loadavg_at_start": list(os.getloadavg()),
        },
        "settings": {
            "calls": settings.calls,
            "warmup": settings.warmup,
            "repeats": settings.repeats,
        },
        "idle_cpu_ms_per_s": idle,
        "tables": tables,
    }


# --- attribution -----------------------------------------------------------------

# (row key, column) pairs: a row's serving-process CPU, or for the direct
# pymongo rows the pymongo process's own (the client column).
_CPU = {
    "stub_aio_ping": "server_cpu_us",
    "stub_sync_ping": "server_cpu_us",
    "broker_ping": "server_cpu_us",
    "broker_find_one": "server_cpu_us",
    "broker_insert": "server_cpu_us",
    "client_find_one": "server_cpu_us",
    "client_insert_one": "server_cpu_us",
    "async_ping": "client_cpu_us",
    "async_find_one": "client_cpu_us",
    "async_insert_one": "client_cpu_us",
    "sync_ping": "client_cpu_us",
    "sync_find_one": "client_cpu_us",
    "sync_insert_one": "client_cpu_us",
}

DERIVED: list[tuple[str, list[tuple[int, str]]]] = [
    (
        "broker Ping - aio stub Ping: a database ping through pymongo + our code",
        [(1, "broker_ping"), (-1, "stub_aio_ping")],
    ),
    ("broker Ping - AsyncMongoClient ping: gRPC + our code", [(1, "broker_ping"), (-1, "async_ping")]),
    ("broker FindOne - aio stub Ping: pymongo + our code", [(1, "broker_find_one"), (-1, "stub_aio_ping")]),
    (
        "broker FindOne - AsyncMongoClient find_one: gRPC + our code",
        [(1, "broker_find_one"), (-1, "async_find_one")],
    ),
    (
        "broker FindOne - AsyncMongoClient find_one - aio stub Ping: our code (+ a bigger message)",
        [(1, "broker_find_one"), (-1, "async_find_one"), (-1, "stub_aio_ping")],
    ),
    ("broker Insert - aio stub Ping: pymongo + our code", [(1, "broker_insert"), (-1, "stub_aio_ping")]),
    (
        "broker Insert - AsyncMongoClient insert_one: gRPC + our code",
        [(1, "broker_insert"), (-1, "async_insert_one")],
    ),
    (
        "broker Insert - AsyncMongoClient insert_one - aio stub Ping: our code (+ a bigger message)",
        [(1, "broker_insert"), (-1, "async_insert_one"), (-1, "stub_aio_ping")],
    ),
    (
        "broker_client find_one - raw FindOne, calling process: the Python client's own cost",
        [(1, "client_find_one:client_cpu_us"), (-1, "broker_find_one:client_cpu_us")],
    ),
    (
        "broker_client insert_one - raw Insert, calling process: the Python client's own cost",
        [(1, "client_insert_one:client_cpu_us"), (-1, "broker_insert:client_cpu_us")],
    ),
    (
        "aio stub Ping - sync stub Ping: grpc.aio server over the sync one",
        [(1, "stub_aio_ping"), (-1, "stub_sync_ping")],
    ),
    (
        "AsyncMongoClient find_one - MongoClient find_one: asyncio pymongo over sync",
        [(1, "async_find_one"), (-1, "sync_find_one")],
    ),
    (
        "AsyncMongoClient insert_one - MongoClient insert_one: asyncio pymongo over sync",
        [(1, "async_insert_one"), (-1, "sync_insert_one")],
    ),
]

# Each broker call split three ways: (broker row, direct pymongo row).
SHARES = [("FindOne", "broker_find_one", "async_find_one"), ("Insert", "broker_insert", "async_insert_one")]


def derive(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_key = {r["key"]: r for r in rows}

    def cpu(term: str) -> float | None:
        """A row's CPU per call: ``key`` (its column in _CPU) or ``key:column``."""
        key, _, column = term.partition(":")
        row = by_key.get(key)
        return None if row is None else row.get(column or _CPU[key])

    differences = []
    for label, terms in DERIVED:
        values = [cpu(key) for _, key in terms]
        entry: dict[str, Any] = {"label": label, "terms": [f"{'+' if s > 0 else '-'}{k}" for s, k in terms]}
        if any(v is None for v in values):
            entry["cpu_us"] = None
            entry["reason"] = "a term was not measured: " + ", ".join(
                k for (_, k), v in zip(terms, values, strict=True) if v is None
            )
        else:
            entry["cpu_us"] = sum(s * v for (s, _), v in zip(terms, values, strict=True) if v is not None)
        differences.append(entry)
    shares = []
    for name, broker_key, direct_key in SHARES:
        total, grpc_part, pymongo_part = cpu(broker_key), cpu("stub_aio_ping"), cpu(direct_key)
        if total is None or grpc_part is None or pymongo_part is None or total <= 0:
            shares.append({"call": name, "reason": "a term was not measured"})
            continue
        rest = total - grpc_part - pymongo_part
        share: dict[str, Any] = {
            "call": name,
            "broker_cpu_us": total,
            "grpc_us": grpc_part,
            "pymongo_async_us": pymongo_part,
            "rest_us": rest,
            "grpc_pct": grpc_part / total * 100,
            "pymongo_async_pct": pymongo_part / total * 100,
            "rest_pct": rest / total * 100,
        }
        shares.append(share)
    return {"differences": differences, "shares": shares}


# --- output ----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def _cpu_cell(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    cell = _fmt(value)
    rounds = row.get(f"{field}_rounds") or []
    if value is not None and len(rounds) > 1:
        cell += f" ({_fmt(min(rounds))}..{_fmt(max(rounds))})"
    return cell


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    m = result["machine"]
    out = [
        "# Layer table",
        "",
        f"{result['note']}",
        "",
        f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}, grpcio {m['grpc']}, "
        f"pymongo {m['pymongo']}, database: {m['database']}; load average at start "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])
        + f". {s['repeats']} round(s) of {s['calls']} calls per row after {s['warmup']} warm-up calls; "
        "CPU cells show the figure over all rounds and, with several, the range of the rounds'.",
        "",
        "Idle CPU (ms per s, nothing called): "
        + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in result["idle_cpu_ms_per_s"].items()),
    ]
    for table in result["tables"]:
        out += [
            "",
            f"## Concurrency {table['concurrency']}",
            "",
            "| layer | calls | wall p50 ms | wall p90 ms | serving process CPU µs/call "
            "| client CPU µs/call | database CPU µs/call |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        notes: dict[str, list[str]] = {}
        for row in table["rows"]:
            out.append(
                f"| {row['label']} | {row['calls']} "
                f"| {_fmt(row['wall_p50_ms'], 2)} | {_fmt(row['wall_p90_ms'], 2)} "
                f"| {_cpu_cell(row, 'server_cpu_us')} | {_cpu_cell(row, 'client_cpu_us')} "
                f"| {_cpu_cell(row, 'db_cpu_us')} |"
            )
            for field, reason in row["reasons"].items():
                if field != "row" and row.get(field) is None:
                    notes.setdefault(reason, []).append(f"{row['label']} ({field})")
        if notes:
            out += ["", "Blank cells (—):", ""]
            out += [f"- {', '.join(cells)}: {reason}" for reason, cells in notes.items()]
        out += [
            "",
            "For the direct pymongo rows the client column is the pymongo process's own CPU "
            "(the database is their server). The stub rows' database column is background: "
            "no database call is made.",
            "",
            "### Derived (CPU µs per call: the serving process, or the pymongo process for pymongo rows)",
            "",
            "| difference | µs/call |",
            "|---|---:|",
        ]
        for entry in table["derived"]["differences"]:
            value = _fmt(entry["cpu_us"]) if entry["cpu_us"] is not None else f"— ({entry['reason']})"
            out.append(f"| {entry['label']} | {value} |")
        out += [
            "",
            "Broker CPU per call split as: gRPC (the grpc.aio stub's Ping), asyncio pymongo "
            "(AsyncMongoClient doing the same operation), and the rest (our code, message sizes, "
            "anything the two stand-ins do not cover):",
            "",
            "| call | broker µs | gRPC | AsyncMongoClient | rest |",
            "|---|---:|---:|---:|---:|",
        ]
        for share in table["derived"]["shares"]:
            if "reason" in share:
                out.append(f"| {share['call']} | — ({share['reason']}) | | | |")
                continue
            out.append(
                f"| {share['call']} | {_fmt(share['broker_cpu_us'])} "
                f"| {_fmt(share['grpc_us'])} ({share['grpc_pct']:.0f}%) "
                f"| {_fmt(share['pymongo_async_us'])} ({share['pymongo_async_pct']:.0f}%) "
                f"| {_fmt(share['rest_us'])} ({share['rest_pct']:.0f}%) |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=400, help="timed calls per round and row")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls before a row's rounds")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="also measure with C client threads (C > 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--smoke", action="store_true", help="a few calls per row; the numbers mean nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        settings = Settings(calls=20, warmup=5, repeats=1, idle_s=0.2)
    else:
        settings = Settings(calls=args.calls, warmup=args.warmup, repeats=args.repeats, idle_s=1.0)
    concurrencies = [1] if args.concurrency <= 1 else [1, args.concurrency]
    result = run(settings, concurrencies)
    text = markdown(result)
    sys.stdout.write(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
