"""Extended JSON as the document encoding, for clients without BSON (grpcurl, scripts)."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import bson
import grpc
import pytest
from bson import Binary, Int64, ObjectId, json_util

from tests.rpc import fails, find_all, open_stub, pb

TOOLS = Path(__file__).resolve().parent.parent / ".tools" / "bin"
CANONICAL = pb.ENCODING_CANONICAL_JSON
RELAXED = pb.ENCODING_RELAXED_JSON


def _grpcurl() -> str:
    path = TOOLS / "grpcurl" if (TOOLS / "grpcurl").exists() else shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl not found: run `make tools`", pytrace=False)
    return str(path)


def _call(target: str, method: str, body: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_grpcurl(), "-plaintext", "-d", json.dumps(body), target, f"broker.v1.Broker/{method}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_grpcurl_inserts_and_finds_with_extended_json(broker, collection_name, mongo):
    inserted = _call(
        broker.unix_target,
        "Insert",
        {
            "database": "appdb",
            "collection": collection_name,
            "encoding": "ENCODING_RELAXED_JSON",
            "jsonDocuments": [
                '{"sku": "a1", "qty": 5, "when": {"$date": "2024-02-29T12:00:00Z"}}',
                '{"_id": 7, "sku": "b2", "qty": {"$numberLong": "9000000000"}}',
            ],
        },
    )
    assert inserted.returncode == 0, inserted.stderr
    reply = json.loads(inserted.stdout)
    assert reply["inserted_count"] == "2", reply
    ids = [json.loads(text)["_id"] for text in reply["inserted_ids_json"]]
    assert "$oid" in ids[0] and ids[1] == 7
    # What landed has real BSON types, not strings.
    stored = mongo["broker_test"][collection_name].find_one({"_id": 7})
    assert type(stored["qty"]) is Int64 and stored["qty"] == 9_000_000_000

    found = _call(
        broker.unix_target,
        "Find",
        {
            "database": "appdb",
            "collection": collection_name,
            "encoding": "ENCODING_CANONICAL_JSON",
            "filterJson": '{"qty": {"$gt": 1}}',
            "sortJson": '{"sku": 1}',
        },
    )
    assert found.returncode == 0, found.stderr
    docs = [json.loads(t) for line in _messages(found.stdout) for t in line["json_documents"]]
    assert [d["sku"] for d in docs] == ["a1", "b2"]
    assert docs[0]["qty"] == {"$numberInt": "5"}  # canonical keeps the int32
    assert docs[1]["qty"] == {"$numberLong": "9000000000"}
    assert docs[0]["when"] == {"$date": {"$numberLong": str(1709208000000)}}


def _messages(stdout: str) -> list[dict]:
    decoder = json.JSONDecoder()
    messages, index = [], 0
    text = stdout.strip()
    while index < len(text):
        message, end = decoder.raw_decode(text, index)
        messages.append(message)
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return messages


def test_json_round_trip_keeps_types_both_ways(broker, collection_name):
    document = {
        "_id": ObjectId(),
        "n32": 7,
        "n64": Int64(7),
        "f": 7.0,
        "bin": Binary(b"\x01\x02", 0x80),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, 678000),
        "nested": {"list": [1, "x", {"y": None}]},
    }
    with open_stub(broker.unix_target) as stub:
        text = json_util.dumps(document, json_options=json_util.CANONICAL_JSON_OPTIONS)
        reply = stub.Insert(
            pb.InsertRequest(
                database="appdb", collection=collection_name, encoding=CANONICAL, json_documents=[text]
            )
        )
        assert json_util.loads(reply.inserted_ids_json[0])["_id"] == document["_id"]
        # Read back as BSON: exact types.
        (back,), _ = find_all(stub, database="appdb", collection=collection_name)
        assert back == document
        assert type(back["n64"]) is Int64 and type(back["n32"]) is int and type(back["f"]) is float
        # Read back as relaxed JSON.
        (message,) = stub.Find(pb.FindRequest(database="appdb", collection=collection_name, encoding=RELAXED))
        relaxed = json.loads(message.json_documents[0])
        assert relaxed["n32"] == 7 and relaxed["f"] == 7.0 and relaxed["bin"]["$binary"]["subType"] == "80"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"encoding": RELAXED, "filter_json": '{"a": 1'}, "filter_json is not valid JSON at line 1 column 8"),
        ({"encoding": RELAXED, "filter_json": '{\n "a": 1,\n}'}, "at line 3 column 1"),
        ({"encoding": RELAXED, "filter_json": "[1, 2]"}, "filter_json must be a JSON object"),
        ({"encoding": RELAXED, "filter_json": '{"_id": {"$oid": "zz"}}'}, "not valid Extended JSON"),
        ({"encoding": RELAXED, "sort_json": '{"a": "up"}'}, "sort.a: must be 1, -1"),
        ({"encoding": RELAXED, "filter": bson.encode({"a": 1})}, "hold BSON but encoding is Extended JSON"),
        ({"filter_json": '{"a": 1}'}, "read only with encoding"),
        ({"encoding": 99}, "unknown encoding 99"),
    ],
)
def test_bad_json_requests_say_where(broker, collection_name, fields, needle):
    with open_stub(broker.unix_target) as stub, fails(grpc.StatusCode.INVALID_ARGUMENT) as failure:
        list(stub.Find(pb.FindRequest(database="appdb", collection=collection_name, **fields), timeout=10))
    assert needle in failure.message


def test_bad_json_documents_are_rejected_and_nothing_is_stored(broker, collection_name, mongo):
    with open_stub(broker.unix_target) as stub:
        with fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_JSON") as failure:
            stub.Insert(
                pb.InsertRequest(
                    database="appdb",
                    collection=collection_name,
                    encoding=RELAXED,
                    json_documents=['{"ok": 1}', '{"broken": }'],
                )
            )
        assert "json_documents[1] is not valid JSON at line 1 column 12" in failure.message
        with fails(grpc.StatusCode.INVALID_ARGUMENT):
            stub.Insert(
                pb.InsertRequest(database="appdb", collection=collection_name, json_documents=['{"a": 1}'])
            )
    assert mongo["broker_test"][collection_name].count_documents({}) == 0
