"""Safe, atomic save/load of flashlite models: safetensors + JSON files in a folder; nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import tokenizers
import torch

from model.config import Config
from model.transformer import Transformer

FORMAT, FORMAT_VERSION = "flashlite", 1
CONFIG, WEIGHTS, TOKENIZER, MANIFEST = "config.json", "model.safetensors", "tokenizer.json", "manifest.json"
# Real headers are a few KiB; the cap stops a hostile length field from making us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_RESERVED = ("format", "format_version", "flashlite_version", "torch_version", "created", "files")
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_REFUSAL = "refusing to load it: unpickling can run arbitrary code, and flashlite reads only safetensors"


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix; returns `path`.

    The bytes go to a temporary file in the same folder (same filesystem, so the rename is
    atomic), are fsynced and renamed over `path`; then the folder is fsynced so the rename
    itself survives a crash. The temporary file is removed if anything fails.
    """
    path = Path(path)
    # mkstemp makes the file 0600; keep an existing file's mode, else the usual 0644.
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` for text (UTF-8); returns `path`."""
    return atomic_write(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    # A rename is durable only once the directory entry is; Windows cannot open a folder to fsync it.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Atomically write `tensors` (name -> tensor) as a safetensors file with optional str->str `metadata`.

    Tensors are written as contiguous CPU copies. Names whose tensors share memory are refused:
    the file would hold two copies and loading would silently untie them. Returns `path`.
    """
    path = _checked_suffix(Path(path))
    atomic_write(path, _serialize(tensors, metadata))
    return path


def load_tensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into name -> tensor on `device`.

    Pickles, torch.save archives and malformed or truncated files are refused with a ValueError
    naming the file, before any tensor is deserialized.
    """
    path = Path(path)
    data, _ = _read_safetensors(path)
    return _deserialize(data, path, device)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The str->str metadata stored in a safetensors file (empty if none), after the same checks as `load_tensors`."""
    return _read_safetensors(Path(path))[1].get("__metadata__", {})


def save(model: Transformer, directory: str | os.PathLike, *, manifest: dict[str, Any] | None = None) -> Path:
    """Save `model` into `directory` (created if needed) and return the directory's Path.

    Writes model.safetensors, config.json, tokenizer.json (when `model.tokenizer` is set) and,
    last, manifest.json: format, versions, UTC time, sha256 and size of every file, plus the
    caller's `manifest` keys (e.g. "stages") at top level. Each file is replaced atomically.
    The attention backend is a runtime choice and is not saved.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"save() takes a model.Transformer, got {type(model).__name__}")
    tokenizer = model.tokenizer
    if tokenizer is not None and not isinstance(tokenizer, tokenizers.Tokenizer):
        raise TypeError(f"model.tokenizer must be a tokenizers.Tokenizer (or None), got {type(tokenizer).__name__}")
    extra = _caller_manifest(manifest)  # checked before anything touches the disk
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first: if a save is interrupted, the old manifest's sha256 no longer matches and load() says so.
    files = {WEIGHTS: _serialize(model.state_dict(), None), CONFIG: model.config.to_json().encode("utf-8")}
    if tokenizer is not None:
        files[TOKENIZER] = tokenizer.to_str().encode("utf-8")
    for name, data in files.items():
        atomic_write(folder / name, data)
    if tokenizer is None and (folder / TOKENIZER).exists():
        (folder / TOKENIZER).unlink()  # else load() would attach a tokenizer left by an earlier save
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flashlite_version": _flashlite_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()
        },
        **extra,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(record, indent=2) + "\n")
    return folder


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu", strict: bool = True) -> Transformer:
    """Load the model that `save` wrote into `directory`; returns it on `device`, in eval mode.

    Everything is checked before a tensor is deserialized: missing files raise FileNotFoundError,
    a pickle or malformed weights file raises ValueError, as do weights that do not match
    config.json and (when manifest.json exists) weights changed since they were saved.
    `strict=False` tolerates missing and unexpected tensors, never mismatched shapes.
    """
    folder = Path(directory)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{folder} is a pickle-based checkpoint; {_PICKLE_REFUSAL}")
        raise NotADirectoryError(f"{folder} is a file; load() takes the folder that save() wrote")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found {', '.join(pickles)}: pickle-based files are never loaded)" if pickles else ""
            raise FileNotFoundError(f"{folder / name} is missing; a saved model needs {CONFIG} and {WEIGHTS}{hint}")
    config = _read_config(folder / CONFIG)
    data = (folder / WEIGHTS).read_bytes()
    header = _check_safetensors(data, folder / WEIGHTS)
    with torch.device("meta"):  # shapes only: a config.json that lies about sizes allocates nothing before the check
        skeleton = Transformer(config)
    floats = {
        _DTYPES[e["dtype"]] for n, e in header.items() if n != "__metadata__" and _DTYPES[e["dtype"]].is_floating_point
    }
    dtype = floats.pop() if len(floats) == 1 else None  # a model saved in half precision loads in half precision
    _check_matches(skeleton.to(dtype) if dtype else skeleton, header, folder, strict)
    _check_manifest(folder, data)
    model = Transformer(config)
    if dtype is not None:
        model.to(dtype)
    model.load_state_dict(_deserialize(data, folder / WEIGHTS, "cpu"), strict=strict)
    if (folder / TOKENIZER).is_file():
        try:
            model.tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER))
        except Exception as err:  # the Rust side raises plain Exception
            raise ValueError(f"{folder / TOKENIZER} is not a valid tokenizers file: {err}") from err
    return model.to(device).eval()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed manifest.json of a saved model folder, or None when it has none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {err}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ValueError(f"{path} is not a flashlite manifest (needs format={FORMAT!r} and a 'files' object)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this flashlite reads up to {FORMAT_VERSION}")
    return manifest


def _checked_suffix(path: Path) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {path.suffix} files are pickle-based; {_PICKLE_REFUSAL} (use .safetensors)")
    return path


def _read_safetensors(path: Path) -> tuple[bytes, dict[str, Any]]:
    """A safetensors file's bytes and validated header."""
    _checked_suffix(path)
    if not path.is_file():  # also keeps read_bytes() away from devices such as /dev/zero
        raise FileNotFoundError(f"{path} is not a file")
    data = path.read_bytes()
    return data, _check_safetensors(data, path)


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise TypeError("tensors must be a dict of str -> torch.Tensor")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError("metadata must be a dict of str -> str")
    owners: dict[tuple, str] = {}
    shared = []
    for name, t in tensors.items():
        if t.numel() == 0:
            continue  # empty tensors own no memory, so they cannot alias
        key = (t.device, t.untyped_storage().data_ptr())
        if key in owners:
            shared.append(f"{owners[key]} and {name}")
        owners.setdefault(key, name)
    if shared:
        raise ValueError(
            f"tensors share memory ({_first(shared)}); tied weights must be stored once: keep one name "
            f"and tie in the model, or clone if they are really separate"
        )
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(cpu, metadata=metadata)


def _check_safetensors(data: bytes, path: Path) -> dict[str, Any]:
    """Validate a safetensors file's bytes without deserializing any tensor; returns its header."""
    # A safetensors header is JSON, so byte 8 is "{"; only then may a 0x80 / "PK" first byte be a length.
    if data[8:9] != b"{":
        if data.startswith(b"PK\x03\x04"):
            raise ValueError(f"{path} is a zip archive (the torch.save format), not safetensors; {_PICKLE_REFUSAL}")
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise ValueError(f"{path} is a pickle, not safetensors; {_PICKLE_REFUSAL}")
    if len(data) < 8:
        raise ValueError(
            f"{path}: {len(data)} bytes is too short for a safetensors file (needs an 8-byte header length)"
        )
    n = int.from_bytes(data[:8], "little")
    if not 0 < n <= MAX_HEADER_BYTES:
        raise ValueError(
            f"{path}: header length {n} is outside 1..{MAX_HEADER_BYTES}; not a safetensors file, or corrupted"
        )
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} runs past the end of the {len(data)}-byte file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: the header is not UTF-8 JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    size = len(data) - 8 - n
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError(f"{path}: __metadata__ must map strings to strings")
        else:
            ranges.append((*_check_entry(name, entry, size, path), name))
    # safetensors packs tensors back to back and covers the data section exactly.
    end, previous = 0, None
    for begin, stop, name in sorted(ranges):
        if begin < end:
            raise ValueError(f"{path}: tensors {previous!r} and {name!r} overlap (bytes {begin}..{end})")
        if begin > end:
            raise ValueError(f"{path}: {begin - end} unused bytes before tensor {name!r}; the file is corrupted")
        end, previous = stop, name
    if end != size:
        raise ValueError(
            f"{path}: the data section has {size} bytes but the tensors cover {end}; the file is corrupted"
        )
    return header


def _check_entry(name: str, entry: Any, size: int, path: Path) -> tuple[int, int]:
    what = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{what} needs dtype, shape and data_offsets")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{what} has unknown dtype {entry['dtype']!r}; known: {', '.join(_DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    # `type(x) is int` because JSON true/false would pass isinstance(x, int).
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{what} has shape {shape!r}; need a list of non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise ValueError(f"{what} has data_offsets {offsets!r}; need [begin, end] ints")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"{what} has data_offsets {offsets}; need 0 <= begin <= end")
    if end > size:
        raise ValueError(f"{what} ends at byte {end} but the data section has only {size} bytes (file truncated?)")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{what}: {end - begin} bytes do not hold shape {shape} of {entry['dtype']}")
    return begin, end


def _deserialize(data: bytes, path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # SafetensorError and friends: one error type for callers
        raise ValueError(f"{path}: not a valid safetensors file: {err}") from err
    return {name: t.to(device) for name, t in tensors.items()}


def _check_manifest(folder: Path, weights: bytes) -> None:
    """Every file the manifest records must be unchanged (a save interrupted midway leaves a mix)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return  # hand-made folders have no manifest, and that is allowed
    entry = manifest["files"].get(WEIGHTS)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ValueError(f"{folder / MANIFEST} does not record the sha256 of {WEIGHTS}")
    for name, entry in manifest["files"].items():
        path = folder / name
        if name != WEIGHTS and (not isinstance(entry, dict) or not path.is_file() or path.parent != folder):
            continue  # a file deleted on purpose (e.g. the tokenizer) is not a mix
        actual = hashlib.sha256(weights if name == WEIGHTS else path.read_bytes()).hexdigest()
        if actual != entry.get("sha256"):
            raise ValueError(
                f"{path}: file changed since it was saved (sha256 {actual[:12]}..., {MANIFEST} says "
                f"{str(entry.get('sha256'))[:12]}...); re-save the model, or delete {MANIFEST} if the change is intended"
            )


def _check_matches(model: Transformer, header: dict[str, Any], folder: Path, strict: bool) -> None:
    """Compare the file's tensor names, shapes and dtypes with the model config.json builds."""
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    found = {name: (tuple(e["shape"]), _DTYPES[e["dtype"]]) for name, e in header.items() if name != "__metadata__"}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{name} is {list(found[name][0])} {found[name][1]} in the file but {list(expected[name][0])} {expected[name][1]} by config"
        for name in sorted(set(expected) & set(found))
        if found[name] != expected[name]
    ]
    problems = [f"mismatched: {_first(wrong)}"] if wrong else []
    if strict and missing:
        problems.append(f"missing {len(missing)}: {_first(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_first(unexpected)}")
    if problems:
        raise ValueError(
            f"{folder / WEIGHTS} does not match {folder / CONFIG} (likely {CONFIG} was edited or comes from "
            f"another model): " + "; ".join(problems)
        )


def _read_config(path: Path) -> Config:
    try:
        return Config.from_json(path.read_bytes().decode("utf-8"))
    except (TypeError, ValueError) as err:  # keep the kind of error, add the file to Config's message
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"{path}: {err}") from err


def _caller_manifest(manifest: dict[str, Any] | None) -> dict[str, Any]:
    if manifest is None:
        return {}
    if not isinstance(manifest, dict) or not all(isinstance(k, str) for k in manifest):
        raise TypeError(f"manifest must be a dict with str keys, got {type(manifest).__name__}")
    clash = sorted(set(manifest) & set(_RESERVED))
    if clash:
        raise ValueError(f"manifest keys {clash} are written by save() itself; reserved: {', '.join(_RESERVED)}")
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as err:
        raise TypeError(f"manifest must be JSON-serializable: {err}") from None
    return dict(manifest)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins, so a header with duplicates could be read two ways.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys in one JSON object")
    return result


def _first(items: list[str], k: int = 5) -> str:
    more = f", ... ({len(items) - k} more)" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _flashlite_version() -> str:
    try:
        return importlib.metadata.version("flashlite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
