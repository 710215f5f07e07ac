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
    assert set(losses) == {"logits", "hidden", "attention"}
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
    settings = Distill(steps=60, lr=3e-3, warmup_steps=0, progress=False)
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
