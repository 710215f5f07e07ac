"""Hostile and malformed inputs get the project's clear errors: fuzzed settings, recipes and batches; booby-trapped files.

Settings: any value may be given for any field; only ValueError/TypeError may escape, a value
that does not have its field's annotated type (or a non-finite float) must be refused, and an
error caused by one corrupted field names that field. Files: pickles where checkpoints are
expected, lying safetensors headers on the resume and from_hf paths, ONNX external data that
points outside its folder. Batches: bad ids, lengths, masks and dtypes are refused before any
module runs, by the model, the training loop, Distill and OrtModel alike.
"""

import dataclasses
import itertools
import json
import math
import pickle
import shutil
import types
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interrupt import Interrupt, stop_at
from onnx import TensorProto, helper, numpy_helper

from compress import Context
from compress.distill import Distill
from compress.prune import Prune
from compress.quantize import Quantize
from compress.recipe import DataSpec, ExportSpec, parse_recipe
from compress.share import Share
from model import Config, Transformer, from_hf, load, save
from model.io import load_tensors, save_tensors
from model.onnx.runtime import OrtModel, graph_metadata, read_onnx
from model.training.loop import TrainConfig, train

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(FUZZ, max_examples=30)
PASSES = {"share": Share, "prune": Prune, "distill": Distill, "quantize": Quantize}
CHOICES = [
    "post",
    "pre",
    "gelu",
    "relu",
    "mlm",
    "lm",
    "pair",
    "classify",
    "mean",
    "closest",
    "magnitude",
    "taylor",
    "int8",
    "int4",
    "int8-dynamic",
    "qat-int8",
    "int8-static",
]


# ---------------------------------------------------------------- settings and recipes


def conforms(value, hint) -> bool:
    """Whether `value` has the annotated type: bool is no number, a list stands for a tuple, floats are finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value))
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    return True  # a class (LayerShape, QuantizedLayer): its own checks decide


def hints(cls) -> dict:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


# Values one slip away from valid ones come first: 32.0 for 32, "1" for 1, True for 1, inf, [0] for a list of shapes.
SLIPS = [
    0,
    1,
    2,
    8,
    32,
    128,
    -1,
    1.0,
    32.0,
    0.5,
    "1",
    "0.5",
    "",
    math.inf,
    -math.inf,
    math.nan,
    True,
    False,
    None,
    [],
    {},
    [0],
    [1, 1],
    [0.5],
    ["mlm"],
]
SCALARS = (
    st.sampled_from(SLIPS)
    | st.integers(-3, 600)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(CHOICES)
)
SHAPE_DICTS = st.dictionaries(
    st.sampled_from(["n_heads", "head_dim", "ffn_dim", "bits", "name", "mode", 0]), SCALARS, max_size=4
)
JUNK = st.recursive(
    SCALARS | SHAPE_DICTS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.integers(-1, 2), inner, max_size=3)
    ),
    max_leaves=6,
)


def expect_clear(build, field: str | None, value=None, hint=None, also: str = ""):
    """Call build(); only ValueError/TypeError may escape, naming `field` (and `also`); a non-conforming value must fail."""
    try:
        result = build()
    except (ValueError, TypeError) as err:
        if field is not None:
            assert field in str(err) and also in str(err), f"the error does not name {field!r} {also!r}: {err}"
        return None
    assert hint is None or conforms(value, hint), f"accepted, but not a {hint}"
    return result


SMALLEST = {"vocab_size": 512, "dim": 64, "encoder": [{"n_heads": 4, "head_dim": 16, "ffn_dim": 8}]}


@FUZZ
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Config)]), JUNK))
def test_config_with_random_values_raises_only_clear_errors(values):
    config = expect_clear(lambda: Config(**{**SMALLEST, **values}), None)
    if config is not None:
        assert Config.from_json(config.to_json()) == config


BASE_CONFIG = Config.preset("tiny").to_dict()
CONFIG_FIELDS = [*BASE_CONFIG, *(f"encoder.{key}" for key in ("n_heads", "head_dim", "ffn_dim"))]


def every_slip_then_junk(fields: list, check, junk=JUNK, fuzz=FUZZ) -> None:
    """check(field, value) for every field with every slip (all failures listed at once), then for random junk."""
    failures = []
    for field, value in itertools.product(fields, SLIPS):
        try:
            check(field, value)
        except Exception as err:
            failures.append(f"{field}={value!r}: {type(err).__name__}: {str(err).splitlines()[0]}")
    assert not failures, f"{len(failures)} slips got through:\n" + "\n".join(failures[:40])

    @fuzz
    @given(st.sampled_from(fields), junk)
    def fuzzed(field, value):
        check(field, value)

    fuzzed()


def test_one_corrupted_config_field_is_named():
    def check(field, value):
        data = json.loads(json.dumps(BASE_CONFIG))
        if "." in field:  # inside a layer shape: the message names the stack and the key
            stack, key = field.split(".")
            data[stack][1][key] = value
            expect_clear(lambda: Config(**data), stack, also=key)
        else:
            data[field] = value
            expect_clear(lambda: Config(**data), field, value, hints(Config)[field])

    every_slip_then_junk(CONFIG_FIELDS, check)


@pytest.mark.parametrize("cls", list(PASSES.values()), ids=list(PASSES))
def test_pass_settings_with_random_values_raise_only_clear_errors(cls):
    fields = hints(cls)

    @FUZZ
    @given(st.dictionaries(st.sampled_from(list(fields)), JUNK))
    def check(values):
        made = expect_clear(lambda: cls(**values), None)
        for name, value in values.items():
            assert made is None or conforms(getattr(made, name), fields[name]), (
                f"{cls.__name__}({name}={value!r}) accepted"
            )

    check()


@pytest.mark.parametrize("cls", list(PASSES.values()), ids=list(PASSES))
def test_one_corrupted_pass_setting_is_named(cls):
    fields = hints(cls)
    every_slip_then_junk(
        list(fields), lambda name, value: expect_clear(lambda: cls(**{name: value}), name, value, fields[name])
    )


# YAML keys may be any scalar, so recipes can mix str, int and null keys.
KEYS = (
    st.sampled_from(["description", "passes", "data", "export", *PASSES, *CHOICES])
    | st.text(max_size=4)
    | st.integers(-1, 2)
    | st.none()
)
TREES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=10
)
SETTINGS = st.dictionaries(
    st.sampled_from(
        sorted({f.name for cls in (*PASSES.values(), DataSpec, ExportSpec) for f in dataclasses.fields(cls)})
    )
    | KEYS,
    TREES,
    max_size=3,
)
RECIPES = TREES | st.fixed_dictionaries(
    {
        "passes": st.lists(
            st.dictionaries(st.sampled_from(list(PASSES)) | KEYS, SETTINGS | TREES, min_size=1, max_size=2), max_size=3
        )
    },
    optional={"data": SETTINGS | TREES, "export": SETTINGS | TREES, "description": TREES, "extra": TREES},
)


@FUZZ
@given(RECIPES)
def test_random_recipes_raise_only_clear_errors_naming_the_recipe(data):
    recipe = expect_clear(lambda: parse_recipe(data, "recipe.yaml"), "recipe.yaml")
    if recipe is not None:  # whatever was accepted is well-typed
        for made in (*recipe.passes, recipe.data, recipe.export):
            for name, hint in hints(type(made)).items():
                assert conforms(getattr(made, name), hint), f"{made}: {name}"


BASE_RECIPE = {
    "passes": [
        {"share": {"layers_per_group": 2}},
        {"prune": {"heads": 0.5}},
        {"distill": {"steps": 10}},
        {"quantize": {"mode": "int8"}},
    ],
    "data": {"max_len": 32},
    "export": {"quantize": "int8-dynamic"},
}
SECTIONS = [(f"passes[{i}].{name}", PASSES[name]) for i, step in enumerate(BASE_RECIPE["passes"]) for name in step]
SECTIONS += [("data", DataSpec), ("export", ExportSpec)]
SLOTS = {f"{where}:{name}": cls for where, cls in SECTIONS for name in hints(cls)}


def test_one_corrupted_recipe_setting_names_its_place_and_field():
    def check(slot, value):
        (where, name), cls = slot.split(":"), SLOTS[slot]
        recipe = json.loads(json.dumps(BASE_RECIPE))
        if where.startswith("passes"):
            (settings_,) = recipe["passes"][int(where[7])].values()
            settings_[name] = value
        else:
            recipe[where][name] = value
        expect_clear(lambda: parse_recipe(recipe), name, value, hints(cls)[name], also=where)

    every_slip_then_junk(list(SLOTS), check)


# ---------------------------------------------------------------- checkpoints on the resume path

CKPT_CONFIG = Config.preset("tiny", decoder_layers=0, heads=("mlm",), n_layers=1)
CKPT_BATCH = {"input_ids": torch.arange(5, 17).view(2, 6), "mlm_labels": torch.arange(5, 17).view(2, 6)}


def ckpt_run(folder: Path) -> TrainConfig:
    return TrainConfig(steps=2, lr=1e-3, progress=False, checkpoint_dir=str(folder), checkpoint_every=1)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A checkpoint folder holding step-00000001 of a 2-step run."""
    folder = tmp_path_factory.mktemp("checkpointed")
    with pytest.raises(Interrupt):
        train(Transformer(CKPT_CONFIG), [CKPT_BATCH], ckpt_run(folder), callback=stop_at(1))
    return folder


@pytest.fixture
def ckpt(checkpointed, tmp_path):
    shutil.copytree(checkpointed, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def resume(folder: Path):
    return train(Transformer(CKPT_CONFIG), [CKPT_BATCH], ckpt_run(folder))


class _Evil:
    """Unpickling this creates the marker file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path(self.marker).touch, ()


@pytest.mark.parametrize("files", [("model.safetensors", "optimizer.safetensors"), ("optimizer.safetensors",)])
@pytest.mark.parametrize("archive", [False, True], ids=["pickle", "torch.save"])
def test_a_code_executing_pickle_in_a_checkpoint_is_refused_without_running(files, archive, ckpt, tmp_path):
    marker = tmp_path / "pwned"
    for name in files:
        path = ckpt / "step-00000001" / name
        if archive:
            torch.save(_Evil(marker), path)
        else:
            path.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(ValueError, match=files[0]):
        resume(ckpt)
    assert not marker.exists()


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + body


def corrupt(path: Path, how: str) -> str:
    """Rewrite a safetensors file the way `how` says; returns what the refusal must say."""
    header, body = header_of(path)
    spans = sorted((e["data_offsets"], name) for name, e in header.items() if name != "__metadata__")
    if how == "lying":  # the last tensor claims bytes past the end of the file
        header[spans[-1][1]]["data_offsets"][1] += 4096
        message = "ends at byte"
    elif how == "oversized":
        path.write_bytes(with_header(header, body, length=2**40))
        return "outside 1.."
    else:  # overlapping: the second tensor starts inside the first
        (first, _), (second, name) = spans[0], spans[1]
        header[name]["data_offsets"] = [first[0], first[0] + second[1] - second[0]]
        message = "overlap"
    path.write_bytes(with_header(header, body))
    return message


@pytest.mark.parametrize("how", ["lying", "oversized", "overlapping"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_malformed_checkpoint_tensors_are_refused_on_resume(how, name, ckpt):
    path = ckpt / "step-00000001" / name
    message = corrupt(path, how)
    with pytest.raises(ValueError, match=message) as err:
        resume(ckpt)
    assert name in str(err.value)


@pytest.mark.parametrize("change", ["model-shape", "optimizer-shape", "no-rng"])
def test_checkpoint_tensors_that_do_not_match_the_model_are_refused(change, ckpt):
    folder = ckpt / "step-00000001"
    weights, state = load_tensors(folder / "model.safetensors"), load_tensors(folder / "optimizer.safetensors")
    if change == "model-shape":
        weights["heads.mlm.bias"] = torch.zeros(3)
    elif change == "optimizer-shape":  # AdamW would fail inside its kernel at the first step
        state[next(k for k in state if k.endswith(".exp_avg"))] = torch.zeros(3)
    else:
        del state["rng.cpu.0"]
    save_tensors(folder / "model.safetensors", weights)
    save_tensors(folder / "optimizer.safetensors", state)
    with pytest.raises(
        ValueError, match="does not match the model" if change == "model-shape" else "optimizer.safetensors"
    ):
        resume(ckpt)


# ---------------------------------------------------------------- Hugging Face folders

BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 20,
    "type_vocab_size": 2,
}


def bert_tensors() -> dict[str, torch.Tensor]:
    h, f = BERT["hidden_size"], BERT["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (BERT["vocab_size"], h),
        "embeddings.position_embeddings.weight": (BERT["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (BERT["type_vocab_size"], h),
    }
    linears = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (f, h),
        "output.dense": (h, f),
    }
    for name, shape in linears.items():
        shapes[f"encoder.layer.0.{name}.weight"], shapes[f"encoder.layer.0.{name}.bias"] = shape, shape[:1]
    for norm in (
        "embeddings.LayerNorm",
        "encoder.layer.0.attention.output.LayerNorm",
        "encoder.layer.0.output.LayerNorm",
    ):
        shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (h,), (h,)
    return {name: torch.randn(shape) for name, shape in shapes.items()}


@pytest.fixture
def bert(tmp_path):
    """A hand-made one-layer BERT folder (config.json + model.safetensors) that from_hf imports."""
    (tmp_path / "config.json").write_text(json.dumps(BERT))
    save_tensors(tmp_path / "model.safetensors", bert_tensors())
    assert isinstance(from_hf(tmp_path), Transformer)
    return tmp_path


@pytest.mark.parametrize("how", ["lying", "oversized", "overlapping"])
def test_from_hf_refuses_malformed_weights(how, bert):
    message = corrupt(bert / "model.safetensors", how)
    with pytest.raises(ValueError, match=message):
        from_hf(bert)


def test_from_hf_refuses_a_malformed_shard_and_shards_outside_the_folder(bert):
    tensors = load_tensors(bert / "model.safetensors")
    names = sorted(tensors)
    (bert / "model.safetensors").unlink()
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_tensors(bert / shard, {k: tensors[k] for k in keys})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (bert / "model.safetensors.index.json").write_text(json.dumps(index))
    assert isinstance(from_hf(bert), Transformer)
    message = corrupt(bert / "b.safetensors", "overlapping")
    with pytest.raises(ValueError, match=f"b.safetensors.*{message}"):
        from_hf(bert)
    index["weight_map"][names[1]] = "../b.safetensors"
    (bert / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        from_hf(bert)


@pytest.mark.parametrize("archive", [False, True], ids=["pickle", "torch.save"])
def test_from_hf_refuses_a_code_executing_pytorch_model_bin(archive, bert, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    (bert / "model.safetensors").unlink()
    if archive:
        torch.save({"w": _Evil(marker)}, bert / "pytorch_model.bin")
    else:
        (bert / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        from_hf(bert)
    assert not marker.exists()


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", b"\xff\xfe"], ids=["array", "not-json", "not-utf8"])
def test_from_hf_names_an_unreadable_config_json(text, bert):
    (bert / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ValueError, match="config.json"):
        from_hf(bert)


@pytest.mark.parametrize("loader", ["load", "from_hf"])
def test_a_config_json_claiming_huge_shapes_is_refused_before_allocating(loader, bert, tmp_path):
    # 2**40 x 64 floats is 256 TiB, more than any address space: the allocation fails at once, nothing is touched.
    if loader == "load":
        folder = tmp_path / "saved"
        save(Transformer(CKPT_CONFIG), folder)
        (folder / "manifest.json").unlink()
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 2**40}))
    else:
        folder = bert
        (folder / "config.json").write_text(json.dumps({**BERT, "vocab_size": 2**40, "hidden_size": 64}))
    with pytest.raises(ValueError, match="match|shape"):
        load(folder) if loader == "load" else from_hf(folder)


# null stands for BertConfig's default, as in transformers.
HF_TYPES = {
    key: kind | None
    for key, kind in {
        "model_type": str,
        "architectures": tuple[str, ...],
        "vocab_size": int,
        "hidden_size": int,
        "num_hidden_layers": int,
        "num_attention_heads": int,
        "intermediate_size": int,
        "max_position_embeddings": int,
        "type_vocab_size": int,
        "pad_token_id": int,
        "hidden_act": str,
        "layer_norm_eps": float,
        "hidden_dropout_prob": float,
    }.items()
}
# Small sizes only: a config that builds must stay cheap to build (huge ones: the huge-shapes test above).
HF_JUNK = st.recursive(
    st.integers(-3, 48) | st.booleans() | st.none() | st.floats() | st.text(max_size=4) | st.sampled_from(CHOICES),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=1),
    max_leaves=3,
)


def test_one_corrupted_hf_config_value_gives_a_clear_error(tmp_path):
    save_tensors(tmp_path / "model.safetensors", bert_tensors())

    def check(key, value):
        (tmp_path / "config.json").write_text(json.dumps({**BERT, key: value}))
        try:
            from_hf(tmp_path)
        except (ValueError, TypeError) as err:
            # Well-typed but wrong sizes are caught by the tensor check, which names tensors instead.
            assert conforms(value, HF_TYPES[key]) or key in str(err), f"the error does not name {key!r}: {err}"

    every_slip_then_junk(sorted(HF_TYPES), check, HF_JUNK, SLOW_FUZZ)


# ---------------------------------------------------------------- ONNX external data


def tagged(model: onnx.ModelProto, config: Config, graph: str) -> onnx.ModelProto:
    """`model` with the metadata of a flashlite export (its Config and which graph it is)."""
    for key, value in graph_metadata(config, graph).items():
        model.metadata_props.add(key=key, value=value)
    return model


def onnx_file(path: Path, kind: str, location: str, offset: int = 0) -> Path:
    """A flashlite-tagged graph whose tensor "w" (`kind`: an initializer, a Constant's value, a sparse initializer) is in `location`."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", "64")):
        w.external_data.add(key=key, value=value)
    graph = {"initializer": [], "sparse_initializer": [], "nodes": [helper.make_node("Identity", ["w"], ["y"])]}
    if kind == "initializer":
        graph["initializer"].append(w)
    elif kind == "constant":
        graph["nodes"] = [helper.make_node("Constant", [], ["y"], value=w)]
    else:
        indices = numpy_helper.from_array(np.arange(16, dtype=np.int64), "w_indices")
        graph["sparse_initializer"].append(helper.make_sparse_tensor(w, indices, [16]))
    model = helper.make_model(
        helper.make_graph(
            graph["nodes"],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
            initializer=graph["initializer"],
            sparse_initializer=graph["sparse_initializer"],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.save_model(tagged(model, Config.preset("tiny"), "encoder"), str(path))
    return path


@pytest.fixture
def onnx_folder(tmp_path):
    """tmp/model/ with honest external data w.data, a file link.data and a folder sub/ linked to places outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    data = np.arange(16, dtype=np.float32).tobytes()
    for folder in (tmp_path, outside):
        (folder / "outside.data").write_bytes(data)
    inside = tmp_path / "model"
    inside.mkdir()
    (inside / "w.data").write_bytes(data)
    (inside / "link.data").symlink_to(tmp_path / "outside.data")
    (inside / "sub").symlink_to(outside)
    return inside


# tests/test_export.py covers initializers at "../outside.data", "/etc/passwd" and a linked file.
ESCAPES = ["../outside.data", "ABSOLUTE", "link.data", "sub/outside.data", "..\\outside.data"]
CASES = [("initializer", "sub/outside.data"), ("initializer", "..\\outside.data")]
CASES += [(kind, location) for kind in ("constant", "sparse") for location in ESCAPES]


@pytest.mark.parametrize("kind, location", CASES)
def test_onnx_external_data_outside_the_folder_is_refused(kind, location, onnx_folder):
    location = str(onnx_folder.parent / "outside.data") if location == "ABSOLUTE" else location
    path = onnx_folder / "model.onnx"
    read_onnx(onnx_file(path, kind, "w.data"))  # the honest file passes
    onnx_file(path, kind, location)
    for opener in (read_onnx, OrtModel):
        with pytest.raises(ValueError, match="outside|inside|relative|symbolic link") as err:
            opener(path)
        assert str(path) in str(err.value)


def test_onnx_external_data_past_the_end_of_its_file_is_refused(onnx_folder):
    with pytest.raises(ValueError, match="truncated"):
        OrtModel(onnx_file(onnx_folder / "model.onnx", "initializer", "w.data", offset=32))


def test_a_hostile_decoder_graph_beside_a_clean_encoder_is_refused(onnx_folder):
    encoder = onnx.load(str(onnx_file(onnx_folder / "model.onnx", "initializer", "w.data")))
    onnx.external_data_helper.load_external_data_for_model(encoder, str(onnx_folder))
    onnx.save_model(encoder, str(onnx_folder / "model.onnx"))  # weights inside the file now
    onnx_file(onnx_folder / "model.decoder.onnx", "initializer", "link.data")
    with pytest.raises(ValueError, match="model.decoder.onnx.*outside"):
        OrtModel(onnx_folder)


# ---------------------------------------------------------------- batches

SMALL = {"n_layers": 1, "max_positions": 16}
SEQ2SEQ = Config.preset("tiny", decoder_layers=1, **SMALL)
ENCODER = Config.preset("tiny", decoder_layers=0, heads=("mlm",), **SMALL)
# At most one fault per tensor, and none most of the time, so that valid and invalid batches both come up often.
ID_FAULTS = ["none"] * 24 + [
    "empty-batch",
    "empty-seq",
    "too-long",
    "1d",
    "3d",
    "negative",
    "past-vocab",
    "int16",
    "uint8",
    "float",
    "bool",
]
MASK_FAULTS = ["none"] * 10 + ["absent", "absent", "bool", "empty-row", "two", "shape", "float"]


@st.composite
def token_ids(draw, config: Config, g: torch.Generator, b: int | None = None) -> torch.Tensor:
    fault = draw(st.sampled_from(ID_FAULTS))
    b, t = b or draw(st.integers(1, 3)), draw(st.integers(1, config.max_positions))
    b = 0 if fault == "empty-batch" else b
    t = {"empty-seq": 0, "too-long": config.max_positions + 1}.get(fault, t)
    shape = {"1d": (b * t,), "3d": (b, t, 2)}.get(fault, (b, t))
    ids = torch.randint(0, config.vocab_size, shape, generator=g)
    if ids.numel() and fault in ("negative", "past-vocab"):
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = -1 if fault == "negative" else config.vocab_size
    dtypes = {"int16": torch.int16, "uint8": torch.uint8, "float": torch.float32, "bool": torch.bool}
    return ids.to(dtypes.get(fault, draw(st.sampled_from([torch.int64, torch.int32]))))


@st.composite
def masks(draw, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    fault = draw(st.sampled_from(MASK_FAULTS))
    if fault == "absent":
        return None
    shape = (*ids.shape[:-1], ids.shape[-1] + 1) if fault == "shape" and ids.dim() else ids.shape
    # Padding on the right, as tokenizers pad: each row keeps 1..t tokens unless the fault says otherwise.
    mask = (torch.arange(shape[-1]) < torch.randint(1, max(shape[-1], 1) + 1, shape[:-1] + (1,), generator=g)).long()
    if mask.dim() == 2 and mask.numel():
        mask[0] = 0 if fault == "empty-row" else mask[0]
        mask[0, 0] = 2 if fault == "two" else mask[0, 0]
    return mask.to({"bool": torch.bool, "float": torch.float32}.get(fault, torch.int64))


@st.composite
def batches(draw, config: Config) -> dict:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = draw(token_ids(config, g))
    batch = {"input_ids": ids, "attention_mask": draw(masks(ids, g))}
    if draw(st.integers(0, 3)) == 0:
        shape = draw(st.sampled_from([ids.shape, ids.shape, (1, 3)]))
        batch["token_type_ids"] = torch.randint(0, config.type_vocab_size + draw(st.integers(0, 1)), shape, generator=g)
    if config.decoder and draw(st.integers(0, 2)):
        b = len(ids) if ids.dim() and draw(st.integers(0, 3)) else None  # mostly the encoder's batch size
        decoder = draw(token_ids(config, g, b))
        batch["decoder_input_ids"], batch["decoder_attention_mask"] = decoder, draw(masks(decoder, g))
    elif config.decoder and draw(st.integers(0, 5)) == 0:
        batch["decoder_attention_mask"] = torch.ones(2, 3, dtype=torch.int64)  # a mask without its ids
    return {k: v for k, v in batch.items() if v is not None}


def problems(config: Config, batch: dict) -> list[str]:
    """The keys of `batch` that break the input contract (what Transformer.forward documents)."""
    bad = []
    for prefix in ("", "decoder_"):
        ids, mask = batch.get(f"{prefix}input_ids"), batch.get(f"{prefix}attention_mask")
        if ids is None:
            bad += [f"{prefix}attention_mask"] if mask is not None else []
        elif not (
            ids.dtype in (torch.int64, torch.int32)
            and ids.dim() == 2
            and ids.numel()
            and ids.shape[1] <= config.max_positions
            and int(ids.min()) >= 0
            and int(ids.max()) < config.vocab_size
        ):
            bad.append(f"{prefix}input_ids")
        elif mask is not None and not (
            mask.shape == ids.shape
            and not mask.is_floating_point()
            and bool(((mask == 0) | (mask == 1)).all())
            and bool(mask.sum(1).all())
        ):
            bad.append(f"{prefix}attention_mask")
        elif prefix and "input_ids" not in bad and len(ids) != len(batch["input_ids"]):
            bad.append("decoder_input_ids")  # one decoder sequence per encoder sequence
    types = batch.get("token_type_ids")
    if (
        types is not None
        and "input_ids" not in bad
        and not (
            types.shape == batch["input_ids"].shape
            and int(types.min()) >= 0
            and int(types.max()) < config.type_vocab_size
        )
    ):
        bad.append("token_type_ids")
    return bad


def modules_run(*models: torch.nn.Module) -> list[str]:
    """A list that fills with the name of every submodule (not the model itself) whose forward starts."""
    ran = []
    for model in models:
        for name, module in model.named_modules():
            if name:
                module.register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
    return ran


def expect_refused_before_running(call, bad: list[str], ran: list[str]):
    """`call()` must succeed when nothing is `bad`; else fail with ValueError/TypeError naming a bad key before any module ran."""
    if not bad:
        return call()
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert any(key in str(err.value) for key in bad), (bad, str(err.value))
    assert not ran, f"modules ran before the bad {bad} were refused: {ran[:3]}"


@FUZZ
@given(batch=batches(SEQ2SEQ))
def test_forward_refuses_bad_batches_before_any_module_runs(batch):
    model = Transformer(SEQ2SEQ).eval()
    ran = modules_run(model)
    out = expect_refused_before_running(lambda: model(**batch), problems(SEQ2SEQ, batch), ran)
    assert out is None or torch.isfinite(out.hidden_states).all()


def with_labels(batch: dict) -> dict:
    """The batch plus mlm labels of its ids' shape (all ignored: the loss is 0, the step still runs)."""
    return {**batch, "mlm_labels": torch.full(batch["input_ids"].shape, -100)}


@SLOW_FUZZ
@given(batch=batches(ENCODER))
def test_the_training_loop_refuses_bad_batches_before_any_module_runs(batch):
    model = Transformer(ENCODER)
    ran = modules_run(model)
    expect_refused_before_running(
        lambda: train(model, [with_labels(batch)], TrainConfig(steps=1, progress=False)), problems(ENCODER, batch), ran
    )


@SLOW_FUZZ
@given(batch=batches(ENCODER))
def test_distill_refuses_bad_batches_before_any_module_runs(batch):
    student, teacher = Transformer(ENCODER), Transformer(ENCODER).eval()
    ran = modules_run(student, teacher)
    distill = Distill(steps=1, progress=False)
    expect_refused_before_running(
        lambda: distill(student, Context(data=[batch], teacher=teacher)), problems(ENCODER, batch), ran
    )


class _Session:
    """An ONNX Runtime session that records its runs in a list shared by both graphs."""

    def __init__(self, session, runs: list):
        self.session, self.runs = session, runs

    def run(self, *args, **kwargs):
        self.runs.append(args)
        return self.session.run(*args, **kwargs)


def stub_graph(path: Path, kind: str, inputs: tuple[str, ...], nodes: list) -> None:
    """A graph with `inputs` (int64, (batch, length)) and one float output built by `nodes`, tagged as a SEQ2SEQ export."""
    output = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", n]) for n in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["b", None])],
    )
    onnx.save_model(
        tagged(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), SEQ2SEQ, kind), str(path)
    )


@pytest.fixture(scope="module")
def ort_model(tmp_path_factory):
    """OrtModel on stub encoder and decoder graphs with the real inputs: the checks under test run before any graph."""
    folder = tmp_path_factory.mktemp("ort")
    stub_graph(
        folder / "model.onnx",
        "encoder",
        ("input_ids", "attention_mask", "token_type_ids"),
        [
            helper.make_node("Add", ["input_ids", "token_type_ids"], ["sum"]),
            helper.make_node("Mul", ["sum", "attention_mask"], ["kept"]),
            helper.make_node("Cast", ["kept"], ["last_hidden_state"], to=TensorProto.FLOAT),  # Hugging Face's name
        ],
    )
    stub_graph(
        folder / "model.decoder.onnx",
        "decoder",
        ("decoder_input_ids",),
        [
            helper.make_node("Cast", ["decoder_input_ids"], ["decoder_hidden_states"], to=TensorProto.FLOAT),
        ],
    )
    runner = OrtModel(folder, threads=1)
    runner.runs = []
    runner.encoder.session = _Session(runner.encoder.session, runner.runs)
    runner.decoder.session = _Session(runner.decoder.session, runner.runs)
    return runner


@FUZZ
@given(batch=batches(SEQ2SEQ), as_numpy=st.booleans())
def test_ort_model_refuses_bad_batches_before_any_graph_runs(ort_model, batch, as_numpy):
    ort_model.runs.clear()
    inputs = {k: v.numpy() for k, v in batch.items()} if as_numpy else batch
    out = expect_refused_before_running(lambda: ort_model(inputs), problems(SEQ2SEQ, batch), ort_model.runs)
    assert out is None or out.hidden_states.shape == batch["input_ids"].shape


def test_training_data_that_is_not_batches_is_named():
    with pytest.raises(TypeError, match="dict"):
        train(Transformer(ENCODER), [torch.ones(2, 3, dtype=torch.int64)], TrainConfig(steps=1, progress=False))


def test_a_distill_batch_without_input_ids_is_named():
    batch = {"attention_mask": torch.ones(2, 3, dtype=torch.int64)}
    with pytest.raises((TypeError, ValueError), match="input_ids"):
        Distill(steps=1, progress=False)(Transformer(ENCODER), Context(data=[batch], teacher=Transformer(ENCODER)))


@pytest.mark.parametrize(
    "key, value", [("mlm_labels", 600), ("mlm_labels", -5), ("pair_labels", 2), ("mlm_labels", "short")]
)
def test_labels_outside_their_range_or_shape_are_named(key, value):
    ids = torch.arange(5, 17).view(2, 6)
    labels = ids[:, :3] if value == "short" else torch.full(ids.shape if key == "mlm_labels" else (2,), value)
    model = Transformer(SEQ2SEQ)
    ran = modules_run(model)
    with pytest.raises(ValueError, match=key):
        model(input_ids=ids, **{key: labels})
    assert not ran
