"""`llava-jax generate --prompts`: 64 prompts on the engine against `Generator.generate` one
prompt at a time (`generate --prompt`'s way) and in batches of 8, same model, same run.

A tiny random HF LLaVA (`llava_jax.checks.tiny_hf.llava`, 256-token context, 9 image tokens) saved
with the test tokenizer; 8 images, 8 questions each (64 prompts, every image asked about by 8
of them). Each way runs once to compile, then is timed (median of `--rounds`): generation
only, the prompts built beforehand; greedy, float32, no stop tokens. `uniform`: every answer
`--new-tokens` long. `varied`: answer lengths 4..64 (as answers ending at their stop token at
different steps): a batch of 8 waits for its longest row, the engine's slots take the next
prompt at once. The tokens of all three ways must agree. Then the CLI itself, end to end in a
fresh process (model load and compile included), on the same 64 lines with `--batch-size 8`.

    python benchmarks/generate_many.py [--new-tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from llava_jax.checks import tiny_hf  # noqa: E402
from llava_jax.inference.engine import Engine
from llava_jax.inference.generator import SamplingConfig  # noqa: E402
from llava_jax.inference.pipeline import Pipeline  # noqa: E402
from llava_jax.inference.prefix_cache import PrefixCache  # noqa: E402

QUESTIONS = ["What is it?", "Which colours?", "Describe it.", "Where is it?", "How many?",
             "Is it large?", "What is unusual?", "Name one thing."]  # fmt: skip
BATCH = 8


def build(work: Path) -> Path:
    model = tiny_hf.save_llava_dir(work / "model")
    rng = np.random.RandomState(0)
    lines = []
    for i in range(8):
        Image.fromarray(rng.randint(0, 255, (60, 90, 3), np.uint8)).save(work / f"{i}.png")
        lines += [{"prompt": q, "image": f"{i}.png"} for q in QUESTIONS]
    (work / "prompts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return model


def timed(fn, rounds: int):
    """The median time of `rounds` calls after one to compile, and the last call's result."""
    out, times = fn(), []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build(work)
        pipeline = Pipeline.load(model, template="vicuna_v1", echo=lambda _: None)
        gen, cfg = pipeline.generator, pipeline.cfg
        lines = [json.loads(t) for t in (work / "prompts.jsonl").read_text().splitlines()]
        prompts = [pipeline.prompt([{"role": "user", "content": "<image>\n" + e["prompt"]}],
                                   [work / e["image"]]) for e in lines]  # fmt: skip
        longest = max(len(p.input_ids) for p in prompts)
        for name, lengths in (("uniform", [args.new_tokens] * 64),
                              ("varied", [4 + (i * 37) % 61 for i in range(64)])):  # fmt: skip
            # No stop tokens: every answer is exactly its length, the same work both ways.
            sampling = [SamplingConfig(max_new_tokens=n) for n in lengths]

            def batches(sampling=sampling):
                out = []
                for i in range(0, 64, BATCH):
                    out += gen.generate(prompts[i : i + BATCH], sampling[i : i + BATCH])
                return out

            def one_at_a_time(sampling=sampling):
                return [gen.generate([p], s)[0] for p, s in zip(prompts, sampling, strict=True)]

            def engine(sampling=sampling, lengths=lengths):
                media = (cfg.image_token_id,)
                eng = Engine(gen, BATCH, max_length=longest + max(lengths),
                             prefix_cache=PrefixCache(1 << 30, media))  # fmt: skip
                return eng.generate(prompts, sampling)

            t_alone, alone = timed(one_at_a_time, args.rounds)
            t_batch, ref = timed(batches, args.rounds)
            t_engine, got = timed(engine, args.rounds)
            ids = [r.token_ids for r in ref]
            same = ids == [g.token_ids for g in got] == [a.token_ids for a in alone]
            print(json.dumps({"answers": name, "tokens": sum(map(len, ids)),
                              "one_at_a_time_s": round(t_alone, 3),
                              "batches_of_8_s": round(t_batch, 3),
                              "engine_8_slots_s": round(t_engine, 3),
                              "engine_vs_batches": round(t_batch / t_engine, 2),
                              "engine_vs_one_at_a_time": round(t_alone / t_engine, 2),
                              "tokens_equal": same}))  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "llava_jax.cli.main", "generate", "--model", str(model),
             "--template", "vicuna_v1", "--prompts", str(work / "prompts.jsonl"),
             "--batch-size", str(BATCH), "--max-new-tokens", str(args.new_tokens)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        print(json.dumps({"cli_prompts_file_wall_s": round(wall, 2),
                          "answers": len(proc.stdout.splitlines()),
                          "stderr_tail": proc.stderr.strip().splitlines()[-2:]}))  # fmt: skip


if __name__ == "__main__":
    main()
