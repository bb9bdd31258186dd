"""Turn the harness's raw figures into ``bench/results/REPORT.md`` and its PNG plots.

    python -m bench.report bench/results/raw/bench-20250101-120000.json [--out bench/results]

The report holds only text made from the run's figures; how each figure is
measured, how to read it and the optimisation pass are in docs/BENCHMARKS.md,
which the report links to. The first report written keeps its key figures as
the *before* baseline in a comment block at its end (``--new-baseline``
starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import dbprofiles, modes
from bench.modes import percentile

REPO = Path(__file__).resolve().parent.parent
# From bench/results/REPORT.md.
METHOD = "../../docs/BENCHMARKS.md"

__all__ = ["aggregate", "headline_text", "main", "profile_summary", "write_report"]

BASELINE_RE = re.compile(r"<!-- BENCH-BASELINE (\{.*?\}) -->", re.S)
PRIMARY = modes.BROKER_UDS
# pymongo opens one monitoring connection per server, and one more for RTT
# where the server streams heartbeats (MongoDB 4.4+; FerretDB does not).
MONITORING_CONNECTIONS = 2

Key = tuple[str, Any, str]  # (workload, param, mode)


@dataclass(frozen=True)
class Cell:
    """A figure over repeats: median, min, max, how many."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Cell | None:
        clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not clean:
            return None
        return cls(statistics.median(clean), min(clean), max(clean), len(clean))


# --- from records to cells ------------------------------------------------------------------------


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The per-run scalar figures of one record (lists become percentiles)."""
    m = record["metrics"]
    workload = record["workload"]
    if workload == "storm":
        return {
            "wall_s": m["wall_s"],
            "s2f_p50_ms": percentile(m["spawn_to_first_ms"], 50),
            "s2f_p99_ms": percentile(m["spawn_to_first_ms"], 99),
            "import_p50_ms": percentile(m["spawn_to_imported_ms"], 50),
            "op_p50_ms": percentile(m["op_ms"], 50),
            "peak_connections": m["peak_connections"],
            "connections_opened": m["connections_opened"],
            "workers_failed": m["workers_failed"],
            "worker_rss_mb": percentile(m["worker_peak_rss_mb"], 50),
            # A worker's own CPU from spawn to exit (absent from older runs and the threads mode).
            "worker_cpu_p50_ms": percentile(m.get("worker_cpu_ms", []), 50),
            "loadavg_1m": m.get("loadavg_1m", math.nan),
        }
    if workload == "profile":
        return {}
    return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass
class Aggregate:
    cells: dict[Key, dict[str, Cell]]
    missing: dict[Key, str]
    params: dict[str, list[Any]]
    notes: dict[Key, list[str]]

    def get(self, workload: str, param: Any, mode: str, metric: str) -> Cell | None:
        return self.cells.get((workload, param, mode), {}).get(metric)

    def modes_for(self, workload: str, param: Any) -> list[str]:
        present = {k[2] for k in (*self.cells, *self.missing) if k[0] == workload and k[1] == param}
        order = [*modes.MODES, "ghz Ping", "ghz Find", "steady", "stream"]
        return [m for m in order if m in present] + sorted(present - set(order))


def db_profiles(raw: dict[str, Any]) -> list[str]:
    """The database profiles the run's records come from, in run order (old runs: plain only)."""
    found: list[str] = []
    for record in raw["records"]:
        profile = record.get("db_profile", dbprofiles.PLAIN)
        if profile not in found:
            found.append(profile)
    return found or [dbprofiles.PLAIN]


def main_profile(raw: dict[str, Any]) -> str:
    """The profile of the report's main sections: plain whenever it ran."""
    found = db_profiles(raw)
    return dbprofiles.PLAIN if dbprofiles.PLAIN in found else found[0]


def aggregate(raw: dict[str, Any], db_profile: str | None = None) -> Aggregate:
    """Cells of one database profile's records (``main_profile`` unless given)."""
    wanted = db_profile or main_profile(raw)
    values: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    missing: dict[Key, str] = {}
    notes: dict[Key, list[str]] = defaultdict(list)
    params: dict[str, list[Any]] = defaultdict(list)
    for record in raw["records"]:
        if record.get("db_profile", dbprofiles.PLAIN) != wanted:
            continue
        key = (record["workload"], record["param"], record["mode"])
        if record["param"] not in params[record["workload"]]:
            params[record["workload"]].append(record["param"])
        if "not_measured" in record:
            missing[key] = record["not_measured"]
            continue
        for name, value in scalars(record).items():
            values[key][name].append(value)
        samples = record["metrics"].get("error_samples") or record["metrics"].get("failure_samples") or []
        notes[key].extend(s for s in samples if s not in notes[key])
    cells = {
        key: {name: cell for name, vals in metrics.items() if (cell := Cell.of(vals)) is not None}
        for key, metrics in values.items()
    }
    for found in params.values():
        found.sort(key=lambda p: (p is None, p if isinstance(p, int | float) else 0))
    return Aggregate(cells, missing, dict(params), dict(notes))


# --- formatting -----------------------------------------------------------------------------------


def num(value: float, digits: int | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if digits is None:
        size = abs(value)
        digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    return f"{value:,.{digits}f}"


def fmt(cell: Cell | None, digits: int | None = None) -> str:
    if cell is None:
        return "-"
    if cell.n == 1:
        return f"{num(cell.median, digits)} (1 run)"
    if cell.lo == cell.hi:
        return f"{num(cell.median, digits)} [= x{cell.n}]"
    return f"{num(cell.median, digits)} [{num(cell.lo, digits)}-{num(cell.hi, digits)}]"


def ratio(a: Cell | None, b: Cell | None) -> str:
    if a is None or b is None or math.isnan(a.median) or math.isnan(b.median):
        return "-"
    if b.median == 0:
        return "-" if a.median == 0 else "∞"
    value = a.median / b.median
    return f"{value:.3g}x" if value < 1000 else f"{value:,.0f}x"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(
    agg: Aggregate, workload: str, param: Any, columns: Sequence[tuple[str, str, int | None]]
) -> str:
    """Rows: modes; columns: (metric, header, digits). A mode not measured shows its reason."""
    rows = []
    for mode in agg.modes_for(workload, param):
        key = (workload, param, mode)
        if key in agg.missing:
            rows.append([f"**{mode}**", agg.missing[key], *["-" for _ in columns[1:]]])
            continue
        cells = agg.cells.get(key, {})
        runs = max((c.n for c in cells.values()), default=0)
        rows.append(
            [f"**{mode}**", str(runs), *(fmt(cells.get(metric), digits) for metric, _, digits in columns)]
        )
    header = ["mode", "runs", *(h for _, h, _ in columns)]
    # A not-measured row has its reason under "runs" and dashes after it.
    rows = [r if len(r) == len(header) else [*r, *["-"] * (len(header) - len(r))] for r in rows]
    return table(header, rows)


def ratio_tables(agg: Aggregate, workload: str, param: Any, metrics: Sequence[tuple[str, str]]) -> str:
    """For each metric, every measured mode against every other: row / column, of medians."""
    measured = [m for m in agg.modes_for(workload, param) if (workload, param, m) in agg.cells]
    if len(measured) < 2:
        return ""
    parts = []
    for metric, title in metrics:
        have = [m for m in measured if agg.get(workload, param, m, metric) is not None]
        if len(have) < 2:
            continue
        rows = [
            [
                f"**{row}**",
                *(
                    ratio(agg.get(workload, param, row, metric), agg.get(workload, param, col, metric))
                    for col in have
                ),
            ]
            for row in have
        ]
        parts.append(f"*{title}*, row ÷ column:\n\n" + table(["", *have], rows))
    if not parts:
        return ""
    return "<details><summary>Ratios against every peer</summary>\n\n" + "\n\n".join(parts) + "\n\n</details>"


# --- sections -------------------------------------------------------------------------------------


STORM_COLUMNS: list[tuple[str, str, int | None]] = [
    ("wall_s", "wall time s", 1),
    ("s2f_p50_ms", "spawn→first result p50 ms", 0),
    ("s2f_p99_ms", "spawn→first result p99 ms", 0),
    ("import_p50_ms", "spawn→imports done p50 ms", 0),
    ("worker_cpu_p50_ms", "worker CPU spawn→exit p50 ms", 0),
    ("peak_connections", "peak DB connections", 0),
    ("connections_opened", "DB connections opened", 0),
    ("op_p50_ms", "later ops p50 ms", 2),
    ("workers_failed", "failed workers", 0),
    ("loadavg_1m", "load avg 1 min", 1),
]
STEADY_COLUMNS: list[tuple[str, str, int | None]] = [
    ("ops_per_s", "ops/s", 0),
    ("p50_ms", "p50 ms", 2),
    ("p99_ms", "p99 ms", 1),
    ("p99.9_ms", "p99.9 ms", 1),
    ("proxy_cpu_s_per_1k_ops", "broker CPU s / 1k ops", 3),
    ("proxy_peak_rss_mb", "broker peak RSS MB", 0),
    ("errors", "errors", 0),
    ("loadavg_1m", "load avg 1 min", 1),
]
STREAM_COLUMNS: list[tuple[str, str, int | None]] = [
    ("docs_per_s", "docs/s", 0),
    ("mb_per_s", "MB/s", 1),
    ("proxy_peak_rss_mb", "broker peak RSS MB", 0),
    ("proxy_baseline_rss_mb", "broker RSS before MB", 0),
    ("client_peak_rss_mb", "client peak RSS MB", 0),
    ("proxy_cpu_s_per_100k_docs", "broker CPU s / 100k docs", 2),
    ("loadavg_1m", "load avg 1 min", 1),
]
GHZ_COLUMNS: list[tuple[str, str, int | None]] = [
    ("rps", "calls/s", 0),
    ("ok_per_s", "OK calls/s", 0),
    ("p50_ms", "p50 ms", 2),
    ("p99_ms", "p99 ms", 1),
    ("errors", "errors", 0),
    ("proxy_cpu_s_per_1k_ops", "broker CPU s / 1k calls", 3),
]


def _notes(agg: Aggregate, workload: str) -> str:
    lines = [
        f"- {mode} at {param}: {'; '.join(samples[:2])}"
        for (w, param, mode), samples in sorted(agg.notes.items(), key=str)
        if w == workload and samples
    ]
    return ("Errors seen (first of each kind):\n\n" + "\n".join(lines)) if lines else ""


def _method(anchor: str) -> str:
    return f"How it is measured: [docs/BENCHMARKS.md]({METHOD}#{anchor})."


def _param_tables(
    agg: Aggregate,
    workload: str,
    title: Callable[[Any], str],
    columns: Sequence[tuple[str, str, int | None]],
    ratios: Sequence[tuple[str, str]],
) -> list[str]:
    """One metric table (and its ratio tables) per param of ``workload``."""
    out = []
    for param in agg.params.get(workload, []):
        out += [f"### {title(param)}", "", metric_table(agg, workload, param, columns), ""]
        if peers := ratio_tables(agg, workload, param, ratios):
            out += [peers, ""]
    return out


def _closing(agg: Aggregate, workload: str, images: dict[str, str], names: Sequence[str]) -> list[str]:
    out = [f"![{name}]({images[name]})\n" for name in names if name in images]
    if notes := _notes(agg, workload):
        out += [notes, ""]
    return out


def storm_section(raw: dict[str, Any], agg: Aggregate, images: dict[str, str]) -> str:
    plan = raw["plan"]["storm"]
    out = [
        "## Storm: W short-lived worker processes",
        "",
        f"{plan['ops']} operations per worker, its client kept {plan['hold_ms']} ms more, at most "
        f"**{plan['concurrency']} alive at once**. " + _method("storm-w-short-lived-worker-processes"),
        "",
    ]
    if plan.get("large_w") in agg.params.get("storm", []):
        out += [
            f"At W={plan['large_w']} only {', '.join(plan['large_modes'])} (and mongobetween, were it "
            f"available) ran, {plan['large_repeats']} repeat(s); `--full` runs every mode there.",
            "",
        ]
    if 0 in agg.params.get("imports", []):
        out += [
            "A cold worker's imports, one process at a time:",
            "",
            metric_table(
                agg, "imports", 0, [("import_ms", "import ms", 1), ("process_ms", "whole process ms", 0)]
            ),
            "",
        ]
    out += _param_tables(
        agg,
        "storm",
        lambda w: f"W = {w}",
        STORM_COLUMNS,
        [
            ("peak_connections", "peak DB connections"),
            ("connections_opened", "DB connections opened"),
            ("s2f_p50_ms", "spawn→first result p50"),
            ("s2f_p99_ms", "spawn→first result p99"),
            ("wall_s", "wall time"),
        ],
    )
    out += _closing(agg, "storm", images, ("storm_peak_connections", "storm_spawn_to_first"))
    return "\n".join(out)


def steady_section(raw: dict[str, Any], agg: Aggregate, images: dict[str, str]) -> str:
    plan = raw["plan"]["steady"]
    out = [
        "## Steady: C long-lived workers",
        "",
        f"{plan['windows']} consecutive windows of {plan['seconds']:g} s per mode and C (the repeats); "
        f"find_one by `_id` of one of {plan['seed_docs']} seeded documents, every "
        f"{plan['insert_every']}th operation an insert_one. " + _method("steady-c-long-lived-workers"),
        "",
    ]
    out += _param_tables(
        agg,
        "steady",
        lambda c: f"C = {c}",
        STEADY_COLUMNS,
        [
            ("ops_per_s", "throughput"),
            ("p50_ms", "p50 latency"),
            ("p99_ms", "p99 latency"),
            ("p99.9_ms", "p99.9 latency"),
        ],
    )
    out += _closing(agg, "steady", images, ("steady",))
    return "\n".join(out)


def stream_section(raw: dict[str, Any], agg: Aggregate, images: dict[str, str]) -> str:
    plan = raw["plan"]["stream"]
    out = [
        "## Stream: one find of N ~1 KB documents",
        "",
        f"Documents of {plan['doc_bytes']} bytes of BSON, `batch_size={plan['batch_size']}`. "
        + _method("stream-one-find-of-n-1-kb-documents"),
        "",
    ]
    out += _param_tables(
        agg,
        "stream",
        lambda n: f"N = {n:,}",
        STREAM_COLUMNS,
        [("docs_per_s", "throughput"), ("client_peak_rss_mb", "client peak RSS")],
    )
    out += _closing(agg, "stream", images, ("stream",))
    return "\n".join(out)


def ghz_section(raw: dict[str, Any], agg: Aggregate) -> str:
    plan = raw["plan"]["ghz"]
    out = [
        "## External load: ghz",
        "",
        f"ghz {raw['versions'].get('ghz', '?')} against the broker's TCP listener, `--concurrency "
        f"{plan['concurrency']} --connections {plan['connections']} --duration {plan['seconds']:g}s`: "
        "Ping and Find by `_id`. " + _method("external-load-ghz"),
        "",
    ]
    for param in agg.params.get("ghz", []):
        out += [metric_table(agg, "ghz", param, GHZ_COLUMNS), ""]
        if ratios := ratio_tables(agg, "ghz", param, [("rps", "calls/s"), ("p99_ms", "p99 latency")]):
            out += [ratios, ""]
        find = agg.get("ghz", param, "ghz Find", "rps")
        python_client = agg.get("steady", param, modes.BROKER_TCP, "ops_per_s")
        if find is not None and python_client is not None:
            out += [
                f"ghz's Find at c={param} makes {ratio(find, python_client)} the calls/s of "
                f"{param} Python workers through `broker_client` over TCP (steady, C={param}, "
                f"{num(python_client.median, 0)} ops/s, 1 insert in "
                f"{raw['plan']['steady']['insert_every']}).",
                "",
            ]
    if notes := _notes(agg, "ghz"):
        out += [notes, ""]
    return "\n".join(out)


# --- database profiles side by side ----------------------------------------------------------------

PROFILE_STORM: list[tuple[str, str, int | None]] = [
    ("peak_connections", "peak DB connections", 0),
    ("s2f_p50_ms", "spawn→first result p50 ms", 0),
    ("worker_cpu_p50_ms", "worker CPU spawn→exit p50 ms", 0),
    ("loadavg_1m", "load avg 1 min", 1),
]
PROFILE_STEADY: list[tuple[str, str, int | None]] = [
    ("ops_per_s", "ops/s", 0),
    ("proxy_cpu_s_per_1k_ops", "proxy CPU s / 1k ops", 3),
    ("p99_ms", "p99 ms", 1),
    ("p99.9_ms", "p99.9 ms", 1),
    ("loadavg_1m", "load avg 1 min", 1),
]
PROFILE_C1: list[tuple[str, str, int | None]] = [
    ("p50_ms", "p50 ms", 2),
    ("p99_ms", "p99 ms", 1),
    ("loadavg_1m", "load avg 1 min", 1),
]


def side_by_side(
    aggs: dict[str, Aggregate], workload: str, param: Any, columns: Sequence[tuple[str, str, int | None]]
) -> str:
    """Rows: modes; for each metric, one column per profile. A mode a profile lacks says why."""
    shown: list[str] = []
    for agg in aggs.values():
        shown += [m for m in agg.modes_for(workload, param) if m not in shown]
    shown.sort(key=lambda m: modes.MODES.index(m) if m in modes.MODES else len(modes.MODES))
    header = ["mode", *(f"{title}: {profile}" for _, title, _ in columns for profile in aggs)]
    rows = []
    for mode in shown:
        row = [f"**{mode}**"]
        for metric, _, digits in columns:
            for agg in aggs.values():
                key = (workload, param, mode)
                if key in agg.missing:
                    row.append("skipped" if agg.missing[key].startswith("skipped") else "not measured")
                else:
                    row.append(fmt(agg.get(workload, param, mode, metric), digits))
        rows.append(row)
    return table(header, rows)


def profile_ratios(aggs: dict[str, Aggregate]) -> list[tuple[str, dict[str, str]]]:
    """(figure, {profile: ratio of medians}) for the comparisons the profiles are for."""
    rows: list[tuple[str, dict[str, str]]] = []

    def want(label: str, where: tuple[str, Any, str], row: str, column: str) -> None:
        workload, param, metric = where
        cells = {
            profile: ratio(agg.get(workload, param, row, metric), agg.get(workload, param, column, metric))
            for profile, agg in aggs.items()
        }
        if any(cell != "-" for cell in cells.values()):
            rows.append((f"{label}: {row} ÷ {column}", cells))

    everywhere = list(aggs.values())
    storm_ws = [
        w
        for w in everywhere[0].params.get("storm", [])
        if all(w in a.params.get("storm", []) for a in everywhere)
    ]
    steady_cs = everywhere[0].params.get("steady", [])
    per_process, mongobetween = modes.PER_PROCESS, modes.MONGOBETWEEN
    if storm_ws:
        big = max(storm_ws)
        want(f"storm W={big} peak DB connections", ("storm", big, "peak_connections"), per_process, PRIMARY)
        for w in storm_ws:
            want(f"storm W={w} spawn→first result p50", ("storm", w, "s2f_p50_ms"), PRIMARY, per_process)
        want(f"storm W={big} spawn→first result p50", ("storm", big, "s2f_p50_ms"), PRIMARY, mongobetween)
        want(
            f"storm W={big} worker CPU spawn→exit p50",
            ("storm", big, "worker_cpu_p50_ms"),
            PRIMARY,
            per_process,
        )
    for c in (16, 64):
        if c in steady_cs:
            want(f"steady C={c} ops/s", ("steady", c, "ops_per_s"), PRIMARY, per_process)
            want(f"steady C={c} ops/s", ("steady", c, "ops_per_s"), PRIMARY, mongobetween)
            want(f"steady C={c} p99", ("steady", c, "p99_ms"), PRIMARY, per_process)
    if 1 in steady_cs:
        want("steady C=1 p50", ("steady", 1, "p50_ms"), PRIMARY, modes.DIRECT_SHARED)
        want("steady C=1 p50", ("steady", 1, "p50_ms"), PRIMARY, per_process)
    return rows


def _ping_text(about: dict[str, Any]) -> str:
    ping = about.get("ping") or {}
    if not ping:
        return ""
    return (
        f"; a pymongo ping: p50 **{num(ping['p50_ms'], 2)} ms** (p99 {num(ping['p99_ms'], 1)}), "
        f"a new client's first ping {num(ping['first_ms'], 0)} ms"
    )


def profiles_section(raw: dict[str, Any]) -> str:
    """Storm and steady of every database profile side by side; empty when only one ran."""
    names = db_profiles(raw)
    if len(names) < 2:
        planned = raw["plan"].get("db_profiles", {})
        if dbprofiles.TLS_LATENCY in names or dbprofiles.TLS_LATENCY in planned:
            return ""
        return (
            "## Database profiles\n\nOnly the plain profile ran. `--db-profiles plain,tls-latency` adds "
            "TLS to the database and toxiproxy latency in front of it, and a side-by-side section here. "
            + _method("database-profiles-plain-and-tls-latency")
            + "\n"
        )
    aggs = {name: aggregate(raw, name) for name in names}
    about = raw.get("db_profiles", {})
    out = [
        f"## Database profiles: {' and '.join(names)} side by side",
        "",
        "The same server, every mode, one run, the profiles one after the other. "
        + _method("database-profiles-plain-and-tls-latency"),
        "",
    ]
    for name in names:
        info = about.get(name, {})
        how = str(info.get("how", "?"))
        if "latency_toxic_each_way" in info:
            toxic = info["latency_toxic_each_way"]
            how += (
                f", toxiproxy latency {toxic.get('latency')} ms ± {toxic.get('jitter')} ms on each "
                f"direction, URI `{info.get('uri_shown', '?')}`"
            )
        workloads = raw["plan"].get("db_profiles", {}).get(name)
        ran = f" ({', '.join(workloads)})" if workloads else ""
        out.append(f"- **{name}**{ran}: {how}{_ping_text(info)}.")
    out += [
        "",
        "Key ratios of medians, per profile:",
        "",
        table(
            ["figure", *names], [[label, *(cells[n] for n in names)] for label, cells in profile_ratios(aggs)]
        ),
        "",
    ]
    first = aggs[names[0]]
    for w in first.params.get("storm", []):
        if all(w in agg.params.get("storm", []) for agg in aggs.values()):
            out += [f"### Storm W = {w}", "", side_by_side(aggs, "storm", w, PROFILE_STORM), ""]
    for c in (16, 64):
        if all(c in agg.params.get("steady", []) for agg in aggs.values()):
            out += [f"### Steady C = {c}", "", side_by_side(aggs, "steady", c, PROFILE_STEADY), ""]
    if all(1 in agg.params.get("steady", []) for agg in aggs.values()):
        out += ["### Steady C = 1", "", side_by_side(aggs, "steady", 1, PROFILE_C1), ""]
    return "\n".join(out)


# --- goals ----------------------------------------------------------------------------------------

Goal = tuple[str, str, str, bool | None, str]  # (goal, target, measured, met, gap)


def _status(ok: bool | None) -> str:
    return "**not measured**" if ok is None else ("**met**" if ok else "**not met**")


def _versus(agg: Aggregate, where: tuple[str, Any, str], peer: str) -> tuple[Cell | None, Cell | None]:
    """(the broker's cell, the peer's cell) of one (workload, param, metric)."""
    workload, param, metric = where
    return agg.get(workload, param, PRIMARY, metric), agg.get(workload, param, peer, metric)


def _load(agg: Aggregate, where: tuple[str, Any, str], *mode_list: str) -> str:
    """The 1-minute load average during the compared runs: the machine is shared."""
    workload, param, _ = where
    loads = [agg.get(workload, param, m, "loadavg_1m") for m in mode_list]
    shown = [num(c.median, 1) for c in loads if c is not None]
    return f" (load avg {' vs '.join(shown)})" if shown else ""


def _mongobetween_goal(
    agg: Aggregate, label: str, target: str, where: tuple[str, Any, str], reason: str, *, higher_wins: bool
) -> Goal:
    broker, peer = _versus(agg, where, modes.MONGOBETWEEN)
    if broker is None or peer is None:
        context = f" (broker: {fmt(broker)})" if broker is not None else ""
        return (label, target, (reason or "not measured") + context, None, "-")
    met = broker.median >= peer.median if higher_wins else broker.median <= peer.median
    gap = "-" if met else f"{ratio(broker, peer)} of mongobetween's"
    return (label, target, f"{PRIMARY} {fmt(broker)} vs mongobetween {fmt(peer)}", met, gap)


def _storm_goals(raw: dict[str, Any], agg: Aggregate, mb_reason: str) -> list[Goal]:
    pool = int(raw["plan"]["max_pool_size"])
    bound = pool + MONITORING_CONNECTIONS
    storm_ws = agg.params.get("storm", [])
    rows: list[Goal] = []
    for mode in modes.BROKER_MODES:
        peaks = {w: c for w in storm_ws if (c := agg.get("storm", w, mode, "peak_connections")) is not None}
        if not peaks:
            continue
        worst = max(c.hi for c in peaks.values())
        spare = f"({num(worst - bound, 0)} over)" if worst > bound else f"({num(bound - worst, 0)} spare)"
        rows.append(
            (
                f"Storm: {mode} peak ≤ max_pool_size + monitoring at every W",
                f"≤ {pool} + {MONITORING_CONNECTIONS} = {bound}",
                ", ".join(f"W={w}: {num(c.median, 0)} (max {num(c.hi, 0)})" for w, c in peaks.items()),
                worst <= bound,
                f"highest {num(worst, 0)} vs bound {bound} {spare}",
            )
        )
    if not storm_ws:
        return rows
    big = max(storm_ws)
    broker, own = _versus(agg, ("storm", big, "peak_connections"), modes.PER_PROCESS)
    if broker is not None and own is not None and broker.median:
        factor = own.median / broker.median
        opened_b, opened_p = _versus(agg, ("storm", big, "connections_opened"), modes.PER_PROCESS)
        concurrency = raw["plan"]["storm"]["concurrency"]
        rows.append(
            (
                f"Storm: at W={big} ≥100x fewer peak connections than per-process",
                "per-process peak ÷ broker peak ≥ 100",
                f"{num(own.median, 0)} ÷ {num(broker.median, 0)} = {factor:.1f}x; connections *opened*: "
                f"{fmt(opened_p, 0)} vs {fmt(opened_b, 0)} = {ratio(opened_p, opened_b)}",
                factor >= 100,
                "-"
                if factor >= 100
                else f"{100 / factor:.1f}x short on peak: with at most {concurrency} workers alive, "
                f"per-process holds at most ~{concurrency} x (1 pool + 1 monitor) connections at once"
                if factor
                # A tiny storm (the smoke run) can end between two samples.
                else "no per-process connection was sampled: the storm was shorter than the sampling",
            )
        )
    rows.append(
        _mongobetween_goal(
            agg,
            f"Storm: broker peak at W={big} equal to (≤) mongobetween's",
            "broker peak ≤ mongobetween peak",
            ("storm", big, "peak_connections"),
            mb_reason,
            higher_wins=False,
        )
    )
    for w in storm_ws:
        broker, own = _versus(agg, ("storm", w, "s2f_p50_ms"), modes.PER_PROCESS)
        if broker is None or own is None:
            continue
        half = own.median / 2
        rows.append(
            (
                f"Cold start W={w}: {PRIMARY} spawn→first result ≤ ½ per-process's",
                f"≤ {num(half, 0)} ms (½ x {num(own.median, 0)})",
                f"{fmt(broker, 0)} ms = {ratio(broker, own)} of per-process"
                + _load(agg, ("storm", w, ""), PRIMARY, modes.PER_PROCESS),
                broker.median <= half,
                f"{num(broker.median - half, 0)} ms over" if broker.median > half else "-",
            )
        )
    rows.append(
        _mongobetween_goal(
            agg,
            f"Cold start W={big}: below mongobetween's",
            "broker p50 < mongobetween p50",
            ("storm", big, "s2f_p50_ms"),
            mb_reason,
            higher_wins=False,
        )
    )
    return rows


def _steady_goals(agg: Aggregate, mb_reason: str) -> list[Goal]:
    rows: list[Goal] = []
    for c in (16, 64):
        if c not in agg.params.get("steady", []):
            continue
        broker, own = _versus(agg, ("steady", c, "ops_per_s"), modes.PER_PROCESS)
        context = f"; broker {fmt(broker, 0)} ops/s = {ratio(broker, own)} per-process's" if own else ""
        rows.append(
            _mongobetween_goal(
                agg,
                f"Steady C={c}: broker throughput ≥ mongobetween's",
                "broker ops/s ≥ mongobetween ops/s",
                ("steady", c, "ops_per_s"),
                mb_reason + context,
                higher_wins=True,
            )
        )
    broker, direct = _versus(agg, ("steady", 1, "p50_ms"), modes.DIRECT_SHARED)
    if broker is not None and direct is not None:
        limit = 2 * direct.median
        rows.append(
            (
                f"Steady C=1: {PRIMARY} p50 ≤ 2x direct-shared",
                f"≤ {num(limit, 2)} ms (2 x {num(direct.median, 2)})",
                f"{fmt(broker, 2)} ms = {ratio(broker, direct)} direct-shared"
                + _load(agg, ("steady", 1, ""), PRIMARY, modes.DIRECT_SHARED),
                broker.median <= limit,
                f"{num(broker.median - limit, 2)} ms over" if broker.median > limit else "-",
            )
        )
    return rows


def _stream_goals(agg: Aggregate) -> list[Goal]:
    rows: list[Goal] = []
    sizes = agg.params.get("stream", [])
    for size in sizes:
        broker, direct = _versus(agg, ("stream", size, "docs_per_s"), modes.DIRECT_SHARED)
        if broker is None or direct is None or not direct.median:
            continue
        share = broker.median / direct.median
        rows.append(
            (
                f"Streaming N={size:,}: ≥ 80% of direct-shared find_raw_batches",
                "≥ 80%",
                f"{num(broker.median, 0)} vs {num(direct.median, 0)} docs/s = {share:.0%}"
                + _load(agg, ("stream", size, ""), PRIMARY, modes.DIRECT_SHARED),
                share >= 0.8,
                f"{0.8 - share:.0%} short" if share < 0.8 else "-",
            )
        )
    peaks = {
        (size, mode): cell
        for size in sizes
        for mode in modes.BROKER_MODES
        if (cell := agg.get("stream", size, mode, "proxy_peak_rss_mb")) is not None
    }
    if peaks:
        worst = max(c.hi for c in peaks.values())
        rows.append(
            (
                "Streaming: broker RSS < 150 MB whatever the result size",
                "< 150 MB at every N",
                ", ".join(f"N={s:,} {m}: {num(c.median, 0)} MB" for (s, m), c in peaks.items()),
                worst < 150,
                f"highest {num(worst, 0)} MB" + (f", {num(worst - 150, 0)} MB over" if worst >= 150 else ""),
            )
        )
    return rows


def goals(raw: dict[str, Any], agg: Aggregate) -> list[Goal]:
    """Each goal of the brief with its measured figure, met / not met / not measured, and the gap."""
    reason = str(raw.get("mongobetween", {}).get("reason", ""))
    # The full reason is in every table; the goals table keeps its first clause.
    mb_reason = reason.split(" (`", 1)[0] if "not measured" in reason else ""
    return [*_storm_goals(raw, agg, mb_reason), *_steady_goals(agg, mb_reason), *_stream_goals(agg)]


def goals_section(raw: dict[str, Any], agg: Aggregate) -> str:
    rows = goals(raw, agg)
    body = table(
        ["goal", "target", "measured (median [min-max])", "status", "gap"],
        [[g, t, m, _status(ok), gap] for g, t, m, ok, gap in rows],
    )
    met = sum(1 for r in rows if r[3] is True)
    unmet = sum(1 for r in rows if r[3] is False)
    missing = sum(1 for r in rows if r[3] is None)
    return (
        f"## Goals\n\n{met} met, {unmet} not met, {missing} not measured; the broker's figures are "
        f"{PRIMARY}'s, with the load average where two modes are compared.\n\n{body}\n"
    )


# --- headline -------------------------------------------------------------------------------------


def headline_rows(raw: dict[str, Any], agg: Aggregate) -> list[tuple[str, str, Any, str, int | None]]:
    """(label, workload, param, metric, digits) of the headline table."""
    rows: list[tuple[str, str, Any, str, int | None]] = []
    storm_ws = agg.params.get("storm", [])
    for w in storm_ws:
        rows.append((f"storm W={w}: peak DB connections", "storm", w, "peak_connections", 0))
    if storm_ws:
        big = max(storm_ws)
        rows.append((f"storm W={big}: DB connections opened", "storm", big, "connections_opened", 0))
    for w in storm_ws:
        rows.append((f"storm W={w}: spawn→first result p50 ms", "storm", w, "s2f_p50_ms", 0))
    for w in storm_ws:
        rows.append((f"storm W={w}: worker CPU spawn→exit p50 ms", "storm", w, "worker_cpu_p50_ms", 0))
    if storm_ws:
        rows.append((f"storm W={max(storm_ws)}: wall time s", "storm", max(storm_ws), "wall_s", 1))
    for c in agg.params.get("steady", []):
        rows.append((f"steady C={c}: ops/s", "steady", c, "ops_per_s", 0))
    for c in agg.params.get("steady", []):
        rows.append((f"steady C={c}: p50 / p99 ms", "steady", c, "p50_ms|p99_ms", 2))
    sizes = agg.params.get("stream", [])
    for size in sizes:
        rows.append((f"stream N={size:,}: MB/s", "stream", size, "mb_per_s", 1))
    for size in sizes:
        rows.append((f"stream N={size:,}: broker peak RSS MB", "stream", size, "proxy_peak_rss_mb", 0))
    if sizes:
        rows.append(
            (f"stream N={max(sizes):,}: client peak RSS MB", "stream", max(sizes), "client_peak_rss_mb", 0)
        )
    return rows


def headline_table(raw: dict[str, Any], agg: Aggregate) -> str:
    shown = [m for m in modes.MODES if m in raw["plan"]["modes"]]
    rows = []
    for label, workload, param, metric, digits in headline_rows(raw, agg):
        cells = []
        for mode in shown:
            key = (workload, param, mode)
            if key in agg.missing:
                cells.append("skipped" if agg.missing[key].startswith("skipped") else "not measured")
                continue
            if "|" in metric:
                a, b = metric.split("|")
                ca, cb = agg.get(workload, param, mode, a), agg.get(workload, param, mode, b)
                cells.append(
                    "-"
                    if ca is None
                    else f"{num(ca.median, digits)} / {num(cb.median if cb else math.nan, 1)}"
                )
            else:
                cells.append(fmt(agg.get(workload, param, mode, metric), digits))
        rows.append([label, *cells])
    return table(["figure (median [min-max])", *shown], rows)


def headline_values(agg: Aggregate) -> dict[str, float]:
    """Key figures by name, for the before/after baseline."""
    out: dict[str, float] = {}
    for (workload, param, mode), cells in agg.cells.items():
        if mode not in (modes.BROKER_UDS, modes.BROKER_TCP, "ghz Ping", "ghz Find"):
            continue
        for metric in (
            "peak_connections",
            "s2f_p50_ms",
            "ops_per_s",
            "p50_ms",
            "p99_ms",
            "proxy_cpu_s_per_1k_ops",
            "proxy_peak_rss_mb",
            "docs_per_s",
            "mb_per_s",
            "rps",
            "proxy_cpu_s_per_100k_docs",
        ):
            if metric in cells:
                out[f"{workload} {param} {mode} {metric}"] = cells[metric].median
    return out


def headline_text(raw: dict[str, Any]) -> str:
    agg = aggregate(raw)
    lines = [headline_table(raw, agg), ""]
    for goal, _target, measured, ok, _gap in goals(raw, agg):
        lines.append(f"{_status(ok).strip('*'):>12}  {goal}: {measured}")
    if len(names := db_profiles(raw)) > 1:
        lines += ["", "database profiles, " + " / ".join(names) + ":"]
        for label, cells in profile_ratios({name: aggregate(raw, name) for name in names}):
            lines.append(f"  {label}: {' / '.join(cells[n] for n in names)}")
    return "\n".join(lines)


# --- profile --------------------------------------------------------------------------------------


def _category(name: str, file: str) -> str:
    path = file.replace("\\", "/")
    lowered = path.lower()
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("broker (our code)", lambda: "/broker/" in path and "site-packages" not in path),
        (
            "grpc (Python + Cython)",
            lambda: "grpc" in lowered and "cygrpc" not in lowered and ".so" not in lowered,
        ),
        (
            "grpc core (C/C++)",
            lambda: "cygrpc" in lowered or "libgrpc" in lowered or "grpc_core" in name or "grpc_" in name,
        ),
        ("pymongo", lambda: "/pymongo/" in path),
        ("bson", lambda: "/bson/" in path or "_cbson" in lowered),
        ("protobuf", lambda: "protobuf" in lowered or "/google/" in path or "upb" in name),
        ("asyncio", lambda: "/asyncio/" in path or "_asyncio" in lowered or "uvloop" in lowered),
        ("logging", lambda: "/logging/" in path),
        ("prometheus_client", lambda: "prometheus_client" in path),
        ("threading / queue", lambda: "threading.py" in path or "queue.py" in path),
        ("ssl / socket / selectors", lambda: any(s in path for s in ("ssl.py", "socket.py", "selectors.py"))),
        (
            "libc / kernel / python core",
            lambda: ".so" in lowered or "libc" in lowered or "python3" in lowered or not path,
        ),
    ]
    for label, test in checks:
        if test():
            return label
    return "other Python"


# A sample whose stack holds one of these is a thread waiting, not working.
# py-spy leaves idle threads out by itself, except with --native, where it
# cannot tell; then these names find them.
IDLE_FRAMES = frozenset(
    {
        "epoll_wait",
        "EpollSelector.select",
        "PyThread_acquire_lock_timed",
        "_queue_SimpleQueue_get",
        "Condition.wait",
        "Event.wait",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "sem_timedwait",
        "sem_wait",
        "clock_nanosleep",
        "nanosleep",
    }
)


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of a py-spy speedscope profile, per function and per area."""
    data = json.loads(path.read_text(encoding="utf-8"))
    frames = data["shared"]["frames"]
    labels = []
    for frame in frames:
        file = str(frame.get("file") or "")
        short = "/".join(file.split("/")[-2:]) if file else ""
        labels.append((f"{frame.get('name', '?')} ({short})" if short else str(frame.get("name", "?")), file))
    self_w: dict[str, float] = defaultdict(float)
    incl_w: dict[str, float] = defaultdict(float)
    area_self: dict[str, float] = defaultdict(float)
    threads: dict[str, float] = defaultdict(float)
    idle = {i for i, frame in enumerate(frames) if str(frame.get("name", "")) in IDLE_FRAMES}
    callers: dict[tuple[str, str], float] = defaultdict(float)
    total = 0.0
    samples = idle_samples = 0
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for stack, weight in zip(profile["samples"], weights, strict=False):
            if not stack:
                continue
            if idle.intersection(stack):
                idle_samples += 1
                continue
            samples += 1
            total += weight
            threads[str(profile.get("name", "?"))] += weight
            leaf_label, leaf_file = labels[stack[-1]]
            self_w[leaf_label] += weight
            caller = str(frames[stack[-2]].get("name", "?")) if len(stack) > 1 else "-"
            callers[(str(frames[stack[-1]].get("name", "?")), caller)] += weight
            area_self[_category(leaf_label, leaf_file)] += weight
            for label in {labels[i][0] for i in stack}:
                incl_w[label] += weight
    if not total:
        return {
            "samples": 0,
            "idle_samples": idle_samples,
            "self": [],
            "inclusive": [],
            "areas": [],
            "threads": [],
        }

    def ranked(weights: dict[str, float], n: int) -> list[tuple[str, float]]:
        return [(k, 100 * v / total) for k, v in sorted(weights.items(), key=lambda kv: -kv[1])[:n]]

    return {
        "samples": samples,
        "idle_samples": idle_samples,
        "busy_s": total,
        "self": ranked(self_w, top),
        "inclusive": ranked(incl_w, top + 10),
        "areas": ranked(area_self, 20),
        "threads": ranked(threads, 8),
        # (function, its caller) of the self time: who makes a hot leaf hot.
        "callers": [
            (leaf, caller, 100 * v / total)
            for (leaf, caller), v in sorted(callers.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


def profile_section(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    records = [r for r in raw["records"] if r["workload"] == "profile"]
    if not records:
        return "", {}
    plan = raw["plan"]["profile"]
    out = [
        "## Profile",
        "",
        f"py-spy {raw['versions'].get('py-spy', '?')} "
        f"`{'--native' if plan.get('native') else '--nonblocking'}` on the broker: broker-uds steady load "
        f"with C={plan['concurrency']} for {plan['seconds']:g} s, and two streams of "
        f"{plan['stream_size']:,} documents. " + _method("profile"),
        "",
    ]
    summaries: dict[str, Any] = {}
    for record in records:
        name = record["mode"]
        if "not_measured" in record:
            out += [f"### {name}", "", record["not_measured"], ""]
            continue
        path = Path(record["metrics"]["speedscope"])
        if not path.exists():
            out += [f"### {name}", "", f"profile file {path.name} is gone (raw/ is not kept)", ""]
            continue
        summary = profile_summary(path)
        summaries[name] = summary
        what = (
            f"{record['metrics'].get('ops', '?')} operations"
            if name == "steady"
            else f"{record['metrics'].get('docs', '?'):,} documents"
        )
        out += [
            f"### {name} ({what}; {summary['samples']:,} busy samples = "
            f"{summary.get('busy_s', 0):.1f} s of thread time; `{path.name}`)",
            "",
            "By area (self time):",
            "",
            table(["area", "self %"], [[a, f"{p:.1f}"] for a, p in summary["areas"]]),
            "",
            "Top functions by self time:",
            "",
            table(["function (file)", "self %"], [[f"`{f}`", f"{p:.1f}"] for f, p in summary["self"]]),
            "",
            "Self time by (function, caller), the top pairs:",
            "",
            table(
                ["function", "called from", "self %"],
                [
                    [f"`{leaf}`", f"`{caller}`", f"{p:.1f}"]
                    for leaf, caller, p in summary.get("callers", [])[:10]
                ],
            ),
            "",
            "<details><summary>Top functions by inclusive time</summary>\n",
            table(
                ["function (file)", "inclusive %"], [[f"`{f}`", f"{p:.1f}"] for f, p in summary["inclusive"]]
            ),
            "\n</details>",
            "",
            "Threads: " + ", ".join(f"{t} {p:.0f}%" for t, p in summary["threads"]),
            "",
        ]
    return "\n".join(out), summaries


# --- plots ----------------------------------------------------------------------------------------

STYLES = {
    modes.CHURN: ("tab:red", "x"),
    modes.PER_PROCESS: ("tab:orange", "o"),
    modes.MONGOBETWEEN: ("tab:purple", "D"),
    modes.BROKER_UDS: ("tab:blue", "s"),
    modes.BROKER_TCP: ("tab:cyan", "^"),
    modes.DIRECT_SHARED: ("tab:green", "v"),
}


def _series(agg: Aggregate, workload: str, mode: str, metric: str) -> tuple[list[Any], list[float], Any]:
    """x, median y and [below, above] error bars of one mode's metric over the workload's params."""
    xs, ys, lo, hi = [], [], [], []
    for param in agg.params.get(workload, []):
        cell = agg.get(workload, param, mode, metric)
        if cell is not None:
            xs.append(param)
            ys.append(cell.median)
            lo.append(cell.median - cell.lo)
            hi.append(cell.hi - cell.median)
    return xs, ys, [lo, hi]


def _draw(
    ax: Any, agg: Aggregate, workload: str, metric: str, *, linestyle: str = "-", suffix: str = ""
) -> None:
    for mode in modes.MODES:
        xs, ys, err = _series(agg, workload, mode, metric)
        if xs:
            color, marker = STYLES[mode]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                color=color,
                marker=marker,
                linestyle=linestyle,
                capsize=3,
                label=f"{mode}{suffix}",
            )


def _subtitle(raw: dict[str, Any]) -> str:
    return (
        f"{raw['machine']['nproc']} CPUs, {raw['versions'].get('server_kind', '?')}; "
        "median of repeats, bars min-max"
    )


def _footnote(agg: Aggregate) -> str:
    if any(k[2] == modes.MONGOBETWEEN for k in agg.missing):
        return "mongobetween: not measured (not obtainable)"
    return ""


def _save(plt: Any, fig: Any, out_dir: Path, name: str) -> dict[str, str]:
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return {name: f"{name}.png"}


def _plot_storm(plt: Any, raw: dict[str, Any], agg: Aggregate, out_dir: Path) -> dict[str, str]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, agg, "storm", "peak_connections")
    bound = raw["plan"]["max_pool_size"] + MONITORING_CONNECTIONS
    ax.axhline(bound, color="gray", linestyle=":", label="max_pool_size + monitoring")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="W (short-lived worker processes)",
        ylabel="peak TCP connections at the DB port",
        title=f"Storm: peak DB connections\n{_subtitle(raw)}",
    )
    ax.legend(fontsize=8, title=_footnote(agg), title_fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    images = _save(plt, fig, out_dir, "storm_peak_connections")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, agg, "storm", "s2f_p50_ms", linestyle="-", suffix=" p50")
    _draw(ax, agg, "storm", "s2f_p99_ms", linestyle="--", suffix=" p99")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="W (short-lived worker processes)",
        ylabel="spawn → first result (ms)",
        title=f"Storm: cold start\n{_subtitle(raw)}",
    )
    ax.legend(fontsize=7, ncol=2, title=_footnote(agg), title_fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return {**images, **_save(plt, fig, out_dir, "storm_spawn_to_first")}


def _plot_steady(plt: Any, raw: dict[str, Any], agg: Aggregate, out_dir: Path) -> dict[str, str]:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _draw(left, agg, "steady", "ops_per_s")
    left.set(xscale="log", xlabel="C (long-lived workers)", ylabel="operations / s", title="throughput")
    _draw(right, agg, "steady", "p99_ms")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="C (long-lived workers)",
        ylabel="p99 latency (ms)",
        title="p99 latency",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(agg.params["steady"], [str(c) for c in agg.params["steady"]])
    left.legend(fontsize=8, title=_footnote(agg), title_fontsize=7)
    fig.suptitle(f"Steady: find_one by _id + insert_one\n{_subtitle(raw)}", fontsize=10)
    return _save(plt, fig, out_dir, "steady")


def _plot_stream(plt: Any, raw: dict[str, Any], agg: Aggregate, out_dir: Path) -> dict[str, str]:
    sizes = agg.params["stream"]
    shown = [m for m in modes.MODES if any(agg.get("stream", s, m, "mb_per_s") for s in sizes)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(sizes))
    for i, size in enumerate(sizes):
        cells = [agg.get("stream", size, m, "mb_per_s") for m in shown]
        heights = [c.median if c else 0.0 for c in cells]
        below = [c.median - c.lo if c else 0.0 for c in cells]
        above = [c.hi - c.median if c else 0.0 for c in cells]
        xs = [x + i * width for x in range(len(shown))]
        left.bar(xs, heights, width, yerr=[below, above], capsize=3, label=f"N={size:,}")
    centres = [x + width * (len(sizes) - 1) / 2 for x in range(len(shown))]
    left.set_xticks(centres, shown, rotation=20, fontsize=8)
    left.set(ylabel="MB/s", title="stream throughput")
    left.legend(fontsize=8)
    for mode in modes.BROKER_MODES:
        xs, ys, err = _series(agg, "stream", mode, "proxy_peak_rss_mb")
        if xs:
            color, marker = STYLES[mode]
            right.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, label=f"broker ({mode})")
    right.axhline(150, color="gray", linestyle=":", label="goal: < 150 MB")
    right.set(
        xscale="log",
        xlabel="documents per find",
        ylabel="broker peak RSS (MB)",
        title="broker memory",
        ylim=(0, None),
    )
    right.legend(fontsize=8)
    right.grid(True, alpha=0.3)
    fig.suptitle(f"Stream: ~1 KB documents\n{_subtitle(raw)}", fontsize=10)
    return _save(plt, fig, out_dir, "stream")


def plots(raw: dict[str, Any], agg: Aggregate, out_dir: Path) -> dict[str, str]:
    """Write the PNGs; return {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, str] = {}
    if agg.params.get("storm"):
        images.update(_plot_storm(plt, raw, agg, out_dir))
    if agg.params.get("steady"):
        images.update(_plot_steady(plt, raw, agg, out_dir))
    if agg.params.get("stream"):
        images.update(_plot_stream(plt, raw, agg, out_dir))
    return images


# --- the whole report -----------------------------------------------------------------------------


def _read_baseline(path: Path) -> dict[str, Any] | None:
    try:
        match = BASELINE_RE.search(path.read_text(encoding="utf-8"))
    except OSError:
        return None
    if match is None:
        return None
    try:
        baseline: dict[str, Any] = json.loads(match.group(1))
    except ValueError:
        return None
    return baseline


def other_runs_section(raw: dict[str, Any], raw_path: Path) -> str:
    """Key ratios of this run beside other runs of the same code still in raw/ (local only)."""
    runs = []
    for path in sorted(raw_path.parent.glob("bench-*.json")):
        try:
            other = raw if path == raw_path else json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if other.get("plan", {}).get("storm", {}).get("workers") != raw["plan"]["storm"]["workers"]:
            continue  # a smoke or partial run: not comparable
        if other.get("versions", {}).get("git_commit") != raw.get("versions", {}).get("git_commit"):
            continue  # other code: a difference would be the change, not the machine's noise
        runs.append((path, other))
    if len(runs) < 2:
        return ""

    def r(agg: Aggregate, where: tuple[str, Any, str], a: str, b: str) -> str:
        workload, param, metric = where
        return ratio(agg.get(workload, param, a, metric), agg.get(workload, param, b, metric))

    rows = []
    for path, other in runs:
        agg = aggregate(other)
        w = max(agg.params.get("storm", [0]) or [0])
        rows.append(
            [
                other["started"] + (" (this run)" if path == raw_path else ""),
                f"{other['wall_s'] / 60:.0f} min",
                r(agg, ("storm", w, "peak_connections"), modes.PER_PROCESS, PRIMARY),
                r(agg, ("storm", 200, "s2f_p50_ms"), PRIMARY, modes.PER_PROCESS),
                r(agg, ("steady", 1, "p50_ms"), PRIMARY, modes.DIRECT_SHARED),
                r(agg, ("steady", 16, "ops_per_s"), PRIMARY, modes.PER_PROCESS),
                r(agg, ("steady", 64, "p99_ms"), PRIMARY, modes.PER_PROCESS),
                r(agg, ("stream", 100_000, "docs_per_s"), PRIMARY, modes.DIRECT_SHARED),
            ]
        )
    return (
        "## The same ratios in the other runs kept in raw/\n\n"
        + table(
            [
                "run",
                "wall",
                f"storm W=max peak: per-process ÷ {PRIMARY}",
                "storm W=200 spawn→first p50: broker ÷ per-process",
                "steady C=1 p50: broker ÷ direct-shared",
                "steady C=16 ops/s: broker ÷ per-process",
                "steady C=64 p99: broker ÷ per-process",
                "stream 100k docs/s: broker ÷ direct-shared",
            ],
            rows,
        )
        + "\n"
    )


def _relative(text: str) -> str:
    """``text`` without this checkout's absolute path (raw files from before paths were shown relative)."""
    return text.replace(f"{REPO}/", "")


def before_after_section(baseline: dict[str, Any], current: dict[str, float], this_run: str) -> str:
    rows = []
    for key, before in baseline["figures"].items():
        after = current.get(key)
        change = "-" if after is None or not before else f"{(after - before) / before:+.0%}"
        rows.append([key, num(before), num(after) if after is not None else "-", change])
    return (
        "## Before → after\n\n"
        f"*Before*: the run of {baseline.get('started', '?')} (commit {baseline.get('commit', '?')}). "
        f"*After*: this run ({this_run}). Medians.\n\n"
        + table(["figure", "before", "after", "change"], rows)
        + "\n"
    )


def layers_section(out_dir: Path) -> str | None:
    """The layer table (`python -m bench.latency`, saved as LAYERS.md beside the report), if there is one.

    It is its own run, one call at a time on the same machine, so it is
    included as written rather than merged into this run's figures.
    """
    path = out_dir / "LAYERS.md"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]  # its own title: this section's heading replaces it
    # Its headings one level below this section's.
    body = "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()
    return (
        "## Layers: where one call's CPU goes\n\n"
        "From `python -m bench.latency --calls 400 > bench/results/LAYERS.md`, a separate run "
        "on the same machine (its own header says when).\n\n" + body
    )


def write_report(
    raw: dict[str, Any], out_dir: Path, raw_path: Path | None = None, new_baseline: bool = False
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(raw)
    images = plots(raw, agg, out_dir)
    report_path = out_dir / "REPORT.md"
    baseline = None if new_baseline else _read_baseline(report_path)
    profile_text, summaries = profile_section(raw)
    current = headline_values(agg)
    machine, versions = raw["machine"], raw["versions"]
    wall = raw["wall_s"]
    parts = [
        "# mongo-broker benchmark report",
        "",
        f"Generated by `{raw['command']}` on {raw['started']}; wall time **{wall / 60:.1f} min** ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in raw.get("workload_wall_s", {}).items())
        + "). Raw figures: "
        + (f"`bench/results/raw/{raw_path.name}`" if raw_path else "the raw JSON")
        + f". How each figure is measured and how to read it, and the optimisation pass: [docs/BENCHMARKS.md]"
        f"({METHOD}).",
        "",
        f"**Machine**: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, Linux "
        f"{machine['kernel']}; load average {', '.join(f'{x:.2f}' for x in machine['loadavg_start'])} at "
        f"the start and {', '.join(f'{x:.2f}' for x in machine.get('loadavg_end', []))} at the end.",
        "",
        f"**Database server**: {versions.get('server_kind')} "
        f"({_relative(str(versions.get('server_reason')))}), reports version {versions.get('server_version')}"
        + (f", FerretDB {versions['ferretdb']}" if versions.get("ferretdb") else "")
        + "; every mode ran against it.",
        "",
        table(
            ["software", "version"],
            [[k, str(v)] for k, v in versions.items() if k not in ("server_kind", "server_reason")],
        ),
        "",
        f"**Broker config**: max_pool_size {raw['plan']['max_pool_size']}, "
        + ", ".join(
            f"{k} {v}"
            for k, v in next(iter(raw.get("broker_config", {}).get("databases", {}).values()), {}).items()
            if k not in ("uri", "database", "max_pool_size")
        )
        + (f"; broker run at nice {raw['plan']['proxy_nice']}" if raw["plan"].get("proxy_nice") else "")
        + ".",
        "",
        f"**mongobetween**: {raw.get('mongobetween', {}).get('reason', '?')}.",
        "",
        "## Headline: every mode side by side",
        "",
        headline_table(raw, agg),
        "",
        goals_section(raw, agg),
    ]
    if profiles := profiles_section(raw):
        parts += [profiles, ""]
    if baseline is not None and baseline.get("started") != raw["started"]:
        parts += [before_after_section(baseline, current, raw["started"]), ""]
    if raw_path is not None and (others := other_runs_section(raw, raw_path)):
        parts += [others, ""]
    if agg.params.get("storm"):
        parts += [storm_section(raw, agg, images), ""]
    if agg.params.get("steady"):
        parts += [steady_section(raw, agg, images), ""]
    if agg.params.get("stream"):
        parts += [stream_section(raw, agg, images), ""]
    if agg.params.get("ghz"):
        parts += [ghz_section(raw, agg), ""]
    if (layers := layers_section(out_dir)) is not None:
        parts += [layers, ""]
    if profile_text:
        parts += [profile_text, ""]
    if baseline is None:
        baseline = {
            "started": raw["started"],
            "commit": versions.get("git_commit", "?"),
            "figures": current,
            "profile_areas": {k: v["areas"][:8] for k, v in summaries.items()},
        }
    parts += [
        "<!-- The *before* figures, kept across re-runs (`python -m bench.report --new-baseline`"
        " starts over). -->",
        f"<!-- BENCH-BASELINE {json.dumps(baseline, separators=(',', ':'))} -->",
        "",
    ]
    report_path.write_text("\n".join(parts), encoding="utf-8")
    return report_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="a bench/results/raw/bench-*.json file")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--new-baseline", action="store_true", help="make this run the new *before*")
    args = parser.parse_args(argv)
    raw = json.loads(args.raw.read_text(encoding="utf-8"))
    path = write_report(raw, args.out, raw_path=args.raw, new_baseline=args.new_baseline)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
