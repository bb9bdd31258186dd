"""Small helpers for the child processes the tests and the demo start.

Free loopback ports, log tails, starting a server with its output in a log
and waiting for it, and stopping a process politely: SIGTERM, then SIGKILL
after a grace period. No printing: callers decide what to show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["free_port", "port_open", "short_tmpdir", "spawn_logged", "tail", "terminate", "wait_until"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks it; there is a small window in which another process can
    take it, which is acceptable for tests on one machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def short_tmpdir(prefix: str = "mb-") -> Path:
    """A fresh directory under /tmp, short enough for Unix socket paths.

    ``sun_path`` holds 107 bytes on Linux; pytest's tmp_path and macOS's
    $TMPDIR are often longer than that.
    """
    base = "/tmp" if Path("/tmp").is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or a note that there is none."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip() or "<empty>"
    except OSError as exc:
        return f"<cannot read {path}: {exc.strerror}>"


def spawn_logged(
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start a server process whose output (stdout and stderr) is appended to ``log_path``.

    ``umask``: the child's umask (-1, the default: this process's).

    Appending keeps the log of earlier runs after a restart. A session of its
    own keeps a terminal's Ctrl-C away from it, so its owner stops it in order
    (a broker drains before its database goes).
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else dict(env),
            start_new_session=True,
            umask=umask,
        )


def wait_until(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    timeout: float,
    name: str,
    log_path: Path,
    interval: float = 0.02,
) -> None:
    """Return once ``ready()`` holds; RuntimeError with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early: {tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready within {timeout:.0f} s: {tail(log_path)}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0, name: str = "") -> int | None:
    """Stop ``proc``: SIGTERM, wait up to ``grace`` seconds, then SIGKILL.

    Returns the exit code (negative for a signal, as subprocess reports it).
    Safe to call on a process that has already exited.
    """
    label = name or f"pid {proc.pid}"
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.1f s; sending SIGKILL", label, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return proc.wait()
