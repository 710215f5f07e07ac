"""export_onnx(): a flashlite model to ONNX graphs with exact attention and integer weights, verified against PyTorch.

Why torch's dynamo exporter (torch.export + onnxscript) rather than the TorchScript one: on
torch 2.13 it is the maintained path, it records dynamic batch and sequence axes as symbols
with the ranges we give (sequence <= max_positions) instead of tracing Python control flow
on one example shape, and its translation table lets quantized layers become
DequantizeLinear / MatMulInteger nodes on integer initializers.

What is exported (see model/onnx/runtime.py for the file layout):
  encoder graph  inputs input_ids, attention_mask (B,T) int64 [, token_type_ids when the model
                 has token types]; outputs hidden_states (B,T,dim) and `<head>_logits` for every
                 head that reads the encoder (mlm, pair, classify, qa), in config order
  decoder graph  inputs decoder_input_ids (B,S) int64, encoder_hidden_states (B,T,dim) fp32,
                 encoder_attention_mask (B,T) int64; outputs decoder_hidden_states and, with
                 an 'lm' head, lm_logits. Causal masking only: decoder padding goes on the right.
Attention is always torch's exact scaled_dot_product_attention, whatever backend the model
runs with; weights are fp32 (half-precision models are exported in fp32). A block shared by
several layers is one module, so its weights are one set of initializers.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript
import torch
from torch import nn

from model.config import check_int
from model.onnx.export_ops import TRANSLATIONS, has_dynamic, needs_blocks, should_fold, swap_for_export
from model.onnx.runtime import DECODER_INPUTS, OrtModel, graph_metadata, graph_paths
from model.transformer import Transformer

OPSET = 21  # the first opset with 4-bit and blocked DequantizeLinear (group-quantized layers need it)
MAX_OPSET = 23
TASKS = ("encoder", "seq2seq")
PARITY_BATCHES = (1, 3)
PARITY_LENGTHS = (8, 33)  # plus one near max_positions (capped by `max_len`)
TWO_GB = 2**31
DYNAMIC_RTOL = 1e-2  # see check_parity


class ParityError(ValueError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class Exported:
    """What `export_onnx` wrote and measured.

    paths: graph name ("encoder", "decoder") -> file. bytes: file -> size on disk (with its
    external data). parity: output name -> max abs difference ONNX Runtime vs PyTorch over
    every checked shape (empty with verify=False). shapes: the (batch, seq) pairs checked.
    """

    paths: dict[str, Path]
    bytes: dict[str, int]
    parity: dict[str, float] = field(default_factory=dict)
    shapes: list[tuple[int, int]] = field(default_factory=list)


class _EncoderGraph(nn.Module):
    """Embeddings, encoder stack and the encoder's heads, without the eager input checks (they are data-dependent)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.heads = [h for h in model.config.heads if h != "lm"]

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = self.model
        h, _, _ = m.encoder(m.embeddings(input_ids, token_type_ids), attention_mask.bool(), backend="sdpa")
        pooled = m.pooler(h) if m.pooler is not None else None
        # The same head inputs as Transformer.forward; the parity check compares against it.
        inputs = {"mlm": (h, m.embeddings), "qa": (h,), "pair": (pooled,), "classify": (pooled,)}
        return (h, *(m.heads[name](*inputs[name]) for name in self.heads))


class _DecoderGraph(nn.Module):
    """Decoder stack (causal self-attention, cross-attention to the encoder output) and the LM head."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        m = self.model
        y, _, _ = m.decoder(
            m.embeddings(decoder_input_ids),
            None,
            causal=True,
            memory=encoder_hidden_states,
            memory_mask=encoder_attention_mask.bool(),
            backend="sdpa",
        )
        return (y, m.heads["lm"](y, m.embeddings)) if "lm" in m.heads else (y,)


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
) -> Exported:
    """Export `model` to ONNX, check every file with onnx.checker (full check) and, by default, against PyTorch.

    model: a Transformer (any attention backend, shared/factorized/pruned/quantized; not modified).
    path: `NAME.onnx` (a decoder graph goes to `NAME.decoder.onnx` beside it) or a folder
      (`model.onnx` in it); parent folders are created. Files appear only once checked and verified.
    task: "encoder" (one graph: hidden states + encoder heads) or "seq2seq" (encoder and decoder
      graphs; needs decoder layers); None picks "seq2seq" when the model has a decoder.
    opset: ONNX opset, 18..23 (21+ when the model has int4 or group-quantized int8 layers); default 21.
    verify: run ONNX Runtime against PyTorch at batch {1,3} x seq {8, 33, min(max_positions,
      max_len)} with padded rows; any output off by more than `atol` raises ParityError naming it
      (models with int8-dynamic layers: see `check_parity`).
    external_data: True writes weights to `NAME.onnx.data` beside each graph; None does so only
      when the weights exceed 2 GB; False never (a model over 2 GB is then refused).
    Returns an `Exported` with the paths, file sizes and the measured differences.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"export_onnx takes a model.Transformer, got {type(model).__name__}")
    task = _check_task(model, task)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [18, {MAX_OPSET}], got {opset!r}")
    check_int("max_len", max_len, 2)
    if not (isinstance(atol, (int, float)) and atol > 0):
        raise ValueError(f"atol must be a positive number, got {atol!r}")
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

    graph_model = _fp32_copy(model)
    swap_for_export(graph_model)
    final = graph_paths(path)
    final["encoder"].parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final["encoder"].parent, prefix=".export-"))
    try:
        staged = graph_paths(staging / final["encoder"].name)
        graphs = {"encoder": _EncoderGraph(graph_model)}
        if task == "seq2seq":
            graphs["decoder"] = _DecoderGraph(graph_model)
        for name, graph in graphs.items():
            proto = _trace(graph, name, opset)
            _write(proto, staged[name], external_data)
        report = Exported(paths={}, bytes={})
        if verify:
            report.parity, report.shapes = check_parity(model, staged["encoder"], atol=atol, max_len=max_len)
        for name in graphs:
            report.paths[name] = publish(staged[name], final[name])
            report.bytes[str(report.paths[name])] = size_with_data(report.paths[name])
        if task == "encoder":  # a decoder left by an earlier export would be picked up by OrtModel
            _remove_graph(final["decoder"])
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_task(model: Transformer, task: str | None) -> str:
    if task is None:
        return "seq2seq" if model.decoder is not None else "encoder"
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (or None), got {task!r}")
    if task == "seq2seq" and model.decoder is None:
        raise ValueError("task='seq2seq' needs decoder layers; this model is encoder-only (decoder=[])")
    return task


def _fp32_copy(model: Transformer) -> Transformer:
    """An fp32, eval-mode copy with exact attention; the tokenizer is not copied (the graph does not need it)."""
    copied = copy.deepcopy(model, memo={id(model.tokenizer): None})
    copied.attention_backend = "sdpa"
    return copied.float().eval().requires_grad_(False)


def _example(model: Transformer, graph: str) -> tuple[tuple[torch.Tensor, ...], dict, list[str], list[str]]:
    """Example inputs (batch 2, not 0/1 so the exporter keeps axes symbolic), dynamic shapes, input and output names."""
    config = model.config
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=config.max_positions)
    length = min(9, config.max_positions)
    ids = torch.randint(0, config.vocab_size, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2 + 1 :] = 0
    if graph == "encoder":
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if config.type_vocab_size else [])
        args = (ids, mask, torch.zeros_like(ids))[: len(names)]
        outputs = ["hidden_states"] + [f"{h}_logits" for h in config.heads if h != "lm"]
        return args, {n: {0: batch, 1: seq} for n in names}, names, outputs
    decoder_seq = torch.export.Dim("decoder_sequence", max=config.max_positions)
    dec = ids[:, : max(2, length - 2)]
    memory = torch.randn(2, length, config.dim)
    shapes = {
        "decoder_input_ids": {0: batch, 1: decoder_seq},
        "encoder_hidden_states": {0: batch, 1: seq},
        "encoder_attention_mask": {0: batch, 1: seq},
    }
    outputs = ["decoder_hidden_states"] + (["lm_logits"] if "lm" in config.heads else [])
    return (dec, memory, mask), shapes, list(DECODER_INPUTS), outputs


def _trace(graph: nn.Module, name: str, opset: int) -> ir.Model:
    """Run torch's dynamo exporter on one graph wrapper and optimize the result; returns the onnx_ir Model."""
    args, shapes, inputs, outputs = _example(graph.model, name)
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


def publish(staged: Path, final: Path) -> Path:
    """Move a checked graph (data file first, then the graph that names it) into place; drop a stale data file."""
    data = staged.with_name(staged.name + ".data")
    final_data = final.with_name(final.name + ".data")
    had_data = data.exists()
    if had_data:
        os.replace(data, final_data)
    os.replace(staged, final)
    if not had_data and final_data.exists():  # left by an earlier export; the new graph holds its weights
        final_data.unlink()
    return final


def _remove_graph(path: Path) -> None:
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()


def size_with_data(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def parity_batches(config, max_len: int) -> list[dict[str, torch.Tensor]]:
    """The padded batches the parity check runs: batch {1,3} x seq {8, 33, min(max_positions, max_len)}.

    Row lengths T, T//2+1 and T-3 (so batch 3 mixes padding amounts); token types switch to 1
    halfway when the model has two or more; decoder inputs (for encoder-decoder models) are
    the encoder ids. Seeded, so every export checks the same numbers.
    """
    generator = torch.Generator().manual_seed(0)
    lengths = sorted({min(t, config.max_positions) for t in (*PARITY_LENGTHS, min(config.max_positions, max_len))})
    batches = []
    for b in PARITY_BATCHES:
        for t in lengths:
            ids = torch.randint(0, config.vocab_size, (b, t), generator=generator)
            mask = torch.zeros_like(ids)
            for row, n in enumerate((t, t // 2 + 1, max(1, t - 3))[:b]):
                mask[row, :n] = 1
            batch = {"input_ids": ids, "attention_mask": mask}
            if config.type_vocab_size >= 2:
                types = torch.zeros_like(ids)
                types[:, t // 2 :] = 1
                batch["token_type_ids"] = types
            if config.decoder:
                batch["decoder_input_ids"] = ids
            batches.append(batch)
    return batches


@torch.no_grad()
def check_parity(
    model: Transformer, path: str | os.PathLike, *, atol: float = 1e-4, max_len: int = 256
) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """Compare ONNX Runtime on the export at `path` with `model` (fp32, exact attention) on `parity_batches`.

    Returns (output name -> max abs difference over all batches, the (batch, seq) shapes run).
    Raises ParityError naming the first output off by more than `atol`. Models with int8-dynamic
    layers round activations to int8 at run time, where a 1e-7 difference upstream can round one
    value the other way and move an output by a quantization step; they are held to
    max(atol, 1e-2 * max|output|) instead.
    """
    reference = _fp32_copy(model)
    runner = OrtModel(path)
    rtol = DYNAMIC_RTOL if has_dynamic(reference) else 0.0
    worst: dict[str, float] = {}
    shapes = []
    for batch in parity_batches(reference.config, max_len):
        if runner.decoder is None:
            batch.pop("decoder_input_ids", None)
        expected, got = reference(**batch), runner(batch)
        shape = tuple(batch["input_ids"].shape)
        shapes.append(shape)
        for name, want, have in output_pairs(expected, got):
            diff = float((want - have).abs().max())
            allowed = max(atol, rtol * float(want.abs().max()))
            if not np.isfinite(diff) or diff > allowed:
                raise ParityError(
                    f"ONNX Runtime output {name} differs from PyTorch by {diff:.3g} (allowed {allowed:.3g}) at batch x seq {shape}"
                )
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst, shapes


def output_pairs(expected, got):
    """(output name, PyTorch value, ONNX Runtime value) for every output both produced."""
    yield "hidden_states", expected.hidden_states, got.hidden_states
    if got.decoder_hidden_states is not None:
        yield "decoder_hidden_states", expected.decoder_hidden_states, got.decoder_hidden_states
    for head, value in got.head_logits.items():
        yield f"{head}_logits", expected.head_logits[head], value
