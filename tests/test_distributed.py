"""Distributed training on CPU: 2 gloo processes on localhost match a 1-process run; an empty shard fails fast."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.io import load_tensors
from model.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import STEPS, classification_batches, model  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, mode: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(WORKER), str(out), mode,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    done = torchrun(tmp_path, "train")
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
