"""The Grain loader: coverage, determinism, exact resume, skip counting, global batches.

The records and the transform are fakes built here (the real ones are tested in their own
files): a record's conversation says how long its sample is, whether it has an image, and
whether the transform must reject it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging

import grain
import jax
import numpy as np
import pytest

from llava_jax.config import LlavaConfig
from llava_jax.data import loader
from llava_jax.data.batching import BatchShape
from llava_jax.data.schema import BATCH_FIELDS, Example, RawRecord, SkipSample
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media
from llava_jax.sharding import shard_batch

BAD_REASONS = ("corrupt_image", "missing_file", "unknown_role")


def make_records(n: int, bad_every: int = 0, long_ids=()) -> list[RawRecord]:
    """n records; every `bad_every`-th is marked bad (reasons cycling); `long_ids` too long."""
    records = []
    for i in range(n):
        bad = bad_every and i % bad_every == bad_every - 1
        reason = BAD_REASONS[(i // max(bad_every, 1)) % len(BAD_REASONS)] if bad else ""
        length = 40 if i in long_ids else 3 + i % 5
        conv = [{"from": "human", "value": " ".join(["w"] * length)}, {"bad": reason}]
        images = ("x.jpg",) if i % 3 == 0 else ()
        records.append(RawRecord(f"r{i:03d}", conv, images=images))
    return records


@dataclasses.dataclass(frozen=True)
class FakeTransform:
    """record -> Example with ids and views drawn from the record id (picklable)."""

    cfg: LlavaConfig

    def __call__(self, record: RawRecord) -> Example:
        reason = record.conversations[1]["bad"]
        if reason:
            raise SkipSample(reason, "marked bad in the test", record.id)
        cfg = self.cfg
        rng = np.random.default_rng(int(record.id[1:]))
        media = tuple(Media.image(30, 40) for _ in record.images)
        _, _, n_image, _ = feature_plan.sample_plan(cfg, media)
        text = rng.integers(1, 100, len(record.conversations[0]["value"].split()))
        ids = np.concatenate([[1], [cfg.image_token_id] * n_image, text]).astype(np.int32)
        trained = np.arange(len(ids)) >= len(ids) - 2
        s = cfg.vision.image_size
        views = rng.normal(size=(len(media), s, s, 3)).astype(np.float32)
        return Example.build(cfg, record.id, ids, trained, views, media)


def llava_config() -> LlavaConfig:
    """tiny_hf's LLaVA-1.5 config (imported here: worker processes need no transformers)."""
    from test_batching import tiny_config

    return tiny_config("llava")


def shape_for(batch_size: int) -> BatchShape:
    return BatchShape(batch_size, max_len=24, max_views=2, max_image_tokens=18, image_size=42,
                      taps_per_token=1)  # fmt: skip


def make(records, batch_size=4, **kw):
    kw = {"seed": 0, "num_epochs": 1, "process_index": 0, "process_count": 1, **kw}
    source = grain.MapDataset.source(records)
    cfg = llava_config()
    return loader.make_loader(source, FakeTransform(cfg), shape_for(batch_size), cfg, **kw)


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(got, want):
    assert len(got) == len(want), f"{len(got)} batches, expected {len(want)}"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["sample_ids"] == w["sample_ids"], f"batch {step}"
        assert g["skipped"] == w["skipped"] and g["num_samples"] == w["num_samples"], step
        for name in BATCH_FIELDS:
            np.testing.assert_array_equal(g[name], w[name], err_msg=f"batch {step}: {name}")


def ids_of(batches):
    return [i for b in batches for i in b["sample_ids"]]


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_yields_every_good_record_once(packing):
    records = make_records(30)
    batches = list(make(records, packing=packing))
    assert sorted(ids_of(batches)) == [r.id for r in records]
    assert sum(b["num_samples"] for b in batches) == 30
    if not packing:
        assert [b["num_samples"] for b in batches] == [4] * 7 + [2]  # padded last batch
        assert not batches[-1]["segment_ids"][2:].any()
    else:
        assert len(batches) < 8 and batches[0]["segment_ids"].max() > 1


def test_epochs_are_reshuffled_and_fractions_cut():
    records = make_records(12)
    ids = ids_of(make(records, num_epochs=2))
    first, second = ids[:12], ids[12:]
    assert sorted(first) == sorted(second) == [r.id for r in records]
    assert first != second
    assert len(ids_of(make(records, num_epochs=1.5))) == 18
    in_order = ids_of(make(records, shuffle=False))
    assert in_order == [r.id for r in records]


def test_same_seed_same_batches_other_seed_differs():
    records = make_records(24)
    assert_batches_equal(take(make(records, packing=True), 3), take(make(records, packing=True), 3))
    assert ids_of(take(make(records, seed=1), 3)) != ids_of(take(make(records, seed=2), 3))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_the_uninterrupted_batches(packing):
    records = make_records(40, bad_every=7)
    kw = dict(packing=packing, num_epochs=None, seed=5)
    reference = take(make(records, **kw), 8)
    it = make(records, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    take(it, 2)  # the state does not move with the old iterator
    fresh = make(records, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), reference[3:])
    assert fresh.skipped_total == {
        k: sum(b["skipped"][k] for b in reference[:8]) for k in reference[0]["skipped"]
    }


def test_resume_with_worker_processes():
    records = make_records(40, bad_every=7)
    kw = dict(packing=True, num_epochs=None, seed=5, num_workers=2)
    base = make(records, packing=True, num_epochs=None, seed=5)
    reference = take(base, 6)
    it = make(records, **kw)
    assert_batches_equal(take(it, 3), reference[:3])  # workers change nothing
    state = it.get_state()
    it.close()
    fresh = make(records, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), reference[3:])
    fresh.close()


def test_skips_are_counted_logged_and_never_batched(caplog):
    records = make_records(40, bad_every=5, long_ids={2, 12})
    bad = {r.id: r.conversations[1]["bad"] for r in records if r.conversations[1]["bad"]}
    bad |= {"r002": "too_long", "r012": "too_long"}
    with caplog.at_level(logging.WARNING, logger="llava_jax.data"):
        batches = list(make(records, batch_size=3, packing=True))
    assert not set(ids_of(batches)) & set(bad)
    assert sorted(ids_of(batches)) == sorted(r.id for r in records if r.id not in bad)
    counts = collections.Counter()
    for b in batches:
        counts.update({k: v for k, v in b["skipped"].items() if v})
    assert counts == collections.Counter(bad.values())
    logged = {r.getMessage().split()[2].rstrip(":") for r in caplog.records}
    assert logged == set(bad)


def test_grouped_batches_hold_one_modality():
    records = make_records(48)
    batches = list(make(records, batch_size=4, group_by_length=True))
    assert sorted(ids_of(batches)) == [r.id for r in records]
    image_ids = {r.id for r in records if r.images}
    full = [b for b in batches if b["num_samples"] == 4]
    assert len(full) >= 11
    for b in full[:-1]:  # the last one may hold the mixed leftovers
        kinds = {i in image_ids for i in b["sample_ids"]}
        assert len(kinds) == 1, b["sample_ids"]
    again = list(make(records, batch_size=4, group_by_length=True))
    assert ids_of(again) == ids_of(batches)


def test_grouping_spans_hosts():
    """With two hosts, each global batch (both hosts' batches of one step) is one modality,
    and the hosts' shards are disjoint and complete. (16 image + 32 text records in global
    batches of 6: 2 + 5 full batches, then the mixed leftovers.)"""
    records = make_records(48)
    image_ids = {r.id for r in records if r.images}
    kw = dict(batch_size=3, group_by_length=True, process_count=2)
    hosts = [list(make(records, process_index=p, **kw)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 8
    assert sorted(ids_of(hosts[0]) + ids_of(hosts[1])) == [r.id for r in records]
    for step, (a, b) in enumerate(zip(hosts[0][:-1], hosts[1][:-1], strict=True)):
        kinds = {i in image_ids for i in a["sample_ids"] + b["sample_ids"]}
        assert len(kinds) == 1, f"step {step}: {a['sample_ids']} + {b['sample_ids']}"


def test_global_batch_single_process():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    host = next(make(make_records(16), batch_size=8))
    arrays = shard_batch(host, mesh, BATCH_FIELDS)
    assert set(arrays) == set(BATCH_FIELDS)
    for name, value in arrays.items():
        assert value.shape == host[name].shape, name
        assert value.sharding.spec[0] == ("data", "fsdp"), name
        np.testing.assert_array_equal(np.asarray(value), host[name], err_msg=name)


def test_skip_budget():
    budget = loader.SkipBudget(max_fraction=0.1, min_records=100)
    budget.update({"corrupt_image": 5}, 0)  # 5 of 5, but too few records yet
    budget.update({"missing_file": 2}, 80)
    with pytest.raises(loader.SkipBudgetExceeded) as err:
        budget.update({"corrupt_image": 3, "unknown_role": 1}, 10)  # 11 of 101
    message = str(err.value)
    assert "11 of 101 records skipped" in message and "corrupt_image 8" in message
    assert "missing_file 2" in message and "unknown_role 1" in message
    assert isinstance(err.value, ValueError)
    ok = loader.SkipBudget(0.1)
    ok.update({"too_long": 10}, 100)  # 10 of 110 is under 10%
    assert ok.seen == 110


def test_host_batch_size():
    assert loader.host_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match="global batch 10 does not split evenly over 4"):
        loader.host_batch_size(10, 4)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="process_index 2 is outside"):
        make(make_records(4), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no records"):
        make([])
