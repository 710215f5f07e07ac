"""export_onnx(): a flashlite model to a deployable ONNX folder (or one graph file), with exact attention and integer weights, verified against PyTorch.

Why torch's dynamo exporter (torch.export + onnxscript) rather than the TorchScript one: on
torch 2.13 it is the maintained path, it records dynamic batch and sequence axes as symbols
with the ranges we give (sequence <= max_positions) instead of tracing Python control flow
on one example shape, and its translation table lets quantized layers become
DequantizeLinear / MatMulInteger nodes on integer initializers.

What is exported (model/onnx/layout.py has the folder's files):
  encoder graph  inputs input_ids, attention_mask (B,T) int64 [, token_type_ids when the model
                 has token types]; outputs last_hidden_state (B,T,dim), then each head that reads
                 the encoder with Hugging Face's names (`layout.head_outputs`: logits, or
                 start_logits/end_logits for qa), then, for sentence-embedding exports,
                 sentence_embedding (B,dim): mean over the mask's tokens, L2-normalized.
  decoder graph  inputs decoder_input_ids (B,S) int64, encoder_hidden_states (B,T,dim) fp32,
                 encoder_attention_mask (B,T) int64; outputs decoder_hidden_states and, with
                 an 'lm' head, lm_logits and every layer's self- and cross-attention keys and
                 values (present.*). Causal masking only: decoder padding goes on the right.
  decoder with past (with an 'lm' head) one decoding step over the keys and values of the steps
                 before (past_key_values.*): what `OrtModel.generate` runs after the first step.
Why two decoder graphs (Optimum's non-merged layout) rather than one merged graph with a
use-cache switch: each is a plain trace of the model's own decoder code, with no If node and
no empty (length 0) past; the price is the decoder's weights stored twice. The cross-attention
keys and values are computed once, by the first step. Names and shapes: model/onnx/layout.py.
Attention is always torch's exact scaled_dot_product_attention, whatever backend the model
runs with; weights are fp32 (half-precision models are exported in fp32). A block shared by
several layers is one module, so its weights are one set of initializers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript
import torch
from torch import nn

from model.config import check_int
from model.onnx import layout
from model.onnx.decoder_graphs import DecoderGraph, DecoderWithPastGraph, decoder_example, example_axes, has_cache
from model.onnx.export_ops import TRANSLATIONS, needs_blocks, should_fold, swap_for_export
from model.onnx.hub_files import write_side_files
from model.onnx.layout import TWO_GB, graph_paths, publish, remove_graph, size_with_data
from model.onnx.ort_quantize import MODES, NothingToQuantize, quantize_onnx
from model.onnx.parity import ParityError, check_parity, fp32_copy, sentence_embedding
from model.onnx.residual_sum import keep_norms_unfused
from model.onnx.runtime import graph_metadata
from model.transformer import Transformer

__all__ = ["Exported", "ParityError", "check_parity", "export_onnx", "sentence_embedding"]

OPSET = 21  # the first opset with 4-bit and blocked DequantizeLinear (group-quantized layers need it)
MAX_OPSET = 23
TASKS = ("encoder", "seq2seq")


@dataclass
class Exported:
    """What `export_onnx` wrote and measured.

    paths: graph name ("encoder", "decoder", "decoder_with_past") -> file. bytes: file -> size on
    disk (with its external data). parity: output -> max abs difference ONNX Runtime vs PyTorch
    over every checked shape, by the PyTorch Output's names (hidden_states, HEAD_logits),
    sentence_embedding and cached_lm_logits (the with-past step; empty with verify=False). shapes: the (batch, seq) pairs checked.
    folder: the deployable folder (None for a single-file export). quantized: ONNX Runtime mode
    -> its `Quantized` report; skipped: mode -> why ONNX Runtime had nothing to quantize.
    """

    paths: dict[str, Path]
    bytes: dict[str, int]
    parity: dict[str, float] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    folder: Path | None = None
    quantized: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class _EncoderGraph(nn.Module):
    """Embeddings, encoder stack and the encoder's heads, without the eager input checks (they are data-dependent)."""

    def __init__(self, model: Transformer, sentence_embedding: bool = False):
        super().__init__()
        self.model = model
        self.heads = [h for h in model.config.heads if h != "lm"]
        self.sentence_embedding = sentence_embedding

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = self.model
        h, _, _ = m.encoder(m.embeddings(input_ids, token_type_ids), attention_mask.bool(), backend="sdpa")
        pooled = m.pooler(h) if m.pooler is not None else None
        # The same head inputs as Transformer.forward; the parity check compares against it.
        inputs = {"mlm": (h, m.embeddings), "qa": (h,), "pair": (pooled,), "classify": (pooled,)}
        outputs = [h]
        for name in self.heads:
            logits = m.heads[name](*inputs[name])
            outputs += [logits[..., 0], logits[..., 1]] if name == "qa" else [logits]  # qa: start, end
        if self.sentence_embedding:
            outputs.append(sentence_embedding(h, attention_mask))
        return tuple(outputs)


def export_onnx(
    model: Transformer,
    path: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int = OPSET,
    verify: bool = True,
    atol: float = 1e-4,
    max_len: int = 256,
    external_data: bool | None = None,
    sentence_embedding: bool = False,
    quantize: Sequence[str] = (),
    calibration: Sequence[Mapping[str, Any]] | None = None,
    stages: Sequence[Mapping[str, Any]] | None = None,
    labels: Sequence[str] | None = None,
    model_type: str | None = None,
    unfuse_norms: bool = True,
) -> Exported:
    """Export `model` to ONNX, check every file with onnx.checker (full check) and, by default, against PyTorch.

    model: a Transformer (any attention backend, shared/factorized/pruned/quantized; not modified);
      not yet an eos-pooled classifier (BART's sequence classifier: `check_exportable` refuses it).
    path: a folder: the deployable folder (model/onnx/layout.py: graphs, config.json, tokenizer
      files, model card, manifest); or `NAME.onnx`: the graph alone (a decoder graph goes to
      `NAME.decoder.onnx` and `NAME.decoder_with_past.onnx` beside it). Parent folders are created. Files appear only once all are
      written, checked and verified; on any failure nothing is written.
    task: "encoder" (one graph: hidden states + encoder heads) or "seq2seq" (encoder and decoder
      graphs, and with an 'lm' head the decoder with past keys/values; needs decoder layers); None picks "seq2seq" when the model has a decoder.
    opset: ONNX opset, 18..23 (21+ when the model has int4 or group-quantized int8 layers); default 21.
    verify: run ONNX Runtime against PyTorch at batch {1,3} x seq {8, 33, min(max_positions,
      max_len)} with padded rows, the cached decoder's logits at several past lengths too; any
      output off by more than `atol` raises ParityError naming it (models with int8-dynamic
      layers: see `check_parity`).
    external_data: True writes weights to `NAME.onnx.data` beside each graph; None does so only
      when the weights exceed 2 GB; False never (a model over 2 GB is then refused).
    sentence_embedding: add the output sentence_embedding (mean pooling + L2 normalization in the
      graph) and, for a folder, the sentence-transformers layout (graphs under onnx/).
    quantize: ONNX Runtime modes (quantize_onnx) whose files join the folder (`layout.variant_name`);
      a mode with nothing left to quantize (the layers are already integer products) is skipped
      and named in `Exported.skipped`. calibration: batches for "int8-static".
    stages, labels, model_type: for the folder's model card (the pipeline manifest's "stages"),
      config.json's id2label (class names) and its model_type (None: `hub_files.family_of`).
    unfuse_norms: residual additions before layer norms as `Sum`, which ONNX Runtime's CPU
      provider leaves unfused (model/onnx/residual_sum.py); False keeps the plain `Add` that it
      fuses into its slower SkipLayerNormalization (what other exporters write).
    Returns an `Exported` with the paths, file sizes and the measured differences.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"export_onnx takes a model.Transformer, got {type(model).__name__}")
    check_exportable(model)
    task = _check_task(model, task)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [18, {MAX_OPSET}], got {opset!r}")
    check_int("max_len", max_len, 2)
    if not (isinstance(atol, (int, float)) and atol > 0):
        raise ValueError(f"atol must be a positive number, got {atol!r}")
    if not isinstance(unfuse_norms, bool):
        raise TypeError(f"unfuse_norms must be True or False, got {unfuse_norms!r}")
    if external_data not in (None, True, False):
        raise ValueError(f"external_data must be None, True or False, got {external_data!r}")
    if model.config.max_positions < 2:
        raise ValueError(
            f"max_positions is {model.config.max_positions}; a dynamic sequence axis needs room for 2 tokens"
        )
    if needs_blocks(model) and opset < 21:
        raise ValueError(
            f"the model has int4 or group-quantized int8 layers: blocked DequantizeLinear needs opset >= 21, got {opset}"
        )
    quantize = _check_quantize(quantize, Path(path))

    graph_model = fp32_copy(model)
    swap_for_export(graph_model)
    folder = None if Path(path).suffix == ".onnx" else Path(path)
    if folder is None:
        final = graph_paths(path)
    else:
        final = graph_paths(folder / (f"{layout.SENTENCE_DIR}/" if sentence_embedding else "") / layout.GRAPH)
    root = folder or final["encoder"].parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".export-"))
    try:
        staged = {name: staging / p.relative_to(root) for name, p in final.items()}
        staged["encoder"].parent.mkdir(parents=True, exist_ok=True)
        graphs = {"encoder": _EncoderGraph(graph_model, sentence_embedding)}
        if task == "seq2seq":
            graphs["decoder"] = DecoderGraph(graph_model)
            if has_cache(graph_model):
                graphs["decoder_with_past"] = DecoderWithPastGraph(graph_model)
        for name, graph in graphs.items():
            proto = _trace(graph, name, opset, unfuse_norms)
            _write(proto, staged[name], external_data)
        report = Exported(paths={}, bytes={}, folder=folder)
        if verify:
            report.parity, report.shapes = check_parity(model, staged["encoder"], atol=atol, max_len=max_len)
        written = _quantized_variants(report, staged["encoder"], staging, quantize, calibration)
        if folder is not None:
            hf = write_side_files(
                staging,
                model,
                graph=final["encoder"].relative_to(root).as_posix(),
                outputs=[o.name for o in onnx.load(str(staged["encoder"]), load_external_data=False).graph.output],
                variants=written,
                stages=stages,
                parity=report.parity,
                sentence=sentence_embedding,
                labels=labels,
                model_type=model_type,
            )
            _write_manifest(staging, model, hf)
        for name in graphs:
            report.paths[name] = publish(staged[name], final[name])
            report.bytes[str(report.paths[name])] = size_with_data(report.paths[name])
        for name in set(final) - set(graphs):  # a decoder left by an earlier export would be picked up by OrtModel
            remove_graph(final[name])
        for quantized in report.quantized.values():
            quantized.paths = {n: publish(p, root / p.relative_to(staging)) for n, p in quantized.paths.items()}
            quantized.bytes = {str(p): size_with_data(p) for p in quantized.paths.values()}
        if folder is not None:
            _publish_folder(staging, folder)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_quantize(quantize: Sequence[str] | str, path: Path) -> tuple[str, ...]:
    modes = (quantize,) if isinstance(quantize, str) else tuple(quantize)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"quantize modes must be among {', '.join(MODES)}; got {unknown}")
    if modes and path.suffix == ".onnx":
        raise ValueError("quantize= writes the variants into an export folder; give a folder, not a .onnx file")
    return tuple(dict.fromkeys(modes))


def _quantized_variants(
    report: Exported,
    graph: Path,
    staging: Path,
    modes: tuple[str, ...],
    calibration: Sequence[Mapping[str, Any]] | None,
) -> dict[str, str]:
    """Quantize the staged graph into the staging folder for each mode; returns mode -> the file's name in the folder."""
    sentence = graph.parent.name == layout.SENTENCE_DIR
    written = {}
    for mode in modes:
        name = layout.variant_name(mode, sentence)
        try:
            batches = calibration if mode == "int8-static" else None
            report.quantized[mode] = quantize_onnx(graph, staging / name, mode, calibration=batches)
        except NothingToQuantize as err:
            report.skipped[mode] = str(err)
            continue
        written[mode] = name
    return written


def _write_manifest(staging: Path, model: Transformer, hf: Mapping[str, Any]) -> None:
    """manifest.json over every staged file (written last, so an interrupted publish shows as a mismatch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        flashlite = version("flashlite")
    except PackageNotFoundError:
        flashlite = "unknown"
    files = [
        p.relative_to(staging).as_posix()
        for p in sorted(staging.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]
    extra = {
        "flashlite_version": flashlite,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "model_type": hf["model_type"],
    }
    (staging / layout.MANIFEST).write_text(layout.manifest(staging, files, extra), encoding="utf-8")


def _publish_folder(staging: Path, folder: Path) -> None:
    """Move the staged side files into `folder` (manifest.json last); drop the files an earlier export listed that this one did not write."""
    old = folder / layout.MANIFEST
    try:
        stale = set(json.loads(old.read_text(encoding="utf-8"))["files"]) if old.is_file() else set()
    except (ValueError, KeyError, TypeError):
        stale = set()
    names = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    names = [n for n in names if n != layout.MANIFEST and not Path(n).name.startswith(".")] + [layout.MANIFEST]
    for name in names:  # the graphs are in place already
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    for name in stale - set(names):
        target = folder / name
        if target.is_file() and target.resolve().is_relative_to(folder.resolve()):
            target.unlink()


def check_exportable(model: Transformer) -> None:
    """Refuse, before any work, a model whose outputs the ONNX graphs cannot compute yet.

    An eos-pooled classifier (Config.classify_pooling="eos", BART's sequence classifier) pools
    the decoder's state at each row's last eos token; the encoder graph pools the first token.
    """
    if model.config.classify_pooling == "eos":
        raise ValueError(
            "export_onnx does not support eos-pooled classifiers yet (classify_pooling='eos': "
            "BartForSequenceClassification, whose 'classify' head reads the "
            "decoder at the last eos token); encoder-decoders export with their other heads: the base model "
            "(BartModel) or the 'lm' head (BartForConditionalGeneration, with cached generate())"
        )


def _check_task(model: Transformer, task: str | None) -> str:
    if task is None:
        return "seq2seq" if model.decoder is not None else "encoder"
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (or None), got {task!r}")
    if task == "seq2seq" and model.decoder is None:
        raise ValueError("task='seq2seq' needs decoder layers; this model is encoder-only (decoder=[])")
    return task


def _example(
    model: Transformer, graph: str, graph_sentence: bool = False
) -> tuple[tuple[torch.Tensor, ...], dict, list[str], list[str]]:
    """Example inputs (batch 2, not 0/1 so the exporter keeps axes symbolic), dynamic shapes, input and output names."""
    if graph != "encoder":
        return decoder_example(model, graph)
    config = model.config
    batch, seq, mask = example_axes(config)
    ids = torch.randint(0, config.vocab_size, mask.shape)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if config.type_vocab_size else [])
    args = (ids, mask, torch.zeros_like(ids))[: len(names)]
    outputs = layout.encoder_outputs(config.heads, graph_sentence)
    return args, {n: {0: batch, 1: seq} for n in names}, names, outputs


def _trace(graph: nn.Module, name: str, opset: int, unfuse_norms: bool) -> ir.Model:
    """Run torch's dynamo exporter on one graph wrapper and optimize the result; returns the onnx_ir Model."""
    sentence = isinstance(graph, _EncoderGraph) and graph.sentence_embedding
    args, shapes, inputs, outputs = _example(graph.model, name, sentence)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    with warnings.catch_warnings():
        # The exporter narrates its steps, repeats upstream deprecations and logs the torchvision
        # ops it skips; failures still raise.
        warnings.simplefilter("ignore")
        registration.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                custom_translation_table=TRANSLATIONS,
                optimize=False,
                verbose=False,
                report=False,
            )
        finally:
            registration.setLevel(level)
    ir_model = program.model
    # torch's own optimize() with two changes: `should_fold` (integer weights stay integer, Linear
    # weights are stored transposed), and common subexpressions merged first, so that a shared
    # block's Transpose(W), traced once per layer, is one node: folding a weight's only use does
    # not grow the file, and the optimizer's size limit lets it happen.
    ir_passes.CommonSubexpressionEliminationPass()(ir_model)
    onnxscript.optimizer.optimize_ir(ir_model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(ir_model)
    if unfuse_norms:
        keep_norms_unfused(ir_model)
    # Equal initializers (left by folding, or equal by chance) are stored once.
    ir_passes.DeduplicateInitializersPass(size_limit=TWO_GB)(ir_model)
    # The exporter annotates every node with its Python stack trace: local paths, and a third
    # of a small model's file. The graph does not need them.
    for node in ir.traversal.RecursiveGraphIterator(ir_model.graph):
        node.metadata_props.clear()
        node.doc_string = None
    ir_model.producer_name, ir_model.doc_string = "flashlite", f"flashlite {name} graph"
    ir_model.metadata_props.update(graph_metadata(graph.model.config, name))
    return ir_model


def _write(model: ir.Model, path: Path, external_data: bool | None) -> None:
    """Save one graph (weights inside, or in `NAME.onnx.data` beside it) and run the full ONNX check on the file."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external_data is False and weights >= TWO_GB:
        raise ValueError(
            f"the weights take {weights} bytes, over protobuf's 2 GB limit; use external_data=True or None"
        )
    use_external = bool(external_data) or (external_data is None and weights >= TWO_GB)
    ir.save(model, path, external_data=f"{path.name}.data" if use_external else None)
    onnx.checker.check_model(str(path), full_check=True)
