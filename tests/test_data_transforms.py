"""The per-sample transform: every bad-record class skipped with its reason and record id,
views and media tokens for LLaVA-1.5, NeXT (AnyRes), OneVision multi-image and video, the
token budget before truncation, and pickling for Grain workers.

Masks and ids against hand-derived arrays are in test_masking.py.
"""

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from tiny_configs import LLAVA, NEXT, ONEVISION

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.data.prompt import media_token_counts
from llava_jax.data.schema import SKIP_REASONS, Example, RawRecord, SkipSample
from llava_jax.data.templates import ChatTemplate
from llava_jax.data.transforms import SampleTransform, match_placeholders, parse_conversation
from llava_jax.media import anyres
from llava_jax.media.feature_plan import Media, num_views, sample_plan
from llava_jax.media.image_processing import load_image, preprocess_image
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.media.video import preprocess_video


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def transform(tokenizer, cfg=LLAVA, template="vicuna_v1", **kw):
    kw = {"max_len": 256, "max_views": 8, "video_frames": 2, **kw}
    return SampleTransform(cfg, ImageProcessorConfig.for_model(cfg), tokenizer, template, **kw)


def image_bytes(width=20, height=10, fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(buf, fmt)
    return buf.getvalue()


def gif_bytes(frames=4, size=16) -> bytes:
    ims = [Image.new("RGB", (size, size), (60 * i, 255 - 60 * i, 9)) for i in range(frames)]
    buf = io.BytesIO()
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
    return buf.getvalue()


def chat(question="<image>\nWhat is it?", *rounds):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "A cat"}]
    for q, a in rounds:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


MP4_HEADER_ONLY = b"\x00\x00\x00\x18ftypmp42" + bytes(500)  # an "ftyp" box, then zeros

# -- every bad-record class -------------------------------------------------------------------


def _bad_records(tmp_path):
    """{case: (reason, cfg, record, transform kwargs)}, with real bad files."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (tmp_path / "outside.jpg").write_bytes(image_bytes())
    (root / "ok.jpg").write_bytes(image_bytes())
    jpeg, r, ok, video = image_bytes(64, 64), str(root), chat(), chat("<video>\nx")
    system_last = [*chat("q"), {"from": "system", "value": "s"}]
    blank_reply = [chat("q")[0], {"from": "gpt", "value": " \n"}]
    outside = str(tmp_path / "outside.jpg")
    L, N, O, R = LLAVA, NEXT, ONEVISION, RawRecord  # noqa: N806
    return {
        "truncated_jpeg": ("corrupt_image", L, R("a", ok, (jpeg[: len(jpeg) // 2],)), {}),
        "random_bytes": ("corrupt_image", L, R("b", ok, (b"\x13\x37" * 300,)), {}),
        "tiff": ("corrupt_image", L, R("c", ok, (image_bytes(fmt="TIFF"),)), {}),
        "pixel_bomb": ("corrupt_image", L, R("d", ok, (jpeg,)), {"max_pixels": 1000}),
        "missing_file": ("missing_file", L, R("e", ok, ("nope.jpg",), root=r), {}),
        "dot_dot": ("path_outside_root", L, R("f", ok, ("../outside.jpg",), root=r), {}),
        "absolute": ("path_outside_root", L, R("g", ok, (outside,), root=r), {}),
        "two_placeholders": ("placeholder_mismatch", L, R("h", chat("<image>" * 2), (jpeg,)), {}),
        "image_without_placeholder": ("placeholder_mismatch", L, R("i", chat("Hm?"), (jpeg,)), {}),
        "placeholder_without_image": ("placeholder_mismatch", L, R("j", ok), {}),
        "video_for_llava": ("placeholder_mismatch", L, R("k", video, (), (gif_bytes(),)), {}),
        "not_a_list": ("malformed_record", L, R("l", {"from": "human"}), {}),
        "value_not_text": ("malformed_record", L, R("m", [{"from": "human", "value": 3}]), {}),
        "not_alternating": ("malformed_record", L, R("n", [*chat("q"), *chat("q")[1:]]), {}),
        "late_system": ("malformed_record", L, R("o", system_last), {}),
        "empty": ("empty_conversation", L, R("p", []), {}),
        "blank_turn": ("empty_conversation", L, R("q", blank_reply), {}),
        "unknown_role": ("unknown_role", L, R("r", [{"from": "bot", "value": "q"}]), {}),
        "no_gpt_turn": ("no_supervised_tokens", L, R("s", chat()[:1], (jpeg,)), {}),
        "too_long": ("too_long", L, R("t", ok, ("ok.jpg",), root=r), {"max_len": 20}),
        "too_many_views": ("too_long", N, R("u", ok, (image_bytes(60, 30),)), {"max_views": 2}),
        "undecodable_video": ("bad_video", O, R("v", video, (), (MP4_HEADER_ONLY,)), {}),
        "too_few_frames": ("bad_video", O, R("w", video, (), (gif_bytes(frames=1),)), {}),
        "missing_video": ("missing_file", O, R("x", video, (), ("v.mp4",), root=r), {}),
    }  # fmt: skip


BAD = [
    "truncated_jpeg", "random_bytes", "tiff", "pixel_bomb", "missing_file", "dot_dot",
    "absolute", "two_placeholders", "image_without_placeholder", "placeholder_without_image",
    "video_for_llava", "not_a_list", "value_not_text", "not_alternating", "late_system",
    "empty", "blank_turn", "unknown_role", "no_gpt_turn", "too_long", "too_many_views",
    "undecodable_video", "too_few_frames", "missing_video",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_records_are_skipped_with_their_reason_and_id(case, tmp_path, tokenizer):
    reason, cfg, record, kw = _bad_records(tmp_path)[case]
    with pytest.raises(SkipSample) as e:
        transform(tokenizer, cfg, **kw)(record)
    assert (e.value.reason, e.value.record_id) == (reason, record.id), str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400  # one readable log line


def test_every_skip_reason_has_a_bad_record(tmp_path):
    covered = {reason for reason, *_ in _bad_records(tmp_path).values()}
    assert covered == set(SKIP_REASONS)
    assert set(BAD) == set(_bad_records(tmp_path))


# -- what a good record gives ----------------------------------------------------------------


def test_example_fields_and_pixels_match_the_shared_preprocessing(tmp_path, tokenizer):
    (tmp_path / "a.jpg").write_bytes(image_bytes(30, 20))
    t = transform(tokenizer)
    from_path = t(RawRecord("p", chat(), ("a.jpg",), root=str(tmp_path)))
    from_bytes = t(RawRecord("p", chat(), (image_bytes(30, 20),)))
    assert isinstance(from_path, Example) and from_path.id == "p"
    assert from_path.media == (Media.image(20, 30),)
    image_cfg = ImageProcessorConfig.for_model(LLAVA)
    want = preprocess_image(load_image(image_bytes(30, 20)), image_cfg).views
    assert from_path.views.dtype == np.float32 and from_path.views.shape == (1, 42, 42, 3)
    np.testing.assert_array_equal(from_path.views, want)
    for field in ("input_ids", "trained", "views"):
        np.testing.assert_array_equal(getattr(from_path, field), getattr(from_bytes, field))


def test_text_only_record(tokenizer):
    ex = transform(tokenizer)(RawRecord("t", chat("Hello?")))
    assert ex.media == () and ex.views.shape == (0, 42, 42, 3)
    assert not np.isin(ex.input_ids, [150, 151]).any() and ex.trained.sum() == 3  # A cat </s>


@pytest.mark.parametrize("hw", [(30, 60), (60, 30), (50, 50), (10, 100)])
def test_next_anyres_views_and_tokens(hw, tokenizer):
    h, w = hw
    ex = transform(tokenizer, NEXT)(RawRecord("n", chat(), (image_bytes(w, h),)))
    media = Media.image(h, w)
    assert ex.media == (media,)
    assert len(ex.views) == num_views(NEXT, media) > 1
    assert (ex.input_ids == 150).sum() == media_token_counts(NEXT, [media])[0]
    if hw == (30, 60):  # hand: canvas 42x84 -> 1x2 crops + base; 9 base + 3x(6+1) grid
        assert len(ex.views) == 3 and (ex.input_ids == 150).sum() == 9 + 3 * 7
    # The worker built the sample's feature plan: the batcher only offsets and pads.
    taps, weights, n_image, _ = sample_plan(NEXT, [media])
    np.testing.assert_array_equal(ex.taps, taps)
    np.testing.assert_array_equal(ex.tap_weights, weights.astype(np.float32))
    assert ex.num_image_tokens == n_image == (ex.input_ids == 150).sum()


@pytest.mark.parametrize("cfg", [NEXT, ONEVISION], ids=["next", "onevision"])
def test_anyres_geometry_is_worked_out_once_per_image(cfg, tokenizer, monkeypatch):
    """Views, tokens, pixels and the feature plan share one layout per image: the canvas is
    chosen once (it was chosen five times: views, tokens, pixels twice, batcher)."""
    calls = []
    choose = anyres.select_best_resolution
    monkeypatch.setattr(anyres, "select_best_resolution", lambda *a: calls.append(a) or choose(*a))
    record = RawRecord("n", chat(), (image_bytes(60, 30),))
    ex = transform(tokenizer, cfg, "qwen_1_5" if cfg is ONEVISION else "vicuna_v1")(record)
    assert len(calls) == 1
    monkeypatch.setattr(anyres, "select_best_resolution", choose)
    image = load_image(image_bytes(60, 30))  # the preprocessing alone, unchanged
    np.testing.assert_array_equal(
        ex.views, preprocess_image(image, ImageProcessorConfig.for_model(cfg)).views
    )


def test_onevision_multi_image_gives_one_view_each(tokenizer):
    images = (image_bytes(60, 30), image_bytes(20, 40, seed=1))
    record = RawRecord("m", chat("<image> and <image>: same?"), images)
    ex = transform(tokenizer, ONEVISION, "qwen_1_5")(record)
    assert ex.media == (Media.image(30, 60), Media.image(40, 20))
    assert len(ex.views) == 2  # multi-image: padded to a square, one view each
    counts = media_token_counts(ONEVISION, ex.media)
    assert counts == [10, 10]  # hand: 3x3 tokens + one newline per image
    assert (ex.input_ids == 150).sum() == sum(counts)
    single = transform(tokenizer, ONEVISION, "qwen_1_5")(RawRecord("s", chat(), images[:1]))
    assert len(single.views) == num_views(ONEVISION, single.media[0], 1) > 1  # AnyRes alone


@pytest.mark.parametrize("placeholder", ["<video>", "<image>"])
def test_onevision_video_frames_and_tokens(placeholder, tmp_path, tokenizer):
    # "<image>" marks a video in LLaVA-NeXT's video data; it is read as <video>.
    (tmp_path / "v.gif").write_bytes(gif_bytes(frames=4))
    record = RawRecord(
        "v", chat(f"{placeholder}\nWhat happens?"), videos=("v.gif",), root=str(tmp_path)
    )
    ex = transform(tokenizer, ONEVISION, "qwen_1_5", video_frames=2)(record)
    assert ex.media == (Media.video(2),)
    assert ex.views.shape == (2, 42, 42, 3)
    assert (ex.input_ids == 151).sum() == media_token_counts(ONEVISION, ex.media)[0] == 2 * 4 + 1
    assert not (ex.input_ids == 150).any()
    gif = Image.open(io.BytesIO(gif_bytes(frames=4)))
    frames = []
    for i in (0, 2):  # 2 of 4 frames at arange(2) * 4 // 2, transformers' rule
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    want = preprocess_video(np.stack(frames), ImageProcessorConfig.for_model(ONEVISION))
    np.testing.assert_array_equal(ex.views, want)


def test_onevision_image_and_video_views_are_images_first(tokenizer):
    record = RawRecord(
        "iv", chat("<video> then <image>"), (image_bytes(30, 30),), (gif_bytes(frames=2),)
    )
    ex = transform(tokenizer, ONEVISION, "qwen_1_5", video_frames=2)(record)
    assert ex.media == (Media.video(2), Media.image(30, 30))  # placeholder order
    n_image_views = num_views(ONEVISION, Media.image(30, 30), 1)
    assert len(ex.views) == n_image_views + 2
    image_cfg = ImageProcessorConfig.for_model(ONEVISION)
    want = preprocess_image(load_image(image_bytes(30, 30)), image_cfg).views
    np.testing.assert_array_equal(ex.views[:n_image_views], want)


# -- the token budget --------------------------------------------------------------------------

ROUNDS = [("And the dog?", "A dog"), ("What colour?", "Red")]


def test_trailing_rounds_are_dropped_to_fit(tokenizer):
    t = transform(tokenizer, max_len=1000)
    full = t(RawRecord("r", chat("<image>\nWhat is it?", *ROUNDS), (image_bytes(),)))
    two = t(RawRecord("r", chat("<image>\nWhat is it?", ROUNDS[0]), (image_bytes(),)))
    one = t(RawRecord("r", chat("<image>\nWhat is it?"), (image_bytes(),)))
    assert len(one.input_ids) < len(two.input_ids) < len(full.input_ids)
    record = RawRecord("r", chat("<image>\nWhat is it?", *ROUNDS), (image_bytes(),))
    for max_len, want in ((len(two.input_ids), two), (len(full.input_ids) - 1, two),
                          (len(two.input_ids) - 1, one), (len(one.input_ids), one)):  # fmt: skip
        got = transform(tokenizer, max_len=max_len)(record)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.trained, want.trained)
    # Image tokens are never cut: one token short of the first round skips the sample.
    with pytest.raises(SkipSample, match=f"> max_len {len(one.input_ids) - 1}") as e:
        transform(tokenizer, max_len=len(one.input_ids) - 1)(record)
    assert e.value.reason == "too_long" and "(9 media)" in e.value.detail
    with pytest.raises(SkipSample, match="too_long"):  # the option off: no dropping
        transform(tokenizer, max_len=len(two.input_ids), drop_trailing_rounds=False)(record)


def test_rounds_holding_a_placeholder_are_kept(tokenizer):
    record = RawRecord("r", chat("Hello?", ("<image>\nAnd this?", "A dog")), (image_bytes(),))
    n = len(transform(tokenizer, max_len=1000)(record).input_ids)
    with pytest.raises(SkipSample, match="too_long"):
        transform(tokenizer, max_len=n - 1)(record)


def test_leading_gpt_turn_is_dropped_as_the_originals_do(tokenizer):
    t = transform(tokenizer)
    with_lead = t(RawRecord("g", [{"from": "gpt", "value": "Hi"}, *chat()], (image_bytes(),)))
    without = t(RawRecord("g", chat(), (image_bytes(),)))
    np.testing.assert_array_equal(with_lead.input_ids, without.input_ids)


def test_conversation_checks_directly():
    msgs = parse_conversation([{"from": "system", "value": "s"}, *chat("q")])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    kinds, _ = match_placeholders(parse_conversation(chat("<image> <image>")), 2, 0)
    assert kinds == ["image", "image"]


def test_transform_pickles_for_grain_workers(tokenizer):
    t = transform(tokenizer, NEXT, masking="reference")
    clone = pickle.loads(pickle.dumps(t))
    record = RawRecord("k", chat(), (image_bytes(60, 30),))
    a, b = t(record), clone(record)
    for field in ("input_ids", "trained", "views"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_configuration_errors_are_raised_at_construction(tokenizer):
    with pytest.raises(ValueError, match="masking"):
        transform(tokenizer, masking="sloppy")
    with pytest.raises(ValueError, match="image processor is for"):
        SampleTransform(LLAVA, ImageProcessorConfig.for_model(NEXT), tokenizer, "vicuna_v1",
                        max_len=8, max_views=1)  # fmt: skip
    with pytest.raises(ValueError, match="max_len"):
        transform(tokenizer, max_len=0)


def test_jinja_chat_template_trains_its_generation_blocks(tokenizer):
    body = "{% for m in messages %}{% if m['role'] == 'assistant' %}A:{% generation %} {{ m['content'] }}</s>{% endgeneration %}{% else %}U: {{ m['content'] }} {% endif %}{% endfor %}"  # noqa: E501
    ex = transform(tokenizer, template=ChatTemplate(body))(RawRecord("j", chat(), (image_bytes(),)))
    assert tokenizer.convert_ids_to_tokens(ex.input_ids[ex.trained].tolist()) == [
        "▁A",
        "▁cat",
        "</s>",
    ]
    assert (ex.input_ids == 150).sum() == 9
    untrained_body = body.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="generation"):
        transform(tokenizer, template=ChatTemplate(untrained_body))
