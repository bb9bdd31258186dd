"""The collection-name rule (MongoDB's documented restrictions) and its setting, without a server."""

from __future__ import annotations

import grpc
import pytest

from broker.errors import Reason, RpcError
from broker.requests import collection_name
from broker.settings import Settings


@pytest.mark.parametrize(
    "name",
    ["items", "items.2024", "_private", "2024_orders", "system.js", "x" * 255, "é" * 127, "a b-c"],
)
def test_valid_collection_names_pass(name):
    assert collection_name(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "collection is required"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("a\x00b", "must not contain the NUL character"),
        ("$cmd", "must not contain '$'"),
        ("$cmd.sys.inprog", "must not contain '$'"),
        ("oplog.$main", "must not contain '$'"),
        ("price$", "must not contain '$'"),
    ],
)
def test_invalid_collection_names_are_refused_naming_the_rule(name, rule):
    with pytest.raises(RpcError) as caught:
        collection_name(name)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == Reason.INVALID_REQUEST
    assert rule in str(caught.value.message)


def test_system_writes_are_off_by_default():
    settings = Settings(databases={"app": {"uri": "mongodb://db/"}})
    assert settings.databases["app"].allow_system_writes is False
