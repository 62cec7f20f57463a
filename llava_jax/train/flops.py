"""Model FLOPs of one train step, counted with MaxText's convention
(AI-Hypercomputer/maxtext `maxtext_utils.py`: `calculate_tflops_training_per_device`, and
`calculate_gemma3_vision_layers_tflops_per_device` for a frozen vision encoder).

A part that trains counts 3x its forward FLOPs (forward + two backward matmuls). The frozen
vision tower counts 1x (forward only: nothing before it needs gradients). A frozen LLM in
front of a trained connector counts 2x (forward plus the input-gradient backward; a project
convention). A frozen connector behind a trained tower counts 2x the same way.

Forward FLOPs: 2 per weight per token for every matmul (the patch convolution included),
4 * L * T^2 * width for attention scores and values, halved for the causal decoder, not for
the bidirectional tower; 2 * T * D * V for the unembedding. Embedding lookups, norms and
activations are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from llava_jax.config import LlavaConfig, Projector
from llava_jax.models.lora import ADAPTER_SUFFIXES


def _factors(labels: Mapping[str, str]) -> dict[str, int]:
    def trains(prefix):  # LoRA adapters' own FLOPs are negligible (rank << width)
        return any(p.startswith(prefix) and label != "frozen" and not p.endswith(ADAPTER_SUFFIXES)
                   for p, label in labels.items())  # fmt: skip

    adapters = [2 for p in labels if p.endswith(ADAPTER_SUFFIXES)]
    vision = 3 if trains("vision_tower/") else 1
    connector = 3 if trains("multi_modal_projector/") else (2 if vision == 3 else 1)
    # An LLM with LoRA adapters only computes input gradients (2) like a frozen one.
    llm = 3 if trains("language_model/") else (2 if max(vision, connector, *adapters) > 1 else 1)
    return {"vision": vision, "connector": connector, "llm": llm}


def vision_forward_flops(cfg: LlavaConfig, num_views: int) -> float:
    """Forward FLOPs of the tower on `num_views` views, up to the deepest selected layer."""
    v = cfg.vision
    layers = cfg.vision_layers_run
    tokens, d = v.num_positions, v.hidden_size
    per_layer = 4 * d * d + 2 * d * v.intermediate_size
    patch = v.patch_size**2 * v.num_channels * d * v.patches_per_side**2
    per_view = 2 * layers * per_layer * tokens + 2 * patch + 4 * layers * tokens**2 * d
    return float(num_views * per_view)


def connector_forward_flops(cfg: LlavaConfig, num_views: int) -> float:
    """Forward FLOPs of the connector on every token of `num_views` views."""
    d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    weights = d_in * d + (d * d if cfg.projector == Projector.MLP2X_GELU else 0)
    return float(2 * weights * num_views * cfg.tokens_per_view)


def llm_forward_flops(cfg: LlavaConfig, seq_lens: Iterable[int]) -> float:
    """Forward FLOPs of the decoder and unembedding on sequences of `seq_lens` tokens each."""
    t = cfg.text
    lens = [int(n) for n in seq_lens]
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    d = t.hidden_size
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size
    tokens = sum(lens)
    layers = t.num_hidden_layers
    matmuls = 2 * layers * per_layer * tokens
    attention = 0.5 * 4 * layers * sum(n * n for n in lens) * q
    unembed = 2 * tokens * d * t.vocab_size
    return float(matmuls + attention + unembed)


def train_flops_per_step(
    cfg: LlavaConfig,
    labels: Mapping[str, str],
    *,
    seq_lens: Iterable[int],
    num_views: int,
) -> float:
    """Model FLOPs of one optimizer step (all micro-batches, all devices).

    Args:
      cfg: the model config.
      labels: {"a/b/c": label} from `optim.trainable_labels`.
      seq_lens: the length of each attention span: every row's T for the padded count
        (MFU comparable to MaxText), or each real segment's length for "useful" FLOPs.
      num_views: views (crops, frames) in the step: B * V padded, or the real ones.
    """
    f = _factors(labels)
    return (
        f["vision"] * vision_forward_flops(cfg, num_views)
        + f["connector"] * connector_forward_flops(cfg, num_views)
        + f["llm"] * llm_forward_flops(cfg, seq_lens)
    )
