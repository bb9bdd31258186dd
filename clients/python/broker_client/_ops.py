"""The calls both clients make, written once as plans that do no I/O.

A plan is a generator. It yields the steps it needs run (`Unary`, `OpenFind`,
`ReadFind`, `Sleep`), is sent each step's result, or is thrown the
`BrokerError` the step raised, and returns the operation's result.
``BrokerClient`` runs plans with blocking gRPC and ``time.sleep``,
``AsyncBrokerClient`` with grpc.aio and ``asyncio.sleep`` (each one's
``_run``). The request building, the retry rules and the insert bookkeeping
therefore exist once, for both (the "sans-I/O" style of h11 and h2).

grpc, the generated modules and the result classes are imported inside
functions: this module is imported with the package, and importing it must
stay cheap.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeAlias, TypeVar

import bson
from bson.codec_options import CodecOptions

from broker_client import _requests
from broker_client.errors import BrokerError, DuplicateKeyError
from broker_client.retry import RetryState

if TYPE_CHECKING:
    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, PingResult

__all__ = [
    "Op",
    "OpenFind",
    "Plan",
    "ReadFind",
    "Sleep",
    "Stepper",
    "Unary",
    "WriteConcernSpec",
    "acknowledged",
    "check_count",
    "counted",
    "find_all_plan",
    "find_one_plan",
    "insert_plan",
    "insert_template",
    "ping_plan",
    "stats_plan",
    "unary_plan",
]

_T = TypeVar("_T")
INT32_MAX: Final = 2**31 - 1
_WRITE_CONCERN_KEYS: Final = frozenset({"w", "j", "wtimeout"})


# --- the steps a plan asks for ------------------------------------------------


# Plain classes rather than dataclasses: four dataclasses cost about 2 ms of
# import time, and these are built and read only here and in the clients.


class Unary:
    """Call the unary method ``method`` (``"Insert"``, ``"Ping"``, ...); result: its response."""

    __slots__ = ("method", "request", "timeout")

    def __init__(self, method: str, request: Any, timeout: float) -> None:
        self.method = method
        self.request = request
        self.timeout = timeout


class OpenFind:
    """Start a Find stream; result: the call, to pass to `ReadFind`."""

    __slots__ = ("request", "timeout")

    def __init__(self, request: broker_pb2.FindRequest, timeout: float) -> None:
        self.request = request
        self.timeout = timeout


class ReadFind:
    """Read the next message of a Find stream; result: it, or None at the end."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream


class Sleep:
    """Pause before a retry; result: None."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Op: TypeAlias = Unary | OpenFind | ReadFind | Sleep
Plan: TypeAlias = Generator[Op, Any, _T]


class Stepper(Generic[_T]):
    """Drives a plan: ``next()`` gives the step to run (None when done), then
    ``sent(result)`` or ``failed(error)`` reports how it went.

    The clients' ``_run`` loops are this, with their own way to run a step.
    """

    __slots__ = ("_error", "_plan", "_value", "result")

    def __init__(self, plan: Plan[_T]) -> None:
        self._plan = plan
        self._value: Any = None
        self._error: BrokerError | None = None
        self.result: _T

    def next(self) -> Op | None:
        try:
            if self._error is not None:
                error, self._error = self._error, None
                return self._plan.throw(error)
            value, self._value = self._value, None
            return self._plan.send(value)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def sent(self, value: Any) -> None:
        self._value = value

    def failed(self, error: BrokerError) -> None:
        self._error = error


def counted(state: RetryState, plan: Plan[_T]) -> Plan[_T]:
    """``plan``, whose escaping BrokerError says how many attempts were made."""
    try:
        return (yield from plan)
    except BrokerError as exc:
        exc.attempts = state.attempts
        raise


# --- plans ------------------------------------------------------------------------


def unary_plan(method: str, request: Any, state: RetryState) -> Plan[Any]:
    """One unary call, retried as ``state``'s policy allows; result: the response."""
    while True:
        try:
            return (yield Unary(method, request, state.next_timeout()))
        except BrokerError as exc:
            yield Sleep(state.backoff(exc))


def ping_plan(request: broker_pb2.PingRequest, state: RetryState) -> Plan[PingResult]:
    response = yield from unary_plan("Ping", request, state)
    return _requests.ping_result(response, state.attempts)


def stats_plan(request: broker_pb2.StatsRequest, state: RetryState) -> Plan[BrokerStats]:
    response = yield from unary_plan("Stats", request, state)
    return _requests.stats_result(response, state.attempts)


def find_all_plan(request: broker_pb2.FindRequest, state: RetryState) -> Plan[list[bytes]]:
    """Every document of a Find, as BSON.

    A failure anywhere in the stream may restart it from the beginning:
    nothing reaches the caller before the end, so nothing can be handed
    over twice.
    """
    while True:
        documents: list[bytes] = []
        try:
            stream = yield OpenFind(request, state.next_timeout())
            while (response := (yield ReadFind(stream))) is not None:
                documents.extend(response.documents)
        except BrokerError as exc:
            yield Sleep(state.backoff(exc))
            continue
        return documents


def find_one_plan(request: broker_pb2.FindRequest, state: RetryState) -> Plan[list[bytes]]:
    """The first matching document (a list of zero or one BSON document): one unary FindOne call."""
    response = yield from unary_plan("FindOne", request, state)
    return list(response.documents)


def insert_plan(
    template: broker_pb2.InsertRequest,
    documents: list[bytes],
    made_ids: list[Any],
    id_codec_options: CodecOptions[dict[str, Any]],
    state: RetryState,
) -> Plan[list[Any]]:
    """Insert ``documents`` (``template`` holds the rest of the request); result: every ``_id``.

    ``made_ids[i]`` is the ObjectId this client made for document ``i`` in
    this call, or None (the caller's id, or a RawBSONDocument's, made by the
    broker). The rules, which keep a retry from storing a document twice:

    - Retried only when every id was made here (and the write concern is
      acknowledged), on the errors and within
      the limits of ``state`` (UNAVAILABLE, POOL_EXHAUSTED). Any other
      insert is sent once.
    - After an attempt whose outcome is unknown, a DuplicateKeyError on a
      later attempt may be that attempt's own documents. The ids are new
      ObjectIds, so the broker is asked which of them are stored (one Find
      on ``_id``): an id of ours that is there can only have been stored by
      this call. Ordered: the documents up to and including the failed one
      must be there, and the ones after it that are not are sent next.
      Unordered: every document was tried, so all must be there. Otherwise,
      or when that Find fails, the DuplicateKeyError is raised: it is a real
      conflict (another unique index) or cannot be told from one.
    - The error's ``inserted_count`` and ``failed_index`` always count in
      the caller's list, not in the last attempt's.
    """
    total = len(documents)
    retry_safe = acknowledged(template) and all(made is not None for made in made_ids)
    pending = list(range(total))  # documents not known to be stored
    maybe_stored = False  # an attempt of `pending` ended without an answer
    while True:
        request = _insert_request(template, [documents[i] for i in pending])
        try:
            response = yield Unary("Insert", request, state.next_timeout())
        except BrokerError as exc:
            _rebase(exc, pending, total)
            if not retry_safe:
                raise
            if isinstance(exc, DuplicateKeyError) and maybe_stored:
                pending = yield from _not_yet_stored(
                    exc, pending, template, made_ids, id_codec_options=id_codec_options, state=state
                )
                if pending:
                    continue
                return list(made_ids)
            delay = state.backoff(exc)
            maybe_stored = True
            yield Sleep(delay)
            continue
        if retry_safe:
            return list(made_ids)
        return [_requests.decode_id(raw, id_codec_options) for raw in response.inserted_ids]


def _rebase(exc: BrokerError, pending: list[int], total: int) -> None:
    """Make a failed attempt's ``failed_index`` and ``inserted_count`` count in the caller's list."""
    if len(pending) == total:
        return
    failed, inserted = exc.failed_index, exc.inserted_count
    if failed is not None and 0 <= failed < len(pending):
        exc.metadata["failed_index"] = str(pending[failed])
    if inserted is not None:
        exc.metadata["inserted_count"] = str(total - len(pending) + inserted)


def _not_yet_stored(
    exc: DuplicateKeyError,
    pending: list[int],
    template: broker_pb2.InsertRequest,
    made_ids: list[Any],
    *,
    id_codec_options: CodecOptions[dict[str, Any]],
    state: RetryState,
) -> Plan[list[int]]:
    """Which of ``pending`` still need sending after ``exc``; raises ``exc`` when in doubt."""
    ordered = template.ordered
    if ordered:
        failed = exc.failed_index
        if failed is None or failed not in pending:
            raise exc
        cut = pending.index(failed) + 1
        must_be_stored, rest = pending[:cut], pending[cut:]
    else:
        must_be_stored, rest = pending, []
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.FindRequest(
        database=template.database,
        collection=template.collection,
        filter=bson.encode({"_id": {"$in": [made_ids[i] for i in pending]}}, codec_options=id_codec_options),
        projection=bson.encode({"_id": 1}),
    )
    # Its own attempts (they are not inserts), within the same deadline.
    read = RetryState(state.policy, state.deadline, "Find (was the insert stored?)")
    try:
        raw = yield from find_all_plan(request, read)
    except BrokerError as read_error:
        raise exc from read_error
    stored = {doc["_id"] for doc in _requests.decode_batch(raw, id_codec_options)}
    missing = [i for i in must_be_stored if made_ids[i] not in stored]
    if missing:
        if not ordered:
            exc.metadata["failed_index"] = str(missing[0])
            exc.metadata["inserted_count"] = str(len(made_ids) - len(missing))
        raise exc
    return [i for i in rest if made_ids[i] not in stored]


def _insert_request(template: broker_pb2.InsertRequest, documents: list[bytes]) -> broker_pb2.InsertRequest:
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.InsertRequest(documents=documents)
    request.MergeFrom(template)
    return request


# --- requests ---------------------------------------------------------------------


class _HasDocument(Protocol):
    """pymongo's ``WriteConcern`` (or anything with its ``document``)."""

    @property
    def document(self) -> Mapping[str, Any]: ...


#: ``{"w": 1 | "majority", "j": bool, "wtimeout": ms}`` or a pymongo WriteConcern.
WriteConcernSpec: TypeAlias = Mapping[str, Any] | _HasDocument


def check_count(value: object, name: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an instance of int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, not {value}")
    return value


def insert_template(
    database: str,
    collection: str,
    ordered: bool,
    bypass_document_validation: bool,
    write_concern: WriteConcernSpec | None,
) -> broker_pb2.InsertRequest:
    """An InsertRequest without its documents."""
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.InsertRequest(
        database=database,
        collection=collection,
        ordered=bool(ordered),
        bypass_document_validation=bool(bypass_document_validation),
    )
    concern = _write_concern(write_concern)
    if concern is not None:
        request.write_concern.CopyFrom(concern)
    return request


def acknowledged(template: broker_pb2.InsertRequest) -> bool:
    """False for write concern ``w=0`` (which the broker refuses): nothing would be confirmed."""
    concern = template.write_concern
    return not (
        template.HasField("write_concern") and concern.WhichOneof("w") == "w_nodes" and concern.w_nodes == 0
    )


def _write_concern(spec: WriteConcernSpec | None) -> broker_pb2.WriteConcern | None:
    """The proto WriteConcern; None for the broker's default."""
    if spec is None:
        return None
    from broker_client.proto.broker.v1 import broker_pb2

    document: Mapping[str, Any] = spec if isinstance(spec, Mapping) else spec.document
    unknown = set(document) - _WRITE_CONCERN_KEYS
    if unknown:
        raise ValueError(
            f"write_concern has unsupported key(s) {sorted(unknown)}; use w, j and wtimeout (ms)"
        )
    message = broker_pb2.WriteConcern()
    w = document.get("w")
    if w is not None:
        if isinstance(w, bool) or not isinstance(w, int | str):
            raise TypeError(f"write_concern w must be an int or a tag such as 'majority', not {w!r}")
        if isinstance(w, int):
            message.w_nodes = check_count(w, "write_concern w", INT32_MAX)
        else:
            message.w_tag = w
    j = document.get("j")
    if j is not None:
        if not isinstance(j, bool):
            raise TypeError(f"write_concern j must be a bool, not {j!r}")
        message.j = j
    wtimeout = document.get("wtimeout")
    if wtimeout is not None:
        message.wtimeout_ms = check_count(wtimeout, "write_concern wtimeout")
    return message
