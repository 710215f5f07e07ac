"""Tests for compress.report: report.json, report.md and the Pareto plots from pipeline stages."""

import json

import pytest

from compress.pipeline import Pipeline, Stage
from compress.report import write_report
from model import Config, Transformer

PNG = b"\x89PNG\r\n\x1a\n"


def _stages():
    return [
        Stage("input", {}, 22_700_000, 22_700_000, 90_800_000, {"accuracy": 0.91}, 0.0),
        Stage("Share", {"layers_per_group": 2}, 22_700_000, 11_000_000, 44_000_000, {"accuracy": 0.88}, 12.5),
        Stage("Quantize", {"mode": "int8"}, 11_000_000, 11_000_000, 11_350_000, {"accuracy": 0.89}, 3.0),
    ]


def test_report_files(tmp_path):
    paths = write_report(
        _stages(),
        tmp_path / "out",
        latencies={"input": 20.0, "Share": {"p50_ms": 18.0, "p90_ms": 30.0}, "Quantize": 10.0},
    )
    assert set(paths) == {"json", "markdown", "size_plot", "latency_plot"}
    report = json.loads(paths["json"].read_text())
    assert report["metric"] == "accuracy"
    assert [s["name"] for s in report["stages"]] == ["input", "Share", "Quantize"]
    share = report["stages"][1]
    assert share == {
        "name": "Share",
        "settings": {"layers_per_group": 2},
        "params": 22_700_000,
        "unique_params": 11_000_000,
        "size_bytes": 44_000_000,
        "metrics": {"accuracy": 0.88},
        "latency_ms": 18.0,
        "seconds": 12.5,
    }
    for key in ("size_plot", "latency_plot"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    md = paths["markdown"].read_text()
    assert "| Quantize | 11.00 | 11.00 | 11.35 | 8.00× | 0.8900 | 10.00 | 2.00× | 3.0 |" in md
    assert "| input | 22.70 | 22.70 | 90.80 | 1.00× | 0.9100 | 20.00 | 1.00× | 0.0 |" in md
    assert "![size_plot](metric_vs_size.png)" in md


def test_report_from_a_pipeline_run(tmp_path):
    def halve_nothing(model, ctx):
        return model

    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("classify",), n_labels=2))
    pipeline = Pipeline([halve_nothing])
    pipeline.run(model, evaluate=lambda m: {"accuracy": 0.5, "f1": float("nan")})
    paths = write_report(pipeline.stages, tmp_path, metric="accuracy", latencies=[1.5, None])
    report = json.loads(paths["json"].read_text())  # strict JSON: NaN was written as null
    assert report["stages"][1]["metrics"] == {"accuracy": 0.5, "f1": None}
    assert [s["latency_ms"] for s in report["stages"]] == [1.5, None]
    assert report["stages"][0]["size_bytes"] == pipeline.stages[0].size_bytes > 0
    assert "f1" in paths["markdown"].read_text()


def test_report_without_metrics_or_latencies(tmp_path):
    stages = [{"name": "teacher", "params": 10, "unique_params": 10, "size_bytes": 40}]
    paths = write_report(stages, tmp_path)
    assert set(paths) == {"json", "markdown"}
    assert json.loads(paths["json"].read_text())["stages"][0]["latency_ms"] is None
    paths = write_report([{**stages[0], "metrics": {"loss": 2.0}}], tmp_path, higher_is_better=False)
    assert set(paths) == {"json", "markdown", "size_plot"}


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty sequence"):
        write_report([], tmp_path)
    with pytest.raises(ValueError, match=r"stages\[0\] lacks \['size_bytes'\]"):
        write_report([{"name": "a", "params": 1, "unique_params": 1}], tmp_path)
    with pytest.raises(ValueError, match="metric='f1'.*\\['accuracy'\\]"):
        write_report(_stages(), tmp_path, metric="f1")
    with pytest.raises(ValueError, match="unknown stages \\['Prune'\\]"):
        write_report(_stages(), tmp_path, latencies={"Prune": 3.0})
    with pytest.raises(ValueError, match="2 values for 3 stages"):
        write_report(_stages(), tmp_path, latencies=[1.0, 2.0])


def test_pareto_frontier_skips_dominated_stages():
    from compress.report import _pareto

    points = [(90.0, 0.91, "input"), (44.0, 0.88, "Share"), (11.0, 0.89, "Quantize"), (50.0, 0.80, "bad")]
    assert [name for _, _, name in _pareto(points, True)] == ["Quantize", "input"]
    assert [name for _, _, name in _pareto(points, False)] == ["Quantize", "Share", "bad"]


def test_amend_report_adds_metrics_by_row_and_keeps_the_rest(tmp_path):
    from compress.report import amend_report

    write_report(_stages(), tmp_path, latencies=[20.0, 18.0, 10.0], notes=["accuracy: 100 dev rows."])
    paths = amend_report(tmp_path, {"input": {"bleu": 31.5}, "Quantize": {"bleu": 30.25}}, notes=["bleu: corpus BLEU."])
    report = json.loads(paths["json"].read_text())
    assert [s["metrics"] for s in report["stages"]] == [
        {"accuracy": 0.91, "bleu": 31.5},
        {"accuracy": 0.88},
        {"accuracy": 0.89, "bleu": 30.25},
    ]
    assert [s["latency_ms"] for s in report["stages"]] == [20.0, 18.0, 10.0] and report["metric"] == "accuracy"
    assert report["notes"] == ["accuracy: 100 dev rows.", "bleu: corpus BLEU."]
    table = paths["markdown"].read_text()
    assert "| accuracy | bleu |" in table and "| 31.5000 |" in table and "| – |" in table
    assert "accuracy: 100 dev rows.\n\nbleu: corpus BLEU." in table
    with pytest.raises(ValueError, match=r"metrics names unknown stages \['Prune'\]"):
        amend_report(tmp_path, {"Prune": {"bleu": 1.0}})
    with pytest.raises(ValueError, match="metrics holds 2 values for 3 stages"):
        amend_report(tmp_path, [None, None])
    with pytest.raises(FileNotFoundError, match="no report.json"):
        amend_report(tmp_path / "elsewhere", {})


def test_add_generation_scores_each_named_model_once(tmp_path):
    from compress.report import add_generation

    write_report(_stages(), tmp_path)
    calls = []

    def evaluate(model):
        calls.append(model)
        return {"rougeL": len(calls) / 10}

    teacher, lite = object(), object()
    report = json.loads(
        add_generation(tmp_path, [teacher, None, lite], evaluate, note="rougeL: a test.")["json"].read_text()
    )
    assert calls == [teacher, lite] and report["notes"] == ["rougeL: a test."]
    assert [s["metrics"].get("rougeL") for s in report["stages"]] == [0.1, None, 0.2]
    add_generation(tmp_path, {"input": teacher, "Share": teacher}, evaluate)
    assert len(calls) == 3  # one more call, for the model two rows share
    with pytest.raises(FileNotFoundError, match="no report.json"):
        add_generation(tmp_path / "elsewhere", [teacher], evaluate)
