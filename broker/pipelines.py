"""What an aggregation pipeline reaches: every collection it reads or writes, by path.

A token's allowlist names the databases and collections it may use, and an
Aggregate call names one of each. But a pipeline can read other collections
(`$lookup`, `$graphLookup`, `$unionWith`, at any depth of `$facet` and
sub-pipelines) and write one anywhere (`$out`, `$merge`). Checking only the
call's own collection would let `$lookup` from a forbidden collection read
it, and `$out` to another database overwrite it. So before a pipeline runs,
`inspect` lists every collection it reaches, with its database and whether
it is written, and the broker holds each to the caller's allowlist; what the
broker cannot vet it refuses, rather than pass on.

The stage shapes read here, as MongoDB documents them:

- `$lookup`: `from` (a collection of the call's database), an optional
  `pipeline`; without `from` the pipeline must begin with `$documents`.
  `from` as `{db, coll}` is a cross-database lookup that only Atlas offers,
  and is refused.
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/lookup/
- `$graphLookup`: `from`.
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/graphLookup/
- `$unionWith`: a collection name, or `{coll, pipeline}`; without `coll` the
  pipeline must begin with `$documents`.
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/unionWith/
- `$out`: a collection name, or `{db, coll}` (MongoDB 7.0.3 adds `timeseries`).
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/out/
- `$merge`: a collection name, or `{into, on, let, whenMatched,
  whenNotMatched}` where `into` is a name or `{db, coll}` and `whenMatched`
  may be a pipeline.
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/merge/
- `$facet`: named sub-pipelines.
  https://www.mongodb.com/docs/manual/reference/operator/aggregation/facet/

`$out` and `$merge` must be the last stage of the top-level pipeline: MongoDB
refuses them anywhere else, including inside `$lookup`, `$facet` and
`$unionWith`, and so does the broker, with a message that says so. Nesting
is capped at MongoDB's own limit of 20 sub-pipelines. `$changeStream` (it
needs watch(), which the broker does not serve) and the server's own
reports (`$currentOp`, `$listSessions`, `$listLocalSessions`) are refused
as UNIMPLEMENTED. Other stages pass to the server, which judges them; but
one that holds a reaching stage somewhere inside it (a stage this module
does not know the sub-pipelines of) is refused, since its reach cannot be
listed.

A collection reached may be a view, which reads whatever its definition
reads: views are created by someone with the rights to do so, and the
allowlist treats the view's name as the collection.

The stages arrive checked by `broker.documents.check_document` (structure,
depth, duplicate keys, JavaScript operators) and decoded by `bson.decode`.
Pure: no I/O, no gRPC, no pymongo client.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import bson
import grpc
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.dbref import DBRef

from broker.errors import Reason, RpcError, invalid_argument

__all__ = [
    "MAX_PIPELINE_DEPTH",
    "PipelineReach",
    "Reach",
    "inspect",
    "inspect_bson",
    "performs_write",
    "retarget",
]

# MongoDB refuses more nested sub-pipelines than this ("Maximum number of
# nested sub-pipelines exceeded"); the top-level pipeline is the first.
MAX_PIPELINE_DEPTH: Final = 20

_OUTPUT: Final = frozenset({"$out", "$merge"})
_CHANGE_STREAM: Final = (
    "change streams need a watch() cursor, which this broker does not serve; "
    "poll with Find or Aggregate instead"
)
_REPORT: Final = "reports on the database server itself and is not offered through this broker"
# Stages the broker does not serve, and why: UNIMPLEMENTED (NOT_SUPPORTED).
_UNSUPPORTED: Final[Mapping[str, str]] = {
    "$changeStream": _CHANGE_STREAM,
    "$changeStreamSplitLargeEvent": _CHANGE_STREAM,
    "$currentOp": _REPORT,
    "$listSessions": _REPORT,
    "$listLocalSessions": _REPORT,
}
# Same decoding as broker.documents: dates outside Python's range become
# DatetimeMS instead of failing.
_DECODE: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_INT32 = struct.Struct("<i")
# Scalar types bson.decode makes most, which a scan skips at once.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class Reach:
    """One collection a pipeline reads or writes."""

    # Where in the request, e.g. "pipeline[2].$lookup.from".
    path: str
    # The collection name as the stage gives it.
    collection: str
    # The database the stage names (the db of $out / $merge into, a
    # configured name); None is the call's own database.
    database: str | None
    # True for the target of $out or $merge.
    write: bool


@dataclass(frozen=True, slots=True)
class PipelineReach:
    """Every collection a pipeline reaches, in the order its stages name them."""

    reaches: tuple[Reach, ...]
    # The pipeline ends in $out or $merge.
    writes: bool


def inspect(
    stages: Sequence[Mapping[str, Any]], field: str = "pipeline", *, allow_output: bool = True
) -> PipelineReach:
    """List every collection ``stages`` reach, or raise the RpcError for what cannot be vetted.

    ``field`` names the pipeline in paths and messages. ``allow_output=False``
    refuses $out and $merge everywhere, for pipelines that cannot write
    elsewhere (an update's pipeline).
    """
    reaches: list[Reach] = []
    _Inspection(field, reaches, allow_output).pipeline(stages, field, 1)
    return PipelineReach(tuple(reaches), performs_write(stages))


def inspect_bson(
    stages: Sequence[bytes], field: str = "pipeline", *, allow_output: bool = True
) -> PipelineReach:
    """`inspect` for stages as BSON, each already checked by `documents.check_document`."""
    decoded: list[dict[str, Any]] = [bson.decode(stage, _DECODE) for stage in stages]
    return inspect(decoded, field, allow_output=allow_output)


def performs_write(stages: Sequence[Mapping[str, Any] | bytes]) -> bool:
    """Whether the pipeline ends in $out or $merge, and so is a write (for retries and routing).

    pymongo's rule: a write goes to the primary, and is retried as a write. A
    stage may be given as BSON, whose first key is its name.
    """
    if not stages:
        return False
    last = stages[-1]
    if isinstance(last, bytes | bytearray | memoryview):
        return _first_key(bytes(last)) in _OUTPUT
    return isinstance(last, Mapping) and any(key in _OUTPUT for key in last)


class _Inspection:
    """One walk over a pipeline and its sub-pipelines, collecting reaches."""

    __slots__ = ("allow_output", "field", "reaches")

    def __init__(self, field: str, reaches: list[Reach], allow_output: bool) -> None:
        self.field = field
        self.reaches = reaches
        self.allow_output = allow_output

    def pipeline(self, stages: object, path: str, depth: int) -> None:
        if depth > MAX_PIPELINE_DEPTH:
            raise invalid_argument(
                f"{path}: pipelines nest deeper than {MAX_PIPELINE_DEPTH} (the top-level pipeline "
                "counts as one), MongoDB's limit; flatten the $lookup, $unionWith or $facet nesting",
                Reason.LIMIT_EXCEEDED,
            )
        if not isinstance(stages, list | tuple):
            raise invalid_argument(
                f"{path}: a pipeline must be an array of stage documents, not {_describe(stages)}"
            )
        last = len(stages) - 1
        for index, stage in enumerate(stages):
            where = f"{path}[{index}]"
            name, spec = _stage(stage, where)
            here = f"{where}.{name}"
            if name in _UNSUPPORTED:
                raise RpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{here}: {name} {_UNSUPPORTED[name]}",
                    Reason.NOT_SUPPORTED,
                )
            if name in _OUTPUT:
                self._check_output(name, here, depth, index, last)
            handler = _HANDLERS.get(name)
            if handler is not None:
                handler(self, spec, here, depth)
            else:
                _check_opaque(spec, here, name)

    def _check_output(self, name: str, here: str, depth: int, index: int, last: int) -> None:
        if not self.allow_output:
            raise invalid_argument(
                f"{here}: {name} writes to a collection and is not allowed in {self.field}"
            )
        if depth > 1:
            raise invalid_argument(
                f"{here}: {name} may only be the last stage of the top-level pipeline; MongoDB refuses "
                "it inside $lookup, $facet, $unionWith and $merge's whenMatched pipelines too"
            )
        if index != last:
            raise invalid_argument(
                f"{here}: {name} must be the last stage of the pipeline, and {last - index} "
                "stage(s) follow it; move it to the end"
            )

    def reach(self, path: str, value: object, database: str | None = None, *, write: bool = False) -> None:
        self.reaches.append(Reach(path, _name(value, path, "collection"), database, write))

    def lookup(self, spec: object, here: str, depth: int) -> None:
        spec = _spec(spec, here, "{from, localField, foreignField, as} or {from, pipeline, as}")
        source = spec.get("from", _MISSING)
        pipeline = spec.get("pipeline", _MISSING)
        if source is _MISSING:
            _require_documents(pipeline, here, "from")
        elif isinstance(source, Mapping):
            raise invalid_argument(
                f"{here}.from: a document is a cross-database $lookup, which only Atlas offers and "
                "this broker does not; name a collection of the call's database as a string"
            )
        else:
            self.reach(f"{here}.from", source)
        if pipeline is not _MISSING:
            self.pipeline(pipeline, f"{here}.pipeline", depth + 1)

    def graph_lookup(self, spec: object, here: str, depth: int) -> None:
        spec = _spec(spec, here, "{from, startWith, connectFromField, connectToField, as}")
        self.reach(f"{here}.from", spec.get("from", _MISSING))

    def union_with(self, spec: object, here: str, depth: int) -> None:
        if isinstance(spec, str):
            self.reach(here, spec)
            return
        spec = _spec(spec, here, "a collection name or {coll, pipeline}")
        collection = spec.get("coll", _MISSING)
        pipeline = spec.get("pipeline", _MISSING)
        if collection is _MISSING:
            _require_documents(pipeline, here, "coll")
        else:
            self.reach(f"{here}.coll", collection)
        if pipeline is not _MISSING:
            self.pipeline(pipeline, f"{here}.pipeline", depth + 1)

    def out(self, spec: object, here: str, depth: int) -> None:
        if isinstance(spec, str):
            self.reach(here, spec, write=True)
            return
        spec = _spec(spec, here, "a collection name or {db, coll}")
        self.reach(f"{here}.coll", spec.get("coll", _MISSING), _database(spec, here), write=True)

    def merge(self, spec: object, here: str, depth: int) -> None:
        if isinstance(spec, str):
            self.reach(here, spec, write=True)
            return
        spec = _spec(spec, here, "a collection name or {into, on, whenMatched, whenNotMatched}")
        into = spec.get("into", _MISSING)
        if isinstance(into, Mapping):
            self.reach(
                f"{here}.into.coll", into.get("coll", _MISSING), _database(into, f"{here}.into"), write=True
            )
        else:
            self.reach(f"{here}.into", into, write=True)
        matched = spec.get("whenMatched")
        # A string names an action; anything but an array the server refuses.
        if isinstance(matched, list | tuple):
            self.pipeline(matched, f"{here}.whenMatched", depth + 1)

    def facet(self, spec: object, here: str, depth: int) -> None:
        spec = _spec(spec, here, "{<name>: [<stage>, ...], ...}")
        for name, pipeline in spec.items():
            self.pipeline(pipeline, f"{here}.{name}", depth + 1)


_HANDLERS: Final[Mapping[str, Callable[[_Inspection, object, str, int], None]]] = {
    "$lookup": _Inspection.lookup,
    "$graphLookup": _Inspection.graph_lookup,
    "$unionWith": _Inspection.union_with,
    "$out": _Inspection.out,
    "$merge": _Inspection.merge,
    "$facet": _Inspection.facet,
}
# Keys that, found inside a stage this module does not take apart, mean it
# holds a pipeline whose reach cannot be listed.
_REACHING: Final = frozenset(_HANDLERS) | frozenset(_UNSUPPORTED)


def _stage(stage: object, where: str) -> tuple[str, object]:
    """A stage's name and its specification; refuse anything but a one-key document named $..."""
    keys = _keys(stage)
    if keys is None or len(keys) != 1 or not isinstance(stage, Mapping):
        got = _describe(stage) if keys is None else f"a document with {len(keys)} keys"
        if keys:
            got += " (" + ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "") + ")"
        raise invalid_argument(
            f"{where}: a stage must be a document with exactly one key, its stage name "
            f'(e.g. {{"$match": {{...}}}}), not {got}; put each stage in its own document'
        )
    name = keys[0]
    if not name.startswith("$"):
        raise invalid_argument(
            f"{where}: {name!r} is not a stage name; stage names begin with $ (e.g. $match)"
        )
    return name, stage[name]


def _keys(value: object) -> list[str] | None:
    if isinstance(value, DBRef):
        # bson.decode turns a {$ref, $id, ...} document into a DBRef.
        return list(value.as_doc())
    if isinstance(value, Mapping):
        return [str(key) for key in value]
    return None


def _spec(spec: object, here: str, shape: str) -> Mapping[str, Any]:
    if isinstance(spec, DBRef) or not isinstance(spec, Mapping):
        got = "a document with $ref and $id (a DBRef)" if isinstance(spec, DBRef) else _describe(spec)
        raise invalid_argument(f"{here}: must be a document, {shape}, not {got}")
    return spec


def _name(value: object, path: str, what: str) -> str:
    if value is _MISSING:
        raise invalid_argument(f"{path}: missing; name the {what} as a non-empty string")
    if not isinstance(value, str) or not value:
        raise invalid_argument(f"{path}: must be a non-empty string naming a {what}, not {_describe(value)}")
    return value


def _database(spec: Mapping[str, Any], here: str) -> str | None:
    """The ``db`` of a $out or $merge target; None (the call's own database) when absent."""
    database = spec.get("db", _MISSING)
    if database is _MISSING:
        return None
    return _name(database, f"{here}.db", "configured database")


def _require_documents(pipeline: object, here: str, field: str) -> None:
    """Without a collection, MongoDB reads only the pipeline's leading $documents."""
    if isinstance(pipeline, list | tuple) and pipeline and _keys(pipeline[0]) == ["$documents"]:
        return
    raise invalid_argument(
        f"{here}: names no collection; give {field}, or a pipeline whose first stage is $documents"
    )


def _check_opaque(spec: object, here: str, stage: str) -> None:
    """Refuse a stage not taken apart here that holds a reaching stage anywhere inside it."""
    if _holds_reaching(spec):
        path = _reaching_path(spec, here)
        key = path.rsplit(".", 1)[-1]
        raise invalid_argument(
            f"{path}: {key} inside {stage}, whose sub-pipelines the broker cannot "
            "vet against the allowlists; run it as a top-level stage"
        )


def _holds_reaching(spec: object) -> bool:
    """Whether a reaching key is anywhere in ``spec``: the fast scan every other stage gets.

    It builds no paths, and tests the types bson.decode makes first: a
    $documents of 10 MB is scanned in about half the time it takes to decode.
    Iterative, so a document's depth is bounded by max_bson_depth, not by
    Python's recursion limit.
    """
    pending = [spec]
    pop, extend = pending.pop, pending.extend
    while pending:
        value = pop()
        if isinstance(value, dict):
            if not _REACHING.isdisjoint(value):
                return True
            extend(value.values())
        elif isinstance(value, list):
            extend(value)
        elif type(value) in _SCALARS:
            continue
        elif isinstance(value, DBRef):
            # bson.decode turns a {$ref, $id, ...} document into a DBRef: look at all its keys.
            pending.append(value.as_doc())
        elif isinstance(value, Mapping):
            if not _REACHING.isdisjoint(value):
                return True
            extend(value.values())
        elif isinstance(value, tuple):
            extend(value)
    return False


def _reaching_path(spec: object, here: str) -> str:
    """The path of the first reaching key in ``spec``, in document order (one is there)."""
    pending: list[tuple[object, str]] = [(spec, here)]
    while pending:
        value, path = pending.pop()
        if isinstance(value, DBRef):
            value = value.as_doc()
        if isinstance(value, Mapping):
            for key in value:
                if key in _REACHING:
                    return f"{path}.{key}"
            pending.extend(reversed([(item, f"{path}.{key}") for key, item in value.items()]))
        elif isinstance(value, list | tuple):
            pending.extend(reversed([(item, f"{path}[{index}]") for index, item in enumerate(value)]))
    return here


def _describe(value: object) -> str:
    """How a value reads in a message, in BSON's terms."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, Mapping):
        return "a document"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a value of type {type(value).__name__}"


def _first_key(document: bytes) -> str | None:
    """The first field name of a BSON document, or None for an empty or malformed one."""
    if len(document) < 6 or document[4] == 0:
        return None
    end = document.find(b"\x00", 5)
    return document[5:end].decode("utf-8", "replace") if end > 0 else None


# --- retarget: rewrite the db of a final $out / $merge, byte for byte --------

# Sizes of fixed-size values by element type (https://bsonspec.org/spec.html).
_FIXED: Final[Mapping[int, int]] = {
    0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0,
    0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0,
}  # fmt: skip
_STRING, _DOCUMENT = 0x02, 0x03
# Values that start with an int32 length: the length counts the whole value
# for documents, arrays and code-with-scope; strings, code and symbols count
# what follows it; binaries count the bytes after the subtype.
_LENGTH_ALL: Final = frozenset({0x03, 0x04, 0x0F})
_LENGTH_AFTER: Final = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x05: 5}
_REGEX, _DB_POINTER = 0x0B, 0x0C


def retarget(stage: bytes, database: str) -> bytes:
    """The final $out or $merge ``stage`` with its target's ``db`` set to ``database``.

    ``database`` is the MongoDB name the caller's configured name maps to.
    Only the bytes of that one string change (and the length prefixes of the
    documents around it): every other field, its order and its exact BSON
    type stay as the caller sent them. A target without ``db`` (`$out:
    "coll"`, `$merge: {into: "coll"}`) is in the call's own database, which
    the broker already maps, so the stage comes back unchanged.

    ``stage`` must have passed `documents.check_document` and `inspect`;
    anything else is a ValueError, a bug in the caller.
    """
    if "\x00" in database or not database:
        raise ValueError(f"not a database name: {database!r}")
    try:
        element, name, value, _ = next(_elements(stage, 0))
        if name not in (b"$out", b"$merge"):
            raise ValueError(f"not a $out or $merge stage: {name!r}")
        # The documents around the db element, outermost first: their lengths change.
        around = [0]
        if element != _DOCUMENT:
            return stage
        around.append(value)
        spec = value
        if name == b"$merge":
            into = _find(stage, spec, b"into")
            if into is None or into[0] != _DOCUMENT:
                return stage
            spec = into[1]
            around.append(spec)
        found = _find(stage, spec, b"db")
        if found is None:
            return stage
        element, start, end = found
        if element != _STRING:
            raise ValueError("the target's db is not a string")
    except (IndexError, struct.error, StopIteration) as exc:
        raise ValueError("not a valid $out or $merge stage") from exc
    encoded = database.encode()
    replacement = _INT32.pack(len(encoded) + 1) + encoded + b"\x00"
    delta = len(replacement) - (end - start)
    out = bytearray(stage[:start] + replacement + stage[end:])
    for offset in around:
        # Every enclosing document starts before the db value, so its offset stands.
        _INT32.pack_into(out, offset, _INT32.unpack_from(stage, offset)[0] + delta)
    return bytes(out)


def _find(data: bytes, document: int, key: bytes) -> tuple[int, int, int] | None:
    """(type, value start, value end) of ``key`` in the document at offset ``document``."""
    for element, name, start, end in _elements(data, document):
        if name == key:
            return element, start, end
    return None


def _elements(data: bytes, document: int) -> Iterator[tuple[int, bytes, int, int]]:
    """Yield (type, name, value start, value end) for each element of the document at ``document``."""
    stop = document + _INT32.unpack_from(data, document)[0] - 1
    pos = document + 4
    while pos < stop:
        element = data[pos]
        name_end = data.index(b"\x00", pos + 1)
        value = name_end + 1
        end = _value_end(data, element, value)
        yield element, data[pos + 1 : name_end], value, end
        pos = end


def _value_end(data: bytes, element: int, value: int) -> int:
    if (fixed := _FIXED.get(element)) is not None:
        return value + fixed
    if element in _LENGTH_ALL:
        return value + int(_INT32.unpack_from(data, value)[0])
    if (extra := _LENGTH_AFTER.get(element)) is not None:
        return value + extra + int(_INT32.unpack_from(data, value)[0])
    if element == _REGEX:
        return data.index(b"\x00", data.index(b"\x00", value) + 1) + 1
    if element == _DB_POINTER:
        return value + 4 + int(_INT32.unpack_from(data, value)[0]) + 12
    raise ValueError(f"unknown BSON element type 0x{element:02x}")
