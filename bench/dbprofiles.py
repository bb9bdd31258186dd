"""The bench's database profiles: how every mode reaches the one database server.

- ``plain``: the server's plain TCP listener on loopback. Connecting costs
  a per-process pymongo worker almost nothing, so the broker's main advantage
  (its workers never open a database connection) barely shows.
- ``tls-latency``: a sidecar's database as real deployments have it. The
  same server's TLS listener (a throwaway CA and server certificate made
  with the openssl CLI), behind toxiproxy with a latency toxic on each
  direction. Every mode gets ``mongodb://127.0.0.1:PROXYPORT/?tls=true&tlsCAFile=...``:
  per-process and churn workers, direct-shared, the broker's database URI
  and mongobetween's upstream. So a worker with its own client pays the TLS
  handshake and the round trips of connecting, as it would in production.

Toxiproxy counts latency in whole milliseconds. ``latency=1, jitter=1``
delays each chunk by 0 or 1 ms at random (``1 + randint(-1, 0)``): 0.5 ms
on average each way, about 1 ms per round trip. The bench measures what a
ping costs through each profile and reports it.

Only the storm and steady workloads run in a profile other than ``plain``.
They are the ones where how a worker connects matters. stream, ghz and
profile measure the broker's own data path, so they run in ``plain`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from bench import modes
from harness.dbserver import DatabaseServer, TLSListener
from harness.process import port_open
from harness.toxiproxy import Toxiproxy, find_toxiproxy

__all__ = [
    "PLAIN",
    "PROFILES",
    "PROFILE_WORKLOADS",
    "TLS_LATENCY",
    "Endpoint",
    "PkiFiles",
    "make_pki",
    "parse_profiles",
    "ping_ms",
    "tls_latency_endpoint",
    "tls_uri",
    "with_query",
]

PLAIN = "plain"
TLS_LATENCY = "tls-latency"
PROFILES = (PLAIN, TLS_LATENCY)
# The workloads each profile runs (of those asked for with --workloads).
PROFILE_WORKLOADS: dict[str, tuple[str, ...] | None] = {PLAIN: None, TLS_LATENCY: ("storm", "steady")}
# toxiproxy's latency toxic, on each direction: 0 or 1 ms per chunk, 0.5 ms on average.
LATENCY_TOXIC = {"latency": 1, "jitter": 1}


def parse_profiles(text: str) -> list[str]:
    """argparse type: comma-separated profile names, each once, in the order given."""
    values: list[str] = []
    for value in (v.strip() for v in text.split(",")):
        if not value:
            continue
        if value not in PROFILES:
            raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(PROFILES)}")
        if value not in values:
            values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PROFILES)}")
    return values


def workloads_for(profile: str, asked: Sequence[str]) -> list[str]:
    """The workloads of ``asked`` that ``profile`` runs, in their order."""
    allowed = PROFILE_WORKLOADS[profile]
    return [w for w in asked if allowed is None or w in allowed]


def with_query(uri: str, **options: str | int) -> str:
    """``uri`` with ``options`` added to (or replacing those in) its query string."""
    parts = urllib.parse.urlsplit(uri)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: str(v) for k, v in options.items()})
    # %20, not +, for a space: the Go driver (mongobetween) reads + as itself.
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", encoded, ""))


def tls_uri(host: str, port: int, ca_file: Path | str) -> str:
    """The URI of a TLS server at ``host:port`` whose certificate ``ca_file`` signed."""
    return with_query(f"mongodb://{host}:{port}/", tls="true", tlsCAFile=str(ca_file))


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PkiFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost that it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @property
    def listener(self) -> TLSListener:
        return TLSListener(self.cert_file, self.key_file)


def _openssl(*args: str, cwd: Path) -> None:
    argv = ["openssl", *args]
    done = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-2000:]}")


def make_pki(directory: Path) -> PkiFiles:
    """A CA and a server certificate (RSA 2048, as a managed database's are), valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=bench-ca", cwd=directory,
    )  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=bench-db", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=directory,
    )  # fmt: skip
    return PkiFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")


# --- the endpoint a profile gives every mode ------------------------------------------------------


class Endpoint(DatabaseServer):
    """The database as one profile reaches it: a URI, and the port whose connections are counted.

    Never started or stopped here: the server behind it is the run's one
    server. ``uri_options`` go into every URI built from ``address`` (the
    mongobetween upstream).
    """

    managed = False

    def __init__(
        self, server: DatabaseServer, host: str, port: int, uri_options: dict[str, str], reason: str
    ) -> None:
        super().__init__(host, port, reason)
        self.kind = server.kind
        self.uri_options = uri_options

    @property
    def uri(self) -> str:
        return with_query(f"mongodb://{self.host}:{self.port}/", **self.uri_options)


@contextlib.contextmanager
def tls_latency_endpoint(server: DatabaseServer, pki: PkiFiles) -> Iterator[tuple[Endpoint, dict[str, Any]]]:
    """Toxiproxy in front of ``server``'s TLS listener with the latency toxic on both directions.

    Yields the endpoint and what the report says about it.
    """
    if server.tls_port is None:
        raise RuntimeError("the database server has no TLS listener")
    binary = find_toxiproxy()
    if binary is None:
        raise RuntimeError("toxiproxy-server is not built (make tools)")
    deadline = time.monotonic() + 15
    while not port_open(server.host, server.tls_port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the TLS listener on port {server.tls_port} did not open")
        time.sleep(0.05)
    toxiproxy = Toxiproxy(binary).start()
    try:
        proxy = toxiproxy.proxy("bench-db-tls", f"{server.host}:{server.tls_port}")
        for stream in ("upstream", "downstream"):
            proxy.add_toxic("latency", stream, **LATENCY_TOXIC)
        endpoint = Endpoint(
            server,
            "127.0.0.1",
            proxy.port,
            {"tls": "true", "tlsCAFile": str(pki.ca_file)},
            f"{server.kind}'s TLS listener behind toxiproxy (latency toxic {LATENCY_TOXIC} each way)",
        )
        yield (
            endpoint,
            {
                "how": f"{server.kind}'s TLS listener behind toxiproxy",
                "latency_toxic_each_way": dict(LATENCY_TOXIC),
                "uri_shown": f"mongodb://127.0.0.1:PROXYPORT/?tls=true&tlsCAFile={pki.ca_file.name}",
            },
        )
    finally:
        toxiproxy.close()


def ping_ms(uri: str, count: int = 200) -> dict[str, float]:
    """Percentiles of a ping from one connected client, and what a new client's first ping costs."""
    started = time.perf_counter()
    client: MongoClient[dict[str, Any]] = MongoClient(uri, appname="bench-ping")
    try:
        client.admin.command("ping")
        first = (time.perf_counter() - started) * 1000
        times = []
        for _ in range(count):
            t = time.perf_counter()
            client.admin.command("ping")
            times.append((time.perf_counter() - t) * 1000)
    finally:
        client.close()
    stats = modes.percentiles(times, (50, 90, 99))
    return {"first_ms": first, **{f"{k}_ms": v for k, v in stats.items()}, "count": float(count)}
