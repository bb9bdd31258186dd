"""The Python client's target forms: one broker, or the replicas of a shared tier."""

from __future__ import annotations

import json
from typing import Any

import pytest
from broker_client._channel import normalize_target, service_config


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["127.0.0.1:50051", " 10.0.0.8:50052 "], "ipv4:127.0.0.1:50051,10.0.0.8:50052"),
        (("10.0.0.7:1",), "ipv4:10.0.0.7:1"),
        (["[fd00::7]:50051", "[::1]:50052"], "ipv6:[fd00::7]:50051,[::1]:50052"),
        (
            "dns:///mongo-broker.apps.svc.cluster.local:50051",
            "dns:///mongo-broker.apps.svc.cluster.local:50051",
        ),
        ("/run/b.sock", "unix:///run/b.sock"),
    ],
)
def test_a_list_of_replicas_becomes_a_grpc_address_list(target: Any, expected: str) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ([], "is empty"),
        (["broker-0:50051"], "is not an IP address.*dns:///name:port"),
        (["10.0.0.7"], "needs 'IP:port'"),
        (["10.0.0.7:0"], "port from 1 to 65535"),
        (["10.0.0.7:70000"], "port from 1 to 65535"),
        (["10.0.0.7:1", "[::1]:2"], "mix IPv4 and IPv6"),
        (["unix:///run/b.sock"], "needs .IP:port."),
        ("10.0.0.7:1,10.0.0.8:1", "pass them as a list"),
    ],
)
def test_a_bad_replica_list_is_refused_with_the_fix(target: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_target(target)


def test_a_replica_list_entry_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        normalize_target(["10.0.0.7:1", 5])  # type: ignore[list-item]


@pytest.mark.parametrize("target", ["ipv4:10.0.0.7:1,10.0.0.8:1", "dns:///b.svc:50051", "127.0.0.1:50051"])
def test_tcp_targets_balance_round_robin_and_health_check(target: str) -> None:
    config = json.loads(service_config(target))
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "broker.v1.Broker"},
    }


@pytest.mark.parametrize("target", ["unix:///run/b.sock", "unix:/run/b.sock", "unix-abstract:b"])
def test_a_unix_socket_holds_no_health_watch(target: str) -> None:
    # One broker with nowhere else to go: every pre-fork worker holding a
    # Watch stream would only cost the broker.
    assert json.loads(service_config(target)) == {"loadBalancingConfig": [{"round_robin": {}}]}
