"""The model card (README.md) of an export folder: what was compressed and how, the files, and the loading snippets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from model.config import Config


def _stage_rows(stages: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = ["| stage | settings | params | unique params | bytes | quality |", "|---|---|---|---|---|---|"]
    for stage in stages:
        settings = ", ".join(f"{k}={v}" for k, v in stage.get("settings", {}).items()) or "-"
        metrics = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stage.get("metrics", {}).items()
        )
        rows.append(
            f"| {stage.get('name', '?')} | {settings} | {stage.get('params', '-')} | {stage.get('unique_params', '-')} "
            f"| {stage.get('size_bytes', '-')} | {metrics or 'not measured'} |"
        )
    return rows


def model_card(
    config: Config,
    hf: Mapping[str, Any],
    *,
    graph: str,
    outputs: Sequence[str],
    variants: Mapping[str, str],
    stages: Sequence[Mapping[str, Any]] | None,
    parity: Mapping[str, float],
    sentence: bool,
) -> str:
    """README.md text for an export folder.

    Args:
        config: the exported model's Config.
        hf: the config.json written beside it (model_type, architectures).
        graph: the fp32 graph's path in the folder (model.onnx or onnx/model.onnx).
        outputs: the encoder graph's output names.
        variants: ONNX Runtime mode -> quantized file in the folder.
        stages: the compression stages (the pipeline manifest's "stages"), None when unknown.
        parity: output -> max abs difference ONNX Runtime vs PyTorch measured at export.
        sentence: whether the folder has the sentence-transformers layout.
    """
    shapes = sorted({(s.n_heads, s.head_dim, s.ffn_dim) for s in config.encoder})
    blocks = len(set(config.encoder_share or range(config.encoder_layers)))
    lines = [
        "---",
        "library_name: " + ("sentence-transformers" if sentence else "transformers"),
        "tags: [onnx, flashlite" + (", sentence-transformers, feature-extraction" if sentence else "") + "]",
        "---",
        f"# flashlite export ({hf['model_type']}, {config.encoder_layers} encoder layers)",
        "",
        f"A {hf['architectures'][0]}-compatible ONNX graph written by flashlite's `export_onnx`, checked against the "
        "PyTorch model while exporting.",
        "",
        "## What it is",
        f"- width {config.dim}, {config.encoder_layers} encoder layers (heads, head_dim, ffn_dim per layer: "
        f"{', '.join(map(str, shapes))}), vocabulary {config.vocab_size}, up to {config.max_positions} tokens",
        f"- {blocks} weight blocks for {config.encoder_layers} encoder layers; word embeddings of rank {config.embed_dim}",
        f"- layers stored in integers by flashlite: {len(config.quantized)}"
        + (f" ({', '.join(sorted({q.mode for q in config.quantized}))})" if config.quantized else ""),
        f"- graph outputs: {', '.join(outputs)}",
        "- ONNX Runtime vs PyTorch at export (max abs difference): "
        + (", ".join(f"{k} {v:.1e}" for k, v in parity.items()) or "not checked"),
        "",
        "## How it was compressed",
        *(_stage_rows(stages) if stages else ["Not recorded (the model was exported without its pipeline stages)."]),
        "",
        "## Files",
        f"- `{graph}`: fp32 graph" + "".join(f"\n- `{path}`: ONNX Runtime {mode}" for mode, path in variants.items()),
        "- `config.json` (transformers/Optimum), `flashlite_config.json` (flashlite's Config: every layer's shape)",
        "- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`",
        *(["- `modules.json`, `1_Pooling/`, `sentence_bert_config.json` (sentence-transformers)"] if sentence else []),
        "- `manifest.json`: the size and sha256 of every file (flashlite's loaders check them)",
        "",
        "## Loading",
        *_snippets(graph, outputs, variants, sentence),
    ]
    return "\n".join(lines) + "\n"


def _snippets(graph: str, outputs: Sequence[str], variants: Mapping[str, str], sentence: bool) -> list[str]:
    """The three ways to load the folder, as fenced Python."""
    subfolder = ', subfolder="onnx"' if "/" in graph else ""
    ort_class = "ORTModelForFeatureExtraction"
    if "logits" in outputs:
        ort_class = "ORTModelForSequenceClassification"
    if "start_logits" in outputs:
        ort_class = "ORTModelForQuestionAnswering"
    wanted = "sentence_embedding" if "sentence_embedding" in outputs else outputs[-1]
    blocks = [
        "ONNX Runtime, tokenizers and numpy only:",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        'tokenizer = Tokenizer.from_file("FOLDER/tokenizer.json")  # truncates and pads as the graph expects',
        f'session = ort.InferenceSession("FOLDER/{graph}", providers=["CPUExecutionProvider"])',
        'encodings = tokenizer.encode_batch(["A first sentence.", "And another one."])',
        "feeds = {name: np.array([getattr(e, attr) for e in encodings], dtype=np.int64)",
        '         for name, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids"))',
        "         if name in {i.name for i in session.get_inputs()}}",
        f'{wanted} = session.run(["{wanted}"], feeds)[0]',
        "```",
        "Optimum (needs transformers < 4.58 today: see flashlite's README):",
        "```python",
        "from transformers import AutoTokenizer",
        f"from optimum.onnxruntime import {ort_class}",
        f'model = {ort_class}.from_pretrained("FOLDER"{subfolder}, file_name="{graph.rsplit("/", 1)[-1]}")',
        'outputs = model(**AutoTokenizer.from_pretrained("FOLDER")(["A sentence."], return_tensors="np"))',
        "```",
    ]
    if sentence:
        int8 = variants.get("int8-dynamic")
        blocks += [
            "sentence-transformers (its `onnx` extra):",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            'model = SentenceTransformer("FOLDER", backend="onnx")',
            *(
                [f'int8 = SentenceTransformer("FOLDER", backend="onnx", model_kwargs={{"file_name": "{int8}"}})']
                if int8
                else []
            ),
            'embeddings = model.encode(["A first sentence.", "And another one."])',
            "```",
        ]
    return blocks
