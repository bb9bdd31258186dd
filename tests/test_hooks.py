"""broker_client.hooks: one client per worker process, for pre-fork servers and pools.

multiprocessing runs for real, with the fork and the spawn start methods,
each worker inserting and finding through the live broker. gunicorn's hooks
are plain functions of (server, worker), run here in a really forked
child. Celery is not a dependency: its signal wiring is checked in a fresh
interpreter against a stand-in ``celery.signals`` module with celery's
``connect``/``send`` calling convention, and ``connect_celery`` without
celery must connect nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_client import AsyncBrokerClient, BrokerClient, InvalidOperation, hooks

CHILD_TIMEOUT_S = 120

pytestmark = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with no hooks configuration in this process."""
    monkeypatch.delenv(hooks.TARGET_ENV, raising=False)
    hooks.close()
    hooks._state.target, hooks._state.options = None, {}
    yield
    hooks.close()
    hooks._state.target, hooks._state.options = None, {}


# --- multiprocessing -------------------------------------------------------------------


def _task(job: tuple[str, str, int]) -> dict[str, Any]:
    """A pool task: insert and find through this worker's client."""
    database, collection, n = job
    client = hooks.client()
    items = client[database][collection]
    oid = items.insert_one({"task": n}).inserted_id
    found = items.find_one({"_id": oid})
    assert found is not None
    assert found["task"] == n
    holder = client._holder
    return {
        "pid": os.getpid(),
        "client": id(client),
        "channel_pid": holder.pid,
        "channels_created": holder.channels_created,
    }


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_initializer(method: str, broker: Any, collection_name: str, mongo: Any) -> None:
    # The parent uses the hooks' client first: the fork workers inherit it and
    # must make their own instead of touching the parent's channel.
    hooks.configure(broker.unix_target)
    parent = hooks.client()
    assert parent.ping().ok
    ctx = multiprocessing.get_context(method)
    jobs = [(broker.db_name, collection_name, n) for n in range(12)]
    with ctx.Pool(processes=3, initializer=hooks.init_worker, initargs=(broker.unix_target,)) as pool:
        reports = pool.map_async(_task, jobs, chunksize=1).get(timeout=CHILD_TIMEOUT_S)

    by_worker: dict[int, list[dict[str, Any]]] = {}
    for report in reports:
        by_worker.setdefault(report["pid"], []).append(report)
    assert os.getpid() not in by_worker
    for pid, worker_reports in by_worker.items():
        # One client per worker, reused by every task it ran; its one channel made there.
        assert len({r["client"] for r in worker_reports}) == 1, worker_reports
        assert all(r["channel_pid"] == pid for r in worker_reports)
        assert all(r["channels_created"] == 1 for r in worker_reports)
    stored = mongo[broker.mongo_db][collection_name]
    assert sorted(d["task"] for d in stored.find()) == list(range(12))
    # The parent's client is untouched and still works.
    assert hooks.client() is parent
    assert parent._holder.pid == os.getpid()
    assert parent.ping().ok


def _async_task(job: tuple[str, str, int]) -> dict[str, Any]:
    database, collection, n = job

    async def main() -> dict[str, Any]:
        client = hooks.async_client()
        assert hooks.async_client() is client  # one per process and loop
        oid = (await client[database][collection].insert_one({"task": n})).inserted_id
        found = await client[database][collection].find_one(oid)
        assert found is not None
        await client.close()
        return {"pid": os.getpid(), "task": found["task"]}

    return asyncio.run(main())


def test_multiprocessing_pool_async_client(broker: Any, collection_name: str, mongo: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    jobs = [(broker.db_name, collection_name, n) for n in range(6)]
    with ctx.Pool(processes=2, initializer=hooks.init_worker, initargs=(broker.unix_target,)) as pool:
        reports = pool.map_async(_async_task, jobs, chunksize=1).get(timeout=CHILD_TIMEOUT_S)
    assert sorted(r["task"] for r in reports) == list(range(6))
    assert sorted(d["task"] for d in mongo[broker.mongo_db][collection_name].find()) == list(range(6))


# --- gunicorn ----------------------------------------------------------------------------


def test_gunicorn_post_fork_and_worker_exit(broker: Any, collection_name: str, mongo: Any) -> None:
    # gunicorn.conf.py: hooks.configure(...); post_fork = hooks.post_fork; worker_exit = hooks.worker_exit
    hooks.configure(broker.tcp_target, timeout=10)
    master = hooks.client()
    assert master.ping().ok  # the master used it: an open channel at fork time
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never return into pytest
        status = 1
        try:
            os.close(read_fd)
            hooks.post_fork(object(), object())
            mine = hooks.client()
            report: dict[str, Any] = {
                "new_client": mine is not master,
                "lazy": mine._holder.channel is None,  # post_fork made no connection
                "timeout": mine.timeout,
            }
            mine[broker.db_name][collection_name].insert_one({"worker": os.getpid()})
            report["channel_pid"] = mine._holder.pid == os.getpid()
            report["same_after"] = hooks.client() is mine
            hooks.worker_exit(object(), object())
            report["closed"] = mine._holder.closed
            status = 0
        except BaseException as exc:
            report = {"error": repr(exc)}
        finally:
            os.write(write_fd, json.dumps(report).encode())
            os._exit(status)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.read())
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report == {
        "new_client": True,
        "lazy": True,
        "timeout": 10.0,
        "channel_pid": True,
        "same_after": True,
        "closed": True,
    }
    assert mongo[broker.mongo_db][collection_name].count_documents({"worker": pid}) == 1
    assert hooks.client() is master
    assert master.ping().ok


# --- celery ------------------------------------------------------------------------------

_FAKE_CELERY_SIGNALS = '''
"""A stand-in for celery.signals: celery's Signal.connect/send calling convention."""

class Signal:
    def __init__(self, name):
        self.name = name
        self.receivers = []

    def connect(self, receiver=None, weak=True, sender=None, dispatch_uid=None):
        self.receivers.append(receiver)
        return receiver

    def send(self, sender, **named):
        return [(r, r(signal=self, sender=sender, **named)) for r in self.receivers]

worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
'''

_CELERY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from broker_client import hooks
    target, database, collection = sys.argv[1:4]
    from celery import signals
    assert hooks.connect_celery(target)
    assert signals.worker_process_init.receivers == [hooks.celery_worker_process_init]
    pid = os.fork()
    if pid == 0:  # a prefork pool process, as celery starts them
        signals.worker_process_init.send(sender=None)
        client = hooks.client()
        ok = client[database][collection].insert_one({"celery": os.getpid()}).acknowledged
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        os._exit(0 if ok and client._holder.closed else 1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": pid, "exit": os.waitstatus_to_exitcode(status)}))
    """
)


def test_celery_worker_process_init(broker: Any, collection_name: str, mongo: Any, tmp_path: Path) -> None:
    package = tmp_path / "celery"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "signals.py").write_text(_FAKE_CELERY_SIGNALS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", _CELERY_SCRIPT, broker.unix_target, broker.db_name, collection_name],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=CHILD_TIMEOUT_S,
    )
    result = json.loads(out.stdout)
    assert result["exit"] == 0, out.stderr
    assert mongo[broker.mongo_db][collection_name].count_documents({"celery": result["child"]}) == 1


def test_connect_celery_without_celery_connects_nothing(broker: Any) -> None:
    if importlib.util.find_spec("celery") is not None:
        pytest.skip("celery is installed here; this test is about its absence")
    assert hooks.connect_celery(broker.unix_target) is False
    assert hooks.client().ping().ok  # configured all the same


# --- the rest ------------------------------------------------------------------------------


def test_without_a_target_the_error_says_what_to_do() -> None:
    with pytest.raises(InvalidOperation, match="init_worker") as info:
        hooks.client()
    assert hooks.TARGET_ENV in str(info.value)
    with pytest.raises(InvalidOperation):
        hooks.init_worker()


def test_the_target_may_come_from_the_environment(broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hooks.TARGET_ENV, broker.unix_target)
    assert hooks.client().target == broker.unix_target
    assert hooks.client().ping().ok


def test_bad_options_fail_at_configure_time() -> None:
    with pytest.raises(ValueError, match="target"):
        hooks.configure("mongodb://127.0.0.1:27017/")
    with pytest.raises(TypeError):
        hooks.configure("127.0.0.1:50051", no_such_option=1)


def test_async_client_is_one_per_event_loop(broker: Any) -> None:
    hooks.configure(broker.unix_target)

    async def main() -> AsyncBrokerClient[Any]:
        client = hooks.async_client()
        assert hooks.async_client() is client
        assert (await client.ping()).ok
        return client

    first = asyncio.run(main())
    second = asyncio.run(main())
    assert first is not second
    with pytest.raises(RuntimeError):
        hooks.async_client()  # outside a running loop


def test_init_worker_is_cheap() -> None:
    """No grpc import, no channel, no thread: the first call in the worker does the work."""
    script = textwrap.dedent(
        """
        import json, sys, threading
        from broker_client import hooks
        hooks.init_worker("unix:///nonexistent/broker.sock")
        client = hooks.client()
        print(json.dumps({
            "grpc": "grpc" in sys.modules,
            "channel": client._holder.channel is not None,
            "threads": threading.active_count(),
        }))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == {"grpc": False, "channel": False, "threads": 1}


def test_importing_hooks_registers_no_at_fork_hook_until_one_is_configured() -> None:
    """The at-fork hook comes with the first configure (once), not with the import."""
    script = textwrap.dedent(
        """
        import json, os

        registered = []  # broker_client's own; the stdlib and bson register theirs
        real_register_at_fork = os.register_at_fork

        def register_at_fork(**hooks_given):
            if any(f.__module__.startswith("broker_client") for f in hooks_given.values()):
                registered.append(hooks_given)
            real_register_at_fork(**hooks_given)

        os.register_at_fork = register_at_fork
        from broker_client import hooks

        def hook_runs_in_a_child():
            # The hook gives a forked child a new lock.
            lock = hooks._state.lock
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write_fd, b"1" if hooks._state.lock is not lock else b"0")
                os._exit(0)
            os.close(write_fd)
            os.waitpid(pid, 0)
            with os.fdopen(read_fd, "rb") as pipe:
                return pipe.read() == b"1"

        report = {
            "imported": {
                "flag": hooks._at_fork_registered,
                "registrations": len(registered),
                "runs_in_child": hook_runs_in_a_child(),
            }
        }
        hooks.configure("unix:///nonexistent/broker.sock")
        hooks.init_worker("unix:///nonexistent/broker.sock")
        hooks.client()
        hooks.connect_celery("unix:///nonexistent/broker.sock")
        report["configured"] = {
            "flag": hooks._at_fork_registered,
            "registrations": [r.get("after_in_child") is hooks._after_fork_in_child for r in registered],
            "runs_in_child": hook_runs_in_a_child(),
        }
        print(json.dumps(report))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == {
        "imported": {"flag": False, "registrations": 0, "runs_in_child": False},
        "configured": {"flag": True, "registrations": [True], "runs_in_child": True},
    }


def test_hooks_make_sync_clients(broker: Any) -> None:
    hooks.init_worker(broker.unix_target, timeout=5)
    assert isinstance(hooks.client(), BrokerClient)
    assert hooks.client().timeout == 5
