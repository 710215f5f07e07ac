"""DeployedModel: an export folder on ONNX Runtime with numpy and tokenizers only (no torch, no onnx package).

What a service runs: it checks the folder's manifest (every file present, its size, its sha256),
opens the graph in ONNX Runtime, tokenizes text with the folder's tokenizer.json and returns the
graph's outputs by their Hugging Face names. `model.OrtModel` is the PyTorch-facing runner (torch
tensors, flashlite's Output, generation); this one imports neither torch nor flashlite's model code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from model.config import Config, check_int
from model.onnx.layout import FLASHLITE_CONFIG, HIDDEN, SENTENCE_EMBEDDING, graph_paths, verify_folder

# What ONNX Runtime raises when it refuses a model file: the file's fault, reported as a ValueError.
# Its other errors (RuntimeException, EPFail, EngineError, ...) are not about the file and propagate.
ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,  # an operator ONNX Runtime has no kernel for
)


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def open_session(path: Path, threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on one graph file, with the options flashlite's graphs are checked under.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise for exported graphs
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    # ORT fuses an int4 DequantizeLinear + MatMul (our Int4Linear export) into MatMulNBits, by
    # default with int8 activations; level 0 keeps fp32 activations, as PyTorch's Int4Linear does.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ORT_LOAD_ERRORS as err:  # ONNX Runtime refuses the file; its other errors (and ours) propagate
        raise ValueError(f"ONNX Runtime cannot load {path}: {first_line(err)}") from None


class DeployedModel:
    """An export folder's encoder graph on ONNX Runtime: `model(batch)`, `model.tokenize(texts)`, `model.embed(texts)`."""

    def __init__(self, folder: str | os.PathLike, *, file_name: str | None = None, threads: int | None = None):
        """folder: what `export_onnx` wrote into a folder (its manifest is checked first).
        file_name: the graph, relative to the folder (default model.onnx, or onnx/model.onnx in the
          sentence-transformers layout), e.g. "model-int8-dynamic.onnx" or "onnx/model_qint8_quantized.onnx".
        threads: ONNX Runtime's intra-op thread count (None: its default)."""
        if threads is not None:
            check_int("threads", threads, 1)
        self.folder = Path(folder)
        listed = verify_folder(self.folder)["files"]
        path = graph_paths(self.folder)["encoder"] if file_name is None else self.folder / file_name
        name = path.relative_to(self.folder).as_posix()
        if name not in listed or not name.endswith(".onnx"):
            graphs = sorted(n for n in listed if n.endswith(".onnx"))
            raise ValueError(f"{self.folder} has no graph {name!r}; its graphs: {graphs}")
        self.path = path
        self.config = Config.from_json((self.folder / FLASHLITE_CONFIG).read_text(encoding="utf-8"))
        self.session = open_session(path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"DeployedModel({str(self.path)!r}, outputs={self.outputs})"

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the graph on input_ids (B,T) [, attention_mask, token_type_ids]; returns output name -> array.

        Args:
            batch: integer arrays; attention_mask defaults to ones, token_type_ids to zeros.
        """
        if "input_ids" not in batch:
            raise TypeError("the batch has no input_ids")
        ids = np.asarray(batch["input_ids"])
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"input_ids must be a (batch, seq_len) integer array, got {ids.dtype} {ids.shape}")
        if ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens; max_positions is {self.config.max_positions}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in the vocabulary [0, {self.config.vocab_size})")
        feeds = {"input_ids": ids.astype(np.int64)}
        defaults = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for name, default in defaults.items():
            value = np.asarray(batch.get(name, default))
            if value.shape != ids.shape:
                raise ValueError(f"{name} has shape {value.shape} but input_ids has {ids.shape}")
            if name in self.inputs:
                feeds[name] = value.astype(np.int64)
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Encode texts (or text pairs) with the folder's tokenizer.json: padded, truncated int64 arrays.

        Args:
            texts: the texts.
            pairs: optional second segments, one per text.
        """
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.folder / "tokenizer.json"
            if not path.is_file():
                raise ValueError(f"{self.folder} has no tokenizer.json (the model was exported without a tokenizer)")
            self._tokenizer = Tokenizer.from_file(str(path))
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = self._tokenizer.encode_batch(inputs)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {name: np.array([getattr(e, f) for e in encodings], dtype=np.int64) for name, f in fields.items()}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings (B, dim): the graph's sentence_embedding output, else mean pooling + L2 norm of its last_hidden_state.

        Args:
            texts: the sentences.
        """
        batch = self.tokenize(texts)
        out = self(batch)
        if SENTENCE_EMBEDDING in out:
            return out[SENTENCE_EMBEDDING]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        mean = (out[HIDDEN] * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
