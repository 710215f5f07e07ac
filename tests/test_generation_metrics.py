"""compress.evaluate.generation: ROUGE and BLEU against hand-computed values, and generate -> decode -> score on real models."""

import math
import os

import pytest
import torch

from compress.evaluate import generation
from model import Config, Transformer
from model.data.tokenizer import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 100
TEXTS = [f"sentence number {i} about pruning, sharing and quantizing encoders and decoders" for i in range(40)]


def test_exact_match_is_full_marks():
    texts = ["the cat sat on the mat", "a dog barked twice at night"]
    assert generation.score(texts, texts) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0})


def test_one_substituted_word_scores_the_hand_computed_overlap():
    # hypothesis a b c d e f vs reference a b c d x f: 5/6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams
    # match; the longest common subsequence is a b c d f (5 of 6); equal lengths: no brevity penalty.
    got = generation.score(["a b c d e f"], ["a b c d x f"])
    assert got["rouge1"] == pytest.approx(5 / 6) and got["rougeL"] == pytest.approx(5 / 6)
    assert got["rouge2"] == pytest.approx(3 / 5)
    assert got["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_pools_ngram_counts_over_the_corpus_and_rouge_averages_pairs():
    # the exact pair adds 4/4, 3/3, 2/2, 1/1 matches to the pair above: 9/10, 6/8, 4/6, 2/4 over the corpus
    predictions, references = ["a b c d", "a b c d e f"], ["a b c d", "a b c d x f"]
    got = generation.score(predictions, references)
    assert got["bleu"] == pytest.approx(100 * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25)
    assert got["rouge1"] == pytest.approx((1 + 5 / 6) / 2) and got["rouge2"] == pytest.approx((1 + 3 / 5) / 2)


def test_a_short_hypothesis_pays_the_brevity_penalty():
    # every n-gram of "a b c d" is in the reference; 4 words for 6: BP = exp(1 - 6/4)
    assert generation.bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert generation.rouge(["a b c d"], ["a b c d e f"])["rouge1"] == pytest.approx(2 * 1 * (4 / 6) / (1 + 4 / 6))


@pytest.mark.parametrize(
    "predictions, references, error, message",
    [
        (["a"], ["a", "b"], ValueError, "one length"),
        ([], [], ValueError, "non-empty"),
        ("a b", ["a b"], TypeError, "predictions must be a sequence of str"),
        (["a"], [3], TypeError, "references must be a sequence of str"),
    ],
)
def test_mismatched_or_mistyped_texts_are_refused(predictions, references, error, message):
    with pytest.raises(error, match=message):
        generation.score(predictions, references)


def test_generation_refuses_a_model_without_a_decoder():
    tok = train_tokenizer(TEXTS, vocab_size=120)
    encoder = Transformer(Config.preset("tiny", decoder_layers=0, heads=("mlm",), vocab_size=tok.get_vocab_size()))
    with pytest.raises(ValueError, match="encoder-decoder model with an 'lm' head"):
        generation.evaluate(encoder, ["a text"], ["a text"], tok)
    with pytest.raises(TypeError, match="OrtModel"):
        generation.evaluate(object(), ["a text"], ["a text"], tok)


def test_denoising_masks_words_of_held_out_sentences_and_decodes_from_cls_to_sep():
    docs = [" ".join(f"Sentence {w} number {i} about pruning encoders." for w in ("one", "two")) for i in range(20)]
    tok = train_tokenizer(docs, vocab_size=120)
    sources, references, options = generation.denoising(docs, tok, n=12, max_len=24, ratio=0.5, seed=1)
    assert len(sources) == len(references) == 12
    assert options == {"decoder_start_token_id": tok.token_to_id("[CLS]"), "eos_token_id": tok.token_to_id("[SEP]")}
    assert references[0] == tok.decode(tok.encode("Sentence one number 0 about pruning encoders.").ids)
    masked = [w == "[MASK]" for s in sources for w in s.split()]
    assert 0.3 < sum(masked) / len(masked) < 0.7
    for source, reference in zip(sources, references):  # unmasked words are the reference's, in place
        kept = [w for w in source.split() if w != "[MASK]"]
        assert all(w.lower().strip(".") in reference for w in kept)
    plain, _, _ = generation.denoising(docs, tok, n=12, max_len=24, ratio=0.0)
    assert [tok.decode(tok.encode(s).ids) for s in plain] == references
    with pytest.raises(ValueError, match="no sentence of 8..9 tokens"):
        generation.denoising(docs, tok, max_len=9)
    with pytest.raises(TypeError, match=r"ratio must be a number in \[0, 1\), got '0.2'"):
        generation.denoising(docs, tok, ratio="0.2")
    with pytest.raises(ValueError, match="max_len must be >= 8, got 4"):
        generation.denoising(docs, tok, max_len=4)


def _bart_with_tokenizer(tmp_path):
    """A tiny random BART (transformers) and a byte-level BPE tokenizer over TEXTS, saved together in one folder."""
    transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    sizes = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4)
    config = transformers.BartConfig(
        vocab_size=VOCAB, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=40, dropout=0.0, **sizes
    )
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "bart")
    tok.save(str(tmp_path / "bart" / "tokenizer.json"))
    return hf, tok, tmp_path / "bart"


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_decode_score_matches_transformers_generate(tmp_path, num_beams):
    from model import from_hf
    from model.data.tokenizer import encode

    hf, tok, folder = _bart_with_tokenizer(tmp_path)
    model = from_hf(folder)
    sources, references = TEXTS[:6], TEXTS[6:12]
    batch = encode(tok, sources, max_len=24)
    with torch.no_grad():
        ids = hf.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=10,
            forced_eos_token_id=2,  # BartConfig's own generation setting, given to both
        )
    want = tok.decode_batch(ids.tolist(), skip_special_tokens=True)
    settings = dict(max_new_tokens=10, num_beams=num_beams, max_len=24, forced_eos_token_id=2)
    got = generation.generate_texts(model, sources, tok, batch_size=4, **settings)
    assert got == want and any(text.strip() for text in got)
    assert generation.evaluate(model, sources, references, tok, **settings) == generation.score(want, references)
    assert generation.evaluate(model, sources, want, tok, **settings)["rougeL"] == pytest.approx(1.0)


@pytest.mark.slow  # the export takes most of its ~20 s; test_cli's compress run scores an ONNX file by default
def test_onnx_runtime_generation_scores_as_pytorch(tmp_path):
    from model import from_hf
    from model.onnx.export import export_onnx
    from model.onnx.runtime import OrtModel, OrtModule

    _, tok, folder = _bart_with_tokenizer(tmp_path)
    model = from_hf(folder)
    export_onnx(model, tmp_path / "onnx")
    runner = OrtModel(tmp_path / "onnx")
    settings = dict(max_new_tokens=8, max_len=24, decoder_start_token_id=2, eos_token_id=2)
    want = generation.generate_texts(model, TEXTS[:4], tok, **settings)
    assert generation.generate_texts(runner, TEXTS[:4], tok, **settings) == want
    assert generation.generate_texts(OrtModule(runner), TEXTS[:4], tok, **settings) == want
