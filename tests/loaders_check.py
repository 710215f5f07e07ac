"""Load export folders with Optimum's ORTModel classes and sentence-transformers' ONNX backend; save what they compute.

Runs in the loaders environment (`make loaders`: transformers 4.57, optimum-onnx, sentence-transformers
5.7), not in flashlite's: tests/test_loaders.py starts it and compares the outputs with flashlite's
PyTorch model. Usage: python tests/loaders_check.py JOBS.json OUT.npz, where JOBS.json is a list of
{"loader": "optimum" | "sentence-transformers", "folder", "texts", ["class", "subfolder", "file_name"]};
OUT.npz holds "JOB/NAME" arrays: each job's tokenized input_ids and attention_mask (Optimum) and
its outputs, or its embeddings (sentence-transformers).
"""

import json
import sys
from pathlib import Path

import numpy as np


def run_optimum(job: dict) -> dict[str, np.ndarray]:
    import optimum.onnxruntime
    from transformers import AutoTokenizer

    loader = getattr(optimum.onnxruntime, job["class"])
    options = {k: job[k] for k in ("subfolder", "file_name") if job.get(k)}
    model = loader.from_pretrained(job["folder"], **options)
    inputs = AutoTokenizer.from_pretrained(job["folder"])(job["texts"], padding=True, return_tensors="np")
    outputs = model(**inputs)
    names = ("last_hidden_state", "logits", "start_logits", "end_logits")
    values = {name: np.asarray(outputs[name]) for name in names if name in outputs}
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **values}


def run_sentence_transformers(job: dict) -> dict[str, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"file_name": job["file_name"]}} if job.get("file_name") else {}
    model = SentenceTransformer(job["folder"], backend="onnx", device="cpu", **kwargs)
    return {"embeddings": model.encode(job["texts"], convert_to_numpy=True)}


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    runners = {"optimum": run_optimum, "sentence-transformers": run_sentence_transformers}
    arrays = {}
    for i, job in enumerate(jobs):
        for name, value in runners[job["loader"]](job).items():
            arrays[f"{i}/{name}"] = value
    np.savez(sys.argv[2], **arrays)


if __name__ == "__main__":
    main()
