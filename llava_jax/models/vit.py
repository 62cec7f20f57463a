"""The vision tower: one ViT for CLIP ViT-L/14 (224, 336) and SigLIP so400m/14-384.

Module and parameter names mirror HF `CLIPVisionModel` / `SiglipVisionModel`, so the
converter is a table. Axis legend: B images (views), P patches (+ CLS), D width, F MLP width,
N heads, H head dim.

Numerics (transformers `clip/modeling_clip.py`, `siglip/modeling_siglip.py`): CLIP uses
quick_gelu, LayerNorm eps 1e-5, a CLS token and `pre_layrnorm`; SigLIP uses tanh-GELU, eps
1e-6, no CLS, no pre-norm. `post_layernorm` is held only so checkpoints round-trip: LLaVA
reads `hidden_states`, which never pass it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.nn.attention import dot_product_attention
from llava_jax.nn.attention_kernels import FusedAttention
from llava_jax.nn.layers import LayerNorm, activation, dense, partitioned
from llava_jax.nn.stack import run_stacked, stacked
from llava_jax.sharding import HIDDEN, constrain


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=not cfg.has_class_token,  # CLIP's patch conv has no bias
            param_dtype=param_dtype,
            kernel_init=partitioned(nnx.initializers.lecun_normal(), None, None, None, "embed"),
            bias_init=partitioned(nnx.initializers.zeros_init(), "embed"),
            rngs=rngs,
        )
        if cfg.has_class_token:
            init = partitioned(nnx.initializers.normal(d**-0.5), "embed")
            self.class_embedding = nnx.Param(init(rngs.params(), (d,), param_dtype))
        self.position_embedding = nnx.Embed(
            cfg.num_positions,
            d,
            param_dtype=param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(0.02), None, "embed"),
            rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """float[B, image, image, C] -> float[B, P, D]."""
        x = self.patch_embedding(pixel_values)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # row-major patches, as torch's flatten(2)
        if self.cfg.has_class_token:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = dense(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, attention: FusedAttention | None = None) -> jax.Array:
        b, p, d = x.shape
        heads = lambda y: y.reshape(b, p, self.num_heads, d // self.num_heads)  # noqa: E731
        kv_heads = lambda y: heads(y).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), kv_heads(self.k_proj(x)), kv_heads(self.v_proj(x))
        if attention is not None:
            out = attention(q, k, v, causal=False)
        else:
            out = dot_product_attention(q, k, v, mask=None)
        return self.out_proj(out.reshape(b, p, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.self_attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, attention: FusedAttention | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), attention)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = stacked(
            lambda r: VisionEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_hidden_layers,
            rngs,
        )


class VisionTransformer(nnx.Module):
    """ViT returning the hidden states LLaVA selects (`vision_feature_layer`)."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v = cfg.vision
        kw = dict(dtype=cfg.run.dtype, param_dtype=cfg.run.param_dtype, rngs=rngs)
        self.embeddings = VisionEmbeddings(v, param_dtype=cfg.run.param_dtype, rngs=rngs)
        norm = dict(param_dtype=cfg.run.param_dtype, rngs=rngs)
        if v.has_class_token:
            self.pre_layrnorm = LayerNorm(v.hidden_size, v.layer_norm_eps, **norm)  # sic, HF name
        self.encoder = VisionEncoder(v, **kw)
        self.post_layernorm = LayerNorm(v.hidden_size, v.layer_norm_eps, **norm)

    def __call__(
        self, pixel_values: jax.Array, attention: FusedAttention | None = None
    ) -> jax.Array:
        """Selected hidden states, concatenated on channels when several layers are selected.

        Args:
          pixel_values: float[B, image, image, C], normalised, channels last.
          attention: a fused kernel (no mask: every patch attends to every patch); None =
            the XLA path.

        Returns:
          float[B, P, D * len(feature_layers)], P including the CLS token when there is one.
          Layers after the deepest selected one are not computed.
        """
        # hidden_states[0] is the input of layer 1; hidden_states[i] the output of layer i.
        indices = self.cfg.feature_indices
        x = self.embeddings(pixel_values.astype(self.cfg.run.dtype))
        if self.cfg.vision.has_class_token:
            x = self.pre_layrnorm(x)
        keep_all = len(indices) > 1

        def layer_fn(layer, h, _):
            h = layer(constrain(h, HIDDEN), attention)
            return h, (h if keep_all else None)

        last, per_layer = run_stacked(
            self.encoder.layers,
            x,
            fn=layer_fn,
            num_layers=self.cfg.vision_layers_run,
            scan=self.cfg.run.scan_layers,
            remat=self.cfg.run.vision_remat_policy,
        )
        if not keep_all:
            return last if indices[0] > 0 else x
        hidden_states = [x] + [per_layer[i] for i in range(self.cfg.vision_layers_run)]
        return jnp.concatenate([hidden_states[i] for i in indices], axis=-1)
