"""The flashlite Transformer: embeddings (optionally factorized), encoder/decoder stacks with shared blocks, task heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from model.attention import LayerCache, attend, choose_backend, reference_attention, warn_fallback
from model.checks import check_ids, check_labels, check_token_types
from model.config import Config, LayerShape
from model.embeddings import Embeddings, norm_layer
from model.heads import ACTIVATIONS, LMHead, MaskedLMHead, Pooler, check_eos_rows, last_eos, shift_right
from model.losses import LABEL_KEYS, task_losses
from model.positions import relative_buckets, rotate

# The token inputs `Transformer.forward` takes (besides labels and flags): what a batch feeds the model.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")


@dataclass
class Output:
    """What `Transformer.forward` returns.

    hidden_states: last encoder layer (B,T,dim). logits: the first head in `config.heads`
    that ran; head_logits: every head that ran, by name. loss/losses: when labels were given.
    all_hidden_states: embeddings output + every encoder layer; attentions: every encoder
    layer's (B,H,T,T) weights (both on request). decoder_hidden_states: last decoder layer.
    """

    hidden_states: Tensor
    logits: Tensor | None = None
    head_logits: dict[str, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    decoder_hidden_states: Tensor | None = None
    all_hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class Attention(nn.Module):
    """Multi-head attention (self or cross) with its own head count and head width.

    Self-attention follows config.positions: "rotary" rotates q and k; "relative" adds T5's
    learned bias per head and distance bucket (`relative`, (buckets, n_heads)), bidirectional
    unless `causal` (the decoder's).
    """

    def __init__(self, config: Config, shape: LayerShape, *, cross: bool = False, causal: bool = False):
        super().__init__()
        self.rotary = config.positions == "rotary" and not cross
        self.n_heads, self.head_dim = shape.n_heads, shape.head_dim
        inner, dim, bias = shape.n_heads * shape.head_dim, config.dim, config.linear_bias
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        self.relative = None
        if config.positions == "relative" and not cross:
            self.relative = nn.Embedding(config.relative_buckets, shape.n_heads)
            self.bucket_args = (config.relative_buckets, config.relative_max_distance, not causal)
        self.dropout = config.attention_dropout

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        key_mask: Tensor | None,
        *,
        causal: bool,
        backend: str,
        need_weights: bool,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (B,T,dim) over itself (memory None) or over memory (B,Tm,dim); `cache` holds earlier keys."""
        start = cache.length if cache is not None and memory is None else 0
        q = self._split(self.q_proj(x))
        if self.rotary:
            q = rotate(q, start)
        k, v = self._keys_values(x, memory, cache, start)
        bias = None if self.relative is None else self._position_bias(start, q.shape[2], k.shape[2])
        dropout = self.dropout if self.training else 0.0
        if need_weights:  # the kernels and sdpa return no weights
            warn_fallback(
                backend, "reference", "output_attentions=True: the Triton kernels return no attention weights"
            )
            out, weights = reference_attention(q, k, v, key_mask=key_mask, causal=causal, dropout=dropout, bias=bias)
        else:
            opts = dict(key_mask=key_mask, causal=causal, dropout=dropout, bias=bias)
            out, weights = attend(q, k, v, backend=backend, **opts), None
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.out_proj(out), weights

    def _position_bias(self, start: int, tq: int, tk: int) -> Tensor:
        """T5's relative position bias (1, H, Tq, Tk) for queries at start..start+Tq-1 over keys 0..Tk-1."""
        device = self.relative.weight.device
        queries = torch.arange(start, start + tq, device=device)
        buckets = relative_buckets(queries, torch.arange(tk, device=device), *self.bucket_args)
        # The table is indexed, not called: torch-pruning then leaves it out of the heads' group (it would map
        # H*D channels onto H columns wrongly); Prune drops the pruned heads' columns itself.
        return self.relative.weight[buckets].permute(2, 0, 1).unsqueeze(0)

    def _keys_values(self, x: Tensor, memory: Tensor | None, cache: LayerCache | None, start: int):
        """Keys and values (B,H,S,D): of memory (computed once per cache), or of x after the cached ones."""
        if memory is not None and cache is not None and cache.memory_keys is not None:
            return cache.memory_keys, cache.memory_values
        kv = x if memory is None else memory
        k, v = self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
        if self.rotary:
            k = rotate(k, start)
        if cache is None:
            return k, v
        if memory is not None:
            cache.memory_keys, cache.memory_values = k, v
            return k, v
        return cache.extend(k, v)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: up-projection, activation, down-projection.

    Gated (Config.ffn_gated, T5 v1.1): down(act(gate(x)) * up(x)).
    """

    def __init__(self, config: Config, ffn_dim: int):
        super().__init__()
        dim, bias = config.dim, config.linear_bias
        self.gate = nn.Linear(dim, ffn_dim, bias=bias) if config.ffn_gated else None
        self.up = nn.Linear(dim, ffn_dim, bias=bias)
        self.act = ACTIVATIONS[config.activation]()
        self.down = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One transformer layer: self-attention, cross-attention (decoder only), FFN; post- or pre-LN."""

    def __init__(self, config: Config, shape: LayerShape, cross: bool):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.self_attn = Attention(config, shape, causal=cross)  # the decoder's (with cross-attention) is causal
        self.attn_norm = norm_layer(config)
        self.cross_attn = Attention(config, shape, cross=True) if cross else None
        self.cross_norm = norm_layer(config) if cross else None
        self.ffn = FeedForward(config, shape.ffn_dim)
        self.ffn_norm = norm_layer(config)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> tuple[Tensor, Tensor | None]:
        if self.pre_norm:
            y, weights = fn(norm(x))
            return x + self.dropout(y), weights
        y, weights = fn(x)
        return norm(x + self.dropout(y)), weights

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None,
        *,
        causal: bool,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        backend: str,
        need_weights: bool,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        opts = dict(backend=backend, need_weights=need_weights, cache=cache)
        x, weights = self._residual(
            x, self.attn_norm, lambda h: self.self_attn(h, None, key_mask, causal=causal, **opts)
        )
        if self.cross_attn is not None:
            x, _ = self._residual(
                x, self.cross_norm, lambda h: self.cross_attn(h, memory, memory_mask, causal=False, **opts)
            )
        x, _ = self._residual(x, self.ffn_norm, lambda h: (self.ffn(h), None))
        return x, weights


class Stack(nn.Module):
    """A sequence of layers; `share[i]` is the block that layer i runs, so tied layers hold one set of weights."""

    def __init__(self, config: Config, shapes: tuple[LayerShape, ...], share: tuple[int, ...], cross: bool):
        super().__init__()
        first_use = {block: layer for layer, block in reversed(list(enumerate(share)))}
        self.blocks = nn.ModuleList(Block(config, shapes[first_use[b]], cross) for b in range(len(first_use)))
        self.share = share
        self.final_norm = norm_layer(config) if config.norm == "pre" else None

    def forward(
        self,
        x,
        key_mask,
        *,
        causal=False,
        memory=None,
        memory_mask=None,
        backend="auto",
        hidden_states=False,
        attentions=False,
        caches=None,
    ):
        """Returns (last hidden (B,T,dim), [input + each layer's output] or None, [each layer's weights] or None).

        caches: one LayerCache per layer (not per block: shared blocks see different inputs), or None.
        """
        hiddens = [x] if hidden_states else None
        weights = [] if attentions else None
        for layer, block_index in enumerate(self.share):
            x, w = self.blocks[block_index](
                x,
                key_mask,
                causal=causal,
                memory=memory,
                memory_mask=memory_mask,
                backend=backend,
                need_weights=attentions,
                cache=None if caches is None else caches[layer],
            )
            if hidden_states:
                hiddens.append(x)
            if attentions:
                weights.append(w)
        if self.final_norm is not None:
            x = self.final_norm(x)
            if hidden_states:
                hiddens[-1] = x
        return x, hiddens, weights


class Transformer(nn.Module):
    """An encoder(-decoder) transformer built entirely from a Config.

    `model(**batch)` takes the batch dict (input_ids, attention_mask, token_type_ids, optional
    decoder_input_ids / decoder_attention_mask and label keys) and returns an `Output`.
    `attention_backend` ("auto", "reference", "sdpa", ...) may be changed at any time.
    """

    def __init__(self, config: Config, *, attention_backend: str = "auto"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a model.Config, got {type(config).__name__}")
        self.config = config
        self.attention_backend = attention_backend
        self.tokenizer = None  # a tokenizers.Tokenizer, attached by from_hf/pretraining/load
        self.embeddings = Embeddings(config)
        self.decoder_embeddings = None
        if config.decoder_embeddings == "own_positions":
            self.decoder_embeddings = Embeddings(config, own_words=False)
        self.encoder = Stack(config, config.encoder, config.encoder_share, cross=False)
        self.decoder = Stack(config, config.decoder, config.decoder_share, cross=True) if config.decoder else None
        needs_pooler = "pair" in config.heads or "classify" in config.heads
        self.pooler = Pooler(config.dim, config.pooler_activation) if needs_pooler else None
        heads = {
            "mlm": lambda: MaskedLMHead(config),
            "pair": lambda: nn.Linear(config.dim, 2),
            "classify": lambda: nn.Linear(config.dim, config.n_labels),
            "qa": lambda: nn.Linear(config.dim, 2),
            "lm": lambda: LMHead(config),
        }
        self.heads = nn.ModuleDict({name: heads[name]() for name in config.heads})
        self.apply(self._init_weights)
        if config.quantized:  # integer-storage layers; their values come from load_state_dict
            from model.quantized import swap_quantized

            swap_quantized(self, config.quantized)

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        choose_backend(torch.empty(0), name)  # validates the name
        self._attention_backend = name

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        hidden_states: bool = False,
        attentions: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
        """Run the encoder: returns (hidden (B,T,dim), all hidden states or None, attention maps or None)."""
        attention_mask = check_ids(self.config, input_ids, attention_mask, "input_ids", "attention_mask")
        if token_type_ids is not None:
            check_token_types(self.config, token_type_ids, input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(
            x, attention_mask.bool(), backend=self.attention_backend, hidden_states=hidden_states, attentions=attentions
        )

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        decoder_attention_mask: Tensor | None = None,
        *,
        caches: list[LayerCache] | None = None,
    ) -> Tensor:
        """Run the decoder over encoder output `memory` (B,T,dim): returns the last decoder layer (B,S,dim).

        caches: one LayerCache per decoder layer (generation). The tokens they hold are not run
        again: only decoder_input_ids[:, cached:] are, and only their states come back; the cached
        keys are all attended to (decoder_attention_mask must be None).
        """
        mask = self._check_decoder_ids(decoder_input_ids, decoder_attention_mask, memory)
        if caches is not None and decoder_attention_mask is not None:
            raise ValueError("decoding with a key/value cache attends to every cached token: no decoder_attention_mask")
        y = self.embed_decoder(decoder_input_ids, start=0 if caches is None else caches[0].length)
        y, _, _ = self.decoder(
            y,
            mask.bool() if caches is None else None,
            causal=y.shape[1] > 1,
            memory=memory,
            memory_mask=memory_mask.bool(),
            backend=self.attention_backend,
            caches=caches,
        )
        return y

    def embed_decoder(self, decoder_input_ids: Tensor, *, start: int = 0) -> Tensor:
        """The decoder's input vectors (B,S-start,dim): its own positions and norm, or the shared embeddings."""
        if self.decoder_embeddings is None:
            return self.embeddings(decoder_input_ids, start=start)
        return self.decoder_embeddings(decoder_input_ids, start=start, words=self.embeddings)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **options: Any) -> Tensor:
        """Greedy or beam-search decoding with a key/value cache; see `model.generate.generate` for the options."""
        from model.generate import generate

        return generate(self, input_ids, attention_mask, **options)

    def _check_decoder_ids(self, ids: Tensor, mask: Tensor | None, encoded: Tensor) -> Tensor:
        """Validate the decoder's ids and mask against the encoder batch `encoded` (ids or memory); returns the mask."""
        if self.decoder is None:
            raise ValueError("decoder_input_ids given but this model has no decoder layers (decoder=[])")
        mask = check_ids(self.config, ids, mask, "decoder_input_ids", "decoder_attention_mask")
        if isinstance(encoded, Tensor) and encoded.dim() and len(encoded) != len(ids):
            raise ValueError(
                f"decoder_input_ids has {len(ids)} rows but the encoder batch has {len(encoded)}; one target per source"
            )
        return mask

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **labels: Tensor,
    ) -> Output:
        """Run the model on one batch; label keys (mlm_labels, pair_labels, labels, ...) add `loss`."""
        unknown = sorted(set(labels) - set(LABEL_KEYS))
        if unknown:
            allowed = [
                "input_ids",
                "attention_mask",
                "token_type_ids",
                "decoder_input_ids",
                "decoder_attention_mask",
                *LABEL_KEYS,
            ]
            raise TypeError(f"unexpected batch keys {unknown}; allowed keys: {allowed}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids) if isinstance(input_ids, Tensor) else None
        if decoder_input_ids is None and ("decoder_labels" in labels or decoder_attention_mask is not None):
            raise ValueError("decoder_labels and decoder_attention_mask need decoder_input_ids (the decoder's input)")
        eos_pooled = self.config.classify_pooling == "eos"
        if eos_pooled and decoder_input_ids is None:  # BART's classifier runs the decoder on the shifted source
            decoder_input_ids = shift_right(input_ids, self.config.decoder_start_id)
        if decoder_input_ids is not None:  # checked now: no kernel may run on a batch that will be refused
            self._check_decoder_ids(decoder_input_ids, decoder_attention_mask, input_ids)
        if eos_pooled and isinstance(input_ids, Tensor):
            check_eos_rows(input_ids, decoder_input_ids, self.config.eos_id)
        if labels and isinstance(input_ids, Tensor):
            check_labels(self.config, labels, input_ids, decoder_input_ids)
        h, hiddens, weights = self.encode(
            input_ids, attention_mask, token_type_ids, hidden_states=output_hidden_states, attentions=output_attentions
        )
        out = Output(
            hidden_states=h,
            all_hidden_states=tuple(hiddens) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
        )
        if decoder_input_ids is not None:
            out.decoder_hidden_states = self.decode(decoder_input_ids, h, attention_mask, decoder_attention_mask)
        pooled = None
        if self.pooler is not None:
            pooled = self.pooler(
                last_eos(out.decoder_hidden_states, input_ids, self.config.eos_id) if eos_pooled else h
            )
        for name, head in self.heads.items():
            if name == "mlm":
                out.head_logits[name] = head(h, self.embeddings)
            elif name == "lm":
                if out.decoder_hidden_states is not None:
                    out.head_logits[name] = head(out.decoder_hidden_states, self.embeddings)
            elif name == "qa":
                out.head_logits[name] = head(h)
            else:
                out.head_logits[name] = head(pooled)
        out.logits = next(iter(out.head_logits.values()), None)
        if labels:
            out.losses = task_losses(out.head_logits, labels)
            out.loss = sum(out.losses.values())
        return out
