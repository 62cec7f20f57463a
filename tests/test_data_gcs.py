"""`gs://` data: a build written to a bucket, and read back, never through a local path.

The fake GCS (tests/fake_gcs.py) holds objects in memory and serves ArrayRecord's reader
over HTTP; the tests run in an empty current directory and check that it stays empty, so a
`gs://` path turned into the local `gs:/...` (what `pathlib.Path` makes of it) fails.
"""

from __future__ import annotations

import json

import pytest
from etils import epath
from fake_gcs import fake_gcs  # noqa: F401 (a fixture)
from test_data_build import dataset, embedded  # noqa: F401 (a fixture)

from llava_jax.cli.main import main
from llava_jax.data import shards
from llava_jax.data.build import build_shards
from llava_jax.data.sources import open_source


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert not list(cwd.iterdir()), "a gs:// path was written to the local disk"


def upload(local, remote: str) -> None:
    """Copies a local file or folder to the fake bucket."""
    if local.is_dir():
        for child in local.iterdir():
            upload(child, f"{remote}/{child.name}")
    elif not local.is_symlink():  # GCS has no links
        epath.Path(remote).write_bytes(local.read_bytes())


def test_cli_build_to_a_bucket_then_read_it(dataset, fake_gcs, in_empty_dir, capsys):  # noqa: F811
    out = "gs://bucket/data/mix"
    argv = ["data", "build", "--input", str(dataset.json), "--image-root", str(dataset.root)]
    assert main([*argv, "--out", out, "--num-shards", "2", "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"6 records in 2 shards -> {out}; skipped 8")

    names = {shards.MANIFEST, shards.SKIPPED, *(shards.shard_name(k, 2) for k in range(2))}
    assert set(fake_gcs()) == {f"{out}/{name}" for name in names}  # no temporary left over
    source = open_source(str(dataset.json), str(dataset.root))
    want = [embedded(r) for r in source if r.id in dataset.good]
    got = list(open_source(out))  # the shards are read by ArrayRecord's own GCS reader
    assert got == want

    # Again: refused, then replaced with --overwrite (renames on GCS are copies).
    assert main([*argv, "--out", out]) == 2
    assert main([*argv, "--out", out, "--num-shards", "3", "--overwrite"]) == 0
    names = {shards.MANIFEST, shards.SKIPPED, *(shards.shard_name(k, 3) for k in range(3))}
    assert set(fake_gcs()) == {f"{out}/{name}" for name in names}
    assert list(open_source(out)) == want


def test_json_and_images_on_a_bucket(dataset, fake_gcs, in_empty_dir):  # noqa: F811
    upload(dataset.json, "gs://bucket/train.json")
    upload(dataset.root, "gs://bucket/images")
    summary = build_shards("gs://bucket/train.json", "gs://bucket/images", "gs://bucket/out")
    # As from local files, except a symbolic link (none on GCS): `symlink` is missing.
    assert summary.skipped == {
        "bad_video": 1,
        "corrupt_image": 1,
        "malformed_record": 2,
        "missing_file": 2,
        "path_outside_root": 2,
    }
    local = build_shards(str(dataset.json), str(dataset.root), in_empty_dir.parent / "local")
    assert list(open_source("gs://bucket/out")) == list(open_source(str(local.out)))
    skipped = (epath.Path("gs://bucket/out") / shards.SKIPPED).read_text().splitlines()
    reasons = {json.loads(line)["id"]: json.loads(line)["reason"] for line in skipped}
    assert reasons["dotdot"] == "path_outside_root" and reasons["symlink"] == "missing_file"


def test_a_yaml_mixture_on_a_bucket(dataset, fake_gcs, in_empty_dir):  # noqa: F811
    upload(dataset.json, "gs://bucket/mix/train.json")
    upload(dataset.root, "gs://bucket/mix/images")
    epath.Path("gs://bucket/mix/mix.yaml").write_text(
        "datasets:\n  - json_path: train.json\n    image_folder: images\n"
        "    sampling_strategy: first:2\n"
    )
    records = list(open_source("gs://bucket/mix/mix.yaml"))
    assert [r.id for r in records] == ["one", "multi"]
    assert records[0].root == "gs://bucket/mix/images"


def test_a_missing_remote_source_is_one_clear_error(fake_gcs, in_empty_dir, capsys):  # noqa: F811
    argv = ["data", "build", "--input", "gs://bucket/nope.json", "--out", "gs://bucket/out"]
    assert main(argv) == 2
    assert (
        capsys.readouterr().err == "llava-jax: error: --input gs://bucket/nope.json: no such file\n"
    )
    with pytest.raises(FileNotFoundError):
        open_source("gs://bucket/nope")
