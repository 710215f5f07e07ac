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
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from compress.pipeline import Context
from model.config import Config, LayerShape
from model.losses import LABEL_KEYS
from model.rebuild import rebuild
from model.transformer import MODEL_INPUTS, Transformer

IMPORTANCES = ("magnitude", "taylor")
_STACKS = ("encoder", "decoder")


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
    ffn: fraction of FFN channels removed in every layer (ffn.up rows + ffn.down columns).
    hidden: fraction of the model width `dim` removed everywhere it couples (embeddings, norms,
        every projection, pooler, task heads, word_proj). With factorized embeddings the new
        dim may not fall below embed_dim.
    layers: number of whole layers dropped, the least important first (see `_drop_layers`);
        each stack keeps at least one layer.
    importance: "magnitude" (squared L2 norm of the coupled weights: the same ranking as the
        L2 norm) or "taylor" (first-order Taylor |w * dL/dw| summed over the coupled weights
        and over `batches` batches of ctx data; see `_taylor_loss` for the loss).
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
        ratio = self._budget_ratio(model.config) if self.params is not None else None
        heads, ffn = (ratio, ratio) if ratio is not None else (self.heads, self.ffn)
        self._check_fits(model.config, heads)

        work = copy.deepcopy(model).requires_grad_(True)
        # Exact attention for tracing and Taylor gradients on any device; the result gets the model's backend back.
        work.attention_backend = "reference"
        config = model.config
        origin = {name: _block_shapes(config, name) for name in _STACKS}  # widths the ratios refer to
        dropped = 0
        for step in tqdm(range(1, self.steps + 1), desc="Prune", disable=self.steps == 1):
            frac = step / self.steps
            n_drop = math.floor(self.layers * frac + 0.5) - dropped
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
        current = _count(config)
        target = int(self.params * current) if isinstance(self.params, float) else self.params
        if target >= current:
            return 0.0

        counts: dict[tuple, int] = {}  # many ratios give the same shapes: count each shape set once

        def count(ratio: float) -> int:
            shapes = tuple(
                tuple(
                    LayerShape(_kept_heads(s.n_heads, ratio), s.head_dim, _kept_width(s.ffn_dim, ratio, self.round_to))
                    for s in getattr(config, name)
                )
                for name in _STACKS
            )
            if shapes not in counts:
                counts[shapes] = _count(config.replace(**dict(zip(_STACKS, shapes))))
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

    def _check_fits(self, config: Config, heads: float) -> None:
        """Refuse settings this model cannot take, before any work, naming the setting."""
        for name in _STACKS:
            for i, shape in enumerate(getattr(config, name)):
                if self.params is None and _kept_heads(shape.n_heads, heads, clamp=False) < 1:
                    raise ValueError(
                        f"heads={heads} would prune every one of the {shape.n_heads} heads of {name} layer {i}; "
                        f"each layer keeps at least one head"
                    )
        stacks = 1 + (config.decoder_layers > 0)
        if self.layers > config.encoder_layers + config.decoder_layers - stacks:
            raise ValueError(
                f"layers={self.layers} would leave a stack empty: the model has {config.encoder_layers} encoder "
                f"and {config.decoder_layers} decoder layers and each stack keeps at least one"
            )
        dim = _kept_width(config.dim, self.hidden, self.round_to)
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
        for unit in _units(model):
            now = unit.root.weight.shape[0]
            if unit.stack is None:  # the hidden width; the pooler's output is dim wide too (by Config, not by coupling)
                plan[unit.key] = now - _kept_width(dim0, hidden, self.round_to)
            elif unit.head_dim:
                plan[unit.key] = now // unit.head_dim - _kept_heads(origin[unit.stack][unit.block].n_heads, heads)
            else:
                plan[unit.key] = now - _kept_width(origin[unit.stack][unit.block].ffn_dim, ffn, self.round_to)
        return {key: n for key, n in plan.items() if n > 0}

    # -- the two kinds of surgery ----------------------------------------------------------

    def _prune_widths(self, model: Transformer, plan: dict[str, int], ctx: Context) -> Transformer:
        """Remove the planned heads/channels, least important first, and rebuild from the new shapes."""
        units = [u for u in _units(model) if u.key in plan]
        if not units:
            return model
        graph = _graph(model)
        scores = self._scores(model, graph, units, ctx)
        for unit in units:  # scores first, then surgery: each unit's index space is its own
            idxs = _lowest(scores[unit.key], plan[unit.key], unit.head_dim)
            graph.get_pruning_group(unit.root, unit.fn, idxs).prune()
        return _reshaped(model, {})[0]

    def _drop_layers(self, model: Transformer, origin: dict, n: int, ctx: Context) -> tuple[Transformer, dict]:
        """Drop the `n` layers with the smallest share of their stack's importance.

        A layer's importance is the sum of its block's head and FFN scores (the same measure
        as the channels); a block run by k layers gives each of them 1/k, so a stack's layer
        shares sum to 1. Ranking by share, not raw score, keeps encoder and decoder (whose
        layers also hold cross-attention) comparable.
        """
        config = model.config
        units = [u for u in _units(model) if u.stack is not None]
        scores = self._scores(model, _graph(model), units, ctx)
        candidates = []
        for name in _STACKS:
            share = getattr(config, f"{name}_share")
            block_score = [0.0] * len(set(share))
            for unit in (u for u in units if u.stack == name):
                block_score[unit.block] += float(scores[unit.key].sum())
            per_layer = [block_score[b] / share.count(b) for b in share]
            total = sum(per_layer) or 1.0
            candidates += [(s / total, name, i) for i, s in enumerate(per_layer)]
        drop: dict[str, set[int]] = {name: set() for name in _STACKS}
        for _, name, i in sorted(candidates):
            if len(drop["encoder"]) + len(drop["decoder"]) == n:
                break
            if len(drop[name]) + 1 < len(getattr(config, name)):  # each stack keeps a layer
                drop[name].add(i)
        model, kept_blocks = _reshaped(model, drop)
        return model, {name: [origin[name][b] for b in kept_blocks[name]] for name in _STACKS}

    # -- importance ------------------------------------------------------------------------

    def _scores(
        self, model: Transformer, graph: tp.DependencyGraph, units: list[_Unit], ctx: Context
    ) -> dict[str, torch.Tensor]:
        """Per-channel importance of every unit (summed over the coupled weights of its tp group)."""
        groups = {u.key: _full_group(graph, u) for u in units}
        if self.importance == "magnitude":
            scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
            return {key: scorer(group) for key, group in groups.items()}
        batches = ctx.batches(self.batches)
        scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
        generator = torch.Generator().manual_seed(ctx.seed)
        totals: dict[str, torch.Tensor] = {}
        for batch in tqdm(batches, desc="Prune: Taylor importance", leave=False):
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


# -- torch-pruning graph ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
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


def _units(model: Transformer) -> list[_Unit]:
    """Every prunable structure of the model, in a fixed order."""
    units = []
    for name in _STACKS:
        stack = getattr(model, name)
        if stack is None:
            continue
        shapes = _block_shapes(model.config, name)
        for b, block in enumerate(stack.blocks):
            for attn_name in ("self_attn", "cross_attn"):
                attn = getattr(block, attn_name)
                if attn is not None:
                    expected = {(attn.q_proj, True), (attn.k_proj, True), (attn.v_proj, True), (attn.out_proj, False)}
                    units.append(
                        _Unit(
                            f"{name}.blocks.{b}.{attn_name}",
                            attn.q_proj,
                            tp.prune_linear_out_channels,
                            shapes[b].head_dim,
                            frozenset(expected),
                            name,
                            b,
                        )
                    )
            expected = {(block.ffn.up, True), (block.ffn.down, False)}
            units.append(
                _Unit(
                    f"{name}.blocks.{b}.ffn",
                    block.ffn.up,
                    tp.prune_linear_out_channels,
                    expected=frozenset(expected),
                    stack=name,
                    block=b,
                )
            )
    units.append(_Unit("embeddings", model.embeddings.norm, tp.prune_layernorm_out_channels))
    if model.pooler is not None:
        readers = {(model.heads[h], False) for h in ("pair", "classify") if h in model.heads}
        units.append(
            _Unit(
                "pooler",
                model.pooler.dense,
                tp.prune_linear_out_channels,
                expected=frozenset({(model.pooler.dense, True), *readers}),
            )
        )
    return units


def _graph(model: Transformer) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced on a small fixed batch.

    The tied output layers are the one coupling tp reads wrongly: to it `h @ word.weight.T`
    is an element-wise op, which would couple the vocabulary-sized head biases with hidden
    channels. So the trace ends where tp reads right (hidden states, decoder hidden states,
    the pooled heads' logits) and the MLM head's unembedding is stood in for by `x + h`: the
    tie multiplies channel i of the head's features with hidden channel i of the embeddings,
    exactly the coupling an element-wise add declares. The LM head needs no stand-in: it
    reads the decoder's hidden states, which are already in the hidden group.
    """
    config = model.config
    steps = min(8, config.max_positions)
    ids = torch.arange(2 * steps, device=next(model.parameters()).device).view(2, steps) % config.vocab_size
    batch = {"input_ids": ids, **({"decoder_input_ids": ids} if model.decoder is not None else {})}

    def forward(m: Transformer, inputs: dict) -> list[torch.Tensor]:
        out = m(**inputs)
        traced = [out.hidden_states, out.decoder_hidden_states]
        traced += [logits for head, logits in out.head_logits.items() if head not in ("mlm", "lm")]
        if "mlm" in m.heads:
            mlm = m.heads["mlm"]
            traced.append(mlm.norm(mlm.act(mlm.transform(out.hidden_states))) + out.hidden_states)
        return [t for t in traced if t is not None]

    with torch.enable_grad():  # tp traces through autograd's graph
        # verbose=False: tp would warn about the head biases it sees as loose parameters; the trace never reaches them.
        return tp.DependencyGraph().build_dependency(model, example_inputs=batch, forward_fn=forward, verbose=False)


def _full_group(graph: tp.DependencyGraph, unit: _Unit) -> tp.Group:
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


def _lowest(scores: torch.Tensor, n: int, head_dim: int) -> list[int]:
    """Indices of the `n` least important channels, or of the `n` least important whole heads' channels."""
    if head_dim:
        heads = torch.argsort(scores.view(-1, head_dim).sum(1), stable=True)[:n]
        return sorted(int(h) * head_dim + d for h in heads for d in range(head_dim))
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:n])


# -- shapes, counts and the rebuild ----------------------------------------------------------


def _kept_heads(n_heads: int, ratio: float, *, clamp: bool = True) -> int:
    """Heads left after removing round(ratio * n_heads); at least 1 unless clamp=False."""
    kept = n_heads - math.floor(ratio * n_heads + 0.5)
    return max(kept, 1) if clamp else kept


def _kept_width(width: int, ratio: float, round_to: int) -> int:
    """Channels left after removing `ratio` of `width`, rounded to a multiple of round_to where possible."""
    if ratio == 0:
        return width
    kept = width * (1 - ratio)
    if width >= round_to:
        return min(width, round_to * max(1, math.floor(kept / round_to + 0.5)))
    return max(1, math.floor(kept + 0.5))


def _width(model: Transformer) -> int:
    return model.embeddings.norm.weight.shape[0]


def _block_shapes(config: Config, stack: str) -> list[LayerShape]:
    """The shape of each weight block of a stack (block b is first used by layer share.index(b))."""
    share = getattr(config, f"{stack}_share")
    return [getattr(config, stack)[share.index(b)] for b in range(len(set(share)))]


def _count(config: Config) -> int:
    """Unique parameters of a model with this config, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


def _reshaped(pruned: Transformer, drop: dict[str, set[int]]) -> tuple[Transformer, dict[str, list[int]]]:
    """A fresh Transformer whose Config is read off `pruned`'s weight shapes, holding those weights.

    drop: layer positions per stack to remove; blocks no layer runs any more go, the rest are
    renumbered in order of first use. Returns the model and, per stack, the old index of each
    new block.
    """
    config, state = pruned.config, pruned.state_dict()
    changes: dict = {"dim": _width(pruned), "embed_dim": pruned.embeddings.word.weight.shape[1]}
    kept_blocks: dict[str, list[int]] = {}
    for name in _STACKS:
        stack = getattr(pruned, name)
        if stack is None:
            kept_blocks[name] = []
            continue
        old = _block_shapes(config, name)
        shapes = [_read_shape(block, old[b].head_dim, f"{name}.blocks.{b}") for b, block in enumerate(stack.blocks)]
        share = getattr(config, f"{name}_share")
        keep = [i for i in range(len(share)) if i not in drop.get(name, ())]
        kept_blocks[name] = list(dict.fromkeys(share[i] for i in keep))
        new_index = {b: n for n, b in enumerate(kept_blocks[name])}
        changes[name] = tuple(shapes[share[i]] for i in keep)
        changes[f"{name}_share"] = tuple(new_index[share[i]] for i in keep)
        state = _renumber(state, f"{name}.blocks.", new_index)
    return rebuild(pruned, config.replace(**changes), state), kept_blocks


def _read_shape(block: nn.Module, head_dim: int, where: str) -> LayerShape:
    """A block's LayerShape, read from its weights."""
    inner = block.self_attn.q_proj.weight.shape[0]
    cross = block.cross_attn.q_proj.weight.shape[0] if block.cross_attn is not None else inner
    if inner % head_dim or cross != inner:
        raise RuntimeError(f"{where}: attention widths {inner}/{cross} are not whole {head_dim}-wide heads")
    return LayerShape(n_heads=inner // head_dim, head_dim=head_dim, ffn_dim=block.ffn.up.weight.shape[0])


def _renumber(state: dict[str, torch.Tensor], prefix: str, new_index: dict[int, int]) -> dict[str, torch.Tensor]:
    """Rename `prefix{old}.…` keys to `prefix{new}.…`; drop the blocks not in new_index."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        block, rest = key[len(prefix) :].split(".", 1)
        if int(block) in new_index:
            out[f"{prefix}{new_index[int(block)]}.{rest}"] = value
    return out
