"""One way to obtain a MongoDB-wire-protocol server, for the tests and the demo.

``with database_server() as server:`` yields a running, pinged server with a
``uri``. The first of these that can be had is used:

1. ``uri``: the ``MONGODB_URI`` environment variable, if set. Nothing is
   started; the server there is only pinged.
2. ``mongod``: a ``mongod`` on ``PATH``, started in a temporary ``--dbpath``
   on a free loopback port.
3. ``docker``: a ``mongo:7`` container through testcontainers, when a Docker
   daemon answers a ping within two seconds.
4. ``ferretdb``: FerretDB v1.24 with its SQLite backend: ``ferretdb`` on
   ``PATH``, else ``<repo>/.tools/bin/ferretdb``, else built from
   ``bench/ferretdb`` with ``go build`` (what ``make tools`` does).

``DBSERVER_KIND=ferretdb`` (or ``uri``, ``mongod``, ``docker``) uses only that
kind and fails if it cannot be had; ``auto`` or unset walks the list.

``database_server(tls=TLSListener(cert, key))`` also opens a TLS listener on a
port of its own (``tls_port``), beside the plain one, which ``uri`` and the
ready check keep using. Only the FerretDB wrapper of ``bench/ferretdb`` can do
this here; any other kind fails with ``DatabaseServerError``.

A server this module started can be stopped and started again on the same
port with the same data (``stop()``, ``start()``, ``restart()``), for fault
tests. ``close()`` stops it for good and removes its temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast, get_args

from pymongo import MongoClient
from pymongo.errors import ConfigurationError, PyMongoError
from pymongo.uri_parser import parse_uri

from harness.process import free_port, port_open, short_tmpdir, spawn_logged, tail, terminate

__all__ = [
    "KIND_ENV",
    "DatabaseServer",
    "DatabaseServerError",
    "Kind",
    "TLSListener",
    "database_server",
    "shown_path",
    "start_database_server",
]

logger = logging.getLogger(__name__)

Kind = Literal["uri", "mongod", "docker", "ferretdb"]
KINDS: tuple[Kind, ...] = get_args(Kind)
KIND_ENV = "DBSERVER_KIND"
URI_ENV = "MONGODB_URI"
REPO = Path(__file__).resolve().parent.parent
FERRETDB_SRC = REPO / "bench" / "ferretdb"
FERRETDB_TOOL = REPO / ".tools" / "bin" / "ferretdb"
LOOPBACK = "127.0.0.1"
DOCKER_IMAGE = "mongo:7"
# Where a local Docker daemon listens when DOCKER_HOST is unset.
_DOCKER_SOCKETS = ("/var/run/docker.sock", "~/.docker/run/docker.sock", "~/.colima/docker.sock")


class DatabaseServerError(RuntimeError):
    """No server could be had, or the one chosen did not start or answer."""


@dataclass(frozen=True)
class TLSListener:
    """The PEM certificate and key of a TLS listener opened beside the plain one."""

    cert_file: Path
    key_file: Path


class DatabaseServer:
    """A MongoDB-wire-protocol server that answers ``ping`` at ``uri``.

    ``kind`` says what it is and ``reason`` why it was chosen. ``managed`` is
    true when this module started it; only then do ``stop``/``start``/
    ``restart`` work.
    """

    kind: Kind
    managed = True
    # The port of the TLS listener, when one was asked for (same host as ``uri``).
    tls_port: int | None = None

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def address(self) -> str:
        """``host:port``, for messages: unlike ``uri`` it never holds credentials."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} address={self.address}>"

    # Lifecycle; subclasses that start something override these.
    def start(self, ready_timeout: float = 30.0) -> None:
        """Start the server (again, after ``stop``) and wait until it answers."""
        raise DatabaseServerError(f"{self.kind} server at {self.address} was not started here")

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server, keeping its port and data for ``start``."""
        raise DatabaseServerError(f"{self.kind} server at {self.address} was not started here")

    def restart(self, ready_timeout: float = 30.0) -> None:
        """``stop`` then ``start``: same port, same data."""
        self.stop()
        self.start(ready_timeout)

    def is_running(self) -> bool:
        return True

    def close(self) -> None:
        """Stop for good and remove anything this module created. Idempotent."""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for error messages."""
        return "<no log: not started here>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float, alive: Callable[[], bool] | None = None) -> float:
        """Ping until the server answers; return the seconds it took.

        ``alive`` is polled between attempts so that a server process that
        died is reported at once, with its log, instead of after ``timeout``.
        """
        started = time.monotonic()
        deadline = started + timeout
        options: dict[str, Any] = {
            "serverSelectionTimeoutMS": 250,
            "connectTimeoutMS": 1000,
            "appname": "mongo-broker-dbserver",
        }
        if self.managed:
            options["directConnection"] = True
        last_error = "no attempt made"
        if self.managed:
            # Wait for the port first: pymongo's monitor rechecks a refused
            # server only every 500 ms, which would double a FerretDB start.
            while not port_open(self.host, self.port):
                if alive is not None and not alive():
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri, **options)
        try:
            while True:
                if alive is not None and not alive():
                    raise DatabaseServerError(
                        f"{self.kind} exited before answering ping at {self.address}; "
                        f"log tail:\n{self.log_tail()}"
                    )
                try:
                    client.admin.command("ping")
                    return time.monotonic() - started
                except PyMongoError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise DatabaseServerError(
                        f"{self.kind} at {self.address} did not answer ping within {timeout:.0f} s "
                        f"(last error: {last_error}); log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()


class ExternalServer(DatabaseServer):
    """A server given by ``MONGODB_URI``: used as it is, never started or stopped."""

    kind: Kind = "uri"
    managed = False

    def __init__(self, uri: str, reason: str) -> None:
        try:
            nodes = parse_uri(uri)["nodelist"]
        except (ConfigurationError, ValueError) as exc:
            raise DatabaseServerError(f"{URI_ENV} is not a usable MongoDB URI: {exc}") from exc
        host, port = nodes[0]
        super().__init__(host, port, reason)
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri


class ProcessServer(DatabaseServer):
    """A server binary run as a child process: mongod or FerretDB.

    ``argv_for(port, data_dir)`` builds the command line; data lives in a
    temporary directory that ``close`` removes.
    """

    def __init__(
        self,
        kind: Kind,
        argv_for: Callable[[int, Path], Sequence[str]],
        reason: str,
    ) -> None:
        super().__init__(LOOPBACK, free_port(LOOPBACK), reason)
        self.kind = kind
        self._argv_for = argv_for
        self.workdir = short_tmpdir(f"mb-{kind}-")
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.log_path = self.workdir / f"{kind}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, ready_timeout: float = 30.0) -> None:
        if self.is_running():
            return
        argv = list(self._argv_for(self.port, self.data_dir))
        logger.debug("starting %s: %s", self.kind, " ".join(argv))
        self._proc = spawn_logged(argv, self.log_path, cwd=self.workdir)
        proc = self._proc
        try:
            took = self.wait_ready(ready_timeout, alive=lambda: proc.poll() is None)
        except BaseException:
            terminate(proc, grace=2.0, name=self.kind)
            raise
        logger.info("%s pid %d answers ping at %s (%.2f s)", self.kind, proc.pid, self.address, took)

    def stop(self, grace: float = 10.0) -> None:
        if self._proc is None:
            return
        code = terminate(self._proc, grace, name=self.kind)
        logger.info("%s pid %d stopped (exit code %s)", self.kind, self._proc.pid, code)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


class DockerServer(DatabaseServer):
    """``mongo:7`` in a container, published on a fixed host port so that a
    restart keeps the address. Data lives in the container until ``close``."""

    kind: Kind = "docker"

    def __init__(self, reason: str, image: str = DOCKER_IMAGE) -> None:
        super().__init__(LOOPBACK, free_port(LOOPBACK), reason)
        self.image = image
        self._container: Any = None
        self._stopped = False

    def start(self, ready_timeout: float = 60.0) -> None:
        if self._container is None:
            from testcontainers.core.container import DockerContainer

            container = DockerContainer(self.image).with_bind_ports(27017, self.port)
            logger.info("starting container %s on host port %d", self.image, self.port)
            container.start()  # pulls the image first if needed
            self._container = container
            self.host = container.get_container_host_ip()
            self.port = int(container.get_exposed_port(27017))
        elif self._stopped:
            self._container.get_wrapped_container().start()
        self._stopped = False
        try:
            took = self.wait_ready(ready_timeout, alive=self.is_running)
        except BaseException:
            self.close()
            raise
        logger.info("container %s answers ping at %s (%.2f s)", self.image, self.address, took)

    def is_running(self) -> bool:
        if self._container is None or self._stopped:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return cast(str, wrapped.status) in {"created", "running"}

    def stop(self, grace: float = 10.0) -> None:
        if self._container is not None and not self._stopped:
            self._container.get_wrapped_container().stop(timeout=int(grace))
            self._stopped = True

    def close(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):  # already gone is fine
                self._container.stop()
            self._container = None

    def log_tail(self, lines: int = 40) -> str:
        if self._container is None:
            return "<no container>"
        try:
            out, err = self._container.get_logs()
        except Exception as exc:
            return f"<cannot read container logs: {exc}>"
        text = (out + err).decode("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:]) or "<empty>"


def shown_path(path: str | Path) -> str:
    """``path`` as reports print it: relative to the checkout when inside it.

    A report is committed and read elsewhere; where this checkout happened to
    live on the machine that ran it says nothing and would only leak.
    """
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(path)


# --- choosing ---------------------------------------------------------------


def _mongod_argv(binary: str) -> Callable[[int, Path], list[str]]:
    def argv(port: int, data_dir: Path) -> list[str]:
        return [
            binary,
            f"--dbpath={data_dir}",
            f"--port={port}",
            f"--bind_ip={LOOPBACK}",
            "--quiet",
            # No /tmp/mongodb-PORT.sock left behind or shared between runs.
            "--nounixsocket",
        ]

    return argv


@cache
def _ferretdb_is_upstream(binary: str) -> bool:
    """True for upstream's ``cmd/ferretdb``, false for our wrapper.

    Upstream needs ``--handler``, a state dir, and its debug listener and
    telemetry turned off; the wrapper in bench/ferretdb accepts none of those.
    """
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"--state-dir" in out.stdout + out.stderr


def _ferretdb_argv(
    binary: str, tls: tuple[int, TLSListener] | None = None
) -> Callable[[int, Path], list[str]]:
    def argv(port: int, data_dir: Path) -> list[str]:
        args = [
            binary,
            f"--listen-addr={LOOPBACK}:{port}",
            f"--sqlite-url=file:{data_dir}/",  # the trailing slash is required
            "--log-level=warn",
        ]
        if tls is not None:
            tls_port, files = tls
            args += [
                f"--listen-tls={LOOPBACK}:{tls_port}",
                f"--tls-cert={files.cert_file}",
                f"--tls-key={files.key_file}",
            ]
        if _ferretdb_is_upstream(binary):
            args += [
                "--handler=sqlite",
                f"--state-dir={data_dir.parent}",
                "--debug-addr=-",
                "--telemetry=disable",
            ]
        return args

    return argv


def _find_or_build_ferretdb(build_timeout: float = 900.0) -> tuple[str, str]:
    """Return the FerretDB binary and where it came from, building it if needed."""
    on_path = shutil.which("ferretdb")
    if on_path:
        return on_path, f"ferretdb on PATH ({shown_path(on_path)})"
    if os.access(FERRETDB_TOOL, os.X_OK):
        return str(FERRETDB_TOOL), f"ferretdb built by `make tools` ({shown_path(FERRETDB_TOOL)})"
    go = shutil.which("go")
    if go is None:
        raise DatabaseServerError(
            f"no FerretDB binary ({FERRETDB_TOOL} is missing) and no `go` on PATH to build it; "
            "install Go and run `make tools`, or set MONGODB_URI"
        )
    FERRETDB_TOOL.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building FerretDB into %s with go build (first run only)", FERRETDB_TOOL)
    try:
        result = subprocess.run(
            [go, "build", "-o", str(FERRETDB_TOOL), "."],
            cwd=FERRETDB_SRC,
            capture_output=True,
            timeout=build_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DatabaseServerError(f"`go build` of FerretDB took longer than {build_timeout:.0f} s") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        raise DatabaseServerError(f"`go build` of FerretDB in {FERRETDB_SRC} failed:\n{output[-4000:]}")
    return str(FERRETDB_TOOL), f"ferretdb built now from {FERRETDB_SRC}"


def _docker_answers(timeout: float = 2.0) -> tuple[bool, str]:
    """Whether a Docker daemon answers a ping within ``timeout`` seconds."""
    if not os.environ.get("DOCKER_HOST") and not any(Path(p).expanduser().exists() for p in _DOCKER_SOCKETS):
        return False, "no DOCKER_HOST and no Docker socket"
    try:
        # By name: the package is optional, and its type stubs need not be there.
        docker: Any = importlib.import_module("docker")
    except ImportError:
        return False, "the docker package is not installed"
    # A failed connection attempt inside the SDK can leave an unclosed socket
    # behind, whose ResourceWarning would fail a test run that treats
    # warnings as errors. The answer is all that matters here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        client = None
        try:
            client = docker.from_env(timeout=timeout)
            client.ping()
            answer = (True, "a Docker daemon answers")
        except Exception as exc:
            answer = (False, f"no Docker daemon answers ({type(exc).__name__})")
        finally:
            if client is not None:
                client.close()
        return answer


def _candidate(kind: Kind, explicit: bool, tls: TLSListener | None = None) -> DatabaseServer | None:
    """Build an unstarted server of ``kind``, or None (logged) when unavailable."""
    if tls is not None and kind != "ferretdb":
        if kind == "uri" and os.environ.get(URI_ENV):
            # Falling through to FerretDB would quietly measure another server than the one given.
            raise DatabaseServerError(f"{URI_ENV} is set, but a TLS listener was asked for: unset one")
        _unavailable(kind, "a TLS listener is asked for; only bench/ferretdb's FerretDB opens one", explicit)
        return None
    if kind == "uri":
        uri = os.environ.get(URI_ENV)
        if not uri:
            _unavailable(kind, f"{URI_ENV} is not set", explicit)
            return None
        return ExternalServer(uri, f"{URI_ENV} is set")
    if kind == "mongod":
        binary = shutil.which("mongod")
        if binary is None:
            _unavailable(kind, "no mongod on PATH", explicit)
            return None
        return ProcessServer("mongod", _mongod_argv(binary), f"mongod on PATH ({shown_path(binary)})")
    if kind == "docker":
        ok, why = _docker_answers()
        if not ok:
            _unavailable(kind, why, explicit)
            return None
        return DockerServer(f"{why} (image {DOCKER_IMAGE})")
    binary, why = _find_or_build_ferretdb()
    if tls is None:
        return ProcessServer("ferretdb", _ferretdb_argv(binary), why)
    if _ferretdb_is_upstream(binary):
        raise DatabaseServerError(
            f"a TLS listener is asked for, but {shown_path(binary)} is upstream's ferretdb, "
            "not the bench/ferretdb wrapper that takes --listen-tls"
        )
    tls_port = free_port(LOOPBACK)
    server = ProcessServer("ferretdb", _ferretdb_argv(binary, (tls_port, tls)), why)
    while server.port == tls_port:  # two free_port calls may return the same port
        server.port = free_port(LOOPBACK)
    server.tls_port = tls_port
    return server


def _unavailable(kind: Kind, why: str, explicit: bool) -> None:
    if explicit:
        raise DatabaseServerError(f"{KIND_ENV}={kind} was asked for, but {why}")
    logger.info("not using %s: %s", kind, why)


def start_database_server(
    kind: Kind | None = None, ready_timeout: float = 30.0, tls: TLSListener | None = None
) -> DatabaseServer:
    """Choose, start and ping a server; the caller must ``close()`` it.

    ``kind`` (or the ``DBSERVER_KIND`` environment variable) restricts the
    choice to one kind; otherwise the first available in ``KINDS`` order wins.
    With ``tls``, only a kind that can open a TLS listener too is chosen.
    """
    wanted = kind or os.environ.get(KIND_ENV) or "auto"
    if wanted != "auto" and wanted not in KINDS:
        raise DatabaseServerError(f"{KIND_ENV}={wanted!r} is not one of: auto, {', '.join(KINDS)}")
    explicit = wanted != "auto"
    order = [cast(Kind, wanted)] if explicit else list(KINDS)
    for candidate_kind in order:
        server = _candidate(candidate_kind, explicit, tls)
        if server is None:
            continue
        logger.info("database server: %s, because %s", server.kind, server.reason)
        try:
            if server.managed:
                server.start(ready_timeout)
            else:
                took = server.wait_ready(ready_timeout)
                logger.info("server at %s answers ping (%.2f s)", server.address, took)
        except BaseException:
            server.close()
            raise
        return server
    # FerretDB is last and either yields a server or raises, so this is unreachable.
    raise DatabaseServerError("no MongoDB-compatible server could be had")


@contextlib.contextmanager
def database_server(
    kind: Kind | None = None, ready_timeout: float = 30.0, tls: TLSListener | None = None
) -> Iterator[DatabaseServer]:
    """``with database_server() as server:`` a running server, closed on exit."""
    server = start_database_server(kind, ready_timeout, tls)
    try:
        yield server
    finally:
        server.close()
