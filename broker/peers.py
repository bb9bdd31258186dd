"""Who calls this broker: a bounded count of calls per calling host.

A shared tier's operator asks "which pods call this replica, and how much";
a sidecar's answer is always one host. gRPC names a caller as
``ipv4:10.0.0.7:53412``, ``ipv6:[fd00::7]:53412`` or ``unix:...``. The port
changes with every connection, so calls are counted by host only, and at
most `MAX_PEERS` hosts are kept (the least recently seen goes first), so a
caller cannot grow the table without bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_PEERS", "PeerCount", "Peers", "peer_host"]

MAX_PEERS: Final = 64


def peer_host(peer: str) -> str:
    """The calling host of a gRPC peer string, without its port.

    ``unix:`` callers are all "unix": the client end of a Unix socket has
    no name worth keeping.
    """
    scheme, _, address = peer.partition(":")
    if scheme in {"unix", "unix-abstract"}:
        return "unix"
    if scheme == "ipv6":
        host, sep, _port = address.rpartition("]:")
        return host.lstrip("[") if sep else address.strip("[]")
    if scheme == "ipv4":
        host, sep, _port = address.rpartition(":")
        return host if sep else address
    return peer or "unknown"


@dataclass(slots=True)
class PeerCount:
    host: str
    calls: int
    last_call: float  # time.monotonic()


class Peers:
    """Calls per calling host, for Stats."""

    def __init__(self, limit: int = MAX_PEERS) -> None:
        self._limit = limit
        self._counts: OrderedDict[str, PeerCount] = OrderedDict()
        # Hosts forgotten to keep the table bounded.
        self.dropped = 0

    def record(self, host: str) -> None:
        entry = self._counts.get(host)
        now = time.monotonic()
        if entry is None:
            if len(self._counts) >= self._limit:
                self._counts.popitem(last=False)
                self.dropped += 1
            self._counts[host] = PeerCount(host, 1, now)
            return
        entry.calls += 1
        entry.last_call = now
        self._counts.move_to_end(host)

    def snapshot(self) -> list[PeerCount]:
        """Most recently seen first."""
        return [PeerCount(e.host, e.calls, e.last_call) for e in reversed(self._counts.values())]
