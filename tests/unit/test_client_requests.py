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
