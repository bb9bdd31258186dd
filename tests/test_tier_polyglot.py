"""The Go and Node.js clients against a tier of three real brokers.

A shared broker tier is several replicas behind one name (a headless
Kubernetes Service); each client spreads its calls over all of them and
leaves one that drains. Here three brokers run on loopback TCP in front of
the test database, and each language's tier program
(``clients/go/cmd/tier``, ``clients/node/scripts/tier.js``) is given the
list of their addresses:

- spread: calls reach every replica (each broker's own Stats say so), and
  the database sees no more than three brokers' pools;
- drain: under steady inserts (client-made ``_id``) and reads, one replica
  gets SIGTERM; no caller sees an error, every acknowledged insert is
  stored exactly once, and the traffic moves to the other two;
- health: a replica draining with ``server.drain_delay_s`` still accepts
  calls, but its health is NOT_SERVING, and the clients send it no data call;
- TLS: a ``dns:///name:port`` tier checks each replica's certificate against
  the name, not the IP address it dialled (as the tier's certificates name
  the Service).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_client import BrokerClient
from bson import ObjectId
from pymongo import MongoClient

from harness.brokerproc import BrokerProcess
from harness.netconns import ConnectionSampler, connections_from_pid
from tests.conftest import DB_NAME, MAX_POOL_SIZE, MONGO_DB, BrokerFactory
from tests.toolchains import NODE_DIR, ROOT, build_go_program, require_grpc_js, tool

LANGUAGES = ("go", "node")
REPLICAS = 3
# pymongo's monitoring connections per server: the monitor and the RTT monitor.
MONITORS = 2
DATA_METHODS = ("Insert", "FindOne")
LOAD_WORKERS = 4
LINE_TIMEOUT_S = 60.0

Document = dict[str, Any]


@pytest.fixture(scope="module")
def go_tier(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The Go tier program, built once."""
    return [str(build_go_program(tmp_path_factory, "tier"))]


@pytest.fixture(scope="module")
def node_tier() -> list[str]:
    node = tool("node")
    require_grpc_js()
    return [node, str(NODE_DIR / "scripts" / "tier.js")]


@pytest.fixture(params=LANGUAGES)
def tier_program(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """(language, argv of its tier program)."""
    language: str = request.param
    argv: list[str] = request.getfixturevalue(f"{language}_tier")
    return language, argv


def start_tier(start_broker: BrokerFactory, **first: Any) -> list[BrokerProcess]:
    """Three brokers on loopback TCP, started side by side; ``first`` is the first one's [server] table."""
    replicas = []
    for index in range(REPLICAS):
        config = start_broker.base_config()
        if first and index == 0:
            config["server"] = first
        replicas.append(start_broker(config, wait=False))
    for replica in replicas:
        replica.wait_ready(timeout=60)
    return replicas


def data_rpcs(replica: BrokerProcess) -> dict[str, int]:
    """The replica's own count of data calls, by method, read from it directly.

    Over its Unix socket: the Python client health-checks a TCP target, and
    would not ask a draining replica.
    """
    with BrokerClient(replica.unix_target, timeout=10) as client:
        rpcs = client.stats(DB_NAME)[DB_NAME].rpcs
    return {method: rpcs.get(method, 0) for method in DATA_METHODS}


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


class Program:
    """A running tier program: JSON lines from its stdout, stdin to stop it."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def json_line(self, timeout: float = LINE_TIMEOUT_S) -> Document:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"`{' '.join(self.argv)}` printed nothing in {timeout} s:\n{''.join(self.stderr)}")
        if line is None:
            self.proc.wait(timeout=10)
            pytest.fail(
                f"`{' '.join(self.argv)}` exited {self.proc.returncode} early:\n{''.join(self.stderr)}"
            )
        loaded: Document = json.loads(line)
        return loaded

    def finish(self) -> Document:
        """Close stdin (the program's signal to stop) and read its summary."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        summary = self.json_line()
        assert self.proc.wait(timeout=30) == 0, "".join(self.stderr)
        return summary

    def close(self) -> None:
        """Kill the program if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for reader in self.readers:
            reader.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def running(argv: list[str], cwd: Path) -> Iterator[Program]:
    program = Program(argv, cwd)
    try:
        yield program
    finally:
        program.close()


def targets(replicas: list[BrokerProcess]) -> list[str]:
    return [replica.tcp_target for replica in replicas]


def stored_once(mongo: MongoClient[Document], collection: str, inserted: list[str]) -> None:
    """Every acknowledged insert is in the database once, and nothing else is."""
    ids = [ObjectId(hex_id) for hex_id in inserted]
    assert ids, "the load inserted nothing"
    assert len(set(ids)) == len(ids), "the client reported one _id twice"
    stored = mongo[MONGO_DB][collection]
    assert stored.count_documents({}) == len(ids), (
        f"{stored.count_documents({})} documents stored, {len(ids)} inserts acknowledged"
    )
    assert stored.count_documents({"_id": {"$in": ids}}) == len(ids)
    pairs = {(doc["worker"], doc["seq"]) for doc in stored.find({}, {"worker": 1, "seq": 1})}
    assert len(pairs) == len(ids), "one (worker, seq) stored under two _ids"


# --- spread ---------------------------------------------------------------------


def test_calls_spread_over_every_replica(
    tier_program: tuple[str, list[str]],
    start_broker: BrokerFactory,
    db_server: Any,
    collection_name: str,
    record_property: Callable[[str, object], None],
) -> None:
    language, argv = tier_program
    replicas = start_tier(start_broker)
    before = [data_rpcs(replica) for replica in replicas]

    def db_connections() -> set[tuple[int, int]]:
        # Tagged by broker, so that equal port pairs of two brokers both count.
        return {
            (index, local)
            for index, replica in enumerate(replicas)
            for local, _ in connections_from_pid(replica.pid, db_server.port)
        }

    with (
        ConnectionSampler(db_connections) as sampler,
        running([*argv, "spread", DB_NAME, collection_name, "300", *targets(replicas)], ROOT) as program,
    ):
        summary = program.json_line()
        assert program.proc.wait(timeout=30) == 0, "".join(program.stderr)
    assert summary["errors"] == [], summary["errors"]
    after = [data_rpcs(replica) for replica in replicas]
    shares = [a["FindOne"] - b["FindOne"] for a, b in zip(after, before, strict=True)]
    record_property(f"{language}_findone_shares", shares)
    record_property(f"{language}_peak_db_connections", sampler.peak)
    print(f"{language}: FindOne per replica {shares}, peak DB connections {sampler.peak}")
    assert sum(shares) == 150, f"{sum(shares)} FindOne calls counted, 150 made"
    assert all(share > 0 for share in shares), f"a replica got no call: {shares}"
    assert sampler.samples > 0
    assert sampler.peak <= REPLICAS * (MAX_POOL_SIZE + MONITORS), sampler.peak


# --- drain ----------------------------------------------------------------------


def test_a_replica_drains_under_load_without_a_caller_error(
    tier_program: tuple[str, list[str]],
    start_broker: BrokerFactory,
    mongo: MongoClient[Document],
    collection_name: str,
    record_property: Callable[[str, object], None],
) -> None:
    language, argv = tier_program
    replicas = start_tier(start_broker)
    victim, survivors = replicas[0], replicas[1:]
    with running(
        [*argv, "load", DB_NAME, collection_name, str(LOAD_WORKERS), *targets(replicas)], ROOT
    ) as program:
        assert program.json_line() == {"ready": True}
        assert total(data_rpcs(victim)) > 0, "the replica to drain got no calls before the signal"
        os.kill(victim.pid, signal.SIGTERM)
        signalled = time.monotonic()
        at_signal = [total(data_rpcs(replica)) for replica in survivors]
        assert victim.wait(timeout=30) == 0, victim.log_tail()
        drained_s = time.monotonic() - signalled
        time.sleep(1.0)  # load on the two that are left
        after = [total(data_rpcs(replica)) for replica in survivors]
        summary = program.finish()
    record_property(f"{language}_drain_retries", summary["retries"])
    record_property(f"{language}_drain_inserts", len(summary["inserted"]))
    print(
        f"{language}: {len(summary['inserted'])} inserts, {summary['retries']} retries, "
        f"{len(summary['errors'])} errors; survivors' data calls {at_signal} -> {after}; "
        f"the replica exited {drained_s:.1f} s after SIGTERM"
    )
    assert summary["errors"] == [], summary["errors"]
    stored_once(mongo, collection_name, summary["inserted"])
    assert all(late > early for early, late in zip(at_signal, after, strict=True)), (at_signal, after)


# --- health ---------------------------------------------------------------------

DRAIN_DELAY_S = 5.0
HEALTH_SETTLE_S = 0.3  # for the NOT_SERVING update to reach the client


def test_a_not_serving_replica_gets_no_new_calls(
    tier_program: tuple[str, list[str]],
    start_broker: BrokerFactory,
    mongo: MongoClient[Document],
    collection_name: str,
) -> None:
    language, argv = tier_program
    replicas = start_tier(start_broker, drain_delay_s=DRAIN_DELAY_S)
    victim, survivors = replicas[0], replicas[1:]
    with running(
        [*argv, "load", DB_NAME, collection_name, str(LOAD_WORKERS), *targets(replicas)], ROOT
    ) as program:
        assert program.json_line() == {"ready": True}
        assert total(data_rpcs(victim)) > 0
        os.kill(victim.pid, signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(HEALTH_SETTLE_S)
        settled = data_rpcs(victim)
        survivors_settled = [total(data_rpcs(replica)) for replica in survivors]
        time.sleep(DRAIN_DELAY_S - HEALTH_SETTLE_S - 1.5)
        late = data_rpcs(victim)  # still within the delay: the replica answers Stats
        assert time.monotonic() - signalled < DRAIN_DELAY_S, "too slow to look within the drain delay"
        survivors_late = [total(data_rpcs(replica)) for replica in survivors]
        summary = program.finish()
    print(
        f"{language}: draining replica's data calls {settled} -> {late}; "
        f"survivors {survivors_settled} -> {survivors_late}"
    )
    assert late == settled, f"the NOT_SERVING replica got data calls: {settled} -> {late}"
    assert all(b > a for a, b in zip(survivors_settled, survivors_late, strict=True))
    assert summary["errors"] == [], summary["errors"]
    stored_once(mongo, collection_name, summary["inserted"])


# --- TLS ------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def localhost_certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (ca.pem) and a server certificate for the name localhost only, no IP address."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the TLS test's certificate", pytrace=False)
    pki = tmp_path_factory.mktemp("tier-pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=tier-test-ca", cwd=pki)  # fmt: skip
    (pki / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=pki)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=pki)  # fmt: skip
    return pki


def test_a_dns_tier_checks_the_certificate_against_the_name(
    tier_program: tuple[str, list[str]],
    start_broker: BrokerFactory,
    localhost_certificate: Path,
    collection_name: str,
) -> None:
    language, argv = tier_program
    config = start_broker.base_config()
    config["listen"] = {
        **config["listen"],
        "tls_cert_file": str(localhost_certificate / "server.pem"),
        "tls_key_file": str(localhost_certificate / "server.key"),
    }
    replica = start_broker(config)
    port = replica.tcp_target.rsplit(":", 1)[1]
    env = {**os.environ, "MONGO_BROKER_CA_FILE": str(localhost_certificate / "ca.pem")}

    def spread(target: str) -> Document:
        result = subprocess.run(
            [*argv, "spread", DB_NAME, collection_name, "20", target],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        summary: Document = json.loads(result.stdout)
        return summary

    by_name = spread(f"dns:///localhost:{port}")
    assert by_name["errors"] == [], f"{language}: {by_name['errors'][:3]}"
    # The same replica as an address: the certificate names no IP address,
    # so every call fails, which shows the name was what passed the check.
    by_address = spread(f"127.0.0.1:{port}")
    assert len(by_address["errors"]) == 20, f"{language}: {by_address['errors'][:3]}"
