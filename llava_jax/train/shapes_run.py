"""The built-in tiny run: shapes data, a random tiny LLaVA, two stages, a held-out exam.

`llava-jax train --config configs/shapes_tiny.py --workdir DIR` does, in DIR:

  data/     the synthetic dataset and its tokenizer (`llava_jax.train.shapes`)
  init/     a randomly initialised model dir with that tokenizer
  stage1/   stage 1 (captions, `plain`), a normal training workdir; stage1/model is its result
  stage2/   stage 2 (questions, `vicuna_v1`) from stage1/model
  eval.json exact-match accuracy on held-out images, with every question and answer

Each part is skipped when it is already complete, so rerunning the command after an
interruption resumes where it stopped (inside a stage too: the stages are ordinary runs).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx

from llava_jax import model_io
from llava_jax.data import templates
from llava_jax.models import build
from llava_jax.models.llava import LlavaModel
from llava_jax.train import config_loader, loop, shapes


def _dataset(root: Path, config) -> shapes.ShapesPaths:
    """The dataset under `root`: written once, its settings kept in `COMPLETE`; a later run
    that asks for other settings is refused rather than silently given the old data."""
    done = root / "COMPLETE"
    s = config.shapes
    wanted = dict(num_stage1=s.num_stage1, num_stage2=s.num_stage2, num_val=s.num_val,
                  image_size=s.image_size, seed=s.seed)  # fmt: skip
    if done.is_file():
        try:
            written = json.loads(done.read_text())
        except json.JSONDecodeError:
            written = {}  # an older llava-jax's marker
        changed = [f"{k}: {written.get(k)} -> {v}" for k, v in wanted.items()
                   if written.get(k) != v]  # fmt: skip
        if changed:
            raise config_loader.ConfigLoadError(
                f"{root} holds a shapes dataset written with other settings "
                f"({', '.join(changed)}); use a new --workdir"
            )
    else:
        shapes.write_shapes_dataset(root, **wanted)
        done.write_text(json.dumps(wanted) + "\n")
    return shapes.ShapesPaths.at(root)


def _random_model_dir(out: Path, config, tokenizer_dir: Path) -> Path:
    if model_io.is_model_dir(out):
        return out
    cfg = config_loader.model_config(config)
    model = LlavaModel(cfg, rngs=nnx.Rngs(params=jax.random.key(config.train.seed)))
    files = sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file())
    model_io.save_model_dir(
        out, cfg, build.model_params(model), assets_from=tokenizer_dir, asset_files=files
    )
    return out


def evaluate_heldout(model_dir: Path, heldout: Path, template: str, batch_size: int = 64):
    """Greedy answers to the held-out questions (on an engine of `batch_size` slots); exact
    match after lower-casing."""
    from llava_jax.inference.engine import Engine
    from llava_jax.inference.pipeline import Pipeline

    pipe = Pipeline.load(model_dir, template=template, echo=lambda _: None)
    sampling = pipe.stop_config(max_new_tokens=8)
    records = json.loads(heldout.read_text())
    root = heldout.parent
    prompts = [
        pipe.prompt([{"role": "user", "content": r["conversations"][0]["value"]}],
                    images=[root / r["image"]])
        for r in records
    ]  # fmt: skip
    # Slots as long as the longest prompt and its answer, not the whole context.
    longest = max((len(p.input_ids) for p in prompts), default=0) + sampling.max_new_tokens
    context = pipe.cfg.text.max_position_embeddings
    engine = Engine(pipe.generator, num_slots=batch_size, max_length=min(longest, context))
    results = []
    for r, gen in zip(records, engine.generate(prompts, sampling), strict=True):
        answer = pipe.decode(gen.token_ids).strip().rstrip(".").lower()
        expected = r["conversations"][1]["value"].strip().lower()
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        results.append(
            dict(
                id=r["id"],
                question=question,
                expected=expected,
                answer=answer,
                correct=answer == expected,
            )  # fmt: skip
        )
    accuracy = sum(r["correct"] for r in results) / max(len(results), 1)
    return accuracy, results


def _field(override: str) -> str:
    return override.removeprefix("--").removeprefix("config.")


def run_shapes(spec: str, overrides: Sequence[str], workdir: str | Path) -> int:
    """Both stages and the held-out exam; returns the exit status (1 below the target)."""
    workdir = Path(workdir)
    path, _ = config_loader.split_spec(spec)
    base = config_loader.load_config(spec, overrides)
    # `--config.shapes.*` size the run; every other override applies to both stages.
    overrides = [o for o in overrides if not _field(o).startswith("shapes.")]
    stage2 = base.shapes.stage2  # "stage2", or "stage2-lora" (`shapes_tiny.py:lora`)
    stages = {name: config_loader.load_config(f"{path}:{name}", overrides)
              for name in ("stage1", stage2)}  # fmt: skip
    for config in stages.values():  # a wrong setting fails before the data is written
        config_loader.model_config(config)
        templates.get_template(config.data.template)
    paths = _dataset(workdir / "data", base)
    is_main = jax.process_index() == 0
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if is_main else (lambda m: None)
    say(f"shapes data in {paths.root}")

    init = _random_model_dir(workdir / "init", stages["stage1"], paths.tokenizer)
    model_dir = None
    for name, records, start in (("stage1", paths.stage1, init), (stage2, paths.stage2, None)):
        config = stages[name]
        with config.unlocked():
            config.data.train = str(records)
            config.data.image_root = str(paths.root)
            config.init_from = str(start or model_dir)
        say(f"{name}: {config.data.template} template, {records.name}")
        result = loop.train(config, workdir / name)
        if result.preempted:
            return 0
        model_dir = result.model_dir

    if not is_main:
        return 0
    template = config.data.template
    accuracy, results = evaluate_heldout(model_dir, paths.heldout, template)
    report = {"accuracy": accuracy, "num_questions": len(results), "model": str(model_dir),
              "results": results}  # fmt: skip
    (workdir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    for r in results[:5]:
        mark = "ok " if r["correct"] else "BAD"
        say(f"  {mark} {r['question']} -> {r['answer']} (expected {r['expected']})")
    target = base.shapes.target_accuracy
    say(f"held-out accuracy {accuracy:.1%} on {len(results)} questions "
        f"(target {target:.0%}); {workdir / 'eval.json'}")  # fmt: skip
    return 0 if accuracy >= target else 1
