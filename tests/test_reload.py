"""SIGHUP and start-up with a URI pymongo refuses: a ConfigError naming the key, nothing leaked."""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest

from harness.brokerproc import render_toml
from tests.rpc import open_stub, pb


def _wait_for_log(proc, needle: str, count: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while (log := proc.log_text()).count(needle) < count:
        assert proc.is_running(), log
        assert time.monotonic() < deadline, f"{needle!r} not logged {count} time(s):\n{log}"
        time.sleep(0.05)
    return log


def _settled_connections(count, pid: int, at_most: int, timeout: float = 10.0) -> int:
    """The process's database connections once they are at most ``at_most`` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (now := count(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_sighup_with_a_uri_pymongo_refuses_is_rejected_and_leaks_no_connection(
    start_broker, count_db_connections
):
    config = start_broker.base_config()
    proc = start_broker(config)
    with open_stub(proc.unix_target) as stub:
        assert stub.Ping(pb.PingRequest(database="appdb"), timeout=10).databases[0].ok
        time.sleep(1.0)  # monitoring and min_pool_size connections are up
        baseline = count_db_connections(proc.pid)
        assert baseline > 0

        bad_port = copy.deepcopy(config)
        bad_port["databases"]["appdb"]["uri"] = "mongodb://127.0.0.1:99999/"
        # appdb re-tuned (a new client, connected) and a later database refused:
        # the new appdb client must be closed again.
        retuned_then_bad = copy.deepcopy(config)
        retuned_then_bad["databases"]["appdb"]["max_pool_size"] = 3
        retuned_then_bad["databases"]["zbad"] = {"uri": "mongodb://127.0.0.1:99999/"}
        reloads = 8
        for n in range(reloads):
            proc.config_path.write_text(render_toml(bad_port if n % 2 else retuned_then_bad))
            os.kill(proc.pid, signal.SIGHUP)
            log = _wait_for_log(proc, "reload rejected, keeping the running configuration", n + 1)

        assert "databases.appdb.uri: pymongo refuses 'mongodb://127.0.0.1:99999/'" in log
        assert "databases.zbad.uri: pymongo refuses" in log
        assert "Port must be an integer between 0 and 65535" in log
        assert "Task exception was never retrieved" not in log
        assert "Traceback" not in log
        # The running configuration is untouched, and serves.
        assert stub.Ping(pb.PingRequest(database="appdb"), timeout=10).databases[0].ok
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        assert [(db.database, db.max_pool_size) for db in stats.databases] == [("appdb", 10)]
        assert _settled_connections(count_db_connections, proc.pid, baseline) <= baseline

        # A good config after all that still applies.
        good = copy.deepcopy(config)
        good["databases"]["appdb"]["max_pool_size"] = 4
        proc.config_path.write_text(render_toml(good))
        os.kill(proc.pid, signal.SIGHUP)
        _wait_for_log(proc, "reloaded", 1)
        stats = stub.Stats(pb.StatsRequest(), timeout=10)
        assert [(db.database, db.max_pool_size) for db in stats.databases] == [("appdb", 4)]


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("mongodb://127.0.0.1:99999/", "Port must be an integer between 0 and 65535"),
        ("mongodb://127.0.0.1/?maxPoolSize=lots", "maxpoolsize must be an integer"),
    ],
)
def test_startup_with_a_uri_pymongo_refuses_exits_2_naming_the_key(start_broker, uri, needle):
    proc = start_broker(f'[databases.app]\nuri = "{uri}"\n', wait=False)
    assert proc.wait(timeout=30) == 2
    log = proc.log_text()
    assert "databases.app.uri: pymongo refuses" in log and needle in log, log
    assert "Traceback" not in log


def test_startup_with_a_refused_uri_never_shows_its_password(start_broker):
    # An unescaped '/' makes pymongo split the password and quote a piece of it.
    proc = start_broker('[databases.app]\nuri = "mongodb://user:Canary/Piece-4471@127.0.0.1/"\n', wait=False)
    assert proc.wait(timeout=30) == 2
    log = proc.log_text()
    assert "databases.app.uri" in log, log
    assert "Canary" not in log and "Piece-4471" not in log, log
