"""The gRPC server: listeners, start-up, signals, reload and graceful drain.

Start-up: build the clients (a URI pymongo refuses is a ConfigError naming
its key), bind every listener (a bad address fails before anything is
announced; the Unix socket in a private directory, see _StagedSocket), start
serving, move the secured socket into place, then write the ready file.

SIGTERM/SIGINT: health goes NOT_SERVING at once. For `drain_delay_s` (0 by
default) calls are still served, so health-checking clients and Kubernetes
readiness move traffic to other replicas first. Then the listeners stop
accepting; calls in flight get `shutdown_grace_s` to finish and whatever is
left is answered UNAVAILABLE; then the clients close. A second signal skips
both waits. The counts of drained and aborted calls are logged.

SIGHUP: reload the config file. Databases are added, removed or re-tuned
without a restart; calls in flight finish on the client they started with,
which is closed afterwards. An invalid config (a URI pymongo refuses
included) is logged and the old one kept, with whatever the attempt opened
closed again. Listener addresses need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path

import grpc
from broker_client.proto.broker.v1 import broker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker import __version__
from broker.health import BROKER_SERVICE, Health
from broker.metrics import BrokerMetrics
from broker.pools import Pools
from broker.service import BrokerService
from broker.settings import ConfigError, ListenSettings, ServerSettings, Settings, load_settings

__all__ = ["ListenError", "Listeners", "serve"]

log = logging.getLogger("mongo_broker.server")

# A single BSON document may be 16 MiB; its message needs a little more.
_MAX_SEND_BYTES = 16 * 1024 * 1024 + 64 * 1024
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ListenError(Exception):
    """A listener could not be bound; the message says which and why."""


class Listeners:
    """The addresses the server actually bound (port 0 resolved)."""

    def __init__(self) -> None:
        self.unix: str | None = None
        self.tcp: str | None = None
        self.health: str | None = None
        self.metrics: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"unix": self.unix, "tcp": self.tcp, "health": self.health, "metrics": self.metrics}


def _unix_gid(listen: ListenSettings) -> int | None:
    """The gid of ``listen.unix_group``, or None when unset."""
    group = listen.unix_group
    if group is None:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"listen.unix_group {group!r}: no such group") from None


def _make_socket_directory(directory: Path, gid: int | None) -> None:
    """Create the socket's directory (and missing parents) 0750, in ``gid`` when given.

    The mode is set explicitly: mkdir's mode is filtered by the umask (0777
    under umask 000, 0700 under 077). The group is given so that a member of
    listen.unix_group can traverse to a socket it may connect to; a
    directory that already exists is left as its owner made it.
    """
    missing: list[Path] = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o750)
        except FileExistsError:
            continue  # made by someone else meanwhile: theirs, not ours to change
        except OSError as exc:
            raise ListenError(f"cannot create the socket directory {str(path)!r}: {exc}") from exc
        try:
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, 0o750)
        except OSError as exc:
            raise ListenError(f"cannot set the group/mode of {str(path)!r}: {exc}") from exc


def _prepare_unix_socket(path: str, gid: int | None) -> None:
    """Create the socket's directory, and clear a stale socket left by a dead broker."""
    _make_socket_directory(Path(path).parent, gid)
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


class _StagedSocket:
    """The Unix socket, bound in a private directory and moved into place once secured.

    grpc binds and listens on a Unix socket in ``add_insecure_port`` (and the
    kernel completes connections on the backlog before ``start()``), with the
    mode the umask allows: 0777 under umask 000. A process that connects
    before the broker's chmod keeps its connection whatever the mode becomes.
    So the socket is bound in a fresh 0700 directory beside its final path,
    which nobody but the broker's user can traverse, is given its group and
    mode there, and only then renamed into place. rename() is atomic and the
    listener keeps its fd, so grpc serves on under the new name.

    Setting the umask around the bind would also work, but the umask is
    process-wide: grpc's, pymongo's and the metrics server's threads run by
    then, and a file any of them created meanwhile would get the socket's
    mode. The staging directory changes nothing outside itself.
    """

    # Short, so that the staged path fits sun_path whenever the final one
    # does (settings checks the directory's length with this allowance).
    _NAME = "s"

    def __init__(self, target: str) -> None:
        self.target = target
        try:
            self.directory = tempfile.mkdtemp(prefix=".mb", dir=Path(target).parent)
        except OSError as exc:
            raise ListenError(f"cannot create a staging directory beside {target!r}: {exc}") from exc
        self.path = os.path.join(self.directory, self._NAME)

    def publish(self, mode: int, gid: int | None) -> None:
        """Give the bound socket its group and mode, then move it to its final path."""
        try:
            if gid is not None:
                os.chown(self.path, -1, gid)
            os.chmod(self.path, mode)
            # A socket another broker put there since _prepare_unix_socket's
            # check would be replaced; that race exists with any bind, as
            # grpc itself unlinks an existing socket file before binding.
            os.rename(self.path, self.target)
        except OSError as exc:
            raise ListenError(f"cannot set owner/mode of {self.target!r}: {exc}") from exc
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the staging directory (and a socket never published)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.directory)


def _tls_credentials(listen: ListenSettings) -> grpc.ServerCredentials:
    assert listen.tls_cert_file is not None and listen.tls_key_file is not None
    ca = listen.tls_client_ca_file.read_bytes() if listen.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(listen.tls_key_file.read_bytes(), listen.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _add_port(
    server: grpc.aio.Server, address: str, what: str, creds: grpc.ServerCredentials | None = None
) -> int:
    try:
        if creds is not None:
            return server.add_secure_port(address, creds)
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {what} {address!r}: {exc}") from exc


def _bind(server: grpc.aio.Server, listen: ListenSettings) -> tuple[Listeners, _StagedSocket | None]:
    bound = Listeners()
    staged = None
    if listen.unix is not None:
        gid = _unix_gid(listen)
        _prepare_unix_socket(listen.unix, gid)
        staged = _StagedSocket(listen.unix)
        try:
            _add_port(server, f"unix:{staged.path}", f"unix socket {listen.unix!r} (staged)")
        except ListenError:
            staged.discard()
            raise
        bound.unix = listen.unix
    if listen.tcp is not None:
        creds = _tls_credentials(listen) if listen.tls_cert_file else None
        port = _add_port(server, listen.tcp, "tcp", creds)
        bound.tcp = f"{listen.tcp.rsplit(':', 1)[0]}:{port}"
    return bound, staged


def _write_ready_file(path: str, listeners: Listeners) -> None:
    # Written to a temporary name and renamed, so a reader never sees half.
    info = {"pid": os.getpid(), "version": __version__, **listeners.as_dict()}
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(info))
    os.replace(tmp, path)


def _connection_age(server: ServerSettings) -> list[tuple[str, int]]:
    if not server.max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", int(server.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(server.max_connection_age_grace_s * 1000)),
    ]


def _grpc_server(settings: Settings, concurrency: int | None) -> grpc.aio.Server:
    server = settings.server
    return grpc.aio.server(
        # Past this many calls at once gRPC answers RESOURCE_EXHAUSTED itself,
        # so the broker's memory stays bounded whatever the callers do. The
        # broker refuses data-plane calls sooner (server.max_concurrent_rpcs)
        # and health Watch streams past server.max_health_watches, which keeps
        # server.reserved_rpcs of this for Ping, Stats and health checks.
        maximum_concurrent_rpcs=concurrency,
        options=[
            ("grpc.max_receive_message_length", settings.limits.max_request_bytes),
            ("grpc.max_send_message_length", _MAX_SEND_BYTES),
            # grpc sets SO_REUSEPORT by default: a second broker on the same
            # TCP port would silently take a share of the calls.
            ("grpc.so_reuseport", 0),
            ("grpc.max_connection_idle_ms", int(server.max_connection_idle_s * 1000)),
            *_connection_age(server),
            ("grpc.keepalive_time_ms", int(server.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(server.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                int(server.min_client_ping_interval_s * 1000),
            ),
            ("grpc.http2.min_ping_interval_without_data_ms", int(server.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
        ],
    )


async def _sample(pools: Pools) -> None:
    """Once a second, sample each database for the pool-size advice."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for pool in pools:
            pool.stats.sample(now)
            pool.stats.warn_if_mis_sized(now)


class _Broker:
    """The running broker's parts, for reload and shutdown."""

    def __init__(self, settings: Settings, config_path: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.pools = Pools.build(settings.databases)
        self.metrics = BrokerMetrics(lambda: self.pools)
        self.health = Health(settings.server.max_health_watches)
        self.service = BrokerService(self.pools, settings, self.metrics, __version__)
        self.server = _grpc_server(
            settings,
            settings.concurrency_limit() + settings.server.reserved_rpcs + settings.server.max_health_watches,
        )
        broker_pb2_grpc.add_BrokerServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        if settings.server.reflection:
            names = (BROKER_SERVICE, _HEALTH_SERVICE, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        # Health on its own listener, so a probe reaches it even when the
        # data plane is only a Unix socket, and is never queued behind calls.
        self.health_server: grpc.aio.Server | None = None
        if settings.health.tcp:
            self.health_server = _grpc_server(settings, None)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.health_server)
        self.retiring: set[asyncio.Task[None]] = set()
        self.staged: _StagedSocket | None = None
        self.reload_lock = asyncio.Lock()

    def bind(self) -> Listeners:
        listeners, self.staged = _bind(self.server, self.settings.listen)
        if self.health_server is not None and self.settings.health.tcp:
            port = _add_port(self.health_server, self.settings.health.tcp, "health tcp")
            listeners.health = f"{self.settings.health.tcp.rsplit(':', 1)[0]}:{port}"
        if self.settings.metrics.listen:
            try:
                port = self.metrics.serve_http(self.settings.metrics.listen)
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {self.settings.metrics.listen!r}: {exc}") from exc
            listeners.metrics = f"{self.settings.metrics.listen.rsplit(':', 1)[0]}:{port}"
        return listeners

    async def start(self) -> None:
        await self.pools.connect()
        await self.server.start()
        if self.staged is not None:
            listen = self.settings.listen
            self.staged.publish(listen.unix_mode_bits, _unix_gid(listen))
            self.staged = None
        if self.health_server is not None:
            await self.health_server.start()
        await self.health.start(self.pools)

    async def reload(self) -> None:
        """SIGHUP: apply the config file, or log why not and keep the running configuration.

        Never raises: it runs as a task nobody awaits, where an exception
        would surface only as "Task exception was never retrieved".
        """
        # One reload at a time: a second SIGHUP waits for the first rather
        # than interleaving with its connects.
        async with self.reload_lock:
            try:
                await self._reload()
            except ConfigError as exc:
                log.error("reload rejected, keeping the running configuration: %s", exc)
            except Exception:
                log.exception("reload rejected, keeping the running configuration: unexpected error")

    async def _reload(self) -> None:
        settings = load_settings(self.config_path)
        for section in ("listen", "health", "metrics"):
            if getattr(settings, section) != getattr(self.settings, section):
                log.warning("reload: [%s] changed; it takes effect only after a restart", section)
        # Either switches to the new databases or raises having closed what it opened.
        retired = await self.pools.reconfigure(settings.databases)
        self.service.configure(settings)
        self.settings = settings
        await self.health.track(self.pools)
        for pool in retired:
            task = asyncio.create_task(
                self.pools.close_when_idle(pool, settings.server.shutdown_grace_s + 30)
            )
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)
        log.info("reloaded %s: databases %s", self.config_path, ", ".join(self.pools.names()))

    async def stop(self, forced: asyncio.Event) -> None:
        grace = self.settings.server.shutdown_grace_s
        await self.health.shutting_down()
        delay = self.settings.server.drain_delay_s
        if delay > 0:
            log.info("health NOT_SERVING; still serving for %.1fs before the listeners close", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(forced.wait(), delay)
        # Stop accepting at once; the grace given to grpc outlasts our own
        # drain, which answers leftovers UNAVAILABLE rather than CANCELLED.
        stopping = asyncio.ensure_future(self.server.stop(grace + 3.0))
        drain = asyncio.ensure_future(self.service.drain(grace))
        force = asyncio.ensure_future(forced.wait())
        await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        if drain.done():
            drained, aborted = drain.result()
            log.info("drained %d call(s), aborted %d with UNAVAILABLE", drained, aborted)
        else:
            drain.cancel()
            log.warning("forced stop: in-flight calls cut off")
            await self.server.stop(0)
        force.cancel()
        await stopping
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.metrics.close()
        for task in self.retiring:
            task.cancel()
        await self.pools.close()


def _log_tasks(service: BrokerService) -> None:
    """SIGUSR1: log the calls in flight and every asyncio task, for diagnosing a stuck broker."""
    calls = service.describe_in_flight()
    tasks = asyncio.all_tasks()
    lines = [f"SIGUSR1: {len(calls)} calls in flight", *(f"  {c}" for c in calls)]
    lines.append(f"{len(tasks)} asyncio tasks")
    for task in tasks:
        chain: list[str] = []
        awaiting: object = task.get_coro()
        while awaiting is not None and len(chain) < 20:
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            name = getattr(awaiting, "__qualname__", type(awaiting).__name__)
            chain.append(f"{name}:{frame.f_lineno}" if frame is not None else name)
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
        lines.append(f"  {task.get_name()}: {' -> '.join(chain)}")
    log.warning("\n".join(lines))


async def serve(settings: Settings, ready_file: str | None = None, config_path: str | None = None) -> int:
    """Run the broker until SIGTERM/SIGINT. Returns the process exit code."""
    broker = _Broker(settings, config_path)
    try:
        listeners = broker.bind()
        await broker.start()
    except ListenError as exc:
        log.error("%s", exc)
        if broker.staged is not None:
            broker.staged.discard()
        broker.metrics.close()
        await broker.server.stop(0)
        await broker.pools.close()
        return 2
    sampler = asyncio.create_task(_sample(broker.pools))
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
    reloads: set[asyncio.Task[None]] = set()

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("second %s: stopping now", name)
            forced.set()
        else:
            log.info("%s: draining for up to %.1fs", name, broker.settings.server.shutdown_grace_s)
            stopping.set()

    def on_reload() -> None:
        if config_path is None:
            log.warning("SIGHUP: no config file to reload (started without --config)")
            return
        task = asyncio.create_task(broker.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _log_tasks(broker.service))

    await stopping.wait()
    sampler.cancel()
    await broker.stop(forced)
    if listeners.unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listeners.unix)
    if ready_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_file)
    log.info("mongo-broker stopped")
    return 0
