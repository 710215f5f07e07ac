"""Config validation: presets, JSON round trip, and the named errors for invalid values."""

import pytest

from model.config import Config, LayerShape
from model.transformer import Transformer


def test_presets_build_and_round_trip_through_json():
    for name in ("full", "tiny"):
        config = Config.preset(name)
        assert Config.from_json(config.to_json()) == config
        assert config.decoder_layers >= 1 and config.encoder_layers >= 2


def test_full_preset_size_is_in_the_planned_range():
    params = sum(p.numel() for p in Transformer(Config.preset("full")).parameters())
    assert 20e6 <= params <= 40e6


def test_per_layer_shapes_and_sharing_survive_json():
    config = Config(
        vocab_size=100,
        dim=32,
        embed_dim=16,
        embed_full_rows=3,
        encoder=[
            {"n_heads": 2, "head_dim": 16, "ffn_dim": 64},
            {"n_heads": 2, "head_dim": 16, "ffn_dim": 64},
            {"n_heads": 1, "head_dim": 8, "ffn_dim": 24},
        ],
        encoder_share=[0, 0, 1],
        norm="post",
    )
    assert config.encoder[2] == LayerShape(1, 8, 24)
    assert config.encoder_share == (0, 0, 1)
    assert Config.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=0), "dim"),
        (dict(embed_dim=128), "embed_dim"),
        (dict(dropout=-0.1), "dropout"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(norm="middle"), "norm"),
        (dict(activation="tanh"), "activation"),
        (dict(pad_id=512), "pad_id"),
        (dict(heads=("mlm", "pooler")), "heads"),
        (dict(heads=("classify",)), "n_labels"),
        (dict(encoder_share=(1, 0)), "encoder_share"),
        (dict(encoder_share=(0,)), "encoder_share"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(embed_full_rows=4), "embed_full_rows=4 needs factorized word embeddings"),
        (dict(embed_dim=16, embed_full_rows=-1), "embed_full_rows must be >= 0"),
        (dict(embed_dim=16, embed_full_rows=10**6), "embed_full_rows must be <= vocab_size"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        Config.preset("tiny", **kwargs)


def test_dim_not_divisible_by_heads_is_refused():
    with pytest.raises(ValueError, match=r"dim \(64\) must be divisible by n_heads \(5\)"):
        Config.preset("tiny", n_heads=5)


def test_zero_heads_is_refused():
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        LayerShape(n_heads=0, head_dim=8, ffn_dim=8)


def test_shared_layers_must_have_equal_shapes():
    with pytest.raises(ValueError, match="share block 0 but have different shapes"):
        Config(vocab_size=10, dim=8, encoder=[LayerShape(2, 4, 8), LayerShape(1, 4, 8)], encoder_share=[0, 0])


def test_lm_head_needs_a_decoder():
    with pytest.raises(ValueError, match="no decoder layers"):
        Config.preset("tiny", decoder_layers=0)


def test_unknown_json_keys_are_named():
    data = Config.preset("tiny").to_dict()
    data["n_layer"] = 3
    with pytest.raises(ValueError, match="n_layer"):
        Config.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        Config.from_json("{")


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        Config.preset("tiny", vocab_size="512")
    with pytest.raises(TypeError, match="dim must be an int"):
        Config.preset("tiny", dim=True)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: full, tiny"):
        Config.preset("huge")


def test_replace_keeps_filled_in_defaults_as_defaults():
    tiny = Config.preset("tiny")
    wider = tiny.replace(dim=128, encoder=tiny.encoder[:1])
    assert wider.embed_dim == 128 and wider.encoder_share == (0,)
    factorized = Config.preset("tiny", embed_dim=32, encoder_share=(0, 0))
    changed = factorized.replace(dim=96)
    assert changed.embed_dim == 32 and changed.encoder_share == (0, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(positions="alibi"),
            "positions must be one of absolute, padding_offset, rotary, sinusoidal, relative; got 'alibi'",
        ),
        (dict(positions=None), "positions must be one of"),
        (dict(positions="rotary", n_heads=64), r"head_dim must be even; got \[1\]"),
        (dict(pooler_activation="softmax"), "pooler_activation must be one of tanh, gelu, gelu_tanh, relu, silu"),
    ],
)
def test_position_scheme_and_pooler_activation_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config.preset("tiny", **kwargs)


def test_fields_at_their_later_defaults_are_not_written():
    # Models that do not use the position scheme or the pooler activation save the same config.json as before.
    data = Config.preset("tiny").to_dict()
    assert "positions" not in data and "pooler_activation" not in data
    roberta = Config.preset("tiny", positions="padding_offset", pad_id=1, pooler_activation="relu")
    assert roberta.to_dict()["positions"] == "padding_offset" and roberta.to_dict()["pooler_activation"] == "relu"
    assert Config.from_json(roberta.to_json()) == roberta
    assert (roberta.position_rows, Config.preset("tiny").position_rows) == (128 + 2, 128)
    assert Config.preset("tiny", positions="rotary").position_rows == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(embed_scale=0.0), ValueError, "embed_scale must be a positive finite number"),
        (dict(lm_head_scale=True), ValueError, "lm_head_scale must be a positive finite number"),
        (dict(embed_norm=1), TypeError, "embed_norm must be true or false"),
        (dict(decoder_embeddings="own"), ValueError, "decoder_embeddings must be one of shared, own_positions"),
        (dict(decoder_embeddings="own_positions", decoder_layers=0, heads=()), ValueError, "needs decoder layers"),
        (dict(lm_head_tied=False, heads=("mlm",)), ValueError, "lm_head_tied=False describes the 'lm' head"),
        (dict(norm_type="batch"), ValueError, "norm_type must be one of layer, rms"),
        (dict(relative_buckets=7), ValueError, r"relative_buckets \(7\) must be even"),
        (dict(relative_max_distance=16), ValueError, r"relative_max_distance \(16\) over half of it"),
        (dict(positions="sinusoidal", dim=63, n_heads=1), ValueError, "dim must be even; got 63"),
        (dict(eos_id=512), ValueError, r"eos_id must be < vocab_size \(512\)"),
        (dict(decoder_start_id=True), TypeError, "decoder_start_id must be an int"),
    ],
)
def test_seq2seq_facts_are_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        Config.preset("tiny", **kwargs)


def test_seq2seq_facts_at_their_defaults_are_not_written():
    assert set(Config.preset("tiny").to_dict()) == set(Config.preset("full").to_dict())
    t5 = Config.preset("tiny", positions="relative", norm_type="rms", linear_bias=False, ffn_gated=True)
    t5 = t5.replace(lm_head_tied=False, lm_head_scale=0.125, embed_norm=False, relative_buckets=8)
    written = t5.to_dict()
    assert {"norm_type", "linear_bias", "ffn_gated", "lm_head_tied", "lm_head_scale", "relative_buckets"} <= set(
        written
    )
    assert not {"embed_scale", "decoder_embeddings", "relative_max_distance"} & set(written)
    assert Config.from_json(t5.to_json()) == t5
    default = Config.preset("tiny").to_dict()
    assert not {"embed_scale", "embed_norm", "norm_type", "linear_bias", "ffn_gated", "lm_head_scale", "eos_id"} & set(
        default
    )
