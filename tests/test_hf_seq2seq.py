"""from_hf() on encoder-decoders: BART, mBART, Marian, T5 and mT5 match transformers on padded batches and in generate()."""

import json
import os

import pytest
import safetensors.torch
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")

from compress import Pipeline, Prune, Quantize, Share  # noqa: E402
from model import from_hf, load, save  # noqa: E402
from model.onnx.export import export_onnx  # noqa: E402
from model.onnx.runtime import OrtModel  # noqa: E402
from model.positions import sinusoid  # noqa: E402

TOL = 1e-4
VOCAB = 100
_CONFIGS = {
    "Bart": "BartConfig",
    "MBart": "MBartConfig",
    "Marian": "MarianConfig",
    "T5": "T5Config",
    "MT5": "MT5Config",
}


def _family(cls_name: str) -> str:
    return next(f for f in ("MBart", "Bart", "Marian", "MT5", "T5") if cls_name.startswith(f))


def _t5_config(cls_name: str, **overrides):
    """A small T5 config: width 32, 2 + 2 layers of 4 heads of 8, FFN 37, 8 buckets up to distance 12."""
    sizes = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
    sizes.update(relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0)
    return getattr(transformers, _CONFIGS[_family(cls_name)])(vocab_size=VOCAB, **{**sizes, **overrides})


def _config(cls_name: str, **overrides):
    """A small config of the class's family: width 32, 2 + 2 layers, 4 heads, FFN 37, 40 positions."""
    if _family(cls_name) in ("T5", "MT5"):
        return _t5_config(cls_name, **overrides)
    sizes = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
    sizes.update(encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40, dropout=0.0)
    if _family(cls_name) == "Marian":  # Marian's pad and decoder start are the last id
        sizes.update(pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1)
    if _family(cls_name) == "MBart":
        sizes.update(decoder_start_token_id=2)
    config = getattr(transformers, _CONFIGS[_family(cls_name)])
    return config(vocab_size=VOCAB, **{**sizes, **overrides})


def _small(cls_name: str, **overrides):
    """A small random HF model in eval mode, every weight (and final_logits_bias) perturbed so no mapping error hides.

    With untied embeddings transformers 5 gives encoder and decoder their own copies of the word
    table; a real checkpoint holds one table, so they are set equal to `shared` here.
    """
    model = getattr(transformers, cls_name)(_config(cls_name, **overrides)).eval()
    base = [m for name, m in model.named_modules() if name.endswith("embed_tokens")]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("embed_positions.weight") or _family(cls_name) != "Marian":  # Marian's are fixed
                p.add_(torch.randn_like(p) * 0.15)
        for table in base:
            table.weight.copy_(model.get_input_embeddings().weight)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.add_(torch.randn_like(model.final_logits_bias) * 0.1)
    return model


def _folder(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _padded_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Four sources of lengths 12, 7, 3 (right padding) and 9 (left padding); targets of lengths 6, 6, 4, 2."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 1, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:], mask[3, :3] = 0, 0, 0
    targets = torch.randint(3, VOCAB - 1, (4, 6), generator=g)
    target_mask = torch.ones_like(targets)
    target_mask[2, 4:], target_mask[3, 2:] = 0, 0
    return {
        "input_ids": ids.masked_fill(mask == 0, pad_id),
        "attention_mask": mask,
        "decoder_input_ids": targets.masked_fill(target_mask == 0, pad_id),
        "decoder_attention_mask": target_mask,
    }


def _assert_parity(model, hf):
    batch = _padded_batch(hf.config.pad_token_id)
    if model.decoder is None:
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = hf(**batch)
        got = model(**batch)
    if model.decoder is None:
        assert (got.hidden_states - want.last_hidden_state).abs().max().item() <= TOL
        return
    assert (got.hidden_states - want.encoder_last_hidden_state).abs().max().item() <= TOL
    if "lm" in model.config.heads:
        assert got.head_logits["lm"].shape == want.logits.shape
        assert (got.head_logits["lm"] - want.logits).abs().max().item() <= TOL
    else:
        assert (got.decoder_hidden_states - want.last_hidden_state).abs().max().item() <= TOL


CASES = [
    ("BartModel", dict()),
    ("BartForConditionalGeneration", dict()),
    ("BartForConditionalGeneration", dict(tie_word_embeddings=False, scale_embedding=True, activation_function="relu")),
    ("MBartModel", dict()),
    ("MBartForConditionalGeneration", dict(scale_embedding=True)),
    ("MarianModel", dict()),
    ("MarianMTModel", dict(scale_embedding=True, activation_function="swish")),
    ("MarianMTModel", dict(tie_word_embeddings=False)),
    ("T5ForConditionalGeneration", dict(num_decoder_layers=3)),  # v1.0: ReLU, tied head scaled by d_model**-0.5
    ("T5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),  # v1.1
    ("T5Model", dict(feed_forward_proj="gated-silu")),
    ("T5EncoderModel", dict()),
    ("MT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu")),
]


@pytest.mark.parametrize("cls_name, overrides", CASES, ids=[f"{c}-{o}" for c, o in CASES])
def test_padded_batches_match_transformers(cls_name, overrides, tmp_path):
    hf = _small(cls_name, **overrides)
    model = from_hf(_folder(hf, tmp_path))
    head = getattr(hf, "lm_head", None)
    assert model.config.lm_head_tied == (head is None or torch.equal(head.weight, hf.get_input_embeddings().weight))
    _assert_parity(model, hf)


def test_an_untied_flan_t5_folder_of_transformers_4_imports_with_its_own_head(tmp_path):
    """Flan-T5 as published: tie_word_embeddings false, its own lm_head.weight, no output scaling."""
    hf = _small("T5ForConditionalGeneration", feed_forward_proj="gated-gelu")
    folder = _folder(hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(tie_word_embeddings=False)
    del config["scale_decoder_outputs"]
    (folder / "config.json").write_text(json.dumps(config))
    state = safetensors.torch.load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.randn(VOCAB, 32)
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model, again = from_hf(folder), transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert not model.config.lm_head_tied and model.config.lm_head_scale == 1.0
    assert torch.equal(again.lm_head.weight, state["lm_head.weight"])
    _assert_parity(model, again)


def test_an_in_memory_model_imports_like_its_folder(tmp_path):
    hf = _small("MBartForConditionalGeneration")
    _assert_parity(from_hf(hf), hf)


def test_the_config_saves_its_seq2seq_facts(tmp_path):
    model = from_hf(_folder(_small("MarianMTModel", scale_embedding=True, tie_word_embeddings=False), tmp_path))
    save(model, tmp_path / "lite")
    text = (tmp_path / "lite" / "config.json").read_text()
    for key in ('"positions": "sinusoidal"', '"embed_norm": false', '"lm_head_tied": false', '"embed_scale"'):
        assert key in text
    again, batch = load(tmp_path / "lite"), _padded_batch(VOCAB - 1)
    with torch.no_grad():
        assert torch.equal(again(**batch).head_logits["lm"], model(**batch).head_logits["lm"])


def _end_token(model, batch, start: int) -> int:
    """An end token that row 0 produces and row 1 never does when decoding freely: rows end at different steps."""
    free = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12, decoder_start_token_id=start)
    eos = next((t for t in free[0, 1:].tolist() if t not in free[1].tolist()), None)
    assert eos is not None, "rows 0 and 1 decode alike: pick another seed"
    return eos


# Untied heads: random tied ones mostly echo the last token, which would leave little to compare.
_UNTIED = dict(tie_word_embeddings=False, scale_embedding=True)
GENERATE = [
    ("BartForConditionalGeneration", dict(tie_word_embeddings=False), 1),
    ("BartForConditionalGeneration", dict(tie_word_embeddings=False), 4),
    ("MBartForConditionalGeneration", _UNTIED, 1),
    ("MBartForConditionalGeneration", _UNTIED, 3),
    ("MarianMTModel", dict(**_UNTIED, activation_function="swish"), 1),
    ("MarianMTModel", dict(**_UNTIED, activation_function="swish"), 3),
    ("T5ForConditionalGeneration", dict(), 1),
    ("T5ForConditionalGeneration", dict(), 3),
    ("MT5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu"), 3),
]


@pytest.mark.parametrize("cls_name, overrides, num_beams", GENERATE, ids=[f"{c}-beams{n}" for c, _, n in GENERATE])
def test_generate_gives_the_ids_of_transformers(cls_name, overrides, num_beams, tmp_path):
    hf = _small(cls_name, **overrides)
    model = from_hf(_folder(hf, tmp_path))
    batch = _padded_batch(hf.config.pad_token_id)
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    start = hf.config.decoder_start_token_id
    eos = _end_token(model, source, start)
    options = dict(max_new_tokens=12, num_beams=num_beams, decoder_start_token_id=start, eos_token_id=eos)
    if cls_name.startswith("MBart"):  # mBART's target-language token, forced first
        options["forced_bos_token_id"] = 3
    with torch.no_grad():
        want = hf.generate(**source, do_sample=False, forced_eos_token_id=eos, **options)
    got = model.generate(**source, pad_token_id=hf.config.pad_token_id, forced_eos_token_id=eos, **options)
    assert torch.equal(got, want)
    assert "forced_bos_token_id" not in options or (want[:, 1] == 3).all()
    if num_beams == 1:
        assert (want == hf.config.pad_token_id).any(), "no row ended early: the test would not see padding"


def test_marian_with_its_own_decoder_vocabulary_is_refused(tmp_path):
    hf = _small("MarianMTModel")
    hf.config.decoder_vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match=r"decoder_vocab_size \(101\) differs from vocab_size \(100\)"):
        from_hf(hf)


def test_a_decoder_with_its_own_word_table_is_refused(tmp_path):
    hf = _small("BartForConditionalGeneration", tie_word_embeddings=False)
    with torch.no_grad():
        hf.get_decoder().embed_tokens.weight.add_(1.0)
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs from the word table"):
        from_hf(_folder(hf, tmp_path))


def test_an_unsupported_seq2seq_head_is_refused_naming_the_supported(tmp_path):
    hf = transformers.BartForQuestionAnswering(_config("BartForQuestionAnswering"))
    with pytest.raises(ValueError, match="BartForQuestionAnswering is not supported.*BartForSequenceClassification"):
        from_hf(hf)


def _eos_batch(eos_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The padded batch's sources with two eos tokens per row (after the first real token and last), none elsewhere."""
    batch = _padded_batch(pad_id)
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
    ids[ids == eos_id] = 5
    for row, real in enumerate(mask.bool()):
        positions = real.nonzero().flatten()
        ids[row, positions[1]] = ids[row, positions[-1]] = eos_id
    return {"input_ids": ids, "attention_mask": mask}


def test_bart_sequence_classification_pools_the_decoder_at_the_last_eos(tmp_path):
    """BartForSequenceClassification: dense + tanh + out_proj on the decoder's state at each row's last eos."""
    hf = _small("BartForSequenceClassification", num_labels=3)
    batch, labels = _eos_batch(hf.config.eos_token_id, hf.config.pad_token_id), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        want = hf(**batch, labels=labels)
        given = hf(**batch, decoder_input_ids=batch["input_ids"].roll(1, 1)).logits
    for model in (from_hf(hf), from_hf(_folder(hf, tmp_path))):
        assert model.config.classify_pooling == "eos" and model.config.heads == ("classify",)
        with torch.no_grad():
            got = model(**batch, labels=labels)
            got_given = model(**batch, decoder_input_ids=batch["input_ids"].roll(1, 1)).logits
        assert (got.logits - want.logits).abs().max().item() <= 1e-5
        assert (got_given - given).abs().max().item() <= 1e-5  # given decoder ids are read, eos still from the source
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    save(model, tmp_path / "lite")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "lite")(**batch).logits, got.logits)
    lite = Pipeline([Prune(heads=0.5, ffn=0.5, hidden=0.25)]).run(model, data=[{**batch, "labels": labels}])
    with torch.no_grad():
        assert lite(**batch).logits.shape == (4, 3) and lite.pooler.dense.weight.shape[1] == 24
    no_eos = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == 2, 5)}
    with pytest.raises(ValueError, match=r"every row of input_ids needs an eos token \(id 2\)"):
        model(**no_eos)


def _kept_heads(before, after) -> list[int]:
    """Which of `before`'s heads `after` (a pruned copy of one attention) kept, by their query rows."""
    d = before.head_dim
    old, new = before.q_proj.weight.view(before.n_heads, d, -1), after.q_proj.weight.view(after.n_heads, d, -1)
    return [h for k in range(after.n_heads) for h in range(before.n_heads) if torch.equal(old[h], new[k])]


def test_bart_prunes_quantizes_and_still_generates(tmp_path):
    hf = _small("BartForConditionalGeneration")
    batch = _padded_batch(hf.config.pad_token_id)
    teacher = from_hf(_folder(hf, tmp_path))
    pruned = Pipeline([Prune(heads=0.5, ffn=0.5, hidden=0.25)]).run(teacher, data=[batch])
    assert pruned.config.dim == 24 and pruned.decoder_embeddings.position.weight.shape == (40, 24)
    assert [s.n_heads for s in (*pruned.config.encoder, *pruned.config.decoder)] == [2] * 4
    lite = Pipeline([Quantize("int8")]).run(pruned, data=[batch])
    with torch.no_grad():
        want, got = pruned(**batch).head_logits["lm"], lite(**batch).head_logits["lm"]
    assert (got - want).norm() / want.norm() < 0.05  # int8 weights: close to the float model they came from
    ids = lite.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, num_beams=2)
    assert ids.shape[0] == 4 and ids.shape[1] <= 7


def test_pruning_t5_heads_drops_their_relative_bias_columns():
    hf = _small("T5ForConditionalGeneration")
    batch = _padded_batch(hf.config.pad_token_id)
    model = from_hf(hf)
    lite = Pipeline([Prune(heads=0.5)]).run(model, data=[batch])
    for name in ("encoder", "decoder"):
        for before, after in zip(getattr(model, name).blocks, getattr(lite, name).blocks):
            kept = _kept_heads(before.self_attn, after.self_attn)
            assert len(kept) == 2 and after.self_attn.relative.weight.shape == (8, 2)
            assert torch.equal(after.self_attn.relative.weight, before.self_attn.relative.weight[:, kept])
    with torch.no_grad():
        assert torch.isfinite(lite(**batch).head_logits["lm"]).all()


def test_gated_ffn_prunes_gate_and_up_rows_with_the_down_columns():
    """T5 v1.1: channels whose gate and up rows and down columns are zero add nothing; Prune finds and removes them."""
    hf = _small("T5ForConditionalGeneration", feed_forward_proj="gated-gelu", d_ff=32)
    model, batch = from_hf(hf), _padded_batch(hf.config.pad_token_id)
    dead = {}
    with torch.no_grad():
        for name in ("encoder", "decoder"):
            for b, block in enumerate(getattr(model, name).blocks):
                channels = torch.randperm(32)[:16]  # a different half in every block
                for weight in (block.ffn.gate.weight, block.ffn.up.weight, block.ffn.down.weight.T):
                    weight[channels] = 0
                dead[name, b] = set(channels.tolist())
        want = model(**batch).head_logits["lm"]
    lite = Pipeline([Prune(ffn=0.5)]).run(model, data=[batch])
    with torch.no_grad():
        torch.testing.assert_close(lite(**batch).head_logits["lm"], want, rtol=0, atol=1e-5)
    for (name, b), channels in dead.items():
        kept = sorted(set(range(32)) - channels)
        old, new = getattr(model, name).blocks[b].ffn, getattr(lite, name).blocks[b].ffn
        assert torch.equal(new.gate.weight, old.gate.weight[kept]) and torch.equal(new.up.weight, old.up.weight[kept])
        assert torch.equal(new.down.weight, old.down.weight[:, kept])


def _assert_width_sliced(model, lite) -> list[int]:
    """Every weight of `lite` is `model`'s at the kept width channels, on each axis whose size changed; returns them."""
    word, new_word = model.embeddings.word.weight, lite.embeddings.word.weight
    dim, width = word.shape[1], new_word.shape[1]
    kept = [next(i for i in range(dim) if torch.equal(word[:, i], new_word[:, j])) for j in range(width)]
    assert kept == sorted(kept) and width < dim
    old = dict(model.named_parameters())
    for name, p in lite.named_parameters():
        if name not in old:  # Marian's position table: checked against the sinusoid by the caller
            continue
        want = old[name]
        for axis, (before, after) in enumerate(zip(want.shape, p.shape)):
            if before != after:
                assert (before, after) == (dim, width), name
                want = want.index_select(axis, torch.tensor(kept))
        assert torch.equal(p, want), name
    return kept


@pytest.mark.parametrize(
    "cls_name, overrides",
    [
        ("MarianMTModel", dict(scale_embedding=True)),
        ("MarianMTModel", dict(tie_word_embeddings=False)),
        ("T5ForConditionalGeneration", dict()),  # tied head scaled by d_model**-0.5
        ("T5ForConditionalGeneration", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    ],
)
def test_models_without_an_embedding_norm_prune_the_width_everywhere(cls_name, overrides):
    """Marian and T5 prune the width from the word table: norms (RMSNorm too), every projection, an untied head."""
    hf = _small(cls_name, **overrides)
    model, batch = from_hf(hf), _padded_batch(hf.config.pad_token_id)
    lite = Pipeline([Prune(hidden=0.25)]).run(model, data=[batch])
    assert lite.config.dim == 24 and lite.config.lm_head_scale == model.config.lm_head_scale
    kept = _assert_width_sliced(model, lite)
    if cls_name.startswith("Marian"):  # the sinusoid is stored as a table: each channel keeps its own values
        table = sinusoid(model.config.max_positions, 32, "cpu").float()[:, kept]
        assert lite.config.positions == "absolute" and torch.equal(lite.embeddings.position.weight, table)
    with torch.no_grad():
        assert lite(**batch).head_logits["lm"].shape == (4, 6, VOCAB)
    both = Pipeline([Prune(heads=0.5, ffn=0.5, hidden=0.25, layers=1)]).run(model, data=[batch])
    shapes = {(s.n_heads, s.ffn_dim) for s in (*both.config.encoder, *both.config.decoder)}
    assert shapes == {(2, 16)} and both.config.encoder_layers + both.config.decoder_layers == 3


# 13-18 s each here; tests/test_onnx_generate.py exports BART and Marian (parity checked) by default, so only the
# gated T5 (no other default export has a gated FFN) runs by default.
@pytest.mark.parametrize(
    "cls_name",
    [
        pytest.param("BartForConditionalGeneration", marks=pytest.mark.slow),
        pytest.param("MarianMTModel", marks=pytest.mark.slow),
        "T5ForConditionalGeneration",
    ],
)
def test_seq2seq_families_export_to_onnx_with_parity(cls_name, tmp_path):
    hf = _small(cls_name, **({"feed_forward_proj": "gated-gelu"} if cls_name.startswith("T5") else {}))
    model = from_hf(hf)
    export_onnx(model, tmp_path / "model.onnx")  # checks parity with PyTorch (1e-4) at several shapes
    batch = _padded_batch(hf.config.pad_token_id)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        want = model(**batch).head_logits["lm"]
    assert (OrtModel(tmp_path / "model.onnx")(batch).head_logits["lm"] - want).abs().max().item() <= TOL


@pytest.mark.parametrize("cls_name", ["BartForConditionalGeneration", "MarianMTModel", "T5ForConditionalGeneration"])
def test_quantize_and_share_run_on_every_seq2seq_family(cls_name):
    hf = _small(cls_name, **({"feed_forward_proj": "gated-gelu"} if cls_name.startswith("T5") else {}))
    model, batch = from_hf(hf), _padded_batch(hf.config.pad_token_id)
    with torch.no_grad():
        want = model(**batch).head_logits["lm"]
    for mode, bound in (("int8", 0.1), ("int8-dynamic", 0.1), ("int4", 0.6)):
        lite = Pipeline([Quantize(mode, group_size=32 if mode == "int4" else 128)]).run(model, data=[batch])
        with torch.no_grad():
            got = lite(**batch).head_logits["lm"]
        assert (got - want).norm() / want.norm() < bound, mode
    shared = Pipeline([Share(layers_per_group=2)]).run(model, data=[batch])
    assert shared.config.encoder_share == (0, 0) and shared.config.decoder_share == (0, 0)


@pytest.mark.parametrize("cls_name", ["BartForConditionalGeneration", "MarianMTModel", "T5ForConditionalGeneration"])
def test_generate_reads_its_start_and_end_tokens_from_the_imported_config(cls_name, tmp_path):
    hf = _small(cls_name, **({} if cls_name.startswith("T5") else {"tie_word_embeddings": False}))
    model = from_hf(_folder(hf, tmp_path))
    assert (model.config.eos_id, model.config.decoder_start_id) == (
        hf.config.eos_token_id,
        hf.config.decoder_start_token_id,
    )
    batch = _padded_batch(hf.config.pad_token_id)
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    forced = hf.generation_config.forced_eos_token_id  # BART and Marian force it last; T5 has none
    with torch.no_grad():
        want = hf.generate(**source, do_sample=False, num_beams=2, max_new_tokens=8)
    assert torch.equal(model.generate(**source, num_beams=2, max_new_tokens=8, forced_eos_token_id=forced), want)


@pytest.mark.parametrize("early_stopping, length_penalty", [(True, 2.0), ("never", 0.5), (False, 0.0)])
def test_beam_search_options_give_the_ids_of_transformers(early_stopping, length_penalty, tmp_path):
    hf = _small("MarianMTModel", tie_word_embeddings=False, scale_embedding=True)
    model = from_hf(_folder(hf, tmp_path))
    batch = _padded_batch(hf.config.pad_token_id)
    source = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    eos = _end_token(model, source, hf.config.decoder_start_token_id)
    options = dict(max_new_tokens=10, num_beams=3, eos_token_id=eos, forced_eos_token_id=eos)
    options.update(early_stopping=early_stopping, length_penalty=length_penalty)
    with torch.no_grad():
        want = hf.generate(**source, do_sample=False, **options)
    assert torch.equal(model.generate(**source, **options), want)
