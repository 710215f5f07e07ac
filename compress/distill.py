"""Distill: knowledge distillation from the teacher into the student on the project's training loop.

Losses (weights are settings): KL between temperature-softened logits of every head both models
have; MSE between the embedding outputs and between the hidden states of mapped layers, through
learned projections where widths differ; MiniLM-v2 attention relations (Q-Q, K-K, V-V self-relations split into relation heads,
so head counts may differ) on the last mapped layer. Encoder-decoders with decoder_input_ids in the
batch add the decoder's hidden states (through its own layer map) and cross-attention relations
(compress/distill_seq2seq.py); the logits of the decoder's LM head are the target tokens'.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.distill_seq2seq import (
    DecoderRecorder,
    check_decoder_layer_map,
    cross_relations,
    relation_heads,
    relation_kl,
)
from compress.pipeline import Context
from model.losses import LABEL_KEYS
from model.training.loop import TrainConfig, train
from model.transformer import MODEL_INPUTS, Transformer

logger = logging.getLogger(__name__)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Student layer i learns from teacher layer round((i + 1) * Lt / Ls) - 1: the last maps to the last."""
    return tuple(max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers))


@torch.no_grad()
def layer_errors(student: Transformer, teacher: Transformer, batches: list[dict[str, Tensor]]) -> Tensor:
    """(Ls, Lt) float64: the relative squared error of student layer i's output against teacher layer j's.

    Sums over the real tokens of `batches` of |h_s - h_t|^2 / |h_t|^2; a narrower (wider) student
    is zero-padded (truncated) to the teacher's width, as Distill's projection starts.
    """
    s_dim, t_dim = student.config.dim, teacher.config.dim
    error = torch.zeros(student.config.encoder_layers, teacher.config.encoder_layers, dtype=torch.float64)
    norm = torch.zeros(teacher.config.encoder_layers, dtype=torch.float64)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and not k.startswith("decoder")}
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        s_out = student.eval()(**inputs, output_hidden_states=True).all_hidden_states[1:]
        t_out = teacher.eval()(**inputs, output_hidden_states=True).all_hidden_states[1:]
        s_hidden = torch.stack([F.pad(h, (0, t_dim - s_dim)) if s_dim < t_dim else h[..., :t_dim] for h in s_out])
        s_hidden, t_hidden = s_hidden[:, mask].double(), torch.stack(t_out)[:, mask].double()  # (L, N, dim)
        error += torch.stack([(t_hidden - h).pow(2).sum((1, 2)) for h in s_hidden])
        norm += t_hidden.pow(2).sum((1, 2))
    return error / norm


def matched_layer_map(errors: Tensor) -> tuple[int, ...]:
    """The increasing student -> teacher layer map with the least total error whose last layer maps to the last.

    errors: (Ls, Lt) from `layer_errors`, Ls <= Lt. A student cut from the teacher by dropping
    layers finds the teacher layers its own came from (their outputs match best); the last
    layer learns the teacher's output, as in `uniform_layer_map`. Dynamic programming.
    """
    n_s, n_t = errors.shape
    if n_s > n_t:
        raise ValueError(f"a matched layer map needs a student no deeper than its teacher, got {n_s} > {n_t} layers")
    best = errors[0].clone()  # best[j]: least total error of layers 0..i with layer i at teacher layer j
    choice = []
    for i in range(1, n_s):
        prefix = torch.cummin(torch.cat([best.new_full((1,), math.inf), best[:-1]]), 0)
        choice.append(prefix.indices - 1)  # the best earlier teacher layer for each j (shifted by the inf pad)
        best = errors[i] + prefix.values
    layer_map = [n_t - 1]
    for back in reversed(choice):
        layer_map.append(int(back[layer_map[-1]]))
    return tuple(reversed(layer_map))


class _QKVRecorder:
    """Records the q/k/v projections of every encoder layer position, in execution order (shared blocks included)."""

    def __init__(self, model: Transformer):
        self.outputs: dict[str, list[Tensor]] = {"q": [], "k": [], "v": []}
        self.handles = []
        for block in model.encoder.blocks:
            for name in "qkv":
                proj = getattr(block.self_attn, f"{name}_proj")
                self.handles.append(proj.register_forward_hook(lambda m, i, o, n=name: self.outputs[n].append(o)))

    def take(self) -> dict[str, list[Tensor]]:
        out = self.outputs
        self.outputs = {"q": [], "k": [], "v": []}
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _relation(x: Tensor, heads: int, mask: Tensor) -> Tensor:
    """Log of MiniLM-v2's self-relation softmax(x x^T / sqrt(d_r)) per relation head: (B,T,H*d) -> (B,R,T,T)."""
    b, t, width = x.shape
    x = x.view(b, t, heads, width // heads).transpose(1, 2)  # (B, R, T, d_r)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


class _Reference:
    """A module this one uses but does not own: not a submodule (neither trained nor checkpointed),
    and not duplicated by copy.deepcopy (the FSDP training loop copies the objective, not the teacher)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Reference:
        return self


class DistillLoss(nn.Module):
    """The distillation objective of one student/teacher pair; holds the learned hidden-state projections."""

    def __init__(self, student: Transformer, teacher: Transformer, settings: Distill):
        super().__init__()
        self.student, self.settings = student, settings
        self.teacher = _Reference(teacher)
        s, t = student.config, teacher.config
        given = settings.layer_map
        self.layer_map = uniform_layer_map(s.encoder_layers, t.encoder_layers) if given in (None, "uniform") else given
        if len(self.layer_map) != s.encoder_layers or not all(0 <= j < t.encoder_layers for j in self.layer_map):
            raise ValueError(
                f"layer_map must give one teacher layer in [0, {t.encoder_layers}) for each of the student's "
                f"{s.encoder_layers} layers, got {list(self.layer_map)}"
            )
        self.project = nn.Linear(s.dim, t.dim, bias=False) if s.dim != t.dim else nn.Identity()
        if s.dim != t.dim:  # start from a plain truncation/zero-padding so early steps are meaningful
            nn.init.eye_(self.project.weight)
        s_width = s.encoder[-1].n_heads * s.encoder[-1].head_dim
        t_shape = t.encoder[self.layer_map[-1]]
        t_width = t_shape.n_heads * t_shape.head_dim
        self.relation_heads = settings.relation_heads or math.gcd(s_width, t_width, t_shape.n_heads)
        for width, who in ((s_width, "student"), (t_width, "teacher")):
            if width % self.relation_heads:
                raise ValueError(
                    f"relation_heads={self.relation_heads} must divide the {who}'s attention width {width}"
                )
        self.decoder_map = None  # the decoder terms need decoders on both sides
        if student.decoder is not None and teacher.decoder is not None:
            given = settings.decoder_layer_map
            self.decoder_map = given or uniform_layer_map(s.decoder_layers, t.decoder_layers)
            check_decoder_layer_map(self.decoder_map, student, teacher)
            self.cross_heads = relation_heads(student, teacher, self.decoder_map[-1], settings.relation_heads)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every loss term for one batch, by name ("logits", "hidden", "attention", "pooled", "task", and
        "decoder_hidden", "cross_attention" for encoder-decoders given decoder_input_ids)."""
        settings, teacher = self.settings, self.teacher.module
        if "input_ids" not in batch:
            raise TypeError(f"a distillation batch needs input_ids; got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        labels = {k: v for k, v in batch.items() if k in LABEL_KEYS} if settings.task else {}
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        need_attention = settings.attention > 0
        decoding = self.decoder_map is not None and "decoder_input_ids" in inputs
        recorders = [_QKVRecorder(m) for m in (self.student, teacher)] if need_attention else []
        decoders = [DecoderRecorder(m) for m in (self.student, teacher)] if decoding else []
        try:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=True)
                t_qkv = recorders[1].take() if need_attention else None
                t_dec = decoders[1].take() if decoding else None
            s_out = self.student(**inputs, **labels, output_hidden_states=True)
            s_qkv = recorders[0].take() if need_attention else None
            s_dec = decoders[0].take() if decoding else None
        finally:
            for recorder in recorders + decoders:
                recorder.remove()
        losses: dict[str, Tensor] = {}
        if settings.logits > 0:
            shared = [h for h in s_out.head_logits if h in t_out.head_logits]
            if shared:
                losses["logits"] = (
                    settings.logits
                    * sum(self._logit_loss(h, s_out.head_logits[h], t_out.head_logits[h], mask, inputs) for h in shared)
                    / len(shared)
                )
        if settings.hidden > 0:
            # The embedding outputs (index 0) are matched too: the direct signal that retrains
            # factorized or pruned embedding tables (TinyBERT's embedding-layer distillation).
            pairs = [(0, 0), *((i + 1, j + 1) for i, j in enumerate(self.layer_map))]
            terms = [
                _masked_mse(self.project(s_out.all_hidden_states[i]), t_out.all_hidden_states[j], mask)
                for i, j in pairs
            ]
            losses["hidden"] = settings.hidden * sum(terms) / len(terms)
        if settings.pooled > 0:
            weights = mask[..., None].to(s_out.hidden_states.dtype)
            s_pool = (self.project(s_out.hidden_states) * weights).sum(1) / weights.sum(1)
            t_pool = (t_out.hidden_states * weights).sum(1) / weights.sum(1)
            losses["pooled"] = settings.pooled * (1 - F.cosine_similarity(s_pool, t_pool, dim=-1)).mean()
        if need_attention:
            s_layer, t_layer = len(self.layer_map) - 1, self.layer_map[-1]
            terms = []
            for name in "qkv":
                s_rel = _relation(s_qkv[name][s_layer], self.relation_heads, mask)
                t_rel = _relation(t_qkv[name][t_layer], self.relation_heads, mask)
                kl = F.kl_div(s_rel, t_rel, log_target=True, reduction="none").sum(-1)  # (B, R, T)
                terms.append((kl * mask[:, None, :]).sum() / (mask.sum() * self.relation_heads))
            losses["attention"] = settings.attention * sum(terms) / 3
        if decoding:
            losses.update(self._decoder_losses(s_dec, t_dec, mask, inputs))
        if labels and s_out.loss is not None:
            losses["task"] = settings.task * s_out.loss
        if not losses:
            raise ValueError("Distill has nothing to learn: every loss weight is 0 or the models share no head")
        return losses

    def _decoder_losses(self, s_dec: tuple, t_dec: tuple, mask: Tensor, inputs: dict[str, Tensor]) -> dict:
        """The decoder terms from the recorded decoders: "decoder_hidden" (weight `hidden`), "cross_attention" (`attention`)."""
        (s_hidden, s_qkv), (t_hidden, t_qkv) = s_dec, t_dec
        target = inputs.get("decoder_attention_mask")
        target = torch.ones_like(inputs["decoder_input_ids"]) if target is None else target
        target = target.bool()
        losses = {}
        if self.settings.hidden > 0:  # the decoder's input vectors too, as the encoder's embedding outputs
            pairs = [(0, 0), *((i + 1, j + 1) for i, j in enumerate(self.decoder_map))]
            terms = [_masked_mse(self.project(s_hidden[i]), t_hidden[j], target) for i, j in pairs]
            losses["decoder_hidden"] = self.settings.hidden * sum(terms) / len(terms)
        if self.settings.attention > 0:
            s_layer, t_layer = len(self.decoder_map) - 1, self.decoder_map[-1]
            s_rel = cross_relations(*(s_qkv[n][s_layer] for n in "qkv"), self.cross_heads, mask)
            t_rel = cross_relations(*(t_qkv[n][t_layer] for n in "qkv"), self.cross_heads, mask)
            attention = relation_kl(s_rel[0], t_rel[0], target)  # rows: the decoder's real tokens
            values = relation_kl(s_rel[1], t_rel[1], mask)  # rows: the real source tokens
            losses["cross_attention"] = self.settings.attention * (attention + values) / 2
        return losses

    def _logit_loss(self, head: str, s: Tensor, t: Tensor, mask: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """KL(teacher || student) at temperature T, scaled by T^2; a 1-wide head (regression) uses MSE.

        The span head ("qa", (B, T, 2)) is two distributions over the sequence, start and end,
        with padding positions left out, as in DistilBERT's SQuAD distillation.
        """
        if s.shape[-1] == 1:
            return F.mse_loss(s, t)
        temperature = self.settings.temperature
        s, t = s / temperature, t / temperature
        if head == "qa":  # padding gets probability 0 (a finite floor: -inf - -inf would be NaN in the KL)
            padding = ~mask[..., None]
            s, t = (x.masked_fill(padding, torch.finfo(x.dtype).min).transpose(1, 2) for x in (s, t))  # (B, 2, T)
        kl = (
            F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
            * temperature**2
        )
        if kl.dim() == 1 or head == "qa":  # sentence-level head (B,), or start and end (B, 2)
            return kl.mean()
        if kl.shape[1] == mask.shape[1]:  # token-level head on the encoder (B, T)
            return (kl * mask).sum() / mask.sum()
        dec_mask = inputs.get("decoder_attention_mask")  # the decoder's lm head (B, S)
        dec_mask = torch.ones_like(kl) if dec_mask is None else dec_mask.to(kl.dtype)
        return (kl * dec_mask).sum() / dec_mask.sum()


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over real tokens only: padding positions carry no signal."""
    m = mask[..., None].to(a.dtype)
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])


@dataclass(frozen=True)
class Distill:
    """Train the model (the student) to imitate the Pipeline's teacher on the context's data.

    steps, lr, warmup_steps: the training loop's settings. temperature: logits softening.
    logits, hidden, attention, pooled, task: loss weights. pooled: sentence-embedding
    distillation, 1 - cosine between the student's and the teacher's mean-pooled last hidden
    states (real tokens only; how sentence-transformers models such as all-MiniLM-L6-v2 embed a
    sentence). task: the student's own label loss when the batches carry labels.
    layer_map: teacher layer for each student encoder layer; None = matched when the student
    has fewer layers than the teacher (`matched_layer_map` on the first 4 batches: a student cut
    in depth learns from the layers its own came from), else uniform; "uniform" =
    `uniform_layer_map` always. decoder_layer_map: teacher decoder layer for each student decoder
    layer (None = uniform). Encoder-decoder batches with decoder_input_ids add "decoder_hidden" (weight
    `hidden`) and "cross_attention" (weight `attention`; see compress/distill_seq2seq.py). relation_heads: MiniLM-v2 relation heads (0 = the largest count dividing both
    attention widths and the teacher's head count). checkpoint_every: steps between
    checkpoints in ctx.workdir/distill, from which an interrupted run resumes exactly.
    """

    steps: int = 1000
    temperature: float = 2.0
    lr: float = 1e-4
    warmup_steps: int | None = None
    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    pooled: float = 0.0
    task: float = 0.0
    layer_map: tuple[int, ...] | str | None = None
    decoder_layer_map: tuple[int, ...] | None = None
    relation_heads: int = 0
    checkpoint_every: int = 0
    progress: bool = True

    needs_data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Distill steps must be an int >= 1, got {self.steps!r}")
        for name in ("temperature", "lr", "logits", "hidden", "attention", "pooled", "task"):
            value, positive = getattr(self, name), name in ("temperature", "lr")
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (positive and value == 0)
            ):
                raise ValueError(
                    f"Distill {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
                )
        for name, minimum in (("relation_heads", 0), ("checkpoint_every", 0), ("warmup_steps", 0)):
            value = getattr(self, name)
            if (value is not None or name != "warmup_steps") and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise ValueError(f"Distill {name} must be an int >= {minimum}, got {value!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"Distill progress must be True or False, got {self.progress!r}")
        if self.layer_map is not None and self.layer_map != "uniform":
            if not isinstance(self.layer_map, (list, tuple)) or not all(
                type(j) is int and j >= 0 for j in self.layer_map
            ):
                raise ValueError(
                    f"Distill layer_map must be null, 'uniform' or a list of teacher layer indices (ints >= 0), "
                    f"got {self.layer_map!r}"
                )
            object.__setattr__(self, "layer_map", tuple(self.layer_map))
        if self.decoder_layer_map is not None:
            if not isinstance(self.decoder_layer_map, (list, tuple)) or not all(
                type(j) is int and j >= 0 for j in self.decoder_layer_map
            ):
                raise ValueError(
                    f"Distill decoder_layer_map must be null or a list of teacher decoder layer indices (ints >= 0), "
                    f"got {self.decoder_layer_map!r}"
                )
            object.__setattr__(self, "decoder_layer_map", tuple(self.decoder_layer_map))

    def __call__(self, model: Transformer, ctx: Context) -> Transformer:
        settings = self
        if self.layer_map is None and model.config.encoder_layers < ctx.teacher.config.encoder_layers:
            batches = ctx.batches(4)
            if batches:  # a student cut in depth learns from the teacher layers its own came from
                layer_map = matched_layer_map(layer_errors(model, ctx.teacher, batches))
                logger.info("Distill: student layer i learns from teacher layer %s[i] (matched)", list(layer_map))
                settings = dataclasses.replace(self, layer_map=layer_map)
        objective = DistillLoss(model, ctx.teacher.to(ctx.device), settings)
        run = TrainConfig(
            steps=self.steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            seed=ctx.seed,
            device=ctx.device,
            parallel=ctx.parallel,
            checkpoint_dir=str(ctx.workdir / "distill") if ctx.workdir is not None else None,
            checkpoint_every=self.checkpoint_every,
            progress=self.progress,
        )
        train(objective, ctx.data, run, loss_fn=lambda m, batch: sum(m(batch).values()))
        return model.eval()


@torch.no_grad()
def distillation_loss(
    student: Transformer, teacher: Transformer, batches: list[dict[str, Tensor]], settings: Distill
) -> dict[str, float]:
    """Mean of each distillation loss term over `batches` (held-out evaluation; projections as initialized)."""
    objective = DistillLoss(student, teacher, settings).eval()
    student.eval()
    totals: dict[str, float] = {}
    for batch in batches:
        for name, value in objective(batch).items():
            totals[name] = totals.get(name, 0.0) + value.item() / len(batches)
    return totals
