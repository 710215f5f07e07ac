"""OrtModel: run a flashlite ONNX export on ONNX Runtime behind the PyTorch model's batch interface.

File layout (what `export_onnx` writes and `OrtModel` reads): a model is addressed by its
encoder file `NAME.onnx`; an encoder-decoder model adds `NAME.decoder.onnx` and, with an 'lm'
head, `NAME.decoder_with_past.onnx` (the cached decoding step, model/onnx/layout.py) beside it.
A folder stands for `folder/model.onnx` (+ its decoder files), or `folder/onnx/model.onnx`
in the sentence-transformers layout. External data, when there is any, lives in the same
folder. Every file carries its Config as metadata, so the runner validates inputs (names,
dtypes, shapes, id ranges) before ONNX Runtime sees them. A deployable folder's manifest.json
(model/onnx/layout.py) is checked first: a missing, truncated or altered file is named.

Loading refuses hostile or broken files with a ValueError before any tensor data is read:
corrupted or truncated protobufs, graphs that fail the ONNX checker, files that are not
flashlite exports, and external-data locations that are absolute, use `..`, or resolve
(through symlinks) outside the model's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from model.checks import check_ids, check_token_types
from model.config import Config, check_int
from model.generate import Search
from model.losses import LABEL_KEYS
from model.onnx.deployed import first_line, open_session
from model.onnx.layout import (
    GRAPH_KINDS,
    HIDDEN,
    graph_paths,
    head_outputs,
    manifest_folder,
    past_from_present,
    verify_folder,
)
from model.transformer import Output

CONFIG_KEY, GRAPH_KEY = "flashlite.config", "flashlite.graph"
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and check one ONNX file without loading external data; returns the ModelProto (weights left on disk).

    Raises FileNotFoundError when `path` is not a file and ValueError (naming the file) when it
    is not a valid flashlite ONNX file or names external data outside its own folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist (or is not a regular file)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid ONNX file (corrupted or truncated): {err}") from None
    _check_external_data(proto, path)
    try:
        onnx.checker.check_model(str(path))  # by path, so external data is looked up beside the file
    except onnx.checker.ValidationError as err:
        raise ValueError(
            f"{path} fails the ONNX checker (corrupted, truncated or hand-edited): {first_line(err)}"
        ) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_KEY not in meta or meta.get(GRAPH_KEY) not in GRAPH_KINDS:
        raise ValueError(
            f"{path} is not a flashlite export (no {CONFIG_KEY!r} / {GRAPH_KEY!r} metadata); write it with export_onnx"
        )
    return proto


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers, tensor attributes, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data entries that could read outside the model's folder, or past a file's end."""
    folder = path.resolve().parent
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        where = f"{path}: tensor {tensor.name!r} has external data location {location!r}"
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ValueError(f"{where}; only relative paths inside the model's folder are allowed")
        if ".." in Path(location.replace("\\", "/")).parts:
            raise ValueError(f"{where}; '..' is not allowed: external data must stay inside the model's folder")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise ValueError(f"{where}, which resolves to {target} outside {folder} (a symlink?); refusing to read it")
        if not target.is_file():
            raise ValueError(f"{where}, but {target} is missing or not a regular file")
        try:
            offset, length = int(entry.get("offset", 0)), int(entry.get("length", -1))
        except ValueError:
            raise ValueError(f"{where} with a non-integer offset or length") from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ValueError(
                f"{where} reading bytes [{offset}, {offset + max(length, 0)}) of a {size}-byte file (truncated?)"
            )


@dataclass
class _Graph:
    """One ONNX Runtime session with the names and metadata of its graph."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: Config


def _open(path: Path, threads: int | None) -> _Graph:
    proto = read_onnx(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    config = Config.from_json(meta[CONFIG_KEY])
    session = open_session(path, threads)
    outputs = tuple(o.name for o in session.get_outputs())
    return _Graph(path, session, tuple(i.name for i in session.get_inputs()), outputs, config)


class OrtModel:
    """A flashlite ONNX export on ONNX Runtime (CPU), called like the PyTorch model.

    `OrtModel(path)(batch)` or `OrtModel(path)(**batch)` takes the batch dict (input_ids,
    attention_mask, token_type_ids, optional decoder_input_ids / decoder_attention_mask; label
    keys are ignored) as numpy arrays or torch tensors and returns an `Output` with
    hidden_states, logits, head_logits and decoder_hidden_states, as torch tensors when the
    input_ids were a tensor and numpy arrays otherwise. No losses are computed.
    """

    def __init__(self, path_or_dir: str | os.PathLike, *, threads: int | None = None):
        """path_or_dir: the `.onnx` encoder file or a folder (see `graph_paths`); its decoder file is used when present.
        threads: ONNX Runtime's intra-op thread count (None: ONNX Runtime's default, one per core)."""
        if threads is not None:
            check_int("threads", threads, 1)
        self.threads = threads
        paths = graph_paths(path_or_dir)
        folder = manifest_folder(paths["encoder"])
        if folder is not None:  # a deploy folder: every file it lists must be the one exported
            verify_folder(folder)
        self.encoder = _open(paths["encoder"], threads)
        self.decoder = _open(paths["decoder"], threads) if paths["decoder"].exists() else None
        past = paths["decoder_with_past"]
        self.decoder_with_past = _open(past, threads) if self.decoder is not None and past.exists() else None
        self.config = self.encoder.config
        for graph in (self.decoder, self.decoder_with_past):
            if graph is not None and graph.config != self.config:
                raise ValueError(
                    f"{graph.path} was exported from another model than {paths['encoder']} (configs differ)"
                )

    def __repr__(self) -> str:
        graphs = "encoder" + (" + decoder" if self.decoder is not None else "")
        graphs += " + decoder_with_past" if self.decoder_with_past is not None else ""
        return f"OrtModel({str(self.encoder.path)!r}, {graphs}, threads={self.threads})"

    def __call__(self, batch: dict[str, Any] | None = None, /, **inputs: Any) -> Output:
        """Run the graphs on one batch (a dict and/or keyword arrays); returns an `Output`."""
        if batch is not None:
            if not isinstance(batch, dict):
                raise TypeError(f"batch must be a dict of arrays, got {type(batch).__name__}")
            inputs = {**batch, **inputs}
        allowed = (*ENCODER_INPUTS, "decoder_input_ids", "decoder_attention_mask")
        unknown = sorted(set(inputs) - set(allowed) - set(LABEL_KEYS))
        if unknown:
            raise TypeError(f"unexpected batch keys {unknown}; allowed keys: {list(allowed)} (label keys are ignored)")
        if "input_ids" not in inputs:
            raise TypeError("the batch has no input_ids")
        as_torch = isinstance(inputs["input_ids"], torch.Tensor)
        feeds = self.encoder_feeds(inputs)
        decoder_ids = inputs.get("decoder_input_ids")
        if decoder_ids is None and inputs.get("decoder_attention_mask") is not None:
            raise ValueError("decoder_attention_mask needs decoder_input_ids (the decoder's input)")
        if decoder_ids is not None:  # checked before any graph runs
            ids = self._decoder_ids(decoder_ids, inputs.get("decoder_attention_mask"))
            if len(ids) != len(feeds["input_ids"]):
                raise ValueError(
                    f"decoder_input_ids has {len(ids)} rows but input_ids has {len(feeds['input_ids'])}; one target per source"
                )
        values = self._run(self.encoder, feeds)
        if HIDDEN not in values:
            raise ValueError(
                f"{self.encoder.path} has no {HIDDEN} output (outputs {list(values)}): an export of an earlier "
                "flashlite; export it again"
            )
        out = Output(hidden_states=values.pop(HIDDEN))
        if decoder_ids is not None:
            decoded = self._run(
                self.decoder,
                {
                    "decoder_input_ids": ids,
                    "encoder_hidden_states": out.hidden_states,
                    "encoder_attention_mask": feeds["attention_mask"],
                },
            )
            out.decoder_hidden_states = decoded.pop("decoder_hidden_states")
        heads = {
            head: values[names[0]] if len(names) == 1 else np.stack([values[n] for n in names], axis=-1)
            for head, names in head_outputs(self.config.heads).items()
            if all(n in values for n in names)
        }
        if decoder_ids is not None and "lm_logits" in decoded:
            heads["lm"] = decoded["lm_logits"]
        out.head_logits = {name: heads[name] for name in self.config.heads if name in heads}
        out.logits = next(iter(out.head_logits.values()), None)
        if as_torch:
            out.hidden_states = torch.from_numpy(out.hidden_states)
            out.head_logits = {k: torch.from_numpy(v) for k, v in out.head_logits.items()}
            out.logits = None if out.logits is None else torch.from_numpy(out.logits)
            if out.decoder_hidden_states is not None:
                out.decoder_hidden_states = torch.from_numpy(out.decoder_hidden_states)
        return out

    def generate(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> Any:
        """Greedy or beam-search decoding with the export's key/value cache: the ids `Transformer.generate` gives.

        The decoder graph runs the first step (its present.* outputs start the cache: every
        layer's keys and values, the cross-attention's once); the decoder-with-past graph runs
        every later one on the last token.

        Args:
            input_ids, attention_mask: the encoder batch (B,T), numpy arrays or torch tensors.
            options: as `model.generate.generate` takes them (max_new_tokens, num_beams,
              eos_token_id, pad_token_id, decoder_start_token_id, forced_bos_token_id,
              forced_eos_token_id, length_penalty, early_stopping).

        Returns (B, 1 + steps) int64, starting with the start token: a tensor for a tensor, an array for an array.
        """
        if self.decoder is None:
            raise ValueError(
                f"{self.encoder.path} has no decoder graph ({graph_paths(self.encoder.path)['decoder'].name}); "
                "generate() needs an encoder-decoder export"
            )
        if self.decoder_with_past is None:
            raise ValueError(
                f"{self.encoder.path} has no {graph_paths(self.encoder.path)['decoder_with_past'].name} "
                "(a model without an 'lm' head, or an export of an earlier flashlite): generate() needs it"
            )
        search = Search.of(self.config, **options)
        feeds = self.encoder_feeds({"input_ids": input_ids, "attention_mask": attention_mask})
        memory = self._run(self.encoder, feeds)[HIDDEN]
        memory, mask = (np.repeat(a, search.num_beams, axis=0) for a in (memory, feeds["attention_mask"]))
        past: dict[str, np.ndarray] = {}  # past_key_values.* -> (R, H, S, D)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            ids = tokens.numpy()
            if past:
                out = self._run(
                    self.decoder_with_past, {"decoder_input_ids": ids, "encoder_attention_mask": mask, **past}
                )
            else:
                first = {"decoder_input_ids": ids, "encoder_hidden_states": memory, "encoder_attention_mask": mask}
                out = self._run(self.decoder, first)
            past.update(past_from_present(out))
            return torch.from_numpy(out["lm_logits"][:, -1])

        def reorder(rows: torch.Tensor) -> None:
            index = rows.numpy()
            for name in [n for n in past if ".decoder." in n]:  # the memory's rows stay: a source's beams share it
                past[name] = past[name][index]

        tokens = search.run(step, reorder, len(feeds["input_ids"]))
        return tokens if isinstance(input_ids, torch.Tensor) else tokens.numpy()

    def encoder_feeds(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Validated int64 arrays for the encoder graph, with the defaults the PyTorch model uses."""
        ids = _as_tensor("input_ids", inputs["input_ids"])
        mask = inputs.get("attention_mask")
        mask = check_ids(
            self.config,
            ids,
            None if mask is None else _as_tensor("attention_mask", mask),
            "input_ids",
            "attention_mask",
        )
        types = inputs.get("token_type_ids")
        feeds = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            types = _as_tensor("token_type_ids", types)
            check_token_types(self.config, types, ids)
        if "token_type_ids" in self.encoder.inputs:
            feeds["token_type_ids"] = torch.zeros_like(ids) if types is None else types
        elif types is not None and bool((types != 0).any()):
            raise ValueError(
                "token_type_ids must be all zeros: this model has no token-type embedding (type_vocab_size=0)"
            )
        return {name: t.to(torch.int64).numpy() for name, t in feeds.items()}

    def _decoder_ids(self, decoder_ids: Any, decoder_mask: Any) -> np.ndarray:
        if self.decoder is None:
            raise ValueError("decoder_input_ids given but this export has no decoder graph")
        ids = _as_tensor("decoder_input_ids", decoder_ids)
        mask = check_ids(
            self.config,
            ids,
            None if decoder_mask is None else _as_tensor("decoder_attention_mask", decoder_mask),
            "decoder_input_ids",
            "decoder_attention_mask",
        )
        # The decoder graph masks causally only; that equals the PyTorch model's masked decoder at
        # every real position exactly when padding is on the right (ones, then zeros).
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "decoder_attention_mask must pad on the right (each row: ones, then zeros); the decoder graph is causal only"
            )
        return ids.to(torch.int64).numpy()

    def _run(self, graph: _Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in graph.inputs}
        if "encoder_hidden_states" in feeds:
            feeds["encoder_hidden_states"] = np.ascontiguousarray(feeds["encoder_hidden_states"], dtype=np.float32)
        return dict(zip(graph.outputs, graph.session.run(list(graph.outputs), feeds)))


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    """A numpy array or torch tensor as a CPU tensor (no copy for arrays); anything else is a TypeError naming `name`."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


class OrtModule:
    """An OrtModel behind the part of the nn.Module interface that evaluation code uses (`model(**batch)`,
    `eval()`, `parameters()` for the device), so `glue.evaluate` / `squad.evaluate` score ONNX files unchanged."""

    training = False

    def __init__(self, runner: OrtModel):
        self.runner, self.config = runner, runner.config

    def parameters(self):
        yield torch.empty(0)  # callers read the device from it: ONNX Runtime takes and returns CPU tensors

    def eval(self) -> OrtModule:
        return self

    def train(self, mode: bool = True) -> OrtModule:
        return self

    def __call__(self, **batch: torch.Tensor) -> Output:
        return self.runner(batch)


def graph_metadata(config: Config, graph: str) -> dict[str, str]:
    """The metadata every flashlite ONNX file carries: its Config (JSON) and which graph it is."""
    return {CONFIG_KEY: config.to_json(), GRAPH_KEY: graph}
