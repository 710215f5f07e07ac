"""Pipeline: runs compression passes in order on a copy of a model, recording a Stage after each."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from compress.evaluate.measure import count_params
from model.io import atomic_write_text, load, save
from model.training.distributed import is_main
from model.transformer import MODEL_INPUTS, Transformer

Batch = dict[str, torch.Tensor]
Evaluate = Callable[[Transformer], dict[str, float]]


@dataclass
class Context:
    """What a pass may use besides the model.

    data: batches (dicts of tensors) for training or calibration; a list, a step-indexed source
    or an iterable. teacher: a frozen copy of the teacher given to `Pipeline.run` (default: its input
    model; eval mode, no grad).
    evaluate: model -> metrics. workdir: a folder the pass may write checkpoints into.
    device and parallel ("ddp" or "fsdp" under torchrun, see `model.training.config.TrainConfig`): where
    and how training passes run.
    """

    data: Any
    teacher: Transformer
    evaluate: Evaluate | None = None
    device: str = "cpu"
    seed: int = 0
    workdir: Path | None = None
    parallel: str = "ddp"

    def batches(self, n: int) -> list[Batch]:
        """Up to the first `n` batches of `data` (for calibration and importance estimates)."""
        if self.data is None:
            return []
        if isinstance(self.data, (list, tuple)):
            return list(self.data[:n])
        if hasattr(self.data, "__getitem__") and hasattr(self.data, "__len__"):
            return [self.data[i] for i in range(min(n, len(self.data)))]
        out = []
        for batch in self.data:
            if len(out) == n:
                break
            out.append(batch)
        return out


class Pass(Protocol):
    """A compression pass: a frozen dataclass (or any callable) taking (model, ctx) and returning a model.

    Class attributes (ClassVars, so not recipe fields) tell the Pipeline what a pass does:
    `needs_data = True` (it trains or calibrates: refused without data), `restructures = True`
    (it changes shapes or sharing) and `quantizes = True` (it stores integers); a restructuring
    pass after a quantizing one is refused.
    """

    def __call__(self, model: Transformer, ctx: Context) -> Transformer: ...


@dataclass
class Stage:
    """The record of one pass: settings, size before saving and after, metrics, time."""

    name: str
    settings: dict[str, Any]
    params: int
    unique_params: int
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def pass_name(p: Any) -> str:
    return type(p).__name__ if dataclasses.is_dataclass(p) else getattr(p, "__name__", type(p).__name__)


def pass_settings(p: Any) -> dict[str, Any]:
    """What the manifest stores about a pass: its dataclass fields, or its repr for a plain function."""
    return dataclasses.asdict(p) if dataclasses.is_dataclass(p) else {"repr": repr(p)}


def saved_size(model: Transformer) -> int:
    """Bytes of the model's safetensors file (what `save` writes for the weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tmp)
        return (Path(tmp) / "model.safetensors").stat().st_size


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


def passes_digest(passes: Sequence[Any]) -> str:
    """A short digest of the passes' names and settings, in order."""
    settings = json.dumps([[pass_name(p), pass_settings(p)] for p in passes], sort_keys=True, default=str)
    return _digest([settings.encode()])


def fingerprints(model: Transformer, teacher: Transformer | None, ctx: Context) -> dict[str, str]:
    """What a run starts from, as short digests: the input model, the teacher (None: the model) and the data.

    The data digest covers the first 16 batches and the length of a list or tuple; other data
    (an iterator would be consumed) is known by its type only.
    """

    def weights(m: Transformer) -> Iterator[bytes]:
        yield m.config.to_json().encode()
        for key, value in sorted(m.state_dict().items()):
            yield key.encode()
            yield _tensor_bytes(value)

    def data() -> Iterator[bytes]:
        yield type(ctx.data).__name__.encode()
        if isinstance(ctx.data, (list, tuple)):
            yield str(len(ctx.data)).encode()
            for batch in ctx.data[:16]:
                for key in sorted(batch):
                    yield key.encode()
                    if isinstance(batch[key], torch.Tensor):
                        yield _tensor_bytes(batch[key])

    model_digest = _digest(weights(model))
    teacher_digest = model_digest if teacher is None else _digest(weights(teacher))
    return {"model": model_digest, "teacher": teacher_digest, "data": _digest(data())}


def stage_folder(workdir: str | Path, index: int, p: Any) -> Path:
    """The folder where `Pipeline.run(workdir=...)` keeps pass `index` (`p`): checkpoints, stage.json, model/.

    Args:
        workdir: the run's workdir. index: the pass's position (0 = first). p: the pass.
    """
    return Path(workdir) / f"{index:02d}-{pass_name(p)}"


def _finished_stage(folder: Path | None, p: Any, inputs: dict[str, str]) -> Stage | None:
    """The recorded Stage of a pass that already finished in `folder` from the same inputs, else None.

    A record made from other inputs (another model, teacher, data or earlier passes) is refused,
    naming what differs: resuming it would silently reuse stale work.
    """
    if folder is None or not (folder / "stage.json").is_file():
        return None
    record = json.loads((folder / "stage.json").read_text())
    recorded = record.pop("inputs", {})
    if record.get("settings") != json.loads(json.dumps(pass_settings(p))):
        raise ValueError(
            f"{folder} holds a finished {pass_name(p)} run with settings {record.get('settings')}, but this pipeline "
            f"has {pass_settings(p)}; use another workdir (or --overwrite) to start afresh"
        )
    differ = [name for name in inputs if recorded.get(name) != inputs[name]]
    if differ:
        raise ValueError(
            f"{folder} holds a finished {pass_name(p)} run made from another {' and '.join(differ)} than this run's; "
            f"use another workdir (or --overwrite) to start afresh"
        )
    return Stage(**record)


class Pipeline:
    """Compression passes run in order: `Pipeline([Share(...), Prune(...), ...]).run(model, data)`."""

    def __init__(self, passes: Sequence[Pass]):
        passes = list(passes)
        for i, p in enumerate(passes):
            if not callable(p):
                raise TypeError(f"pass {i} ({p!r}) is not callable; a pass takes (model, ctx) and returns a model")
        quantized_at = next((i for i, p in enumerate(passes) if getattr(p, "quantizes", False)), None)
        if quantized_at is not None:
            late = [pass_name(p) for p in passes[quantized_at + 1 :] if getattr(p, "restructures", False)]
            if late:
                raise ValueError(
                    f"{late[0]} after {pass_name(passes[quantized_at])} is not allowed: "
                    "passes that change the structure must come before quantization"
                )
        self.passes = passes
        self.stages: list[Stage] = []

    def run(
        self,
        model: Transformer,
        data: Any = None,
        evaluate: Evaluate | None = None,
        *,
        device: str = "cpu",
        seed: int = 0,
        workdir: str | Path | None = None,
        check: Batch | None = None,
        parallel: str = "ddp",
        teacher: Transformer | None = None,
    ) -> Transformer:
        """Run every pass on a copy of `model` (never mutated) and return the compressed model.

        data: training/calibration batches. evaluate: model -> metrics, run after each pass.
        teacher: the model the passes distill from and calibrate against (never mutated); None =
        `model` itself. A student that was already compressed (say by a general distillation on
        unlabelled text) takes its task's fine-tuned teacher here.
        check: a batch to prove the model still runs after each pass (default: the first batch).
        workdir: each pass gets its own folder there (`NN-Name/`, for its checkpoints) and its
        result is saved in it; a rerun with the same workdir and passes resumes at the first
        unfinished pass (finished ones are loaded, not redone).
        device, parallel: where and how the training passes run (parallel: "ddp" or "fsdp" under torchrun).
        Stages (one per pass, plus "input") are in `self.stages`.
        """
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a model.Transformer, got {type(model).__name__}")
        if teacher is not None and not isinstance(teacher, Transformer):
            raise TypeError(f"teacher must be a model.Transformer or None, got {type(teacher).__name__}")
        if teacher is not None:
            differ = [
                f"{key} {getattr(teacher.config, key)} vs {getattr(model.config, key)}"
                for key in ("vocab_size", "type_vocab_size", "max_positions")
                if getattr(teacher.config, key) != getattr(model.config, key)
            ]
            if differ:
                raise ValueError(
                    f"the teacher does not read the student's inputs: {', '.join(differ)} (teacher vs model)"
                )
        frozen = copy.deepcopy(model if teacher is None else teacher).eval().requires_grad_(False)
        ctx = Context(
            data=data,
            teacher=frozen,
            evaluate=evaluate,
            device=device,
            seed=seed,
            workdir=Path(workdir) if workdir is not None else None,
            parallel=parallel,
        )
        hungry = [pass_name(p) for p in self.passes if getattr(p, "needs_data", False)]
        if hungry and not ctx.batches(1):
            raise ValueError(f"{hungry[0]} needs data (batches of token ids) but data is empty or None")
        if check is None:
            first = ctx.batches(1)
            check = first[0] if first else None
        current = copy.deepcopy(model)
        self.stages = [self._stage("input", {}, current, ctx, 0.0)]
        start_from = fingerprints(model, teacher, ctx) if ctx.workdir is not None else {}
        for i, p in enumerate(self.passes):
            folder = stage_folder(ctx.workdir, i, p) if ctx.workdir is not None else None
            inputs = {**start_from, "passes": passes_digest(self.passes[: i + 1])} if folder is not None else {}
            finished = _finished_stage(folder, p, inputs)
            if finished is not None:  # evaluated again, so every stage has its metrics and the evaluator its call
                current = load(folder / "model", device="cpu")
                current.attention_backend = model.attention_backend
                self.stages.append(self._stage(finished.name, finished.settings, current, ctx, finished.seconds))
                continue
            start = time.perf_counter()
            current = p(current, dataclasses.replace(ctx, workdir=folder))
            if not isinstance(current, Transformer):
                raise TypeError(f"pass {pass_name(p)} returned {type(current).__name__}, not a Transformer")
            seconds = time.perf_counter() - start
            if check is not None:
                self._check_runs(current, check, pass_name(p))
            self.stages.append(self._stage(pass_name(p), pass_settings(p), current, ctx, seconds))
            if folder is not None and is_main():  # the stage record goes last: it marks the pass finished
                save(current, folder / "model")
                record = {**dataclasses.asdict(self.stages[-1]), "inputs": inputs}
                atomic_write_text(folder / "stage.json", json.dumps(record))
        return current.eval()

    @staticmethod
    def _check_runs(model: Transformer, batch: Batch, name: str) -> None:
        with torch.no_grad():
            was = model.training
            device = next(model.parameters()).device  # a training pass may have left it on its device
            out = model.eval()(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
            model.train(was)
        if not torch.isfinite(out.hidden_states).all():
            raise RuntimeError(f"after pass {name} the model produces non-finite hidden states")

    @staticmethod
    def _stage(name: str, settings: dict, model: Transformer, ctx: Context, seconds: float) -> Stage:
        params, unique = count_params(model)
        metrics = ctx.evaluate(model) if ctx.evaluate is not None else {}
        return Stage(name, settings, params, unique, saved_size(model), dict(metrics), seconds)

    def manifest(self) -> dict[str, Any]:
        """What `save(lite, dir, manifest=pipeline.manifest())` records: the passes and their stages."""
        return {
            "passes": [{"name": pass_name(p), "settings": pass_settings(p)} for p in self.passes],
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def stage_models(self, workdir: str | Path) -> list[Path]:
        """The saved model folder of each pass of a run with this `workdir`, in pass order (`NN-Name/model`)."""
        return [stage_folder(workdir, i, p) / "model" for i, p in enumerate(self.passes)]

    def save(self, model: Transformer, directory: str | Path) -> Path:
        """Save the compressed model with the stages in manifest.json."""
        return save(model, directory, manifest=self.manifest())
