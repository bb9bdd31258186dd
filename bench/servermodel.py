"""Decide the broker's server model by measurement: grpc.aio against sync, one process against several.

    python -m bench.servermodel                    # about 5 minutes; writes bench/results/SERVER_MODEL.md
    python -m bench.servermodel --seconds 1 --repeats 1   # a quick look: the numbers mean little

Two questions, one run, one database server (``MONGODB_URI`` when set, else
what harness/dbserver.py finds, as ``make bench`` does):

1. Framework cost. A stub ``broker.v1.Broker`` whose Ping returns a constant
   ``PingResponse(version="x")``, served (a) by ``grpc.aio`` and (b) by the
   sync ``grpc.server`` on a thread pool, each in its own process on a Unix
   socket. No database and no broker code: what is left is gRPC's and
   Python's own cost per call under each model.
2. One process against several. The real broker (harness/brokerproc.py) as one
   process with ``max_pool_size`` P, and as N processes with P/N each, so the
   total pool, and with it the database's connection count, stays bounded.
   The broker sets ``grpc.so_reuseport=0``, so each process has its own Unix
   socket and ghz's concurrency is split evenly across them (one ghz per
   socket, run in parallel; their rates are summed and their per-call
   latencies merged before the percentiles are taken).

Load comes from ghz, the same binary and proto as the ghz workload in
bench/workloads.py. Every ghz connection stands for one worker process, so
``--connections`` equals ``--concurrency``. The models alternate within each
repeat, in turned order, so that a drift in the machine's load falls on both.

The stub server is this module too: ``python -m bench.servermodel --serve
aio|sync --socket PATH --ready-file PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import bson
import grpc
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc

from bench import workloads
from bench.bench import _server_info, int_list, machine_facts, name_list, software_versions
from harness.brokerproc import REPO, BrokerProcess
from harness.dbserver import KINDS, DatabaseServerError, database_server
from harness.netconns import ConnectionSampler, Endpoint
from harness.process import short_tmpdir, spawn_logged, terminate, wait_until

logger = logging.getLogger(__name__)

RESULTS = REPO / "bench" / "results"
REPORT_NAME = "SERVER_MODEL.md"
MODELS = ("aio", "sync")
CALLS = ("Insert", "Find")
# Inserts go to their own collection, so the seeded one that Find reads stays as it is.
INSERT_COLLECTION = "servermodel"
PAD = 200  # the same ~250-byte document as the steady workload's seeds


# --- the stub server (runs in its own process) -----------------------------------------------------

_PONG = broker_pb2.PingResponse(version="x")


# The stubs subclass the generated servicer, whose every other method answers
# UNIMPLEMENTED at run time; only its type stubs mark them abstract. So the
# stubs keep working whatever RPCs the proto gains, and register through the
# generated add_BrokerServicer_to_server, the broker's own handler path.
class _SyncStub(broker_pb2_grpc.BrokerServicer):
    """Ping answers a constant, from a thread of the server's pool."""

    def Ping(self, request: broker_pb2.PingRequest, context: grpc.ServicerContext) -> broker_pb2.PingResponse:
        return _PONG


class _AioStub(broker_pb2_grpc.BrokerServicer):
    """Ping answers a constant from a coroutine, as the broker's handlers are."""

    async def Ping(
        self,
        request: broker_pb2.PingRequest,
        context: grpc.aio.ServicerContext[broker_pb2.PingRequest, broker_pb2.PingResponse],
    ) -> broker_pb2.PingResponse:
        return _PONG


# SO_REUSEPORT off, as the broker has it. The broker's other server options
# (message size caps, keepalive, a cap on concurrent calls) are left out: the
# stubs measure the bare server model, the same for both.
_STUB_OPTIONS = [("grpc.so_reuseport", 0)]


def _write_ready(path: str, socket_path: str) -> None:
    # Renamed into place, so the harness never reads half a file.
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({"pid": os.getpid(), "unix": socket_path}), encoding="utf-8")
    os.replace(tmp, path)


async def _serve_aio(socket_path: str, ready_file: str) -> None:
    server = grpc.aio.server(options=_STUB_OPTIONS)
    # The generated registration, as the broker uses: the same handler lookup path.
    broker_pb2_grpc.add_BrokerServicer_to_server(_AioStub(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    _write_ready(ready_file, socket_path)
    await stop.wait()
    await server.stop(0)


def _serve_sync(socket_path: str, ready_file: str, workers: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=_STUB_OPTIONS)
    broker_pb2_grpc.add_BrokerServicer_to_server(_SyncStub(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signo, _frame: stop.set())
    _write_ready(ready_file, socket_path)
    # A timed wait, so the main thread returns to the interpreter and runs the handler.
    while not stop.wait(0.5):
        pass
    server.stop(0).wait()


def serve_stub(model: str, socket_path: str, ready_file: str, workers: int) -> int:
    if model == "aio":
        asyncio.run(_serve_aio(socket_path, ready_file))
    else:
        _serve_sync(socket_path, ready_file, workers)
    return 0


class StubProcess:
    """One stub server subprocess on a Unix socket in ``workdir``."""

    def __init__(self, model: str, workdir: Path, workers: int, python: str = sys.executable) -> None:
        self.model = model
        self.socket_path = workdir / f"stub-{model}.sock"
        self.ready_path = workdir / f"stub-{model}.ready.json"
        self.log_path = workdir / f"stub-{model}.log"
        self.argv = [
            python,
            "-m",
            "bench.servermodel",
            "--serve",
            model,
            "--socket",
            str(self.socket_path),
            "--ready-file",
            str(self.ready_path),
            "--sync-workers",
            str(workers),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def target(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 30.0) -> None:
        self._proc = spawn_logged(self.argv, self.log_path, cwd=REPO)
        wait_until(
            self._proc,
            self.ready_path.exists,
            timeout=timeout,
            name=f"stub {self.model}",
            log_path=self.log_path,
        )
        logger.info("stub %s pid %d ready on %s", self.model, self._proc.pid, self.socket_path)

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, grace=5.0, name=f"stub-{self.model}")
            self._proc = None


# --- ghz ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One server process that ghz drives: its gRPC target and its pid (for CPU and RSS)."""

    target: str
    pid: int


def insert_request() -> dict[str, Any]:
    """One small document without ``_id``: the broker generates one, so every call inserts anew."""
    document = base64.b64encode(bson.encode({"w": 1, "pad": "s" * PAD})).decode()
    return {"database": workloads.BROKER_DB, "collection": INSERT_COLLECTION, "documents": [document]}


def requests() -> dict[str, dict[str, Any]]:
    """Ping (the stubs), Insert, and the bench's Find of one seeded document by ``_id``."""
    return {**workloads.ghz_requests(), "Insert": insert_request()}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ghz(
    ghz: str, targets: Sequence[Target], call: str, data: dict[str, Any], *, concurrency: int, seconds: float
) -> tuple[list[dict[str, Any]], float]:
    """One ghz per target, in parallel, ``concurrency`` split evenly; return their reports and their CPU s.

    The CPU is the reaped children's rusage: the only children that exit in
    the meantime are these ghz processes (servers and brokers outlive the run).
    """
    share, extra = divmod(concurrency, len(targets))
    if share == 0 or extra:
        raise ValueError(f"concurrency {concurrency} does not split evenly across {len(targets)} processes")
    cpu_before = _children_cpu_s()
    with contextlib.ExitStack() as stack:
        running: list[tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]] = []
        for target in targets:
            # Files, not pipes: each report holds every call and is megabytes long.
            out = stack.enter_context(tempfile.TemporaryFile())
            err = stack.enter_context(tempfile.TemporaryFile())
            # One HTTP/2 connection per concurrent caller, as each worker process has its own channel.
            argv = workloads.ghz_argv(
                ghz, target.target, call, data, concurrency=share, connections=share, seconds=seconds
            )
            running.append(
                (subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err), out, err)
            )
        reports = []
        for proc, stdout, stderr in running:
            try:
                code = proc.wait(timeout=seconds + 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            stdout.seek(0)
            stderr.seek(0)
            text = stdout.read().decode("utf-8", "replace").strip()
            if not text:
                detail = stderr.read().decode("utf-8", "replace")[-2000:]
                raise RuntimeError(f"ghz {call} exited {code} without a report: {detail}")
            reports.append(json.loads(text))
    return reports, _children_cpu_s() - cpu_before


# How ghz v0.121 reports the calls still in flight when --duration ends: it
# closes their connections, so up to C calls per run fail with these
# messages. They say nothing about the server and are counted apart.
_CUT_MESSAGES = ("use of closed network connection", "the client connection is closing")


def _cut_at_end(detail: dict[str, Any]) -> bool:
    error = str(detail.get("error") or "")
    return any(message in error for message in _CUT_MESSAGES)


def _ok_share(report: dict[str, Any]) -> float:
    count = int(report.get("count", 0))
    ok = int((report.get("statusCodeDistribution") or {}).get("OK", 0))
    return ok / count if count else 0.0


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Sample:
    """One measured run of one model at one concurrency."""

    part: str
    model: str
    call: str
    concurrency: int
    repeat: int
    rps: float
    p50_ms: float
    p99_ms: float
    count: int
    errors: int
    cut: int
    server_cpu_s_per_1k: float
    client_cpu_s_per_1k: float
    peak_rss_mb: float
    peak_db_connections: int | None
    loadavg_1m: float
    error_samples: list[str]


def measure(
    ghz: str,
    *,
    part: str,
    model: str,
    targets: Sequence[Target],
    call: str,
    data: dict[str, Any],
    concurrency: int,
    seconds: float,
    repeat: int,
    connections: Callable[[], set[Endpoint]] | None = None,
) -> Sample:
    """Drive ``targets`` with ghz for ``seconds``; the servers' CPU, peak RSS (summed) and DB connections."""
    watches = [workloads.ProcWatch(t.pid) for t in targets]
    sampler = ConnectionSampler(connections, interval=0.05) if connections is not None else None
    with contextlib.ExitStack() as stack:
        for watch in watches:
            stack.enter_context(watch)
        if sampler is not None:
            stack.enter_context(sampler)
        cpu_before = [w.cpu_s() for w in watches]
        reports, client_cpu = run_ghz(ghz, targets, call, data, concurrency=concurrency, seconds=seconds)
        server_cpu = sum(w.cpu_s() - before for w, before in zip(watches, cpu_before, strict=True))
        # A sum of per-process peaks: an upper bound on the peak of the sum.
        peak_rss = sum(w.take_peak_mb() for w in watches)
    details = [d for r in reports for d in r.get("details") or []]
    ok = [d for d in details if d.get("status") == "OK"]
    cut = [d for d in details if d.get("status") != "OK" and _cut_at_end(d)]
    failed = [d for d in details if d.get("status") != "OK" and not _cut_at_end(d)]
    latencies = sorted(d["latency"] / 1e6 for d in ok)
    count = sum(int(r.get("count", 0)) for r in reports)
    calls = max(1, count)
    return Sample(
        part=part,
        model=model,
        call=call,
        concurrency=concurrency,
        repeat=repeat,
        # Answered calls per second: ghz's rps counts the cut ones too.
        rps=sum(float(r.get("rps", 0.0)) * _ok_share(r) for r in reports),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        count=count,
        errors=len(failed),
        cut=len(cut),
        server_cpu_s_per_1k=server_cpu / calls * 1000,
        client_cpu_s_per_1k=client_cpu / calls * 1000,
        peak_rss_mb=peak_rss,
        peak_db_connections=sampler.peak if sampler is not None else None,
        loadavg_1m=os.getloadavg()[0],
        error_samples=sorted({str(d.get("error", ""))[:200] for d in failed})[:3],
    )


def _turned(items: Sequence[str], repeat: int) -> list[str]:
    """``items`` rotated by ``repeat``: each model goes first in turn."""
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


# --- part 1: framework cost --------------------------------------------------------------------------


def run_framework(
    ghz: str,
    workdir: Path,
    *,
    concurrencies: Sequence[int],
    seconds: float,
    repeats: int,
    sync_workers: int,
    progress: Callable[[str], None],
) -> list[Sample]:
    stubs = {model: StubProcess(model, workdir, sync_workers) for model in MODELS}
    ping = requests()["Ping"]
    samples: list[Sample] = []
    try:
        for stub in stubs.values():
            stub.start()
        targets = {model: [Target(stub.target, stub.pid)] for model, stub in stubs.items()}
        # Warm-up, not recorded: the sync pool's threads, first-call allocations.
        for model in MODELS:
            progress(f"framework: warm-up {model}")
            run_ghz(ghz, targets[model], "Ping", ping, concurrency=max(concurrencies), seconds=1.0)
        for repeat in range(repeats):
            for concurrency in concurrencies:
                for model in _turned(MODELS, repeat):
                    progress(f"framework: {model} Ping C={concurrency} {seconds:g} s (repeat {repeat + 1})")
                    samples.append(
                        measure(
                            ghz,
                            part="framework",
                            model=model,
                            targets=targets[model],
                            call="Ping",
                            data=ping,
                            concurrency=concurrency,
                            seconds=seconds,
                            repeat=repeat,
                        )
                    )
    finally:
        for stub in stubs.values():
            stub.stop()
    return samples


# --- part 2: one broker process against several ---------------------------------------------------


def run_processes(
    ghz: str,
    ctx: workloads.Context,
    *,
    processes: int,
    pool: int,
    calls: Sequence[str],
    concurrencies: Sequence[int],
    seconds: float,
    repeats: int,
    progress: Callable[[str], None],
) -> tuple[list[Sample], dict[str, str]]:
    """Return the samples and, per model, one of its brokers' configs as TOML text (for the report)."""
    if pool % processes:
        raise ValueError(f"max_pool_size {pool} does not split evenly across {processes} processes")
    models = {"1 process": (1, pool), f"{processes} processes": (processes, pool // processes)}
    if "Find" in calls:
        workloads.seed_steady(ctx, 1000)
    data = requests()
    samples: list[Sample] = []
    configs: dict[str, str] = {}
    port = ctx.server.port
    with contextlib.ExitStack() as stack:
        brokers: dict[str, list[BrokerProcess]] = {}
        # Every broker is up for the whole part, so the models can alternate;
        # an idle broker costs next to nothing (a sampler wakes once a second).
        for name, (count, each) in models.items():
            sized = replace(ctx, max_pool_size=each)
            brokers[name] = [
                stack.enter_context(sized.broker(f"{name.replace(' ', '-')}-{i}")) for i in range(count)
            ]
            configs[name] = brokers[name][0].config_path.read_text(encoding="utf-8")
        targets = {name: [Target(b.unix_target, b.pid) for b in group] for name, group in brokers.items()}

        def connections_of(name: str) -> Callable[[], set[Endpoint]]:
            # Everything on this host that talks to the database, less this
            # harness and the idle model's brokers (their pools stay open).
            others = [os.getpid(), *(b.pid for n, g in brokers.items() if n != name for b in g)]
            return lambda: workloads.db_connections(port, others)

        for name in models:
            for call in calls:
                progress(f"processes: warm-up {name} {call}")
                run_ghz(ghz, targets[name], call, data[call], concurrency=max(concurrencies), seconds=1.0)
        for repeat in range(repeats):
            for call in calls:
                for concurrency in concurrencies:
                    for name in _turned(list(models), repeat):
                        progress(
                            f"processes: {name} {call} C={concurrency} {seconds:g} s (repeat {repeat + 1})"
                        )
                        samples.append(
                            measure(
                                ghz,
                                part="processes",
                                model=name,
                                targets=targets[name],
                                call=call,
                                data=data[call],
                                concurrency=concurrency,
                                seconds=seconds,
                                repeat=repeat,
                                connections=connections_of(name),
                            )
                        )
    return samples, configs


# --- the report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        clean = [v for v in values if not math.isnan(v)]
        if not clean:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(clean), min(clean), max(clean))

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high

    def show(self, digits: int) -> str:
        if math.isnan(self.median):
            return "n/a"
        if self.low == self.high:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} [{self.low:,.{digits}f}-{self.high:,.{digits}f}]"


def _spread(samples: Sequence[Sample], key: str) -> Spread:
    return Spread.of([float(getattr(s, key)) for s in samples])


def _group(samples: Sequence[Sample], model: str, call: str, concurrency: int) -> list[Sample]:
    return [s for s in samples if s.model == model and s.call == call and s.concurrency == concurrency]


def _table(samples: Sequence[Sample], models: Sequence[str], calls: Sequence[str], part: str) -> list[str]:
    with_db = part == "processes"
    head = ["call", "C", "model", "rps", "p50 ms", "p99 ms", "server CPU s/1k", "ghz CPU s/1k"]
    if with_db:
        head[6] = "broker CPU s/1k"
        head += ["peak RSS MiB", "peak DB conns"]
    head.append("errors")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    concurrencies = sorted({s.concurrency for s in samples})
    for call in calls:
        for concurrency in concurrencies:
            for model in models:
                group = _group(samples, model, call, concurrency)
                if not group:
                    continue
                row = [
                    call,
                    str(concurrency),
                    model,
                    _spread(group, "rps").show(0),
                    _spread(group, "p50_ms").show(2),
                    _spread(group, "p99_ms").show(2),
                    _spread(group, "server_cpu_s_per_1k").show(3),
                    _spread(group, "client_cpu_s_per_1k").show(3),
                ]
                if with_db:
                    row.append(_spread(group, "peak_rss_mb").show(1))
                    conns = [float(s.peak_db_connections) for s in group if s.peak_db_connections is not None]
                    row.append(Spread.of(conns).show(0))
                row.append(str(sum(s.errors for s in group)))
                lines.append("| " + " | ".join(row) + " |")
    return lines


# Two medians closer than this are called equal whatever their ranges.
NOISE_FRACTION = 0.05


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int
    higher_is_better: bool


RPS = Metric("rps", "throughput", "rps", 0, True)
CPU = Metric("server_cpu_s_per_1k", "CPU per 1k calls", "s", 3, False)
P99 = Metric("p99_ms", "p99", "ms", 2, False)
RSS = Metric("peak_rss_mb", "peak RSS", "MiB", 0, False)


@dataclass(frozen=True)
class Verdict:
    """Model ``a`` against ``b`` on one metric, over the repeats."""

    metric: Metric
    a_name: str
    b_name: str
    a: Spread
    b: Spread
    # The models ran back to back within each repeat: per repeat, which was better.
    paired_a: int
    paired_b: int

    @property
    def beyond_noise(self) -> bool:
        low, high = sorted((self.a.median, self.b.median))
        return not self.a.overlaps(self.b) and high > 0 and (high - low) / high >= NOISE_FRACTION

    @property
    def ahead(self) -> str | None:
        """The model whose median is better, noise or not."""
        if math.isnan(self.a.median) or math.isnan(self.b.median) or self.a.median == self.b.median:
            return None
        a_higher = self.a.median > self.b.median
        return self.a_name if a_higher == self.metric.higher_is_better else self.b_name

    @property
    def better(self) -> str | None:
        """The model that is better beyond noise, or None."""
        return self.ahead if self.beyond_noise else None

    @property
    def margin(self) -> str:
        """How much better the median of the better one is: ``+30%`` more, or ``20% less``."""
        low, high = sorted((self.a.median, self.b.median))
        if self.metric.higher_is_better:
            return f"+{(high / low - 1) * 100:.0f}%" if low else "n/a"
        return f"{(1 - low / high) * 100:.0f}% less" if high else "n/a"

    @property
    def paired(self) -> str:
        leader = self.ahead
        if leader is None:
            return "no paired lead"
        wins = self.paired_a if leader == self.a_name else self.paired_b
        return f"ahead in {wins} of {self.paired_a + self.paired_b} paired repeats"

    def text(self) -> str:
        m = self.metric
        figures = (
            f"{m.label} {self.a_name} {self.a.median:,.{m.digits}f} against "
            f"{self.b_name} {self.b.median:,.{m.digits}f} {m.unit}"
        )
        if self.better:
            return f"{figures}: {self.better} {self.margin}, {self.paired}"
        if self.ahead:
            return f"{figures}: within noise (median {self.ahead} {self.margin}, {self.paired})"
        return f"{figures}: within noise"


def compare(
    samples: Sequence[Sample], a: str, b: str, *, call: str, concurrency: int, metric: Metric
) -> Verdict:
    group_a, group_b = _group(samples, a, call, concurrency), _group(samples, b, call, concurrency)
    by_repeat_b = {s.repeat: float(getattr(s, metric.key)) for s in group_b}
    paired_a = paired_b = 0
    for sample in group_a:
        value_a, value_b = float(getattr(sample, metric.key)), by_repeat_b.get(sample.repeat)
        if value_b is None or value_a == value_b:
            continue
        if (value_a > value_b) == metric.higher_is_better:
            paired_a += 1
        else:
            paired_b += 1
    return Verdict(
        metric, a, b, _spread(group_a, metric.key), _spread(group_b, metric.key), paired_a, paired_b
    )


def decide(
    samples: Sequence[Sample], a: str, b: str, calls: Sequence[str], metrics: Sequence[Metric]
) -> list[str]:
    """One line per call and concurrency, one tally per metric, then the lean, for ``a`` against ``b``."""
    lines: list[str] = []
    verdicts: dict[Metric, list[Verdict]] = {m: [] for m in metrics}
    for call in calls:
        for concurrency in sorted({s.concurrency for s in samples}):
            if not _group(samples, a, call, concurrency) or not _group(samples, b, call, concurrency):
                continue
            found = [compare(samples, a, b, call=call, concurrency=concurrency, metric=m) for m in metrics]
            for verdict in found:
                verdicts[verdict.metric].append(verdict)
            lines.append(f"- {call} C={concurrency}: " + "; ".join(v.text() for v in found) + ".")
    lines.append("")
    for metric, found in verdicts.items():
        parts = []
        for name in (a, b):
            won = [v.margin for v in found if v.better == name]
            parts.append(f"{name} better in {len(won)}" + (f" ({', '.join(won)})" if won else ""))
        ties = sum(1 for v in found if v.better is None)
        paired_a, paired_b = sum(v.paired_a for v in found), sum(v.paired_b for v in found)
        lines.append(
            f"- {metric.label}, {len(found)} cases: {'; '.join(parts)}; within noise in {ties}. "
            f"Paired repeats: {a} ahead in {paired_a}, {b} in {paired_b}."
        )
    lines += ["", _lean(verdicts, a, b)]
    return lines


def _lean(verdicts: dict[Metric, list[Verdict]], a: str, b: str) -> str:
    """The plain reading: which model the numbers favour, on what, by how much."""
    rule = (
        f"(Beyond noise means the repeats' [min-max] ranges do not overlap and the medians differ "
        f"by {NOISE_FRACTION:.0%} or more.)"
    )
    wins: dict[str, list[str]] = {a: [], b: []}
    for metric, found in verdicts.items():
        for name in (a, b):
            margins = [v.margin for v in found if v.better == name]
            if margins:
                wins[name].append(
                    f"{metric.label} in {len(margins)} of {len(found)} cases ({', '.join(margins)})"
                )
    throughput = verdicts.get(RPS, [])
    rps_ties = all(v.better is None for v in throughput)
    if wins[a] and wins[b]:
        return (
            f"The numbers are mixed: {a} is better on {'; '.join(wins[a])}; "
            f"{b} on {'; '.join(wins[b])}. {rule}"
        )
    for name in (a, b):
        if wins[name]:
            tail_text = " Throughput is within noise in every case." if rps_ties else ""
            return (
                f"The numbers favour {name}: better beyond noise on {'; '.join(wins[name])}."
                f"{tail_text} {rule}"
            )
    # Nothing beyond noise: say so, and say where the paired repeats lean.
    leans = []
    for metric, found in verdicts.items():
        paired_a, paired_b = sum(v.paired_a for v in found), sum(v.paired_b for v in found)
        if paired_a != paired_b:
            leader, most = (a, paired_a) if paired_a > paired_b else (b, paired_b)
            leans.append(f"{metric.label} to {leader} ({most} of {paired_a + paired_b})")
    lean_text = f" The paired repeats lean: {'; '.join(leans)}." if leans else ""
    return f"No difference is beyond noise on any metric.{lean_text} {rule}"


def _load_range(samples: Sequence[Sample]) -> str:
    loads = [s.loadavg_1m for s in samples]
    return f"{min(loads):.2f}-{max(loads):.2f}" if loads else "n/a"


def render(raw: dict[str, Any], framework: Sequence[Sample], procs: Sequence[Sample]) -> str:
    facts, versions, plan = raw["machine"], raw["versions"], raw["plan"]
    cut = sum(s.cut for s in [*framework, *procs])
    proc_models = ["1 process", f"{plan['processes']} processes"]
    out = [
        "# Server model: grpc.aio against sync, one process against several",
        "",
        f"Measured {raw['started']} in {raw['wall_s']:.0f} s with:",
        "",
        "```",
        raw["command"],
        "```",
        "",
        "## Machine and software",
        "",
        f"- {facts['nproc']} CPUs ({facts['cpu_model']}), {facts['memory_gib']} GiB, Linux {facts['kernel']}",
        "- load average (1, 5, 15 min) at start "
        + ", ".join(f"{v:.2f}" for v in facts["loadavg_start"])
        + "; at end "
        + ", ".join(f"{v:.2f}" for v in facts["loadavg_end"])
        + f"; 1-min load average after each run {_load_range([*framework, *procs])}",
        f"- Python {versions['python']}, grpcio {versions['grpcio']}, protobuf {versions['protobuf']}, "
        f"pymongo {versions['pymongo']}, ghz {versions['ghz']}",
        f"- broker {versions.get('broker', '?')} at commit {versions['git_commit']}",
        f"- database: {versions['server_kind']} ({versions['server_reason']}), "
        f"server version {versions.get('server_version', '?')}"
        + (f", FerretDB {versions['ferretdb']}" if "ferretdb" in versions else ""),
        "",
        "## Method",
        "",
        f"- ghz drives every server over Unix sockets, for {plan['seconds']:g} s per run, "
        f"{plan['repeats']} repeats, with one HTTP/2 connection per concurrent caller (each stands "
        "for one worker process). A 1 s warm-up per server is not recorded. Within each repeat the "
        "models alternate, each going first in turn.",
        "- Cells are the median of the repeats with [min-max]. rps is answered (OK) calls per "
        "second; p50 and p99 are over every OK call of the run. CPU is user+system seconds of the "
        "server process(es) (from /proc) per 1,000 calls; ghz CPU is the load generator's own, "
        "which shares the same cores. `errors` counts failed calls; the calls still in flight when "
        "ghz's `--duration` ends (at most C per run), which ghz fails as its connections close, are "
        f"left out of every figure: {cut} over the whole run.",
        "- Part 1, framework cost: a stub broker.v1.Broker whose Ping returns a constant "
        '`PingResponse(version="x")`, no database. `aio` is `grpc.aio.server()` with `async def` '
        f"handlers; `sync` is `grpc.server(ThreadPoolExecutor(max_workers={plan['sync_workers']}))`. "
        "Both register through the generated `add_BrokerServicer_to_server` and set "
        "`grpc.so_reuseport=0`, like the broker.",
        f"- Part 2, the real broker (grpc.aio + AsyncMongoClient) as 1 process with "
        f"max_pool_size {plan['pool']}, against {plan['processes']} processes with max_pool_size "
        f"{plan['pool'] // plan['processes']} each, one Unix socket each. C is the total concurrency, "
        f"split evenly: {plan['processes']} ghz processes run in parallel, their rps summed and their "
        "latencies merged. Peak RSS is the sum of each broker's peak (an upper bound); peak DB "
        "connections are the ESTABLISHED connections to the database port from the model's brokers, "
        "sampled every 50 ms. Insert writes one ~250-byte document without `_id`; Find reads one "
        "seeded document by `_id` (the ghz workload's request). The broker's queue bounds are the "
        "bench's (`max_waiting` 256, `wait_queue_timeout_ms` 10000).",
        "",
        "## 1. Framework cost (Ping, no database)",
        "",
        *_table(framework, MODELS, ["Ping"], "framework"),
        "",
        f"## 2. One broker process against {plan['processes']}",
        "",
        *_table(procs, proc_models, plan["calls"], "processes"),
        "",
        "## Decision",
        "",
    ]
    out += [
        "Framework cost, aio against sync (server CPU):",
        "",
        *decide(framework, "aio", "sync", ["Ping"], [RPS, CPU, P99]),
        "",
        f"Broker processes, 1 against {plan['processes']} with the same total pool (broker CPU, summed):",
        "",
        *decide(procs, proc_models[0], proc_models[1], plan["calls"], [RPS, CPU, P99, RSS]),
        "",
        f"These are {facts['nproc']}-CPU figures with the load generator on the same cores: "
        "more processes can only use cores that ghz and the database leave free, so the "
        "multi-process figures say little about a machine with more cores.",
        "",
    ]
    errors = [s for s in [*framework, *procs] if s.errors]
    if errors:
        out += ["Errors seen:", ""]
        out += [
            f"- {s.part} {s.model} {s.call} C={s.concurrency} repeat {s.repeat + 1}: "
            f"{s.errors} of {s.count}: {'; '.join(s.error_samples)}"
            for s in errors
        ]
        out.append("")
    return "\n".join(out)


# --- the run -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.servermodel",
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--seconds", type=float, default=5.0, help="length of one ghz run")
    add("--repeats", type=int, default=3, help="runs per model and concurrency")
    add("--framework-concurrency", type=int_list, default=[1, 16], help="ghz C against the Ping stubs")
    add("--sync-workers", type=int, default=16, help="the sync stub's ThreadPoolExecutor max_workers")
    add("--broker-concurrency", type=int_list, default=[16, 64], help="total ghz C against the brokers")
    add("--calls", type=name_list(CALLS), default=list(CALLS), help="broker calls to drive")
    add("--processes", type=int, default=2, help="broker processes in the multi-process model")
    add("--pool", type=int, default=10, help="total max_pool_size, split across the processes")
    add("--skip-framework", action="store_true", help="part 2 only")
    add("--skip-processes", action="store_true", help="part 1 only")
    add("--results-dir", type=Path, default=RESULTS, help=f"where {REPORT_NAME} goes")
    add(
        "--server",
        choices=["auto", *KINDS],
        default=os.environ.get("DBSERVER_KIND", "auto"),
        help="database server (env DBSERVER_KIND; MONGODB_URI wins under auto)",
    )
    add("--from-raw", type=Path, metavar="RAW.json", help="re-render the report from a run's raw figures")
    add("-v", "--verbose", action="store_true")
    # The stub server's own entry point (the harness starts it).
    add("--serve", choices=MODELS, help=argparse.SUPPRESS)
    add("--socket", help=argparse.SUPPRESS)
    add("--ready-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for concurrency in args.broker_concurrency:
        if concurrency % args.processes:
            parser.error(
                f"--broker-concurrency {concurrency} does not split across {args.processes} processes"
            )
    if args.pool % args.processes:
        parser.error(f"--pool {args.pool} does not split across {args.processes} processes")
    return args


def run(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], list[Sample], list[Sample]]:
    ghz = workloads.find_ghz()
    if ghz is None:
        raise SystemExit("ghz is not built: run `make tools`")
    started = time.time()
    t0 = time.monotonic()
    facts = machine_facts()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {message}", file=sys.stderr, flush=True)

    workdir = short_tmpdir("mb-sm-")
    framework: list[Sample] = []
    procs: list[Sample] = []
    configs: dict[str, str] = {}
    try:
        with database_server(None if args.server == "auto" else args.server) as server:
            progress(f"database: {server.kind} at {server.address} ({server.reason})")
            ctx = workloads.Context(
                server=server,
                workdir=workdir,
                raw_dir=args.results_dir / "raw",
                mongobetween=workloads.Mongobetween(None, "not used here"),
                progress=progress,
            )
            try:
                versions = software_versions(_server_info(ctx))
                if not args.skip_framework:
                    framework = run_framework(
                        ghz,
                        workdir,
                        concurrencies=args.framework_concurrency,
                        seconds=args.seconds,
                        repeats=args.repeats,
                        sync_workers=args.sync_workers,
                        progress=progress,
                    )
                if not args.skip_processes:
                    procs, configs = run_processes(
                        ghz,
                        ctx,
                        processes=args.processes,
                        pool=args.pool,
                        calls=args.calls,
                        concurrencies=args.broker_concurrency,
                        seconds=args.seconds,
                        repeats=args.repeats,
                        progress=progress,
                    )
                with contextlib.suppress(Exception):  # tidy-up only; the server goes next anyway
                    ctx.mongo[workloads.MONGO_DB].drop_collection(INSERT_COLLECTION)
            finally:
                ctx.close()
            brokers = ctx.brokers_started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_end"] = list(os.getloadavg())
    raw = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "wall_s": time.monotonic() - t0,
        "machine": facts,
        "versions": {**versions, "broker": brokers[0]["version"] if brokers else "?"},
        "broker_configs": configs,
        "plan": {
            "seconds": args.seconds,
            "repeats": args.repeats,
            "framework_concurrency": args.framework_concurrency,
            "sync_workers": args.sync_workers,
            "broker_concurrency": args.broker_concurrency,
            "calls": args.calls,
            "processes": args.processes,
            "pool": args.pool,
        },
        "samples": [vars(s) for s in [*framework, *procs]],
    }
    return raw, framework, procs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.serve:
        if not args.socket or not args.ready_file:
            raise SystemExit("--serve needs --socket and --ready-file")
        return serve_stub(args.serve, args.socket, args.ready_file, args.sync_workers)
    if args.from_raw is not None:
        # Re-render only: the figures, machine facts and command are the measured run's.
        raw = json.loads(args.from_raw.read_text(encoding="utf-8"))
        samples = [Sample(**record) for record in raw["samples"]]
        framework = [s for s in samples if s.part == "framework"]
        procs = [s for s in samples if s.part == "processes"]
    else:
        shown = list(sys.argv[1:] if argv is None else argv)
        command = shlex.join(["python", "-m", "bench.servermodel", *shown])
        try:
            raw, framework, procs = run(args, command)
        except DatabaseServerError as exc:
            print(f"no database server: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted: stopped every stub, broker and database server", file=sys.stderr)
            return 130
        raw_dir = args.results_dir / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        raw_path = raw_dir / f"servermodel-{stamp}.json"
        raw_path.write_text(_scrub(json.dumps(raw, indent=1, default=str)), encoding="utf-8")
        print(f"raw figures: {raw_path}", file=sys.stderr)
    text = _scrub(render(raw, framework, procs))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / REPORT_NAME).write_text(text, encoding="utf-8")
    print(text)
    return 0


def _scrub(text: str) -> str:
    """Paths inside the checkout written relative to it: the report is read on other machines."""
    return text.replace(f"{REPO}/", "").replace(str(REPO), ".")


if __name__ == "__main__":
    raise SystemExit(main())
