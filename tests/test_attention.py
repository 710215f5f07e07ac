"""attend(): every backend against a float64 reference written independently here, masks, causality, errors."""

import math

import pytest
import torch

from model.attention import attend, choose_backend


def naive_attention(q, k, v, key_mask=None, causal=False):
    """Loop-level float64 attention: the independent reference."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(tq):
            allowed = [
                j for j in range(tk) if (key_mask is None or key_mask[bi, j]) and (not causal or j <= i + tk - tq)
            ]
            scores = torch.stack([(q[bi, :, i] * k[bi, :, j]).sum(-1) / math.sqrt(d) for j in allowed], -1)
            weights = torch.softmax(scores, -1)
            out[bi, :, i] = (weights[..., None] * v[bi, :, allowed]).sum(1)
    return out


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq, tk", [(7, 7), (5, 9)])
def test_backends_match_naive_reference(backend, causal, tq, tk):
    q, k, v = torch.randn(2, 3, tq, 8), torch.randn(2, 3, tk, 8), torch.randn(2, 3, tk, 8)
    key_mask = torch.ones(2, tk, dtype=torch.bool)
    key_mask[1, tk - 3 :] = False
    if causal:  # every query must still see one real key: mask a middle key instead of the tail
        key_mask[1, tk - 3 :] = True
        key_mask[1, 2] = False
    expected = naive_attention(q, k, v, key_mask, causal)
    got = attend(q, k, v, key_mask=key_mask, causal=causal, backend=backend)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_float64_reference_is_exact_to_double_precision():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    got = attend(q, k, v, backend="reference")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_attention(q, k, v), atol=1e-12, rtol=1e-12)


def test_masked_keys_have_no_influence():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.tensor([[True, True, True, True, False, False]])
    base = attend(q, k, v, key_mask=mask, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[..., 4:, :] = 1e3
    v2[..., 4:, :] = -1e3
    torch.testing.assert_close(attend(q, k2, v2, key_mask=mask, backend="sdpa"), base)


def test_auto_says_which_backend_and_why():
    name, reason = choose_backend(torch.randn(1, 1, 1, 8))
    assert name == "sdpa" and reason


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), {}, ValueError, "q must be"),
        ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)), {}, ValueError, "must agree"),
        ((torch.randn(1, 2, 4, 8),) * 3, {"key_mask": torch.ones(1, 4)}, TypeError, "key_mask must be a bool"),
        (
            (torch.randn(1, 2, 4, 8),) * 3,
            {"key_mask": torch.ones(1, 5, dtype=torch.bool)},
            ValueError,
            r"key_mask must be \(B, Tk\)",
        ),
        ((torch.randn(1, 2, 4, 8),) * 3, {"backend": "flash9"}, ValueError, "backend must be"),
        ((torch.ones(1, 2, 4, 8, dtype=torch.long),) * 3, {}, TypeError, "floating-point"),
    ],
)
def test_bad_inputs_give_named_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        attend(*args, **kwargs)
