"""The new methods' requests into pymongo arguments, without a server: every option to its argument."""

from __future__ import annotations

import bson
import grpc
import pymongo
import pytest
from broker_client.proto.broker.v1 import broker_pb2 as pb
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from pymongo import read_preferences

from broker import documents, requests
from broker.errors import Reason, RpcError
from broker.security import JS_OPERATORS

GUARD = documents.Checks(100, JS_OPERATORS)
STORED = documents.Checks(100)


def _enc(value: dict) -> bytes:
    return bson.encode(value)


def _refused(call, words: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> RpcError:
    with pytest.raises(RpcError) as caught:
        call()
    assert caught.value.code == code
    assert words in caught.value.message, caught.value.message
    return caught.value


# --- Update -------------------------------------------------------------------------


def test_update_one_carries_every_option():
    request = pb.UpdateRequest(
        filter=_enc({"a": 1}),
        update=_enc({"$set": {"b": 2}}),
        upsert=True,
        array_filters=[_enc({"e": 1})],
        hint_name="a_1",
        collation=_enc({"locale": "fr"}),
        let=_enc({"v": 1}),
        bypass_document_validation=True,
    )
    method, arguments = requests.update_arguments(request, GUARD, STORED, "rid=1")
    assert method == "update_one"
    assert bytes(arguments["filter"].raw) == _enc({"a": 1})
    assert bytes(arguments["update"].raw) == _enc({"$set": {"b": 2}})
    assert [bytes(f.raw) for f in arguments["array_filters"]] == [_enc({"e": 1})]
    assert arguments["upsert"] is True
    assert arguments["bypass_document_validation"] is True
    assert arguments["hint"] == "a_1"
    assert arguments["collation"] == {"locale": "fr"}
    assert bytes(arguments["let"].raw) == _enc({"v": 1})
    assert arguments["comment"] == "rid=1"


def test_update_keeps_the_callers_bytes():
    update = _enc({"$set": {"big": Int64(1), "f": 1.0}})
    _, arguments = requests.update_arguments(pb.UpdateRequest(update=update), GUARD, STORED, "")
    assert isinstance(arguments["update"], RawBSONDocument)
    assert bytes(arguments["update"].raw) == update


def test_multi_is_update_many_and_a_replacement_is_replace_one():
    many, _ = requests.update_arguments(
        pb.UpdateRequest(update=_enc({"$inc": {"n": 1}}), multi=True), GUARD, STORED, ""
    )
    assert many == "update_many"
    one, arguments = requests.update_arguments(
        pb.UpdateRequest(replacement=_enc({"n": 1})), GUARD, STORED, ""
    )
    assert one == "replace_one" and "update" not in arguments and "array_filters" not in arguments


def test_an_update_pipeline_is_a_list_of_stages():
    stages = [_enc({"$set": {"a": 1}}), _enc({"$unset": "b"})]
    _, arguments = requests.update_arguments(pb.UpdateRequest(update_pipeline=stages), GUARD, STORED, "")
    assert [bytes(s.raw) for s in arguments["update"]] == stages


def test_an_empty_filter_matches_everything():
    _, arguments = requests.update_arguments(
        pb.UpdateRequest(update=_enc({"$set": {"a": 1}})), GUARD, STORED, ""
    )
    assert dict(arguments["filter"]) == {}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"update": _enc({"a": 1})}, "must hold only update operators"),
        ({"update": _enc({"$set": {}, "a": 1})}, "must hold only update operators"),
        ({"replacement": _enc({"$set": {"a": 1}})}, "must not hold $-operators"),
        ({"replacement": _enc({"a": 1}), "multi": True}, "multi must be false"),
        ({"replacement": _enc({"a": 1}), "array_filters": [_enc({"e": 1})]}, "not to a replacement"),
        ({"update": _enc({"$set": {"a": 1}}), "update_pipeline": [_enc({"$set": {}})]}, "give only one of"),
        ({}, "give one of update"),
        (
            {"update_pipeline": [_enc({"$lookup": {"from": "x", "as": "j", "pipeline": []}})]},
            "cannot read other",
        ),
        ({"update_pipeline": [_enc({"$out": "x"})]}, "$out"),
    ],
)
def test_bad_updates_are_refused(fields, words):
    _refused(lambda: requests.update_arguments(pb.UpdateRequest(**fields), GUARD, STORED, ""), words)


def test_javascript_in_an_update_is_refused_but_a_replacement_stores_any_key():
    function = {"$function": {"body": "1", "args": [], "lang": "js"}}
    error = _refused(
        lambda: requests.update_arguments(
            pb.UpdateRequest(update_pipeline=[_enc({"$set": {"x": function}})]), GUARD, STORED, ""
        ),
        "update_pipeline[0].$set.x.$function",
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error.reason == Reason.NOT_AUTHORIZED
    # A stored document's keys are data: "$where" nested in it is no operator.
    method, _ = requests.update_arguments(
        pb.UpdateRequest(replacement=_enc({"note": {"$where": "text"}})), GUARD, STORED, ""
    )
    assert method == "replace_one"


# --- Delete, FindOneAndModify, Count, Distinct, Aggregate -----------------------------


def test_delete_many_with_hint_keys():
    method, arguments = requests.delete_arguments(
        pb.DeleteRequest(filter=_enc({"a": 1}), multi=True, hint_keys=_enc({"a": 1, "b": -1})), GUARD, ""
    )
    assert method == "delete_many"
    assert arguments["hint"] == [("a", 1), ("b", -1)]


@pytest.mark.parametrize(
    ("fields", "method"),
    [
        ({"update": _enc({"$set": {"a": 1}})}, "find_one_and_update"),
        ({"replacement": _enc({"a": 1})}, "find_one_and_replace"),
        ({"remove": True}, "find_one_and_delete"),
    ],
)
def test_find_one_and_modify_picks_the_method(fields, method):
    chosen, arguments = requests.find_and_modify_arguments(
        pb.FindOneAndModifyRequest(sort=_enc({"n": -1}), projection=_enc({"n": 1}), **fields),
        GUARD,
        STORED,
        "",
    )
    assert chosen == method
    assert arguments["sort"] == [("n", -1)]
    assert dict(arguments["projection"]) == {"n": 1}


def test_return_document_after_is_true():
    _, arguments = requests.find_and_modify_arguments(
        pb.FindOneAndModifyRequest(update=_enc({"$set": {"a": 1}}), return_document=pb.RETURN_DOCUMENT_AFTER),
        GUARD,
        STORED,
        "",
    )
    assert arguments["return_document"] is True


def test_count_documents_and_estimated():
    method, arguments = requests.count_arguments(pb.CountRequest(skip=2, limit=3), GUARD, "c")
    assert method == "count_documents" and (arguments["skip"], arguments["limit"]) == (2, 3)
    method, arguments = requests.count_arguments(pb.CountRequest(estimated=True), GUARD, "c")
    assert (method, arguments) == ("estimated_document_count", {"comment": "c"})
    _refused(
        lambda: requests.count_arguments(pb.CountRequest(estimated=True, hint_name="x"), GUARD, ""),
        "hint cannot apply",
    )


@pytest.mark.parametrize(("key", "words"), [("", "key is required"), ("$a", "leading $"), ("a\x00", "NUL")])
def test_distinct_key_rules(key, words):
    _refused(lambda: requests.distinct_arguments(pb.DistinctRequest(key=key), GUARD, ""), words)


def test_aggregate_options():
    arguments = requests.aggregate_arguments(
        pb.AggregateRequest(pipeline=[_enc({"$match": {}})], allow_disk_use=False, batch_size=0),
        GUARD,
        77,
        "",
    )
    assert arguments["batchSize"] == 77
    assert arguments["allowDiskUse"] is False
    assert "bypassDocumentValidation" not in arguments


# --- BulkWrite ----------------------------------------------------------------------


def test_bulk_operations_become_pymongo_models_with_ids():
    request = pb.BulkWriteRequest(
        operations=[
            pb.WriteModel(insert_one=pb.InsertOneModel(document=_enc({"a": 1}))),
            pb.WriteModel(insert_one=pb.InsertOneModel(document=_enc({"_id": 5}))),
            pb.WriteModel(update_many=pb.UpdateModel(update=_enc({"$set": {"a": 1}}), upsert=True)),
            pb.WriteModel(replace_one=pb.ReplaceOneModel(replacement=_enc({"b": 1}), hint_name="h")),
            pb.WriteModel(delete_many=pb.DeleteModel(filter=_enc({"a": 1}))),
        ]
    )
    models, inserted, size = requests.bulk_operations(request, GUARD, STORED, 16 * 1024 * 1024)
    assert [type(m) for m in models] == [
        pymongo.InsertOne,
        pymongo.InsertOne,
        pymongo.UpdateMany,
        pymongo.ReplaceOne,
        pymongo.DeleteMany,
    ]
    assert [index for index, _ in inserted] == [0, 1]
    assert bson.decode(inserted[1][1]) == {"_id": 5}
    assert size == len(_enc({"a": 1})) + len(_enc({"_id": 5}))


def test_a_bulk_insert_too_large_names_its_operation():
    request = pb.BulkWriteRequest(
        operations=[
            pb.WriteModel(delete_one=pb.DeleteModel()),
            pb.WriteModel(insert_one=pb.InsertOneModel(document=_enc({"_id": 1, "x": "y" * 100}))),
        ]
    )
    error = _refused(
        lambda: requests.bulk_operations(request, GUARD, STORED, 64), "operations[1].insert_one.document"
    )
    assert error.metadata["index"] == "1"


# --- read options and Extended JSON -------------------------------------------------


def test_read_preference_with_tags_and_staleness():
    request = pb.CountRequest(
        read_preference=pb.ReadPreference(
            mode=pb.READ_PREFERENCE_SECONDARY_PREFERRED,
            tag_sets=[_enc({"dc": "east"}), b""],
            max_staleness_s=120,
        ),
        read_concern=pb.READ_CONCERN_MAJORITY,
    )
    options = requests.read_options(request, GUARD)
    preference = options["read_preference"]
    assert isinstance(preference, read_preferences.SecondaryPreferred)
    assert preference.tag_sets == [{"dc": "east"}, {}]
    assert preference.max_staleness == 120
    assert options["read_concern"].level == "majority"


def test_no_read_options_means_the_defaults():
    assert requests.read_options(pb.CountRequest(), GUARD) == {}


def test_extended_json_is_converted_in_nested_messages():
    request = pb.BulkWriteRequest(
        encoding=pb.ENCODING_RELAXED_JSON,
        operations=[
            pb.WriteModel(insert_one=pb.InsertOneModel(document_json='{"a": {"$numberLong": "5"}}')),
            pb.WriteModel(
                update_one=pb.UpdateModel(filter_json='{"b": 1}', update_json='{"$set": {"c": 1}}')
            ),
        ],
    )
    converted, mode = requests.request_as_bson(request)
    assert mode == "relaxed"
    assert bson.decode(converted.operations[0].insert_one.document) == {"a": Int64(5)}
    assert bson.decode(converted.operations[1].update_one.update) == {"$set": {"c": 1}}


def test_json_fields_without_a_json_encoding_are_named():
    request = pb.BulkWriteRequest(operations=[pb.WriteModel(update_one=pb.UpdateModel(filter_json="{}"))])
    _refused(lambda: requests.request_as_bson(request), "operations[0].update_one.filter_json")


def test_bson_twins_in_a_json_request_are_refused():
    request = pb.CountRequest(encoding=pb.ENCODING_CANONICAL_JSON, filter=_enc({"a": 1}), filter_json="{}")
    _refused(lambda: requests.request_as_bson(request), "filter holds BSON")


def test_distinct_values_are_chunked_under_the_cap_and_keep_types():
    values = [Int64(1), "x" * 500, {"k": 1}, 2.0] * 50
    chunks = list(documents.chunk_values(values, 4096))
    assert len(chunks) > 1
    assert all(len(c) <= 4096 for c in chunks)
    assert [v for c in chunks for v in bson.decode(c)["values"]] == values
    assert isinstance(bson.decode(chunks[0])["values"][0], Int64)
    assert list(documents.chunk_values([], 4096)) == [_enc({"values": []})]
