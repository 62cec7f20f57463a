"""Everything needed to answer a prompt about images: model, tokenizer, processor, template.

`Pipeline.load(PATH)` accepts a llava-jax model directory (from `convert hf-to-jax` or
training) or a Hugging Face directory, which is converted in memory on the fly. Then
`pipeline.prompt(messages, images, video)` renders the conversation, preprocesses the media
and expands the placeholders into a `generator.Prompt`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax import model_io
from llava_jax.config import Family, LlavaConfig
from llava_jax.conversion import source
from llava_jax.data import prompt, templates
from llava_jax.errors import CheckpointError
from llava_jax.inference.generator import Generator, Prompt, SamplingConfig
from llava_jax.media import feature_plan, image_processing, video
from llava_jax.media.feature_plan import Media
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.models.llava import LlavaModel


def load_any_model(
    path: str | os.PathLike, echo: Callable[[str], None] = print, **overrides: Any
) -> tuple[LlavaModel, Path]:
    """(model, local directory holding its tokenizer and processor files) for a model in
    either format (`conversion/source.py`); an HF directory is converted in memory, and
    `echo` says so."""
    if source.format_of(path) == source.Format.HF:
        echo(f"{path} is a Hugging Face checkpoint: converting it in memory "
             "(`llava-jax convert hf-to-jax` does this once)")  # fmt: skip
    return source.load_model(path, **overrides), source.assets(path)


@dataclasses.dataclass
class Pipeline:
    model: LlavaModel
    tokenizer: Any
    image_config: ImageProcessorConfig
    template: templates.Template | templates.ChatTemplate | None  # None: raw prompts only
    generator: Generator

    @property
    def cfg(self) -> LlavaConfig:
        return self.model.cfg

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        template: str | None = None,
        raw: bool = False,
        echo: Callable[[str], None] = print,
        adapter: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Pipeline:
        """Loads a model and its assets; `template` None means the checkpoint's own.
        `adapter`: an adapter dir (LoRA, unmerged) trained on this model."""
        model, assets = load_any_model(path, echo, **overrides)
        if adapter is not None:
            from llava_jax.models import lora

            spec, params = model_io.load_adapter_dir(adapter)
            try:
                model = lora.with_adapter(model, spec, params)
            except ValueError as e:
                raise CheckpointError(f"{adapter}: does not fit {path}: {e}") from None
        tokenizer = prompt.load_tokenizer(assets)
        image_config = ImageProcessorConfig.from_pretrained(assets, model.cfg)
        chat = None if raw else templates.resolve_template(template, assets)
        generator = Generator(model, decode=lambda ids: tokenizer.decode(ids))
        return cls(model, tokenizer, image_config, chat, generator)

    def stop_config(self, **sampling: Any) -> SamplingConfig:
        """Sampling settings with the stop tokens and strings of this model and template."""
        eos = self.cfg.text.eos_token_id
        stops = {eos} if isinstance(eos, int) else set(eos or ())
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        strings = tuple(getattr(self.template, "stop_strings", ()) or ())
        stops |= set(prompt.stop_token_ids(self.tokenizer, strings))
        return SamplingConfig(stop_token_ids=tuple(sorted(stops)), stop_strings=strings, **sampling)

    def prompt(
        self,
        messages: Sequence[dict[str, str]] | str,
        images: Sequence[Any] = (),
        videos: Sequence[np.ndarray] = (),
    ) -> Prompt:
        """A ready `Prompt` from a conversation (or raw text) and its media, in order.

        Args:
          messages: `[{"role": ..., "content": "... <image> ..."}]`, or the raw prompt text.
          images: PIL images or paths, one per `<image>` placeholder.
          videos: decoded frames uint8[F, H, W, 3], one per `<video>` placeholder.
        """
        pil = [image_processing.load_image(i) if isinstance(i, str | Path) else i for i in images]
        media = [Media.image(*image_processing.pixels_hw(i)) for i in pil]
        media += [Media.video(len(v)) for v in videos]
        text_only = self.tokenize(messages, media)
        # Images take their placeholders in the order given, so their layouts are in that order.
        tilings = [lo.anyres for lo in text_only.layouts if lo.media.kind == "image"]
        multi = len(pil) > 1 and self.cfg.family == Family.LLAVA_ONEVISION
        views = [
            image_processing.preprocess_image(i, self.image_config, multi, tiling).views
            for i, tiling in zip(pil, tilings, strict=True)
        ]
        views += [video.preprocess_video(v, self.image_config) for v in videos]
        return dataclasses.replace(text_only, views=np.concatenate(views) if views else None)

    def tokenize(self, messages: Sequence[dict[str, str]] | str, media: Sequence[Media]) -> Prompt:
        """The prompt without its pixels: token ids (media tokens expanded), its media in text
        order and their layouts, from the media's geometry alone (a prompt's length before its
        pixels are loaded).

        Args:
          messages: as `prompt`'s.
          media: the images' then the videos' `Media`, each kind in placeholder order.
        """
        if isinstance(messages, str):
            text = messages
        else:
            text = templates.render(self.template, messages, add_generation_prompt=True)
        ordered = tuple(_in_text_order(text, list(media)))
        layouts = feature_plan.media_layouts(self.cfg, ordered)
        ids = prompt.tokenize_prompt(self.tokenizer, text, ordered, self.cfg, layouts=layouts)
        return Prompt(ids, None, ordered, layouts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _in_text_order(text: str, media: list[Media]) -> list[Media]:
    """Images and videos interleaved as their placeholders appear in `text`."""
    images = iter([m for m in media if m.kind == "image"])
    videos = iter([m for m in media if m.kind == "video"])
    order = []
    i = 0
    while True:
        found = [(text.find(tag, i), tag) for tag in ("<image>", "<video>")]
        found = [(pos, tag) for pos, tag in found if pos >= 0]
        if not found:
            break
        pos, tag = min(found)
        item = next(images if tag == "<image>" else videos, None)
        if item is not None:
            order.append(item)
        i = pos + len(tag)
    # Media without a placeholder are left for tokenize_prompt to report.
    return order + list(images) + list(videos)
