"""adopt_heads: the general student takes the fine-tuned teacher's heads, then the task stage distills from that teacher."""

import pytest
import torch

from compress import Distill, Pipeline, Prune, Quantize
from compress.heads import adopt_heads
from model.config import Config
from model.transformer import Transformer


def tiny(**changes):
    return Config.preset("tiny", decoder_layers=0, dropout=0.0, attention_dropout=0.0, **changes)


def labelled(config, n=6, b=4, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 4 :] = 0
        ids = torch.randint(5, config.vocab_size, (b, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)})
    return out


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return Transformer(tiny(heads=("classify",), n_labels=3)).eval()


def general_copy(teacher, heads=("mlm",)):
    """The teacher's encoder and embeddings under other heads: what a general stage of zero steps would give."""
    model = Transformer(teacher.config.replace(heads=heads, n_labels=0)).eval()
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(("heads.", "pooler."))}
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith("heads.") for k in missing)
    return model


def test_a_student_with_the_teachers_encoder_and_adopted_heads_is_the_teacher(teacher):
    adopted = adopt_heads(general_copy(teacher), teacher)
    assert adopted.config.heads == ("classify",) and adopted.config.n_labels == 3
    batch = {k: v for k, v in labelled(teacher.config, 1)[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(adopted.eval()(**batch).logits, teacher(**batch).logits, rtol=0, atol=0)
    assert not any(k.startswith("heads.mlm") for k in adopted.state_dict())


def test_the_students_own_encoder_is_kept_and_nothing_is_shared_with_either_model(teacher):
    student = general_copy(teacher)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.5)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    adopted = adopt_heads(student, teacher)
    for key, value in student_before.items():
        if key.startswith("encoder."):
            assert torch.equal(adopted.state_dict()[key], value), key
    with torch.no_grad():
        for p in adopted.parameters():
            p.zero_()
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_heads_whose_shapes_differ_start_fresh_and_the_callers_random_stream_is_untouched(teacher):
    narrow = Pipeline([Prune(hidden=0.5, importance="magnitude")]).run(general_copy(teacher), seed=0)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    adopted = adopt_heads(narrow, teacher, seed=1)
    torch.testing.assert_close(torch.rand(3), expected_next)  # fork_rng: the seed did not leak
    again = adopt_heads(narrow, teacher, seed=1)
    for (key, a), b in zip(adopted.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key  # seeded: reproducible
    batch = {k: v for k, v in labelled(teacher.config, 1)[0].items() if k != "labels"}
    assert adopted.eval()(**batch).logits.shape == (4, 3)


def test_the_task_stage_distills_the_adopted_student_from_the_fine_tuned_teacher(teacher):
    torch.manual_seed(3)  # a general student that learned something else: its own encoder
    student = adopt_heads(Transformer(teacher.config.replace(heads=("mlm",), n_labels=0)), teacher)
    pipeline = Pipeline([Distill(steps=30, lr=1e-3, logits=1.0, hidden=1.0, attention=0.0), Quantize("int8")])
    held = {k: v for k, v in labelled(teacher.config, 1, seed=9)[0].items() if k != "labels"}

    def gap(model):
        with torch.no_grad():
            return (model.eval()(**held).logits.softmax(-1) - teacher(**held).logits.softmax(-1)).abs().mean().item()

    before = gap(student)
    lite = pipeline.run(student, teacher=teacher, data=labelled(teacher.config, n=30), seed=0)
    assert gap(lite) < 0.5 * before  # it learned the fine-tuned teacher's outputs on unseen inputs


def test_refusals_name_the_problem(teacher):
    with pytest.raises(TypeError, match="student must be a model.Transformer"):
        adopt_heads("model", teacher)
    with pytest.raises(ValueError, match="teacher has no task heads"):
        adopt_heads(general_copy(teacher), general_copy(teacher, heads=()))
    quantized = Pipeline([Quantize("int8")]).run(general_copy(teacher), seed=0)
    with pytest.raises(ValueError, match="quantized"):
        adopt_heads(quantized, teacher)
    assert adopt_heads(teacher, teacher) is teacher
