"""The per-sample transform of the training pipeline: `RawRecord` -> `Example`, or `SkipSample`.

It runs inside Grain's worker processes (`SampleTransform` is a picklable frozen dataclass)
and does, for one record:

1. Validate the LLaVA conversation: a non-empty list of `{"from": "human"|"gpt"|"system",
   "value": str}`, an optional system turn first, then human and gpt alternating. A leading
   gpt turn is dropped, as both original repos do (`preprocess_v1`, `preprocess_qwen`: "skip
   the first one if it is not from human").
2. Match the `<image>` / `<video>` placeholders against the media the record lists: the same
   number of each kind, or `placeholder_mismatch`. A record with an image but no `<image>` is
   a mismatch: neither original inserts one (haotian-liu/LLaVA encodes the image and then
   drops its features, `cur_image_features[0:0]`; LLaVA-NeXT does the same), so we neither
   invent a placeholder nor train on an image the text never shows. One exception, from
   LLaVA-NeXT's video data: a record with videos and no images whose text marks each video
   with `<image>` (the original's DEFAULT_IMAGE_TOKEN for frames) reads them as `<video>`.
3. Decode (`image_processing.load_image`: format allow-list, Pillow's pixel limit;
   `video.load_video`), and preprocess with the shared image preprocessing: AnyRes views for
   NeXT and single-image OneVision, one padded view per image for multi-image OneVision,
   one view per frame for video.
4. Render the conversation with the template and tokenize span by span
   (`prompt.tokenize_spans`), media tokens expanded to the feature plan's exact counts.
   "clean" masking trains each assistant reply and its end of turn (`plain`: the caption and
   its "\\n"); "reference" reproduces the original code's ids and labels (`masking.py`).
5. Budget before any truncation: media tokens are never cut. Clean masking: a sample over
   `max_len` first loses whole trailing rounds (a human turn and its gpt reply) that hold no
   placeholder, keeping as many rounds as fit and at least one; if even that is too long it
   is skipped as `too_long`. Reference masking cuts at `max_len` as the original does and
   trains on what is left, unless the cut would reach media tokens (`too_long`). A sample
   whose views exceed `max_views` is `too_long`; one left with no trained token is skipped as
   `no_supervised_tokens`.

Every failure is a `SkipSample` carrying one of `schema.SKIP_REASONS` and the record id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from llava_jax.config import Convention, LlavaConfig
from llava_jax.data import masking
from llava_jax.data.prompt import tokenize_spans
from llava_jax.data.schema import Example, RawRecord, SkipSample, conversations_problem
from llava_jax.data.sources import resolve_media
from llava_jax.data.templates import (
    IMAGE,
    PLACEHOLDER,
    VIDEO,
    ChatTemplate,
    PromptError,
    Template,
    get_template,
    render_spans,
)
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media, MediaLayout
from llava_jax.media.image_processing import ImageError, load_image, preprocess_images
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.media.video import VideoError, load_video, preprocess_video

# LLaVA JSON speaker names -> template roles.
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class SampleTransform:
    """Turns one `RawRecord` into an `Example`, or raises `SkipSample`.

    Attributes:
      cfg: the model config (token ids, feature layout: the exact media token counts).
      image_cfg: the image processor config; checked against `cfg`.
      tokenizer: the model's HF tokenizer.
      template: a named `Template` (or its name), or a `ChatTemplate` with `{% generation %}`
        blocks (clean masking only).
      max_len: the most tokens a sample may have, media tokens included.
      max_views: the most views (AnyRes crops, images, video frames) a sample may have.
      masking: "clean" or "reference" (the original code's ids and labels; the templates of
        `masking.REFERENCE_STYLES`).
      video_frames: frames sampled uniformly from each video.
      max_pixels: refuse images and video frames with more pixels (tightens Pillow's limit).
      drop_trailing_rounds: shorten an over-long conversation by whole trailing rounds
        instead of skipping it (clean masking; reference masking cuts as the original).
    """

    cfg: LlavaConfig
    image_cfg: ImageProcessorConfig
    tokenizer: Any
    template: Template | ChatTemplate | str
    _: dataclasses.KW_ONLY
    max_len: int
    max_views: int
    masking: Literal["clean", "reference"] = "clean"
    video_frames: int = 8
    max_pixels: int | None = None
    drop_trailing_rounds: bool = True

    def __post_init__(self):
        if isinstance(self.template, str):
            object.__setattr__(self, "template", get_template(self.template))
        self.image_cfg.check_model(self.cfg)
        if self.masking not in ("clean", "reference"):
            raise ValueError(f"masking {self.masking!r}: choose 'clean' or 'reference'")
        if self.masking == "reference":
            masking.reference_style(self.template)
        elif self.cfg.convention == Convention.ORIGINAL:
            # Clean ids differ from `tokenizer_image_token`'s (a "▁" after <image> for
            # SentencePiece), so the model would be trained on ids it is never run with.
            raise ValueError(
                "the model keeps the original repositories' prompt tokenization (converted from "
                "their checkpoint: convention 'original'); train it with masking='reference'"
            )
        if isinstance(self.template, ChatTemplate):
            try:  # a template without {% generation %} blocks cannot say what is trained
                render_spans(self.template, [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}])  # fmt: skip
            except PromptError as e:
                raise ValueError(str(e)) from None
        if self.max_len < 1 or self.max_views < 0 or self.video_frames < 1:
            raise ValueError(
                f"max_len ({self.max_len}) and video_frames ({self.video_frames}) must be "
                f">= 1, max_views ({self.max_views}) >= 0"
            )

    def __call__(self, record: RawRecord) -> Example:
        try:
            return self._transform(record)
        except SkipSample as e:
            if e.record_id == record.id:
                raise
            raise SkipSample(e.reason, e.detail, record.id) from None

    # -- the steps ---------------------------------------------------------------------------

    def _transform(self, record: RawRecord) -> Example:
        messages = parse_conversation(record.conversations)
        kinds, messages = match_placeholders(messages, len(record.images), len(record.videos))
        if "video" in kinds and self.cfg.video_token_id is None:
            raise SkipSample("placeholder_mismatch", f"{self.cfg.family} models take no video")
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipSample("no_supervised_tokens", "no gpt turn")

        images = [self._load_image(ref, record) for ref in record.images]
        videos = [self._load_video(ref, record) for ref in record.videos]
        queues = {
            "image": iter(Media.image(im.height, im.width) for im in images),
            "video": iter(Media.video(len(frames)) for frames in videos),
        }
        media = tuple(next(queues[kind]) for kind in kinds)  # in placeholder order

        layouts = feature_plan.media_layouts(self.cfg, media)
        n_views = sum(layout.num_views for layout in layouts)
        if n_views > self.max_views:
            raise SkipSample("too_long", f"{n_views} views > max_views {self.max_views}")
        input_ids, trained = self._tokenize(messages, layouts)
        if not trained.any():
            raise SkipSample("no_supervised_tokens", "no token of the sample is trained")
        # Images take their placeholders in record order, so their layouts are in that order.
        tilings = [layout.anyres for layout in layouts if layout.media.kind == "image"]
        views = self._views(images, tilings, videos, n_views)
        return Example.build(self.cfg, record.id, input_ids, trained, views, media, layouts)

    def _load_image(self, ref, record: RawRecord):
        source = resolve_media(ref, record.root, record.id)
        try:
            return load_image(source, self.max_pixels)
        except ImageError as e:
            raise SkipSample("corrupt_image", str(e)) from None

    def _load_video(self, ref, record: RawRecord) -> np.ndarray:
        source = resolve_media(ref, record.root, record.id)
        try:
            frames, _ = load_video(source, num_frames=self.video_frames, max_pixels=self.max_pixels)
        except VideoError as e:
            raise SkipSample("bad_video", str(e)) from None
        return frames

    def _views(self, images, tilings, videos, n_views: int) -> np.ndarray:
        """float32[V, S, S, 3]: every image's views (cut as `tilings`, their AnyRes layouts,
        say), then every video's frames."""
        s = self.image_cfg.view_size
        parts = []
        try:
            parts += [p.views for p in preprocess_images(images, self.image_cfg, tilings)]
        except ValueError as e:  # an aspect ratio too extreme to pad or resize
            raise SkipSample("corrupt_image", str(e)) from None
        parts += [preprocess_video(frames, self.image_cfg) for frames in videos]
        views = np.concatenate(parts) if parts else np.zeros((0, s, s, 3), np.float32)
        if len(views) != n_views:  # the feature plan and the preprocessing disagree: a bug
            raise RuntimeError(f"preprocessing made {len(views)} views, the plan {n_views}")
        return views

    def _tokenize(self, messages: list[Message], layouts: Sequence[MediaLayout]):
        """(int32[L], bool[L]): reference masking's, or clean masking's longest prefix of whole
        rounds within max_len."""
        if self.masking == "reference":
            media = [layout.media for layout in layouts]
            try:
                return masking.reference_tokenize(
                    self.template, messages, self.tokenizer, media, self.cfg, self.max_len, layouts
                )
            except PromptError as e:  # e.g. the media token's text written in the conversation
                raise SkipSample("placeholder_mismatch", str(e)) from None
        ids, trained = self._tokenize_all(messages, layouts)
        if len(ids) <= self.max_len:
            return ids, trained
        too_long = SkipSample(
            "too_long",
            f"{len(ids)} tokens ({int(np.isin(ids, self._media_ids).sum())} media) > "
            f"max_len {self.max_len}",
        )
        cuts = self._round_cuts(messages) if self.drop_trailing_rounds else []
        # Token count grows with the rounds kept: binary search the most that fit.
        best, lo, hi = None, 0, len(cuts) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = self._tokenize_all(messages[: cuts[mid]], layouts)
            if len(candidate[0]) <= self.max_len:
                best, lo = candidate, mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise too_long
        return best

    def _round_cuts(self, messages: list[Message]) -> list[int]:
        """Message counts that end a whole round, short of the full conversation, that keep
        every placeholder and at least one reply."""
        last_media = max(
            (i for i, m in enumerate(messages) if PLACEHOLDER.search(m["content"])), default=-1
        )
        return [
            i + 1
            for i, m in enumerate(messages[:-1])
            if m["role"] == "assistant" and i >= last_media
        ]

    def _tokenize_all(self, messages: list[Message], layouts: Sequence[MediaLayout]):
        try:
            spans = render_spans(self.template, messages)
        except PromptError as e:  # a Jinja template refusing this conversation
            raise SkipSample("malformed_record", str(e)) from None
        try:
            media = [layout.media for layout in layouts]
            ids, trained = tokenize_spans(self.tokenizer, spans, media, self.cfg, layouts)
        except PromptError as e:  # e.g. the media token's text written in the conversation
            raise SkipSample("placeholder_mismatch", str(e)) from None
        return ids.astype(np.int32), trained

    @property
    def _media_ids(self) -> list[int]:
        return [i for i in (self.cfg.image_token_id, self.cfg.video_token_id) if i is not None]


# -- conversation checks ---------------------------------------------------------------------


def parse_conversation(conversations: Any) -> list[Message]:
    """LLaVA `conversations` -> template messages `[{"role", "content"}]`, or SkipSample.

    Raises SkipSample: `malformed_record` (not a list of objects with string `from` and
    `value`, a system turn after the first, turns that do not alternate), `empty_conversation`
    (no turns, or a blank one), `unknown_role`.
    """
    if not isinstance(conversations, list):
        raise SkipSample("malformed_record", conversations_problem(conversations))
    if not conversations:
        raise SkipSample("empty_conversation", "conversations is empty")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise SkipSample("malformed_record", f"turn {i} is not a {{from, value}} object")
        speaker, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise SkipSample("malformed_record", f"turn {i}: value is a {type(value).__name__}")
        if not isinstance(speaker, str) or speaker not in ROLES:
            raise SkipSample(
                "unknown_role", f"turn {i}: from {speaker!r} is not human, gpt or system"
            )
        if not value.strip():
            raise SkipSample("empty_conversation", f"turn {i} ({speaker}) is empty")
        messages.append({"role": ROLES[speaker], "content": value})
    head = 1 if messages[0]["role"] == "system" else 0
    turn_numbers = list(range(len(messages)))
    if len(messages) > head and messages[head]["role"] == "assistant":
        del messages[head], turn_numbers[head]  # the originals skip a first turn not from human
    for i, m in enumerate(messages):
        want = "system" if i < head else ("user", "assistant")[(i - head) % 2]
        if m["role"] == "system" and i >= head:
            raise SkipSample(
                "malformed_record", f"turn {turn_numbers[i]}: a system turn after the first"
            )
        if m["role"] != want:
            raise SkipSample(
                "malformed_record",
                f"turn {turn_numbers[i]} is {m['role']} where {want} was expected; human and gpt "
                "turns must alternate",
            )
    return messages


def match_placeholders(
    messages: list[Message], n_images: int, n_videos: int
) -> tuple[list[str], list[Message]]:
    """Checks placeholders against the media; returns (kind of each placeholder, messages).

    A video-only record whose text marks its videos with `<image>` (LLaVA-NeXT video data)
    has them rewritten to `<video>`.
    """
    text = "".join(m["content"] for m in messages)
    found = [p[1:-1] for p in PLACEHOLDER.findall(text)]
    if n_videos and not n_images and "video" not in found and len(found) == n_videos:
        messages = [{**m, "content": m["content"].replace(IMAGE, VIDEO)} for m in messages]
        found = ["video"] * n_videos
    for kind, n in (("image", n_images), ("video", n_videos)):
        if found.count(kind) != n:
            raise SkipSample(
                "placeholder_mismatch",
                f"{_plural(found.count(kind), f'<{kind}> placeholder')} for {_plural(n, kind)}",
            )
    return found, messages


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
