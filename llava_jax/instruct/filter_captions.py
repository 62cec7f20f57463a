"""CC3M-595K-style filtering of image-caption pairs by noun-phrase frequency.

The LLaVA paper (Section 4, "Pre-training"): extract the noun phrases of every caption with
spaCy and count each unique phrase; skip phrases seen fewer than 3 times; then, from the
phrase with the lowest frequency up, add the captions holding it to the pool, at most 100 of
them (a random subset) per phrase. Captions already in the pool are not counted again, and
captions with no phrase left are dropped.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from llava_jax.instruct.prompts import BRIEF_INSTRUCTIONS

SPACY_HELP = "pip install spacy && python -m spacy download en_core_web_sm"


class SpacyMissing(OSError):
    """spaCy or its model is not installed (an OSError, so the CLI prints one line)."""


def select_by_noun_phrases(
    phrases: Sequence[Collection[str]], min_count: int = 3, max_per_phrase: int = 100, seed: int = 0
) -> list[int]:
    """The indices (ascending) of the captions the paper's procedure keeps.

    Args:
      phrases: per caption, its unique noun phrases (normalised as the caller likes).
      min_count: phrases in fewer captions than this are ignored.
      max_per_phrase: at most this many captions are added for one phrase.
      seed: the random subsets.
    """
    holders: dict[str, list[int]] = collections.defaultdict(list)
    for i, ps in enumerate(phrases):
        for p in set(ps):
            holders[p].append(i)
    frequent = [p for p, idx in holders.items() if len(idx) >= min_count]
    frequent.sort(key=lambda p: (len(holders[p]), p))  # rarest first; ties by text
    rng = random.Random(seed)
    chosen: set[int] = set()
    for p in frequent:
        remaining = [i for i in holders[p] if i not in chosen]
        if len(remaining) > max_per_phrase:
            remaining = rng.sample(remaining, max_per_phrase)
        chosen.update(remaining)
    return sorted(chosen)


def spacy_noun_phrases(captions: Iterable[str], model: str = "en_core_web_sm") -> list[set[str]]:
    """Lower-cased noun chunks of each caption with a spaCy pipeline."""
    try:
        import spacy
    except ImportError:
        raise SpacyMissing(
            "filter-captions extracts noun phrases with spaCy, which is not installed: "
            f"{SPACY_HELP} (or pass --noun-phrases FILE)"
        ) from None
    try:
        nlp = spacy.load(model, disable=["ner", "lemmatizer"])
    except OSError:
        raise SpacyMissing(
            f"the spaCy model {model!r} is not installed: python -m spacy download {model} "
            "(or pass --spacy-model NAME)"
        ) from None
    return [{c.text.lower().strip() for c in doc.noun_chunks}
            for doc in nlp.pipe(captions, batch_size=1000)]  # fmt: skip


def read_pairs(path: str | os.PathLike, image_template: str) -> list[dict[str, Any]]:
    """Image-caption records from any of:

    - LLaVA JSON / JSONL records (the caption is the first "gpt" turn); kept as they are;
    - JSON / JSONL of {"image", "caption"} (an "id" is kept when present);
    - CC3M's TSV (`caption<TAB>url` per line): images named by `image_template`, formatted
      with the line's 0-based `index`.

    Each returned record is a LLaVA record plus a private "_caption" key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such captions file", str(path))
    if path.suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = [row for row in csv.reader(f, delimiter="\t") if row]
        return [_pair_record(i, image_template.format(index=i), row[0])
                for i, row in enumerate(rows)]  # fmt: skip
    text = path.read_text(encoding="utf-8")
    try:
        rows = (json.loads(text) if text.lstrip().startswith("[")
                else [json.loads(x) for x in text.splitlines() if x.strip()])  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{path}: not JSON or JSON Lines ({e})") from None
    records = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and isinstance(row.get("conversations"), list):
            gpt = [t.get("value", "") for t in row["conversations"] if t.get("from") == "gpt"]
            if gpt:
                records.append({**row, "_caption": gpt[0]})
                continue
        if isinstance(row, dict) and "caption" in row and "image" in row:
            records.append(_pair_record(row.get("id", i), row["image"], row["caption"]))
            continue
        raise ValueError(f"{path}: record {i} is neither a LLaVA record nor {{image, caption}}")
    return records


def _pair_record(index: Any, image: str, caption: str) -> dict[str, Any]:
    instruction = BRIEF_INSTRUCTIONS[random.Random(str(index)).randrange(len(BRIEF_INSTRUCTIONS))]
    return {
        "id": str(index),
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{instruction}"},
            {"from": "gpt", "value": caption.strip()},
        ],
        "_caption": caption,
    }


def read_noun_phrases(path: str | os.PathLike, records: Sequence[dict]) -> list[list[str]]:
    """Precomputed phrases: JSONL of {"id", "noun_phrases": [...]}, one per record's id."""
    by_id = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                by_id[str(row["id"])] = [str(p) for p in row["noun_phrases"]]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not {{'id', 'noun_phrases'}}") from None
    missing = [str(r["id"]) for r in records if str(r["id"]) not in by_id]
    if missing:
        raise ValueError(f"{path}: no noun phrases for {len(missing)} captions (first id "
                         f"{missing[0]})")  # fmt: skip
    return [by_id[str(r["id"])] for r in records]


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes LLaVA records (private keys dropped): a JSON list for `.json`, else JSONL. The
    file is written whole under a temporary name, then renamed."""
    path = Path(path)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)  # as every other --out
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(clean, f, ensure_ascii=False)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in clean)
    os.replace(tmp, path)
    return len(clean)
