"""Distill's encoder-decoder terms: the decoder's hidden states and MiniLM-style cross-attention relations.

`DecoderRecorder` reads, during one forward, what `Output` does not carry: the decoder's input
vectors and every decoder layer's output (the last after the final norm, as `all_hidden_states`
holds the encoder's), and each layer's cross-attention q/k/v projections. The cross-attention
relations are MiniLM's (v1) pair on the last mapped decoder layer, split into relation heads so
head counts may differ: the attention distribution softmax(q k^T / sqrt(d_r)) of the decoder's
tokens over the source tokens, and the value relation softmax(v v^T / sqrt(d_r)) among the
source tokens; each the teacher-to-student KL, averaged over real rows and relation heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.transformer import Transformer


class DecoderRecorder:
    """Records a decoder's layer outputs and cross-attention q/k/v in execution order (shared blocks included)."""

    def __init__(self, model: Transformer):
        self.hidden: list[Tensor] = []
        self.qkv: dict[str, list[Tensor]] = {"q": [], "k": [], "v": []}
        stack = model.decoder
        self.handles = [
            stack.register_forward_pre_hook(lambda m, args: self.hidden.append(args[0])),
            stack.register_forward_hook(self._final),
        ]
        for block in stack.blocks:
            self.handles.append(block.register_forward_hook(lambda m, i, out: self.hidden.append(out[0])))
            for name in "qkv":
                proj = getattr(block.cross_attn, f"{name}_proj")
                self.handles.append(proj.register_forward_hook(lambda m, i, o, n=name: self.qkv[n].append(o)))

    def _final(self, module, args, out) -> None:
        self.hidden[-1] = out[0]  # after the stack's final norm (pre-LN models), as all_hidden_states has it

    def take(self) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """(decoder input + every layer's output, cross-attention q/k/v per layer) of the last forward."""
        out = self.hidden, self.qkv
        self.hidden, self.qkv = [], {"q": [], "k": [], "v": []}
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _heads(x: Tensor, heads: int) -> Tensor:
    b, t, width = x.shape
    return x.view(b, t, heads, width // heads).transpose(1, 2)  # (B, R, T, d_r)


def cross_relations(q: Tensor, k: Tensor, v: Tensor, heads: int, source_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-relations of one cross-attention: (attention (B,R,S,T), values (B,R,T,T)), padding sources left out.

    Args:
        q: the decoder tokens' queries (B,S,width); k, v: the source tokens' keys and values (B,T,width).
        heads: relation heads R (must divide width).
        source_mask: (B,T) bool, True = a real source token.
    """
    d = q.shape[-1] // heads
    floor = torch.finfo(q.dtype).min
    qk = _heads(q, heads) @ _heads(k, heads).transpose(-1, -2) / math.sqrt(d)
    vv = _heads(v, heads) @ _heads(v, heads).transpose(-1, -2) / math.sqrt(d)
    keys = ~source_mask[:, None, None, :]
    return qk.masked_fill(keys, floor).log_softmax(-1), vv.masked_fill(keys, floor).log_softmax(-1)


def relation_kl(s_rel: Tensor, t_rel: Tensor, rows: Tensor) -> Tensor:
    """KL(teacher || student) of log-relations (B,R,L,K), averaged over the real rows (B,L) and relation heads."""
    kl = (t_rel.exp() * (t_rel - s_rel)).sum(-1)  # (B, R, L)
    return (kl * rows[:, None, :]).sum() / (rows.sum() * s_rel.shape[1])


def relation_heads(student: Transformer, teacher: Transformer, layer: int, given: int) -> int:
    """Relation heads for the cross-attention of student's last and teacher's `layer` decoder layer; checked."""
    s_shape, t_shape = student.config.decoder[-1], teacher.config.decoder[layer]
    s_width, t_width = s_shape.n_heads * s_shape.head_dim, t_shape.n_heads * t_shape.head_dim
    heads = given or math.gcd(s_width, t_width, t_shape.n_heads)
    for width, who in ((s_width, "student"), (t_width, "teacher")):
        if width % heads:
            raise ValueError(f"relation_heads={heads} must divide the {who}'s cross-attention width {width}")
    return heads


def check_decoder_layer_map(layer_map: tuple[int, ...], student: Transformer, teacher: Transformer) -> None:
    """Refuse a decoder layer map that does not give one teacher decoder layer per student decoder layer."""
    n_s, n_t = student.config.decoder_layers, teacher.config.decoder_layers
    if len(layer_map) != n_s or not all(0 <= j < n_t for j in layer_map):
        raise ValueError(
            f"decoder_layer_map must give one teacher decoder layer in [0, {n_t}) for each of the student's "
            f"{n_s} decoder layers, got {list(layer_map)}"
        )
