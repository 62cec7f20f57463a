"""The synthetic shapes dataset: deterministic, answers read back from the pixels, valid records."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.templates import get_template, render_spans
from llava_jax.train import shapes

SIZE = 32
SPLITS = dict(num_stage1=60, num_stage2=70, num_val=20, image_size=SIZE)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shapes.write_shapes_dataset(tmp_path_factory.mktemp("shapes"), **SPLITS, seed=3)


def read_scene(path, size=SIZE):
    """The scene seen in the pixels alone: {slot: (color, kind)} from colours and fill."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    found = {}
    for slot in shapes.SLOTS:
        x0, y0, x1, y1 = shapes.slot_box(slot, size)
        box = pixels[y0 : y1 + 1, x0 : x1 + 1]
        counts = {c: int((box == rgb).all(-1).sum()) for c, rgb in shapes.COLORS.items()}
        color = max(counts, key=counts.get)
        fill = counts[color] / box[..., 0].size
        if counts[color] == 0:
            continue
        assert sum(counts.values()) == counts[color], f"{path}: two colours in slot {slot}"
        kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        found[slot] = (color, kind)
    # Nothing is drawn outside the slots.
    mask = np.ones(pixels.shape[:2], bool)
    for slot in shapes.SLOTS:
        x0, y0, x1, y1 = shapes.slot_box(slot, size)
        mask[y0 : y1 + 1, x0 : x1 + 1] = False
    assert (pixels[mask] == shapes.BACKGROUND).all(), f"{path}: pixels outside the slots"
    return found


def answer_from_pixels(question, seen):
    """The answer a reader of the image gives, parsed from the question text."""
    words = question.rstrip("?").split()
    phrase = {"top": "top", "bottom": "bottom", "left": "left", "right": "right"}
    if question == "How many shapes are there?":
        return shapes.COUNT_WORDS[len(seen)]
    if question.startswith("What color is the shape"):
        return seen[phrase[words[-1]]][0]
    if question.startswith("What kind of shape is"):
        return seen[phrase[words[-1]]][1]
    if question.startswith("Where is the"):
        color, kind = words[-2], words[-1]
        slots = [s for s, ck in seen.items() if ck == (color, kind)]
        assert len(slots) == 1, f"ambiguous question {question!r}: {seen}"
        return slots[0]
    if question.startswith("Is there a"):
        return "yes" if (words[-2], words[-1]) in seen.values() else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_answers_and_captions_match_the_pixels(dataset):
    checked = 0
    for name in ("stage2", "heldout"):
        for record in json.loads(getattr(dataset, name).read_text()):
            conv = record["conversations"]
            if "image" not in record:
                assert len(conv) == 2 and "<image>" not in conv[0]["value"]
                continue
            seen = read_scene(dataset.root / record["image"])
            for human, gpt in zip(conv[::2], conv[1::2], strict=True):
                question = human["value"].removeprefix("<image>\n")
                assert gpt["value"] == answer_from_pixels(question, seen), record["id"]
                checked += 1
    assert checked > 80
    for record in json.loads(dataset.stage1.read_text()):
        seen = read_scene(dataset.root / record["image"])
        expected = " and ".join(
            f"a {c} {k} {'at the' if s in ('top', 'bottom') else 'on the'} {s}"
            for s, (c, k) in sorted(seen.items(), key=lambda x: shapes.SLOTS.index(x[0]))
        )
        assert record["conversations"][1]["value"] == expected + ".", record["id"]


def test_scenes_file_matches_pixels(dataset):
    scenes = json.loads(dataset.scenes.read_text())
    for image, scene in scenes.items():
        seen = read_scene(dataset.root / image)
        assert seen == {s["slot"]: (s["color"], s["kind"]) for s in scene}, image


def test_records_are_llava_records(dataset):
    stage1 = json.loads(dataset.stage1.read_text())
    stage2 = json.loads(dataset.stage2.read_text())
    heldout = json.loads(dataset.heldout.read_text())
    assert len(stage1) == 60 and len(heldout) == 20
    assert len([r for r in stage2 if "image" in r]) == 70
    assert any("image" not in r for r in stage2), "no text-only samples"
    assert any(len(r["conversations"]) > 2 for r in stage2), "no multi-turn samples"
    images = [{r["image"] for r in split if "image" in r} for split in (stage1, stage2, heldout)]
    assert sum(map(len, images)) == len(set.union(*images)) == 150, "splits share images"
    ids = [r["id"] for r in stage2 + heldout]
    assert len(ids) == len(set(ids))
    for r in stage1 + stage2 + heldout:
        conv = r["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        images = sum(m["value"].count("<image>") for m in conv)
        assert images == (1 if "image" in r else 0), r["id"]
        if "image" in r:
            assert conv[0]["value"].startswith("<image>")
            assert (dataset.root / r["image"]).is_file()
            assert Image.open(dataset.root / r["image"]).size == (SIZE, SIZE)
        assert all(len(m["value"].split()) == 1 for m in conv[1::2] if r in stage2 + heldout)


def test_tokenizer_covers_every_word(dataset):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(dataset.tokenizer))
    assert tok.convert_tokens_to_ids("<image>") == shapes.vocabulary().index("<image>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for name, template in (("stage1", "plain"), ("stage2", "vicuna_v1"), ("heldout", "vicuna_v1")):
        for r in json.loads(getattr(dataset, name).read_text()):
            messages = [
                {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                for m in r["conversations"]
            ]
            for text, _ in render_spans(get_template(template), messages):
                ids = tok.encode(text, add_special_tokens=False)
                assert tok.unk_token_id not in ids, f"{r['id']}: unknown word in {text!r}"
    answer = tok.encode("red", add_special_tokens=False)
    assert tok.decode(answer) == "red" and len(answer) == 1
    assert tok.encode("\n", add_special_tokens=False) == [shapes.vocabulary().index("\n")]


def test_deterministic_from_the_seed(tmp_path, dataset):
    again = shapes.write_shapes_dataset(tmp_path / "a", **SPLITS, seed=3)
    for name in ("stage1", "stage2", "heldout", "scenes"):
        assert getattr(again, name).read_bytes() == getattr(dataset, name).read_bytes(), name
    for image in json.loads(dataset.scenes.read_text()):
        a = np.asarray(Image.open(again.root / image))
        assert np.array_equal(a, np.asarray(Image.open(dataset.root / image))), image
    other = shapes.write_shapes_dataset(tmp_path / "b", **SPLITS, seed=4)
    assert other.scenes.read_bytes() != dataset.scenes.read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 16 px"):
        shapes.write_shapes_dataset(tmp_path, num_stage1=1, num_val=1, image_size=8, seed=0)
    with pytest.raises(ValueError, match="num_stage1=0"):
        shapes.write_shapes_dataset(tmp_path, num_stage1=0, num_val=1, image_size=32, seed=0)
    with pytest.raises(ValueError, match="num_stage2=0"):
        shapes.write_shapes_dataset(tmp_path, num_stage2=0, num_val=1, image_size=32, seed=0)
