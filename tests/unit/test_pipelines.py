"""broker.pipelines: every collection a pipeline reaches, what is refused, and $out/$merge retargeting."""

from __future__ import annotations

import datetime
import struct
from typing import Any

import bson
import grpc
import pytest
from bson import Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.son import SON
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import RpcError
from broker.pipelines import (
    MAX_PIPELINE_DEPTH,
    PipelineReach,
    Reach,
    inspect,
    inspect_bson,
    performs_write,
    retarget,
)
from tests.rawbson import Raw, array, document

# Order-keeping decoding with exact types, as a reader of the retargeted stage sees it.
SON_OPTIONS: CodecOptions[SON[str, Any]] = CodecOptions(
    document_class=SON, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


def _read(collection: str, path: str) -> Reach:
    return Reach(path, collection, None, False)


def _refusal(stages: Any, **kwargs: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        inspect(stages, **kwargs)
    return caught.value


DOCS = {"$documents": [{"a": 1}]}

# (pipeline, the reaches inspect lists, whether it writes)
SHAPES: list[tuple[list[dict[str, Any]], list[Reach], bool]] = [
    (
        [{"$match": {}}, {"$lookup": {"from": "orders", "localField": "a", "foreignField": "b", "as": "o"}}],
        [_read("orders", "pipeline[1].$lookup.from")],
        False,
    ),
    (
        [{"$lookup": {"from": "orders", "as": "o", "pipeline": [{"$lookup": {"from": "items", "as": "i"}}]}}],
        [
            _read("orders", "pipeline[0].$lookup.from"),
            _read("items", "pipeline[0].$lookup.pipeline[0].$lookup.from"),
        ],
        False,
    ),
    # No from: the sub-pipeline reads only its own $documents.
    ([{"$lookup": {"as": "o", "pipeline": [DOCS, {"$match": {}}]}}], [], False),
    (
        [
            {
                "$graphLookup": {
                    "from": "people",
                    "startWith": "$boss",
                    "connectFromField": "boss",
                    "connectToField": "name",
                    "as": "chain",
                }
            }
        ],
        [_read("people", "pipeline[0].$graphLookup.from")],
        False,
    ),
    ([{"$unionWith": "archive"}], [_read("archive", "pipeline[0].$unionWith")], False),
    (
        [{"$unionWith": {"coll": "archive", "pipeline": [{"$unionWith": "older"}]}}],
        [
            _read("archive", "pipeline[0].$unionWith.coll"),
            _read("older", "pipeline[0].$unionWith.pipeline[0].$unionWith"),
        ],
        False,
    ),
    ([{"$unionWith": {"pipeline": [DOCS]}}], [], False),
    ([{"$match": {}}, {"$out": "report"}], [Reach("pipeline[1].$out", "report", None, True)], True),
    (
        [{"$out": {"db": "analytics", "coll": "report"}}],
        [Reach("pipeline[0].$out.coll", "report", "analytics", True)],
        True,
    ),
    (
        [{"$out": {"db": "metrics", "coll": "ts", "timeseries": {"timeField": "t", "metaField": "m"}}}],
        [Reach("pipeline[0].$out.coll", "ts", "metrics", True)],
        True,
    ),
    ([{"$out": {"coll": "report"}}], [Reach("pipeline[0].$out.coll", "report", None, True)], True),
    ([{"$merge": "totals"}], [Reach("pipeline[0].$merge", "totals", None, True)], True),
    (
        [{"$merge": {"into": "totals", "on": "_id"}}],
        [Reach("pipeline[0].$merge.into", "totals", None, True)],
        True,
    ),
    (
        [{"$merge": {"into": {"db": "analytics", "coll": "totals"}, "whenMatched": "replace"}}],
        [Reach("pipeline[0].$merge.into.coll", "totals", "analytics", True)],
        True,
    ),
    (
        [{"$merge": {"into": {"coll": "totals"}}}],
        [Reach("pipeline[0].$merge.into.coll", "totals", None, True)],
        True,
    ),
    # whenMatched as a pipeline is inspected too (the server allows no $lookup
    # there, but the broker does not rely on that).
    (
        [
            {
                "$merge": {
                    "into": "totals",
                    "whenMatched": [{"$set": {"n": 1}}, {"$lookup": {"from": "x", "as": "y"}}],
                }
            }
        ],
        [
            Reach("pipeline[0].$merge.into", "totals", None, True),
            _read("x", "pipeline[0].$merge.whenMatched[1].$lookup.from"),
        ],
        True,
    ),
    (
        [
            {
                "$facet": {
                    "a": [{"$lookup": {"from": "l", "as": "x"}}],
                    "b": [{"$unionWith": "u"}, {"$count": "n"}],
                }
            }
        ],
        [
            _read("l", "pipeline[0].$facet.a[0].$lookup.from"),
            _read("u", "pipeline[0].$facet.b[0].$unionWith"),
        ],
        False,
    ),
    # The nesting of the task: $facet > $lookup > sub-pipeline > $unionWith.
    (
        [
            {"$match": {"a": 1}},
            {
                "$facet": {
                    "a": [
                        {"$sort": {"a": 1}},
                        {
                            "$lookup": {
                                "from": "orders",
                                "as": "o",
                                "pipeline": [
                                    {"$match": {}},
                                    {
                                        "$unionWith": {
                                            "coll": "old_orders",
                                            "pipeline": [{"$graphLookup": {"from": "g"}}],
                                        }
                                    },
                                ],
                            }
                        },
                    ],
                }
            },
            {"$merge": {"into": {"db": "out_db", "coll": "summary"}}},
        ],
        [
            _read("orders", "pipeline[1].$facet.a[1].$lookup.from"),
            _read("old_orders", "pipeline[1].$facet.a[1].$lookup.pipeline[1].$unionWith.coll"),
            _read(
                "g", "pipeline[1].$facet.a[1].$lookup.pipeline[1].$unionWith.pipeline[0].$graphLookup.from"
            ),
            Reach("pipeline[2].$merge.into.coll", "summary", "out_db", True),
        ],
        True,
    ),
]


@pytest.mark.parametrize(("stages", "reaches", "writes"), SHAPES)
def test_lists_every_collection_a_stage_shape_reaches(
    stages: list[dict[str, Any]], reaches: list[Reach], writes: bool
) -> None:
    assert inspect(stages) == PipelineReach(tuple(reaches), writes)
    # The same pipeline as BSON, decoded the way the broker decodes it.
    assert inspect_bson([bson.encode(stage) for stage in stages]) == PipelineReach(tuple(reaches), writes)


def test_the_field_names_the_paths() -> None:
    reached = inspect([{"$lookup": {"from": "c", "as": "x"}}], field="update")
    assert reached.reaches == (_read("c", "update[0].$lookup.from"),)


def _nested(depth: int) -> list[dict[str, Any]]:
    """A pipeline of ``depth`` pipelines, each holding the next in a $lookup, the innermost reading c."""
    stages: list[dict[str, Any]] = [{"$unionWith": "c"}]
    for _ in range(depth - 1):
        stages = [{"$lookup": {"from": "l", "as": "x", "pipeline": stages}}]
    return stages


def test_nests_up_to_mongodbs_limit() -> None:
    reached = inspect(_nested(MAX_PIPELINE_DEPTH))
    assert len(reached.reaches) == MAX_PIPELINE_DEPTH
    assert reached.reaches[-1].collection == "c"
    assert reached.reaches[-1].path == "pipeline[0]" + ".$lookup.pipeline[0]" * (MAX_PIPELINE_DEPTH - 1) + (
        ".$unionWith"
    )


def test_refuses_pipelines_nested_deeper_than_the_limit() -> None:
    error = _refusal(_nested(MAX_PIPELINE_DEPTH + 1))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "LIMIT_EXCEEDED")
    path = "pipeline[0]" + ".$lookup.pipeline[0]" * (MAX_PIPELINE_DEPTH - 1) + ".$lookup.pipeline"
    assert error.message.startswith(f"{path}: pipelines nest deeper than 20")


LOOKUP = {"from": "c", "as": "x"}

# (pipeline, the path the message starts with, a fragment of the message)
REFUSED: list[tuple[Any, str, str]] = [
    ([{"$match": {}, "$limit": 1}], "pipeline[0]", "exactly one key, its stage name"),
    ([{}], "pipeline[0]", "not a document with 0 keys"),
    (["$match"], "pipeline[0]", "not a string"),
    ([[{"$match": {}}]], "pipeline[0]", "not an array"),
    ([{"$match": {}}, None], "pipeline[1]", "not null"),
    ([{"match": {}}], "pipeline[0]", "'match' is not a stage name"),
    ({"$match": {}}, "pipeline", "must be an array of stage documents"),
    (
        [{"$lookup": {"from": 3, "as": "x"}}],
        "pipeline[0].$lookup.from",
        "non-empty string naming a collection",
    ),
    ([{"$lookup": {"from": "", "as": "x"}}], "pipeline[0].$lookup.from", "not an empty string"),
    ([{"$lookup": {"from": None, "as": "x"}}], "pipeline[0].$lookup.from", "not null"),
    (
        [{"$lookup": {"from": {"db": "other", "coll": "c"}, "as": "x"}}],
        "pipeline[0].$lookup.from",
        "cross-database",
    ),
    (
        [{"$lookup": {"as": "x", "localField": "a", "foreignField": "b"}}],
        "pipeline[0].$lookup",
        "names no collection",
    ),
    (
        [{"$lookup": {"as": "x", "pipeline": [{"$match": {}}]}}],
        "pipeline[0].$lookup",
        "first stage is $documents",
    ),
    ([{"$lookup": {"as": "x", "pipeline": []}}], "pipeline[0].$lookup", "names no collection"),
    ([{"$lookup": "c"}], "pipeline[0].$lookup", "must be a document"),
    (
        [{"$lookup": {"from": "c", "pipeline": {"$match": {}}}}],
        "pipeline[0].$lookup.pipeline",
        "must be an array",
    ),
    ([{"$graphLookup": {"startWith": "$a"}}], "pipeline[0].$graphLookup.from", "missing"),
    ([{"$graphLookup": {"from": ["c"]}}], "pipeline[0].$graphLookup.from", "not an array"),
    ([{"$graphLookup": "c"}], "pipeline[0].$graphLookup", "must be a document"),
    ([{"$unionWith": ""}], "pipeline[0].$unionWith", "not an empty string"),
    ([{"$unionWith": 1}], "pipeline[0].$unionWith", "a collection name or {coll, pipeline}"),
    ([{"$unionWith": {"coll": {"db": "x", "coll": "y"}}}], "pipeline[0].$unionWith.coll", "not a document"),
    ([{"$unionWith": {"pipeline": [{"$match": {}}]}}], "pipeline[0].$unionWith", "first stage is $documents"),
    ([{"$unionWith": {}}], "pipeline[0].$unionWith", "give coll"),
    ([{"$unionWith": {"coll": "c", "pipeline": "x"}}], "pipeline[0].$unionWith.pipeline", "must be an array"),
    ([{"$out": ""}], "pipeline[0].$out", "not an empty string"),
    ([{"$out": 7}], "pipeline[0].$out", "must be a document"),
    ([{"$out": {"db": "d"}}], "pipeline[0].$out.coll", "missing"),
    ([{"$out": {"db": "", "coll": "c"}}], "pipeline[0].$out.db", "not an empty string"),
    ([{"$out": {"db": Int64(1), "coll": "c"}}], "pipeline[0].$out.db", "naming a configured database"),
    ([{"$merge": {"on": "_id"}}], "pipeline[0].$merge.into", "missing"),
    ([{"$merge": {"into": {"db": "d"}}}], "pipeline[0].$merge.into.coll", "missing"),
    ([{"$merge": {"into": {"db": 1, "coll": "c"}}}], "pipeline[0].$merge.into.db", "not a value of type int"),
    ([{"$merge": {"into": ["c"]}}], "pipeline[0].$merge.into", "not an array"),
    ([{"$merge": None}], "pipeline[0].$merge", "not null"),
    ([{"$facet": [{"$match": {}}]}], "pipeline[0].$facet", "must be a document"),
    ([{"$facet": {"a": {"$match": {}}}}], "pipeline[0].$facet.a", "must be an array of stage documents"),
    ([{"$facet": {"a": [{"$limit": 1, "$skip": 1}]}}], "pipeline[0].$facet.a[0]", "exactly one key"),
    # $out and $merge: the last stage of the top-level pipeline only.
    (
        [{"$out": "c"}, {"$match": {}}],
        "pipeline[0].$out",
        "must be the last stage of the pipeline, and 1 stage(s) follow it",
    ),
    ([{"$merge": "c"}, {"$merge": "d"}], "pipeline[0].$merge", "must be the last stage"),
    (
        [{"$lookup": {**LOOKUP, "pipeline": [{"$out": "c"}]}}],
        "pipeline[0].$lookup.pipeline[0].$out",
        "top-level",
    ),
    (
        [{"$facet": {"a": [{"$merge": "c"}]}}],
        "pipeline[0].$facet.a[0].$merge",
        "inside $lookup, $facet, $unionWith",
    ),
    (
        [{"$unionWith": {"coll": "u", "pipeline": [{"$out": "c"}]}}],
        "pipeline[0].$unionWith.pipeline[0].$out",
        "top-level",
    ),
    (
        [{"$merge": {"into": "t", "whenMatched": [{"$merge": "u"}]}}],
        "pipeline[0].$merge.whenMatched[0].$merge",
        "whenMatched",
    ),
    # A stage not taken apart here that holds a reaching stage.
    (
        [{"$rankFusion": {"input": {"pipelines": {"a": [{"$lookup": LOOKUP}]}}}}],
        "pipeline[0].$rankFusion.input.pipelines.a[0].$lookup",
        "cannot vet",
    ),
    ([{"$future": [{"x": {"$unionWith": "c"}}]}], "pipeline[0].$future[0].x.$unionWith", "inside $future"),
]


@pytest.mark.parametrize(("stages", "path", "fragment"), REFUSED)
def test_refuses_what_it_cannot_vet(stages: Any, path: str, fragment: str) -> None:
    error = _refusal(stages)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.message.startswith(f"{path}: "), error.message
    assert fragment in error.message


@pytest.mark.parametrize("name", ["$changeStream", "$currentOp", "$listSessions", "$listLocalSessions"])
@pytest.mark.parametrize(
    ("wrap", "path"),
    [
        (lambda stage: [stage], "pipeline[0]"),
        (lambda stage: [{"$match": {}}, {"$facet": {"f": [stage]}}], "pipeline[1].$facet.f[0]"),
        (
            lambda stage: [{"$unionWith": {"coll": "u", "pipeline": [stage]}}],
            "pipeline[0].$unionWith.pipeline[0]",
        ),
    ],
)
def test_refuses_stages_the_broker_does_not_serve_as_unimplemented(name: str, wrap: Any, path: str) -> None:
    error = _refusal(wrap({name: {}}))
    assert (error.code, error.reason) == (grpc.StatusCode.UNIMPLEMENTED, "NOT_SUPPORTED")
    assert error.message.startswith(f"{path}.{name}: {name} ")


def test_change_streams_point_at_what_the_broker_offers_instead() -> None:
    assert "watch()" in _refusal([{"$changeStream": {}}]).message


def test_an_update_pipeline_may_not_write_elsewhere() -> None:
    error = _refusal([{"$set": {"a": 1}}, {"$merge": "c"}], field="update", allow_output=False)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message.startswith(
        "update[1].$merge: $merge writes to a collection and is not allowed in update"
    )
    assert inspect([{"$set": {"a": 1}}], field="update", allow_output=False) == PipelineReach((), False)


def test_a_dbref_shaped_document_cannot_hide_a_collection() -> None:
    # bson.decode turns {$ref, $id, ...} into a DBRef, which is not a Mapping:
    # as a stage spec it is refused, never read as "no from".
    stage = document(("$lookup", document(("$ref", "a"), ("$id", 1), ("from", "secret"), ("as", "x"))))
    error = _refusal([bson.decode(stage)])
    assert error.message.startswith("pipeline[0].$lookup: must be a document")
    assert "DBRef" in error.message
    as_stage = bson.decode(document(("$ref", "a"), ("$id", 1), ("$lookup", {"from": "secret"})))
    assert "a document with 3 keys ($ref, $id, $lookup)" in _refusal([as_stage]).message
    # ... and inside a stage this module does not take apart, it is looked into.
    hidden = document(("$other", document(("$ref", "a"), ("$id", 1), ("$lookup", {"from": "secret"}))))
    assert _refusal([bson.decode(hidden)]).message.startswith("pipeline[0].$other.$lookup: ")


def test_an_opaque_stage_is_looked_into_through_every_container_type() -> None:
    # A tuple and a SON (a dict subclass) as well as what bson.decode makes.
    stage: dict[str, Any] = {"$x": ({"a": Int64(1)}, SON([("b", 2.5), ("$merge", "c")]))}
    assert _refusal([stage]).message.startswith("pipeline[0].$x[1].$merge: $merge inside $x")
    # Of two reaching keys, the message names the first in document order.
    stage = {"$x": {"b": [{"n": None}, {"$unionWith": "u"}], "a": {"$lookup": LOOKUP}}}
    assert _refusal([stage]).message.startswith("pipeline[0].$x.b[1].$unionWith: ")


STAGE_NAMES = st.sampled_from(
    [
        "$match",
        "$project",
        "$addFields",
        "$set",
        "$group",
        "$sort",
        "$limit",
        "$skip",
        "$count",
        "$unwind",
        "$replaceRoot",
        "$sample",
        "$bucket",
        "$documents",
        "$densify",
        "$fill",
        "$setWindowFields",
        "$indexStats",
        "$collStats",
        "$redact",
        "$geoNear",
        "$search",
        "$someFutureStage",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.builds(ObjectId),
)
# Keys as filters and expressions use them: field names and operators that reach nothing.
_keys = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\x00$", blacklist_categories=["Cs"]), max_size=6),
    st.sampled_from(["$eq", "$in", "$and", "$or", "$expr", "$sum", "$literal", "$from", "$coll", "$into"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)
_harmless = st.lists(st.builds(lambda name, spec: {name: spec}, STAGE_NAMES, _values), max_size=6)


@settings(max_examples=500, deadline=None)
@given(stages=_harmless)
def test_a_pipeline_without_reaching_stages_reaches_nothing(stages: list[dict[str, Any]]) -> None:
    assert inspect(stages) == PipelineReach((), False)
    assert inspect_bson([bson.encode(stage) for stage in stages]) == PipelineReach((), False)
    assert not performs_write(stages)


@settings(max_examples=200, deadline=None)
@given(stages=_harmless, name=st.sampled_from(["a", "b.c", "ü"]))
def test_a_lookup_among_harmless_stages_is_found_wherever_it_is(
    stages: list[dict[str, Any]], name: str
) -> None:
    for index in range(len(stages) + 1):
        pipeline = [*stages[:index], {"$lookup": {"from": name, "as": "x"}}, *stages[index:]]
        assert inspect(pipeline).reaches == (_read(name, f"pipeline[{index}].$lookup.from"),)


@pytest.mark.parametrize(
    ("stages", "writes"),
    [
        ([], False),
        ([{"$match": {}}], False),
        ([{"$match": {}}, {"$out": "c"}], True),
        ([{"$merge": {"into": "c"}}], True),
        ([{"$out": "c"}, {"$match": {}}], False),  # not a write pymongo would recognise; inspect refuses it
        ([bson.encode({"$match": {}}), bson.encode({"$merge": "c"})], True),
        ([bson.encode({"$merge": "c"}), bson.encode({"$match": {}})], False),
        ([bson.encode({"$out": "c"})], True),
        ([bson.encode({})], False),
        (["$out"], False),
    ],
)
def test_performs_write_is_the_last_stage_being_out_or_merge(stages: list[Any], writes: bool) -> None:
    assert performs_write(stages) is writes


# --- retarget ---------------------------------------------------------------

WHEN = datetime.datetime(2026, 12, 1, 12, 30, 45, 123000)


def _merge(database: str) -> SON[str, Any]:
    return SON(
        [
            (
                "$merge",
                SON(
                    [
                        ("into", SON([("coll", "totals"), ("db", database)])),
                        ("on", ["region", "day"]),
                        ("let", SON([("n", Int64(2**40)), ("small", Int64(1)), ("at", WHEN)])),
                        (
                            "whenMatched",
                            [
                                {"$set": SON([("total", {"$add": ["$total", "$$new.total"]}), ("at", WHEN)])},
                                {"$unset": "tmp"},
                            ],
                        ),
                        ("whenNotMatched", "insert"),
                    ]
                ),
            ),
        ]
    )


@pytest.mark.parametrize("target", ["m", "mongo_analytics_production_eu_west"])
def test_retarget_replaces_only_the_merge_database(target: str) -> None:
    stage = bson.encode(_merge("analytics"))
    retargeted = retarget(stage, target)
    assert retargeted == bson.encode(_merge(target))
    decoded = bson.decode(retargeted, SON_OPTIONS)
    assert decoded == _merge(target)  # SON compares order too
    spec = decoded["$merge"]
    assert list(spec) == ["into", "on", "let", "whenMatched", "whenNotMatched"]
    assert list(spec["into"]) == ["coll", "db"]
    assert type(spec["let"]["small"]) is Int64  # not narrowed to int32
    assert spec["let"]["at"] == WHEN
    assert spec["whenMatched"][0]["$set"]["at"] == WHEN
    assert list(spec["whenMatched"][0]["$set"]) == ["total", "at"]


def test_retarget_replaces_the_out_database_and_keeps_timeseries() -> None:
    def out(database: str) -> bytes:
        timeseries = SON([("timeField", "t"), ("metaField", "m"), ("granularity", "minutes")])
        return bson.encode({"$out": SON([("db", database), ("coll", "ts"), ("timeseries", timeseries)])})

    assert retarget(out("metrics"), "mongo_metrics") == out("mongo_metrics")
    assert retarget(out("long_configured_name"), "x") == out("x")


def test_retarget_keeps_every_other_byte_even_of_types_bson_encode_does_not_write() -> None:
    # A symbol, undefined, a DBPointer and a {$id, $ref} sub-document in
    # reverse order: a decode and re-encode would change each of them.
    pointer = struct.pack("<i", 2) + b"c\x00" + ObjectId().binary
    odd = b"\x0esym\x00" + struct.pack("<i", 4) + b"abc\x00" + b"\x06undef\x00" + b"\x0cptr\x00" + pointer
    let = Raw(struct.pack("<i", len(odd) + 5) + odd + b"\x00")

    def merge(database: str) -> bytes:
        return document(
            (
                "$merge",
                document(
                    ("whenNotMatched", "discard"),
                    ("into", document(("db", database), ("coll", "t"))),
                    ("let", let),
                    ("ref", document(("$id", 1), ("$ref", "c"))),
                    ("on", array("a", Decimal128("1.10"))),
                ),
            ),
        )

    assert retarget(merge("configured"), "mapped") == merge("mapped")
    assert retarget(merge("a"), "a" * 300) == merge("a" * 300)


@pytest.mark.parametrize(
    "stage",
    [
        {"$out": "report"},
        {"$out": {"coll": "report"}},
        {"$merge": "totals"},
        {"$merge": {"into": "totals", "on": "_id", "whenMatched": [{"$set": {"n": Int64(1)}}]}},
        {"$merge": {"into": {"coll": "totals"}}},
    ],
)
def test_retarget_leaves_a_target_in_the_calls_own_database_unchanged(stage: dict[str, Any]) -> None:
    data = bson.encode(stage)
    assert retarget(data, "mapped") == data


@pytest.mark.parametrize(
    ("stage", "database"),
    [
        ({"$match": {}}, "d"),
        ({"$out": {"db": 1, "coll": "c"}}, "d"),
        ({"$out": {"db": "a", "coll": "c"}}, ""),
        ({"$out": {"db": "a", "coll": "c"}}, "a\x00b"),
        ({}, "d"),
    ],
)
def test_retarget_refuses_what_inspect_would_not_pass(stage: dict[str, Any], database: str) -> None:
    with pytest.raises(ValueError):
        retarget(bson.encode(stage), database)


_fields = st.dictionaries(
    st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=6
    ).filter(lambda key: key not in {"db", "into"}),
    _values,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=_fields,
    into_fields=_fields,
    position=st.integers(min_value=0, max_value=5),
    old=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
    new=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
)
def test_retarget_is_the_stage_encoded_with_the_new_database(
    fields: dict[str, Any], into_fields: dict[str, Any], position: int, old: str, new: str
) -> None:
    def merge(database: str) -> bytes:
        into = list(into_fields.items())
        into.insert(min(position, len(into)), ("db", database))
        spec = list(fields.items())
        spec.insert(min(position, len(spec)), ("into", SON(into)))
        return bson.encode({"$merge": SON(spec)})

    assert retarget(merge(old), new) == merge(new)
