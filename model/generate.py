"""Seq2seq decoding for the Transformer: greedy and beam search over a key/value cache, by transformers' rules."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import LayerCache
from model.config import Config, check_int

# step(tokens (R, S) int64) -> next-token logits (R, vocab) float32; reorder(rows (R,)) keeps those rows' state.
Step = Callable[[Tensor], Tensor]
Reorder = Callable[[Tensor], None]
_NEG = -1.0e9  # transformers' "never pick this" score


def _eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int) -> list[int]:
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        check_int("eos_token_id", i, 0)
        if i >= vocab_size:
            raise ValueError(f"eos_token_id must be < vocab_size ({vocab_size}), got {i}")
    return ids


def forcing(step: Step, max_len: int, bos: int | None, eos: int | None) -> Step:
    """`step` with transformers' ForcedBOS/ForcedEOS processors: only bos after the start token, only eos at the end.

    Forcing logits to (-inf, ..., 0 at the id, ...) equals forcing log-probabilities, so greedy and
    beam search both take the wrapped step.
    """
    if bos is None and eos is None:
        return step

    def forced(tokens: Tensor) -> Tensor:
        scores, cur = step(tokens), tokens.shape[1]
        forced_id = bos if cur == 1 else eos if cur == max_len - 1 else None
        if forced_id is None:
            return scores
        scores = torch.full_like(scores, -math.inf)
        scores[:, forced_id] = 0
        return scores

    return forced


def greedy_search(step: Step, start: Tensor, max_new_tokens: int, eos: list[int], pad: int) -> Tensor:
    """Greedy decoding from `start` (R,1): argmax each step; a row that produced an eos continues with pad.

    Stops once every row has ended (transformers' `_sample` with do_sample=False). Returns (R, 1 + steps).
    """
    tokens, running = start, torch.ones(len(start), dtype=torch.bool, device=start.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=start.device)
    for _ in range(max_new_tokens):
        chosen = step(tokens).argmax(dim=-1)
        if eos:
            chosen = torch.where(running, chosen, torch.full_like(chosen, pad))
        tokens = torch.cat((tokens, chosen[:, None]), dim=1)
        running &= ~torch.isin(chosen, eos_t)
        if not running.any():
            break
    return tokens


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """Beams `index` (B,K) of t (B,N,...): transformers' `_gather_beams`."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class _Beams:
    """The state of a vectorized beam search (transformers >= 4.50's `_beam_search`, decoder prompt of 1 token).

    running (B,N,L) and running_scores (B,N): the live hypotheses; done (B,N,L), scores,
    lengths (generated tokens) and finished (B,N): the best completed ones; improvable (B,1).
    """

    def __init__(self, start: Tensor, n: int, max_len: int, fill: int):
        b = len(start)
        self.running = torch.full((b, n, max_len), fill, dtype=torch.long, device=start.device)
        self.running[:, :, 0] = start[:, None]
        self.done = self.running.clone()
        self.running_scores = torch.zeros(b, n, device=start.device)
        self.running_scores[:, 1:] = _NEG  # only beam 0 expands at first, so beams do not repeat each other
        self.scores = torch.full((b, n), _NEG, device=start.device)
        self.lengths = torch.zeros(b, n, dtype=torch.long, device=start.device)
        self.finished = torch.zeros(b, n, dtype=torch.bool, device=start.device)
        self.improvable = torch.ones(b, 1, dtype=torch.bool, device=start.device)

    def advance(self, log_probs: Tensor, cur: int, eos: Tensor, keep: int, options: dict) -> tuple[Tensor, Tensor]:
        """One step from log_probs (B*N, V) at length `cur`; returns (flat source row of each new beam, hits (B,K))."""
        b, n, _ = self.running.shape
        vocab = log_probs.shape[-1]
        total = (log_probs.view(b, n, vocab) + self.running_scores[:, :, None]).view(b, n * vocab)
        top_scores, top_index = torch.topk(total, k=keep)
        beam, token = top_index // vocab, top_index % vocab
        top_seqs = _gather(self.running, beam)
        top_seqs[:, :, cur] = token
        rows = beam + torch.arange(b, device=beam.device)[:, None] * n
        hits = torch.isin(token, eos) | (cur + 1 >= self.running.shape[2])
        alive = top_scores + hits.to(torch.float32) * _NEG
        nxt = torch.topk(alive, k=n)[1]
        self.running, self.running_scores = _gather(top_seqs, nxt), _gather(alive, nxt)
        self._finish(top_seqs, top_scores, hits, cur, options)
        return _gather(rows, nxt).flatten(), hits

    def _finish(self, top_seqs: Tensor, top_scores: Tensor, hits: Tensor, cur: int, options: dict) -> None:
        """Merge the hypotheses that just ended (among the first N candidates) into the finished ones."""
        n = self.running.shape[1]
        just = hits & (torch.arange(hits.shape[1], device=hits.device) < n)
        cand = top_scores / (cur ** options["length_penalty"])  # cur tokens generated, the start token not counted
        full = self.finished.all(dim=-1, keepdim=True) & (options["early_stopping"] is True)
        cand += full.to(torch.float32) * _NEG
        cand += (~self.improvable).to(torch.float32) * _NEG
        cand += (~just) * _NEG
        best = torch.topk(torch.cat((self.scores, cand), dim=1), k=n)[1]
        self.done = _gather(torch.cat((self.done, top_seqs), dim=1), best)
        self.scores = _gather(torch.cat((self.scores, cand), dim=1), best)
        self.lengths = _gather(torch.cat((self.lengths, torch.full_like(just, cur, dtype=torch.long)), dim=1), best)
        self.finished = _gather(torch.cat((self.finished, just), dim=1), best)

    def may_improve(self, cur: int, options: dict) -> None:
        """transformers' `_check_early_stop_heuristic` at the new length `cur`."""
        penalty, max_len = options["length_penalty"], self.running.shape[2]
        best_len = max_len - 1 if options["early_stopping"] == "never" and penalty > 0.0 else cur - 1
        best_running = self.running_scores[:, :1] / (best_len**penalty)
        worst = torch.where(self.finished, torch.min(self.scores, dim=1, keepdim=True)[0], _NEG)
        self.improvable &= torch.any(best_running > worst, dim=-1, keepdim=True)


def beam_search(
    step: Step,
    reorder: Reorder,
    start: Tensor,
    *,
    max_new_tokens: int,
    num_beams: int,
    eos: list[int],
    fill: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> Tensor:
    """Beam search from `start` (B,); `step` sees the B*N running rows (beams of a source adjacent).

    Args:
        step, reorder: next-token logits of the running rows; keep the given rows' state (cache).
        max_new_tokens, num_beams, eos: the search's length, width and end tokens.
        fill: the id after a hypothesis's end (transformers: pad_token_id or, when that is 0 or
            None, the first eos; -1 without eos).
        length_penalty, early_stopping: as transformers' (scores / length**penalty; True, False, "never").

    Returns the best hypothesis of each source (B, 1 + longest generated), as transformers does.
    """
    options = dict(length_penalty=length_penalty, early_stopping=early_stopping)
    beams = _Beams(start, num_beams, 1 + max_new_tokens, fill)
    keep = max(2, 1 + len(eos)) * num_beams
    eos_t = torch.tensor(eos, dtype=torch.long, device=start.device)
    cur = 1
    while True:
        log_probs = F.log_softmax(step(beams.running[:, :, :cur].flatten(0, 1)).float(), dim=-1)
        rows, hits = beams.advance(log_probs, cur, eos_t, keep, options)
        reorder(rows)
        cur += 1
        beams.may_improve(cur, options)
        all_full = beams.finished.all() & (early_stopping is True)
        if not (beams.improvable.any() & ~all_full & ~hits.all()):
            break
    return beams.done[:, 0, : 1 + int(beams.lengths[:, 0].max())]


@dataclass(frozen=True)
class Search:
    """Checked decoding options with transformers' defaults resolved; `run` decodes with any cached decoder.

    PyTorch (`generate`) and ONNX Runtime (`model.onnx.runtime.OrtModel.generate`) both decode
    through `run`, so they follow one rule for start, end and padding tokens, forcing and beams.
    """

    max_new_tokens: int
    num_beams: int
    start_id: int
    eos: tuple[int, ...]
    pad_id: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    length_penalty: float
    early_stopping: bool | str

    @classmethod
    def of(
        cls,
        config: Config,
        *,
        max_new_tokens: int,
        num_beams: int = 1,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        decoder_start_token_id: int | None = None,
        forced_bos_token_id: int | None = None,
        forced_eos_token_id: int | None = None,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        **unknown: object,
    ) -> Search:
        """Check the options against `config` (an encoder-decoder with an 'lm' head); see `generate` for their meaning."""
        if unknown:  # transformers' sampling and other options: refused by name, with the ones there are
            known = [name for name in inspect.signature(cls.of).parameters if name not in ("config", "unknown")]
            raise TypeError(
                f"generate() has no option {', '.join(sorted(unknown))} (decoding is greedy or beam search); "
                f"its options: {', '.join(known)}"
            )
        if "lm" not in config.heads or not config.decoder:
            raise ValueError("generate needs an encoder-decoder model with an 'lm' head")
        check_int("max_new_tokens", max_new_tokens, 1)
        check_int("num_beams", num_beams, 1)
        if max_new_tokens + 1 > config.max_positions:
            raise ValueError(f"max_new_tokens + 1 must be <= max_positions ({config.max_positions})")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise TypeError(f"length_penalty must be a number, got {length_penalty!r}")
        pad = config.pad_id if pad_token_id is None else pad_token_id
        start = decoder_start_token_id
        if start is None:
            start = config.pad_id if config.decoder_start_id is None else config.decoder_start_id
        ids = dict(pad_token_id=pad, decoder_start_token_id=start)
        ids.update(forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id)
        for name, value in ids.items():
            if value is not None:
                check_int(name, value, 0)
                if value >= config.vocab_size:
                    raise ValueError(f"{name} must be < vocab_size ({config.vocab_size}), got {value}")
        eos = _eos_ids(config.eos_id if eos_token_id is None else eos_token_id, config.vocab_size)
        return cls(
            max_new_tokens,
            num_beams,
            start,
            tuple(eos),
            pad,
            forced_bos_token_id,
            forced_eos_token_id,
            float(length_penalty),
            early_stopping,
        )

    def run(self, step: Step, reorder: Reorder, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """Decode `batch` sources; `step` sees batch * num_beams rows (a source's beams adjacent) and keeps their cache.

        Args:
            step: tokens so far (R, S) -> next-token logits (R, vocab); the cache holds all but the last token.
            reorder: keep the given rows' cache (beam search; never called for greedy).
            batch, device: the number of sources and where the ids live.

        Returns (batch, 1 + steps) int64, starting with the start token.
        """
        step = forcing(step, 1 + self.max_new_tokens, self.forced_bos_token_id, self.forced_eos_token_id)
        start = torch.full((batch,), self.start_id, dtype=torch.long, device=device)
        eos = list(self.eos)
        if self.num_beams == 1:
            return greedy_search(step, start[:, None], self.max_new_tokens, eos, self.pad_id)
        fill = (self.pad_id or eos[0]) if eos else -1  # transformers' own rule, a pad id of 0 included
        return beam_search(
            step,
            reorder,
            start,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            eos=eos,
            fill=fill,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
        )


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **options) -> Tensor:
    """Decode with a key/value cache: the same ids as transformers' `generate(do_sample=False, num_beams=N)`.

    Args:
        model: an encoder-decoder Transformer with an 'lm' head (run as it is: call eval() first).
        input_ids, attention_mask: the encoder batch (B,T).
        options (keywords, checked by `Search.of`):
          max_new_tokens: tokens generated after the start token, at most (required).
          num_beams: 1 = greedy (default), else beam search of that width.
          eos_token_id: the id(s) that end a sequence (None: config.eos_id; both None: run max_new_tokens).
          pad_token_id: what follows an end (None: config.pad_id).
          decoder_start_token_id: the decoder's first token (None: config.decoder_start_id, else config.pad_id).
          forced_bos_token_id, forced_eos_token_id: the only token allowed first (mBART's language
            id) and last (at max_new_tokens; BART's and Marian's generation configs set it).
          length_penalty, early_stopping: beam search's, as transformers' (defaults 1.0 and False).

    Returns (B, 1 + steps) int64, starting with the start token.
    """
    search = Search.of(model.config, **options)
    memory, _, _ = model.encode(input_ids, attention_mask)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    n = search.num_beams
    memory, mask = memory.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    caches = [LayerCache() for _ in range(model.config.decoder_layers)]

    def step(tokens: Tensor) -> Tensor:
        hidden = model.decode(tokens, memory, mask, caches=caches)[:, -1:]  # (R, 1, dim)
        return model.heads["lm"](hidden, model.embeddings)[:, -1].float()

    def reorder(rows: Tensor) -> None:
        for cache in caches:
            cache.reorder(rows)

    return search.run(step, reorder, len(input_ids), input_ids.device)
