"""Update, Delete, FindOneAndModify and BulkWrite over the raw contract: results, options, bad paths."""

from __future__ import annotations

import json
from typing import Any

import bson
import grpc
import pytest
from bson import Int64, ObjectId
from bson.raw_bson import RawBSONDocument

from tests.rpc import database_stats, fails, pb


def _seed(mongo_collection: Any, n: int = 5) -> None:
    mongo_collection.insert_many(
        [{"_id": i, "n": i, "tags": ["a", "b"] if i % 2 else ["a"]} for i in range(n)]
    )


def _update(stub: Any, broker: Any, collection: str, **fields: Any) -> Any:
    return stub.Update(pb.UpdateRequest(database=broker.db_name, collection=collection, **fields), timeout=30)


def _enc(document: dict[str, Any]) -> bytes:
    return bson.encode(document)


# --- Update -------------------------------------------------------------------------


def test_update_one_changes_the_first_match_only(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    reply = _update(
        stub, broker, collection_name, filter=_enc({"n": {"$gte": 1}}), update=_enc({"$set": {"done": True}})
    )
    assert (reply.matched_count, reply.modified_count, reply.upserted_id) == (1, 1, b"")
    assert mongo_collection.count_documents({"done": True}) == 1


def test_update_many_changes_every_match(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    reply = _update(
        stub,
        broker,
        collection_name,
        filter=_enc({"n": {"$gte": 1}}),
        update=_enc({"$inc": {"n": Int64(10)}}),
        multi=True,
    )
    assert (reply.matched_count, reply.modified_count) == (4, 4)
    assert sorted(d["n"] for d in mongo_collection.find()) == [0, 11, 12, 13, 14]


@pytest.mark.mongod("FerretDB 1.24 refuses update pipelines ('update.updates.u' must be an object)")
def test_update_with_a_pipeline(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 2)
    reply = _update(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 1}),
        update_pipeline=[_enc({"$set": {"twice": {"$multiply": ["$n", 2]}}})],
    )
    assert reply.modified_count == 1
    assert mongo_collection.find_one({"_id": 1})["twice"] == 2


def test_upsert_returns_the_new_id(broker, stub, collection_name, mongo_collection):
    reply = _update(
        stub,
        broker,
        collection_name,
        filter=_enc({"name": "new"}),
        update=_enc({"$set": {"v": 1}}),
        upsert=True,
    )
    assert (reply.matched_count, reply.modified_count) == (0, 0)
    upserted = bson.decode(reply.upserted_id)["_id"]
    assert isinstance(upserted, ObjectId)
    assert mongo_collection.find_one({"_id": upserted}) == {"_id": upserted, "name": "new", "v": 1}


def test_replace_one_keeps_the_bytes_of_the_replacement(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 1)
    replacement = _enc({"z": Int64(5), "a": 1.0, "m": {"k": "v"}})
    reply = _update(stub, broker, collection_name, filter=_enc({"_id": 0}), replacement=replacement)
    assert (reply.matched_count, reply.modified_count) == (1, 1)
    raw = mongo_collection.with_options(
        codec_options=bson.CodecOptions(document_class=RawBSONDocument)
    ).find_one({"_id": 0})
    assert list(raw.keys()) == ["_id", "z", "a", "m"]
    assert isinstance(raw["z"], Int64) and isinstance(raw["a"], float)


@pytest.mark.mongod("FerretDB 1.24 has no arrayFilters (UNIMPLEMENTED, NOT_SUPPORTED)")
def test_array_filters_update_the_named_elements(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_one({"_id": 1, "grades": [80, 95, 100]})
    reply = _update(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 1}),
        update=_enc({"$set": {"grades.$[high]": 90}}),
        array_filters=[_enc({"high": {"$gte": 95}})],
    )
    assert reply.modified_count == 1
    assert mongo_collection.find_one({"_id": 1})["grades"] == [80, 90, 90]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"update": _enc({"a": 1})}, "must hold only update operators"),
        ({"update": _enc({"$set": {"a": 1}, "b": 2})}, "must hold only update operators"),
        ({"update": _enc({})}, "is empty"),
        ({"replacement": _enc({"$set": {"a": 1}})}, "must not hold $-operators"),
        ({}, "give one of update"),
        ({"update": _enc({"$set": {"a": 1}}), "replacement": _enc({"a": 1})}, "give only one of"),
        ({"replacement": _enc({"a": 1}), "multi": True}, "multi must be false"),
        ({"update": b"\x05\x00\x00\x00"}, "not a valid BSON document"),
        ({"update": _enc({"$set": {"a": 1}}), "filter": b"\x01"}, "filter is not a valid BSON"),
        ({"update": _enc({"$set": {"a": 1}}), "array_filters": [b""]}, "array_filters[0] is empty"),
        ({"update": _enc({"$set": {"a": 1}}), "hint_name": ""}, "hint_name is empty"),
        ({"update": _enc({"$set": {"a": 1}}), "let": b"\x07\x00\x00\x00\x00"}, "let is not a valid BSON"),
    ],
    ids=[
        "not-operators",
        "mixed",
        "empty-update",
        "operator-replacement",
        "nothing",
        "two-changes",
        "multi-replacement",
        "bad-update-bson",
        "bad-filter",
        "empty-array-filter",
        "empty-hint",
        "bad-let",
    ],
)
def test_bad_updates_are_refused_and_nothing_changes(
    broker, stub, collection_name, mongo_collection, fields, words
):
    _seed(mongo_collection, 2)
    before = list(mongo_collection.find())
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _update(stub, broker, collection_name, **fields)
    assert words in failure.message
    assert list(mongo_collection.find()) == before


def test_upsert_onto_a_duplicate_key_is_already_exists(broker, stub, collection_name, mongo_collection):
    mongo_collection.create_index("email", unique=True)
    mongo_collection.insert_one({"_id": 1, "email": "a@x"})
    with fails(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY") as failure:
        _update(
            stub,
            broker,
            collection_name,
            filter=_enc({"_id": 2}),
            update=_enc({"$set": {"email": "a@x"}}),
            upsert=True,
        )
    assert failure.metadata["mongo_code"] == "11000"
    assert mongo_collection.count_documents({}) == 1


def test_update_of_an_unknown_database_is_not_found(stub, collection_name):
    with fails(grpc.StatusCode.NOT_FOUND, "UNKNOWN_DATABASE"):
        stub.Update(
            pb.UpdateRequest(database="nope", collection=collection_name, update=_enc({"$set": {"a": 1}})),
            timeout=30,
        )


def test_update_to_a_system_collection_is_refused(broker, stub):
    with fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED"):
        _update(stub, broker, "system.js", update=_enc({"$set": {"a": 1}}))


def test_update_in_extended_json(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_one({"_id": 1, "n": 1})
    reply = _update(
        stub,
        broker,
        collection_name,
        encoding=pb.ENCODING_CANONICAL_JSON,
        filter_json='{"_id": 2}',
        update_json='{"$set": {"big": {"$numberLong": "7"}}}',
        upsert=True,
    )
    assert json.loads(reply.upserted_id_json) == {"_id": {"$numberInt": "2"}}
    assert isinstance(mongo_collection.find_one({"_id": 2})["big"], Int64)


def test_json_fields_need_a_json_encoding(broker, stub, collection_name):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _update(stub, broker, collection_name, update_json='{"$set": {"a": 1}}')
    assert "update_json" in failure.message


# --- Delete -------------------------------------------------------------------------


def test_delete_one_and_many(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection)
    one = stub.Delete(
        pb.DeleteRequest(
            database=broker.db_name, collection=collection_name, filter=_enc({"n": {"$gte": 1}})
        ),
        timeout=30,
    )
    assert one.deleted_count == 1
    many = stub.Delete(
        pb.DeleteRequest(
            database=broker.db_name, collection=collection_name, filter=_enc({"n": {"$gte": 1}}), multi=True
        ),
        timeout=30,
    )
    assert many.deleted_count == 3
    assert [d["_id"] for d in mongo_collection.find()] == [0]


def test_delete_without_a_match_deletes_nothing(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 2)
    reply = stub.Delete(
        pb.DeleteRequest(
            database=broker.db_name, collection=collection_name, filter=_enc({"n": 99}), multi=True
        ),
        timeout=30,
    )
    assert reply.deleted_count == 0
    assert mongo_collection.count_documents({}) == 2


def test_delete_with_a_bad_filter_deletes_nothing(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 2)
    with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BSON"):
        stub.Delete(
            pb.DeleteRequest(
                database=broker.db_name, collection=collection_name, filter=b"\x06\0\0\0\0\0", multi=True
            ),
            timeout=30,
        )
    assert mongo_collection.count_documents({}) == 2


# --- FindOneAndModify ---------------------------------------------------------------


def _modify(stub: Any, broker: Any, collection: str, **fields: Any) -> dict[str, Any] | None:
    reply = stub.FindOneAndModify(
        pb.FindOneAndModifyRequest(database=broker.db_name, collection=collection, **fields), timeout=30
    )
    return bson.decode(reply.document) if reply.document else None


def test_find_one_and_update_returns_before_or_after(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 3)
    before = _modify(
        stub, broker, collection_name, filter=_enc({"_id": 1}), update=_enc({"$set": {"n": 100}})
    )
    assert before == {"_id": 1, "n": 1, "tags": ["a", "b"]}
    after = _modify(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 1}),
        update=_enc({"$inc": {"n": 1}}),
        return_document=pb.RETURN_DOCUMENT_AFTER,
    )
    assert after == {"_id": 1, "n": 101, "tags": ["a", "b"]}


@pytest.mark.mongod("FerretDB 1.24 has no findAndModify projection ('fields': UNIMPLEMENTED)")
def test_find_one_and_update_projects_the_returned_document(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 2)
    found = _modify(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 1}),
        update=_enc({"$set": {"x": 1}}),
        projection=_enc({"n": 1}),
    )
    assert found == {"_id": 1, "n": 1}


def test_find_one_and_update_follows_the_sort(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 3)
    found = _modify(
        stub, broker, collection_name, sort=_enc({"n": -1}), update=_enc({"$set": {"picked": True}})
    )
    assert found is not None and found["_id"] == 2
    assert mongo_collection.find_one({"picked": True})["_id"] == 2


def test_find_one_and_replace_and_delete(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 2)
    replaced = _modify(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 0}),
        replacement=_enc({"fresh": True}),
        return_document=pb.RETURN_DOCUMENT_AFTER,
    )
    assert replaced == {"_id": 0, "fresh": True}
    removed = _modify(stub, broker, collection_name, filter=_enc({"_id": 1}), remove=True)
    assert removed is not None and removed["_id"] == 1
    assert [d["_id"] for d in mongo_collection.find()] == [0]


def test_find_one_and_modify_with_no_match_returns_none(broker, stub, collection_name, mongo_collection):
    assert (
        _modify(stub, broker, collection_name, filter=_enc({"_id": 5}), update=_enc({"$set": {"a": 1}}))
        is None
    )
    upserted = _modify(
        stub,
        broker,
        collection_name,
        filter=_enc({"_id": 5}),
        update=_enc({"$set": {"a": 1}}),
        upsert=True,
        return_document=pb.RETURN_DOCUMENT_AFTER,
    )
    assert upserted == {"_id": 5, "a": 1}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "exactly one of"),
        ({"remove": True, "update": _enc({"$set": {"a": 1}})}, "exactly one of"),
        ({"remove": True, "upsert": True}, "do not apply"),
        ({"remove": True, "return_document": pb.RETURN_DOCUMENT_AFTER}, "do not apply"),
        ({"update": _enc({"a": 1})}, "must hold only update operators"),
        ({"replacement": _enc({"$inc": {"a": 1}})}, "must not hold"),
        ({"update": _enc({"$set": {"a": 1}}), "sort": _enc({"a": 2})}, "sort.a"),
        ({"update": _enc({"$set": {"a": 1}}), "return_document": 7}, "unknown return_document"),
    ],
    ids=[
        "nothing",
        "remove-and-update",
        "remove-upsert",
        "remove-after",
        "not-operators",
        "operator-replacement",
        "bad-sort",
        "bad-return",
    ],
)
def test_bad_find_one_and_modify_is_refused(broker, stub, collection_name, mongo_collection, fields, words):
    _seed(mongo_collection, 2)
    before = list(mongo_collection.find())
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _modify(stub, broker, collection_name, **fields)
    assert words in failure.message
    assert list(mongo_collection.find()) == before


# --- BulkWrite ----------------------------------------------------------------------


def _bulk(stub: Any, broker: Any, collection: str, operations: list[Any], **fields: Any) -> Any:
    return stub.BulkWrite(
        pb.BulkWriteRequest(database=broker.db_name, collection=collection, operations=operations, **fields),
        timeout=30,
    )


def _insert(document: dict[str, Any]) -> Any:
    return pb.WriteModel(insert_one=pb.InsertOneModel(document=_enc(document)))


def test_bulk_write_runs_every_kind_of_operation(broker, stub, collection_name, mongo_collection):
    _seed(mongo_collection, 4)
    operations = [
        _insert({"_id": 10, "n": 10}),
        _insert({"n": 11}),
        # The upsert opens the run of updates: FerretDB 1.24 reports index 0
        # for an upsert wherever it sits in the update command.
        pb.WriteModel(
            update_one=pb.UpdateModel(filter=_enc({"_id": 20}), update=_enc({"$set": {"up": 1}}), upsert=True)
        ),
        pb.WriteModel(update_one=pb.UpdateModel(filter=_enc({"_id": 0}), update=_enc({"$set": {"u": 1}}))),
        pb.WriteModel(
            update_many=pb.UpdateModel(filter=_enc({"n": {"$lt": 3}}), update=_enc({"$set": {"m": 1}}))
        ),
        pb.WriteModel(replace_one=pb.ReplaceOneModel(filter=_enc({"_id": 3}), replacement=_enc({"r": 1}))),
        pb.WriteModel(delete_one=pb.DeleteModel(filter=_enc({"_id": 10}))),
        pb.WriteModel(delete_many=pb.DeleteModel(filter=_enc({"r": 1}))),
    ]
    reply = _bulk(stub, broker, collection_name, operations)
    assert (
        reply.inserted_count,
        reply.matched_count,
        reply.modified_count,
        reply.deleted_count,
        reply.upserted_count,
    ) == (2, 5, 5, 2, 1)
    assert [(u.index, bson.decode(u.id)["_id"]) for u in reply.upserted_ids] == [(2, 20)]
    inserted = [(i.index, bson.decode(i.id)["_id"]) for i in reply.inserted_ids]
    assert inserted[0] == (0, 10) and inserted[1][0] == 1 and isinstance(inserted[1][1], ObjectId)
    assert sorted(d["_id"] for d in mongo_collection.find({}, {"_id": 1}) if d["_id"] != inserted[1][1]) == [
        0,
        1,
        2,
        20,
    ]


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_bulk_write_failing_in_the_middle_says_exactly_what_landed(
    broker, stub, collection_name, mongo_collection, ordered
):
    mongo_collection.insert_one({"_id": 2})
    operations = [_insert({"_id": i}) for i in range(5)]  # index 2 is a duplicate
    with fails(grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_KEY") as failure:
        _bulk(stub, broker, collection_name, operations, ordered=ordered)
    meta = failure.metadata
    landed = sorted(d["_id"] for d in mongo_collection.find())
    assert meta["failed_index"] == "2"
    assert meta["mongo_code"] == "11000"
    assert meta["write_errors_total"] == "1"
    (error,) = json.loads(meta["write_errors"])
    assert (error["index"], error["code"], error["codeName"]) == (2, 11000, "DuplicateKey")
    if ordered:
        assert meta["inserted_count"] == "2"
        assert landed == [0, 1, 2]
    else:
        assert meta["inserted_count"] == "4"
        assert landed == [0, 1, 2, 3, 4]
    assert "write failed at operation 2" in failure.message


def test_bulk_write_reports_upserts_made_before_a_failure(broker, stub, collection_name, mongo_collection):
    mongo_collection.insert_one({"_id": 9})
    operations = [
        pb.WriteModel(
            update_one=pb.UpdateModel(filter=_enc({"_id": 1}), update=_enc({"$set": {"a": 1}}), upsert=True)
        ),
        _insert({"_id": 9}),
    ]
    with fails(grpc.StatusCode.ALREADY_EXISTS) as failure:
        _bulk(stub, broker, collection_name, operations)
    assert failure.metadata["upserted_count"] == "1"
    assert json.loads(failure.metadata["upserted_ids"]) == [{"index": 0, "_id": {"$numberInt": "1"}}]
    assert mongo_collection.find_one({"_id": 1}) == {"_id": 1, "a": 1}


@pytest.mark.parametrize(
    ("operations", "words"),
    [
        ([], "operations is empty"),
        ([pb.WriteModel()], "operations[0] is empty"),
        ([pb.WriteModel(insert_one=pb.InsertOneModel())], "operations[0].insert_one.document is required"),
        (
            [pb.WriteModel(update_one=pb.UpdateModel(update=_enc({"a": 1})))],
            "operations[0].update_one.update",
        ),
        (
            [pb.WriteModel(replace_one=pb.ReplaceOneModel(replacement=_enc({"$set": {"a": 1}})))],
            "operations[0].replace_one.replacement must not hold",
        ),
        (
            [pb.WriteModel(update_many=pb.UpdateModel())],
            "update or operations[0].update_many.update_pipeline",
        ),
        (
            [_insert({"a": 1}), pb.WriteModel(delete_one=pb.DeleteModel(filter=b"\x00"))],
            "operations[1].delete_one.filter",
        ),
    ],
    ids=[
        "none",
        "empty-model",
        "no-document",
        "not-operators",
        "operator-replacement",
        "no-update",
        "bad-filter",
    ],
)
def test_bad_bulk_writes_are_refused_before_anything_is_written(
    broker, stub, collection_name, mongo_collection, operations, words
):
    with fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        _bulk(stub, broker, collection_name, operations)
    assert words in failure.message
    assert mongo_collection.count_documents({}) == 0


def test_write_methods_are_counted_in_stats(broker, stub, collection_name, mongo_collection):
    before = database_stats(stub, broker.db_name).rpcs
    _update(stub, broker, collection_name, update=_enc({"$set": {"a": 1}}))
    stub.Delete(pb.DeleteRequest(database=broker.db_name, collection=collection_name), timeout=30)
    _modify(stub, broker, collection_name, remove=True)
    _bulk(stub, broker, collection_name, [_insert({"a": 1})])
    after = database_stats(stub, broker.db_name).rpcs
    for method in ("Update", "Delete", "FindOneAndModify", "BulkWrite"):
        assert after[method] == before.get(method, 0) + 1, method


def test_a_bulk_reply_the_driver_cannot_count_is_not_an_internal_error(broker, stub, collection_name):
    # {"$set": null} is refused by the server; FerretDB 1.24's reply then
    # lacks the nModified that pymongo adds up (KeyError inside the driver).
    operation = pb.WriteModel(update_one=pb.UpdateModel(update=bson.encode({"$set": None})))
    with pytest.raises(grpc.RpcError) as caught:
        _bulk(stub, broker, collection_name, [operation], ordered=False)
    assert caught.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    if caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION:
        assert "read back before retrying" in (caught.value.details() or "")
