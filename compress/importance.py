"""Importance for Prune: torch-pruning's dependency graph, the prunable units on it, and their channels' scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from compress.pipeline import Context
from compress.prune_shapes import STACKS, block_shapes
from model.losses import LABEL_KEYS
from model.transformer import MODEL_INPUTS, Transformer


@dataclass(frozen=True)
class Unit:
    """One prunable structure: the tp group rooted at `root`'s output channels.

    key: the module path ("encoder.blocks.0.self_attn", "decoder.blocks.1.ffn", "embeddings"
    for the hidden width, "pooler"); stack and block locate a layer's units. head_dim > 0
    marks attention (whole heads of head_dim channels). expected: the (module, output side?)
    pairs tp's group must hold exactly, or None to trust the graph (the hidden width: the
    strict rebuild checks it).
    """

    key: str
    root: nn.Module
    fn: Callable
    head_dim: int = 0
    expected: frozenset | None = None
    stack: str | None = None
    block: int = 0


def prunable_units(model: Transformer) -> list[Unit]:
    """Every prunable structure of the model, in a fixed order."""
    units = []
    for name in STACKS:
        stack = getattr(model, name)
        if stack is None:
            continue
        shapes = block_shapes(model.config, name)
        for b, block in enumerate(stack.blocks):
            for attn_name in ("self_attn", "cross_attn"):
                attn = getattr(block, attn_name)
                if attn is not None:
                    expected = {(attn.q_proj, True), (attn.k_proj, True), (attn.v_proj, True), (attn.out_proj, False)}
                    units.append(
                        Unit(
                            f"{name}.blocks.{b}.{attn_name}",
                            attn.q_proj,
                            tp.prune_linear_out_channels,
                            shapes[b].head_dim,
                            frozenset(expected),
                            name,
                            b,
                        )
                    )
            # A gated FFN (T5 v1.1) multiplies gate and up channel by channel: tp couples their rows with down's columns.
            expected = {(block.ffn.up, True), (block.ffn.down, False)}
            if block.ffn.gate is not None:
                expected.add((block.ffn.gate, True))
            units.append(
                Unit(
                    f"{name}.blocks.{b}.ffn",
                    block.ffn.up,
                    tp.prune_linear_out_channels,
                    expected=frozenset(expected),
                    stack=name,
                    block=b,
                )
            )
    units.append(_width_unit(model))
    if model.pooler is not None:
        readers = {(model.heads[h], False) for h in ("pair", "classify") if h in model.heads}
        units.append(
            Unit(
                "pooler",
                model.pooler.dense,
                tp.prune_linear_out_channels,
                expected=frozenset({(model.pooler.dense, True), *readers}),
            )
        )
    return units


def _width_unit(model: Transformer) -> Unit:
    """The hidden width's unit, rooted at the embedding norm, or (Marian, T5: none) at the word table's output."""
    emb = model.embeddings
    if emb.norm is not None:
        return Unit("embeddings", emb.norm, tp.prune_layernorm_out_channels)
    if emb.word_proj is not None:
        return Unit("embeddings", emb.word_proj, tp.prune_linear_out_channels)
    return Unit("embeddings", emb.word, tp.prune_embedding_out_channels)


def dependency_graph(model: Transformer) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced on a small fixed batch.

    The tied output layers are the one coupling tp reads wrongly: to it `h @ word.weight.T`
    is an element-wise op, which would couple the vocabulary-sized head biases with hidden
    channels. So the trace ends where tp reads right (hidden states, decoder hidden states,
    the pooled heads' logits) and the MLM head's unembedding is stood in for by `x + h`: the
    tie multiplies channel i of the head's features with hidden channel i of the embeddings,
    exactly the coupling an element-wise add declares. The tied LM head needs no stand-in: it
    reads the decoder's hidden states, which are already in the hidden group; an untied one's
    own matrix is traced on them.
    """
    config = model.config
    steps = min(8, config.max_positions)
    ids = torch.arange(2 * steps, device=next(model.parameters()).device).view(2, steps) % config.vocab_size
    if config.classify_pooling == "eos":  # BART's classifier reads each row's last eos token
        ids[:, -1] = config.eos_id
    batch = {"input_ids": ids, **({"decoder_input_ids": ids} if model.decoder is not None else {})}

    def forward(m: Transformer, inputs: dict) -> list[torch.Tensor]:
        out = m(**inputs)
        traced = [out.hidden_states, out.decoder_hidden_states]
        traced += [logits for head, logits in out.head_logits.items() if head not in ("mlm", "lm")]
        if "lm" in m.heads and m.heads["lm"].out is not None:  # an untied LM head reads the width through its matrix
            traced.append(m.heads["lm"].out(out.decoder_hidden_states))
        if "mlm" in m.heads:
            mlm = m.heads["mlm"]
            traced.append(mlm.norm(mlm.act(mlm.transform(out.hidden_states))) + out.hidden_states)
        return [t for t in traced if t is not None]

    with torch.enable_grad():  # tp traces through autograd's graph
        # verbose=False: tp would warn about the head biases it sees as loose parameters; the trace never reaches them.
        return tp.DependencyGraph().build_dependency(model, example_inputs=batch, forward_fn=forward, verbose=False)


def _full_group(graph: tp.DependencyGraph, unit: Unit) -> tp.Group:
    """The unit's group over all its channels, checked against what the architecture says it must couple."""
    width = graph.get_out_channels(unit.root)
    group = graph.get_pruning_group(unit.root, unit.fn, list(range(width)))
    if unit.expected is not None:
        found = {
            (dep.target.module, graph.is_out_channel_pruning_fn(dep.handler))
            for dep, _ in group
            if isinstance(dep.target.module, (nn.Linear, nn.LayerNorm, nn.Embedding))
        }
        if found != unit.expected:
            names = {m: n for n, m in graph.model.named_modules()}

            def show(pairs: set) -> list[str]:
                return sorted(f"{names.get(m, m)}:{'out' if out else 'in'}" for m, out in pairs)

            raise RuntimeError(
                f"torch-pruning traced {unit.key} as coupling {show(found)}, expected {show(unit.expected)}; "
                f"pruning it would break the model"
            )
    return group


def channel_scores(
    model: Transformer,
    graph: tp.DependencyGraph,
    units: list[Unit],
    ctx: Context,
    importance: str,
    batches: int,
) -> dict[str, torch.Tensor]:
    """Per-channel importance of every unit (summed over the coupled weights of its tp group).

    Args:
        model: the model the graph was traced on.
        graph: its dependency graph (`dependency_graph(model)`).
        units: the units to score.
        ctx: the pipeline context; its data and seed feed "taylor".
        importance: "magnitude" or "taylor" (see `Prune`).
        batches: how many ctx batches "taylor" reads.
    """
    groups = {u.key: _full_group(graph, u) for u in units}
    if importance == "magnitude":
        scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
        return {key: scorer(group) for key, group in groups.items()}
    data = ctx.batches(batches)
    scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    generator = torch.Generator().manual_seed(ctx.seed)
    totals: dict[str, torch.Tensor] = {}
    for batch in tqdm(data, desc="Prune: Taylor importance", leave=False):
        model.zero_grad(set_to_none=True)
        _taylor_loss(model, batch, generator).backward()
        for p in model.parameters():  # weights the loss does not reach (an unused head) score zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # |w * g| per batch, then summed: gradients of different batches must not cancel.
        for key, group in groups.items():
            totals[key] = totals.get(key, 0) + scorer(group)
    model.zero_grad(set_to_none=True)
    return totals


def _taylor_loss(model: Transformer, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """The loss whose gradients Taylor importance reads.

    With labels for the model's heads: the model's own task loss. Without labels: a random
    projection <out, u> of every output (hidden states, decoder hidden states, head logits),
    u ~ N(0, I) drawn per batch. Then E|w * dL/dw| is proportional to how much removing w
    changes the outputs to first order. (The MSE to the teacher's hidden states would not
    do: while the model still equals the teacher, that loss sits at its minimum and every
    gradient is zero.) A decoder with no decoder_input_ids reads the encoder's input ids.
    """
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    labels = {k: batch[k].to(device) for k, head in LABEL_KEYS.items() if k in batch and head in model.config.heads}
    if labels:
        return model(**inputs, **labels).loss
    if model.decoder is not None and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = inputs["input_ids"]
        if "attention_mask" in inputs:
            inputs["decoder_attention_mask"] = inputs["attention_mask"]
    out = model(**inputs)
    outputs = [out.hidden_states, out.decoder_hidden_states, *out.head_logits.values()]
    loss = 0.0
    for t in (t for t in outputs if t is not None):
        u = torch.randn(t.shape, generator=generator).to(t)
        loss = loss + (t * u).sum() / t.numel() ** 0.5
    return loss


def lowest(scores: torch.Tensor, n: int, head_dim: int) -> list[int]:
    """Indices of the `n` least important channels, or of the `n` least important whole heads' channels."""
    if head_dim:
        heads = torch.argsort(scores.view(-1, head_dim).sum(1), stable=True)[:n]
        return sorted(int(h) * head_dim + d for h in heads for d in range(head_dim))
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:n])
