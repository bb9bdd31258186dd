"""Security on every write and pipeline path: read-only, allowlists through pipelines, JS guard, limits."""

from __future__ import annotations

from typing import Any

import bson
import grpc
import pytest

from tests.rawbson import document
from tests.rpc import fails, open_stub, pb

WEB = "web-token-0123456789abcdef"
REPORTS = "reports-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
_JS = {"$function": {"body": "function () { return 1; }", "args": [], "lang": "js"}}


def _enc(value: dict[str, Any]) -> bytes:
    return bson.encode(value)


@pytest.fixture
def secured(start_broker, db_server):
    config = start_broker.base_config()
    config["databases"]["archive"] = {"uri": db_server.uri, "database": "broker_test", "read_only": True}
    # The same server under another URI stands for another deployment.
    other = db_server.uri + ("&" if "?" in db_server.uri else "?") + "appName=other"
    config["databases"]["elsewhere"] = {"uri": other, "database": "broker_other"}
    config["auth"] = {
        "tokens": [
            {"name": "web", "token": WEB, "databases": ["appdb"], "collections": ["items*", "orders"]},
            {"name": "reports", "token": REPORTS, "read_only": True},
            {"name": "admin", "token": ADMIN},
        ]
    }
    return start_broker(config)


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _writes(database: str, collection: str) -> dict[str, Any]:
    """One call of every write method, on ``database``.``collection``."""
    return {
        "Update": pb.UpdateRequest(database=database, collection=collection, update=_enc({"$set": {"a": 1}})),
        "Delete": pb.DeleteRequest(database=database, collection=collection),
        "FindOneAndModify": pb.FindOneAndModifyRequest(database=database, collection=collection, remove=True),
        "BulkWrite": pb.BulkWriteRequest(
            database=database,
            collection=collection,
            operations=[pb.WriteModel(delete_one=pb.DeleteModel())],
        ),
    }


def _aggregate(
    stub: Any, token: str, stages: list[dict[str, Any]], database: str = "appdb", collection: str = "items"
) -> list[Any]:
    request = pb.AggregateRequest(
        database=database, collection=collection, pipeline=[_enc(s) for s in stages]
    )
    return list(stub.Aggregate(request, metadata=_md(token), timeout=10))


@pytest.mark.parametrize("method", ["Update", "Delete", "FindOneAndModify", "BulkWrite"])
@pytest.mark.parametrize(
    ("token", "database", "words"),
    [
        (REPORTS, "appdb", "token 'reports' is read-only: {method} is not allowed"),
        (ADMIN, "archive", "database 'archive' is read-only"),
    ],
    ids=["read-only-token", "read-only-database"],
)
def test_read_only_refuses_every_write_method(secured, mongo, method, token, database, words):
    mongo["broker_test"]["items"].insert_one({"_id": "keep"})
    try:
        with (
            open_stub(secured.unix_target) as stub,
            fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as failure,
        ):
            getattr(stub, method)(_writes(database, "items")[method], metadata=_md(token), timeout=10)
        assert words.format(method=method) in failure.message
        assert mongo["broker_test"]["items"].count_documents({"_id": "keep"}) == 1
    finally:
        mongo["broker_test"].drop_collection("items")


@pytest.mark.parametrize("method", ["Update", "Delete", "FindOneAndModify", "BulkWrite"])
def test_collection_allowlist_covers_every_write_method(secured, method):
    with open_stub(secured.unix_target) as stub, fails(grpc.StatusCode.PERMISSION_DENIED) as failure:
        getattr(stub, method)(_writes("appdb", "secrets")[method], metadata=_md(WEB), timeout=10)
    assert "may not use collection 'secrets'" in failure.message


@pytest.mark.parametrize(
    ("stage", "token"),
    [({"$out": "items_copy"}, REPORTS), ({"$merge": {"into": "items_copy"}}, REPORTS)],
    ids=["out", "merge"],
)
def test_read_only_token_may_aggregate_but_not_write_through_a_pipeline(secured, stage, token):
    with open_stub(secured.unix_target) as stub:
        assert _aggregate(stub, token, [{"$match": {}}]) == []
        with fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as failure:
            _aggregate(stub, token, [{"$match": {}}, stage])
    assert "read-only: Aggregate is not allowed" in failure.message


def test_read_only_database_refuses_a_writing_pipeline(secured):
    with open_stub(secured.unix_target) as stub, fails(grpc.StatusCode.PERMISSION_DENIED) as failure:
        _aggregate(stub, ADMIN, [{"$out": "copy"}], database="archive")
    assert "database 'archive' is read-only" in failure.message


_FOREIGN = "secrets"


@pytest.mark.parametrize(
    ("stages", "path"),
    [
        (
            [{"$lookup": {"from": _FOREIGN, "localField": "a", "foreignField": "b", "as": "j"}}],
            "pipeline[0].$lookup.from",
        ),
        (
            [
                {
                    "$graphLookup": {
                        "from": _FOREIGN,
                        "startWith": "$a",
                        "connectFromField": "a",
                        "connectToField": "b",
                        "as": "g",
                    }
                }
            ],
            "pipeline[0].$graphLookup.from",
        ),
        ([{"$unionWith": _FOREIGN}], "pipeline[0].$unionWith"),
        (
            [{"$unionWith": {"coll": "orders", "pipeline": [{"$unionWith": _FOREIGN}]}}],
            "pipeline[0].$unionWith.pipeline[0].$unionWith",
        ),
        (
            [{"$facet": {"x": [{"$lookup": {"from": _FOREIGN, "as": "j", "pipeline": []}}]}}],
            "pipeline[0].$facet.x[0].$lookup.from",
        ),
        (
            [
                {
                    "$lookup": {
                        "from": "orders",
                        "as": "j",
                        "pipeline": [{"$lookup": {"from": _FOREIGN, "as": "k", "pipeline": []}}],
                    }
                }
            ],
            "pipeline[0].$lookup.pipeline[0].$lookup.from",
        ),
        ([{"$match": {}}, {"$out": _FOREIGN}], "pipeline[1].$out"),
        ([{"$merge": {"into": _FOREIGN}}], "pipeline[0].$merge.into"),
    ],
    ids=[
        "lookup",
        "graph-lookup",
        "union-with",
        "nested-union-with",
        "facet-lookup",
        "lookup-subpipeline",
        "out",
        "merge",
    ],
)
def test_allowlist_escape_through_a_pipeline_is_refused(secured, stages, path):
    with (
        open_stub(secured.unix_target) as stub,
        fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as failure,
    ):
        _aggregate(stub, WEB, stages)
    assert f"may not use collection {_FOREIGN!r}" in failure.message, path


@pytest.mark.parametrize(
    ("stage", "code", "words"),
    [
        (
            {"$out": {"db": "archive", "coll": "c"}},
            grpc.StatusCode.PERMISSION_DENIED,
            "may not use database 'archive'",
        ),
        (
            {"$merge": {"into": {"db": "nowhere", "coll": "c"}}},
            grpc.StatusCode.PERMISSION_DENIED,
            "may not use database 'nowhere'",
        ),
    ],
    ids=["out-other-db", "merge-unknown-db"],
)
def test_database_allowlist_covers_out_and_merge(secured, stage, code, words):
    with open_stub(secured.unix_target) as stub, fails(code) as failure:
        _aggregate(stub, WEB, [stage], collection="orders")
    assert words in failure.message


@pytest.mark.parametrize(
    ("stage", "code", "reason", "words"),
    [
        (
            {"$out": {"db": "broker_test", "coll": "c"}},
            grpc.StatusCode.NOT_FOUND,
            "UNKNOWN_DATABASE",
            "'broker_test' is not configured",
        ),
        (
            {"$out": {"db": "archive", "coll": "c"}},
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_AUTHORIZED",
            "'archive' is read-only",
        ),
        (
            {"$merge": {"into": {"db": "elsewhere", "coll": "c"}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            "another deployment",
        ),
        (
            {"$out": {"db": "appdb", "coll": "system.js"}},
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_AUTHORIZED",
            "system collection",
        ),
    ],
    ids=["mongodb-name-not-configured", "read-only-target", "other-deployment", "system-collection"],
)
def test_out_and_merge_reach_only_configured_writable_databases(secured, stage, code, reason, words):
    # A caller names configured databases, never MongoDB's names: the
    # MongoDB database "broker_test" is reachable only as "appdb".
    with open_stub(secured.unix_target) as stub, fails(code, reason) as failure:
        _aggregate(stub, ADMIN, [stage])
    assert words in failure.message


@pytest.mark.mongod("FerretDB 1.24 has no $out")
def test_out_into_a_configured_database_writes_its_mongodb_database(secured, mongo):
    mongo["broker_test"]["items"].insert_one({"_id": 1})
    try:
        with open_stub(secured.unix_target) as stub:
            _aggregate(stub, ADMIN, [{"$out": {"db": "appdb", "coll": "items_out"}}])
        assert mongo["broker_test"]["items_out"].count_documents({}) == 1
        assert "appdb" not in mongo.list_database_names()
    finally:
        mongo["broker_test"].drop_collection("items")
        mongo["broker_test"].drop_collection("items_out")


@pytest.mark.parametrize(
    ("method", "request_fields", "path"),
    [
        ("Update", {"update_pipeline": [_enc({"$set": {"x": _JS}})]}, "update_pipeline[0].$set.x.$function"),
        ("Update", {"update": _enc({"$set": {"a": 1}}), "let": _enc({"v": _JS})}, "let.v.$function"),
        ("Update", {"update": _enc({"$set": {"a": 1}}), "filter": _enc({"$where": "1"})}, "filter.$where"),
        ("Delete", {"filter": _enc({"$where": "1"})}, "filter.$where"),
        ("FindOneAndModify", {"remove": True, "filter": _enc({"$expr": _JS})}, "filter.$expr.$function"),
        ("Count", {"filter": _enc({"$where": "1"})}, "filter.$where"),
        ("Distinct", {"key": "a", "filter": _enc({"$where": "1"})}, "filter.$where"),
        (
            "Aggregate",
            {
                "pipeline": [
                    _enc({"$lookup": {"from": "x", "as": "j", "pipeline": [{"$match": {"$where": "1"}}]}})
                ]
            },
            "pipeline[0].$lookup.pipeline[0].$match.$where",
        ),
        (
            "Aggregate",
            {"pipeline": [_enc({"$group": {"_id": 1, "a": {"$accumulator": {}}}})]},
            "pipeline[0].$group.a.$accumulator",
        ),
        (
            "BulkWrite",
            {
                "operations": [
                    pb.WriteModel(update_one=pb.UpdateModel(update_pipeline=[_enc({"$set": {"x": _JS}})]))
                ]
            },
            "operations[0].update_one.update_pipeline[0].$set.x.$function",
        ),
    ],
    ids=[
        "update-pipeline",
        "let",
        "update-filter",
        "delete",
        "find-and-modify",
        "count",
        "distinct",
        "lookup-subpipeline",
        "accumulator",
        "bulk-update-pipeline",
    ],
)
def test_javascript_is_refused_on_every_new_path(broker, collection_name, method, request_fields, path):
    message = getattr(pb, f"{method}Request")(database="appdb", collection=collection_name, **request_fields)
    with open_stub(broker.unix_target) as stub, fails(grpc.StatusCode.PERMISSION_DENIED) as failure:
        call = getattr(stub, method)
        result = call(message, timeout=10)
        if method in ("Distinct", "Aggregate"):
            list(result)
    assert failure.message.startswith(path), failure.message


def test_an_update_pipeline_cannot_read_another_collection(broker, collection_name):
    with open_stub(broker.unix_target) as stub, fails(grpc.StatusCode.INVALID_ARGUMENT):
        stub.Update(
            pb.UpdateRequest(
                database="appdb",
                collection=collection_name,
                update_pipeline=[_enc({"$unionWith": "secrets"})],
            ),
            timeout=10,
        )


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"x": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("method", "request_fields", "field"),
    [
        ("Update", {"update": _enc({"$set": _deep(120)})}, "update"),
        ("Update", {"replacement": _enc(_deep(120))}, "replacement"),
        (
            "Update",
            {"update": _enc({"$set": {"a": 1}}), "array_filters": [_enc(_deep(120))]},
            "array_filters[0]",
        ),
        ("FindOneAndModify", {"update": _enc({"$set": {"a": 1}}), "sort": _enc(_deep(120))}, "sort"),
        (
            "BulkWrite",
            {"operations": [pb.WriteModel(insert_one=pb.InsertOneModel(document=_enc(_deep(120))))]},
            "operations[0].insert_one.document",
        ),
        ("Count", {"filter": _enc(_deep(120))}, "filter"),
    ],
    ids=["update", "replacement", "array-filters", "sort", "bulk-insert", "count"],
)
def test_depth_limit_covers_every_new_field(
    broker, collection_name, mongo_collection, method, request_fields, field
):
    message = getattr(pb, f"{method}Request")(database="appdb", collection=collection_name, **request_fields)
    with (
        open_stub(broker.unix_target) as stub,
        fails(grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED") as failure,
    ):
        getattr(stub, method)(message, timeout=10)
    assert failure.message.startswith(field)
    assert mongo_collection.count_documents({}) == 0


def test_duplicate_keys_are_refused_in_an_update(broker, collection_name, mongo_collection):
    mongo_collection.insert_one({"_id": 1, "a": 0})
    hidden = document(("$set", {"a": 1}), ("$set", {"a": 2}))
    with open_stub(broker.unix_target) as stub, fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        stub.Update(pb.UpdateRequest(database="appdb", collection=collection_name, update=hidden), timeout=10)
    assert "update.$set: duplicate key" in failure.message
    assert mongo_collection.find_one({"_id": 1}) == {"_id": 1, "a": 0}


@pytest.mark.parametrize("method", ["Update", "Delete", "Count", "BulkWrite"])
def test_a_deadline_already_passed_is_deadline_exceeded(broker, collection_name, method):
    requests = {
        **_writes("appdb", collection_name),
        "Count": pb.CountRequest(database="appdb", collection=collection_name),
    }
    with open_stub(broker.unix_target) as stub, pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(requests[method], timeout=0.0001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
