"""Training data sources (data/sources.py, data/mixture.py): real files in tmp_path.

LLaVA JSON and JSONL, malformed records passed on for the transform to count, media path
safety, YAML mixtures with every sampling strategy (exact record ids), and a TFDS dataset
built here in a temporary data_dir (no download, no tensorflow).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from llava_jax.data import mixture
from llava_jax.data.schema import NotAnObject, RawRecord, SkipSample, conversations_problem
from llava_jax.data.sources import open_source, resolve_media


def turns(text: str = "What is it?") -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "A cat."}]


RECORDS = [
    {"id": "img", "image": "coco/1.jpg", "conversations": turns()},
    {"image": ["a.png", "b.png"], "conversations": turns("<image>")},  # no id, two images
    {"id": 7, "video": "clips/v.mp4", "conversations": turns()},  # int id
    {
        "id": "text",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello, ünïcode ✓"},
        ],
    },
]


def expected(name: str, root: str | None) -> list[RawRecord]:
    return [
        RawRecord("img", turns(), images=("coco/1.jpg",), root=root),
        RawRecord(f"{name}:1", turns("<image>"), images=("a.png", "b.png"), root=root),
        RawRecord("7", turns(), videos=("clips/v.mp4",), root=root),
        RawRecord("text", RECORDS[3]["conversations"], root=root),
    ]


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False))
    ds = open_source(str(path), "/images")
    assert isinstance(ds, grain.MapDataset)
    assert list(ds) == expected("data.json", "/images")
    assert ds[3] == expected("data.json", "/images")[3]  # random access


def test_jsonl_with_blank_and_invalid_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in RECORDS]
    path.write_text("\n".join([lines[0], "", lines[1], "{not json", lines[2], lines[3]]) + "\n")
    got = list(open_source(str(path), "root"))
    want = expected("data.jsonl", "root")
    # The invalid line is a record (index 2, blank lines are not records) that is not an
    # object, its cause kept, so the transform skips it as malformed_record.
    invalid = got[2].conversations
    assert isinstance(invalid, NotAnObject), invalid
    assert invalid.what.startswith("a JSON string 'data.jsonl line 4: invalid JSON: "), invalid
    assert got == [*want[:2], RawRecord("data.jsonl:2", invalid, root="root"), *want[2:]]


def test_malformed_records_are_passed_on_not_raised(tmp_path):
    path = tmp_path / "bad.json"
    bad = [5, "text", {"id": "noconv"}, {"id": "badimg", "image": 7, "conversations": turns()}]
    path.write_text(json.dumps(bad))
    got = list(open_source(str(path)))
    assert got == [
        RawRecord("bad.json:0", NotAnObject("a JSON number")),
        RawRecord("bad.json:1", NotAnObject("a JSON string 'text'")),
        RawRecord("noconv", None),
        RawRecord("badimg", turns(), images=(7,)),
    ]
    problems = [conversations_problem(r.conversations) for r in got[:3]]
    assert problems == ["not an object: a JSON number", "not an object: a JSON string 'text'",
                        "no conversations"]  # fmt: skip
    with pytest.raises(SkipSample) as e:
        resolve_media(got[3].images[0], "/images", got[3].id)
    assert (e.value.reason, e.value.record_id) == ("malformed_record", "badimg")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": 1}', "expected a JSON list"),
        ('[{"id": 1},\n {"id": 2}', "invalid JSON"),
        ('[{"id": 1}] [', "extra data"),
        ('[{"id": 1},]', "invalid JSON"),
    ],
)
def test_invalid_json_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        open_source(str(path))
    assert "broken.json" in str(e.value)


def test_empty_list_and_unknown_spec(tmp_path):
    (tmp_path / "empty.json").write_text(" [ ] \n")
    assert len(open_source(str(tmp_path / "empty.json"))) == 0
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown data source"):
        open_source(str(tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        open_source(str(tmp_path / "nope.json"))


def test_records_are_stored_compactly_and_pickle(tmp_path):
    records = [{"id": f"r{i}", "conversations": turns("x" * 100)} for i in range(200)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, indent=4))
    ds = open_source(str(path))
    compact = sum(len(json.dumps(r, separators=(",", ":"))) for r in records)
    # One flat buffer: the pickled dataset (what a Grain worker receives) is about the
    # compact JSON, not the indented file nor a graph of Python objects.
    size = len(pickle.dumps(ds))
    assert compact < size < compact + 8 * len(records) + 4096, (size, compact)
    assert list(pickle.loads(pickle.dumps(ds))) == list(ds)


# -- resolve_media -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.jpg").write_bytes(b"\xff\xd8\xff inside")
    (tmp_path / "outside.jpg").write_bytes(b"\xff\xd8\xff outside")
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "alias.jpg").symlink_to(root / "sub" / "in.jpg")
    return root


def test_resolve_media_accepts_paths_inside_the_root(root):
    inside = (root / "sub" / "in.jpg").resolve()
    assert resolve_media("sub/in.jpg", str(root), "r") == inside
    assert resolve_media("sub/../sub/in.jpg", str(root), "r") == inside  # `..` that stays in
    assert resolve_media("alias.jpg", str(root), "r") == inside  # a link that stays in
    assert resolve_media(b"\x89PNG", str(root), "r") == b"\x89PNG"
    assert resolve_media(b"\x89PNG", None, "r") == b"\x89PNG"


@pytest.mark.parametrize(
    "ref, reason",
    [
        ("../outside.jpg", "path_outside_root"),
        ("sub/../../outside.jpg", "path_outside_root"),
        ("escape.jpg", "path_outside_root"),  # a symlink leaving the root
        ("nope.jpg", "missing_file"),
        ("sub", "missing_file"),  # a directory
        ("", "malformed_record"),
        (3, "malformed_record"),
        ("bad\0name.jpg", "malformed_record"),
    ],
)
def test_resolve_media_skips(root, ref, reason):
    with pytest.raises(SkipSample) as e:
        resolve_media(ref, str(root), "rec-9")
    assert (e.value.reason, e.value.record_id) == (reason, "rec-9")


def test_resolve_media_refuses_absolute_paths_even_inside_the_root(root):
    for ref in (str(root / "sub" / "in.jpg"), str(root.parent / "outside.jpg")):
        with pytest.raises(SkipSample) as e:
            resolve_media(ref, str(root), "abs")
        assert e.value.reason == "path_outside_root"


def test_resolve_media_without_a_root_is_a_config_error(root):
    with pytest.raises(ValueError, match="no image root"):
        resolve_media("sub/in.jpg", None, "r")


# -- YAML mixtures -----------------------------------------------------------------------------


def write_records(path: Path, prefix: str, n: int) -> None:
    records = [{"id": f"{prefix}{i}", "conversations": turns()} for i in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))


@pytest.fixture
def mix_dir(tmp_path, monkeypatch) -> Path:
    data = tmp_path / "mix"
    (data / "sub").mkdir(parents=True)
    write_records(data / "a.json", "a", 10)
    write_records(data / "sub" / "b.jsonl", "b", 30)
    write_records(data / "c.json", "c", 7)
    monkeypatch.chdir(tmp_path)  # json_path resolves against the YAML's folder, not this
    return data


def write_yaml(path: Path, entries: list[dict]) -> str:
    lines = ["datasets:"]
    for e in entries:
        lines.append(f"  - json_path: {e['json_path']}")
        for k, v in e.items():
            if k != "json_path":
                lines.append(f'    {k}: "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def ids(ds) -> list[str]:
    return [r.id for r in ds]


@pytest.mark.parametrize(
    "strategy, want",
    [
        ("all", [f"b{i}" for i in range(30)]),
        ("first:4", ["b0", "b1", "b2", "b3"]),
        ("first:10%", ["b0", "b1", "b2"]),  # ceil(3) = 3, not 4
        ("first:11%", ["b0", "b1", "b2", "b3"]),  # ceil(3.3)
        ("first:12.5%", ["b0", "b1", "b2", "b3"]),  # ceil(3.75)
        ("end:3", ["b27", "b28", "b29"]),
        ("end:5%", ["b28", "b29"]),  # ceil(1.5)
        ("end:0", []),
        ("first:100", [f"b{i}" for i in range(30)]),  # past the end: all
        ("end:100%", [f"b{i}" for i in range(30)]),
    ],
)
def test_mixture_strategies(mix_dir, strategy, want):
    spec = write_yaml(
        mix_dir / "m.yaml", [{"json_path": "sub/b.jsonl", "sampling_strategy": strategy}]
    )
    assert ids(open_source(spec)) == want


def test_mixture_concatenates_entries_with_their_image_roots(mix_dir):
    spec = write_yaml(
        mix_dir / "m.yaml",
        [
            {"json_path": "a.json", "sampling_strategy": "end:2"},
            {"json_path": "sub/b.jsonl", "sampling_strategy": "first:2", "image_folder": "imgs"},
            {"json_path": str(mix_dir / "c.json")},  # absolute, default strategy `all`
        ],
    )
    ds = open_source(spec, "/default/root")
    assert ids(ds) == ["a8", "a9", "b0", "b1", *[f"c{i}" for i in range(7)]]
    roots = [r.root for r in ds]
    assert roots == ["/default/root"] * 2 + [str(mix_dir / "imgs")] * 2 + ["/default/root"] * 7


def test_mixture_random_is_seeded(mix_dir):
    entries = [
        {"json_path": "sub/b.jsonl", "sampling_strategy": "random:5"},
        {"json_path": "sub/b.jsonl", "sampling_strategy": "random:10%"},
    ]
    spec = write_yaml(mix_dir / "m.yaml", entries)
    first = ids(open_source(spec, seed=3))
    assert first == ids(open_source(spec, seed=3))  # the same on every run and host
    assert len(first) == 8 and len(set(first[:5])) == 5 and len(set(first[5:])) == 3
    assert set(first) <= {f"b{i}" for i in range(30)}
    # The documented rule: the shuffle of entry e is default_rng([seed, e]), kept in order.
    want = [f"b{i}" for i in np.random.default_rng([3, 0]).permutation(30)[:5]]
    want += [f"b{i}" for i in np.random.default_rng([3, 1]).permutation(30)[:3]]
    assert first == want
    assert first[:5] != [f"b{i}" for i in range(5)]  # shuffled, not the first rows
    assert ids(open_source(spec, seed=4)) != first


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("datasets:\n  - json_path: a.json\n    sampling_strategy: last:3\n", r"datasets\[0\]"),
        ("datasets:\n  - json_path: a.json\n    sampling_stratgy: all\n", "unknown keys"),
        ("datasets:\n  - sampling_strategy: all\n", "json_path"),
        ("datasets: []\n", "non-empty list"),
        ("datasets: [\n", "invalid YAML"),
        ("datasets:\n  - json_path: a.json\n    sampling_strategy: first:-1\n", "first:N"),
    ],
)
def test_mixture_errors_name_the_entry(mix_dir, yaml_text, message):
    (mix_dir / "m.yaml").write_text(yaml_text)
    with pytest.raises(ValueError, match=message) as e:
        open_source(str(mix_dir / "m.yaml"))
    assert "m.yaml" in str(e.value)


def test_mixture_missing_json_file(mix_dir):
    spec = write_yaml(mix_dir / "m.yaml", [{"json_path": "gone.json"}])
    with pytest.raises(FileNotFoundError, match="gone.json"):
        open_source(spec)


def test_sample_rows_counts():
    assert mixture.sample_rows(0, "first:50%", 0, 0).tolist() == []
    assert sorted(mixture.sample_rows(3, "random:9", 0, 0).tolist()) == [0, 1, 2]


# -- TFDS --------------------------------------------------------------------------------------


def png(value: int, hw=(4, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class LlavaTinyTfds(tfds.core.GeneratorBasedBuilder):
    """A 3-record dataset with encoded images, array images and both text layouts."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small"), tfds.core.BuilderConfig(name="qa")]

    def _info(self):
        features = {
            "sample_id": tfds.features.Text(),
            # Encoded bytes in, encoded bytes out (no tensorflow needed for either).
            "photo": tfds.features.Image(),
            "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
            "album": tfds.features.Sequence(tfds.features.Image()),  # decoded by TFDS
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "dialog": tfds.features.Text(),  # conversations as a JSON string
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "test": self._generate_examples(1)}

    def _generate_examples(self, n):
        for i in range(n):
            yield (
                str(i),
                {
                    "sample_id": f"s{i}",
                    "photo": png(10 * i),
                    "pixels": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) + i,
                    "album": [png(i), png(50 + i, (3, 2))],
                    "question": f"What is {i}?" if i else "<image>\nWhat is 0?",
                    "answer": f"It is {i}.",
                    "dialog": json.dumps(turns(f"q{i}")),
                },
            )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    data_dir = tmp_path_factory.mktemp("tfds")
    for config in ("small", "qa"):
        builder = LlavaTinyTfds(config=config, data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare()
    return str(data_dir)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]))


def test_tfds_question_answer_with_encoded_images(tfds_dir):
    fields = {"id": "sample_id", "image": "photo", "question": "question", "answer": "answer"}
    ds = open_source("tfds:llava_tiny_tfds/qa:train", tfds_dir, tfds_fields=fields)
    assert len(ds) == 3
    by_id = {r.id: r for r in ds}
    assert sorted(by_id) == ["s0", "s1", "s2"]
    for i in range(3):
        record = by_id[f"s{i}"]
        assert record.images == (png(10 * i),)  # the stored bytes, not re-encoded
        assert record.videos == () and record.root is None
        question = "<image>\nWhat is 0?" if i == 0 else f"<image>\nWhat is {i}?"  # added once
        assert record.conversations == [
            {"from": "human", "value": question},
            {"from": "gpt", "value": f"It is {i}."},
        ]


def test_tfds_conversations_with_array_images_and_default_split(tfds_dir):
    fields = {"image": "pixels", "conversations": "dialog"}
    ds = open_source("tfds:llava_tiny_tfds/small", tfds_dir, tfds_fields=fields)
    records = list(ds)
    assert len(records) == 3
    for record in records:
        index = int(record.id.rsplit(":", 1)[1])  # default id: name:split:index
        assert record.id == f"llava_tiny_tfds/small:train:{index}"
        (image,) = record.images
        i = int(record.conversations[0]["value"].rsplit("q", 1)[1])
        want = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) + i
        np.testing.assert_array_equal(decode_png(image), want)  # lossless PNG of the array
        assert record.conversations == turns(f"q{i}")
    test = open_source("tfds:llava_tiny_tfds/small:test", tfds_dir, tfds_fields=fields)
    assert len(test) == 1
    # Grain workers receive the source pickled; it reopens TFDS there.
    clone = pickle.loads(pickle.dumps(ds))
    assert list(clone) == records


def test_tfds_field_errors(tfds_dir):
    spec = "tfds:llava_tiny_tfds/small"
    with pytest.raises(ValueError, match="no such features.*image=img"):
        open_source(spec, tfds_dir, tfds_fields={"image": "img", "conversations": "dialog"})
    with pytest.raises(ValueError, match="must map `conversations`"):
        open_source(spec, tfds_dir, tfds_fields={"question": "question"})
    with pytest.raises(ValueError, match="unknown"):
        open_source(spec, tfds_dir, tfds_fields={"caption": "answer", "conversations": "dialog"})
    with pytest.raises(ValueError, match="cannot read the TFDS dataset.*bogus"):
        open_source(f"{spec}:bogus", tfds_dir, tfds_fields={"conversations": "dialog"})
    with pytest.raises(ValueError, match="cannot open the TFDS dataset"):
        open_source("tfds:no_such_dataset_xyz", tfds_dir, tfds_fields={"conversations": "c"})


def test_tfds_default_fields_are_the_features_of_our_names(tfds_dir):
    import ml_collections

    # The training config's default, an empty ConfigDict, means "match by name": this
    # dataset has `question` and `answer` (and no `image`, `id` or `conversations`).
    ds = open_source(
        "tfds:llava_tiny_tfds/qa:test", tfds_dir, tfds_fields=ml_collections.ConfigDict()
    )
    assert list(ds) == [
        RawRecord(
            "llava_tiny_tfds/qa:test:0",
            [
                {"from": "human", "value": "<image>\nWhat is 0?"},
                {"from": "gpt", "value": "It is 0."},
            ],
        )
    ]


def test_tfds_image_sequence_gets_one_placeholder_per_image(tfds_dir):
    fields = {"id": "sample_id", "image": "album", "question": "question", "answer": "answer"}
    by_id = {r.id: r for r in open_source("tfds:llava_tiny_tfds/qa", tfds_dir, tfds_fields=fields)}
    record = by_id["s2"]
    assert [decode_png(m).tolist() for m in record.images] == [
        np.full((4, 5, 3), 2, np.uint8).tolist(),
        np.full((3, 2, 3), 52, np.uint8).tolist(),
    ]
    assert record.conversations[0] == {"from": "human", "value": "<image>\n<image>\nWhat is 2?"}
