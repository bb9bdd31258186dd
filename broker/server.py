"""The gRPC server: listeners, start-up, signals and graceful drain.

Start-up order: build the clients, bind every listener (so a bad address
fails before anything is announced), start serving, then write the ready
file. Shutdown on SIGTERM/SIGINT: stop accepting calls, give in-flight calls
`shutdown_grace_s` to finish (the rest are cancelled), then close the
clients. A second signal cuts the grace short.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path

import grpc
from broker_client.proto.broker.v1 import broker_pb2_grpc

from broker import __version__
from broker.metrics import BrokerMetrics
from broker.pools import Pools
from broker.service import BrokerService
from broker.settings import ListenSettings, Settings

__all__ = ["ListenError", "Listeners", "serve"]

log = logging.getLogger("mongo_broker.server")

# A single BSON document may be 16 MiB; its message needs a little more.
_MAX_SEND_BYTES = 16 * 1024 * 1024 + 64 * 1024


class ListenError(Exception):
    """A listener could not be bound; the message says which and why."""


class Listeners:
    """The addresses the server actually bound (port 0 resolved)."""

    def __init__(self) -> None:
        self.unix: str | None = None
        self.tcp: str | None = None
        self.metrics: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"unix": self.unix, "tcp": self.tcp, "metrics": self.metrics}


def _prepare_unix_socket(path: str) -> None:
    """Create the socket's directory, and clear a stale socket left by a dead broker."""
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"listen.unix {path!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenError(f"cannot check existing socket {path!r}: {exc}") from exc
        log.info("removing stale socket %s", path)
        os.unlink(path)
    else:
        raise ListenError(f"another process is serving on {path!r}; not taking it over")
    finally:
        probe.close()


def _bind(server: grpc.aio.Server, listen: ListenSettings) -> Listeners:
    bound = Listeners()
    if listen.unix is not None:
        _prepare_unix_socket(listen.unix)
        try:
            server.add_insecure_port(f"unix:{listen.unix}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on unix socket {listen.unix!r}: {exc}") from exc
        bound.unix = listen.unix
    if listen.tcp is not None:
        try:
            port = server.add_insecure_port(listen.tcp)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on tcp {listen.tcp!r}: {exc}") from exc
        host = listen.tcp.rsplit(":", 1)[0]
        bound.tcp = f"{host}:{port}"
    return bound


def _write_ready_file(path: str, listeners: Listeners) -> None:
    # Written to a temporary name and renamed, so a reader never sees half.
    info = {"pid": os.getpid(), "version": __version__, **listeners.as_dict()}
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(info))
    os.replace(tmp, path)


async def _sample(pools: Pools) -> None:
    """Once a second, sample each database for the pool-size advice."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for pool in pools:
            pool.stats.sample(now)
            pool.stats.warn_if_mis_sized(now)


async def serve(settings: Settings, ready_file: str | None = None) -> int:
    """Run the broker until SIGTERM/SIGINT. Returns the process exit code."""
    pools = Pools.build(settings.databases)
    metrics = BrokerMetrics(lambda: pools)
    server = grpc.aio.server(
        # Past this many calls at once gRPC answers RESOURCE_EXHAUSTED itself,
        # so the broker's memory stays bounded whatever the callers do.
        maximum_concurrent_rpcs=settings.concurrency_limit(),
        options=[
            ("grpc.max_receive_message_length", settings.server.max_request_bytes),
            ("grpc.max_send_message_length", _MAX_SEND_BYTES),
            # grpc sets SO_REUSEPORT by default: a second broker on the same
            # TCP port would silently take a share of the calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    broker_pb2_grpc.add_BrokerServicer_to_server(
        BrokerService(pools, settings.server, metrics, __version__, access_log=settings.log.access),
        server,
    )
    try:
        listeners = _bind(server, settings.listen)
        if settings.metrics.listen:
            host = settings.metrics.listen.rsplit(":", 1)[0]
            listeners.metrics = f"{host}:{metrics.serve_http(settings.metrics.listen)}"
    except (ListenError, OSError) as exc:
        log.error("%s", exc)
        await pools.close()
        return 2
    await pools.connect()
    sampler = asyncio.create_task(_sample(pools))
    await server.start()
    log.info(
        "mongo-broker %s serving on %s",
        __version__,
        ", ".join(f"{k}={v}" for k, v in listeners.as_dict().items() if v),
    )
    if ready_file:
        _write_ready_file(ready_file, listeners)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    forced = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            forced.set()
        else:
            log.info(
                "%s: draining for up to %.1fs",
                signal.Signals(signum).name,
                settings.server.shutdown_grace_s,
            )
            stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    await stopping.wait()
    drain = asyncio.ensure_future(server.stop(settings.server.shutdown_grace_s))
    force = asyncio.ensure_future(forced.wait())
    await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        await server.stop(0)
    force.cancel()
    sampler.cancel()
    metrics.close()
    await pools.close()
    if listeners.unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listeners.unix)
    if ready_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_file)
    log.info("mongo-broker stopped")
    return 0
