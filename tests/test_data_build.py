"""`llava-jax data build` (data/build.py, data/shards.py, cli/data.py) on real files.

JSON + image folder -> ArrayRecord shards -> `open_source` gives the same records with the
files' bytes embedded; bad records are skipped and counted by reason; the output appears
atomically; the CLI's one-line errors.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.cli.main import main
from llava_jax.data import build as build_lib
from llava_jax.data import shards
from llava_jax.data.build import BuildError, build_shards, media_format
from llava_jax.data.schema import RawRecord
from llava_jax.data.sources import open_source


def turns(text: str = "Describe.") -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "Ok ✓"}]


def image_bytes(fmt: str, hw=(6, 5), value=100) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 120, 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    return buffer.getvalue()


@dataclasses.dataclass
class Dataset:
    json: Path
    root: Path
    good: list[str]  # ids of the records that survive, in order
    skipped: dict[str, str]  # id -> reason


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.png").write_bytes(image_bytes("PNG"))
    (root / "coco" / "b.jpg").write_bytes(image_bytes("JPEG", (9, 7)))
    (root / "c.webp").write_bytes(image_bytes("WEBP"))
    (root / "d.bmp").write_bytes(image_bytes("BMP"))
    (root / "clip.gif").write_bytes(animated_gif())
    # The ISO base media header is all the build looks at; decoding is the transform's job.
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(64)))
    (root / "fake.jpg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "notes.mp4").write_bytes(b"just text, not a video")
    (tmp_path / "secret.jpg").write_bytes(image_bytes("JPEG"))
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    records = [
        {"id": "one", "image": "coco/a.png", "conversations": turns()},
        {"id": "multi", "image": ["coco/b.jpg", "c.webp", "d.bmp"], "conversations": turns()},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
        },
        {"id": "missing", "image": "coco/zzz.jpg", "conversations": turns()},
        {"id": "dotdot", "image": "../secret.jpg", "conversations": turns()},
        {"id": "absolute", "image": str(tmp_path / "secret.jpg"), "conversations": turns()},
        {"id": "symlink", "image": "link.jpg", "conversations": turns()},
        {"id": "svg", "image": "fake.jpg", "conversations": turns()},
        {"id": "gifvideo", "video": "clip.gif", "conversations": turns()},
        {"id": "mp4", "video": "clip.mp4", "conversations": turns()},
        {"id": "badvideo", "video": "notes.mp4", "conversations": turns()},
        ["not", "an", "object"],
        {"id": "noconv", "image": "coco/a.png"},
        {"image": "coco/a.png", "conversations": turns("no id")},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    skipped = {
        "missing": "missing_file",
        "dotdot": "path_outside_root",
        "absolute": "path_outside_root",
        "symlink": "path_outside_root",
        "svg": "corrupt_image",
        "badvideo": "bad_video",
        "train.json:11": "malformed_record",
        "noconv": "malformed_record",
    }
    good = ["one", "multi", "text", "gifvideo", "mp4", "train.json:13"]
    return Dataset(path, root, good, skipped)


def embedded(record: RawRecord) -> RawRecord:
    """The record as a build stores it: each file's bytes in place of its path."""
    images = tuple((Path(record.root) / p).read_bytes() for p in record.images)
    videos = tuple((Path(record.root) / p).read_bytes() for p in record.videos)
    return dataclasses.replace(record, images=images, videos=videos, root=None)


@pytest.mark.parametrize("num_shards, workers", [(1, 1), (3, 2)])
def test_round_trip_equals_the_json_source(dataset, tmp_path, num_shards, workers):
    out = tmp_path / "built"
    summary = build_shards(
        str(dataset.json), str(dataset.root), out, num_shards=num_shards, workers=workers
    )
    source = open_source(str(dataset.json), str(dataset.root))
    want = [embedded(r) for r in source if r.id in dataset.good]
    assert [r.id for r in want] == dataset.good
    got = list(open_source(str(out)))
    assert [r.id for r in got] == dataset.good  # source order, skips left out
    assert got == want  # conversations, ids and media bytes equal to the files
    assert summary.num_records == len(dataset.good) and len(summary.shard_counts) == num_shards
    files = sorted(p.name for p in out.glob("*.array_record"))
    assert files == [shards.shard_name(k, num_shards) for k in range(num_shards)]
    assert not list(tmp_path.glob(".built.*"))  # no temporary directory left behind


def test_manifest_counts_every_skip_by_reason(dataset, tmp_path):
    out = tmp_path / "built"
    summary = build_shards(str(dataset.json), str(dataset.root), out, num_shards=2)
    manifest = json.loads((out / "manifest.json").read_text())
    want_counts = {"bad_video": 1, "corrupt_image": 1, "malformed_record": 2}
    want_counts |= {"missing_file": 1, "path_outside_root": 3}
    assert manifest["skipped"] == want_counts == summary.skipped
    assert manifest["num_skipped"] == len(dataset.skipped)
    assert manifest["num_records"] == len(dataset.good)
    assert [s["num_records"] for s in manifest["shards"]] == list(summary.shard_counts)
    assert (manifest["format"], manifest["version"]) == (shards.FORMAT, shards.VERSION)
    assert manifest["source"] == str(dataset.json)
    lines = [json.loads(x) for x in (out / manifest["skipped_records"]).read_text().splitlines()]
    assert {x["id"]: x["reason"] for x in lines} == dataset.skipped
    assert [x["id"] for x in lines] == [i for i in _json_ids(dataset.json) if i in dataset.skipped]
    assert all(x["detail"] for x in lines)
    details = {x["id"]: x["detail"] for x in lines}
    assert details["noconv"] == "no conversations"  # an object, without conversations
    assert details["train.json:11"] == "not an object: a JSON list"
    assert summary.line().startswith(f"{len(dataset.good)} records in 2 shards -> {out}; skipped 8")


def _json_ids(path: Path) -> list[str]:
    records = json.loads(path.read_text())
    return [
        r.get("id", f"train.json:{i}") if isinstance(r, dict) else f"train.json:{i}"
        for i, r in enumerate(records)
    ]


def test_yaml_mixture_and_empty_source(dataset, tmp_path):
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        f"datasets:\n  - json_path: {dataset.json.name}\n    sampling_strategy: first:3\n"
        f"    image_folder: {dataset.root.name}\n"
    )
    out = tmp_path / "mixed"
    summary = build_shards(str(mix), None, out)
    assert [r.id for r in open_source(str(out))] == ["one", "multi", "text"]
    assert summary.skipped == {}
    (tmp_path / "empty.json").write_text("[]")
    build_shards(str(tmp_path / "empty.json"), None, tmp_path / "none", num_shards=4)
    assert len(open_source(str(tmp_path / "none"))) == 0


def test_paths_without_an_image_root_stop_the_build(dataset, tmp_path):
    with pytest.raises(ValueError, match="no image root"):
        build_shards(str(dataset.json), None, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_interrupted_build_leaves_nothing(dataset, tmp_path, monkeypatch):
    embed, calls = build_lib._embed, []

    def interrupt_at_the_fourth_record(record):
        calls.append(record.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return embed(record)

    monkeypatch.setattr(build_lib, "_embed", interrupt_at_the_fourth_record)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(dataset.json), str(dataset.root), tmp_path / "out", num_shards=2)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_overwrite_only_replaces_an_earlier_build(dataset, tmp_path):
    out = tmp_path / "out"
    build_shards(str(dataset.json), str(dataset.root), out, num_shards=3)
    with pytest.raises(BuildError, match="exists and is not empty"):
        build_shards(str(dataset.json), str(dataset.root), out)
    build_shards(str(dataset.json), str(dataset.root), out, num_shards=1, overwrite=True)
    assert sorted(p.name for p in out.glob("*.array_record")) == [shards.shard_name(0, 1)]
    assert len(open_source(str(out))) == len(dataset.good)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    with pytest.raises(BuildError, match="not an earlier"):
        build_shards(str(dataset.json), str(dataset.root), precious, overwrite=True)
    assert (precious / "keep.txt").read_text() == "data"
    (tmp_path / "empty_dir").mkdir()  # an empty directory is fine without --overwrite
    build_shards(str(dataset.json), str(dataset.root), tmp_path / "empty_dir")


def test_record_encoding_round_trip_and_corruption():
    record = RawRecord("ü-1", turns(), images=(b"\xff\xd8\xffA", b""), videos=(b"\x00" * 300,))
    data = shards.encode_record(record)
    assert shards.decode_record(data) == record
    with pytest.raises(ValueError, match="bad magic"):
        shards.decode_record(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="the header says"):
        shards.decode_record(data + b"!")
    with pytest.raises(TypeError, match="only media given as bytes"):
        shards.encode_record(RawRecord("p", turns(), images=("a.jpg",)))


def test_open_source_checks_the_manifest(dataset, tmp_path):
    out = tmp_path / "out"
    build_shards(str(dataset.json), str(dataset.root), out, num_shards=2)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        open_source(str(out))
    (out / "manifest.json").write_text(json.dumps({**manifest, "num_records": 99}))
    with pytest.raises(ValueError, match="the shards hold 6 records, the manifest says 99"):
        open_source(str(out))
    (out / shards.shard_name(1, 2)).unlink()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard files missing"):
        open_source(str(out))
    with pytest.raises(ValueError, match="no manifest.json"):
        open_source(str(tmp_path / "images"))


@pytest.mark.parametrize(
    "data, kind, want",
    [
        (image_bytes("JPEG"), "image", "JPEG"),
        (image_bytes("PNG"), "image", "PNG"),
        (image_bytes("WEBP"), "image", "WEBP"),
        (image_bytes("GIF"), "image", "GIF"),
        (image_bytes("BMP"), "image", "BMP"),
        (image_bytes("TIFF"), "image", None),
        (b"%PDF-1.7", "image", None),
        (b"\x00\x00\x00\x20ftypisom", "video", "MP4/MOV"),
        (b"\x1a\x45\xdf\xa3\x01", "video", "Matroska/WebM"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "video", "AVI"),
        (animated_gif(), "video", "GIF"),
        (image_bytes("JPEG"), "video", None),
        (b"\x00\x00\x00\x20ftypisom", "image", None),
    ],
)
def test_media_format_allow_list(data, kind, want):
    assert media_format(data, kind) == want


# -- the command line --------------------------------------------------------------------------


def test_cli_build(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "build", "--input", str(dataset.json), "--image-root", str(dataset.root)]
    assert main([*argv, "--out", str(out), "--num-shards", "2", "--workers", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert printed[0].startswith(f"6 records in 2 shards -> {out}; skipped 8 (bad_video 1, ")
    assert [r.id for r in open_source(str(out))] == dataset.good


@pytest.mark.parametrize(
    "args, message",
    [
        ("--input {tmp}/nope.json --image-root {root}", "--input {tmp}/nope.json: no such file"),
        ("--input {json} --image-root {tmp}/gone", "--image-root {tmp}/gone: no such directory"),
        ("--input {json} --image-root {root} --num-shards 0", "--num-shards 0: must be at least 1"),
        ("--input {json}", "record one names the file 'coco/a.png', but no image root is set"),
    ],
)
def test_cli_errors_are_one_line(dataset, tmp_path, capsys, args, message):
    fill = {"tmp": tmp_path, "json": dataset.json, "root": dataset.root}
    argv = ["data", "build", *args.format(**fill).split(), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"llava-jax: error: {message.format(**fill)}\n"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_cli_a_json_list_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "a", "conversations": []}, {"id": "caf\u00e9"}]'.encode("latin-1"))
    argv = ["data", "build", "--input", str(path), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"llava-jax: error: {path}: not UTF-8 text (byte 46 is b'\\xe9')\n"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_out(dataset, tmp_path, capsys):
    argv = ["data", "build", "--input", str(dataset.json), "--image-root", str(dataset.root)]
    assert main([*argv, "--out", str(dataset.root)]) == 2
    err = capsys.readouterr().err
    want = f"--out {dataset.root}: exists and is not empty; refusing to overwrite"
    assert err == f"llava-jax: error: {want}\n"
    assert (dataset.root / "coco" / "a.png").read_bytes() == image_bytes("PNG")
