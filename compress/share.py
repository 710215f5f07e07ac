"""Share: ALBERT-style cross-layer weight sharing, embedding factorization by truncated SVD, weight clustering."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from compress.cluster import cluster_layers
from compress.pipeline import Context
from model.config import check_choice, check_int
from model.rebuild import rebuild
from model.transformer import Transformer

logger = logging.getLogger(__name__)

INITS = ("mean", "closest")
STACKS = ("encoder", "decoder")
EMBED_FITS = ("auto", "frequency", "uniform")
FREQUENCY_BATCHES = 1000  # batches of ctx.data counted for token frequencies


@dataclass(frozen=True)
class Share:
    """Tie groups of layers to one weight block, factorize the word embeddings, cluster the weights.

    layers_per_group: k consecutive layers run one weight block (layers 0..k-1, k..2k-1, ...),
    in the encoder and in the decoder (whose blocks include cross-attention). When k does not
    divide a stack's layer count, its last group is smaller (6 layers, k=4: groups of 4 and 2).
    1 leaves the layers as they are (any existing sharing included). An already-shared model
    is regrouped by layer position, so a coarser existing map is split again where the new
    groups say (each block then starts from its members, as below).
    init: how a group's block starts: "mean" (element-wise mean of the members' weights, one
    member per layer position) or "closest" (a copy of the member nearest that mean, L2 over
    all its parameters).
    embed_dim: factorize the word embeddings to rank E by truncated SVD (vocab x E, then E x dim);
    must be below the current embedding width. The tied MLM / LM heads follow automatically.
    embed_fit: what the rank-E fit minimizes. "frequency": the error expected over the tokens of
    the data (each vocabulary row weighted by its count in `ctx.data`'s real tokens, plus one),
    so the frequent words keep their vectors and the many rare or unused rows give way (what
    that buys on all-MiniLM-L6-v2 is in benchmarks/RESULTS.md); "uniform": every row alike
    (plain truncated SVD);
    "auto": "frequency" when the context has data, else "uniform".
    embed_full_rows: adaptive input embeddings on top of the rank-E fit: the K vocabulary rows the
    fit misses most (its error on each row, weighted as the fit weighs it: with the frequency fit
    these are the data's frequent words) keep their exact vectors through a full-width correction
    table (K x dim parameters more), and the rank-E basis is refit to the other rows. Needs
    embed_dim.
    cluster_bits: k-means weight clustering with a codebook of 2**bits centroids per matrix
    (done by `compress.cluster.cluster_layers`, after sharing and factorization).
    """

    layers_per_group: int = 1
    init: str = "mean"
    embed_dim: int | None = None
    embed_fit: str = "auto"
    embed_full_rows: int = 0
    cluster_bits: int | None = None
    restructures: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("layers_per_group", self.layers_per_group, 1)
        check_choice("init", self.init, INITS)
        check_choice("embed_fit", self.embed_fit, EMBED_FITS)
        if self.embed_dim is not None:
            check_int("embed_dim", self.embed_dim, 1)
        check_int("embed_full_rows", self.embed_full_rows, 0)
        if self.embed_full_rows and self.embed_dim is None:
            raise ValueError(f"embed_full_rows={self.embed_full_rows} corrects a factorization: set embed_dim too")
        if self.cluster_bits is not None:
            check_int("cluster_bits", self.cluster_bits, 1)
            if self.cluster_bits > 8:
                raise ValueError(
                    f"cluster_bits must be <= 8 (a codebook of at most 256 centroids), got {self.cluster_bits}"
                )

    @property
    def needs_data(self) -> bool:
        """True when the embedding fit is weighted by the data's token frequencies."""
        return self.embed_dim is not None and self.embed_fit == "frequency"

    def __call__(self, model: Transformer, ctx: Context | None = None) -> Transformer:
        """Apply the settings to `model` (not modified) and return a new Transformer with a new Config."""
        if model.config.quantized:
            names = [layer.name for layer in model.config.quantized]
            raise ValueError(
                f"Share needs float weights but the model has quantized layers {names}; share before quantizing"
            )
        if self.layers_per_group > 1:
            model = share_layers(model, self.layers_per_group, init=self.init)
        if self.embed_dim is not None:
            batches = ctx.batches(FREQUENCY_BATCHES) if ctx is not None and self.embed_fit != "uniform" else []
            if self.embed_fit == "frequency" and not batches:
                raise ValueError(
                    "Share(embed_fit='frequency') needs data to count tokens in; pass data or use embed_fit='uniform'"
                )
            counts = token_counts(batches, model.config.vocab_size) if batches else None
            model, error = factorize_embeddings(model, self.embed_dim, counts=counts, full_rows=self.embed_full_rows)
            logger.info(
                "Share: word embeddings factorized to rank %d (%s fit, %d full rows), relative error %.4f",
                self.embed_dim,
                "frequency" if batches else "uniform",
                self.embed_full_rows,
                error,
            )
        if self.cluster_bits is not None:
            model = cluster_layers(model, self.cluster_bits)
        return model


def share_layers(model: Transformer, layers_per_group: int, *, init: str = "mean") -> Transformer:
    """A new model whose encoder and decoder layers run one weight block per group of `layers_per_group`.

    model: any unquantized Transformer (not modified). init: "mean" or "closest" (see `Share`).
    Returns a fresh Transformer built from the new Config (`encoder_share`, `decoder_share`).
    Raises ValueError when a group's layers differ in shape or k exceeds a stack's layer count.
    """
    check_int("layers_per_group", layers_per_group, 1)
    check_choice("init", init, INITS)
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{s}.blocks." for s in STACKS))}
    changes = {}
    for name in STACKS:
        shapes = getattr(config, name)
        if not shapes:
            continue
        if layers_per_group > len(shapes):
            raise ValueError(f"layers_per_group={layers_per_group} is larger than the {name}'s {len(shapes)} layers")
        stack = getattr(model, name)
        share = tuple(layer // layers_per_group for layer in range(len(shapes)))
        if share[-1] + 1 > len(stack.blocks):
            logger.warning(
                "Share: regrouping the %s by position splits its %d weight blocks into %d (its sharing was coarser)",
                name,
                len(stack.blocks),
                share[-1] + 1,
            )
        for group in range(share[-1] + 1):
            members = [layer for layer, g in enumerate(share) if g == group]
            for layer in members[1:]:
                if shapes[layer] != shapes[members[0]]:
                    raise ValueError(
                        f"{name} layers {members[0]} and {layer} cannot share weights: their shapes differ "
                        f"({shapes[members[0]]} vs {shapes[layer]})"
                    )
            block = _init_block([stack.blocks[stack.share[layer]].state_dict() for layer in members], init)
            state.update({f"{name}.blocks.{group}.{key}": value for key, value in block.items()})
        changes[f"{name}_share"] = share
        logger.info("Share: %s layers %s -> blocks %s", name, list(stack.share), list(share))
    return rebuild(model, config.replace(**changes), state)


def token_counts(batches: list[dict[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """How often each vocabulary id occurs among the real (attention-masked) tokens of `batches` (float64)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        ids = ids[mask.bool()] if mask is not None else ids.flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"the data's input_ids must be in [0, {vocab_size}); got ids in [{int(ids.min())}, {int(ids.max())}]"
            )
        counts += torch.bincount(ids.cpu(), minlength=vocab_size).double()
    return counts


def factorize_embeddings(
    model: Transformer, embed_dim: int, *, counts: torch.Tensor | None = None, full_rows: int = 0
) -> tuple[Transformer, float]:
    """Factorize the word embeddings to rank `embed_dim` by (weighted) truncated SVD.

    The word matrix W (vocab x dim; the effective table `Embeddings.word_matrix()` when already
    factorized) becomes A (vocab x E) in `embeddings.word.weight` and B (E x dim), stored as B.T
    in `embeddings.word_proj.weight`. embed_dim must be in [1, current embed_dim) and <= vocab_size.
    counts: token occurrences (vocab_size,), e.g. from `token_counts`; when given, the fit
    minimizes sum_i (counts_i + 1) ||W_i - A_i B||^2, the error expected over the data's tokens
    with add-one smoothing, instead of the plain Frobenius error.
    full_rows: K >= 0 rows made exact by a full-width correction (`embeddings.word_full`): the K
    rows with the largest weighted error under the first fit; B is then refit without them, so
    the rank-E budget goes to the rows that have no correction.
    Returns (a fresh Transformer with `embed_dim` and `embed_full_rows` in its Config, the relative
    error ||D (W - W')||_F / ||D W||_F of the new table W', D = diag(sqrt(counts + 1)) or the identity).
    """
    config = model.config
    check_int("embed_dim", embed_dim, 1)
    check_int("full_rows", full_rows, 0)
    if embed_dim >= config.embed_dim:
        raise ValueError(
            f"embed_dim must be smaller than the current embedding width {config.embed_dim} (dim={config.dim}); got {embed_dim}"
        )
    if embed_dim > config.vocab_size:
        raise ValueError(f"embed_dim must be <= vocab_size ({config.vocab_size}); got {embed_dim}")
    if full_rows > config.vocab_size:
        raise ValueError(f"full_rows must be <= vocab_size ({config.vocab_size}); got {full_rows}")
    if counts is not None and (tuple(counts.shape) != (config.vocab_size,) or bool((counts < 0).any())):
        raise ValueError(
            f"counts must be {config.vocab_size} non-negative token counts; got shape {tuple(counts.shape)}"
        )
    with torch.no_grad():
        w = model.embeddings.word_matrix().double()  # (V, dim)
        weight = counts.double().to(w.device) + 1 if counts is not None else torch.ones_like(w[:, 0])
        basis = _best_basis(w * weight.sqrt()[:, None], embed_dim)
        full = torch.empty(0, dtype=torch.long, device=w.device)
        if full_rows:
            missed = weight * (w - w @ basis.T @ basis).square().sum(1)
            full = missed.topk(full_rows).indices.sort().values
            fit_weight = weight.clone()
            fit_weight[full] = 0
            basis = _best_basis(w * fit_weight.sqrt()[:, None], embed_dim)
        a = w @ basis.T  # (V, E): each row's projection onto it, the best A for that basis and any weights
        # Any rescaling of A's columns against B's rows gives the same product A @ B (and the same
        # tied-head logits), but the balanced one gives column j of A and row j of B equal norms
        # (sqrt(s_j) each for the plain fit; the smallest ||A||^2 + ||B||^2, the point weight decay
        # pulls towards), so neither factor holds all the scale. That keeps both near the magnitude
        # training and quantization expect and gives their gradients comparable size in distillation.
        root = a.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        a, b = a / root, root[:, None] * basis
        fitted = a @ b
        correction = w[full] - fitted[full]  # (K, dim): makes the K rows exact
        fitted[full] = w[full]
        total = (w.square().sum(1) * weight).sum().sqrt()
        error = float(((w - fitted).square().sum(1) * weight).sum().sqrt() / total) if total > 0 else 0.0
    dtype = model.embeddings.word.weight.dtype
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("embeddings.word_full.", "embeddings.full_slot"))
    }
    state["embeddings.word.weight"] = a.to(dtype)
    state["embeddings.word_proj.weight"] = b.T.contiguous().to(dtype)  # Linear(E, dim).weight is (dim, E)
    if full_rows:
        state["embeddings.word_full.weight"] = torch.cat([torch.zeros_like(correction[:1]), correction]).to(dtype)
        slot = torch.zeros(config.vocab_size, dtype=torch.int32, device=w.device)
        slot[full] = torch.arange(1, full_rows + 1, dtype=torch.int32, device=w.device)
        state["embeddings.full_slot"] = slot
    return rebuild(model, config.replace(embed_dim=embed_dim, embed_full_rows=full_rows), state), error


def _best_basis(weighted: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` row space (orthonormal rows, (rank, dim)) that best fits the rows of `weighted`."""
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)  # vh (r, dim), r = min(V, dim)
    return vh[:rank]


def _init_block(states: list[dict[str, torch.Tensor]], init: str) -> dict[str, torch.Tensor]:
    """The starting weights of a shared block from its members' block state dicts (one per layer)."""
    keys = list(states[0])
    # float64 so that the mean of up to a dozen fp32 members is exact to fp32 rounding
    mean = {key: torch.stack([s[key].double() for s in states]).mean(dim=0) for key in keys}
    if init == "mean":
        return {key: mean[key].to(states[0][key].dtype) for key in keys}
    distances = torch.stack([sum((s[key].double() - mean[key]).square().sum() for key in keys) for s in states])
    closest = int(distances.argmin())
    return {key: value.clone() for key, value in states[closest].items()}
