"""Recipes: the built-in YAML files parse into the pass dataclasses; mistakes name the key and what is allowed."""

import numpy as np
import pytest
import torch

from compress import Distill, Prune, Quantize, Share
from compress.recipe import Recipe, builtin_recipes, load_recipe, parse_recipe


def test_builtin_recipes_parse_into_passes():
    names = builtin_recipes()
    assert {"flash-lite", "prune-only", "quantize-only", "minilm-embedding", "glue-task"} <= set(names)
    default = load_recipe("flash-lite")
    assert [type(p) for p in default.passes] == [Share, Prune, Distill, Quantize]
    assert default.export.quantize == "int8-dynamic" and default.description


def test_a_recipe_file_round_trips_its_settings(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "passes:\n  - prune: {heads: 0.5}\n  - distill: {steps: 7, layer_map: [1, 1]}\ndata: {max_len: 32}\n"
    )
    recipe = load_recipe(path)
    assert recipe == Recipe(passes=(Prune(heads=0.5), Distill(steps=7, layer_map=(1, 1))), data=recipe.data)
    assert recipe.data.max_len == 32 and recipe.data.batch_size == 16


@pytest.mark.parametrize(
    "text, error, message",
    [
        (
            "passes:\n  - prune: {head: 0.5}\n",
            ValueError,
            r"passes\[0\]\.prune: unknown setting\(s\) \['head'\]; allowed: heads, ffn",
        ),
        ("passes:\n  - prune: {heads: half}\n", TypeError, r"passes\[0\]\.prune: .*heads"),
        ("passes:\n  - distill: {steps: 0}\n", ValueError, r"passes\[0\]\.distill: .*steps"),
        ("passes:\n  - squeeze: {}\n", ValueError, "unknown pass 'squeeze'; allowed: share, prune, distill, quantize"),
        ("passes: []\n", ValueError, "'passes' must be a non-empty list"),
        ("pases:\n  - prune: {}\n", ValueError, r"unknown top-level key\(s\) \['pases'\]"),
        ("passes:\n  - quantize: {mode: int3}\n", ValueError, "mode must be one of"),
        ("passes:\n  - prune: {}\nexport: {quantize: int2}\n", ValueError, "export.quantize must be one of"),
        ("passes: [\n", ValueError, "not valid YAML"),
        (
            "passes:\n  - prune: {}\ndata: {glue_text: [imdb], glue_dir: x}\n",
            ValueError,
            r"unknown GLUE tasks \['imdb'\]",
        ),
        ("passes:\n  - prune: {}\ndata: {glue_text: [sst2]}\n", ValueError, "set data.glue_dir"),
        ("passes:\n  - prune: {}\ndata: {glue_text: [sst2], corpus: a.txt, glue_dir: x}\n", ValueError, "one source"),
        ("passes:\n  - prune: {}\ndata: {builtin_corpus: maybe}\n", TypeError, "builtin_corpus must be true or false"),
        ("passes:\n  - prune: {}\nexport: {onnx: false, peer: true}\n", ValueError, "export.peer compares ONNX files"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, error, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_recipe(path)


def test_unknown_recipe_name_lists_the_builtin_ones():
    with pytest.raises(FileNotFoundError, match="built-in: flash-lite"):
        load_recipe("flash-heavy")


def test_parse_refuses_non_mappings():
    with pytest.raises(TypeError, match="must be a mapping"):
        parse_recipe(["prune"])


def test_overrides_change_one_setting_and_name_mistakes():
    recipe = load_recipe("flash-lite", ["distill.steps=7", "data.max_len=32", "export.quantize=null"])
    assert recipe.passes[2] == Distill(steps=7, lr=3e-4, temperature=2.0)
    assert recipe.data.max_len == 32 and recipe.export.quantize is None
    with pytest.raises(ValueError, match="has no 'squash' pass"):
        load_recipe("flash-lite", ["squash.steps=1"])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        load_recipe("flash-lite", ["steps=1"])
    with pytest.raises(ValueError, match="steps"):
        load_recipe("flash-lite", ["distill.steps=0"])


def test_the_embedding_recipe_refuses_the_builtin_corpus_without_an_opt_in():
    from compress.job import recipe_batches
    from model import Config, Transformer
    from model.data.tokenizer import train_tokenizer

    recipe = load_recipe("minilm-embedding", ["data.glue_text=[]", "data.glue_dir=null"])
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    model.tokenizer = train_tokenizer(["a small corpus of words"] * 20, vocab_size=model.config.vocab_size)
    with pytest.raises(ValueError, match="not pretrained on the built-in corpus.*data.builtin_corpus=true"):
        recipe_batches(recipe.data, model)
    opted_in = load_recipe("minilm-embedding", ["data.glue_text=[]", "data.glue_dir=null", "data.builtin_corpus=true"])
    train, held_out = recipe_batches(opted_in.data, model)
    assert train and held_out


def test_a_distillation_longer_than_its_data_warns():
    from compress.job import check_data_size

    recipe = load_recipe("minilm-embedding")
    steps = next(p.steps for p in recipe.passes if isinstance(p, Distill))
    assert check_data_size(recipe, steps) is None  # one pass over the data
    warning = check_data_size(recipe, steps // 20)
    assert f"{steps} steps over {steps // 20} batches" in warning and "20 passes" in warning


def test_recipe_batches_grouped_by_length_hold_the_same_texts_with_less_padding(tmp_path):
    from compress.job import recipe_batches
    from model import Config, Transformer
    from model.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 40, size=400)]
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    model.tokenizer = train_tokenizer(texts, vocab_size=model.config.vocab_size)
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    data = ["data.batch_size=16", "data.max_len=48", f"data.corpus={tmp_path / 'corpus.txt'}"]
    grouped = load_recipe("prune-only", data).data
    plain = load_recipe("prune-only", [*data, "data.group_by_length=false"]).data
    (g_train, g_held), (p_train, p_held) = (recipe_batches(spec, model, seed=0) for spec in (grouped, plain))

    def rows(batches):
        return sorted(tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"]))

    assert rows(g_train) == rows(p_train) and rows(g_held) == rows(p_held)
    assert sum(b["input_ids"].numel() for b in g_train) < 0.7 * sum(b["input_ids"].numel() for b in p_train)
    with pytest.raises(TypeError, match="data.group_by_length must be true or false"):
        load_recipe("prune-only", ["data.group_by_length=3"])


def test_the_general_schedule_recipes_are_a_structural_stage_then_a_task_stage():
    general, task = load_recipe("general"), load_recipe("glue-task-from-general")
    assert [type(p) for p in general.passes] == [Share, Prune, Distill]
    assert general.passes[2].logits == 0.0 and general.data.glue_text and not general.data.builtin_corpus
    assert general.export.onnx is False  # its model/ is the student of every task, not a deployable
    assert [type(p) for p in task.passes] == [Distill] and task.passes[0].task > 0
    assert task.data.task == "sst2" and task.export.quantize == "int8-dynamic"


def test_the_glue_task_recipe_is_the_configuration_the_glue_benchmark_measured():
    recipe = load_recipe("glue-task")
    share, prune, distill = recipe.passes
    assert (share.embed_dim, share.embed_full_rows) == (96, 2000)
    assert (prune.heads, prune.ffn, prune.importance) == (0.0, 0.49, "taylor")
    assert (distill.steps, distill.lr, distill.warmup_steps, distill.task) == (600, 5e-5, 60, 1.0)
    assert recipe.export.quantize == "int8-dynamic"  # ONNX Runtime quantizes the float Lite export, as measured


@pytest.mark.parametrize(
    ("name", "embeddings", "layers"),
    [("glue-task-5-layers", (64, 1500), 1), ("glue-task-4-layers", (96, 2000), 2)],
)
def test_the_shallower_glue_recipes_are_the_configurations_the_glue_benchmark_measured(name, embeddings, layers):
    recipe = load_recipe(name)
    share, prune, distill = recipe.passes
    assert (share.embed_dim, share.embed_full_rows) == embeddings
    assert (prune.heads, prune.ffn, prune.layers, prune.round_to, prune.importance) == (0.0, 0.5, layers, 32, "taylor")
    assert (distill.steps, distill.lr, distill.warmup_steps, distill.task, distill.layer_map) == (
        1200,
        5e-5,
        120,
        1.0,
        None,
    )
    assert (recipe.data.augment_copies, recipe.data.augment_replace_prob) == (4, 0.4)
    assert recipe.export.quantize == "int8-dynamic"


def test_recipe_batches_of_an_eos_pooled_classifier_decode_the_shifted_source(tmp_path):
    """BART's classifier runs its decoder on the source shifted right: the text batches it is distilled on do too."""
    from compress.job import recipe_batches
    from model import Config, Transformer
    from model.data.tokenizer import special_tokens, train_tokenizer

    texts = [" ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4]) for i in range(80)]
    tokenizer = train_tokenizer(texts, vocab_size=64)
    sep, cls = special_tokens(tokenizer).sep, special_tokens(tokenizer).cls
    config = Config.preset(
        "tiny", vocab_size=64, heads=("classify",), n_labels=2, classify_pooling="eos", eos_id=sep, decoder_start_id=cls
    )
    model = Transformer(config).eval()
    model.tokenizer = tokenizer
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    spec = load_recipe("prune-only", ["data.batch_size=8", f"data.corpus={tmp_path / 'corpus.txt'}"]).data
    train, held = recipe_batches(spec, model)
    for batch in train[:2] + held[:1]:
        ids = batch["input_ids"]
        assert (
            torch.equal(batch["decoder_input_ids"][:, 1:], ids[:, :-1])
            and (batch["decoder_input_ids"][:, 0] == cls).all()
        )
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, model(ids, batch["attention_mask"]).logits)


def test_a_task_limit_samples_the_train_rows_instead_of_taking_the_first(tmp_path):
    from compress.job import recipe_batches
    from model import Config, Transformer
    from model.data.tokenizer import train_tokenizer

    sentences = [f"{'good film' if i < 48 else 'bad plot'} {i}" for i in range(96)]
    folder = tmp_path / "SST-2"
    folder.mkdir()
    train = [f"{s}\t{int(i < 48)}" for i, s in enumerate(sentences)]  # sorted by label: a prefix is one class
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(train) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(train[::8]) + "\n")
    model = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",)))
    model.tokenizer = train_tokenizer(sentences * 4, vocab_size=model.config.vocab_size)
    data = ["data.task=sst2", f"data.glue_dir={tmp_path}", "data.batch_size=8", "data.max_len=16", "data.limit=32"]
    runs = [recipe_batches(load_recipe("prune-only", data).data, model, seed=seed)[0] for seed in (0, 0, 1)]
    labels = [sorted(int(y) for b in batches for y in b["labels"]) for batches in runs]
    assert len(labels[0]) == 32 and 0 < sum(labels[0]) < 32  # both classes, where the first 32 rows are all 1
    ids = [sorted(r.tolist() for b in batches for r in b["input_ids"]) for batches in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]  # the seed picks the sample
