"""The benchmark harness still runs: a few seconds of every workload, figures well formed.

Benchmarks are not tests: nothing here asserts a timing or a ratio. It runs
``python -m bench.bench --smoke`` (storm W=5 in two modes and mongobetween's
"not measured" path, steady C=1 for 1 s, a stream of 2,000 documents, ghz
for 1 s when it is built), then storm and steady again in the tls-latency
database profile (TLS to the server, toxiproxy latency), into a temporary
results directory, and checks
that every record is either a measurement with finite numbers or a reason
why it was not measured, and that the report and its plots were written. It also runs the layer table,
``python -m bench.latency --smoke``, and checks its rows the same way.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--smoke", "--results-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, (
        f"bench --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    raws = sorted((out / "raw").glob("bench-*.json"))
    assert len(raws) == 1, f"expected one raw file, found {raws}"
    return json.loads(raws[0].read_text(encoding="utf-8")), out, done.stdout


@pytest.mark.timeout(450)
def test_every_workload_produced_records(smoke_run: tuple[dict[str, Any], Path, str]) -> None:
    raw, _, _ = smoke_run
    workloads = {r["workload"] for r in raw["records"]}
    assert {"storm", "steady", "stream", "ghz"} <= workloads
    measured = {(r["workload"], r["mode"]) for r in raw["records"] if "metrics" in r}
    for workload in ("storm", "steady", "stream"):
        assert (workload, "per-process") in measured
        assert (workload, "broker-uds") in measured


@pytest.mark.timeout(450)
def test_measurements_are_well_formed(smoke_run: tuple[dict[str, Any], Path, str]) -> None:
    raw, _, _ = smoke_run
    for record in raw["records"]:
        if "not_measured" in record:
            assert isinstance(record["not_measured"], str) and record["not_measured"].startswith(
                "not measured"
            )
            continue
        metrics = record["metrics"]
        where = f"{record['workload']} {record['mode']} {record['param']}"
        if record["workload"] == "storm":
            assert metrics["workers_ok"] == record["param"], where
            assert metrics["workers_failed"] == 0, where
            assert len(metrics["spawn_to_first_ms"]) == record["param"], where
            assert all(_finite(v) and v > 0 for v in metrics["spawn_to_first_ms"]), where
            assert isinstance(metrics["peak_connections"], int) and metrics["peak_connections"] >= 0, where
            assert metrics["samples"] > 0, where
            assert _finite(metrics["wall_s"]) and metrics["wall_s"] > 0, where
        elif record["workload"] == "steady":
            assert metrics["ops"] > 0 and metrics["errors"] == 0, (where, metrics.get("error_samples"))
            for key in ("ops_per_s", "p50_ms", "p99_ms", "p99.9_ms"):
                assert _finite(metrics[key]) and metrics[key] > 0, (where, key)
            if record["mode"].startswith("broker"):
                assert _finite(metrics["proxy_cpu_s_per_1k_ops"]), where
                assert metrics["proxy_peak_rss_mb"] > 0, where
        elif record["workload"] == "stream":
            assert metrics["bytes"] > 0 and _finite(metrics["docs_per_s"]) and metrics["docs_per_s"] > 0, (
                where
            )
            assert metrics["client_peak_rss_mb"] > 0, where
        elif record["workload"] == "ghz":
            assert metrics["count"] > 0 and _finite(metrics["rps"]), where


@pytest.mark.timeout(450)
def test_mongobetween_is_reported_not_dropped(smoke_run: tuple[dict[str, Any], Path, str]) -> None:
    raw, out, _ = smoke_run
    if raw["mongobetween"]["binary"] is not None:
        pytest.skip("a mongobetween binary is available here; its mode was measured")
    reasons = [r for r in raw["records"] if r["mode"] == "mongobetween"]
    assert {r["workload"] for r in reasons} >= {"storm", "steady", "stream"}
    assert all(r["not_measured"].startswith("not measured") for r in reasons)
    assert "mongobetween" in (out / "REPORT.md").read_text(encoding="utf-8")


@pytest.mark.timeout(450)
def test_report_and_plots_written(smoke_run: tuple[dict[str, Any], Path, str]) -> None:
    _, out, stdout = smoke_run
    text = (out / "REPORT.md").read_text(encoding="utf-8")
    for heading in ("## Headline", "## Goals", "## Storm", "## Steady", "## Stream", "BENCH-BASELINE"):
        assert heading in text, heading
    for name in ("storm_peak_connections.png", "storm_spawn_to_first.png", "steady.png", "stream.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert "figure (median" in stdout


@pytest.mark.timeout(450)
def test_tls_latency_profile_ran_and_has_its_section(smoke_run: tuple[dict[str, Any], Path, str]) -> None:
    raw, out, stdout = smoke_run
    by_profile: dict[str, set[tuple[str, str]]] = {}
    for record in raw["records"]:
        if "metrics" in record:
            by_profile.setdefault(record["db_profile"], set()).add((record["workload"], record["mode"]))
    assert set(by_profile) == {"plain", "tls-latency"}
    tls = by_profile["tls-latency"]
    assert {w for w, _ in tls} == {"storm", "steady"}, "stream, ghz and profile run in plain only"
    for workload in ("storm", "steady"):
        assert (workload, "per-process") in tls and (workload, "broker-uds") in tls
    if raw["mongobetween"]["binary"] is not None:
        assert ("steady", "mongobetween") in tls, "mongobetween takes the TLS upstream URI"
    # Every per-process worker connected on its own, through the proxy: its connects were counted.
    storms = [r for r in raw["records"] if r.get("db_profile") == "tls-latency" and r["workload"] == "storm"]
    own = [r["metrics"] for r in storms if r["mode"] == "per-process"]
    assert own and all(m["connections_opened"] >= m["workers"] for m in own)
    about = raw["db_profiles"]["tls-latency"]
    assert about["latency_toxic_each_way"] == {"latency": 1, "jitter": 1}
    # Only the CA file's name: where the run kept it says nothing to a report reader.
    assert about["uri_shown"] == "mongodb://127.0.0.1:PROXYPORT/?tls=true&tlsCAFile=ca.pem"
    for profile in ("plain", "tls-latency"):
        ping = raw["db_profiles"][profile]["ping"]
        assert all(_finite(ping[k]) and ping[k] > 0 for k in ("first_ms", "p50_ms", "p99_ms")), profile
    text = (out / "REPORT.md").read_text(encoding="utf-8")
    section = text.split("## Database profiles: plain and tls-latency side by side", 1)[1]
    for heading in ("Key ratios", "### Storm W = 5", "### Steady C = 1"):
        assert heading in section, heading
    assert "spawn→first result p50 ms: tls-latency" in section
    assert "database profiles, plain / tls-latency:" in stdout


def test_profile_summary_reads_speedscope(tmp_path: Path) -> None:
    """The hot-spot tables come from py-spy's speedscope output; keep the parser honest."""
    frames = [
        {"name": "main", "file": "/repo/broker/cli.py", "line": 1},
        {"name": "Find", "file": "/repo/broker/service.py", "line": 2},
        {"name": "encode", "file": "/venv/site-packages/bson/__init__.py", "line": 3},
        {"name": "EpollSelector.select", "file": "/usr/lib/python3.11/selectors.py", "line": 4},
    ]
    profile = {
        "type": "sampled",
        "name": 'Thread 1 "MainThread"',
        "unit": "seconds",
        "samples": [[0, 1], [0, 1, 2], [0, 1, 2], [0, 3]],
        "weights": [0.01, 0.01, 0.01, 0.01],
    }
    path = tmp_path / "p.speedscope.json"
    path.write_text(json.dumps({"shared": {"frames": frames}, "profiles": [profile]}), encoding="utf-8")
    summary = report.profile_summary(path)
    assert summary["samples"] == 3 and summary["idle_samples"] == 1
    self_share = dict(summary["self"])
    assert self_share["encode (bson/__init__.py)"] == pytest.approx(200 / 3)
    assert dict(summary["inclusive"])["Find (broker/service.py)"] == pytest.approx(100)
    assert dict(summary["areas"])["bson"] == pytest.approx(200 / 3)


def test_without_a_mongobetween_binary_it_is_not_measured_and_never_built(monkeypatch, tmp_path) -> None:
    """The bench only measures a binary it is given: it never fetches or builds mongobetween."""
    from bench import workloads

    monkeypatch.setattr(workloads, "TOOLS", tmp_path)
    monkeypatch.delenv("MONGOBETWEEN", raising=False)
    absent = workloads.Mongobetween.obtain()
    assert absent.binary is None and absent.reason.startswith("not measured: no mongobetween binary")
    monkeypatch.setenv("MONGOBETWEEN", str(tmp_path / "nothing-here"))
    assert workloads.Mongobetween.obtain().reason.endswith("is not an executable file")
    built = tmp_path / "mongobetween"
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    monkeypatch.delenv("MONGOBETWEEN")
    assert workloads.Mongobetween.obtain().binary == str(built)


LAYER_ROWS = {
    "stub_aio_ping",
    "stub_sync_ping",
    "broker_ping",
    "broker_find_one",
    "broker_insert",
    "client_find_one",
    "client_insert_one",
    "async_ping",
    "async_find_one",
    "async_insert_one",
    "sync_ping",
    "sync_find_one",
    "sync_insert_one",
}


@pytest.mark.timeout(120)
def test_layer_table_runs(tmp_path: Path) -> None:
    """``python -m bench.latency --smoke``: every row's figures are finite or say why not.

    A few calls per row; no timing or ratio is asserted.
    """
    out = tmp_path / "layers.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, (
        f"bench.latency --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    assert "not asserted" in result["note"]
    assert "| layer |" in done.stdout and "Derived" in done.stdout
    (table,) = result["tables"]
    assert table["concurrency"] == 1
    assert {row["key"] for row in table["rows"]} == LAYER_ROWS
    for row in table["rows"]:
        for field in ("wall_p50_ms", "wall_p90_ms", "server_cpu_us", "client_cpu_us", "db_cpu_us"):
            value = row[field]
            if value is None:
                reason = row["reasons"].get(field)
                assert isinstance(reason, str) and reason, (row["key"], field)
            else:
                assert _finite(value) and value >= 0, (row["key"], field, value)
        # Only the direct pymongo rows have no serving process of their own.
        assert (row["server_cpu_us"] is None) == row["key"].startswith(("async_", "sync_")), row["key"]
        assert row["calls"] > 0 and row["wall_p50_ms"] is not None, row["key"]
    for entry in table["derived"]["differences"]:
        assert _finite(entry["cpu_us"]) or isinstance(entry.get("reason"), str), entry["label"]
    assert {share["call"] for share in table["derived"]["shares"]} == {"FindOne", "Insert"}
