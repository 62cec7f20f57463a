"""Every writing command with relative paths, as the README writes them (`--out ckpt/x`,
`--workdir runs/pretrain`): run as a subprocess from another working directory, each must
finish and write where the user's working directory says. orbax refuses relative paths,
so a path that reaches it unchanged fails the save (issue 18.1).

(`train` of the built-in run from a relative workdir: tests/test_shapes_run.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_tiny
import pytest
from llm_server import FakeLLM
from test_init_model import build_parts

from llava_jax import model_io, paths
from llava_jax.train import config_loader, shapes
from llava_jax.train.shapes_run import _random_model_dir

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "shapes_tiny.py") + ":stage1"


def cli(cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`llava-jax ARGS` run in `cwd`; this checkout's code first on the path."""
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    command = [sys.executable, "-m", "llava_jax.cli.main", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def rel(path: Path, cwd: Path) -> str:
    """`path` relative to `cwd` (an input made elsewhere, named as a user would)."""
    return os.path.relpath(path, cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    hf_tiny.llava().save_pretrained(root / "hf")
    build_parts(root / "parts", "llava")
    data = shapes.write_shapes_dataset(root / "data", num_stage1=16, num_stage2=4, num_val=2)
    config = config_loader.load_config(RECIPE)
    init = _random_model_dir(root / "init", config, data.tokenizer)
    return dict(hf=root / "hf", parts=root / "parts", data=data.root, stage1=data.stage1,
                init=init)  # fmt: skip


def test_convert_and_export(inputs, tmp_path):
    proc = cli(tmp_path, "convert", "hf-to-jax", "--hf", rel(inputs["hf"], tmp_path),
               "--out", "ckpt/llava")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model_io.is_model_dir(tmp_path / "ckpt" / "llava")
    assert f"-> {tmp_path / 'ckpt' / 'llava'} (" in proc.stdout

    proc = cli(tmp_path, "convert", "jax-to-hf", "--ckpt", "ckpt/llava", "--out", "export/hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "export" / "hf" / "config.json").is_file()


def test_init(inputs, tmp_path):
    parts = rel(inputs["parts"], tmp_path)
    proc = cli(tmp_path, "init", "--vision", f"{parts}/vision", "--llm", f"{parts}/llm",
               "--config", f"{parts}/recipe.py", "--out", "models/init")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model_io.is_model_dir(tmp_path / "models" / "init")


def test_data_build(inputs, tmp_path):
    proc = cli(tmp_path, "data", "build", "--input", rel(inputs["stage1"], tmp_path),
               "--image-root", rel(inputs["data"], tmp_path), "--out", "shards")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_records"] == 16, manifest


def test_absolute_keeps_urls_and_unset_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("runs/../data/x.json") == str(tmp_path / "data" / "x.json")
    assert paths.absolute(Path("/abs/p")) == "/abs/p"
    for kept in ("gs://bucket/run1", "memory://x", ""):
        assert paths.absolute(kept) == kept
    assert paths.local_path("ckpt/x") == tmp_path / "ckpt" / "x"
    assert paths.local_path("") == tmp_path


def test_config_paths_are_made_absolute(tmp_path, monkeypatch):
    """The path fields of a recipe, against the working directory; URLs and tfds: as given."""
    monkeypatch.chdir(tmp_path)
    config = config_loader.load_config(RECIPE, ["--config.data.train=data/x.json",
        "--config.data.image_root=../images", "--config.init_from=runs/stage1/model",
        "--config.projector_from=gs://bucket/mm_projector.bin"])  # fmt: skip
    assert config.data.train == str(tmp_path / "data" / "x.json")
    assert config.data.image_root == str(tmp_path.parent / "images")
    assert config.init_from == str(tmp_path / "runs" / "stage1" / "model")
    assert config.projector_from == "gs://bucket/mm_projector.bin"
    config = config_loader.load_config(RECIPE, ["--config.data.train=tfds:coco/2017:train"])
    assert config.data.train == "tfds:coco/2017:train"
    assert config.init_from == ""  # unset stays unset


@pytest.mark.slow  # ~50 s on two cores; the built-in run's relative workdir is in the default run
def test_train_recipe(inputs, tmp_path):
    """Relative --workdir, data.train, data.image_root and --init-from; checkpoints saved."""
    proc = cli(tmp_path, "train", "--config", RECIPE, "--workdir", "runs/stage1",
               "--init-from", rel(inputs["init"], tmp_path),
               f"--config.data.train={rel(inputs['stage1'], tmp_path)}",
               f"--config.data.image_root={rel(inputs['data'], tmp_path)}",
               "--config.train.num_steps=2", "--config.train.batch_size=8",
               "--config.train.checkpoint_every=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "runs" / "stage1"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert model_io.is_model_dir(workdir / "model")
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["train"] == str(inputs["stage1"].absolute())
    assert saved["init_from"] == str(inputs["init"].absolute())


def test_eval_default_out(tmp_path):
    """Relative --data and the default --out (eval/TASK-SPLIT under the working directory)."""
    import eval_fixtures as fx

    fx.make_gqa(tmp_path / "gqa")
    out = tmp_path / "eval" / "gqa-testdev_balanced"
    out.mkdir(parents=True)
    rows = [{"question_id": q, "answer": "yes"} for q in ("201", "202", "203")]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli(tmp_path, "eval", "gqa", "--data", "gqa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").is_file()
    assert f"metrics: {out / 'metrics.json'}" in proc.stderr


def test_instruct(tmp_path):
    images = [{"id": 1, "file_name": "000000000001.jpg", "width": 200, "height": 100}]
    captions = [{"id": 10, "image_id": 1, "caption": "A dog runs on grass."}]
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "captions.json").write_text(
        json.dumps({"images": images, "annotations": captions})
    )
    reply = "Question:\nWhat is shown?\n===\nAnswer:\nA dog."
    with FakeLLM(lambda body: reply) as llm:
        proc = cli(tmp_path, "instruct", "--captions", "coco/captions.json", "--type",
                   "conversation", "--out", "gen/conv.jsonl", "--model", "gen-1",
                   "--base-url", llm.base_url, env={"OPENAI_API_KEY": "sk-test"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "gen" / "conv.jsonl").read_text().splitlines()) == 1

    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"id": "c0", "image": "0.jpg", "caption": "a dog"}) + "\n"
    )
    (tmp_path / "phrases.jsonl").write_text(json.dumps({"id": "c0", "noun_phrases": []}) + "\n")
    proc = cli(tmp_path, "instruct", "filter-captions", "--captions", "pairs.jsonl",
               "--noun-phrases", "phrases.jsonl", "--out", "kept/cc3m.json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "kept" / "cc3m.json").is_file()
