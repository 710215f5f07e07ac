"""The token embeddings of the Transformer: word (optionally factorized or adaptive), token type and position vectors, the tied unembedding, and the norm every layer uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import Config
from model.positions import sinusoid


def norm_layer(config: Config) -> nn.Module:
    """The norm every layer uses: LayerNorm, or RMSNorm without bias (Config.norm_type="rms", T5)."""
    if config.norm_type == "rms":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class Embeddings(nn.Module):
    """Word (vocab x embed_dim, projected to dim when factorized, times embed_scale) + token type + position, then LayerNorm.

    With `config.embed_full_rows` = K > 0 (adaptive input embeddings), K vocabulary rows also add a
    full-width correction: `word_full` holds K + 1 rows of width dim (row 0 is the zero row every
    other token reads), and the int32 buffer `full_slot` (vocab,) names each token's row. A token's
    vector is then `word_proj(word[i]) + word_full[full_slot[i]]`, everywhere the table is used.
    Positions follow `config.positions` (see Config). `own_words=False` builds only the position
    table and LayerNorm: the decoder's own (Config.decoder_embeddings="own_positions"), which reads
    its word vectors from the encoder's Embeddings (`forward(words=...)`).
    """

    def __init__(self, config: Config, *, own_words: bool = True):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.embed_dim) if own_words else None
        self.word_proj = None
        if own_words and config.embed_dim < config.dim:
            self.word_proj = nn.Linear(config.embed_dim, config.dim, bias=False)
        self.word_full = None
        if own_words and config.embed_full_rows:
            self.word_full = nn.Embedding(config.embed_full_rows + 1, config.dim, padding_idx=0)
            self.register_buffer("full_slot", torch.zeros(config.vocab_size, dtype=torch.int32))
        self.scale = config.embed_scale
        self.position = nn.Embedding(config.position_rows, config.dim) if config.position_rows else None
        self.sinusoidal = config.positions == "sinusoidal"
        self.pad_id = config.pad_id if config.positions == "padding_offset" else None
        types = own_words and config.type_vocab_size
        self.token_type = nn.Embedding(config.type_vocab_size, config.dim) if types else None
        self.norm = norm_layer(config) if config.embed_norm else None
        self.dropout = nn.Dropout(config.dropout)

    def lookup(self, input_ids: Tensor) -> Tensor:
        """Word vectors (B,T) -> (B,T,dim): factors multiplied, full-width corrections added, times embed_scale."""
        x = self.word(input_ids)  # (B, T, E)
        if self.word_proj is not None:
            x = self.word_proj(x)  # (B, T, dim)
        if self.word_full is not None:
            x = x + self.word_full(self.full_slot[input_ids].long())  # row 0 (zeros) for tokens without a correction
        return x * self.scale if self.scale != 1.0 else x

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        *,
        start: int = 0,
        words: Embeddings | None = None,
    ) -> Tensor:
        """Embed input_ids[:, start:] (B,T) -> (B,T-start,dim); positions still count from the sequence's start.

        Args:
            input_ids, token_type_ids: the whole sequence (B,T) and its token types.
            start: tokens before it are already in a key/value cache (decoding); they are not embedded.
            words: the Embeddings holding the word table, when this one has none (own_words=False).
        """
        new = input_ids[:, start:]
        x = (words or self).lookup(new)
        if self.token_type is not None:  # before positions: Hugging Face's order, so imports match bit for bit
            types = torch.zeros_like(new) if token_type_ids is None else token_type_ids[:, start:]
            x = x + self.token_type(types)
        if self.position is not None:  # rotary positions act inside attention instead
            x = x + self.position(self._positions(input_ids)[..., start:])
        elif self.sinusoidal:
            x = x + sinusoid(input_ids.shape[1], x.shape[-1], x.device)[start:].to(x.dtype)
        return self.dropout(self.norm(x) if self.norm is not None else x)

    def _positions(self, input_ids: Tensor) -> Tensor:
        """Position ids: 0..T-1, or RoBERTa's (counting non-padding tokens from pad_id + 1; padding gets pad_id)."""
        if self.pad_id is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,), broadcast over the batch
        real = (input_ids != self.pad_id).long()
        return torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)

    def unembed(self, h: Tensor) -> Tensor:
        """Logits over the vocabulary with the (tied) word embeddings: (B,T,dim) -> (B,T,vocab)."""
        logits = (h @ self.word_proj.weight if self.word_proj is not None else h) @ self.word.weight.T
        if self.word_full is not None:
            logits = logits + (h @ self.word_full.weight.T).index_select(
                -1, self.full_slot
            )  # (B, T, K+1) -> (B, T, vocab)
        return logits

    def word_matrix(self) -> Tensor:
        """The effective (vocab, dim) word table: factors multiplied out, full-width corrections added."""
        w = self.word.weight
        if self.word_proj is not None:
            w = w @ self.word_proj.weight.T  # (V, E) @ (E, dim)
        if self.word_full is not None:
            w = w + self.word_full.weight[self.full_slot]
        return w
