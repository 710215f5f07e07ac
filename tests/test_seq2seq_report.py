"""The compression report of a model with a decoder: ROUGE/BLEU of the seq2seq head per row (tiny preset; the CLI end
to end, and run_job from Python)."""

import contextlib
import io
import json
import random
import shutil

import pytest

from compress.cli import main
from compress.evaluate import generation
from compress.job import run_job
from compress.recipe import load_recipe
from model import load
from model.data.corpus import load_corpus
from model.onnx.runtime import OrtModel

RECIPE = """
passes:
  - prune: {heads: 0.5, ffn: 0.5}
  - distill: {steps: 2, progress: false}
  - quantize: {mode: int8}
data: {max_len: 32, batch_size: 4, limit: 60}
export: {onnx: true, quantize: int8-dynamic}
"""
WORDS = [
    "the",
    "a",
    "small",
    "large",
    "parser",
    "module",
    "reads",
    "writes",
    "cache",
    "buffer",
    "table",
    "queue",
    "before",
    "after",
    "every",
    "call",
    "file",
]
METRICS = ("rouge1", "rouge2", "rougeL", "bleu")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model (it has a decoder and an 'lm' head) pretrained on a small corpus: (folder, teacher dir)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("seq2seq")
    sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))).capitalize() + "." for _ in range(400))
    paragraphs = [" ".join(next(sentences) for _ in range(5)) for _ in range(80)]
    (root / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    teacher = root / "teacher"
    pretrain = ["pretrain", "--preset", "tiny", "--steps", "4", "--batch-size", "4", "--max-len", "32"]
    code, _, stderr = _run([*pretrain, "--corpus", str(root / "corpus.txt"), "--out", str(teacher)])
    assert code == 0, stderr
    return root, teacher


@pytest.fixture(scope="module")
def compressed(pretrained):
    """The pretrained model compressed with an exporting recipe from the command line: (teacher dir, out dir, stdout)."""
    root, teacher = pretrained
    (root / "recipe.yaml").write_text(RECIPE.replace("limit: 60", f"limit: 60, corpus: {root / 'corpus.txt'}"))
    code, stdout, stderr = _run(
        ["compress", str(root / "recipe.yaml"), "--model", str(teacher), "--out", str(root / "lite")]
    )
    assert code == 0, stderr
    return teacher, root / "lite", stdout


@pytest.mark.slow
def test_every_row_with_a_decoder_has_rouge_and_bleu(compressed):
    _, out, stdout = compressed
    rows = {row["name"]: row for row in json.loads((out / "report.json").read_text())["stages"]}
    scored = ["input", "Prune", "Distill", "Quantize", "teacher, PyTorch fp32", "Lite, ONNX", "Lite, ONNX int8-dynamic"]
    for name in scored:
        metrics = rows[name]["metrics"]
        assert all(0 <= metrics[m] <= 1 for m in METRICS[:3]) and 0 <= metrics["bleu"] <= 100, name
        assert "fidelity" in metrics  # the job's own metric stays
    assert rows["teacher, PyTorch fp32"]["metrics"] == rows["input"]["metrics"]
    assert not set(METRICS) & set(rows["teacher, ORT int8 (one call)"]["metrics"])  # its file has no decoder
    table = (out / "report.md").read_text()
    assert "| rouge1 | rouge2 | rougeL | bleu |" in table and "rebuilds" in table and table in stdout


@pytest.mark.slow
def test_the_scores_are_those_of_the_held_out_denoising_task(compressed):
    teacher_dir, out, _ = compressed
    manifest = json.loads((teacher_dir / "manifest.json").read_text())["pretraining"]
    documents = generation.held_out_documents(manifest["corpus"], seed=manifest["seed"], holdout=manifest["holdout"])
    teacher = load(teacher_dir)
    sources, references, options = generation.denoising(documents, teacher.tokenizer, n=32, max_len=32)
    assert 10 < len(sources) <= 32 and options["decoder_start_token_id"] == teacher.tokenizer.token_to_id("[CLS]")
    task = dict(max_new_tokens=32, max_len=32, **options)
    rows = {row["name"]: row for row in json.loads((out / "report.json").read_text())["stages"]}
    want = generation.evaluate(teacher, sources, references, teacher.tokenizer, **task)
    assert {m: rows["input"]["metrics"][m] for m in METRICS} == pytest.approx(want)
    int8 = OrtModel(out / "onnx" / "model-int8-dynamic.onnx")
    want = generation.evaluate(int8, sources, references, teacher.tokenizer, **task)
    assert {m: rows["Lite, ONNX int8-dynamic"]["metrics"][m] for m in METRICS} == pytest.approx(want)


def test_run_job_from_python_scores_the_seq2seq_head_on_the_recipes_held_out_texts(pretrained, tmp_path):
    root, teacher_dir = pretrained
    corpus = root / "corpus.txt"
    (tmp_path / "recipe.yaml").write_text(
        "passes:\n  - prune: {heads: 0.5, ffn: 0.5}\n  - distill: {steps: 2, progress: false}\n"
        f"data: {{max_len: 32, batch_size: 4, limit: 60, corpus: {corpus}}}\nexport: {{onnx: false}}\n"
    )
    teacher = load(teacher_dir)
    result = run_job(load_recipe(tmp_path / "recipe.yaml"), teacher, tmp_path / "job", seed=1)
    rows = {row["name"]: row["metrics"] for row in json.loads(result.files["json"].read_text())["stages"]}
    assert list(rows) == ["input", "Prune", "Distill"]
    # The recipe holds out the first tenth of its 60 texts (6 >= one batch of 4), shuffled with the job's seed.
    texts = load_corpus(corpus)
    random.Random(1).shuffle(texts)
    sources, references, options = generation.denoising(texts[:6], teacher.tokenizer, n=32, max_len=32, seed=1)
    assert len(sources) > 10
    task = dict(max_new_tokens=32, max_len=32, **options)
    for name, model in (("input", teacher), ("Prune", load(tmp_path / "job" / "work" / "00-Prune" / "model"))):
        want = generation.evaluate(model, sources, references, teacher.tokenizer, **task)
        assert {m: rows[name][m] for m in METRICS} == pytest.approx(want), name
    want = generation.evaluate(load(tmp_path / "job" / "model"), sources, references, teacher.tokenizer, **task)
    assert {m: rows["Distill"][m] for m in METRICS} == pytest.approx(want)
    assert f"sentences of the recipe's held-out texts ({corpus})" in result.files["markdown"].read_text()


def test_a_pretraining_record_without_its_split_is_refused_before_any_pass(pretrained, tmp_path):
    root, teacher_dir = pretrained
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    manifest = json.loads((teacher / "manifest.json").read_text())
    del manifest["pretraining"]["holdout"]
    (teacher / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("limit: 60", f"limit: 60, corpus: {root / 'corpus.txt'}"))
    code, _, stderr = _run(
        ["compress", str(tmp_path / "recipe.yaml"), "--model", str(teacher), "--out", str(tmp_path / "lite")]
    )
    assert code == 2 and "lacks 'holdout'" in stderr and "'seed'" in stderr, stderr
    assert not (tmp_path / "lite" / "work").exists()


def test_held_out_documents_are_the_ones_pretraining_kept_out():
    from model.data.tokenizer import special_tokens, train_tokenizer
    from model.training.pretrain import prepare

    rng = random.Random(1)
    docs = [" ".join(f"{i} {' '.join(rng.choice(WORDS) for _ in range(7))} {j}." for j in range(5)) for i in range(60)]
    tok = train_tokenizer(docs, vocab_size=200)
    run = prepare("tiny", docs, batch_size=2, max_len=32, seed=3, tokenizer=tok, holdout=0.1)
    held = generation.held_out_documents(docs, seed=3, holdout=0.1)
    assert len(held) == 6 and set(held) < set(docs)
    held_ids = [tuple(e.ids[1:-1]) for e in tok.encode_batch(held)]
    train_ids = [tuple(e.ids[1:-1]) for e in tok.encode_batch([d for d in docs if d not in held])]
    sep = special_tokens(tok).sep
    segments = []  # every segment the held-out batches hold: [CLS] A [SEP] B [SEP], labels unmasked
    for i in range(len(run.eval_data)):
        for row in run.eval_data[i]["decoder_labels"].tolist():
            tokens = [t for t in row if t >= 0]
            cuts = [-1, *(j for j, t in enumerate(tokens) if t == sep)]
            segments += [tuple(tokens[a + 1 : b]) for a, b in zip(cuts, cuts[1:]) if b > a + 1]
    assert segments and all(any(_within(seg, doc) for doc in held_ids) for seg in segments)
    assert not any(_within(seg, doc) for seg in segments for doc in train_ids)


def _within(part: tuple, whole: tuple) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))
