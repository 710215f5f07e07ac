"""Transformer: a float64 re-implementation as reference, sharing, factorization, causality, heads, input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import Config
from model.transformer import Transformer


def batch_for(config, b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 4 :] = 0
    ids[1, t - 4 :] = config.pad_id
    types = torch.zeros(b, t, dtype=torch.long)
    types[:, t // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def manual_encoder(model, ids, mask, types):
    """The encoder written out op by op in float64 from the parameters (independent of the module code)."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], c.norm_eps)  # noqa: E731
    lin = lambda x, name: x @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    word = p["embeddings.word.weight"][ids]
    if "embeddings.word_proj.weight" in p:
        word = word @ p["embeddings.word_proj.weight"].T
    x = word + p["embeddings.position.weight"][: ids.shape[1]] + p["embeddings.token_type.weight"][types]
    x = ln(x, "embeddings.norm")
    for layer, block in enumerate(c.encoder_share):
        shape, pre = c.encoder[layer], c.norm == "pre"
        name = f"encoder.blocks.{block}"

        def attention(h):
            b, t, _ = h.shape
            split = lambda y: y.view(b, t, shape.n_heads, shape.head_dim).transpose(1, 2)  # noqa: E731
            q, k, v = (split(lin(h, f"{name}.self_attn.{n}_proj")) for n in "qkv")
            scores = q @ k.transpose(-1, -2) / math.sqrt(shape.head_dim)
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
            return lin(out, f"{name}.self_attn.out_proj")

        ffn = lambda h: lin(F.gelu(lin(h, f"{name}.ffn.up")), f"{name}.ffn.down")  # noqa: E731
        if pre:
            x = x + attention(ln(x, f"{name}.attn_norm"))
            x = x + ffn(ln(x, f"{name}.ffn_norm"))
        else:
            x = ln(x + attention(x), f"{name}.attn_norm")
            x = ln(x + ffn(x), f"{name}.ffn_norm")
    if c.norm == "pre":
        x = ln(x, "encoder.final_norm")
    return x


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("share, embed_dim", [((0, 1), None), ((0, 0), 32)])
def test_encoder_matches_float64_reimplementation(norm, share, embed_dim):
    config = Config.preset("tiny", norm=norm, encoder_share=share, embed_dim=embed_dim)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm parameters so that their use is checked too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    batch = batch_for(config)
    expected = manual_encoder(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    got = model(**batch).hidden_states
    torch.testing.assert_close(got[real].double(), expected[real], atol=2e-5, rtol=1e-4)


def test_backends_agree_inside_the_model():
    config = Config.preset("tiny")
    model = Transformer(config).eval()
    batch = batch_for(config)
    dec = {"decoder_input_ids": batch["input_ids"][:, :6]}
    outs = {}
    for backend in ("reference", "sdpa"):
        model.attention_backend = backend
        outs[backend] = model(**batch, **dec)
    for head in ("mlm", "pair", "lm"):
        torch.testing.assert_close(
            outs["reference"].head_logits[head], outs["sdpa"].head_logits[head], atol=1e-5, rtol=1e-5
        )


def test_shared_layers_hold_one_set_of_weights():
    unshared = Transformer(Config.preset("tiny"))
    shared = Transformer(Config.preset("tiny", encoder_share=(0, 0)))
    block = sum(p.numel() for p in unshared.encoder.blocks[0].parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unshared) - count(shared) == block
    assert len(shared.encoder.blocks) == 1 and not any(k.startswith("encoder.blocks.1") for k in shared.state_dict())


def test_factorized_embeddings_equal_their_product():
    full = Transformer(Config.preset("tiny", embed_dim=None)).eval()
    factored = Transformer(Config.preset("tiny", embed_dim=16)).eval()
    state = {k: v for k, v in factored.state_dict().items()}
    product = state["embeddings.word.weight"] @ state["embeddings.word_proj.weight"].T  # (V, E) @ (E, dim)
    merged = {k: v for k, v in state.items() if k != "embeddings.word_proj.weight"}
    merged["embeddings.word.weight"] = product
    full.load_state_dict(merged)
    batch = batch_for(full.config)
    dec = batch["input_ids"][:, :5]
    a, b = full(**batch, decoder_input_ids=dec), factored(**batch, decoder_input_ids=dec)
    for head in ("mlm", "lm"):
        torch.testing.assert_close(a.head_logits[head], b.head_logits[head], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_positions():
    config = Config.preset("tiny")
    model = Transformer(config).eval()
    batch = {k: v[:1, :8] for k, v in batch_for(config).items()}
    padded = {k: torch.cat([v, torch.zeros(1, 5, dtype=v.dtype)], 1) for k, v in batch.items()}
    short, long = model(**batch).hidden_states, model(**padded).hidden_states
    torch.testing.assert_close(long[:, :8], short, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    config = Config.preset("tiny")
    model = Transformer(config).eval()
    batch = batch_for(config)
    dec = batch["input_ids"][:, :6].clone()
    before = model(**batch, decoder_input_ids=dec).head_logits["lm"]
    dec[:, 4:] = 7
    after = model(**batch, decoder_input_ids=dec).head_logits["lm"]
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_outputs_of_every_layer_on_request():
    config = Config.preset("tiny")
    model = Transformer(config).eval()
    batch = batch_for(config)
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(out.all_hidden_states) == config.encoder_layers + 1
    torch.testing.assert_close(out.all_hidden_states[-1], out.hidden_states)
    maps = out.attentions[0]
    assert maps.shape == (3, 4, 10, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 4, 10))
    assert maps[1, :, :, 6:].abs().max() < 1e-30  # padded keys get no weight
    plain = model(**batch).hidden_states
    torch.testing.assert_close(plain, out.hidden_states, atol=1e-5, rtol=1e-5)


def test_heads_logits_and_loss():
    config = Config.preset("tiny", heads=("classify", "qa"), n_labels=3, decoder_layers=0)
    model = Transformer(config).eval()
    batch = batch_for(config)
    labels = torch.tensor([0, 2, 1])
    out = model(**batch, labels=labels)
    assert out.logits.shape == (3, 3) and out.head_logits["qa"].shape == (3, 10, 2)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    with pytest.raises(TypeError, match="unexpected batch keys \\['label'\\]"):
        model(**batch, label=labels)


def test_gradients_reach_tied_embeddings():
    config = Config.preset("tiny", heads=("mlm",), decoder_layers=0)
    model = Transformer(config)
    batch = batch_for(config)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = batch["input_ids"][:, 2]
    model(**batch, mlm_labels=labels).loss.backward()
    assert model.embeddings.word.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda b: b.update(input_ids=b["input_ids"].float()), TypeError, "input_ids must be int64"),
        (
            lambda b: b.update(input_ids=b["input_ids"][:0], attention_mask=None, token_type_ids=None),
            ValueError,
            "empty batch",
        ),
        (
            lambda b: b.update(
                input_ids=torch.ones(1, 129, dtype=torch.long), attention_mask=None, token_type_ids=None
            ),
            ValueError,
            "max_positions is 128",
        ),
        (lambda b: b["input_ids"].__setitem__((0, 0), 512), ValueError, "vocabulary is \\[0, 512\\)"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :5]), ValueError, "attention_mask has shape"),
        (lambda b: b["attention_mask"].__setitem__(0, 0), ValueError, "rows \\[0\\] have no tokens"),
        (lambda b: b["token_type_ids"].__setitem__((0, 0), 2), ValueError, "token_type_ids must be in"),
        (lambda b: b.update(decoder_input_ids=torch.ones(3, 4)), TypeError, "decoder_input_ids must be int64"),
    ],
)
def test_bad_inputs_give_named_errors(change, error, message):
    config = Config.preset("tiny")
    batch = batch_for(config)
    change(batch)
    with pytest.raises(error, match=message):
        Transformer(config)(**{k: v for k, v in batch.items() if v is not None})


def test_decoder_input_on_encoder_only_model_is_refused():
    config = Config.preset("tiny", decoder_layers=0, heads=("mlm",))
    with pytest.raises(ValueError, match="no decoder layers"):
        Transformer(config)(**batch_for(config), decoder_input_ids=torch.ones(3, 2, dtype=torch.long))


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be"):
        Transformer(Config.preset("tiny"), attention_backend="fast")


def test_decoder_labels_without_decoder_input_are_refused():
    config = Config.preset("tiny")
    batch = batch_for(config)
    with pytest.raises(ValueError, match="need decoder_input_ids"):
        Transformer(config)(**batch, decoder_labels=batch["input_ids"])


def test_hidden_states_on_request_keep_the_fast_path():
    config = Config.preset("tiny")
    model = Transformer(config, attention_backend="sdpa").eval()
    batch = batch_for(config)
    assert torch.equal(model(**batch, output_hidden_states=True).hidden_states, model(**batch).hidden_states)
