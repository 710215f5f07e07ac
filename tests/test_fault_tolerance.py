"""Fault tolerance of training checkpoints: SIGKILL at any point (mid-write included) resumes exactly; torn files are refused.

The SIGKILL test runs tests/kill_worker.py in a subprocess and kills it at four points of one
run, each killed run resumed by the next: after some steps (anywhere), halfway through writing
a checkpoint file, with a checkpoint complete but not yet renamed into place, and right after
the rename. The uninterrupted reference run is trained in this process: fp32 CPU on one thread
in both, so the losses and weights must be equal bit for bit.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from interrupt import Interrupt, stop_at

from model.io import load_tensors
from model.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from kill_worker import STEPS, batches, fresh_model, run_config

WORKER = Path(__file__).parent / "kill_worker.py"
ROOT = Path(__file__).resolve().parents[1]
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


@pytest.fixture(scope="module")
def reference():
    """(losses, weights) of the same run without interruption and without checkpoints."""
    model = fresh_model()
    result = train(model, batches(), run_config(None, 1))
    return result.losses, model.state_dict()


def launch(ckpt: Path, out: Path, *args: str, kill_when=None) -> tuple[list[list[str]], int]:
    """Run the worker; with `kill_when`, SIGKILL it at the first stdout line for which kill_when(words) holds.

    Returns (stdout lines split into words, exit code).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(out.with_suffix(".stderr"), "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(ckpt), str(out), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=ROOT,
        )
        watchdog = threading.Timer(120, proc.kill)  # a worker that never reaches its kill point fails, not hangs
        watchdog.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line.split())
                if kill_when is not None and kill_when(lines[-1]):
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait()
        finally:
            watchdog.cancel()
            proc.stdout.close()
    if kill_when is not None:
        assert proc.returncode == -signal.SIGKILL, (lines, out.with_suffix(".stderr").read_text()[-2000:])
    return lines, proc.returncode


def complete_checkpoints(ckpt: Path) -> list[int]:
    """The steps of the step-* folders, after checking that each one is whole (what resume may pick)."""
    steps = []
    for folder in sorted(ckpt.glob("step-*")):
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES), f"{folder} is not a whole checkpoint"
        for name in FILES[:2]:
            load_tensors(folder / name)  # every byte there and valid
        steps.append(int(folder.name.split("-")[1]))
    return steps


def test_sigkill_at_any_point_resumes_with_the_uninterrupted_losses(tmp_path, reference):
    ref_losses, ref_weights = reference
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.safetensors"

    def check_losses(lines, what):
        for words in lines:
            if words[0] == "step":
                assert float.fromhex(words[2]) == ref_losses[int(words[1]) - 1], f"{what}: loss of step {words[1]}"

    def first_step(lines):
        return next(int(words[1]) for words in lines if words[0] == "step")

    # (a) Anywhere: checkpoints every 2 steps, killed as soon as step 3 is reported.
    lines, _ = launch(ckpt, out, "--every", "2", kill_when=lambda w: w[:2] == ["step", "3"])
    check_losses(lines, "first run")
    last = max(complete_checkpoints(ckpt))

    # (b) Halfway through writing model.safetensors of a checkpoint.
    torn = last + 2
    lines, _ = launch(ckpt, out, "--pause", f"write:{torn}:model.safetensors", kill_when=lambda w: w == ["paused"])
    assert first_step(lines) == last + 1, "the run after (a) must resume from the newest whole checkpoint"
    check_losses(lines, "run killed mid-write")
    partial = list((ckpt / f".tmp-step-{torn:08d}").glob(".model.safetensors.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, "the kill must leave a half-written file"
    assert max(complete_checkpoints(ckpt)) == torn - 1
    last = torn - 1

    # (c) With a whole checkpoint (trainer.json included) in its temp folder, not yet renamed.
    unrenamed = last + 2
    lines, _ = launch(ckpt, out, "--pause", f"replace:{unrenamed}", kill_when=lambda w: w == ["paused"])
    assert first_step(lines) == last + 1
    check_losses(lines, "run killed before the rename")
    assert [p.name for p in ckpt.glob(".tmp-*")] == [f".tmp-step-{unrenamed:08d}"], (
        "the resumed run removed the torn folder"
    )
    assert sorted(p.name for p in (ckpt / f".tmp-step-{unrenamed:08d}").iterdir()) == sorted(FILES)
    assert max(complete_checkpoints(ckpt)) == unrenamed - 1
    last = unrenamed - 1

    # (d) Right after the rename, before old checkpoints are pruned.
    renamed = last + 2
    lines, _ = launch(ckpt, out, "--pause", f"rename:{renamed}", kill_when=lambda w: w == ["paused"])
    assert first_step(lines) == last + 1, "a complete but unrenamed checkpoint must not be resumed from"
    check_losses(lines, "run killed after the rename")
    assert not list(ckpt.glob(".tmp-*"))
    assert max(complete_checkpoints(ckpt)) == renamed
    last = renamed

    # To the end: the whole loss sequence and the weights are those of the uninterrupted run.
    lines, code = launch(ckpt, out)
    assert code == 0, out.with_suffix(".stderr").read_text()[-2000:]
    check_losses(lines, "final run")
    done = lines[-1]
    assert done[0] == "done" and int(done[1]) == last
    assert [float.fromhex(x) for x in done[2:]] == ref_losses and len(ref_losses) == STEPS
    assert not list(ckpt.glob(".tmp-*"))
    final = load_tensors(out)
    assert final.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        assert torch.equal(final[name], value), name


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A checkpoint folder of a run stopped after step 2 of STEPS (checkpoints at 1 and 2)."""
    ckpt = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Interrupt):
        train(fresh_model(), batches(), run_config(str(ckpt), 1), callback=stop_at(2))
    return ckpt


@pytest.fixture
def ckpt(interrupted, tmp_path):
    shutil.copytree(interrupted, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("name", FILES)
def test_a_torn_checkpoint_file_is_a_clear_error_on_resume(name, ckpt):
    # A write outside our protocol (another tool, a full disk) can cut a file short.
    path = ckpt / "step-00000002" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=name):
        train(fresh_model(), batches(), run_config(str(ckpt), 1))


def test_stray_step_named_entries_do_not_break_resume(ckpt, reference):
    # Users keep notes and copies beside checkpoints; only step-<number> folders are checkpoints.
    (ckpt / "step-notes.txt").write_text("lr sweep 3")
    shutil.copytree(ckpt / "step-00000001", ckpt / "step-best")
    result = train(fresh_model(), batches(), run_config(str(ckpt), 1))
    assert result.resumed_from == 2 and result.losses == reference[0]
    assert (ckpt / "step-notes.txt").is_file() and (ckpt / "step-best").is_dir()
