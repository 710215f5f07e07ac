"""Transformer.generate: cached greedy and beam search give the tokens of the uncached reference, options are checked."""

import pytest
import torch

from model import Config, Transformer
from model.attention import LayerCache
from model.generate import beam_search, forcing, greedy_search

START = 1
CASES = {
    "tiny": dict(),
    "shared decoder blocks": dict(decoder_share=(0, 0)),  # one block, two layers: the cache is per layer
    "rotary": dict(positions="rotary"),
    "padding offset": dict(positions="padding_offset", pad_id=1),
    "own decoder positions, untied head": dict(decoder_embeddings="own_positions", lm_head_tied=False),
    "sinusoidal, scaled, no embedding norm": dict(positions="sinusoidal", embed_scale=8.0, embed_norm=False),
}


def _model(**overrides) -> Transformer:
    """The tiny preset with weights spread out (std 0.3), so that greedy and beam choices vary from step to step."""
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _batch(pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(6, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, :2] = 0, 0
    return ids.masked_fill(mask == 0, pad_id), mask


def _uncached_step(model, ids, mask, num_beams: int = 1):
    """The reference: the whole model on the whole prefix at every step (no cache)."""
    ids, mask = ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)

    def step(tokens):
        return model(ids, mask, decoder_input_ids=tokens).head_logits["lm"][:, -1].float()

    return step


def _eos(model, ids, mask) -> int:
    """An end token that row 0 produces (early) and row 1 never does: one row ends and is padded, another runs on."""
    free = model.generate(ids, mask, max_new_tokens=16, decoder_start_token_id=START)
    eos = next((t for t in free[0, 1:].tolist() if t not in free[1].tolist()), None)
    assert eos is not None, "rows 0 and 1 say the same: pick another seed"
    return eos


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_cached_greedy_is_the_uncached_reference(overrides):
    model = _model(**overrides)
    ids, mask = _batch(model.config.pad_id)
    eos = _eos(model, ids, mask)
    got = model.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, decoder_start_token_id=START)
    start = torch.full((3, 1), START)
    want = greedy_search(_uncached_step(model, ids, mask), start, 16, [eos], model.config.pad_id)
    assert torch.equal(got, want)
    assert got.shape[1] == 17 and eos not in got[1].tolist() and eos in got[0].tolist()


@pytest.mark.parametrize("overrides", list(CASES.values())[:3], ids=list(CASES)[:3])
@torch.no_grad()
def test_cached_beam_search_is_the_uncached_reference(overrides):
    model = _model(**overrides)
    ids, mask = _batch(model.config.pad_id)
    eos = _eos(model, ids, mask)
    options = dict(max_new_tokens=12, eos_token_id=eos, decoder_start_token_id=START)
    got = model.generate(ids, mask, num_beams=3, **options)
    start = torch.full((3,), START)
    step = _uncached_step(model, ids, mask, num_beams=3)
    # transformers pads ended beams with the first eos when pad_token_id is 0
    want = beam_search(step, lambda rows: None, start, max_new_tokens=12, num_beams=3, eos=[eos], fill=eos)
    assert torch.equal(got, want)
    assert not torch.equal(got, model.generate(ids, mask, **options))  # beams found other sequences than greedy


@torch.no_grad()
def test_cache_holds_every_decoder_layer_and_the_memory_once():
    model = _model(decoder_share=(0, 0))
    ids, mask = _batch()
    memory, _, _ = model.encode(ids, mask)
    caches = [LayerCache() for _ in range(2)]
    tokens = torch.full((3, 1), START)
    model.decode(tokens, memory, mask, caches=caches)
    first = caches[0].memory_keys
    model.decode(torch.cat((tokens, tokens), 1), memory, mask, caches=caches)
    assert [c.length for c in caches] == [2, 2] and caches[0].memory_keys is first
    assert not torch.equal(caches[0].keys, caches[1].keys)  # one block, but the layers see different inputs


def test_forced_tokens_come_first_and_last():
    step = forcing(lambda tokens: torch.zeros(len(tokens), 10), 4, 7, 3)
    got = greedy_search(step, torch.zeros(2, 1, dtype=torch.long), 3, [], 0)
    assert got.tolist() == [[0, 7, 0, 3]] * 2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=128), r"max_new_tokens \+ 1 must be <= max_positions \(128\)"),
        (dict(max_new_tokens=4, num_beams=0), "num_beams must be >= 1"),
        (dict(max_new_tokens=4, eos_token_id=512), r"eos_token_id must be < vocab_size \(512\)"),
        (dict(max_new_tokens=4, decoder_start_token_id=-1), "decoder_start_token_id must be >= 0"),
        (dict(max_new_tokens=4, num_beams=2, early_stopping="soon"), "early_stopping must be True, False or 'never'"),
    ],
)
def test_bad_options_are_refused(options, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        model.generate(*_batch(), **options)


def test_options_of_the_wrong_type_or_name_are_refused():
    model = _model()
    with pytest.raises(TypeError, match="length_penalty must be a number"):
        model.generate(*_batch(), max_new_tokens=4, num_beams=2, length_penalty="long")
    with pytest.raises(
        TypeError, match=r"generate\(\) has no option do_sample, top_k .*its options: max_new_tokens, num_beams"
    ):
        model.generate(*_batch(), max_new_tokens=4, do_sample=True, top_k=5)


def test_encoder_only_models_do_not_generate():
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    with pytest.raises(ValueError, match="needs an encoder-decoder model with an 'lm' head"):
        model.generate(*_batch(), max_new_tokens=2)
