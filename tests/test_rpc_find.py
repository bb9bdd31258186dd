"""Find over the raw contract: streaming in batches, options, and every bad path."""

from __future__ import annotations

import bson
import grpc
import pytest

from tests.rpc import fails, find_all, find_one, open_stub, pb


@pytest.fixture
def filled(broker, stub, collection_name):
    """2,500 documents with n = 0..2499 inserted in shuffled order."""
    order = [(i * 7919) % 2500 for i in range(2500)]  # a permutation: 7919 is prime
    documents = [bson.encode({"n": n, "odd": n % 2 == 1, "pad": "p" * 100}) for n in order]
    for start in range(0, len(documents), 1000):
        stub.Insert(
            pb.InsertRequest(
                database=broker.db_name,
                collection=collection_name,
                documents=documents[start : start + 1000],
            )
        )
    return collection_name


def test_large_result_streams_completely_in_several_messages_in_sort_order(broker, stub, filled):
    documents, messages = find_all(
        stub,
        database=broker.db_name,
        collection=filled,
        sort=bson.encode({"n": -1}),
        batch_size=300,
    )
    assert [d["n"] for d in documents] == list(range(2499, -1, -1))
    # One message per MongoDB batch of 300 (never one per document).
    assert messages == 9


def test_default_batch_size_still_batches(broker, stub, filled):
    documents, messages = find_all(stub, database=broker.db_name, collection=filled)
    assert len(documents) == 2500
    assert 1 < messages < 100


def test_filter_projection_skip_limit(broker, stub, filled):
    documents, _ = find_all(
        stub,
        database=broker.db_name,
        collection=filled,
        filter=bson.encode({"odd": True, "n": {"$lt": 100}}),
        projection=bson.encode({"n": 1, "_id": 0}),
        sort=bson.encode({"n": 1}),
        skip=5,
        limit=10,
    )
    assert documents == [{"n": n} for n in range(11, 31, 2)]


def test_hint_by_name_and_keys_and_comment_are_accepted(broker, stub, filled, mongo_collection):
    mongo_collection.create_index("n", name="n_idx")
    by_name, _ = find_all(
        stub,
        database=broker.db_name,
        collection=filled,
        filter=bson.encode({"n": 3}),
        hint_name="n_idx",
        comment="from-test",
    )
    by_keys, _ = find_all(
        stub,
        database=broker.db_name,
        collection=filled,
        filter=bson.encode({"n": 3}),
        hint_keys=bson.encode({"n": 1}),
    )
    assert [d["n"] for d in by_name] == [d["n"] for d in by_keys] == [3]


def test_no_match_sends_no_documents(broker, stub, filled):
    documents, _ = find_all(stub, database=broker.db_name, collection=filled, filter=bson.encode({"n": -1}))
    assert documents == []


def test_missing_collection_is_empty_not_an_error(broker, stub, collection_name):
    documents, _ = find_all(stub, database=broker.db_name, collection=collection_name)
    assert documents == []


def test_messages_stay_under_the_configured_cap(start_broker, collection_name):
    config = start_broker.base_config()
    config["limits"] = {"max_response_message_bytes": 64 * 1024}
    proc = start_broker(config)
    document_size = len(bson.encode({"n": 0, "pad": "x" * 1000}))
    with open_stub(proc.unix_target) as stub:
        stub.Insert(
            pb.InsertRequest(
                database="appdb",
                collection=collection_name,
                documents=[bson.encode({"n": n, "pad": "x" * 1000}) for n in range(500)],
            )
        )
        sizes = []
        seen: list[int] = []
        for message in stub.Find(
            pb.FindRequest(
                database="appdb",
                collection=collection_name,
                sort=bson.encode({"n": 1}),
                batch_size=500,
            )
        ):
            sizes.append(message.ByteSize())
            seen.extend(bson.decode(d)["n"] for d in message.documents)
    assert seen == list(range(500))
    assert max(sizes) <= 64 * 1024
    # 500 documents of about 1 KB in one MongoDB batch: split over ~8 messages.
    assert len(sizes) >= (500 * document_size) // (64 * 1024)


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        (
            {"filter": b"\x05\x00"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter is not a valid BSON document",
        ),
        (
            {"filter": bson.encode({"a": 1}) + b"x"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter is not a valid",
        ),
        (
            {"projection": b"garbage!"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "projection is not a valid",
        ),
        ({"sort": b"\x00\x00\x00\x00"}, grpc.StatusCode.INVALID_ARGUMENT, "sort is not a valid"),
        (
            {"sort": bson.encode({"n": "up"})},
            grpc.StatusCode.INVALID_ARGUMENT,
            "sort.n: must be 1, -1",
        ),
        ({"sort": bson.encode({"n": 2})}, grpc.StatusCode.INVALID_ARGUMENT, "sort.n"),
        ({"hint_keys": b"zz"}, grpc.StatusCode.INVALID_ARGUMENT, "hint_keys is not a valid"),
        (
            {"hint_keys": bson.encode({})},
            grpc.StatusCode.INVALID_ARGUMENT,
            "hint_keys is an empty document",
        ),
        ({"hint_name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "hint_name is empty"),
        ({"limit": -1}, grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative"),
        ({"skip": -5}, grpc.StatusCode.INVALID_ARGUMENT, "skip must not be negative"),
        ({"batch_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, "batch_size must not be negative"),
        ({"max_time_ms": -1}, grpc.StatusCode.INVALID_ARGUMENT, "max_time_ms must not be negative"),
        (
            {"filter": bson.encode({"n": {"$nosuchop": 1}})},
            grpc.StatusCode.INVALID_ARGUMENT,
            "$nosuchop",
        ),
        ({"database": "nope"}, grpc.StatusCode.NOT_FOUND, "'nope' is not configured"),
        ({"database": ""}, grpc.StatusCode.INVALID_ARGUMENT, "database is required"),
        ({"collection": ""}, grpc.StatusCode.INVALID_ARGUMENT, "collection is required"),
        ({"collection": "bad\x00name"}, grpc.StatusCode.INVALID_ARGUMENT, "collection"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
@pytest.mark.parametrize("run", [find_all, find_one], ids=["Find", "FindOne"])
def test_bad_requests_get_a_precise_status(broker, stub, filled, fields, code, needle, run):
    request = {"database": broker.db_name, "collection": filled, **fields}
    with fails(code) as failure:
        run(stub, **request)
    assert needle in failure.message
    assert failure.reason  # every failure carries ErrorInfo


def test_empty_hint_name_oneof_is_distinguished_from_absent(broker, stub, filled):
    # An absent hint is fine; an explicitly empty name is not (see above).
    documents, _ = find_all(stub, database=broker.db_name, collection=filled, limit=1)
    assert len(documents) == 1


def test_expired_deadline_is_deadline_exceeded(broker, stub, filled):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Find(pb.FindRequest(database=broker.db_name, collection=filled), timeout=0.0005))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_broker_survives_bad_requests(broker, stub, filled):
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            find_all(stub, database=broker.db_name, collection=filled, filter=b"\xff" * 10)
    documents, _ = find_all(stub, database=broker.db_name, collection=filled, limit=3)
    assert len(documents) == 3
