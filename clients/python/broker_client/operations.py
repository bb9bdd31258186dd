"""``bulk_write``'s requests and ``find_one_and_*``'s `ReturnDocument`, as pymongo names them.

The constructors take pymongo's arguments in pymongo's order, so code written
for ``pymongo.operations`` changes its import line only. They check their
arguments the way pymongo does (a filter is a mapping, an update is
``$``-operators or a pipeline, a replacement has no ``$`` keys), so a bad
request fails where it is built, before anything is sent.

``bulk_write`` also takes pymongo's own request objects: the attributes it
reads (``_filter``, ``_doc``, ``_upsert``, ``_collation``,
``_array_filters``, ``_hint``) are the same on both. Importing this module
imports no part of pymongo beyond bson (``pymongo.operations`` would load
all of pymongo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

__all__ = ["DeleteMany", "DeleteOne", "InsertOne", "ReplaceOne", "ReturnDocument", "UpdateMany", "UpdateOne"]

_D = TypeVar("_D", bound=Mapping[str, Any])


class ReturnDocument:
    """Which document ``find_one_and_update`` and ``find_one_and_replace`` return.

    The same values as pymongo's ``ReturnDocument`` (False and True), so
    either class's constants may be passed.
    """

    BEFORE: Final = False
    """The document as it was before the change (the default)."""
    AFTER: Final = True
    """The document as the change left it (an upsert's new document)."""


def _check_filter(filter: object) -> Mapping[str, Any]:
    if not isinstance(filter, Mapping):
        raise TypeError(
            "filter must be an instance of dict, bson.son.SON, or any other type "
            f"that inherits from collections.Mapping, not {type(filter).__name__}"
        )
    return filter


def check_update(update: object) -> Mapping[str, Any] | list[Mapping[str, Any]]:
    """An update as pymongo checks it: a non-empty ``$``-operator document, or a pipeline (a list).

    Every top-level key must be an operator; pymongo looks at the first one
    only, the server refuses the document whichever key is not.
    """
    if isinstance(update, list):
        if not update:
            raise ValueError("update cannot be empty")
        for stage in update:
            if not isinstance(stage, Mapping):
                raise TypeError(
                    f"each stage of an update pipeline must be a mapping, not {type(stage).__name__}"
                )
        return update
    if not isinstance(update, Mapping):
        raise TypeError(
            "update must be an instance of dict, bson.son.SON, or any other type that inherits "
            f"from collections.Mapping, or a list (a pipeline), not {type(update).__name__}"
        )
    if not update:
        raise ValueError("update cannot be empty")
    if not all(isinstance(key, str) and key.startswith("$") for key in update):
        raise ValueError("update only works with $ operators")
    return update


def check_replacement(replacement: object) -> Mapping[str, Any]:
    """A replacement as pymongo checks it: a document (``{}`` too) with no ``$`` key at the top."""
    if not isinstance(replacement, Mapping):
        raise TypeError(
            "replacement must be an instance of dict, bson.son.SON, bson.raw_bson.RawBSONDocument, "
            f"or any other type that inherits from collections.Mapping, not {type(replacement).__name__}"
        )
    if any(isinstance(key, str) and key.startswith("$") for key in replacement):
        raise ValueError("replacement can not include $ operators")
    return replacement


def _check_array_filters(array_filters: object) -> list[Mapping[str, Any]] | None:
    if array_filters is None:
        return None
    if not isinstance(array_filters, list):
        raise TypeError(f"array_filters must be a list, not {type(array_filters).__name__}")
    return array_filters


def _repr(op: object, *values: object) -> str:
    return "{}({})".format(type(op).__name__, ", ".join(repr(value) for value in values))


class InsertOne(Generic[_D]):
    """Insert one document. Without an ``_id`` it gets an ObjectId, set on the document too."""

    __slots__ = ("_doc",)

    def __init__(self, document: _D) -> None:
        if not isinstance(document, Mapping):
            raise TypeError(f"document must be a mapping, not {type(document).__name__}")
        self._doc = document

    @property
    def document(self) -> _D:
        return self._doc

    def __repr__(self) -> str:
        return _repr(self, self._doc)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self._doc == other._doc
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a mutable document inside, as pymongo's


class _UpdateOp:
    __slots__ = ("_array_filters", "_collation", "_doc", "_filter", "_hint", "_upsert")

    # pymongo's positional order, which callers use: UpdateOne(filter, update, True).
    def __init__(  # noqa: PLR0917
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any] | list[Mapping[str, Any]],
        upsert: bool | None = None,
        collation: Mapping[str, Any] | None = None,
        array_filters: list[Mapping[str, Any]] | None = None,
        hint: Any | None = None,
    ) -> None:
        self._filter = _check_filter(filter)
        self._doc = check_update(update)
        self._upsert = upsert
        self._collation = collation
        self._array_filters = _check_array_filters(array_filters)
        self._hint = hint

    def __repr__(self) -> str:
        return _repr(self, *self._key())

    def _key(self) -> tuple[Any, ...]:
        return (self._filter, self._doc, self._upsert, self._collation, self._array_filters, self._hint)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self._key() == other._key()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable documents inside, as pymongo's


class UpdateOne(_UpdateOp):
    """Update the first document ``filter`` matches: pymongo's ``UpdateOne``."""

    __slots__ = ()


class UpdateMany(_UpdateOp):
    """Update every document ``filter`` matches: pymongo's ``UpdateMany``."""

    __slots__ = ()


class ReplaceOne(Generic[_D]):
    """Replace the first document ``filter`` matches: pymongo's ``ReplaceOne``."""

    __slots__ = ("_collation", "_doc", "_filter", "_hint", "_upsert")

    def __init__(
        self,
        filter: Mapping[str, Any],
        replacement: _D,
        upsert: bool | None = None,
        collation: Mapping[str, Any] | None = None,
        hint: Any | None = None,
    ) -> None:
        self._filter = _check_filter(filter)
        check_replacement(replacement)
        self._doc = replacement
        self._upsert = upsert
        self._collation = collation
        self._hint = hint

    def __repr__(self) -> str:
        return _repr(self, self._filter, self._doc, self._upsert, self._collation, self._hint)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            mine = (self._filter, self._doc, self._upsert, self._collation, self._hint)
            return mine == (other._filter, other._doc, other._upsert, other._collation, other._hint)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class _DeleteOp:
    __slots__ = ("_collation", "_filter", "_hint")

    def __init__(
        self, filter: Mapping[str, Any], collation: Mapping[str, Any] | None = None, hint: Any | None = None
    ) -> None:
        self._filter = _check_filter(filter)
        self._collation = collation
        self._hint = hint

    def __repr__(self) -> str:
        return _repr(self, self._filter, self._collation, self._hint)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            mine = (self._filter, self._collation, self._hint)
            return mine == (other._filter, other._collation, other._hint)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class DeleteOne(_DeleteOp):
    """Delete the first document ``filter`` matches: pymongo's ``DeleteOne``."""

    __slots__ = ()


class DeleteMany(_DeleteOp):
    """Delete every document ``filter`` matches: pymongo's ``DeleteMany``."""

    __slots__ = ()


#: The request classes ``bulk_write`` accepts, by name: these, or pymongo's
#: (``pymongo.operations``) of the same names.
REQUEST_CLASSES: Final = ("InsertOne", "UpdateOne", "UpdateMany", "ReplaceOne", "DeleteOne", "DeleteMany")


def request_kind(request: object) -> str:
    """``bulk_write``'s name for ``request`` ("InsertOne", ...); TypeError for anything else."""
    cls = type(request)
    name = cls.__name__
    if name in REQUEST_CLASSES and cls.__module__ in (__name__, "pymongo.operations"):
        return name
    raise TypeError(f"{request!r} is not a valid request")


def check_requests(requests: object) -> Sequence[Any]:
    """``bulk_write``'s list, as pymongo checks it: a non-empty list (InvalidOperation when empty)."""
    if isinstance(requests, Mapping) or not isinstance(requests, Sequence) or isinstance(requests, str):
        raise TypeError("requests must be a list")
    if not requests:
        # pymongo's message for an empty bulk.
        from broker_client.errors import InvalidOperation

        raise InvalidOperation("No operations to execute")
    return requests
