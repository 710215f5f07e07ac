"""Tests for model/io.py: bit-identical save/load, atomic writes, and refusal of pickles and malformed files."""

import hashlib
import json
import os
import pathlib
import pickle
import tempfile

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

import model.io as io
from model import Config, Transformer, load, save

CONFIGS = {
    "tiny": Config.preset("tiny"),
    "factorized": Config.preset("tiny", embed_dim=16),
    "shared": Config.preset("tiny", encoder_share=(0, 0), decoder_share=(0, 0)),
    "post_ln": Config.preset("tiny", norm="post", activation="gelu_tanh"),
    "imported": Config.preset("tiny", decoder_layers=0, norm="post", heads=("classify",), n_labels=3),
}


def _model(config: Config) -> Transformer:
    """A model whose every weight is random, so that a weight load() forgot would change outputs."""
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch(config: Config) -> dict:
    ids = torch.randint(1, config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # the second row is padded
    batch = dict(
        input_ids=ids.masked_fill(mask == 0, config.pad_id), attention_mask=mask, token_type_ids=torch.zeros_like(ids)
    )
    batch["token_type_ids"][:, 3:] = 1
    if config.decoder:
        batch["decoder_input_ids"] = torch.randint(1, config.vocab_size, (2, 5))
    return batch


def _raw(header, data: bytes = b"", length: int | None = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte little-endian header length, header (JSON of `header`, or raw bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _write(folder: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    (folder / name).write_bytes(data)
    return folder / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved tiny model, copied fresh into each test that corrupts it."""
    folder = tmp_path_factory.mktemp("saved")
    save(_model(CONFIGS["tiny"]), folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    for p in saved.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    return tmp_path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_of_save_gives_bit_identical_outputs(name, tmp_path):
    config = CONFIGS[name]
    model, batch = _model(config), _batch(config)
    assert save(model, tmp_path / "a" / "b") == tmp_path / "a" / "b"  # parents are created
    loaded = load(tmp_path / "a" / "b")
    assert loaded.config == config and not loaded.training and loaded.tokenizer is None
    with torch.no_grad():
        want, got = model(**batch), loaded(**batch)
    assert torch.equal(want.hidden_states, got.hidden_states)
    assert set(want.head_logits) == set(got.head_logits) == set(config.heads)
    for head in config.heads:
        assert torch.equal(want.head_logits[head], got.head_logits[head]), head
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_config_round_trips_through_config_json(tmp_path):
    config = Config.preset("tiny", embed_dim=16, encoder_share=(0, 0), norm="post", dropout=0.0)
    save(_model(config), tmp_path)
    assert Config.from_json((tmp_path / "config.json").read_text()) == config


def test_shared_weights_are_stored_once(tmp_path):
    shared, unshared = _model(CONFIGS["shared"]), _model(Config.preset("tiny", decoder_share=(0, 0)))
    save(shared, tmp_path / "shared")
    save(unshared, tmp_path / "unshared")
    names = set(safetensors.torch.load_file(tmp_path / "shared" / "model.safetensors"))
    assert any(n.startswith("encoder.blocks.0.") for n in names)
    assert not any(n.startswith("encoder.blocks.1.") for n in names)
    block_bytes = sum(p.numel() * p.element_size() for p in unshared.encoder.blocks[1].parameters())
    saved_bytes = os.path.getsize(tmp_path / "unshared" / "model.safetensors") - os.path.getsize(
        tmp_path / "shared" / "model.safetensors"
    )
    assert block_bytes <= saved_bytes <= block_bytes + 4096  # the rest is the block's header entries


def test_tokenizer_round_trips_and_a_stale_one_is_removed(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = _model(CONFIGS["tiny"])
    model.tokenizer = tokenizer
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert loaded.tokenizer.encode("hello big world").ids == [2, 1, 3]
    assert loaded.tokenizer.to_str() == tokenizer.to_str()
    model.tokenizer = None
    save(model, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists() and load(tmp_path).tokenizer is None
    model.tokenizer = "not a tokenizer"
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        save(model, tmp_path / "other")


def test_manifest_records_files_versions_and_caller_keys(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (replaced.append(pathlib.Path(dst).name), real_replace(src, dst))
    )
    save(_model(CONFIGS["tiny"]), tmp_path, manifest={"stages": [{"name": "Share", "params": 10}]})
    assert replaced[-1] == "manifest.json"  # written last: it marks a complete save
    manifest = io.read_manifest(tmp_path)
    assert manifest["format"] == "flashlite" and manifest["format_version"] == 1
    assert manifest["torch_version"] == torch.__version__ and manifest["created"].endswith("+00:00")
    assert manifest["stages"] == [{"name": "Share", "params": 10}]
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    for name, entry in manifest["files"].items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with pytest.raises(ValueError, match="files"):
        save(_model(CONFIGS["tiny"]), tmp_path / "x", manifest={"files": {}})
    with pytest.raises(TypeError, match="JSON"):
        save(_model(CONFIGS["tiny"]), tmp_path / "y", manifest={"stages": object()})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_files(failing, folder, monkeypatch):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        save(_model(CONFIGS["tiny"]), folder)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(folder / "config.json", "{}")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load(folder) is not None


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    target = tmp_path / "f.txt"
    io.atomic_write(target, b"one")
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    target.chmod(0o640)
    io.atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and oct(target.stat().st_mode & 0o777) == oct(0o640)


class _Evil:
    """Unpickling this touches a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path(self.marker).touch, ()


def test_a_pickle_is_refused_without_running_it(folder, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    for protocol in (2, 4, 5):
        _write(folder, "model.safetensors", pickle.dumps(_Evil(marker), protocol=protocol))
        with pytest.raises(ValueError, match="is a pickle"):
            load(folder)
        with pytest.raises(ValueError, match="is a pickle"):
            io.load_tensors(folder / "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_a_torch_save_file_is_refused(zipped, folder):
    torch.save({"w": torch.zeros(3)}, folder / "model.safetensors", _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match="zip archive" if zipped else "is a pickle"):
        load(folder)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_suffixes_are_refused_by_name(suffix, tmp_path):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(safetensors.torch.save({"w": torch.zeros(2)}))  # even valid content is refused
    with pytest.raises(ValueError, match="pickle-based"):
        io.load_tensors(path)
    with pytest.raises(ValueError, match="pickle-based"):
        load(path)
    with pytest.raises(ValueError, match="pickle-based"):
        io.save_tensors(path, {"w": torch.zeros(2)})


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "data, message",
    [
        (_raw({"w": {**F32x2, "data_offsets": [0, 16]}}, bytes(8)), "ends at byte 16"),
        (_raw({"w": F32x2}, bytes(8), length=10_000), "runs past the end"),
        (_raw({"w": F32x2}, bytes(8), length=2**40), "outside 1.."),
        (_raw({}, length=0), "outside 1.."),
        (_raw({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
        (_raw({"w": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)), "unused bytes"),
        (_raw({"w": F32x2}, bytes(12)), "data section has 12 bytes"),
        (_raw({"w": {**F32x2, "dtype": "X9"}}, bytes(8)), "unknown dtype"),
        (_raw({"w": {**F32x2, "shape": [-2]}}, bytes(8)), "non-negative"),
        (_raw({"w": {**F32x2, "shape": [3]}}, bytes(8)), "do not hold shape"),
        (_raw({"w": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)), "begin <= end"),
        (_raw({"__metadata__": {"k": 1}, "w": F32x2}, bytes(8)), "__metadata__"),
        (_raw([1, 2]), "JSON object"),
        (_raw(b"\xff\xfe{}{}{}"), "not UTF-8 JSON"),
        (_raw(b'{"a": {}, "a": {}}'), "duplicate keys"),
        (b"\x01\x00", "too short"),
    ],
)
def test_malformed_safetensors_are_refused(data, message, folder):
    _write(folder, "model.safetensors", data)
    with pytest.raises(ValueError, match=message) as err:
        load(folder)
    assert "model.safetensors" in str(err.value)


def test_a_truncated_weights_file_is_refused(folder):
    data = (folder / "model.safetensors").read_bytes()
    _write(folder, "model.safetensors", data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load(folder)


def test_weights_that_do_not_match_config_are_listed(folder):
    config = json.loads((folder / "config.json").read_text())
    config["heads"] = ["mlm", "lm", "qa"]  # drops pair (and the pooler), adds qa
    config["vocab_size"] = 500
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load(folder)
    text = str(err.value)
    assert "config.json" in text and "embeddings.word.weight is [512, 64]" in text
    assert "missing 2: heads.qa.bias, heads.qa.weight" in text
    assert "unexpected 4: heads.pair.bias, heads.pair.weight, pooler.dense.bias, pooler.dense.weight" in text
    config["vocab_size"] = 512
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").unlink()  # the edit is intended
    partial = load(folder, strict=False)  # names that exist in both are loaded; the rest stays initialized
    saved = safetensors.torch.load_file(folder / "model.safetensors")
    assert torch.equal(partial.embeddings.word.weight, saved["embeddings.word.weight"])


def test_invalid_config_json_names_the_file_and_field(folder):
    (folder / "config.json").write_text(json.dumps({"vocab_size": 512, "dim": "wide", "encoder": []}))
    with pytest.raises(TypeError, match=r"config\.json: dim must be an int"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: config is not valid JSON"):
        load(folder)


def test_weights_changed_since_save_are_refused_unless_the_manifest_is_gone(folder):
    tensors = io.load_tensors(folder / "model.safetensors")
    tensors["heads.mlm.bias"][0] += 1.0
    io.save_tensors(folder / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="file changed since it was saved"):
        load(folder)
    (folder / "manifest.json").unlink()  # a hand-made folder: allowed
    assert load(folder).heads["mlm"].bias[0] == tensors["heads.mlm.bias"][0]


def test_missing_files_raise_file_not_found(folder, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(folder / "nope")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing.*pytorch_model\.bin"):
        load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load(folder)


def test_save_tensors_round_trips_with_metadata_and_refuses_aliases(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    tensors = {"w": torch.randn(3, 4).T, "step": torch.tensor(7), "half": torch.randn(2, dtype=torch.bfloat16)}
    io.save_tensors(path, tensors, metadata={"epoch": "2"})
    loaded = io.load_tensors(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and io.read_metadata(path) == {"epoch": "2"}
    base = torch.randn(4)
    for aliased in ({"a": base, "b": base}, {"a": base[:2], "b": base[2:]}):
        with pytest.raises(ValueError, match="share memory"):
            io.save_tensors(tmp_path / "alias.safetensors", aliased)
    with pytest.raises(TypeError, match="str -> str"):
        io.save_tensors(path, tensors, metadata={"epoch": 2})
    assert not (tmp_path / "alias.safetensors").exists()


def test_save_refuses_a_model_whose_state_dict_aliases(tmp_path):
    model = Transformer(Config.preset("tiny", heads=("mlm", "pair", "qa")))
    model.heads["qa"].weight = model.heads["pair"].weight  # both (2, dim): a hand-made tie
    with pytest.raises(ValueError, match=r"heads\.pair\.weight and heads\.qa\.weight"):
        save(model, tmp_path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]), inner)
    ),
    max_leaves=8,
)
_METADATA = st.dictionaries(st.text(max_size=2), st.text(max_size=2))
# Mostly well-formed entries with small numbers, so that examples reach the offset and size checks.
_ENTRY = _JSON | st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I64", "BOOL", "U8", "Q7"]),
        "shape": st.lists(st.integers(-1, 4), max_size=2),
        "data_offsets": st.lists(st.integers(-1, 24), min_size=1, max_size=3),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=96),
    header=st.dictionaries(st.sampled_from(["w", "b", "__metadata__"]), _ENTRY | _METADATA, max_size=3),
    data=st.binary(max_size=48),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**33]),
)
def test_arbitrary_bytes_only_ever_raise_value_error(raw, header, data, length_delta):
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        (folder / "config.json").write_text(CONFIGS["imported"].to_json())
        text = json.dumps(header).encode()
        for blob in (raw, (len(text) + length_delta).to_bytes(8, "little") + text + data):
            (folder / "model.safetensors").write_bytes(blob)
            with pytest.raises(ValueError):  # never matches the config's tensors
                load(folder)
            try:
                tensors = io.load_tensors(folder / "model.safetensors")
            except ValueError:
                continue
            assert isinstance(tensors, dict)  # a blob that happens to be valid safetensors may load


def test_half_precision_models_round_trip(tmp_path):
    model = Transformer(Config.preset("tiny")).eval().half()
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_changed_config_is_caught_by_the_manifest(tmp_path):
    save(Transformer(Config.preset("tiny")), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dropout"] = 0.0  # same shapes: only the manifest can tell
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: file changed since it was saved"):
        load(tmp_path)
