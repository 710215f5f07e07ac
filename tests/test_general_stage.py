"""The general-then-task schedule from the command line: a general run's student, then `compress --student` from a fine-tuned teacher."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from compress.cli import main
from compress.evaluate import glue
from model import Config, Transformer, load, save
from model.data.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GENERAL = """
passes:
  - prune: {heads: 0.5, ffn: 0.5}
  - distill: {steps: 3, logits: 0.0, progress: false}
data: {glue_text: [sst2], glue_dir: GLUE, max_len: 32, batch_size: 8, limit: 200}
export: {onnx: false}
"""
TASK = """
passes:
  - distill: {steps: 3, task: 1.0, progress: false}
  - quantize: {mode: int8}
data: {task: sst2, glue_dir: GLUE, max_len: 32, batch_size: 8, limit: 200}
export: {onnx: false}
"""


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A folder with pretrained/, teacher/ (its SST-2 classifier) and the two recipes: a tiny model."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present (it lives beside the repository)")
    root = tmp_path_factory.mktemp("general")
    glue_dir = SHARED_DATA / "glue"
    rows = glue.load("sst2", "train", glue_dir)[:400]
    torch.manual_seed(0)
    pretrained = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    pretrained.tokenizer = train_tokenizer([r["sentence"] for r in rows], vocab_size=pretrained.config.vocab_size)
    teacher = Transformer(pretrained.config.replace(heads=("classify",), n_labels=2))
    teacher.load_state_dict(
        {k: v for k, v in pretrained.state_dict().items() if not k.startswith("heads.")}, strict=False
    )
    teacher.tokenizer = pretrained.tokenizer
    glue.finetune(teacher, "sst2", rows, steps=20, lr=1e-3, batch_size=16, max_len=32, seed=0)
    save(pretrained, root / "pretrained")
    save(teacher, root / "teacher")
    for name, text in (("general", GENERAL), ("task", TASK)):
        (root / f"{name}.yaml").write_text(text.replace("GLUE", str(glue_dir)))
    return root


def test_the_task_stage_starts_from_the_general_student_and_learns_the_teachers_head(models, tmp_path):
    code, _, stderr = run_main(
        ["compress", str(models / "general.yaml"), "--model", str(models / "pretrained"), "--out", str(tmp_path / "g")]
    )
    assert code == 0, stderr
    general = load(tmp_path / "g" / "model")
    assert general.config.heads == ("mlm",) and general.config.encoder[0].n_heads < 4
    code, stdout, stderr = run_main(
        [
            "compress",
            str(models / "task.yaml"),
            "--model",
            str(models / "teacher"),
            "--student",
            str(tmp_path / "g" / "model"),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    assert code == 0, stderr
    lite = load(tmp_path / "t" / "model")
    assert lite.config.heads == ("classify",) and lite.config.n_labels == 2 and lite.config.quantized
    assert lite.config.encoder == general.config.encoder  # the general student's shape, not pruned again
    teacher = load(models / "teacher")
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    first = report["stages"][0]
    assert first["name"] == "input" and first["unique_params"] < sum(p.numel() for p in teacher.parameters())
    assert "accuracy" in first["metrics"] and "| Distill |" in stdout


def test_a_missing_student_folder_is_a_usage_error(models, tmp_path):
    code, _, stderr = run_main(
        [
            "compress",
            str(models / "task.yaml"),
            "--model",
            str(models / "teacher"),
            "--student",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    assert code == 2 and "nowhere" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "t" / "model").exists()


def test_the_report_says_which_dev_rows_its_task_metric_scores(models, tmp_path):
    code, _, stderr = run_main(
        ["compress", str(models / "task.yaml"), "--model", str(models / "teacher"), "--out", str(tmp_path / "t")]
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert any("first 64 rows of sst2's dev set" in note for note in report["notes"])  # 8 batches of 8
    assert "`flashlite eval --task sst2` scores all of it" in (tmp_path / "t" / "report.md").read_text()
    teacher = load(models / "teacher")
    glue_dir = SHARED_DATA / "glue"
    want = glue.evaluate(teacher, "sst2", "dev", glue_dir, teacher.tokenizer, max_len=32, limit=64)["accuracy"]
    assert report["stages"][0]["metrics"]["accuracy"] == pytest.approx(want)


def test_the_note_of_a_model_without_a_classify_head_names_no_task_metric(models):
    from compress.job import FidelityEvaluator
    from compress.recipe import DataSpec

    pretrained = load(models / "pretrained")
    spec = DataSpec(task="sst2", glue_dir=str(SHARED_DATA / "glue"), max_len=32, batch_size=8)
    rows = glue.load("sst2", "dev", spec.glue_dir)[:16]
    evaluator = FidelityEvaluator(
        pretrained, glue.batches(rows, pretrained.tokenizer, "sst2", max_len=32, batch_size=8), spec
    )
    assert set(evaluator.metrics(pretrained)) == {"fidelity"}
    assert "no classify head" in evaluator.note() and "accuracy" not in evaluator.note()
