"""Logging set-up: named loggers under `mongo_broker`, text or JSON lines.

Log lines carry names that callers choose (database and collection names go
into the access log even for calls that are refused), so nothing a caller
sends may be able to write a line of its own:

- every caller-supplied value is put into a text line through
  `log_value`, which escapes it the way Python's repr does (`\\n`, `\\x00`,
  `\\\\`, `\\u2028`; `=` too, as `\\x3d`) and double-quotes it when it holds
  a space or `"`, so `key=value` parsing stays unambiguous;
- the text formatter indents every continuation line of a record (a
  traceback, the SIGUSR1 listing), so only the first line of a record ever
  starts in column 0;
- JSON lines are escaped by `json.dumps` (with `ensure_ascii`, so even
  U+2028 is written as `\\u2028`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "log_value"]

# Attributes every LogRecord has; anything else was passed in `extra=` and
# belongs in the JSON object.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}

# Anything outside printable ASCII, and the characters that have a meaning
# in a `key=value` line. Values without any (nearly all) are logged as they are.
_NEEDS_CARE: Final = re.compile(r'[^\x21-\x7e]|[\\"=]')
_QUOTE_IF: Final = frozenset(' "')
# `=` is escaped rather than kept, so that `key=` appears in a line only
# where the broker wrote a key: even a naive `code=(\S+)` finds the real one.
_NAMED: Final = {
    "\\": "\\\\",
    '"': '\\"',
    "=": "\\x3d",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# What stands for "no value" in a text line, e.g. `coll=-` for a Ping.
_EMPTY: Final = "-"
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch == " " or ch.isprintable():
        # Printable letters of any script stay readable; only what a terminal
        # or a log shipper would act on (controls, separators, format
        # characters such as U+202E) is escaped.
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def log_value(value: str) -> str:
    """``value`` as one unambiguous token of a text log line.

    The rule: backslash, double quote, `=` and every non-printable character
    are escaped as in a Python string literal (`\\\\`, `\\"`, `\\x3d`, `\\n`,
    `\\x1b`, `\\u2028`); a value holding a space or `"` (or one that reads
    `-`) is wrapped in double quotes; an empty value is `-`. The result never
    holds a line break or a `=`, and splitting a line on the spaces outside
    quotes gives back its `key=value` pairs.
    """
    if not value:
        return _EMPTY
    if value == _EMPTY:
        return '"-"'
    if _NEEDS_CARE.search(value) is None:
        return value
    escaped = "".join(_escape_char(ch) for ch in value)
    if any(ch in _QUOTE_IF for ch in value):
        return f'"{escaped}"'
    return escaped


class _Formatter(logging.Formatter):
    """logging.Formatter whose time stamp reuses its strftime part within a second.

    Every call writes an access-log line, and most fall in the same second
    as the one before; the text is exactly what logging.Formatter.formatTime
    writes.
    """

    _stamp: tuple[int, str | None, str] = (-1, None, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, fmt, text = self._stamp
        if second != int(record.created) or fmt != datefmt:
            text = time.strftime(datefmt or self.default_time_format, self.converter(record.created))
            # One tuple, so a reader in another thread never sees half of it.
            self._stamp = (int(record.created), datefmt, text)
        if datefmt or not self.default_msec_format:
            return text
        return self.default_msec_format % (text, record.msecs)


class TextFormatter(_Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s``, one record per unindented line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" in text or "\r" in text:
            # A continuation line (a traceback, a multi-line message) is
            # indented, so it can never pass for a record of its own.
            text = _LINE_BREAK.sub("\n    ", text)
        return text


class JsonFormatter(_Formatter):
    """One JSON object per line, with `extra=` fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mongo_broker").setLevel(level.upper())
