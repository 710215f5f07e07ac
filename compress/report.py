"""Compression reports: report.json (machine-readable), report.md (a table) and Pareto plots from a Pipeline's stages."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from compress.pipeline import Stage

_MB, _M = 1e6, 1e6
_FIELDS = ("name", "params", "unique_params", "size_bytes")


def _record(stage: Stage | Mapping[str, Any], index: int) -> dict[str, Any]:
    """One stage as report.json stores it."""
    data = dataclasses.asdict(stage) if isinstance(stage, Stage) else dict(stage)
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise ValueError(
            f"stages[{index}] lacks {missing}; a stage needs {list(_FIELDS)} (a compress.pipeline.Stage has them)"
        )
    return {
        "name": str(data["name"]),
        "settings": data.get("settings", {}),
        "params": int(data["params"]),
        "unique_params": int(data["unique_params"]),
        "size_bytes": int(data["size_bytes"]),
        "metrics": dict(data.get("metrics") or {}),
        "latency_ms": data.get("latency_ms"),
        "seconds": data.get("seconds"),
    }


def _latency_ms(value: Any) -> float | None:
    """A latency given as milliseconds or as a measure.latency dict (its median)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "p50_ms" not in value:
            raise ValueError(f"a latency dict needs 'p50_ms' (as measure.latency returns), got keys {sorted(value)}")
        value = value["p50_ms"]
    return float(value)


def _finite(value: Any) -> Any:
    """NaN and infinities become None: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ratio(first: float | None, value: float | None) -> str:
    return f"{first / value:.2f}×" if first and value else "–"


def _number(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else f"{value / scale:.{digits}f}"
    )


def _markdown(records: list[dict[str, Any]], metric_names: list[str], plots: dict[str, Path], notes: list[str]) -> str:
    first = records[0]
    header = [
        "stage",
        "params (M)",
        "unique (M)",
        "size (MB)",
        "× smaller",
        *metric_names,
        "latency p50 (ms)",
        "× faster",
        "seconds",
    ]
    lines = [
        "# Compression report",
        "",
        f"Ratios are against the first stage ({first['name']}): × smaller = its size / this size, "
        "× faster = its latency / this latency.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in records:
        cells = [
            r["name"],
            _number(r["params"], _M),
            _number(r["unique_params"], _M),
            _number(r["size_bytes"], _MB),
            _ratio(first["size_bytes"], r["size_bytes"]),
            *(_number(r["metrics"].get(m), digits=4) for m in metric_names),
            _number(r["latency_ms"]),
            _ratio(first["latency_ms"], r["latency_ms"]),
            _number(r["seconds"], digits=1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        *(line for note in notes for line in (note, "")),
        *(f"![{key}]({path.name})" for key, path in plots.items()),
    ]
    return "\n".join(lines) + "\n"


def _pareto(points: list[tuple[float, float, str]], higher_is_better: bool) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (lower x, better metric), in order of x."""
    frontier, best = [], -math.inf
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        value = y if higher_is_better else -y
        if value > best:
            frontier.append((x, y, name))
            best = value
    return frontier


def _plot(
    points: list[tuple[float, float, str]], path: Path, *, xlabel: str, metric: str, higher_is_better: bool
) -> None:
    """A scatter of the stages with their names and the Pareto frontier as a step line."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in points], [p[1] for p in points], zorder=3)
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = _pareto(points, higher_is_better)
    ax.step(
        [p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:orange", label="Pareto frontier"
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(f"{metric} vs {xlabel.split(' (')[0]}")
    ax.margins(0.15)  # room for the stage names beside the outermost points
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _per_row(records: list[dict[str, Any]], values: Mapping[str, Any] | Sequence[Any], what: str) -> list[Any]:
    """`values` (by stage name, or one per stage in order) as one value per record, None where not given."""
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - {r["name"] for r in records})
        if unknown:
            raise ValueError(f"{what} names unknown stages {unknown}; the stages are {[r['name'] for r in records]}")
        return [values.get(r["name"]) for r in records]
    values = list(values)
    if len(values) != len(records):
        raise ValueError(
            f"{what} holds {len(values)} values for {len(records)} stages; give one per stage (None if unmeasured)"
        )
    return values


def _apply_latencies(records: list[dict[str, Any]], latencies: Mapping[str, Any] | Sequence[Any] | None) -> None:
    """Set each record's latency_ms from `latencies` (by stage name or in stage order), or normalize its own."""
    if latencies is None:
        for record in records:
            record["latency_ms"] = _latency_ms(record["latency_ms"])
        return
    for record, value in zip(records, _per_row(records, latencies, "latencies")):
        if value is not None:
            record["latency_ms"] = _latency_ms(value)


def write_report(
    stages: Sequence[Stage | Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    metric: str | None = None,
    latencies: Mapping[str, Any] | Sequence[Any] | None = None,
    higher_is_better: bool = True,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write report.json, report.md and the Pareto plots for compression stages.

    Args:
        stages: `Pipeline.stages` (Stage records) or dicts with name, params, unique_params,
            size_bytes and optionally settings, metrics, latency_ms, seconds (e.g. a stage
            measured outside the pipeline, like an int8 ONNX file).
        out_dir: the folder to write into (created if needed).
        metric: the metric to plot; None = the first one any stage has.
        latencies: per stage, milliseconds or a `measure.latency` dict (its p50 is used): a
            mapping by stage name, or a sequence in stage order (None where not measured).
        higher_is_better: the metric's direction (False for a loss), for the Pareto frontier.
        notes: lines saying how metrics were measured, under the table (and in report.json).

    Returns:
        {"json": ..., "markdown": ...} and, when a metric exists, "size_plot" (metric vs MB) and,
        with latencies, "latency_plot" (metric vs ms): the paths written.
    """
    if isinstance(stages, (str, bytes, Mapping)) or not stages:
        raise ValueError("stages must be a non-empty sequence of Stage records (Pipeline.stages) or dicts")
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise TypeError(f"notes must be a sequence of str (one line each), got {notes!r:.80}")
    records = [_record(s, i) for i, s in enumerate(stages)]
    _apply_latencies(records, latencies)
    metric_names = list(dict.fromkeys(name for r in records for name in r["metrics"]))
    if metric is None and metric_names:
        metric = metric_names[0]
    if metric is not None and metric not in metric_names:
        raise ValueError(f"metric={metric!r}: no stage has it; the stages' metrics are {metric_names or 'none'}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if metric is not None:
        scored = [
            r
            for r in records
            if isinstance(r["metrics"].get(metric), (int, float)) and math.isfinite(r["metrics"][metric])
        ]
        axes = {
            "size_plot": (
                "metric_vs_size.png",
                "size (MB)",
                [(r["size_bytes"] / _MB, r["metrics"][metric], r["name"]) for r in scored],
            ),
            "latency_plot": (
                "metric_vs_latency.png",
                "latency p50 (ms)",
                [(r["latency_ms"], r["metrics"][metric], r["name"]) for r in scored if r["latency_ms"] is not None],
            ),
        }
        for key, (filename, xlabel, points) in axes.items():
            if points:
                paths[key] = out / filename
                _plot(points, paths[key], xlabel=xlabel, metric=metric, higher_is_better=higher_is_better)
    paths = {"json": out / "report.json", "markdown": out / "report.md", **paths}
    report = {"metric": metric, "higher_is_better": higher_is_better, "stages": records, "notes": list(notes)}
    paths["json"].write_text(
        json.dumps(_finite(report), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8"
    )
    plots = {k: v for k, v in paths.items() if k.endswith("_plot")}
    paths["markdown"].write_text(_markdown(records, metric_names, plots, list(notes)), encoding="utf-8")
    return paths


def _read_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The report.json that `write_report` wrote into `out_dir`."""
    path = Path(out_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{Path(out_dir)} holds no report.json to amend; write_report writes one")
    return json.loads(path.read_text(encoding="utf-8"))


def amend_report(
    out_dir: str | os.PathLike, metrics: Mapping[str, Any] | Sequence[Any], *, notes: Sequence[str] = ()
) -> dict[str, Path]:
    """Add metrics measured after `write_report` to its rows and write its files again.

    Args:
        out_dir: the folder holding report.json.
        metrics: per row, a dict of metrics to add (None: nothing): a mapping by row name, or a
            sequence in row order.
        notes: lines to add under the table.

    Returns write_report's paths.
    """
    report = _read_report(out_dir)
    records = report["stages"]
    for record, extra in zip(records, _per_row(records, metrics, "metrics")):
        record["metrics"].update(extra or {})
    return write_report(
        records,
        out_dir,
        metric=report["metric"],
        higher_is_better=report["higher_is_better"],
        notes=[*report.get("notes", []), *notes],
    )


def add_generation(
    out_dir: str | os.PathLike,
    models: Mapping[str, Any] | Sequence[Any],
    evaluate: Callable[[Any], dict[str, float]],
    *,
    note: str | None = None,
) -> dict[str, Path]:
    """Score the seq2seq head of the report's rows with `evaluate` (e.g. ROUGE/BLEU) and add the metrics to the report.

    Args:
        out_dir: the folder holding report.json.
        models: per row (by name, or in row order; None = not scored): a Transformer, an OrtModel,
            a flashlite model folder or an `.onnx` encoder file with its decoder beside it. A model
            named by several rows is scored once.
        evaluate: model -> metrics (`compress.evaluate.generation.evaluate` with its task bound).
        note: a line saying what the metrics measure, under the table.

    Returns write_report's paths.
    """
    from model.io import load
    from model.onnx.runtime import OrtModel

    records = _read_report(out_dir)["stages"]
    scored: dict[Any, dict[str, float]] = {}
    rows = []
    for model in _per_row(records, models, "models"):
        if model is None:
            rows.append(None)
            continue
        key = str(Path(model).resolve()) if isinstance(model, (str, os.PathLike)) else id(model)
        if key not in scored:
            if isinstance(model, (str, os.PathLike)):
                model = OrtModel(model) if Path(model).suffix == ".onnx" else load(model)
            scored[key] = dict(evaluate(model))
        rows.append(scored[key])
    return amend_report(out_dir, rows, notes=[note] if note else [])
