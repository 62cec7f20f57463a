"""Tests for the streaming safetensors reader and writer."""

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from llava_jax.conversion.tensor_io import (
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    parse_size,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _random_tensors() -> dict[str, np.ndarray]:
    """One tensor per supported dtype, plus a scalar and an empty tensor."""
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 5))
    return {
        "f64": floats,
        "f32": floats.astype(np.float32),
        "f16": floats.astype(np.float16),
        "bf16": floats.astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-(2**30), 2**30, (2, 3), dtype=np.int32),
        "i16": rng.integers(-(2**14), 2**14, (7,), dtype=np.int16),
        "i8": rng.integers(-128, 128, (2, 2, 2), dtype=np.int8),
        "u8": rng.integers(0, 256, (9,), dtype=np.uint8),
        "bool": rng.random((3, 3)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), ml_dtypes.bfloat16),
    }


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _torch_bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert _bits(actual) == _bits(expected)


def test_parse_size_matches_transformers():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("10mb") == 10 * 10**6
    assert parse_size("3MiB") == 3 * 2**20
    assert parse_size("1KB") == 1000
    assert parse_size("1KiB") == 1024
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="5 TB"):
        parse_size("5 TB")


def test_reads_every_dtype_written_by_safetensors(tmp_path):
    tensors = _random_tensors()
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"a": "b"})
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors)
        for key, expected in tensors.items():
            assert key in ckpt
            assert ckpt.shape(key) == expected.shape
            assert ckpt.dtype(key) == expected.dtype
            actual = ckpt.read(key)
            assert actual.flags.owndata and actual.flags.writeable
            _assert_same(actual, expected)
        assert ckpt.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
        assert "missing" not in ckpt
        with pytest.raises(CheckpointError, match="'missing'"):
            ckpt.read("missing")


def test_writes_every_dtype_for_safe_open(tmp_path):
    tensors = _random_tensors()
    with CheckpointWriter(tmp_path) as out:
        for key, array in tensors.items():
            out.add(key, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for key, expected in tensors.items():
            tensor = f.get_tensor(key)
            assert tuple(tensor.shape) == expected.shape
            assert _torch_bits(tensor) == _bits(expected)
    assert str(safe_open(tmp_path / "model.safetensors", "pt").get_tensor("bf16").dtype) == (
        "torch.bfloat16"
    )
    with CheckpointReader(tmp_path) as ckpt:
        for key, expected in tensors.items():
            _assert_same(ckpt.read(key), expected)


def test_sharded_write_has_complete_index(tmp_path):
    tensors = {f"layers.{i}.weight": np.full((10, 10), i, np.float32) for i in range(7)}
    tensors["big"] = np.arange(1000, dtype=np.float32)  # larger than a shard: its own shard
    with CheckpointWriter(tmp_path, max_shard_size=1000) as out:
        for key, array in tensors.items():
            out.add(key, array)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    shard_names = sorted(set(index["weight_map"].values()))
    n = len(shard_names)
    assert n == 5  # 400 bytes each: two per 1000-byte shard, 7 -> 4 shards, then "big"
    assert shard_names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*shard_names, "model.safetensors.index.json"]
    )
    for key, name in index["weight_map"].items():
        with safe_open(tmp_path / name, framework="np") as f:
            _assert_same(f.get_tensor(key), tensors[key])
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors)
        for key, expected in tensors.items():
            _assert_same(ckpt.read(key), expected)


def test_transformers_loads_sharded_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {
        k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for k, v in model.state_dict().items()
    }
    config.save_pretrained(tmp_path)
    with CheckpointWriter(tmp_path, max_shard_size="4KB") as out:
        for key, array in state.items():
            out.add(key, array)
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for key, tensor in loaded.state_dict().items():
        assert _torch_bits(tensor) == _bits(state[key]), key


def test_reads_sharded_torch_checkpoint_with_index(tmp_path):
    torch.manual_seed(0)
    shards = {
        "model-00001-of-00002.safetensors": {
            "a.weight": torch.randn(4, 3, dtype=torch.bfloat16),
            "a.bias": torch.arange(4, dtype=torch.int64),
        },
        "model-00002-of-00002.safetensors": {"b.weight": torch.randn(2, 2).half()},
    }
    weight_map = {}
    for name, state in shards.items():
        safetensors.torch.save_file(state, tmp_path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == ["a.bias", "a.weight", "b.weight"]
        assert ckpt.dtype("a.weight") == ml_dtypes.bfloat16
        for state in shards.values():
            for key, tensor in state.items():
                assert ckpt.shape(key) == tuple(tensor.shape)
                assert _bits(ckpt.read(key)) == _torch_bits(tensor)


def test_reads_several_safetensors_without_index(tmp_path):
    safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    safetensors.numpy.save_file({"y": np.zeros(3, np.int8)}, tmp_path / "b.safetensors")
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == ["x", "y"]
        _assert_same(ckpt.read("y"), np.zeros(3, np.int8))


def test_truncated_file(tmp_path):
    safetensors.numpy.save_file({"x": np.ones(100, np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'x' needs bytes .*trunc"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "contents",
    [
        b"\x01\x02",  # shorter than the length prefix
        struct.pack("<Q", 10**12) + b"{}",  # header length larger than the file
        struct.pack("<Q", 8) + b"not json",
        struct.pack("<Q", 2) + b"[]",
    ],
)
def test_corrupt_header(tmp_path, contents):
    (tmp_path / "model.safetensors").write_bytes(contents)
    with pytest.raises(CheckpointError, match="model.safetensors: "):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # too few bytes for the shape
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1]},
    ],
)
def test_inconsistent_header_entry(tmp_path, entry):
    header = json.dumps({"w": entry}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'w'"):
        CheckpointReader(tmp_path)


def _write_two_shards(tmp_path: Path) -> None:
    safetensors.numpy.save_file({"x": np.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.numpy.save_file({"y": np.ones(2)}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {
        "x": "model-00001-of-00002.safetensors",
        "y": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_missing_shard(tmp_path):
    _write_two_shards(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        CheckpointReader(tmp_path)


def test_shards_without_index(tmp_path):
    _write_two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(tmp_path)


def test_duplicate_key_across_shards(tmp_path):
    safetensors.numpy.save_file({"x": np.ones(2)}, tmp_path / "a.safetensors")
    safetensors.numpy.save_file({"x": np.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="b.safetensors: tensor 'x' is also in a.safetensors"):
        CheckpointReader(tmp_path)


def test_index_naming_wrong_shard_or_outside_dir(tmp_path):
    _write_two_shards(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(
        CheckpointError, match="model-00002-of-00002.safetensors: has no tensor 'x'"
    ):
        CheckpointReader(tmp_path)
    index.write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the directory"):
        CheckpointReader(tmp_path)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="nope"):
        CheckpointReader(tmp_path / "nope")


def test_pickle_needs_the_flag(tmp_path):
    state = {
        "model.mm_projector.0.weight": torch.randn(4, 3, dtype=torch.bfloat16),
        "model.mm_projector.0.bias": torch.randn(4),
        "flag": torch.tensor([True, False]),
    }
    torch.save(state, tmp_path / "mm_projector.bin")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*--allow-pickle"):
        CheckpointReader(tmp_path)
    with CheckpointReader(tmp_path, allow_pickle=True) as ckpt:
        assert ckpt.keys() == sorted(state)
        assert ckpt.dtype("model.mm_projector.0.weight") == ml_dtypes.bfloat16
        for key, tensor in state.items():
            actual = ckpt.read(key)
            assert actual.shape == tuple(tensor.shape)
            assert _bits(actual) == _torch_bits(tensor)


def test_pickle_sharded_with_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with CheckpointReader(tmp_path, allow_pickle=True) as ckpt:
        _assert_same(ckpt.read("b"), np.zeros(3, np.float32))


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: holds a list"):
        CheckpointReader(tmp_path, allow_pickle=True)


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path, max_shard_size=100) as out:
        for i in range(5):
            out.add(f"w{i}", np.ones(20, np.float32))
            # Shards already written carry hidden temporary names.
            assert all(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_previous_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with CheckpointWriter(tmp_path, max_shard_size=10) as out:
        out.add("a", np.ones(4, np.float32))
        out.add("b", np.ones(4, np.float32))
    with CheckpointWriter(tmp_path) as out:
        out.add("c", np.ones(4, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with CheckpointReader(tmp_path) as ckpt:
        assert ckpt.keys() == ["c"]


def test_writer_rejects_bad_input(tmp_path):
    with CheckpointWriter(tmp_path) as out:
        out.add("a", np.ones(2))
        with pytest.raises(CheckpointError, match="'a' was added twice"):
            out.add("a", np.ones(2))
        with pytest.raises(CheckpointError, match="'c'.*complex"):
            out.add("c", np.ones(2, np.complex64))
        out.add("big_endian", np.arange(3, dtype=">i4"))
    with CheckpointReader(tmp_path) as ckpt:
        _assert_same(ckpt.read("big_endian"), np.arange(3, dtype="<i4"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_stays_near_one_tensor(tmp_path):
    num_tensors, tensor_bytes = 25, 8 * 2**20
    with CheckpointWriter(tmp_path) as out:
        for i in range(num_tensors):
            out.add(f"t{i:02d}", np.full(tensor_bytes // 4, i, np.float32))
    assert (tmp_path / "model.safetensors").stat().st_size > num_tensors * tensor_bytes
    # Peak RSS from VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve,
    # so the child would start at this (large) test process's peak and hide any growth.
    # Reading through a memory map (safe_open, np.memmap) grows VmHWM by ~200 MiB here.
    script = textwrap.dedent(
        f"""
        from llava_jax.conversion.tensor_io import CheckpointReader

        def peak_rss_kib():
            with open("/proc/self/status") as f:
                return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1])

        total = 0.0
        with CheckpointReader({str(tmp_path)!r}) as ckpt:
            baseline = peak_rss_kib()
            for key in ckpt.keys():
                total += float(ckpt.read(key)[-1])
            print(total, (peak_rss_kib() - baseline) // 1024)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    total, growth_mib = result.stdout.split()
    assert float(total) == sum(range(num_tensors))
    assert int(growth_mib) < 60, f"peak RSS grew by {growth_mib} MiB reading a 200 MiB file"
