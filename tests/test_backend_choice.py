"""A Triton kernel asked for by name that cannot run as asked says so: a warning naming the reason, once."""

from __future__ import annotations

import warnings

import pytest
import torch

from model import attention
from model.attention import attend, choose_backend
from model.config import Config
from model.transformer import Transformer

FALLBACK = "attention backend 'flash' falls back to"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(attention, "_WARNED", set())  # each test sees its first fallback warned
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels could run here: only the reason under test stops them


def encoder(**overrides) -> Transformer:
    config = Config.preset("tiny", decoder_layers=0, heads=("mlm",), **overrides)
    return Transformer(config, attention_backend="flash")


def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 8))


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if FALLBACK in str(w.message)]


def test_a_training_model_with_attention_dropout_warns_once_naming_the_reason():
    model = encoder(attention_dropout=0.1).train()  # a Hugging Face BERT's setting
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(ids())
        model(ids())  # two layers, two calls: still one warning
    assert fallback_warnings(record) == [
        f"{FALLBACK} sdpa: dropout=0.1: the Triton kernels have no dropout (warned once per backend and reason)"
    ]


def test_eval_mode_does_not_fall_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setitem(attention.BACKENDS, "flash", lambda *a, **k: calls.append(1) or attention._sdpa(*a, **k))
    model = encoder(attention_dropout=0.1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids())
    assert len(calls) == 2  # both layers ran the kernel


def test_the_presets_train_with_the_flash_kernel(monkeypatch):
    assert Config.preset("tiny").attention_dropout == Config.preset("full").attention_dropout == 0.0
    assert Config.preset("tiny").dropout == 0.1  # residual dropout is not attention's
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setitem(attention.BACKENDS, "flash", lambda *a, **k: calls.append(1) or attention._sdpa(*a, **k))
    model = encoder().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids())
    assert len(calls) == 2


def test_output_attentions_warns_that_the_reference_math_runs():
    model = encoder().eval()
    with pytest.warns(UserWarning, match="falls back to reference: output_attentions=True") as record:
        model(ids(), output_attentions=True)
        model(ids(), output_attentions=True)
    assert len(fallback_warnings(record)) == 1


def test_attend_warns_per_backend_and_reason_and_never_for_auto_or_sdpa():
    q = torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for backend in ("auto", "sdpa", "reference"):
            attend(q, q, q, dropout=0.1, backend=backend)
        assert not record
        attend(q, q, q, dropout=0.1, backend="flash")
        attend(q, q, q, dropout=0.1, backend="flash")
        attend(q, q, q, dropout=0.2, backend="flash")  # another reason
        attend(q, q, q, dropout=0.1, backend="flash-lsh")  # another backend
    messages = [str(w.message) for w in record]
    assert len(messages) == 3, messages
    assert "dropout=0.1" in messages[0] and "dropout=0.2" in messages[1] and "'flash-lsh'" in messages[2]
    assert choose_backend(q, "flash", dropout=0.1) == ("sdpa", "dropout=0.1: the Triton kernels have no dropout")
