"""The synthetic "shapes" dataset of the built-in tiny run: coloured shapes, captions, questions.

Each image holds 1-3 shapes (circle, square, triangle in red, green, blue or yellow) in
distinct slots of four: top, bottom, left, right, on a plain dark background. Every question
is answerable from the image alone and has one single-word answer:

    How many shapes are there?                 one | two | three
    What color is the shape on the left?       red | green | blue | yellow
    What kind of shape is at the top?          circle | square | triangle
    Where is the red circle?                   top | bottom | left | right (asked when unique)
    Is there a green triangle?                 yes | no

Written as LLaVA JSON (paths relative to the output dir, which is the image root):
`stage1.json` (captions for the `plain` template), `stage2.json` (1-3 question turns, plus
text-only questions), `heldout.json` (unseen images, one question each, for exact match), a
word-level tokenizer in `tokenizer/`, and `scenes.json` (each image's scene, for checking).
The three splits have their own images. Stage 2 gets many (images are cheap: ~0.5 ms each):
a tiny decoder shown the same few thousand images epoch after epoch learns to recall their
answers instead of reading the image (training accuracy climbs, held-out accuracy does not),
so stage 2 sees each of its images about once. Everything follows from the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
          "yellow": (235, 215, 40)}  # fmt: skip
SLOTS = ("top", "bottom", "left", "right")
BACKGROUND = (30, 30, 30)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
_SLOT_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                "right": "on the right"}  # fmt: skip
# Text-only samples: LLaVA mixes text-only conversations into stage 2.
_TEXT_ONLY = (
    ("What is the opposite of top?", "bottom"),
    ("What is the opposite of bottom?", "top"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many corners does a circle have?", "zero"),
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    color: str  # a key of COLORS
    slot: str  # one of SLOTS


@dataclasses.dataclass(frozen=True)
class ShapesPaths:
    """What `write_shapes_dataset` wrote (all under `root`, the image root)."""

    root: Path
    stage1: Path
    stage2: Path
    heldout: Path
    scenes: Path
    tokenizer: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> ShapesPaths:
        """The paths of a dataset written under `root`."""
        root = Path(root)
        return cls(
            root=root,
            stage1=root / "stage1.json",
            stage2=root / "stage2.json",
            heldout=root / "heldout.json",
            scenes=root / "scenes.json",
            tokenizer=root / "tokenizer",
        )


# -- scenes and images ----------------------------------------------------------------------


def random_scene(rng: np.random.Generator) -> tuple[Shape, ...]:
    """1-3 shapes in distinct slots, in slot order."""
    count = int(rng.integers(1, 4))
    slots = sorted(rng.choice(len(SLOTS), size=count, replace=False))
    return tuple(
        Shape(KINDS[rng.integers(len(KINDS))], list(COLORS)[rng.integers(len(COLORS))], SLOTS[s])
        for s in slots
    )


def slot_box(slot: str, image_size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a slot's shape, inclusive, in pixels."""
    s = image_size
    half = max(2, round(s * 0.15))  # shapes ~30% of the side, slots cannot overlap
    cx, cy = {"top": (s / 2, s * 0.2), "bottom": (s / 2, s * 0.8), "left": (s * 0.2, s / 2),
              "right": (s * 0.8, s / 2)}[slot]  # fmt: skip
    cx, cy = round(cx), round(cy)
    return cx - half, cy - half, cx + half - 1, cy + half - 1


def draw_scene(scene: tuple[Shape, ...], image_size: int) -> Image.Image:
    """The RGB image of a scene (no antialiasing: every shape pixel has its exact colour)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        x0, y0, x1, y1 = slot_box(shape.slot, image_size)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # apex up
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return image


# -- text -----------------------------------------------------------------------------------


def caption(scene: tuple[Shape, ...]) -> str:
    parts = [f"a {s.color} {s.kind} {_SLOT_PHRASE[s.slot]}" for s in scene]
    return " and ".join(parts) + "."


def scene_questions(scene: tuple[Shape, ...]) -> list[tuple[str, str]]:
    """Every (question, answer) the scene answers unambiguously."""
    qa = [("How many shapes are there?", COUNT_WORDS[len(scene)])]
    for s in scene:
        qa.append((f"What color is the shape {_SLOT_PHRASE[s.slot]}?", s.color))
        qa.append((f"What kind of shape is {_SLOT_PHRASE[s.slot]}?", s.kind))
        if sum((t.color, t.kind) == (s.color, s.kind) for t in scene) == 1:
            qa.append((f"Where is the {s.color} {s.kind}?", s.slot))
    present = {(s.color, s.kind) for s in scene}
    for color in COLORS:
        for kind in KINDS:
            answer = "yes" if (color, kind) in present else "no"
            qa.append((f"Is there a {color} {kind}?", answer))
    return qa


def _pick_questions(scene, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    qa = scene_questions(scene)
    yes_no = [q for q in qa if q[1] in ("yes", "no")]
    others = [q for q in qa if q[1] not in ("yes", "no")]
    picked = []
    for _ in range(n):
        # One question in five is yes/no, balanced between yes and no.
        if rng.random() < 0.2:
            want = "yes" if rng.random() < 0.5 else "no"
            pool = [q for q in yes_no if q[1] == want]
        else:
            pool = others
        pool = [q for q in pool if q not in picked] or [q for q in qa if q not in picked]
        picked.append(pool[rng.integers(len(pool))])
    return picked


def _conversation(turns: list[tuple[str, str]], with_image: bool) -> list[dict[str, str]]:
    conv = []
    for i, (question, answer) in enumerate(turns):
        value = f"{IMAGE_TOKEN}\n{question}" if with_image and i == 0 else question
        conv += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return conv


def vocabulary() -> list[str]:
    """Every word the dataset (and the vicuna_v1 / plain templates) uses, specials first."""
    from llava_jax.data.templates import get_template

    text = [caption((Shape(k, c, s),)) for k in KINDS for c in COLORS for s in SLOTS]
    colors = list(COLORS)  # a scene with every slot and unique shapes: every question
    scene = tuple(Shape(KINDS[i % len(KINDS)], colors[i], s) for i, s in enumerate(SLOTS))
    text += [q + " " + a for q, a in scene_questions(scene)]
    text += [q + " " + a for q, a in _TEXT_ONLY]
    text += list(COUNT_WORDS) + list(SLOTS) + ["yes", "no"]
    template = get_template("vicuna_v1")
    text += [template.system, "USER: ASSISTANT:"]
    words = set()
    for t in text:
        words.update(_split_words(t))
    return [*SPECIAL_TOKENS, "\n", *sorted(words)]


_WORD = r"\w+|[^\w\s]|\n"  # words, single punctuation marks, and newlines (for `plain`)


def _split_words(text: str) -> list[str]:
    import re

    return re.findall(_WORD, text)


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`; adds BOS like LLaMA's."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # drop spaces, keep newlines as tokens
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_WORD), behavior="isolated"),
    ])  # fmt: skip
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )  # fmt: skip


# -- the dataset ----------------------------------------------------------------------------


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    *,
    num_stage1: int = 2000,
    num_stage2: int = 2000,
    num_val: int = 200,
    image_size: int = 32,
    seed: int = 0,
) -> ShapesPaths:
    """Writes the dataset (see the module docstring); deterministic from `seed`.

    Args:
      out_dir: directory to write into (created; existing dataset files are replaced).
      num_stage1: images with a caption each (stage 1).
      num_stage2: images with a conversation each (stage 2), other than stage 1's.
      num_val: held-out images, one question each.
      image_size: side of the square images in pixels (>= 16).
      seed: the seed of every random choice.

    Returns:
      The paths written.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: shapes need at least 16 px")
    if num_stage1 < 1 or num_stage2 < 1 or num_val < 0:
        raise ValueError(
            f"num_stage1={num_stage1}, num_stage2={num_stage2}, num_val={num_val}: "
            "need >= 1, >= 1 and >= 0"
        )
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stage1, stage2, heldout, scenes = [], [], [], {}
    for split, n in (("stage1", num_stage1), ("stage2", num_stage2), ("heldout", num_val)):
        for i in range(n):
            scene = random_scene(rng)
            image = f"images/{split}_{i:05d}.png"
            draw_scene(scene, image_size).save(root / image)
            scenes[image] = [dataclasses.asdict(s) for s in scene]
            rid = f"{split}_{i:05d}"
            if split == "stage1":
                stage1.append(dict(id=rid, image=image, conversations=[
                    {"from": "human", "value": IMAGE_TOKEN},
                    {"from": "gpt", "value": caption(scene)},
                ]))  # fmt: skip
            elif split == "stage2":
                turns = _pick_questions(scene, rng, int(rng.choice(3, p=(0.6, 0.25, 0.15))) + 1)
                stage2.append(dict(id=rid, image=image, conversations=_conversation(turns, True)))
                if rng.random() < 0.05:  # a text-only sample now and then
                    qa = _TEXT_ONLY[rng.integers(len(_TEXT_ONLY))]
                    stage2.append(
                        dict(id=f"text_{i:05d}", conversations=_conversation([qa], False))
                    )
            else:
                turns = _pick_questions(scene, rng, 1)
                heldout.append(dict(id=rid, image=image, conversations=_conversation(turns, True)))
    paths = ShapesPaths.at(root)
    for path, records in ((paths.stage1, stage1), (paths.stage2, stage2),
                          (paths.heldout, heldout), (paths.scenes, scenes)):  # fmt: skip
        path.write_text(json.dumps(records, indent=1) + "\n")
    build_tokenizer().save_pretrained(paths.tokenizer)
    return paths
