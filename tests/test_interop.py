"""Cross-language interop: what one client writes, the others read back exactly.

Each of Python (``broker_client``), Go (``clients/go/cmd/interop``) and Node
(``clients/node/interop.js``) writes the same logical document, built from
that language's own natural values, through the broker. Every other language
reads it back through the broker, decodes it into its own values and prints
it as canonical Extended JSON. Here the result is encoded again with
Python's ``bson`` and compared with the expected document byte for byte, so
every type and value must survive: Int64 stays Int64 (even 5), int32 stays
int32, a double stays a double (even 3.0), Binary keeps its subtype,
ObjectIds are equal, datetimes equal to the millisecond, field order kept.

Also: a duplicate key surfaces in each language as its natural error,
carrying the gRPC code ALREADY_EXISTS (6).

FerretDB, the default test server, lacks Decimal128; that variant is marked
``mongod`` and runs only against a real MongoDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
import grpc
import pytest
from broker_client import BrokerClient, DuplicateKeyError
from bson import json_util
from bson.binary import Binary
from bson.codec_options import CodecOptions
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from tests.toolchains import GO_DIR, NODE_DIR, build_go_program, require_grpc_js, tool

LANGUAGES = ("python", "go", "node")
PAIRS = [(writer, reader) for writer in LANGUAGES for reader in LANGUAGES if reader != writer]
HELPER_TIMEOUT_S = 120

Document = dict[str, Any]


def fixture_document(writer: str, *, decimal: bool = False) -> Document:
    """What every writer writes, in Python's terms; the helpers build the same.

    No nested arrays, NaN, -0 or Decimal128 (unless asked): FerretDB lacks them.
    """
    document: Document = {
        "writer": writer,
        "s": "héllo wörld ✓",
        "i32": 42,
        "i32neg": -7,
        "i64": Int64(2**40 + 1),
        "i64small": Int64(5),
        "i64neg": Int64(-(2**53 + 1)),
        "dbl": 2.5,
        "dblint": 3.0,
        "dblneg": -0.125,
        "t": True,
        "f": False,
        "n": None,
        "oid": ObjectId("64b7f0c2a1b2c3d4e5f60718"),
        "date": datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=UTC),
        "predate": datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC),
        "bin": Binary(b"\x00\x01\x02\xff", 0x80),
        "uuid": Binary(bytes.fromhex("0123456789abcdef0123456789abcdef"), 4),
        "bin0": b"raw bytes",
        "nested": {
            "a": 1,
            "b": {"c": "deep", "d": Int64(9), "e": 1.5},
            "list": [1, "two", 3.5, {"x": Int64(4)}, True],
        },
        "arr": [Int64(10), 11, 12.0],
        "empty": {},
        "emptyarr": [],
    }
    if decimal:
        document["dec"] = Decimal128("1234.5678901234567890")
    return document


def typed(value: Any) -> Any:
    """A value with the BSON type of every leaf spelled out, for readable diffs."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, bytes) and not isinstance(value, Binary):
        value = Binary(value, 0)
    if isinstance(value, Binary):
        return ("Binary", value.subtype, bytes(value).hex())
    if isinstance(value, datetime):
        return ("datetime", value.replace(tzinfo=None).isoformat(timespec="milliseconds"))
    return (type(value).__name__, value)


def assert_exact(actual_bson: bytes, expected: Document, where: str) -> None:
    """``actual_bson`` is ``expected`` exactly: same bytes, so same types and values."""
    expected_bson = bson.encode(expected)
    if actual_bson == expected_bson:
        return
    actual = bson.decode(actual_bson)
    # The typed views make pytest's diff name the field and the type.
    assert typed(actual) == typed(bson.decode(expected_bson)), where
    pytest.fail(f"{where}: same values and types, yet different BSON:\n{actual_bson!r}\n{expected_bson!r}")


# --- the three languages --------------------------------------------------------


def run_helper(argv: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """Run an interop helper; its stdout lines. A failure shows its stderr."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=HELPER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def load_canonical(line: str) -> Document:
    loaded: Document = json_util.loads(line, json_options=json_util.CANONICAL_JSON_OPTIONS)
    return loaded


class Language:
    """One language's side: write the fixture, read documents, provoke a duplicate."""

    name: str

    def write(self, collection: str, *, decimal: bool = False) -> Any:
        """Insert the fixture without an _id; return the _id the client made."""
        raise NotImplementedError

    def read(self, collection: str, writer: str) -> list[bytes]:
        """The writer's documents as this language decoded them, re-encoded as BSON."""
        raise NotImplementedError

    def dup(self, collection: str) -> Document:
        """Insert one _id twice; what the language's error said."""
        raise NotImplementedError

    def modify(self, collection: str, writer: str, modifier: str) -> Document:
        """update_many the writer's documents: $set modified_by, $inc i32; {"matched", "modified"}."""
        raise NotImplementedError

    def aggregate(self, collection: str, writer: str) -> list[Document]:
        """$match the writer's documents, $project writer, modified_by and i32."""
        raise NotImplementedError

    def count(self, collection: str, writer: str) -> int:
        raise NotImplementedError

    def delete(self, collection: str, writer: str) -> int:
        """delete_many the writer's documents; how many went."""
        raise NotImplementedError


class PythonSide(Language):
    name = "python"

    def __init__(self, client: BrokerClient[Document], database: str) -> None:
        self.client = client
        self.database = database

    def write(self, collection: str, *, decimal: bool = False) -> Any:
        document = fixture_document("python", decimal=decimal)
        return self.client[self.database][collection].insert_one(document).inserted_id

    def read(self, collection: str, writer: str) -> list[bytes]:
        found = self.client[self.database][collection].find({"writer": writer}, sort=[("_id", 1)])
        return [bson.encode(document) for document in found]

    def dup(self, collection: str) -> Document:
        items = self.client[self.database][collection]
        items.insert_one({"_id": "dup-python", "writer": "python"})
        with pytest.raises(DuplicateKeyError) as caught:
            items.insert_one({"_id": "dup-python", "writer": "python"})
        error = caught.value
        assert error.code is not None
        return {
            "is_duplicate_key": isinstance(error, DuplicateKeyError),
            "class": type(error).__name__,
            "code": error.code.value[0],
            "code_name": error.code.name,
            "status_code": error.code,
            "reason": error.reason,
            "mongo_code": error.mongo_code,
        }

    def modify(self, collection: str, writer: str, modifier: str) -> Document:
        result = self.client[self.database][collection].update_many(
            {"writer": writer}, {"$set": {"modified_by": modifier}, "$inc": {"i32": 1}}
        )
        return {"matched": result.matched_count, "modified": result.modified_count}

    def aggregate(self, collection: str, writer: str) -> list[Document]:
        pipeline: list[Document] = [
            {"$match": {"writer": writer}},
            {"$project": {"_id": 0, "writer": 1, "modified_by": 1, "i32": 1}},
        ]
        return list(self.client[self.database][collection].aggregate(pipeline))

    def count(self, collection: str, writer: str) -> int:
        return self.client[self.database][collection].count_documents({"writer": writer})

    def delete(self, collection: str, writer: str) -> int:
        return self.client[self.database][collection].delete_many({"writer": writer}).deleted_count


class HelperSide(Language):
    """A language driven through its interop helper program."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.env = env

    def _run(self, *args: str) -> list[str]:
        return run_helper([*self.argv, *args], self.cwd, self.env)

    def write(self, collection: str, *, decimal: bool = False) -> Any:
        (line,) = self._run("write", collection, *(["--decimal"] if decimal else []))
        return load_canonical(line)["inserted_id"]

    def read(self, collection: str, writer: str) -> list[bytes]:
        return [bson.encode(load_canonical(line)) for line in self._run("read", collection, writer)]

    def dup(self, collection: str) -> Document:
        (line,) = self._run("dup", collection)
        seen: Document = json.loads(line)
        return seen

    def modify(self, collection: str, writer: str, modifier: str) -> Document:
        (line,) = self._run("modify", collection, writer, modifier)
        result: Document = json.loads(line)
        return result

    def aggregate(self, collection: str, writer: str) -> list[Document]:
        return [load_canonical(line) for line in self._run("aggregate", collection, writer)]

    def count(self, collection: str, writer: str) -> int:
        (line,) = self._run("count", collection, writer)
        return int(json.loads(line)["count"])

    def delete(self, collection: str, writer: str) -> int:
        (line,) = self._run("delete", collection, writer)
        return int(json.loads(line)["deleted"])


@pytest.fixture(scope="module")
def helper_env(broker) -> dict[str, str]:
    return {**os.environ, "MONGO_BROKER_TARGET": broker.unix_target, "MONGO_BROKER_DATABASE": broker.db_name}


@pytest.fixture(scope="module")
def go_interop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go helper, built once."""
    return build_go_program(tmp_path_factory, "interop")


@pytest.fixture(scope="module")
def languages(broker, helper_env, go_interop) -> Iterator[dict[str, Language]]:
    node = tool("node")
    require_grpc_js()
    client = BrokerClient(broker.unix_target, timeout=30)
    try:
        yield {
            "python": PythonSide(client, broker.db_name),
            "go": HelperSide("go", [str(go_interop)], GO_DIR, helper_env),
            "node": HelperSide("node", [node, str(NODE_DIR / "interop.js")], NODE_DIR, helper_env),
        }
    finally:
        client.close()


@pytest.fixture(scope="module")
def direct(broker) -> Iterator[Callable[[str], Any]]:
    """``direct(name)``: a collection of the broker's MongoDB database, read with pymongo."""
    client: MongoClient[Document] = MongoClient(broker.mongo_uri)
    used: list[str] = []

    def collection(name: str) -> Any:
        used.append(name)
        return client[broker.mongo_db][name]

    try:
        yield collection
    finally:
        for name in used:
            client[broker.mongo_db].drop_collection(name)
        client.close()


def write_all(languages: dict[str, Language], collection: str, *, decimal: bool = False) -> dict[str, Any]:
    ids = {name: side.write(collection, decimal=decimal) for name, side in languages.items()}
    for name, inserted_id in ids.items():
        assert isinstance(inserted_id, ObjectId), (
            f"{name} returned {inserted_id!r}, not a client-made ObjectId"
        )
    assert len(set(ids.values())) == len(ids), f"writers made the same _id: {ids}"
    return ids


def expected_document(writer: str, inserted_id: Any, *, decimal: bool = False) -> Document:
    return {"_id": inserted_id, **fixture_document(writer, decimal=decimal)}


# --- the matrix -----------------------------------------------------------------


@pytest.fixture(scope="module")
def written(languages, direct) -> tuple[str, dict[str, Any]]:
    """One collection with the fixture written once by each language."""
    name = f"interop_{uuid.uuid4().hex[:8]}"
    direct(name)  # dropped after the module
    return name, write_all(languages, name)


@pytest.mark.parametrize("writer", LANGUAGES)
def test_each_writer_stores_exact_types(writer, written, direct, record_property):
    # Read past the broker and every client: what MongoDB holds.
    collection, ids = written
    stored = direct(collection).with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    (raw,) = list(stored.find({"writer": writer}))
    assert_exact(raw.raw, expected_document(writer, ids[writer]), f"{writer} wrote, MongoDB holds")
    record_property("interop_stored", f"{writer}: exact")


@pytest.mark.parametrize(("writer", "reader"), PAIRS, ids=[f"{w}-to-{r}" for w, r in PAIRS])
def test_reader_sees_writer_document_exactly(writer, reader, written, languages, record_property):
    collection, ids = written
    found = languages[reader].read(collection, writer)
    assert len(found) == 1, f"{reader} read {len(found)} documents written by {writer}"
    assert_exact(found[0], expected_document(writer, ids[writer]), f"{writer} wrote, {reader} read")
    record_property("interop_matrix", f"{writer} -> {reader}: exact")


@pytest.mark.mongod
def test_decimal128_crosses_every_language(broker, languages, direct, record_property):
    name = f"interop_dec_{uuid.uuid4().hex[:8]}"
    direct(name)
    ids = write_all(languages, name, decimal=True)
    for writer, reader in PAIRS:
        found = languages[reader].read(name, writer)
        assert len(found) == 1, f"{reader} read {len(found)} documents written by {writer}"
        expected = expected_document(writer, ids[writer], decimal=True)
        assert_exact(found[0], expected, f"{writer} wrote, {reader} read (Decimal128)")
    record_property("interop_decimal128", "exact in every pair")


# --- update, aggregate, count and delete across languages ---------------------------


@pytest.mark.parametrize(("modifier", "reader"), PAIRS, ids=[f"{m}-to-{r}" for m, r in PAIRS])
def test_a_change_made_in_one_language_is_read_in_another(
    modifier, reader, languages, direct, record_property
):
    """The reader writes the fixture, the modifier updates it, the reader aggregates and counts it,
    the modifier deletes it: every step through the broker, each language's values exact."""
    name = f"interop_mod_{uuid.uuid4().hex[:8]}"
    direct(name)
    languages[reader].write(name)
    assert languages[modifier].modify(name, reader, modifier) == {"matched": 1, "modified": 1}
    rows = languages[reader].aggregate(name, reader)
    assert len(rows) == 1, rows
    assert_exact(
        bson.encode(rows[0]),
        {"writer": reader, "i32": 43, "modified_by": modifier},
        f"{modifier} -> {reader}",
    )
    assert languages[modifier].count(name, reader) == 1
    assert languages[modifier].delete(name, reader) == 1
    assert languages[reader].count(name, reader) == 0
    assert direct(name).count_documents({}) == 0
    record_property("interop_modify", f"{modifier} -> {reader}: exact")


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
def test_duplicate_key_is_each_language_natural_error(language, languages, collection_name, record_property):
    seen = languages[language].dup(collection_name)
    natural = {
        "python": ("DuplicateKeyError", "ALREADY_EXISTS"),  # broker_client.DuplicateKeyError
        "go": (None, "AlreadyExists"),  # *broker.Error, broker.IsDuplicateKey, codes.AlreadyExists
        "node": ("DuplicateKeyError", "ALREADY_EXISTS"),  # BrokerError subclass, code 6
    }[language]
    assert seen["is_duplicate_key"] is True, seen
    assert seen["code"] == grpc.StatusCode.ALREADY_EXISTS.value[0] == 6, seen
    assert seen["code_name"] == natural[1], seen
    if natural[0] is not None:
        assert seen["class"] == natural[0], seen
    if language == "python":
        assert seen["status_code"] is grpc.StatusCode.ALREADY_EXISTS
    assert seen["reason"] == "DUPLICATE_KEY", seen
    assert seen["mongo_code"] == 11000, seen
    record_property("interop_duplicate_key", f"{language}: {natural[0] or '*broker.Error'} code 6")
