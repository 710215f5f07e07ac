"""Quantize: store a model's weights as integers (int8, int8 dynamic, int4 group-wise, QAT int8).

Every pass here is a module swap recorded in the Config: the chosen layers become the
integer-storage twins of `model.quantized`, `config.quantized` lists them, and the result is a
fresh `Transformer(new_config)` loaded with the quantized tensors, so `load(save(m))` rebuilds it.
The quality cost is logged as SQNR (compress.evaluate.sqnr), per layer and on the model's outputs.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.distill import Distill
from compress.evaluate.sqnr import layer_sqnr, output_sqnr
from compress.gptq import round_int4, round_int8, round_sequentially
from compress.pipeline import Context
from compress.smoothing import smoothing_factors
from model.config import QuantizedLayer
from model.quant_math import dequantize_int8, quantize_int8
from model.quantized import (
    GROUP_SIZES,
    ClusteredEmbedding,
    ClusteredLinear,
    Int4Linear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
)
from model.rebuild import with_quantized
from model.transformer import Transformer

log = logging.getLogger(__name__)
MODES = ("int8", "int8-dynamic", "int4", "qat-int8")
ROUNDINGS = ("nearest", "gptq", "gptaq")


@dataclass(frozen=True)
class Quantize:
    """Swap every Linear (blocks, cross-attention, pooler, heads) and, with `embeddings`, the embedding tables
    for integer-storage modules.

    mode: "int8" weight-only; "int8-dynamic" int8 weights and per-token int8 activations; "int4"
    weight-only with a scale and zero-point per group (`symmetric` picks zero-point 8 and
    max|w|/7 scales instead of min/max ones); "qat-int8" fake int8 quantization (straight-through
    gradients) of the same weights while distilling from the teacher for `steps` steps
    (`temperature`, `lr`), then conversion to int8.
    group_size: inputs per scale (32, 64, 128). int8 layers whose in_features it does not divide,
    and every int8 layer with group_size=None, get one scale per output channel; int4 needs it.
    embeddings: also store the word/position/token-type tables in int8, with a scale per
    `group_size` columns of each row where it splits the row, else per row (and the factorized
    `embeddings.word_proj` in `mode`). skip: module-name prefixes left in float.
    rounding: "nearest" rounds each weight to its nearest grid point; "gptq" rounds the Linears
    (not the tables) by GPTQ (`compress.gptq`): each layer's rounding errors are compensated on
    the inputs it receives from `calibration_batches` batches of the data, layer after layer (the
    tables and the Linears before it already rounded), on the same grid and storage; "gptaq" is
    GPTQ with asymmetric calibration: each layer's rounded outputs are fitted to the float model's
    outputs, so it also compensates the error its inputs carry from the layers before (best with
    many batches: it fits more to the data). Needs data; not with qat-int8, which learns its own
    rounding.
    smoothing: int8-dynamic only: SmoothQuant's migration strength alpha in (0, 1] (0.5 is the
    paper's default): each Linear's input channels are divided by s = max|x|^alpha /
    max|W|^(1 - alpha), measured on `calibration_batches` batches, and its weight columns
    multiplied by s (`compress.smoothing`). Needs data. None: no smoothing.
    Layers the mode cannot handle (int4: in_features not divisible by group_size; layers
    already clustered) are left in float with a warning that names them.
    """

    mode: str = "int8"
    group_size: int | None = 128
    embeddings: bool = True
    steps: int = 0
    symmetric: bool = False
    skip: tuple[str, ...] = ()
    temperature: float = 2.0
    lr: float = 1e-5
    rounding: str = "nearest"
    calibration_batches: int = 64  # more batches fit the rounding to more of the data (benchmarks/quantize_sqnr.py)
    smoothing: float | None = None

    quantizes: ClassVar[bool] = True  # the Pipeline refuses Share/Prune after it

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Quantize mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size not in GROUP_SIZES):
            raise ValueError(
                f"Quantize group_size must be one of {GROUP_SIZES} (or None: per channel, int8 only); got {self.group_size!r}"
            )
        if self.mode == "int4" and self.group_size is None:
            raise ValueError(f"Quantize group_size must be one of {GROUP_SIZES} for mode int4; got None")
        for name in ("embeddings", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Quantize {name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Quantize steps must be an int >= 0, got {self.steps!r}")
        if self.mode == "qat-int8" and self.steps < 1:
            raise ValueError(f"Quantize steps must be >= 1 for mode qat-int8 (distillation steps), got {self.steps}")
        if self.mode != "qat-int8" and self.steps:
            raise ValueError(
                f"Quantize steps={self.steps} applies only to mode qat-int8, not {self.mode!r}; leave it 0"
            )
        if (
            isinstance(self.skip, str)
            or not isinstance(self.skip, (list, tuple))
            or not all(isinstance(p, str) for p in self.skip)
        ):
            raise TypeError(f"Quantize skip must be a list of module-name prefixes, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"Quantize {name} must be a number > 0, got {value!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Quantize rounding must be one of {', '.join(ROUNDINGS)}; got {self.rounding!r}")
        if self.rounding != "nearest" and self.mode == "qat-int8":
            raise ValueError(
                f"Quantize rounding={self.rounding!r} applies to int8, int8-dynamic and int4; qat-int8 learns its own rounding"
            )
        if (
            isinstance(self.calibration_batches, bool)
            or not isinstance(self.calibration_batches, int)
            or self.calibration_batches < 1
        ):
            raise ValueError(f"Quantize calibration_batches must be an int >= 1, got {self.calibration_batches!r}")
        if self.smoothing is not None:
            if (
                isinstance(self.smoothing, bool)
                or not isinstance(self.smoothing, (int, float))
                or not 0 < self.smoothing <= 1
            ):
                raise ValueError(
                    f"Quantize smoothing must be None or a number in (0, 1] (SmoothQuant's alpha), got {self.smoothing!r}"
                )
            if self.mode != "int8-dynamic":
                raise ValueError(
                    f"Quantize smoothing applies to mode int8-dynamic (quantized activations), not {self.mode!r}"
                )

    @property
    def needs_data(self) -> bool:
        return self.mode == "qat-int8" or self.rounding != "nearest" or self.smoothing is not None

    def __call__(self, model: Transformer, ctx: Context | None = None) -> Transformer:
        """Return a new model with the chosen layers in integer storage; `model` is left in float."""
        _check_not_quantized(model)
        targets = self._targets(model)
        if self.mode == "qat-int8":
            if ctx is None:
                raise ValueError("Quantize('qat-int8') needs a Context with data and a teacher to distill from")
            model = self._train_fake_quantized(model, list(targets), ctx)
        smooth = self._smoothing_factors(model, targets, ctx) if self.smoothing is not None else {}
        rounded = self._gptq_twins(model, targets, ctx, smooth) if self.rounding != "nearest" else {}
        twins = {
            name: rounded.get(name) or self._twin(name, model.get_submodule(name), smooth=smooth.get(name))
            for name in targets
        }
        result = with_quantized(model, twins)
        _log_sqnr(model, result, ctx)
        return result

    def _targets(self, model: Transformer) -> dict[str, nn.Module]:
        """The modules this pass quantizes, by name; warns once per reason, naming each module it leaves in float."""
        targets: dict[str, nn.Module] = {}
        left: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            clustered = isinstance(module, (ClusteredLinear, ClusteredEmbedding))
            if not (clustered or isinstance(module, (nn.Linear, nn.Embedding))):
                continue
            if (name.startswith("embeddings.") and not self.embeddings) or any(name.startswith(p) for p in self.skip):
                continue
            if clustered:
                left.setdefault("already clustered (k-means codebook)", []).append(name)
            elif self.mode == "int4" and isinstance(module, nn.Linear) and module.in_features % self.group_size:
                reason = f"in_features not divisible by group_size {self.group_size}"
                left.setdefault(reason, []).append(f"{name} (in_features {module.in_features})")
            else:
                targets[name] = module
        for reason, names in left.items():
            warnings.warn(
                f"Quantize({self.mode!r}) leaves {len(names)} layers in float, {reason}: {', '.join(names)}",
                stacklevel=3,
            )
        return targets

    def _twin(
        self,
        name: str,
        module: nn.Module,
        hessian: Tensor | None = None,
        smooth: Tensor | None = None,
        cross: Tensor | None = None,
    ) -> tuple[QuantizedLayer, nn.Module]:
        """The layer's record and integer twin; with `hessian` (its inputs' x x^T sum) a Linear is GPTQ-rounded,
        with `cross` too (float inputs times rounded ones) asymmetrically; with `smooth` (int8-dynamic) it
        stores W * smooth for inputs divided by smooth."""
        if isinstance(module, nn.Embedding):
            group = self._int8_group(module)
            return QuantizedLayer(name, "int8", 8, group), Int8Embedding.from_float(module, group)
        if self.mode == "int4":
            codes = (
                None
                if hessian is None
                else round_int4(module.weight, hessian, self.group_size, symmetric=self.symmetric, cross=cross)
            )
            twin = Int4Linear.from_float(module, self.group_size, self.symmetric, codes=codes)
            return QuantizedLayer(name, "int4", 4, self.group_size), twin
        group = self._int8_group(module)
        weight = module.weight if smooth is None else module.weight.detach() * smooth
        if hessian is not None and smooth is not None:  # of the inputs x / smooth
            outer = smooth[:, None].double() * smooth[None, :].double()
            hessian, cross = hessian / outer, None if cross is None else cross / outer
        codes = None if hessian is None else round_int8(weight, hessian, group, cross=cross)
        if self.mode == "int8-dynamic":
            twin = Int8DynamicLinear.from_float(module, group, codes=codes, smooth=smooth)
            return QuantizedLayer(name, "int8-dynamic", 8, group, smoothed=smooth is not None), twin
        return QuantizedLayer(name, "int8", 8, group), Int8Linear.from_float(module, group, codes=codes)

    def _calibration(self, ctx: Context | None, setting: str) -> list:
        batches = ctx.batches(self.calibration_batches) if ctx is not None else []
        if not batches:
            raise ValueError(
                f"Quantize({setting}) needs calibration data: pass data to the Pipeline (or a Context with data)"
            )
        return batches

    def _smoothing_factors(
        self, model: Transformer, targets: dict[str, nn.Module], ctx: Context | None
    ) -> dict[str, Tensor]:
        linears = [name for name, module in targets.items() if isinstance(module, nn.Linear)]
        return smoothing_factors(model, linears, self._calibration(ctx, f"smoothing={self.smoothing}"), self.smoothing)

    @torch.no_grad()
    def _gptq_twins(
        self, model: Transformer, targets: dict[str, nn.Module], ctx: Context | None, smooth: dict[str, Tensor]
    ) -> dict:
        """Twins of the targets, the Linears GPTQ-rounded in forward order on a working copy fed with calibration
        batches, its tables already rounded (and, for "gptaq", beside a float copy that gives the float inputs)."""
        batches = self._calibration(ctx, f"rounding={self.rounding!r}")
        work = copy.deepcopy(model).eval()
        twins: dict[str, tuple[QuantizedLayer, nn.Module]] = {}
        for name, module in targets.items():
            if isinstance(module, nn.Embedding):
                twins[name] = self._twin(name, module)
                work.get_submodule(name).weight.copy_(twins[name][1].weight)

        def round_layer(name: str, hessian: Tensor, cross: Tensor | None) -> Tensor:
            twins[name] = self._twin(name, model.get_submodule(name), hessian, smooth.get(name), cross)
            return twins[name][1].weight

        linears = [name for name, module in targets.items() if isinstance(module, nn.Linear)]
        reference = copy.deepcopy(model).eval() if self.rounding == "gptaq" else None
        round_sequentially(work, linears, batches, round_layer, reference=reference)
        return twins

    def _int8_group(self, module: nn.Module) -> int | None:
        """The int8 group size of a layer: `group_size` where it splits the inputs (a table: each row) in several
        groups, else None (one scale per output channel or table row)."""
        width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        if self.group_size and width > self.group_size and width % self.group_size == 0:
            return self.group_size
        return None

    def _train_fake_quantized(self, model: Transformer, names: list[str], ctx: Context) -> Transformer:
        """Distill a copy of `model` with the named layers' weights fake-quantized to int8; returns the copy, in float."""
        model = copy.deepcopy(model)  # training must not change the caller's model
        targets = {name: model.get_submodule(name) for name in names}
        for module in targets.values():
            parametrize.register_parametrization(module, "weight", FakeQuantInt8(self._int8_group(module)))
        try:
            model = Distill(steps=self.steps, temperature=self.temperature, lr=self.lr)(model, ctx)
        finally:
            for module in targets.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return model


class FakeQuantInt8(nn.Module):
    """Weight parametrization for QAT: forward gives the weight as int8 stores it (per row, or per
    `group_size` inputs of a row), backward passes the gradient straight through to the float weight."""

    def __init__(self, group_size: int | None = None):
        super().__init__()
        self.group_size = group_size

    def forward(self, w: Tensor) -> Tensor:
        return w + (dequantize_int8(*quantize_int8(w, self.group_size)).to(w.dtype) - w).detach()


def _check_not_quantized(model: Transformer) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"Quantize takes a model.Transformer, got {type(model).__name__}")
    done = [layer.name for layer in model.config.quantized if layer.mode != "cluster"]
    if done:
        raise ValueError(
            f"the model is already quantized ({len(done)} layers, e.g. {done[0]}); Quantize after Quantize is not "
            f"allowed: quantize the float model once"
        )


def _log_sqnr(before: Transformer, after: Transformer, ctx: Context | None) -> None:
    per_layer = layer_sqnr(before, after)
    for name, value in per_layer.items():
        log.info("SQNR %s: %.1f dB", name, value)
    if per_layer:
        log.info(
            "weight SQNR over %d layers: min %.1f dB, mean %.1f dB",
            len(per_layer),
            min(per_layer.values()),
            sum(per_layer.values()) / len(per_layer),
        )
    batches = ctx.batches(2) if ctx is not None else []
    if batches:
        for key, value in output_sqnr(before, after, batches).items():
            log.info("output SQNR %s: %.1f dB", key, value)
