"""What trains, and how: parameter labels from the config's patterns, and the optimizer.

Every parameter gets one label: "train" (the main learning rate), "vision" (the vision
tower's own learning rate, OneVision), "projector" (the connector's own learning rate, the
reference's `mm_projector_lr`, used by its LoRA recipes), or "frozen". LoRA adapters always
train; the layers that carry them never do. The optimizer is built over the trained
parameters only (`train/setup.py` splits them from the frozen ones once), so frozen
parameters hold no optimizer state, get no gradient and receive no update.

The schedules follow Hugging Face's `get_cosine_schedule_with_warmup` /
`get_constant_schedule_with_warmup` with `warmup_steps = ceil(warmup_ratio * total_steps)`:
the learning rate of the update that follows `count` earlier updates is
`lr * count / warmup` during warmup, then a half cosine down to 0 at `total_steps`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import optax

from llava_jax.models.lora import ADAPTER_SUFFIXES
from llava_jax.param_paths import flat_to_nested

LABELS = ("train", "vision", "projector", "frozen")
VISION_PREFIX = "vision_tower/"
PROJECTOR_PREFIX = "multi_modal_projector/"
# Leaf names that get no weight decay: biases and every norm's scale and bias (the
# reference's `create_optimizer` excludes biases and LayerNorm / RMSNorm weights).
NO_DECAY_LEAVES = ("bias", "scale")


def trainable_labels(param_paths: Iterable[str], config) -> dict[str, str]:
    """{"a/b/c": "train" | "vision" | "projector" | "frozen"} from `config.train.trainable`.

    A path is trainable when some pattern matches it in full. Vision-tower parameters that
    match take the label "vision", which needs `optimizer.vision_lr > 0`; connector ones
    take "projector" when `optimizer.projector_lr > 0`. LoRA adapters
    ("..._lora_a", "..._lora_b") are "train" without a pattern.

    Raises:
      ValueError: a pattern that matches no parameter, vision-tower parameters made
        trainable while `optimizer.vision_lr` is 0 (or the reverse), or a pattern that
        makes a layer with adapters trainable.
    """
    all_paths = list(param_paths)
    adapters = [p for p in all_paths if p.endswith(ADAPTER_SUFFIXES)]
    adapted = tuple(p.removesuffix("_lora_a") for p in adapters if p.endswith("_lora_a"))
    paths = [p for p in all_paths if p not in adapters]
    patterns = list(config.train.trainable)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"train.trainable: bad pattern {pattern!r}: {e}") from None
    used = [False] * len(compiled)
    labels = {}
    for path in paths:
        hits = [i for i, rx in enumerate(compiled) if rx.fullmatch(path)]
        for i in hits:
            used[i] = True
        if not hits:
            labels[path] = "frozen"
        else:
            labels[path] = "vision" if path.startswith(VISION_PREFIX) else "train"
    both = [p for p in paths if labels[p] != "frozen" and p.startswith(adapted)]
    if both:
        raise ValueError(
            f"train.trainable makes {both[0]} trainable, but its layer has LoRA adapters "
            "(train.lora); narrow the pattern (e.g. 'multi_modal_projector/.*')"
        )
    labels.update({p: "train" for p in adapters})
    unused = [p for p, u in zip(patterns, used, strict=True) if not u]
    if unused:
        raise ValueError(f"train.trainable: {unused} match no parameter")
    if float(config.optimizer.projector_lr) > 0:
        projector = [p for p in paths if p.startswith(PROJECTOR_PREFIX) and labels[p] == "train"]
        if not projector:
            raise ValueError(
                f"optimizer.projector_lr is {config.optimizer.projector_lr} but train.trainable "
                "matches no multi_modal_projector parameter"
            )
        labels.update({p: "projector" for p in projector})
    vision_lr = float(config.optimizer.vision_lr)
    trains_vision = "vision" in labels.values()
    if trains_vision and vision_lr <= 0:
        raise ValueError(
            "train.trainable makes vision_tower parameters trainable but optimizer.vision_lr "
            "is 0 (the vision tower's learning rate; 0 means frozen)"
        )
    if vision_lr > 0 and not trains_vision:
        raise ValueError(
            f"optimizer.vision_lr is {vision_lr} but train.trainable matches no vision_tower "
            "parameter; add 'vision_tower/.*' or set vision_lr to 0"
        )
    return labels


def lr_schedule(
    peak: float, total_steps: int, warmup_ratio: float, kind: str
) -> Callable[[jax.Array], jax.Array]:
    """count (updates already applied) -> the learning rate of the next update."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = math.ceil(total_steps * warmup_ratio)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup, 1)
        if kind == "constant":
            after = jnp.ones_like(count)
        else:
            progress = jnp.clip((count - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak * jnp.where(count < warmup, warm, after)

    return schedule


def lr_schedules(config, total_steps: int) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """{"train": schedule, "vision": ..., "projector": ...}, the last two only when their
    learning rate is > 0."""
    o = config.optimizer
    out = {"train": lr_schedule(o.lr, total_steps, o.warmup_ratio, o.schedule)}
    if o.vision_lr > 0:
        out["vision"] = lr_schedule(o.vision_lr, total_steps, o.warmup_ratio, o.schedule)
    if o.projector_lr > 0:
        out["projector"] = lr_schedule(o.projector_lr, total_steps, o.warmup_ratio, o.schedule)
    return out


def decay_mask(params: Mapping) -> Mapping:
    """True where weight decay applies: every leaf except biases and norm parameters."""

    def keep(path, leaf):
        return getattr(path[-1], "key", None) not in NO_DECAY_LEAVES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    config, total_steps: int, labels: Mapping[str, str]
) -> optax.GradientTransformation:
    """AdamW per label group, global-norm clipping over the trained gradients.

    Args:
      config: the training config (`optimizer.*`).
      total_steps: optimizer updates in the run (for the schedule).
      labels: flat {"a/b/c": label} from `trainable_labels`; "frozen" ones are left out.

    The transformation takes nested param / gradient trees of the trained parameters only:
    frozen parameters have no optimizer state, no gradient and no update. Gradient
    accumulation is not here: the train step averages its micro-batches before one update.
    """
    o = config.optimizer
    nested = flat_to_nested({p: label for p, label in labels.items() if label != "frozen"})

    def adamw(schedule):
        return optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        )

    used = set(jax.tree.leaves(nested))
    schedules = lr_schedules(config, total_steps)
    groups = {name: adamw(s) for name, s in schedules.items() if name in used}
    chain = []
    if o.grad_clip and o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(optax.multi_transform(groups, nested))
    return optax.chain(*chain)
