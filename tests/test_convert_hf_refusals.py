"""HF -> llava-jax conversion refuses a broken HF checkpoint: a missing, unknown, misshapen,
doubled or non-finite tensor, a config field it does not understand, malformed config.json,
a truncated file. Each test breaks one thing and checks that the error is one line naming it
and that nothing was written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import Case, _truncate, legacy_spelling, raises_one_line, spelled, write_hf_dir

from llava_jax.conversion.hf_config import ConfigError
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.errors import CheckpointError

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
