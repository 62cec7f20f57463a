"""`conversion/source.py`: one place that tells a model's format and refuses what is not one."""

from __future__ import annotations

import hf_tiny
import pytest
from fake_gcs import fake_gcs  # noqa: F401 (a fixture)

from llava_jax.conversion import source
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.errors import CheckpointError


def test_both_formats_give_the_same_config_and_assets(tmp_path):
    hf_tiny.llava().save_pretrained(tmp_path / "hf")
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "jax")
    assert source.format_of(tmp_path / "hf") == "hf"
    assert source.format_of(tmp_path / "jax") == "llava-jax"
    assert source.load_config(tmp_path / "hf") == source.load_config(tmp_path / "jax")
    assert source.assets(tmp_path / "hf") == tmp_path / "hf"
    assert source.assets(tmp_path / "jax") == tmp_path / "jax" / "assets"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent", r"absent: no such model directory$"),
        (lambda d: d, r": neither a llava-jax model directory \(llava_config.json\) nor a "
                      r"Hugging Face checkpoint \(config.json\)$"),
        (lambda d: "gs://bucket/model", r"^gs://bucket/model: not a llava-jax model "
                                        r"directory \(a remote path must be one"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("fake_gcs")
def test_what_is_not_a_model_is_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message) as info:
        source.format_of(make(tmp_path))
    assert "\n" not in str(info.value)
