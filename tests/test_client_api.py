"""The bundled client's API against a live broker: pymongo's shape, over gRPC."""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import pickle
import socket
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import broker_client
import bson
import grpc
import pytest
from broker_client import (
    AutoReconnect,
    BrokerClient,
    BrokerError,
    Collection,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    InvalidOperation,
    InvalidRequest,
    LimitExceeded,
    OperationFailure,
    PingResult,
    ServerSelectionTimeoutError,
    UnknownDatabase,
    WriteError,
    _requests,
)
from bson import Binary, Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.son import SON

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def client(broker: Any) -> Iterator[BrokerClient[Doc]]:
    with BrokerClient(broker.unix_target) as c:
        yield c


@pytest.fixture
def items(client: BrokerClient[Doc], broker: Any, collection_name: str) -> Collection[Doc]:
    return client[broker.db_name][collection_name]


# --- the package itself --------------------------------------------------------


def test_import_opens_no_socket_creates_no_channel_and_starts_no_thread(broker: Any) -> None:
    # A fresh interpreter, so nothing else has imported grpc already.
    script = textwrap.dedent(
        f"""
        import json, sys, threading
        events = []
        sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
        import broker_client
        client = broker_client.BrokerClient({broker.unix_target!r})
        items = client["appdb"]["items"]
        cursor = items.find({{"a": 1}})  # lazy: nothing is sent until iterated
        print(json.dumps({{
            "socket_events": events,
            "grpc_imported": "grpc" in sys.modules,
            "protobuf_imported": "google.protobuf" in sys.modules,
            "pymongo_imported": "pymongo" in sys.modules,
            "threads": threading.active_count(),
            "channel": client._holder.channel is not None,
        }}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    facts = json.loads(out.stdout)
    assert facts["socket_events"] == []
    assert facts["channel"] is False
    assert facts["threads"] == 1
    # Lazy imports: grpc and protobuf come with the first call, not before.
    assert facts["grpc_imported"] is False
    # find() builds its request message, so protobuf may be loaded by now,
    # but pymongo itself (beyond bson) never is.
    assert facts["pymongo_imported"] is False


def test_all_is_honest() -> None:
    for name in broker_client.__all__:
        assert hasattr(broker_client, name), f"__all__ names {name!r}, which does not exist"
    public = {
        name
        for name, value in vars(broker_client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(broker_client.__all__), (
        f"public but not in __all__: {public - set(broker_client.__all__)}"
    )
    assert len(broker_client.__all__) == len(set(broker_client.__all__))
    # Every exception class is exported from the package itself.
    for name, value in vars(broker_client.errors).items():
        if inspect.isclass(value) and issubclass(value, BrokerError):
            assert name in broker_client.__all__, name
    for module in (broker_client.client, broker_client.errors, broker_client.results):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"


def test_version_matches_the_distribution() -> None:
    assert broker_client.__version__ == importlib.metadata.version("mongo-broker-client")


def test_single_threaded_stream_option_is_grpcs_name() -> None:
    # client.py spells the option out to avoid importing grpc early.
    import grpc.experimental

    assert grpc.experimental.ChannelOptions.SingleThreadedUnaryStream == "SingleThreadedUnaryStream"


def test_every_exception_derives_from_broker_error_and_pickles() -> None:
    err = DuplicateKeyError(
        "dup",
        code=grpc.StatusCode.ALREADY_EXISTS,
        reason="DUPLICATE_KEY",
        metadata={"mongo_code": "11000", "mongo_labels": "A, B", "inserted_count": "3"},
    )
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is DuplicateKeyError
    assert (copy.code, copy.reason, copy.mongo_code, copy.labels, copy.inserted_count) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "DUPLICATE_KEY",
        11000,
        frozenset({"A", "B"}),
        3,
    )
    assert issubclass(DuplicateKeyError, WriteError)
    assert issubclass(ServerSelectionTimeoutError, AutoReconnect)
    assert issubclass(AutoReconnect, ConnectionFailure)
    assert issubclass(ExecutionTimeout, OperationFailure)
    for name in broker_client.__all__:
        value = getattr(broker_client, name)
        if inspect.isclass(value) and issubclass(value, Exception):
            assert issubclass(value, BrokerError), name


# --- targets -------------------------------------------------------------------


def _targets(broker: Any) -> list[str]:
    socket_path = broker.unix_target.removeprefix("unix://")
    return [
        broker.unix_target,
        f"unix:{socket_path}",
        socket_path,  # a bare absolute path is a Unix socket
        broker.tcp_target,
        f"dns:///{broker.tcp_target}",
    ]


def test_every_target_form_reaches_the_broker(broker: Any) -> None:
    for target in _targets(broker):
        with BrokerClient(target) as c:
            result = c.ping(timeout=10)
            assert isinstance(result, PingResult)
            assert result.version == broker.version, target


@pytest.mark.parametrize(
    "target",
    ["", "   ", "localhost", "mongodb://127.0.0.1:27017/", "http://127.0.0.1:50051"],
)
def test_bad_targets_are_refused_at_once(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        BrokerClient(target)


def test_ping_result_is_typed(client: BrokerClient[Doc], broker: Any) -> None:
    result = client.ping()
    assert result.ok
    db = result[broker.db_name]
    assert db.ok
    assert db.error == ""
    assert db.rtt_ms >= 0
    assert db.pool.max_pool_size == broker.max_pool_size
    assert 0 <= db.pool.connections_in_use <= db.pool.connections_open
    only = client[broker.db_name].ping()
    assert [d.database for d in only] == [broker.db_name]
    with pytest.raises(KeyError):
        result["no-such-db"]


def test_stats_result_is_typed(client: BrokerClient[Doc], broker: Any) -> None:
    stats = client.stats(broker.db_name)
    assert stats.version == broker.version
    db = stats[broker.db_name]
    assert db.max_pool_size == broker.max_pool_size
    assert isinstance(db.rpcs, dict)


# --- inserts -------------------------------------------------------------------


def test_insert_one_generates_the_object_id_client_side(
    items: Collection[Doc], mongo_collection: Any
) -> None:
    doc: Doc = {"sku": "a1", "qty": 5}
    result = items.insert_one(doc)
    # As pymongo: the _id is made before sending, and set on the caller's dict.
    assert isinstance(doc["_id"], ObjectId)
    assert result.inserted_id == doc["_id"]
    assert result.acknowledged
    stored = mongo_collection.find_one({"sku": "a1"})
    assert stored == doc


def test_generated_id_is_encoded_first() -> None:
    doc: Doc = {"z": 1, "a": 2}
    encoded = _requests.encode_for_insert(doc, CodecOptions())
    assert list(RawBSONDocument(encoded).keys()) == ["_id", "z", "a"]


def test_insert_one_keeps_ids_of_other_types(items: Collection[Doc]) -> None:
    for value in (7, "s-1", Int64(2**40), 2.5, {"k": 1}):
        assert items.insert_one({"_id": value}).inserted_id == value
    assert items.find_one(7) == {"_id": 7}


def test_insert_many_returns_ids_in_order(items: Collection[Doc]) -> None:
    docs: list[Doc] = [{"n": 0}, {"_id": 11, "n": 1}, {"n": 2}, {"_id": "x", "n": 3}]
    result = items.insert_many(docs)
    assert result.acknowledged
    assert result.inserted_ids == [d["_id"] for d in docs]
    assert isinstance(result.inserted_ids[0], ObjectId)
    assert result.inserted_ids[1:4:2] == [11, "x"]
    assert [d["n"] for d in items.find({}, sort="n")] == [0, 1, 2, 3]


def test_insert_many_accepts_any_iterable_but_not_empty(items: Collection[Doc]) -> None:
    result = items.insert_many({"n": n} for n in range(3))
    assert len(result.inserted_ids) == 3
    with pytest.raises(TypeError, match="non-empty"):
        items.insert_many([])
    with pytest.raises(TypeError):
        items.insert_many({"n": 1})  # type: ignore[dict-item]  # a mapping, not a list of them


def test_raw_bson_document_is_sent_as_is_and_the_broker_makes_the_id(items: Collection[Doc]) -> None:
    raw = RawBSONDocument(bson.encode({"n": 1}))
    result = items.insert_one(raw)
    assert isinstance(result.inserted_id, ObjectId)
    assert "_id" not in raw
    assert items.find_one({"_id": result.inserted_id}) == {"_id": result.inserted_id, "n": 1}


def test_bson_types_survive_the_round_trip(items: Collection[Doc], broker: Any) -> None:
    doc: Doc = {
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000),
        "big": Int64(2**53 + 1),
        "blob": Binary(b"\x00\x01\xff", 0x80),
        "oid": ObjectId(),
        "nested": {"list": [1, "two", 3.5], "none": None, "flag": True},
    }
    if broker.db_server.kind != "ferretdb":
        # FerretDB 1.x drops the connection on a Decimal128.
        doc["price"] = Decimal128("12.34")
    items.insert_one(doc)
    assert items.find_one({"_id": doc["_id"]}) == doc


def test_write_concern_maps_onto_the_request(items: Collection[Doc]) -> None:
    assert items.insert_one({"n": 1}, write_concern={"w": 1, "j": False, "wtimeout": 5000}).acknowledged
    with pytest.raises(ValueError, match="unsupported key"):
        items.insert_one({"n": 2}, write_concern={"fsync": True})
    with pytest.raises(TypeError):
        items.insert_one({"n": 3}, write_concern={"w": True})


# --- finds ---------------------------------------------------------------------


@pytest.fixture
def stock(items: Collection[Doc]) -> Collection[Doc]:
    items.insert_many(
        [{"_id": n, "sku": f"s{n:02d}", "qty": n, "tag": "odd" if n % 2 else "even"} for n in range(10)]
    )
    return items


def test_find_with_filter_projection_sort_skip_limit(stock: Collection[Doc]) -> None:
    found = list(
        stock.find({"qty": {"$gt": 3}}, projection={"sku": 1, "_id": 0}, sort=[("qty", -1)], skip=1, limit=3)
    )
    assert found == [{"sku": "s08"}, {"sku": "s07"}, {"sku": "s06"}]


def test_find_accepts_pymongos_spellings(stock: Collection[Doc]) -> None:
    by_list = list(stock.find({"tag": "odd"}, ["sku"], sort=[("tag", 1), ("qty", -1)]))
    assert by_list == [{"_id": n, "sku": f"s{n:02d}"} for n in (9, 7, 5, 3, 1)]
    assert [d["_id"] for d in stock.find(sort="qty", limit=2)] == [0, 1]
    assert [d["_id"] for d in stock.find(sort={"tag": 1, "qty": -1}, limit=2)] == [8, 6]
    assert [d["_id"] for d in stock.find(sort=["tag", ("qty", -1)], limit=1)] == [8]
    assert len(list(stock.find(hint="_id_"))) == 10
    assert len(list(stock.find(hint=[("_id", 1)], max_time_ms=5000, comment="api-test"))) == 10


def test_find_is_lazy_and_streams_batch_by_batch(items: Collection[Doc]) -> None:
    items.insert_many([{"n": n} for n in range(300)])
    cursor = items.find({}, sort="n", batch_size=50)
    assert cursor.retrieved == 0  # nothing sent yet
    assert next(cursor)["n"] == 0
    assert 1 <= cursor.retrieved < 300
    assert [d["n"] for d in cursor] == list(range(1, 300))
    assert not cursor.alive
    with pytest.raises(StopIteration):
        next(cursor)


def test_closing_a_cursor_stops_it(items: Collection[Doc]) -> None:
    items.insert_many([{"n": n} for n in range(100)])
    with items.find({}, batch_size=10) as cursor:
        assert next(cursor) is not None
        assert cursor.alive
    assert not cursor.alive
    assert list(cursor) == []
    cursor.close()  # twice is fine


def test_find_one(stock: Collection[Doc]) -> None:
    assert stock.find_one({"sku": "nope"}) is None
    assert stock.find_one({"qty": {"$gte": 5}}, sort=[("qty", 1)]) == {
        "_id": 5,
        "sku": "s05",
        "qty": 5,
        "tag": "odd",
    }
    assert stock.find_one(3, projection={"sku": 1}) == {"_id": 3, "sku": "s03"}
    assert stock.find_one() is not None


def test_cursor_to_list(stock: Collection[Doc]) -> None:
    assert len(stock.find().to_list()) == 10
    assert len(stock.find().to_list(4)) == 4


def test_client_side_validation(items: Collection[Doc]) -> None:
    with pytest.raises(TypeError, match="filter"):
        items.find("not a mapping")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="skip"):
        items.find(skip=-1)
    with pytest.raises(ValueError, match="limit"):
        items.find(limit=-1)
    with pytest.raises(TypeError, match="projection"):
        items.find({}, "sku")
    with pytest.raises(TypeError, match="document"):
        items.insert_one(["not", "a", "document"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        items.find_one({}, timeout=0)


def test_document_class_and_codec_options(broker: Any, collection_name: str) -> None:
    with BrokerClient(broker.unix_target, document_class=SON) as c:
        coll = c[broker.db_name][collection_name]
        coll.insert_one({"b": 1, "a": 2})
        doc = coll.find_one()
        assert isinstance(doc, SON)
        assert list(doc.keys()) == ["_id", "b", "a"]
    opts: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument, tz_aware=True)
    with BrokerClient(broker.unix_target, codec_options=opts) as c:
        raw = c[broker.db_name][collection_name].find_one()
        assert isinstance(raw, RawBSONDocument)
        assert raw["a"] == 2


def test_large_documents_fit_the_message_limits(items: Collection[Doc]) -> None:
    # One document close to BSON's 16 MiB limit must travel both ways.
    big = "x" * (15 * 1024 * 1024)
    oid = items.insert_one({"big": big}).inserted_id
    found = items.find_one({"_id": oid})
    assert found is not None
    assert len(found["big"]) == len(big)


# --- deadlines and errors --------------------------------------------------------


def test_a_tiny_timeout_gives_execution_timeout(items: Collection[Doc]) -> None:
    # Less than a millisecond left: the client answers without sending, so
    # this does not depend on which thread notices the deadline first.
    with pytest.raises(ExecutionTimeout, match="before the call could be sent") as info:
        items.find_one({}, timeout=1e-6)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.timeout
    assert info.value.attempts == 0
    with pytest.raises(ExecutionTimeout) as insert_info:
        items.insert_one({"n": 1}, timeout=1e-6)
    assert insert_info.value.attempts == 0
    assert items.find_one({"n": 1}) is None


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_the_call_timeout_bounds_a_silent_broker(black_hole: str) -> None:
    with BrokerClient(black_hole, timeout=120) as c:
        started = time.monotonic()
        with pytest.raises(ExecutionTimeout) as info:
            c.ping(timeout=0.5)
        # Not a timing test: it shows the call's timeout won over the
        # client's 120 s, and that nothing waits forever.
        assert time.monotonic() - started < 60
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_client_wide_timeout_applies(broker: Any, black_hole: str) -> None:
    with BrokerClient(black_hole, timeout=0.5) as c:
        assert c.timeout == 0.5
        with pytest.raises(ExecutionTimeout):
            c.ping()
    with BrokerClient(broker.unix_target, timeout=1e-6) as c:
        with pytest.raises(ExecutionTimeout):
            c[broker.db_name]["c"].find_one()
        # A call's own timeout wins over the client's.
        assert c.ping(timeout=10).ok
    assert BrokerClient(broker.unix_target).timeout == broker_client.DEFAULT_TIMEOUT_S == 30.0


def test_duplicate_key_carries_code_and_details(items: Collection[Doc]) -> None:
    items.insert_one({"_id": 1})
    with pytest.raises(DuplicateKeyError) as info:
        items.insert_one({"_id": 1})
    err = info.value
    assert err.code is grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "DUPLICATE_KEY"
    assert err.mongo_code == 11000
    assert err.metadata["mongo_code"] == "11000"
    assert err.inserted_count == 0
    assert err.failed_index == 0
    assert "ALREADY_EXISTS" in str(err)
    assert err.details, "the google.rpc details are kept"


def test_insert_many_partial_failure_reports_inserted_count(items: Collection[Doc]) -> None:
    with pytest.raises(DuplicateKeyError) as ordered:
        items.insert_many([{"_id": 1}, {"_id": 1}, {"_id": 2}])
    assert (ordered.value.inserted_count, ordered.value.failed_index) == (1, 1)
    with pytest.raises(DuplicateKeyError) as unordered:
        items.insert_many([{"_id": 3}, {"_id": 1}, {"_id": 4}], ordered=False)
    assert unordered.value.inserted_count == 2
    assert sorted(d["_id"] for d in items.find()) == [1, 3, 4]


def test_unknown_database(client: BrokerClient[Doc]) -> None:
    with pytest.raises(UnknownDatabase) as info:
        client["no_such_db"]["c"].find_one()
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert info.value.reason == "UNKNOWN_DATABASE"
    assert info.value.database == "no_such_db"
    assert isinstance(info.value, OperationFailure)


def test_bad_query_is_invalid_request(items: Collection[Doc]) -> None:
    items.insert_one({"n": 1})  # FerretDB checks no query against a missing collection
    with pytest.raises(InvalidRequest) as info:
        items.find_one({"$bogus": 1})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.mongo_code is not None


def test_too_large_a_request_is_limit_exceeded_not_a_wait_queue_timeout(items: Collection[Doc]) -> None:
    big = "x" * (12 * 1024 * 1024)
    with pytest.raises(LimitExceeded) as info:
        items.insert_many([{"big": big} for _ in range(3)])  # 36 MiB > the broker's 32 MiB
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_no_broker_listening_is_server_selection_timeout(tmp_path: Path) -> None:
    with (
        BrokerClient(str(tmp_path / "nobody.sock"), timeout=10) as c,
        pytest.raises(ServerSelectionTimeoutError) as info,
    ):
        c.ping()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(info.value, AutoReconnect)


def test_use_after_close_is_invalid_operation(broker: Any) -> None:
    c = BrokerClient(broker.unix_target)
    assert c.ping().ok
    c.close()
    with pytest.raises(InvalidOperation):
        c.ping()


def test_navigation(client: BrokerClient[Doc], broker: Any) -> None:
    db = client.get_database(broker.db_name)
    assert db == client[broker.db_name] == getattr(client, broker.db_name)
    coll = db.get_collection("things")
    assert coll == db["things"] == db.things
    assert coll.full_name == f"{broker.db_name}.things"
    assert coll.database is db
    assert db.client is client
    with pytest.raises(AttributeError):
        client._private  # noqa: B018


# --- retries (the fault scenarios are in test_retries.py) -------------------------


def test_every_result_counts_its_attempts(client: BrokerClient[Doc], items: Collection[Doc]) -> None:
    assert client.retries == broker_client.DEFAULT_RETRY_POLICY
    assert client.ping().attempts == 1
    assert client.stats().attempts == 1
    assert items.insert_one({"n": 1}).attempts == 1
    assert items.insert_many([{"n": 2}, {"n": 3}]).attempts == 1
    cursor = items.find({})
    assert cursor.attempts == 0  # nothing sent yet
    assert len(cursor.to_list()) == 3
    assert cursor.attempts == 1
    # attempts is not part of a result's value.
    assert items.insert_one({"_id": "x"}) == broker_client.InsertOneResult("x", True, attempts=5)


def test_retry_policy_is_a_picklable_read_only_value() -> None:
    policy = broker_client.RetryPolicy(max_attempts=5, initial_backoff=0.01)
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert hash(policy) == hash(broker_client.RetryPolicy(5, 0.01, 1.0, 2.0))
    assert repr(policy) == (
        "RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=1.0, multiplier=2.0)"
    )
    with pytest.raises(AttributeError, match="read-only"):
        policy.max_attempts = 1
