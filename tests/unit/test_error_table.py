"""The error table (broker.errors.to_rpc_error), one case per row, without a server."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from bson.errors import InvalidBSON
from pymongo import errors as mongo_errors

from broker.errors import Reason, RpcError, UnknownDatabaseError, bulk_write_error, to_rpc_error

Code = grpc.StatusCode


def _failure(code: int, name: str = "", labels: tuple[str, ...] = ()) -> mongo_errors.OperationFailure:
    details: dict[str, Any] = {"ok": 0, "errmsg": f"server error {code}", "code": code}
    if name:
        details["codeName"] = name
    if labels:
        details["errorLabels"] = list(labels)
    return mongo_errors.OperationFailure(f"server error {code}", code, details)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (43, (Code.ABORTED, Reason.CURSOR_LOST)),  # CursorNotFound
        (237, (Code.ABORTED, Reason.CURSOR_LOST)),  # CursorKilled
        (11000, (Code.ALREADY_EXISTS, Reason.DUPLICATE_KEY)),
        (50, (Code.DEADLINE_EXCEEDED, Reason.TIMEOUT)),  # MaxTimeMSExpired
        (64, (Code.DEADLINE_EXCEEDED, Reason.TIMEOUT)),  # WriteConcernFailed
        (91, (Code.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE)),  # ShutdownInProgress
        (10107, (Code.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE)),  # NotWritablePrimary
        (13, (Code.PERMISSION_DENIED, Reason.NOT_AUTHORIZED)),  # Unauthorized
        (115, (Code.UNIMPLEMENTED, Reason.NOT_SUPPORTED)),  # CommandNotSupported
        (238, (Code.UNIMPLEMENTED, Reason.NOT_SUPPORTED)),  # NotImplemented
        (2, (Code.INVALID_ARGUMENT, Reason.QUERY_REJECTED)),  # BadValue
        (121, (Code.INVALID_ARGUMENT, Reason.QUERY_REJECTED)),  # DocumentValidationFailure
        (26, (Code.FAILED_PRECONDITION, Reason.OPERATION_FAILED)),  # NamespaceNotFound: not listed
    ],
)
def test_each_mongodb_code_maps_to_its_row(code: int, expected: tuple[Code, str]) -> None:
    error = to_rpc_error(_failure(code), database="appdb")
    assert (error.code, error.reason) == expected
    assert error.metadata["mongo_code"] == str(code)
    assert error.metadata["database"] == "appdb"


def test_location_codes_are_bad_input_whatever_their_number() -> None:
    error = to_rpc_error(_failure(31254, "Location31254"))
    assert (error.code, error.reason) == (Code.INVALID_ARGUMENT, Reason.QUERY_REJECTED)


def test_a_timeout_flavoured_failure_is_deadline_exceeded_only_once_the_deadline_passed() -> None:
    # pymongo marks a server error caused by its own time limit as a timeout.
    failure = mongo_errors.ExecutionTimeout("operation exceeded time limit", 50, {"code": 50})
    assert to_rpc_error(failure).code == Code.DEADLINE_EXCEEDED
    timed_out = mongo_errors.NetworkTimeout("timed out")
    assert to_rpc_error(timed_out, deadline_passed=True).reason == Reason.TIMEOUT
    assert to_rpc_error(timed_out, deadline_passed=False).code == Code.DEADLINE_EXCEEDED


def test_driver_errors_map_to_their_rows() -> None:
    cases: list[tuple[BaseException, Code, str]] = [
        (mongo_errors.WaitQueueTimeoutError("pool"), Code.RESOURCE_EXHAUSTED, Reason.POOL_EXHAUSTED),
        (
            mongo_errors.ServerSelectionTimeoutError("db:27017: connection refused, Timeout: 5s"),
            Code.UNAVAILABLE,
            Reason.DATABASE_UNAVAILABLE,
        ),
        (mongo_errors.AutoReconnect("connection closed"), Code.UNAVAILABLE, Reason.DATABASE_UNAVAILABLE),
        (mongo_errors.InvalidName("bad name"), Code.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        # DocumentTooLarge is a bson InvalidDocument: the BSON row.
        (mongo_errors.DocumentTooLarge("too big"), Code.INVALID_ARGUMENT, Reason.INVALID_BSON),
        (mongo_errors.InvalidOperation("closed"), Code.FAILED_PRECONDITION, Reason.OPERATION_FAILED),
        (mongo_errors.ConfigurationError("bad"), Code.FAILED_PRECONDITION, Reason.OPERATION_FAILED),
        (mongo_errors.PyMongoError("other"), Code.FAILED_PRECONDITION, Reason.OPERATION_FAILED),
        (InvalidBSON("truncated"), Code.INVALID_ARGUMENT, Reason.INVALID_BSON),
    ]
    for exc, code, reason in cases:
        error = to_rpc_error(exc, database="appdb")
        assert (error.code, error.reason) == (code, reason), exc


def test_server_selection_messages_keep_only_the_first_line_of_the_topology() -> None:
    exc = mongo_errors.ServerSelectionTimeoutError(
        "db:27017: [Errno 111] refused, Timeout: 5.0s, Topology..."
    )
    error = to_rpc_error(exc)
    assert "db:27017: [Errno 111] refused" in error.message
    assert "Topology" not in error.message


def test_a_bulk_write_error_names_the_failing_document_and_what_landed() -> None:
    details = {
        "nInserted": 2,
        "writeErrors": [{"index": 2, "code": 11000, "errmsg": "E11000 duplicate key"}],
        "writeConcernErrors": [],
    }
    error = to_rpc_error(mongo_errors.BulkWriteError(details), database="appdb")
    assert (error.code, error.reason) == (Code.ALREADY_EXISTS, Reason.DUPLICATE_KEY)
    assert error.metadata["failed_index"] == "2"
    assert error.metadata["inserted_count"] == "2"
    assert "document 2" in error.message


def test_a_write_concern_failure_without_write_errors_is_a_timeout() -> None:
    details = {"nInserted": 1, "writeErrors": [], "writeConcernErrors": [{"code": 64, "errmsg": "waiting"}]}
    error = to_rpc_error(mongo_errors.BulkWriteError(details))
    assert (error.code, error.reason) == (Code.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert "write concern failed: waiting" in error.message


def test_an_rpc_error_passes_through_unchanged() -> None:
    original = UnknownDatabaseError("nope", ["appdb"])
    assert to_rpc_error(original) is original


def test_an_unexpected_exception_is_internal_and_names_only_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = to_rpc_error(ZeroDivisionError("secret detail"), database="appdb")
    assert (error.code, error.reason) == (Code.INTERNAL, Reason.INTERNAL)
    assert "ZeroDivisionError" in error.message and "secret detail" not in error.message
    assert any(record.exc_info for record in caplog.records)


def test_a_status_carries_error_info_and_retry_info_and_extra_trailers() -> None:
    from google.rpc import error_details_pb2, status_pb2

    error = RpcError(Code.RESOURCE_EXHAUSTED, "busy", Reason.POOL_EXHAUSTED, {"database": "a"}, 0.25)
    status = error.to_status((("x-request-id", "r1"),))
    trailers = dict(status.trailing_metadata)
    assert trailers["x-request-id"] == "r1"
    decoded = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert decoded.details[0].Unpack(info) and decoded.details[1].Unpack(retry)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        Reason.POOL_EXHAUSTED,
        "mongo-broker",
        {"database": "a"},
    )
    assert retry.retry_delay.ToMilliseconds() == 250


def test_the_reasons_are_the_contracts_error_reason_enum() -> None:
    from broker_client.proto.broker.v1 import broker_pb2

    reasons = {name: value for name, value in vars(Reason).items() if name.isupper()}
    enum = {v.name for v in broker_pb2.ErrorReason.DESCRIPTOR.values if v.number != 0}
    assert set(reasons) == enum
    assert all(name == value for name, value in reasons.items())


# --- a BulkWrite that failed part-way ---------------------------------------------


def _bulk_error(write_errors: list[dict], **counts: int) -> RpcError:
    details = {
        "writeErrors": write_errors,
        "writeConcernErrors": [],
        "nInserted": counts.get("inserted", 0),
        "nUpserted": counts.get("upserted", 0),
        "nMatched": counts.get("matched", 0),
        "nModified": counts.get("modified", 0),
        "nRemoved": counts.get("removed", 0),
        "upserted": [{"index": 1, "_id": 7}] if counts.get("upserted") else [],
    }
    return bulk_write_error(mongo_errors.BulkWriteError(details), "appdb", "operation")


def test_bulk_write_error_names_the_index_the_counts_and_each_write_error():
    error = _bulk_error(
        [{"index": 3, "code": 11000, "errmsg": "dup"}, {"index": 5, "code": 121, "errmsg": "invalid"}],
        inserted=2,
        matched=1,
        modified=1,
        upserted=1,
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    meta = error.metadata
    assert meta["failed_index"] == "3"
    assert (meta["inserted_count"], meta["matched_count"], meta["upserted_count"]) == ("2", "1", "1")
    assert json.loads(meta["write_errors"]) == [
        {"index": 3, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"},
        {"index": 5, "code": 121, "codeName": "DocumentValidationFailure", "errmsg": "invalid"},
    ]
    assert meta["write_errors_total"] == "2"
    assert json.loads(meta["upserted_ids"]) == [{"index": 1, "_id": {"$numberInt": "7"}}]
    assert error.message.startswith("write failed at operation 3: dup")


def test_bulk_write_error_lists_fit_in_the_trailers():
    errors = [{"index": i, "code": 11000, "errmsg": "E" * 1000} for i in range(500)]
    meta = _bulk_error(errors).metadata
    listed = json.loads(meta["write_errors"])
    assert len(meta["write_errors"]) <= 4096
    assert 0 < len(listed) < 500 and meta["write_errors_total"] == "500"
    assert all(len(e["errmsg"]) == 200 for e in listed)
    assert sum(len(k) + len(v) for k, v in meta.items()) < 8 * 1024
