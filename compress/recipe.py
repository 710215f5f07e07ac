"""Recipes: YAML files that name the passes, their settings, the data and the export, validated against the pass dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from compress.distill import Distill
from compress.evaluate.glue_data import TASKS as GLUE_TASKS
from compress.prune import Prune
from compress.quantize import Quantize
from compress.share import Share
from model.config import check_int
from model.onnx.ort_quantize import MODES as ONNX_MODES

# The passes a recipe may name: the YAML key is the file (and verb) the pass lives in.
PASSES = {"share": Share, "prune": Prune, "distill": Distill, "quantize": Quantize}


@dataclass(frozen=True)
class DataSpec:
    """The text a recipe trains and calibrates on.

    corpus: a text file, JSONL file or folder (None = the built-in corpus). task: a GLUE task
    name: its labelled train rows, read from `glue_dir`. glue_text: GLUE task names whose train
    sentences (labels unused) are the unlabelled text, read from `glue_dir`.
    builtin_corpus: whether the built-in corpus (Python's docstrings) may stand in when no text
    is named; recipes for models that were not pretrained on it say false, since distilling on
    text unlike the model's own domain teaches the student the wrong things.
    max_len, batch_size: per batch. limit: at most this many texts or rows (a random sample of them, by the seed).
    group_by_length: batch training texts of similar token length together, so that batches pad
    little (shuffled within windows of 50 batches; the held-out batches keep their order).
    augment_copies: add this many unlabelled copies of every training text or row with words
    swapped for their embedding neighbours (`compress.augment`; 0 = none): the teacher labels
    them during distillation. augment_replace_prob: the chance that each word is swapped.
    """

    corpus: str | None = None
    task: str | None = None
    glue_text: tuple[str, ...] = ()
    glue_dir: str | None = None
    builtin_corpus: bool = True
    max_len: int = 64
    batch_size: int = 16
    limit: int | None = 20000
    group_by_length: bool = True
    augment_copies: int = 0
    augment_replace_prob: float = 0.4

    def __post_init__(self) -> None:
        for name in ("corpus", "task", "glue_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"data.{name} must be a string or null, got {type(value).__name__} {value!r}")
        for name in ("builtin_corpus", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.glue_text, str):  # one task named as a plain string
            object.__setattr__(self, "glue_text", (self.glue_text,))
        if not isinstance(self.glue_text, tuple) or not all(isinstance(name, str) for name in self.glue_text):
            raise TypeError(f"data.glue_text must be a list of GLUE task names, got {self.glue_text!r}")
        unknown = [name for name in self.glue_text if name not in GLUE_TASKS]
        if unknown:
            raise ValueError(f"data.glue_text names unknown GLUE tasks {unknown}; known: {', '.join(GLUE_TASKS)}")
        named = [key for key in ("corpus", "task", "glue_text") if getattr(self, key)]
        if len(named) > 1:
            raise ValueError(
                f"data names {' and '.join(named)}: give one source of text (clear the others, e.g. "
                f"--set data.glue_text=[] or --set data.corpus=null)"
            )
        if (self.task or self.glue_text) and self.glue_dir is None:
            raise ValueError(
                "data.task and data.glue_text read GLUE's files: set data.glue_dir to the folder holding them"
            )
        check_int("max_len", self.max_len, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.limit is not None:
            check_int("limit", self.limit, 1)
        check_int("augment_copies", self.augment_copies, 0)
        p = self.augment_replace_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"data.augment_replace_prob must be a number in (0, 1], got {p!r}")


@dataclass(frozen=True)
class ExportSpec:
    """What to export after the passes: an ONNX file (verified against PyTorch), optionally quantized by ONNX Runtime.

    peer: also export the teacher and quantize it with ONNX Runtime in one call (the obvious
    alternative), and report both side by side (compress.evaluate.deploy); None = whenever
    `onnx` is true. sentence_embedding: also write the sentence-transformers layout with a
    `sentence_embedding` output (mean pooling and L2 normalization inside the graph).
    """

    onnx: bool = True
    quantize: str | None = None
    peer: bool | None = None
    sentence_embedding: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.onnx, bool):
            raise TypeError(f"export.onnx must be true or false, got {self.onnx!r}")
        if self.peer is not None and not isinstance(self.peer, bool):
            raise TypeError(f"export.peer must be true, false or null, got {self.peer!r}")
        if not isinstance(self.sentence_embedding, bool):
            raise TypeError(f"export.sentence_embedding must be true or false, got {self.sentence_embedding!r}")
        if self.sentence_embedding and not self.onnx:
            raise ValueError("export.sentence_embedding shapes the ONNX folder: it needs export.onnx: true")
        if self.peer and not self.onnx:
            raise ValueError("export.peer compares ONNX files: it needs export.onnx: true")
        if self.quantize is not None and self.quantize not in ONNX_MODES:
            raise ValueError(f"export.quantize must be one of {', '.join(ONNX_MODES)} or null; got {self.quantize!r}")


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe: the passes in order, the data and the export settings."""

    passes: tuple[Any, ...]
    data: DataSpec = field(default_factory=DataSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    description: str = ""


def _build(cls: type, settings: Any, where: str) -> Any:
    """Instantiate a settings dataclass, naming unknown keys and the allowed ones; lists become tuples."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise TypeError(f"{where} must be a mapping of settings, got {type(settings).__name__} {settings!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; allowed: {', '.join(allowed)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (parsed YAML); errors name the key and what is allowed."""
    if not isinstance(data, dict):
        raise TypeError(f"{source} must be a mapping with a 'passes' list, got {type(data).__name__}")
    allowed = ("description", "passes", "data", "export")
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; allowed: {', '.join(allowed)}")
    steps = data.get("passes")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{source}: 'passes' must be a non-empty list like [{{share: {{layers_per_group: 2}}}}, ...]")
    passes = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"{source}: passes[{i}] must be a one-key mapping {{pass name: settings}}, got {step!r}")
        ((name, settings),) = step.items()
        if name not in PASSES:
            raise ValueError(f"{source}: passes[{i}] names unknown pass {name!r}; allowed: {', '.join(PASSES)}")
        passes.append(_build(PASSES[name], settings, f"{source}: passes[{i}].{name}"))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TypeError(f"{source}: description must be a string")
    return Recipe(
        passes=tuple(passes),
        data=_build(DataSpec, data.get("data"), f"{source}: data"),
        export=_build(ExportSpec, data.get("export"), f"{source}: export"),
        description=description,
    )


def builtin_recipes() -> list[str]:
    """Names of the recipes that ship with flashlite (compress/recipes/*.yaml)."""
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("compress.recipes").iterdir() if p.name.endswith(".yaml")
    )


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """Apply "SECTION.KEY=VALUE" overrides to a parsed recipe, e.g. "distill.steps=50" or "data.max_len=32".

    SECTION is "data", "export" or a pass name (the first pass of that name); VALUE is read as YAML.
    """
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"override {item!r} must look like SECTION.KEY=VALUE, e.g. distill.steps=50")
        value = yaml.safe_load(text)
        if section in ("data", "export"):
            data.setdefault(section, {})
            data[section] = {**(data[section] or {}), key: value}
            continue
        steps = [step for step in data.get("passes", []) if isinstance(step, dict) and section in step]
        if not steps:
            names = [next(iter(step)) for step in data.get("passes", []) if isinstance(step, dict) and step]
            raise ValueError(
                f"override {item!r}: {source} has no {section!r} pass; its passes: {names}, plus data and export"
            )
        steps[0][section] = {**(steps[0][section] or {}), key: value}
    return data


def load_recipe(path_or_name: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe from a YAML file, or a built-in one by name (e.g. "flash-lite"), with optional overrides."""
    path = Path(path_or_name)
    if not path.is_file():
        name = str(path_or_name)
        if name not in builtin_recipes():
            raise FileNotFoundError(
                f"recipe {name!r} is neither a file nor a built-in recipe; built-in: {', '.join(builtin_recipes())}"
            )
        text, source = resources.files("compress.recipes").joinpath(f"{name}.yaml").read_text(), f"recipe {name}"
    else:
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {err}") from None
    if overrides:
        if not isinstance(data, dict):
            raise TypeError(f"{source} must be a mapping with a 'passes' list, got {type(data).__name__}")
        data = apply_overrides(data, list(overrides), source)
    return parse_recipe(data, source)
