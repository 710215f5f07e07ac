"""Every pass on every imported family: Share, Prune, Distill and Quantize on tiny random HF models, then ONNX export.

Each family is a tiny random transformers model (width 32, 2 layers, vocab 100) imported with
from_hf. References are independent of the code under test where one exists: the pruned model's
own float64 computation (exact attention) for the fp32 model and ONNX Runtime's output, the
float model for its quantized copies.
"""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the `hf` extra (transformers)")

import test_hf_families as encoders  # noqa: E402
import test_hf_seq2seq as seq2seq  # noqa: E402

from compress import Distill, Pipeline, Prune, Quantize, Share  # noqa: E402
from model import from_hf  # noqa: E402
from model.onnx.export import export_onnx  # noqa: E402
from model.onnx.runtime import OrtModel  # noqa: E402

torch.set_num_threads(1)  # shared 2-core machine; these models are tiny

TOL = 1e-4
MAX_LEN = 64  # the longest sequence the export's parity check runs (T5's relative positions have no table limit)


def _bert(**overrides):
    """A tiny BertForSequenceClassification (3 labels), every weight perturbed."""
    sizes = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)
    config = transformers.BertConfig(vocab_size=encoders.VOCAB, hidden_size=32, num_labels=3, **sizes, **overrides)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# family: (builder of the HF model, whether it is an encoder-decoder)
FAMILIES = {
    "bert": (_bert, False),
    "roberta": (lambda: encoders._small("RobertaForMaskedLM"), False),
    "distilbert": (lambda: encoders._small("DistilBertForSequenceClassification", num_labels=2), False),
    "roformer": (lambda: encoders._small("RoFormerForQuestionAnswering"), False),
    "bart": (lambda: seq2seq._small("BartForConditionalGeneration"), True),
    "mbart": (lambda: seq2seq._small("MBartForConditionalGeneration", scale_embedding=True), True),
    "marian": (lambda: seq2seq._small("MarianMTModel", scale_embedding=True, tie_word_embeddings=False), True),
    "t5": (lambda: seq2seq._small("T5ForConditionalGeneration"), True),
    "t5-gated": (
        lambda: seq2seq._small("T5ForConditionalGeneration", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        True,
    ),
}


def _imported(family: str):
    """(the imported model, training batches, a held-out batch) of one family; deterministic."""
    torch.manual_seed(0)
    build, is_seq2seq = FAMILIES[family]
    hf = build()
    pad = hf.config.pad_token_id
    model = from_hf(hf)
    if is_seq2seq:
        batch = seq2seq._padded_batch(pad)
        batches = [batch, {k: v.roll(1, 0) for k, v in batch.items()}]
    else:
        batches = [encoders._padded_batch(pad) for _ in range(3)]
    held_out = batches.pop()
    if is_seq2seq:  # the export's decoder takes causal masking only (padding on the right)
        held_out = {k: v for k, v in held_out.items() if k != "decoder_attention_mask"}
    return model, batches, held_out


def _named(out) -> dict[str, torch.Tensor]:
    """Hidden states, decoder hidden states and every head's logits of an Output (PyTorch's or OrtModel's), by name."""
    found = {"hidden_states": out.hidden_states, **out.head_logits}
    if out.decoder_hidden_states is not None:
        found["decoder_hidden_states"] = out.decoder_hidden_states
    return found


def _outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return _named(model.eval()(**batch))


def _float64(model, batch) -> dict[str, torch.Tensor]:
    """The model's outputs computed in float64 with exact attention: the reference for its fp32 runs."""
    reference = copy.deepcopy(model).double()
    reference.attention_backend = "reference"
    return _outputs(reference, batch)


def _assert_close(got: dict, want: dict, tol: float) -> None:
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        err = (got[name].double() - ref).abs().max().item()
        assert err <= tol, f"{name}: {err:.2e} > {tol:.0e}"


def _relative(got: dict, want: dict) -> float:
    return max(((got[k].double() - v).norm() / v.norm()).item() for k, v in want.items())


def _compressed(family: str):
    """The family's model through Share (embeddings to rank 16, pairs of layers), Prune and a few Distill steps."""
    model, batches, held_out = _imported(family)
    passes = [
        Share(layers_per_group=2, embed_dim=16),
        Prune(heads=0.5, ffn=0.5, layers=1),
        Distill(steps=3, lr=1e-3, progress=False),
    ]
    lite = Pipeline(passes).run(model, data=batches)
    narrow = Pipeline([Prune(hidden=0.25)]).run(lite, data=batches)  # width 32 -> 24, above embed_dim 16
    return model, lite, narrow, batches, held_out


@pytest.mark.filterwarnings(r"ignore:Quantize\('int4'\) leaves")  # the 16-wide inputs stay float, as it says
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pass_runs_on_every_family(family):
    model, lite, narrow, batches, held_out = _compressed(family)
    c = narrow.config
    assert (c.dim, c.embed_dim, lite.config.dim) == (24, 16, 32)
    layers = (*c.encoder, *c.decoder)
    assert {(s.n_heads, s.ffn_dim) for s in layers} == {(2, 16)}
    assert len(layers) == len(model.config.encoder) + len(model.config.decoder) - 1
    assert all(len(set(share)) == 1 for share in (c.encoder_share, c.decoder_share) if share)  # pairs: one block
    if model.decoder is not None and model.decoder.blocks[0].ffn.gate is not None:  # gated FFN pairs pruned alike
        ffn = narrow.decoder.blocks[0].ffn
        assert ffn.gate.weight.shape == ffn.up.weight.shape == (16, 24) and ffn.down.weight.shape == (24, 16)
    if model.config.positions == "relative":  # the relative-bias table lost the pruned heads' columns
        assert narrow.encoder.blocks[0].self_attn.relative.weight.shape == (8, 2)
    want = _float64(narrow, held_out)
    _assert_close(_outputs(narrow, held_out), want, TOL)
    floats = _float64(lite, held_out)
    for mode, bound in (("int8", 0.1), ("int8-dynamic", 0.1), ("int4", 0.6)):
        quantized = Pipeline([Quantize(mode, group_size=32 if mode == "int4" else 128)]).run(lite, data=batches)
        assert mode in {q.mode for q in quantized.config.quantized}
        assert _relative(_outputs(quantized, held_out), floats) < bound, mode


# Exporting an encoder-decoder traces three graphs (10-30 s here): Marian, the quickest, runs by default.
FAST_EXPORTS = ("bert", "roberta", "distilbert", "roformer", "marian")


@pytest.mark.parametrize(
    "family", [f if f in FAST_EXPORTS else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_the_compressed_model_exports_with_parity_and_runs_as_ort_int8(family, tmp_path):
    """fp32 ONNX within 1e-4 of the pruned model's float64 outputs; ONNX Runtime's int8-dynamic copy loads and runs."""
    _, _, narrow, _, held_out = _compressed(family)
    export_onnx(narrow, tmp_path / "lite", quantize=("int8-dynamic",), max_len=MAX_LEN)  # checks parity itself too
    want = _float64(narrow, held_out)
    _assert_close(_named(OrtModel(tmp_path / "lite")(held_out)), want, TOL)
    int8 = OrtModel(tmp_path / "lite" / "model-int8-dynamic.onnx")(held_out)
    logits = {k: v for k, v in want.items() if k in int8.head_logits}
    assert logits and _relative(int8.head_logits, logits) < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "t5-gated", "marian"])
@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
def test_quantized_models_export_with_parity(family, mode, tmp_path):
    """int8 and int4 weights with float activations: ONNX Runtime within 1e-4 of PyTorch. int8-dynamic rounds the
    activations in both, a step apart where they fall on a rounding edge: the export's own check bounds that."""
    _, lite, _, batches, held_out = _compressed(family)
    quantized = Pipeline([Quantize(mode, group_size=32 if mode == "int4" else 128)]).run(lite, data=batches)
    report = export_onnx(quantized, tmp_path / "q.onnx", max_len=MAX_LEN)  # raises ParityError past its tolerance
    if mode != "int8-dynamic":
        assert max(report.parity.values()) <= TOL
        got = OrtModel(tmp_path / "q.onnx")(held_out)
        want = {k: v.double() for k, v in _outputs(quantized, held_out).items()}
        _assert_close(_named(got), want, TOL)
