"""Build BSON byte for byte, including what bson.encode cannot write: duplicate keys, deep nesting."""

from __future__ import annotations

import struct
from typing import Any

import bson

__all__ = ["Raw", "RawArray", "array", "deep", "document"]


class Raw(bytes):
    """Bytes that are already one BSON document (or array), to nest as they are."""

    element_type = 0x03


class RawArray(Raw):
    """Bytes that are one BSON document, to nest as an array (keys as they are)."""

    element_type = 0x04


def _element(key: str, value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes([value.element_type]) + key.encode() + b"\x00" + value
    # One element as bson.encode writes it: drop the length prefix and the NUL.
    return bson.encode({key: value})[4:-1]


def document(*pairs: tuple[str, Any]) -> Raw:
    """A document with exactly these (key, value) pairs, in order, duplicates allowed."""
    body = b"".join(_element(key, value) for key, value in pairs)
    return Raw(struct.pack("<i", len(body) + 5) + body + b"\x00")


def array(*values: Any) -> Raw:
    """An array with these values, keyed "0", "1", ... as encoders write it."""
    return RawArray(document(*((str(i), v) for i, v in enumerate(values))))


def deep(levels: int, key: str = "n", leaf: Any = 1) -> bytes:
    """``levels`` documents nested in each other, the innermost {"leaf": leaf}.

    Built without recursion or repeated copying, so 100,000 levels take a
    moment: the length of each level is the next one's plus its own framing.
    """
    inner = bson.encode({"leaf": leaf})
    name = key.encode()
    frame = 4 + 1 + len(name) + 1 + 1  # length, type, key, NUL, closing NUL
    sizes = [len(inner) + frame * n for n in range(levels - 1, 0, -1)]
    head = b"".join(struct.pack("<i", size) + b"\x03" + name + b"\x00" for size in sizes)
    return head + inner + b"\x00" * (levels - 1)
