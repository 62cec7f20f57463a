"""Does this install reproduce transformers? Tiny random models, converted and compared.

For each family: build a tiny random transformers model in-process (nothing is downloaded),
`save_pretrained` it, convert it with `convert_hf_to_jax`, load the result, run both on the
same random image prompt (non-square for the AnyRes families, so unpadding and the grid
really happen) and compare the image features and the logits, float32 on CPU.

The models come from `llava_jax.checks.tiny_hf`, the same builders the test suite uses.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FAMILIES = ("llava", "llava_next", "llava_onevision")
ATOL = 1e-4  # float32; observed ~1e-6

# Image (height, width) per family: NeXT 1x2 grid with unpadding, OneVision 2x2 grid.
IMAGE_HW = {"llava": (42, 42), "llava_next": (30, 50), "llava_onevision": (40, 55)}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    family: str
    num_params: int
    max_feature_diff: float
    max_logit_diff: float
    seconds: float

    @property
    def passed(self) -> bool:
        # `<=` is False for NaN, so a NaN fails.
        return self.max_feature_diff <= ATOL and self.max_logit_diff <= ATOL


def build_tiny_hf_model(family: str):
    """A tiny random transformers model of `family`, in eval mode."""
    from llava_jax.checks import tiny_hf

    if family not in tiny_hf.BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return tiny_hf.BUILDERS[family]()


def check_family(family: str, workdir: str | os.PathLike) -> CheckResult:
    """Builds, saves, converts and compares one family; files go under `workdir`."""
    import torch

    from llava_jax.checks import tiny_hf
    from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
    from llava_jax.conversion.source import load_model
    from llava_jax.media.feature_plan import (
        Media,
        build_feature_plan,
        check_placeholders,
        num_views,
    )
    from llava_jax.models.build import model_params

    start = time.perf_counter()
    workdir = Path(workdir)
    hf = build_tiny_hf_model(family)
    hf.save_pretrained(workdir / "hf")
    convert_hf_to_jax(workdir / "hf", workdir / "jax")
    model = load_model(workdir / "jax")

    rng = np.random.RandomState(0)
    image_hw = IMAGE_HW[family]
    media = [Media.image(*image_hw)]
    # HF layout [V, C, S, S].
    crop = tiny_hf.CROP
    views = rng.randn(num_views(model.cfg, media[0]), 3, crop, crop).astype(np.float32)
    plan = build_feature_plan(model.cfg, [media], max_views=len(views))
    num_tokens = plan.num_image_tokens[0]
    text = lambda n: list(rng.randint(2, 140, size=n))  # noqa: E731
    ids = np.array([[1, *text(3), *[tiny_hf.IMAGE_TOKEN] * num_tokens, *text(4)]], np.int32)
    check_placeholders(model.cfg, ids, plan)

    pixels = views[None].transpose(0, 1, 3, 4, 2)  # ours: [B, V, S, S, C]
    logits, features = _forward(model, ids, pixels, plan.taps, plan.weights)
    hf_inputs = {"pixel_values": torch.tensor(views)}
    if family != "llava":  # AnyRes: [B, V, C, S, S] plus each image's original size
        hf_inputs = {
            "pixel_values": torch.tensor(views)[None],
            "image_sizes": torch.tensor([image_hw]),
        }
    with torch.no_grad():
        ref_logits = hf(input_ids=torch.tensor(ids, dtype=torch.long), **hf_inputs).logits
        feats = hf.model.get_image_features(**hf_inputs, return_dict=True).pooler_output
    ref_features = torch.cat(list(feats)).reshape(-1, feats[0].shape[-1]).numpy()
    features = np.asarray(features)[0, : len(ref_features)]
    return CheckResult(
        family=family,
        num_params=sum(int(np.size(p)) for p in model_params(model).values()),
        max_feature_diff=_max_abs_diff(features, ref_features),
        max_logit_diff=_max_abs_diff(np.asarray(logits), ref_logits.numpy()),
        seconds=time.perf_counter() - start,
    )


def _forward(model, ids, pixels, taps, weights):
    """(logits, image features) of our model, compiled once as a whole."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, ids, pixels, taps, weights):
        out = nnx.merge(graphdef, state)(ids, pixel_values=pixels, taps=taps, tap_weights=weights)
        return out.logits, out.image_features

    args = (state, ids, pixels, taps, weights)
    # "highest": true float32 matmuls on GPU/TPU too (their default is TF32 / bf16 passes,
    # ~1e-3 off, which would fail a float32 comparison for the wrong reason).
    with jax.default_matmul_precision("highest"):
        lowered = jax.jit(forward).lower(*args)
    # Unoptimised XLA compiles the tiny model ~4x faster on CPU (the run is ~20 ms either
    # way); its results differ from the optimised build by ~1e-7, far inside ATOL.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=options)(*args)


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("nan")  # a shape mismatch fails the check
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def format_table(results: Sequence[CheckResult]) -> str:
    """A fixed-width table, one row per family."""
    header = ("family", "params", "max |feature diff|", "max |logit diff|", "seconds", "result")
    rows = [header] + [
        (
            r.family,
            f"{r.num_params:,}",
            f"{r.max_feature_diff:.2e}",
            f"{r.max_logit_diff:.2e}",
            f"{r.seconds:.1f}",
            "PASS" if r.passed else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
