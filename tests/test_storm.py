"""The product's key claim: many short-lived worker processes, one bounded pool.

200 worker processes, each a fresh interpreter (harness/worker.py storm), at most 20
alive at once, each inserting one document through the broker and finding it
again. While they run, a thread counts the broker's TCP connections to the
database every 20 ms; they must stay within the pool bound. Then the same
workers run with a MongoClient each, straight to the database, and the
connections at the database port are counted the same way: that peak must be
higher than the broker's.

Each worker keeps its client open for HOLD_MS after its operations, as a job
does while it works on what it read. Without that, on two cores a worker
spends nearly all of its short life importing, its connections live a few
milliseconds, and how many overlap says more about CPU scheduling than about
pooling. The exact number of connections the workers opened is reported too.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import pytest
from pymongo import MongoClient

from harness.fleet import FleetResult, run_fleet, worker_command
from harness.netconns import ConnectionSampler, connections_from_pid, connections_to_port

if TYPE_CHECKING:
    from tests.conftest import Broker

logger = logging.getLogger(__name__)

WORKERS = 200
CONCURRENCY = 20
HOLD_MS = 300
# pymongo opens, besides the pool, one monitor connection per server and,
# where the server supports the streaming protocol (MongoDB 4.4+), one more
# for RTT measurement. FerretDB v1 does not stream, so it sees only one.
MONITOR_CONNECTIONS = 2


def _specs(mode: str, collection: str, **target: Any) -> list[dict[str, Any]]:
    return [
        {
            "mode": mode,
            "collection": collection,
            "worker": i,
            "ops": 2,  # insert one document, then find it
            "hold_ms": HOLD_MS,
            **target,
        }
        for i in range(WORKERS)
    ]


def _run(specs: list[dict[str, Any]]) -> FleetResult:
    fleet = run_fleet((worker_command(s) for s in specs), CONCURRENCY, timeout_per_worker=60)
    failed = fleet.failed
    assert not failed, f"{len(failed)} of {WORKERS} workers failed:\n" + "\n".join(
        f.describe() for f in failed[:5]
    )
    assert fleet.max_alive <= CONCURRENCY
    return fleet


def _assert_stored(mongo: MongoClient[dict[str, Any]], database: str, collection: str) -> None:
    values = [d["value"] for d in mongo[database][collection].find({}, {"value": 1, "_id": 0})]
    assert len(values) == WORKERS
    assert sorted(values) == sorted(f"storm-{i}-0" for i in range(WORKERS))


@pytest.mark.timeout(180)
def test_storm_of_short_lived_workers_stays_within_the_pool(
    broker: Broker,
    mongo: MongoClient[dict[str, Any]],
    collection_name: str,
    record_property: Any,
) -> None:
    port = broker.db_port

    # Through the broker.
    with ConnectionSampler(lambda: connections_from_pid(broker.pid, port)) as via_broker:
        fleet = _run(
            _specs("broker-uds", collection_name, target=broker.unix_target, database=broker.db_name)
        )
    _assert_stored(mongo, broker.mongo_db, collection_name)
    assert via_broker.samples > 10, "the sampler hardly ran; the peak would mean nothing"
    bound = broker.max_pool_size + MONITOR_CONNECTIONS
    assert via_broker.peak <= bound, (
        f"the broker held {via_broker.peak} connections to the database at once, "
        f"more than max_pool_size {broker.max_pool_size} + {MONITOR_CONNECTIONS} monitoring"
    )

    # The same workers, each with its own MongoClient. Connections of the
    # broker (idle now) and of this test process are not counted.
    direct = f"{collection_name}_direct"
    exclude = (broker.pid, os.getpid())
    try:
        with ConnectionSampler(lambda: connections_to_port(port, exclude)) as own_clients:
            direct_fleet = _run(
                _specs(
                    "per-process",
                    direct,
                    uri=broker.mongo_uri,
                    database=broker.mongo_db,
                    db_port=port,
                )
            )
        _assert_stored(mongo, broker.mongo_db, direct)
    finally:
        mongo[broker.mongo_db].drop_collection(direct)
    opened = sum(int(r["connects"]) for r in direct_fleet.reports)

    record_property("broker_peak_db_connections", via_broker.peak)
    record_property("broker_db_connections_seen", len(via_broker.distinct))
    record_property("per_process_peak_db_connections", own_clients.peak)
    record_property("per_process_db_connections_opened", opened)
    record_property("broker_phase_s", round(fleet.elapsed_s, 1))
    record_property("per_process_phase_s", round(direct_fleet.elapsed_s, 1))
    logger.info(
        "storm of %d workers (%d at once): broker peak %d db connections (%d seen in all); "
        "own MongoClient each: peak %d, %d opened; %.1f s and %.1f s",
        WORKERS,
        CONCURRENCY,
        via_broker.peak,
        len(via_broker.distinct),
        own_clients.peak,
        opened,
        fleet.elapsed_s,
        direct_fleet.elapsed_s,
    )
    assert opened >= WORKERS, f"the workers reported only {opened} connections opened"
    assert own_clients.peak > via_broker.peak, (
        f"without the broker the workers held at most {own_clients.peak} connections at once, "
        f"not more than the broker's {via_broker.peak}"
    )
