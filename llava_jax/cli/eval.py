"""`llava-jax eval TASK`: run a benchmark of the LLaVA papers and print its table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llava_jax.cli import CommandError
from llava_jax.paths import is_url, local_path, location

TASK_NAMES = ("scienceqa", "vqav2", "gqa", "textvqa", "vizwiz", "pope", "mme", "mmbench",
              "llava-bench", "mm-vet")  # fmt: skip
SUITE = "llava-1.5"  # every task above whose folder is under --data


def add_judge_args(parser: argparse.ArgumentParser, prefix: str = "judge-") -> None:
    """The OpenAI-compatible endpoint flags (shared with `llava-jax instruct`)."""
    parser.add_argument(f"--{prefix}base-url", default="https://api.openai.com/v1", metavar="URL",
                        help="OpenAI-compatible API root (default %(default)s; a local vLLM or "
                        "SGLang server: http://localhost:8000/v1)")  # fmt: skip
    parser.add_argument(
        f"--{prefix}api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default %(default)s)",
    )
    parser.add_argument(f"--{prefix}concurrency", type=int, default=8, metavar="N",
                        help="requests in flight at most (default %(default)s)")  # fmt: skip
    parser.add_argument(
        f"--{prefix}cache-dir",
        type=local_path,
        metavar="DIR",
        help="reply cache (default: llm_cache/ in the output directory)",
    )
    parser.add_argument(f"--{prefix}max-retries", type=int, default=6, metavar="N",
                        help="retries on 408 / 429 / 5xx (but 501, 505) and connection "
                        "errors, with exponential backoff")  # fmt: skip
    parser.add_argument(f"--{prefix}backoff", type=float, default=1.0, metavar="S",
                        help="first retry delay in seconds; doubles per retry")  # fmt: skip


def make_client(args: argparse.Namespace, model: str, default_cache: Path, prefix: str = "judge_"):
    from llava_jax.eval.llm_client import ChatClient

    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    return ChatClient(get("base_url"), model, api_key_env=get("api_key_env"),
                      cache_dir=get("cache_dir") or default_cache,
                      concurrency=get("concurrency"), max_retries=get("max_retries"),
                      backoff_s=get("backoff"))  # fmt: skip


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a benchmark",
        description="Answer a benchmark's questions with greedy decoding and score them as the "
        "LLaVA papers do. Predictions are appended to OUT/predictions.jsonl as they are made; "
        "a rerun resumes. See docs/evaluation.md for each task's data layout.",
    )
    parser.add_argument("task", choices=(*TASK_NAMES, SUITE), metavar="TASK",
                        help=f"one of {', '.join(TASK_NAMES)}; or {SUITE}: every benchmark "
                        "found under --data (one folder each), summarised as the LLaVA-1.5 "
                        "table")  # fmt: skip
    parser.add_argument("--model", type=location, metavar="PATH",
                        help="llava-jax model directory (local or gs://) or Hugging Face "
                        "checkpoint (not needed "
                        "when every question already has a prediction in OUT)")  # fmt: skip
    parser.add_argument(
        "--data",
        required=True,
        type=location,
        metavar="DIR",
        help="the benchmark's directory, in its published layout (local or gs://)",
    )
    parser.add_argument(
        "--out",
        type=location,
        metavar="DIR",
        help="local output directory (default: eval/TASK-SPLIT)",
    )
    parser.add_argument("--split", metavar="NAME", help="the task's split (default: the "
                        "one the LLaVA papers report)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="the generation engine's slots: questions decoded together, "
                        "each leaving its slot at its own last token (default 8)")  # fmt: skip
    parser.add_argument("--prefix-cache-mb", type=float, default=1024.0, metavar="MB",
                        help="KV entries of earlier prompts, so that the next question about "
                        "the same image skips prefilling it; questions come grouped by image, "
                        "so a few prompts' entries suffice: 1024 holds a LLaVA-1.5-7B bf16 "
                        "prompt twice over (0: off; default 1024)")  # fmt: skip
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="answer length (default: the task's, 128 or 1024)",
    )
    parser.add_argument(
        "--template", metavar="NAME", help="conversation template (default: the checkpoint's own)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--adapter", type=local_path, metavar="DIR",
                        help="LoRA adapters trained on --model, unmerged (`llava-jax export` "
                        "of a LoRA run without --merge)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    judge = parser.add_argument_group("LLM judge (llava-bench, mm-vet)")
    judge.add_argument(
        "--judge-model",
        metavar="NAME",
        help="judge model name at --judge-base-url (e.g. gpt-4-0613)",
    )
    judge.add_argument(
        "--judge-runs",
        type=int,
        default=3,
        metavar="N",
        help="judge passes; the score is reported as mean ± std (default 3)",
    )
    add_judge_args(judge)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llava_jax.eval import TASKS
    from llava_jax.eval.runner import evaluate, local_out_dir

    if args.task == SUITE:
        if args.split:
            raise CommandError(f"{SUITE} runs every task on its default split; --split is for "
                               "one task")  # fmt: skip
        task, split = None, None
        out = args.out or local_path(f"eval/{SUITE}")
    else:
        task = TASKS[args.task]()
        split = args.split or task.default_split
        out = args.out or local_path(f"eval/{args.task}-{split}")
    out = local_out_dir(out)  # before any work: a bucket cannot take appended answers
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be >= 1, got {args.limit}")
    if args.judge_runs < 1:
        raise CommandError(f"--judge-runs must be >= 1, got {args.judge_runs}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prefix_cache_mb < 0:
        raise CommandError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:  # 0 is not "the default"
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.template is not None:
        from llava_jax.data.templates import get_template

        get_template(args.template)  # an unknown name fails now, not after the model loads
    if args.adapter is not None:
        from llava_jax import model_io

        if args.model is None:
            raise CommandError("--adapter adapts --model, which is not given")
        if not model_io.is_adapter_dir(args.adapter):
            raise CommandError(
                f"--adapter {args.adapter}: no {model_io.ADAPTER_CONFIG_FILE}; not an adapter "
                "dir (`llava-jax export` of a LoRA run without --merge writes one)"
            )
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731

    load = None
    if args.model is not None:

        def load():
            from llava_jax.inference.pipeline import Pipeline

            overrides = {"dtype": args.dtype} if args.dtype else {}
            return Pipeline.load(args.model, template=args.template, echo=echo,
                                 adapter=args.adapter, **overrides)  # fmt: skip

    judge = None
    if (task is None or task.needs_judge) and args.judge_model:
        judge = make_client(args, args.judge_model, out / "llm_cache")
    common = dict(
        batch_size=args.batch_size, prefix_cache_mb=args.prefix_cache_mb, limit=args.limit,
        max_new_tokens=args.max_new_tokens, model_name=_model_name(args.model, args.adapter),
        judge_runs=args.judge_runs,
    )  # fmt: skip
    if task is None:
        from llava_jax.eval.suite import run_suite

        report = run_suite(TASKS, args.data, out, load, judge=judge, echo=echo, **common)
        metrics_path = out / "suite.json"
    else:
        report = evaluate(task, args.data, out, load, split=split, judge=judge, echo=echo,
                          **common)  # fmt: skip
        metrics_path = out / "metrics.json"
    if args.json:
        print(json.dumps(json.loads(metrics_path.read_text())))
    else:
        print(report.format())
        print(f"\nmetrics: {metrics_path}", file=sys.stderr)
    return 0


def _model_name(model, adapter=None) -> str | None:
    """What run.json records of --model (and --adapter): a resume with another model, or
    other adapters, is refused."""
    if model is None:
        return None
    name = os.fspath(model) if is_url(model) else str(Path(model).resolve())
    return name if adapter is None else f"{name} + adapter {Path(adapter).resolve()}"
