"""The symbolic image context of LLaVA's data generation, from COCO annotation files.

Captions come from `captions_*.json`, boxes from `instances_*.json` (COCO's `[x, y, width,
height]` in pixels, turned into `[x1, y1, x2, y2]` normalised by the image size).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path


class AnnotationError(ValueError):
    """A COCO annotation file that cannot be read (printed as one line)."""


@dataclasses.dataclass(frozen=True)
class ImageContext:
    image_id: int
    file_name: str
    captions: tuple[str, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()


def context_text(captions: Sequence[str], boxes: Sequence[tuple[str, Sequence[float]]]) -> str:
    """Captions one per line; then, after a blank line, `category: [x1, y1, x2, y2]` lines with
    three decimals, as the LLaVA paper shows the context."""
    text = "\n".join(c.strip() for c in captions)
    if boxes:
        text += "\n\n" + "\n".join(f"{c}: [{', '.join(f'{v:.3f}' for v in b)}]" for c, b in boxes)
    return text


def _read(path: str | os.PathLike, keys: Sequence[str]) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise AnnotationError(f"{path}: not a COCO annotation file (no {', '.join(missing)})")
    return data


def normalise_box(bbox: Sequence[float], width: int, height: int) -> tuple[float, ...]:
    """COCO `[x, y, w, h]` pixels -> `[x1, y1, x2, y2]` in [0, 1]."""
    x, y, w, h = bbox
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return (clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height))


def load_contexts(
    captions: str | os.PathLike, instances: str | os.PathLike | None = None
) -> list[ImageContext]:
    """Every image with captions, in the captions file's image order, with its boxes.

    Args:
      captions: a COCO `captions_*.json`.
      instances: a COCO `instances_*.json` of the same images (None: no boxes).
    """
    caps = _read(captions, ("images", "annotations"))
    by_image: dict[int, list[str]] = defaultdict(list)
    for a in caps["annotations"]:
        by_image[a["image_id"]].append(" ".join(str(a["caption"]).split()))
    boxes: dict[int, list] = defaultdict(list)
    sizes = {im["id"]: (im["width"], im["height"]) for im in caps["images"]}
    if instances is not None:
        inst = _read(instances, ("images", "annotations", "categories"))
        names = {c["id"]: c["name"] for c in inst["categories"]}
        sizes.update({im["id"]: (im["width"], im["height"]) for im in inst["images"]})
        for a in inst["annotations"]:
            width, height = sizes[a["image_id"]]
            boxes[a["image_id"]].append(
                (names[a["category_id"]], normalise_box(a["bbox"], width, height))
            )
    return [
        ImageContext(im["id"], im["file_name"], tuple(by_image[im["id"]]),
                     tuple(boxes.get(im["id"], ())))
        for im in caps["images"] if by_image.get(im["id"])
    ]  # fmt: skip
