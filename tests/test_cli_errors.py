"""The CLI's exit codes by where an error was raised: flashlite's input checks exit 2, anything else exits 1."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.cli import main, raised_by_flashlite
from model import Config, Transformer, save

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["--no-onnx", "--seq-len", "8", "--rounds", "1", "--repeat", "1", "--warmup", "0"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process, returning (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save(Transformer(Config.preset("tiny")), tmp_path_factory.mktemp("tiny") / "model")


def torch_runtime_error(*args, **kwargs):
    return torch.zeros(2) @ torch.zeros(3)  # RuntimeError from inside torch's matmul


def torch_value_error(*args, **kwargs):
    return F.cross_entropy(torch.zeros(2, 3), torch.zeros(4, dtype=torch.long))  # ValueError raised in torch


@pytest.mark.parametrize(
    "fake, kind", [(torch_runtime_error, "RuntimeError"), (torch_value_error, "ValueError")], ids=["runtime", "value"]
)
def test_an_error_raised_inside_torch_is_an_internal_error(folder, monkeypatch, fake, kind):
    monkeypatch.setattr("compress.evaluate.measure.time_model", fake)
    code, stdout, stderr = run_main(["bench", "--model", str(folder), *BENCH])
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"flashlite bench: internal error: {kind}: ")
    assert lines[0].endswith("(rerun with --debug for the traceback)")


def test_debug_prints_the_traceback(folder, monkeypatch):
    monkeypatch.setattr("compress.evaluate.measure.time_model", torch_value_error)
    code, _, stderr = run_main(["--debug", "bench", "--model", str(folder), *BENCH])
    assert code == 1
    assert stderr.startswith("Traceback (most recent call last):") and "in cross_entropy" in stderr
    assert stderr.strip().splitlines()[-1].startswith("flashlite bench: internal error: ValueError: Expected input")


def test_a_missing_model_folder_is_still_a_usage_error(tmp_path):
    missing = tmp_path / "missing"
    code, _, stderr = run_main(["bench", "--model", str(missing), *BENCH])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashlite bench: error:") and str(missing) in lines[0], stderr


def test_a_failure_flashlite_raises_itself_exits_1_on_one_line(folder, monkeypatch):
    def diverged(*args, **kwargs):
        exec(compile("raise RuntimeError('after pass X the loss is nan')", str(ROOT / "compress" / "fake.py"), "exec"))

    monkeypatch.setattr("compress.evaluate.measure.time_model", diverged)
    code, _, stderr = run_main(["bench", "--model", str(folder), *BENCH])
    assert code == 1
    assert stderr.strip() == (
        "flashlite bench: failed: after pass X the loss is nan (rerun with --debug for the traceback)"
    )


def _error_from(source: str, filename: Path) -> Exception:
    """The exception `source` raises when run as if it were the file `filename`."""
    namespace = {}
    exec(compile(f"def f():\n    {source}\n", str(filename), "exec"), {"torch": torch}, namespace)
    with pytest.raises(Exception) as caught:
        namespace["f"]()
    return caught.value


@pytest.mark.parametrize(
    "source, ours",
    [
        ("raise ValueError('max_len must be positive')", True),  # an input check
        ("open('/no/such/file')", True),  # the OS refused a path
        ("import pathlib; pathlib.Path('/no/such/file').read_text()", True),  # through the standard library
        ("import json; json.loads('{')", True),
        ("torch.cat(None)", False),  # a torch op refusing its arguments: a bug in the caller
        ("torch.zeros(2).view(3)", False),
        ("import torch.nn.functional as F; F.pad(torch.zeros(1), (1,), mode='nope')", False),  # raised in torch
    ],
)
def test_raised_by_flashlite_looks_at_the_frame_that_raised(source, ours):
    assert raised_by_flashlite(_error_from(source, ROOT / "model" / "fake.py")) is ours
    assert raised_by_flashlite(_error_from(source, ROOT / "tests" / "fake.py")) is False  # not flashlite's code
