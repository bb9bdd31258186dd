"""Generated requests: whatever arrives, the broker answers with a precise status and stays up.

2,000 examples per test in CI; `HYPOTHESIS_PROFILE=long` runs 20,000.
Allowed outcomes: OK, INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND,
UNIMPLEMENTED for features the server lacks, and ALREADY_EXISTS for inserts
of generated `_id`s. Never UNKNOWN, INTERNAL, a
hang, or a crash.
"""

from __future__ import annotations

import os
from typing import Any

import bson
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rpc import open_stub, pb

settings.register_profile(
    "ci", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False
)
settings.register_profile("long", max_examples=20000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    # The server does not implement a feature (MongoDB 238 NotImplemented);
    # the FerretDB test server answers so for some valid projections.
    grpc.StatusCode.UNIMPLEMENTED,
}

# Values every MongoDB-compatible test server stores (the FerretDB test server
# drops the connection on Decimal128, MinKey/MaxKey and JavaScript code).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(bson.Int64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=20),
    st.binary(max_size=16),
)
keys = st.one_of(
    st.sampled_from(
        [
            "a",
            "b",
            "n",
            "_id",
            "x.y",
            "$gt",
            "$lt",
            "$in",
            "$and",
            "$or",
            "$nor",
            "$not",
            "$exists",
            "$type",
            "$regex",
            "$elemMatch",
            "$size",
            "$all",
            "$nosuchop",
            "$where",
            "$function",
            "$accumulator",
            "$expr",
            "$meta",
            "",
        ]
    ),
    st.text(
        alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=8,
    ),
)
documents = st.recursive(
    st.dictionaries(keys, scalars, max_size=4),
    lambda children: st.dictionaries(
        keys, st.one_of(scalars, children, st.lists(scalars, max_size=3)), max_size=4
    ),
    max_leaves=12,
)


def _deep(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        doc = {"$and": [doc]} if depth % 2 else {"n": doc}
    return doc


def _safe_encode(doc: dict[str, Any]) -> bytes:
    try:
        return bson.encode(doc)
    except Exception:  # a key bson itself refuses: send raw garbage instead
        return b"\x05\x00\x00\x00"


bson_field = st.one_of(
    documents.map(_safe_encode),
    st.binary(max_size=64),  # random bytes as BSON
    st.integers(min_value=0, max_value=300).map(lambda d: _safe_encode(_deep(d))),  # deep nesting
    st.just(b""),
    documents.map(_safe_encode).map(lambda b: b[:-1]),  # truncated
    documents.map(_safe_encode).map(lambda b: b + b"\x00"),  # trailing byte
)
int64 = st.one_of(
    st.integers(min_value=-5, max_value=1000), st.integers(min_value=-(2**63), max_value=2**63 - 1)
)
names = st.one_of(st.sampled_from(["appdb", "nope", ""]), st.text(max_size=12))
collections = st.one_of(
    st.sampled_from(["fuzz", "", "a$b", "system.x", ".", "x" * 300]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
)


@pytest.fixture(scope="module")
def stub(broker):
    with open_stub(broker.unix_target) as s:
        yield s


def _server_internal_error(exc: grpc.RpcError) -> bool:
    # The FerretDB test server fails some odd but legal collection names with
    # its own InternalError (MongoDB code 1), which the broker passes on as
    # FAILED_PRECONDITION with that code; that is the server's fault.
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # a failed call is a grpc.Call
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.metadata.get("mongo_code") == "1"
    return False


def _code(call, also: frozenset[grpc.StatusCode] = frozenset()) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and _server_internal_error(exc):
            return exc.code()
        assert exc.code() in ALLOWED | also, (exc.code(), exc.details())
        return exc.code()
    return grpc.StatusCode.OK


@given(
    database=names,
    collection=collections,
    filter=bson_field,
    projection=bson_field,
    sort=bson_field,
    skip=int64,
    limit=int64,
    batch_size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    max_time_ms=int64,
)
def _fuzz_find(stub, database, collection, filter, projection, sort, skip, limit, batch_size, max_time_ms):
    request = pb.FindRequest(
        database=database,
        collection=collection,
        filter=filter,
        projection=projection,
        sort=sort,
        skip=skip,
        limit=min(limit, 50) if limit > 0 else limit,
        batch_size=batch_size,
        max_time_ms=max_time_ms,
    )
    # A caller that asks for a tiny max_time_ms may well run out of it.
    also = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED}) if 0 < max_time_ms < 5000 else frozenset()
    _code(lambda: list(stub.Find(request, timeout=10)), also)


@given(
    database=st.one_of(st.just("appdb"), names),
    collection=collections,
    docs=st.lists(st.one_of(documents.map(_safe_encode), st.binary(max_size=48)), max_size=4),
    ordered=st.booleans(),
)
def _fuzz_insert(stub, database, collection, docs, ordered):
    request = pb.InsertRequest(database=database, collection=collection, documents=docs, ordered=ordered)
    _code(lambda: stub.Insert(request, timeout=10), frozenset({grpc.StatusCode.ALREADY_EXISTS}))


@given(text=st.text(max_size=60), field=st.sampled_from(["filter_json", "projection_json", "sort_json"]))
def _fuzz_extended_json(stub, text, field):
    request = pb.FindRequest(
        database="appdb", collection="fuzz", encoding=pb.ENCODING_RELAXED_JSON, **{field: text}
    )
    _code(lambda: list(stub.Find(request, timeout=10)))


# --- the methods beyond Find and Insert ------------------------------------------------

operator_updates = st.dictionaries(
    st.sampled_from(["$set", "$inc", "$unset", "$push", "$rename", "$min", "$nosuchop", "a", "_id", ""]),
    st.one_of(documents, scalars),
    max_size=3,
).map(_safe_encode)
update_field = st.one_of(operator_updates, bson_field)
stage_names = st.sampled_from(
    [
        "$match", "$project", "$group", "$sort", "$limit", "$skip", "$unwind", "$count", "$set",
        "$lookup", "$graphLookup", "$unionWith", "$facet", "$out", "$merge", "$changeStream",
        "$currentOp", "$documents", "$nosuchstage", "a", "",
    ]
)  # fmt: skip
stage_values = st.recursive(
    st.one_of(scalars, documents, st.sampled_from(["fuzz", "other", "system.x"])),
    lambda children: st.one_of(
        st.dictionaries(
            st.sampled_from(
                ["from", "coll", "into", "db", "as", "pipeline", "localField", "foreignField", "x"]
            ),
            st.one_of(children, st.lists(st.dictionaries(stage_names, children, max_size=1), max_size=2)),
            max_size=4,
        ),
        st.lists(children, max_size=2),
    ),
    max_leaves=8,
)
stages = st.one_of(
    st.dictionaries(stage_names, stage_values, min_size=1, max_size=2).map(_safe_encode), bson_field
)
read_preferences = st.one_of(
    st.none(),
    st.builds(
        pb.ReadPreference,
        mode=st.integers(min_value=-1, max_value=7),
        tag_sets=st.lists(bson_field, max_size=2),
        max_staleness_s=int64,
    ),
)
hints = st.one_of(
    st.just({}),
    st.builds(lambda n: {"hint_name": n}, st.text(max_size=8)),
    bson_field.map(lambda b: {"hint_keys": b}),
)
# Writes may also meet a duplicate key; a generated update may also ask what
# the server cannot do to a stored document (FAILED_PRECONDITION, named by
# its mongo_code: e.g. an _id it would change). The FerretDB test server
# drops the connection on some upserts of odd documents (an empty field name
# in the filter), as it does on Decimal128: the broker answers UNAVAILABLE
# and recovers, which the health check after each fuzzer confirms.
WRITE_OUTCOMES = frozenset(
    {grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}
)


def _with_read_options(fields: dict[str, Any], preference: Any, concern: int) -> dict[str, Any]:
    if preference is not None:
        fields["read_preference"] = preference
    fields["read_concern"] = concern
    return fields


@given(
    collection=collections,
    filter=bson_field,
    change=st.sampled_from(["update", "replacement", "update_pipeline", "none"]),
    update=update_field,
    pipeline=st.lists(stages, max_size=2),
    multi=st.booleans(),
    upsert=st.booleans(),
    array_filters=st.lists(bson_field, max_size=2),
    hint=hints,
    collation=st.one_of(st.just(b""), bson_field),
    let=st.one_of(st.just(b""), bson_field),
)
def _fuzz_update(
    stub, collection, filter, change, update, pipeline, multi, upsert, array_filters, hint, collation, let
):
    fields: dict[str, Any] = {"update_pipeline": pipeline} if change == "update_pipeline" else {}
    if change in ("update", "replacement"):
        fields[change] = update
    request = pb.UpdateRequest(
        database="appdb", collection=collection, filter=filter, multi=multi, upsert=upsert,
        array_filters=array_filters, collation=collation, let=let, **fields, **hint,
    )  # fmt: skip
    _code(lambda: stub.Update(request, timeout=10), WRITE_OUTCOMES)


@given(collection=collections, filter=bson_field, multi=st.booleans(), hint=hints, collation=bson_field)
def _fuzz_delete(stub, collection, filter, multi, hint, collation):
    # Deletes only what the other fuzzers wrote, in its own collection.
    request = pb.DeleteRequest(
        database="appdb",
        collection=f"fuzzdel{collection}"[:200],
        filter=filter,
        multi=multi,
        collation=collation,
        **hint,
    )
    _code(lambda: stub.Delete(request, timeout=10), WRITE_OUTCOMES)


@given(
    filter=bson_field,
    sort=bson_field,
    projection=bson_field,
    update=update_field,
    kind=st.sampled_from(["update", "replacement", "remove", "none"]),
    upsert=st.booleans(),
    return_document=st.integers(min_value=-1, max_value=3),
)
def _fuzz_find_and_modify(stub, filter, sort, projection, update, kind, upsert, return_document):
    fields: dict[str, Any] = {"remove": True} if kind == "remove" else {}
    if kind in ("update", "replacement"):
        fields[kind] = update
    request = pb.FindOneAndModifyRequest(
        database="appdb", collection="fuzz", filter=filter, sort=sort, projection=projection,
        upsert=upsert, return_document=return_document, **fields,
    )  # fmt: skip
    _code(lambda: stub.FindOneAndModify(request, timeout=10), WRITE_OUTCOMES)


@given(
    database=st.one_of(st.just("appdb"), names),
    filter=bson_field,
    skip=int64,
    limit=int64,
    estimated=st.booleans(),
    hint=hints,
    preference=read_preferences,
    concern=st.integers(min_value=-1, max_value=7),
)
def _fuzz_count(stub, database, filter, skip, limit, estimated, hint, preference, concern):
    fields = _with_read_options({}, preference, concern)
    request = pb.CountRequest(
        database=database, collection="fuzz", filter=filter, skip=skip, limit=limit, estimated=estimated,
        **fields, **hint,
    )  # fmt: skip
    _code(lambda: stub.Count(request, timeout=10))


@given(
    key=st.one_of(st.sampled_from(["a", "n", "_id", "x.y", "$a", ""]), st.text(max_size=10)),
    filter=bson_field,
)
def _fuzz_distinct(stub, key, filter):
    request = pb.DistinctRequest(database="appdb", collection="fuzz", key=key, filter=filter)
    _code(lambda: list(stub.Distinct(request, timeout=10)))


@given(
    pipeline=st.lists(stages, max_size=3),
    batch_size=st.integers(min_value=-5, max_value=200),
    allow_disk_use=st.booleans(),
    let=st.one_of(st.just(b""), bson_field),
)
def _fuzz_aggregate(stub, pipeline, batch_size, allow_disk_use, let):
    request = pb.AggregateRequest(
        database="appdb", collection="fuzz", pipeline=pipeline, batch_size=batch_size,
        allow_disk_use=allow_disk_use, let=let,
    )  # fmt: skip
    # A generated $out/$merge may write: the same outcomes as a write.
    _code(lambda: list(stub.Aggregate(request, timeout=10)), WRITE_OUTCOMES)


write_models = st.one_of(
    st.builds(lambda d: pb.WriteModel(insert_one=pb.InsertOneModel(document=d)), bson_field),
    st.builds(
        lambda f, u: pb.WriteModel(update_one=pb.UpdateModel(filter=f, update=u)), bson_field, update_field
    ),
    st.builds(
        lambda f, u, up: pb.WriteModel(update_many=pb.UpdateModel(filter=f, update=u, upsert=up)),
        bson_field,
        update_field,
        st.booleans(),
    ),
    st.builds(
        lambda f, r: pb.WriteModel(replace_one=pb.ReplaceOneModel(filter=f, replacement=r)),
        bson_field,
        update_field,
    ),
    st.builds(lambda f: pb.WriteModel(delete_one=pb.DeleteModel(filter=f)), bson_field),
    st.builds(lambda f: pb.WriteModel(delete_many=pb.DeleteModel(filter=f)), bson_field),
    st.just(pb.WriteModel()),
)


@given(operations=st.lists(write_models, max_size=4), ordered=st.booleans())
def _fuzz_bulk_write(stub, operations, ordered):
    request = pb.BulkWriteRequest(
        database="appdb", collection="fuzzbulk", operations=operations, ordered=ordered
    )
    _code(lambda: stub.BulkWrite(request, timeout=10), WRITE_OUTCOMES)


def _assert_still_healthy(stub) -> None:
    reply = stub.Ping(pb.PingRequest(), timeout=10)
    assert reply.databases[0].ok
    stats = stub.Stats(pb.StatsRequest(), timeout=10).databases[0]
    assert "INTERNAL" not in stats.errors and "UNKNOWN" not in stats.errors
    assert stats.rpcs_in_flight == 0


# Each test fuzzes, then checks that the broker is still healthy: the check
# stands with the fuzzing it follows, whatever runs alone or in what order.


def test_fuzzed_find(stub):
    _fuzz_find(stub)
    _assert_still_healthy(stub)


def test_fuzzed_insert(stub):
    _fuzz_insert(stub)
    _assert_still_healthy(stub)


def test_fuzzed_extended_json(stub):
    _fuzz_extended_json(stub)
    _assert_still_healthy(stub)


@pytest.mark.parametrize(
    "fuzzer",
    [
        _fuzz_update,
        _fuzz_delete,
        _fuzz_find_and_modify,
        _fuzz_count,
        _fuzz_distinct,
        _fuzz_aggregate,
        _fuzz_bulk_write,
    ],
    ids=["update", "delete", "find-and-modify", "count", "distinct", "aggregate", "bulk-write"],
)
def test_fuzzed_operations(stub, fuzzer):
    fuzzer(stub)
    _assert_still_healthy(stub)
