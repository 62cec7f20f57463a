"""The HF <-> JAX parameter table, one for all three families, used in both directions.

HF checkpoints spell the same tensor several ways (algorithms.md §9): the llava-hf files
(`language_model.model.*`, `vision_tower.vision_model.*`), transformers-5 module paths
(`model.language_model.*`, `model.vision_tower.*`), and the original LLaVA / LLaVA-NeXT
repositories (`model.layers.*`, `model.mm_projector.0.*`, `model.vision_tower.vision_tower.*`).
`canonical_key` folds them all into one spelling; `rules` maps that spelling to JAX paths.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np

from llava_jax.config import LlavaConfig, Projector, VisionKind


class Transform(enum.Enum):
    COPY = "copy"
    LINEAR = "linear"  # torch Linear weight [out, in] <-> kernel [in, out]
    CONV = "conv"  # torch Conv2d weight [out, in, kh, kw] <-> kernel [kh, kw, in, out]

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        if self == Transform.LINEAR:
            return x.T
        if self == Transform.CONV:
            return x.transpose(2, 3, 1, 0)
        return x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self == Transform.LINEAR:
            return x.T
        if self == Transform.CONV:
            return x.transpose(3, 2, 0, 1)
        return x


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor (or one stack of per-layer tensors when `hf` contains `{i}`)."""

    hf: str  # canonical HF key, `{i}` standing for the layer index
    jax: str  # "/"-joined path in the model state; stacked leaves have a leading layer axis
    transform: Transform = Transform.COPY
    num_layers: int = 0  # > 0 for stacked rules

    def hf_keys(self) -> list[str]:
        if self.num_layers:
            return [self.hf.format(i=i) for i in range(self.num_layers)]
        return [self.hf]


# Folding of every known spelling into the canonical one, tried in order, first match wins.
_SPELLINGS = [
    (r"^model\.language_model\.", "language_model.model."),  # transformers 5 modules
    (r"^lm_head\.", "language_model.lm_head."),  # transformers 5 and original
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),  # original
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower."),  # transformers 5
    (r"^vision_tower\.vision_model\.", "vision_tower."),  # llava-hf files
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),  # original mlp2x_gelu
    (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
    (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),  # linear
    (r"^model\.image_newline$", "image_newline"),
    (r"^model\.", "language_model.model."),  # original LLM body
]
# Buffers some older checkpoints carry; they are recomputed, never learned.
_BUFFERS = re.compile(r"(\.rotary_emb\.inv_freq|embeddings\.position_ids)$")


def canonical_key(key: str) -> str | None:
    """The canonical spelling of an HF checkpoint key, or None for a derived buffer."""
    if _BUFFERS.search(key):
        return None
    for pattern, repl in _SPELLINGS:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return key


def rules(cfg: LlavaConfig) -> list[Rule]:
    """Every parameter of `LlavaModel(cfg)` with its canonical HF key."""
    lin, conv = Transform.LINEAR, Transform.CONV
    v, t = cfg.vision, cfg.text
    out = [
        Rule(
            "vision_tower.embeddings.patch_embedding.weight",
            "vision_tower/embeddings/patch_embedding/kernel",
            conv,
        ),
        Rule(
            "vision_tower.embeddings.position_embedding.weight",
            "vision_tower/embeddings/position_embedding/embedding",
        ),
        Rule("vision_tower.post_layernorm.weight", "vision_tower/post_layernorm/scale"),
        Rule("vision_tower.post_layernorm.bias", "vision_tower/post_layernorm/bias"),
    ]
    if v.kind == VisionKind.CLIP:
        out += [
            Rule(
                "vision_tower.embeddings.class_embedding", "vision_tower/embeddings/class_embedding"
            ),
            Rule("vision_tower.pre_layrnorm.weight", "vision_tower/pre_layrnorm/scale"),
            Rule("vision_tower.pre_layrnorm.bias", "vision_tower/pre_layrnorm/bias"),
        ]
    else:
        out.append(
            Rule(
                "vision_tower.embeddings.patch_embedding.bias",
                "vision_tower/embeddings/patch_embedding/bias",
            )
        )
    vl = v.num_hidden_layers
    for name in ("layer_norm1", "layer_norm2"):
        out.append(
            Rule(
                f"vision_tower.encoder.layers.{{i}}.{name}.weight",
                f"vision_tower/encoder/layers/{name}/scale",
                num_layers=vl,
            )
        )
        out.append(
            Rule(
                f"vision_tower.encoder.layers.{{i}}.{name}.bias",
                f"vision_tower/encoder/layers/{name}/bias",
                num_layers=vl,
            )
        )
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ):
        path = name.replace(".", "/")
        out.append(
            Rule(
                f"vision_tower.encoder.layers.{{i}}.{name}.weight",
                f"vision_tower/encoder/layers/{path}/kernel",
                lin,
                vl,
            )
        )
        out.append(
            Rule(
                f"vision_tower.encoder.layers.{{i}}.{name}.bias",
                f"vision_tower/encoder/layers/{path}/bias",
                num_layers=vl,
            )
        )

    projectors = ["linear_1"] + (["linear_2"] if cfg.projector == Projector.MLP2X_GELU else [])
    for name in projectors:
        out.append(
            Rule(
                f"multi_modal_projector.{name}.weight", f"multi_modal_projector/{name}/kernel", lin
            )
        )
        if cfg.projector_bias:
            out.append(
                Rule(f"multi_modal_projector.{name}.bias", f"multi_modal_projector/{name}/bias")
            )
    if cfg.has_image_newline:
        out.append(Rule("image_newline", "image_newline"))

    tl = t.num_hidden_layers
    out += [
        Rule("language_model.model.embed_tokens.weight", "language_model/embed_tokens/embedding"),
        Rule("language_model.model.norm.weight", "language_model/norm/scale"),
    ]
    if not t.tie_word_embeddings:
        out.append(Rule("language_model.lm_head.weight", "language_model/lm_head/kernel", lin))
    for name in ("input_layernorm", "post_attention_layernorm"):
        out.append(
            Rule(
                f"language_model.model.layers.{{i}}.{name}.weight",
                f"language_model/layers/{name}/scale",
                num_layers=tl,
            )
        )
    projections = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    for name in projections:
        path = name.replace(".", "/")
        out.append(
            Rule(
                f"language_model.model.layers.{{i}}.{name}.weight",
                f"language_model/layers/{path}/kernel",
                lin,
                tl,
            )
        )
        if t.attention_bias and name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
        ):
            out.append(
                Rule(
                    f"language_model.model.layers.{{i}}.{name}.bias",
                    f"language_model/layers/{path}/bias",
                    num_layers=tl,
                )
            )
    return out


def hf_output_key(canonical: str) -> str:
    """The spelling `jax_to_hf` writes: what transformers' own `save_pretrained` writes."""
    if canonical.startswith("vision_tower."):
        return "vision_tower.vision_model." + canonical[len("vision_tower.") :]
    return canonical
