"""Issue 4's "Done when", end to end: a generated stage-2 (mix665k-shaped) JSON streams
through the real pipeline for a full epoch.

The data set (tests/mix665k_data.py) is written to disk once per module: a few hundred LLaVA
records in mix665k's layouts plus planted bad records of every `SKIP_REASONS` class.

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
import json
import logging

import jax
import numpy as np
import pytest
from mix665k_data import Mix, write_mix
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
MAX_PIXELS = 400 * 400  # the pixel bomb in mix665k_data.py is over it
BATCH = 8  # rows per batch: one per device of the mesh
SEED = 7


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
