"""SmoothQuant factors (compress/smoothing.py) against a float64 formula from hooked inputs, real tokens only."""

import pytest
import torch
from test_quantize import batches, tiny
from torch import nn

from compress.smoothing import smoothing_factors


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_factors_are_the_smoothquant_formula_over_real_tokens(alpha):
    model = tiny().eval()
    data = batches(model.config, n=3)
    for batch in data:
        batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
        batch["decoder_attention_mask"][1, -2:] = 0  # decoder padding, on its own mask
    names = [
        "encoder.blocks.0.self_attn.q_proj",
        "encoder.blocks.1.ffn.down",
        "decoder.blocks.0.self_attn.v_proj",
        "decoder.blocks.1.cross_attn.k_proj",
    ]  # the cross-attention keys read the encoder's (masked) states
    seen = {name: [] for name in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for hook in hooks:
        hook.remove()
    factors = smoothing_factors(model, names, data, alpha)
    for name in names:
        key = (
            "decoder_attention_mask"
            if name.startswith("decoder.") and "cross_attn.k_proj" not in name
            else "attention_mask"
        )
        real = torch.cat([x[batch[key].bool()] for x, batch in zip(seen[name], data)]).double()
        w = model.get_submodule(name).weight.detach().double()
        expected = real.abs().amax(0) ** alpha / w.abs().amax(0) ** (1 - alpha)
        torch.testing.assert_close(factors[name].double(), expected, rtol=1e-5, atol=0)


def test_dead_channels_keep_factor_one_and_the_model_is_left_as_it_was():
    model = tiny().eval()
    name = "encoder.blocks.0.ffn.up"
    with torch.no_grad():
        model.get_submodule(name).weight[:, 3] = 0.0  # a weight column of zeros: nothing to move into it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = smoothing_factors(model, [name], batches(model.config), 0.5)
    assert factors[name][3] == 1.0 and bool((factors[name] > 0).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, nn.Module))  # hooks removed
