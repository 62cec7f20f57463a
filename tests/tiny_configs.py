"""Tiny LlavaConfigs of the three families for data-pipeline tests (no weights needed).

42 px views of 14 px patches (9 tokens per view), a 160-token vocabulary whose ids 150 and
151 are the image and video tokens of `llava_jax.checks.tiny_tokenizer`.
"""

from llava_jax.config import (
    Activation,
    Family,
    FeatureSelect,
    LlavaConfig,
    TextConfig,
    VisionConfig,
    VisionKind,
)

_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               image_size=42, patch_size=14)  # fmt: skip
_TEXT = dict(vocab_size=160, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # fmt: skip
LLAVA = LlavaConfig(vision=VisionConfig(**_VISION), text=TextConfig(**_TEXT), image_token_id=150)
NEXT = LLAVA.replace(
    family=Family.LLAVA_NEXT,
    image_grid_pinpoints=((42, 84), (84, 42), (84, 84), (126, 42), (42, 126)),
)
ONEVISION = LlavaConfig(
    family=Family.LLAVA_ONEVISION,
    vision=VisionConfig(kind=VisionKind.SIGLIP, hidden_act=Activation.GELU_TANH, **_VISION),
    text=TextConfig(**_TEXT),
    vision_feature_layer=-1,
    vision_feature_select_strategy=FeatureSelect.FULL,
    image_token_id=150,
    video_token_id=151,
    image_grid_pinpoints=tuple((42 * i, 42 * j) for i in range(1, 7) for j in range(1, 7)),
    vision_aspect_ratio="anyres_max_9",
)
