"""Prompt tokenization: placeholders expanded to the feature plan's counts, with the ids of
transformers' LLaVA processors, and every placeholder/media mismatch refused on the host."""

import hf_tiny
import numpy as np
import pytest
import transformers
from PIL import Image
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from llava_jax.checks.tiny_tokenizer import (
    build_tiny_bytelevel_tokenizer,
    build_tiny_tokenizer,
    save_tiny_tokenizer,
)
from llava_jax.conversion.hf_config import from_hf_config
from llava_jax.data import templates
from llava_jax.data.prompt import (
    PromptError,
    load_tokenizer,
    media_token_counts,
    stop_token_ids,
    tokenize_prompt,
    tokenize_spans,
)
from llava_jax.errors import CheckpointError
from llava_jax.media.feature_plan import Media, sample_plan

IMAGE, VIDEO = hf_tiny.IMAGE_TOKEN, hf_tiny.VIDEO_TOKEN
IMG, VID = Media.image(9, 9), Media.video(2)


def llava_cfg():
    hf = transformers.LlavaConfig(
        vision_config=hf_tiny.clip_config(),
        text_config=hf_tiny.llama_config(),
        image_token_index=IMAGE,
    )
    return from_hf_config(hf.to_dict())


def next_cfg():
    hf = transformers.LlavaNextConfig(
        vision_config=hf_tiny.clip_config(),
        text_config=hf_tiny.llama_config(),
        image_token_index=IMAGE,
        image_grid_pinpoints=hf_tiny.NEXT_PINPOINTS,
    )
    return from_hf_config(hf.to_dict())


def ov_cfg():
    hf = transformers.LlavaOnevisionConfig(
        vision_config=hf_tiny.siglip_config(),
        text_config=hf_tiny.qwen2_config(),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=hf_tiny.OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )
    return from_hf_config(hf.to_dict())


CONFIGS = {"llava": llava_cfg, "llava_next": next_cfg, "llava_onevision": ov_cfg}
CROP = {"height": hf_tiny.CROP, "width": hf_tiny.CROP}


def llava_processor(tokenizer):
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": hf_tiny.CROP}, crop_size=CROP)
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def next_processor(tokenizer):
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": hf_tiny.CROP},
        crop_size=CROP,
        image_grid_pinpoints=hf_tiny.NEXT_PINPOINTS,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def ov_processor(tokenizer):
    # LlavaOnevisionProcessor.__init__ insists on its video processor, which needs torchvision
    # (not installed); the image path needs only these attributes.
    processor = object.__new__(transformers.LlavaOnevisionProcessor)
    vars(processor).update(
        tokenizer=tokenizer,
        image_processor=LlavaOnevisionImageProcessorPil(
            size=CROP, image_grid_pinpoints=hf_tiny.OV_PINPOINTS
        ),
        num_image_tokens=9,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="<video>",
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_aspect_ratio="anyres_max_9",
        chat_template=None,
    )
    return processor


def pil(h, w):
    return Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), np.uint8))


def test_tiny_tokenizer_fits_the_tiny_models():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == hf_tiny.VOCAB
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [IMAGE, VIDEO]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)  # LlamaConfig defaults


def test_tiny_bytelevel_tokenizer_is_qwen2_like():
    tokenizer = build_tiny_bytelevel_tokenizer()
    assert len(tokenizer) == hf_tiny.VOCAB
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [IMAGE, VIDEO]
    text = "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "user", "Ċ", "<image>", "Ċ", "W", "h", "at", "Ġ", "is", "Ġi", "t", "?",
        "<|im_end|>", "Ċ",
    ]  # no BOS; a space belongs to the word after it  # fmt: skip
    assert tokenizer.decode(ids) == text


# (family, media, expected tokens per item): counts by hand where they are short to derive.
COUNT_CASES = [
    ("llava", [Media.image(30, 50)], [9]),  # 3x3 patches, CLS dropped
    ("llava", [Media.image(30, 50), Media.image(500, 20)], [9, 9]),
    ("llava_next", [Media.image(37, 90)], None),  # non-square AnyRes: base + unpadded grid
    ("llava_next", [Media.image(90, 37), Media.image(42, 42)], None),
    ("llava_onevision", [Media.image(37, 290)], None),  # single image: anyres_max_9
    ("llava_onevision", [Media.image(37, 290), Media.image(30, 50)], [10, 10]),  # 9 + newline
    ("llava_onevision", [Media.video(4)], [4 * 2 * 2 + 1]),  # 3x3 pooled to 2x2, one newline
    ("llava_onevision", [Media.image(30, 50), Media.video(3), Media.image(9, 9)], [10, 13, 10]),
]


@pytest.mark.parametrize("family, media, expected", COUNT_CASES)
def test_expansion_gives_the_feature_plan_counts(family, media, expected):
    cfg = CONFIGS[family]()
    counts = media_token_counts(cfg, media)
    if expected is not None:
        assert counts == expected
    _, _, image_tokens, video_tokens = sample_plan(cfg, media)
    assert sum(c for c, m in zip(counts, media, strict=True) if m.kind == "image") == image_tokens
    assert sum(c for c, m in zip(counts, media, strict=True) if m.kind == "video") == video_tokens

    text = "Look: " + " and ".join(f"<{m.kind}>" for m in media) + " what?"
    ids = tokenize_prompt(build_tiny_tokenizer(), text, media, cfg)
    assert ids.dtype == np.int32
    # Each placeholder becomes one run of its kind's id, of its item's length, in order.
    media_ids = np.isin(ids, [IMAGE, VIDEO])
    starts = np.flatnonzero(media_ids & ~np.r_[False, media_ids[:-1]])
    ends = np.flatnonzero(media_ids & ~np.r_[media_ids[1:], False]) + 1
    runs = [(int(ids[s]), e - s) for s, e in zip(starts, ends, strict=True)]
    assert runs == [
        ({"image": IMAGE, "video": VIDEO}[m.kind], c) for m, c in zip(media, counts, strict=True)
    ]


PARITY_TEXTS = [
    "USER: <image>\nWhat is this? ASSISTANT:",
    "<image>",
    "x<image>y",  # no space either side: the text after an added token gets no prefix space
    "Describe <image> and then <image> please.",
    "<|im_start|>user\n<image>\n<image>\ncompare<|im_end|>\n<|im_start|>assistant\n",
]
IMAGE_SIZES = [(30, 50), (37, 90), (90, 37), (200, 21)]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_ids_equal_the_transformers_processor(family, text):
    cfg = CONFIGS[family]()
    tokenizer = build_tiny_tokenizer(add_bos=family != "llava_onevision")
    make = {"llava": llava_processor, "llava_next": next_processor}.get(family, ov_processor)
    n = text.count("<image>")
    sizes = IMAGE_SIZES[:n] if n > 1 else [IMAGE_SIZES[1]]
    want = make(tokenizer)(images=[[pil(*hw) for hw in sizes]], text=[text])["input_ids"][0]
    media = [Media.image(*hw) for hw in sizes]
    assert tokenize_prompt(tokenizer, text, media, cfg).tolist() == list(want)


def test_video_count_equals_the_transformers_processor():
    pixel_values_videos = [np.zeros((5, 3, hf_tiny.CROP, hf_tiny.CROP), np.float32)]
    want = transformers.LlavaOnevisionProcessor.replace_video_token(
        ov_processor(None), {"pixel_values_videos": pixel_values_videos}, 0
    ).count("<video>")
    assert media_token_counts(ov_cfg(), [Media.video(5)]) == [want]


@pytest.mark.parametrize(
    "family, text, media, match",
    [
        (
            "llava",
            "<image><image>",
            [IMG],
            "^prompt has 2 <image> placeholders but 1 image was given$",
        ),
        (
            "llava",
            "no placeholder",
            [IMG],
            "prompt has 0 <image> placeholders but 1 image was given",
        ),
        ("llava", "<image>", [], "prompt has 1 <image> placeholder but 0 images were given"),
        ("llava_onevision", "<video>", [], "1 <video> placeholder but 0 videos were given"),
        (
            "llava_onevision",
            "<video><image>",
            [IMG, VID],
            "placeholder 1 is <video> but media item 1 is an image",
        ),
        ("llava", "<video>", [VID], "llava models take no video"),
    ],
)
def test_placeholder_and_media_mismatches_are_refused(family, text, media, match):
    with pytest.raises(PromptError, match=match):
        tokenize_prompt(build_tiny_tokenizer(), text, media, CONFIGS[family]())


def test_the_image_token_string_outside_placeholders_is_refused():
    # A model whose image token string differs from the placeholder: typed literally, the
    # string would become a second image position that no feature fills.
    cfg = llava_cfg().replace(image_token_id=152)  # "<|im_start|>"
    tokenizer = build_tiny_tokenizer()
    ids = tokenize_prompt(tokenizer, "a <image> b", [Media.image(9, 9)], cfg)
    assert (ids == 152).sum() == 9
    with pytest.raises(PromptError, match=r"2 '<\|im_start\|>' tokens for 1 <image> placeholder"):
        tokenize_prompt(tokenizer, "<|im_start|> <image>", [Media.image(9, 9)], cfg)


def test_a_tokenizer_without_the_model_image_token_is_refused():
    cfg = llava_cfg().replace(image_token_id=120)  # an ordinary vocabulary entry
    with pytest.raises(PromptError, match="no added token with the model's image_token_id 120"):
        tokenize_prompt(build_tiny_tokenizer(), "<image>", [Media.image(9, 9)], cfg)


def test_bos_is_added_once():
    tokenizer, cfg = build_tiny_tokenizer(), llava_cfg()
    ids = tokenize_prompt(tokenizer, "hi", [], cfg)
    assert ids[0] == 1 and (ids == 1).sum() == 1
    with_bos = tokenize_prompt(tokenizer, "<s>hi", [], cfg)  # raw text that brings its BOS
    assert with_bos[0] == 1 and (with_bos == 1).sum() == 1
    assert 1 not in tokenize_prompt(tokenizer, "hi", [], cfg, add_special_tokens=False)


CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A black cat."},
    {"role": "user", "content": "Is it asleep?"},
    {"role": "assistant", "content": "Yes, on a mat."},
]


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_span_tokenization_equals_whole_prompt_tokenization(name, family):
    cfg, template = CONFIGS[family](), templates.get_template(name)
    tokenizer = build_tiny_tokenizer(add_bos=family == "llava")
    media = [Media.image(37, 90)]
    spans = templates.render_spans(template, CONVERSATION)
    ids, trained = tokenize_spans(tokenizer, spans, media, cfg)
    text = templates.render(template, CONVERSATION, add_generation_prompt=False)
    assert ids.tolist() == tokenize_prompt(tokenizer, text, media, cfg).tolist()
    assert trained.dtype == bool and trained.shape == ids.shape
    assert not trained[np.isin(ids, [IMAGE, 1])].any()
    replies = tokenizer.decode(ids[trained]).replace(" ", "")
    want = "".join(t for t, is_trained in spans if is_trained).replace(" ", "")
    assert replies == want


def test_span_masks_by_hand():
    tokenizer, cfg = build_tiny_tokenizer(), llava_cfg()
    spans = templates.render_spans(templates.get_template("vicuna_v1"), CONVERSATION)
    ids, trained = tokenize_spans(tokenizer, spans, [Media.image(9, 9)], cfg)
    tokens = tokenizer.convert_ids_to_tokens(ids[trained].tolist())
    reply_1 = ["▁A", "▁b", "l", "a", "c", "k", "▁cat", ".", "</s>"]
    reply_2 = ["▁", "Y", "es", ",", "▁", "on", "▁a", "▁", "m", "at", ".", "</s>"]
    assert tokens == reply_1 + reply_2
    untrained = tokenizer.convert_ids_to_tokens(ids[~trained].tolist())
    assert untrained[:2] == ["<s>", "▁A"] and untrained[-4:] == ["SI", "ST", "ANT", ":"]


def test_stop_token_ids():
    tokenizer = build_tiny_tokenizer()
    assert stop_token_ids(tokenizer, templates.get_template("qwen_1_5").stop_strings) == (153,)
    assert stop_token_ids(tokenizer, templates.get_template("vicuna_v1").stop_strings) == (2,)
    assert stop_token_ids(tokenizer, templates.get_template("llava_v0").stop_strings) == ()


def test_load_tokenizer_from_a_model_dir_or_hf_dir(tmp_path):
    save_tiny_tokenizer(tmp_path / "model" / "assets")
    save_tiny_tokenizer(tmp_path / "hf")
    for path in (tmp_path / "model", tmp_path / "hf", tmp_path / "model" / "assets"):
        tokenizer = load_tokenizer(path)
        assert tokenizer("<image>hi").input_ids == build_tiny_tokenizer()("<image>hi").input_ids
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
