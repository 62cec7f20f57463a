"""llava-jax model directories that conversion and loading refuse: an output directory that is
not empty (its files kept), a half-written or damaged model directory, non-finite weights,
params that do not fit the config. Each error is one line naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import Case, _truncate, assert_same_tensors, raises_one_line

from llava_jax import model_io
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.jax_to_hf import convert_jax_to_hf
from llava_jax.conversion.source import load_model
from llava_jax.errors import CheckpointError
from llava_jax.model_io import CONFIG_FILE, PARAMS_DIR, load_config, load_params, save_model_dir

# -- output directories ------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_hf_to_jax_refuses_non_empty_out_dir(case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    raises_one_line(CheckpointError, "not empty", convert_hf_to_jax, case("llava").hf, out)
    assert _snapshot(out) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_jax_to_hf_refuses_non_empty_out_dir(case, tmp_path):
    c = case("llava")
    out = tmp_path / "out"
    shutil.copytree(c.out, out)
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    raises_one_line(CheckpointError, "not empty", convert_jax_to_hf, c.jax, out)
    assert _snapshot(out) == before


def test_out_dir_that_is_a_file_is_refused(case, tmp_path):
    c = case("llava")
    out = tmp_path / "out"
    out.write_text("keep me")
    raises_one_line(CheckpointError, "not empty", convert_hf_to_jax, c.hf, out)
    raises_one_line(CheckpointError, "not empty", convert_jax_to_hf, c.jax, out)
    assert out.read_text() == "keep me"


def test_empty_out_dir_is_fine(case, tmp_path):
    c = case("llava")
    (tmp_path / "jax").mkdir()
    (tmp_path / "hf").mkdir()
    convert_hf_to_jax(c.hf, tmp_path / "jax")
    convert_jax_to_hf(tmp_path / "jax", tmp_path / "hf")
    assert_same_tensors(c.hf, tmp_path / "hf")


# -- half-written or damaged model directories ------------------------------------------


def _half_written(c: Case, tmp_path: Path, damage) -> Path:
    d = tmp_path / "model"
    shutil.copytree(c.jax, d)
    damage(d)
    return d


def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: shutil.rmtree(d / PARAMS_DIR), "no params/"),
        (lambda d: (d / CONFIG_FILE).unlink(), f"no {CONFIG_FILE}"),
        (
            lambda d: (d / CONFIG_FILE).write_text('{"family": "llava", "vision": '),
            "malformed config",
        ),
        (lambda d: _truncate(_largest_file(d / PARAMS_DIR)), "unreadable orbax checkpoint"),
        (lambda d: _truncate(d / PARAMS_DIR / "_METADATA"), "unreadable orbax checkpoint"),
    ],
    ids=["no-params", "no-config", "bad-config", "truncated-data", "truncated-metadata"],
)
def test_half_written_model_dir(case, tmp_path, damage, match):
    d = _half_written(case("llava"), tmp_path, damage)
    raises_one_line(CheckpointError, match, load_params, d)
    raises_one_line(CheckpointError, match, load_model, d)
    raises_one_line(CheckpointError, match, convert_jax_to_hf, d, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def _overwrite_middle(path: Path, n: int = 4096, byte: int = 0xFF):
    """Same size, `n` bytes in the middle replaced (0xFF...: NaN in every float format)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes([byte]) * n
    path.write_bytes(bytes(data))


def test_damaged_weights_in_a_model_dir_are_refused(case, tmp_path):
    """Flipped bytes keep the file's size and orbax reads them; the NaNs must not load."""
    d = _half_written(case("llava"), tmp_path, lambda d: _overwrite_middle(_largest_file(d)))
    match = r"params: \S+ holds [\d,]+ NaN or infinite values.*; the weights are damaged$"
    raises_one_line(CheckpointError, match, load_params, d)
    raises_one_line(CheckpointError, match, load_model, d)


@pytest.mark.parametrize("group_bytes", [256 << 20, 1], ids=["one-group", "a-group-per-tensor"])
def test_non_finite_parameter_is_named(case, tmp_path, monkeypatch, group_bytes):
    """The check runs over groups of tensors (bounded memory); every group is checked."""
    monkeypatch.setattr(model_io, "_CHECK_GROUP_BYTES", group_bytes)
    c = case("llava")
    params = dict(c.params)
    name = "multi_modal_projector/linear_2/kernel"
    params[name] = params[name].copy()
    params[name][0, :3] = [np.inf, -np.inf, np.nan]
    save_model_dir(tmp_path / "model", load_config(c.jax), params)
    message = raises_one_line(CheckpointError, "NaN or infinite", load_params, tmp_path / "model")
    assert message == (
        f"{tmp_path / 'model' / PARAMS_DIR}: {name} holds 3 NaN or infinite values; "
        "the weights are damaged"
    )


def test_params_that_do_not_fit_the_config(case, tmp_path):
    c = case("llava")
    d = _half_written(c, tmp_path, lambda d: None)
    raw = json.loads((d / CONFIG_FILE).read_text())
    raw["text"]["num_hidden_layers"] = 3
    (d / CONFIG_FILE).write_text(json.dumps(raw))
    raises_one_line(CheckpointError, r"language_model/layers/.* has shape \(2, ", load_params, d)
