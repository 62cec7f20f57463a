"""LLaVA: vision tower -> connector -> image features placed into the decoder's input.

One network serves LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision. What differs between the
families (AnyRes crops, unpadding, newlines, anyres_max and video pooling) is a fixed linear
map from the projected view features to the image tokens; `feature_plan.py` builds it on the
host, in Python arithmetic, as `taps` gather indices and weights. On the device it is a
gather and a weighted sum, with static shapes.

Axis legend: B batch, V views per sample (crops, frames; padded), P tokens per view,
I image tokens per sample (padded), K taps per image token, T text length, D text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llava_jax.config import FeatureSelect, LlavaConfig
from llava_jax.models.connector import MultiModalProjector
from llava_jax.models.llm import KVCache, LanguageModel
from llava_jax.models.vit import VisionTransformer
from llava_jax.nn.attention_kernels import FusedAttention
from llava_jax.nn.layers import partitioned


@struct.dataclass
class LlavaOutput:
    """Logits plus the named intermediates a parity test compares.

    Attributes:
      logits: float32[B, T, V].
      cache: the updated KV cache, or None.
      vision_features: float[B, V, P, D_vision] selected tower features (None without images).
      image_features: float[B, I, D] the features placed at the image tokens (None without
        images).
      hidden: float[B, T, D] the decoder output after the final norm.
    """

    logits: jax.Array | None
    cache: KVCache | None = None
    vision_features: jax.Array | None = None
    image_features: jax.Array | None = None
    hidden: jax.Array | None = None


class LlavaModel(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(cfg, rngs=rngs)
        if cfg.has_image_newline:
            d = cfg.text.hidden_size
            init = partitioned(nnx.initializers.normal(d**-0.5), "embed")  # randn / sqrt(d)
            self.image_newline = nnx.Param(init(rngs.params(), (d,), cfg.run.param_dtype))
        self.language_model = LanguageModel(cfg, rngs=rngs)

    def encode_views(
        self, pixel_values: jax.Array, attention: FusedAttention | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Tower and connector on every view.

        Args:
          pixel_values: float[B, V, S, S, C] normalised views, channels last.
          attention: the tower's fused attention kernel, or None for the XLA path.

        Returns:
          (vision features float[B, V, P, D_vision * layers], projected float[B, V, P, D]).
        """
        b, v = pixel_values.shape[:2]
        feats = self.vision_tower(pixel_values.reshape(b * v, *pixel_values.shape[2:]), attention)
        if self.cfg.vision_feature_select_strategy == FeatureSelect.DEFAULT:
            feats = feats[:, 1:]  # drop CLS
        feats = feats.reshape(b, v, *feats.shape[1:])
        return feats, self.multi_modal_projector(feats)

    def image_features(
        self, projected: jax.Array, taps: jax.Array, weights: jax.Array
    ) -> jax.Array:
        """Applies the host-built feature plan.

        Args:
          projected: float[B, V, P, D].
          taps: int32[B, I, K] indices into [image_newline, the V*P view tokens].
          weights: float32[B, I, K] interpolation weights (one tap of weight 1 for a copy).

        Returns:
          float[B, I, D].
        """
        b, v, p, d = projected.shape
        rows = projected.reshape(b, v * p, d)
        newline = self.image_newline[...] if self.cfg.has_image_newline else jnp.zeros((d,))
        newline = jnp.broadcast_to(newline.astype(rows.dtype), (b, 1, d))
        rows = jnp.concatenate([newline, rows], axis=1)  # [B, 1 + V*P, D]
        i, k = taps.shape[1:]
        gathered = jnp.take_along_axis(rows, taps.reshape(b, i * k, 1), axis=1)
        gathered = gathered.reshape(b, i, k, d)
        return jnp.einsum("BIKD,BIK->BID", gathered, weights.astype(rows.dtype))

    def embed(
        self,
        input_ids: jax.Array,
        image_features: jax.Array | None,
    ) -> jax.Array:
        """Token embeddings with image and video tokens replaced by their features.

        As in HF, the n-th image token takes the n-th image feature and the n-th video token
        the n-th video feature; the plan lists all image features first, then video ones.
        The caller guarantees (on the host) that the counts agree; see
        `feature_plan.check_placeholders`.
        """
        embeds = self.language_model.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.cfg.image_token_id
        rank = jnp.cumsum(is_image, axis=1) - 1
        is_media = is_image
        if self.cfg.video_token_id is not None:
            is_video = input_ids == self.cfg.video_token_id
            num_images = jnp.sum(is_image, axis=1, keepdims=True)
            rank = jnp.where(is_video, num_images + jnp.cumsum(is_video, axis=1) - 1, rank)
            is_media = is_image | is_video
        rank = jnp.clip(rank, 0, image_features.shape[1] - 1)
        placed = jnp.take_along_axis(image_features, rank[..., None], axis=1)
        return jnp.where(is_media[..., None], placed.astype(embeds.dtype), embeds)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        pixel_values: jax.Array | None = None,
        taps: jax.Array | None = None,
        tap_weights: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        attention: FusedAttention | None = None,
    ) -> LlavaOutput:
        """The forward pass up to the final norm, without logits (`hidden` is set).

        Generation uses it to project only the positions it needs onto the vocabulary.
        `attention` is a fused kernel for the tower and the decoder (`nn/attention_kernels`,
        a run setting); None = the XLA path.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        vision_features = image_features = None
        if pixel_values is not None:
            vision_features, projected = self.encode_views(pixel_values, attention)
            image_features = self.image_features(projected, taps, tap_weights)
        embeds = self.embed(input_ids, image_features)
        hidden, cache = self.language_model(embeds, positions, segment_ids, cache, attention)
        return LlavaOutput(None, cache, vision_features, image_features, hidden)

    def __call__(self, input_ids: jax.Array, **inputs) -> LlavaOutput:
        """The forward pass.

        Args:
          input_ids: int32[B, T], image tokens already expanded to their final count.
          pixel_values: float[B, V, S, S, C] or None for text only.
          taps, tap_weights: the feature plan for `pixel_values` (see `feature_plan.py`).
          positions: int32[B, T]; defaults to 0..T-1.
          segment_ids: int32[B, T]; 0 marks padding. Defaults to all ones.
          cache: a KV cache to extend (prefill or decode).

        Returns:
          LlavaOutput with float32 logits[B, T, V].
        """
        out = self.hidden_states(input_ids, **inputs)
        return out.replace(logits=self.language_model.logits(out.hidden))
