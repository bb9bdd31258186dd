"""AsyncBrokerClient's other operations against the live broker: each once, awaitable.

The arguments, results, errors and retry rules are the sync client's (see
tests/test_client_operations.py, which covers them in depth); here each
method runs once over grpc.aio, with one error path for each kind of
failure, and the retry rules once against a fake broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from broker_client import (
    AsyncBrokerClient,
    AsyncCursor,
    BulkWriteError,
    DeleteOne,
    DuplicateKeyError,
    InsertOne,
    ReplaceOne,
    ReturnDocument,
    ServerSelectionTimeoutError,
    UnknownDatabase,
    UpdateMany,
    UpdateOne,
    WriteError,
)
from broker_client.proto.broker.v1 import broker_pb2_grpc
from bson import ObjectId
from pymongo import ReadPreference
from pymongo.read_concern import ReadConcern

from tests.test_client_operations import _FakeBroker, _unavailable

Doc = dict[str, Any]
_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _stored(mongo_collection: Any) -> list[Doc]:
    return list(mongo_collection.find({}, sort=[("_id", 1)]))


def test_every_operation_once(broker: Any, collection_name: str, mongo_collection: Any) -> None:
    mongo_collection.insert_many([{"_id": i, "a": i % 3} for i in range(12)])

    async def main() -> None:
        async with AsyncBrokerClient(broker.unix_target) as client:
            items = client[broker.db_name][collection_name]

            updated = await items.update_one({"_id": 0}, {"$set": {"u": 1}})
            assert (updated.matched_count, updated.modified_count) == (1, 1)
            many = await items.update_many({"a": 1}, {"$inc": {"n": 1}}, hint="_id_")
            assert many.modified_count == 4
            upserted = await items.update_one({"_id": 100}, {"$set": {"a": 9}}, upsert=True)
            assert upserted.upserted_id == 100
            replaced = await items.replace_one({"_id": 100}, {"r": True})
            assert replaced.modified_count == 1

            assert (await items.delete_one({"_id": 100})).deleted_count == 1
            assert (await items.delete_many({"a": 2}, comment="twos")).deleted_count == 4

            before = await items.find_one_and_update({"_id": 1}, {"$set": {"f": 1}})
            assert before == {"_id": 1, "a": 1, "n": 1}
            after = await items.find_one_and_replace(
                {"_id": 1}, {"f": 2}, return_document=ReturnDocument.AFTER
            )
            assert after == {"_id": 1, "f": 2}
            created = await items.find_one_and_update(
                {"_id": 200}, {"$set": {"a": 0}}, upsert=True, return_document=ReturnDocument.AFTER
            )
            assert created == {"_id": 200, "a": 0}
            gone = await items.find_one_and_delete({"a": 0}, sort=[("_id", -1)])
            assert gone is not None and gone["_id"] == 200

            assert await items.count_documents({}) == 8
            assert await items.count_documents({}, skip=2, limit=3) == 3
            assert await items.estimated_document_count() == 8
            assert sorted(await items.distinct("a")) == [0, 1]

            cursor = await items.aggregate([{"$sort": {"_id": 1}}, {"$project": {"_id": 1}}], batchSize=3)
            assert isinstance(cursor, AsyncCursor) and cursor.retrieved == 3
            assert [d["_id"] async for d in cursor] == [0, 1, 3, 4, 6, 7, 9, 10]
            assert cursor.retrieved == 8

            fresh: Doc = {"b": 1}
            bulk = await items.bulk_write(
                [
                    InsertOne(fresh),
                    UpdateOne({"_id": 300}, {"$set": {"b": 2}}, upsert=True),
                    UpdateMany({"b": 1}, {"$set": {"c": 1}}),
                    ReplaceOne({"_id": 300}, {"b": 3}),
                    DeleteOne({"_id": 0}),
                ]
            )
            assert (bulk.inserted_count, bulk.upserted_ids, bulk.modified_count, bulk.deleted_count) == (
                1,
                {1: 300},
                2,
                1,
            )
            assert isinstance(fresh["_id"], ObjectId)

            reads = client[broker.db_name].get_collection(
                collection_name,
                read_preference=ReadPreference.SECONDARY_PREFERRED,
                read_concern=ReadConcern("local"),
            )
            assert await reads.count_documents({"c": 1}) == 1
            assert len(await reads.find({}).to_list()) == 9

    run(main())
    assert _stored(mongo_collection)[:2] == [{"_id": 1, "f": 2}, {"_id": 3, "a": 0}]


def test_errors_are_the_sync_clients(broker: Any, collection_name: str, mongo_collection: Any) -> None:
    mongo_collection.insert_many([{"_id": 1, "s": "text"}, {"_id": 2}])

    async def main() -> None:
        async with AsyncBrokerClient(broker.unix_target) as client:
            items = client[broker.db_name][collection_name]
            with pytest.raises(ValueError, match=r"update only works with \$ operators"):
                await items.update_one({}, {"s": 1})
            with pytest.raises(ValueError, match=r"replacement can not include \$ operators"):
                await items.replace_one({}, {"$set": {"s": 1}})
            with pytest.raises(WriteError) as mismatch:
                await items.update_one({"_id": 1}, {"$inc": {"s": 1}})
            assert mismatch.value.details["code"] == 14
            with pytest.raises(DuplicateKeyError):
                await items.update_one({"_id": 2, "x": 1}, {"$set": {"y": 1}}, upsert=True)
            with pytest.raises(BulkWriteError) as bulk:
                await items.bulk_write(
                    [InsertOne({"_id": 3}), InsertOne({"_id": 1}), InsertOne({"_id": 4})], ordered=False
                )
            assert [e["index"] for e in bulk.value.details["writeErrors"]] == [1]
            assert bulk.value.details["nInserted"] == 2
            with pytest.raises(UnknownDatabase):
                await client["no_such_db"]["c"].count_documents({})

    run(main())
    assert [d["_id"] for d in _stored(mongo_collection)] == [1, 2, 3, 4]


@pytest.fixture
def fake_target(tmp_path: Path) -> Any:
    servicer = _FakeBroker()  # type: ignore[abstract]  # the rest is the base servicer's
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    target = f"unix://{tmp_path}/fake.sock"
    server.add_insecure_port(target)
    server.start()
    yield servicer, target
    server.stop(0)


def test_writes_are_sent_once_and_reads_retried(fake_target: Any) -> None:
    servicer, target = fake_target

    async def main() -> None:
        async with AsyncBrokerClient(target, timeout=10) as client:
            items = client["appdb"]["items"]
            servicer.fail("Update", _unavailable())
            with pytest.raises(ServerSelectionTimeoutError) as info:
                await items.update_many({}, {"$set": {"a": 1}})
            assert info.value.attempts == 1 and len(servicer.calls["Update"]) == 1
            servicer.fail("BulkWrite", _unavailable())
            with pytest.raises(ServerSelectionTimeoutError):
                await items.bulk_write([DeleteOne({})])
            assert len(servicer.calls["BulkWrite"]) == 1
            servicer.fail("Count", _unavailable())
            assert await items.count_documents({}) == 42 and len(servicer.calls["Count"]) == 2
            assert await items.distinct("a") == [1, 2, "three"]
            servicer.fail("Aggregate", _unavailable())
            cursor = await items.aggregate([{"$match": {}}])
            assert cursor.attempts == 2 and len(await cursor.to_list()) == 6
            servicer.fail("Aggregate", _unavailable())
            with pytest.raises(ServerSelectionTimeoutError):
                await items.aggregate([{"$out": "copy"}])

    run(main())
