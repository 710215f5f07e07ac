"""Triton attention kernels (flash, flash-int8, flash-lsh) against float64, their dispatch, custom ops and export.

The kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set only while this module
imports them and during its tests). With TRITON_INTERPRET=0 on a CUDA machine the same tests
run the compiled kernels on the GPU, and the `gpu` tests (bf16) run too.
"""

import importlib
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._device import _device_constructors

from model.attention import attend, choose_backend, reference_attention
from model.config import Config
from model.transformer import Transformer

ON_GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _import_kernels():
    """Import the kernel modules with the interpreter on: triton fixes a kernel's mode when it is defined."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(f"model.kernels.{name}") for name in ("flash", "int8", "lsh")]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


flash_mod, int8_mod, lsh_mod = _import_kernels()
if not ON_GPU and type(flash_mod._attn_fwd).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "model.kernels.flash was imported before TRITON_INTERPRET=1 was set: its kernels are "
        "compiled for a GPU and cannot run on CPU; import it only through this module or attend()"
    )
flash_attention, int8_attention = flash_mod.flash_attention, int8_mod.int8_attention
lsh_attention = lsh_mod.lsh_attention


def gpu(test):
    """Mark a test `gpu` and skip it unless the compiled kernels run on CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs CUDA and TRITON_INTERPRET=0")(test))


@pytest.fixture(autouse=True)
def _interpreter_and_poison(monkeypatch):
    """Interpreter on; every fresh float buffer holds NaN and every int buffer its minimum.

    The kernels' outputs, log-sum-exps, gradients and quantized copies are all allocated with
    torch.empty/empty_like, so an element a kernel forgets to write shows up as NaN or as a
    wildly wrong value in the comparisons below.
    """
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def poisoned(alloc):
        def make(*args, **kwargs):
            t = alloc(*args, **kwargs)
            if t.is_floating_point():
                return t.fill_(float("nan"))
            return t.fill_(torch.iinfo(t.dtype).min) if t.dtype != torch.bool else t

        return make

    _device_constructors()  # cache the real torch.empty first, or `with torch.device("meta")` misses it later
    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


def make_inputs(b, h, tq, tk, d, dtype=torch.float32, *, mask=None, transposed=False):
    """Unit-scale random q, k, v (fresh each call) and a key mask.

    mask: None; "pad" (right padding of a different length per batch row); "holes" (random
    keys off, and batch row 0 fully masked at the front, so causal rows there see no key).
    transposed: q, k, v as the Transformer makes them, (B,T,H,D) memory seen as (B,H,T,D).
    """

    def rand(t):
        if transposed:
            return torch.randn(b, t, h, d, device=DEVICE).transpose(1, 2).to(dtype)
        return torch.randn(b, h, t, d, device=DEVICE).to(dtype)

    q, k, v = rand(tq), rand(tk), rand(tk)
    key_mask = None
    if mask == "pad":
        lengths = torch.randint(tk // 2, tk + 1, (b,), device=DEVICE)
        lengths[0] = tk
        key_mask = torch.arange(tk, device=DEVICE)[None, :] < lengths[:, None]
    elif mask == "holes":
        key_mask = torch.rand(b, tk, device=DEVICE) > 0.3
        key_mask[0, :5] = False
    return q, k, v, key_mask


def forward_backward(fn, q, k, v, d_out):
    """fn's output and its gradients in q, k, v for the upstream gradient d_out."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


def reference64(q, k, v, d_out, **kw):
    return forward_backward(
        lambda a, b, c: reference_attention(a, b, c, **kw)[0], *(x.double() for x in (q, k, v, d_out))
    )


def max_errors(got, expected):
    return [(g.double() - e).abs().max().item() for g, e in zip(got, expected)]


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# (tq, tk, head_dim, causal, mask, transposed): odd lengths over several 16-wide tiles,
# cross-attention both ways, head widths that are and are not powers of two.
CASES = [
    (37, 37, 32, False, "pad", True),
    (37, 37, 64, True, "pad", False),
    (21, 45, 16, True, None, False),
    (45, 21, 128, False, "holes", False),
    (29, 29, 48, True, "holes", True),
]
CASE_IDS = [f"{tq}x{tk}-d{d}-{'causal' if c else 'full'}-{m}" for tq, tk, d, c, m, _ in CASES]


@pytest.mark.parametrize("tq, tk, d, causal, mask, transposed", CASES, ids=CASE_IDS)
def test_flash_fp32_forward_and_gradients_match_float64(tq, tk, d, causal, mask, transposed):
    q, k, v, key_mask = make_inputs(2, 2, tq, tk, d, mask=mask, transposed=transposed)
    d_out = torch.randn_like(q)
    expected = reference64(q, k, v, d_out, key_mask=key_mask, causal=causal)
    got = forward_backward(lambda a, b, c: flash_attention(a, b, c, key_mask=key_mask, causal=causal), q, k, v, d_out)
    assert got[0].stride() == q.stride()  # the output keeps the input's layout: no copy to merge heads
    assert max(max_errors(got, expected)) <= 1e-4


def assert_within_twice_torch(dtype, b, h, tq, tk, d, causal, mask, transposed=False):
    """Error against float64, output and each gradient, within 2x the better of torch's own paths in dtype."""
    q, k, v, key_mask = make_inputs(b, h, tq, tk, d, mask=mask, transposed=transposed)
    d_out = torch.randn_like(q)
    expected = reference64(q, k, v, d_out, key_mask=key_mask, causal=causal)
    low = [x.to(dtype) for x in (q, k, v, d_out)]
    ours = max_errors(
        forward_backward(lambda a, b, c: flash_attention(a, b, c, key_mask=key_mask, causal=causal), *low[:3], low[3]),
        expected,
    )
    # Two baselines, as each has its weak spot (fp16 SDPA on CPU with fully masked rows, for one).
    torch_errors = [
        max_errors(
            forward_backward(
                lambda a, b, c: attend(a, b, c, key_mask=key_mask, causal=causal, backend=name), *low[:3], low[3]
            ),
            expected,
        )
        for name in ("sdpa", "reference")
    ]
    for name, err, sdpa_err, ref_err in zip(("out", "dq", "dk", "dv"), ours, *torch_errors):
        assert err <= 2 * min(sdpa_err, ref_err), (name, err, sdpa_err, ref_err)


@pytest.mark.parametrize("tq, tk, d, causal, mask, transposed", CASES[:3], ids=CASE_IDS[:3])
def test_flash_fp16_error_at_most_twice_torch_fp16(tq, tk, d, causal, mask, transposed):
    assert_within_twice_torch(torch.float16, 2, 2, tq, tk, d, causal, mask, transposed)


@pytest.mark.parametrize("causal, tq, tk", [(False, 19, 19), (True, 19, 19), (True, 40, 18)])
def test_rows_that_see_no_key_match_the_reference(causal, tq, tk):
    """Fully masked query rows: uniform weights over all keys, and the gradients autograd gives the reference."""
    q, k, v, _ = make_inputs(3, 2, tq, tk, 32)
    key_mask = torch.ones(3, tk, dtype=torch.bool, device=DEVICE)
    key_mask[0] = False  # no key at all
    key_mask[1, :7] = False  # left padding: under causality the first rows see nothing
    d_out = torch.randn_like(q)
    expected = reference64(q, k, v, d_out, key_mask=key_mask, causal=causal)
    got = forward_backward(lambda a, b, c: flash_attention(a, b, c, key_mask=key_mask, causal=causal), q, k, v, d_out)
    torch.testing.assert_close(got[0][0].double(), v[0].double().mean(dim=1, keepdim=True).expand(-1, tq, -1))
    assert max(max_errors(got, expected)) <= 1e-4


def test_buffers_are_poisoned():
    """The fixture's guarantee that the tests above see every element a kernel leaves unwritten."""
    assert torch.empty_like(torch.ones(3)).isnan().all() and torch.empty(2, dtype=torch.int8).eq(-128).all()


INT8_CASES = [(37, 37, 32, False, "pad"), (21, 45, 64, False, "holes"), (37, 37, 32, True, "holes")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tq, tk, d, causal, mask", INT8_CASES, ids=["pad", "cross-holes", "causal-holes"])
def test_int8_close_to_exact_on_unit_scale_inputs(tq, tk, d, causal, mask, dtype):
    q, k, v, key_mask = make_inputs(2, 2, tq, tk, d, dtype, mask=mask)
    exact = reference_attention(q.double(), k.double(), v.double(), key_mask=key_mask, causal=causal)[0]
    got = int8_attention(q, k, v, key_mask=key_mask, causal=causal)
    assert got.dtype == dtype
    assert cosine(got, exact) >= 0.999
    assert (got.double() - exact).abs().max().item() <= 3e-2


def test_int8_smoothing_absorbs_a_large_key_offset():
    """A shared offset in K changes no softmax; smoothing removes it before quantization, so accuracy holds."""
    q, k, v, key_mask = make_inputs(2, 2, 33, 33, 32, mask="pad")
    k = k + 20 * torch.randn(1, 2, 1, 32, device=DEVICE)
    exact = reference_attention(q.double(), k.double(), v.double(), key_mask=key_mask)[0]
    got = int8_attention(q, k, v, key_mask=key_mask)
    assert cosine(got, exact) >= 0.999 and (got.double() - exact).abs().max().item() <= 3e-2


@pytest.mark.parametrize("d, block_d", [(8, 32), (16, 32), (17, 32), (32, 32), (48, 64), (128, 128)])
def test_int8_head_tile_is_wide_enough_for_an_8bit_dot(d, block_d):
    """NVIDIA's 8-bit tl.dot needs an inner size of at least 32 (the interpreter takes any): narrow heads are padded."""
    assert int8_mod._int8_block_d(d) == block_d


def test_int8_pads_a_16_wide_head_and_stays_close_to_exact(monkeypatch):
    """The launch uses the padded tile (on a GPU, one of 16 does not compile), and zero padding leaves Q·Kᵀ as it was."""
    launched = {}
    kernel = int8_mod._attn_int8_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(int8_mod, "_attn_int8_fwd", Spy())
    q, k, v, key_mask = make_inputs(2, 2, 37, 37, 16, mask="pad")
    exact = reference_attention(q.double(), k.double(), v.double(), key_mask=key_mask, causal=True)[0]
    got = int8_attention(q, k, v, key_mask=key_mask, causal=True)
    assert launched["BLOCK_D"] == 32
    assert cosine(got, exact) >= 0.999 and (got.double() - exact).abs().max().item() <= 3e-2


@pytest.mark.parametrize("tq, tk, d, causal, mask, transposed", CASES[1:4], ids=CASE_IDS[1:4])
def test_lsh_with_one_bucket_is_exact(tq, tk, d, causal, mask, transposed):
    q, k, v, key_mask = make_inputs(2, 2, tq, tk, d, mask=mask, transposed=transposed)
    exact = reference_attention(q.double(), k.double(), v.double(), key_mask=key_mask, causal=causal)[0]
    got = lsh_attention(q, k, v, key_mask=key_mask, causal=causal, n_buckets=1)
    assert (got.double() - exact).abs().max().item() <= 1e-4


def test_lsh_buckets_find_the_keys_that_matter():
    """Clustered queries and keys: nearly all attention mass is within each cluster, so bucketing keeps it."""
    b, h, t, d, n_clusters = 1, 2, 96, 32, 4
    centers = F.normalize(torch.randn(n_clusters, d, device=DEVICE), dim=-1) * 8  # in-cluster scores ~11
    q, k = (
        centers[torch.randint(n_clusters, (b, h, t), device=DEVICE)] + 0.1 * torch.randn(b, h, t, d, device=DEVICE)
        for _ in range(2)
    )
    v = torch.randn(b, h, t, d, device=DEVICE)
    exact = reference_attention(q.double(), k.double(), v.double())[0]
    got = lsh_attention(q, k, v, n_buckets=8)
    assert torch.isfinite(got).all()
    assert cosine(got, exact) >= 0.99


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_writes_every_row_with_many_buckets(causal):
    """With 16 buckets most key tiles are skipped; every query still gets a convex mix of values."""
    q, k, v, key_mask = make_inputs(2, 2, 45, 37, 32, mask="holes")
    got = lsh_attention(q, k, v, key_mask=key_mask, causal=causal, n_buckets=16)
    assert torch.isfinite(got).all()
    assert (got <= v.amax(dim=2, keepdim=True) + 1e-5).all() and (got >= v.amin(dim=2, keepdim=True) - 1e-5).all()


@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_lsh_rows_whose_tiles_hold_no_allowed_key_get_the_exact_result(causal):
    """A query hashed together with only padded or future keys attends as the reference does, not to those keys.

    +w and -w, for w the hash's own direction, fall in opposite buckets of two, so the first half of
    the queries meets only the keys of one half and the second half only those of the other. Padded:
    the second half of the keys is padding, so the second-half queries meet no key they may see
    (batch row 1: every key is padding, every row sees none and averages all keys). Causal: the first
    half of the queries meets only future keys (batch row 1: left padding over the first half of the
    keys, so those queries see no key at all and the second-half queries meet only padding).
    """
    b, h, t, d = 2, 2, 128, 16  # two query tiles and more key tiles, with the GPU's tiles too
    w = lsh_mod._rotations(d, 2, 0, DEVICE)[:, 0]
    w = 3 * w / w.norm()
    first = (torch.arange(t, device=DEVICE) < t // 2)[:, None]

    def halves(sign):  # sign * w in the first half of the positions, -sign * w in the second
        return torch.where(first, sign * w, -sign * w) + 0.1 * torch.randn(b, h, t, d, device=DEVICE)

    q, k, v = halves(1), halves(-1 if causal else 1), torch.randn(b, h, t, d, device=DEVICE)
    key_mask = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    if causal:
        key_mask[1, : t // 2] = False
    else:
        key_mask[0, t // 2 :] = False
        key_mask[1] = False
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected = reference_attention(q64, k64, v64, key_mask=key_mask, causal=causal)[0]
    if causal:  # batch row 0's second-half queries meet only (all of) the first-half keys: the approximation
        expected[0, :, t // 2 :] = reference_attention(
            q64[:1, :, t // 2 :], k64[:1, :, : t // 2], v64[:1, :, : t // 2]
        )[0][0]
    got = lsh_attention(q, k, v, key_mask=key_mask, causal=causal, n_buckets=2, seed=0)
    assert (got.double() - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n_buckets", [0, 3, 2.0])
def test_lsh_bucket_count_is_checked(n_buckets):
    q, k, v, _ = make_inputs(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="n_buckets must be 1 or an even integer"):
        lsh_attention(q, k, v, n_buckets=n_buckets)


@pytest.mark.parametrize("fn, name", [(int8_attention, "flash-int8"), (lsh_attention, "flash-lsh")])
def test_inference_kernels_refuse_backward_clearly(fn, name):
    q, k, v, _ = make_inputs(1, 1, 8, 8, 16)
    out = fn(q.requires_grad_(), k, v)
    with pytest.raises(RuntimeError, match=f"{name} is inference-only"):
        out.sum().backward()


@pytest.mark.parametrize(
    "backend, fn", [("flash", flash_attention), ("flash-int8", int8_attention), ("flash-lsh", lsh_attention)]
)
def test_attend_runs_each_kernel_backend(backend, fn):
    q, k, v, key_mask = make_inputs(2, 2, 19, 23, 32, mask="pad")
    assert choose_backend(q, backend) == (
        backend,
        "requested (approximate)" if fn is not flash_attention else "requested",
    )
    torch.testing.assert_close(
        attend(q, k, v, key_mask=key_mask, causal=True, backend=backend), fn(q, k, v, key_mask=key_mask, causal=True)
    )


def test_dispatch_reasons_and_refusals(monkeypatch):
    q = torch.randn(1, 2, 4, 16)
    assert choose_backend(q)[0] == "sdpa"  # auto uses the kernels on CUDA only
    name, reason = choose_backend(q, "flash", dropout=0.1)
    assert name == "sdpa" and "dropout" in reason
    for bad, message in [
        (torch.randn(1, 2, 4, 16, dtype=torch.float64), "float16, bfloat16 or float32"),
        (torch.randn(1, 2, 4, 16, dtype=torch.bfloat16), "bfloat16 needs a GPU"),
        (torch.randn(1, 2, 4, 160), "head_dim 160 is over 128"),
    ]:
        with pytest.raises(ValueError, match=message):
            choose_backend(bad, "flash")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'flash-lsh' cannot run here: .*need a CUDA device"):
        choose_backend(q, "flash-lsh")
    assert choose_backend(torch.empty(0), "flash") == ("flash", "requested")  # name check only


def test_transformer_with_flash_matches_sdpa_forward_and_backward():
    """The tiny encoder-decoder (padding, causal decoder, cross-attention) trains the same through flash."""
    config = Config.preset("tiny", dropout=0.0, attention_dropout=0.0)
    model = Transformer(config).to(DEVICE)
    ids = torch.randint(5, config.vocab_size, (2, 11), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :9])
    results = []
    for backend in ("sdpa", "flash"):
        model.attention_backend = backend
        model.zero_grad()
        out = model(**batch)
        sum(logits.square().mean() for logits in out.head_logits.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append({"hidden_states": out.hidden_states, **out.head_logits, **grads})
    sdpa_results, flash_results = results
    assert flash_results.keys() == sdpa_results.keys() and "decoder.blocks.0.cross_attn.q_proj.weight" in flash_results
    torch.testing.assert_close(flash_results, sdpa_results, atol=1e-5, rtol=1e-4)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of all three ops."""
    q, k, v, key_mask = make_inputs(1, 2, 9, 11, 16, mask="pad")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(flash_mod._flash_fwd, (q, k, v, key_mask, True, 0.25))
    with torch.no_grad():
        torch.library.opcheck(int8_mod._int8_fwd, (q, k, v, key_mask, False, 0.25))
        torch.library.opcheck(lsh_mod._lsh_fwd, (q, k, v, key_mask, False, 0.25, 2, 0))


def test_torch_compile_traces_flash_in_one_graph():
    q, k, v, key_mask = make_inputs(1, 2, 9, 11, 16, mask="pad")
    d_out = torch.randn_like(q)

    def fn(a, b, c):
        return attend(a.sin(), b, c, key_mask=key_mask, causal=True, backend="flash").cos()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, expected in zip(forward_backward(compiled, q, k, v, d_out), forward_backward(fn, q, k, v, d_out)):
        torch.testing.assert_close(got, expected)


class _Attend(torch.nn.Module):
    def forward(self, q, k, v, key_mask):
        return attend(q, k, v, key_mask=key_mask, backend="flash-lsh")


def test_export_traces_exact_attention_whatever_the_backend():
    q, k, v, key_mask = make_inputs(1, 2, 9, 11, 16, mask="pad")
    program = torch.export.export(_Attend(), (q, k, v, key_mask))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("flashlite" in target for target in targets) and any("attention" in t for t in targets)
    torch.testing.assert_close(program.module()(q, k, v, key_mask), attend(q, k, v, key_mask=key_mask, backend="sdpa"))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_holds_exact_attention(dynamo):
    onnx = pytest.importorskip("onnx")
    q, k, v, key_mask = make_inputs(1, 2, 9, 11, 16, mask="pad")
    if dynamo:
        model = torch.onnx.export(_Attend().eval(), (q, k, v, key_mask), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(_Attend().eval(), (q, k, v, key_mask), buffer, dynamo=False)
        model = onnx.load_from_string(buffer.getvalue())
    ops = {(node.domain, node.op_type) for node in model.graph.node}
    assert ("", "Softmax") in ops and all(domain in ("", "ai.onnx") for domain, _ in ops)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tq, tk, d, causal, mask",
    [
        (300, 300, 128, False, "pad"),
        (300, 300, 64, True, "holes"),
        (200, 517, 64, True, "holes"),
        (517, 200, 32, True, "pad"),
    ],
)
def test_flash_on_gpu_tiles_within_twice_torch(tq, tk, d, causal, mask, dtype):
    """The GPU's large tiles, several per sequence, in both half-precision types."""
    assert_within_twice_torch(dtype, 2, 4, tq, tk, d, causal, mask)


@gpu
def test_auto_picks_flash_on_cuda_half_precision():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    assert choose_backend(q)[0] == "flash"
    assert choose_backend(q.float())[0] == "sdpa"
