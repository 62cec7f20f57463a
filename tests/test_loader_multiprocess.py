"""Two real JAX processes on localhost (4 CPU devices each): each reads only its shard, and
`global_batch` assembles the 8-device global batch that one process would have built."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from test_loader import llava_config, make, make_records

BATCH = 4  # per host; the global batch is 8
STEPS = 2

WORKER = textwrap.dedent(
    """
    import json
    import sys
    import numpy as np
    import jax

    port, index, out, batch, steps, cfg_json = sys.argv[1:]
    index, batch, steps = int(index), int(batch), int(steps)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)

    import grain
    from test_loader import FakeTransform, make_records, shape_for
    from llava_jax.config import LlavaConfig
    from llava_jax.data import loader
    from llava_jax.data.schema import BATCH_FIELDS
    from llava_jax.sharding import shard_batch

    cfg = LlavaConfig.from_dict(json.loads(cfg_json))  # no transformers import here

    def make_it(num_epochs):
        # process_index / process_count come from jax.distributed.
        return loader.make_loader(
            grain.MapDataset.source(make_records(40)), FakeTransform(cfg), shape_for(batch),
            cfg, seed=7, num_epochs=num_epochs)

    it = make_it(None)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    saved = {}
    for step in range(steps):
        host = next(it)
        saved[f"ids_{step}"] = np.array(host["sample_ids"])
        for name, value in shard_batch(host, mesh, BATCH_FIELDS).items():
            saved[f"shape_{step}_{name}"] = np.array(value.shape)
            for s in value.addressable_shards:  # the rows this process holds
                rows = s.index[0]
                start, stop = rows.start or 0, value.shape[0] if rows.stop is None else rows.stop
                saved[f"rows_{step}_{name}_{start}_{stop}"] = np.asarray(s.data)
    saved["epoch_ids"] = np.array([i for b in make_it(1) for i in b["sample_ids"]])
    np.savez(out, **saved)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_and_build_the_global_batch(tmp_path):
    tests_dir = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=tests_dir)  # fmt: skip
    port, cfg_json = _free_port(), json.dumps(llava_config().to_dict())

    def argv(i):
        out = tmp_path / f"p{i}.npz"
        return [sys.executable, "-c", WORKER, str(port), str(i), str(out), str(BATCH),
                str(STEPS), cfg_json]  # fmt: skip

    procs = [
        subprocess.Popen(
            argv(i),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    hosts = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]

    # A whole epoch: the shards are disjoint and together hold every record once.
    epoch = [set(h["epoch_ids"].tolist()) for h in hosts]
    assert not epoch[0] & epoch[1]
    assert sorted(epoch[0] | epoch[1]) == [r.id for r in make_records(40)]

    # One process reading the global batch: host p's rows are its global positions p::2.
    single = make(make_records(40), batch_size=2 * BATCH, seed=7, num_epochs=None)
    for step in range(STEPS):
        reference = next(single)
        for p, host in enumerate(hosts):
            assert host[f"ids_{step}"].tolist() == reference["sample_ids"][p::2], (step, p)
        for name in ("input_ids", "targets", "pixel_values", "taps", "view_mask"):
            shape = tuple(hosts[0][f"shape_{step}_{name}"])
            assert shape == reference[name].shape, (name, shape)
            assembled = np.zeros(shape, reference[name].dtype)
            covered = np.zeros(shape[0], int)
            for p, host in enumerate(hosts):
                prefix = f"rows_{step}_{name}_"
                for key, rows in host.items():
                    if key.startswith(prefix):
                        start, stop = map(int, key[len(prefix) :].split("_"))
                        assembled[start:stop] = rows
                        covered[start:stop] += 1
                        # The rows a process holds are its own host batch's rows.
                        host_rows = reference[name][p::2]
                        assert any(np.array_equal(rows[0], r) for r in host_rows), (name, p)
            assert (covered == 1).all(), f"{name}: rows held {covered.tolist()} times"
            # Host 0's rows, then host 1's: a permutation of the single-process batch.
            want = np.concatenate([reference[name][0::2], reference[name][1::2]])
            np.testing.assert_array_equal(assembled, want, err_msg=f"step {step}: {name}")
