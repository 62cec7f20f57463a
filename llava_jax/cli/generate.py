"""`llava-jax generate` (one answer) and `llava-jax chat` (a conversation in the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava_jax.data.templates import template_names  # light: no jax, no transformers


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, metavar="PATH",
                        help="llava-jax model directory, or a Hugging Face checkpoint "
                        "(converted in memory)")  # fmt: skip
    parser.add_argument("--template", metavar="NAME",
                        help=f"conversation template ({', '.join(template_names())}); "
                        "default: the checkpoint's own chat template")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: as the model was saved)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) is greedy decoding")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P")
    parser.add_argument("--top-k", type=int, default=0, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    parser.add_argument("--seed", type=int, default=0, metavar="S")


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="answer one prompt about images or a video",
        description="Generate an answer to one prompt; the answer streams to stdout.",
    )
    _model_args(gen)
    gen.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                     help="an image (repeat for several, in the order of the <image> "
                     "placeholders)")  # fmt: skip
    gen.add_argument("--video", type=Path, metavar="FILE", help="a video file")
    gen.add_argument("--video-frames", type=int, default=8, metavar="N",
                     help="frames sampled uniformly from --video (default 8)")  # fmt: skip
    gen.add_argument("--video-fps", type=float, metavar="FPS",
                     help="sample --video at this rate instead of a fixed count")  # fmt: skip
    gen.add_argument("--prompt", required=True, help="the question; <image> / <video> mark "
                     "where the media go (default: before the text)")  # fmt: skip
    gen.add_argument("--raw", action="store_true",
                     help="use --prompt exactly as given, no template")  # fmt: skip
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.set_defaults(run=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="hold a conversation about images in the terminal",
        description="Interactive chat. Commands: /image FILE adds an image to your next "
        "message, /reset clears the history, /quit (or Ctrl-D) leaves.",
    )
    _model_args(chat)
    chat.add_argument("--image", action="append", default=[], type=Path, metavar="FILE")
    chat.set_defaults(run=run_chat)


def _sampling(args):
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )  # fmt: skip


def _load(args, raw=False):
    from llava_jax.pipeline import Pipeline

    overrides = {"dtype": args.dtype} if args.dtype else {}
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731
    return Pipeline.load(args.model, template=args.template, raw=raw, echo=echo, **overrides)


def _with_placeholders(text: str, images: int, videos: int) -> str:
    """Puts the media first when the user wrote no placeholders, as LLaVA prompts do."""
    if "<image>" in text or "<video>" in text:
        return text
    return "<image>\n" * images + "<video>\n" * videos + text


class _Streamer:
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


def run_generate(args: argparse.Namespace) -> int:
    from llava_jax.data.image_processing import load_image
    from llava_jax.data.video import load_video

    images = [load_image(p) for p in args.image]
    for path in args.image:
        _warn_if_animated(path)
    videos = []
    if args.video is not None:
        frames, _ = load_video(args.video, num_frames=None if args.video_fps else args.video_frames,
                               fps=args.video_fps)  # fmt: skip
        videos.append(frames)
    pipeline = _load(args, raw=args.raw)
    text = args.prompt
    if args.raw:
        messages = text
    else:
        text = _with_placeholders(text, len(images), len(videos))
        messages = [{"role": "user", "content": text}]
    prompt = pipeline.prompt(messages, images, videos)
    streamer = None if args.json else _Streamer(pipeline, sys.stdout)
    result = pipeline.generator.generate([prompt], pipeline.stop_config(**_sampling(args)),
                                         on_token=streamer)[0]  # fmt: skip
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
    from llava_jax.data.image_processing import count_frames

    frames = count_frames(path)
    if frames > 1:
        print(f"warning: --image {path}: an animated image of {frames} frames; only the first "
              f"is used (--video {path} takes its frames as a video)", file=sys.stderr)  # fmt: skip


def run_chat(args: argparse.Namespace) -> int:
    from llava_jax.data.image_processing import ImageError, load_image

    pipeline = _load(args)
    sampling = pipeline.stop_config(**_sampling(args))
    messages, images = [], []
    pending = [load_image(p) for p in args.image]
    print("Chat with the model. /image FILE adds an image, /reset clears, /quit leaves.",
          file=sys.stderr)  # fmt: skip
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                pending.append(load_image(Path(line[len("/image") :].strip())))
                print(f"(image added: {len(pending)} pending)", file=sys.stderr)
            except ImageError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        content = _with_placeholders(line, len(pending), 0) if pending else line
        turn = [*messages, {"role": "user", "content": content}]
        try:
            prompt = pipeline.prompt(turn, images + pending)
        except ValueError as e:  # placeholders that do not match the images, too long, ...
            print(f"error: {e}", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        streamer = _Streamer(pipeline, sys.stdout)
        result = pipeline.generator.generate([prompt], sampling, on_token=streamer)[0]
        print()
        answer = pipeline.decode(_strip_stop(result.token_ids, sampling.stop_token_ids))
        messages = [*turn, {"role": "assistant", "content": answer}]
        images, pending = images + pending, []


def _strip_stop(ids: list[int], stops) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stops else ids
