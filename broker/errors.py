"""The one table from errors to gRPC status codes, with google.rpc details.

Every failure a caller can see passes through `to_rpc_error`, so the status
codes are chosen in one place and the README's table can be checked against
it. Each status carries a `google.rpc.ErrorInfo` (domain "mongo-broker") with
a machine-readable reason and, where MongoDB said something, its error code,
code name and error labels, so clients can retry the right things.

A known error never becomes UNKNOWN or INTERNAL. INTERNAL is reserved for a
bug in the broker itself, and is logged with its traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import grpc
from broker_client.proto.broker.v1 import broker_pb2
from bson import json_util
from bson.errors import BSONError
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from pymongo import errors as mongo_errors

__all__ = [
    "DOMAIN",
    "Reason",
    "RpcError",
    "UnknownDatabaseError",
    "bulk_write_error",
    "invalid_argument",
    "to_rpc_error",
]

log = logging.getLogger("mongo_broker.errors")

DOMAIN: Final = "mongo-broker"


def _reason(value: broker_pb2.ErrorReason.ValueType) -> str:
    return broker_pb2.ErrorReason.Name(value)


class _StatusFields(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _Status(_StatusFields, grpc.Status):
    """What ``abort_with_status`` takes: a code, a message and the trailers."""


class Reason:
    """`ErrorInfo.reason` values: the names of the contract's ErrorReason enum.

    Stable, so clients may switch on them; a unit test keeps this list and
    the enum equal.
    """

    DUPLICATE_KEY: Final = _reason(broker_pb2.DUPLICATE_KEY)
    DATABASE_UNAVAILABLE: Final = _reason(broker_pb2.DATABASE_UNAVAILABLE)
    TIMEOUT: Final = _reason(broker_pb2.TIMEOUT)
    POOL_EXHAUSTED: Final = _reason(broker_pb2.POOL_EXHAUSTED)
    INVALID_REQUEST: Final = _reason(broker_pb2.INVALID_REQUEST)
    INVALID_BSON: Final = _reason(broker_pb2.INVALID_BSON)
    INVALID_JSON: Final = _reason(broker_pb2.INVALID_JSON)
    QUERY_REJECTED: Final = _reason(broker_pb2.QUERY_REJECTED)
    UNKNOWN_DATABASE: Final = _reason(broker_pb2.UNKNOWN_DATABASE)
    NOT_AUTHORIZED: Final = _reason(broker_pb2.NOT_AUTHORIZED)
    UNAUTHENTICATED: Final = _reason(broker_pb2.UNAUTHENTICATED)
    LIMIT_EXCEEDED: Final = _reason(broker_pb2.LIMIT_EXCEEDED)
    SHUTTING_DOWN: Final = _reason(broker_pb2.SHUTTING_DOWN)
    CURSOR_LOST: Final = _reason(broker_pb2.CURSOR_LOST)
    NOT_SUPPORTED: Final = _reason(broker_pb2.NOT_SUPPORTED)
    OPERATION_FAILED: Final = _reason(broker_pb2.OPERATION_FAILED)
    INTERNAL: Final = _reason(broker_pb2.INTERNAL)


class RpcError(Exception):
    """A failure with its gRPC code, an actionable message and ErrorInfo details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s

    def to_status(self, metadata: Sequence[tuple[str, str]] = ()) -> grpc.Status:
        """The status with its rich details, plus ``metadata`` in the trailers."""
        details: list[Any] = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        ]
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            item = any_pb2.Any()
            item.Pack(detail)
            packed.append(item)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        converted = rpc_status.to_status(status)
        if not metadata:
            return converted
        return _Status(converted.code, converted.details, (*converted.trailing_metadata, *metadata))

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r}, reason={self.reason})"


class UnknownDatabaseError(RpcError):
    """NOT_FOUND: a call named a database that is not configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        # ``known`` is what the caller may use, not everything configured.
        listed = ", ".join(repr(n) for n in known) or "none"
        super().__init__(
            grpc.StatusCode.NOT_FOUND,
            f"database {name!r} is not configured on this broker; configured for this caller: {listed}",
            Reason.UNKNOWN_DATABASE,
            {"database": name},
        )


def invalid_argument(message: str, reason: str = Reason.INVALID_REQUEST) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


# MongoDB error codes by the gRPC code they map to, with their names in
# https://github.com/mongodb/mongo/blob/master/src/mongo/base/error_codes.yml
# (the names fill in mongo_code_name where the server sends none: a write
# error in an insert's writeErrors has a code but no codeName).
_DUPLICATE_KEY_CODES: Final[Mapping[int, str]] = {
    11000: "DuplicateKey",
    # Legacy duplicate-key codes of old servers; error_codes.yml has no name for them.
    11001: "",
    12582: "",
}
_TIMEOUT_CODES: Final[Mapping[int, str]] = {
    50: "MaxTimeMSExpired",
    64: "WriteConcernFailed",  # wtimeout
    202: "NetworkInterfaceExceededTimeLimit",
    262: "ExceededTimeLimit",
}
_UNAVAILABLE_CODES: Final[Mapping[int, str]] = {
    6: "HostUnreachable",
    7: "HostNotFound",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    189: "PrimarySteppedDown",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
}
_PERMISSION_CODES: Final[Mapping[int, str]] = {13: "Unauthorized"}
_CURSOR_LOST_CODES: Final[Mapping[int, str]] = {43: "CursorNotFound", 237: "CursorKilled"}
_UNSUPPORTED_CODES: Final[Mapping[int, str]] = {115: "CommandNotSupported", 238: "NotImplemented"}
_BAD_INPUT_CODES: Final[Mapping[int, str]] = {
    2: "BadValue",  # unknown operator, bad operand
    9: "FailedToParse",
    14: "TypeMismatch",
    22: "InvalidBSON",
    52: "DollarPrefixedFieldName",
    53: "InvalidIdField",
    56: "EmptyFieldName",
    57: "DottedFieldName",
    73: "InvalidNamespace",
    121: "DocumentValidationFailure",
    10334: "BSONObjectTooLarge",
    # Assertion codes without a name of their own are reported as "Location<code>".
    17287: "Location17287",  # cannot canonicalize query
    51091: "Location51091",  # invalid regular expression
}
_CODE_NAMES: Final[Mapping[int, str]] = {
    code: name
    for table in (
        _DUPLICATE_KEY_CODES,
        _TIMEOUT_CODES,
        _UNAVAILABLE_CODES,
        _PERMISSION_CODES,
        _CURSOR_LOST_CODES,
        _UNSUPPORTED_CODES,
        _BAD_INPUT_CODES,
    )
    for code, name in table.items()
    if name
}


def _labels(exc: mongo_errors.PyMongoError) -> dict[str, str]:
    """``mongo_labels``: the error's labels, the server's and those pymongo adds.

    pymongo keeps them in ``_error_labels`` (public only as ``has_error_label``):
    a server's ``errorLabels``, and labels it adds itself, such as
    RetryableWriteError on a network error during a write. Network errors are
    not OperationFailures, so this is read for every PyMongoError.
    """
    labels = sorted(getattr(exc, "_error_labels", ()) or ())
    return {"mongo_labels": ",".join(labels)} if labels else {}


def _mongo_metadata(
    code: int | None, exc: mongo_errors.PyMongoError, error: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``mongo_code``, ``mongo_code_name`` and ``mongo_labels`` of a database error.

    ``error`` is the server's error document when it is not ``exc.details``
    (an insert's first write error).
    """
    meta: dict[str, str] = {}
    if code is not None:
        meta["mongo_code"] = str(code)
    details = error if error is not None else getattr(exc, "details", None)
    name = details.get("codeName") if isinstance(details, Mapping) else None
    if not isinstance(name, str) or not name:
        name = _CODE_NAMES.get(code) if code is not None else None
    if name:
        meta["mongo_code_name"] = name
    meta.update(_labels(exc))
    return meta


def _status_for_code(code: int | None, code_name: str = "") -> tuple[grpc.StatusCode, str]:
    if code in _CURSOR_LOST_CODES:
        # A getMore is not retryable: the stream must be restarted by the caller.
        return grpc.StatusCode.ABORTED, Reason.CURSOR_LOST
    if code in _DUPLICATE_KEY_CODES:
        return grpc.StatusCode.ALREADY_EXISTS, Reason.DUPLICATE_KEY
    if code in _TIMEOUT_CODES:
        return grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT
    if code in _UNAVAILABLE_CODES:
        return grpc.StatusCode.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE
    if code in _PERMISSION_CODES:
        return grpc.StatusCode.PERMISSION_DENIED, Reason.NOT_AUTHORIZED
    if code in _UNSUPPORTED_CODES:
        return grpc.StatusCode.UNIMPLEMENTED, Reason.NOT_SUPPORTED
    # "LocationNNNNN" codes are the server's assertions on the shape of a
    # request (a bad sort key, a malformed operator), so they are bad input.
    if code in _BAD_INPUT_CODES or code_name.startswith("Location"):
        return grpc.StatusCode.INVALID_ARGUMENT, Reason.QUERY_REJECTED
    # The database refused the operation for a reason not in the table: the
    # request may be fine and the state of the database not (see mongo_code).
    return grpc.StatusCode.FAILED_PRECONDITION, Reason.OPERATION_FAILED


# What a partly failed write reports in its ErrorInfo metadata, from the
# server's counts: key in the metadata, key in pymongo's BulkWriteError.details.
_BULK_COUNTS: Final = (
    ("inserted_count", "nInserted"),
    ("matched_count", "nMatched"),
    ("modified_count", "nModified"),
    ("deleted_count", "nRemoved"),
    ("upserted_count", "nUpserted"),
)
# The write errors and upserted ids listed in the metadata are cut to about
# this many bytes each: ErrorInfo travels in the call's trailers, which gRPC
# limits to 8-16 KiB, and a status too large for them would reach the
# client as a bare INTERNAL error instead of this one.
_LISTED_BYTES: Final = 4096
_ERRMSG_CHARS: Final = 200


def _listed(items: Sequence[Any], encode: Callable[[Any], str]) -> str:
    """A JSON array of as many of ``items`` as fit in _LISTED_BYTES."""
    parts: list[str] = []
    size = 2
    for item in items:
        text = encode(item)
        if size + len(text) + 1 > _LISTED_BYTES:
            break
        parts.append(text)
        size += len(text) + 1
    return "[" + ",".join(parts) + "]"


def _write_error_json(error: Any) -> str:
    if not isinstance(error, Mapping):
        return json.dumps({"errmsg": str(error)[:_ERRMSG_CHARS]})
    code = error.get("code")
    entry = {
        "index": error.get("index"),
        "code": code,
        "codeName": error.get("codeName") or (_CODE_NAMES.get(code, "") if isinstance(code, int) else ""),
        "errmsg": str(error.get("errmsg", ""))[:_ERRMSG_CHARS],
    }
    return json.dumps(entry)


def _upserted_json(item: Any) -> str:
    if not isinstance(item, Mapping):
        return "{}"
    # The index as a plain number, the _id in canonical form to keep its type.
    _id = json_util.dumps(item.get("_id"), json_options=json_util.CANONICAL_JSON_OPTIONS)
    return f'{{"index": {json.dumps(item.get("index"))}, "_id": {_id}}}'


def bulk_write_error(exc: mongo_errors.BulkWriteError, database: str, noun: str = "document") -> RpcError:
    """The RpcError of an insert_many or bulk_write that failed part-way: what landed, and why not the rest.

    ``noun`` names what the index counts: an Insert's documents (metadata:
    inserted_count and failed_index), or a BulkWrite's operations (also every
    count, the write errors and the upserted ids, see the contract).
    """
    details: Mapping[str, Any] = exc.details or {}
    write_errors = details.get("writeErrors") or []
    first = write_errors[0] if write_errors and isinstance(write_errors[0], Mapping) else {}
    code = first.get("code")
    code = code if isinstance(code, int) else None
    grpc_code, reason = _status_for_code(code)
    meta = _mongo_metadata(code, exc, first or None)
    meta["database"] = database
    counts = {key: str(int(details.get(server_key, 0) or 0)) for key, server_key in _BULK_COUNTS}
    meta["inserted_count"] = counts["inserted_count"]
    if "index" in first:
        meta["failed_index"] = str(first["index"])
    if noun == "document":
        done = f"{counts['inserted_count']} document(s) inserted"
    else:
        meta.update(counts)
        done = ", ".join(f"{value} {key.removesuffix('_count')}" for key, value in counts.items())
        if upserted := details.get("upserted") or []:
            meta["upserted_ids"] = _listed(upserted, _upserted_json)
        if write_errors:
            meta["write_errors"] = _listed(write_errors, _write_error_json)
            meta["write_errors_total"] = str(len(write_errors))
    concern_errors = details.get("writeConcernErrors") or []
    if concern_errors:
        concern = concern_errors[0]
        text = concern.get("errmsg", "") if isinstance(concern, Mapping) else str(concern)
        meta["write_concern_error"] = str(text)[:_ERRMSG_CHARS]
    if write_errors:
        errmsg = first.get("errmsg", str(exc)) if first else str(exc)
        message = (
            f"write failed at {noun} {meta.get('failed_index', '?')}: {errmsg} "
            f"({done}, {len(write_errors)} write error(s))"
        )
        return RpcError(grpc_code, message, reason, meta)
    message = f"write concern failed: {meta.get('write_concern_error') or exc} ({done})"
    return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, message, Reason.TIMEOUT, meta)


def to_rpc_error(exc: BaseException, *, database: str = "", deadline_passed: bool = False) -> RpcError:
    """Map any exception raised while serving a call to its RpcError.

    ``deadline_passed`` says the call's time limit had run out when the error
    was raised, which turns timeout-flavoured errors into DEADLINE_EXCEEDED.
    """
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, BSONError):
        return invalid_argument(f"invalid BSON: {exc}", Reason.INVALID_BSON)
    if not isinstance(exc, mongo_errors.PyMongoError):
        log.error("unexpected error serving a call for %r", database, exc_info=exc)
        return RpcError(
            grpc.StatusCode.INTERNAL,
            f"internal broker error ({type(exc).__name__}); see the broker log",
            Reason.INTERNAL,
        )

    where = f" (database {database!r})" if database else ""
    meta: dict[str, str] = {"database": database} if database else {}
    meta.update(_labels(exc))

    # Order matters: the specific classes come before their base classes.
    if isinstance(exc, mongo_errors.WaitQueueTimeoutError):
        return RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"no pool connection became free in time{where}: the pool is saturated; "
            "back off and retry, or raise max_pool_size",
            Reason.POOL_EXHAUSTED,
            meta,
        )
    if isinstance(exc, mongo_errors.BulkWriteError):
        return bulk_write_error(exc, database)
    if isinstance(exc, mongo_errors.OperationFailure):
        code = exc.code
        meta.update(_mongo_metadata(code, exc))
        grpc_code, reason = _status_for_code(code, meta.get("mongo_code_name", ""))
        if isinstance(exc, mongo_errors.ExecutionTimeout) or (exc.timeout and deadline_passed):
            return RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the call's time limit ran out{where}: {_first_line(exc)}",
                Reason.TIMEOUT,
                meta,
            )
        return RpcError(grpc_code, f"{_server_message(exc)}{where}", reason, meta)
    if exc.timeout and deadline_passed:
        return RpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the call's time limit ran out before the database answered{where}",
            Reason.TIMEOUT,
            meta,
        )
    if isinstance(exc, mongo_errors.ServerSelectionTimeoutError):
        return RpcError(
            grpc.StatusCode.UNAVAILABLE,
            f"the database is unreachable{where}: no server answered within "
            f"server_selection_timeout_ms; retry later. Driver said: {_first_line(exc)}",
            Reason.DATABASE_UNAVAILABLE,
            meta,
        )
    if isinstance(exc, mongo_errors.NetworkTimeout):
        return RpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the database did not answer in time{where}: {_first_line(exc)}",
            Reason.TIMEOUT,
            meta,
        )
    if isinstance(exc, mongo_errors.ConnectionFailure):
        return RpcError(
            grpc.StatusCode.UNAVAILABLE,
            f"lost the connection to the database{where}; the operation may not have "
            f"completed; retry reads freely and writes with a client-generated _id. "
            f"Driver said: {_first_line(exc)}",
            Reason.DATABASE_UNAVAILABLE,
            meta,
        )
    if isinstance(exc, mongo_errors.InvalidName | mongo_errors.DocumentTooLarge):
        return invalid_argument(f"{exc}{where}")
    if isinstance(exc, mongo_errors.InvalidOperation | mongo_errors.ConfigurationError):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}{where}", Reason.OPERATION_FAILED, meta)
    return RpcError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"the database driver refused the operation{where}: {_first_line(exc)}",
        Reason.OPERATION_FAILED,
        meta,
    )


def _server_message(exc: mongo_errors.OperationFailure) -> str:
    details = exc.details
    errmsg = details.get("errmsg") if isinstance(details, Mapping) else None
    return f"the database refused the operation: {errmsg or _first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    # Server selection errors append a whole topology description; the first
    # line (the address and the cause) is what a person needs.
    text = str(exc)
    return text.split(", Timeout:", 1)[0].splitlines()[0] if text else type(exc).__name__
