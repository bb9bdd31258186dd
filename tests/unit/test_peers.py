"""Calls per calling host (Stats peers): host parsing and the bounded table."""

from __future__ import annotations

import pytest

from broker.peers import Peers, peer_host


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:53412", "10.0.0.7"),
        ("ipv6:[fd00::7]:53412", "fd00::7"),
        ("ipv6:[::1]:1", "::1"),
        ("unix:", "unix"),
        ("unix:/run/x.sock", "unix"),
        ("unix-abstract:name", "unix"),
        ("ipv4:10.0.0.7", "10.0.0.7"),
        ("", "unknown"),
        ("vsock:3:5", "vsock:3:5"),
    ],
)
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_calls_are_counted_per_host_most_recent_first() -> None:
    peers = Peers()
    for host in ("a", "b", "a", "c", "a"):
        peers.record(host)
    snapshot = peers.snapshot()
    assert [(p.host, p.calls) for p in snapshot] == [("a", 3), ("c", 1), ("b", 1)]
    assert snapshot[0].last_call >= snapshot[1].last_call >= snapshot[2].last_call


def test_the_table_keeps_at_most_its_limit_dropping_the_least_recent() -> None:
    peers = Peers(limit=3)
    for host in ("a", "b", "c"):
        peers.record(host)
    peers.record("a")  # now b is the least recently seen
    peers.record("d")
    assert {p.host for p in peers.snapshot()} == {"a", "c", "d"}
    assert peers.dropped == 1
    for n in range(100):
        peers.record(f"h{n}")
    assert len(peers.snapshot()) == 3
    assert peers.dropped == 101
