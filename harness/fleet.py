"""Run many short-lived worker processes, at most ``concurrency`` alive at once.

Each worker is a fresh interpreter, usually ``harness/worker.py``; its last
JSON line on stdout is parsed into ``WorkerResult.report``. Exits are waited
for on pidfds, not polled, so the harness takes no CPU from the workers it
measures. Whatever happens (a failed worker, Ctrl-C), no worker outlives
``run_fleet``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["WORKER_SCRIPT", "FleetResult", "WorkerResult", "run_fleet", "worker_command"]

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"


def worker_command(spec: Mapping[str, Any], role: str = "storm", python: str = sys.executable) -> list[str]:
    """The command line that runs harness/worker.py's ``role`` with ``spec``."""
    return [python, str(WORKER_SCRIPT), role, json.dumps(dict(spec), separators=(",", ":"))]


@dataclass
class WorkerResult:
    index: int
    returncode: int
    spawned: float  # time.monotonic() just before the worker was started
    exited: float  # ... and when its exit was seen
    stdout: str
    stderr: str
    report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.report is not None

    @property
    def elapsed_s(self) -> float:
        return self.exited - self.spawned

    def describe(self) -> str:
        """A short account of a failed worker, for assertion messages."""
        err = self.stderr.strip().splitlines()[-5:]
        return f"worker {self.index}: exit {self.returncode}; stderr tail: {' | '.join(err)}"


@dataclass
class FleetResult:
    results: list[WorkerResult]
    elapsed_s: float
    max_alive: int

    @property
    def failed(self) -> list[WorkerResult]:
        return [r for r in self.results if not r.ok]

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [r.report for r in self.results if r.report is not None]

    def latencies(self, key: str) -> list[float]:
        """Every latency sample named ``key`` (``insert_ms``, ``find_ms``) from all reports."""
        return [v for report in self.reports for v in report.get(key, [])]


@dataclass
class _Running:
    index: int
    proc: subprocess.Popen[bytes]
    pidfd: int
    out: IO[bytes]
    err: IO[bytes]
    spawned: float


def _finish(run: _Running, returncode: int) -> WorkerResult:
    exited = time.monotonic()
    os.close(run.pidfd)
    outputs = []
    for handle in (run.out, run.err):
        handle.seek(0)
        outputs.append(handle.read().decode("utf-8", "replace"))
        handle.close()
    stdout, stderr = outputs
    report = None
    lines = stdout.strip().splitlines()
    if returncode == 0 and lines:
        with contextlib.suppress(ValueError):
            report = json.loads(lines[-1])
    return WorkerResult(run.index, returncode, run.spawned, exited, stdout, stderr, report)


def run_fleet(
    commands: Iterable[Sequence[str]], concurrency: int, timeout_per_worker: float = 60.0
) -> FleetResult:
    """Run every command as its own process, at most ``concurrency`` at once.

    A worker still running after ``timeout_per_worker`` seconds is killed and
    recorded as failed (exit code -9). Output goes to unnamed temporary files,
    not pipes, so a chatty worker can never block on a full pipe.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    pending = deque(enumerate(commands))
    running: dict[int, _Running] = {}
    results: list[WorkerResult] = []
    max_alive = 0
    fleet_started = time.monotonic()
    selector = selectors.DefaultSelector()

    def reap(run: _Running, code: int) -> None:
        del running[run.index]
        selector.unregister(run.pidfd)
        results.append(_finish(run, code))

    try:
        while pending or running:
            while pending and len(running) < concurrency:
                index, argv = pending.popleft()
                # Closed by _finish or the cleanup below: they outlive this block.
                out = tempfile.TemporaryFile()  # noqa: SIM115
                err = tempfile.TemporaryFile()  # noqa: SIM115
                spawned = time.monotonic()
                try:
                    # A session of its own keeps a terminal's Ctrl-C for the
                    # parent, which then ends the workers itself.
                    proc = subprocess.Popen(
                        list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
                    )
                except BaseException:
                    out.close()
                    err.close()
                    raise
                run = _Running(index, proc, os.pidfd_open(proc.pid), out, err, spawned)
                running[index] = run
                selector.register(run.pidfd, selectors.EVENT_READ, run)
            max_alive = max(max_alive, len(running))
            first_deadline = min(r.spawned for r in running.values()) + timeout_per_worker
            wait = min(1.0, max(0.0, first_deadline - time.monotonic()))
            for key, _events in selector.select(timeout=wait):
                reap(key.data, key.data.proc.wait())
            now = time.monotonic()
            for run in [r for r in running.values() if now - r.spawned > timeout_per_worker]:
                logger.warning("worker %d timed out after %.0f s", run.index, timeout_per_worker)
                run.proc.kill()
                reap(run, run.proc.wait())
    finally:
        for run in running.values():
            run.proc.kill()
            run.proc.wait()
            os.close(run.pidfd)
            run.out.close()
            run.err.close()
        selector.close()
    results.sort(key=lambda r: r.index)
    return FleetResult(results, time.monotonic() - fleet_started, max_alive)
