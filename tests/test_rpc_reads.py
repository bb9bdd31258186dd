"""Count, Distinct and Aggregate over the raw contract, and the read options every read takes."""

from __future__ import annotations

import json
from typing import Any

import bson
import grpc
import pytest
from bson import Int64, ObjectId

from tests.rpc import database_stats, fails, find_all, open_stub, pb


class _AppDb:
    """What the helpers need of a broker started by start_broker: its database's configured name."""

    db_name = "appdb"


broker_named_appdb = _AppDb()


def _enc(document: dict[str, Any]) -> bytes:
    return bson.encode(document)


def _seed(mongo_collection: Any, n: int = 10) -> None:
    mongo_collection.insert_many(
        [{"_id": i, "n": i, "kind": "even" if i % 2 == 0 else "odd", "pad": "x" * 200} for i in range(n)]
    )


def _count(stub: Any, broker: Any, collection: str, **fields: Any) -> int:
    reply = stub.Count(pb.CountRequest(database=broker.db_name, collection=collection, **fields), timeout=30)
    return int(reply.count)


def _aggregate(
    stub: Any, broker: Any, collection: str, stages: list[dict[str, Any]], **fields: Any
) -> tuple[list[Any], int]:
    documents: list[Any] = []
    messages = 0
    request = pb.AggregateRequest(
        database=broker.db_name, collection=collection, pipeline=[_enc(s) for s in stages], **fields
    )
    for message in stub.Aggregate(request, timeout=30):
        messages += 1
        documents.extend(bson.decode(raw) for raw in message.documents)
    return documents, messages


def _distinct(stub: Any, broker: Any, collection: str, **fields: Any) -> tuple[list[Any], int]:
    values: list[Any] = []
    messages = 0
    for message in stub.Distinct(
        pb.DistinctRequest(database=broker.db_name, collection=collection, **fields), timeout=30
    ):
        messages += 1
        values.extend(bson.decode(message.values)["values"])
    return values, messages


# --- Count --------------------------------------------------------------------------


def test_count_documents_with_filter_skip_and_limit(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    assert _count(stub, broker, collection_name) == 10
    assert _count(stub, broker, collection_name, filter=_enc({"kind": "even"})) == 5
    assert _count(stub, broker, collection_name, filter=_enc({"kind": "even"}), skip=2) == 3
    assert _count(stub, broker, collection_name, skip=2, limit=5) == 5
    assert _count(stub, broker, collection_name, filter=_enc({"n": {"$gt": 100}})) == 0


def test_estimated_count(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 7)
    assert _count(stub, broker, collection_name, estimated=True) == 7


def test_count_of_a_missing_collection_is_zero(broker, stub, collection_name):
    assert _count(stub, broker, collection_name) == 0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"estimated": True, "filter": _enc({"a": 1})}, "filter cannot apply"),
        ({"estimated": True, "skip": 1, "limit": 2}, "skip, limit cannot apply"),
        ({"skip": -1}, "skip must not be negative"),
        ({"limit": -1}, "limit must not be negative"),
        ({"filter": b"\x05\x00\x00\x00\x01"}, "filter is not a valid BSON document"),
        ({"hint_keys": _enc({"a": 2})}, "hint_keys.a"),
    ],
    ids=["estimated-filter", "estimated-skip", "negative-skip", "negative-limit", "bad-filter", "bad-hint"],
)
def test_bad_counts_are_refused(broker, stub, collection_name, fields, words):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _count(stub, broker, collection_name, **fields)
    assert words in failure.message


def test_count_in_extended_json(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    count = _count(
        stub, broker, collection_name, encoding=pb.ENCODING_RELAXED_JSON, filter_json='{"n": {"$lt": 3}}'
    )
    assert count == 3


# --- Distinct -----------------------------------------------------------------------


def test_distinct_values_keep_their_types(broker, stub, collection_name, mongo_collection):
    oid = ObjectId()
    mongo_collection.insert_many(
        [{"v": 1}, {"v": Int64(1)}, {"v": "a"}, {"v": oid}, {"v": "a"}, {"v": {"k": 1}}, {"other": 1}]
    )
    values, messages = _distinct(stub, broker, collection_name, key="v")
    assert messages == 1
    assert sorted(map(repr, values)) == sorted(map(repr, [1, "a", oid, {"k": 1}]))


def test_distinct_with_a_filter_and_dotted_key(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_many([{"a": {"b": i % 3}, "keep": i < 4} for i in range(9)])
    values, _ = _distinct(stub, broker, collection_name, key="a.b", filter=_enc({"keep": True}))
    assert sorted(values) == [0, 1, 2]


def test_large_distinct_results_are_streamed_under_the_message_cap(
    start_broker, collection_name, mongo_collection
):
    config = start_broker.base_config()
    config["limits"] = {"max_response_message_bytes": 64 * 1024}
    small = start_broker(config)
    mongo_collection.insert_many([{"v": f"{i:06d}" + "x" * 1000} for i in range(300)])
    with open_stub(small.unix_target) as stub:
        values, messages = _distinct(stub, broker_named_appdb, collection_name, key="v")
    assert sorted(values) == sorted(f"{i:06d}" + "x" * 1000 for i in range(300))
    assert messages >= 5


def test_distinct_needs_a_key(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _distinct(stub, broker, collection_name)
    assert "key is required" in failure.message


def test_distinct_in_extended_json(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_many([{"v": Int64(5)}, {"v": Int64(5)}])
    (message,) = list(
        stub.Distinct(
            pb.DistinctRequest(
                database=broker.db_name,
                collection=collection_name,
                key="v",
                encoding=pb.ENCODING_CANONICAL_JSON,
            ),
            timeout=30,
        )
    )
    assert json.loads(message.values_json) == {"values": [{"$numberLong": "5"}]}


# --- Aggregate ----------------------------------------------------------------------


def test_aggregate_runs_the_pipeline(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    documents, _ = _aggregate(
        stub,
        broker,
        collection_name,
        [{"$match": {"kind": "odd"}}, {"$group": {"_id": "$kind", "total": {"$sum": "$n"}}}],
    )
    assert documents == [{"_id": "odd", "total": 25}]


def test_aggregate_streams_many_batches_in_order(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_many([{"_id": i} for i in range(250)])
    documents, messages = _aggregate(stub, broker, collection_name, [{"$sort": {"_id": 1}}], batch_size=40)
    assert [d["_id"] for d in documents] == list(range(250))
    assert messages >= 7


def test_aggregate_with_options(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    documents, _ = _aggregate(
        stub,
        broker,
        collection_name,
        [{"$match": {"n": {"$lt": 3}}}, {"$project": {"n": 1}}],
        allow_disk_use=True,
        comment="report",
        max_time_ms=10_000,
    )
    assert sorted(d["n"] for d in documents) == [0, 1, 2]


@pytest.mark.mongod("FerretDB 1.24 has no $lookup (UNIMPLEMENTED, NOT_SUPPORTED)")
def test_aggregate_lookup_reads_an_allowed_collection(broker, stub, collection_name, mongo):
    db = mongo[broker.mongo_db]
    db[collection_name].insert_many([{"_id": 1, "ref": 10}, {"_id": 2, "ref": 20}])
    db[collection_name + "_other"].insert_many([{"_id": 10, "label": "ten"}])
    try:
        documents, _ = _aggregate(
            stub,
            broker,
            collection_name,
            [
                {"$sort": {"_id": 1}},
                {
                    "$lookup": {
                        "from": collection_name + "_other",
                        "localField": "ref",
                        "foreignField": "_id",
                        "as": "j",
                    }
                },
            ],
        )
    finally:
        db.drop_collection(collection_name + "_other")
    assert [len(d["j"]) for d in documents] == [1, 0]


@pytest.mark.mongod("FerretDB 1.24 has no $out")
def test_aggregate_out_writes_the_target_collection(broker, stub, collection_name, mongo):
    db = mongo[broker.mongo_db]
    db[collection_name].insert_many([{"_id": i} for i in range(3)])
    target = collection_name + "_out"
    try:
        documents, _ = _aggregate(stub, broker, collection_name, [{"$match": {}}, {"$out": target}])
        assert documents == []
        assert db[target].count_documents({}) == 3
    finally:
        db.drop_collection(target)


def test_aggregate_result_cap_is_never_silently_short(start_broker, collection_name, mongo_collection):
    config = start_broker.base_config()
    config["limits"] = {"max_find_documents": 5}
    capped = start_broker(config)
    mongo_collection.insert_many([{"_id": i} for i in range(8)])
    with (
        open_stub(capped.unix_target) as stub,
        fails(grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED") as failure,
    ):
        _aggregate(stub, broker_named_appdb, collection_name, [{"$sort": {"_id": 1}}])
    assert "max_find_documents (5)" in failure.message


@pytest.mark.parametrize(
    ("stages", "code", "words"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "pipeline is empty"),
        ([b""], grpc.StatusCode.INVALID_ARGUMENT, "pipeline[0] is empty"),
        ([b"\x05\x00\x00\x00\x01"], grpc.StatusCode.INVALID_ARGUMENT, "pipeline[0] is not a valid BSON"),
        ([_enc({"$match": {}, "$limit": 1})], grpc.StatusCode.INVALID_ARGUMENT, "pipeline[0]"),
        ([_enc({"$changeStream": {}})], grpc.StatusCode.UNIMPLEMENTED, "$changeStream"),
        ([_enc({"$out": "x"}), _enc({"$match": {}})], grpc.StatusCode.INVALID_ARGUMENT, "$out"),
        (
            [_enc({"$lookup": {"from": {"db": "other", "coll": "c"}, "as": "j", "pipeline": []}})],
            grpc.StatusCode.INVALID_ARGUMENT,
            "pipeline[0].$lookup.from",
        ),
    ],
    ids=["empty", "empty-stage", "bad-bson", "two-keys", "change-stream", "out-not-last", "cross-db-lookup"],
)
def test_bad_pipelines_are_refused(broker, stub, collection_name, stages, code, words):
    request = pb.AggregateRequest(database=broker.db_name, collection=collection_name, pipeline=stages)
    with fails(code) as failure:
        list(stub.Aggregate(request, timeout=30))
    assert words in failure.message


def test_aggregate_in_extended_json(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_many([{"_id": 1, "n": Int64(3)}])
    request = pb.AggregateRequest(
        database=broker.db_name,
        collection=collection_name,
        encoding=pb.ENCODING_CANONICAL_JSON,
        pipeline_json=['{"$match": {"_id": 1}}'],
    )
    (message,) = list(stub.Aggregate(request, timeout=30))
    assert [json.loads(t) for t in message.json_documents] == [
        {"_id": {"$numberInt": "1"}, "n": {"$numberLong": "3"}}
    ]


# --- read options on every read -----------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pb.READ_PREFERENCE_PRIMARY,
        pb.READ_PREFERENCE_PRIMARY_PREFERRED,
        pb.READ_PREFERENCE_SECONDARY_PREFERRED,
        pb.READ_PREFERENCE_NEAREST,
    ],
    ids=["primary", "primary-preferred", "secondary-preferred", "nearest"],
)
def test_reads_take_a_read_preference_a_standalone_can_serve(
    broker, stub, collection_name, mongo_collection, mode
):
    _seed(mongo_collection, 3)
    preference = pb.ReadPreference(mode=mode)
    documents, _ = find_all(
        stub, database=broker.db_name, collection=collection_name, read_preference=preference
    )
    assert len(documents) == 3
    assert _count(stub, broker, collection_name, read_preference=preference) == 3
    values, _ = _distinct(stub, broker, collection_name, key="kind", read_preference=preference)
    assert sorted(values) == ["even", "odd"]
    aggregated, _ = _aggregate(stub, broker, collection_name, [{"$match": {}}], read_preference=preference)
    assert len(aggregated) == 3


def test_reads_take_a_read_concern(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 3)
    documents, _ = find_all(
        stub, database=broker.db_name, collection=collection_name, read_concern=pb.READ_CONCERN_LOCAL
    )
    assert len(documents) == 3
    assert _count(stub, broker, collection_name, read_concern=pb.READ_CONCERN_LOCAL) == 3


@pytest.mark.parametrize(
    ("preference", "words"),
    [
        (
            pb.ReadPreference(mode=pb.READ_PREFERENCE_PRIMARY, tag_sets=[_enc({"dc": "east"})]),
            "need a mode other",
        ),
        (pb.ReadPreference(mode=pb.READ_PREFERENCE_NEAREST, max_staleness_s=10), "at least 90"),
        (pb.ReadPreference(mode=pb.READ_PREFERENCE_NEAREST, max_staleness_s=-1), "must not be negative"),
        (
            pb.ReadPreference(mode=pb.READ_PREFERENCE_NEAREST, tag_sets=[_enc({"dc": 1})]),
            "tag values must be strings",
        ),
        (pb.ReadPreference(mode=99), "unknown read_preference.mode"),  # type: ignore[arg-type]  # a value no client should send
    ],
    ids=["tags-on-primary", "staleness-too-small", "negative-staleness", "non-string-tag", "unknown-mode"],
)
def test_bad_read_preferences_are_refused(broker, stub, collection_name, preference, words):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _count(stub, broker, collection_name, read_preference=preference)
    assert words in failure.message


def test_unknown_read_concern_is_refused(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _count(stub, broker, collection_name, read_concern=42)
    assert "unknown read_concern" in failure.message


def test_collation_reaches_the_server(broker, stub, collection_name, mongo_collection, real_mongodb):
    mongo_collection.insert_many([{"s": "a"}, {"s": "A"}])
    collation = _enc({"locale": "en", "strength": 2})
    if real_mongodb:
        assert _count(stub, broker, collection_name, filter=_enc({"s": "a"}), collation=collation) == 2
        return
    # FerretDB 1.24 has no collation: the broker passes the server's refusal on, as documented.
    with fails(grpc.StatusCode.UNIMPLEMENTED, "NOT_SUPPORTED"):
        _count(stub, broker, collection_name, filter=_enc({"s": "a"}), collation=collation)


def test_empty_collation_is_refused(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _count(stub, broker, collection_name, collation=_enc({}))
    assert "collation is an empty document" in failure.message


def test_read_methods_are_counted_in_stats(broker, stub, collection_name):
    before = database_stats(stub, broker.db_name).rpcs
    _count(stub, broker, collection_name)
    _distinct(stub, broker, collection_name, key="a")
    _aggregate(stub, broker, collection_name, [{"$match": {}}])
    after = database_stats(stub, broker.db_name).rpcs
    for method in ("Count", "Distinct", "Aggregate"):
        assert after[method] == before.get(method, 0) + 1, method


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        (
            "Aggregate",
            {
                "pipeline": [
                    _enc({"$lookup": {"from": "x", "localField": "a", "foreignField": "b", "as": "j"}})
                ]
            },
        ),
        ("Update", {"update": _enc({"$set": {"g.$[e]": 1}}), "array_filters": [_enc({"e": 1})]}),
        ("FindOneAndModify", {"update": _enc({"$set": {"a": 1}}), "projection": _enc({"a": 1})}),
    ],
    ids=["lookup", "array-filters", "find-and-modify-projection"],
)
def test_what_the_test_server_lacks_is_not_supported(
    broker, stub, collection_name, real_mongodb, method, fields
):
    """FerretDB 1.24's gaps reach the caller as UNIMPLEMENTED (NOT_SUPPORTED), never as a broker error."""
    if real_mongodb:
        pytest.skip("real MongoDB has these features (their own tests cover them)")
    message = getattr(pb, f"{method}Request")(database=broker.db_name, collection=collection_name, **fields)
    with fails(grpc.StatusCode.UNIMPLEMENTED, "NOT_SUPPORTED"):
        result = getattr(stub, method)(message, timeout=30)
        if method == "Aggregate":
            list(result)
