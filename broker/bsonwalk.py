"""One pass over a BSON document's bytes: structure, depth, duplicate keys, denied keys.

The broker sends the caller's bytes to the server unchanged, so it must judge
those bytes, not a decoded copy of them. A decoded dict keeps only the last of
two equal keys, while the server may act on the first: `{$and: [{$where: ..}],
$and: [{a: 1}]}` decodes to a harmless filter. `bson.decode` also turns a
`{$ref, $id, ...}` sub-document into a DBRef object, hiding its other keys, and
recurses in C, so a deep enough document fails with a RecursionError instead
of the depth limit. This walker reads the bytes as the BSON spec
(https://bsonspec.org/spec.html) defines them, iteratively:

- every element's length rules, NUL-terminated field names, UTF-8 names and
  strings, sub-document and array lengths that fit their parent, the
  terminating NUL of every document, and no bytes after the document;
- depth, counted as `broker.security` always has: the document itself is
  depth 1 and each field is one deeper than the document holding it, so
  `{"a": 1}` is depth 2 and `{"a": {}}` too;
- no field name twice in one document (or array);
- where a denied key (`$where`, ...) first appears, by path.

It raises on the first problem it finds and stops there, so a document
100,000 levels deep costs no more than one `max_depth` deep. Pure: no I/O,
no gRPC, no pymongo (it only lets other threads run now and then, see
_PAUSE_BYTES).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

__all__ = ["BsonWalkError", "DuplicateKey", "MalformedBson", "TooDeep", "Walk", "walk"]

_INT32 = struct.Struct("<i").unpack_from
# A large document is walked in a worker thread, beside the event loop. Every
# this many bytes the walk gives up the GIL (time.sleep(0)), so the loop gets
# it at once instead of after the interpreter's 5 ms switch interval: while an
# 8 MB document was walked, Ping's median went from ~18 ms to ~5 ms. It costs
# one comparison a field; a document of 32 KiB or less never pauses.
_PAUSE_BYTES = 32 * 1024

# Element types whose value has a fixed size (bool is checked on its own).
_FIXED = {
    0x01: 8,  # double
    0x06: 0,  # undefined (deprecated)
    0x07: 12,  # ObjectId
    0x08: 1,  # bool
    0x09: 8,  # UTC datetime
    0x0A: 0,  # null
    0x10: 4,  # int32
    0x11: 8,  # timestamp
    0x12: 8,  # int64
    0x13: 16,  # decimal128
    0x7F: 0,  # max key
    0xFF: 0,  # min key
}
# string, JavaScript code, symbol: int32 length (counting the NUL), bytes, NUL.
_STRINGS = frozenset({0x02, 0x0D, 0x0E})
_CODE_WITH_SCOPE, _BINARY, _REGEX, _DB_POINTER = 0x0F, 0x05, 0x0B, 0x0C
_BOOL = 0x08
_DOLLAR = 0x24
# How a frame was entered, for paths and for the operator check: operators
# mean something only as keys of a document, not of an array or of the scope
# of JavaScript code.
_IN_DOCUMENT, _IN_ARRAY, _IN_SCOPE = 0, 1, 2
# Element types that hold a document, and the frame each one opens.
_CONTAINERS = {0x03: _IN_DOCUMENT, 0x04: _IN_ARRAY, _CODE_WITH_SCOPE: _IN_SCOPE}


class BsonWalkError(ValueError):
    """The bytes are not a document the broker passes on; ``path`` says where."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class MalformedBson(BsonWalkError):
    """The bytes break the BSON spec."""


class DuplicateKey(BsonWalkError):
    """A document (or array) holds the same field name twice."""


class TooDeep(BsonWalkError):
    """The document nests deeper than ``max_depth``."""


@dataclass(frozen=True, slots=True)
class Walk:
    """What a walk found in a valid document."""

    # Path of the first denied key, e.g. "filter.$or[0].$where"; None if none.
    denied: str | None
    # The top-level `_id` element, type byte to end of value: (type, start,
    # value start, end) offsets into the document; None if it has no `_id`.
    id_element: tuple[int, int, int, int] | None
    # Top-level fields, and how many of them start with "$": an update
    # document must be all operators, a replacement none.
    fields: int = 0
    operators: int = 0


# A frame is a document being read: (end, depth, kind, keys, segment), where
# end is the offset of its terminating NUL, kind how it was entered, keys the
# field names seen so far, and segment how its parent names it (a key or an
# index). Tuples on a list: the walk must not recurse.
_Frame = tuple[int, int, int, set[bytes], bytes | int | None]


class _Problem(Exception):
    """Raised inside the walk; `walk` adds the path where it happened."""

    def __init__(
        self, problem: str, *, error: type[BsonWalkError] = MalformedBson, element: bool = True
    ) -> None:
        self.problem = problem
        self.error = error
        # Whether the problem is in the element being read, or in its document.
        self.element = element


def _name(segment: bytes | int) -> str:
    if isinstance(segment, int):
        return f"[{segment}]"
    return "." + segment.decode("utf-8", "replace")


def _path(base: str, frames: list[_Frame]) -> str:
    """The path of the innermost frame: built only for an error or a finding."""
    parts = [base]
    for _, _, kind, _, segment in frames:
        if segment is not None:
            parts.append(_name(segment))
            if kind == _IN_SCOPE:
                parts.append("(scope)")
    return "".join(parts)


# One loop with its state in locals, on purpose: the walk runs on every
# incoming document, and helper calls per field would cost a third more.
def walk(  # noqa: PLR0915
    data: bytes, path: str, *, max_depth: int, denied: frozenset[str] = frozenset()
) -> Walk:
    """Validate ``data`` as exactly one BSON document; raise a BsonWalkError naming the path.

    ``path`` names the document in messages ("filter", "documents[3]").
    Finding a ``denied`` key is not an error here: the first one's path is
    returned, so the caller decides (the walk still checks the whole document).
    """
    _check_envelope(data, path, max_depth)
    found: str | None = None
    id_element: tuple[int, int, int, int] | None = None
    # The innermost frame lives in locals, for speed; `parents` holds the
    # frames around it.
    end, depth, kind, keys, segment = len(data) - 1, 1, _IN_DOCUMENT, set[bytes](), None
    parents: list[_Frame] = []
    key = b""
    pos = 4
    pause_at = _PAUSE_BYTES
    fields = operators = 0
    try:
        while True:
            if pos > pause_at:
                pause_at = _pause(pos)
            if pos >= end:
                # At the frame's terminating NUL (checked when it was entered).
                if not parents:
                    break
                pos = end + 1
                end, depth, kind, keys, segment = parents.pop()
                continue
            element = data[pos]
            key_end = data.find(b"\x00", pos + 1, end)
            if key_end < 0:
                raise _Problem("a field name runs past the end of its document (no NUL)", element=False)
            key = data[pos + 1 : key_end]
            if key in keys:
                raise _Problem("duplicate key", error=DuplicateKey)
            keys.add(key)
            if depth == 1:
                fields += 1
                operators += data[pos + 1] == _DOLLAR
            if not key.isascii():
                _utf8(key, "a field name")
            if (
                found is None
                and denied
                and kind == _IN_DOCUMENT
                and data[pos + 1] == _DOLLAR
                and key.decode() in denied
            ):
                found = _path(path, [*parents, (end, depth, kind, keys, segment)]) + _name(key)
            value = key_end + 1
            if (fixed := _FIXED.get(element)) is not None:
                pos = value + fixed
                if pos > end or (element == _BOOL and data[value] > 1):
                    raise _Problem(_fixed_problem(data, element, value, end))
            elif element in _CONTAINERS:
                frame, pos = _enter(
                    data, (end, depth, kind, keys, segment), element, key, value, max_depth=max_depth
                )
                parents.append((end, depth, kind, keys, segment))
                end, depth, kind, keys, segment = frame
                if depth == 2 and key == b"_id":
                    # The element starts 5 bytes before its value (type, "_id",
                    # NUL) and ends after its document's closing NUL.
                    id_element = (element, value - 5, value, end + 1)
                continue
            else:
                pos = _scalar_end(data, element, value, end)
            if depth == 1 and key == b"_id":
                id_element = (element, value - 5, value, pos)  # (see above)
    except _Problem as problem:
        raise _located(problem, path, [*parents, (end, depth, kind, keys, segment)], key) from None
    return Walk(found, id_element, fields, operators)


def _pause(pos: int) -> int:
    time.sleep(0)  # lets a thread waiting for the GIL (the event loop) run now
    return pos + _PAUSE_BYTES


def _enter(
    data: bytes, parent: _Frame, element: int, key: bytes, value: int, *, max_depth: int
) -> tuple[_Frame, int]:
    """Check the document that the element at ``value`` holds; return its frame and where its fields start."""
    end, depth, kind, keys, _ = parent
    inner, length = _container(data, element, value, end)
    if length > 5 and depth + 2 > max_depth:
        raise _Problem(f"nests deeper than {max_depth}", error=TooDeep)
    segment = len(keys) - 1 if kind == _IN_ARRAY else key
    return (inner + length - 1, depth + 1, _CONTAINERS[element], set(), segment), inner + 4


def _check_envelope(data: bytes, path: str, max_depth: int) -> None:
    """The outermost document: its length prefix, its last byte, and no bytes after it."""
    size = len(data)
    if size < 5:
        raise MalformedBson(path, f"{size} bytes is shorter than the smallest document (5 bytes)")
    declared: int = _INT32(data, 0)[0]
    if declared != size:
        raise MalformedBson(path, f"the length prefix says {declared} bytes but there are {size}")
    if data[size - 1] != 0:
        raise MalformedBson(path, "the document does not end with a NUL byte")
    if size > 5 and max_depth < 2:
        raise TooDeep(path, f"nests deeper than {max_depth}")


def _fixed_problem(data: bytes, element: int, value: int, end: int) -> str:
    if value + _FIXED[element] > end:
        return f"a value of type 0x{element:02x} runs past the end of its document"
    return f"a bool must be 0 or 1, not {data[value]}"


def _located(problem: _Problem, path: str, frames: list[_Frame], key: bytes) -> BsonWalkError:
    """The error for ``problem``, met while reading ``key`` in the innermost of ``frames``."""
    where = _path(path, frames)
    kind, keys = frames[-1][2], frames[-1][3]
    if problem.error is DuplicateKey:
        # Name the key as the server would see it twice.
        where += f"[{key.decode('utf-8', 'replace')}]" if kind == _IN_ARRAY else _name(key)
    elif problem.element:
        where += _name(len(keys) - 1 if kind == _IN_ARRAY else key)
    return problem.error(where, problem.problem)


def _container(data: bytes, element: int, value: int, end: int) -> tuple[int, int]:
    """Check a sub-document, array or code-with-scope at ``value``; return (document start, length)."""
    if element == _CODE_WITH_SCOPE:
        # int32 total length, then the code as a string, then the scope document.
        total = _length(data, value, end, 14, "code-with-scope")
        inner = _string(data, value + 4, value + total)
        length = _length(data, inner, value + total, 5, "scope document")
        if inner + length != value + total:
            raise _Problem("the code-with-scope lengths disagree")
    else:
        inner = value
        length = _length(data, value, end, 5, "sub-document")
    if data[inner + length - 1] != 0:
        raise _Problem("a sub-document does not end with a NUL byte")
    return inner, length


def _scalar_end(data: bytes, element: int, value: int, end: int) -> int:
    """Check a value of a variable-size, non-document type; return the offset after it."""
    if element in _STRINGS:
        return _string(data, value, end)
    if element == _BINARY:
        if value + 5 > end:
            raise _Problem("a binary runs past the end of its document")
        length: int = _INT32(data, value)[0]
        stop = value + 5 + length
        if length < 0 or stop > end:
            raise _Problem(f"the binary length {length} does not fit its document")
        # The old binary subtype 2 repeats the length inside the value.
        if data[value + 4] == 0x02 and (length < 4 or _INT32(data, value + 5)[0] != length - 4):
            raise _Problem("the two lengths of a binary of subtype 2 disagree")
        return stop
    if element == _REGEX:
        pos = value
        for _ in range(2):  # the pattern, then the options
            stop = data.find(b"\x00", pos, end)
            if stop < 0:
                raise _Problem("a regular expression runs past the end of its document")
            _utf8(data[pos:stop], "a regular expression")
            pos = stop + 1
        return pos
    if element == _DB_POINTER:
        stop = _string(data, value, end) + 12
        if stop > end:
            raise _Problem("a DBPointer runs past the end of its document")
        return stop
    raise _Problem(f"unknown element type 0x{element:02x}")


def _length(data: bytes, at: int, end: int, least: int, what: str) -> int:
    """The int32 length at ``at`` of a value that must end by ``end``."""
    if at + 4 > end:
        raise _Problem(f"a {what} runs past the end of its document")
    length: int = _INT32(data, at)[0]
    if length < least or at + length > end:
        raise _Problem(f"the {what} length {length} does not fit its document")
    return length


def _string(data: bytes, at: int, end: int) -> int:
    """Check the BSON string at ``at`` (int32 length, UTF-8, NUL); return the offset after it."""
    if at + 4 > end:
        raise _Problem("a string runs past the end of its document")
    length: int = _INT32(data, at)[0]
    stop = at + 4 + length
    if length < 1 or stop > end:
        raise _Problem(f"the string length {length} does not fit its document")
    if data[stop - 1] != 0:
        raise _Problem("a string does not end with a NUL byte")
    _utf8(data[at + 4 : stop - 1], "a string")
    return stop


def _utf8(text: bytes, what: str) -> None:
    if not text.isascii():
        try:
            text.decode()
        except UnicodeDecodeError:
            raise _Problem(f"{what} is not valid utf-8") from None
