"""OneVision-style YAML mixtures: many LLaVA JSON files, each sampled, one after another.

    datasets:
      - json_path: llava_v1_5_mix665k.json      # .json or .jsonl, relative to this file
        sampling_strategy: all                    # the default
      - json_path: ocr/ocr_vqa.jsonl
        sampling_strategy: "first:10%"
        image_folder: /data/ocr_images            # optional; else the image root given
      - json_path: sharegpt4v.json
        sampling_strategy: "random:5000"

The strategies are those of LLaVA-NeXT's `LazySupervisedDataset` (llava/train/train.py):
`first:N` the first N records, `end:N` the last N, `random:N` N records of a shuffle, where
N is a count or a percentage `P%` meaning ceil(P * len / 100); N past the end takes all.
Differences, all deliberate: `random` is seeded (`np.random.default_rng([seed, entry])`,
the same sample on every host and every run) where the original used Python's unseeded
`random.shuffle`; `end:0` takes nothing (the original's `[-0:]` took everything); P may have
a fraction (`12.5%`); relative paths resolve against the YAML file's folder, not the
current directory; an unknown strategy or key is an error instead of meaning `all`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import yaml
from etils import epath

ENTRY_KEYS = ("json_path", "sampling_strategy", "image_folder")
_STRATEGY = re.compile(r"(first|end|random):(\d+(?:\.\d+)?%|\d+)")


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    """One file of a mixture: where it is, how to sample it, and its image root."""

    json_path: epath.Path
    sampling_strategy: str
    image_root: str | None


def read_mixture(path: epath.PathLike, image_root: str | None) -> list[MixtureEntry]:
    """Reads and checks a YAML mixture; `image_root` serves entries without `image_folder`.

    Raises:
      ValueError: not a mapping with a `datasets` list, an entry without `json_path`, an
        unknown key or sampling strategy; the message names the file and the entry.
    """
    path = epath.Path(path)  # local or gs://; entries resolve against its folder
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    datasets = config.get("datasets") if isinstance(config, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise ValueError(f"{path}: expected `datasets:`, a non-empty list of entries")
    entries = []
    for i, entry in enumerate(datasets):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ValueError(f"{where}: expected a mapping with a `json_path` string")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; accepted: {list(ENTRY_KEYS)}")
        strategy = str(entry.get("sampling_strategy", "all"))
        if strategy != "all" and not _STRATEGY.fullmatch(strategy):
            raise ValueError(
                f"{where}: sampling_strategy {strategy!r}; expected all, first:N, end:N or "
                "random:N, with N a count or a percentage (first:10%)"
            )
        folder = entry.get("image_folder")
        entries.append(
            MixtureEntry(
                json_path=path.parent / entry["json_path"],
                sampling_strategy=strategy,
                image_root=image_root if folder is None else str(path.parent / str(folder)),
            )
        )
    return entries


def sample_rows(num_records: int, strategy: str, seed: int, entry: int) -> np.ndarray:
    """The rows a strategy keeps of a file of `num_records`, in the order they are read.

    Args:
      num_records: the file's record count.
      strategy: `all`, `first:N`, `end:N` or `random:N` (N a count or `P%`).
      seed: the mixture seed; `entry`: the entry's position, so that two entries sampling
        the same file draw independently.

    Returns:
      int64[M], indices into the file.
    """
    if strategy == "all":
        return np.arange(num_records, dtype=np.int64)
    match = _STRATEGY.fullmatch(strategy)
    if match is None:
        raise ValueError(f"unknown sampling_strategy {strategy!r}")
    kind, number = match.groups()
    if number.endswith("%"):  # exact rational arithmetic: ceil never sees a rounding error
        count = math.ceil(Fraction(number[:-1]) * num_records / 100)
    else:
        count = int(number)
    count = min(count, num_records)
    if kind == "first":
        return np.arange(count, dtype=np.int64)
    if kind == "end":
        return np.arange(num_records - count, num_records, dtype=np.int64)
    rng = np.random.default_rng([seed, entry])
    return rng.permutation(num_records)[:count].astype(np.int64)
