"""A compression job: a recipe applied to a model, with its data, per-stage evaluation, report files and ONNX export."""

from __future__ import annotations

import functools
import json
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from compress.augment import augment_rows, augment_texts, replacer_for
from compress.distill import Distill
from compress.evaluate import generation, glue
from compress.evaluate.measure import time_model
from compress.heads import adopt_heads
from compress.pipeline import Pipeline, Stage
from compress.recipe import DataSpec, Recipe
from compress.report import add_generation, write_report
from model.data.batching import text_batches
from model.data.corpus import load_corpus
from model.heads import shift_right
from model.training.distributed import is_main
from model.transformer import Transformer

Batch = dict[str, torch.Tensor]
# The seq2seq evaluation: sentences, tokens per sentence (also the new tokens generated), words masked.
SEQ2SEQ = dict(n=32, max_len=32, ratio=0.15)


@dataclass
class JobResult:
    """What a job produced: the Lite model, its pipeline (stages), and the files written."""

    model: Transformer
    pipeline: Pipeline
    files: dict[str, Path] = field(default_factory=dict)
    onnx: Any = None


def recipe_batches(spec: DataSpec, model: Transformer, *, seed: int = 0) -> tuple[list[Batch], list[Batch]]:
    """(training batches, held-out batches) for a recipe: GLUE rows when `spec.task` is set, else text.

    GLUE rows are at most `spec.limit` train rows drawn at random with `seed`; the first 8 batches
    of the dev set are held out. Text comes from `spec.corpus` (None = the built-in corpus),
    shuffled with `seed`, at most `spec.limit` documents; a tenth (at most 8 batches) is held out. Models with a
    decoder also get `decoder_input_ids` (the input itself) so their seq2seq head is distilled; an
    eos-pooled classifier (BART's) the input shifted right, the decoder input it classifies with.
    With `spec.augment_copies`, unlabelled word-swapped copies of the training texts or rows join
    the training batches (never the held-out ones).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(
            "the model has no tokenizer attached (model.tokenizer); import or pretrain it with flashlite first"
        )
    if spec.task is not None:
        rows = glue.load(spec.task, "train", spec.glue_dir)
        if spec.limit is not None and spec.limit < len(rows):  # a sample, not a prefix: files may be sorted
            rows = random.Random(seed).sample(rows, spec.limit)
        held = glue.load(spec.task, "dev", spec.glue_dir)[: 8 * spec.batch_size]
        held_out = glue.batches(held, tokenizer, spec.task, max_len=spec.max_len, batch_size=spec.batch_size)
        return task_batches(rows, spec, model, seed=seed), held_out
    if spec.corpus is None and not spec.glue_text and not spec.builtin_corpus:
        raise ValueError(
            "this recipe distills a model that was not pretrained on the built-in corpus (Python's docstrings), and "
            "text unlike the model's own teaches the student the wrong things: name text with --set data.corpus=FILE "
            "or --set data.glue_text=[sst2,mrpc,cola] --set data.glue_dir=DIR, or opt in with "
            "--set data.builtin_corpus=true"
        )
    train, held = recipe_texts(spec, seed=seed)
    if len(train) < spec.batch_size:
        need = max(len(held), spec.batch_size) + spec.batch_size  # fewer texts than a batch: all of them held
        raise ValueError(
            f"the corpus has {len(train) + len(held)} texts; need at least {need} for batch_size={spec.batch_size}"
        )

    def batched(items: list[str], group_by_length: bool) -> list[Batch]:
        out = text_batches(
            tokenizer,
            items,
            batch_size=spec.batch_size,
            max_len=spec.max_len,
            group_by_length=group_by_length,
            seed=seed,
        )
        if model.config.decoder:
            eos_pooled = model.config.classify_pooling == "eos"  # BART's classifier decodes the shifted source
            for batch in out:
                ids = batch["input_ids"]
                batch["decoder_input_ids"] = shift_right(ids, model.config.decoder_start_id) if eos_pooled else ids
                batch["decoder_attention_mask"] = batch["attention_mask"]
        return out

    if spec.augment_copies:
        train += augment_texts(train, replacer_for(model), **_augmenting(spec, seed))
    return batched(train, spec.group_by_length), batched(held, False)


def task_batches(rows: list[dict[str, Any]], spec: DataSpec, model: Transformer, *, seed: int = 0) -> list[Batch]:
    """Training batches of the GLUE task `spec.task` made of `rows` as a recipe makes them.

    Args:
        rows: the labelled train rows.
        spec: max_len, batch_size, group_by_length, and augment_copies: that many unlabelled
            word-swapped copies of every row (neighbours in `model`'s embedding table) join them.
        seed: the shuffle's and the word swaps'.
    """
    options = dict(max_len=spec.max_len, batch_size=spec.batch_size, group_by_length=spec.group_by_length)
    train = glue.batches(rows, model.tokenizer, spec.task, shuffle=True, seed=seed, **options)
    if spec.augment_copies:
        fields = glue.get_task(spec.task).fields
        extra = augment_rows(rows, fields, replacer_for(model), **_augmenting(spec, seed))
        train += glue.batches(extra, model.tokenizer, spec.task, shuffle=True, seed=seed, **options)
        random.Random(seed).shuffle(train)
    return train


def recipe_texts(spec: DataSpec, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of a recipe's text data, as `recipe_batches` batches them.

    Args:
        spec: the recipe's data: `glue_text` sentences, else `corpus` (None = the built-in corpus),
            shuffled with `seed`, at most `limit`; a tenth (between 1 and 8 batches) is held out.
        seed: the shuffle's.
    """
    texts = glue_sentences(spec.glue_text, spec.glue_dir) if spec.glue_text else load_corpus(spec.corpus)
    random.Random(seed).shuffle(texts)
    texts = texts[: spec.limit]
    n_held = min(8 * spec.batch_size, max(spec.batch_size, len(texts) // 10))
    return texts[n_held:], texts[:n_held]


def _augmenting(spec: DataSpec, seed: int) -> dict[str, Any]:
    return dict(copies=spec.augment_copies, replace_prob=spec.augment_replace_prob, seed=seed)


def glue_sentences(tasks: tuple[str, ...], glue_dir: str) -> list[str]:
    """Every text field of the tasks' train rows, in task order (labels unused): unlabelled text for distillation."""
    texts = []
    for task in tasks:
        fields = glue.get_task(task).fields
        texts += [row[field] for row in glue.load(task, "train", glue_dir) for field in fields]
    return texts


def check_data_size(recipe: Recipe, n_batches: int) -> str | None:
    """A warning when the distillation steps would cycle the training batches many times (None when they do not)."""
    steps = sum(p.steps for p in recipe.passes if isinstance(p, Distill))
    epochs = steps / max(1, n_batches)
    if epochs <= 10:
        return None
    return (
        f"the distillation runs {steps} steps over {n_batches} batches of data: {epochs:.0f} passes over the same text, "
        "where a student generalizes from more text; raise data.limit or name a larger corpus"
    )


@torch.no_grad()
def pooled(model: Transformer, batch: Batch) -> torch.Tensor:
    """Mean-pooled last encoder layer over real tokens: (B, dim)."""
    model.eval()
    device = next(model.parameters()).device  # a training pass may have left the model on its device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    hidden = model(**inputs).hidden_states.cpu()
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class FidelityEvaluator:
    """model -> {"fidelity": mean cosine of pooled hidden states vs the teacher's, plus the task metric};
    each call also times the model on a held-out batch into `latencies_ms` (reported apart from metrics)."""

    def __init__(self, teacher: Transformer, held_out: list[Batch], spec: DataSpec):
        self.held_out, self.spec, self.tokenizer = held_out, spec, teacher.tokenizer
        self.scores_task = spec.task is not None and "classify" in teacher.config.heads
        self.references = [pooled(teacher, b) for b in held_out]
        self.latencies_ms: list[float] = []

    def __call__(self, model: Transformer) -> dict[str, float]:
        metrics = self.metrics(model)
        self.latencies_ms.append(time_model(model, self.held_out[0], warmup=3, repeat=20)["p50_ms"])
        return metrics

    def note(self) -> str:
        """One line for the report: what the metrics and latencies were measured on."""
        rows = sum(len(batch["input_ids"]) for batch in self.held_out)
        timed = f"latencies are p50 over the first held-out batch ({len(self.held_out[0]['input_ids'])} rows)"
        fidelity = "fidelity is the mean cosine of pooled hidden states to the teacher's"
        task = self.spec.task
        if task is None:
            return f"{fidelity}, on {rows} held-out texts of the recipe's data; {timed}."
        if not self.scores_task:
            return (
                f"{fidelity}, on the first {rows} rows of {task}'s dev set (the model has no classify head); {timed}."
            )
        names = " / ".join(glue.get_task(task).metrics)
        return (
            f"{fidelity}; it and {names} are scored on the first {rows} rows of {task}'s dev set "
            f"(`flashlite eval --task {task}` scores all of it); {timed}."
        )

    def metrics(self, model: Any) -> dict[str, float]:
        """The fidelity and task metrics of a model (or an OrtModule over an ONNX file), untimed."""
        cosines = [F.cosine_similarity(pooled(model, b), ref, dim=-1) for b, ref in zip(self.held_out, self.references)]
        metrics = {"fidelity": torch.cat(cosines).mean().item()}
        spec = self.spec
        if spec.task is not None and "classify" in model.config.heads:
            metrics.update(
                glue.evaluate(
                    model,
                    spec.task,
                    "dev",
                    spec.glue_dir,
                    self.tokenizer,
                    max_len=spec.max_len,
                    limit=8 * spec.batch_size,
                )
            )
        return metrics


def run_job(
    recipe: Recipe,
    teacher: Transformer,
    out: str | Path,
    *,
    student: Transformer | None = None,
    seed: int = 0,
    device: str = "cpu",
    parallel: str = "ddp",
    pretraining: Mapping[str, Any] | None = None,
) -> JobResult:
    """Apply `recipe` to `teacher`; write the Lite model, report.json/.md, plots and (per the recipe) ONNX into `out`.

    A model with a decoder and an 'lm' head also gets ROUGE/BLEU of its seq2seq head in every row
    of the report (`_score_seq2seq`).

    student: the passes start from this model instead of `teacher`, which they distill from (the
      task stage after a general distillation: the student takes the teacher's task heads).
    parallel: "ddp" or "fsdp", how the training passes share the work under torchrun.
    pretraining: the teacher's pretraining facts when flashlite pretrained it (its manifest's
      "pretraining": corpus, seed, holdout); the seq2seq head is then scored on the documents that
      pretraining held out, else on the recipe's held-out texts.
    """
    out = Path(out)
    _check_pretraining(pretraining)
    if recipe.export.onnx:  # refused now, not after the passes have run
        from model.onnx.export import check_exportable

        try:
            check_exportable(teacher)
        except ValueError as err:
            raise ValueError(f"{err}; or compress without the export (--set export.onnx=false)") from None
    train_batches, held_out = recipe_batches(recipe.data, teacher, seed=seed)
    if (warning := check_data_size(recipe, len(train_batches))) and is_main():
        warnings.warn(warning, stacklevel=2)
    pipeline = Pipeline(recipe.passes)
    evaluate = FidelityEvaluator(teacher, held_out, recipe.data)
    start = teacher if student is None else adopt_heads(student, teacher, seed=seed)
    lite = pipeline.run(
        start,
        teacher=None if student is None else teacher,
        data=train_batches,
        evaluate=evaluate,
        device=device,
        seed=seed,
        workdir=out / "work",
        parallel=parallel,
    )
    result = JobResult(lite, pipeline)
    if not is_main():  # under torchrun the other ranks trained along; rank 0 writes the files
        return result
    pipeline.save(lite, out / "model")
    metric = recipe.data.task and next(iter(glue.get_task(recipe.data.task).metrics))
    deployed = (
        _export(recipe, teacher, lite, out, held_out, evaluate, result, pipeline.stages) if recipe.export.onnx else []
    )
    result.files = {
        **write_report(
            [*pipeline.stages, *deployed],
            out,
            metric=metric or "fidelity",
            latencies=[*evaluate.latencies_ms, *(row["latency_ms"] for row in deployed)],
            notes=[evaluate.note()],
        ),
        **result.files,
    }
    if lite.decoder is not None and "lm" in lite.config.heads:
        result.files.update(_score_seq2seq(recipe, teacher, start, out, result, seed=seed, pretraining=pretraining))
    return result


def _score_seq2seq(
    recipe: Recipe,
    teacher: Transformer,
    start: Transformer,
    out: Path,
    result: JobResult,
    *,
    seed: int,
    pretraining: Mapping[str, Any] | None,
) -> dict[str, Path]:
    """Add ROUGE/BLEU of the seq2seq head (teacher, each stage, the Lite ONNX rows) to the job's report.

    The task is the decoder's pretraining one (`generation.denoising`): rebuild held-out
    sentences from copies with some of their words masked, greedy, as small as `make demo` affords.
    Held-out text without a sentence of the task's length leaves the report as it was, with a warning.

    Args:
        recipe, teacher, out, seed, pretraining: run_job's. start: the model the passes started from.
        result: the job's result so far, whose report is rewritten.

    Returns add_generation's paths ({} when nothing was scored).
    """
    from compress.evaluate.deploy import TEACHER  # its module imports the ONNX tooling: only when scoring

    documents, where = _seq2seq_documents(recipe.data, pretraining, seed=seed)
    settings = dict(max_new_tokens=SEQ2SEQ["max_len"], max_len=SEQ2SEQ["max_len"])
    try:
        sources, references, options = generation.denoising(documents, teacher.tokenizer, seed=seed, **SEQ2SEQ)
    except ValueError as err:
        warnings.warn(f"the seq2seq head is not scored: {err}", stacklevel=3)
        return {}
    evaluate = functools.partial(
        generation.evaluate, sources=sources, references=references, tokenizer=teacher.tokenizer, **settings, **options
    )
    models = [start, *result.pipeline.stage_models(out / "work")[:-1], result.model]
    onnx = {}
    if result.onnx is not None:
        onnx["Lite, ONNX"] = result.onnx.paths["encoder"]
        onnx |= {f"Lite, ONNX {mode}": variant.paths["encoder"] for mode, variant in result.onnx.quantized.items()}
    rows = [row["name"] for row in json.loads(result.files["json"].read_text(encoding="utf-8"))["stages"]]
    models += [teacher if name == TEACHER else onnx.get(name) for name in rows[len(models) :]]
    masked = any(teacher.tokenizer.token_to_id(t) is not None for t in generation.MASK_TOKENS)
    copies = (
        f"copies with {SEQ2SEQ['ratio']:.0%} of their words masked" if masked else "unmasked copies (no mask token)"
    )
    note = (
        f"rouge1/rouge2/rougeL (F-measure, 0-1) and bleu (corpus BLEU, 0-100): the seq2seq head rebuilds "
        f"{len(sources)} sentences of {where} from {copies} (greedy, up to {settings['max_new_tokens']} new tokens)."
    )
    return add_generation(out, models, evaluate, note=note)


def _check_pretraining(pretraining: Mapping[str, Any] | None) -> None:
    """Refuse a pretraining record that names a corpus without the seed and holdout that split it."""
    if not pretraining or "corpus" not in pretraining:
        return
    missing = [key for key in ("seed", "holdout") if key not in pretraining]
    if missing:
        raise ValueError(
            f"the model's manifest.json 'pretraining' names a corpus but lacks {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, pretraining))}): the held-out split cannot be rebuilt; "
            "restore the record flashlite pretrain wrote, or remove 'corpus' from it"
        )


def _seq2seq_documents(spec: DataSpec, pretraining: Mapping[str, Any] | None, *, seed: int) -> tuple[list[str], str]:
    """(held-out documents, where they come from in words) for the seq2seq scoring: see run_job's `pretraining`."""
    if pretraining and "corpus" in pretraining:
        corpus = pretraining["corpus"]
        documents = generation.held_out_documents(corpus, seed=pretraining["seed"], holdout=pretraining["holdout"])
        return documents, f"the held-out split of its pretraining corpus ({corpus or 'the built-in corpus'})"
    source = spec.corpus or (f"GLUE {', '.join(spec.glue_text)}" if spec.glue_text else "the built-in corpus")
    return recipe_texts(spec, seed=seed)[1], f"the recipe's held-out texts ({source})"


def _export(
    recipe: Recipe,
    teacher: Transformer,
    lite: Transformer,
    out: Path,
    held_out: list[Batch],
    evaluate: FidelityEvaluator,
    result: JobResult,
    stages: list[Stage],
) -> list[dict[str, Any]]:
    """Export the Lite model's deployable folder (with its ONNX Runtime variant) as the recipe says; the side-by-side rows of the files."""
    from dataclasses import asdict

    from compress.evaluate.deploy import PEER, compare_files, one_call_int8  # ONNX tooling only when exporting
    from model.onnx.export import export_onnx

    mode = recipe.export.quantize
    result.onnx = export_onnx(
        lite,
        out / "onnx",
        quantize=[mode] if mode else [],
        calibration=held_out if mode == "int8-static" else None,
        stages=[asdict(stage) for stage in stages],
        sentence_embedding=recipe.export.sentence_embedding,
    )
    result.files["onnx"] = out / "onnx"
    files = {"Lite, ONNX": result.onnx.paths["encoder"]}
    if mode in result.onnx.quantized:
        files[f"Lite, ONNX {mode}"] = result.onnx.quantized[mode].paths["encoder"]
    elif mode:
        warnings.warn(
            f"export.quantize={mode}: the exported layers are already integer products (nothing for ONNX "
            f"Runtime to quantize); onnx/model.onnx is the file to deploy",
            stacklevel=2,
        )
    if recipe.export.peer is False:
        return []
    files = {PEER: one_call_int8(teacher, out / "peer"), **files}
    result.files["peer"] = out / "peer"
    return compare_files(teacher, files, held_out[0], evaluate.metrics, teacher_stage=stages[0])
