"""`llava-jax generate`: one answer to one prompt, streamed to stdout; or, with `--prompts`,
answers to a JSON Lines file of prompts on the continuous-batching engine (`generate_many.py`).

Every argument is checked before anything loads: a wrong flag costs no model load. The
answer's length defaults to what the model's context leaves, as transformers' `generate`
caps its default length at `max_position_embeddings`; a `--max-new-tokens` the user gave is
kept, or refused when it does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava_jax.cli import CommandError
from llava_jax.data.templates import template_names  # light: no jax, no transformers
from llava_jax.paths import local_path, location

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_VIDEO_FRAMES = 8


def model_args(parser: argparse.ArgumentParser) -> None:
    """The flags `generate` and `chat` share: the model and how to sample."""
    parser.add_argument("--model", required=True, type=location, metavar="PATH",
                        help="llava-jax model directory (local or gs://), or a Hugging Face "
                        "checkpoint (converted in memory)")  # fmt: skip
    parser.add_argument("--adapter", type=local_path, metavar="DIR",
                        help="LoRA adapters trained on --model, unmerged (`llava-jax "
                        "export` of a LoRA run without --merge)")  # fmt: skip
    parser.add_argument("--template", metavar="NAME",
                        help=f"conversation template ({', '.join(template_names())}); "
                        "default: the checkpoint's own chat template")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: float32; the weights stay in the dtype "
                             "they were saved in)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help=f"most tokens in an answer (default: {DEFAULT_MAX_NEW_TOKENS}, "
                        "or what the model's context leaves after the prompt)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) is greedy decoding")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P")
    parser.add_argument("--top-k", type=int, default=0, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    parser.add_argument("--seed", type=int, default=0, metavar="S")


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="answer a prompt (or a file of prompts) about images or a video",
        description="Generate an answer to one prompt; the answer streams to stdout. With "
        "--prompts, answer every line of a JSON Lines file, one JSON line per answer.",
    )
    model_args(gen)
    gen.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                     help="an image (repeat for several, in the order of the <image> "
                     "placeholders)")  # fmt: skip
    gen.add_argument("--video", type=Path, metavar="FILE", help="a video file")
    gen.add_argument("--video-frames", type=int, default=DEFAULT_VIDEO_FRAMES, metavar="N",
                     help=f"frames sampled uniformly from --video (default "
                     f"{DEFAULT_VIDEO_FRAMES})")  # fmt: skip
    gen.add_argument("--video-fps", type=float, metavar="FPS",
                     help="sample --video at this rate instead of a fixed count")  # fmt: skip
    gen.add_argument("--prompt", help="the question; <image> / <video> mark where the media go "
                     "(default: before the text)")  # fmt: skip
    gen.add_argument("--raw", action="store_true",
                     help="use --prompt exactly as given, no template")  # fmt: skip
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    from llava_jax.cli import generate_many

    generate_many.add_args(gen)
    gen.set_defaults(run=run_generate)


# -- checks that need no model ---------------------------------------------------------------


def check_model_args(args: argparse.Namespace) -> None:
    """The shared flags' values, before anything loads."""
    from llava_jax.data import templates
    from llava_jax.inference.generator import SamplingConfig

    given = args.max_new_tokens
    SamplingConfig(**sampling_args(args, DEFAULT_MAX_NEW_TOKENS if given is None else given))
    if args.template is not None:
        templates.get_template(args.template)
    if args.adapter is not None:
        from llava_jax import model_io

        if not model_io.is_adapter_dir(args.adapter):
            raise CommandError(
                f"--adapter {args.adapter}: no {model_io.ADAPTER_CONFIG_FILE}; not an adapter "
                "dir (`llava-jax export` of a LoRA run without --merge writes one)"
            )


def check_utf8(text: str, what: str) -> str:
    """`text` if it is valid UTF-8; Python decodes a bad byte in argv or stdin to a lone
    surrogate (`surrogateescape`), which the tokenizer would fail on with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) & 0xFF  # U+DC80..U+DCFF stand for the bytes 0x80..0xFF
        raise CommandError(
            f"{what} is not valid UTF-8 (byte 0x{byte:02x} at character {e.start})"
        ) from None
    return text


def check_placeholders(
    text: str, images: int, videos: int, raw: bool,
    names: tuple[str, str, str] = ("--prompt", "--image", "--video"),
) -> None:  # fmt: skip
    """Placeholders in `text` against the media given. Without any placeholder the media go
    first (templated prompts only); with some, every image and video needs its own. `names`:
    what the prompt, images and video are called in the message."""
    if not raw and "<image>" not in text and "<video>" not in text:
        return
    what, image_name, video_name = names
    for tag, given, flag in (("<image>", images, image_name), ("<video>", videos, video_name)):
        found = text.count(tag)
        if found != given:
            raise CommandError(
                f"{what} has {found} {tag} placeholder(s) for {given} {flag} file(s); "
                f"give one {tag} per {flag}" + ("" if raw else ", or none to put the media first")
            )


def check_video_sampling(args: argparse.Namespace) -> None:
    if args.video_frames < 1:
        raise CommandError(f"--video-frames must be >= 1, got {args.video_frames}")
    if args.video_fps is not None and not args.video_fps > 0:
        raise CommandError(f"--video-fps must be > 0, got {args.video_fps}")


def _check_generate_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    if args.prompt is None:
        raise CommandError("give --prompt TEXT, or --prompts FILE.jsonl for many")
    from llava_jax.cli import generate_many

    given = generate_many.flags_given(args)
    if given:
        verb = "go" if len(given) > 1 else "goes"
        raise CommandError(f"{' and '.join(given)} {verb} with --prompts, not --prompt")
    check_utf8(args.prompt, "--prompt")
    check_video_sampling(args)
    sampled = args.video_fps is not None or args.video_frames != DEFAULT_VIDEO_FRAMES
    if args.video is None and sampled:
        raise CommandError("--video-frames and --video-fps sample --video, which is not given")
    check_placeholders(args.prompt, len(args.image), int(args.video is not None), args.raw)


# -- shared with chat ------------------------------------------------------------------------


def sampling_args(args: argparse.Namespace, max_new_tokens: int) -> dict:
    return dict(
        max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )  # fmt: skip


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_pipeline(args: argparse.Namespace, raw: bool = False):
    from llava_jax.inference.pipeline import Pipeline

    overrides = {"dtype": args.dtype} if args.dtype else {}
    return Pipeline.load(args.model, template=args.template, raw=raw, echo=say,
                         adapter=args.adapter, **overrides)  # fmt: skip


def with_placeholders(text: str, images: int, videos: int) -> str:
    """Puts the media first when the user wrote no placeholders, as LLaVA prompts do."""
    if "<image>" in text or "<video>" in text:
        return text
    return "<image>\n" * images + "<video>\n" * videos + text


class Streamer:
    """Prints the new text of one row as tokens arrive (decoding the whole answer each time,
    so multi-token characters come out whole)."""

    def __init__(self, pipeline, out):
        self.pipeline, self.out, self.ids, self.printed = pipeline, out, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.pipeline.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text


# -- the command ------------------------------------------------------------------------------


def _max_new_tokens(requested: int | None, prompt_tokens: int, context: int,
                    where: str = "") -> int:  # fmt: skip
    """The answer's length: a requested one as given or refused, the default capped at the
    room left, saying so. `where`: the prompt's place ("FILE:LINE: "), for the messages."""
    room = context - prompt_tokens  # the context is max_position_embeddings
    if requested is not None:
        if requested > room:
            raise CommandError(
                f"{where}--max-new-tokens {requested}: the prompt's {prompt_tokens} tokens leave "
                f"{max(room, 0)} of the model's context of {context}; ask for at most that, or "
                "leave it out"
            )
        return requested
    if room < 1:
        raise CommandError(
            f"{where}the prompt of {prompt_tokens} tokens fills the model's context of {context} "
            "tokens: no room for an answer"
        )
    if room < DEFAULT_MAX_NEW_TOKENS:
        say(f"({where}at most {room} new tokens: the prompt's {prompt_tokens} tokens leave "
            f"that much of the model's context of {context})")  # fmt: skip
    return min(room, DEFAULT_MAX_NEW_TOKENS)


def run_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        from llava_jax.cli import generate_many

        return generate_many.run(args)
    _check_generate_args(args)
    from llava_jax.media.image_processing import load_image
    from llava_jax.media.video import load_video

    images = [load_image(p) for p in args.image]
    for path in args.image:
        _warn_if_animated(path)
    videos = []
    if args.video is not None:
        frames, _ = load_video(args.video, num_frames=None if args.video_fps else args.video_frames,
                               fps=args.video_fps)  # fmt: skip
        videos.append(frames)
    pipeline = load_pipeline(args, raw=args.raw)
    text = args.prompt
    if args.raw:
        messages = text
    else:
        text = with_placeholders(text, len(images), len(videos))
        messages = [{"role": "user", "content": text}]
    prompt = pipeline.prompt(messages, images, videos)
    context = pipeline.cfg.text.max_position_embeddings
    max_new = _max_new_tokens(args.max_new_tokens, len(prompt.input_ids), context)
    sampling = pipeline.stop_config(**sampling_args(args, max_new))
    streamer = None if args.json else Streamer(pipeline, sys.stdout)
    result = pipeline.generator.generate([prompt], sampling, on_token=streamer)[0]
    answer = pipeline.decode(result.token_ids)
    if args.json:
        media_ids = {pipeline.cfg.image_token_id, pipeline.cfg.video_token_id}
        print(json.dumps({
            "text": answer,
            "token_ids": result.token_ids,
            "prompt_tokens": result.prompt_tokens,
            "image_tokens": int(sum(int(t) in media_ids for t in prompt.input_ids)),
            "time_to_first_token_s": round(result.time_to_first_token_s, 4),
            "decode_tokens_per_s": _round(result.decode_tokens_per_s, 2),
        }))  # fmt: skip
    else:
        print()
    return 0


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _warn_if_animated(path: Path) -> None:
    """LLaVA sees one still image: say that only an animation's first frame is used."""
    from llava_jax.media.image_processing import count_frames

    frames = count_frames(path)
    if frames > 1:
        print(f"warning: --image {path}: an animated image of {frames} frames; only the first "
              f"is used (--video {path} takes its frames as a video)", file=sys.stderr)  # fmt: skip
