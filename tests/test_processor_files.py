"""Processor files as transformers 5 saves them: settings nested in `processor_config.json`.

Each directory is written by transformers 5.24's own `save_pretrained` (model, then the
processor with its tokenizer and chat template), as a user who saved a checkpoint has it:
no `preprocessor_config.json`. Loaded with `Pipeline.load`, a non-square image must give
transformers' pixels (PIL backend, loaded back by `AutoImageProcessor`) and the same greedy
tokens. The settings differ from what `ImageProcessorConfig.for_model` would guess, so a
loader that misses the file fails here.
"""

from __future__ import annotations

import json

import hf_tiny
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.config import LlavaConfig
from llava_jax.data.templates import load_chat_template
from llava_jax.inference.pipeline import Pipeline
from llava_jax.media.processor_config import ImageProcessorConfig, find_processor_dict

CROP = hf_tiny.CROP
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


class _OnevisionWithoutVideo(transformers.LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor minus its video processor, which needs torchvision (not
    installed here); saving still runs transformers' `ProcessorMixin.save_pretrained`."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.num_image_tokens = kwargs.get("num_image_tokens")
        self.vision_feature_select_strategy = kwargs.get("vision_feature_select_strategy")
        self.vision_aspect_ratio = kwargs.get("vision_aspect_ratio", "anyres_max_9")
        transformers.ProcessorMixin.__init__(
            self, image_processor, tokenizer, chat_template=chat_template
        )


def _llava_processor(tokenizer):
    # HF's default for LLaVA: resize the shortest edge and centre crop (for_model would pad).
    image = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}
    )
    return transformers.LlavaProcessor(
        image_processor=image, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )  # fmt: skip


def _next_processor(tokenizer):
    # SigLIP's mean / std on a CLIP tower: for_model would take CLIP's.
    image = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=hf_tiny.NEXT_PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    return transformers.LlavaNextProcessor(
        image_processor=image, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip


def _onevision_processor(tokenizer):
    # CLIP's mean / std (the class default) on a SigLIP tower: for_model would take 0.5.
    image = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, image_grid_pinpoints=hf_tiny.OV_PINPOINTS
    )
    return _OnevisionWithoutVideo(
        image_processor=image, tokenizer=tokenizer, num_image_tokens=9,
        vision_feature_select_strategy="full",
    )  # fmt: skip


PROCESSORS = {
    "llava": _llava_processor,
    "llava_next": _next_processor,
    "llava_onevision": _onevision_processor,
}


def _save(path, family):
    model = hf_tiny.BUILDERS[family]()
    model.save_pretrained(path)
    PROCESSORS[family](build_tiny_tokenizer()).save_pretrained(path)
    return model


def _image(h, w):
    rng = np.random.RandomState(h * w)
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))


@pytest.mark.parametrize("family", list(PROCESSORS))
def test_transformers5_processor_dir_gives_transformers_pixels_and_tokens(tmp_path, family):
    model = _save(tmp_path, family)
    assert not (tmp_path / "preprocessor_config.json").exists()  # the layout under test
    assert "image_processor" in json.loads((tmp_path / "processor_config.json").read_text())

    pipeline = Pipeline.load(tmp_path, raw=True, echo=lambda _: None)
    hf_image = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    for h, w in [(60, 90), (130, 50)]:  # landscape and portrait
        image = _image(h, w)
        prompt = pipeline.prompt(PROMPT, [image])
        ref = hf_image(images=[image], return_tensors="np")["pixel_values"][0]
        ref = (ref[None] if ref.ndim == 3 else ref).transpose(0, 2, 3, 1)
        assert prompt.views.shape == ref.shape, f"{h}x{w}: views differ in shape"
        diff = np.abs(prompt.views - ref).max()
        assert diff == 0, f"{h}x{w}: pixels differ from transformers' by up to {diff:.3g}"

        result = pipeline.generator.generate([prompt], pipeline.stop_config(max_new_tokens=8))[0]
        pixels = torch.tensor(ref.transpose(0, 3, 1, 2))
        kwargs = {"pixel_values": pixels}
        if family != "llava":
            kwargs = {"pixel_values": pixels[None], "image_sizes": torch.tensor([[h, w]])}
        with torch.no_grad():  # transformers checks the image token count against its features
            out = model.generate(
                input_ids=torch.tensor(prompt.input_ids)[None], max_new_tokens=8,
                do_sample=False, **kwargs,
            )  # fmt: skip
        want = out[0, len(prompt.input_ids) :].tolist()
        eos = model.generation_config.eos_token_id
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert result.token_ids == want, f"{h}x{w}: greedy tokens differ from transformers'"


def test_chat_template_saved_by_a_transformers5_processor(tmp_path):
    _save(tmp_path, "llava")
    want = transformers.AutoProcessor.from_pretrained(tmp_path).chat_template
    assert want == TEMPLATE
    assert load_chat_template(tmp_path).text == want
    assert Pipeline.load(tmp_path, echo=lambda _: None).template.text == want


def _write(path, name, d):
    (path / name).write_text(d if isinstance(d, str) else json.dumps(d))


LLAVA_CROP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
              "crop_size": {"height": 336, "width": 336}, "do_center_crop": True}  # fmt: skip


def test_nested_settings_win_over_preprocessor_config_as_in_transformers(tmp_path):
    _write(tmp_path, "processor_config.json", {"image_processor": LLAVA_CROP})
    _write(tmp_path, "preprocessor_config.json", {**LLAVA_CROP, "do_pad": True})
    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert not getattr(hf, "do_pad", False)
    model = LlavaConfig.llava15_7b()
    assert ImageProcessorConfig.from_pretrained(tmp_path, model).aspect_ratio == "crop"
    # A legacy processor_config.json (no nested settings) leaves preprocessor_config.json in use.
    _write(tmp_path, "processor_config.json", {"processor_class": "LlavaProcessor"})
    assert ImageProcessorConfig.from_pretrained(tmp_path, model).aspect_ratio == "pad"


@pytest.mark.parametrize(
    "files, match",
    [
        ({"processor_config.json": "{not json"}, r"processor_config\.json: not valid JSON"),
        ({"processor_config.json": "[]"}, r"processor_config\.json: expected a JSON object"),
        ({"processor_config.json": {"image_processor": 3}},
         r"processor_config\.json\[image_processor\]: expected a JSON object"),
        ({"processor_config.json": {"image_processor": {"bogus": 1}}},
         r"processor_config\.json\[image_processor\]: .*unsupported keys \['bogus'\]"),
        ({"processor_config.json": {"image_processor": {"image_processor_type": "SamProcessor"}}},
         r"processor_config\.json\[image_processor\]: .*'SamProcessor' is not"),
        ({"preprocessor_config.json": "{"}, r"preprocessor_config\.json: not valid JSON"),
    ],
)  # fmt: skip
def test_a_processor_file_that_cannot_be_used_is_refused(tmp_path, files, match):
    for name, d in files.items():
        _write(tmp_path, name, d)
    model = LlavaConfig.llava15_7b()
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig.from_pretrained(tmp_path, model)


OV_IMAGE = {"image_processor_type": "LlavaOnevisionImageProcessor",
            "size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7)
                                     for j in range(1, 7)]}  # fmt: skip
# With the keys a saved LlavaOnevisionVideoProcessor carries besides the pixel settings.
OV_VIDEO = {"video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "resample": 3, "default_to_square": False,
            "do_center_crop": None, "crop_size": None, "do_sample_frames": False, "fps": None,
            "num_frames": None, "return_metadata": False, "video_metadata": None,
            "data_format": "channels_first",
            "processor_class": "LlavaOnevisionProcessor"}  # fmt: skip


@pytest.mark.parametrize("where", ["nested", "video_preprocessor_config.json"])
def test_onevision_video_processor_is_read_and_must_match_the_images(tmp_path, where):
    model = LlavaConfig.onevision_qwen2("0.5b")

    def save(video):
        if where == "nested":
            _write(tmp_path, "processor_config.json",
                   {"image_processor": OV_IMAGE, "video_processor": video})  # fmt: skip
        else:
            _write(tmp_path, "processor_config.json", {"image_processor": OV_IMAGE})
            _write(tmp_path, "video_preprocessor_config.json", video)

    save({**OV_VIDEO, "do_sample_frames": True, "num_frames": 16})
    assert find_processor_dict(tmp_path, "video_processor").settings["num_frames"] == 16
    assert ImageProcessorConfig.from_pretrained(tmp_path, model).video_num_frames == 16
    save({**OV_VIDEO, "image_mean": [0.48145466, 0.4578275, 0.40821073]})
    with pytest.raises(ValueError, match=r"video processor differs .* \['image_mean'\]"):
        ImageProcessorConfig.from_pretrained(tmp_path, model)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_a_prompt_works_out_each_images_anyres_geometry_once(tmp_path, monkeypatch, family):
    """`Pipeline.prompt` computes each image's layout once and the `Prompt` carries it to the
    generator's feature plan: the canvas is chosen once per image, not three times (pixels,
    token count, feature plan)."""
    from llava_jax.media import anyres

    _save(tmp_path, family)
    pipeline = Pipeline.load(tmp_path, raw=True, echo=lambda _: None)
    calls = []
    choose = anyres.select_best_resolution
    monkeypatch.setattr(anyres, "select_best_resolution", lambda *a: calls.append(a) or choose(*a))
    prompt = pipeline.prompt(PROMPT, [_image(60, 90)])
    pipeline.generator.generate([prompt], pipeline.stop_config(max_new_tokens=2))
    assert len(calls) == 1
    assert [lo.media for lo in prompt.layouts] == list(prompt.media)
