"""The deployable folder's layout: its file names, the graphs' Hugging Face output names, and the manifest that vouches for every file.

Torch-free (json, hashlib, pathlib): the torch-free runner (model/onnx/deployed.py) and the
exporter share it. A folder that `export_onnx` writes holds:
  model.onnx [+ model.decoder.onnx + model.decoder_with_past.onnx]
                                      the graphs (in onnx/ instead for sentence-embedding exports,
                                      where sentence-transformers looks for them); see below
  model-MODE.onnx                     ONNX Runtime-quantized variants (sentence layout: onnx/VARIANT)
  config.json, flashlite_config.json  the transformers/Optimum config and flashlite's own Config
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  modules.json, 1_Pooling/config.json, sentence_bert_config.json   (sentence-embedding exports)
  README.md                           the model card
  manifest.json                       written last: format, versions, sha256 and size of every file

Encoder-decoder exports decode with a key/value cache in Optimum's non-merged layout
(decoder_model.onnx + decoder_with_past_model.onnx), by its tensor names:
  model.decoder.onnx            decoder_input_ids (B,S), encoder_hidden_states (B,T,dim),
                                encoder_attention_mask (B,T) -> decoder_hidden_states and, with an
                                'lm' head, lm_logits (B,S,vocab) and for each decoder layer i
                                present.{i}.decoder.key/value (B,H_i,S,D_i) and
                                present.{i}.encoder.key/value (B,H_i,T,D_i): the first step of a
                                generation (and the whole decoder for `OrtModel(batch)`).
  model.decoder_with_past.onnx  (with an 'lm' head) decoder_input_ids (B,P+1): every token so far,
                                of which only the last is run; encoder_attention_mask (B,T);
                                past_key_values.{i}.decoder.key/value (B,H_i,P,D_i) and
                                past_key_values.{i}.encoder.key/value (B,H_i,T,D_i) -> lm_logits
                                (B,1,vocab) and present.{i}.decoder.key/value (B,H_i,P+1,D_i).
The with-past graph takes the whole prefix, not just the new token (Optimum's input_ids), because
positions are computed from it as the PyTorch decoder does (RoBERTa-style positions count the
non-padding tokens before each one); the cross-attention keys and values come from the first
step and are fed back unchanged. The decoder weights are stored in both decoder files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

FORMAT, FORMAT_VERSION = "flashlite-onnx", 1
MANIFEST, FLASHLITE_CONFIG = "manifest.json", "flashlite_config.json"
GRAPH = "model.onnx"  # the encoder graph; graph_paths names the decoder files beside it
GRAPH_KINDS = ("encoder", "decoder", "decoder_with_past")  # graph_paths' keys, each file's flashlite.graph
DECODER_INPUTS = ("decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask")
PAST_INPUTS = ("decoder_input_ids", "encoder_attention_mask")  # then `cache_names(n, "past_key_values")`
SENTENCE_DIR = "onnx"  # sentence-transformers' backend="onnx" reads its graphs from this subfolder
HIDDEN, SENTENCE_EMBEDDING = "last_hidden_state", "sentence_embedding"
# ONNX Runtime variants in the sentence layout, named as sentence-transformers names its own
# (`export_dynamic_quantized_onnx_model` with a custom config writes model_qint8_quantized.onnx).
TWO_GB = 2**31  # protobuf's limit: larger graphs keep their weights in NAME.onnx.data
SENTENCE_VARIANTS = {"int8-dynamic": "model_qint8_quantized.onnx", "int8-static": "model_qint8_static.onnx"}


def variant_name(mode: str, sentence: bool) -> str:
    """The file name (relative to the folder) of the ONNX Runtime-quantized graph for `mode`.

    Args:
        mode: the quantize_onnx mode ("int8-dynamic", "int8-static", "int4").
        sentence: whether the folder has the sentence-transformers layout.
    """
    if sentence:
        name = SENTENCE_VARIANTS.get(mode) or f"model_{mode.replace('-', '_')}.onnx"
        return f"{SENTENCE_DIR}/{name}"
    return f"model-{mode}.onnx"


def head_outputs(heads: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The encoder graph's output names for each head, Hugging Face's where it has one.

    qa gives start_logits and end_logits (BertForQuestionAnswering); the first other head gives
    `logits` (the one head of a BertForSequenceClassification / BertForMaskedLM); any further head
    HEAD_logits. The decoder's 'lm' head is not an encoder output.

    Args:
        heads: the config's heads, in order.
    """
    names: dict[str, tuple[str, ...]] = {}
    for head in heads:
        if head == "qa":
            names[head] = ("start_logits", "end_logits")
        elif head != "lm":
            names[head] = ("logits",) if "logits" not in {n for v in names.values() for n in v} else (f"{head}_logits",)
    return names


def encoder_outputs(heads: Sequence[str], sentence_embedding: bool) -> list[str]:
    """Every output name of the encoder graph, in order.

    Args:
        heads: the config's heads.
        sentence_embedding: whether the graph ends in mean pooling + L2 normalization.
    """
    names = [HIDDEN, *(n for v in head_outputs(heads).values() for n in v)]
    return names + [SENTENCE_EMBEDDING] if sentence_embedding else names


def cache_names(layers: int, prefix: str, cross: bool = True) -> list[str]:
    """The key/value tensor names of a decoder of `layers` layers, four per layer (two without `cross`).

    Args:
        layers: decoder layers.
        prefix: "past_key_values" (inputs) or "present" (outputs).
        cross: include the cross-attention ones (`.encoder.key/value`) after each layer's own.
    """
    parts = ("decoder.key", "decoder.value") + (("encoder.key", "encoder.value") if cross else ())
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in parts]


def past_from_present(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A decoder graph's present.* outputs renamed as the with-past graph's past_key_values.* inputs.

    Args:
        outputs: output name -> value of a decoder or decoder-with-past run (other outputs are left out).
    """
    return {k.replace("present", "past_key_values", 1): v for k, v in outputs.items() if k.startswith("present.")}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path, files: Iterable[str], extra: dict[str, Any]) -> str:
    """The manifest.json text for `files` (relative names) in `folder`: format, `extra` keys, each file's size and sha256.

    Args:
        folder: where the files are now (the staging folder).
        files: their names relative to the folder, with '/' separators.
        extra: further top-level keys (versions, graphs, stages).
    """
    entries = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in files}
    return json.dumps(
        {"format": FORMAT, "format_version": FORMAT_VERSION, **extra, "files": dict(sorted(entries.items()))}, indent=2
    )


def manifest_folder(graph: Path) -> Path | None:
    """The export folder a graph file belongs to (its folder, or the one above `onnx/`), or None when it is in none.

    A folder is an export folder when it holds flashlite_config.json or a flashlite-onnx
    manifest.json (a saved model's manifest.json beside a graph file does not count).

    Args:
        graph: an ONNX file.
    """
    folder = graph.parent
    for candidate in (folder, folder.parent) if folder.name == SENTENCE_DIR else (folder,):
        if (candidate / FLASHLITE_CONFIG).exists():
            return candidate
        try:
            if json.loads((candidate / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT:
                return candidate
        except (OSError, ValueError, AttributeError):
            continue
    return None


def verify_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file the folder's manifest.json lists (present, its size, its sha256); returns the manifest.

    Raises ValueError naming the file that is missing, truncated (or grown) or altered, and
    naming manifest.json when it is missing beside flashlite_config.json or is not a flashlite
    export manifest.

    Args:
        folder: an export folder.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing: {folder} is not a complete flashlite export (re-export it)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if record.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a flashlite export manifest ({err}); re-export the folder") from None
    for name, entry in files.items():
        target = folder / name
        if (
            Path(name).is_absolute()
            or ".." in Path(name).parts
            or not target.resolve().is_relative_to(folder.resolve())
        ):
            raise ValueError(f"{path} lists {name!r}, outside the folder; refusing it")
        if not target.is_file():
            raise ValueError(f"{target} is missing (listed in {path}); the export is incomplete")
        size = target.stat().st_size
        if size != entry.get("bytes"):
            raise ValueError(f"{target} has {size} bytes, not the {entry.get('bytes')} the manifest lists (truncated?)")
        if sha256(target) != entry.get("sha256"):
            raise ValueError(f"{target} differs from the file that was exported (its sha256 does not match {path})")
    return record


def graph_paths(path: str | os.PathLike) -> dict[str, Path]:
    """Where the graphs of one export live: {"encoder": NAME.onnx, "decoder": NAME.decoder.onnx,
    "decoder_with_past": NAME.decoder_with_past.onnx}.

    path: a `.onnx` file (the encoder graph), or a folder (then NAME is `model` inside it, or in its
      `onnx/` subfolder when only that holds one).
    """
    path = Path(path)
    if path.suffix != ".onnx":  # a folder: its model.onnx, or the sentence-transformers layout's onnx/model.onnx
        sentence = path / SENTENCE_DIR / GRAPH
        path = sentence if not (path / GRAPH).exists() and sentence.exists() else path / GRAPH
    for kind in GRAPH_KINDS[1:]:
        if path.name.endswith(f".{kind}.onnx"):
            raise ValueError(
                f"{path} is a decoder graph; pass the encoder file {path.name.removesuffix(f'.{kind}.onnx')}.onnx"
            )
    stem = path.name.removesuffix(".onnx")
    return {"encoder": path} | {kind: path.with_name(f"{stem}.{kind}.onnx") for kind in GRAPH_KINDS[1:]}


def publish(staged: Path, final: Path) -> Path:
    """Move a checked graph (data file first, then the graph that names it) into place; drop a stale data file."""
    data = staged.with_name(staged.name + ".data")
    final_data = final.with_name(final.name + ".data")
    had_data = data.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    if had_data:
        os.replace(data, final_data)
    os.replace(staged, final)
    if not had_data and final_data.exists():  # left by an earlier export; the new graph holds its weights
        final_data.unlink()
    return final


def remove_graph(path: Path) -> None:
    """Delete a graph file and its external data file, where they exist."""
    for stale in (path, path.with_name(path.name + ".data")):
        if stale.exists():
            stale.unlink()


def size_with_data(path: Path) -> int:
    """Bytes of a graph file and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
