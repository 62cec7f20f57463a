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
from typing import Any

from llava_jax.eval.layout import Layout, check_layout, records


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


def _read(path: str | os.PathLike, expect: Layout) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from None
    check_layout(data, expect, f"{path} (a COCO annotation file)")
    return data


def _image_sizes(images: list, where: str) -> dict[int, tuple[int, int]]:
    rows = records(images, ("id", "file_name", "width", "height"), where)
    return {im["id"]: (im["width"], im["height"]) for im in rows}


def _lookup(table: dict, key: Any, where: str, kind: str) -> Any:
    """`table[key]`, or a one-line error: an id that refers to no image / category."""
    if key not in table:
        raise AnnotationError(f"{where}: no {kind} with id {key!r}")
    return table[key]


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
    caps = _read(captions, {"images": list, "annotations": list})
    sizes = _image_sizes(caps["images"], f"{captions}: images")
    by_image: dict[int, list[str]] = defaultdict(list)
    where = f"{captions}: annotations"
    for i, a in enumerate(records(caps["annotations"], ("image_id", "caption"), where)):
        _lookup(sizes, a["image_id"], f"{where}[{i}]", "image")
        by_image[a["image_id"]].append(" ".join(str(a["caption"]).split()))
    boxes: dict[int, list] = defaultdict(list)
    if instances is not None:
        inst = _read(instances, {"images": list, "annotations": list, "categories": list})
        sizes.update(_image_sizes(inst["images"], f"{instances}: images"))
        where = f"{instances}: categories"
        names = {c["id"]: c["name"] for c in records(inst["categories"], ("id", "name"), where)}
        where = f"{instances}: annotations"
        keys = ("image_id", "category_id", "bbox")
        for i, a in enumerate(records(inst["annotations"], keys, where)):
            width, height = _lookup(sizes, a["image_id"], f"{where}[{i}]", "image")
            name = _lookup(names, a["category_id"], f"{where}[{i}]", "category")
            boxes[a["image_id"]].append((name, normalise_box(a["bbox"], width, height)))
    return [
        ImageContext(im["id"], im["file_name"], tuple(by_image[im["id"]]),
                     tuple(boxes.get(im["id"], ())))
        for im in caps["images"] if by_image.get(im["id"])
    ]  # fmt: skip
