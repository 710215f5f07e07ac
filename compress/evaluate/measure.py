"""Efficiency measurements: parameters, bytes on disk, peak memory and latency of a model, an ONNX session or any callable."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import check_int
from model.transformer import MODEL_INPUTS

Batch = Mapping[str, torch.Tensor]


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters counted at every use, unique parameter storage) of a model.

    A shared block runs at several layer positions: it counts once per use in the first number
    and once in the second. Integer-storage (quantized) buffers count as parameters too.
    """
    unique = sum(t.numel() for t in _weights(model))
    per_use = unique
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if stack is None:
            continue
        for block_index, block in enumerate(stack.blocks):
            extra_uses = list(stack.share).count(block_index) - 1
            per_use += extra_uses * sum(t.numel() for t in _weights(block))
    return per_use, unique


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters plus persistent non-float buffers (quantized weights, scales), each storage once."""
    seen, tensors = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        key = t.data_ptr()
        if key not in seen:
            seen.add(key)
            tensors.append(t)
    return tensors


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a model's weight files.

    Args:
        path: a file (.safetensors, .onnx, anything), or a folder: its .safetensors and .onnx
            files (a saved model's config and tokenizer files are not weights and do not count).
            An ONNX file's external data files (weights over 2 GB are stored beside it) count too.

    Returns:
        The total size in bytes, each file once.

    Raises:
        FileNotFoundError: the path, a folder's weight files or an ONNX external data file is missing.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.safetensors"), *path.glob("*.onnx")])
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors or .onnx file")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no model file or folder at {path}")
    counted = set(files)
    for file in files:
        if file.suffix == ".onnx":
            counted |= _onnx_external_files(file)
    missing = [str(f) for f in counted if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"ONNX external data file(s) missing: {', '.join(missing)}")
    return sum(f.stat().st_size for f in counted)


def _onnx_external_files(path: Path) -> set[Path]:
    """The external data files an ONNX model's tensors point at (initializers, constants, subgraphs)."""
    import onnx  # only ONNX files need it

    model = onnx.load(str(path), load_external_data=False)
    files, graphs = set(), [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                tensors.extend(attr.tensors)
                graphs.extend(attr.graphs)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                files |= {path.parent / e.value for e in tensor.external_data if e.key == "location"}
    return files


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def peak_memory(fn: Callable[[], Any], *, device: str = "cpu") -> int:
    """How far memory use rises above its level at the call while `fn()` runs, in bytes.

    device "cpu": the process's peak resident set (VmHWM) minus its resident set (VmRSS) before
    the call, after resetting the peak through /proc/self/clear_refs (Linux). It sees every
    allocation, Python's, torch's and ONNX Runtime's alike, in whole pages; memory the allocator
    kept from earlier work and reuses is not counted again, so warm up first for a steady figure.
    device "cuda" (or "cuda:N"): torch.cuda.max_memory_allocated minus the memory allocated before
    the call: tensors of torch's caching allocator, not the CUDA context nor other libraries.

    Raises:
        RuntimeError: "cpu" off Linux (no /proc/self), or "cuda" without a CUDA device.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but CUDA is not available")
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if kind != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    clear_refs = Path("/proc/self/clear_refs")
    if not sys.platform.startswith("linux") or not clear_refs.exists():
        raise RuntimeError("peak_memory on CPU reads /proc/self (Linux only); this platform has none")
    before = _status_kib("VmRSS")
    clear_refs.write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def latency(
    fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 20, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Time `fn()` with time.perf_counter after `warmup` untimed calls.

    Args:
        fn: what to time (no arguments). warmup: calls before timing (caches, lazy init).
        repeat: timed calls. sync: called before each clock read, e.g. torch.cuda.synchronize,
            so that asynchronous GPU work is inside the time.

    Returns:
        {"p50_ms", "p90_ms", "mean_ms"}: the median, 90th percentile and mean per call in milliseconds.
    """
    check_int("warmup", warmup, 0)
    check_int("repeat", repeat, 1)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(np.mean(times)),
    }


def time_model(
    model: torch.nn.Module, batch: Batch, *, warmup: int = 3, repeat: int = 20, backend: str | None = None
) -> dict[str, float]:
    """Latency of one forward pass of a PyTorch model on a batch (inference mode, on the model's device).

    Args:
        model: a Transformer (or any module taking the batch's keys). batch: model inputs; label
            keys are dropped. warmup, repeat: as for `latency`.
        backend: an attention backend to time ("sdpa", "flash", "flash-int8", ...); the model's
            own is restored afterwards. None = the model's current backend.

    Returns:
        As `latency`.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    previous = getattr(model, "attention_backend", None)
    was_training = model.training
    model.eval()
    try:
        if backend is not None:
            model.attention_backend = backend
        with torch.inference_mode():
            return latency(lambda: model(**inputs), warmup=warmup, repeat=repeat, sync=sync)
    finally:
        if backend is not None:
            model.attention_backend = previous
        model.train(was_training)


def time_onnx(session: Any, batch: Batch, *, warmup: int = 3, repeat: int = 20) -> dict[str, float]:
    """Latency of an ONNX Runtime run on a batch.

    Args:
        session: an onnxruntime.InferenceSession (fed the batch's tensors its inputs name, as
            numpy arrays), or any callable taking the batch, such as model.onnx.runtime.OrtModel.
        batch: the inputs. warmup, repeat: as for `latency`.

    Returns:
        As `latency`.
    """
    if hasattr(session, "run") and hasattr(session, "get_inputs"):
        names = [i.name for i in session.get_inputs()]
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"the session needs inputs {names}; the batch lacks {missing}")
        feeds = {n: batch[n].cpu().numpy() if isinstance(batch[n], torch.Tensor) else batch[n] for n in names}
        return latency(lambda: session.run(None, feeds), warmup=warmup, repeat=repeat)
    if not callable(session):
        raise TypeError(f"session must be an onnxruntime.InferenceSession or a callable, got {type(session).__name__}")
    return latency(lambda: session(batch), warmup=warmup, repeat=repeat)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for the machine line of a benchmark."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
