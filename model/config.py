"""Config: every structural fact of a flashlite model, validated, so weights + config.json rebuild it.

Its per-layer records (LayerShape, QuantizedLayer) and field checks live in model/config_layers.py; import them from
either module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from model.config_layers import (
    LayerShape,
    QuantizedLayer,
    as_quantized,
    as_shapes,
    check_choice,
    check_int,
    check_share,
)

NORMS = ("post", "pre")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
HEADS = ("mlm", "pair", "lm", "classify", "qa")
POSITIONS = ("absolute", "padding_offset", "rotary", "sinusoidal", "relative")
NORM_TYPES = ("layer", "rms")
POOLER_ACTIVATIONS = ("tanh", *ACTIVATIONS)
DECODER_EMBEDDINGS = ("shared", "own_positions")
CLASSIFY_POOLINGS = ("first", "eos")
# Fields added after the first saved models: written to config.json only when they differ from
# these defaults, so a model that does not use them saves byte-identical files (and fingerprints).
_LATER_DEFAULTS = {
    "positions": "absolute",
    "pooler_activation": "tanh",
    "embed_scale": 1.0,
    "embed_norm": True,
    "decoder_embeddings": "shared",
    "lm_head_tied": True,
    "lm_head_scale": 1.0,
    "norm_type": "layer",
    "linear_bias": True,
    "ffn_gated": False,
    "relative_buckets": 32,
    "relative_max_distance": 128,
    "eos_id": None,
    "decoder_start_id": None,
    "classify_pooling": "first",
}


@dataclass(frozen=True)
class Config:
    """The whole structure of a model; `Transformer(config)` builds it and `config.json` stores it.

    Layer shapes are given per layer (`encoder`, `decoder`); `encoder_share[i]` names the weight
    block that encoder layer i runs (equal numbers = shared weights), likewise `decoder_share`.
    `embed_dim < dim` factorizes the word embeddings (vocab x embed_dim, then embed_dim x dim);
    `embed_full_rows` > 0 then gives that many vocabulary rows a full-width (dim) correction on
    top of the factorization (adaptive input embeddings: frequent words keep their exact vectors).
    `heads` lists the task heads; `Output.logits` is the first one's output.
    `positions`: "absolute" numbers tokens 0..T-1 in a learned table; "padding_offset" (RoBERTa,
    XLM-R) numbers only the tokens that are not `pad_id`, from pad_id + 1 on, and gives padding
    tokens position pad_id, so its table has max_positions + pad_id + 1 rows (`position_rows`);
    "rotary" (RoFormer) has no table and rotates each self-attention head's queries and keys by
    position (dims i and i + head_dim/2 paired, base 10000). `max_positions` is always the longest
    sequence the model takes. `pooler_activation`: the sentence-level pooler's activation on the
    first token, "tanh" (BERT, RoBERTa) or one of ACTIVATIONS (DistilBERT: relu; RoFormer: its own).
    "sinusoidal" (Marian) adds a fixed table, sin of t / 10000**(2i/dim) in dims i < dim/2 and cos
    in dims dim/2 + i, computed and never stored.
    `embed_scale` multiplies the word vectors on input (BART/Marian scale_embedding: sqrt(dim)), not
    in the tied output layers; `embed_norm` False drops the LayerNorm after the embeddings (Marian).
    `decoder_embeddings`: "shared" runs the decoder on the encoder's embeddings; "own_positions"
    (BART, mBART) gives the decoder its own position table and embedding LayerNorm, the word table
    still shared. `lm_head_tied` False gives the seq2seq LM head its own (vocab, dim) output matrix;
    `lm_head_scale` multiplies the decoder's output before it (T5 tied: dim**-0.5).
    "relative" (T5) has no table either: every self-attention adds a learned bias per head and
    relative-distance bucket (`relative_buckets` buckets, logarithmic up to `relative_max_distance`;
    bidirectional in the encoder, backward only in the decoder). `norm_type` "rms" makes every norm
    an RMSNorm (no bias, no mean); `linear_bias` False drops the biases of attention and FFN
    projections; `ffn_gated` multiplies the FFN's activated `gate` projection with its `up` one.
    `eos_id` and `decoder_start_id` (None: unknown) are what `Transformer.generate` ends and starts
    the decoder's sequences with when not told (imports take them from config.json).
    `classify_pooling`: what the pooler of the sentence-level heads reads: "first", the encoder's
    first token (BERT's [CLS]); "eos" (BART, mBART), the decoder's last layer at each row's last
    `eos_id` token of input_ids, the decoder run on input_ids shifted right after decoder_start_id
    when no decoder_input_ids are given.
    """

    vocab_size: int
    dim: int
    encoder: tuple[LayerShape, ...]
    decoder: tuple[LayerShape, ...] = ()
    embed_dim: int | None = None
    embed_full_rows: int = 0
    encoder_share: tuple[int, ...] | None = None
    decoder_share: tuple[int, ...] | None = None
    norm: str = "pre"
    activation: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    norm_eps: float = 1e-5
    heads: tuple[str, ...] = ("mlm",)
    n_labels: int = 0
    quantized: tuple[QuantizedLayer, ...] = ()
    positions: str = "absolute"
    pooler_activation: str = "tanh"
    embed_scale: float = 1.0
    embed_norm: bool = True
    decoder_embeddings: str = "shared"
    lm_head_tied: bool = True
    lm_head_scale: float = 1.0
    norm_type: str = "layer"
    linear_bias: bool = True
    ffn_gated: bool = False
    relative_buckets: int = 32
    relative_max_distance: int = 128
    eos_id: int | None = None
    decoder_start_id: int | None = None
    classify_pooling: str = "first"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize JSON lists into tuples once, here
        check_int("vocab_size", self.vocab_size, 1)
        check_int("dim", self.dim, 1)
        set_(self, "encoder", as_shapes("encoder", self.encoder))
        set_(self, "decoder", as_shapes("decoder", self.decoder))
        if not self.encoder:
            raise ValueError("encoder must have at least one layer")
        embed_dim = self.dim if self.embed_dim is None else self.embed_dim
        check_int("embed_dim", embed_dim, 1)
        if embed_dim > self.dim:
            raise ValueError(f"embed_dim must be <= dim ({self.dim}), got {embed_dim}")
        set_(self, "embed_dim", embed_dim)
        check_int("embed_full_rows", self.embed_full_rows, 0)
        if self.embed_full_rows and embed_dim == self.dim:
            raise ValueError(
                f"embed_full_rows={self.embed_full_rows} needs factorized word embeddings (embed_dim < dim={self.dim})"
            )
        if self.embed_full_rows > self.vocab_size:
            raise ValueError(f"embed_full_rows must be <= vocab_size ({self.vocab_size}), got {self.embed_full_rows}")
        set_(self, "encoder_share", check_share("encoder_share", self.encoder_share, self.encoder))
        set_(self, "decoder_share", check_share("decoder_share", self.decoder_share, self.decoder))
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_int("max_positions", self.max_positions, 1)
        check_int("type_vocab_size", self.type_vocab_size, 0)
        check_int("pad_id", self.pad_id, 0)
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id must be < vocab_size ({self.vocab_size}), got {self.pad_id}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
        if (
            isinstance(self.norm_eps, bool)
            or not isinstance(self.norm_eps, (int, float))
            or not 0 < self.norm_eps < math.inf
        ):
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")
        if isinstance(self.heads, str) or not isinstance(self.heads, (list, tuple)):
            raise TypeError(f"heads must be a list of head names from {HEADS}, got {self.heads!r}")
        set_(self, "heads", tuple(self.heads))
        for head in self.heads:
            check_choice("heads", head, HEADS)
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must not repeat a name, got {list(self.heads)}")
        if "lm" in self.heads and not self.decoder:
            raise ValueError("heads contains 'lm' (seq2seq LM) but the model has no decoder layers")
        check_int("n_labels", self.n_labels, 0)
        if ("classify" in self.heads) != (self.n_labels > 0):
            raise ValueError(
                f"n_labels must be >= 1 exactly when heads contains 'classify' (1 = regression); "
                f"got n_labels={self.n_labels} with heads={list(self.heads)}"
            )
        set_(self, "quantized", as_quantized(self.quantized))
        check_choice("positions", self.positions, POSITIONS)
        odd = sorted({s.head_dim for s in (*self.encoder, *self.decoder) if s.head_dim % 2})
        if self.positions == "rotary" and odd:
            raise ValueError(f"positions='rotary' rotates pairs of head dims, so head_dim must be even; got {odd}")
        check_choice("pooler_activation", self.pooler_activation, POOLER_ACTIVATIONS)
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ValueError(f"positions='sinusoidal' pairs sin and cos halves, so dim must be even; got {self.dim}")
        self._check_seq2seq_facts()

    def _check_seq2seq_facts(self) -> None:
        """Validate the embedding and LM-head facts that the imported seq2seq families need."""
        for name in ("embed_scale", "lm_head_scale"):
            scale = getattr(self, name)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
            object.__setattr__(self, name, float(scale))
        for name in ("embed_norm", "lm_head_tied", "linear_bias", "ffn_gated"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_choice("decoder_embeddings", self.decoder_embeddings, DECODER_EMBEDDINGS)
        if self.decoder_embeddings != "shared" and not self.decoder:
            raise ValueError(f"decoder_embeddings={self.decoder_embeddings!r} needs decoder layers")
        if not self.lm_head_tied and "lm" not in self.heads:
            raise ValueError("lm_head_tied=False describes the 'lm' head, but heads has no 'lm'")
        for name in ("eos_id", "decoder_start_id"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, 0)
                if value >= self.vocab_size:
                    raise ValueError(f"{name} must be < vocab_size ({self.vocab_size}), got {value}")
        check_choice("classify_pooling", self.classify_pooling, CLASSIFY_POOLINGS)
        if self.classify_pooling == "eos":
            missing = [n for n in ("eos_id", "decoder_start_id") if getattr(self, n) is None]
            if not self.decoder or missing or "classify" not in self.heads:
                raise ValueError(
                    "classify_pooling='eos' pools the decoder at the last eos token for the 'classify' head: "
                    f"it needs decoder layers, eos_id, decoder_start_id and that head; got {len(self.decoder)} "
                    f"decoder layers, heads={list(self.heads)}" + (f", no {' or '.join(missing)}" if missing else "")
                )
        check_choice("norm_type", self.norm_type, NORM_TYPES)
        check_int("relative_buckets", self.relative_buckets, 2)
        check_int("relative_max_distance", self.relative_max_distance, 1)
        if self.relative_buckets % 2 or self.relative_max_distance <= self.relative_buckets // 2:
            raise ValueError(
                f"relative_buckets ({self.relative_buckets}) must be even and relative_max_distance "
                f"({self.relative_max_distance}) over half of it: the buckets past the exact ones grow logarithmically"
            )

    @property
    def position_rows(self) -> int:
        """Rows of the position table: max_positions, plus pad_id + 1 leading rows for "padding_offset"; 0 without a table."""
        if self.positions in ("rotary", "sinusoidal", "relative"):
            return 0
        return self.max_positions + (self.pad_id + 1 if self.positions == "padding_offset" else 0)

    @property
    def encoder_layers(self) -> int:
        return len(self.encoder)

    @property
    def decoder_layers(self) -> int:
        return len(self.decoder)

    def replace(self, **changes: Any) -> Config:
        """A validated copy with `changes` applied (passes use this to keep config and weights in sync).

        Defaults that were filled in stay defaults: an unfactorized model (embed_dim == dim) stays
        unfactorized when dim changes, and an unshared stack stays unshared when its layers change.
        """
        if "dim" in changes and "embed_dim" not in changes and self.embed_dim == self.dim:
            changes["embed_dim"] = None
        for share, layers in (("encoder_share", "encoder"), ("decoder_share", "decoder")):
            unshared = getattr(self, share) == tuple(range(len(getattr(self, layers))))
            if layers in changes and share not in changes and unshared:
                changes[share] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `Config.from_dict(c.to_dict()) == c`."""
        data = dataclasses.asdict(self)
        for key in ("encoder_share", "decoder_share", "heads", "quantized"):
            data[key] = list(data[key])
        return {k: v for k, v in data.items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a Config from a dict (config.json); unknown keys are refused, naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed keys: {sorted(known)}")
        missing = sorted({"vocab_size", "dim", "encoder"} - set(data))
        if missing:
            raise ValueError(f"config is missing required keys {missing}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def uniform(
        cls,
        *,
        vocab_size: int,
        dim: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        decoder_layers: int = 0,
        **rest: Any,
    ) -> Config:
        """A config whose layers all have one shape; dim must split evenly into n_heads heads."""
        check_int("n_heads", n_heads, 1)
        check_int("n_layers", n_layers, 1)
        check_int("decoder_layers", decoder_layers, 0)
        check_int("dim", dim, 1)
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        shape = LayerShape(n_heads=n_heads, head_dim=dim // n_heads, ffn_dim=ffn_dim)
        return cls(
            vocab_size=vocab_size, dim=dim, encoder=(shape,) * n_layers, decoder=(shape,) * decoder_layers, **rest
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Config:
        """A named configuration: "full" (the full-size encoder-decoder) or "tiny" (fast tests).

        Both have attention_dropout 0.0, so that a model asked to run the Triton kernels (which have
        no dropout) runs them in training too; `dropout` (on the residual branches) stays 0.1.
        """
        presets = {
            # ~22M parameters: big enough to learn from the built-in corpus, small enough to
            # pretrain for a few minutes on 2 CPU cores.
            "full": dict(
                vocab_size=16000,
                dim=384,
                n_layers=6,
                decoder_layers=2,
                n_heads=6,
                ffn_dim=1536,
                max_positions=512,
                heads=("mlm", "pair", "lm"),
                attention_dropout=0.0,  # the Triton kernels have no dropout: with it, training runs sdpa
            ),
            "tiny": dict(
                vocab_size=512,
                dim=64,
                n_layers=2,
                decoder_layers=2,
                n_heads=4,
                ffn_dim=128,
                max_positions=128,
                heads=("mlm", "pair", "lm"),
                attention_dropout=0.0,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets)}")
        return cls.uniform(**{**presets[name], **overrides})
