"""The vision-language connector (`multi_modal_projector` in HF, `mm_projector` originally).

`linear` (LLaVA v1) is one Linear; `mlp2x_gelu` (1.5, NeXT, OneVision) is
Linear -> exact erf GELU -> Linear, as `nn.GELU()` in the original and `ACT2FN["gelu"]` in HF.
"""

from __future__ import annotations

import jax
from flax import nnx

from llava_jax.config import Activation, LlavaConfig, Projector
from llava_jax.nn.layers import activation, dense


class MultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        kw = dict(
            use_bias=cfg.projector_bias,
            dtype=cfg.run.dtype,
            param_dtype=cfg.run.param_dtype,
            rngs=rngs,
        )
        self.linear_1 = dense(d_in, d, ("vision_embed", "embed"), **kw)
        if cfg.projector == Projector.MLP2X_GELU:
            self.linear_2 = dense(d, d, ("mlp", "embed"), **kw)
        self.act = activation(Activation.GELU)

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., D_vision * layers] -> float[..., D_text]."""
        x = self.linear_1(x)
        if hasattr(self, "linear_2"):
            x = self.linear_2(self.act(x))
        return x
