"""Shared fixtures: one real database server and one real broker per session.

- ``db_server``: a MongoDB-wire-protocol server from ``harness.dbserver``
  (``MONGODB_URI``, a ``mongod`` on PATH, Docker's ``mongo:7`` or FerretDB).
- ``broker``: the real broker, ``python -m broker serve``, in front of it,
  listening on a Unix socket and on loopback TCP.
- ``start_broker``: a factory for more brokers with their own configs (error
  paths, other pool sizes); each is stopped after the test.
- ``mongo``: a direct pymongo client for assertions; ``collection_name``: a
  collection name of the test's own; ``mongo_collection``: that collection
  on the broker's database, read directly.
- ``count_db_connections(pid)`` / ``count_broker_connections()``: established
  TCP connections from a process to the database port (also importable as
  ``count_connections(pid, port)``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from broker_client.proto.broker.v1 import broker_pb2_grpc
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

# `python -m pytest` from the repository root already has the root on
# sys.path; a bare `pytest` does not, until pyproject sets pythonpath = ["."].
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from harness.brokerproc import BrokerProcess, BrokerStartError, broker_config  # noqa: E402
from harness.dbserver import DatabaseServer, DatabaseServerError, start_database_server  # noqa: E402
from harness.netconns import count_from_pid, count_to_port  # noqa: E402
from harness.process import short_tmpdir  # noqa: E402
from harness.toxiproxy import Proxy, Toxiproxy, find_toxiproxy  # noqa: E402
from tests.rpc import open_stub  # noqa: E402

DB_NAME = "appdb"  # the configured name clients use
MONGO_DB = "broker_test"  # the MongoDB database behind it
MAX_POOL_SIZE = 10

Document = dict[str, Any]


def count_connections(pid: int, db_port: int) -> int:
    """ESTABLISHED TCP connections from process ``pid`` to the database port.

    psutil first, /proc/net/tcp + /proc/PID/fd inode matching if psutil fails.
    """
    return count_from_pid(pid, db_port)


def count_all_connections(db_port: int, exclude_pids: tuple[int, ...] = ()) -> int:
    """ESTABLISHED TCP connections from any process on this host to ``db_port``."""
    return count_to_port(db_port, exclude_pids)


# --- the database server -----------------------------------------------------


@pytest.fixture(scope="session")
def db_server() -> Iterator[DatabaseServer]:
    """One MongoDB-compatible server for the whole session (see harness/dbserver.py)."""
    try:
        server = start_database_server()
    except DatabaseServerError as exc:
        # Failing, not skipping: a suite that silently skips every test
        # against the database would look green while testing nothing.
        pytest.fail(
            f"no MongoDB-compatible test server could be had: {exc}\n"
            "Set MONGODB_URI, put mongod on PATH, start Docker, or run `make tools`.",
            pytrace=False,
        )
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def real_mongodb(db_server: DatabaseServer) -> bool:
    """True when the server is MongoDB itself, not a compatible stand-in."""
    if db_server.kind in ("mongod", "docker"):
        return True
    if db_server.kind == "ferretdb":
        return False
    client: MongoClient[Document] = MongoClient(db_server.uri, serverSelectionTimeoutMS=5000)
    try:
        return "ferretdbVersion" not in client.admin.command("buildInfo")
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _skip_unless_real_mongodb(request: pytest.FixtureRequest) -> None:
    """Tests marked `mongod` need MongoDB behaviour the FerretDB test server lacks."""
    marker = request.node.get_closest_marker("mongod")
    if marker is None:
        return
    if not request.getfixturevalue("real_mongodb"):
        server = request.getfixturevalue("db_server")
        # @pytest.mark.mongod("what FerretDB lacks") names it in the skip.
        lacking = marker.args[0] if marker.args else "Decimal128, fail points, ..."
        pytest.skip(f"needs real MongoDB ({lacking}); the test server is {server.kind}")


@pytest.fixture(scope="session")
def _mongo_client(db_server: DatabaseServer) -> Iterator[MongoClient[Document]]:
    client: MongoClient[Document] = MongoClient(db_server.uri, appname="mongo-broker-tests")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def mongo(_mongo_client: MongoClient[Document]) -> MongoClient[Document]:
    """A direct pymongo client to the test server, shared by the session."""
    return _mongo_client


@pytest.fixture
def collection_name(request: pytest.FixtureRequest, _mongo_client: MongoClient[Document]) -> Iterator[str]:
    """A collection name no other test uses, created empty; it is dropped afterwards."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    name = f"{stem}_{uuid.uuid4().hex[:8]}"
    # Created here, not by the test's first insert: FerretDB's SQLite backend
    # races when concurrent calls create the same collection (an insert or a
    # find then fails with "no such table"), and many tests start with
    # concurrent workers.
    _mongo_client[MONGO_DB].create_collection(name)
    yield name
    # A test that stopped the server must not fail in teardown.
    with contextlib.suppress(PyMongoError):
        _mongo_client[MONGO_DB].drop_collection(name)


@pytest.fixture
def mongo_collection(mongo: MongoClient[Document], collection_name: str) -> Collection[Document]:
    """``collection_name`` in the broker's MongoDB database, read directly."""
    return mongo[MONGO_DB][collection_name]


# --- the broker --------------------------------------------------------------


@dataclass
class Broker:
    """A running broker and the facts about its database that tests need."""

    process: BrokerProcess
    db_server: DatabaseServer
    db_name: str = DB_NAME
    mongo_db: str = MONGO_DB
    max_pool_size: int = MAX_POOL_SIZE

    @property
    def unix_target(self) -> str:
        return self.process.unix_target

    @property
    def tcp_target(self) -> str:
        return self.process.tcp_target

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def version(self) -> str:
        return self.process.version

    @property
    def mongo_uri(self) -> str:
        return self.db_server.uri

    @property
    def db_port(self) -> int:
        return self.db_server.port

    @property
    def config_path(self) -> Path:
        return self.process.config_path

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log_text(self) -> str:
        return self.process.log_text()

    def db_connections(self) -> int:
        """ESTABLISHED connections from this broker to its database now."""
        return count_connections(self.pid, self.db_port)


def _start_or_fail(process: BrokerProcess, timeout: float) -> None:
    try:
        process.start(timeout=timeout)
    except BrokerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def broker(db_server: DatabaseServer) -> Iterator[Broker]:
    """The real broker, on a Unix socket and loopback TCP, for the whole session."""
    workdir = short_tmpdir("mb-")
    config = broker_config(
        db_uri=db_server.uri,
        socket_path=workdir / "broker.sock",
        tcp="127.0.0.1:0",
        db_name=DB_NAME,
        mongo_db=MONGO_DB,
        max_pool_size=MAX_POOL_SIZE,
    )
    process = BrokerProcess(config, workdir=workdir)
    try:
        _start_or_fail(process, timeout=30.0)
        yield Broker(process, db_server)
    finally:
        code = process.stop()
        process.close()
        _remove_tree(workdir)
    # Checked after the tests, so that a broker that could not drain cleanly
    # fails the session loudly instead of passing unnoticed.
    if code != 0:
        pytest.fail(f"broker exited with {code} on SIGTERM (expected 0 after draining)")


@pytest.fixture
def stub(broker: Broker) -> Iterator[broker_pb2_grpc.BrokerStub]:
    """A raw gRPC stub on the session broker's Unix socket."""
    with open_stub(broker.unix_target) as s:
        yield s


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class BrokerFactory:
    """``start_broker(config)``: start another broker; stopped after the test.

    ``config`` is TOML text or a dict (written with ``render_toml``). A dict
    without a ``listen`` table gets a fresh Unix socket and ``127.0.0.1:0``.
    ``base_config(**db_options)`` returns the session broker's config as a
    dict to change. With ``wait=False`` the process is returned at once, for
    configs that should make the broker exit: then ``proc.wait(timeout)``
    and ``proc.log_text()``.
    """

    db_server: DatabaseServer
    started: list[BrokerProcess] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def workdir(self) -> Path:
        path = short_tmpdir("mb-")
        self.dirs.append(path)
        return path

    def socket_path(self) -> Path:
        """A fresh Unix socket path, short enough for sun_path."""
        return self.workdir() / "broker.sock"

    def base_config(self, **database_options: Any) -> dict[str, Any]:
        return broker_config(
            db_uri=self.db_server.uri,
            socket_path=self.socket_path(),
            db_name=DB_NAME,
            mongo_db=MONGO_DB,
            **{"max_pool_size": MAX_POOL_SIZE, **database_options},
        )

    def __call__(
        self,
        config: Mapping[str, Any] | str,
        *,
        wait: bool = True,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> BrokerProcess:
        workdir = self.workdir()
        if not isinstance(config, str) and "listen" not in config:
            config = {
                "listen": {"unix": str(workdir / "broker.sock"), "tcp": "127.0.0.1:0"},
                **config,
            }
        process = BrokerProcess(config, workdir=workdir, env=env)
        self.started.append(process)
        if wait:
            _start_or_fail(process, timeout)
        else:
            process.start(wait=False)
        return process

    def close(self) -> None:
        for process in self.started:
            process.close()
        for path in self.dirs:
            _remove_tree(path)


@pytest.fixture
def start_broker(db_server: DatabaseServer) -> Iterator[BrokerFactory]:
    """Factory for extra brokers with custom configs; all stopped after the test."""
    factory = BrokerFactory(db_server)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def count_db_connections(db_server: DatabaseServer) -> Callable[[int], int]:
    """``count_db_connections(pid)``: that process's connections to the test server now."""
    return lambda pid: count_connections(pid, db_server.port)


@pytest.fixture
def count_broker_connections(broker: Broker) -> Callable[[], int]:
    """``count_broker_connections()``: the session broker's database connections now."""
    return broker.db_connections


# --- network faults between the broker and the database ------------------------


@pytest.fixture(scope="session")
def toxiproxy() -> Iterator[Toxiproxy]:
    """A real toxiproxy server (built by `make tools`) for the whole session."""
    binary = find_toxiproxy()
    if binary is None:
        pytest.fail("toxiproxy-server not found: run `make tools`", pytrace=False)
    server = Toxiproxy(binary).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_proxy(toxiproxy: Toxiproxy, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Proxy]]:
    """``make_proxy(upstream)``: a proxy of this test's own, deleted afterwards."""
    names: list[str] = []

    def make(upstream: str) -> Proxy:
        name = f"{re.sub(r'[^A-Za-z0-9_]', '_', request.node.name)[:40]}_{uuid.uuid4().hex[:6]}"
        names.append(name)
        return toxiproxy.proxy(name, upstream)

    yield make
    for name in names:
        with contextlib.suppress(Exception):
            toxiproxy.request("DELETE", f"/proxies/{name}")


@pytest.fixture
def proxy(make_proxy: Callable[[str], Proxy], db_server: DatabaseServer) -> Proxy:
    """A toxiproxy proxy in front of the test database server."""
    return make_proxy(f"{db_server.host}:{db_server.port}")


def proxied_config(factory: BrokerFactory, upstream: Proxy, **database_options: Any) -> dict[str, Any]:
    """The session broker's config, but reaching its database through ``upstream``."""
    config = factory.base_config(**database_options)
    config["databases"]["appdb"]["uri"] = f"mongodb://127.0.0.1:{upstream.port}/?directConnection=true"
    return config
