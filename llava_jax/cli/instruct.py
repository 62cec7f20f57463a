"""`llava-jax instruct`: LLaVA-Instruct-style data from COCO captions and boxes through an
OpenAI-compatible LLM; `llava-jax instruct filter-captions`: CC3M-595K-style filtering."""

from __future__ import annotations

import argparse
import sys

from llava_jax.cli import CommandError
from llava_jax.cli.eval import add_judge_args, make_client
from llava_jax.paths import local_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "instruct",
        help="generate LLaVA-Instruct-style data through an LLM",
        description="Turn COCO captions and boxes into conversation, detailed-description or "
        "complex-reasoning samples (LLaVA JSON Lines) through any OpenAI-compatible endpoint. "
        "A rerun resumes; replies are cached.",
    )
    parser.add_argument("--captions", type=local_path, metavar="FILE", help="COCO captions_*.json")
    parser.add_argument(
        "--instances",
        type=local_path,
        metavar="FILE",
        help="COCO instances_*.json (boxes; needed for detail and complex)",
    )
    parser.add_argument(
        "--type",
        choices=("conversation", "detail", "complex"),
        dest="response_type",
        help="the response type to generate",
    )
    parser.add_argument("--out", type=local_path, metavar="FILE.jsonl", help="output (appended)")
    parser.add_argument("--few-shot", type=local_path, metavar="DIR",
                        help="few-shot examples: NNN_caps.txt + NNN_conv.txt pairs and an "
                        "optional system_message.txt (default: built-in)")  # fmt: skip
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    parser.add_argument("--model", metavar="NAME", help="the LLM's name at --base-url")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help="sampling temperature (default: the server's)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=1024, metavar="N")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="draws the detail instruction per image")  # fmt: skip
    add_judge_args(parser, prefix="")
    parser.set_defaults(run=run)

    actions = parser.add_subparsers(title="actions", metavar="[filter-captions]", dest="action")
    flt = actions.add_parser(
        "filter-captions",
        help="keep image-caption pairs by noun-phrase frequency, as CC3M-595K",
        description="The LLaVA paper's CC3M-595K filter: noun phrases (spaCy) counted over "
        "all captions; phrases seen fewer than --min-count times ignored; from the rarest up, "
        "at most --max-per-phrase captions per phrase kept.",
    )
    flt.add_argument(
        "--captions",
        type=local_path,
        required=True,
        metavar="FILE",
        help="LLaVA JSON/JSONL, JSONL of {image, caption}, or CC3M's .tsv",
    )
    flt.add_argument("--out", type=local_path, required=True, metavar="FILE",
                     help="LLaVA records: .json (a list) or .jsonl")  # fmt: skip
    flt.add_argument("--min-count", type=int, default=3, metavar="N")
    flt.add_argument("--max-per-phrase", type=int, default=100, metavar="N")
    flt.add_argument("--seed", type=int, default=0, metavar="S")
    flt.add_argument("--spacy-model", default="en_core_web_sm", metavar="NAME")
    flt.add_argument(
        "--noun-phrases",
        type=local_path,
        metavar="FILE",
        help='precomputed phrases, JSONL of {"id", "noun_phrases"} (no spaCy)',
    )
    flt.add_argument("--image-template", default="GCC_train_{index:09d}.jpg", metavar="FMT",
                     help="image names for .tsv input (default %(default)s)")  # fmt: skip
    flt.set_defaults(run=run_filter)


def run(args: argparse.Namespace) -> int:
    from llava_jax.instruct.coco import load_contexts
    from llava_jax.instruct.writer import generate, load_few_shot

    needed = {"--captions": args.captions, "--type": args.response_type, "--out": args.out,
              "--model": args.model}  # fmt: skip
    missing = [flag for flag, value in needed.items() if value is None]
    if missing:
        raise CommandError(f"instruct needs {', '.join(missing)} (or the filter-captions action)")
    if args.response_type != "conversation" and args.instances is None:
        raise CommandError(f"--type {args.response_type} needs --instances (the boxes)")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be >= 1, got {args.limit}")
    images = load_contexts(args.captions, args.instances)
    if args.limit is not None:
        images = images[: args.limit]
    few_shot = load_few_shot(args.response_type, args.few_shot)
    client = make_client(args, args.model, args.out.with_name(args.out.name + ".cache"), "")
    params = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731
    summary = generate(client, images, args.response_type, args.out, few_shot, params,
                       seed=args.seed, echo=echo)  # fmt: skip
    print(summary.format())
    if summary.failure() is not None:
        raise CommandError(summary.failure())
    return 0


def run_filter(args: argparse.Namespace) -> int:
    from llava_jax.instruct import filter_captions as fc

    records = fc.read_pairs(args.captions, args.image_template)
    if args.noun_phrases is not None:
        phrases = fc.read_noun_phrases(args.noun_phrases, records)
    else:
        phrases = fc.spacy_noun_phrases((r["_caption"] for r in records), args.spacy_model)
    keep = fc.select_by_noun_phrases(phrases, args.min_count, args.max_per_phrase, args.seed)
    written = fc.write_records(args.out, (records[i] for i in keep))
    print(f"kept {written} of {len(records)} image-caption pairs -> {args.out}")
    return 0
