"""Queue-time coalescing: calls waiting for a connection ride along with the one that gets it.

When every connection of a database is busy, calls queue for a slot (see
admission.py). Compatible calls queued behind each other would each pay a
round trip of their own, one after another; instead the first of them (the
*leader*) waits for a slot, and calls that arrive meanwhile with the same
*key* join its group. When the leader's slot comes, the whole group goes out
as one operation (the caller-side rules are in `Group`):

- single-document Inserts on one collection, with the same write concern and
  bypass_document_validation: one unordered insert_many;
- FindOne lookups by `_id` equality on one collection, with the same
  projection and read options: one find of `{_id: {$in: [...]}}`.

It is off unless a database sets `coalesce_max_calls` (see its setting for
the measurement behind that default).

There are no timers: a call that finds a free slot goes alone at once, so a
lone caller never waits for company. Each member gets exactly its own answer
(its own write error, its own document or none) under its own deadline.
Groups are bounded in members and bytes; a full group takes no more, and the
next caller starts a group of its own in the queue.

A member whose deadline passes before its group goes out is left out of it.
One whose deadline passes while the group's operation runs gets
DEADLINE_EXCEEDED; an insert of it may then still be stored, and is
reported to nobody, as with any write whose caller left mid-flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pymongo.errors
from bson.raw_bson import RawBSONDocument

from broker import documents
from broker.errors import bulk_write_error

__all__ = [
    "ALONE",
    "COALESCE_MAX_BYTES",
    "Coalescer",
    "Group",
    "Member",
    "answer_of",
    "deliver",
    "fail_all",
    "find_by_ids",
    "insert_many",
]

log = logging.getLogger("mongo_broker.coalesce")

_I = TypeVar("_I")

# The documents of one coalesced round trip, at most: well under MongoDB's
# 48 MB message, so that pymongo sends the batch as one message.
COALESCE_MAX_BYTES = 8 * 1024 * 1024

# A member's future is resolved with this when its group will not go out (the
# leader got no slot, or left): the member then makes its own round trip.
ALONE: Any = object()


@dataclass(slots=True)
class Member(Generic[_I]):
    """One call in a group: what it asks, its size in bytes, and where its answer goes."""

    item: _I
    size: int
    answer: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Seconds left to the member's deadline when the group goes out.
    remaining: Callable[[], float] = lambda: 0.0

    @property
    def gone(self) -> bool:
        """The caller stopped waiting (deadline, cancellation): leave it out."""
        return self.answer.done()


class Group(Generic[_I]):
    """The calls that will go out as one operation, led by the first of them."""

    __slots__ = ("bytes", "key", "members")

    def __init__(self, key: Hashable, leader: Member[_I]) -> None:
        self.key = key
        self.members: list[Member[_I]] = [leader]
        self.bytes = leader.size

    def live(self) -> list[Member[_I]]:
        return [m for m in self.members if not m.gone]


class Coalescer:
    """One database's open groups, by key, and its coalescing counters."""

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self._open: dict[Hashable, Group[Any]] = {}
        # Round trips that carried more than one call, and the calls they carried.
        self.round_trips = 0
        self.calls = 0

    def join(self, key: Hashable, member: Member[_I]) -> bool:
        """Add ``member`` to the open group for ``key``; False if there is none with room."""
        group = self._open.get(key)
        if group is None:  # only open groups are kept by key
            return False
        if len(group.members) >= self.max_calls or group.bytes + member.size > self.max_bytes:
            # Full: it takes no more, and the next caller leads a group of its own.
            self._close(group)
            return False
        group.members.append(member)
        group.bytes += member.size
        return True

    def lead(self, key: Hashable, member: Member[_I]) -> Group[_I]:
        """Open a group for ``key`` with ``member`` as its leader (it then waits for a slot)."""
        group: Group[_I] = Group(key, member)
        self._open[key] = group
        return group

    def close(self, group: Group[_I]) -> list[Member[_I]]:
        """Take no more members; the ones still waiting, which go out now."""
        self._close(group)
        members = group.live()
        if len(members) > 1:
            self.round_trips += 1
            self.calls += len(members)
        return members

    def abandon(self, group: Group[Any]) -> None:
        """The leader got no slot: every follower makes its own round trip instead."""
        self._close(group)
        for member in group.members[1:]:
            if not member.gone:
                member.answer.set_result(ALONE)

    def _close(self, group: Group[Any]) -> None:
        if self._open.get(group.key) is group:
            del self._open[group.key]


async def answer_of(member: Member[Any], timeout: float) -> Any:
    """The member's answer, or TimeoutError when its deadline comes first (it is then left out)."""
    try:
        return await asyncio.wait_for(asyncio.shield(member.answer), max(timeout, 0.0))
    except TimeoutError:
        if member.answer.done() and not member.answer.cancelled():
            return member.answer.result()
        member.answer.cancel()
        raise


def deliver(members: list[Member[Any]], outcomes: list[Any]) -> None:
    """Give each member its outcome: a value, or an exception to raise in its call."""
    for member, outcome in zip(members, outcomes, strict=True):
        if member.gone:
            continue
        if isinstance(outcome, BaseException):
            member.answer.set_exception(outcome)
        else:
            member.answer.set_result(outcome)


def fail_all(members: list[Member[Any]], error: BaseException) -> None:
    deliver(members, [error] * len(members))


# --- the two kinds of group ---------------------------------------------------------


async def insert_many(collection: Any, comment: str, bypass: bool, items: list[Any]) -> list[Any]:
    """One unordered insert_many of every member's one document; each member's own outcome.

    ``items`` are the members' PreparedInserts (one document each). A write
    error belongs to the member whose document it names; a write-concern
    error to every member, as it would have to each alone.
    """
    documents = [item.documents[0] for item in items]
    try:
        await collection.insert_many(
            documents, ordered=False, bypass_document_validation=bypass or None, comment=comment
        )
    except pymongo.errors.BulkWriteError as exc:
        return _insert_outcomes(exc, len(items), collection.database.name)
    return [None] * len(items)


def _insert_outcomes(exc: pymongo.errors.BulkWriteError, count: int, database: str) -> list[Any]:
    details = exc.details or {}
    concern = details.get("writeConcernErrors") or []
    outcomes: list[Any] = [None] * count
    for error in details.get("writeErrors") or []:
        index = error.get("index")
        if isinstance(index, int) and 0 <= index < count:
            # As the member's own insert of one document would have failed.
            own = {**error, "index": 0}
            outcomes[index] = bulk_write_error(
                pymongo.errors.BulkWriteError(
                    {"writeErrors": [own], "writeConcernErrors": concern, "nInserted": 0}
                ),
                database,
            )
    if concern:
        for index, outcome in enumerate(outcomes):
            if outcome is None:
                alone = {"writeErrors": [], "writeConcernErrors": concern, "nInserted": 1}
                outcomes[index] = bulk_write_error(pymongo.errors.BulkWriteError(alone), database)
    return outcomes


async def find_by_ids(collection: Any, projection: Any, comment: str, items: list[Any]) -> list[Any]:
    """One find of `{_id: {$in: [...]}}` for every member's id; each member's document or None.

    ``items`` are `documents.IdLookup`s. The documents come back in any
    order and are matched to members by `_id` value.
    """
    # One lookup keeps its own equality: servers that push `_id` equality
    # down to their index may not do so for $in (FerretDB 1.24 scans the
    # collection for it), and a lone call must cost what it did uncoalesced.
    elements = [item.element for item in items]
    query = documents.id_filter(elements[0]) if len(elements) == 1 else documents.in_filter(elements)
    wanted = RawBSONDocument(query, documents.RAW)
    # A negative limit asks for one batch of at most that many documents, and
    # the server closes the cursor with it: no getMore or killCursors after.
    cursor = collection.find_raw_batches(wanted, projection=projection, limit=-len(items), comment=comment)
    found: dict[Hashable, bytes] = {}
    try:
        async for batch in cursor:
            for document in documents.split_batch(batch):
                key = documents.id_key(document)
                if key is not None:
                    found.setdefault(key, document)
    finally:
        await cursor.close()
    return [found.get(item.key) for item in items]
