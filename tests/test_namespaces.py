"""Collection names end to end: MongoDB's documented restrictions, checked by the broker for
every call; writes to system.* only where the database allows them (the rule itself:
tests/unit/test_collection_names.py)."""

from __future__ import annotations

import contextlib
import uuid

import bson
import grpc
import pytest
from pymongo.errors import PyMongoError

from tests.rpc import fails, find_all, find_one, open_stub, pb


def _insert(stub, collection: str, database: str = "appdb"):
    return stub.Insert(
        pb.InsertRequest(database=database, collection=collection, documents=[bson.encode({"a": 1})]),
        timeout=10,
    )


@pytest.mark.parametrize(
    ("name", "rule"),
    [("$cmd", "must not contain '$'"), ("a\x00b", "NUL character"), ("x" * 256, "longer than 255 bytes")],
    ids=["$cmd", "nul", "too-long"],
)
def test_bad_names_are_invalid_argument_for_every_call(broker, name, rule):
    with open_stub(broker.unix_target) as stub:
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
            _insert(stub, name)
        assert rule in failure.message
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
            find_all(stub, database="appdb", collection=name)
        assert rule in failure.message
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") as failure:
            find_one(stub, database="appdb", collection=name)
        assert rule in failure.message


def test_system_collections_refuse_writes_but_allow_reads(broker, mongo):
    with open_stub(broker.unix_target) as stub:
        for name in ("system.js", "system.views", "system.profile"):
            with fails(grpc.StatusCode.PERMISSION_DENIED, "NOT_AUTHORIZED") as failure:
                _insert(stub, name)
            assert f"collection {name!r} is a system collection" in failure.message
            assert "databases.appdb.allow_system_writes" in failure.message
        # Reads of system.* are the server's business (here: an empty result).
        documents, _ = find_all(stub, database="appdb", collection="system.js")
        assert documents == []
    assert mongo[broker.mongo_db]["system.js"].count_documents({"a": 1}) == 0


def test_allow_system_writes_lets_writes_through_to_the_server(start_broker, mongo):
    config = start_broker.base_config(allow_system_writes=True)
    proc = start_broker(config)
    marker = uuid.uuid4().hex
    try:
        with open_stub(proc.unix_target) as stub:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb", collection="system.js", documents=[bson.encode({"_id": marker})]
                ),
                timeout=10,
            )
        assert mongo["broker_test"]["system.js"].count_documents({"_id": marker}) == 1
    finally:
        with contextlib.suppress(PyMongoError):
            mongo["broker_test"]["system.js"].delete_many({"_id": marker})
