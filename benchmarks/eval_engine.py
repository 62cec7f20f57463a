"""`llava-jax eval`'s generation on the engine against fixed batches, in one process.

A tiny random HF LLaVA (`llava_jax.checks.tiny_hf.llava`, 9 image tokens a prompt) and a POPE
layout built here: 8 images x 8 questions (64 questions, interleaved as POPE's files are).
Timed, generation only, `--rounds` times each after a compile round:
- batches: the evaluation loop before the engine, `Generator.generate` on fixed batches of 8;
- engine: `eval.runner.generate_answers` (8 slots, questions admitted as slots free), with
  the prefix cache at 1024 MB and off.
The answers of every way are checked to be identical.

    python benchmarks/eval_engine.py --rounds 3 [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from llava_jax.checks import tiny_hf  # noqa: E402
from llava_jax.eval import TASKS  # noqa: E402
from llava_jax.eval.runner import PredictionsFile, generate_answers  # noqa: E402
from llava_jax.inference.pipeline import Pipeline  # noqa: E402
from llava_jax.media.image_processing import load_image  # noqa: E402

OBJECTS = ("dog", "cat", "car", "tree", "cup", "bus", "kite", "sink")
SLOTS = 8


def build(work: Path, images: int = 8, per_image: int = 8) -> tuple[Path, Path]:
    """The model dir and a POPE data dir (its published layout)."""
    model = tiny_hf.save_llava_dir(work / "model")
    pope = work / "pope"
    (pope / "coco").mkdir(parents=True)
    (pope / "val2014").mkdir()
    rows = [{"question_id": i + 1, "image": f"COCO_val2014_{i % images:012d}.jpg",
             "text": f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?",
             "label": "yes" if i % 2 else "no"} for i in range(images * per_image)]  # fmt: skip
    for category in ("adversarial", "popular", "random"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (pope / f"coco/coco_pope_{category}.json").write_text(text)
    rng = np.random.RandomState(0)
    for i in range(images):
        pixels = rng.randint(0, 255, (60, 90, 3), np.uint8)
        Image.fromarray(pixels).save(pope / f"val2014/COCO_val2014_{i:012d}.jpg")
    return model, pope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, pope = build(Path(tmp))
        pipe = Pipeline.load(model, template="chatml_direct", echo=lambda m: None)
        samples = TASKS["pope"]().samples(pope, "adversarial")
        answers = {}

        def batches() -> float:
            sampling = pipe.stop_config(max_new_tokens=args.new_tokens, temperature=0.0)
            start, out = time.perf_counter(), []
            for i in range(0, len(samples), SLOTS):
                prompts = [
                    pipe.prompt(
                        [{"role": "user", "content": s.text}], list(map(load_image, s.images))
                    )
                    for s in samples[i : i + SLOTS]
                ]
                generated = pipe.generator.generate(prompts, sampling)
                out += [pipe.decode(g.token_ids) for g in generated]
            answers["batches"] = out
            return time.perf_counter() - start

        def engine(cache_mb: float) -> float:
            with tempfile.TemporaryDirectory() as d:
                predictions = PredictionsFile(Path(d) / "predictions.jsonl")
                start = time.perf_counter()
                generate_answers(pipe, samples, predictions, SLOTS, args.new_tokens,
                                 lambda m: None, cache_mb)  # fmt: skip
                took = time.perf_counter() - start
                done = predictions.load()
            answers[f"engine {cache_mb:g}"] = [done[s.question_id] for s in samples]
            return took

        ways = {"batches of 8": batches, "engine, prefix cache 1024 MB": lambda: engine(1024),
                "engine, no prefix cache": lambda: engine(0)}  # fmt: skip
        results = {}
        for name, run in ways.items():
            run()  # compiles
            times = sorted(run() for _ in range(args.rounds))
            results[name] = len(samples) / times[len(times) // 2]
        same = answers["engine 1024"] == answers["engine 0"]
        # The batch loop's answers are cut at stop strings by the runner only: compare tokens'
        # text before any cut, which for this model (no stop strings in its answers) is equal.
        same = same and [a.strip() for a in answers["batches"]] == [
            a.strip() for a in answers["engine 0"]
        ]
        base = results["batches of 8"]
        for name, rate in results.items():
            print(f"{name}: {rate:.1f} questions/s ({rate / base:.2f}x batches)")
        print(f"answers identical: {same}")


if __name__ == "__main__":
    main()
