"""quantize_onnx(): ONNX Runtime's own quantization tools applied to a flashlite export, with the output drift measured.

Settings (ONNX Runtime's recommendations for x86-64 CPUs; see its quantization guide):
  int8-dynamic  quantize_dynamic on MatMul and Gather (the embedding tables too): int8 weights
                per channel, uint8 activations (DynamicQuantizeLinear is uint8-only, so this is
                the U8S8 kernel), reduce_range (7-bit weights) only on CPUs without VNNI, where
                U8S8 products can saturate.
  int8-static   quantize_static, QDQ format, S8S8 (int8 activations and weights: ONNX Runtime's
                default and first choice for QDQ), per-channel weights, MinMax calibration over
                the given batches; MatMul, Gemm and Gather only (quantizing LayerNorm, Softmax and
                the residual adds costs transformers much accuracy for little speed); reduce_range
                as above.
  int4          MatMulNBitsQuantizer: MatMul weights to MatMulNBits and embedding tables to
                GatherBlockQuantized, symmetric blocks of 32 (the most accurate of 32..128), and
                accuracy_level 4 (int8 activations inside MatMulNBits: the fast CPU path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from model.onnx.fold import fold_dequantized_weights, quantizable_weights
from model.onnx.layout import TWO_GB, publish, size_with_data
from model.onnx.parity import output_pairs, parity_batches, past_feeds
from model.onnx.runtime import CONFIG_KEY, GRAPH_KEY, OrtModel, graph_paths, read_onnx

MODES = ("int8-dynamic", "int8-static", "int4")
BLOCK_SIZES = (32, 64, 128)
INT4_ACCURACY_LEVEL = 4
MODE_KEY = "flashlite.onnx_quantization"
# ONNX Runtime's generic hints, written as root warnings: "Please consider (to run) pre-processing before
# quantization" and, for graphs whose weights flashlite already stored as int8 (DequantizeLinear), "Please check if
# the model is already quantized ... QAT model", which is what the caller asked for and not a problem.
_ORT_HINTS = ("Please consider", "Please check if the model is already quantized")


@dataclass
class Quantized:
    """What `quantize_onnx` wrote and measured.

    paths: graph name -> quantized file. bytes: file -> size (with external data). ratio: all
    quantized bytes / all fp32 bytes. sqnr: output name -> signal-to-quantization-noise ratio in
    dB of the quantized outputs against the fp32 file's (higher is closer). settings: the
    quantizer settings used (mode, weight/activation types, per_channel, reduce_range, ...).
    """

    paths: dict[str, Path]
    bytes: dict[str, int]
    ratio: float
    sqnr: dict[str, float]
    settings: dict[str, Any]


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI, AVX-VNNI or AMX int8): int8 dot products that cannot saturate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def settings_for(mode: str, block_size: int = 32) -> dict[str, Any]:
    """The quantizer settings `quantize_onnx` uses for `mode` on this CPU (see the module docstring for why)."""
    # Saturation in U8S8 products is an x86 issue; reduce_range only costs accuracy elsewhere.
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    reduce_range = x86 and not has_vnni()
    if mode == "int8-dynamic":
        return dict(
            mode=mode,
            weight_type="QInt8",
            activation_type="QUInt8",
            per_channel=True,
            reduce_range=reduce_range,
            op_types=["MatMul", "Gather"],
        )
    if mode == "int8-static":
        return dict(
            mode=mode,
            format="QDQ",
            weight_type="QInt8",
            activation_type="QInt8",
            per_channel=True,
            reduce_range=reduce_range,
            calibration="MinMax",
            op_types=["MatMul", "Gemm", "Gather"],
        )
    return dict(
        mode=mode,
        bits=4,
        block_size=block_size,
        symmetric=True,
        accuracy_level=INT4_ACCURACY_LEVEL,
        op_types=["MatMul", "Gather"],
    )


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mode: str,
    *,
    calibration: Iterable[dict[str, Any]] | None = None,
    block_size: int = 32,
) -> Quantized:
    """Quantize the export at `src` (every graph of it) into `dst` with ONNX Runtime's tools; returns a `Quantized` report.

    src, dst: `NAME.onnx` or a folder, as `export_onnx` takes (dst's parent folders are created).
    mode: "int8-dynamic", "int8-static" (needs `calibration`) or "int4".
    calibration: batch dicts (numpy arrays or tensors, as OrtModel takes); int8-static
      calibrates on them (decoder graphs on their decoder_input_ids and the fp32 encoder's
      output). The SQNR is measured on them too; without them, on `parity_batches`.
    block_size: int4 block length, one of 32, 64, 128.
    The files are checked (onnx.checker full check, the loader's checks) before they appear.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    batches = None if calibration is None else list(calibration)
    if mode == "int8-static" and not batches:
        raise ValueError("mode 'int8-static' needs calibration batches (a non-empty list of batch dicts)")
    fp32 = OrtModel(src)
    graphs = {"encoder": fp32.encoder, "decoder": fp32.decoder, "decoder_with_past": fp32.decoder_with_past}
    sources = {name: graph.path for name, graph in graphs.items() if graph is not None}
    if mode == "int8-static" and "decoder" in sources and any("decoder_input_ids" not in b for b in batches):
        raise ValueError("calibrating a decoder graph needs decoder_input_ids in every calibration batch")
    if (
        mode == "int8-static"
        and "decoder_with_past" in sources
        and any(b["decoder_input_ids"].shape[1] < 2 for b in batches)
    ):
        raise ValueError("calibrating the decoder_with_past graph needs decoder_input_ids of 2 or more tokens")
    settings = settings_for(mode, block_size)
    final = graph_paths(dst)
    if any(final[name].resolve() == path.resolve() for name, path in sources.items()):
        raise ValueError(f"dst {dst} would overwrite the source files; choose another name")
    final["encoder"].parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final["encoder"].parent, prefix=".quantize-"))
    try:
        staged = graph_paths(staging / final["encoder"].name)
        for name, source in sources.items():
            reader = _Calibration(fp32, batches, name) if mode == "int8-static" else None
            _quantize_file(_float_weights(source, staging), staged[name], settings, reader)
        sqnr = _sqnr(fp32, OrtModel(staged["encoder"]), batches or parity_batches(fp32.config, 64))
        paths = {name: publish(staged[name], final[name]) for name in sources}
        sizes = {str(p): size_with_data(p) for p in paths.values()}
        ratio = sum(sizes.values()) / sum(size_with_data(p) for p in sources.values())
        return Quantized(paths=paths, bytes=sizes, ratio=ratio, sqnr=sqnr, settings=settings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Calibration(CalibrationDataReader):
    """Feeds for one graph of the fp32 export, batch by batch (decoder feeds take the fp32 encoder's output)."""

    def __init__(self, fp32: OrtModel, batches: list[dict[str, Any]], graph: str):
        self._items = iter(batches)
        self._fp32, self._graph = fp32, graph

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._items, None)
        if batch is None:
            return None
        feeds = self._fp32.encoder_feeds(batch)
        if self._graph == "encoder":
            return feeds
        out = self._fp32(batch)
        ids = np.asarray(batch["decoder_input_ids"], dtype=np.int64)
        memory = np.asarray(out.hidden_states, dtype=np.float32)
        if self._graph == "decoder_with_past":  # the last token over the cache of the others
            return past_feeds(self._fp32, memory, feeds["attention_mask"], ids, ids.shape[1] - 1)
        return {
            "decoder_input_ids": ids,
            "encoder_hidden_states": memory,
            "encoder_attention_mask": feeds["attention_mask"],
        }


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """Leave the root logger as it was: ONNX Runtime's quantization code reconfigures it.

    Importing matmul_nbits_quantizer runs logging.basicConfig(level=INFO), and quantize_dynamic /
    quantize_static call logging.warning() (which installs a root handler) with generic hints
    (`_ORT_HINTS`) that do not apply to flashlite's exports. Inside this block those hints are
    dropped; afterwards the root logger's level and handlers are put back.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def no_hint(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_ORT_HINTS)

    root.addFilter(no_hint)
    try:
        yield
    finally:
        root.removeFilter(no_hint)
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


class NothingToQuantize(ValueError):
    """The graph's layers are already integer products: ONNX Runtime's quantizers would find no weight."""


def _float_weights(source: Path, staging: Path) -> Path:
    """`source`, or a copy in `staging` whose flashlite int8 weights are folded to float (model.onnx.fold).

    Raises NothingToQuantize when no float MatMul/Gather weight is left for ONNX Runtime to quantize.
    """
    proto = onnx.load(str(source))
    folded = fold_dequantized_weights(proto)
    if not quantizable_weights(proto):
        raise NothingToQuantize(
            f"{source}: ONNX Runtime finds no float MatMul or Gather weight to quantize (the model's layers are "
            "already integer products: int8-dynamic, int4 or clustered); deploy this file as it is"
        )
    if not folded:
        return source
    target = staging / f".float.{source.name}"
    external = proto.ByteSize() >= TWO_GB
    onnx.save_model(
        proto, str(target), save_as_external_data=external, location=f"{target.name}.data" if external else None
    )
    return target


def _quantize_file(source: Path, target: Path, settings: dict[str, Any], reader: _Calibration | None) -> None:
    """Quantize one graph file into `target`, restore its flashlite metadata, and check it."""
    mode = settings["mode"]
    if mode == "int4":
        with root_logging_kept():  # imported on this path only: the import reconfigures logging
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )
        config = DefaultWeightOnlyQuantConfig(
            block_size=settings["block_size"],
            is_symmetric=True,
            accuracy_level=INT4_ACCURACY_LEVEL,
            op_types_to_quantize=tuple(settings["op_types"]),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
        quantizer.process()  # its INFO progress records stay below the (restored) root level
        proto = quantizer.model.model
    else:
        common = dict(
            op_types_to_quantize=settings["op_types"],
            per_channel=True,
            reduce_range=settings["reduce_range"],
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        raw = target.with_name(".raw." + target.name)
        with root_logging_kept():
            if mode == "int8-dynamic":
                quantize_dynamic(source, raw, **common)
            else:
                quantize_static(
                    source,
                    raw,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    **common,
                )
        proto = onnx.load(str(raw))
        raw.unlink()
    meta = {p.key: p.value for p in read_onnx(source).metadata_props}
    del proto.metadata_props[:]
    for key, value in {CONFIG_KEY: meta[CONFIG_KEY], GRAPH_KEY: meta[GRAPH_KEY], MODE_KEY: mode}.items():
        proto.metadata_props.add(key=key, value=value)
    external = proto.ByteSize() >= TWO_GB
    onnx.save_model(
        proto, str(target), save_as_external_data=external, location=f"{target.name}.data" if external else None
    )
    onnx.checker.check_model(str(target), full_check=True)


def _sqnr(fp32: OrtModel, quantized: OrtModel, batches: list[dict[str, Any]]) -> dict[str, float]:
    """SQNR in dB per output over all batches: 10 log10(sum ref^2 / sum (ref - quantized)^2)."""
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for batch in batches:
        for name, ref, got in output_pairs(fp32(batch), quantized(batch)):
            ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
            signal[name] = signal.get(name, 0.0) + float((ref**2).sum())
            noise[name] = noise.get(name, 0.0) + float(((ref - got) ** 2).sum())
    return {name: float("inf") if noise[name] == 0 else 10 * np.log10(signal[name] / noise[name]) for name in signal}
