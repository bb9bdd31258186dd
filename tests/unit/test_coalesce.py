"""Coalescing groups and `_id` matching, without a server."""

from __future__ import annotations

import asyncio

import bson
import pytest
from bson import Int64, ObjectId
from pymongo.errors import BulkWriteError

from broker import coalesce, documents
from broker.errors import RpcError


def _member(item: object = None, size: int = 10) -> coalesce.Member[object]:
    return coalesce.Member(item, size, remaining=lambda: 5.0)


def test_calls_join_the_open_group_until_it_is_full():
    async def run() -> None:
        co = coalesce.Coalescer(max_calls=3, max_bytes=1000)
        group = co.lead("k", _member("a"))
        assert co.join("k", _member("b"))
        assert co.join("k", _member("c"))
        assert not co.join("k", _member("d"))  # full: the next caller leads its own
        assert not co.join("other", _member("e"))  # another key has no group
        members = co.close(group)
        assert [m.item for m in members] == ["a", "b", "c"]
        assert (co.round_trips, co.calls) == (1, 3)
        assert not co.join("k", _member("f"))  # closed

    asyncio.run(run())


def test_groups_are_bounded_in_bytes():
    async def run() -> None:
        co = coalesce.Coalescer(max_calls=100, max_bytes=25)
        co.lead("k", _member(size=10))
        assert co.join("k", _member(size=10))
        assert not co.join("k", _member(size=10))

    asyncio.run(run())


def test_a_lone_leader_is_not_counted_as_coalesced():
    async def run() -> None:
        co = coalesce.Coalescer(max_calls=10, max_bytes=1000)
        assert len(co.close(co.lead("k", _member()))) == 1
        assert (co.round_trips, co.calls) == (0, 0)

    asyncio.run(run())


def test_a_member_that_left_is_left_out_and_an_abandoned_group_sends_followers_alone():
    async def run() -> None:
        co = coalesce.Coalescer(max_calls=10, max_bytes=1000)
        leader, gone, waiting = _member("a"), _member("b"), _member("c")
        group = co.lead("k", leader)
        co.join("k", gone)
        co.join("k", waiting)
        gone.answer.cancel()
        assert [m.item for m in co.close(group)] == ["a", "c"]
        second = co.lead("k", _member("x"))
        follower = _member("y")
        co.join("k", follower)
        co.abandon(second)
        assert follower.answer.result() is coalesce.ALONE

    asyncio.run(run())


def test_each_member_gets_its_own_outcome_and_its_own_deadline():
    async def run() -> None:
        members = [_member("a"), _member("b")]
        error = RpcError.__new__(RpcError)
        coalesce.deliver(members, ["doc", error])
        assert await coalesce.answer_of(members[0], 1.0) == "doc"
        with pytest.raises(RpcError):
            await coalesce.answer_of(members[1], 1.0)
        late = _member("c")
        with pytest.raises(TimeoutError):
            await coalesce.answer_of(late, 0.01)
        assert late.gone  # left out of its group from now on

    asyncio.run(run())


def test_a_write_error_belongs_to_its_own_member_only():
    error = BulkWriteError(
        {
            "writeErrors": [{"index": 1, "code": 11000, "errmsg": "dup"}],
            "writeConcernErrors": [],
            "nInserted": 2,
        }
    )
    outcomes = coalesce._insert_outcomes(error, 3, "appdb")
    assert outcomes[0] is None and outcomes[2] is None
    own = outcomes[1]
    assert isinstance(own, RpcError)
    assert own.metadata["failed_index"] == "0" and own.metadata["inserted_count"] == "0"
    assert own.reason == "DUPLICATE_KEY"


@pytest.mark.parametrize(
    ("filter_", "coalescible"),
    [
        ({"_id": ObjectId()}, True),
        ({"_id": "key-1"}, True),
        ({"_id": 7}, True),
        ({"_id": Int64(7)}, True),
        ({"_id": 1.5}, False),
        ({"_id": {"$gt": 1}}, False),
        ({"_id": 1, "a": 2}, False),
        ({"a": 1}, False),
        ({}, False),
    ],
)
def test_only_one_id_equality_of_a_comparable_type_is_a_lookup(filter_, coalescible):
    assert (documents.id_lookup(bson.encode(filter_)) is not None) is coalescible


def test_stored_ids_match_lookups_by_value():
    int_lookup = documents.id_lookup(bson.encode({"_id": 5}))
    assert int_lookup is not None
    for stored in ({"_id": Int64(5)}, {"_id": 5.0}, {"x": 1, "_id": 5}):
        assert documents.id_key(bson.encode(stored)) == int_lookup.key, stored
    text = documents.id_lookup(bson.encode({"_id": "a"}))
    assert text is not None and documents.id_key(bson.encode({"_id": "A"})) != text.key


def test_the_in_filter_is_the_bson_pymongo_would_write():
    ids = [ObjectId(), "k", 3, Int64(4)]
    lookups = [documents.id_lookup(bson.encode({"_id": i})) for i in ids]
    assert all(lookups)
    made = documents.in_filter([lookup.element for lookup in lookups if lookup])
    assert made == bson.encode({"_id": {"$in": ids}})
