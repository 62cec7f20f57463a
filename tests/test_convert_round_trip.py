"""HF <-> llava-jax conversion: bit-exact round trips, dtypes, every input key spelling.

Each case converts a tiny random transformers model to a llava-jax model directory and back
(tests/convert_helpers.py), and compares the two HF directories tensor by tensor (bitwise, by
canonical key, since the output spelling may differ from the input), config by config
(`AutoConfig`), and by loading the export into transformers. The key-spelling tests rewrite one
state dict in each layout the converter accepts.
"""

from __future__ import annotations

import json

import hf_tiny
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from convert_helpers import (
    MAKERS,
    SPELLINGS,
    assert_same_params,
    assert_same_tensors,
    auto_config,
    legacy_spelling,
    numpy_params,
    raises_one_line,
    spelled,
    write_hf_dir,
)

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.jax_to_hf import convert_jax_to_hf
from llava_jax.conversion.tensor_io import CheckpointReader
from llava_jax.errors import CheckpointError

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
