"""The deployed files side by side: the Lite model's ONNX files beside the one-call alternative, the teacher exported
to ONNX and quantized by ONNX Runtime's `quantize_dynamic` with its defaults.

Every file is scored with the same evaluation function as the pipeline's stages, and timed in
interleaved rounds in this process, next to the teacher in PyTorch, so machine noise hits every
row alike. The rows have a Stage's fields, so the compression report lists and plots them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from compress.evaluate.measure import count_params, size_on_disk, time_model, time_onnx
from compress.pipeline import Stage, saved_size
from model.onnx.export import export_onnx
from model.onnx.runtime import ENCODER_INPUTS, OrtModel, OrtModule
from model.transformer import Transformer

PEER = "teacher, ORT int8 (one call)"
TEACHER = "teacher, PyTorch fp32"


def one_call_int8(teacher: Transformer, folder: str | Path) -> Path:
    """What a user gets in one call: the teacher exported to ONNX, then `quantize_dynamic(fp32, int8)` as it comes.

    The export is a plain one (`unfuse_norms=False`: residual `Add` nodes, as Optimum and
    torch.onnx write them), so the row does not borrow the Lite export's graph rewrite.

    Args:
        teacher: the uncompressed model.
        folder: where `model.onnx` and `model-int8.onnx` are written.

    Returns:
        The int8 file.
    """
    from onnxruntime.quantization import quantize_dynamic

    from model.onnx.ort_quantize import root_logging_kept

    folder = Path(folder)
    fp32 = export_onnx(teacher, folder / "model.onnx", unfuse_norms=False).paths["encoder"]
    int8 = folder / "model-int8.onnx"
    with root_logging_kept():  # quantize_dynamic installs a root handler for its generic hints
        quantize_dynamic(fp32, int8)
    return int8


def compare_files(
    teacher: Transformer,
    files: Mapping[str, str | Path],
    batch: Mapping[str, torch.Tensor],
    evaluate: Callable[[Any], dict[str, float]],
    *,
    rounds: int = 3,
    threads: int | None = None,
    teacher_stage: Stage | None = None,
) -> list[dict[str, Any]]:
    """Stage-like rows for the teacher in PyTorch and each ONNX file: scored alike, timed side by side.

    Args:
        teacher: the uncompressed model (the first row; the peer's file holds its parameters).
        files: row name -> ONNX file, e.g. the peer's one-call int8 file and the Lite model's files.
        batch: the batch every row is timed on (its encoder inputs: a decoder is not compared).
        evaluate: model -> metrics, as the pipeline's (ONNX files are given as OrtModule).
        rounds: interleaved timing rounds; each row's latency is the median of its rounds' p50.
        threads: ONNX Runtime intra-op threads (None = its default); PyTorch keeps its own setting.
        teacher_stage: the pipeline's "input" stage, whose counts, size and metrics the teacher's
            row takes instead of scoring the teacher again.

    Returns:
        One dict per row: name, settings, params, unique_params, size_bytes, metrics, latency_ms.
    """
    runners = {name: OrtModel(path, threads=threads) for name, path in files.items()}
    rows = score_files(teacher, runners, evaluate, teacher_stage)
    latencies = time_files(teacher, runners, batch, rounds=rounds)
    return [{**row, "latency_ms": latencies[row["name"]]} for row in rows]


def score_files(
    teacher: Transformer,
    runners: Mapping[str, OrtModel],
    evaluate: Callable[[Any], dict[str, float]],
    teacher_stage: Stage | None = None,
) -> list[dict[str, Any]]:
    """The teacher's row and one per ONNX runner: name, settings, params, unique_params, size_bytes, metrics.

    The teacher's row comes from `teacher_stage` when given (the pipeline already measured it), else
    it is measured here.
    """
    if teacher_stage is None:
        teacher_stage = Stage("input", {}, *count_params(teacher), saved_size(teacher), evaluate(teacher), 0.0)
    teacher_params = (teacher_stage.params, teacher_stage.unique_params)
    rows = [_row(TEACHER, "PyTorch", teacher_params, teacher_stage.size_bytes, dict(teacher_stage.metrics))]
    for name, runner in runners.items():
        params = teacher_params if name == PEER else count_params(Transformer(runner.config))  # as the file holds
        size = sum(
            size_on_disk(path) for path in (runner.encoder.path, *([runner.decoder.path] if runner.decoder else []))
        )
        rows.append(_row(name, "ONNX Runtime", params, size, evaluate(OrtModule(runner))))
    return rows


def time_files(
    teacher: Transformer, runners: Mapping[str, OrtModel], batch: Mapping[str, torch.Tensor], *, rounds: int = 3
) -> dict[str, float]:
    """p50 milliseconds per row (the teacher in PyTorch, then each runner) on `batch`, in interleaved rounds."""
    batch = {k: v for k, v in batch.items() if k in ENCODER_INPUTS}  # the encoder graph is what every row shares
    timers = {TEACHER: lambda: time_model(teacher, batch, repeat=10)["p50_ms"]}
    timers |= {name: (lambda r=runner: time_onnx(r, batch, repeat=10)["p50_ms"]) for name, runner in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):  # interleaved: noise from other work on the machine hits every row alike
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(values) for name, values in times.items()}


def _row(name: str, runtime: str, params: tuple[int, int], size: int, metrics: dict[str, float]) -> dict[str, Any]:
    return {
        "name": name,
        "settings": {"runtime": runtime},
        "params": params[0],
        "unique_params": params[1],
        "size_bytes": size,
        "metrics": metrics,
    }
