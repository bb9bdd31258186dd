"""Count TCP connections to a database port, and sample that count over time.

The FerretDB test server has no ``serverStatus.connections``, so connections
are counted where the kernel keeps them: psutil, or ``/proc/net/tcp`` and
``/proc/PID/fd`` when psutil cannot (other users' processes, odd platforms).

Only ESTABLISHED sockets whose *remote* port is the database port count, so a
loopback connection is counted once (from its client end), never twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

__all__ = [
    "ConnectionSampler",
    "Endpoint",
    "connections_from_pid",
    "connections_to_port",
    "count_from_pid",
    "count_to_port",
]

logger = logging.getLogger(__name__)

_ESTABLISHED = "01"  # include/net/tcp_states.h
_PROC_NET = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

# One connection, seen from its client end: (local port, remote port). The
# kernel never has two ESTABLISHED sockets with the same pair on loopback
# towards one server port, so it identifies a connection while it lives.
Endpoint = tuple[int, int]


def _proc_established(port: int) -> dict[int, Endpoint]:
    """{socket inode: (local port, remote port)} for ESTABLISHED sockets to ``port``."""
    found: dict[int, Endpoint] = {}
    for table in _PROC_NET:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED:
                continue
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port != port:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            found[int(fields[9])] = (local_port, remote_port)
    return found


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets that process ``pid`` holds open."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed since listdir
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _endpoint(conn: Any, port: int) -> Endpoint | None:
    """(local port, remote port) of a psutil connection ESTABLISHED to ``port``."""
    # psutil gives an empty tuple, not an address, for an unconnected end.
    if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr or conn.raddr.port != port:
        return None
    return (int(conn.laddr.port), port)


def connections_from_pid(pid: int, port: int) -> set[Endpoint]:
    """ESTABLISHED TCP connections from process ``pid`` to remote ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return set()
    except (psutil.Error, OSError) as exc:
        logger.debug("psutil failed for pid %d (%s); reading /proc", pid, exc)
        try:
            mine = _socket_inodes(pid)
        except FileNotFoundError:
            return set()
        return {ep for inode, ep in _proc_established(port).items() if inode in mine}
    return {ep for c in conns if (ep := _endpoint(c, port)) is not None}


def connections_to_port(port: int, exclude_pids: Iterable[int] = ()) -> set[Endpoint]:
    """ESTABLISHED TCP connections from any process on this host to remote ``port``.

    Connections held by ``exclude_pids`` (say the broker, or the test process
    with its own client) are left out.
    """
    excluded = list(exclude_pids)
    if Path("/proc/net/tcp").exists():
        conns = _proc_established(port)
        for pid in excluded:
            try:
                for inode in _socket_inodes(pid):
                    conns.pop(inode, None)
            except FileNotFoundError:
                continue
        return set(conns.values())
    # Not Linux: psutil walks every process; slower, but only a fallback.
    skip = set(excluded)
    return {
        ep
        for c in psutil.net_connections(kind="tcp")
        if c.pid not in skip and (ep := _endpoint(c, port)) is not None
    }


def count_from_pid(pid: int, port: int) -> int:
    """How many ESTABLISHED TCP connections ``pid`` holds to remote ``port``."""
    return len(connections_from_pid(pid, port))


def count_to_port(port: int, exclude_pids: Collection[int] = ()) -> int:
    """How many ESTABLISHED TCP connections this host holds to remote ``port``."""
    return len(connections_to_port(port, exclude_pids))


@dataclass
class ConnectionSampler:
    """Call ``probe`` every ``interval`` seconds in a thread; keep the peak.

    ``with ConnectionSampler(lambda: connections_from_pid(pid, port)) as s:``
    then read ``s.peak`` (most connections seen at once), ``s.distinct``
    (connections seen at any sample) and ``s.samples``.
    """

    probe: Callable[[], set[Endpoint]]
    interval: float = 0.02
    peak: int = 0
    samples: int = 0
    distinct: set[Endpoint] = field(default_factory=set)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> int:
        try:
            seen = self.probe()
        except Exception:
            # A vanished process or a racing /proc read must not kill the sampler.
            self.errors += 1
            logger.debug("connection probe failed", exc_info=True)
            return 0
        self.samples += 1
        self.peak = max(self.peak, len(seen))
        self.distinct |= seen
        return len(seen)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> Self:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()  # one last look, so a quiet end is not missed

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
