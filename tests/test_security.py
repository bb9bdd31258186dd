"""Security: tokens, allowlists, read-only, operator guard, limits, TLS, secrets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bson
import grpc
import psutil
import pytest

from harness.process import free_port
from tests.rawbson import Raw, array, deep, document
from tests.rpc import fails, find_all, open_stub, pb

WEB = "web-token-0123456789abcdef"
REPORTS = "reports-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


@pytest.fixture
def secured(start_broker, tmp_path, db_server):
    token_file = tmp_path / "reports.token"
    token_file.write_text(REPORTS + "\n")
    config = start_broker.base_config()
    config["databases"]["archive"] = {"uri": db_server.uri, "database": "broker_test", "read_only": True}
    config["auth"] = {
        "tokens": [
            {"name": "web", "token": WEB, "databases": ["appdb"], "collections": ["items*", "orders"]},
            {"name": "reports", "token_file": str(token_file), "read_only": True},
            {"name": "admin", "token_env": "ADMIN_TOKEN"},
        ]
    }
    return start_broker(config, env={"ADMIN_TOKEN": ADMIN})


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", token),)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer ",
        f"Bearer {WEB[:-1]}",  # near miss
        f"Bearer {WEB}x",
        f"Basic {WEB}",
        WEB,  # no scheme
        "Bearer " + "x" * 5000,  # over-long
    ],
    ids=["missing", "empty", "blank", "near-miss", "extra-char", "wrong-scheme", "no-scheme", "over-long"],
)
def test_bad_tokens_are_unauthenticated_and_nothing_reaches_the_database(
    secured, collection_name, header, mongo
):
    with open_stub(secured.unix_target) as stub:
        before = stub.Stats(pb.StatsRequest(), metadata=_md(f"Bearer {ADMIN}"), timeout=5)
        sent_before = {db.database: dict(db.operations) for db in before.databases}
        with fails(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"):
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode({"a": 1})]
                ),
                metadata=_md(header),
                timeout=5,
            )
        with fails(grpc.StatusCode.UNAUTHENTICATED):
            find_all_md(stub, collection_name, _md(header))
        with fails(grpc.StatusCode.UNAUTHENTICATED):
            stub.Ping(pb.PingRequest(), metadata=_md(header), timeout=5)
        after = stub.Stats(pb.StatsRequest(), metadata=_md(f"Bearer {ADMIN}"), timeout=5)
        assert {db.database: dict(db.operations) for db in after.databases} == sent_before
    assert mongo["broker_test"][collection_name].count_documents({}) == 0


def find_all_md(stub, collection: str, metadata, database: str = "appdb", **fields):
    request = pb.FindRequest(database=database, collection=collection, **fields)
    return [d for m in stub.Find(request, metadata=metadata, timeout=10) for d in m.documents]


@pytest.mark.parametrize(
    ("token", "database", "collection", "write", "expected"),
    [
        (WEB, "appdb", "items", True, grpc.StatusCode.OK),
        (WEB, "appdb", "items_2024", False, grpc.StatusCode.OK),
        (WEB, "appdb", "orders", True, grpc.StatusCode.OK),
        (WEB, "appdb", "users", False, grpc.StatusCode.PERMISSION_DENIED),
        (WEB, "archive", "items", False, grpc.StatusCode.PERMISSION_DENIED),
        (REPORTS, "appdb", "users", False, grpc.StatusCode.OK),
        (REPORTS, "appdb", "users", True, grpc.StatusCode.PERMISSION_DENIED),
        (REPORTS, "archive", "items", False, grpc.StatusCode.OK),
        (ADMIN, "archive", "items", True, grpc.StatusCode.PERMISSION_DENIED),  # database read-only
        (ADMIN, "appdb", "anything", True, grpc.StatusCode.OK),
    ],
)
def test_token_allowlist_matrix(secured, token, database, collection, write, expected):
    with open_stub(secured.unix_target) as stub:
        metadata = _md(f"Bearer {token}")
        try:
            if write:
                stub.Insert(
                    pb.InsertRequest(
                        database=database, collection=collection, documents=[bson.encode({"a": 1})]
                    ),
                    metadata=metadata,
                    timeout=10,
                )
            else:
                find_all_md(stub, collection, metadata, database=database)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.PERMISSION_DENIED:
                details = exc.details() or ""
                assert "may not" in details or "read-only" in details
    assert code == expected


def test_restricted_token_sees_only_its_databases_in_ping_and_stats(secured):
    with open_stub(secured.unix_target) as stub:
        ping = stub.Ping(pb.PingRequest(), metadata=_md(f"Bearer {WEB}"), timeout=10)
        assert [db.database for db in ping.databases] == ["appdb"]
        stats = stub.Stats(pb.StatsRequest(), metadata=_md(f"Bearer {WEB}"), timeout=10)
        assert [db.database for db in stats.databases] == ["appdb"]
        with fails(grpc.StatusCode.PERMISSION_DENIED):
            stub.Stats(pb.StatsRequest(database="archive"), metadata=_md(f"Bearer {WEB}"), timeout=10)


# --- operator guard ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "document", "path"),
    [
        ("filter", {"$where": "sleep(1000) || true"}, "filter.$where"),
        ("filter", {"a": {"$elemMatch": {"$where": "1"}}}, "filter.a.$elemMatch.$where"),
        ("filter", {"$or": [{"a": 1}, {"$and": [{"$where": "1"}]}]}, "filter.$or[1].$and[0].$where"),
        (
            "filter",
            {"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}},
            "filter.$expr.$function",
        ),
        ("projection", {"x": {"$accumulator": {}}}, "projection.x.$accumulator"),
    ],
)
def test_server_side_javascript_is_refused_at_any_depth(broker, collection_name, field, document, path):
    with open_stub(broker.unix_target) as stub, fails(grpc.StatusCode.PERMISSION_DENIED) as failure:
        find_all(stub, database="appdb", collection=collection_name, **{field: bson.encode(document)})
    assert failure.message.startswith(path)
    assert "security.allow_js_operators" in failure.message


_JS_FUNCTION = {"$function": {"body": "function () { return true; }", "args": [], "lang": "js"}}


@pytest.mark.parametrize(
    ("field", "raw", "path"),
    [
        # A decoded dict keeps the last of two equal keys; a server may act on
        # the first. Each of these decodes to something harmless.
        (
            "filter",
            document(
                (
                    "$or",
                    array(
                        document(("$and", array({"$where": "sleep(100) || true"})), ("$and", array({"a": 1})))
                    ),
                )
            ),
            "filter.$or[0].$and",
        ),
        ("filter", document(("$expr", _JS_FUNCTION), ("$expr", {"$eq": [1, 1]})), "filter.$expr"),
        ("projection", document(("x", _JS_FUNCTION), ("x", 1)), "projection.x"),
        ("filter", document(("a", 1), ("b", {"c": [{"d": 1}]}), ("a", 2)), "filter.a"),
        ("sort", document(("a", 1), ("a", -1)), "sort.a"),
    ],
    ids=["hidden-where", "hidden-function-in-expr", "hidden-function-in-projection", "top-level", "sort"],
)
def test_duplicate_keys_are_refused_so_the_guard_sees_what_the_server_sees(
    broker, collection_name, field, raw, path
):
    with (
        open_stub(broker.unix_target) as stub,
        fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure,
    ):
        find_all(stub, database="appdb", collection=collection_name, **{field: raw})
    assert failure.message.startswith(f"{path}: duplicate key")


def test_duplicate_keys_cannot_carry_a_deep_document_past_the_depth_limit(broker, collection_name):
    # Decoded, the second "n" hides the first, 150 levels deep.
    raw = document(("n", Raw(deep(150))), ("n", 1))
    with open_stub(broker.unix_target) as stub:
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure:
            find_all(stub, database="appdb", collection=collection_name, filter=raw)
        assert "limits.max_bson_depth (100)" in failure.message
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED"):
            stub.Insert(pb.InsertRequest(database="appdb", collection=collection_name, documents=[raw]))


def test_duplicate_keys_in_extended_json_are_refused(broker, collection_name, mongo):
    hidden = '{"$or": [{"$and": [{"$where": "sleep(100) || true"}], "$and": [{"a": 1}]}]}'
    with open_stub(broker.unix_target) as stub:
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
            find_all(
                stub,
                database="appdb",
                collection=collection_name,
                encoding=pb.ENCODING_RELAXED_JSON,
                filter_json=hidden,
            )
        assert failure.message.startswith("filter_json.$or[0].$and: duplicate key")
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    encoding=pb.ENCODING_RELAXED_JSON,
                    json_documents=['{"ok": 1}', '{"_id": 1, "n": {"$numberLong": "1", "$numberLong": "2"}}'],
                )
            )
        assert failure.message.startswith("json_documents[1].n.$numberLong: duplicate key")
    assert mongo["broker_test"][collection_name].count_documents({}) == 0


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        (
            {"filter": bson.encode({"a": {"$ref": "c", "$id": 1, "$where": "sleep(100) || true"}})},
            "filter.a.$where",
        ),
        (
            {"projection": bson.encode({"x": {"$ref": "c", "$id": 1, "$db": "d", "y": _JS_FUNCTION}})},
            "projection.x.y.$function",
        ),
        (
            {
                "encoding": pb.ENCODING_RELAXED_JSON,
                "filter_json": '{"a": {"$ref": "c", "$id": 1, "$where": "sleep(100) || true"}}',
            },
            "filter.a.$where",
        ),
    ],
    ids=["bson", "bson-projection", "extended-json"],
)
def test_dbref_shaped_documents_do_not_hide_operators(broker, collection_name, fields, path):
    # bson.decode (and json_util) turn {$ref, $id, ...} into a DBRef object,
    # whose other keys a guard on decoded values never saw.
    with (
        open_stub(broker.unix_target) as stub,
        fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as failure,
    ):
        find_all(stub, database="appdb", collection=collection_name, **fields)
    assert failure.message.startswith(path)
    assert "security.allow_js_operators" in failure.message


def _deep_json(levels: int) -> str:
    return '{"n": ' * (levels - 1) + '{"leaf": 1}' + "}" * (levels - 1)


@pytest.mark.parametrize("levels", [2000, 100_000])
@pytest.mark.parametrize(
    "field", ["filter", "projection", "sort", "hint_keys", "filter_json", "document", "json_document"]
)
def test_any_depth_is_limit_exceeded(broker, collection_name, mongo, field, levels):
    # Past about 985 levels bson.decode's C recursion used to fail first,
    # with Python's RecursionError text and reason INVALID_BSON.
    with (
        open_stub(broker.unix_target) as stub,
        fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure,
    ):
        if field == "document":
            stub.Insert(
                pb.InsertRequest(database="appdb", collection=collection_name, documents=[deep(levels)])
            )
        elif field == "json_document":
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    encoding=pb.ENCODING_RELAXED_JSON,
                    json_documents=[_deep_json(levels)],
                )
            )
        elif field == "filter_json":
            find_all(
                stub,
                database="appdb",
                collection=collection_name,
                encoding=pb.ENCODING_RELAXED_JSON,
                filter_json=_deep_json(levels),
            )
        else:
            find_all(stub, database="appdb", collection=collection_name, **{field: deep(levels)})
    assert "limits.max_bson_depth" in failure.message
    assert "recursion" not in failure.message.lower()
    assert mongo["broker_test"][collection_name].count_documents({}) == 0


def test_operator_guard_can_be_switched_off(start_broker, collection_name):
    config = start_broker.base_config()
    config["security"] = {"allow_js_operators": True}
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        # Passed on to the server, which decides (FerretDB refuses it as bad input).
        try:
            find_all(
                stub, database="appdb", collection=collection_name, filter=bson.encode({"$where": "true"})
            )
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.PERMISSION_DENIED
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


# --- limits ----------------------------------------------------------------------


@pytest.fixture
def limited(start_broker):
    config = start_broker.base_config()
    config["limits"] = {
        "max_insert_documents": 5,
        "max_find_documents": 7,
        "max_bson_depth": 10,
        "max_request_bytes": 256 * 1024,
    }
    return start_broker(config)


def _nested(depth: int) -> dict:
    document: dict = {"leaf": 1}
    for _ in range(depth - 1):
        document = {"n": document}
    return document


def test_limits_name_themselves(limited, collection_name, mongo):
    with open_stub(limited.unix_target) as stub:
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    documents=[bson.encode({"n": n}) for n in range(6)],
                )
            )
        assert "limits.max_insert_documents (5)" in failure.message
        stub.Insert(
            pb.InsertRequest(
                database="appdb",
                collection=collection_name,
                documents=[bson.encode({"n": n}) for n in range(5)],
            )
        )
        stub.Insert(
            pb.InsertRequest(
                database="appdb",
                collection=collection_name,
                documents=[bson.encode({"n": n}) for n in range(5, 10)],
            )
        )
        # Depth: 10 levels pass, 11 do not, in documents and in filters.
        stub.Insert(
            pb.InsertRequest(
                database="appdb", collection=collection_name, documents=[bson.encode(_nested(9))]
            )
        )
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection=collection_name, documents=[bson.encode(_nested(11))]
                )
            )
        assert "limits.max_bson_depth (10)" in failure.message
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED"):
            find_all(stub, database="appdb", collection=collection_name, filter=bson.encode(_nested(11)))
        # Find cap: a result within the cap is whole; a larger one ends with an error, never short.
        documents, _ = find_all(
            stub, database="appdb", collection=collection_name, filter=bson.encode({"n": {"$lt": 7}})
        )
        assert len(documents) == 7
        received: list[bytes] = []
        with fails(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED") as failure:
            for message in stub.Find(
                pb.FindRequest(database="appdb", collection=collection_name), timeout=10
            ):
                received.extend(message.documents)
        assert len(received) == 7
        assert "limits.max_find_documents (7)" in failure.message
    assert mongo["broker_test"][collection_name].count_documents({}) == 11


def test_oversize_request_is_refused_and_memory_stays_bounded(limited, collection_name):
    process = psutil.Process(limited.pid)
    with open_stub(limited.unix_target) as stub:
        stub.Ping(pb.PingRequest(), timeout=5)
        baseline = process.memory_info().rss
        big = bson.encode({"blob": b"x" * (300 * 1024)})
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Insert(
                    pb.InsertRequest(database="appdb", collection=collection_name, documents=[big]),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (caught.value.details() or "")
        grown = process.memory_info().rss - baseline
        assert stub.Ping(pb.PingRequest(), timeout=5).databases[0].ok
    # 30 refused requests of 300 KB: the broker must not have kept them.
    assert grown < 20 * 1024 * 1024, grown


# --- TLS -------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def test_mutual_tls_on_the_tcp_listener(start_broker, pki):
    config = start_broker.base_config()
    config["listen"] = {
        "unix": config["listen"]["unix"],
        "tcp": f"127.0.0.1:{free_port()}",
        "tls_cert_file": str(pki / "server.pem"),
        "tls_key_file": str(pki / "server.key"),
        "tls_client_ca_file": str(pki / "ca.pem"),
    }
    proc = start_broker(config)
    target = config["listen"]["tcp"]
    ca = (pki / "ca.pem").read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
    )
    from broker_client.proto.broker.v1 import broker_pb2_grpc

    with grpc.secure_channel(target, with_cert) as channel:
        reply = broker_pb2_grpc.BrokerStub(channel).Ping(pb.PingRequest(), timeout=10)
        assert reply.databases[0].ok
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            broker_pb2_grpc.BrokerStub(channel).Ping(pb.PingRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
        broker_pb2_grpc.BrokerStub(channel).Ping(pb.PingRequest(), timeout=5)
    # The Unix socket stays plaintext for same-pod workers.
    with open_stub(proc.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(), timeout=10).databases[0].ok


# --- secrets ---------------------------------------------------------------------


def test_password_file_and_canary_never_leak(start_broker, tmp_path, db_server):
    canary = "Canary-Secret-8841"
    secret = tmp_path / "mongo-password"
    secret.write_text(canary + "\n")
    config = start_broker.base_config()
    config["databases"]["locked"] = {
        "uri": f"mongodb://broker@127.0.0.1:{free_port()}/",
        "password_file": str(secret),
        "server_selection_timeout_ms": 500,
        "heartbeat_frequency_ms": 500,
        "connect_timeout_ms": 300,
    }
    proc = start_broker(config)
    texts: list[str] = []
    with open_stub(proc.unix_target) as stub:
        try:
            stub.Insert(
                pb.InsertRequest(database="locked", collection="c", documents=[bson.encode({"a": 1})]),
                timeout=10,
            )
        except grpc.RpcError as exc:
            texts.append(exc.details() or "")
        texts.append(str(stub.Ping(pb.PingRequest(), timeout=10)))
        texts.append(str(stub.Stats(pb.StatsRequest(), timeout=10)))
    proc.stop()
    texts.append(proc.log_text())
    assert "broker:***@" in proc.log_text()
    for text in texts:
        assert canary not in text
