"""Who may call, on what, and how big: tokens, allowlists, read-only, operator guard, limits.

- Tokens are bearer tokens in the `authorization` metadata. Only their
  SHA-256 digests are kept, and every configured digest is compared with
  `hmac.compare_digest`, so neither the comparison nor an early exit leaks
  which bytes matched. The health service is exempt: a probe sends no metadata.
- Each token carries an allowlist of database and collection glob patterns
  and may be read-only; a database may be read-only for everyone.
- Server-side JavaScript (`$where`, `$function`, `$accumulator`) is refused
  anywhere in a filter or projection, at any depth, unless allowed. The
  search runs on the document's bytes (`broker.bsonwalk`, called from
  `broker.documents`), so duplicate keys and DBRef-shaped sub-documents
  cannot hide an operator from it; this module says how a refusal reads.
- Size limits name themselves in their error messages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from broker.errors import Reason, RpcError
from broker.settings import AuthSettings

__all__ = [
    "ANONYMOUS",
    "JS_OPERATORS",
    "Authenticator",
    "Principal",
    "depth_exceeded",
    "operator_denied",
]

JS_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
_MAX_TOKEN_BYTES = 4096
_BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and what it may touch."""

    name: str
    databases: tuple[str, ...] = ("*",)
    collections: tuple[str, ...] = ("*",)
    read_only: bool = False

    def may_use(self, database: str) -> bool:
        return any(fnmatch.fnmatchcase(database, p) for p in self.databases)

    def authorize(self, database: str, collection: str, *, write: bool, method: str = "Insert") -> None:
        """Raise PERMISSION_DENIED unless this caller may do this (``method`` names a refused write)."""
        if not self.may_use(database):
            raise _denied(f"token {self.name!r} may not use database {database!r}")
        if collection and not any(fnmatch.fnmatchcase(collection, p) for p in self.collections):
            raise _denied(f"token {self.name!r} may not use collection {collection!r} in {database!r}")
        if write and self.read_only:
            raise _denied(f"token {self.name!r} is read-only: {method} is not allowed")


ANONYMOUS = Principal("anonymous")


def _denied(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.PERMISSION_DENIED, message, Reason.NOT_AUTHORIZED)


def _unauthenticated(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.UNAUTHENTICATED, message, Reason.UNAUTHENTICATED)


class Authenticator:
    """Maps the `authorization` metadata of a call to a Principal."""

    def __init__(self, settings: AuthSettings) -> None:
        self._entries: list[tuple[bytes, Principal]] = [
            (
                hashlib.sha256(token.secret().encode()).digest(),
                Principal(
                    token.name,
                    tuple(token.databases),
                    tuple(token.collections),
                    token.read_only,
                ),
            )
            for token in settings.tokens
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        if not self._entries:
            return ANONYMOUS
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise _unauthenticated(
                "this broker requires a token: send metadata 'authorization: Bearer <token>'"
            )
        value = values[0]
        if isinstance(value, bytes) or len(value) > _MAX_TOKEN_BYTES + len(_BEARER):
            raise _unauthenticated("the authorization metadata is not a valid bearer token")
        if not value.lower().startswith(_BEARER):
            raise _unauthenticated("the authorization metadata must read 'Bearer <token>'")
        digest = hashlib.sha256(value[len(_BEARER) :].strip().encode()).digest()
        found: Principal | None = None
        for known, principal in self._entries:
            # No early exit: every digest is compared, match or not.
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise _unauthenticated("the token is not valid for this broker")
        return found


def operator_denied(path: str) -> RpcError:
    """PERMISSION_DENIED for the JavaScript operator at ``path`` (e.g. "filter.$or[1].$where")."""
    operator = path.rsplit(".", 1)[-1]
    return _denied(
        f"{path}: {operator} runs JavaScript on the database server and is disabled on "
        "this broker (security.allow_js_operators)"
    )


def depth_exceeded(field: str, limit: int | None = None) -> RpcError:
    """INVALID_ARGUMENT (LIMIT_EXCEEDED) for ``field`` nesting deeper than max_bson_depth.

    ``limit`` is None where the depth is not counted, only found too deep to
    parse (Extended JSON nested past Python's recursion limit).
    """
    if limit is None:
        message = f"{field} nests too deeply to parse, deeper than limits.max_bson_depth allows"
    else:
        message = f"{field} nests deeper than limits.max_bson_depth ({limit})"
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, Reason.LIMIT_EXCEEDED)
