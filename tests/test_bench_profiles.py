"""The bench's database profiles: option parsing, URIs, and the side-by-side report, without a run.

The profiles themselves run in tests/test_bench_smoke.py (the smoke run has
both) and the server's TLS listener in tests/test_dbserver.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from pymongo.uri_parser import parse_uri

from bench import bench, dbprofiles, report
from harness.dbserver import DatabaseServer


def test_profiles_parse_in_order_once_each() -> None:
    assert dbprofiles.parse_profiles("plain") == ["plain"]
    assert dbprofiles.parse_profiles("tls-latency, plain,tls-latency") == ["tls-latency", "plain"]
    for bad in ("", " , ", "plain,tls", "TLS-latency"):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from plain, tls-latency"):
            dbprofiles.parse_profiles(bad)


def test_bench_options_default_to_plain_and_smoke_runs_both() -> None:
    assert bench.parse_args([]).db_profiles == ["plain"]
    assert bench.parse_args(["--smoke"]).db_profiles == ["plain", "tls-latency"]
    assert bench.parse_args(["--smoke", "--db-profiles", "plain"]).db_profiles == ["plain"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--db-profiles", "wan"])


def test_tls_latency_runs_only_storm_and_steady() -> None:
    asked = ["storm", "steady", "stream", "ghz", "profile"]
    assert dbprofiles.workloads_for("plain", asked) == asked
    assert dbprofiles.workloads_for("tls-latency", asked) == ["storm", "steady"]
    assert dbprofiles.workloads_for("tls-latency", ["steady", "stream"]) == ["steady"]
    assert dbprofiles.workloads_for("tls-latency", ["ghz"]) == []
    plan = bench.plan(bench.parse_args(["--db-profiles", "plain,tls-latency", "--workloads", "steady,ghz"]))
    assert plan["db_profiles"] == {"plain": ["steady", "ghz"], "tls-latency": ["steady"]}


def test_with_query_adds_and_replaces_options() -> None:
    assert (
        dbprofiles.with_query("mongodb://127.0.0.1:27017/", maxpoolsize=10, label="bench")
        == "mongodb://127.0.0.1:27017/?maxpoolsize=10&label=bench"
    )
    assert dbprofiles.with_query("mongodb://h:1", a=1) == "mongodb://h:1/?a=1"
    assert (
        dbprofiles.with_query("mongodb://u:p@h1:1,h2:2/db?replicaSet=rs&label=x", label="bench")
        == "mongodb://u:p@h1:1,h2:2/db?replicaSet=rs&label=bench"
    )


def test_tls_uri_is_one_pymongo_reads_as_tls_with_that_ca(tmp_path: Path) -> None:
    ca = tmp_path / "a dir" / "ca.pem"
    ca.parent.mkdir()
    ca.write_text("not checked by the parser beyond existing\n")
    uri = dbprofiles.tls_uri("127.0.0.1", 12345, ca)
    # A space is %20: the Go driver (mongobetween) would read a + as a plus sign.
    assert uri == f"mongodb://127.0.0.1:12345/?tls=true&tlsCAFile={str(ca).replace(' ', '%20')}"
    parsed = parse_uri(uri)
    assert parsed["nodelist"] == [("127.0.0.1", 12345)]
    assert parsed["options"]["tls"] is True
    assert parsed["options"]["tlsCAFile"] == str(ca)
    # mongobetween's upstream: its own options after the server's (label is mongobetween's, not pymongo's).
    upstream = dbprofiles.with_query(uri, maxpoolsize=10, label="bench")
    assert upstream == uri + "&maxpoolsize=10&label=bench"


def test_endpoint_is_the_proxy_with_the_servers_kind() -> None:
    server = DatabaseServer("127.0.0.1", 27017, "test")
    server.kind = "ferretdb"
    endpoint = dbprofiles.Endpoint(server, "127.0.0.1", 40000, {"tls": "true", "tlsCAFile": "/c/ca.pem"}, "r")
    assert (endpoint.kind, endpoint.port, endpoint.address, endpoint.managed) == (
        "ferretdb",
        40000,
        "127.0.0.1:40000",
        False,
    )
    assert endpoint.uri == "mongodb://127.0.0.1:40000/?tls=true&tlsCAFile=/c/ca.pem"


def _steady(profile: str | None, mode: str, param: int, ops: float, p50: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "workload": "steady",
        "mode": mode,
        "param": param,
        "repeat": 0,
        "metrics": {"ops_per_s": ops, "p50_ms": p50, "p99_ms": 2 * p50, "loadavg_1m": 1.0},
    }
    if profile is not None:
        record["db_profile"] = profile
    return record


def _raw(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"records": records, "plan": {"db_profiles": {}}, "db_profiles": {}}


def test_aggregate_keeps_profiles_apart_and_old_runs_are_plain() -> None:
    raw = _raw(
        [
            _steady(None, "per-process", 16, 900, 10),  # a run from before profiles: plain
            _steady("tls-latency", "per-process", 16, 300, 40),
            _steady("tls-latency", "broker-uds", 16, 600, 20),
        ]
    )
    assert report.db_profiles(raw) == ["plain", "tls-latency"]
    assert report.main_profile(raw) == "plain"
    plain = report.aggregate(raw)
    assert plain.get("steady", 16, "per-process", "ops_per_s").median == 900  # type: ignore[union-attr]
    assert plain.get("steady", 16, "broker-uds", "ops_per_s") is None
    tls = report.aggregate(raw, "tls-latency")
    assert tls.get("steady", 16, "per-process", "ops_per_s").median == 300  # type: ignore[union-attr]
    only_tls = _raw([_steady("tls-latency", "per-process", 1, 1, 1)])
    assert report.main_profile(only_tls) == "tls-latency"


def test_profiles_section_sets_the_profiles_side_by_side() -> None:
    records = []
    for profile, scale in (("plain", 1.0), ("tls-latency", 0.5)):
        for mode, ops in (("per-process", 900.0), ("mongobetween", 800.0), ("broker-uds", 600.0)):
            for c in (1, 16):
                records.append(_steady(profile, mode, c, ops * scale if mode != "broker-uds" else ops, 1.0))
    raw = _raw(records)
    raw["db_profiles"] = {
        "plain": {"how": "plain TCP", "ping": {"p50_ms": 0.2, "p99_ms": 1.0, "first_ms": 8.0}},
        "tls-latency": {"how": "TLS", "latency_toxic_each_way": {"latency": 1, "jitter": 1}},
    }
    text = report.profiles_section(raw)
    assert text.startswith("## Database profiles: plain and tls-latency side by side")
    assert "ping: p50 **0.20 ms**" in text and "1 ms ± 1 ms on each direction" in text
    ratios = dict(report.profile_ratios({p: report.aggregate(raw, p) for p in ("plain", "tls-latency")}))
    assert ratios["steady C=16 ops/s: broker-uds ÷ per-process"] == {
        "plain": "0.667x",
        "tls-latency": "1.33x",
    }
    # direct-shared never ran: its ratio row is left out, not shown as dashes.
    assert not any("direct-shared" in label for label in ratios)
    assert "| **broker-uds** | 600 (1 run) | 600 (1 run) |" in text
    assert "### Steady C = 16" in text and "### Steady C = 1" in text


def test_a_plain_only_report_says_how_to_add_the_other_profile() -> None:
    raw = _raw([_steady(None, "per-process", 1, 1, 1)])
    text = report.profiles_section(raw)
    assert "Only the plain profile ran" in text and "--db-profiles plain,tls-latency" in text
