"""A generated stage-2 (mix665k-shaped) data set for the end-to-end pipeline tests
(tests/test_data_pipeline_e2e.py).

A few hundred LLaVA records in the layouts of `llava_v1_5_mix665k.json` (COCO / GQA / OCR-VQA /
TextVQA / VG images as real JPEG and PNG files of varied sizes, aspect ratios and modes,
ShareGPT-style text-only samples, multi-turn and short-answer conversations, a few two-image
and video records, string, int and missing ids) plus planted bad records of every
`SKIP_REASONS` class, each with the reason it must be skipped under.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


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
        # too_long (2): one round over the tests' MAX_LEN (640), nothing to drop
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
