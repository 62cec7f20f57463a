"""Where a loaded model's parameters live, from either kind of `--model` directory.

Host NumPy parameters are copied into the device at every jitted call, so an HF directory
converted in memory decoded ~5x slower than the same model converted once (issue 14). Both
paths must give device arrays with the same sharding and the same values.
"""

from __future__ import annotations

import hf_tiny
import jax
import numpy as np

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.inference.pipeline import load_any_model
from llava_jax.models import build


def test_hf_and_converted_dirs_load_device_arrays_on_the_default_sharding(tmp_path):
    hf_tiny.llava().save_pretrained(tmp_path / "hf")
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "jax")
    want = build.default_sharding()
    assert want == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    loaded = {}
    for kind in ("hf", "jax"):
        model, _ = load_any_model(tmp_path / kind, echo=lambda _: None)
        params = build.model_params(model)
        hosts = sorted(k for k, v in params.items() if not isinstance(v, jax.Array))
        assert not hosts, f"{kind}: host arrays, not device arrays: {hosts[:3]}"
        elsewhere = sorted(k for k, v in params.items() if v.sharding != want)
        assert not elsewhere, f"{kind}: not on {want}: {elsewhere[:3]}"
        loaded[kind] = params
    assert loaded["hf"].keys() == loaded["jax"].keys()
    for key, value in loaded["hf"].items():
        np.testing.assert_array_equal(value, loaded["jax"][key], err_msg=key)
