"""Helpers for tests that speak the raw gRPC contract (no client stub)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import bson
import grpc
import pytest
from broker_client.proto.broker.v1 import broker_pb2 as pb
from broker_client.proto.broker.v1 import broker_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = ["Failure", "database_stats", "eventually", "fails", "find_all", "find_one", "open_stub", "pb"]


def eventually(check: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


@contextmanager
def open_stub(target: str) -> Iterator[broker_pb2_grpc.BrokerStub]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)])
    try:
        yield broker_pb2_grpc.BrokerStub(channel)
    finally:
        channel.close()


@dataclass
class Failure:
    code: grpc.StatusCode | None = None
    message: str = ""
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@contextmanager
def fails(code: grpc.StatusCode, reason: str | None = None) -> Iterator[Failure]:
    """Expect a gRPC error with ``code`` (and ErrorInfo ``reason``); yields its details."""
    failure = Failure()
    with pytest.raises(grpc.RpcError) as caught:
        yield failure
    error: Any = caught.value
    failure.code = error.code()
    failure.message = error.details() or ""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}: {failure.message}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "mongo-broker"
            failure.reason = info.reason
            failure.metadata = dict(info.metadata)
    assert failure.code == code, f"expected {code}, got {failure.code}: {failure.message}"
    if reason is not None:
        assert failure.reason == reason, failure


def find_all(stub: broker_pb2_grpc.BrokerStub, **fields: Any) -> tuple[list[dict[str, Any]], int]:
    """Run Find; return the decoded documents and the number of messages."""
    documents: list[dict[str, Any]] = []
    messages = 0
    for message in stub.Find(pb.FindRequest(**fields), timeout=30):
        messages += 1
        documents.extend(bson.decode(raw) for raw in message.documents)
    return documents, messages


def find_one(stub: broker_pb2_grpc.BrokerStub, **fields: Any) -> tuple[list[dict[str, Any]], int]:
    """Run FindOne; return its documents (zero or one) and the number of messages (1)."""
    response = stub.FindOne(pb.FindRequest(**fields), timeout=30)
    return [bson.decode(raw) for raw in response.documents], 1


def database_stats(stub: broker_pb2_grpc.BrokerStub, database: str = "appdb", timeout: float = 10) -> Any:
    """One database's Stats (a ``DatabaseStats``); the response must hold exactly that one."""
    (db,) = stub.Stats(pb.StatsRequest(database=database), timeout=timeout).databases
    return db
