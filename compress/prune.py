"""Prune: structured pruning of heads, FFN channels, hidden width and whole layers on torch-pruning's graph.

torch-pruning (tp) traces the model and finds every channel coupling (which q/k/v rows and
out_proj columns move together; that `dim` runs through embeddings, norms, every projection,
the heads and word_proj); its groups do the surgery and its importance classes score channels.
This file chooses how many and which channels go. tp's `BasePruner` does not fit the contract:
its iterative head pruning removes ceil(ratio * remaining heads) per step, compounding past the
target; its `round_to` rounds kept widths down, to zero if need be; it knows neither whole
layers nor parameter budgets. Heads are whole because we pick whole ranges of head_dim
channels (tp couples channel i of q, k, v and out_proj but has no notion of a head). Whole
layers are no channel coupling: dropping one edits the Config's layer list and share map.
After every step the Config is read off the pruned weights' shapes and a fresh
`Transformer(config)` loads them strictly, so Config and modules cannot drift apart.
The graph and the scores live in compress/importance.py, the shapes and the rebuild in
compress/prune_shapes.py.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from tqdm.auto import tqdm

from compress.importance import channel_scores, dependency_graph, lowest, prunable_units
from compress.latency import shape_for_latency
from compress.pipeline import Context
from compress.prune_shapes import (
    STACKS,
    block_shapes,
    kept_heads,
    kept_width,
    param_count,
    reshaped,
    tabulated_positions,
)
from model.config import Config, LayerShape
from model.transformer import Transformer

IMPORTANCES = ("magnitude", "taylor")


def _check_ratio(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) (the share removed), got {value!r}")


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Prune:
    """Structured pruning pass: `Prune(heads=0.5, ffn=0.5)(model, ctx) -> smaller model`.

    heads: fraction of attention heads removed in every layer, round(heads * n_heads) of them
        (self- and cross-attention; a head's q/k/v rows and out_proj columns go together);
        each layer keeps at least one.
    ffn: fraction of FFN channels removed in every layer (ffn.up rows + ffn.down columns, and
        ffn.gate rows of a gated FFN).
    hidden: fraction of the model width `dim` removed everywhere it couples (embeddings, norms,
        every projection, pooler, task heads, word_proj). With factorized embeddings the new
        dim may not fall below embed_dim. Sinusoid positions (Marian) become an "absolute"
        table of the same values first, so each kept channel keeps its own.
    layers: number of whole layers dropped, the least important first (see `_drop_layers`);
        each stack keeps at least one layer.
    importance: "magnitude" (squared L2 norm of the coupled weights: the same ranking as the
        L2 norm) or "taylor" (first-order Taylor |w * dL/dw| summed over the coupled weights
        and over `batches` batches of ctx data; see `compress.importance._taylor_loss` for the loss).
    steps: 1 = one shot; N = N rounds that reach the targets gradually (cumulative ratio
        k/N in round k), importance recomputed each round. Nothing is trained between rounds.
    round_to: kept FFN and hidden widths are rounded to the nearest multiple of round_to
        (never below round_to; a width already below round_to keeps at least 1).
    params: a parameter budget instead of ratios: a float in (0, 1) keeps that fraction of
        the unique parameters, an int is the target count. One ratio shared by heads and ffn
        is found by bisection: the smallest whose pruned shapes hold at most the budget, so the
        result lands below the budget by less than one step of the count (one head per
        attention plus round_to FFN channels, in every layer). Exclusive with heads, ffn,
        hidden and layers.
    latency_ms: a latency budget instead of ratios: candidate cuts (whole layers, and one
        ratio of 0, 0.25, 0.5, 0.75 for heads and one for FFN channels) are timed as deployed
        (exported, int8 by ONNX Runtime, batch 1 x seq 128, on this machine), and the largest
        that meets the budget is pruned (`compress.latency`). Exclusive with heads, ffn,
        hidden, layers and params.
    batches: how many ctx batches the Taylor importance reads.

    Per-layer ratios are uniform; which heads/channels go is ranked within each layer. A block
    shared by several layers is pruned once; Taylor scores sum over all its uses (gradients
    of shared weights accumulate). Deterministic given ctx.seed.
    """

    heads: float = 0.0
    ffn: float = 0.0
    hidden: float = 0.0
    layers: int = 0
    importance: str = "magnitude"
    steps: int = 1
    round_to: int = 8
    params: float | int | None = None
    latency_ms: float | None = None
    batches: int = 8
    restructures: ClassVar[bool] = True  # the Pipeline refuses it after a quantizing pass

    def __post_init__(self) -> None:
        for name in ("heads", "ffn", "hidden"):
            _check_ratio(name, getattr(self, name))
        _check_count("layers", self.layers, 0)
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}; got {self.importance!r}")
        _check_count("steps", self.steps, 1)
        _check_count("round_to", self.round_to, 1)
        _check_count("batches", self.batches, 1)
        if self.params is not None:
            if isinstance(self.params, bool) or not isinstance(self.params, (int, float)):
                raise TypeError(f"params must be a float in (0, 1), an int count or None; got {self.params!r}")
            if isinstance(self.params, float) and not 0.0 < self.params < 1.0:
                raise ValueError(f"params as a float is the fraction of parameters kept, in (0, 1); got {self.params}")
            if isinstance(self.params, int) and self.params < 1:
                raise ValueError(f"params as an int is the target parameter count, >= 1; got {self.params}")
            explicit = [n for n in ("heads", "ffn", "hidden", "layers") if getattr(self, n)]
            if explicit:
                raise ValueError(
                    f"params (a parameter budget) and explicit {', '.join(explicit)} are mutually exclusive; "
                    f"give one or the other"
                )

        if self.latency_ms is not None:
            if isinstance(self.latency_ms, bool) or not isinstance(self.latency_ms, (int, float)):
                raise TypeError(f"latency_ms must be a number of milliseconds or None; got {self.latency_ms!r}")
            if not (self.latency_ms > 0 and math.isfinite(self.latency_ms)):
                raise ValueError(f"latency_ms must be a positive, finite number of milliseconds, got {self.latency_ms}")
            explicit = [n for n in ("heads", "ffn", "hidden", "layers", "params") if getattr(self, n)]
            if explicit:
                raise ValueError(
                    f"latency_ms (a latency budget) and explicit {', '.join(explicit)} are mutually exclusive; "
                    f"give one or the other"
                )

    @property
    def needs_data(self) -> bool:
        """Taylor importance reads ctx data; magnitude does not."""
        return self.importance == "taylor"

    def __call__(self, model: Transformer, ctx: Context) -> Transformer:
        """Prune a copy of `model` (never modified) and return it rebuilt from its new Config."""
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a model.Transformer, got {type(model).__name__}")
        if model.config.quantized:
            modes = sorted({q.mode for q in model.config.quantized})
            raise ValueError(f"Prune needs float weights but this model stores layers as {modes}; prune before that")
        if self.needs_data and not ctx.batches(1):
            raise ValueError("Prune(importance='taylor') needs data (batches of token ids) but ctx has none")
        layers, heads, ffn = self.layers, self.heads, self.ffn
        if self.params is not None:
            heads = ffn = self._budget_ratio(model.config)
        elif self.latency_ms is not None:
            if model.config.decoder:
                raise ValueError("latency_ms times the encoder graph: it takes encoder-only models (use ratios here)")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(
                    "latency_ms under torchrun: each rank would time on its own and could choose another cut; "
                    "measure once (compress.latency.shape_for_latency) and give the ratios"
                )
            layers, heads, ffn = shape_for_latency(model.config, self.latency_ms, round_to=self.round_to)
        self._check_fits(model.config, heads, layers)

        work = copy.deepcopy(model)
        if self.hidden and model.config.positions == "sinusoidal":
            work = tabulated_positions(work)  # a sinusoid of a narrower width has other frequencies
        work.requires_grad_(True)
        # Exact attention for tracing and Taylor gradients on any device; the result gets the model's backend back.
        work.attention_backend = "reference"
        config = model.config
        origin = {name: block_shapes(config, name) for name in STACKS}  # widths the ratios refer to
        dropped = 0
        for step in tqdm(range(1, self.steps + 1), desc="Prune", disable=self.steps == 1):
            frac = step / self.steps
            n_drop = math.floor(layers * frac + 0.5) - dropped
            if n_drop:
                work, origin = self._drop_layers(work, origin, n_drop, ctx)
                dropped += n_drop
            targets = self._targets(work, origin, config.dim, heads * frac, ffn * frac, self.hidden * frac)
            work = self._prune_widths(work, targets, ctx)
        work.attention_backend = model.attention_backend
        work.tokenizer = model.tokenizer
        return work.train(model.training)

    # -- targets ---------------------------------------------------------------------------

    def _budget_ratio(self, config: Config) -> float:
        """The smallest heads+ffn ratio whose pruned shapes hold at most the `params` budget."""
        current = param_count(config)
        target = int(self.params * current) if isinstance(self.params, float) else self.params
        if target >= current:
            return 0.0

        counts: dict[tuple, int] = {}  # many ratios give the same shapes: count each shape set once

        def count(ratio: float) -> int:
            shapes = tuple(
                tuple(
                    LayerShape(kept_heads(s.n_heads, ratio), s.head_dim, kept_width(s.ffn_dim, ratio, self.round_to))
                    for s in getattr(config, name)
                )
                for name in STACKS
            )
            if shapes not in counts:
                counts[shapes] = param_count(config.replace(**dict(zip(STACKS, shapes))))
            return counts[shapes]

        low, high = 0.0, 1.0 - 1e-9
        smallest = count(high)
        if smallest > target:
            raise ValueError(
                f"params={self.params!r} asks for {target:,} parameters, but pruning heads and FFN channels "
                f"reaches at best {smallest:,} (the rest is embeddings, norms and heads); ask for more, or use "
                f"explicit hidden/layers settings"
            )
        while high - low > 1e-6:  # count(ratio) is monotone non-increasing: bisect on the step it crosses
            mid = (low + high) / 2
            low, high = (low, mid) if count(mid) <= target else (mid, high)
        return high

    def _check_fits(self, config: Config, heads: float, layers: int) -> None:
        """Refuse settings this model cannot take, before any work, naming the setting."""
        for name in STACKS:
            for i, shape in enumerate(getattr(config, name)):
                if self.params is None and kept_heads(shape.n_heads, heads, clamp=False) < 1:
                    raise ValueError(
                        f"heads={heads} would prune every one of the {shape.n_heads} heads of {name} layer {i}; "
                        f"each layer keeps at least one head"
                    )
        stacks = 1 + (config.decoder_layers > 0)
        if layers > config.encoder_layers + config.decoder_layers - stacks:
            raise ValueError(
                f"layers={layers} would leave a stack empty: the model has {config.encoder_layers} encoder "
                f"and {config.decoder_layers} decoder layers and each stack keeps at least one"
            )
        dim = kept_width(config.dim, self.hidden, self.round_to)
        if config.embed_dim < config.dim and dim < config.embed_dim:
            raise ValueError(
                f"hidden={self.hidden} would shrink dim {config.dim} -> {dim}, below the factorized embed_dim "
                f"{config.embed_dim}; prune less or factorize to a smaller embed_dim first"
            )

    def _targets(
        self, model: Transformer, origin: dict, dim0: int, heads: float, ffn: float, hidden: float
    ) -> dict[str, int]:
        """How many heads (attention units) or channels (other units) each unit loses this round."""
        plan = {}
        for unit in prunable_units(model):
            now = model.config.dim if unit.stack is None else unit.root.weight.shape[0]
            if unit.stack is None:  # the hidden width; the pooler's output is dim wide too (by Config, not by coupling)
                plan[unit.key] = now - kept_width(dim0, hidden, self.round_to)
            elif unit.head_dim:
                plan[unit.key] = now // unit.head_dim - kept_heads(origin[unit.stack][unit.block].n_heads, heads)
            else:
                plan[unit.key] = now - kept_width(origin[unit.stack][unit.block].ffn_dim, ffn, self.round_to)
        return {key: n for key, n in plan.items() if n > 0}

    # -- the two kinds of surgery ----------------------------------------------------------

    def _prune_widths(self, model: Transformer, plan: dict[str, int], ctx: Context) -> Transformer:
        """Remove the planned heads/channels, least important first, and rebuild from the new shapes."""
        units = [u for u in prunable_units(model) if u.key in plan]
        if not units:
            return model
        graph = dependency_graph(model)
        scores = channel_scores(model, graph, units, ctx, self.importance, self.batches)
        for unit in units:  # scores first, then surgery: each unit's index space is its own
            idxs = lowest(scores[unit.key], plan[unit.key], unit.head_dim)
            graph.get_pruning_group(unit.root, unit.fn, idxs).prune()
            if unit.head_dim:
                _prune_relative_bias(model.get_submodule(unit.key), {i // unit.head_dim for i in idxs})
        return reshaped(model, {})[0]

    def _drop_layers(self, model: Transformer, origin: dict, n: int, ctx: Context) -> tuple[Transformer, dict]:
        """Drop the `n` layers with the smallest share of their stack's importance.

        A layer's importance is the sum of its block's head and FFN scores (the same measure
        as the channels); a block run by k layers gives each of them 1/k, so a stack's layer
        shares sum to 1. Ranking by share, not raw score, keeps encoder and decoder (whose
        layers also hold cross-attention) comparable.
        """
        config = model.config
        units = [u for u in prunable_units(model) if u.stack is not None]
        scores = channel_scores(model, dependency_graph(model), units, ctx, self.importance, self.batches)
        candidates = []
        for name in STACKS:
            share = getattr(config, f"{name}_share")
            block_score = [0.0] * len(set(share))
            for unit in (u for u in units if u.stack == name):
                block_score[unit.block] += float(scores[unit.key].sum())
            per_layer = [block_score[b] / share.count(b) for b in share]
            total = sum(per_layer) or 1.0
            candidates += [(s / total, name, i) for i, s in enumerate(per_layer)]
        drop: dict[str, set[int]] = {name: set() for name in STACKS}
        for _, name, i in sorted(candidates):
            if len(drop["encoder"]) + len(drop["decoder"]) == n:
                break
            if len(drop[name]) + 1 < len(getattr(config, name)):  # each stack keeps a layer
                drop[name].add(i)
        model, kept_blocks = reshaped(model, drop)
        return model, {name: [origin[name][b] for b in kept_blocks[name]] for name in STACKS}


def _prune_relative_bias(attention: nn.Module, heads: set[int]) -> None:
    """Drop the pruned heads' columns of a self-attention's relative-position bias table (T5), if it has one."""
    table = getattr(attention, "relative", None)
    if table is None:
        return
    keep = [h for h in range(table.weight.shape[1]) if h not in heads]
    table.weight = nn.Parameter(table.weight.detach()[:, keep].clone(), requires_grad=table.weight.requires_grad)
    table.embedding_dim = len(keep)
