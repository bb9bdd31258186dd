"""Python client for mongo-broker, shaped like pymongo.

>>> from broker_client import BrokerClient
>>> client = BrokerClient("unix:///run/mongo-broker/broker.sock")
>>> items = client["appdb"]["items"]
>>> items.insert_one({"sku": "a1"}).inserted_id
ObjectId('...')

Importing this package opens no connection and creates no channel; grpc
itself is imported on the first call. See clients/python/README.md.
"""

from broker_client._version import __version__
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
from broker_client.results import (
    BrokerStats,
    DatabasePing,
    DatabaseStats,
    InsertManyResult,
    InsertOneResult,
    PingResult,
    PoolSummary,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AutoReconnect",
    "BrokerClient",
    "BrokerError",
    "BrokerStats",
    "Collection",
    "ConnectionFailure",
    "Cursor",
    "Database",
    "DatabasePing",
    "DatabaseStats",
    "DuplicateKeyError",
    "ExecutionTimeout",
    "InsertManyResult",
    "InsertOneResult",
    "InvalidOperation",
    "InvalidRequest",
    "LimitExceeded",
    "OperationFailure",
    "PermissionDenied",
    "PingResult",
    "PoolSummary",
    "ServerSelectionTimeoutError",
    "Unauthenticated",
    "UnknownDatabase",
    "WaitQueueTimeoutError",
    "WriteConcernSpec",
    "WriteError",
    "__version__",
]
