"""The conversion tests' tiny models and comparisons (tests/test_convert_*.py).

`Case` saves a tiny random transformers model (tests/hf_tiny.py), converts it to a llava-jax
model directory and back; the session fixture `case` in tests/conftest.py builds each one once.
The spelling functions rewrite a transformers-5 state dict in each layout the converter accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_tiny
import numpy as np
import pytest
import transformers

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.jax_to_hf import convert_jax_to_hf
from llava_jax.conversion.mapping import canonical_key
from llava_jax.conversion.tensor_io import CheckpointReader, CheckpointWriter
from llava_jax.model_io import load_params

MAKERS = {
    "llava": hf_tiny.llava,
    "llava_next": hf_tiny.llava_next,
    "llava_next_mistral": lambda: hf_tiny.llava_next(
        kv_heads=1, text_kind="mistral", sliding_window=8
    ),
    "onevision_tied": lambda: hf_tiny.llava_onevision(tie=True),
    "onevision_untied": lambda: hf_tiny.llava_onevision(tie=False),
}


class Case:
    """A tiny HF model saved to `root/hf`, converted to `root/jax`, exported to `root/out`."""

    def __init__(self, name: str, root: Path):
        self.model = MAKERS[name]()
        self.root = root
        self.hf, self.jax, self.out = root / "hf", root / "jax", root / "out"
        self.model.save_pretrained(self.hf)
        convert_hf_to_jax(self.hf, self.jax)
        convert_jax_to_hf(self.jax, self.out)
        self._params = None

    @property
    def params(self) -> dict[str, np.ndarray]:
        if self._params is None:
            self._params = numpy_params(self.jax)
        return self._params

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's tensors under transformers-5 module paths."""
        return {k: v.detach().numpy() for k, v in self.model.state_dict().items()}


def numpy_params(model_dir) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_params(model_dir).items()}


def canonical_tensors(reader: CheckpointReader) -> dict[str, str]:
    """{canonical key: key as stored}; derived buffers dropped."""
    out = {}
    for key in reader.keys():
        canon = canonical_key(key)
        if canon is not None:
            assert canon not in out, f"{key!r} and {out[canon]!r} are the same tensor"
            out[canon] = key
    return out


def assert_same_tensors(dir_a: Path, dir_b: Path):
    with CheckpointReader(dir_a) as a, CheckpointReader(dir_b) as b:
        keys_a, keys_b = canonical_tensors(a), canonical_tensors(b)
        assert sorted(set(keys_a) - set(keys_b)) == [], "tensors lost in the round trip"
        assert sorted(set(keys_b) - set(keys_a)) == [], "tensors added in the round trip"
        for canon in sorted(keys_a):
            x, y = a.read(keys_a[canon]), b.read(keys_b[canon])
            assert (x.dtype, x.shape) == (y.dtype, y.shape), canon
            assert x.tobytes() == y.tobytes(), f"{canon}: values differ"


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].shape == want[path].shape, path
        assert got[path].tobytes() == want[path].tobytes(), f"{path}: values differ"


def auto_config(path: Path) -> dict:
    # `_name_or_path` is set by from_pretrained to the directory it read: not a stored field.
    d = transformers.AutoConfig.from_pretrained(path).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


def raises_one_line(exc, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def legacy_spelling(key: str) -> str:
    """llava-hf files (transformers 4 `save_pretrained`)."""
    for old, new in [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ]:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


def original_spelling(key: str) -> str:
    """haotian-liu/LLaVA and LLaVA-NeXT training checkpoints."""
    for old, new in [
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.image_newline", "model.image_newline"),
    ]:
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


def mixed_spelling(key: str) -> str:
    """transformers 5 `save_pretrained` can revert only some renames (its `conversion_mapping.py`
    renames and `revert_weight_conversion`)."""
    key = legacy_spelling(key)
    return key.replace("vision_tower.vision_model.", "vision_tower.")


def write_hf_dir(
    out: Path, model, tensors: dict[str, np.ndarray], max_shard_size="5GB", config_edit=None
) -> Path:
    """An HF directory holding `tensors` and `model`'s config.json (optionally edited)."""
    model.config.save_pretrained(out)
    if config_edit is not None:
        path = out / "config.json"
        raw = json.loads(path.read_text())
        config_edit(raw)
        path.write_text(json.dumps(raw))
    with CheckpointWriter(out, max_shard_size=max_shard_size) as writer:
        for key, value in tensors.items():
            writer.add(key, value)
    return out


def spelled(c: Case, spell, drop_tied_head: bool) -> dict[str, np.ndarray]:
    tied = c.model.config.tie_word_embeddings
    return {
        spell(k): v
        for k, v in c.state_dict().items()
        if not (drop_tied_head and tied and k == "lm_head.weight")
    }


SPELLINGS = {
    "hf_legacy": lambda c: spelled(c, legacy_spelling, drop_tied_head=True),
    # Keeps the tied lm_head that `state_dict()` lists: a stored copy must be accepted.
    "hf_v5": lambda c: spelled(c, lambda k: k, drop_tied_head=False),
    "hf_v5_vision_model": lambda c: spelled(
        c, lambda k: k.replace("model.vision_tower.", "model.vision_tower.vision_model."), True
    ),
    "mixed": lambda c: spelled(c, mixed_spelling, drop_tied_head=True),
    "original": lambda c: spelled(c, original_spelling, drop_tied_head=True),
}


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
