"""Distill: loss terms against hand computations, held-out improvement, differing widths and heads, resume, settings."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import Distill, DistillLoss, distillation_loss, uniform_layer_map
from compress.pipeline import Context
from model.config import Config, LayerShape
from model.transformer import Transformer


def batches(config, n, b=4, t=12, seed=0, decoder=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, config.vocab_size, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3 :] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if decoder:
            batch["decoder_input_ids"] = ids[:, :-1]
        out.append(batch)
    return out


def teacher_and_student(**student_changes):
    torch.manual_seed(0)
    teacher = Transformer(Config.preset("tiny", dropout=0.0, attention_dropout=0.0)).eval()
    student = Transformer(Config.preset("tiny", dropout=0.0, attention_dropout=0.0, **student_changes))
    return teacher, student


def test_uniform_layer_map_ends_on_the_last_layer():
    assert uniform_layer_map(3, 6) == (1, 3, 5)
    assert uniform_layer_map(6, 6) == (0, 1, 2, 3, 4, 5)
    assert uniform_layer_map(2, 12) == (5, 11)


def test_student_equal_to_teacher_has_zero_loss():
    teacher, _ = teacher_and_student()
    student = Transformer(teacher.config)
    student.load_state_dict(teacher.state_dict())
    losses = distillation_loss(student, teacher, batches(teacher.config, 2), Distill(steps=1))
    assert set(losses) == {"logits", "hidden", "attention", "decoder_hidden", "cross_attention"}
    assert all(abs(v) < 1e-6 for v in losses.values()), losses


def test_logit_term_matches_a_hand_computed_kl():
    teacher, student = teacher_and_student()
    batch = batches(teacher.config, 1, decoder=False)[0]
    settings = Distill(steps=1, temperature=3.0, hidden=0.0, attention=0.0)
    got = DistillLoss(student.eval(), teacher, settings)(batch)["logits"]
    mask = batch["attention_mask"].bool()
    s, t = student(**batch), teacher(**batch)
    T = 3.0

    def kl(sl, tl):  # float64 KL(teacher || student) at temperature T, times T^2
        p = torch.softmax(tl.double() / T, -1)
        return (p * (p.log() - torch.log_softmax(sl.double() / T, -1))).sum(-1) * T * T

    mlm = kl(s.head_logits["mlm"], t.head_logits["mlm"])[mask].mean()
    pair = kl(s.head_logits["pair"], t.head_logits["pair"]).mean()
    torch.testing.assert_close(got.double(), (mlm + pair) / 2, atol=1e-5, rtol=1e-5)


def test_distillation_lowers_held_out_loss_with_different_heads_and_ffn():
    narrow = LayerShape(n_heads=2, head_dim=32, ffn_dim=32)  # 2 heads of 32 vs the teacher's 4 of 16
    teacher, student = teacher_and_student(n_layers=1, decoder_layers=1)
    student = Transformer(student.config.replace(encoder=(narrow,), decoder=(narrow,)))
    settings = Distill(steps=40, lr=1e-2, warmup_steps=0, progress=False)
    train_data, held_out = batches(teacher.config, 8, seed=1), batches(teacher.config, 3, seed=2)
    before = distillation_loss(student, teacher, held_out, settings)
    ctx = Context(data=train_data, teacher=teacher)
    trained = settings(student, ctx)
    after = distillation_loss(trained, teacher, held_out, settings)
    assert sum(after.values()) < 0.7 * sum(before.values()), (before, after)
    assert all(after[k] < before[k] for k in before), (before, after)


def test_projection_bridges_different_widths():
    teacher, _ = teacher_and_student()
    student = Transformer(Config.preset("tiny", dim=32, n_heads=2, dropout=0.0))
    objective = DistillLoss(student, teacher, Distill(steps=1))
    assert tuple(objective.project.weight.shape) == (64, 32)
    losses = objective(batches(teacher.config, 1)[0])
    sum(losses.values()).backward()
    assert objective.project.weight.grad.abs().sum() > 0
    assert student.embeddings.word.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_relation_loss_is_zero_for_equal_relations_and_positive_otherwise():
    teacher, student = teacher_and_student()
    batch = batches(teacher.config, 1)[0]
    settings = Distill(steps=1, logits=0.0, hidden=0.0)
    assert DistillLoss(student.eval(), teacher, settings)(batch)["attention"].item() > 1e-4
    clone = Transformer(teacher.config).eval()
    clone.load_state_dict(teacher.state_dict())
    assert DistillLoss(clone, teacher, settings)(batch)["attention"].abs().item() < 1e-6


def test_interrupted_distillation_resumes_exactly(tmp_path):
    data = batches(Config.preset("tiny"), 4, seed=3)
    settings = Distill(steps=6, lr=1e-3, checkpoint_every=2, progress=False)

    def run(workdir, stop=None):
        teacher, student = teacher_and_student()
        ctx = Context(data=data, teacher=teacher, workdir=workdir)
        if stop is not None:  # kill the run after `stop` steps by making the next batch explode
            calls = []

            class Exploding(list):
                def __getitem__(self, i):
                    calls.append(i)
                    if len(calls) > stop:
                        raise KeyboardInterrupt
                    return list.__getitem__(self, i)

            ctx.data = Exploding(data)
        return settings(student, ctx)

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=5)
    resumed = run(tmp_path / "b")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps"),
        (dict(temperature=0), "temperature"),
        (dict(hidden=-1.0), "hidden"),
        (dict(relation_heads=-2), "relation_heads"),
    ],
)
def test_invalid_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distill(**kwargs)


def test_bad_layer_map_and_relation_heads_are_named():
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="layer_map"):
        DistillLoss(student, teacher, Distill(layer_map=(0, 5)))
    with pytest.raises(ValueError, match="relation_heads=5"):
        DistillLoss(student, teacher, Distill(relation_heads=5))


def test_relation_heads_default_divides_both_widths():
    teacher, _ = teacher_and_student()
    student = Transformer(Config.preset("tiny", dim=48, n_heads=3))
    heads = DistillLoss(student, teacher, Distill()).relation_heads
    assert heads == math.gcd(48, 64, 4) and 48 % heads == 0 and 64 % heads == 0


def test_regression_head_uses_mse():
    teacher = Transformer(Config.preset("tiny", heads=("classify",), n_labels=1, decoder_layers=0)).eval()
    student = Transformer(teacher.config).eval()
    batch = batches(teacher.config, 1, decoder=False)[0]
    got = DistillLoss(student, teacher, Distill(hidden=0.0, attention=0.0))(batch)["logits"]
    expected = F.mse_loss(student(**batch).logits, teacher(**batch).logits)
    torch.testing.assert_close(got, expected)


def test_span_head_distills_start_and_end_distributions_over_real_tokens():
    """qa logits (B, T, 2): KL over the sequence for start and for end, padding excluded, at temperature T."""
    config = Config.preset("tiny", heads=("qa",), decoder_layers=0, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    teacher, student = Transformer(config).eval(), Transformer(config).eval()
    batch = batches(config, 1, decoder=False)[0]
    got = DistillLoss(student, teacher, Distill(temperature=2.0, hidden=0.0, attention=0.0))(batch)["logits"]
    s, t = student(**batch).head_logits["qa"].double(), teacher(**batch).head_logits["qa"].double()
    terms = []
    for row, mask in enumerate(batch["attention_mask"].bool()):
        for side in (0, 1):  # start, end: softmax over this row's real tokens only
            p = torch.softmax(t[row, mask, side] / 2.0, -1)
            terms.append((p * (p.log() - torch.log_softmax(s[row, mask, side] / 2.0, -1))).sum() * 4.0)
    torch.testing.assert_close(got.double(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    same = DistillLoss(teacher, teacher, Distill(temperature=0.5, hidden=0.0, attention=0.0))(batch)["logits"]
    assert same.item() == 0.0  # the padding floor is applied after scaling: finite, and exact for equal models


def test_pooled_term_is_one_minus_the_cosine_of_mean_pooled_embeddings():
    teacher, student = teacher_and_student()
    batch = batches(teacher.config, 1, decoder=False)[0]
    got = DistillLoss(student.eval(), teacher, Distill(logits=0.0, hidden=0.0, attention=0.0, pooled=2.0))(batch)[
        "pooled"
    ]
    mask = batch["attention_mask"].double()[..., None]
    pool = lambda h: (h.double() * mask).sum(1) / mask.sum(1)  # noqa: E731
    s, t = pool(student(**batch).hidden_states), pool(teacher(**batch).hidden_states)
    expected = 2.0 * (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_matched_layer_map_is_the_brute_force_optimum():
    import itertools

    from compress.distill import matched_layer_map

    errors = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    maps = [(*m, 5) for m in itertools.combinations(range(5), 2)]  # increasing, the last on the last
    expected = min(maps, key=lambda m: sum(errors[i, j].item() for i, j in enumerate(m)))
    assert matched_layer_map(errors) == expected
    assert matched_layer_map(torch.zeros(1, 4)) == (3,)
    assert matched_layer_map(torch.zeros(4, 4)) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="no deeper than its teacher"):
        matched_layer_map(torch.zeros(5, 4))


def test_a_student_cut_in_depth_learns_from_the_layers_it_kept(caplog):
    """Layers 1 and 3 of 6 dropped: kept layer 0 reproduces teacher layer 0 exactly, and the pass uses the matched map."""
    from compress.distill import layer_errors, matched_layer_map
    from compress.pipeline import Pipeline
    from compress.prune_shapes import reshaped

    torch.manual_seed(0)
    config = Config.preset("tiny", decoder_layers=0, heads=("mlm",), dropout=0.0, attention_dropout=0.0)
    config = config.replace(encoder=(LayerShape(4, 16, 128),) * 6, encoder_share=None)
    teacher = Transformer(config).eval()
    student, kept = reshaped(teacher, {"encoder": {1, 3}})
    assert kept["encoder"] == [0, 2, 4, 5]
    data = batches(config, 3, decoder=False)
    errors = layer_errors(student, teacher, data)
    assert errors[0, 0] < 1e-12 and errors[0].argmin() == 0 and errors[1, 1] > 0.0
    mask = data[0]["attention_mask"].bool()
    s_out = student(**data[0], output_hidden_states=True).all_hidden_states
    t_out = teacher(**data[0], output_hidden_states=True).all_hidden_states
    by_hand = (s_out[2][mask] - t_out[3][mask]).double().pow(2).sum() / t_out[3][mask].double().pow(2).sum()
    torch.testing.assert_close(layer_errors(student, teacher, data[:1])[1, 2], by_hand)
    layer_map = matched_layer_map(errors)
    assert layer_map[0] == 0 and layer_map[-1] == 5 and list(layer_map) == sorted(set(layer_map))
    with caplog.at_level("INFO", logger="compress.distill"):
        Pipeline([Distill(steps=1, logits=0.0, progress=False)]).run(student, teacher=teacher, data=data, seed=0)
    assert f"teacher layer {list(layer_map)}[i] (matched)" in caplog.text
    assert Distill(layer_map="uniform").layer_map == "uniform"
    with pytest.raises(ValueError, match="'uniform'"):
        Distill(layer_map="closest")


# -- encoder-decoders: decoder hidden states, cross-attention relations, target-token logits ---------

SEQ2SEQ = [("BartForConditionalGeneration", {}), ("T5ForConditionalGeneration", {"feed_forward_proj": "gated-gelu"})]


def seq2seq_batches(n, seed, pad_id, vocab=100):
    """Padded source (B=4, T=10) and target (S=7) batches, the padding on the right of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids, targets = (
            torch.randint(3, vocab - 1, (4, 10), generator=g),
            torch.randint(3, vocab - 1, (4, 7), generator=g),
        )
        mask, target_mask = torch.ones_like(ids), torch.ones_like(targets)
        mask[1, 6:], mask[2, 3:], target_mask[2, 4:], target_mask[3, 2:] = 0, 0, 0, 0
        out.append(
            {
                "input_ids": ids.masked_fill(mask == 0, pad_id),
                "attention_mask": mask,
                "decoder_input_ids": targets.masked_fill(target_mask == 0, pad_id),
                "decoder_attention_mask": target_mask,
            }
        )
    return out


def imported_teacher_and_pruned_student(cls_name, overrides, **prune):
    """An imported tiny HF seq2seq teacher and a pruned copy (heads and FFN halved) as the student."""
    pytest.importorskip("transformers")
    from test_hf_seq2seq import _small

    from compress.pipeline import Pipeline
    from compress.prune import Prune
    from model import from_hf

    torch.manual_seed(0)
    teacher = from_hf(_small(cls_name, **overrides)).eval()
    batch = seq2seq_batches(1, 0, teacher.config.pad_id)
    student = Pipeline([Prune(**(prune or dict(heads=0.5, ffn=0.5)))]).run(teacher, data=batch)
    return teacher, student


def _decoder_by_hand(model, batch):
    """Decoder input + layer outputs (the stack's own hidden_states) and the last layer's cross q/k/v, in float64."""
    h, _, _ = model.encode(batch["input_ids"], batch["attention_mask"])
    memory_mask, target_mask = batch["attention_mask"].bool(), batch["decoder_attention_mask"].bool()
    opts = dict(causal=True, memory=h, memory_mask=memory_mask, backend="reference")
    _, hiddens, _ = model.decoder(
        model.embed_decoder(batch["decoder_input_ids"]), target_mask, hidden_states=True, **opts
    )
    block, x = model.decoder.blocks[model.config.decoder_share[-1]], hiddens[-2]  # the last layer's input
    self_attn = lambda y: block.self_attn(y, None, target_mask, causal=True, backend="reference", need_weights=False)[0]  # noqa: E731
    if block.pre_norm:
        query_in = block.cross_norm(x + self_attn(block.attn_norm(x)))
    else:
        query_in = block.attn_norm(x + self_attn(x))
    cross = block.cross_attn
    return hiddens, (cross.q_proj(query_in), cross.k_proj(h), cross.v_proj(h))


def _kl_rows(t_scores, s_scores, key_mask):
    """float64 KL(softmax t || softmax s) per row over the unmasked keys: (B,R,L,K) -> (B,R,L)."""
    t_scores, s_scores = (x.masked_fill(~key_mask[:, None, None, :], -math.inf) for x in (t_scores, s_scores))
    p, log_q = torch.softmax(t_scores, -1), torch.log_softmax(s_scores, -1)
    return torch.where(p > 0, p * (p.log() - log_q), torch.zeros_like(p)).sum(-1)


@pytest.mark.parametrize("cls_name, overrides", SEQ2SEQ, ids=["bart", "t5-gated"])
def test_each_seq2seq_term_matches_a_float64_hand_computation(cls_name, overrides):
    teacher, student = imported_teacher_and_pruned_student(cls_name, overrides)
    teacher, student = teacher.double(), student.double()
    batch = seq2seq_batches(1, 5, teacher.config.pad_id)[0]
    settings = Distill(steps=1, temperature=2.0, hidden=0.7, attention=1.3, logits=0.5)
    got = DistillLoss(student, teacher, settings)(batch)
    source, target = batch["attention_mask"].bool(), batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        s_hidden, s_qkv = _decoder_by_hand(student, batch)
        t_hidden, t_qkv = _decoder_by_hand(teacher, batch)
        s_logits, t_logits = student(**batch).head_logits["lm"], teacher(**batch).head_logits["lm"]
    # Logits: KL(teacher || student) at T = 2 over the real target tokens, times T^2.
    p = torch.softmax(t_logits / 2.0, -1)
    kl = (p * (p.log() - torch.log_softmax(s_logits / 2.0, -1))).sum(-1) * 4.0
    torch.testing.assert_close(got["logits"], 0.5 * kl[target].mean(), rtol=1e-9, atol=1e-12)
    # Decoder hidden states: input vectors and each mapped layer (uniform: student layer i -> teacher round((i+1)Lt/Ls)-1).
    n_s, n_t = student.config.decoder_layers, teacher.config.decoder_layers
    pairs = [(0, 0)] + [(i + 1, round((i + 1) * n_t / n_s)) for i in range(n_s)]
    mse = [((s_hidden[i] - t_hidden[j])[target] ** 2).mean() for i, j in pairs]
    torch.testing.assert_close(got["decoder_hidden"], 0.7 * sum(mse) / len(mse), rtol=1e-9, atol=1e-12)
    # Cross-attention relations over R relation heads: decoder queries over source keys, source values among themselves.
    heads = math.gcd(student.config.decoder[-1].n_heads * 8, teacher.config.decoder[-1].n_heads * 8, 4)
    split = lambda x: x.view(4, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731

    def relations(q, k, v):  # scaled by each model's own relation-head width
        d = math.sqrt(q.shape[-1] // heads)
        return split(q) @ split(k).transpose(-1, -2) / d, split(v) @ split(v).transpose(-1, -2) / d

    (s_qk, s_vv), (t_qk, t_vv) = relations(*s_qkv), relations(*t_qkv)
    attention = (_kl_rows(t_qk, s_qk, source) * target[:, None]).sum() / (target.sum() * heads)
    values = (_kl_rows(t_vv, s_vv, source) * source[:, None]).sum() / (source.sum() * heads)
    torch.testing.assert_close(got["cross_attention"], 1.3 * (attention + values) / 2, rtol=1e-9, atol=1e-12)
    assert got["cross_attention"] > 1e-3 and got["decoder_hidden"] > 1e-3
    same = DistillLoss(teacher, teacher, settings)(batch)
    assert all(abs(v.item()) < 1e-12 for v in same.values()), same


@pytest.mark.parametrize("cls_name, overrides", SEQ2SEQ, ids=["bart", "t5-gated"])
def test_distilling_a_pruned_seq2seq_student_moves_it_toward_its_teacher(cls_name, overrides):
    teacher, student = imported_teacher_and_pruned_student(cls_name, overrides, heads=0.5, ffn=0.5, layers=1)
    pad = teacher.config.pad_id
    train_data, held_out = seq2seq_batches(8, 1, pad), seq2seq_batches(3, 2, pad)
    settings = Distill(steps=40, lr=1e-2, warmup_steps=0, progress=False)

    def logit_gap(model):  # mean squared distance to the teacher's logits over the real target tokens
        with torch.no_grad():
            gaps = [
                (model(**b).head_logits["lm"] - teacher(**b).head_logits["lm"])[b["decoder_attention_mask"].bool()]
                for b in held_out
            ]
        return torch.cat(gaps).pow(2).mean().item()

    before, gap = distillation_loss(student, teacher, held_out, settings), logit_gap(student)
    assert {"logits", "hidden", "attention", "decoder_hidden", "cross_attention"} <= set(before)
    trained = settings(student, Context(data=train_data, teacher=teacher))
    after = distillation_loss(trained, teacher, held_out, settings)
    assert all(after[k] < before[k] for k in before), (before, after)
    assert sum(after.values()) < 0.9 * sum(before.values()), (before, after)
    assert logit_gap(trained) < 0.9 * gap  # the undistilled student's gap


def test_a_bad_decoder_layer_map_is_named():
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match=r"decoder_layer_map must give one teacher decoder layer in \[0, 2\)"):
        DistillLoss(student, teacher, Distill(decoder_layer_map=(0, 2)))
    with pytest.raises(ValueError, match="decoder_layer_map must be null or a list"):
        Distill(decoder_layer_map="uniform")
