"""Distributed training on CPU: 2 gloo processes on localhost (DDP and FSDP2) match a 1-process run; an empty shard fails fast."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.io import load_tensors
from model.training.loop import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import STEPS, classification_batches, model

WORKER = Path(__file__).parent / "distributed_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, mode: str) -> subprocess.CompletedProcess:
    return launch([str(WORKER), str(out), mode])


def launch(program: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 PROGRAM...` on localhost with a free port."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *program,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


@pytest.mark.parametrize("mode", ["train", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, mode):
    """DDP, and FSDP2 (each rank holds half of every weight), give both ranks the 1-process weights."""
    done = torchrun(tmp_path, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    batches = classification_batches(2 * STEPS)
    # One process sees, at step s, the two batches that ranks 0 and 1 saw: 2s and 2s+1.
    merged = [{k: torch.cat([batches[2 * s][k], batches[2 * s + 1][k]]) for k in batches[0]} for s in range(STEPS)]
    single = model()
    train(single, merged, TrainConfig(steps=STEPS, lr=1e-3, progress=False))
    for name, value in single.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, atol=1e-6, rtol=0)
    assert not torch.equal(rank0["heads.classify.weight"], model().state_dict()["heads.classify.weight"])


def test_an_empty_shard_fails_fast_on_every_rank(tmp_path):
    done = torchrun(tmp_path, "empty-shard")
    assert done.returncode != 0
    assert "ranks [1] have no usable data" in done.stderr


def test_distillation_runs_unchanged_under_torchrun(tmp_path):
    done = torchrun(tmp_path, "distill")
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_fsdp_resumes_with_the_loss_sequence_of_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, modes in ((straight, ["fsdp"]), (resumed, ["fsdp-resume", "fsdp-resume-finish"])):
        out.mkdir()
        for mode in modes:
            done = torchrun(out, mode)
            assert done.returncode == 0, done.stderr[-3000:]
    assert (resumed / "checkpoints" / "step-00000002").is_dir()
    for rank in (0, 1):
        assert (resumed / f"losses{rank}.txt").read_text() == (straight / f"losses{rank}.txt").read_text()
        a, b = load_tensors(straight / f"rank{rank}.safetensors"), load_tensors(resumed / f"rank{rank}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_distillation_matches_ddp(tmp_path):
    results = {}
    for mode in ("distill", "fsdp-distill"):
        (tmp_path / mode).mkdir()
        done = torchrun(tmp_path / mode, mode)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = load_tensors(tmp_path / mode / "rank0.safetensors")
    ddp, fsdp = results.values()
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-6, rtol=0)


def test_the_cli_pretrains_and_compresses_under_torchrun_with_fsdp(tmp_path):
    """The README's launch: `torchrun ... -m compress.cli pretrain|compress --parallel fsdp` writes loadable models once."""
    from test_cli import paragraph  # the CLI tests' synthetic prose

    from model import load

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n\n".join(paragraph(rng) for _ in range(60)) + "\n", encoding="utf-8")
    teacher = tmp_path / "teacher"
    done = launch(
        [
            "-m",
            "compress.cli",
            "pretrain",
            "--preset",
            "tiny",
            "--corpus",
            str(corpus),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--max-len",
            "32",
            "--parallel",
            "fsdp",
            "--out",
            str(teacher),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrained preset 'tiny'") == 1  # rank 0 reports
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "passes:\n  - share: {embed_dim: 32}\n  - prune: {heads: 0.5, ffn: 0.5}\n  - distill: {steps: 2, progress: false}\n"
        f"data: {{max_len: 32, batch_size: 4, limit: 60, corpus: {corpus}}}\nexport: {{onnx: false}}\n"
    )
    done = launch(
        [
            "-m",
            "compress.cli",
            "compress",
            str(recipe),
            "--model",
            str(teacher),
            "--parallel",
            "fsdp",
            "--out",
            str(tmp_path / "lite"),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lite = load(tmp_path / "lite" / "model")
    assert (
        lite.config.embed_dim == 32 and lite.config.encoder[0].n_heads == load(teacher).config.encoder[0].n_heads // 2
    )
