"""Python client for mongo-broker, shaped like pymongo.

>>> from broker_client import BrokerClient
>>> client = BrokerClient("unix:///run/mongo-broker/broker.sock")
>>> items = client["appdb"]["items"]
>>> items.insert_one({"sku": "a1"}).inserted_id
ObjectId('...')

``AsyncBrokerClient`` is the same API for asyncio programs (awaitable calls,
``async for`` over ``find()``). Both retry transient failures by a
`RetryPolicy`. ``broker_client.hooks`` has ready-made hooks for gunicorn,
celery and multiprocessing workers.

Importing this package opens no connection and creates no channel; grpc
(and asyncio) are imported on the first call. Every public name is loaded
on first use (PEP 562): a worker pays only for what it touches, and the
broker, which imports only the generated stubs in ``broker_client.proto``,
loads none of the client. See clients/python/README.md.
"""

import typing as _typing

from broker_client._version import __version__

if _typing.TYPE_CHECKING:
    from broker_client.async_client import AsyncBrokerClient, AsyncCollection, AsyncCursor, AsyncDatabase
    from broker_client.client import (
        DEFAULT_TIMEOUT_S,
        BrokerClient,
        Collection,
        Cursor,
        Database,
        WriteConcernSpec,
    )
    from broker_client.errors import (
        AutoReconnect,
        BrokerError,
        BulkWriteError,
        ConnectionFailure,
        DuplicateKeyError,
        ExecutionTimeout,
        InvalidOperation,
        InvalidRequest,
        LimitExceeded,
        OperationFailure,
        PermissionDenied,
        ServerSelectionTimeoutError,
        Unauthenticated,
        UnknownDatabase,
        WaitQueueTimeoutError,
        WriteError,
    )
    from broker_client.operations import (
        DeleteMany,
        DeleteOne,
        InsertOne,
        ReplaceOne,
        ReturnDocument,
        UpdateMany,
        UpdateOne,
    )
    from broker_client.results import (
        BrokerStats,
        BulkWriteResult,
        DatabasePing,
        DatabaseStats,
        DeleteResult,
        InsertManyResult,
        InsertOneResult,
        PeerStats,
        PingResult,
        PoolSummary,
        UpdateResult,
    )
    from broker_client.retry import DEFAULT_RETRY_POLICY, RetryPolicy

# Every public name is loaded on first access (PEP 562): name -> the module
# that defines it. The generated stubs under broker_client.proto are imported
# by the broker itself, and importing them must not load the client runtime.
_LAZY = {
    **dict.fromkeys(
        ("DEFAULT_TIMEOUT_S", "BrokerClient", "Collection", "Cursor", "Database", "WriteConcernSpec"),
        "client",
    ),
    **dict.fromkeys(
        (
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
        ),
        "errors",
    ),
    **dict.fromkeys(("DEFAULT_RETRY_POLICY", "RetryPolicy"), "retry"),
    **dict.fromkeys(("AsyncBrokerClient", "AsyncCollection", "AsyncCursor", "AsyncDatabase"), "async_client"),
    **dict.fromkeys(
        (
            "BrokerStats",
            "BulkWriteResult",
            "DatabasePing",
            "DatabaseStats",
            "DeleteResult",
            "InsertManyResult",
            "InsertOneResult",
            "PeerStats",
            "PingResult",
            "PoolSummary",
            "UpdateResult",
        ),
        "results",
    ),
    **dict.fromkeys(
        ("DeleteMany", "DeleteOne", "InsertOne", "ReplaceOne", "ReturnDocument", "UpdateMany", "UpdateOne"),
        "operations",
    ),
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is not None:
        # __import__ rather than importlib.import_module: the same import, but
        # through the interpreter's own path, which -X importtime reports.
        value = getattr(__import__(f"broker_client.{module}", fromlist=(name,)), name)
    elif name in _LAZY.values():
        value = __import__(f"broker_client.{name}", fromlist=("__name__",))
    else:
        raise AttributeError(f"module 'broker_client' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_TIMEOUT_S",
    "AsyncBrokerClient",
    "AsyncCollection",
    "AsyncCursor",
    "AsyncDatabase",
    "AutoReconnect",
    "BrokerClient",
    "BrokerError",
    "BrokerStats",
    "BulkWriteError",
    "BulkWriteResult",
    "Collection",
    "ConnectionFailure",
    "Cursor",
    "Database",
    "DatabasePing",
    "DatabaseStats",
    "DeleteMany",
    "DeleteOne",
    "DeleteResult",
    "DuplicateKeyError",
    "ExecutionTimeout",
    "InsertManyResult",
    "InsertOne",
    "InsertOneResult",
    "InvalidOperation",
    "InvalidRequest",
    "LimitExceeded",
    "OperationFailure",
    "PeerStats",
    "PermissionDenied",
    "PingResult",
    "PoolSummary",
    "ReplaceOne",
    "RetryPolicy",
    "ReturnDocument",
    "ServerSelectionTimeoutError",
    "Unauthenticated",
    "UnknownDatabase",
    "UpdateMany",
    "UpdateOne",
    "UpdateResult",
    "WaitQueueTimeoutError",
    "WriteConcernSpec",
    "WriteError",
    "__version__",
]
