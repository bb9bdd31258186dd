"""The benchmark's workloads, run from the harness process: storm, steady, stream, ghz, profile.

Each ``run_*`` function drives worker processes (``harness/worker.py``) against
one database server and returns plain JSON-able records::

    {"workload": "storm", "mode": "broker-uds", "param": 200, "repeat": 0, "metrics": {...}}

or, for a mode that could not be run, ``{..., "not_measured": "<reason>"}``.
``bench/report.py`` turns the records into tables and plots; nothing here
prints figures. Every database connection count is taken at the socket level
(``harness/netconns.py``): FerretDB has no ``serverStatus.connections``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
import psutil
from pymongo import MongoClient

from bench import modes
from bench.dbprofiles import with_query
from harness.brokerproc import BrokerProcess, broker_config
from harness.dbserver import DatabaseServer
from harness.fleet import run_fleet, worker_command
from harness.netconns import ConnectionSampler, Endpoint, connections_to_port
from harness.process import free_port, port_open, short_tmpdir, spawn_logged, terminate, wait_until
from harness.worker import peak_rss_mb

__all__ = [
    "Context",
    "Mongobetween",
    "Record",
    "run_ghz",
    "run_imports",
    "run_profile",
    "run_steady",
    "run_storm",
    "run_stream",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools" / "bin"
PROTO = REPO / "protos" / "broker" / "v1" / "broker.proto"

Record = dict[str, Any]

# The name of the database in the broker's config, and the MongoDB database behind it.
BROKER_DB = "appdb"
MONGO_DB = "bench"
STEADY_COLLECTION = "steady"
STREAM_COLLECTION = "stream"
STORM_COLLECTION = "storm"
# The broker's config for every workload: defaults but for the queue bounds,
# raised so that 64 steady workers on 2 cores queue instead of being refused:
# the benchmark measures throughput, not the overload policy.
BROKER_SETTINGS = {"max_waiting": 256, "wait_queue_timeout_ms": 10_000}
# ~1 KB per streamed document: int32 _id and i, and a 990-character string.
STREAM_PAD = 990


def _record(workload: str, mode: str, param: Any, repeat: int, **metrics: Any) -> Record:
    # The machine is shared: the 1-minute load average says how contended a run was.
    metrics.setdefault("loadavg_1m", os.getloadavg()[0])
    return {"workload": workload, "mode": mode, "param": param, "repeat": repeat, "metrics": metrics}


def _not_measured(workload: str, mode: str, param: Any, reason: str) -> Record:
    return {"workload": workload, "mode": mode, "param": param, "repeat": 0, "not_measured": reason}


def _runnable(
    ctx: Context, workload: str, param: Any, mode_list: Sequence[str], mb: Any, *, records: list[Record]
) -> Iterator[str]:
    """The modes of ``mode_list`` that can run; mongobetween without a binary goes to ``records``."""
    for mode in mode_list:
        if mode == modes.MONGOBETWEEN and mb is None:
            records.append(_not_measured(workload, mode, param, ctx.mongobetween.reason))
        else:
            yield mode


# --- mongobetween ----------------------------------------------------------------------------


@dataclass
class Mongobetween:
    """Where mongobetween comes from, or why it could not be had.

    The ``MONGOBETWEEN`` environment variable (a binary path), else
    ``.tools/bin/mongobetween``. It is not on the Go module proxy, and the
    bench never builds it: build it from its public source beside the
    checkout (docs/BENCHMARKS.md says how). Without it every table shows the
    mode as not measured, with the reason.
    """

    binary: str | None
    reason: str

    @classmethod
    def obtain(cls) -> Mongobetween:
        given = os.environ.get("MONGOBETWEEN")
        if given:
            if os.access(given, os.X_OK):
                # Only its name: a local build's path says nothing a report reader can use.
                return cls(given, f"the binary MONGOBETWEEN names ({Path(given).name})")
            return cls(None, f"not measured: MONGOBETWEEN={given} is not an executable file")
        local = TOOLS / "mongobetween"
        if os.access(local, os.X_OK):
            return cls(str(local), f"{local} (built earlier)")
        return cls(
            None,
            "not measured: no mongobetween binary (set MONGOBETWEEN to one built from its public source)",
        )


class MongobetweenProcess:
    """mongobetween on a loopback port, in front of the database, ``maxpoolsize`` bounded."""

    def __init__(self, binary: str, db_uri: str, max_pool_size: int, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "mongobetween.log"
        # The database's own URI, options kept: in the tls-latency profile its
        # tls and tlsCAFile make mongobetween's upstream TLS too.
        upstream = with_query(db_uri, maxpoolsize=max_pool_size, label="bench")
        self.argv = [binary, "-network", "tcp4", "-loglevel", "warn", f"127.0.0.1:{self.port}={upstream}"]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 20.0) -> None:
        self._proc = spawn_logged(self.argv, self.log_path)
        wait_until(
            self._proc,
            lambda: port_open("127.0.0.1", self.port),
            timeout=timeout,
            name="mongobetween",
            log_path=self.log_path,
            interval=0.05,
        )

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, grace=5.0, name="mongobetween")
            self._proc = None


# --- the run's shared state ------------------------------------------------------------------


@dataclass
class Context:
    """What every workload needs: the server, a harness client, where to put files."""

    server: DatabaseServer
    workdir: Path
    raw_dir: Path
    mongobetween: Mongobetween
    max_pool_size: int = 10
    # A nice value for the broker (and mongobetween): negative gives it a larger
    # share of the CPU, as a Kubernetes CPU request gives a sidecar container.
    proxy_nice: int = 0
    python: str = sys.executable
    progress: Callable[[str], None] = print
    brokers_started: list[dict[str, Any]] = field(default_factory=list)
    _mongo: MongoClient[dict[str, Any]] | None = None

    @property
    def mongo(self) -> MongoClient[dict[str, Any]]:
        if self._mongo is None:
            self._mongo = MongoClient(self.server.uri, appname="bench-harness")
        return self._mongo

    def close(self) -> None:
        if self._mongo is not None:
            self._mongo.close()

    @contextlib.contextmanager
    def broker(self, name: str) -> Iterator[BrokerProcess]:
        """A fresh broker on a Unix socket and loopback TCP, stopped afterwards."""
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        config = broker_config(
            db_uri=self.server.uri,
            socket_path=workdir / "broker.sock",
            tcp="127.0.0.1:0",
            db_name=BROKER_DB,
            mongo_db=MONGO_DB,
            max_pool_size=self.max_pool_size,
            **BROKER_SETTINGS,
        )
        with BrokerProcess(config, workdir=workdir, name="broker") as broker:
            broker.start()
            renice(broker.pid, self.proxy_nice)
            self.brokers_started.append({"name": name, "version": broker.version, "config": config})
            try:
                yield broker
            finally:
                broker.stop()

    @contextlib.contextmanager
    def mongobetween_proxy(self) -> Iterator[MongobetweenProcess | None]:
        if self.mongobetween.binary is None:
            yield None
            return
        binary = self.mongobetween.binary
        proc = MongobetweenProcess(binary, self.server.uri, self.max_pool_size, self.workdir)
        proc.start()
        renice(proc.pid, self.proxy_nice)
        try:
            yield proc
        finally:
            proc.stop()

    def target(
        self, mode: str, broker: BrokerProcess | None, mb: MongobetweenProcess | None
    ) -> dict[str, Any]:
        """The spec entries that point a worker of ``mode`` at its server."""
        if mode == modes.BROKER_UDS:
            assert broker is not None
            return {"target": broker.unix_target, "database": BROKER_DB}
        if mode == modes.BROKER_TCP:
            assert broker is not None
            return {"target": broker.tcp_target, "database": BROKER_DB}
        if mode == modes.MONGOBETWEEN:
            assert mb is not None
            return {"uri": mb.uri, "database": MONGO_DB}
        return {"uri": self.server.uri, "database": MONGO_DB}


def renice(pid: int, nice: int) -> None:
    """Set every thread of ``pid`` to ``nice`` (Linux niceness is per thread; new ones inherit it)."""
    if nice == 0:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(task), nice)


def _proxy_pid(mode: str, broker: BrokerProcess | None, mb: MongobetweenProcess | None) -> int | None:
    if mode in modes.BROKER_MODES and broker is not None:
        return broker.pid
    if mode == modes.MONGOBETWEEN and mb is not None:
        return mb.pid
    return None


def _bystanders(mode: str, broker: BrokerProcess | None, mb: MongobetweenProcess | None) -> list[int]:
    """Processes whose database connections do not belong to ``mode`` (the harness, idle proxies)."""
    pids = [os.getpid()]
    if broker is not None and mode not in modes.BROKER_MODES:
        pids.append(broker.pid)
    if mb is not None and mode != modes.MONGOBETWEEN:
        pids.append(mb.pid)
    return pids


# --- counting database connections, cheaply --------------------------------------------------

_NETLINK_INET_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_ESTABLISHED = 1


def _diag_established(port: int) -> dict[int, Endpoint]:
    """{socket inode: (local port, remote port)} of ESTABLISHED TCP sockets whose remote port is ``port``.

    Asks the kernel over NETLINK_INET_DIAG (what ``ss`` does) for ESTABLISHED
    sockets only: ~0.5 ms here, against ~8 ms to read /proc/net/tcp and tcp6,
    which this kernel builds by walking its whole 262,144-bucket hash table.
    At a 25 ms sampling interval that is the difference between 2% and 30%
    of one of the machine's two cores, taken from the modes being measured.
    """
    found: dict[int, Endpoint] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_INET_DIAG) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # struct inet_diag_req_v2: family, protocol, ext, pad, states, struct inet_diag_sockid.
            request = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_ESTABLISHED)
            header = struct.pack(
                "=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0
            )
            sock.send(header + request)
            done = False
            while not done:
                data = sock.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR or length < 16:
                        raise OSError("inet_diag answered with an error")
                    # struct inet_diag_msg: 4 bytes, then the sockid (sport, dport big-endian), ...
                    body = offset + 16
                    local, remote = struct.unpack_from(">HH", data, body + 4)
                    if remote == port:
                        (inode,) = struct.unpack_from("=I", data, body + 68)
                        found[inode] = (local, remote)
                    offset += (length + 3) & ~3
    return found


def db_connections(port: int, exclude_pids: Sequence[int] = ()) -> set[Endpoint]:
    """ESTABLISHED connections to ``port`` from this host, less those of ``exclude_pids``.

    netlink where the kernel answers, else harness/netconns.py's /proc reader.
    """
    try:
        found = _diag_established(port)
    except OSError:
        return connections_to_port(port, exclude_pids)
    for pid in exclude_pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        found.pop(int(target[8:-1]), None)
    return set(found.values())


# --- watching a process: CPU time and peak RSS --------------------------------------------------


class ProcWatch:
    """Sample a process's RSS every ``interval`` s and read its CPU time on demand.

    The peak is also read from the kernel's high-water mark (``VmHWM``), reset
    through ``/proc/PID/clear_refs`` where allowed, so that a spike between
    two samples is not missed.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False

    def cpu_s(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._proc.memory_info().rss
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False

    def take_peak_mb(self) -> float:
        """Peak RSS since the last ``reset_peak``/``take_peak_mb``, in MiB; resets it."""
        with self._lock:
            peak = self._peak / 2**20
        if self._hwm_reset:
            peak = max(peak, peak_rss_mb(self.pid))
        self.reset_peak()
        return peak

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            with self._lock:
                self._peak = max(self._peak, rss)

    def __enter__(self) -> ProcWatch:
        self.reset_peak()
        self._thread = threading.Thread(target=self._run, name="proc-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --- storm ------------------------------------------------------------------------------------


def _storm_processes(
    ctx: Context, *, workers: int, concurrency: int, spec: dict[str, Any], sampler: ConnectionSampler
) -> dict[str, Any]:
    commands = [worker_command({**spec, "worker": i}, python=ctx.python) for i in range(workers)]
    with sampler:
        fleet = run_fleet(commands, concurrency, timeout_per_worker=120)
    ok = [(w, w.report) for w in fleet.results if w.ok and w.report is not None]
    return {
        "wall_s": fleet.elapsed_s,
        "workers_ok": len(ok),
        "workers_failed": len(fleet.failed),
        "failure_samples": [w.describe() for w in fleet.failed[:3]],
        "max_alive": fleet.max_alive,
        "spawn_to_first_ms": [(r["t_first"] - w.spawned) * 1000 for w, r in ok],
        "spawn_to_imported_ms": [(r["t_imported"] - w.spawned) * 1000 for w, r in ok],
        "op_ms": [v for _, r in ok for v in _later_ops(r)],
        "connects_reported": sum(int(r["connects"]) for _, r in ok),
        "worker_peak_rss_mb": [r["peak_rss_mb"] for _, r in ok],
        "worker_cpu_ms": [r["cpu_ms"] for _, r in ok if "cpu_ms" in r],
    }


def _later_ops(report: dict[str, Any]) -> list[float]:
    """Every operation but the first, which pays for connecting."""
    return [*report["insert_ms"][1:], *report["find_ms"]]


def _run_worker(ctx: Context, role: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker to its end; its last line of output, parsed."""
    argv = worker_command(spec, role, python=ctx.python)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {role} {spec['mode']} failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _storm_threads(
    ctx: Context, *, workers: int, concurrency: int, spec: dict[str, Any], sampler: ConnectionSampler
) -> dict[str, Any]:
    with sampler:
        report = _run_worker(
            ctx, "storm-threads", {**spec, "workers": workers, "concurrency": concurrency}, 900
        )
    tasks = report["tasks"]
    return {
        "wall_s": report["elapsed_s"],
        "workers_ok": len(tasks),
        "workers_failed": len(report["failures"]),
        "failure_samples": report["failures"][:3],
        "max_alive": concurrency,
        "spawn_to_first_ms": [(t["t_first"] - t["t_spawn"]) * 1000 for t in tasks],
        "spawn_to_imported_ms": [],
        "op_ms": [v for t in tasks for v in _later_ops(t)],
        "connects_reported": None,
        "worker_peak_rss_mb": [report["peak_rss_mb"]],
    }


def run_storm(
    ctx: Context,
    *,
    worker_counts: Sequence[int],
    mode_list: Sequence[str],
    repeats: int,
    concurrency: int,
    ops: int,
    hold_ms: int,
    large: tuple[int, Sequence[str], int] | None = None,
) -> list[Record]:
    """W short-lived workers per mode, at most ``concurrency`` alive; ``repeats`` rounds, modes interleaved.

    ``large`` = (W, modes, repeats) overrides the mode list and repeats for
    one big W (the full set at W=1000 takes too long on 2 cores by default).
    """
    records: list[Record] = []
    port = ctx.server.port
    with ctx.broker("storm") as broker, ctx.mongobetween_proxy() as mb:
        for workers in worker_counts:
            these_modes, these_repeats = list(mode_list), repeats
            if large is not None and workers == large[0]:
                # mongobetween stays: it is a goal's peer (or shows why it is missing).
                these_modes = [m for m in mode_list if m in large[1] or m == modes.MONGOBETWEEN]
                these_repeats = large[2]
                records.extend(
                    _not_measured(
                        "storm",
                        m,
                        workers,
                        f"skipped by default at W={workers} to keep the run short (--full runs it)",
                    )
                    for m in mode_list
                    if m not in these_modes and m != modes.MONGOBETWEEN
                )
            for repeat in range(these_repeats):
                reasons = records if repeat == 0 else []
                for mode in _runnable(ctx, "storm", workers, these_modes, mb, records=reasons):
                    ctx.progress(f"storm W={workers} {mode} (repeat {repeat + 1})")
                    spec = {
                        "mode": mode,
                        "collection": STORM_COLLECTION,
                        "ops": ops,
                        "hold_ms": hold_ms,
                        "db_port": port,
                        **ctx.target(mode, broker, mb),
                    }
                    metrics = _storm_once(ctx, spec, workers, concurrency, _bystanders(mode, broker, mb))
                    records.append(_record("storm", mode, workers, repeat, **metrics))
        ctx.mongo[MONGO_DB].drop_collection(STORM_COLLECTION)
    return records


def _storm_once(
    ctx: Context, spec: dict[str, Any], workers: int, concurrency: int, exclude: list[int]
) -> dict[str, Any]:
    """One storm of ``workers`` workers of ``spec``'s mode while a sampler counts database connections."""
    mode, port = spec["mode"], spec["db_port"]
    before = db_connections(port, exclude)

    def probe() -> set[Endpoint]:
        return db_connections(port, exclude)

    sampler = ConnectionSampler(probe, interval=0.025)
    if mode == modes.DIRECT_SHARED:
        metrics = _storm_threads(ctx, workers=workers, concurrency=concurrency, spec=spec, sampler=sampler)
    else:
        metrics = _storm_processes(ctx, workers=workers, concurrency=concurrency, spec=spec, sampler=sampler)
    # Start every run from an empty collection: FerretDB's lookups slow down as
    # a collection grows, which would otherwise favour whichever mode ran first.
    ctx.mongo[MONGO_DB].drop_collection(STORM_COLLECTION)
    seen_new = len(sampler.distinct - before)
    reported = metrics.pop("connects_reported")
    # Exact where the workers count their own connects (audit hook); for a
    # proxy or a shared client, the connections the sampler saw appear.
    exact = mode in modes.CLIENT_MODES and reported is not None
    metrics.update(
        peak_connections=sampler.peak,
        connections_opened=reported if exact else seen_new,
        connections_opened_how="counted by the workers" if exact else "new connections sampled",
        samples=sampler.samples,
        workers=workers,
        concurrency=concurrency,
    )
    return metrics


IMPORT_PATHS = {
    "pymongo": "import pymongo",
    "broker_client + grpc + stubs": (
        "import broker_client, grpc; from broker_client.proto.broker.v1 import broker_pb2_grpc"
    ),
    "bare interpreter": "pass",
}


def run_imports(ctx: Context, *, repeats: int) -> list[Record]:
    """What a cold worker pays before its first call: interpreter start and each client's imports.

    Measured one process at a time (no contention), ``repeats`` times each:
    the wall time of ``python -c STATEMENT`` and, inside it, of the import alone.
    """
    records: list[Record] = []
    ctx.progress(f"imports: {len(IMPORT_PATHS)} client import paths x {repeats}")
    for repeat in range(repeats):
        for name, statement in IMPORT_PATHS.items():
            code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
            started = time.perf_counter()
            done = subprocess.run(
                [ctx.python, "-c", code], capture_output=True, text=True, timeout=60, check=True
            )
            wall = time.perf_counter() - started
            records.append(
                _record(
                    "imports",
                    name,
                    0,
                    repeat,
                    import_ms=float(done.stdout.strip()) * 1000,
                    process_ms=wall * 1000,
                )
            )
    return records


# --- steady -----------------------------------------------------------------------------------


def seed_steady(ctx: Context, count: int) -> None:
    coll = ctx.mongo[MONGO_DB][STEADY_COLLECTION]
    coll.drop()
    for start in range(0, count, 1000):
        coll.insert_many(
            [
                {"_id": modes.seed_id(i), "i": i, "pad": "s" * 200}
                for i in range(start, min(count, start + 1000))
            ]
        )


def _watch(pid: int | None) -> contextlib.AbstractContextManager[ProcWatch | None]:
    """A ProcWatch on ``pid`` (the proxy of a mode), or nothing for a mode without one."""
    return ProcWatch(pid) if pid is not None else contextlib.nullcontext()


def _steady_launch(
    ctx: Context, spec: dict[str, Any], watch: ProcWatch | None
) -> tuple[dict[str, Any], list[float], list[float]]:
    """Run the steady launcher; read the proxy's CPU and peak RSS at every window boundary."""
    windows, duration = int(spec["windows"]), float(spec["duration_s"])
    result_dir = short_tmpdir("mb-steady-")
    argv = worker_command({**spec, "result_dir": str(result_dir)}, "steady", python=ctx.python)
    cpu: list[float] = []
    peaks: list[float] = []
    with tempfile.TemporaryFile() as err, contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, result_dir, ignore_errors=True)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        timer = threading.Timer(180 + windows * duration, proc.kill)
        timer.start()
        try:
            line = proc.stdout.readline().decode()
            if not line.startswith("READY "):
                rest = proc.stdout.read().decode()
                proc.wait()
                err.seek(0)
                raise RuntimeError(f"steady launcher failed: {line}{rest}{err.read().decode()[-3000:]}")
            t0 = float(line.split()[1])
            for boundary in range(windows + 1):
                delay = t0 + boundary * duration - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if watch is not None:
                    cpu.append(watch.cpu_s())
                    peak = watch.take_peak_mb()
                    if boundary:
                        peaks.append(peak)
            out = proc.stdout.read().decode().strip().splitlines()
            code = proc.wait()
        finally:
            timer.cancel()
        err.seek(0)
        if code != 0 or not out:
            raise RuntimeError(f"steady launcher exited {code}: {err.read().decode()[-3000:]}")
    return json.loads(out[-1]), cpu, peaks


def run_steady(
    ctx: Context,
    *,
    concurrencies: Sequence[int],
    mode_list: Sequence[str],
    duration: float,
    windows: int,
    seed_docs: int = 1000,
    insert_every: int = 4,
) -> list[Record]:
    """C long-lived workers per mode; ``windows`` consecutive windows of ``duration`` s are the repeats."""
    records: list[Record] = []
    seed_steady(ctx, seed_docs)
    with ctx.broker("steady") as broker, ctx.mongobetween_proxy() as mb:
        for concurrency in concurrencies:
            for mode in _runnable(ctx, "steady", concurrency, mode_list, mb, records=records):
                ctx.progress(f"steady C={concurrency} {mode} ({windows} x {duration:g} s)")
                # The same 1,000 documents for every mode and C: inserts grow the
                # collection, and FerretDB's lookups slow down as it grows.
                seed_steady(ctx, seed_docs)
                spec = {
                    "mode": mode,
                    "concurrency": concurrency,
                    "duration_s": duration,
                    "windows": windows,
                    "seed_docs": seed_docs,
                    "insert_every": insert_every,
                    "collection": STEADY_COLLECTION,
                    **ctx.target(mode, broker, mb),
                }
                with _watch(_proxy_pid(mode, broker, mb)) as watch:
                    result, cpu, peaks = _steady_launch(ctx, spec, watch)
                records.extend(_steady_records(mode, concurrency, duration, result, cpu=cpu, peaks=peaks))
    return records


def _steady_records(
    mode: str,
    concurrency: int,
    duration: float,
    result: dict[str, Any],
    *,
    cpu: list[float],
    peaks: list[float],
) -> list[Record]:
    """One record per window: its latency percentiles and, for a proxy mode, the proxy's CPU and RSS."""
    records = []
    for index, window in enumerate(result["windows"]):
        latencies = window["latencies"]
        stats = modes.percentiles(latencies)
        metrics = {
            "ops_per_s": len(latencies) / duration,
            "p50_ms": stats["p50"],
            "p99_ms": stats["p99"],
            "p99.9_ms": stats["p99.9"],
            "mean_ms": sum(latencies) / len(latencies) if latencies else math.nan,
            "ops": len(latencies),
            "errors": window["errors"],
            "workers_ok": result["workers_ok"],
            "error_samples": result["error_samples"] + result["crashes"],
        }
        if cpu:
            ops = max(1, len(latencies))
            metrics["proxy_cpu_s_per_1k_ops"] = (cpu[index + 1] - cpu[index]) / ops * 1000
            metrics["proxy_peak_rss_mb"] = peaks[index]
        records.append(_record("steady", mode, concurrency, index, **metrics))
    return records


# --- stream -----------------------------------------------------------------------------------


def stream_document(i: int) -> dict[str, Any]:
    return {"_id": i, "i": i, "pad": "p" * STREAM_PAD}


def stream_document_bytes() -> int:
    return len(bson.encode(stream_document(0)))


def seed_stream(ctx: Context, count: int) -> int:
    """Insert ``count`` ~1 KB documents (if not there yet); return one document's BSON size."""
    coll = ctx.mongo[MONGO_DB][STREAM_COLLECTION]
    if coll.estimated_document_count() != count:
        coll.drop()
        for start in range(0, count, 1000):
            coll.insert_many([stream_document(i) for i in range(start, min(count, start + 1000))])
    return stream_document_bytes()


def run_stream(
    ctx: Context,
    *,
    sizes: Sequence[int],
    mode_list: Sequence[str],
    repeats: int,
    batch_size: int,
) -> list[Record]:
    """One find of N ~1 KB documents per run; a fresh broker per N, so its peak RSS belongs to N."""
    records: list[Record] = []
    ctx.progress(f"stream: seeding {max(sizes)} documents of ~1 KB")
    doc_bytes = seed_stream(ctx, max(sizes))
    for size in sizes:
        with ctx.broker(f"stream-{size}") as broker, ctx.mongobetween_proxy() as mb:
            baseline = ProcWatch(broker.pid).rss_mb()
            for mode in _runnable(ctx, "stream", size, mode_list, mb, records=records):
                ctx.progress(f"stream N={size} {mode} ({repeats} runs)")
                records.extend(
                    _stream_once(
                        ctx,
                        mode=mode,
                        size=size,
                        repeats=repeats,
                        batch_size=batch_size,
                        doc_bytes=doc_bytes,
                        broker=broker,
                        mb=mb,
                        baseline_mb=baseline,
                    )
                )
    return records


def _stream_once(
    ctx: Context,
    *,
    mode: str,
    size: int,
    repeats: int,
    batch_size: int,
    doc_bytes: int,
    broker: BrokerProcess,
    mb: MongobetweenProcess | None,
    baseline_mb: float,
) -> list[Record]:
    spec = {
        "mode": mode,
        "collection": STREAM_COLLECTION,
        "limit": size,
        "batch_size": batch_size,
        "repeats": repeats,
        "expected_bytes": size * doc_bytes,
        **ctx.target(mode, broker, mb),
    }
    with _watch(_proxy_pid(mode, broker, mb)) as watch:
        cpu_before = watch.cpu_s() if watch is not None else 0.0
        report = _run_worker(ctx, "stream", spec, 1800)
        proxy_peak = watch.take_peak_mb() if watch is not None else None
        proxy_cpu = watch.cpu_s() - cpu_before if watch is not None else None
    records = []
    total_docs = sum(r["docs"] for r in report["runs"])
    for index, run in enumerate(report["runs"]):
        if run["docs"] != size:
            raise RuntimeError(f"stream {mode}: expected {size} documents, read {run['docs']}")
        metrics: dict[str, Any] = {
            "docs_per_s": run["docs"] / run["elapsed_s"],
            "mb_per_s": run["bytes"] / run["elapsed_s"] / 1e6,
            "elapsed_s": run["elapsed_s"],
            "bytes": run["bytes"],
            "client_peak_rss_mb": report["client_peak_rss_mb"],
        }
        if proxy_peak is not None and proxy_cpu is not None:
            metrics["proxy_peak_rss_mb"] = proxy_peak
            metrics["proxy_baseline_rss_mb"] = baseline_mb
            metrics["proxy_cpu_s_per_100k_docs"] = proxy_cpu / max(1, total_docs) * 100_000
        records.append(_record("stream", mode, size, index, **metrics))
    return records


# --- ghz --------------------------------------------------------------------------------------


def find_ghz() -> str | None:
    local = TOOLS / "ghz"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("ghz")


def ghz_requests() -> dict[str, dict[str, Any]]:
    """The two calls ghz makes: Ping, and a Find by ``_id`` with a BSON filter (bytes are base64 in JSON)."""
    find_filter = base64.b64encode(bson.encode({"_id": modes.seed_id(7)})).decode()
    return {
        "Ping": {"database": BROKER_DB},
        "Find": {
            "database": BROKER_DB,
            "collection": STEADY_COLLECTION,
            "filter": find_filter,
            "limit": 1,
        },
    }


def ghz_argv(
    ghz: str,
    target: str,
    call: str,
    data: dict[str, Any],
    *,
    concurrency: int,
    connections: int,
    seconds: float,
) -> list[str]:
    """The ghz command line for ``seconds`` of ``call`` with ``data`` against ``target``; JSON out."""
    flags = {
        "--proto": str(PROTO),
        "--import-paths": str(PROTO.parent.parent.parent),
        "--call": f"broker.v1.Broker.{call}",
        "--data": json.dumps(data),
        "--concurrency": str(concurrency),
        "--connections": str(connections),
        "--duration": f"{seconds:g}s",
        "--timeout": "20s",
        "--format": "json",
    }
    return [ghz, "--insecure", *(part for flag in flags.items() for part in flag), target]


def run_ghz(
    ctx: Context, *, seconds: float, concurrency: int, connections: int, repeats: int
) -> list[Record]:
    """ghz (a load generator nobody here wrote) against the broker's TCP listener."""
    ghz = find_ghz()
    requests = ghz_requests()
    if ghz is None:
        reason = "not measured: ghz is not built (cd bench/ghz && go build -o ../../.tools/bin/ghz ...)"
        return [_not_measured("ghz", f"ghz {call}", concurrency, reason) for call in requests]
    if ctx.mongo[MONGO_DB][STEADY_COLLECTION].find_one({"_id": modes.seed_id(7)}) is None:
        seed_steady(ctx, 1000)
    records: list[Record] = []
    with ctx.broker("ghz") as broker:
        watch = ProcWatch(broker.pid)
        for repeat in range(repeats):
            for call, data in requests.items():
                ctx.progress(f"ghz {call} c={concurrency} {seconds:g} s (repeat {repeat + 1})")
                argv = ghz_argv(
                    ghz,
                    broker.tcp_target,
                    call,
                    data,
                    concurrency=concurrency,
                    connections=connections,
                    seconds=seconds,
                )
                cpu_before = watch.cpu_s()
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=seconds + 120, check=False
                )
                cpu = watch.cpu_s() - cpu_before
                if not done.stdout.strip():
                    raise RuntimeError(f"ghz {call} failed ({done.returncode}): {done.stderr[-2000:]}")
                records.append(_ghz_record(call, concurrency, repeat, json.loads(done.stdout), cpu))
    return records


def _ghz_record(call: str, concurrency: int, repeat: int, out: dict[str, Any], cpu_s: float) -> Record:
    latency = {int(p["percentage"]): p["latency"] / 1e6 for p in out.get("latencyDistribution") or []}
    codes = out.get("statusCodeDistribution") or {}
    count = int(out.get("count", 0))
    ok = int(codes.get("OK", 0))
    return _record(
        "ghz",
        f"ghz {call}",
        concurrency,
        repeat,
        rps=float(out.get("rps", 0.0)),
        ok_per_s=float(out.get("rps", 0.0)) * (ok / count if count else 0.0),
        p50_ms=latency.get(50, math.nan),
        p99_ms=latency.get(99, math.nan),
        mean_ms=float(out.get("average", 0)) / 1e6,
        count=count,
        errors=count - ok,
        status_codes=codes,
        error_samples=list((out.get("errorDistribution") or {}).keys())[:3],
        proxy_cpu_s_per_1k_ops=cpu_s / max(1, count) * 1000,
    )


# --- profile ----------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("py-spy")


def _py_spy(
    py_spy: str, pid: int, output: Path, duration: float | None, native: bool
) -> subprocess.Popen[bytes]:
    argv = [py_spy, "record", "--pid", str(pid), "--format", "speedscope", "--output", str(output)]
    argv += ["--rate", "100"]
    # --native (C frames: gRPC core, bson, the event loop) needs py-spy to
    # pause the process for each sample; without it, sample without pausing.
    argv.append("--native" if native else "--nonblocking")
    if duration is not None:
        argv += ["--duration", str(math.ceil(duration))]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stop_py_spy(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode("utf-8", "replace")[-1000:]


def run_profile(
    ctx: Context, *, steady_concurrency: int, seconds: float, stream_size: int, batch_size: int, native: bool
) -> list[Record]:
    """py-spy on the broker under steady (C) and stream (N docs); speedscope files go to raw/."""
    py_spy = find_py_spy()
    if py_spy is None:
        reason = "not measured: py-spy is not installed in the virtualenv"
        return [_not_measured("profile", name, None, reason) for name in ("steady", "stream")]
    records: list[Record] = []
    seed_steady(ctx, 1000)
    doc_bytes = seed_stream(ctx, stream_size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with ctx.broker("profile") as broker:
        # Steady: the workers warm up, then py-spy records the measured window.
        ctx.progress(f"profile: py-spy on the broker, steady C={steady_concurrency} for {seconds:g} s")
        out = ctx.raw_dir / f"profile-steady-c{steady_concurrency}-{stamp}.speedscope.json"
        spec = {
            "mode": modes.BROKER_UDS,
            "concurrency": steady_concurrency,
            "duration_s": seconds,
            "windows": 1,
            "seed_docs": 1000,
            "collection": STEADY_COLLECTION,
            **ctx.target(modes.BROKER_UDS, broker, None),
        }
        spy = _py_spy(py_spy, broker.pid, out, seconds, native)
        try:
            result, _, _ = _steady_launch(ctx, spec, None)
        finally:
            log = _stop_py_spy(spy)
        records.append(
            _profile_record(
                "steady", steady_concurrency, out, log, ops=len(result["windows"][0]["latencies"])
            )
        )
        # Stream: py-spy runs for exactly as long as the client reads.
        ctx.progress(f"profile: py-spy on the broker, stream N={stream_size}")
        out = ctx.raw_dir / f"profile-stream-{stream_size}-{stamp}.speedscope.json"
        spec = {
            "mode": modes.BROKER_UDS,
            "collection": STREAM_COLLECTION,
            "limit": stream_size,
            "batch_size": batch_size,
            "repeats": 2,
            "expected_bytes": stream_size * doc_bytes,
            **ctx.target(modes.BROKER_UDS, broker, None),
        }
        spy = _py_spy(py_spy, broker.pid, out, None, native)
        try:
            _run_worker(ctx, "stream", spec, 1800)
        finally:
            log = _stop_py_spy(spy)
        records.append(_profile_record("stream", stream_size, out, log, docs=2 * stream_size))
    return records


def _profile_record(name: str, param: int, output: Path, log: str, **extra: Any) -> Record:
    if not output.exists():
        return _not_measured("profile", name, param, f"not measured: py-spy wrote no profile ({log.strip()})")
    return _record("profile", name, param, 0, speedscope=str(output), py_spy_log=log.strip()[-300:], **extra)
