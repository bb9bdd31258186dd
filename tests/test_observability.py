"""What operators and callers learn about calls: access log, trailers, ErrorInfo, counts, RetryInfo.

A real broker over real gRPC in front of the real test database; faults
between them come from toxiproxy, never from a mocked database.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable

import bson
import grpc
import pytest

from tests.rpc import fails, open_stub, pb

WEB = "web-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
FORGED = "2026-01-01 00:00:00,000 INFO mongo_broker.access: Find db=appdb coll=y code=OK ms=1.00 rid=forged"


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


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
    assert _eventually(lambda: f"rid={rid}" in secured.log_text())
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
