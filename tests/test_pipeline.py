"""Pipeline: input never mutated, stages recorded with exact counts and sizes, order and data rules, manifest."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch

from compress.distill import Distill
from compress.evaluate.measure import count_params
from compress.pipeline import Pipeline, saved_size
from model.config import Config
from model.io import load
from model.transformer import Transformer


def data(config, n=3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, config.vocab_size, (2, 8), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def tie_encoder(model, ctx):
    """A function pass: tie both encoder layers to the first one's weights."""
    tied = Transformer(model.config.replace(encoder_share=(0, 0)))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.blocks.1.")}
    tied.load_state_dict(state)
    return tied


def scale_weights(model, ctx):
    """A function pass that changes values in place (the pipeline's input must not see it)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


@dataclasses.dataclass(frozen=True)
class Restructure:
    restructures: ClassVar[bool] = True

    def __call__(self, model, ctx):
        return model


@dataclasses.dataclass(frozen=True)
class Pack:
    bits: int = 8
    quantizes: ClassVar[bool] = True

    def __call__(self, model, ctx):
        return model


def test_input_is_never_mutated_and_stages_are_recorded(tmp_path):
    model = Transformer(Config.preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipeline = Pipeline([scale_weights, tie_encoder])
    lite = pipeline.run(model, data(model.config))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [s.name for s in pipeline.stages] == ["input", "scale_weights", "tie_encoder"]
    block = sum(p.numel() for p in model.encoder.blocks[1].parameters())
    full, tied = pipeline.stages[1], pipeline.stages[2]
    assert full.params == full.unique_params == sum(p.numel() for p in model.parameters())
    assert tied.params == full.params and tied.unique_params == full.unique_params - block
    assert full.size_bytes - tied.size_bytes >= 4 * block  # fp32 bytes of the block no longer stored
    assert tied.size_bytes == saved_size(lite)
    assert count_params(lite) == (tied.params, tied.unique_params)


def test_metrics_and_manifest(tmp_path):
    model = Transformer(Config.preset("tiny"))
    pipeline = Pipeline([tie_encoder, Distill(steps=2, progress=False)])
    batches = data(model.config)
    calls = []

    def evaluate(m):
        calls.append(m)
        return {"norm": m.embeddings.word.weight.norm().item()}

    lite = pipeline.run(model, batches, evaluate=evaluate)
    assert len(calls) == 3 and all(isinstance(s.metrics["norm"], float) for s in pipeline.stages)
    pipeline.save(lite, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["tie_encoder", "Distill"]
    assert manifest["passes"][1]["settings"]["steps"] == 2
    assert [s["name"] for s in manifest["stages"]] == ["input", "tie_encoder", "Distill"]
    reloaded = load(tmp_path)
    batch = {k: v for k, v in batches[0].items()}
    assert torch.equal(reloaded(**batch).hidden_states, lite(**batch).hidden_states)


def test_restructuring_after_quantizing_is_refused():
    with pytest.raises(ValueError, match="Restructure after Pack is not allowed"):
        Pipeline([Pack(), Restructure()])
    Pipeline([Restructure(), Pack()])  # the right order is fine


def test_a_pass_that_needs_data_is_refused_without_it():
    model = Transformer(Config.preset("tiny"))
    with pytest.raises(ValueError, match="Distill needs data"):
        Pipeline([scale_weights, Distill(steps=1)]).run(model, data=[])


def test_a_pass_that_breaks_the_model_is_named():
    def poison(model, ctx):
        with torch.no_grad():
            model.embeddings.norm.weight.fill_(float("nan"))
        return model

    model = Transformer(Config.preset("tiny"))
    with pytest.raises(RuntimeError, match="after pass poison"):
        Pipeline([poison]).run(model, data(model.config))


def test_passes_must_return_a_model_and_be_callable():
    model = Transformer(Config.preset("tiny"))
    with pytest.raises(TypeError, match="returned dict"):
        Pipeline([lambda m, ctx: {}]).run(model, data(model.config))
    with pytest.raises(TypeError, match="not callable"):
        Pipeline([42])


def test_the_design_api_runs_end_to_end_on_tiny(tmp_path):
    from compress import Prune, Quantize, Share

    teacher = Transformer(Config.preset("tiny"))
    batches = [{**b, "decoder_input_ids": b["input_ids"][:, :5]} for b in data(teacher.config, n=4)]
    pipeline = Pipeline(
        [
            Share(layers_per_group=2, embed_dim=32),
            Prune(heads=0.5, ffn=0.5),
            Distill(steps=3, temperature=2.0, progress=False),
            Quantize("int8"),
        ]
    )
    lite = pipeline.run(teacher, data=batches)
    assert [s.name for s in pipeline.stages] == ["input", "Share", "Prune", "Distill", "Quantize"]
    assert pipeline.stages[-1].size_bytes < pipeline.stages[0].size_bytes / 4
    assert all(shape.n_heads == 2 for shape in (*lite.config.encoder, *lite.config.decoder))
    assert lite.config.quantized and lite.config.encoder_share == (0, 0)
    pipeline.save(lite, tmp_path)
    again = load(tmp_path)
    batch = batches[0]
    assert torch.equal(again(**batch).head_logits["lm"], lite(**batch).head_logits["lm"])


def test_a_rerun_resumes_at_the_first_unfinished_pass(tmp_path):
    model = Transformer(Config.preset("tiny"))
    calls = []

    def counted(m, ctx):
        calls.append(ctx.workdir.name)
        return scale_weights(m, ctx)

    def crash(m, ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Pipeline([counted, tie_encoder, crash]).run(model, data(model.config), workdir=tmp_path)
    pipeline = Pipeline([counted, tie_encoder, scale_weights])
    lite = pipeline.run(model, data(model.config), workdir=tmp_path)
    assert calls == ["00-counted"]  # finished passes were loaded, not redone
    assert [s.name for s in pipeline.stages] == ["input", "counted", "tie_encoder", "scale_weights"]
    straight = Pipeline([scale_weights, tie_encoder, scale_weights]).run(model, data(model.config))
    batch = data(model.config)[0]
    assert torch.equal(lite(**batch).hidden_states, straight(**batch).hidden_states)
    folders = pipeline.stage_models(tmp_path)  # where each pass's result was saved, in pass order
    assert [f.parent.name for f in folders] == ["00-counted", "01-tie_encoder", "02-scale_weights"]
    assert torch.equal(load(folders[-1])(**batch).hidden_states, lite(**batch).hidden_states)
    Pipeline([Distill(steps=1, progress=False)]).run(model, data(model.config), workdir=tmp_path / "d")
    with pytest.raises(ValueError, match="holds a finished Distill run with settings"):
        Pipeline([Distill(steps=2, progress=False)]).run(model, data(model.config), workdir=tmp_path / "d")


def test_a_given_teacher_is_what_the_student_learns_from():
    """Pipeline.run(student, teacher=other): Distill pulls the student toward `other`, and neither model changes."""
    config = Config.preset("tiny", decoder_layers=0, heads=("mlm",))
    torch.manual_seed(0)
    student, other = Transformer(config).eval(), Transformer(config).eval()
    batches = data(config, n=4)
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    before_other = {k: v.clone() for k, v in other.state_dict().items()}

    def gap(model):
        with torch.no_grad():
            return sum(float((model(**b).hidden_states - other(**b).hidden_states).square().mean()) for b in batches)

    lite = Pipeline([Distill(steps=30, lr=1e-3, progress=False)]).run(student, data=batches, teacher=other)
    assert gap(lite.eval()) < 0.5 * gap(student)
    assert all(torch.equal(v, before_student[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, before_other[k]) for k, v in other.state_dict().items())
    with pytest.raises(TypeError, match="teacher must be a model.Transformer"):
        Pipeline([Distill(steps=1)]).run(student, data=batches, teacher="runs/teacher")


def test_a_resumed_stage_is_evaluated_like_a_fresh_one(tmp_path):
    """Issue 19: a rerun loaded finished stages without evaluating them, so the report's latencies fell short."""
    from compress.report import write_report

    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    calls = []

    def evaluate(m):
        calls.append(m.config.encoder_share)
        return {"score": float(len(calls))}

    Pipeline([tie_encoder]).run(model, data(model.config), evaluate, workdir=tmp_path)
    calls.clear()
    pipeline = Pipeline([tie_encoder])
    pipeline.run(model, data(model.config), evaluate, workdir=tmp_path)
    assert calls == [(0, 1), (0, 0)]  # the input, then the finished pass loaded from its folder
    assert [s.metrics for s in pipeline.stages] == [{"score": 1.0}, {"score": 2.0}]
    write_report(pipeline.stages, tmp_path / "report", latencies=[1.0] * len(calls))


def test_no_rank_but_rank_0_writes_stage_records_before_the_process_group_exists(tmp_path, monkeypatch):
    """Issue 19: under torchrun, passes that do not train run before the process group starts; rank 1 then
    counted as the writer too, and rank 0 could find its records and skip a stage's evaluation."""
    from model.training.distributed import is_main

    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    monkeypatch.setenv("RANK", "1")
    assert is_main()  # without WORLD_SIZE > 1 this is no torchrun rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_main()
    Pipeline([tie_encoder]).run(model, data(model.config), workdir=tmp_path)
    assert not list(tmp_path.rglob("stage.json"))
    monkeypatch.setenv("RANK", "0")
    assert is_main()
    Pipeline([tie_encoder]).run(model, data(model.config), workdir=tmp_path)
    assert len(list(tmp_path.rglob("stage.json"))) == 1


def test_a_rerun_from_another_model_or_teacher_is_refused_naming_it(tmp_path):
    config = Config.preset("tiny", decoder_layers=0, heads=("mlm",))
    torch.manual_seed(0)
    model, other = Transformer(config), Transformer(config)
    Pipeline([tie_encoder]).run(model, data(config), workdir=tmp_path)
    with pytest.raises(ValueError, match="made from another model and teacher than this run's"):
        Pipeline([tie_encoder]).run(other, data(config), workdir=tmp_path)
    with pytest.raises(ValueError, match="made from another teacher than this run's"):
        Pipeline([tie_encoder]).run(model, data(config), workdir=tmp_path, teacher=other)
    with pytest.raises(ValueError, match="made from another data than this run's"):
        Pipeline([tie_encoder]).run(model, data(config, n=2), workdir=tmp_path)
