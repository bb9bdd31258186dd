"""broker.bsonwalk: the one pass over a document's bytes. Pure: no server, no broker."""

from __future__ import annotations

import datetime
import re
import struct
import uuid
from typing import Any

import bson
import pytest
from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.bsonwalk import DuplicateKey, MalformedBson, TooDeep, walk
from tests.rawbson import Raw, RawArray, array, deep, document

JS = frozenset({"$where", "$function", "$accumulator"})
DECODE: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)


def _int32(n: int) -> bytes:
    return struct.pack("<i", n)


def _raw_element(element_type: int, key: bytes, value: bytes) -> bytes:
    """One document holding one element, with any type byte and value bytes."""
    body = bytes([element_type]) + key + b"\x00" + value
    return _int32(len(body) + 5) + body + b"\x00"


def _string(text: bytes) -> bytes:
    return _int32(len(text) + 1) + text + b"\x00"


# --- what encoders write is accepted ---------------------------------------------

SAMPLE: dict[str, Any] = {
    "_id": ObjectId(),
    "double": 1.5,
    "string": "grüße ✓",
    "empty": "",
    "document": {"a": {"b": {}}},
    "array": [1, "two", {"three": 3}, [4, [5, [6]]], []],
    "binary": Binary(b"\x00\x01\xff", 0),
    "function": Binary(b"f", 1),
    "old_binary": Binary(b"abc", 2),
    "uuid": Binary(uuid.UUID("12345678-1234-5678-1234-567812345678").bytes, 4),
    "user": Binary(b"\x80", 0x80),
    "true": True,
    "false": False,
    "date": datetime.datetime(2024, 2, 29, 12, 30, 15, 123000),
    "far_date": DatetimeMS(2**62),
    "none": None,
    "regex": Regex("^a.b$", "imsx"),
    "compiled": re.compile("x+", re.IGNORECASE),
    "code": Code("function () { return 1; }"),
    "code_with_scope": Code("x + y", {"x": 1, "y": {"z": [1]}}),
    "code_empty_scope": Code("1", {}),
    "int32": -(2**31),
    "timestamp": Timestamp(1_700_000_000, 7),
    "int64": Int64(2**62),
    "decimal": Decimal128("1234.5678901234567890"),
    "min": MinKey(),
    "max": MaxKey(),
    "dbref": DBRef("things", ObjectId(), "otherdb", extra={"k": 1}),
}


def test_accepts_every_type_bson_encode_writes() -> None:
    data = bson.encode(SAMPLE)
    result = walk(data, "doc", max_depth=100, denied=JS)
    assert result.denied is None
    assert result.id_element is not None
    element_type, start, value, end = result.id_element
    assert (
        element_type == 0x07
        and data[start:value] == b"\x07_id\x00"
        and data[value:end] == SAMPLE["_id"].binary
    )
    for key, value_ in SAMPLE.items():  # each alone too, so a failure names the type
        walk(bson.encode({key: value_}), key, max_depth=100)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
    st.binary(max_size=20),
    st.builds(Binary, st.binary(max_size=8), st.sampled_from([0, 1, 3, 4, 5, 6, 0x80, 0xFF])),
    st.builds(ObjectId),
    st.sampled_from(list(SAMPLE.values())),
)
_keys = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=6)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(value=st.dictionaries(_keys, _values, max_size=6))
def test_accepts_whatever_bson_encode_writes(value: dict[str, Any]) -> None:
    data = bson.encode(value)
    walked = walk(data, "doc", max_depth=100)
    assert (walked.id_element is not None) == ("_id" in value)


@pytest.mark.parametrize(
    ("element_type", "value"),
    [
        (0x06, b""),  # undefined (deprecated)
        (0x0C, _string(b"db.coll") + ObjectId().binary),  # DBPointer (deprecated)
        (0x0E, _string(b"symbol")),  # symbol (deprecated)
        (0x0D, _string(b"")),  # JavaScript code, empty
        (0x05, _int32(0) + b"\x00"),  # empty binary
        (0x05, _int32(4) + b"\x02" + _int32(0)),  # old binary, empty
        (0x0B, b"\x00\x00"),  # empty regex, no options
    ],
    ids=["undefined", "dbpointer", "symbol", "empty-code", "empty-binary", "empty-old-binary", "empty-regex"],
)
def test_accepts_the_types_bson_encode_does_not_write(element_type: int, value: bytes) -> None:
    data = _raw_element(element_type, b"k", value)
    bson.decode(data)  # the reference decoder agrees it is valid
    walk(data, "doc", max_depth=100)


def test_finds_the_top_level_id_of_any_type() -> None:
    for value in ("text", 7, Int64(7), {"a": [1, 2]}, [1], Code("c", {"s": 1}), None, Binary(b"x", 4)):
        data = bson.encode({"before": 1, "_id": value, "after": {"_id": 2}})
        found = walk(data, "doc", max_depth=100).id_element
        assert found is not None, value
        _, start, _, end = found
        element = data[start:end]
        assert bson.decode(_int32(len(element) + 5) + element + b"\x00") == {"_id": value}
    assert walk(bson.encode({"a": {"_id": 1}}), "doc", max_depth=100).id_element is None


# --- malformed input ------------------------------------------------------------------


def test_every_truncation_is_malformed() -> None:
    data = bson.encode(SAMPLE)
    for cut in range(len(data)):
        part = data[:cut]
        with pytest.raises(MalformedBson):
            walk(part, "doc", max_depth=100)
        if cut >= 5:
            # The length prefix and last byte fixed up: the damage is then
            # inside, unless the cut fell between two elements.
            fixed = _int32(cut) + part[4:-1] + b"\x00"
            try:
                walk(fixed, "doc", max_depth=100)
            except MalformedBson:
                continue
            bson.decode(fixed, DECODE)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "shorter than the smallest document"),
        (b"\x05\x00\x00", "shorter than the smallest document"),
        (_int32(6) + b"\x00", "length prefix says 6 bytes but there are 5"),
        (bson.encode({"a": 1}) + b"\x00", "length prefix says"),  # a trailing byte
        (bson.encode({"a": 1})[:-1] + b"\x01", "does not end with a NUL"),
        (_int32(7) + b"\x10ab", "does not end with a NUL"),
        (_int32(9) + b"\x10abc\x00", "field name runs past the end"),  # key without NUL
        (_raw_element(0x10, b"k", b"\x01\x00"), "runs past the end"),  # short int32
        (_raw_element(0x01, b"k", b"\x00" * 7), "runs past the end"),  # short double
        (_raw_element(0x08, b"k", b"\x02"), "bool must be 0 or 1"),
        (_raw_element(0x02, b"k", _int32(0) + b"\x00"), "string length 0"),
        (_raw_element(0x02, b"k", _int32(-5) + b"x\x00"), "string length -5"),
        (_raw_element(0x02, b"k", _int32(100) + b"x\x00"), "string length 100"),
        (_raw_element(0x02, b"k", _int32(2) + b"xy"), "string does not end with a NUL"),
        (_raw_element(0x02, b"k", _string(b"\xff\xfe")), "string is not valid utf-8"),
        (_raw_element(0x02, b"k", _string(b"\xc3")), "string is not valid utf-8"),  # cut multi-byte
        (_raw_element(0x10, b"\xff", _int32(1)), "field name is not valid utf-8"),
        (_raw_element(0x03, b"k", _int32(4) + b"\x00"), "sub-document length 4"),
        (_raw_element(0x03, b"k", _int32(50) + b"\x00"), "sub-document length 50"),
        (_raw_element(0x03, b"k", _int32(5) + b"\x01"), "sub-document does not end with a NUL"),
        (_raw_element(0x04, b"k", _int32(8) + b"\x0aab\x00"), "field name runs past the end"),  # in an array
        (_raw_element(0x05, b"k", _int32(-1) + b"\x00"), "binary length -1"),
        (_raw_element(0x05, b"k", _int32(9) + b"\x00xx"), "binary length 9"),
        (_raw_element(0x05, b"k", _int32(5) + b"\x02" + _int32(0) + b"x"), "subtype 2 disagree"),
        (_raw_element(0x05, b"k", _int32(2) + b"\x02xx"), "subtype 2 disagree"),
        (_raw_element(0x0B, b"k", b"abc"), "regular expression runs past the end"),
        (_raw_element(0x0B, b"k", b"a\xff\x00\x00"), "regular expression is not valid utf-8"),
        (_raw_element(0x0C, b"k", _string(b"ns") + b"\x00" * 11), "DBPointer runs past the end"),
        (_raw_element(0x0F, b"k", _int32(13) + _string(b"") + _int32(5)), "code-with-scope length 13"),
        (
            _raw_element(0x0F, b"k", _int32(20) + _string(b"") + bson.encode({}) + b"\x00" * 6),
            "code-with-scope lengths disagree",
        ),
        (
            _raw_element(0x0F, b"k", _int32(14) + _string(b"") + _int32(6) + b"\x00"),
            "scope document length 6",
        ),
        (_raw_element(0x14, b"k", b""), "unknown element type 0x14"),
        (_raw_element(0x00, b"k", b""), "unknown element type 0x00"),
    ],
)
def test_malformed_documents_say_what_is_wrong(data: bytes, needle: str) -> None:
    with pytest.raises(MalformedBson) as caught:
        walk(data, "doc", max_depth=100)
    assert needle in str(caught.value)
    assert str(caught.value).startswith("doc")
    with pytest.raises(Exception):  # noqa: B017  # the reference decoder refuses it too
        bson.decode(data, DECODE)


def test_malformed_paths_name_the_element() -> None:
    bad_string = _raw_element(0x02, b"s", _string(b"\xff"))
    data = document(("a", document(("b", array(1, 2, document(("ok", 1)), Raw(bad_string))))))
    with pytest.raises(MalformedBson) as caught:
        walk(data, "filter", max_depth=100)
    assert caught.value.path == "filter.a.b[3].s"


@settings(max_examples=2000, deadline=None)
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_whatever_the_walk_accepts_decodes(position: int, byte: int) -> None:
    # One byte changed anywhere: the walk may accept (a changed value) or
    # refuse, never crash; what it accepts the server-side decoder reads, so
    # decoding after the walk (sort and hint) cannot fail.
    data = bytearray(bson.encode(SAMPLE))
    data[position % len(data)] = byte
    try:
        walk(bytes(data), "doc", max_depth=100)
    except (MalformedBson, DuplicateKey, TooDeep):
        return
    bson.decode(bytes(data), DECODE)


# --- duplicate keys ------------------------------------------------------------------


def test_duplicate_key_at_the_top_level() -> None:
    with pytest.raises(DuplicateKey) as caught:
        walk(document(("_id", 1), ("a", 1), ("_id", 2)), "documents[0]", max_depth=100)
    assert str(caught.value) == "documents[0]._id: duplicate key"


def test_duplicate_key_deep_inside_arrays() -> None:
    hidden = document(("$and", array(document(("$where", "1")))), ("$and", array(document(("a", 1)))))
    data = document(("$or", array(document(("a", 1)), hidden)))
    with pytest.raises(DuplicateKey) as caught:
        walk(data, "filter", max_depth=100, denied=JS)
    assert caught.value.path == "filter.$or[1].$and"
    deeper = document(("x", array(array(document(("k", array(document(("y", 1), ("y", 2)))))))))
    with pytest.raises(DuplicateKey) as caught:
        walk(deeper, "filter", max_depth=100)
    assert caught.value.path == "filter.x[0][0].k[0].y"


def test_duplicate_array_index() -> None:
    twice = document(("0", 1), ("0", 2))
    data = document(("a", RawArray(twice)))
    with pytest.raises(DuplicateKey) as caught:
        walk(data, "filter", max_depth=100)
    assert str(caught.value) == "filter.a[0]: duplicate key"


def test_equal_keys_in_different_documents_are_fine() -> None:
    walk(bson.encode({"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}), "doc", max_depth=100)


# --- denied operators ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"$where": "1"}, "filter.$where"),
        ({"a": {"$elemMatch": {"$where": "1"}}}, "filter.a.$elemMatch.$where"),
        ({"$or": [{"a": 1}, {"$and": [{"$where": "1"}]}]}, "filter.$or[1].$and[0].$where"),
        ({"$expr": {"$function": {"body": "x", "args": [], "lang": "js"}}}, "filter.$expr.$function"),
        ({"a": {"$ref": "c", "$id": 1, "$where": "1"}}, "filter.a.$where"),  # DBRef-shaped
        (
            {"a": [{"$ref": "c", "$id": 1, "$db": "d", "b": {"$accumulator": {}}}]},
            "filter.a[0].b.$accumulator",
        ),
    ],
)
def test_denied_keys_are_found_with_their_path(value: dict[str, Any], path: str) -> None:
    assert walk(bson.encode(value), "filter", max_depth=100, denied=JS).denied == path
    assert walk(bson.encode(value), "filter", max_depth=100).denied is None


def test_denied_keys_mean_nothing_as_array_keys_or_scope_variables() -> None:
    as_index = document(("a", RawArray(document(("$where", 1)))))
    assert walk(as_index, "filter", max_depth=100, denied=JS).denied is None
    scope = bson.encode({"c": Code("x", {"$where": 1})})
    assert walk(scope, "filter", max_depth=100, denied=JS).denied is None


def test_the_first_denied_key_is_reported() -> None:
    data = bson.encode({"a": {"$function": {}}, "$where": "1"})
    assert walk(data, "filter", max_depth=100, denied=JS).denied == "filter.a.$function"


# --- depth ------------------------------------------------------------------------------


def test_depth_exactly_at_the_limit_passes_and_one_past_does_not() -> None:
    # deep(9): nine documents, the innermost holding a field: depth 10.
    walk(deep(9), "doc", max_depth=10)
    with pytest.raises(TooDeep) as caught:
        walk(deep(10), "doc", max_depth=10)
    assert caught.value.path == "doc" + ".n" * 9
    # An empty innermost document adds no level below itself.
    empty = bson.encode({})
    for _ in range(9):
        empty = bson.encode({"n": bson.decode(empty)})
    walk(empty, "doc", max_depth=10)  # ten documents
    with pytest.raises(TooDeep):
        walk(bson.encode({"n": bson.decode(empty)}), "doc", max_depth=10)


def test_arrays_and_scopes_count_as_levels() -> None:
    walk(bson.encode({"a": [[[1]]]}), "doc", max_depth=5)
    with pytest.raises(TooDeep):
        walk(bson.encode({"a": [[[1]]]}), "doc", max_depth=4)
    with pytest.raises(TooDeep):
        walk(bson.encode({"c": Code("x", {"s": {"t": 1}})}), "doc", max_depth=3)


@pytest.mark.parametrize("levels", [150, 2000, 100_000])
def test_any_depth_is_refused_without_recursion(levels: int) -> None:
    with pytest.raises(TooDeep):
        walk(deep(levels), "doc", max_depth=100)


def test_a_deep_document_behind_a_duplicate_key_is_too_deep() -> None:
    # Decoded, the second "n" (a scalar) would hide the first (150 deep).
    data = document(("n", Raw(deep(150))), ("n", 1))
    with pytest.raises(TooDeep):
        walk(data, "filter", max_depth=100)
