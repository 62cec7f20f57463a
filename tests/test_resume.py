"""The fingerprint a LoRA checkpoint keeps of its frozen base (train/resume.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.sharding import make_mesh
from llava_jax.train.resume import fingerprint


def test_fingerprint_sees_every_bit_and_no_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.RandomState(0)
    base = {
        "w": jnp.asarray(rng.randn(8, 16), jnp.float32),
        "b": jnp.ones((16,), jnp.bfloat16),
        "q": jnp.asarray(rng.randint(0, 16, (8, 16)), jnp.uint4),  # QLoRA's nf4 codes
    }
    want = fingerprint(base, mesh)
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        for k, v in base.items()
    }
    assert fingerprint(sharded, mesh) == want  # exact integer sums: any layout, any order
    changes = {
        "w": base["w"].at[3, 5].multiply(2.0),  # one exponent bit
        "b": base["b"] * 2,  # every value by a power of two: a plain sum of bits misses it
        "q": base["q"][::-1],  # the same values, moved
    }
    for name, changed in changes.items():
        got = fingerprint({**base, name: changed}, mesh)
        assert {k for k in want if got[k] != want[k]} == {name}, name
    # -0.0 == 0.0 as values, not as bits.
    zeros = {"w": jnp.zeros((4,))}
    assert fingerprint(zeros, mesh) != fingerprint({"w": -zeros["w"]}, mesh)
