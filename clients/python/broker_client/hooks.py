"""Ready-made hooks for pre-fork servers and worker pools: one client per worker process.

The clients are fork-safe on their own (see ``_channel``): a client made in
a parent keeps working in its children. These hooks add the usual shape of
a pre-fork program: the master says where the broker is, each worker
process gets a client of its own, and code in the workers asks for it with
`client()`. They are cheap: making a client opens no connection and imports
no grpc; its channel is made by its first call, in the worker.

gunicorn, in ``gunicorn.conf.py``::

    from broker_client import hooks

    hooks.configure("unix:///run/mongo-broker/broker.sock", timeout=5)
    post_fork = hooks.post_fork
    worker_exit = hooks.worker_exit

celery, where the app is defined::

    from broker_client import hooks

    hooks.connect_celery("unix:///run/mongo-broker/broker.sock")

multiprocessing::

    from broker_client import hooks

    with Pool(initializer=hooks.init_worker, initargs=("unix:///run/mongo-broker/broker.sock",)) as pool:
        ...

and then, in a task or a request handler::

    items = hooks.client()["appdb"]["items"]
    # asyncio code (uvicorn workers): items = hooks.async_client()["appdb"]["items"]

The target may also come from the ``MONGO_BROKER_TARGET`` environment
variable, which the broker's own CLI reads too.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

from broker_client.client import BrokerClient
from broker_client.errors import InvalidOperation

if TYPE_CHECKING:
    import asyncio

    from broker_client.async_client import AsyncBrokerClient

__all__ = [
    "TARGET_ENV",
    "async_client",
    "celery_worker_process_init",
    "celery_worker_process_shutdown",
    "client",
    "close",
    "configure",
    "connect_celery",
    "init_worker",
    "post_fork",
    "worker_exit",
]

#: The environment variable read when no target was configured.
TARGET_ENV: Final = "MONGO_BROKER_TARGET"


class _State:
    """This process's configuration and clients (inherited by forked children, then replaced)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: str | None = None
        self.options: dict[str, Any] = {}
        self.pid: int | None = None
        self.client: BrokerClient[dict[str, Any]] | None = None
        self.async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncBrokerClient[Any]] = (
            weakref.WeakKeyDictionary()
        )


_state = _State()


# Whether _after_fork_in_child is registered with os.register_at_fork. It is
# registered by the first configure, init_worker, connect_celery, client or
# async_client, not at import: importing the package has no side effects.
# The registration is inherited by forked children, and so is the flag.
_at_fork_registered = False
_registering = threading.Lock()


def _after_fork_in_child() -> None:
    global _registering  # noqa: PLW0603 - per-process state, reset in the child
    # The locks may have been held by a thread that does not exist here.
    _state.lock = threading.Lock()
    _registering = threading.Lock()


def _register_at_fork() -> None:
    """Register the at-fork hook, once per interpreter, before the state's lock is first used."""
    global _at_fork_registered  # noqa: PLW0603 - one registration per interpreter
    if _at_fork_registered:
        return
    with _registering:
        if not _at_fork_registered:
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _at_fork_registered = True


def configure(target: str | None = None, **options: Any) -> None:
    """Say where the broker is, and with which `BrokerClient` options, for the hooks to use.

    Call it in the master, before workers are forked; it makes no client.
    ``target=None`` means ``$MONGO_BROKER_TARGET``. Options are checked now,
    so that a mistake fails at start-up rather than in every worker.
    """
    BrokerClient(_resolve(target), **options)  # checks them; opens nothing
    _register_at_fork()
    with _state.lock:
        _state.target = target
        _state.options = dict(options)


def init_worker(target: str | None = None, **options: Any) -> None:
    """Give this process its own client: a multiprocessing ``Pool`` initializer.

    ``Pool(initializer=hooks.init_worker, initargs=(target,))`` works with
    every start method (fork, forkserver, spawn). With no arguments it uses
    what `configure` set, or ``$MONGO_BROKER_TARGET``. A client inherited
    from the parent is left untouched (its channel belongs to the parent).
    """
    if target is not None or options:
        configure(target, **options)
    _register_at_fork()
    with _state.lock:
        _new_clients()


def client() -> BrokerClient[dict[str, Any]]:
    """This process's `BrokerClient`, made on first use in each process."""
    current = _state.client
    if current is not None and _state.pid == os.getpid():
        return current
    _register_at_fork()  # a target from the environment needs no configure
    with _state.lock:
        if _state.client is None or _state.pid != os.getpid():
            _new_clients()
        assert _state.client is not None
        return _state.client


def async_client() -> AsyncBrokerClient[dict[str, Any]]:
    """This process's `AsyncBrokerClient` for the running event loop (call it from a coroutine).

    One per process and event loop, since a grpc.aio channel belongs to one
    loop. Made in the worker, it never exists at fork time, which is what
    grpc.aio needs (see ``_channel``).
    """
    import asyncio

    from broker_client.async_client import AsyncBrokerClient

    loop = asyncio.get_running_loop()
    _register_at_fork()
    with _state.lock:
        if _state.pid != os.getpid():
            _new_clients()
        made = _state.async_clients.get(loop)
        if made is None:
            made = AsyncBrokerClient(_resolve(_state.target), **_state.options)
            _state.async_clients[loop] = made
        return made


def close() -> None:
    """Close this process's `BrokerClient` (at worker exit); the next `client()` makes a new one.

    Async clients are forgotten rather than closed: closing needs their own
    event loop. Close them there with ``await hooks.async_client().close()``.
    """
    if not _at_fork_registered:
        return  # no client was made in this interpreter: nothing to close
    with _state.lock:
        if _state.pid == os.getpid() and _state.client is not None:
            _state.client.close()
        _state.client = None
        _state.pid = None
        _state.async_clients = weakref.WeakKeyDictionary()


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``post_fork`` hook: ``post_fork = hooks.post_fork`` in gunicorn.conf.py."""
    init_worker()


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``worker_exit`` hook: closes the worker's client."""
    close()


def celery_worker_process_init(**kwargs: Any) -> None:
    """Celery's ``worker_process_init`` signal handler (see `connect_celery`)."""
    init_worker()


def celery_worker_process_shutdown(**kwargs: Any) -> None:
    """Celery's ``worker_process_shutdown`` signal handler (see `connect_celery`)."""
    close()


def connect_celery(target: str | None = None, **options: Any) -> bool:
    """Configure, and connect the celery handlers if celery can be imported.

    Connects `celery_worker_process_init` to ``worker_process_init`` and
    `celery_worker_process_shutdown` to ``worker_process_shutdown``, so each
    pool process gets a client of its own. Returns False, connecting
    nothing, when celery is not installed: this package does not depend on
    it.
    """
    configure(target, **options)
    try:
        from celery import signals  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    signals.worker_process_init.connect(celery_worker_process_init, weak=False)
    signals.worker_process_shutdown.connect(celery_worker_process_shutdown, weak=False)
    return True


def _resolve(target: str | None) -> str:
    resolved = target or os.environ.get(TARGET_ENV, "")
    if not resolved:
        raise InvalidOperation(
            "no broker target for broker_client.hooks: call hooks.init_worker(target) in each worker "
            "(e.g. Pool(initializer=hooks.init_worker, initargs=(target,))), hooks.configure(target) "
            f"before forking, or set {TARGET_ENV}"
        )
    return resolved


def _new_clients() -> None:
    # Called with the lock held. The previous clients, if inherited from a
    # parent, are dropped without being closed: their channels belong to
    # the parent and were already retired at the fork.
    _state.client = BrokerClient(_resolve(_state.target), **_state.options)
    _state.pid = os.getpid()
    _state.async_clients = weakref.WeakKeyDictionary()
