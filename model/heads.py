"""Task heads of the Transformer (MLM, seq2seq LM, the sentence-level pooler) and the activations they share with the FFN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import Config
from model.embeddings import Embeddings

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense + activation + LayerNorm, then the tied word embeddings and a bias."""

    def __init__(self, config: Config):
        super().__init__()
        self.transform = nn.Linear(config.dim, config.dim)
        self.act = ACTIVATIONS[config.activation]()
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor, embeddings: Embeddings) -> Tensor:
        return embeddings.unembed(self.norm(self.act(self.transform(h)))) + self.bias


class LMHead(nn.Module):
    """Seq2seq LM head on the decoder: times lm_head_scale, the tied word embeddings (or its own `out`) and a bias."""

    def __init__(self, config: Config):
        super().__init__()
        self.out = None if config.lm_head_tied else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.scale = config.lm_head_scale

    def forward(self, h: Tensor, embeddings: Embeddings) -> Tensor:
        if self.scale != 1.0:
            h = h * self.scale
        return (embeddings.unembed(h) if self.out is None else self.out(h)) + self.bias


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh (Config.pooler_activation) on the first ([CLS]) token, feeding the sentence-level heads."""

    def __init__(self, dim: int, activation: str):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.Tanh() if activation == "tanh" else ACTIVATIONS[activation]()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.dense(h[:, 0]))


def shift_right(input_ids: Tensor, start: int) -> Tensor:
    """input_ids (B,T) moved one step right after `start`: the decoder input transformers' BART classifier builds."""
    return torch.cat([torch.full_like(input_ids[:, :1], start), input_ids[:, :-1]], dim=1)


def check_eos_rows(input_ids: Tensor, decoder_input_ids: Tensor, eos_id: int) -> None:
    """Refuse a batch that eos pooling cannot read: a row of input_ids without eos, or decoder ids of another length."""
    if decoder_input_ids.shape[1] != input_ids.shape[1]:
        raise ValueError(
            f"classify_pooling='eos' reads the decoder at input_ids' eos positions: decoder_input_ids must be as "
            f"long as input_ids ({input_ids.shape[1]}), got {decoder_input_ids.shape[1]}"
        )
    if not bool((input_ids == eos_id).any(1).all()):
        raise ValueError(f"classify_pooling='eos': every row of input_ids needs an eos token (id {eos_id})")


def last_eos(decoded: Tensor, input_ids: Tensor, eos_id: int) -> Tensor:
    """The decoder states (B,T,dim) at each row's last eos token of input_ids (B,T), as (B,1,dim) for the Pooler.

    transformers' BART classifier takes the last of the eos positions (and needs every row to
    hold as many); `check_eos_rows` refuses the batches it cannot read.
    """
    eos = input_ids == eos_id
    last = (eos * torch.arange(1, eos.shape[1] + 1, device=eos.device)).argmax(1)  # (B,) the last eos position
    return decoded[torch.arange(len(decoded), device=decoded.device), last].unsqueeze(1)
