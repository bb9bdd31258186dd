"""Run many short-lived worker processes, at most ``concurrency`` alive at once.

Each worker is a fresh interpreter running ``harness/worker.py``; its JSON
report line is parsed into a ``WorkerResult``. Whatever happens (a failed
worker, Ctrl-C), no worker outlives ``run_fleet``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["WORKER_SCRIPT", "FleetResult", "WorkerResult", "run_fleet", "worker_command"]

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"


def worker_command(spec: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """The command line that runs one worker with ``spec`` (see harness/worker.py)."""
    return [python, str(WORKER_SCRIPT), json.dumps(dict(spec), separators=(",", ":"))]


@dataclass
class WorkerResult:
    index: int
    returncode: int
    elapsed_s: float
    stdout: str
    stderr: str
    report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.report is not None

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
    out: IO[bytes]
    err: IO[bytes]
    started: float
    deadline: float = field(default=0.0)


def _finish(run: _Running, returncode: int) -> WorkerResult:
    run.out.seek(0)
    run.err.seek(0)
    stdout = run.out.read().decode("utf-8", "replace")
    stderr = run.err.read().decode("utf-8", "replace")
    run.out.close()
    run.err.close()
    report = None
    lines = stdout.strip().splitlines()
    if returncode == 0 and lines:
        with contextlib.suppress(ValueError):
            report = json.loads(lines[-1])
    return WorkerResult(
        index=run.index,
        returncode=returncode,
        elapsed_s=time.monotonic() - run.started,
        stdout=stdout,
        stderr=stderr,
        report=report,
    )


def run_fleet(
    commands: Iterable[Sequence[str]],
    concurrency: int,
    timeout_per_worker: float = 60.0,
    poll_interval: float = 0.002,
) -> FleetResult:
    """Run every command as its own process, at most ``concurrency`` at once.

    A worker still running after ``timeout_per_worker`` seconds is killed and
    recorded as failed (exit code -9). Output goes to unnamed temporary files,
    not pipes, so a chatty worker can never block on a full pipe.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    pending = deque(enumerate(commands))
    running: list[_Running] = []
    results: list[WorkerResult] = []
    max_alive = 0
    fleet_started = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < concurrency:
                index, argv = pending.popleft()
                # Closed by _finish or the cleanup below: they outlive this block.
                out = tempfile.TemporaryFile()  # noqa: SIM115
                err = tempfile.TemporaryFile()  # noqa: SIM115
                now = time.monotonic()
                try:
                    # A session of its own keeps a terminal's Ctrl-C for the
                    # parent, which then ends the workers itself.
                    proc = subprocess.Popen(
                        list(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                except BaseException:
                    out.close()
                    err.close()
                    raise
                running.append(_Running(index, proc, out, err, now, now + timeout_per_worker))
            max_alive = max(max_alive, len(running))
            time.sleep(poll_interval)
            still: list[_Running] = []
            now = time.monotonic()
            for run in running:
                code = run.proc.poll()
                if code is None and now > run.deadline:
                    logger.warning("worker %d timed out after %.0f s", run.index, timeout_per_worker)
                    run.proc.kill()
                    code = run.proc.wait()
                if code is None:
                    still.append(run)
                else:
                    results.append(_finish(run, code))
            running = still
    finally:
        for run in running:
            run.proc.kill()
            run.proc.wait()
            run.out.close()
            run.err.close()
    results.sort(key=lambda r: r.index)
    return FleetResult(results, time.monotonic() - fleet_started, max_alive)
