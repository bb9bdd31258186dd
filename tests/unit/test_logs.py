"""Log escaping: no caller-supplied value can write a log line of its own (pure code, no server)."""

from __future__ import annotations

import ast
import logging
import re
import shlex
import time

import pytest

from broker.logs import JsonFormatter, TextFormatter, log_value


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("items", "items"),
        ("items_2024.v1:x-y", "items_2024.v1:x-y"),
        ("", "-"),
        ("-", '"-"'),
        ("données", "données"),  # printable letters stay readable
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("a\tb", "a\\tb"),
        ("nul\x00", "nul\\x00"),
        ("esc\x1b[31m", "esc\\x1b[31m"),
        ("del\x7f", "del\\x7f"),
        ("c1\x85", "c1\\x85"),  # NEL, a line break to some readers
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),
        ("nbsp\u00a0", "nbsp\\xa0"),
        ("back\\slash", "back\\\\slash"),
        ("k=v", "k\\x3dv"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ('q"', '"q\\""'),
    ],
)
def test_log_value_escapes_like_a_python_literal(value, logged):
    assert log_value(value) == logged


@pytest.mark.parametrize(
    "value",
    [
        "x\n2026-01-01 00:00:00,000 INFO mongo_broker.access: Find db=appdb coll=y code=OK ms=1.00 rid=z",
        'a b=c d\\ "e" \r\x00\u2028',
        " leading and trailing ",
        "\\x3d",
    ],
)
def test_a_logged_value_is_one_token_without_a_key(value):
    logged = log_value(value)
    assert "\n" not in logged and "\r" not in logged and "=" not in logged
    assert all(ch.isprintable() for ch in logged)
    line = f"Find db=appdb coll={logged} code=PERMISSION_DENIED"
    # A quote-aware split gives back exactly the three pairs, and even a
    # naive regex finds only the real code.
    pairs = dict(part.split("=", 1) for part in shlex.split(line, posix=True)[1:])
    assert set(pairs) == {"db", "coll", "code"} and pairs["code"] == "PERMISSION_DENIED"
    assert re.findall(r"code=(\S+)", line) == ["PERMISSION_DENIED"]


def test_log_value_round_trips_through_a_python_literal():
    value = 'a\nb\\c "d" e=f\x00\u2028'
    logged = log_value(value)
    literal = logged[1:-1] if logged.startswith('"') else logged
    # The escape rule is Python's: a string literal reads it back.
    assert ast.literal_eval(f'"{literal}"') == value


def _record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("mongo_broker.test", logging.ERROR, __file__, 1, message, args, exc_info)


def test_text_formatter_indents_every_continuation_line():
    formatter = TextFormatter()
    try:
        raise ValueError("boom\n2026-01-01 00:00:00,000 INFO mongo_broker.access: forged code=OK")
    except ValueError as exc:
        text = formatter.format(
            _record("failed for %s", "x\ny", exc_info=(type(exc), exc, exc.__traceback__))
        )
    first, *rest = text.split("\n")
    assert first.split(" ")[3] == "mongo_broker.test:"
    assert rest and all(line.startswith("    ") for line in rest), text


def test_json_formatter_writes_one_line_whatever_the_values():
    formatter = JsonFormatter()
    record = _record("coll=%s", log_value("a\nb"))
    record.collection = "a\nb\u2028"
    text = formatter.format(record)
    assert "\n" not in text and "\u2028" not in text


@pytest.mark.parametrize("make", [TextFormatter, JsonFormatter])
def test_time_stamps_are_logging_s_own_within_a_second_and_across_seconds(make):
    # The formatters reuse a second's strftime text: every stamp must still
    # read as logging.Formatter's would, across second (and day) boundaries.
    formatter = make()
    formatter.converter = time.gmtime
    reference = logging.Formatter()
    reference.converter = time.gmtime
    day_end = 1_767_225_599.0  # 2025-12-31 23:59:59 UTC
    for created in (day_end + 0.001, day_end + 0.999, day_end + 1.0, day_end + 1.5, day_end + 0.25, day_end):
        record = _record("at %s", "x")
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert formatter.formatTime(record) == reference.formatTime(record)
        iso = "%Y-%m-%dT%H:%M:%S"
        assert formatter.formatTime(record, iso) == reference.formatTime(record, iso)
