"""The example notebooks run top to bottom with small settings, and what they print holds up.

Each notebook is executed by nbclient in a fresh ipykernel running this interpreter, in a
temporary folder, with FLASHLITE_NOTEBOOK_SMALL=1 (the notebooks' short settings). A cell that
raises fails the test (nbclient's CellExecutionError names the cell and shows the traceback).
After the notebook's own cells, a probe cell (added here, never saved) prints a JSON summary of
the notebook's variables, so the test checks real values, not just the absence of errors.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="the notebook tests need the `dev` extra (nbformat, nbclient, ipykernel)"
)
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the `dev` extra (nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need the `dev` extra (ipykernel)")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (after the skips above)
from jupyter_client.manager import KernelManager  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SUMMARY = "NOTEBOOK-SUMMARY "
CELL_TIMEOUT = 300  # seconds: generous, for busy machines

# Per notebook: the probe code (it prints SUMMARY + JSON) and extra environment variables.
PROBES = {
    "01_quickstart": (
        """
import json, torch
with torch.no_grad():
    reloaded = same(**batch).hidden_states
print("NOTEBOOK-SUMMARY " + json.dumps({
    "batch": list(batch["input_ids"].shape), "hidden": list(out.hidden_states.shape), "logits": list(out.logits.shape),
    "dim": model.config.dim, "vocab": model.config.vocab_size, "identical": torch.equal(reloaded, out.hidden_states),
    "files": sorted(p.name for p in (OUT / "tiny-model").iterdir()),
    "minilm_dim": None if minilm is None else minilm.config.dim,
    "similarity": None if minilm is None else similarity.tolist(),
}))
""",
        {},
    ),
    "02_one_pass_at_a_time": (
        """
import json
print("NOTEBOOK-SUMMARY " + json.dumps({
    "chain": [s.name for s in pipeline.stages],
    "sizes": [s.size_bytes for s in pipeline.stages],
    "unique": [s.unique_params for s in pipeline.stages],
    "fidelity": [s.metrics["fidelity"] for s in pipeline.stages],
    "alone": {label: [s.size_bytes, s.metrics["fidelity"]] for label, s in alone.items()},
    "share": list(shared.config.encoder_share), "heads": [teacher.config.encoder[0].n_heads, pruned.config.encoder[0].n_heads],
    "quantized_layers": len(lite.config.quantized),
    "files": sorted(p.name for p in OUT.iterdir()),
}))
""",
        {},
    ),
    "03_compress_minilm_glue": (
        """
import json
summary = {"ready": READY}
if READY:
    summary.update(teacher=scores["teacher"]["accuracy"], lite=scores["Lite"]["accuracy"],
                   dev_rows=len(dev_rows), chain=[s.name for s in pipeline.stages],
                   sizes=[s.size_bytes for s in pipeline.stages], files=sorted(p.name for p in OUT.iterdir()))
print("NOTEBOOK-SUMMARY " + json.dumps(summary))
""",
        {},
    ),
    "04_onnx_runtime": (
        """
import json
print("NOTEBOOK-SUMMARY " + json.dumps({
    "parity": exported.parity, "shapes": exported.shapes,
    "ort_diff": difference.max().item(), "ort_diff_real": difference[real].max().item(),
    "rows": [[name, size, ms] for name, size, ms in rows],
}))
""",
        {},
    ),
    "05_triton_attention": (
        """
import json
print("NOTEBOOK-SUMMARY " + json.dumps({
    "mode": MODE, "exact": {f"{b} causal={c}": e for (b, c), e in exact_errors.items()},
    "kernels": kernel_results,
}))
""",
        {"TRITON_INTERPRET": "1"},
    ),  # the notebook's interpreter branch: the kernels on a tiny shape, on CPU
}


def notebook_names():
    found = sorted(p.stem for p in EXAMPLES.glob("*.ipynb"))
    missing = sorted(set(PROBES) - set(found))
    if missing:
        raise RuntimeError(f"notebooks {missing} are missing from {EXAMPLES}")
    return found


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernelspec folder whose `python3` kernel runs this interpreter (a user-level `python3` spec could name another Python)."""
    from ipykernel.kernelspec import write_kernel_spec

    folder = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(folder / "python3")
    manager = KernelSpecManager(kernel_dirs=[str(folder)])
    spec = manager.get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable, f"the test kernel would run {spec.argv[0]}, not {sys.executable}"
    return manager


def execute(name: str, folder: Path, kernel_specs: KernelSpecManager, env: dict[str, str] | None = None):
    """Run notebook `name` plus its probe cell in `folder`; returns (executed notebook, summary dict)."""
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    probe, extra_env = PROBES[name]
    notebook.cells.append(nbformat.v4.new_code_cell(probe.strip()))
    environment = {
        **os.environ,
        "FLASHLITE_NOTEBOOK_SMALL": "1",
        "OMP_NUM_THREADS": "1",  # tiny models: on busy cores, thread hand-offs cost more than they save
        **extra_env,
        **(env or {}),
    }
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(folder)}},
    )
    try:
        client.execute(env=environment)  # raises CellExecutionError on the first failing cell
    finally:  # nbclient leaves a kernel it did not create running
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    lines = [
        line
        for output in notebook.cells[-1].outputs
        if output.get("output_type") == "stream"
        for line in output.get("text", "").splitlines()
        if line.startswith(SUMMARY)
    ]
    assert len(lines) == 1, f"the probe cell printed no summary; its outputs: {notebook.cells[-1].outputs}"
    return notebook, json.loads(lines[0][len(SUMMARY) :])


def printed(notebook) -> str:
    """Everything the notebook's own cells printed (stdout and stderr), the probe excluded."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells[:-1]
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )


def check_quickstart(summary, notebook):
    batch, T = summary["batch"], summary["batch"][1]
    assert batch[0] == 1 and 3 <= T <= 32
    assert summary["hidden"] == [1, T, summary["dim"]]
    assert summary["logits"] == [1, T, summary["vocab"]]
    assert summary["identical"]
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= set(summary["files"])
    if summary["minilm_dim"] is not None:
        assert summary["minilm_dim"] == 384
        similarity = summary["similarity"]
        # the two sentences about music are closer to each other than to the one about stocks
        assert similarity[0][1] > similarity[0][2] and similarity[0][1] > similarity[1][2]
        assert "max |flashlite - transformers|" in printed(notebook)


def check_one_pass(summary, notebook):
    assert summary["chain"] == ["input", "Share", "Prune", "Distill", "Quantize"]
    sizes, unique, fidelity = summary["sizes"], summary["unique"], summary["fidelity"]
    assert sizes[1] < sizes[0] and sizes[2] < sizes[1] and sizes[4] < sizes[3] / 3  # int8: about a quarter of fp32
    assert unique[1] < unique[0] and unique[2] < unique[1]
    assert fidelity[0] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 <= f <= 1.0 + 1e-5 for f in fidelity)
    for label, (size, score) in summary["alone"].items():
        assert size < sizes[0], label
        if label.startswith("Quantize: int8"):
            assert score > 0.99, f"int8 weights alone should barely move the embeddings: {score}"
    rounded, nearest = summary["alone"]["Quantize: int4, GPTAQ"], summary["alone"]["Quantize: int4"]
    assert rounded[0] == nearest[0] and rounded[1] > nearest[1], (rounded, nearest)  # same storage, better rounding
    assert summary["share"] == [0, 0, 1, 1, 2, 2] or summary["share"] == [0, 0]  # MiniLM, or the tiny fallback
    assert summary["heads"][1] == summary["heads"][0] // 2
    assert summary["quantized_layers"] > 0
    assert {"report.json", "report.md", "metric_vs_size.png", "quality_vs_size.png", "lite"} <= set(summary["files"])
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the quality-vs-size plot was not displayed"


def check_glue(summary, notebook):
    if not summary["ready"]:
        assert "skipped:" in printed(notebook)
        return
    assert summary["chain"] == ["input", "Prune", "Distill", "Quantize"]
    assert summary["dev_rows"] == 64
    assert 0.0 <= summary["teacher"] <= 1.0 and 0.0 <= summary["lite"] <= 1.0
    assert summary["sizes"][-1] < summary["sizes"][0] / 3
    assert {"report.json", "report.md", "metric_vs_size.png", "lite-sst2"} <= set(summary["files"])


def check_onnx(summary, notebook):
    assert summary["parity"] and max(summary["parity"].values()) <= 1e-4
    assert max(seq for _, seq in summary["shapes"]) == 64
    assert summary["ort_diff"] <= 1e-4  # the export contract (fp32), padding positions included
    assert summary["ort_diff_real"] <= 1e-5
    rows = {name: (size, ms) for name, size, ms in summary["rows"]}
    assert set(rows) == {"PyTorch fp32", "ONNX Runtime fp32", "ONNX Runtime int8-dynamic", "ONNX Runtime int4"}
    fp32 = rows["ONNX Runtime fp32"][0]
    assert rows["ONNX Runtime int8-dynamic"][0] < fp32 / 2 and rows["ONNX Runtime int4"][0] < fp32
    if fp32 > 50e6:  # MiniLM (not the tiny fallback, whose small matrices carry relatively more scales)
        assert rows["ONNX Runtime int8-dynamic"][0] < fp32 / 3.5 and rows["ONNX Runtime int4"][0] < fp32 / 5
    assert all(ms > 0 for _, ms in rows.values())
    assert "[INFO]" not in printed(notebook), "ONNX tooling's INFO logging leaked into the notebook"


def check_triton(summary, notebook):
    assert all(error < 1e-5 for error in summary["exact"].values()), summary["exact"]
    assert len(summary["exact"]) == 4
    if summary["mode"] == "exact only":  # no triton on this platform
        assert "skipped:" in printed(notebook)
        return
    assert summary["mode"] == "interpreter"
    fp32, fp16 = summary["kernels"]["torch.float32"], summary["kernels"]["torch.float16"]
    assert fp32["flash"] < 1e-5 and fp32["flash backward (dq)"] < 1e-4
    assert fp16["flash"] < 5e-3
    assert fp32["flash-int8"] < 0.1  # approximate by design: int8 scores


CHECKS = {
    "01_quickstart": check_quickstart,
    "02_one_pass_at_a_time": check_one_pass,
    "03_compress_minilm_glue": check_glue,
    "04_onnx_runtime": check_onnx,
    "05_triton_attention": check_triton,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs(name, tmp_path, kernel_specs):
    notebook, summary = execute(name, tmp_path, kernel_specs)
    CHECKS[name](summary, notebook)


@pytest.mark.slow
def test_glue_notebook_skips_without_data(tmp_path, kernel_specs):
    """Without SST-2 files the GLUE notebook says what it needs and runs no cell that would fail."""
    notebook, summary = execute(
        "03_compress_minilm_glue", tmp_path, kernel_specs, env={"FLASHLITE_GLUE_DIR": str(tmp_path / "no-glue-here")}
    )
    assert summary == {"ready": False}
    assert f"no SST-2 data at {tmp_path / 'no-glue-here'}" in printed(notebook)


def test_committed_notebooks_have_no_outputs():
    """The repository keeps notebooks without outputs (small, clean diffs); the tests run them."""
    for name in notebook_names():
        notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown", (
            f"{name} should open with a markdown cell saying what it shows"
        )
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"
        assert "FLASHLITE_NOTEBOOK_SMALL" in "".join(c.source for c in notebook.cells), (
            f"{name} has no small-settings switch"
        )
