"""`llava-jax instruct filter-captions`: the CC3M-595K noun-phrase filter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_jax.instruct.filter_captions import read_pairs, select_by_noun_phrases
from llava_jax.instruct.prompts import BRIEF_INSTRUCTIONS

# Phrase counts: a 4, b 3, c 1, d 1.
PHRASES = [{"a", "b"}, {"a"}, {"a", "c"}, {"b"}, {"b"}, {"d"}, {"a"}]


def test_rare_phrases_are_ignored_and_rarest_first():
    # b (3 captions) first: 0, 3, 4; then a (4): 1, 2, 6 (0 is in already); 5 has only "d".
    assert select_by_noun_phrases(PHRASES) == [0, 1, 2, 3, 4, 6]
    assert select_by_noun_phrases(PHRASES, min_count=4) == [0, 1, 2, 6]
    assert select_by_noun_phrases(PHRASES, min_count=5) == []


def test_at_most_max_per_phrase_captions_per_phrase():
    chosen = select_by_noun_phrases(PHRASES, max_per_phrase=2, seed=0)
    assert len(chosen) == 4
    assert len(set(chosen) & {0, 3, 4}) >= 2  # b's two picks (a may add 0 if b did not)
    assert len(set(chosen) & {1, 2, 6}) <= 2
    assert 5 not in chosen
    assert chosen == select_by_noun_phrases(PHRASES, max_per_phrase=2, seed=0)  # seeded


def test_inputs(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog in a park\thttp://x/1.jpg\na cat\thttp://x/2.jpg\n")
    records = read_pairs(tsv, "GCC_train_{index:09d}.jpg")
    assert [r["image"] for r in records] == ["GCC_train_000000000.jpg", "GCC_train_000000001.jpg"]
    human, gpt = records[0]["conversations"]
    assert human["value"].removeprefix("<image>\n") in BRIEF_INSTRUCTIONS
    assert gpt == {"from": "gpt", "value": "a dog in a park"}
    llava = tmp_path / "chat.json"
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a cow"}]
    llava.write_text(json.dumps([{"id": "GCC_1", "image": "GCC_1.jpg", "conversations": turns}]))
    (record,) = read_pairs(llava, "")
    assert record["_caption"] == "a cow" and record["id"] == "GCC_1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="record 0"):
        read_pairs(bad, "")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llava_jax.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_with_precomputed_phrases(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"c{i}", "image": f"{i}.jpg", "caption": f"cap {i}"})
                             + "\n" for i in range(len(PHRASES))))  # fmt: skip
    phrases = tmp_path / "phrases.jsonl"
    phrases.write_text("".join(json.dumps({"id": f"c{i}", "noun_phrases": sorted(p)}) + "\n"
                               for i, p in enumerate(PHRASES)))  # fmt: skip
    out = tmp_path / "cc3m_filtered.json"
    proc = cli("instruct", "filter-captions", "--captions", pairs, "--noun-phrases", phrases,
               "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kept 6 of 7" in proc.stdout
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == ["c0", "c1", "c2", "c3", "c4", "c6"]
    assert all("_caption" not in r for r in records)


def test_cli_without_spacy_says_what_to_install(tmp_path):
    try:
        import spacy  # noqa: F401

        pytest.skip("spaCy is installed here")
    except ImportError:
        pass
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "0.jpg", "caption": "a dog"}) + "\n")
    proc = cli("instruct", "filter-captions", "--captions", pairs, "--out", tmp_path / "o.json")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llava-jax: error: ") and "pip install spacy" in last
