"""Very long client deadlines: the time limit sent to the server stays in its range.

MongoDB's maxTimeMS is a signed 32-bit count of milliseconds (about 24.8
days). A 30-day or 365-day gRPC deadline must still work on every method:
the broker clamps what it sends instead of passing an out-of-range value.
"""

from __future__ import annotations

import bson
import pytest

from tests.rpc import pb

DAY_S = 86400


@pytest.mark.parametrize("days", [30, 365])
def test_long_deadlines_work_on_every_method(stub, collection_name, days):
    timeout = days * DAY_S
    inserted = stub.Insert(
        pb.InsertRequest(database="appdb", collection=collection_name, documents=[bson.encode({"n": days})]),
        timeout=timeout,
    )
    assert inserted.inserted_count == 1
    found = [
        bson.decode(d)
        for m in stub.Find(pb.FindRequest(database="appdb", collection=collection_name), timeout=timeout)
        for d in m.documents
    ]
    assert [d["n"] for d in found] == [days]
    one = stub.FindOne(pb.FindRequest(database="appdb", collection=collection_name), timeout=timeout)
    assert bson.decode(one.documents[0])["n"] == days
    (ping,) = stub.Ping(pb.PingRequest(database="appdb"), timeout=timeout).databases
    assert ping.ok, ping.error
    # Every database, as well: each one's ping gets the same clamped limit.
    assert all(db.ok for db in stub.Ping(pb.PingRequest(), timeout=timeout).databases)
