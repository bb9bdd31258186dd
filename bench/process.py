"""Small helpers for the child processes the tests and the demo start.

Free loopback ports, log tails, and stopping a process politely: SIGTERM,
then SIGKILL after a grace period. No printing: callers decide what to show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
from collections import deque
from pathlib import Path

__all__ = ["free_port", "short_tmpdir", "tail", "terminate"]

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
