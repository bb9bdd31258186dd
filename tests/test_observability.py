"""What operators and callers learn about calls: access log, trailers, ErrorInfo, counts, RetryInfo.

A real broker over real gRPC in front of the real test database; faults
between them come from toxiproxy, never from a mocked database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import bson
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.logs import log_value
from tests.rpc import database_stats, eventually, fails, open_stub, pb

WEB = "web-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
FORGED = "2026-01-01 00:00:00,000 INFO mongo_broker.access: Find db=appdb coll=y code=OK ms=1.00 rid=forged"


def _md(token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    auth = () if token is None else (("authorization", f"Bearer {token}"),)
    return (*auth, ("x-request-id", request_id))


@pytest.fixture
def secured(start_broker):
    config = start_broker.base_config()
    config["auth"] = {
        "tokens": [
            {"name": "web", "token": WEB, "databases": ["appdb"], "collections": ["items*"]},
            {"name": "admin", "token": ADMIN},
        ]
    }
    return start_broker(config)


# --- the access log cannot be forged ---------------------------------------------


def _access_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "mongo_broker.access:" in line]


def _fields(line: str) -> dict[str, str]:
    """The key=value pairs of an access line, split as the README says (quotes, then the first =)."""
    message = line.split("mongo_broker.access: ", 1)[1]
    method, *pairs = shlex.split(message, posix=True)
    return {"method": method, **dict(pair.split("=", 1) for pair in pairs)}


@pytest.mark.parametrize(
    ("token", "where", "code"),
    [
        (None, "collection", "UNAUTHENTICATED"),
        (WEB, "collection", "PERMISSION_DENIED"),
        (WEB, "database", "PERMISSION_DENIED"),
        (ADMIN, "database", "NOT_FOUND"),
        (ADMIN, "collection", None),  # whatever the database makes of the name
    ],
)
def test_a_name_with_a_line_break_writes_exactly_one_access_line(secured, token, where, code):
    rid = f"forge-{where}-{code or 'any'}"
    name = f"x\n{FORGED}\r\n{FORGED}\u2028{FORGED}"
    request = pb.FindRequest(database="appdb", collection="items")
    setattr(request, where, name)
    with open_stub(secured.unix_target) as stub:
        try:
            list(stub.Find(request, metadata=_md(token, rid), timeout=10))
            answered = "OK"
        except grpc.RpcError as exc:
            answered = exc.code().name
    if code is not None:
        assert answered == code
    assert eventually(lambda: f"rid={rid}" in secured.log_text())
    lines = _access_lines(secured.log_text())
    ours = [line for line in lines if f"rid={rid}" in line]
    assert len(ours) == 1, ours
    assert not [line for line in lines if "rid=forged" in line], lines
    (line,) = ours
    fields = _fields(line)
    assert fields["code"] == answered and fields["rid"] == rid
    # The name reads back exactly: the escapes are a Python string literal's.
    logged = fields["db" if where == "database" else "coll"]
    assert logged == name.encode("unicode_escape").decode().replace("=", "\\x3d")
    assert re.findall(r"\bcode=(\S+)", line) == [answered]


def test_sigusr1_lists_a_call_with_a_line_break_in_its_name_on_one_line(start_broker, proxy):
    from tests.conftest import proxied_config

    proc = start_broker(proxied_config(start_broker, proxy, heartbeat_frequency_ms=60_000))
    name = f"stuck\n{FORGED}"
    with open_stub(proc.unix_target) as stub:
        stub.Ping(pb.PingRequest(database="appdb"), timeout=10)
        proxy.add_toxic("latency", latency=1500)
        request = pb.FindRequest(database="appdb", collection=name)
        finding = ThreadPoolExecutor(1).submit(
            lambda: list(stub.Find(request, metadata=(("x-request-id", "stuck-find"),), timeout=10))
        )
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGUSR1)
        assert eventually(lambda: "SIGUSR1: 1 calls in flight" in proc.log_text())
        with contextlib.suppress(grpc.RpcError):
            finding.result(timeout=20)
    lines = proc.log_text().splitlines()
    (listed,) = [line for line in lines if "rid=stuck-find" in line and "stage=" in line]
    assert f" coll={log_value(name)} rid=stuck-find " in listed, listed
    assert not [line for line in lines if "rid=forged" in line], lines
    # Only the first line of each record starts in column 0.
    assert not [line for line in lines if line.startswith("2026-01-01")], lines


def test_json_access_lines_keep_the_exact_names(start_broker):
    config = start_broker.base_config()
    config["log"] = {"format": "json"}
    proc = start_broker(config)
    name = f"x\n{FORGED}\u2028"
    with open_stub(proc.unix_target) as stub:
        list(stub.Find(pb.FindRequest(database="appdb", collection=name), metadata=(("x-request-id", "j1"),)))
    assert eventually(lambda: '"request_id": "j1"' in proc.log_text())
    entries = [json.loads(line) for line in proc.log_text().splitlines()]  # every line is one JSON object
    (entry,) = [e for e in entries if e.get("request_id") == "j1"]
    assert entry["collection"] == name and entry["code"] == "OK"
    assert "\n" not in entry["msg"]


# --- a scoped token learns only its own databases' names --------------------------

SCOPED = "scoped-token-0123456789abcdef"


@pytest.fixture
def many_databases(start_broker, db_server):
    config = start_broker.base_config()
    for name in ("archive", "secretdb"):
        config["databases"][name] = {"uri": db_server.uri, "database": "broker_test"}
    config["auth"] = {
        "tokens": [
            {"name": "scoped", "token": SCOPED, "databases": ["app*"]},
            {"name": "admin", "token": ADMIN},
        ]
    }
    return start_broker(config)


def test_not_found_lists_only_the_databases_the_token_may_use(many_databases):
    scoped = (("authorization", f"Bearer {SCOPED}"),)
    with open_stub(many_databases.unix_target) as stub:
        calls = {
            "Find": lambda db: list(stub.Find(pb.FindRequest(database=db, collection="c"), metadata=scoped)),
            "FindOne": lambda db: stub.FindOne(pb.FindRequest(database=db, collection="c"), metadata=scoped),
            "Ping": lambda db: stub.Ping(pb.PingRequest(database=db), metadata=scoped, timeout=10),
            "Stats": lambda db: stub.Stats(pb.StatsRequest(database=db), metadata=scoped, timeout=10),
        }
        for method, call in calls.items():
            with fails(grpc.StatusCode.NOT_FOUND, "UNKNOWN_DATABASE") as failure:
                call("appmissing")
            assert "'appdb'" in failure.message, (method, failure.message)
            assert "archive" not in failure.message and "secretdb" not in failure.message, failure.message
            # A configured database outside the token's scope answers exactly
            # as an unconfigured one does: no probing for names.
            answers = []
            for name in ("secretdb", "nosuchdb"):
                with fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as denied:
                    call(name)
                answers.append(denied.message.replace(name, "NAME"))
            assert answers[0] == answers[1], (method, answers)
        # An unscoped token still sees every configured name.
        with fails(grpc.StatusCode.NOT_FOUND, "UNKNOWN_DATABASE") as failure:
            stub.Ping(pb.PingRequest(database="nope"), metadata=(("authorization", f"Bearer {ADMIN}"),))
        assert all(f"'{name}'" in failure.message for name in ("appdb", "archive", "secretdb"))


# --- ErrorInfo carries what the README says, on real errors ----------------------


def test_duplicate_key_error_info_has_code_name_index_and_count(broker, stub, collection_name):
    documents = [bson.encode({"_id": n}) for n in (1, 2, 1)]
    stub.Insert(pb.InsertRequest(database="appdb", collection=collection_name, documents=[documents[0]]))
    with fails(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY") as failure:
        request = pb.InsertRequest(database="appdb", collection=collection_name, documents=documents[1:])
        stub.Insert(request, timeout=10)
    # A write error has a code but no codeName: the name comes from MongoDB's table.
    assert failure.metadata == {
        "database": "appdb",
        "mongo_code": "11000",
        "mongo_code_name": "DuplicateKey",
        "inserted_count": "1",
        "failed_index": "1",
    }


def test_a_refused_query_carries_the_servers_code_name(broker, stub, collection_name):
    stub.Insert(pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({})]))
    for call in (stub.FindOne, lambda r, **kw: list(stub.Find(r, **kw))):
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "QUERY_REJECTED") as failure:
            call(
                pb.FindRequest(
                    database="appdb", collection=collection_name, filter=bson.encode({"a": {"$bogus": 1}})
                ),
                timeout=10,
            )
        assert failure.metadata == {"database": "appdb", "mongo_code": "2", "mongo_code_name": "BadValue"}


def test_a_network_error_carries_the_drivers_error_labels(start_broker, proxy, collection_name):
    from tests.conftest import proxied_config

    # No pooled connection survives to the call (max_idle_time_ms), and the
    # heartbeat is too slow to notice the fault first: the call itself opens
    # a connection, which the proxy cuts during the handshake.
    config = proxied_config(
        start_broker, proxy, min_pool_size=0, max_idle_time_ms=50, heartbeat_frequency_ms=60_000
    )
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        insert = pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({})])
        stub.Insert(insert, timeout=10)
        time.sleep(0.2)
        proxy.add_toxic("limit_data", bytes=10)
        with fails(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE") as failure:
            stub.Insert(insert, timeout=10)
    assert "mongo_code" not in failure.metadata
    assert "RetryableWriteError" in failure.metadata["mongo_labels"].split(","), failure.metadata


# --- Ping and Stats are calls like the others ------------------------------------


def _request_id(call) -> str:
    return str(dict(call.trailing_metadata())["x-request-id"])


def test_ping_and_stats_send_the_request_id_in_the_trailers(secured):
    admin = (("authorization", f"Bearer {ADMIN}"),)
    with open_stub(secured.unix_target) as stub:
        calls = {
            "ping-all": lambda md: stub.Ping.with_call(pb.PingRequest(), metadata=md, timeout=10),
            "ping-one": lambda md: stub.Ping.with_call(
                pb.PingRequest(database="appdb"), metadata=md, timeout=10
            ),
            "stats-all": lambda md: stub.Stats.with_call(pb.StatsRequest(), metadata=md, timeout=10),
            "stats-one": lambda md: stub.Stats.with_call(
                pb.StatsRequest(database="appdb"), metadata=md, timeout=10
            ),
        }
        for name, call in calls.items():
            _, done = call((*admin, ("x-request-id", f"rid-{name}")))
            assert _request_id(done) == f"rid-{name}", name
            _, done = call(admin)
            assert re.fullmatch(r"[0-9a-f]{16}", _request_id(done)), name
            # On errors too: unauthenticated, and (for Stats) an unknown database.
            with pytest.raises(grpc.RpcError) as caught:
                call((("x-request-id", f"bad-{name}"),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _request_id(caught.value) == f"bad-{name}", name
        with pytest.raises(grpc.RpcError) as caught:
            stub.Stats(pb.StatsRequest(database="nope"), metadata=(*admin, ("x-request-id", "rid-nope")))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _request_id(caught.value) == "rid-nope"
    # And each is in the access log with its id and code.
    assert eventually(lambda: "rid=rid-nope" in secured.log_text())
    lines = _access_lines(secured.log_text())
    for name in ("ping-all", "ping-one", "stats-all", "stats-one"):
        for rid, code in ((f"rid-{name}", "OK"), (f"bad-{name}", "UNAUTHENTICATED")):
            (line,) = [line for line in lines if f"rid={rid}" in line]
            fields = _fields(line)
            assert fields["method"] == name.split("-")[0].title() and fields["code"] == code, line
    (line,) = [line for line in lines if "rid=rid-nope" in line]
    assert _fields(line)["code"] == "NOT_FOUND" and _fields(line)["db"] == "nope"


def test_a_ping_of_every_database_is_counted_under_each(start_broker, db_server):
    config = start_broker.base_config()
    config["databases"]["other"] = {"uri": db_server.uri, "database": "broker_test"}
    config["metrics"] = {"listen": "127.0.0.1:0"}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        for _ in range(3):
            reply = stub.Ping(pb.PingRequest(), timeout=10)
            assert sorted(d.database for d in reply.databases) == ["appdb", "other"]
        stub.Ping(pb.PingRequest(database="other"), timeout=10)
        stats = {db.database: db for db in stub.Stats(pb.StatsRequest(), timeout=10).databases}
    assert dict(stats["appdb"].rpcs) == {"Ping": 3}
    assert dict(stats["other"].rpcs) == {"Ping": 4}
    assert stats["appdb"].rpcs_in_flight == 0 and stats["other"].rpcs_in_flight == 0
    ready = json.loads(proc.ready_path.read_text())
    with urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = {
        (s.labels["method"], s.labels["database"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "mongo_broker_rpc_duration_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    }
    assert counts[("Ping", "appdb", "OK")] == 3
    assert counts[("Ping", "other", "OK")] == 4
    assert ("Ping", "", "OK") not in counts
    # Stats is timed, but under no database: reading it does not count in it.
    assert counts[("Stats", "", "OK")] == 1


def test_a_ping_of_every_database_still_running_after_the_grace_gets_shutting_down(start_broker, proxy):
    from tests.conftest import proxied_config

    config = proxied_config(start_broker, proxy, heartbeat_frequency_ms=60_000)
    config["server"] = {"shutdown_grace_s": 0.5}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        stub.Ping(pb.PingRequest(), timeout=10)
        proxy.add_toxic("latency", latency=4000)
        pinging = ThreadPoolExecutor(1).submit(
            lambda: stub.Ping.with_call(pb.PingRequest(), metadata=(("x-request-id", "drained-ping"),))
        )
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as caught:
            pinging.result(timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (caught.value.details() or "")
    assert _request_id(caught.value) == "drained-ping"
    assert proc.wait(timeout=15) == 0
    log = proc.log_text()
    assert "drained 0 call(s), aborted 1 with UNAVAILABLE" in log
    (line,) = [line for line in _access_lines(log) if "rid=drained-ping" in line]
    assert _fields(line)["code"] == "UNAVAILABLE"


# --- a document larger than gRPC's default 4 MiB receive limit ------------------


def test_a_10_mib_document_needs_the_documented_receive_limit(broker, stub, collection_name):
    from broker_client import BrokerClient
    from broker_client.proto.broker.v1 import broker_pb2_grpc

    big = "x" * (10 * 1024 * 1024)
    reply = stub.Insert(
        pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"big": big})]),
        timeout=30,
    )
    request = pb.FindRequest(database="appdb", collection=collection_name, filter=reply.inserted_ids[0])
    # gRPC's own default (4 MiB) refuses the message ...
    with grpc.insecure_channel(broker.unix_target) as channel:
        raw = broker_pb2_grpc.BrokerStub(channel)
        for call in (raw.FindOne, lambda r, **kw: list(raw.Find(r, **kw))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # ... and the limit the README gives lets it through, as the bundled client does.
    options = [("grpc.max_receive_message_length", 17825792)]
    with grpc.insecure_channel(broker.unix_target, options=options) as channel:
        raw = broker_pb2_grpc.BrokerStub(channel)
        (found,) = raw.FindOne(request, timeout=30).documents
        assert bson.decode(found)["big"] == big
        (streamed,) = [d for m in raw.Find(request, timeout=30) for d in m.documents]
        assert streamed == found
    with BrokerClient(broker.unix_target) as client:
        collection = client[broker.db_name][collection_name]
        one = collection.find_one()
        assert one is not None and one["big"] == big
        assert [d["big"] for d in collection.find()] == [big]


# --- RetryInfo on POOL_EXHAUSTED follows the queue ------------------------------


def _retry_delay_s(error) -> float | None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def test_retry_info_on_a_full_queue_of_fast_calls_is_milliseconds(
    start_broker, collection_name, record_property
):
    proc = start_broker(start_broker.base_config(max_pool_size=1, max_waiting=1))
    delays: list[float] = []
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({})])
        )
        request = pb.FindRequest(database="appdb", collection=collection_name)
        end = time.monotonic() + 20

        def caller() -> None:
            while time.monotonic() < end and len(delays) < 20:
                try:
                    stub.FindOne(request, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    delay = _retry_delay_s(exc)
                    assert delay is not None
                    delays.append(delay)

        with ThreadPoolExecutor(12) as pool:
            for future in [pool.submit(caller) for _ in range(12)]:
                future.result(timeout=30)
        hold_ms = database_stats(stub).mean_hold_ms
    record_property("retry_after_ms", sorted(round(d * 1000, 2) for d in delays))
    assert len(delays) >= 5, "the queue never filled"
    # Calls of a few milliseconds: the hint is milliseconds too, not a second.
    assert all(0.005 <= d <= 0.25 for d in delays), (sorted(delays), hold_ms)
