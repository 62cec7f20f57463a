"""HF <-> llava-jax conversion: bit-exact round trips, every key spelling, strict refusals.

Each case saves a tiny random transformers model (tests/hf_tiny.py), converts it to a llava-jax
model directory and back, and compares the two HF directories tensor by tensor (bitwise, by
canonical key, since the output spelling may differ from the input), config by config
(`AutoConfig`), and by loading the export into transformers. The key-spelling tests rewrite one
state dict in each layout the converter accepts; the strictness tests break one thing at a time
and check that the error is one line naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hf_tiny
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from llava_jax.conversion.hf_config import ConfigError
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.jax_to_hf import convert_jax_to_hf
from llava_jax.conversion.mapping import canonical_key
from llava_jax.conversion.source import load_model
from llava_jax.conversion.tensor_io import CheckpointReader, CheckpointWriter
from llava_jax.errors import CheckpointError
from llava_jax.model_io import (
    CONFIG_FILE,
    PARAMS_DIR,
    load_config,
    load_params,
    save_model_dir,
)

MAKERS = {
    "llava": hf_tiny.llava,
    "llava_next": hf_tiny.llava_next,
    "llava_next_mistral": lambda: hf_tiny.llava_next(
        kv_heads=1, text_kind="mistral", sliding_window=8
    ),
    "onevision_tied": lambda: hf_tiny.llava_onevision(tie=True),
    "onevision_untied": lambda: hf_tiny.llava_onevision(tie=False),
}


class Case:
    """A tiny HF model saved to `root/hf`, converted to `root/jax`, exported to `root/out`."""

    def __init__(self, name: str, root: Path):
        self.model = MAKERS[name]()
        self.root = root
        self.hf, self.jax, self.out = root / "hf", root / "jax", root / "out"
        self.model.save_pretrained(self.hf)
        convert_hf_to_jax(self.hf, self.jax)
        convert_jax_to_hf(self.jax, self.out)
        self._params = None

    @property
    def params(self) -> dict[str, np.ndarray]:
        if self._params is None:
            self._params = numpy_params(self.jax)
        return self._params

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's tensors under transformers-5 module paths."""
        return {k: v.detach().numpy() for k, v in self.model.state_dict().items()}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def numpy_params(model_dir) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_params(model_dir).items()}


def canonical_tensors(reader: CheckpointReader) -> dict[str, str]:
    """{canonical key: key as stored}; derived buffers dropped."""
    out = {}
    for key in reader.keys():
        canon = canonical_key(key)
        if canon is not None:
            assert canon not in out, f"{key!r} and {out[canon]!r} are the same tensor"
            out[canon] = key
    return out


def assert_same_tensors(dir_a: Path, dir_b: Path):
    with CheckpointReader(dir_a) as a, CheckpointReader(dir_b) as b:
        keys_a, keys_b = canonical_tensors(a), canonical_tensors(b)
        assert sorted(set(keys_a) - set(keys_b)) == [], "tensors lost in the round trip"
        assert sorted(set(keys_b) - set(keys_a)) == [], "tensors added in the round trip"
        for canon in sorted(keys_a):
            x, y = a.read(keys_a[canon]), b.read(keys_b[canon])
            assert (x.dtype, x.shape) == (y.dtype, y.shape), canon
            assert x.tobytes() == y.tobytes(), f"{canon}: values differ"


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].shape == want[path].shape, path
        assert got[path].tobytes() == want[path].tobytes(), f"{path}: values differ"


def auto_config(path: Path) -> dict:
    # `_name_or_path` is set by from_pretrained to the directory it read: not a stored field.
    d = transformers.AutoConfig.from_pretrained(path).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


def raises_one_line(exc, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


# -- round trip HF -> JAX -> HF, and the export in transformers ---------------------------


@pytest.mark.parametrize("name", list(MAKERS))
def test_round_trip_is_bit_exact(case, name):
    c = case(name)
    assert_same_tensors(c.hf, c.out)
    assert auto_config(c.out) == auto_config(c.hf)


@pytest.mark.parametrize("name", list(MAKERS))
def test_export_loads_in_transformers(case, name):
    c = case(name)
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        c.out, output_loading_info=True
    )
    assert type(model) is type(c.model)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"{kind}: {info[kind]}"
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 120, 7, 64, 2]])
    with torch.no_grad():
        want = c.model(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max()}"


def test_bfloat16_checkpoint_round_trips_bitwise(tmp_path):
    hf_tiny.llava_onevision(tie=False).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    with CheckpointReader(tmp_path / "hf") as r:
        assert {str(r.dtype(k)) for k in r.keys()} == {"bfloat16"}
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "jax")
    assert {v.dtype for v in numpy_params(tmp_path / "jax").values()} == {
        np.dtype(ml_dtypes.bfloat16)
    }
    convert_jax_to_hf(tmp_path / "jax", tmp_path / "out")
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    assert auto_config(tmp_path / "out") == auto_config(tmp_path / "hf")


def test_dtype_bfloat16_casts_like_torch(case, tmp_path):
    """`--dtype bfloat16` of a float32 model gives what torch's `.to(bfloat16)` gives."""
    c = case("llava_next")
    convert_hf_to_jax(c.hf, tmp_path / "jax", dtype="bfloat16")
    params = numpy_params(tmp_path / "jax")
    assert {v.dtype for v in params.values()} == {np.dtype(ml_dtypes.bfloat16)}
    for path, value in c.params.items():  # round to nearest even, like torch
        assert params[path].tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), path
    convert_jax_to_hf(tmp_path / "jax", tmp_path / "out")
    MAKERS["llava_next"]().to(torch.bfloat16).save_pretrained(tmp_path / "torch_bf16")
    assert_same_tensors(tmp_path / "torch_bf16", tmp_path / "out")
    assert auto_config(tmp_path / "out")["dtype"] == "bfloat16"


def test_dtype_with_stored_tied_head(case, tmp_path):
    """A stored copy of a tied lm_head is checked before the cast, not against the cast."""
    c = case("onevision_tied")
    tensors = SPELLINGS["hf_v5"](c)
    assert "lm_head.weight" in tensors
    hf_dir = write_hf_dir(tmp_path / "hf", c.model, tensors)
    convert_hf_to_jax(hf_dir, tmp_path / "jax", dtype="bfloat16")
    embed = numpy_params(tmp_path / "jax")["language_model/embed_tokens/embedding"]
    want = c.params["language_model/embed_tokens/embedding"].astype(ml_dtypes.bfloat16)
    assert embed.tobytes() == want.tobytes()


def test_dtype_refuses_unknown(case, tmp_path):
    raises_one_line(
        ValueError, "float8", convert_hf_to_jax, case("llava").hf, tmp_path / "j", dtype="float8"
    )


# -- every input key spelling -----------------------------------------------------------------


def legacy_spelling(key: str) -> str:
    """llava-hf files (transformers 4 `save_pretrained`)."""
    for old, new in [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ]:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


def original_spelling(key: str) -> str:
    """haotian-liu/LLaVA and LLaVA-NeXT training checkpoints."""
    for old, new in [
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.image_newline", "model.image_newline"),
    ]:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


def mixed_spelling(key: str) -> str:
    """transformers 5 `save_pretrained` can revert only some renames (its `conversion_mapping.py`
    renames and `revert_weight_conversion`)."""
    key = legacy_spelling(key)
    return key.replace("vision_tower.vision_model.", "vision_tower.")


def write_hf_dir(
    out: Path, model, tensors: dict[str, np.ndarray], max_shard_size="5GB", config_edit=None
) -> Path:
    """An HF directory holding `tensors` and `model`'s config.json (optionally edited)."""
    model.config.save_pretrained(out)
    if config_edit is not None:
        path = out / "config.json"
        raw = json.loads(path.read_text())
        config_edit(raw)
        path.write_text(json.dumps(raw))
    with CheckpointWriter(out, max_shard_size=max_shard_size) as writer:
        for key, value in tensors.items():
            writer.add(key, value)
    return out


def spelled(c: Case, spell, drop_tied_head: bool) -> dict[str, np.ndarray]:
    tied = c.model.config.tie_word_embeddings
    return {
        spell(k): v
        for k, v in c.state_dict().items()
        if not (drop_tied_head and tied and k == "lm_head.weight")
    }


SPELLINGS = {
    "hf_legacy": lambda c: spelled(c, legacy_spelling, drop_tied_head=True),
    # Keeps the tied lm_head that `state_dict()` lists: a stored copy must be accepted.
    "hf_v5": lambda c: spelled(c, lambda k: k, drop_tied_head=False),
    "hf_v5_vision_model": lambda c: spelled(
        c, lambda k: k.replace("model.vision_tower.", "model.vision_tower.vision_model."), True
    ),
    "mixed": lambda c: spelled(c, mixed_spelling, drop_tied_head=True),
    "original": lambda c: spelled(c, original_spelling, drop_tied_head=True),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("name", ["llava", "llava_next", "onevision_tied"])
def test_key_spellings_convert_identically(case, tmp_path, name, spelling):
    c = case(name)
    hf_dir = write_hf_dir(tmp_path / "hf", c.model, SPELLINGS[spelling](c))
    convert_hf_to_jax(hf_dir, tmp_path / "jax")
    assert_same_params(numpy_params(tmp_path / "jax"), c.params)


@pytest.mark.parametrize("name", ["llava_next", "onevision_tied"])
def test_sharded_with_legacy_buffers(case, tmp_path, name):
    """An index + shards, and the rotary / position-id buffers old checkpoints carry."""
    c = case(name)
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    n = c.model.config.text_config.num_hidden_layers
    for i in range(n):
        tensors[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(
            6, np.float32
        )
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(10)[None]
    hf_dir = write_hf_dir(tmp_path / "hf", c.model, tensors, max_shard_size=20_000)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    convert_hf_to_jax(hf_dir, tmp_path / "jax")
    assert_same_params(numpy_params(tmp_path / "jax"), c.params)


def test_pickle_bin_needs_allow_pickle(case, tmp_path):
    c = case("llava_next")
    hf_dir = tmp_path / "hf"
    c.model.config.save_pretrained(hf_dir)
    torch.save(c.model.state_dict(), hf_dir / "pytorch_model.bin")
    raises_one_line(
        CheckpointError, "--allow-pickle", convert_hf_to_jax, hf_dir, tmp_path / "refused"
    )
    assert not (tmp_path / "refused").exists()
    convert_hf_to_jax(hf_dir, tmp_path / "jax", allow_pickle=True)
    assert_same_params(numpy_params(tmp_path / "jax"), c.params)


# -- strictness: one-line errors that name the problem -------------------------------------------


def convert_broken(c: Case, tmp_path: Path, tensors=None, config_edit=None) -> str:
    """Converts a broken copy of `c`; returns the error, checking that nothing was written."""
    tensors = spelled(c, legacy_spelling, drop_tied_head=True) if tensors is None else tensors
    hf_dir = write_hf_dir(tmp_path / "hf", c.model, tensors, config_edit=config_edit)
    with pytest.raises((CheckpointError, ConfigError)) as info:
        convert_hf_to_jax(hf_dir, tmp_path / "jax")
    assert not (tmp_path / "jax").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "temporary files left behind"
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def test_missing_tensor_is_named(case, tmp_path):
    c = case("llava_next")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    del tensors["language_model.model.layers.1.self_attn.q_proj.weight"]
    message = convert_broken(c, tmp_path, tensors)
    assert "missing tensor 'language_model.model.layers.1.self_attn.q_proj.weight'" in message


def test_unknown_tensor_is_named(case, tmp_path):
    c = case("llava_next")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    tensors["language_model.model.layers.0.self_attn.q_norm.weight"] = np.ones(12, np.float32)
    message = convert_broken(c, tmp_path, tensors)
    assert "not used by the model" in message
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in message


def test_wrong_shape_names_tensor_and_both_shapes(case, tmp_path):
    c = case("llava_next")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    assert tensors[key].shape == (64, 48)
    tensors[key] = tensors[key][:63]
    message = convert_broken(c, tmp_path, tensors)
    assert key in message and "(63, 48)" in message and "(64, 48)" in message


def test_wrong_rank_names_tensor_and_both_shapes(case, tmp_path):
    c = case("llava")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    key = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert tensors[key].shape == (32, 3, 14, 14)
    tensors[key] = tensors[key].reshape(32, -1)
    message = convert_broken(c, tmp_path, tensors)
    assert key in message and "(32, 588)" in message and "(32, 3, 14, 14)" in message


def test_two_spellings_of_one_tensor(case, tmp_path):
    c = case("llava_next")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"]
    message = convert_broken(c, tmp_path, tensors)
    assert "same parameter" in message
    assert "'language_model.model.norm.weight'" in message
    assert "'model.language_model.norm.weight'" in message


def test_tied_head_must_equal_embeddings(case, tmp_path):
    c = case("onevision_tied")
    tensors = spelled(c, legacy_spelling, drop_tied_head=False)
    embed = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.lm_head.weight"] = embed + 1
    message = convert_broken(c, tmp_path, tensors)
    assert "'language_model.lm_head.weight' differs from embed_tokens" in message


def _set(path: str, value):
    def edit(raw):
        *parents, leaf = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value

    return edit


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("llava_next", "text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        (
            "llava_next",
            "text_config.rope_parameters",
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        ("llava_next", "text_config.mlp_bias", True),
        ("llava_next", "text_config.attention_bias", True),
        ("onevision_tied", "vision_config.vision_use_head", True),
        ("onevision_tied", "text_config.use_sliding_window", True),
        ("llava", "vision_config.dropout", 0.1),
        ("llava", "foo", 1),
        ("llava", "text_config.foo", 1),
    ],
)
def test_config_field_not_understood_is_named(case, tmp_path, name, field, value):
    message = convert_broken(case(name), tmp_path, config_edit=_set(field, value))
    top = "" if "." in field else "config."
    assert f"{top}{field}=" in message


def test_malformed_config_json(case, tmp_path):
    c = case("llava")
    hf_dir = tmp_path / "hf"
    shutil.copytree(c.hf, hf_dir)
    (hf_dir / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"],')
    raises_one_line(
        CheckpointError,
        r"config\.json: not valid JSON",
        convert_hf_to_jax,
        hf_dir,
        tmp_path / "jax",
    )
    assert not (tmp_path / "jax").exists()


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_hf_to_jax_refuses_non_empty_out_dir(case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    raises_one_line(CheckpointError, "not empty", convert_hf_to_jax, case("llava").hf, out)
    assert _snapshot(out) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_jax_to_hf_refuses_non_empty_out_dir(case, tmp_path):
    c = case("llava")
    out = tmp_path / "out"
    shutil.copytree(c.out, out)
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    raises_one_line(CheckpointError, "not empty", convert_jax_to_hf, c.jax, out)
    assert _snapshot(out) == before


def test_out_dir_that_is_a_file_is_refused(case, tmp_path):
    c = case("llava")
    out = tmp_path / "out"
    out.write_text("keep me")
    raises_one_line(CheckpointError, "not empty", convert_hf_to_jax, c.hf, out)
    raises_one_line(CheckpointError, "not empty", convert_jax_to_hf, c.jax, out)
    assert out.read_text() == "keep me"


def test_empty_out_dir_is_fine(case, tmp_path):
    c = case("llava")
    (tmp_path / "jax").mkdir()
    (tmp_path / "hf").mkdir()
    convert_hf_to_jax(c.hf, tmp_path / "jax")
    convert_jax_to_hf(tmp_path / "jax", tmp_path / "hf")
    assert_same_tensors(c.hf, tmp_path / "hf")


def _half_written(c: Case, tmp_path: Path, damage) -> Path:
    d = tmp_path / "model"
    shutil.copytree(c.jax, d)
    damage(d)
    return d


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: shutil.rmtree(d / PARAMS_DIR), "no params/"),
        (lambda d: (d / CONFIG_FILE).unlink(), f"no {CONFIG_FILE}"),
        (
            lambda d: (d / CONFIG_FILE).write_text('{"family": "llava", "vision": '),
            "malformed config",
        ),
        (lambda d: _truncate(_largest_file(d / PARAMS_DIR)), "unreadable orbax checkpoint"),
        (lambda d: _truncate(d / PARAMS_DIR / "_METADATA"), "unreadable orbax checkpoint"),
    ],
    ids=["no-params", "no-config", "bad-config", "truncated-data", "truncated-metadata"],
)
def test_half_written_model_dir(case, tmp_path, damage, match):
    d = _half_written(case("llava"), tmp_path, damage)
    raises_one_line(CheckpointError, match, load_params, d)
    raises_one_line(CheckpointError, match, load_model, d)
    raises_one_line(CheckpointError, match, convert_jax_to_hf, d, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def _overwrite_middle(path: Path, n: int = 4096, byte: int = 0xFF):
    """Same size, `n` bytes in the middle replaced (0xFF...: NaN in every float format)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes([byte]) * n
    path.write_bytes(bytes(data))


def test_damaged_weights_in_a_model_dir_are_refused(case, tmp_path):
    """Flipped bytes keep the file's size and orbax reads them; the NaNs must not load."""
    d = _half_written(case("llava"), tmp_path, lambda d: _overwrite_middle(_largest_file(d)))
    match = r"params: \S+ holds [\d,]+ NaN or infinite values.*; the weights are damaged$"
    raises_one_line(CheckpointError, match, load_params, d)
    raises_one_line(CheckpointError, match, load_model, d)


def test_non_finite_parameter_is_named(case, tmp_path):
    c = case("llava")
    params = dict(c.params)
    name = "multi_modal_projector/linear_2/kernel"
    params[name] = params[name].copy()
    params[name][0, :3] = [np.inf, -np.inf, np.nan]
    save_model_dir(tmp_path / "model", load_config(c.jax), params)
    message = raises_one_line(CheckpointError, "NaN or infinite", load_params, tmp_path / "model")
    assert message == (
        f"{tmp_path / 'model' / PARAMS_DIR}: {name} holds 3 NaN or infinite values; "
        "the weights are damaged"
    )


def test_non_finite_hf_tensor_is_named(case, tmp_path):
    c = case("llava_next")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][1, 1] = np.nan
    message = convert_broken(c, tmp_path, tensors)
    assert message == (
        f"model.safetensors: tensor {key!r} holds 1 NaN or infinite values; the weights are damaged"
    )


def test_params_that_do_not_fit_the_config(case, tmp_path):
    c = case("llava")
    d = _half_written(c, tmp_path, lambda d: None)
    raw = json.loads((d / CONFIG_FILE).read_text())
    raw["text"]["num_hidden_layers"] = 3
    (d / CONFIG_FILE).write_text(json.dumps(raw))
    raises_one_line(CheckpointError, r"language_model/layers/.* has shape \(2, ", load_params, d)


def test_truncated_safetensors_names_the_file(case, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(case("llava").hf, hf_dir)
    _truncate(hf_dir / "model.safetensors")
    raises_one_line(
        CheckpointError,
        r"^model\.safetensors: .*truncated",
        convert_hf_to_jax,
        hf_dir,
        tmp_path / "jax",
    )
    assert not (tmp_path / "jax").exists()


def test_truncated_shard_names_the_file(case, tmp_path):
    c = case("llava")
    tensors = spelled(c, legacy_spelling, drop_tied_head=True)
    hf_dir = write_hf_dir(tmp_path / "hf", c.model, tensors, max_shard_size=20_000)
    shard = sorted(hf_dir.glob("model-*-of-*.safetensors"))[1]
    _truncate(shard)
    raises_one_line(
        CheckpointError, rf"^{shard.name}: ", convert_hf_to_jax, hf_dir, tmp_path / "jax"
    )
