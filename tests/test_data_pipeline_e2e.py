"""Issue 4's "Done when", end to end: a generated stage-2 (mix665k-shaped) JSON streams
through the real pipeline for a full epoch.

The data set is written to disk once per module: a few hundred LLaVA records in the layouts
of `llava_v1_5_mix665k.json` (COCO / GQA / OCR-VQA / TextVQA / VG images as real JPEG and
PNG files of varied sizes, aspect ratios and modes, ShareGPT-style text-only samples,
multi-turn and short-answer conversations, a few two-image and video records, string, int
and missing ids) plus planted bad records of every `SKIP_REASONS` class, each with the
reason it must be skipped under.

Each run goes source -> `SampleTransform` -> `make_loader` -> `global_batch` on an 8-device
(data 4 x fsdp 2) mesh, and checks: every good record is in exactly one batch, every
planted bad record is skipped, logged under its own id and counted under its planted
reason (and nothing else is), the device arrays equal the host batch, and `SkipBudget`
passes a generous budget and stops the run under the default one, naming the top reasons.
The `llava-jax data build` path checks the manifest's counts and that ArrayRecord batches
equal the JSON batches.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_configs import LLAVA, NEXT, ONEVISION

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.cli.main import main
from llava_jax.data import loader, shards
from llava_jax.data.batching import BatchShape
from llava_jax.data.schema import BATCH_FIELDS, SKIP_REASONS
from llava_jax.data.sources import open_source
from llava_jax.data.transforms import SampleTransform
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.sharding import shard_batch

# -- models: tiny LLaVA-1.5 (pad), NeXT (anyres), OneVision (anyres_max_9, video) -------------

# name: (config, template, max views per row)
FAMILIES = {
    "llava": (LLAVA, "vicuna_v1", 4),
    "next": (NEXT, "vicuna_v1", 12),
    "onevision": (ONEVISION, "qwen_1_5", 40),
}
MAX_LEN = 640
MAX_PIXELS = 400 * 400  # the pixel bomb below is over it
BATCH = 8  # rows per batch: one per device of the mesh
SEED = 7

# -- the generated mix665k-shaped data set ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mix:
    json: Path
    root: Path
    good: tuple[str, ...]  # ids of the good records
    bad: dict[str, tuple[str, str | None]]  # id -> (skip reason, what `data build` skips it as)
    videos: frozenset[str]  # ids of the records with a video, good or bad
    num_records: int

    def expected_skips(self, family: str) -> dict[str, str]:
        """id -> reason for every record `family` must skip (LLaVA / NeXT take no video)."""
        skips = {i: reason for i, (reason, _) in self.bad.items()}
        if family != "onevision":  # checked before the video is opened
            skips.update(dict.fromkeys(self.videos, "placeholder_mismatch"))
        return skips

    def expected_good(self, family: str) -> set[str]:
        return set(self.good) - set(self.expected_skips(family))


def _photo(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (so JPEG does real work), in `mode`."""
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), np.uint8)
    im = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    return im.convert(mode) if mode != "RGB" else im


def _save(im: Image.Image, path: Path, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _gif(path: Path, frames: int, size: int = 24) -> None:
    ims = [Image.new("RGB", (size, size), (50 * i, 200 - 40 * i, 90)) for i in range(frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    ims[0].save(path, "GIF", save_all=True, append_images=ims[1:], duration=80, loop=0)


def _turns(*pairs: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(pairs)]


SHORT = "\nAnswer the question using a single word or phrase."
WORDS = ("the cat sits on a red mat near two dogs while people walk by a bus stop in the rain "
         "and a man holds an umbrella").split()  # fmt: skip


def _sentence(rng, lo=4, hi=12) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi + 1))).capitalize() + "."


def _good_records(rng, root: Path) -> list[dict]:
    """Good records in mix665k's layouts, with their image files written under `root`."""
    records = []
    sizes = [(640, 480), (480, 640), (500, 333), (333, 500), (120, 90), (42, 42), (300, 75),
             (75, 300), (256, 256), (401, 199), (30, 60), (90, 30)]  # fmt: skip
    for k in range(70):  # COCO / LLaVA-Instruct: conversation, detail, multi-turn
        w, h = sizes[k % len(sizes)]
        w, h = max(16, w // 2), max(16, h // 2)  # size does not matter here, time does
        name = f"{100000 + k:012d}"
        _save(_photo(rng, w, h), root / "coco/train2017" / f"{name}.jpg", "JPEG")
        pairs = [f"<image>\n{_sentence(rng)}" if k % 3 else f"{_sentence(rng)}\n<image>"]
        pairs.append(_sentence(rng, 8, 20))
        for _ in range(k % 4):  # 1 to 4 rounds
            pairs += [_sentence(rng) + "?", _sentence(rng)]
        records.append(
            {"id": name, "image": f"coco/train2017/{name}.jpg", "conversations": _turns(*pairs)}
        )
    for k in range(30):  # GQA: short answers, several questions per image
        name = f"n{300000 + k}"
        _save(_photo(rng, 64 + 7 * k, 48 + 3 * k), root / "gqa/images" / f"{name}.jpg", "JPEG")
        pairs = [f"<image>\nIs the cat on the mat?{SHORT}", "Yes"]
        for _ in range(k % 3):
            pairs += [f"What color is the bus?{SHORT}", str(rng.choice(["Red", "Blue"]))]
        records.append(
            {"id": name, "image": f"gqa/images/{name}.jpg", "conversations": _turns(*pairs)}
        )
    for k in range(40):  # OCR-VQA: book covers, one to four short questions
        name = f"{1400000000 + k}"
        _save(_photo(rng, 40 + k, 64 + 2 * k), root / "ocr_vqa/images" / f"{name}.jpg", "JPEG")
        pairs = [f"<image>\nWho wrote this book?{SHORT}", "Jane Doe",
                 "What is the title of this book?", "The Cat", "What type of book is this?",
                 "Pets", "Is this a comedy book?", "No"]  # fmt: skip
        records.append(
            {
                "id": name,
                "image": f"ocr_vqa/images/{name}.jpg",
                "conversations": _turns(*pairs[: 2 + 2 * (k % 4)]),
            }
        )
    for k in range(20):  # TextVQA: PNGs in RGB, RGBA, L and P modes
        mode = ("RGB", "RGBA", "L", "P")[k % 4]
        name = f"{k:016x}"
        _save(
            _photo(rng, 50 + 5 * k, 70, mode), root / "textvqa/train_images" / f"{name}.png", "PNG"
        )
        q = f"<image>\nWhat is written on the sign?\nReference OCR token: STOP{SHORT}"
        records.append(
            {
                "id": name,
                "image": f"textvqa/train_images/{name}.png",
                "conversations": _turns(q, "stop"),
            }
        )
    for k in range(20):  # VG: region captions with box coordinates; integer ids
        _save(_photo(rng, 90, 60 + k), root / "vg/VG_100K" / f"{k}.jpg", "JPEG")
        q = "<image>\nPlease provide a short description for this region: [0.12, 0.3, 0.5, 0.77]"
        records.append(
            {
                "id": 2000 + k,
                "image": f"vg/VG_100K/{k}.jpg",
                "conversations": _turns(q, _sentence(rng, 2, 5)),
            }
        )
    for k in range(50):  # ShareGPT: text only, multi-turn, some with a system turn
        pairs = []
        for _ in range(1 + k % 3):
            pairs += [_sentence(rng) + "?", " ".join(_sentence(rng) for _ in range(3))]
        turns = _turns(*pairs)
        if k % 10 == 0:
            turns.insert(0, {"from": "system", "value": "You are a helpful assistant."})
        if k % 10 == 5:  # ShareGPT files start with gpt now and then; the originals drop it
            turns.insert(0, {"from": "gpt", "value": "Hello! How can I help?"})
        records.append({"id": f"i6IyJda_{k}", "conversations": turns})
    for k in range(4):  # two images in one sample
        for j in range(2):
            _save(_photo(rng, 60 + 10 * j, 40 + 5 * k), root / "multi" / f"{k}_{j}.jpg", "JPEG")
        records.append(
            {
                "id": f"multi_{k}",
                "image": [f"multi/{k}_0.jpg", f"multi/{k}_1.jpg"],
                "conversations": _turns("<image> and <image>\nSame scene?", "No"),
            }
        )
    for k in range(3):  # no id: named "<file>:<index>" by the source
        _save(_photo(rng, 50, 50), root / "noid" / f"{k}.jpg", "JPEG")
        records.append({"image": f"noid/{k}.jpg", "conversations": _turns("<image>\nHi?", "Hi")})
    return records


def _video_records(root: Path) -> list[dict]:
    for k in range(2):
        _gif(root / "videos" / f"clip_{k}.gif", frames=5)
    return [
        {
            "id": f"video_{k}",
            "video": f"videos/clip_{k}.gif",
            "conversations": _turns("<video>\nWhat happens?", "A colour fade."),
        }
        for k in range(2)
    ]


def _bad_records(rng, root: Path, outside: Path) -> list[tuple[object, str, str | None]]:
    """(record, skip reason, what `data build` already skips it as, or None)."""
    img = "<image>\nWhat is this?"
    ok = _turns(img, "A photo.")
    jpeg = _save(_photo(rng, 80, 60), root / "bad" / "whole.jpg", "JPEG")
    png = _save(_photo(rng, 80, 60), root / "bad" / "whole.png", "PNG")
    (root / "bad" / "truncated_0.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "bad" / "truncated_1.jpg").write_bytes(jpeg[:200])
    (root / "bad" / "truncated.png").write_bytes(png[: len(png) * 2 // 3])
    (root / "bad" / "random.jpg").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    (root / "bad" / "empty.jpg").write_bytes(b"")
    _save(_photo(rng, 20, 20), root / "bad" / "tiff.jpg", "TIFF")
    _save(Image.new("RGB", (500, 500), (9, 9, 9)), root / "bad" / "bomb.png", "PNG")
    (root / "bad" / "header_only.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    (root / "bad" / "text.mp4").write_bytes(b"this is not a video\n" * 20)
    (root / "bad" / "link.jpg").symlink_to(outside)

    def rec(i, conv=ok, image=None, video=None):
        r = {"id": f"bad_{i}", "conversations": conv}
        r.update({k: v for k, v in (("image", image), ("video", video)) if v is not None})
        return r

    long_text = " ".join(["the cat sits on the mat"] * 120)  # ~3,000 tokens, one round
    return [
        # missing_file (8)
        *[(rec(f"missing_{k}", image=f"coco/train2017/gone_{k}.jpg"), "missing_file",
           "missing_file") for k in range(7)],
        (rec("missing_video", _turns("<video>\nWhat happens?", "x"), video="videos/gone.mp4"),
         "missing_file", "missing_file"),
        # corrupt_image (6): some only decoding finds
        (rec("trunc_0", image="bad/truncated_0.jpg"), "corrupt_image", None),
        (rec("trunc_1", image="bad/truncated_1.jpg"), "corrupt_image", None),
        (rec("trunc_png", image="bad/truncated.png"), "corrupt_image", None),
        (rec("random", image="bad/random.jpg"), "corrupt_image", "corrupt_image"),
        (rec("empty_file", image="bad/empty.jpg"), "corrupt_image", "corrupt_image"),
        (rec("tiff", image="bad/tiff.jpg"), "corrupt_image", "corrupt_image"),
        (rec("bomb", image="bad/bomb.png"), "corrupt_image", None),
        # path_outside_root (4)
        (rec("dotdot", image="../outside.jpg"), "path_outside_root", "path_outside_root"),
        (rec("dotdot_deep", image="coco/../../outside.jpg"), "path_outside_root",
         "path_outside_root"),
        (rec("absolute", image=str(outside)), "path_outside_root", "path_outside_root"),
        (rec("symlink", image="bad/link.jpg"), "path_outside_root", "path_outside_root"),
        # placeholder_mismatch (5)
        (rec("two_placeholders", _turns("<image>\n<image>\nSame?", "Yes"), "bad/whole.jpg"),
         "placeholder_mismatch", None),
        (rec("no_placeholder", _turns("What is this?", "A photo."), "bad/whole.jpg"),
         "placeholder_mismatch", None),
        (rec("no_image"), "placeholder_mismatch", None),
        (rec("one_of_two", image=["bad/whole.jpg", "bad/whole.png"]), "placeholder_mismatch",
         None),
        (rec("video_marker_on_image", _turns("<video>\nWhat?", "x"), "bad/whole.jpg"),
         "placeholder_mismatch", None),
        # malformed_record (4): the first two are caught by `data build`
        ("just a string", "malformed_record", "malformed_record"),
        (rec("conv_dict", {"from": "human", "value": img}), "malformed_record",
         "malformed_record"),
        (rec("value_not_text", [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]),
         "malformed_record", None),
        (rec("not_alternating", _turns("Hi?", "Hello")[:1] * 2 + _turns("Hi?", "Hello")[1:]),
         "malformed_record", None),
        # empty_conversation (3)
        (rec("no_turns", []), "empty_conversation", None),
        (rec("blank_reply", _turns("Hi?", "  \n")), "empty_conversation", None),
        (rec("blank_question", _turns("", "Hello")), "empty_conversation", None),
        # unknown_role (3)
        (rec("role_bot", [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "x"}]),
         "unknown_role", None),
        (rec("role_user", [{"from": "user", "value": "Hi?"}, {"from": "gpt", "value": "x"}]),
         "unknown_role", None),
        (rec("role_none", [{"from": None, "value": "Hi?"}]), "unknown_role", None),
        # no_supervised_tokens (2): nothing from gpt to train on
        (rec("human_only", _turns(img), "bad/whole.jpg"), "no_supervised_tokens", None),
        (rec("system_and_human", [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "Hi?"}]),
         "no_supervised_tokens", None),  # fmt: skip
        # too_long (2): one round over MAX_LEN, nothing to drop
        (rec("long_text", _turns("Repeat.", long_text)), "too_long", None),
        (rec("long_image", _turns(img, long_text), "bad/whole.jpg"), "too_long", None),
        # bad_video (2)
        (rec("video_header_only", _turns("<video>\nWhat happens?", "x"),
             video="bad/header_only.mp4"), "bad_video", None),
        (rec("video_text", _turns("<video>\nWhat happens?", "x"), video="bad/text.mp4"),
         "bad_video", "bad_video"),
    ]  # fmt: skip


def write_mix(tmp: Path) -> Mix:
    rng = np.random.default_rng(0)
    root = tmp / "images"
    outside = tmp / "outside.jpg"
    _save(_photo(rng, 30, 30), outside, "JPEG")
    good, videos = _good_records(rng, root), _video_records(root)
    bad = _bad_records(rng, root, outside)
    entries = [(r, "good") for r in good + videos]
    entries += [(r, (reason, built)) for r, reason, built in bad]
    order = rng.permutation(len(entries))  # bad records sprinkled through the file
    records, ids, with_video = [], {"good": [], "bad": {}}, set()
    path = tmp / "llava_v1_5_mix665k.json"
    for index, j in enumerate(order):
        record, kind = entries[j]
        records.append(record)
        rid = str(record["id"]) if isinstance(record, dict) and "id" in record else None
        rid = rid or f"{path.name}:{index}"
        if isinstance(record, dict) and "video" in record:
            with_video.add(rid)
        if isinstance(kind, tuple):
            ids["bad"][rid] = kind
        else:
            ids[kind].append(rid)
    path.write_text(json.dumps(records, indent=1))
    all_ids = [*ids["good"], *ids["bad"]]
    assert len(set(all_ids)) == len(all_ids) == len(records), "record ids must be unique"
    return Mix(path, root, tuple(ids["good"]), ids["bad"], frozenset(with_video), len(records))


@pytest.fixture(scope="module")
def mix(tmp_path_factory) -> Mix:
    return write_mix(tmp_path_factory.mktemp("mix665k"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def make_transform(family: str, tokenizer) -> SampleTransform:
    cfg, template, max_views = FAMILIES[family]
    return SampleTransform(
        cfg,
        ImageProcessorConfig.for_model(cfg),
        tokenizer,
        template,
        max_len=MAX_LEN,
        max_views=max_views,
        video_frames=3,
        max_pixels=MAX_PIXELS,
    )


def batch_shape(family: str) -> BatchShape:
    cfg, _, max_views = FAMILIES[family]
    return BatchShape.for_model(cfg, BATCH, MAX_LEN, max_views, MAX_LEN)


@dataclasses.dataclass
class Epoch:
    batches: list[dict]
    skipped_total: dict[str, int]
    logged: dict[str, str]  # record id -> reason, from the loader's log lines


def run_epoch(source, family, tokenizer, caplog, *, packing, shuffle=True) -> Epoch:
    cfg = FAMILIES[family][0]
    it = loader.make_loader(
        source,
        make_transform(family, tokenizer),
        batch_shape(family),
        cfg,
        seed=SEED,
        num_epochs=1,
        shuffle=shuffle,
        packing=packing,
        process_index=0,
        process_count=1,
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
        batches = list(it)
    logged = {}
    for r in caplog.records:
        if r.name == "llava_jax.data" and r.msg.startswith("skipped record"):
            record_id, reason, _ = r.args
            assert record_id not in logged, f"{record_id} skipped twice"
            logged[record_id] = reason
    return Epoch(batches, it.skipped_total, logged)


def counts(skips: dict[str, str]) -> dict[str, int]:
    return {reason: list(skips.values()).count(reason) for reason in SKIP_REASONS}


def check_epoch(epoch: Epoch, mix: Mix, family: str, packing: bool) -> None:
    """Coverage, exact skips by id and reason, static shapes, packing layout."""
    want_skips = mix.expected_skips(family)
    want_good = mix.expected_good(family)
    ids = [i for b in epoch.batches for i in b["sample_ids"]]
    seen = collections.Counter(ids)
    twice = sorted(i for i, c in seen.items() if c > 1)
    missing = sorted(want_good - set(seen))
    extra = sorted(set(seen) - want_good)
    assert not (twice or missing or extra), f"twice {twice}, missing {missing}, extra {extra}"

    wrong = {i: (epoch.logged.get(i), r) for i, r in want_skips.items() if epoch.logged.get(i) != r}
    unplanted = sorted(set(epoch.logged) - set(want_skips))
    assert not wrong and not unplanted, f"(logged, planted) {wrong}; not planted: {unplanted}"
    per_batch = collections.Counter()
    for b in epoch.batches:
        per_batch.update(b["skipped"])
    assert dict(per_batch) == epoch.skipped_total == counts(want_skips)
    assert set(SKIP_REASONS) <= set(mix.expected_skips("onevision").values())  # every class

    shape = batch_shape(family)
    for b in epoch.batches:
        assert b["input_ids"].shape == (BATCH, MAX_LEN)
        assert b["pixel_values"].shape == (BATCH, shape.max_views, 42, 42, 3)
        segments = b["segment_ids"]
        n_rows = int((segments[:, 0] > 0).sum())
        assert b["num_samples"] == len(b["sample_ids"]) == int(segments.max(axis=1).sum())
        if not packing:
            assert segments.max() <= 1 and n_rows == b["num_samples"]
        # Segments are contiguous runs 1, 2, ..., then padding.
        for row in segments:
            used = row[row > 0]
            assert np.all(np.diff(used) >= 0) and np.all(row[len(used) :] == 0)
            assert np.array_equal(np.unique(used), np.arange(1, used.max(initial=0) + 1))
    if packing:
        rows = sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in epoch.batches)
        assert rows < 0.6 * len(ids), f"{len(ids)} samples packed into {rows} rows"


def check_global_batches(epoch: Epoch, mesh) -> None:
    """Every batch onto the mesh: sharded over data x fsdp, values unchanged."""
    for b in epoch.batches:
        device = shard_batch(b, mesh, BATCH_FIELDS)
        assert device.keys() == BATCH_FIELDS.keys()
        for name, array in device.items():
            assert array.sharding.spec[0] == ("data", "fsdp"), name
            assert len(array.addressable_shards) == 8
            assert np.array_equal(np.asarray(array), b[name]), f"{name} changed on the mesh"


def check_rows_against_transform(epoch: Epoch, source, family: str, tokenizer) -> None:
    """The first batch's rows hold exactly what the transform makes of those records."""
    transform = make_transform(family, tokenizer)
    by_id = {}
    for index in range(len(source)):
        by_id.setdefault(source[index].id, index)
    b = epoch.batches[0]
    for row, record_id in enumerate(b["sample_ids"]):
        ex = transform(source[by_id[record_id]])
        n, v = len(ex.input_ids), len(ex.views)
        np.testing.assert_array_equal(b["input_ids"][row, :n], ex.input_ids, err_msg=record_id)
        np.testing.assert_array_equal(b["loss_mask"][row, : n - 1], ex.trained[1:])
        np.testing.assert_array_equal(b["pixel_values"][row, :v], ex.views, err_msg=record_id)
        assert b["view_mask"][row].sum() == v and not b["input_ids"][row, n:].any()


def check_budget(epoch: Epoch, mix: Mix, family: str) -> None:
    """The planted share passes a generous budget and stops a run under the default 1%."""
    generous = loader.SkipBudget(max_fraction=0.2)
    for b in epoch.batches:
        generous.update(b["skipped"], b["num_samples"])
    assert generous.seen == mix.num_records

    # Checked from the first record on: the budget stops the run at the end of the epoch,
    # with the whole epoch's counts, so its top reasons are the planted ones.
    want = counts(mix.expected_skips(family))
    ranked = sorted(want.items(), key=lambda kv: -kv[1])
    assert ranked[2][1] > ranked[3][1], "make the planted top three unambiguous"
    top = ", ".join(f"{r} {c}" for r, c in ranked[:3])
    total = sum(want.values())
    budget = loader.SkipBudget(min_records=mix.num_records)
    with pytest.raises(loader.SkipBudgetExceeded) as e:
        for b in epoch.batches:
            budget.update(b["skipped"], b["num_samples"])
    msg = str(e.value)
    assert msg.startswith(f"{total} of {mix.num_records} records skipped (")
    assert f"over the 1.0% budget; top reasons: {top} (" in msg, msg

    # With the default min_records, the run stops early, at the first batch over budget.
    budget, stopped_at = loader.SkipBudget(), None
    for k, b in enumerate(epoch.batches):
        try:
            budget.update(b["skipped"], b["num_samples"])
        except loader.SkipBudgetExceeded:
            stopped_at = k
            break
    assert stopped_at is not None and stopped_at < len(epoch.batches) - 1
    assert budget.seen >= 100 and sum(budget.skipped.values()) > 0.01 * budget.seen


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, packing",
    [("llava", False), ("llava", True), ("next", False), ("next", True), ("onevision", True)],
)
def test_mix665k_json_full_epoch(mix, family, packing, tokenizer, mesh, caplog):
    source = open_source(str(mix.json), str(mix.root))
    assert len(source) == mix.num_records
    epoch = run_epoch(source, family, tokenizer, caplog, packing=packing)
    check_epoch(epoch, mix, family, packing)
    check_global_batches(epoch, mesh)
    if not packing:
        check_rows_against_transform(epoch, source, family, tokenizer)
    check_budget(epoch, mix, family)


def test_data_build_then_arrayrecord_equals_json(mix, tokenizer, tmp_path, mesh, caplog):
    out = tmp_path / "stage2"
    args = ["data", "build", "--input", str(mix.json), "--image-root", str(mix.root),
            "--out", str(out), "--num-shards", "3"]  # fmt: skip
    assert main(args) == 0

    built = {i: b for i, (_, b) in mix.bad.items() if b is not None}
    manifest = shards.read_manifest(out)
    assert manifest["skipped"] == {r: c for r, c in counts(built).items() if c}
    assert manifest["num_skipped"] == len(built)
    assert manifest["num_records"] == mix.num_records - len(built)
    listed = [json.loads(line) for line in (out / shards.SKIPPED).read_text().splitlines()]
    assert {d["id"]: d["reason"] for d in listed} == built

    family = "onevision"  # takes every record kind, videos included
    from_json = run_epoch(
        open_source(str(mix.json), str(mix.root)),
        family,
        tokenizer,
        caplog,
        packing=False,
        shuffle=False,
    )
    check_epoch(from_json, mix, family, packing=False)
    from_shards = run_epoch(
        open_source(str(out)), family, tokenizer, caplog, packing=False, shuffle=False
    )
    # Build-time skips and train-time skips add up to the planted ones, each record once.
    rest = {i: r for i, r in mix.expected_skips(family).items() if i not in built}
    assert from_shards.logged == rest
    assert from_shards.skipped_total == counts(rest)

    # The same batches: same samples, same arrays (the shards hold the files' bytes). The
    # source order is compared: a shuffle permutes N records, and the shards hold fewer.
    assert len(from_shards.batches) == len(from_json.batches)
    for k, (a, b) in enumerate(zip(from_json.batches, from_shards.batches, strict=True)):
        assert a["sample_ids"] == b["sample_ids"], f"batch {k}"
        differ = [name for name in BATCH_FIELDS if not np.array_equal(a[name], b[name])]
        assert not differ, f"batch {k}: {differ} differ between JSON and ArrayRecord"
    check_global_batches(from_shards, mesh)

    # Shuffled and packed, the shards still give every good record once.
    shuffled = run_epoch(open_source(str(out)), family, tokenizer, caplog, packing=True)
    ids = [i for b in shuffled.batches for i in b["sample_ids"]]
    assert sorted(ids) == sorted(mix.expected_good(family))
    assert shuffled.logged == rest
