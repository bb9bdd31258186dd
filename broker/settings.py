"""Configuration: a TOML file plus environment variables -> frozen, validated settings.

This module only reads and validates; it opens no sockets and builds no clients.

Sources, highest precedence first:

1. environment variables ``MONGO_BROKER_<SECTION>__<KEY>``, nested with ``__``, for
   example ``MONGO_BROKER_LISTEN__TCP=127.0.0.1:50051`` or
   ``MONGO_BROKER_DATABASES__appdb__MAX_POOL_SIZE=20``;
2. the TOML file named by ``--config`` or ``MONGO_BROKER_CONFIG``;
3. the defaults below, each chosen for a sidecar and documented in the README.

A bad value fails at startup with a message naming the key, e.g.
``databases.appdb.max_pool_size: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "AuthSettings",
    "ConfigError",
    "DatabaseSettings",
    "HealthSettings",
    "LimitSettings",
    "ListenSettings",
    "LogSettings",
    "MetricsSettings",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "TokenSettings",
    "load_settings",
    "redact_text",
    "redact_uri",
    "uri_secrets",
]

ENV_PREFIX = "MONGO_BROKER_"
CONFIG_ENV = "MONGO_BROKER_CONFIG"
DEFAULT_UNIX_SOCKET = "/run/mongo-broker/broker.sock"
MiB = 1024 * 1024

_FROZEN = ConfigDict(frozen=True, extra="forbid")
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# len("/.mbXXXXXXXX/s"): the private directory the socket is bound in first.
_STAGED_SOCKET_SUFFIX_BYTES = 14
_DB_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""


# URI options whose values are secrets: tlsCertificateKeyFilePassword, and
# any other whose name says so (matched case-insensitively, as pymongo does).
_SECRET_OPTION = re.compile(r"password|secret|token", re.IGNORECASE)
# One option of a URI's query: its separator, name and value.
_URI_OPTION = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;?]*)=(?P<value>[^&;]*)")
# Characters that end the user-info in an unescaped password (pymongo
# splits the URI at them), so they cut a password into the pieces an error
# message may quote.
_URI_DELIMITERS = re.compile(r"[/?#@:\[\]]")
REDACTED = "***"


def _redact_mechanism_properties(value: str) -> str:
    """authMechanismProperties=KEY:VALUE,...: hide the values of secret keys (AWS_SESSION_TOKEN)."""
    properties = []
    for item in unquote(value).split(","):
        key, colon, _ = item.partition(":")
        properties.append(f"{key}:{REDACTED}" if colon and _SECRET_OPTION.search(key) else item)
    return ",".join(properties)


def _redact_option(match: re.Match[str]) -> str:
    name, value = match["name"], match["value"]
    if _SECRET_OPTION.search(unquote(name)):
        value = REDACTED
    elif unquote(name).lower() == "authmechanismproperties":
        value = _redact_mechanism_properties(value)
    return f"{match['sep']}{name}={value}"


def _split_userinfo(uri: str) -> tuple[str, str, str]:
    """(scheme and ``://``, user-info or '', the rest after its ``@``), for any string.

    The user-info ends at the last ``@`` before the query, else at the last
    ``@`` of all: a password with an unescaped ``/`` or ``?`` (which pymongo
    refuses, but an error must still not show) stays inside it.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    prefix = scheme + sep
    before_query = rest.partition("?")[0]
    at = before_query.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return prefix, "", rest
    return prefix, rest[:at], rest[at + 1 :]


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its secrets replaced by ``***``, safe for logs and errors.

    Hidden: the password in the user-info, the value of every query option
    whose name contains "password", "secret" or "token" (e.g.
    tlsCertificateKeyFilePassword), and such keys' values inside
    authMechanismProperties (e.g. AWS_SESSION_TOKEN). Works on malformed
    URIs too, hiding more rather than less.
    """
    prefix, userinfo, rest = _split_userinfo(uri)
    rest = _URI_OPTION.sub(_redact_option, rest)
    if not userinfo:
        return prefix + rest
    user, colon, _ = userinfo.partition(":")
    if not colon:
        # No password, but the user-info may hold options when the '@' was
        # in the query: redact those as well.
        user = _URI_OPTION.sub(_redact_option, user)
        return f"{prefix}{user}@{rest}"
    return f"{prefix}{user}:{REDACTED}@{rest}"


def uri_secrets(uri: str) -> set[str]:
    """Every secret in ``uri`` (raw and percent-decoded), and the pieces an error may quote."""
    found: set[str] = set()
    _, userinfo, rest = _split_userinfo(uri)
    password = userinfo.partition(":")[2]
    if password:
        found.add(password)
        found.update(piece for piece in _URI_DELIMITERS.split(password) if piece)
    for match in _URI_OPTION.finditer(rest):
        name, value = unquote(match["name"]), match["value"]
        if _SECRET_OPTION.search(name) and value:
            found.add(value)
        elif name.lower() == "authmechanismproperties":
            for item in unquote(value).split(","):
                key, colon, secret = item.partition(":")
                if colon and secret and _SECRET_OPTION.search(key):
                    found.add(secret)
    return found | {unquote_plus(secret) for secret in found} | {unquote(secret) for secret in found}


def redact_text(text: str, uri: str) -> str:
    """``text`` (e.g. a pymongo error about ``uri``) with every secret of ``uri`` replaced by ``***``."""
    for secret in sorted(uri_secrets(uri), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def is_loopback_host(host: str) -> bool:
    """True for an address only this host can reach: 127.0.0.0/8, ::1, localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything.
        return False


class ListenSettings(BaseModel):
    """Where the broker accepts gRPC calls. At least one listener is required."""

    model_config = _FROZEN

    # A Unix socket is the default: no TCP port to collide with, and file
    # permissions decide who may connect.
    unix: str | None = DEFAULT_UNIX_SOCKET
    # "HOST:PORT" or just "PORT" (bound to 127.0.0.1). Port 0 picks a free port.
    tcp: str | None = None
    # Permissions of the Unix socket file: who may connect. It is never more
    # open than this, not even during start-up. Its directory is created 0750
    # (in unix_group, when set) when missing.
    unix_mode: str = "0660"
    # Group to own the socket (name or number); unset: the broker's group.
    unix_group: str | None = None
    # TLS on the TCP listener. With tls_client_ca_file, clients must present a
    # certificate signed by that CA (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # A TCP listener on anything but a loopback address carries tokens and
    # documents over the network, so it needs TLS. Set this only where the
    # network itself is private and encrypted (e.g. a service mesh's mTLS).
    allow_plaintext_tcp: bool = False

    @field_validator("unix", "tcp", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("unix")
    @classmethod
    def _check_unix(cls, value: str | None) -> str | None:
        # sun_path is 108 bytes on Linux, including the terminating NUL.
        if value is None:
            return None
        if len(os.fsencode(value)) > 107:
            raise ValueError(f"Unix socket path is longer than 107 bytes: {value!r}")
        # The socket is first bound as DIR/.mbXXXXXXXX/s (see server._StagedSocket),
        # which must fit sun_path too.
        directory = os.fsencode(os.path.dirname(os.path.abspath(value)))
        if len(directory) + _STAGED_SOCKET_SUFFIX_BYTES > 107:
            raise ValueError(
                f"the directory of the Unix socket {value!r} is longer than "
                f"{107 - _STAGED_SOCKET_SUFFIX_BYTES} bytes"
            )
        return value

    @field_validator("tcp")
    @classmethod
    def _check_tcp(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", value
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @field_validator("unix_mode")
    @classmethod
    def _check_mode(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f"expected an octal file mode such as '0660', got {value!r}")
        return value

    @model_validator(mode="after")
    def _need_one(self) -> ListenSettings:
        if self.unix is None and self.tcp is None:
            raise ValueError("set listen.unix, listen.tcp or both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.tls_cert_file is not None and self.tcp is None:
            raise ValueError("TLS applies to the TCP listener: set listen.tcp")
        if self.tcp is not None and self.tls_cert_file is None and not self.allow_plaintext_tcp:
            host = self.tcp.rsplit(":", 1)[0].strip("[]")
            if not is_loopback_host(host):
                raise ValueError(
                    f"listen.tcp {self.tcp!r} is reachable from other hosts and has no TLS: set "
                    "tls_cert_file and tls_key_file, bind a loopback address such as "
                    "127.0.0.1, or set allow_plaintext_tcp = true if the network is private and encrypted"
                )
        for path in (self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"cannot read {str(path)!r}")
        return self

    @property
    def unix_mode_bits(self) -> int:
        return int(self.unix_mode, 8)


class HealthSettings(BaseModel):
    """The standard gRPC health service on its own plain TCP listener."""

    model_config = _FROZEN

    # "HOST:PORT" or "PORT"; unset: health is served only on the main
    # listeners. A Kubernetes gRPC probe needs TCP, e.g. "0.0.0.0:8081".
    tcp: str | None = None

    @field_validator("tcp")
    @classmethod
    def _check_tcp(cls, value: str | None) -> str | None:
        return None if value in (None, "") else ListenSettings._check_tcp(value)


class DatabaseSettings(BaseModel):
    """One configured database: one MongoClient with its own bounded pool.

    Pool options carry pymongo's names in snake_case. The defaults differ from
    pymongo's on purpose: a sidecar serves one pod, so it holds few
    connections, fails fast and lets idle ones go.
    """

    model_config = _FROZEN

    uri: SecretStr
    # A file holding the password for the URI's user (e.g. a Kubernetes
    # Secret mount); it is read at start-up and on reload.
    password_file: Path | None = None
    # The MongoDB database behind this configured name; defaults to the name.
    database: str | None = None
    # Refuse Insert on this database for every caller (PERMISSION_DENIED).
    read_only: bool = False
    # Allow writes to collections named system.* (MongoDB's own: system.js,
    # system.views, ...). Off: they are refused with PERMISSION_DENIED for
    # every caller, whatever its token; reads stay allowed.
    allow_system_writes: bool = False
    # pymongo: 100. Every pod runs a broker, so pods x max_pool_size is what
    # the server sees; 10 covers a pod's concurrency while keeping that small.
    max_pool_size: PositiveInt = 10
    # pymongo: 0. One warm connection spares the first call after a quiet
    # spell a TCP handshake and authentication.
    min_pool_size: NonNegativeInt = 1
    # pymongo: no limit. Connections opened for a burst are given back to the
    # server after five idle minutes.
    max_idle_time_ms: PositiveInt | None = 300_000
    # pymongo: 2. Limits the connection storm on the server after a restart.
    max_connecting: PositiveInt = 2
    # pymongo: no limit (and ignored under a deadline). How long a call may
    # wait for a connection before it is refused with RESOURCE_EXHAUSTED.
    wait_queue_timeout_ms: PositiveInt = 1_000
    # Calls that may wait for a connection at once; more are refused at once
    # with RESOURCE_EXHAUSTED. Bounds the broker's memory under overload.
    max_waiting: PositiveInt = 50
    # Queue-time coalescing (see broker/coalesce.py): while every connection
    # is busy, single-document Inserts and FindOne-by-_id lookups waiting for
    # one go out together, at most this many per round trip. Off (0) by
    # default: against FerretDB 1.24, which scans a collection for `_id: {$in:
    # [...]}`, it cost a third of the steady throughput at C=16 and C=64
    # (docs/BENCHMARKS.md); 64 is a good value where $in uses the index.
    coalesce_max_calls: NonNegativeInt = 0
    # pymongo: 20 s. The database is close by; a connect that takes 5 s is broken.
    connect_timeout_ms: PositiveInt = 5_000
    # pymongo: no limit. Every call already carries a time limit (deadline or
    # default_timeout_ms); this only catches a socket that hangs outside one.
    socket_timeout_ms: PositiveInt | None = None
    # pymongo: 30 s. Callers learn that the database is down within 5 s
    # instead of piling up for 30.
    server_selection_timeout_ms: PositiveInt = 5_000
    # pymongo: 10 s. Notices a database coming back twice as fast.
    heartbeat_frequency_ms: Annotated[int, Field(ge=500)] = 5_000
    # Once heartbeats have found the database down, refuse calls at once with
    # UNAVAILABLE instead of letting each wait server_selection_timeout_ms.
    fail_fast: bool = True
    retry_reads: bool = True
    retry_writes: bool = True
    app_name: str = "mongo-broker"
    # Time limit for a call whose client set no gRPC deadline.
    default_timeout_ms: PositiveInt = 30_000
    # Documents per MongoDB batch when a Find does not say. Without one,
    # some servers return small batches, and each batch is one gRPC message.
    default_batch_size: PositiveInt = 1_000

    @model_validator(mode="before")
    @classmethod
    def _read_password_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("password_file"):
            return data
        uri = data.get("uri")
        uri = uri.get_secret_value() if isinstance(uri, SecretStr) else str(uri or "")
        path = Path(data["password_file"])
        try:
            password = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read password_file {str(path)!r}: {exc.strerror}") from None
        parts = urlsplit(uri)
        userinfo, at, hosts = parts.netloc.rpartition("@")
        if not at or not userinfo:
            raise ValueError("password_file needs a user in the uri, e.g. mongodb://user@host/")
        if ":" in userinfo:
            raise ValueError("the uri already has a password; drop it or drop password_file")
        netloc = f"{userinfo}:{quote(password, safe='')}@{hosts}"
        return {**data, "uri": urlunsplit(parts._replace(netloc=netloc))}

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: SecretStr) -> SecretStr:
        uri = value.get_secret_value()
        if not uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(f"expected a mongodb:// or mongodb+srv:// URI, got {redact_uri(uri)!r}")
        return value

    @model_validator(mode="after")
    def _check_pool(self) -> DatabaseSettings:
        if self.min_pool_size > self.max_pool_size:
            raise ValueError(
                f"min_pool_size ({self.min_pool_size}) must not exceed max_pool_size ({self.max_pool_size})"
            )
        return self

    @property
    def redacted_uri(self) -> str:
        return redact_uri(self.uri.get_secret_value())

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for MongoClient/AsyncMongoClient, pymongo's names."""
        return {
            "maxPoolSize": self.max_pool_size,
            "minPoolSize": self.min_pool_size,
            "maxIdleTimeMS": self.max_idle_time_ms,
            "maxConnecting": self.max_connecting,
            "waitQueueTimeoutMS": self.wait_queue_timeout_ms,
            "connectTimeoutMS": self.connect_timeout_ms,
            "socketTimeoutMS": self.socket_timeout_ms,
            "serverSelectionTimeoutMS": self.server_selection_timeout_ms,
            "heartbeatFrequencyMS": self.heartbeat_frequency_ms,
            "retryReads": self.retry_reads,
            "retryWrites": self.retry_writes,
            "appname": self.app_name,
        }


class ServerSettings(BaseModel):
    """The gRPC server itself."""

    model_config = _FROZEN

    # Seconds in-flight calls get to finish on SIGTERM before being cancelled.
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 10.0
    # Seconds between SIGTERM and the listeners closing, while health already
    # says NOT_SERVING and calls are still served. Clients that health-check
    # (all three bundled ones) and Kubernetes readiness move traffic away in
    # that time, so a replica of a shared tier leaves before it refuses
    # anything. 0 (the sidecar default): close at once.
    drain_delay_s: Annotated[float, Field(ge=0, le=600)] = 0.0
    # This broker's name in Stats (`instance`), to tell a tier's replicas
    # apart. Default: the host name, which is the pod's name on Kubernetes.
    instance: Annotated[str, Field(min_length=1, max_length=253)] = Field(default_factory=socket.gethostname)
    # Find, FindOne and Insert calls the broker runs at once; more are refused
    # with RESOURCE_EXHAUSTED (POOL_EXHAUSTED). Default: every database's
    # max_pool_size + max_waiting, plus 64, so a flood on one database leaves
    # room for the others.
    max_concurrent_rpcs: PositiveInt | None = None
    # Calls kept free on top of max_concurrent_rpcs for Ping, Stats, health
    # and reflection: gRPC's own limit is the sum, so a client that parks
    # every data-plane slot (streams it never reads) cannot lock out the
    # operator's and the probes' calls.
    reserved_rpcs: PositiveInt = 32
    # Health Watch streams open at once, apart from the two limits above:
    # each client that health-checks holds one for as long as it is
    # connected (one per worker process and broker replica). Past it, Watch
    # is answered UNIMPLEMENTED, and gRPC clients carry on without health
    # checking.
    max_health_watches: PositiveInt = 4096
    # Serve gRPC reflection (grpcurl and other tools can list and describe).
    reflection: bool = True
    # Close a client connection idle this long: dead workers' connections are
    # reaped (their clients reconnect transparently when they come back).
    max_connection_idle_s: Annotated[float, Field(gt=0)] = 300.0
    # Close (GOAWAY) every client connection this old, 0 for never. A client
    # resolves its target again when a connection closes, so behind a
    # shared tier's DNS name this is how long-lived clients find replicas a
    # scale-up added. Calls in flight get max_connection_age_grace_s.
    max_connection_age_s: Annotated[float, Field(ge=0)] = 0.0
    max_connection_age_grace_s: Annotated[float, Field(gt=0)] = 30.0
    # Ping idle clients this often to find connections whose peer vanished.
    keepalive_time_s: Annotated[float, Field(gt=0)] = 60.0
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    # A client may ping at most this often; a client that pings faster (a
    # ping flood) is sent GOAWAY after two strikes.
    min_client_ping_interval_s: Annotated[float, Field(gt=0)] = 10.0


class LimitSettings(BaseModel):
    """Size limits. Each refusal names the limit it hit."""

    model_config = _FROZEN

    # Largest request accepted; larger ones get RESOURCE_EXHAUSTED from gRPC.
    max_request_bytes: Annotated[int, Field(ge=64 * 1024)] = 32 * MiB
    # Cap on one Find response message. Batches are split to stay under it;
    # a single document larger than the cap travels alone.
    max_response_message_bytes: Annotated[int, Field(ge=64 * 1024)] = MiB
    # Documents in one Insert (INVALID_ARGUMENT above it).
    max_insert_documents: PositiveInt = 10_000
    # Documents one Find may return, whatever its limit; 0: no cap. A result
    # that would exceed it ends with RESOURCE_EXHAUSTED, never silently short.
    max_find_documents: NonNegativeInt = 0
    # Nesting depth of any document, filter or projection (MongoDB's is 100).
    max_bson_depth: Annotated[int, Field(ge=2, le=200)] = 100


class SecuritySettings(BaseModel):
    model_config = _FROZEN

    # $where, $function and $accumulator run JavaScript on the database
    # server; they are refused with PERMISSION_DENIED unless this is true.
    allow_js_operators: bool = False


class TokenSettings(BaseModel):
    """One bearer token and what it may do. Give exactly one of token, token_file, token_env."""

    model_config = _FROZEN

    name: str
    token: SecretStr | None = None
    token_file: Path | None = None
    token_env: str | None = None
    # Glob patterns (fnmatch) of configured database and collection names.
    databases: list[str] = Field(default_factory=lambda: ["*"])
    collections: list[str] = Field(default_factory=lambda: ["*"])
    read_only: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TokenSettings:
        given = [x for x in (self.token, self.token_file, self.token_env) if x is not None]
        if len(given) != 1:
            raise ValueError(f"token {self.name!r}: give exactly one of token, token_file, token_env")
        secret = self.secret()
        if len(secret) < 16:
            raise ValueError(f"token {self.name!r} is shorter than 16 characters")
        return self

    def secret(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read token_file {str(self.token_file)!r}: {exc.strerror}") from None
        value = os.environ.get(self.token_env or "")
        if not value:
            raise ValueError(f"token {self.name!r}: environment variable {self.token_env!r} is not set")
        return value


class AuthSettings(BaseModel):
    """Bearer tokens. With none configured, every local caller is trusted."""

    model_config = _FROZEN

    tokens: list[TokenSettings] = Field(default_factory=list)

    @field_validator("tokens")
    @classmethod
    def _unique(cls, value: list[TokenSettings]) -> list[TokenSettings]:
        names = [t.name for t in value]
        if len(names) != len(set(names)):
            raise ValueError("token names must be unique")
        return value


class MetricsSettings(BaseModel):
    """The optional Prometheus endpoint."""

    model_config = _FROZEN

    # "HOST:PORT" or "PORT" (bound to 127.0.0.1) for GET /metrics; unset: off.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        return None if value in (None, "") else ListenSettings._check_tcp(value)


class LogSettings(BaseModel):
    model_config = _FROZEN

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # One line per call on the `mongo_broker.access` logger.
    access: bool = True


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    listen: ListenSettings = ListenSettings()
    health: HealthSettings = HealthSettings()
    server: ServerSettings = ServerSettings()
    limits: LimitSettings = LimitSettings()
    security: SecuritySettings = SecuritySettings()
    auth: AuthSettings = AuthSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    databases: dict[str, DatabaseSettings] = Field(default_factory=dict)

    @field_validator("databases")
    @classmethod
    def _check_databases(cls, value: dict[str, DatabaseSettings]) -> dict[str, DatabaseSettings]:
        if not value:
            raise ValueError("configure at least one [databases.NAME] table with a uri")
        for name in value:
            if not _DB_NAME.match(name):
                raise ValueError(f"database name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments (see load_settings), so
        # the environment must rank above them.
        return (env_settings, init_settings)

    def concurrency_limit(self) -> int:
        """The data-plane calls (Find, FindOne, Insert) the broker runs at once (see ServerSettings)."""
        if self.server.max_concurrent_rpcs is not None:
            return self.server.max_concurrent_rpcs
        return 64 + sum(db.max_pool_size + db.max_waiting for db in self.databases.values())

    def mongo_database(self, name: str) -> str:
        """The MongoDB database name behind configured database ``name``."""
        return self.databases[name].database or name


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the TOML file (``path``, else ``$MONGO_BROKER_CONFIG``, else none) and the env.

    Raises ConfigError with a message that names every bad key.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
