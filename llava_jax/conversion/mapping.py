"""The HF <-> JAX parameter mapping, one for all three families, used in both directions.

HF checkpoints spell the same tensor several ways (transformers `conversion_mapping.py`
and the v4.46 `convert_llava*_weights_to_hf.py` scripts): the llava-hf files
(`language_model.model.*`, `vision_tower.vision_model.*`), transformers-5 module paths
(`model.language_model.*`, `model.vision_tower.*`), and the original LLaVA / LLaVA-NeXT
repositories (`model.layers.*`, `model.mm_projector.0.*`, `model.vision_tower.vision_tower.*`).
`canonical_key` folds them all into one spelling. `rules` derives each parameter's canonical
key from its path in the model (module names mirror HF), so there is no table to keep in step.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.models.build import abstract_params


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


# Module names mirror HF, so an HF key follows from the parameter's path; only the leaf
# names differ (Flax: kernel / scale / embedding; torch: weight), and HF's causal LM has a
# `model.` level around its decoder that ours does not.
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_PREFIXES = (("language_model.lm_head.", "language_model.lm_head."),
             ("language_model.", "language_model.model."))  # fmt: skip


def rule_for(path: str, shape: tuple[int, ...]) -> Rule:
    """The rule of one parameter, from its path and shape."""
    *modules, leaf = path.split("/")
    stacked = "layers" in modules
    hf = ".".join([*(m + ".{i}" if m == "layers" else m for m in modules), _LEAVES.get(leaf, leaf)])
    for ours, theirs in _PREFIXES:
        if hf.startswith(ours):
            hf = theirs + hf[len(ours) :]
            break
    transform = Transform.COPY
    if leaf == "kernel":
        transform = Transform.CONV if len(shape) - stacked == 4 else Transform.LINEAR
    return Rule(hf, path, transform, num_layers=shape[0] if stacked else 0)


def rules(cfg: LlavaConfig) -> list[Rule]:
    """Every parameter of `LlavaModel(cfg)` with its canonical HF key."""
    return [rule_for(path, leaf.shape) for path, leaf in abstract_params(cfg).items()]


def hf_output_key(canonical: str) -> str:
    """The spelling `jax_to_hf` writes: what transformers' own `save_pretrained` writes."""
    if canonical.startswith("vision_tower."):
        return "vision_tower.vision_model." + canonical[len("vision_tower.") :]
    return canonical
