"""broker.documents: how a walk's findings become statuses, Extended JSON, and insert preparation."""

from __future__ import annotations

from typing import Any

import bson
import grpc
import pytest
from bson import Binary, Code, Int64, ObjectId, Regex

from broker.documents import Checks, check_document, json_to_bson, prepare_inserts
from broker.errors import RpcError
from broker.security import JS_OPERATORS
from tests.rawbson import deep, document

GUARD = Checks(max_depth=100, denied=JS_OPERATORS)
MIB16 = 16 * 1024 * 1024


def _refusal(call: Any, *args: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    ("data", "code", "reason", "message"),
    [
        (
            bson.encode({"a": {"s": "x"}}).replace(b"x", b"\xff"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_BSON",
            "filter is not a valid BSON document (22 bytes) at filter.a.s: a string is not valid utf-8",
        ),
        (
            b"\x06\x00\x00\x00\x00",
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_BSON",
            "filter is not a valid BSON document (5 bytes): the length prefix says 6 bytes but there are 5",
        ),
        (
            document(("a", 1), ("a", 2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            "filter.a: duplicate key.",
        ),
        (
            deep(100_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "LIMIT_EXCEEDED",
            "filter nests deeper than limits.max_bson_depth (100)",
        ),
        (
            bson.encode({"a": {"$ref": "c", "$id": 1, "$where": "1"}}),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_AUTHORIZED",
            "filter.a.$where: $where runs JavaScript",
        ),
    ],
    ids=["malformed-inside", "malformed-envelope", "duplicate", "deep", "denied"],
)
def test_each_finding_has_its_status(data: bytes, code: grpc.StatusCode, reason: str, message: str) -> None:
    error = _refusal(check_document, data, "filter", GUARD)
    assert (error.code, error.reason) == (code, reason)
    assert error.message.startswith(message), error.message


def test_a_malformed_document_is_refused_before_a_denied_operator_in_it() -> None:
    data = bson.encode({"$where": "1", "s": "x"}).replace(b"x", b"\xff")
    assert _refusal(check_document, data, "filter", GUARD).reason == "INVALID_BSON"


# --- Extended JSON ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"a": 1, "a": 2}', "filter_json.a"),
        ('{"$or": [{"$and": [{"$where": "1"}], "$and": [{"a": 1}]}]}', "filter_json.$or[0].$and"),
        (
            '{"x": [1, {"y": {"$oid": "0123456789ab0123456789ab", "$oid": "ffffffffffffffffffffffff"}}]}',
            "filter_json.x[1].y.$oid",
        ),
    ],
)
def test_duplicate_json_keys_are_refused_with_their_path(text: str, path: str) -> None:
    error = _refusal(json_to_bson, text, "filter_json")
    assert error.reason == "INVALID_REQUEST"
    assert error.message.startswith(f"{path}: duplicate key")


@pytest.mark.parametrize("levels", [2000, 100_000])
def test_json_too_deep_to_parse_is_limit_exceeded(levels: int) -> None:
    text = '{"n": ' * levels + "1" + "}" * levels
    error = _refusal(json_to_bson, text, "filter_json")
    assert error.reason == "LIMIT_EXCEEDED" and "limits.max_bson_depth" in error.message


def test_json_becomes_the_bson_that_is_then_checked() -> None:
    data = json_to_bson(
        '{"a": {"$ref": "c", "$id": 1, "$where": "1"}, "n": {"$numberLong": "5"}}', "filter_json"
    )
    assert bson.decode(data)["n"] == Int64(5)
    assert _refusal(check_document, data, "filter", GUARD).message.startswith("filter.a.$where")


# --- inserts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "text",
        7,
        Int64(7),
        1.5,
        ObjectId(),
        {"b": 1, "a": [1, 2]},
        Binary(b"\x01", 4),
        Regex("a", "mi"),
        Code("c", {"s": 1}),
    ],
)
def test_an_existing_id_is_returned_byte_for_byte(value: Any) -> None:
    data = bson.encode({"n": 1, "_id": value})
    prepared = prepare_inserts([data], Checks(100), MIB16)
    assert prepared.documents[0].raw == data
    (id_document,) = prepared.id_documents
    assert id_document == bson.encode({"_id": value})
    assert prepared.bytes == len(data)


def test_a_missing_id_is_added_first() -> None:
    prepared = prepare_inserts([bson.encode({"n": 1})], Checks(100), MIB16)
    stored = bson.decode(prepared.documents[0].raw)
    assert list(stored) == ["_id", "n"] and isinstance(stored["_id"], ObjectId)
    assert bson.decode(prepared.id_documents[0]) == {"_id": stored["_id"]}


def test_documents_over_the_server_limit_are_refused_counting_an_added_id() -> None:
    at_limit = bson.encode({"_id": 1, "b": Binary(b"x" * 80)})
    limit = len(at_limit)
    prepare_inserts([at_limit], Checks(100), limit)
    error = _refusal(
        prepare_inserts, [at_limit, bson.encode({"_id": 2, "b": Binary(b"x" * 81)})], Checks(100), limit
    )
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED")
    assert error.message.startswith(f"documents[1] is {limit + 1} bytes, larger than")
    assert error.metadata == {"index": "1", "document_bytes": str(limit + 1), "max_bytes": str(limit)}
    no_id = bson.encode({"b": Binary(b"x" * 80)})
    error = _refusal(prepare_inserts, [no_id], Checks(100), limit)
    assert f"with the _id the broker added ({len(no_id)} as sent)" in error.message
