"""The demo (`make run`): hundreds of short-lived workers through one broker.

1. Obtain a MongoDB-compatible server (harness/dbserver.py: MONGODB_URI, a
   mongod on PATH, Docker's mongo:7, or FerretDB built by `make tools`).
2. Start the broker in front of it on a Unix socket (harness/brokerproc.py).
3. Run N short-lived worker processes, at most C alive at once, each a fresh
   interpreter that inserts and reads back K documents through the broker.
4. Run the same workers again, each with its own MongoClient straight to the
   database, as they would without a broker (``--no-compare`` skips this).

It prints the per-operation latencies the workers measured and how many
database connections were open at once (sampled every 20 ms) and opened in
all, with and without the broker. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pymongo import MongoClient

from bench.modes import BROKER_UDS, PER_PROCESS, percentile
from harness.brokerproc import BrokerProcess, BrokerStartError, broker_config
from harness.dbserver import KINDS, DatabaseServer, DatabaseServerError, database_server
from harness.fleet import FleetResult, run_fleet, worker_command
from harness.netconns import ConnectionSampler, Endpoint, connections_from_pid, connections_to_port
from harness.process import short_tmpdir

logger = logging.getLogger(__name__)

DB_NAME = "appdb"
MONGO_DB = "broker_demo"


@dataclass
class Phase:
    """One run of the workers and what was measured around it."""

    label: str
    fleet: FleetResult
    peak_connections: int
    connections_seen: int
    connections_opened: int | None  # exact count, where the workers report it
    documents: int


def _run_phase(
    label: str,
    specs: list[dict[str, Any]],
    concurrency: int,
    probe: Callable[[], set[Endpoint]],
    count_documents: Callable[[], int],
) -> Phase:
    print(f"  {label}: {len(specs)} workers ...", end="", flush=True)
    with ConnectionSampler(probe, interval=0.02) as sampler:
        fleet = run_fleet((worker_command(s) for s in specs), concurrency, timeout_per_worker=60)
    print(f" done in {fleet.elapsed_s:.1f} s", flush=True)
    for failure in fleet.failed[:3]:
        print(f"    FAILED {failure.describe()}", flush=True)
    opened = None
    if specs and specs[0]["mode"] == PER_PROCESS:
        opened = sum(int(r.get("connects", 0)) for r in fleet.reports)
    return Phase(
        label=label,
        fleet=fleet,
        peak_connections=sampler.peak,
        connections_seen=len(sampler.distinct),
        connections_opened=opened,
        documents=count_documents(),
    )


def _fmt_pct(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}"


def _first_inserts(phase: Phase) -> list[float]:
    """Each worker's first insert: it pays for connecting (channel, or TCP + handshake)."""
    return [r["insert_ms"][0] for r in phase.fleet.reports if r.get("insert_ms")]


def _later_inserts(phase: Phase) -> list[float]:
    return [v for r in phase.fleet.reports for v in r.get("insert_ms", [])[1:]]


def _report(phases: list[Phase], workers: int, ops: int, concurrency: int) -> None:
    rows: list[tuple[str, list[str]]] = [
        ("workers ok", [f"{len(p.fleet.reports)}/{workers}" for p in phases]),
        ("operations (insert + find)", [str(2 * ops * len(p.fleet.reports)) for p in phases]),
        ("documents stored", [str(p.documents) for p in phases]),
        ("first insert p50 / p99 (ms)", [_fmt_pct(_first_inserts(p)) for p in phases]),
        ("later inserts p50 / p99 (ms)", [_fmt_pct(_later_inserts(p)) for p in phases]),
        ("finds p50 / p99 (ms)", [_fmt_pct(p.fleet.latencies("find_ms")) for p in phases]),
        ("peak DB connections at once", [str(p.peak_connections) for p in phases]),
        (
            "DB connections opened",
            [
                str(p.connections_opened)
                if p.connections_opened is not None
                else f"{p.connections_seen} (seen)"
                for p in phases
            ],
        ),
        ("wall time (s)", [f"{p.fleet.elapsed_s:.1f}" for p in phases]),
    ]
    width = max(len(name) for name, _ in rows) + 2
    columns = [max(len(p.label), *(len(v[i]) for _, v in rows)) + 3 for i, p in enumerate(phases)]
    print()
    print(" " * width + "".join(p.label.rjust(c) for p, c in zip(phases, columns, strict=True)))
    for name, values in rows:
        print(name.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, columns, strict=True)))
    note = (
        f"Latencies are measured inside the workers, {concurrency} interpreters at once on "
        f"{os.cpu_count()} CPUs. A first insert includes connecting: a gRPC channel to the "
        "broker, or TCP connections and a handshake to the database. Peaks are sampled "
        'every 20 ms; "opened" counts every connect() a worker made to the database port.'
    )
    print()
    print(textwrap.fill(note, width=88))
    print()


def _check(phases: list[Phase], workers: int, ops: int) -> bool:
    ok = True
    for phase in phases:
        if phase.fleet.failed:
            print(f"{phase.label}: {len(phase.fleet.failed)} workers failed")
            ok = False
        if phase.documents != workers * ops:
            print(f"{phase.label}: expected {workers * ops} documents, found {phase.documents}")
            ok = False
    return ok


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``with`` below cleans up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    print("mongo-broker demo: many short-lived workers, one bounded pool")
    with database_server(args.server) as server:
        print(f"  database: {server.kind} at {server.address} ({server.reason})")
        workdir = short_tmpdir("mb-demo-")
        config = broker_config(
            db_uri=server.uri,
            socket_path=workdir / "broker.sock",
            tcp=None,
            db_name=DB_NAME,
            mongo_db=MONGO_DB,
            max_pool_size=args.max_pool_size,
        )
        try:
            with (
                BrokerProcess(config, workdir=workdir) as broker,
                MongoClient[dict[str, Any]](server.uri, appname="mongo-broker-demo") as direct,
            ):
                broker.start()
                return _run_phases(args, server, broker, direct)
        finally:
            if args.keep:
                print(f"  kept the broker's config and log in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _print_broker_stats(broker: BrokerProcess) -> None:
    """What `mongo-broker stats` shows for the demo's broker after the run."""
    stats = subprocess.run(
        [sys.executable, "-m", "broker", "stats", "--target", broker.unix_target],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    print("mongo-broker stats, after the run:")
    print(textwrap.indent(stats.stdout.rstrip() or stats.stderr.rstrip(), "  "))
    print()


def _run_phases(
    args: argparse.Namespace,
    server: DatabaseServer,
    broker: BrokerProcess,
    direct: MongoClient[dict[str, Any]],
) -> int:
    workers, concurrency, ops = args.workers, args.concurrency, args.ops
    print(
        f"  broker:   {broker.version}, pid {broker.pid}, {broker.unix_target}, "
        f"max_pool_size {args.max_pool_size}"
    )
    print(
        f"  workload: {workers} worker processes, at most {concurrency} alive at once, "
        f"{ops} x (insert + find) each, then {args.hold_ms} ms of other work"
    )
    run_id = uuid.uuid4().hex[:8]
    via_broker = f"via_broker_{run_id}"
    own_client = f"own_client_{run_id}"
    database = direct[MONGO_DB]

    def phase(label: str, probe: Callable[[], set[Endpoint]], collection: str, **target: Any) -> Phase:
        # insert + find per round: 2 x ops operations
        common = {"ops": 2 * ops, "hold_ms": args.hold_ms, "db_port": server.port, "collection": collection}
        specs = [{**common, **target, "worker": i} for i in range(workers)]
        return _run_phase(label, specs, concurrency, probe, lambda: database[collection].count_documents({}))

    phases = [
        phase(
            "through the broker",
            lambda: connections_from_pid(broker.pid, server.port),
            via_broker,
            mode=BROKER_UDS,
            target=broker.unix_target,
            database=DB_NAME,
        )
    ]
    if args.compare:
        me = os.getpid()
        phases.append(
            phase(
                "own MongoClient each",
                # Everyone's connections to the database but the broker's
                # (idle now) and this process's own client.
                lambda: connections_to_port(server.port, (broker.pid, me)),
                own_client,
                mode=PER_PROCESS,
                uri=server.uri,
                database=MONGO_DB,
            )
        )
    for name in (via_broker, own_client):
        database.drop_collection(name)

    _report(phases, workers, ops, concurrency)
    _print_broker_stats(broker)
    ok = _check(phases, workers, ops)
    via = phases[0]
    summary = (
        f"{workers} worker processes ran {2 * ops * len(via.fleet.reports)} operations "
        f"through the broker, which held at most {via.peak_connections} database connections"
    )
    if len(phases) > 1:
        own = phases[1]
        summary += (
            f"; on their own, the same workers held up to {own.peak_connections} at once "
            f"and opened {own.connections_opened} in all"
        )
    print(textwrap.fill(summary + ".", width=88))
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=300, help="worker processes to run")
    parser.add_argument("--concurrency", type=int, default=20, help="worker processes alive at once")
    parser.add_argument("--ops", type=int, default=5, help="insert + find rounds per worker")
    parser.add_argument(
        "--hold-ms",
        type=int,
        default=300,
        help="how long each worker keeps its client open after its operations, as a job does while it works",
    )
    parser.add_argument("--max-pool-size", type=int, default=10, help="the broker's pool bound")
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the workers with their own MongoClient each",
    )
    parser.add_argument(
        "--server",
        choices=["auto", *KINDS],
        default=os.environ.get("DBSERVER_KIND", "auto"),
        help="database server: auto is MONGODB_URI, else mongod on PATH, else Docker, "
        "else FerretDB (env DBSERVER_KIND)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the broker's config and log afterwards")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    args = parser.parse_args(argv)
    for name in ("workers", "concurrency", "max_pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ops < 0 or args.hold_ms < 0:
        parser.error("--ops and --hold-ms must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.server == "auto":
        args.server = None
    started = time.monotonic()
    try:
        with _sigterm_as_interrupt():
            code = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopped every worker, the broker and the database server")
        return 130
    except DatabaseServerError as exc:
        print(f"no database server: {exc}", file=sys.stderr)
        return 2
    except BrokerStartError as exc:
        print(f"the broker did not start: {exc}", file=sys.stderr)
        return 2
    print(f"demo finished in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
