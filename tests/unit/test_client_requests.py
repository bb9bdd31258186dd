"""broker_client._requests: each call's request from its arguments, and each answer's result.

No broker and no channel: these are the pure halves of the client's calls,
the same for BrokerClient and AsyncBrokerClient.
"""

from __future__ import annotations

import datetime
import types
from typing import Any

import bson
import grpc
import pytest
from broker_client import BrokerClient, DuplicateKeyError, RetryPolicy, ServerSelectionTimeoutError, _requests
from broker_client.proto.broker.v1 import broker_pb2
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.son import SON
from pymongo.write_concern import WriteConcern

OPTS: CodecOptions[dict[str, Any]] = CodecOptions()


def _settings(**overrides: Any) -> _requests.Settings[Any]:
    arguments: dict[str, Any] = {
        "timeout": 5.0,
        "document_class": None,
        "codec_options": None,
        "token": None,
        "metadata": (),
        "options": (),
        "retries": RetryPolicy(),
        "channel_defaults": {},
    }
    arguments.update(overrides)
    return _requests.Settings("unix:///tmp/broker.sock", **arguments)


def _find(**arguments: Any) -> broker_pb2.FindRequest:
    defaults: dict[str, Any] = {
        "sort": None,
        "skip": 0,
        "limit": 0,
        "batch_size": 0,
        "hint": None,
        "max_time_ms": None,
        "comment": None,
    }
    filter = arguments.pop("filter", None)
    projection = arguments.pop("projection", None)
    return _requests.find_request("appdb", "items", OPTS, filter, projection, **{**defaults, **arguments})


def _decoded(raw: bytes) -> list[tuple[str, Any]]:
    return list(bson.decode(raw, CodecOptions(document_class=SON)).items())


def _insert(documents: list[Any], **arguments: Any) -> _requests.Insert:
    options: dict[str, Any] = {"ordered": True, "bypass_document_validation": False, "write_concern": None}
    options.update(arguments)
    return _requests.Insert("appdb", "items", documents, settings=_settings(), **options)


def _duplicate(**metadata: str) -> DuplicateKeyError:
    return DuplicateKeyError("E11000", code=grpc.StatusCode.ALREADY_EXISTS, metadata=metadata)


def _unavailable() -> ServerSelectionTimeoutError:
    return ServerSelectionTimeoutError("connection lost", code=grpc.StatusCode.UNAVAILABLE)


# --- ping, stats ------------------------------------------------------------------------


def test_ping_and_stats_ask_for_every_database_or_the_one_named() -> None:
    assert _requests.ping_request(None) == broker_pb2.PingRequest(database="")
    assert _requests.ping_request("appdb") == broker_pb2.PingRequest(database="appdb")
    assert _requests.stats_request(None) == broker_pb2.StatsRequest(database="")
    assert _requests.stats_request("appdb") == broker_pb2.StatsRequest(database="appdb")


# --- find, find_one -----------------------------------------------------------------------


def test_find_request_carries_every_argument() -> None:
    request = _find(
        filter={"qty": {"$gt": 3}},
        projection={"sku": 1, "qty": 1},
        sort=[("sku", 1), ("qty", -1)],
        skip=5,
        limit=10,
        batch_size=100,
        hint="sku_1",
        max_time_ms=250,
        comment="report",
    )
    assert (request.database, request.collection) == ("appdb", "items")
    assert _decoded(request.filter) == [("qty", {"$gt": 3})]
    assert _decoded(request.projection) == [("sku", 1), ("qty", 1)]
    assert _decoded(request.sort) == [("sku", 1), ("qty", -1)]
    assert (request.skip, request.limit, request.batch_size, request.max_time_ms) == (5, 10, 100, 250)
    assert request.comment == "report"
    assert request.WhichOneof("hint") == "hint_name"
    assert request.hint_name == "sku_1"


def test_find_request_defaults_are_empty() -> None:
    request = _find()
    assert (request.filter, request.projection, request.sort) == (b"", b"", b"")
    assert (request.skip, request.limit, request.batch_size, request.max_time_ms, request.comment) == (
        0,
        0,
        0,
        0,
        "",
    )
    assert request.WhichOneof("hint") is None


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("sku", [("sku", 1)]),
        (["sku", "qty"], [("sku", 1), ("qty", 1)]),
        ([("qty", -1), ("sku", 1)], [("qty", -1), ("sku", 1)]),
        ((("qty", -1),), [("qty", -1)]),
        ({"b": -1, "a": 1}, [("b", -1), ("a", 1)]),
        ([("score", {"$meta": "textScore"})], [("score", {"$meta": "textScore"})]),
    ],
)
def test_a_sort_keeps_its_order_in_every_shape(sort: Any, expected: list[tuple[str, Any]]) -> None:
    assert _decoded(_find(sort=sort).sort) == expected


def test_a_projection_list_includes_its_names() -> None:
    assert _decoded(_find(projection=["sku", "qty"]).projection) == [("sku", 1), ("qty", 1)]


def test_a_hint_is_a_name_or_a_key_pattern() -> None:
    by_keys = _find(hint=[("sku", 1), ("qty", -1)])
    assert by_keys.WhichOneof("hint") == "hint_keys"
    assert _decoded(by_keys.hint_keys) == [("sku", 1), ("qty", -1)]
    assert _find(hint={"sku": -1}).WhichOneof("hint") == "hint_keys"


def test_a_raw_filter_is_sent_as_its_bytes() -> None:
    raw = RawBSONDocument(bson.encode({"b": 1, "a": 2}))
    assert _find(filter=raw).filter == bytes(raw.raw)


def test_find_one_is_a_find_of_one_and_a_plain_value_is_an_id() -> None:
    oid = ObjectId()
    request = _requests.find_one_request(
        "appdb", "items", OPTS, oid, ["sku"], sort="sku", skip=2, hint=None, max_time_ms=None, comment=None
    )
    assert _decoded(request.filter) == [("_id", oid)]
    assert (request.limit, request.batch_size, request.skip) == (1, 0, 2)
    assert _decoded(request.projection) == [("sku", 1)]
    by_filter = _requests.find_one_request(
        "appdb",
        "items",
        OPTS,
        {"sku": "a1"},
        None,
        sort=None,
        skip=0,
        hint=None,
        max_time_ms=None,
        comment=None,
    )
    assert _decoded(by_filter.filter) == [("sku", "a1")]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"skip": -1}, ValueError, "skip must be >= 0"),
        ({"skip": True}, TypeError, "skip must be an instance of int"),
        ({"limit": "10"}, TypeError, "limit must be an instance of int"),
        ({"batch_size": 2**31}, ValueError, "batch_size must be <="),
        ({"max_time_ms": -5}, ValueError, "max_time_ms must be >= 0"),
        ({"comment": 7}, TypeError, "comment must be a str"),
        ({"filter": [("a", 1)]}, TypeError, "filter must be an instance of dict"),
        ({"projection": "sku"}, TypeError, "projection must be a mapping or list"),
        ({"projection": ["sku", 1]}, TypeError, "each an instance of str"),
        ({"sort": []}, ValueError, "sort must not be empty"),
        ({"sort": 5}, TypeError, "sort must be a key"),
        ({"sort": [(1, 1)]}, TypeError, "first item in each sort pair"),
        ({"sort": [("a", True)]}, TypeError, "second item in each sort pair"),
        ({"sort": [("a", 1, 2)]}, TypeError, "each sort item must be"),
        ({"hint": 5}, TypeError, "hint must be a key"),
    ],
)
def test_bad_find_arguments_are_refused(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _find(**arguments)


# --- write concern, inserts ------------------------------------------------------------


def test_a_write_concern_from_a_mapping_or_pymongo() -> None:
    assert _requests.write_concern_message(None) is None
    message = _requests.write_concern_message({"w": "majority", "j": True, "wtimeout": 5000})
    assert message == broker_pb2.WriteConcern(w_tag="majority", j=True, wtimeout_ms=5000)
    numbered = _requests.write_concern_message(WriteConcern(w=2, wtimeout=100))
    assert numbered == broker_pb2.WriteConcern(w_nodes=2, wtimeout_ms=100)
    assert numbered is not None
    assert numbered.WhichOneof("w") == "w_nodes"
    assert not numbered.HasField("j")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ({"fsync": True}, ValueError, r"unsupported key\(s\) \['fsync'\]"),
        ({"w": True}, TypeError, "w must be an int or a tag"),
        ({"w": 1.5}, TypeError, "w must be an int or a tag"),
        ({"w": -1}, ValueError, "write_concern w must be >= 0"),
        ({"j": "yes"}, TypeError, "j must be a bool"),
        ({"wtimeout": -1}, ValueError, "wtimeout must be >= 0"),
    ],
)
def test_bad_write_concerns_are_refused(spec: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _requests.write_concern_message(spec)


def test_an_insert_gives_each_document_without_an_id_a_new_one_first() -> None:
    mine: dict[str, Any] = {"z": 1, "a": 2}
    raw = RawBSONDocument(bson.encode({"sku": "raw"}))
    read_only = types.MappingProxyType({"sku": "frozen"})
    insert = _insert([mine, {"_id": 7, "sku": "b"}, raw, read_only], ordered=False, write_concern={"w": 1})
    made = insert.made_ids
    assert isinstance(made[0], ObjectId) and isinstance(made[3], ObjectId)
    assert made[1:3] == [None, None]
    assert mine["_id"] == made[0]  # written into the caller's dict, as pymongo does
    assert "_id" not in read_only  # a read-only mapping is sent as a copy with the id
    request = insert.request()
    assert (request.database, request.collection, request.ordered) == ("appdb", "items", False)
    assert request.write_concern == broker_pb2.WriteConcern(w_nodes=1)
    sent = [_decoded(document) for document in request.documents]
    assert sent[0] == [("_id", made[0]), ("z", 1), ("a", 2)]  # the id first, as MongoDB stores it
    assert sent[1] == [("_id", 7), ("sku", "b")]
    assert request.documents[2] == bytes(raw.raw)  # sent unchanged: the broker makes its id
    assert sent[3] == [("_id", made[3]), ("sku", "frozen")]
    # Some ids are not ours: a retry could not tell its own documents from others.
    assert insert.acknowledged and not insert.retry_safe


def test_an_insert_is_retry_safe_only_with_every_id_made_here_and_acknowledged() -> None:
    assert _insert([{"a": 1}, {"b": 2}]).retry_safe
    unacknowledged = _insert([{"a": 1}], write_concern={"w": 0})
    assert not unacknowledged.acknowledged
    assert not unacknowledged.retry_safe
    options = _insert([{"a": 1}], bypass_document_validation=True).request()
    assert options.bypass_document_validation and options.ordered
    assert not options.HasField("write_concern")


@pytest.mark.parametrize(
    ("documents", "message"),
    [({"a": 1}, "non-empty list"), ([], "non-empty list"), (5, "non-empty list")],
)
def test_insert_many_refuses_anything_but_a_non_empty_list(documents: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        _requests.check_documents(documents)


def test_an_insert_refuses_a_document_that_is_not_a_mapping() -> None:
    with pytest.raises(TypeError, match="document must be an instance of dict"):
        _insert([[("a", 1)]])


def test_an_insert_with_ids_of_the_callers_is_never_retried() -> None:
    insert = _insert([{"_id": 1}])
    error = _unavailable()
    with pytest.raises(ServerSelectionTimeoutError) as raised:
        insert.failed(error)
    assert raised.value is error


def test_a_retry_safe_insert_backs_off_and_then_checks_a_duplicate_for_its_own_ids() -> None:
    insert = _insert([{"n": n} for n in range(4)])
    assert insert.failed(_unavailable()) is None  # back off and send again
    insert.retrying()
    lookup = insert.failed(_duplicate(failed_index="1", inserted_count="1"))
    assert lookup is not None
    assert (lookup.database, lookup.collection) == ("appdb", "items")
    assert _decoded(lookup.filter) == [("_id", {"$in": insert.made_ids})]
    assert _decoded(lookup.projection) == [("_id", 1)]
    # Ordered: the first two are stored (by the lost attempt), the third is
    # not: it and the fourth are sent next.
    stored = [bson.encode({"_id": insert.made_ids[i]}) for i in (0, 1)]
    assert insert.found(_duplicate(), stored) is False
    assert insert.pending == [2, 3]
    assert [_decoded(d)[0][1] for d in insert.request().documents] == insert.made_ids[2:]
    # That attempt's error counts in the caller's list, not in the attempt's.
    error = _unavailable()
    error.metadata.update(failed_index="1", inserted_count="1")
    assert insert.failed(error) is None
    assert (error.failed_index, error.inserted_count) == (3, 3)


def test_a_duplicate_on_a_first_attempt_is_not_ours() -> None:
    insert = _insert([{"n": 1}])
    error = _duplicate(failed_index="0", inserted_count="0")
    # No earlier attempt could have stored it: no lookup, and the retry rules
    # (which never retry a duplicate key) raise it.
    assert insert.failed(error) is None
    state = _settings().retry_state("Insert", None)
    with pytest.raises(DuplicateKeyError) as raised:
        state.backoff(error)
    assert raised.value is error


def test_an_unordered_insert_whose_ids_are_all_stored_succeeds() -> None:
    insert = _insert([{"n": 1}, {"n": 2}], ordered=False)
    insert.retrying()
    lookup = insert.failed(_duplicate(failed_index="0", inserted_count="1"))
    assert lookup is not None
    stored = [bson.encode({"_id": oid}) for oid in insert.made_ids]
    assert insert.found(_duplicate(), stored) is True
    assert insert.inserted_ids(None) == insert.made_ids


def test_a_duplicate_whose_ids_are_not_all_stored_is_raised_with_what_landed() -> None:
    insert = _insert([{"n": 1}, {"n": 2}, {"n": 3}], ordered=False)
    insert.retrying()
    error = _duplicate(failed_index="0", inserted_count="0")
    assert insert.failed(error) is not None
    with pytest.raises(DuplicateKeyError) as raised:
        insert.found(error, [bson.encode({"_id": insert.made_ids[0]})])
    assert (raised.value.failed_index, raised.value.inserted_count) == (1, 1)


def test_an_ordered_duplicate_without_a_failed_index_is_raised() -> None:
    insert = _insert([{"n": 1}])
    insert.retrying()
    with pytest.raises(DuplicateKeyError):
        insert.failed(_duplicate())


def test_inserted_ids_are_ours_or_the_brokers() -> None:
    ours = _insert([{"n": 1}])
    assert ours.inserted_ids(broker_pb2.InsertResponse()) == ours.made_ids
    theirs = _insert([{"_id": "k", "n": 1}])
    response = broker_pb2.InsertResponse(inserted_ids=[bson.encode({"_id": "k"})], inserted_count=1)
    assert theirs.inserted_ids(response) == ["k"]


# --- answers -------------------------------------------------------------------------------


def test_insert_results_carry_ids_acknowledgement_and_attempts() -> None:
    one = _requests.insert_one_result([7], True, 2)
    assert (one.inserted_id, one.acknowledged, one.attempts) == (7, True, 2)
    assert _requests.insert_one_result([], False, 1).inserted_id is None
    many = _requests.insert_many_result([1, 2], True, 3)
    assert (many.inserted_ids, many.attempts) == ([1, 2], 3)


def test_find_one_answers_a_document_or_none() -> None:
    found = broker_pb2.FindResponse(
        documents=[bson.encode({"_id": 1, "when": datetime.datetime(2026, 1, 2)})]
    )
    aware = CodecOptions(document_class=SON, tz_aware=True)
    document = _requests.first_document(found, aware)
    assert isinstance(document, SON)
    assert document is not None and document["when"].tzinfo is not None
    assert _requests.first_document(broker_pb2.FindResponse(), OPTS) is None


def test_a_batch_decodes_in_order_with_the_codec_options() -> None:
    raw = [bson.encode({"n": n}) for n in range(3)]
    assert _requests.decode_batch(raw, OPTS) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert _requests.decode_batch([], OPTS) == []
    as_raw = _requests.decode_batch(raw, CodecOptions(document_class=RawBSONDocument))
    assert [bytes(doc.raw) for doc in as_raw] == raw


def test_a_ping_answer_becomes_a_ping_result() -> None:
    response = broker_pb2.PingResponse(
        version="1.2.3",
        databases=[
            broker_pb2.DatabasePing(
                database="appdb",
                ok=True,
                rtt_ms=0.5,
                pool=broker_pb2.PoolSummary(connections_open=2, connections_in_use=1, max_pool_size=10),
            ),
            broker_pb2.DatabasePing(database="other", ok=False, error="unreachable"),
        ],
    )
    result = _requests.ping_result(response, attempts=2)
    assert (result.version, result.attempts, result.ok) == ("1.2.3", 2, False)
    assert result["appdb"].pool.max_pool_size == 10
    assert result["appdb"].rtt_ms == 0.5
    assert result["other"].error == "unreachable"


def test_a_stats_answer_becomes_broker_stats() -> None:
    db = broker_pb2.DatabaseStats(database="appdb", connections_open=3, wait_p99_ms=1.5, available=True)
    db.operations["insert"] = 4
    response = broker_pb2.StatsResponse(version="1.2.3", uptime_s=9.5, databases=[db])
    stats = _requests.stats_result(response, attempts=1)
    assert (stats.version, stats.uptime_s, stats.attempts) == ("1.2.3", 9.5, 1)
    appdb = stats["appdb"]
    assert (appdb.connections_open, appdb.wait_p99_ms, appdb.available) == (3, 1.5, True)
    assert appdb.operations == {"insert": 4}
    assert type(appdb.operations) is dict  # a plain dict, not the proto's map


# --- the client's options -------------------------------------------------------------


def test_settings_hold_metadata_token_and_channel_options() -> None:
    settings = _settings(
        metadata=[("X-Request-Id", "job-42")],
        token="s3cret",
        options=[("grpc.max_receive_message_length", 1024), ("grpc.use_local_subchannel_pool", None)],
        channel_defaults={"SingleThreadedUnaryStream": 1},
    )
    assert settings.metadata == (("x-request-id", "job-42"), ("authorization", "Bearer s3cret"))
    options = dict(settings.channel_options)
    assert options["grpc.max_receive_message_length"] == 1024
    assert "grpc.use_local_subchannel_pool" not in options
    assert options["SingleThreadedUnaryStream"] == 1
    assert options["grpc.primary_user_agent"].startswith("mongo-broker-client/")
    assert settings.deadline(None) == 5.0
    assert settings.deadline(0.25) == 0.25


def test_settings_decode_ids_as_dicts_whatever_the_document_class() -> None:
    settings = _settings(document_class=SON, codec_options=CodecOptions(tz_aware=True))
    assert settings.codec_options.document_class is SON
    assert settings.codec_options.tz_aware
    assert settings.id_codec_options.document_class is dict
    assert settings.id_codec_options.tz_aware


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be a positive"),
        ({"timeout": float("inf")}, ValueError, "timeout must be a positive"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"codec_options": {"tz_aware": True}}, TypeError, "codec_options must be a bson.CodecOptions"),
        ({"retries": 3}, TypeError, "retries must be a RetryPolicy or None"),
        ({"token": ""}, ValueError, "token must be a non-empty str"),
    ],
)
def test_bad_client_options_are_refused(
    overrides: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _settings(**overrides)


def test_bad_arguments_are_refused_before_any_call() -> None:
    # Nothing listens there: any call that reached the channel would fail
    # differently (and make a channel).
    client: BrokerClient[dict[str, Any]] = BrokerClient("unix:///nonexistent/broker.sock", retries=None)
    items = client["appdb"]["items"]
    with pytest.raises(ValueError, match="unsupported key"):
        items.insert_one({"a": 1}, write_concern={"fsync": True})
    with pytest.raises(TypeError, match="non-empty list"):
        items.insert_many([])
    with pytest.raises(ValueError, match="timeout must be a positive"):
        items.insert_one({"a": 1}, timeout=-1)
    with pytest.raises(ValueError, match="skip must be >= 0"):
        items.find_one({}, skip=-1)
    with pytest.raises(TypeError, match="limit must be an instance of int"):
        items.find({}, limit=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length must be greater than 0"):
        items.find({}).to_list(0)
    with pytest.raises(ValueError, match="database name must not be empty"):
        client[""]
    with pytest.raises(AttributeError, match=r"use client\['_private'\]"):
        _ = client._private
    assert client._holder.channels_created == 0
    assert client._holder.channel is None


def test_stats_results_have_every_field_of_the_proto() -> None:
    from dataclasses import fields

    from broker_client.results import DatabaseStats

    proto = {f.name for f in broker_pb2.DatabaseStats.DESCRIPTOR.fields}
    assert {f.name for f in fields(DatabaseStats)} == proto


# --- updates, deletes, find-and-modify -----------------------------------------------


def _update(**arguments: Any) -> broker_pb2.UpdateRequest:
    filter = arguments.pop("filter", {"a": 1})
    return _requests.update_request("appdb", "items", OPTS, filter, **arguments)


def test_an_update_carries_every_option_to_its_field() -> None:
    from pymongo.collation import Collation

    request = _update(
        update={"$set": {"b": 2}, "$inc": {"n": 1}},
        multi=True,
        upsert=True,
        bypass_document_validation=True,
        collation=Collation("fr", strength=2),
        array_filters=[{"x.y": {"$gt": 1}}],
        hint="a_1",
        let={"v": 3},
        comment="why",
        write_concern={"w": "majority", "j": True, "wtimeout": 50},
    )
    assert bson.decode(request.filter) == {"a": 1}
    assert _decoded(request.update) == [("$set", {"b": 2}), ("$inc", {"n": 1})]
    assert (request.multi, request.upsert, request.bypass_document_validation) == (True, True, True)
    assert bson.decode(request.collation) == {"locale": "fr", "strength": 2}
    assert [bson.decode(f) for f in request.array_filters] == [{"x.y": {"$gt": 1}}]
    assert (request.WhichOneof("hint"), request.hint_name) == ("hint_name", "a_1")
    assert bson.decode(request.let) == {"v": 3}
    assert request.comment == "why"
    assert (request.write_concern.w_tag, request.write_concern.j, request.write_concern.wtimeout_ms) == (
        "majority",
        True,
        50,
    )
    assert request.replacement == b"" and not request.update_pipeline
    assert _requests.acknowledged(request)


def test_update_defaults_are_empty() -> None:
    request = _update(update={"$set": {"b": 2}})
    assert (request.multi, request.upsert, request.bypass_document_validation) == (False, False, False)
    assert request.collation == request.let == b""
    assert not request.array_filters and request.WhichOneof("hint") is None
    assert request.comment == "" and not request.HasField("write_concern")


def test_an_update_pipeline_and_a_replacement_go_to_their_own_fields() -> None:
    pipeline = _update(update=[{"$set": {"b": "$a"}}, {"$unset": "c"}], hint=[("a", 1), ("b", -1)])
    assert pipeline.update == b""
    assert [bson.decode(stage) for stage in pipeline.update_pipeline] == [
        {"$set": {"b": "$a"}},
        {"$unset": "c"},
    ]
    assert _decoded(pipeline.hint_keys) == [("a", 1), ("b", -1)]
    replace = _update(replacement={"whole": True}, upsert=True)
    assert bson.decode(replace.replacement) == {"whole": True}
    assert replace.update == b"" and replace.upsert
    raw = RawBSONDocument(bson.encode({"r": 1}))
    assert _update(replacement=raw).replacement == raw.raw


@pytest.mark.parametrize(
    ("update", "error", "message"),
    [
        ({"b": 2}, ValueError, r"update only works with \$ operators"),
        ({"$set": {"b": 2}, "c": 3}, ValueError, r"update only works with \$ operators"),
        ({}, ValueError, "update cannot be empty"),
        ([], ValueError, "update cannot be empty"),
        ([1], TypeError, "each stage of an update pipeline must be a mapping"),
        ("$set", TypeError, "update must be an instance of dict"),
    ],
)
def test_an_update_must_be_operators_or_a_pipeline(update: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        _update(update=update)
    with pytest.raises(error, match=message):
        _requests.find_one_and_modify_request("appdb", "items", OPTS, {}, update=update)


@pytest.mark.parametrize("replacement", [{"$set": {"a": 1}}, {"a": 1, "$inc": {"n": 1}}])
def test_a_replacement_must_not_have_operators(replacement: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"replacement can not include \$ operators"):
        _update(replacement=replacement)
    with pytest.raises(ValueError, match=r"replacement can not include \$ operators"):
        _requests.find_one_and_modify_request("appdb", "items", OPTS, {}, replacement=replacement)


def test_an_empty_replacement_is_allowed_as_in_pymongo() -> None:
    assert bson.decode(_update(replacement={}).replacement) == {}


def test_bad_update_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="filter must be an instance of dict"):
        _update(filter=None, update={"$set": {"a": 1}})
    with pytest.raises(TypeError, match="upsert must be True or False"):
        _update(update={"$set": {"a": 1}}, upsert=1)
    with pytest.raises(TypeError, match="array_filters must be a list"):
        _update(update={"$set": {"a": 1}}, array_filters={"x": 1})
    with pytest.raises(TypeError, match="collation must be a mapping"):
        _update(update={"$set": {"a": 1}}, collation="fr")
    with pytest.raises(TypeError, match="comment must be a str"):
        _update(update={"$set": {"a": 1}}, comment=5)


def test_a_delete_carries_every_option_to_its_field() -> None:
    request = _requests.delete_request(
        "appdb",
        "items",
        OPTS,
        {"a": 1},
        multi=True,
        collation={"locale": "en"},
        hint={"a": 1},
        let={"v": 1},
        comment="c",
        write_concern={"w": 0},
    )
    assert (request.database, request.collection, request.multi) == ("appdb", "items", True)
    assert bson.decode(request.filter) == {"a": 1}
    assert bson.decode(request.collation) == {"locale": "en"}
    assert bson.decode(request.hint_keys) == {"a": 1}
    assert bson.decode(request.let) == {"v": 1} and request.comment == "c"
    assert request.write_concern.w_nodes == 0 and not _requests.acknowledged(request)
    one = _requests.delete_request("appdb", "items", OPTS, {}, multi=False)
    assert not one.multi and one.filter == bson.encode({})


def test_find_and_modify_carries_every_option_to_its_field() -> None:
    from broker_client import ReturnDocument

    request = _requests.find_one_and_modify_request(
        "appdb",
        "items",
        OPTS,
        {"a": 1},
        update={"$inc": {"n": 1}},
        projection=["n"],
        sort=[("n", -1)],
        upsert=True,
        return_document=ReturnDocument.AFTER,
        array_filters=[{"e": 1}],
        hint="n_1",
        collation={"locale": "fr"},
        let={"v": 1},
        comment="c",
        max_time_ms=500,
        write_concern={"w": 1},
    )
    assert _decoded(request.update) == [("$inc", {"n": 1})]
    assert bson.decode(request.projection) == {"n": 1}
    assert _decoded(request.sort) == [("n", -1)]
    assert request.upsert and request.return_document == broker_pb2.RETURN_DOCUMENT_AFTER
    assert [bson.decode(f) for f in request.array_filters] == [{"e": 1}]
    assert request.hint_name == "n_1" and bson.decode(request.collation) == {"locale": "fr"}
    assert bson.decode(request.let) == {"v": 1} and request.comment == "c"
    assert request.max_time_ms == 500 and request.write_concern.w_nodes == 1
    assert not request.remove
    removal = _requests.find_one_and_modify_request("appdb", "items", OPTS, {"a": 1}, remove=True)
    assert removal.remove and removal.update == removal.replacement == b""
    assert removal.return_document == broker_pb2.RETURN_DOCUMENT_BEFORE
    # pymongo's own constants are the same booleans.
    import pymongo

    after = _requests.find_one_and_modify_request(
        "appdb", "items", OPTS, {}, replacement={"x": 1}, return_document=pymongo.ReturnDocument.AFTER
    )
    assert after.return_document == broker_pb2.RETURN_DOCUMENT_AFTER and bson.decode(after.replacement) == {
        "x": 1
    }
    with pytest.raises(
        ValueError, match=r"return_document must be ReturnDocument\.BEFORE or ReturnDocument\.AFTER"
    ):
        _requests.find_one_and_modify_request("appdb", "items", OPTS, {}, remove=True, return_document=1)  # type: ignore[arg-type]


# --- reads: count, distinct, aggregate, read options ----------------------------------


def test_a_count_carries_every_option_to_its_field() -> None:
    read = _requests.ReadOptions(None, "majority", OPTS)
    request = _requests.count_request(
        "appdb",
        "items",
        OPTS,
        {"a": {"$gt": 1}},
        skip=2,
        limit=5,
        hint="a_1",
        collation={"locale": "fr"},
        comment="c",
        max_time_ms=100,
        read=read,
    )
    assert bson.decode(request.filter) == {"a": {"$gt": 1}}
    assert (request.skip, request.limit, request.hint_name, request.comment, request.max_time_ms) == (
        2,
        5,
        "a_1",
        "c",
        100,
    )
    assert bson.decode(request.collation) == {"locale": "fr"}
    assert not request.estimated and request.read_concern == broker_pb2.READ_CONCERN_MAJORITY
    estimated = _requests.count_request("appdb", "items", OPTS, None, estimated=True, comment="e")
    assert estimated.estimated and estimated.filter == b"" and estimated.comment == "e"
    with pytest.raises(TypeError, match="filter must be an instance of dict"):
        _requests.count_request("appdb", "items", OPTS, None)
    with pytest.raises(ValueError, match="skip must be >= 0"):
        _requests.count_request("appdb", "items", OPTS, {}, skip=-1)


def test_a_distinct_carries_every_option_to_its_field() -> None:
    from pymongo import ReadPreference

    read = _requests.ReadOptions(ReadPreference.SECONDARY_PREFERRED, None, OPTS)
    request = _requests.distinct_request(
        "appdb",
        "items",
        OPTS,
        "tags.name",
        {"a": 1},
        collation={"locale": "fr"},
        comment="c",
        max_time_ms=9,
        read=read,
    )
    assert (request.key, request.comment, request.max_time_ms) == ("tags.name", "c", 9)
    assert bson.decode(request.filter) == {"a": 1} and bson.decode(request.collation) == {"locale": "fr"}
    assert request.read_preference.mode == broker_pb2.READ_PREFERENCE_SECONDARY_PREFERRED
    assert request.read_concern == broker_pb2.READ_CONCERN_UNSPECIFIED
    assert _requests.distinct_request("appdb", "items", OPTS, "k", None).filter == b""
    with pytest.raises(TypeError, match="key must be an instance of str"):
        _requests.distinct_request("appdb", "items", OPTS, 1, None)  # type: ignore[arg-type]


def test_an_aggregate_carries_every_option_to_its_field() -> None:
    request = _requests.aggregate_request(
        "appdb",
        "items",
        OPTS,
        [{"$match": {"a": 1}}, {"$group": {"_id": "$b", "n": {"$sum": 1}}}],
        allow_disk_use=True,
        batch_size=7,
        hint={"a": 1},
        collation={"locale": "fr"},
        let={"v": 1},
        comment="c",
        max_time_ms=10,
        read=_requests.ReadOptions(None, "local", OPTS),
        write_concern={"w": 1},
    )
    assert [bson.decode(stage) for stage in request.pipeline] == [
        {"$match": {"a": 1}},
        {"$group": {"_id": "$b", "n": {"$sum": 1}}},
    ]
    assert request.HasField("allow_disk_use") and request.allow_disk_use
    assert (request.batch_size, request.comment, request.max_time_ms) == (7, "c", 10)
    assert bson.decode(request.hint_keys) == {"a": 1} and bson.decode(request.let) == {"v": 1}
    assert bson.decode(request.collation) == {"locale": "fr"}
    assert request.read_concern == broker_pb2.READ_CONCERN_LOCAL
    # A pipeline that does not write sends no write concern.
    assert not request.HasField("write_concern")
    plain = _requests.aggregate_request("appdb", "items", OPTS, [{"$match": {}}])
    assert not plain.HasField("allow_disk_use") and plain.batch_size == 0


def test_an_aggregate_that_writes_carries_the_write_concern_and_is_known_to_write() -> None:
    pipeline: list[dict[str, Any]] = [{"$match": {}}, {"$out": "copy"}]
    assert _requests.pipeline_writes(pipeline)
    assert _requests.pipeline_writes([{"$merge": {"into": "copy"}}])
    assert not _requests.pipeline_writes([{"$match": {"$out": 1}}, {"$project": {"a": 1}}])
    request = _requests.aggregate_request("appdb", "items", OPTS, pipeline, write_concern={"w": "majority"})
    assert request.write_concern.w_tag == "majority"


def test_an_empty_pipeline_is_every_document() -> None:
    request = _requests.aggregate_request("appdb", "items", OPTS, [])
    assert [bson.decode(stage) for stage in request.pipeline] == [{"$match": {}}]
    with pytest.raises(TypeError, match="pipeline must be a list"):
        _requests.aggregate_request("appdb", "items", OPTS, {"$match": {}})  # type: ignore[arg-type]


def test_find_carries_collation_and_the_read_options() -> None:
    from pymongo.read_concern import ReadConcern
    from pymongo.read_preferences import Nearest

    read = _requests.ReadOptions(Nearest(tag_sets=[{"dc": "east"}]), ReadConcern("available"), OPTS)
    request = _find(collation={"locale": "fr"}, read=read)
    assert bson.decode(request.collation) == {"locale": "fr"}
    assert request.read_preference.mode == broker_pb2.READ_PREFERENCE_NEAREST
    assert [bson.decode(t) for t in request.read_preference.tag_sets] == [{"dc": "east"}]
    assert request.read_concern == broker_pb2.READ_CONCERN_AVAILABLE
    one = _requests.find_one_request(
        "appdb", "items", OPTS, 5, None, sort=None, skip=0, hint=None, max_time_ms=None, comment=None,
        collation={"locale": "de"}, read=read,
    )  # fmt: skip
    assert (
        bson.decode(one.collation) == {"locale": "de"}
        and one.read_concern == broker_pb2.READ_CONCERN_AVAILABLE
    )
    # Unset, the broker's defaults apply.
    default = _find()
    assert not default.HasField("read_preference") and default.read_concern == 0 and default.collation == b""


def test_pymongos_read_preferences_become_the_protos() -> None:
    from pymongo import ReadPreference
    from pymongo.read_preferences import Secondary

    convert = _requests.read_preference_message
    mode = broker_pb2.ReadPreference
    assert convert(None, OPTS) is None
    assert convert(ReadPreference.PRIMARY, OPTS) == mode(mode=broker_pb2.READ_PREFERENCE_PRIMARY)
    assert convert(ReadPreference.PRIMARY_PREFERRED, OPTS) == mode(
        mode=broker_pb2.READ_PREFERENCE_PRIMARY_PREFERRED
    )
    assert convert(ReadPreference.SECONDARY, OPTS) == mode(mode=broker_pb2.READ_PREFERENCE_SECONDARY)
    assert convert(ReadPreference.SECONDARY_PREFERRED, OPTS) == mode(
        mode=broker_pb2.READ_PREFERENCE_SECONDARY_PREFERRED
    )
    assert convert(ReadPreference.NEAREST, OPTS) == mode(mode=broker_pb2.READ_PREFERENCE_NEAREST)
    tagged = convert(Secondary(tag_sets=[{"dc": "east", "rack": "1"}, {}], max_staleness=120), OPTS)
    assert tagged is not None
    assert tagged.mode == broker_pb2.READ_PREFERENCE_SECONDARY and tagged.max_staleness_s == 120
    assert [_decoded(t) for t in tagged.tag_sets] == [[("dc", "east"), ("rack", "1")], []]
    with pytest.raises(TypeError, match="read_preference must be one of pymongo's"):
        convert("secondary", OPTS)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (None, broker_pb2.READ_CONCERN_UNSPECIFIED),
        ("local", broker_pb2.READ_CONCERN_LOCAL),
        ("available", broker_pb2.READ_CONCERN_AVAILABLE),
        ("majority", broker_pb2.READ_CONCERN_MAJORITY),
        ("linearizable", broker_pb2.READ_CONCERN_LINEARIZABLE),
        ("snapshot", broker_pb2.READ_CONCERN_SNAPSHOT),
    ],
)
def test_pymongos_read_concerns_become_the_protos(level: str | None, expected: int) -> None:
    from pymongo.read_concern import ReadConcern

    assert _requests.read_concern_level(ReadConcern(level)) == expected
    assert _requests.read_concern_level(level) == expected


def test_bad_read_concerns_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown read concern level 'strong'"):
        _requests.read_concern_level("strong")
    with pytest.raises(TypeError, match="read_concern must be"):
        _requests.read_concern_level(3)


# --- bulk writes --------------------------------------------------------------------------


def test_a_bulk_write_carries_each_request_as_its_model() -> None:
    from broker_client import DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne

    fresh: dict[str, Any] = {"a": 1}
    requests = [
        InsertOne(fresh),
        InsertOne({"_id": 7}),
        UpdateOne(
            {"a": 1},
            {"$set": {"b": 1}},
            upsert=True,
            collation={"locale": "fr"},
            array_filters=[{"e": 1}],
            hint="a_1",
        ),
        UpdateMany({}, [{"$set": {"c": "$a"}}], hint=[("a", 1)]),
        ReplaceOne({"a": 2}, {"a": 3}, True, {"locale": "en"}, "a_1"),
        DeleteOne({"a": 3}, hint="a_1"),
        DeleteMany({"a": {"$gt": 0}}, collation={"locale": "fr"}),
    ]
    request = _requests.bulk_write_request(
        "appdb",
        "items",
        OPTS,
        requests,
        ordered=False,
        bypass_document_validation=True,
        comment="c",
        let={"v": 1},
        write_concern={"w": 1},
    )
    assert [m.WhichOneof("model") for m in request.operations] == [
        "insert_one",
        "insert_one",
        "update_one",
        "update_many",
        "replace_one",
        "delete_one",
        "delete_many",
    ]
    # The id is made here, first, and set on the caller's document.
    assert isinstance(fresh["_id"], ObjectId)
    assert bson.decode(request.operations[0].insert_one.document) == fresh
    assert bson.decode(request.operations[1].insert_one.document) == {"_id": 7}
    update = request.operations[2].update_one
    assert bson.decode(update.filter) == {"a": 1} and bson.decode(update.update) == {"$set": {"b": 1}}
    assert update.upsert and update.hint_name == "a_1" and bson.decode(update.collation) == {"locale": "fr"}
    assert [bson.decode(f) for f in update.array_filters] == [{"e": 1}]
    many = request.operations[3].update_many
    assert [bson.decode(s) for s in many.update_pipeline] == [{"$set": {"c": "$a"}}] and not many.upsert
    assert bson.decode(many.hint_keys) == {"a": 1}
    replace = request.operations[4].replace_one
    assert bson.decode(replace.replacement) == {"a": 3} and replace.upsert and replace.hint_name == "a_1"
    assert bson.decode(replace.collation) == {"locale": "en"}
    assert request.operations[5].delete_one.hint_name == "a_1"
    assert bson.decode(request.operations[6].delete_many.collation) == {"locale": "fr"}
    assert request.HasField("ordered") and not request.ordered
    assert (
        request.bypass_document_validation and request.comment == "c" and bson.decode(request.let) == {"v": 1}
    )
    assert request.write_concern.w_nodes == 1
    assert _requests.bulk_write_request("appdb", "items", OPTS, requests[1:2]).ordered


def test_a_bulk_write_takes_pymongos_own_requests() -> None:
    from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne

    document: dict[str, Any] = {"x": 1}
    request = _requests.bulk_write_request(
        "appdb",
        "items",
        OPTS,
        [
            InsertOne(document),
            UpdateOne({"x": 1}, {"$inc": {"x": 1}}, upsert=True, hint=[("x", 1)]),
            UpdateMany({}, {"$set": {"y": 1}}),
            ReplaceOne({"x": 2}, {"x": 3}),
            DeleteOne({"x": 3}, collation={"locale": "fr"}),
        ],
    )
    assert isinstance(document["_id"], ObjectId)
    assert [m.WhichOneof("model") for m in request.operations] == [
        "insert_one",
        "update_one",
        "update_many",
        "replace_one",
        "delete_one",
    ]
    assert request.operations[1].update_one.upsert and bson.decode(
        request.operations[1].update_one.hint_keys
    ) == {"x": 1}
    assert bson.decode(request.operations[4].delete_one.collation) == {"locale": "fr"}


def test_bad_bulk_writes_are_refused() -> None:
    from broker_client import InvalidOperation, ReplaceOne, UpdateOne

    with pytest.raises(InvalidOperation, match="No operations to execute"):
        _requests.bulk_write_request("appdb", "items", OPTS, [])
    with pytest.raises(TypeError, match="requests must be a list"):
        _requests.bulk_write_request("appdb", "items", OPTS, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is not a valid request"):
        _requests.bulk_write_request("appdb", "items", OPTS, [{"insert": {"a": 1}}])
    # The request classes check as pymongo's do, when they are built.
    with pytest.raises(ValueError, match=r"update only works with \$ operators"):
        UpdateOne({}, {"a": 1})
    with pytest.raises(ValueError, match=r"replacement can not include \$ operators"):
        ReplaceOne({}, {"$set": {"a": 1}})
    with pytest.raises(TypeError, match="filter must be an instance of dict"):
        UpdateOne(None, {"$set": {"a": 1}})  # type: ignore[arg-type]


def test_the_request_classes_compare_and_print_as_pymongos() -> None:
    from broker_client import DeleteOne, InsertOne, UpdateOne

    assert UpdateOne({"a": 1}, {"$set": {"b": 1}}, True) == UpdateOne(
        {"a": 1}, {"$set": {"b": 1}}, upsert=True
    )
    assert UpdateOne({"a": 1}, {"$set": {"b": 1}}) != UpdateOne({"a": 2}, {"$set": {"b": 1}})
    assert DeleteOne({"a": 1}) != UpdateOne({"a": 1}, {"$set": {"b": 1}})
    assert repr(InsertOne({"a": 1})) == "InsertOne({'a': 1})"
    assert repr(DeleteOne({"a": 1}, hint="a_1")) == "DeleteOne({'a': 1}, None, 'a_1')"


# --- answers ------------------------------------------------------------------------


def test_write_answers_become_pymongos_results() -> None:
    oid = ObjectId()
    upserted = _requests.update_result(
        broker_pb2.UpdateResponse(matched_count=0, modified_count=0, upserted_id=bson.encode({"_id": oid})),
        True,
        OPTS,
    )
    assert (upserted.matched_count, upserted.modified_count, upserted.upserted_id) == (0, 0, oid)
    assert upserted.did_upsert and upserted.acknowledged
    assert upserted.raw_result == {
        "n": 1,
        "nModified": 0,
        "ok": 1.0,
        "updatedExisting": False,
        "upserted": oid,
    }
    matched = _requests.update_result(
        broker_pb2.UpdateResponse(matched_count=3, modified_count=2), False, OPTS
    )
    assert (matched.matched_count, matched.modified_count, matched.upserted_id, matched.acknowledged) == (
        3,
        2,
        None,
        False,
    )
    deleted = _requests.delete_result(broker_pb2.DeleteResponse(deleted_count=4), True)
    assert deleted.deleted_count == 4 and deleted.raw_result == {"n": 4, "ok": 1.0}


def test_a_bulk_write_answer_becomes_a_bulk_write_result() -> None:
    response = broker_pb2.BulkWriteResponse(
        inserted_count=2,
        matched_count=3,
        modified_count=1,
        deleted_count=4,
        upserted_count=2,
        upserted_ids=[
            broker_pb2.IndexedId(index=2, id=bson.encode({"_id": "u2"})),
            broker_pb2.IndexedId(index=5, id=bson.encode({"_id": 5})),
        ],
    )
    result = _requests.bulk_write_result(response, True, OPTS)
    assert (result.inserted_count, result.matched_count, result.modified_count) == (2, 3, 1)
    assert (result.deleted_count, result.upserted_count, result.upserted_ids) == (4, 2, {2: "u2", 5: 5})
    assert result.bulk_api_result["upserted"] == [{"index": 2, "_id": "u2"}, {"index": 5, "_id": 5}]
    assert result.bulk_api_result["nRemoved"] == 4


def test_distinct_values_are_every_messages_in_order() -> None:
    responses = [
        broker_pb2.DistinctResponse(values=bson.encode({"values": [1, "a"]})),
        broker_pb2.DistinctResponse(values=bson.encode({"values": [datetime.datetime(2024, 1, 1)]})),
    ]
    assert _requests.distinct_values(responses, OPTS) == [1, "a", datetime.datetime(2024, 1, 1)]
    assert _requests.distinct_values([], OPTS) == []


def test_find_and_modify_answers_a_document_or_none() -> None:
    son = CodecOptions(document_class=SON)
    found = _requests.modified_document(
        broker_pb2.FindOneAndModifyResponse(document=bson.encode({"b": 1, "a": 2})), son
    )
    assert isinstance(found, SON) and list(found.items()) == [("b", 1), ("a", 2)]
    assert _requests.modified_document(broker_pb2.FindOneAndModifyResponse(), OPTS) is None


# --- write errors --------------------------------------------------------------------


def _failed(cls: type[Any] | None = None, **metadata: str) -> Any:
    from broker_client import InvalidRequest

    return (cls or InvalidRequest)("write failed", code=grpc.StatusCode.INVALID_ARGUMENT, metadata=metadata)


def test_bulk_write_error_details_are_pymongos_from_the_metadata() -> None:
    from broker_client import BulkWriteError
    from broker_client.errors import as_bulk_write_error

    oid = ObjectId()
    error = as_bulk_write_error(
        _duplicate(
            mongo_code="11000",
            failed_index="2",
            inserted_count="1",
            matched_count="1",
            modified_count="1",
            deleted_count="0",
            upserted_count="1",
            write_errors='[{"index": 2, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 dup"},'
            ' {"index": 4, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 again"}]',
            write_errors_total="2",
            upserted_ids=f'[{{"index": 1, "_id": {{"$oid": "{oid}"}}}}]',
        )
    )
    assert isinstance(error, BulkWriteError) and not isinstance(error, DuplicateKeyError)
    assert error.code is grpc.StatusCode.ALREADY_EXISTS
    assert error.details == {
        "writeErrors": [
            {"index": 2, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 dup"},
            {"index": 4, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 again"},
        ],
        "writeConcernErrors": [],
        "nInserted": 1,
        "nUpserted": 1,
        "nMatched": 1,
        "nModified": 1,
        "nRemoved": 0,
        "upserted": [{"index": 1, "_id": oid}],
    }
    assert error.failed_index == 2 and error.status_details == ()


def test_bulk_write_error_details_without_write_errors_name_the_failing_index() -> None:
    from broker_client.errors import as_bulk_write_error

    error = as_bulk_write_error(_failed(failed_index="3", mongo_code="14", mongo_code_name="TypeMismatch"))
    assert error.details["writeErrors"] == [
        {"index": 3, "code": 14, "codeName": "TypeMismatch", "errmsg": "write failed"}
    ]
    concern = as_bulk_write_error(
        _failed(write_concern_error="waiting for replication timed out", inserted_count="2")
    )
    assert concern.details["writeConcernErrors"] == [{"errmsg": "waiting for replication timed out"}]
    assert concern.details["writeErrors"] == [] and concern.details["nInserted"] == 2


def test_only_write_failures_become_write_errors() -> None:
    from broker_client import BulkWriteError, PermissionDenied, WriteError
    from broker_client.errors import as_bulk_write_error, as_write_error

    refused = PermissionDenied("read-only", code=grpc.StatusCode.PERMISSION_DENIED, reason="NOT_AUTHORIZED")
    assert as_write_error(refused) is refused and as_bulk_write_error(refused) is refused
    duplicate = _duplicate(mongo_code="11000", failed_index="0")
    assert as_write_error(duplicate) is duplicate
    assert duplicate.details == {"index": 0, "code": 11000, "codeName": None, "errmsg": "E11000"}
    immutable = _failed(
        failed_index="0",
        mongo_code="66",
        write_errors='[{"index": 0, "code": 66, "codeName": "ImmutableField", "errmsg": "_id is immutable"}]',
    )
    immutable.attempts = 1
    converted = as_write_error(immutable)
    assert type(converted) is WriteError and converted.attempts == 1
    assert converted.details == {
        "index": 0,
        "code": 66,
        "codeName": "ImmutableField",
        "errmsg": "_id is immutable",
    }
    assert (converted.code, converted.message, converted.mongo_code) == (immutable.code, "write failed", 66)
    assert isinstance(as_bulk_write_error(immutable), BulkWriteError)


def test_a_write_mongodb_refused_with_its_own_code_is_a_write_error() -> None:
    from broker_client import InvalidRequest, OperationFailure, WriteError
    from broker_client.errors import as_write_error

    refused = OperationFailure(
        "the database refused the operation",
        code=grpc.StatusCode.FAILED_PRECONDITION,
        reason="OPERATION_FAILED",
        metadata={"mongo_code": "66", "mongo_code_name": "ImmutableField"},
    )
    converted = as_write_error(refused)
    assert type(converted) is WriteError
    assert converted.details == {
        "index": 0,
        "code": 66,
        "codeName": "ImmutableField",
        "errmsg": "the database refused the operation",
    }
    rejected = InvalidRequest(
        "bad", code=grpc.StatusCode.INVALID_ARGUMENT, reason="QUERY_REJECTED", metadata={"mongo_code": "2"}
    )
    assert type(as_write_error(rejected)) is WriteError
    # The broker's own refusal (no MongoDB code), and a feature the server lacks, stay as they are.
    own = InvalidRequest(
        "update only works with $ operators", code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_REQUEST"
    )
    assert as_write_error(own) is own
    lacking = OperationFailure(
        "not implemented",
        code=grpc.StatusCode.UNIMPLEMENTED,
        reason="NOT_SUPPORTED",
        metadata={"mongo_code": "238"},
    )
    assert as_write_error(lacking) is lacking


def test_write_errors_pickle_with_their_details() -> None:
    import pickle

    from broker_client.errors import as_bulk_write_error

    error = as_bulk_write_error(_failed(failed_index="1", mongo_code="2", inserted_count="1"))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.details == error.details and copy.code is error.code


# --- retries --------------------------------------------------------------------------


def test_writes_that_are_not_idempotent_are_never_retried() -> None:
    from broker_client.retry import NEVER_RETRIED, may_retry

    settings = _settings()
    for method in ("Update", "Delete", "FindOneAndModify", "BulkWrite"):
        assert method in NEVER_RETRIED and not may_retry(method)
        state = settings.retry_state(method, None)
        assert state.policy is None
        with pytest.raises(ServerSelectionTimeoutError):
            state.backoff(_unavailable())
    for method in ("Find", "FindOne", "Count", "Distinct", "Aggregate", "Insert", "Ping"):
        assert may_retry(method) and settings.retry_state(method, None).policy == RetryPolicy()
        assert settings.retry_state(method, None).backoff(_unavailable()) >= 0
    # An aggregate that writes is sent once: its cursor asks for no retries.
    cursor = _requests.CursorState(
        _requests.aggregate_request("appdb", "items", OPTS, [{"$out": "x"}]),
        5.0,
        settings,
        method="Aggregate",
        retry=False,
    )
    assert cursor.start().policy is None and cursor.method == "Aggregate"


def test_a_collection_can_have_its_own_codec_options() -> None:
    settings = _settings()
    son = settings.with_codec_options(CodecOptions(document_class=SON, tz_aware=True))
    assert son.codec_options.document_class is SON and son.id_codec_options.document_class is dict
    assert son.id_codec_options.tz_aware and son.target == settings.target and son.retries is settings.retries
    assert settings.codec_options.document_class is dict
    with pytest.raises(TypeError, match=r"codec_options must be a bson\.CodecOptions"):
        settings.with_codec_options({"tz_aware": True})  # type: ignore[arg-type]
