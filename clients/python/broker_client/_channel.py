"""The lazy, fork-aware gRPC channel behind a BrokerClient.

Why this module exists: gRPC core is multi-threaded and keeps process-wide
state (event engine threads, pollers, a global subchannel pool), so a channel
cannot cross ``fork()``. What we measured with grpcio 1.85.1 on Linux (20 to
100 children per round, thousands of forks, a stub broker in another
process):

1. With no gRPC call in progress at the moment of ``fork()``, gRPC core's own
   fork handlers run and a *new* channel in the child works, whatever the
   parent did before. These handlers are on by default in grpcio's Linux
   wheels. ``GRPC_ENABLE_FORK_SUPPORT=0`` turns them off, and then every child
   of a parent that has used gRPC hung until its deadline. (Old advice from
   grpc's doc/fork_support.md, for fork+exec users, suggests setting exactly
   that.) ``GRPC_ENABLE_FORK_SUPPORT=1`` adds Python-level handlers on top.
   Those made forks slower and, with calls in flight, left children hung, so
   we rely on neither: see `_warn_about_fork_env`.
2. If any thread is inside gRPC at the moment of ``fork()``, core logs "Other
   threads are currently calling into gRPC, skipping fork() handlers". The
   child then inherits half-updated state. 1-25% of children then failed:
   DEADLINE_EXCEEDED on a fresh channel, "Wrong file descriptor generation",
   SIGABRT, SIGSEGV, or a hang. A thread is inside gRPC when it runs a call,
   or when grpcio's own helper thread polls a streaming call.
3. Two channels to the same target share connections through gRPC's global
   subchannel pool. A child's new channel could then pick up the parent's
   inherited connection, and fail with "Wrong file descriptor generation".

The design that follows, which passed every round of those runs:

- `ForkGate`: every call (and channel creation) runs inside the gate. An
  ``os.register_at_fork`` *before* hook stops new calls. It waits, bounded by
  `FORK_DRAIN_TIMEOUT_S`, for calls in flight to finish, and lets the fork
  proceed only when no thread of ours is inside gRPC. That way core's
  handlers are never skipped on our account.
- ``SingleThreadedUnaryStream``: streaming calls are polled by the caller's
  thread inside the gate, rather than by a background thread that stays
  inside gRPC for the whole life of the stream.
- ``grpc.use_local_subchannel_pool``: each channel has its own connections,
  so a child's channel never reuses the parent's HTTP/2 connection.
- In the child, the parent's channel is never used, closed or even garbage
  collected. Closing it, or letting grpcio's ``__del__`` close it, would act
  on sockets and core objects that belong to the parent. It is moved to
  `_RETIRED`, which the child never frees, and a new channel is created on
  first use.

asyncio (`AsyncChannelHolder`, for ``AsyncBrokerClient``). A grpc.aio channel
belongs to the event loop it was made in, so it is made lazily inside the
running loop, and a call from any other loop is refused with a message
saying so. Forking is harder than for the sync client, and the gate cannot
help: while any grpc.aio channel exists, grpcio runs a poller thread
(``_poll_wrapper``) that sits inside gRPC core, so every ``fork()`` skips
core's fork handlers (case 2). What we measured (grpcio 1.85.1, a parent
that had used an aio channel and kept it): the new aio channel of every
child failed (43 of 43; "Check failed" aborts in ev_epoll1_linux.cc among
them), while sync channels in such children worked (130 of 130). Once the
parent had closed its aio channels and dropped them, grpcio stopped the
poller thread (it counts live aio channels) and aio children worked (25 of
25). So:

- the child retires the parent's aio channel untouched, as above;
- if one of our aio channels was open at the fork, the child's async
  clients refuse to start (`InvalidOperation`, saying to close the client
  before forking or to fork before first use) instead of aborting or
  hanging; its sync clients are unaffected;
- ``AsyncBrokerClient.close()`` drops every reference to its channel, so
  that a parent which closes its async clients may fork safely.

The gate covers this package's calls only. A process that also uses gRPC
elsewhere (an OpenTelemetry exporter, say) while forking can still trigger
case 2.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio

    import grpc

    from broker_client.proto.broker.v1.broker_pb2_grpc import BrokerAsyncStub, BrokerStub

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_BYTES",
    "DEFAULT_MAX_SEND_MESSAGE_BYTES",
    "FORK_DRAIN_TIMEOUT_S",
    "GATE",
    "AsyncChannelHolder",
    "ChannelHolder",
    "normalize_target",
    "retire",
    "service_config",
]

log = logging.getLogger("broker_client.channel")

# A single BSON document may be 16 MiB, and the broker never splits one over
# several messages. So a response message must be allowed 16 MiB plus the
# protobuf framing around it.
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES: Final = 17 * 1024 * 1024
# An insert_many of several large documents travels as one message.
DEFAULT_MAX_SEND_MESSAGE_BYTES: Final = 48 * 1024 * 1024

# How long fork() may wait for this process's calls in flight to finish.
# Calls normally take milliseconds. A longer wait means a slow query or a
# blocked stream. After this long the fork goes ahead, and the child's first
# call may then fail (see case 2 above). A slower fork is the lesser harm.
FORK_DRAIN_TIMEOUT_S: Final = 10.0

# The health service name the broker sets NOT_SERVING when it starts to drain.
BROKER_HEALTH_SERVICE: Final = "broker.v1.Broker"

_PASS_THROUGH_SCHEMES: Final = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
_WRONG_SCHEMES: Final = ("mongodb:", "mongodb+srv:", "http:", "https:", "grpc:", "tcp:")


def normalize_target(target: str | Sequence[str]) -> str:
    """Turn a user's broker address, or a list of replicas' addresses, into a gRPC target.

    Accepts ``unix:///abs/path``, ``unix:/abs/path``, ``host:port``,
    ``dns:///host:port`` (and gRPC's other schemes), and a bare absolute
    path, which is taken as a Unix socket. A list (or tuple) of
    ``IP:port`` strings, all IPv4 or all IPv6, names the replicas of a
    shared tier: it becomes gRPC's ``ipv4:``/``ipv6:`` address list.
    """
    if isinstance(target, (list, tuple)):
        return _replica_list(target)
    if not isinstance(target, str):
        raise TypeError(f"target must be a str or a list of str, not {type(target).__name__}")
    stripped = target.strip()
    if not stripped:
        raise ValueError("target must not be empty: give 'unix:///path/to/broker.sock' or 'host:port'")
    lowered = stripped.lower()
    if lowered.startswith(_WRONG_SCHEMES):
        raise ValueError(
            f"target {target!r} is not a broker address: give 'unix:///path/to/broker.sock', "
            "'host:port' or 'dns:///host:port' (the broker's own config holds the MongoDB URI)"
        )
    if stripped.startswith("/"):
        return f"unix://{stripped}"
    if lowered.startswith(_PASS_THROUGH_SCHEMES):
        return stripped
    if "," in stripped:
        raise ValueError(
            f"target {target!r} lists several addresses in one string: pass them as a list, "
            "e.g. ['10.0.0.7:50051', '10.0.0.8:50051'], or use 'dns:///name:port'"
        )
    if ":" not in stripped:
        # gRPC would quietly default to port 443, which is never the broker.
        raise ValueError(f"target {target!r} has no port: give 'host:port' or a unix:// path")
    return stripped


def _replica_list(targets: Sequence[str]) -> str:
    """``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,[b]:p``) from a list of replica addresses."""
    import ipaddress  # only a list of replicas needs it

    if not targets:
        raise ValueError("the list of broker addresses is empty: give at least one 'IP:port'")
    families: set[int] = set()
    entries: list[str] = []
    for entry in targets:
        if not isinstance(entry, str):
            raise TypeError(f"each broker address must be a str, not {type(entry).__name__}")
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"broker address {entry!r} needs 'IP:port' with a port from 1 to 65535")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            # gRPC resolves a name only through dns:///, which then balances over
            # every address the name has: resolving it here would freeze them.
            raise ValueError(
                f"broker address {entry!r} is not an IP address: a list takes IP:port entries; "
                "for a name give the single target 'dns:///name:port'"
            ) from None
        families.add(address.version)
        entries.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    if len(families) > 1:
        raise ValueError("broker addresses mix IPv4 and IPv6: gRPC takes one family per list")
    scheme = "ipv6" if families == {6} else "ipv4"
    return f"{scheme}:{','.join(entries)}"


def service_config(target: str) -> str:
    """The channel's default gRPC service config for a normalized target, as JSON.

    ``round_robin`` spreads calls over every address the target resolves
    to (gRPC's default, ``pick_first``, would send all of them to one).
    Over TCP the channel also health-checks each broker (the broker's
    ``broker.v1.Broker`` health service): a draining broker leaves the
    rotation as soon as it says NOT_SERVING, before it closes its listener.
    A Unix socket is one broker with nowhere else to go, so no Watch stream
    is held for it.
    """
    # Written out rather than json.dumps'd: the client imports nothing it
    # can do without (worker start-up time).
    balance = '"loadBalancingConfig":[{"round_robin":{}}]'
    if target.lower().startswith(("unix:", "unix-abstract:")):
        return "{" + balance + "}"
    return "{" + balance + ',"healthCheckConfig":{"serviceName":"' + BROKER_HEALTH_SERVICE + '"}}'


class ForkGate:
    """Keeps ``fork()`` from happening while a thread of ours is inside gRPC.

    Calls are "inside" between `__enter__` and `__exit__`. The before-fork
    hook sets ``forking`` (new calls wait) and waits for the count of calls
    inside to reach zero. It then keeps the condition's lock across the fork,
    so no thread is halfway through the gate's bookkeeping when the child's
    copy of memory is taken.

    Sections must not nest. Nothing in them may call user code or ``fork()``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = False

    def __enter__(self) -> None:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._inside += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._cond:
            self._inside -= 1
            if self._forking and self._inside == 0:
                self._cond.notify_all()

    @property
    def inside(self) -> int:
        """Calls in progress in this process (for tests and debugging)."""
        return self._inside

    def before_fork(self) -> None:
        self._cond.acquire()
        self._forking = True
        if not self._cond.wait_for(lambda: self._inside == 0, timeout=FORK_DRAIN_TIMEOUT_S):
            log.warning(
                "fork() went ahead after %.0f s with %d broker call(s) still in flight; "
                "the child's first broker calls may fail (gRPC cannot fork mid-call)",
                FORK_DRAIN_TIMEOUT_S,
                self._inside,
            )

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()

    def after_fork_in_child(self) -> None:
        # The threads that were inside gRPC or waiting at the gate do not
        # exist in the child. Start from a fresh state instead of releasing
        # a lock whose waiters are gone.
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = False


GATE: Final = ForkGate()

# Channels (and streaming calls) inherited from a parent process. The child
# keeps them alive on purpose and never touches them again: closing them, or
# letting grpcio's __del__ close them, would act on the parent's sockets and
# core objects (see the module docstring).
_RETIRED: list[object] = []
_HOLDERS: weakref.WeakSet[_Holder] = weakref.WeakSet()
# Set in a child forked while one of our grpc.aio channels was open: grpc.aio
# cannot work in such a process (see the module docstring).
_aio_open_at_fork: int | None = None
_hooks_lock = threading.Lock()
_hooks_registered = False


def retire(obj: object) -> None:
    """Keep a gRPC object inherited from a parent process alive, untouched."""
    _RETIRED.append(obj)


def _before_fork() -> None:
    GATE.before_fork()


def _after_fork_in_parent() -> None:
    GATE.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _hooks_lock, _aio_open_at_fork  # noqa: PLW0603 - per-process state, reset in the child
    GATE.after_fork_in_child()
    _hooks_lock = threading.Lock()
    parent = os.getppid()
    for holder in list(_HOLDERS):
        if holder._retire_after_fork() and isinstance(holder, AsyncChannelHolder):
            _aio_open_at_fork = parent


def _ensure_fork_hooks() -> None:
    global _hooks_registered  # noqa: PLW0603 - one registration per interpreter
    with _hooks_lock:
        if _hooks_registered:
            return
        # Registered on first channel, not at import: importing the package
        # has no side effects. The registration is inherited by children,
        # and so is the flag, so this runs once per interpreter.
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _hooks_registered = True


def _warn_about_fork_env() -> None:
    value = os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").strip().lower()
    if value in {"0", "false", "no", "off"}:
        log.warning(
            "GRPC_ENABLE_FORK_SUPPORT=%s turns off gRPC core's fork handlers: broker calls "
            "in this forked child will likely hang until their deadline; unset it",
            value,
        )
    elif value in {"1", "true", "yes", "on"}:
        log.warning(
            "GRPC_ENABLE_FORK_SUPPORT=%s adds grpcio's Python fork handlers, which made "
            "forks slow or hung in our tests; broker_client needs neither, unset it",
            value,
        )


class _Holder:
    """What both holders share: lazy creation per process, retirement at fork."""

    _closed_message = "cannot use a BrokerClient after close()"

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        self.target: Final = target
        self._options = tuple(options)
        self._credentials = credentials
        self._lock = threading.Lock()
        self._channel: Any = None
        self._stub: Any = None
        self._pid: int | None = None
        self._closed = False
        self.channels_created = 0
        _HOLDERS.add(self)

    @property
    def pid(self) -> int | None:
        """The process that created the current channel."""
        return self._pid

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            # Imported here: errors must not be a cycle with client.py.
            from broker_client.errors import InvalidOperation

            raise InvalidOperation(self._closed_message)

    def _new_channel(self, module: Any) -> Any:
        """A channel from ``grpc`` or ``grpc.aio``; its stub is made by the caller."""
        _ensure_fork_hooks()
        if self._channel is not None:
            # Reached only when a fork bypassed Python's at-fork hooks
            # (os.fork from C code); the hooks normally retire it first.
            retire(self._channel)
            self._channel = None
        if self.channels_created:
            _warn_about_fork_env()
        if self._credentials is None:
            channel = module.insecure_channel(self.target, options=self._options)
        else:
            channel = module.secure_channel(self.target, self._credentials, options=self._options)
        self._pid = os.getpid()
        self.channels_created += 1
        log.debug("channel %d to %s created in pid %d", self.channels_created, self.target, self._pid)
        return channel

    def _retire_after_fork(self) -> bool:
        """In the child, right after fork() (single-threaded): True if a channel was open."""
        self._lock = threading.Lock()
        had_channel = self._channel is not None
        if had_channel:
            retire(self._channel)
        self._channel = None
        self._stub = None
        return had_channel

    def _release(self) -> Any:
        """Mark closed and hand back this process's channel to close, or None."""
        with self._lock:
            self._closed = True
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._pid != os.getpid():
            retire(channel)
            return None
        return channel


class ChannelHolder(_Holder):
    """One lazily created channel and stub, re-created in a forked child.

    Use `stub` only inside ``with GATE:``. The channel is created on first
    use, never at construction. When the process id changes (a fork), the
    old channel is retired untouched and a new one is made.
    """

    @property
    def channel(self) -> grpc.Channel | None:
        """The current channel, or None before first use and after a fork."""
        channel: grpc.Channel | None = self._channel
        return channel

    def stub(self) -> BrokerStub:
        """The stub for this process's channel, creating it if need be."""
        self._check_open()
        stub: BrokerStub | None = self._stub
        if stub is not None and self._pid == os.getpid():
            return stub
        with self._lock:
            if self._stub is None or self._pid != os.getpid():
                self._create()
            stub = self._stub
            assert stub is not None
            return stub

    def _create(self) -> None:
        import grpc

        from broker_client.proto.broker.v1.broker_pb2_grpc import BrokerStub

        channel = self._new_channel(grpc)
        self._channel = channel
        self._stub = BrokerStub(channel)

    def close(self) -> None:
        channel = self._release()
        if channel is not None:
            with GATE:
                channel.close()


class AsyncChannelHolder(_Holder):
    """One lazily created grpc.aio channel, bound to the event loop that made it.

    The channel is made by the first call, inside the running loop. Calls
    from any other loop are refused: a grpc.aio channel cannot move between
    loops. After a fork the parent's channel is retired untouched and the
    child makes its own, unless grpc.aio cannot work in the child (see the
    module docstring), which is then refused with the reason.
    """

    _closed_message = "cannot use an AsyncBrokerClient after close()"

    def __init__(
        self,
        target: str,
        options: Sequence[tuple[str, Any]],
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        super().__init__(target, options, credentials)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def channel(self) -> grpc.aio.Channel | None:
        """The current channel, or None before first use, after close() and after a fork."""
        channel: grpc.aio.Channel | None = self._channel
        return channel

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the current channel belongs to."""
        return self._loop

    def stub(self) -> BrokerAsyncStub:
        """The stub for this process's channel in the running loop, creating it if need be."""
        import asyncio

        self._check_open()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stub is None or self._pid != os.getpid():
                self._create(loop)
            elif self._loop is not loop:
                from broker_client.errors import InvalidOperation

                raise InvalidOperation(
                    "this AsyncBrokerClient's channel belongs to the event loop it first ran in, "
                    "and this call runs in another one (a grpc.aio channel cannot move between "
                    "loops). Make one AsyncBrokerClient per event loop, e.g. inside the coroutine "
                    "given to asyncio.run(), and close it there with `await client.close()`."
                )
            stub: BrokerAsyncStub = self._stub
            return stub

    def _create(self, loop: asyncio.AbstractEventLoop) -> None:
        if _aio_open_at_fork is not None:
            from broker_client.errors import InvalidOperation

            raise InvalidOperation(
                f"this process was forked from process {_aio_open_at_fork} while an "
                "AsyncBrokerClient there had an open channel: grpc.aio cannot work in such a "
                "child (its poller thread did not survive the fork, see broker_client/_channel.py). "
                "In the parent, `await client.close()` before forking, or fork before the first "
                "call; or use the sync BrokerClient in the child, which is unaffected."
            )
        import grpc.aio

        from broker_client.proto.broker.v1.broker_pb2_grpc import BrokerStub

        channel = self._new_channel(grpc.aio)
        self._channel = channel
        self._stub = BrokerStub(channel)
        self._loop = loop

    def _retire_after_fork(self) -> bool:
        self._loop = None
        return super()._retire_after_fork()

    async def close(self) -> None:
        """Close this process's channel; later calls raise InvalidOperation.

        In the channel's own loop this awaits grpc's close, which cancels
        calls in flight. From another loop, or none, the channel cannot be
        awaited: every reference is dropped and grpc closes it when it is
        collected. Either way no reference stays here, so that grpc.aio's
        poller thread stops once no channel is left (see above).
        """
        import asyncio

        loop, self._loop = self._loop, None
        channel = self._release()
        if channel is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop and loop is not None:
            await channel.close()
