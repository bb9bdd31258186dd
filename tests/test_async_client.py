"""AsyncBrokerClient against a live broker: BrokerClient's API, awaitable, on grpc.aio.

Besides the calls themselves: the channel is made lazily in the running
loop and refused from another loop; forking follows the rules measured in
broker_client/_channel.py (a child never touches the parent's aio channel;
a child of a parent with an open aio channel is refused clearly instead of
crashing). The fork scenarios run in a fresh interpreter each, so that no
aio channel left alive elsewhere in the test session can change them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest
from broker_client import (
    AsyncBrokerClient,
    AsyncCollection,
    AsyncCursor,
    AsyncDatabase,
    BrokerClient,
    Collection,
    Cursor,
    Database,
    DuplicateKeyError,
    ExecutionTimeout,
    InsertManyResult,
    InsertOneResult,
    InvalidOperation,
    PingResult,
    ServerSelectionTimeoutError,
    UnknownDatabase,
)
from bson import ObjectId
from bson.son import SON

Doc = dict[str, Any]
_T = TypeVar("_T")
CHILD_TIMEOUT_S = 60


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@pytest.fixture(params=["unix", "tcp"])
def target(request: pytest.FixtureRequest, broker: Any) -> str:
    return str(broker.unix_target if request.param == "unix" else broker.tcp_target)


# --- the API is BrokerClient's -------------------------------------------------------


def _async_twin(annotation: Any) -> Any:
    """A sync return annotation with each of the sync classes named as its async twin."""
    if not isinstance(annotation, str):
        return annotation
    return re.sub(r"\b(BrokerClient|Database|Collection|Cursor)\b", r"Async\1", annotation)


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (BrokerClient, AsyncBrokerClient),
        (Database, AsyncDatabase),
        (Collection, AsyncCollection),
        (Cursor, AsyncCursor),
    ],
)
def test_the_async_api_mirrors_the_sync_one(sync_cls: type, async_cls: type) -> None:
    def public(cls: type) -> dict[str, Any]:
        return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}

    sync_api, async_api = public(sync_cls), public(async_cls)
    assert set(sync_api) == set(async_api)
    for name, sync_member in sync_api.items():
        async_member = async_api[name]
        if isinstance(sync_member, property):
            assert isinstance(async_member, property), name
            continue
        # The same parameters, and the same result, where a sync class's
        # twin stands for it (get_database gives an AsyncDatabase).
        sync_signature = inspect.signature(sync_member)
        assert sync_signature.replace(return_annotation=_async_twin(sync_signature.return_annotation)) == (
            inspect.signature(async_member)
        ), name
        # What waits on the broker is awaitable; building a cursor is not.
        waits = name in {
            "insert_one", "insert_many", "find_one", "ping", "stats", "close", "next", "to_list",
            "update_one", "update_many", "replace_one", "delete_one", "delete_many",
            "find_one_and_update", "find_one_and_replace", "find_one_and_delete",
            "count_documents", "estimated_document_count", "distinct", "bulk_write",
            # As in pymongo's async API: the command runs, and its first batch arrives, on await.
            "aggregate",
        }  # fmt: skip
        assert inspect.iscoroutinefunction(async_member) == waits, name
    # The protocols: with/async with, for/async for.
    assert hasattr(AsyncBrokerClient, "__aenter__")
    assert hasattr(AsyncCursor, "__aiter__")
    assert hasattr(AsyncCursor, "__anext__")


def test_importing_it_imports_neither_grpc_nor_asyncio() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from broker_client import AsyncBrokerClient
        client = AsyncBrokerClient("127.0.0.1:1")
        client["appdb"]["items"].find({"a": 1})
        print(json.dumps({m: m in sys.modules for m in ("grpc", "asyncio", "pymongo")}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == {"grpc": False, "asyncio": False, "pymongo": False}


# --- calls ---------------------------------------------------------------------------


def test_inserts_finds_pings_and_stats(target: str, broker: Any, collection_name: str, mongo: Any) -> None:
    async def main() -> None:
        async with AsyncBrokerClient(target) as client:
            items = client[broker.db_name][collection_name]
            doc: Doc = {"sku": "a1", "qty": 5}
            one = await items.insert_one(doc)
            assert isinstance(one, InsertOneResult)
            assert isinstance(doc["_id"], ObjectId)
            assert (one.inserted_id, one.attempts) == (doc["_id"], 1)
            many = await items.insert_many([{"sku": f"b{n}", "qty": n} for n in range(20)] + [{"_id": 7}])
            assert isinstance(many, InsertManyResult)
            assert many.inserted_ids[-1] == 7
            assert await items.find_one(doc["_id"]) == doc
            assert await items.find_one({"sku": "nope"}) is None

            cursor = items.find({"qty": {"$gte": 3}}, projection={"sku": 1, "_id": 0}, sort=[("qty", -1)])
            assert isinstance(cursor, AsyncCursor)
            assert cursor.retrieved == 0  # lazy: nothing sent yet
            found = [d async for d in cursor]
            assert found[:2] == [{"sku": "b19"}, {"sku": "b18"}]
            assert len(found) == 18  # 17 b's from 3 to 19, and a1
            assert not cursor.alive
            assert cursor.attempts == 1

            assert len(await items.find({}, batch_size=4).to_list()) == 22
            assert len(await items.find({}, batch_size=4).to_list(5)) == 5
            assert await items.find({}, sort="qty", limit=1).next() == {"_id": 7}

            ping = await client.ping()
            assert isinstance(ping, PingResult)
            assert ping.ok
            assert (await client[broker.db_name].ping())[broker.db_name].ok
            stats = await client.stats(broker.db_name)
            assert stats[broker.db_name].max_pool_size == broker.max_pool_size

    run(main())
    assert mongo[broker.mongo_db][collection_name].count_documents({}) == 22


def test_a_closed_cursor_stops_and_cancels(broker: Any, collection_name: str) -> None:
    async def main() -> None:
        async with AsyncBrokerClient(broker.unix_target) as client:
            items = client[broker.db_name][collection_name]
            await items.insert_many([{"n": n} for n in range(100)])
            async with items.find({}, batch_size=10) as cursor:
                assert (await cursor.next())["n"] == 0
                assert cursor.alive
            assert not cursor.alive
            assert await cursor.to_list() == []
            await cursor.close()  # twice is fine

    run(main())


def test_errors_are_the_sync_clients(broker: Any, collection_name: str, tmp_path: Any) -> None:
    async def main() -> None:
        async with AsyncBrokerClient(broker.unix_target) as client:
            items = client[broker.db_name][collection_name]
            await items.insert_one({"_id": 1})
            with pytest.raises(DuplicateKeyError) as dup:
                await items.insert_one({"_id": 1})
            assert dup.value.code is grpc.StatusCode.ALREADY_EXISTS
            assert (dup.value.mongo_code, dup.value.failed_index, dup.value.attempts) == (11000, 0, 1)
            with pytest.raises(UnknownDatabase):
                await client["no_such_db"]["c"].find_one()
            with pytest.raises(ExecutionTimeout) as late:
                await items.find_one({}, timeout=1e-6)
            assert (late.value.code, late.value.attempts) == (grpc.StatusCode.DEADLINE_EXCEEDED, 0)
            with pytest.raises(UnknownDatabase):
                await client["no_such_db"]["c"].find({}).to_list()
            with pytest.raises(TypeError, match="non-empty"):
                await items.insert_many([])
        async with AsyncBrokerClient(str(tmp_path / "nobody.sock"), timeout=10) as nobody:
            with pytest.raises(ServerSelectionTimeoutError) as info:
                await nobody.ping()
            assert info.value.attempts == 3  # the default policy retried UNAVAILABLE

    run(main())


def test_many_concurrent_calls_share_one_channel(broker: Any, collection_name: str) -> None:
    async def main() -> int:
        async with AsyncBrokerClient(broker.unix_target) as client:
            items = client[broker.db_name][collection_name]

            async def one(n: int) -> None:
                oid = (await items.insert_one({"n": n})).inserted_id
                assert (await items.find_one(oid))["n"] == n  # type: ignore[index]

            # Fewer than the session broker's pool plus wait queue (10 + 50):
            # more would be refused with POOL_EXHAUSTED, as they should.
            await asyncio.gather(*(one(n) for n in range(40)))
            assert len(await items.find({}).to_list()) == 40
            return client._holder.channels_created

    assert run(main()) == 1


def test_document_class(broker: Any, collection_name: str) -> None:
    async def main() -> None:
        async with AsyncBrokerClient(broker.unix_target, document_class=SON) as client:
            items = client[broker.db_name][collection_name]
            await items.insert_one({"b": 1, "a": 2})
            doc = await items.find_one()
            assert isinstance(doc, SON)
            assert list(doc.keys()) == ["_id", "b", "a"]

    run(main())


# --- one event loop ------------------------------------------------------------------


def test_the_channel_is_made_in_the_running_loop_on_first_use(broker: Any) -> None:
    client = AsyncBrokerClient(broker.unix_target)
    assert client._holder.channel is None  # the constructor needs no loop and makes nothing

    async def main() -> None:
        assert client._holder.channel is None
        await client.ping()
        assert client._holder.channel is not None
        assert client._holder.loop is asyncio.get_running_loop()
        await client.close()
        assert client._holder.channel is None
        with pytest.raises(InvalidOperation, match="after close"):
            await client.ping()

    run(main())


def test_a_call_from_another_loop_is_refused_clearly(broker: Any) -> None:
    client = AsyncBrokerClient(broker.unix_target)
    runner = asyncio.Runner()
    try:
        assert runner.run(client.ping()).ok
        with pytest.raises(InvalidOperation, match="event loop") as info:
            run(client.ping())  # asyncio.run: a new loop
        assert "one AsyncBrokerClient per event loop" in str(info.value)
        # The first loop still works.
        assert runner.run(client.ping()).ok
    finally:
        runner.run(client.close())
        runner.close()


def test_close_from_another_loop_releases_the_channel(broker: Any) -> None:
    client = AsyncBrokerClient(broker.unix_target)
    run(client.ping())
    run(client.close())  # the first loop is gone; the channel is dropped, not awaited
    assert client._holder.channel is None
    assert client._holder.closed


# --- fork ----------------------------------------------------------------------------

_FORK_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading
    from broker_client import AsyncBrokerClient, BrokerClient, InvalidOperation

    scenario, target, database, collection = sys.argv[1:5]
    CHILDREN = 4

    async def use(client):
        items = client[database][collection]
        oid = (await items.insert_one({"pid": os.getpid()})).inserted_id
        assert (await items.find_one(oid))["pid"] == os.getpid()
        return (await client.ping()).ok

    def child(parent_client):
        report = {"pid": os.getpid()}
        if parent_client is not None:
            # The parent's channel was retired at fork, untouched.
            report["inherited_channel"] = parent_client._holder.channel is not None
        async def mine():
            async with AsyncBrokerClient(target) as c:
                return await use(c)
        try:
            report["async"] = asyncio.run(mine())
        except InvalidOperation as exc:
            report["async"] = "refused: " + str(exc)
        with BrokerClient(target) as c:
            report["sync"] = c[database][collection].find_one({"pid": -1}) is None
        if scenario == "unused":
            report["inherited_async"] = asyncio.run(use(parent_client))
        return report

    def fork_children(parent_client):
        pipes = []
        for _ in range(CHILDREN):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                status = 1
                try:
                    import signal
                    signal.alarm(50)
                    report = child(parent_client)
                    status = 0
                except BaseException as exc:
                    report = {"error": repr(exc)}
                os.write(w, json.dumps(report).encode())
                os._exit(status)
            os.close(w)
            pipes.append((pid, r))
        out = []
        for pid, r in pipes:
            _, status = os.waitpid(pid, 0)
            with os.fdopen(r) as f:
                text = f.read()
            report = json.loads(text) if text else {}
            report["exit"] = os.waitstatus_to_exitcode(status)
            out.append(report)
        return out

    client = AsyncBrokerClient(target)
    if scenario == "closed":
        async def parent():
            await use(client)
            await client.close()
        asyncio.run(parent())
    elif scenario == "open":
        asyncio.run(use(client))  # and left open
    children = fork_children(client)
    # The parent carries on: with its own channel if it kept one, else a new client.
    async def after():
        if scenario == "open":
            # Its channel belongs to the finished loop: refused, as anywhere.
            async with AsyncBrokerClient(target) as again:
                return await use(again)
        return await use(client if scenario == "unused" else AsyncBrokerClient(target))
    print(json.dumps({"children": children, "parent_after": asyncio.run(after())}))
    """
)


def _fork_scenario(scenario: str, broker: Any, collection_name: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, scenario, broker.unix_target, broker.db_name, collection_name],
        check=False,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S * 2,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# Python 3.12+ warns about forking a multi-threaded process, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")


@pytest.mark.parametrize("scenario", ["closed", "unused"])
def test_children_of_a_parent_without_an_open_aio_channel_use_asyncio(
    scenario: str, broker: Any, collection_name: str
) -> None:
    """Closed before the fork, or never used: every child's own async client works."""
    result = _fork_scenario(scenario, broker, collection_name)
    for report in result["children"]:
        assert report["exit"] == 0, report
        assert report["async"] is True, report
        assert report["sync"] is True, report
        assert report["inherited_channel"] is False, report
        if scenario == "unused":
            # The parent's lazy client made its channel in the child.
            assert report["inherited_async"] is True, report
    assert result["parent_after"] is True


def test_children_of_a_parent_with_an_open_aio_channel_are_refused_clearly(
    broker: Any, collection_name: str
) -> None:
    """grpc.aio cannot work in such a child: a clear InvalidOperation, not an abort or a hang.

    The child's sync client is unaffected, and the parent carries on.
    """
    result = _fork_scenario("open", broker, collection_name)
    for report in result["children"]:
        assert report["exit"] == 0, report
        assert report["inherited_channel"] is False, report  # retired, untouched
        assert report["async"].startswith("refused: "), report
        assert "await client.close()" in report["async"]
        assert report["sync"] is True, report
    assert result["parent_after"] is True


def test_a_parents_cursor_is_refused_in_a_child(broker: Any, collection_name: str) -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from broker_client import AsyncBrokerClient, InvalidOperation
        target, database, collection = sys.argv[1:4]
        client = AsyncBrokerClient(target)
        items = client[database][collection]
        cursor = items.find({})  # made, never started: nothing to retire
        pid = os.fork()
        if pid == 0:
            async def child():
                try:
                    await cursor.next()
                except InvalidOperation as exc:
                    return "before a fork" in str(exc)
                return False
            os._exit(0 if asyncio.run(child()) else 1)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, broker.unix_target, broker.db_name, collection_name],
        check=True,
        timeout=CHILD_TIMEOUT_S,
    )
