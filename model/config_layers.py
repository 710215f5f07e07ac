"""The per-layer records of a Config (LayerShape, QuantizedLayer), their JSON forms, and the checks every Config field uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

QUANT_MODES = ("int8", "int8-dynamic", "int4", "cluster")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class LayerShape:
    """Shape of one transformer layer: attention heads, width of each head, FFN width."""

    n_heads: int
    head_dim: int
    ffn_dim: int

    def __post_init__(self) -> None:
        check_int("n_heads", self.n_heads, 1)
        check_int("head_dim", self.head_dim, 1)
        check_int("ffn_dim", self.ffn_dim, 1)


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer (Linear or embedding table) stored in integers: its module name, the mode, bits and group size.

    Modes: "int8" weight-only per output channel (table: per row) or per `group_size` inputs
    (table: columns of a row), "int8-dynamic" (weights and activations; `smoothed`: with
    SmoothQuant's per-input factors), "int4" group-wise weight-only, "cluster" (k-means codebook of
    2**bits centroids + indices).
    """

    name: str
    mode: str
    bits: int
    group_size: int | None = None
    smoothed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"quantized layer name must be a module name string, got {self.name!r}")
        check_choice("quantized mode", self.mode, QUANT_MODES)
        check_int("bits", self.bits, 1)
        if self.bits > 8:
            raise ValueError(f"bits must be <= 8, got {self.bits}")
        if self.group_size is not None:
            check_int("group_size", self.group_size, 1)
        if not isinstance(self.smoothed, bool):
            raise TypeError(f"quantized layer {self.name}: smoothed must be a bool, got {self.smoothed!r}")
        if self.smoothed and self.mode != "int8-dynamic":
            raise ValueError(f"quantized layer {self.name}: smoothed applies to mode int8-dynamic, not {self.mode!r}")


def _records(name: str, value: Any, record: type, what: str) -> tuple[Any, ...]:
    """Accept a list of `record` dataclasses or dicts (from JSON) of its fields; errors name the entry and the field."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of {what}, got {type(value).__name__}")
    allowed = [f.name for f in dataclasses.fields(record)]
    records = []
    for i, item in enumerate(value):
        if isinstance(item, record):
            records.append(item)
            continue
        if not isinstance(item, dict):
            raise TypeError(f"{name}[{i}] must be a {record.__name__} or dict, got {type(item).__name__}")
        unknown = set(item) - set(allowed)
        if unknown:
            raise ValueError(f"{name}[{i}] has unknown keys {sorted(unknown, key=str)}; allowed: {', '.join(allowed)}")
        try:
            records.append(record(**item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}[{i}]: {err}") from None
    return tuple(records)


def as_quantized(value: Any) -> tuple[QuantizedLayer, ...]:
    """Accept QuantizedLayers or dicts (from JSON); a layer may appear once."""
    layers = _records("quantized", value, QuantizedLayer, "quantized layers")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(
            f"quantized lists a layer more than once: {sorted(n for n in set(names) if names.count(n) > 1)}"
        )
    return layers


def as_shapes(name: str, value: Any) -> tuple[LayerShape, ...]:
    """Accept LayerShapes or dicts (from JSON) and return a tuple of LayerShape."""
    return _records(name, value, LayerShape, "layer shapes")


def check_share(name: str, share: Any, shapes: tuple[LayerShape, ...]) -> tuple[int, ...]:
    """Validate a sharing map: layer i runs weight block share[i]; blocks are numbered 0..k-1 in first use order."""
    if share is None:
        return tuple(range(len(shapes)))
    if not isinstance(share, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) for b in share):
        raise TypeError(f"{name} must be a list of ints (one weight-block index per layer), got {share!r}")
    share = tuple(share)
    if len(share) != len(shapes):
        raise ValueError(f"{name} has {len(share)} entries but there are {len(shapes)} layers")
    seen: dict[int, int] = {}
    for layer, block in enumerate(share):
        if block not in seen:
            if block != len(seen):
                raise ValueError(
                    f"{name}={list(share)}: blocks must be numbered 0,1,2,... in order of first use; "
                    f"layer {layer} uses block {block} before block {len(seen)}"
                )
            seen[block] = layer
        elif shapes[seen[block]] != shapes[layer]:
            raise ValueError(
                f"{name}: layers {seen[block]} and {layer} share block {block} but have different shapes "
                f"{shapes[seen[block]]} and {shapes[layer]}"
            )
    return share
