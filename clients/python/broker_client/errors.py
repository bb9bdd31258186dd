"""Exceptions named like pymongo's, built from the broker's gRPC status.

Every exception derives from `BrokerError`. Each one carries the gRPC code
(`BrokerError.code`, a ``grpc.StatusCode``), the message, and what the broker
put in the ``google.rpc.Status`` details: the ``ErrorInfo`` reason and
metadata (``mongo_code``, ``mongo_code_name``, ``mongo_labels``,
``database``, ``inserted_count``, ``failed_index``), and a ``RetryInfo``
delay where waiting helps.

Write errors are pymongo's too: `WriteError` (a failed update, replace,
delete or find-and-modify, and `DuplicateKeyError`) and `BulkWriteError`
(a failed ``bulk_write``) have pymongo's ``details``, built from the
broker's write-failure metadata (`write_error_details`,
`bulk_write_details`). Only ``code`` differs from pymongo: it is the gRPC
status code for every exception here; MongoDB's code is ``mongo_code``, and
``details["code"]``.

These classes do not subclass ``pymongo.errors``. Importing that module
imports all of pymongo (MongoClient, asyncio, ssl): about 45 ms more on top
of grpc and bson, measured with ``python -X importtime``. That is a heavy
price for a package meant for short-lived workers. The names and the
hierarchy are pymongo's, so migrating code changes its import line, not its
``except`` clauses.

Both clients map failures through ``with map_rpc_errors:`` around each
channel call, so the table below is the one way from a gRPC status to an
exception. This module imports neither grpc nor protobuf at import time.
The mapping looks codes up by name, and `from_rpc_error` only runs once an
RPC has failed, when grpc is loaded anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    import grpc

__all__ = [
    "AutoReconnect",
    "BrokerError",
    "BulkWriteError",
    "ConnectionFailure",
    "DuplicateKeyError",
    "ExecutionTimeout",
    "InvalidOperation",
    "InvalidRequest",
    "LimitExceeded",
    "OperationFailure",
    "PermissionDenied",
    "ServerSelectionTimeoutError",
    "Unauthenticated",
    "UnknownDatabase",
    "WaitQueueTimeoutError",
    "WriteError",
    "as_bulk_write_error",
    "as_write_error",
    "bulk_write_details",
    "from_rpc_error",
    "map_rpc_errors",
    "write_error_details",
]

DOMAIN: Final = "mongo-broker"


class BrokerError(Exception):
    """Base class of every error this package raises (pymongo: PyMongoError).

    Attributes:
        code: the gRPC status code (``grpc.StatusCode``), or None for errors
            raised by the client itself before any call.
        message: the status message, written for a person.
        reason: the broker's ``ErrorInfo.reason`` (e.g. "DUPLICATE_KEY"), or
            "" when the status came from gRPC itself (no broker listening).
        metadata: the ``ErrorInfo`` metadata, a dict of strings.
        status_details: every ``google.rpc.Status`` detail, unpacked where
            the type is known (``ErrorInfo``, ``RetryInfo``), else the packed
            ``Any``. ``details`` is the same tuple, except on `WriteError` and
            `BulkWriteError`, where it is pymongo's ``details`` dict.
        retry_after: seconds the broker asks the caller to wait, or None.
        attempts: how many times the operation was sent before this error
            was raised (more than 1 after retries; 0 when the client raised
            it before sending anything).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        details: tuple[Any, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        # Only ``message`` goes into ``args``: unpickling calls ``cls(*args)``
        # and then restores ``__dict__``, so errors survive multiprocessing
        # result queues with every attribute.
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.status_details = details
        self.retry_after = retry_after
        self.attempts = 0

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        where = f"{self.code.name}, {self.reason}" if self.reason else self.code.name
        return f"{self.message} ({where})"

    def __repr__(self) -> str:
        code = self.code.name if self.code is not None else None
        return f"{type(self).__name__}({self.message!r}, code={code}, reason={self.reason!r})"

    @property
    def details(self) -> Any:
        """The ``google.rpc.Status`` details (`status_details`); pymongo's dict on write errors."""
        return self.status_details

    @property
    def mongo_code(self) -> int | None:
        """MongoDB's error code (e.g. 11000), when MongoDB gave one."""
        return _int_or_none(self.metadata.get("mongo_code"))

    @property
    def mongo_code_name(self) -> str | None:
        """MongoDB's code name (e.g. "DuplicateKey"), when MongoDB gave one."""
        return self.metadata.get("mongo_code_name") or None

    @property
    def labels(self) -> frozenset[str]:
        """MongoDB's error labels (e.g. "RetryableWriteError")."""
        raw = self.metadata.get("mongo_labels", "")
        return frozenset(label.strip() for label in raw.split(",") if label.strip())

    def has_error_label(self, label: str) -> bool:
        """pymongo's spelling of ``label in error.labels``."""
        return label in self.labels

    @property
    def database(self) -> str | None:
        """The configured database name the failed call used."""
        return self.metadata.get("database") or None

    @property
    def inserted_count(self) -> int | None:
        """For a failed insert: how many documents were inserted before it failed."""
        return _int_or_none(self.metadata.get("inserted_count"))

    @property
    def failed_index(self) -> int | None:
        """For a failed insert: the index of the document that failed."""
        return _int_or_none(self.metadata.get("failed_index"))

    @property
    def timeout(self) -> bool:
        """True when a time limit ran out (pymongo's ``PyMongoError.timeout``)."""
        return self.code is not None and self.code.name == "DEADLINE_EXCEEDED"


class InvalidOperation(BrokerError):
    """The client was used wrongly: after close(), or a cursor after fork()."""


class ConnectionFailure(BrokerError):
    """The broker or its database could not be reached or could not serve."""


class AutoReconnect(ConnectionFailure):
    """Transient: retrying may succeed (reads freely; writes with a client ``_id``)."""


class ServerSelectionTimeoutError(AutoReconnect):
    """UNAVAILABLE: no broker listening, the database unreachable, or draining."""


class WaitQueueTimeoutError(ConnectionFailure):
    """RESOURCE_EXHAUSTED: the broker's pool or queue is saturated. Back off."""


class OperationFailure(BrokerError):
    """The operation was refused (FAILED_PRECONDITION, UNIMPLEMENTED, ...)."""


class ExecutionTimeout(OperationFailure):
    """DEADLINE_EXCEEDED: the call's time limit (``timeout=``) ran out."""


class WriteError(OperationFailure):
    """A write failed (pymongo's ``WriteError``).

    ``details`` is pymongo's: the write error as MongoDB reported it,
    ``{"index", "code", "codeName", "errmsg"}``.
    """

    @property
    def details(self) -> dict[str, Any]:
        return write_error_details(self)


class DuplicateKeyError(WriteError):
    """ALREADY_EXISTS: duplicate key. ``inserted_count`` says how many landed first."""


class BulkWriteError(OperationFailure):
    """A ``bulk_write`` failed part-way, or its write concern did (pymongo's ``BulkWriteError``).

    ``details`` is pymongo's: ``writeErrors`` (``[{"index", "code",
    "codeName", "errmsg"}]``, ``index`` in the list of operations),
    ``writeConcernErrors``, ``nInserted``, ``nUpserted``, ``nMatched``,
    ``nModified``, ``nRemoved`` and ``upserted`` (``[{"index", "_id"}]``):
    what landed before, or besides, the failure. As in pymongo, a duplicate
    key in a bulk write raises BulkWriteError too (``reason``
    "DUPLICATE_KEY", ``writeErrors[i]["code"]`` 11000), not
    DuplicateKeyError.
    """

    @property
    def details(self) -> dict[str, Any]:
        return bulk_write_details(self)


class InvalidRequest(OperationFailure):
    """INVALID_ARGUMENT: the request was malformed or refused as bad input."""


class LimitExceeded(OperationFailure):
    """A broker or gRPC size limit was hit (reason LIMIT_EXCEEDED, message size)."""


class UnknownDatabase(OperationFailure):
    """NOT_FOUND: the database name is not configured on the broker."""


class PermissionDenied(OperationFailure):
    """PERMISSION_DENIED: the token, the database or the query is not allowed."""


class Unauthenticated(OperationFailure):
    """UNAUTHENTICATED: tokens are configured and none, or a wrong one, was sent."""


_CLASS_BY_CODE: Final[Mapping[str, type[BrokerError]]] = {
    "ALREADY_EXISTS": DuplicateKeyError,
    "UNAVAILABLE": ServerSelectionTimeoutError,
    "DEADLINE_EXCEEDED": ExecutionTimeout,
    "RESOURCE_EXHAUSTED": WaitQueueTimeoutError,
    "INVALID_ARGUMENT": InvalidRequest,
    "NOT_FOUND": UnknownDatabase,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "FAILED_PRECONDITION": OperationFailure,
    "UNIMPLEMENTED": OperationFailure,
}


def _class_for(code_name: str, reason: str, message: str) -> type[BrokerError]:
    # RESOURCE_EXHAUSTED also means "too big", which backing off will not
    # fix: the broker's LIMIT_EXCEEDED, or gRPC's own message-size check
    # ("Received message larger than max (N vs. M)").
    if code_name == "RESOURCE_EXHAUSTED" and (reason == "LIMIT_EXCEEDED" or "larger than max" in message):
        return LimitExceeded
    return _CLASS_BY_CODE.get(code_name, BrokerError)


def from_rpc_error(error: grpc.RpcError) -> BrokerError:
    """The `BrokerError` for a failed gRPC call (a ``grpc.RpcError`` that is a ``grpc.Call``)."""
    code: grpc.StatusCode | None = getattr(error, "code", lambda: None)()
    message: str = getattr(error, "details", lambda: None)() or ""
    reason, metadata, details, retry_after = _status_details(error)
    code_name = code.name if code is not None else ""
    cls = _class_for(code_name, reason, message)
    return cls(
        message or code_name or "the call failed",
        code=code,
        reason=reason,
        metadata=metadata,
        details=details,
        retry_after=retry_after,
    )


class _MapRpcErrors:
    """``with map_rpc_errors:`` turns a ``grpc.RpcError`` raised inside into its `BrokerError`."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        # Looked up, not imported: until grpc is loaded nothing can raise an
        # RpcError, and a failure before the first call must not import it.
        grpc_module = sys.modules.get("grpc")
        if grpc_module is not None and isinstance(exc, grpc_module.RpcError):
            raise from_rpc_error(exc) from None


#: The error mapping of every call both clients make.
map_rpc_errors: Final = _MapRpcErrors()


def _status_details(
    error: grpc.RpcError,
) -> tuple[str, dict[str, str], tuple[Any, ...], float | None]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(cast("grpc.Call", error))
    except (ValueError, AttributeError, TypeError):
        # The details contradict the status line, or this is not a Call:
        # keep the code and message, which are always there.
        return "", {}, (), None
    if status is None:
        return "", {}, (), None
    reason = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    details: list[Any] = []
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            if info.domain == DOMAIN and not reason:
                reason = info.reason
                metadata = dict(info.metadata)
            details.append(info)
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            details.append(retry)
        else:
            details.append(packed)
    return reason, metadata, tuple(details), retry_after


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


# --- write failures -----------------------------------------------------------------

#: Metadata keys that say MongoDB reported write errors (or a write concern
#: error) for the call, rather than refusing it as a whole.
_WRITE_FAILURE_KEYS: Final = ("write_errors", "failed_index", "write_concern_error")


def _rebuilt(exc: BrokerError, cls: type[BrokerError]) -> BrokerError:
    new = cls(
        exc.message,
        code=exc.code,
        reason=exc.reason,
        metadata=exc.metadata,
        details=exc.status_details,
        retry_after=exc.retry_after,
    )
    new.attempts = exc.attempts
    return new.with_traceback(exc.__traceback__)


#: The statuses of a single write that MongoDB itself refused, by code and
#: reason: what pymongo raises as WriteError (mongod reports a bad update,
#: filter or hint of one statement as its write error).
_REFUSED_BY_MONGODB: Final = frozenset(
    {("FAILED_PRECONDITION", "OPERATION_FAILED"), ("INVALID_ARGUMENT", "QUERY_REJECTED")}
)


def as_write_error(exc: BrokerError) -> BrokerError:
    """``exc`` of an update, replace, delete or find-and-modify, as pymongo raises it.

    A MongoDB write error becomes a `WriteError`, unless it is one already
    (`DuplicateKeyError`): the metadata lists it (``write_errors``,
    ``failed_index``), or MongoDB refused the write with a code of its own
    (``mongo_code``, and a status in `_REFUSED_BY_MONGODB`). Anything else
    (a permission, a request the broker refused, a feature the server lacks,
    a timeout) is ``exc``.
    """
    if isinstance(exc, WriteError):
        return exc
    listed = any(key in exc.metadata for key in _WRITE_FAILURE_KEYS[:2])
    refused = (
        exc.code is not None
        and "mongo_code" in exc.metadata
        and (exc.code.name, exc.reason) in _REFUSED_BY_MONGODB
    )
    return _rebuilt(exc, WriteError) if listed or refused else exc


def as_bulk_write_error(exc: BrokerError) -> BrokerError:
    """``exc`` of a bulk write, as pymongo raises it: a `BulkWriteError` when MongoDB reported
    write errors or a write concern error (a duplicate key included), else ``exc``."""
    if isinstance(exc, BulkWriteError) or not any(key in exc.metadata for key in _WRITE_FAILURE_KEYS):
        return exc
    return _rebuilt(exc, BulkWriteError)


def _write_errors(error: BrokerError) -> list[dict[str, Any]]:
    """The ``write_errors`` metadata (a JSON array), each entry checked; [] when absent or bad."""
    import json

    raw = error.metadata.get("write_errors")
    if not raw:
        return []
    try:
        parsed = json.loads(raw)
    except ValueError:
        return []
    out: list[dict[str, Any]] = []
    for entry in parsed if isinstance(parsed, list) else ():
        if isinstance(entry, dict):
            out.append(
                {
                    "index": entry.get("index"),
                    "code": entry.get("code"),
                    "codeName": entry.get("codeName"),
                    "errmsg": entry.get("errmsg", ""),
                }
            )
    return out


def _first_write_error(error: BrokerError) -> dict[str, Any]:
    """The write error the metadata names first, or one made of ``failed_index`` and ``mongo_code``."""
    found = _write_errors(error)
    if found:
        return found[0]
    return {
        "index": error.failed_index if error.failed_index is not None else 0,
        "code": error.mongo_code,
        "codeName": error.mongo_code_name,
        "errmsg": error.message,
    }


def write_error_details(error: BrokerError) -> dict[str, Any]:
    """pymongo's ``WriteError.details``: the (first) write error, ``{"index", "code", "codeName",
    "errmsg"}``."""
    details = _first_write_error(error)
    # An insert that was resent in part counts its failed_index in the
    # caller's list (see _requests.Insert); the metadata's is the one to use.
    if error.failed_index is not None:
        details["index"] = error.failed_index
    return details


def bulk_write_details(error: BrokerError) -> dict[str, Any]:
    """pymongo's ``BulkWriteError.details``, from the broker's write-failure metadata.

    ``writeErrors`` holds what the broker sent, which may be cut short
    (``metadata["write_errors_total"]`` counts them all); when it sent none
    but named a failing index, that one is described from ``mongo_code``.
    ``upserted`` is decoded from canonical Extended JSON, so its ids keep
    their BSON types.
    """
    metadata = error.metadata
    write_errors = _write_errors(error)
    if not write_errors and "failed_index" in metadata:
        write_errors = [_first_write_error(error)]
    upserted: list[dict[str, Any]] = []
    raw_upserted = metadata.get("upserted_ids")
    if raw_upserted:
        from bson import json_util

        try:
            parsed = json_util.loads(raw_upserted)
        except ValueError:
            parsed = []
        for entry in parsed if isinstance(parsed, list) else ():
            if isinstance(entry, Mapping) and "index" in entry and "_id" in entry:
                upserted.append({"index": int(entry["index"]), "_id": entry["_id"]})
    concern = metadata.get("write_concern_error")
    return {
        "writeErrors": write_errors,
        "writeConcernErrors": [{"errmsg": concern}] if concern else [],
        "nInserted": _int_or_none(metadata.get("inserted_count")) or 0,
        "nUpserted": _int_or_none(metadata.get("upserted_count")) or 0,
        "nMatched": _int_or_none(metadata.get("matched_count")) or 0,
        "nModified": _int_or_none(metadata.get("modified_count")) or 0,
        "nRemoved": _int_or_none(metadata.get("deleted_count")) or 0,
        "upserted": upserted,
    }
