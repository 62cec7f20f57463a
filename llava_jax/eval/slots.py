"""How long the eval engine's slots must be, known before any image is decoded.

An engine slot holds one prompt and its answer; its default length, the model's whole
context (32K for Qwen2), times the slots is many GB of KV cache. An eval needs only its
longest prompt plus the answer length. A prompt's length is its text's tokens plus each
image's token count, which depends on the image's size alone (`media_token_counts`), and an
image file's header holds its size: so the lengths come from one tokenization of the text and
one header read per image, never a decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llava_jax.eval.task import EvalDataError, Sample
from llava_jax.media.feature_plan import Media
from llava_jax.media.image_processing import ImageError, image_hw


def prompt_length(pipeline: Any, sample: Sample, sizes: dict | None = None) -> int:
    """Tokens of the prompt `pipeline.prompt` builds for `sample` (`sizes`: a cache of image
    sizes by reference, for questions that share an image)."""
    sizes = {} if sizes is None else sizes
    media = []
    for ref in sample.images:
        key = ref if isinstance(ref, bytes) else str(ref)
        if key not in sizes:
            sizes[key] = image_hw(ref)
        media.append(Media.image(*sizes[key]))
    ids = pipeline.tokenize([{"role": "user", "content": sample.text}], media).input_ids
    return len(ids)


def slot_length(pipeline: Any, samples: Sequence[Sample], max_new_tokens: int) -> int:
    """The longest prompt of `samples` plus `max_new_tokens`; the engine rounds it up to a
    shape bucket (capped at the context).

    Raises:
      EvalDataError: naming a question whose prompt and answer exceed the context, or whose
        image cannot be read.
    """
    context = pipeline.cfg.text.max_position_embeddings
    sizes: dict = {}
    longest = 0
    for s in samples:
        try:
            n = prompt_length(pipeline, s, sizes)
        except (ImageError, ValueError) as e:  # an unreadable image header, a bad prompt
            raise EvalDataError(f"question {s.question_id}: {e}") from None
        if n + max_new_tokens > context:
            raise EvalDataError(
                f"question {s.question_id}: prompt of {n} tokens + {max_new_tokens} new tokens "
                f"exceeds the model's context of {context}"
            )
        longest = max(longest, n)
    return min(longest + max_new_tokens, context)
