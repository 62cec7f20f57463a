"""Model dirs and eval data on `gs://` through the CLI: `init --out`, `eval --model --data`
and `generate --model` take bucket paths as they are (a `pathlib.Path` would make `gs:/...`
of them, a local relative path), and eval refuses a bucket for its appended answers.

Runs against the fake GCS of tests/fake_gcs.py, from an empty working directory that must
stay empty.
"""

from __future__ import annotations

import json

import eval_fixtures as fx
import numpy as np
from etils import epath
from fake_gcs import fake_gcs  # noqa: F401 (a fixture)
from test_data_gcs import in_empty_dir, upload  # noqa: F401 (a fixture)
from test_init_model import build_parts

from llava_jax import model_io
from llava_jax.cli.main import main

MODEL = "gs://bucket/models/m"


def test_init_eval_and_generate_with_a_bucket(fake_gcs, in_empty_dir, tmp_path, capsys):  # noqa: F811
    build_parts(tmp_path, "llava")
    init = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
            "--config", str(tmp_path / "recipe.py"), "--seed", "3"]  # fmt: skip
    assert main([*init, "--out", MODEL]) == 0
    assert main([*init, "--out", str(tmp_path / "local-model")]) == 0
    assert model_io.is_model_dir(MODEL)
    remote, local = model_io.load_params(MODEL), model_io.load_params(tmp_path / "local-model")
    assert set(remote) == set(local)
    for name, value in local.items():
        np.testing.assert_array_equal(remote[name], value, err_msg=name)
    assert main([*init, "--out", MODEL]) == 2  # never over an existing model
    assert "exists and is not empty" in capsys.readouterr().err

    upload(fx.make_pope(tmp_path / "pope"), "gs://bucket/eval/pope")
    args = ["eval", "pope", "--template", "plain", "--max-new-tokens", "2", "--batch-size", "2"]
    assert main([*args, "--model", MODEL, "--data", "gs://bucket/eval/pope",
                 "--out", str(tmp_path / "from-bucket")]) == 0  # fmt: skip
    assert main([*args, "--model", str(tmp_path / "local-model"), "--data", str(tmp_path / "pope"),
                 "--out", str(tmp_path / "from-disk")]) == 0  # fmt: skip

    def answers(out):
        rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        return sorted((r["question_id"], r["answer"]) for r in rows)

    assert answers(tmp_path / "from-bucket") == answers(tmp_path / "from-disk")
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text())
               for d in ("from-bucket", "from-disk")]  # fmt: skip
    assert metrics[0] == metrics[1]

    capsys.readouterr()
    bucket_out = ["--model", MODEL, "--data", "gs://bucket/eval/pope", "--out", "gs://bucket/o"]
    assert main([*args, *bucket_out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be a local folder" in err, err
    assert not epath.Path("gs://bucket/o").exists()

    assert main(["generate", "--model", MODEL, "--template", "plain", "--prompt", "w3 w4",
                 "--max-new-tokens", "2"]) == 0  # fmt: skip
