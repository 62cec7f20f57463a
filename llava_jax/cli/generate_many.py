"""`llava-jax generate --prompts FILE.jsonl`: answers to many prompts on the
continuous-batching engine, one JSON line per answer, in input order.

Every line is checked before the model loads (its JSON, keys, placeholders, UTF-8, media
files and image headers). Then every prompt's length is known from its text and its media's
geometry alone, so the engine's slots are sized to the longest prompt plus its answer
(bucketed, capped at the context) before any pixels load. Media load lazily, as slots free:
at most `--batch-size` prompts' pixels are held at once. A `PrefixCache` lets prompts about
the same image reuse that image's KV entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from llava_jax.cli import CommandError
from llava_jax.cli.generate import (
    DEFAULT_VIDEO_FRAMES,
    _max_new_tokens,
    check_model_args,
    check_placeholders,
    check_utf8,
    check_video_sampling,
    load_pipeline,
    sampling_args,
    say,
    with_placeholders,
)

DEFAULT_BATCH_SIZE = 8
DEFAULT_PREFIX_CACHE_MB = 1024
KEYS = ("prompt", "image", "video", "id")
PROGRESS_EVERY_S = 5.0


def add_args(gen: argparse.ArgumentParser) -> None:
    many = gen.add_argument_group("many prompts")
    many.add_argument("--prompts", metavar="FILE.jsonl",
                      help='answer every line of FILE, a JSON object {"prompt": "...", '
                      '"image": "a.jpg" or ["a.jpg", ...], "video": "v.mp4", "id": ...} (image, '
                      "video, id optional; id defaults to the line number). Relative media paths "
                      "resolve against FILE's folder, not the working directory; '-' reads stdin, "
                      "its paths against the working directory. Sampling flags apply to every "
                      "prompt, --seed as given to each")  # fmt: skip
    many.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                      help=f"prompts decoded together (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    many.add_argument("--out", type=Path, metavar="ANSWERS.jsonl",
                      help="write the answers here instead of stdout; an existing file is "
                      "refused unless --resume")  # fmt: skip
    many.add_argument("--resume", action="store_true",
                      help="append to --out, skipping the ids already answered in it")  # fmt: skip
    many.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_MB,
                      metavar="MB", help="device memory for KV entries prompts share (an image's "
                      f"tokens); 0: off (default {DEFAULT_PREFIX_CACHE_MB})")  # fmt: skip


def flags_given(args: argparse.Namespace) -> list[str]:
    """The many-prompts flags set to other than their defaults (refused with --prompt)."""
    defaults = {"batch_size": DEFAULT_BATCH_SIZE, "out": None, "resume": False,
                "prefix_cache_mb": DEFAULT_PREFIX_CACHE_MB}  # fmt: skip
    return [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k) != v]


@dataclasses.dataclass(frozen=True)
class Line:
    """One checked line of the prompts file; `where` is "FILE:LINE: " for messages."""

    where: str
    id: Any
    prompt: str
    images: tuple[Path, ...]
    video: Path | None
    image_hw: tuple[tuple[int, int], ...]  # from the headers, for the prompt's length


# -- checks that need no model ---------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    if args.prompt is not None:
        raise CommandError("give --prompt or --prompts, not both")
    if args.image or args.video is not None:
        raise CommandError("--image and --video go with --prompt; with --prompts, each line "
                           'names its own "image" and "video"')  # fmt: skip
    if args.json:
        raise CommandError("--json goes with --prompt; --prompts always writes JSON lines")
    check_model_args(args)
    check_video_sampling(args)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prefix_cache_mb < 0:
        raise CommandError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if args.resume and args.out is None:
        raise CommandError("--resume skips the ids already in --out, which is not given")
    if args.out is not None and not os.access(args.out.parent, os.W_OK):
        raise CommandError(f"--out {args.out}: cannot write in {args.out.parent} (no such "
                           "folder, or not writable)")  # fmt: skip
    if args.out is not None and args.out.exists() and not args.resume:
        raise CommandError(f"--out {args.out} exists; pass --resume to skip the ids already "
                           "answered in it, or choose another file")  # fmt: skip


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _media_path(value: Any, base: Path, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise CommandError(f'{where}"{key}" must be a file name (a non-empty string), got '
                           f"{json.dumps(value)[:80]}")  # fmt: skip
    path = base / value  # an absolute value stays itself
    if not path.is_file():
        raise CommandError(f'{where}"{key}" {value}: no such file ({path})')
    return path


def _parse_line(raw: bytes, name: str, number: int, base: Path,
                args: argparse.Namespace) -> Line | None:  # fmt: skip
    """The checked line `number` of file `name`, or None for a blank one."""
    from llava_jax.media.image_processing import ImageError, image_hw

    where = f"{name}:{number}: "
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"{where}not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                           f"{e.start})") from None  # fmt: skip
    if not text.strip():
        return None
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CommandError(f"{where}not a JSON line: {e}") from None
    if not isinstance(entry, dict):
        raise CommandError(f"{where}expected a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise CommandError(f"{where}unknown key(s) {', '.join(map(repr, unknown))}; a line has "
                           f"{', '.join(map(repr, KEYS))}")  # fmt: skip
    prompt = entry.get("prompt")
    if prompt is None:
        raise CommandError(f'{where}"prompt" (a string) is missing')
    if not isinstance(prompt, str):
        raise CommandError(f'{where}"prompt" must be a string, got {type(prompt).__name__}')
    check_utf8(prompt, f'{where}"prompt"')  # a \ud800 escape decodes to a lone surrogate
    image = entry.get("image", [])
    image = [image] if isinstance(image, str) else image
    if not isinstance(image, list):
        raise CommandError(f'{where}"image" must be a file name or a list of them')
    images = tuple(_media_path(v, base, where, "image") for v in image)
    video = entry.get("video")
    video = None if video is None else _media_path(video, base, where, "video")
    try:
        check_placeholders(prompt, len(images), int(video is not None), args.raw,
                           names=(f'{where}"prompt"', '"image"', '"video"'))  # fmt: skip
        hws = tuple(image_hw(p) for p in images)
    except ImageError as e:
        raise CommandError(f"{where}{e}") from None
    return Line(where, entry.get("id", number), prompt, images, video, hws)


def read_prompts(source: str, args: argparse.Namespace) -> list[Line]:
    """Every line of `source` ('-': stdin) checked, or the first problem as a CommandError."""
    if source == "-":
        data, name, base = sys.stdin.buffer.read(), "<stdin>", Path.cwd()
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CommandError(f"--prompts {source}: cannot read it ({e.strerror})") from None
        name, base = source, path.parent
    lines, seen = [], {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _parse_line(raw.rstrip(b"\r"), name, number, base, args)
        if line is None:
            continue
        key = _id_key(line.id)
        if key in seen:
            raise CommandError(f"{line.where}id {key} is already that of line {seen[key]}")
        seen[key] = number
        lines.append(line)
    if not lines:
        raise CommandError(f"--prompts {source}: no prompts in it")
    sampled = args.video_fps is not None or args.video_frames != DEFAULT_VIDEO_FRAMES
    if sampled and not any(line.video for line in lines):
        raise CommandError(f"--video-frames and --video-fps sample videos; no line of {name} "
                           "has one")  # fmt: skip
    return lines


def answered_ids(out: Path) -> set[str]:
    """The ids answered in an earlier run's `out` (as `_id_key`s)."""
    try:
        done, written = set(), out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"--out {out}: cannot read the answers in it ({e})") from None
    if written and not written.endswith("\n"):
        raise CommandError(f"--out {out}: its last line is cut off (no newline); remove it and "
                           "--resume again")  # fmt: skip
    for number, text in enumerate(written.splitlines(), start=1):
        try:
            done.add(_id_key(json.loads(text)["id"]))
        except (ValueError, KeyError, TypeError):
            raise CommandError(f"--out {out}:{number}: not an answer line (cut off while "
                               "writing?); remove it and --resume again") from None  # fmt: skip
    return done


# -- the run ----------------------------------------------------------------------------------


def _messages(line: Line, raw: bool):
    if raw:
        return line.prompt
    text = with_placeholders(line.prompt, len(line.images), int(line.video is not None))
    return [{"role": "user", "content": text}]


def _video_frames(line: Line, args: argparse.Namespace) -> int:
    """The frames `--video-frames` samples; with `--video-fps` the count depends on the video's
    length, so it is decoded here (and again when its prompt runs)."""
    if args.video_fps is None:
        return args.video_frames
    return len(_load_video(line, args))


def _load_video(line: Line, args: argparse.Namespace):
    from llava_jax.media.video import VideoError, load_video

    try:
        frames, _ = load_video(line.video, num_frames=None if args.video_fps else args.video_frames,
                               fps=args.video_fps)  # fmt: skip
    except VideoError as e:
        raise CommandError(f"{line.where}{e}") from None
    return frames


def _prompt_tokens(pipeline, line: Line, args: argparse.Namespace) -> int:
    from llava_jax.media.feature_plan import Media

    media = [Media.image(*hw) for hw in line.image_hw]
    if line.video is not None:
        media.append(Media.video(_video_frames(line, args)))
    try:
        ids = pipeline.tokenize(_messages(line, args.raw), media).input_ids
    except ValueError as e:
        raise CommandError(f"{line.where}{e}") from None
    return len(ids)


def _build_prompt(pipeline, line: Line, args: argparse.Namespace):
    from llava_jax.media.image_processing import ImageError, load_image

    try:
        images = [load_image(p) for p in line.images]
    except ImageError as e:
        raise CommandError(f"{line.where}{e}") from None
    videos = [] if line.video is None else [_load_video(line, args)]
    return pipeline.prompt(_messages(line, args.raw), images, videos)


class Writer:
    """Writes answers in input order, each as soon as it and every earlier one are done."""

    def __init__(self, pipeline, out: TextIO, total: int):
        self.pipeline, self.out, self.total = pipeline, out, total
        self.done: dict[int, dict[str, Any]] = {}  # answers waiting for an earlier one
        self.written = self.tokens = 0
        self.start = self.said = time.perf_counter()

    def finished(self, index: int, line: Line, request) -> None:
        if request.error is not None:
            return  # the run stops on it: later answers wait for this line, never written
        # The answer alone, not the request: its prompt's pixels go now, however long an
        # earlier answer keeps this one waiting.
        self.done[index] = {
            "id": line.id, "text": self.pipeline.decode(request.token_ids),
            "token_ids": request.token_ids, "prompt_tokens": len(request.prompt.input_ids),
            "finish_reason": request.finish_reason,
        }  # fmt: skip
        self.tokens += len(request.token_ids)
        while self.written in self.done:
            answer = self.done.pop(self.written)
            self.out.write(json.dumps(answer, ensure_ascii=False) + "\n")
            self.out.flush()
            self.written += 1
        now = time.perf_counter()
        if now - self.said >= PROGRESS_EVERY_S or self.written == self.total:
            self.said = now
            say(f"({self.written}/{self.total} answers written, "
                f"{self.tokens / (now - self.start):.1f} tokens/s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    lines = read_prompts(args.prompts, args)
    if args.resume and args.out.exists():
        done = answered_ids(args.out)
        todo = [line for line in lines if _id_key(line.id) not in done]
        say(f"(--resume: {len(lines) - len(todo)} of {len(lines)} prompts already answered in "
            f"{args.out})")  # fmt: skip
    else:
        todo = lines
    if not todo:
        return 0

    from llava_jax.inference.engine import Engine
    from llava_jax.inference.prefix_cache import PrefixCache

    pipeline = load_pipeline(args, raw=args.raw)
    cfg, context = pipeline.cfg, pipeline.cfg.text.max_position_embeddings
    say(f"(checking {len(todo)} prompts' lengths against the context of {context} tokens)")
    lengths = [_prompt_tokens(pipeline, line, args) for line in todo]
    max_new = [_max_new_tokens(args.max_new_tokens, n, context, line.where)
               for line, n in zip(todo, lengths, strict=True)]  # fmt: skip
    slot_length = min(max(n + m for n, m in zip(lengths, max_new, strict=True)), context)
    cache = PrefixCache.for_model(cfg, args.prefix_cache_mb << 20)
    engine = Engine(pipeline.generator, num_slots=args.batch_size, max_length=slot_length,
                    prefix_cache=cache)  # fmt: skip
    say(f"({len(todo)} prompts, {args.batch_size} at a time, slots of {engine.max_length} "
        "tokens)")  # fmt: skip

    out = sys.stdout if args.out is None else args.out.open("a", encoding="utf-8")
    try:
        _answer(pipeline, engine, todo, max_new, args, Writer(pipeline, out, len(todo)))
    finally:
        if out is not sys.stdout:
            out.close()
    if cache is not None:
        say(f"(prefix cache: {cache.stats['prefix_hits']} hits, "
            f"{cache.stats['prefix_hit_tokens']} prompt tokens not prefilled again)")  # fmt: skip
    return 0


def _answer(pipeline, engine, todo: list[Line], max_new: list[int],
            args: argparse.Namespace, writer: Writer) -> None:  # fmt: skip
    """Runs every prompt through `engine`, loading each one's media only when a slot is free
    for it at the next step, so that few prompts' pixels are held at once."""
    from llava_jax.inference.engine import Request

    pending = iter(enumerate(zip(todo, max_new, strict=True)))
    running = []
    while True:
        for _ in range(engine.num_slots - engine.active - len(engine.waiting)):
            index, (line, new) = next(pending, (None, (None, None)))
            if line is None:
                break
            sampling = pipeline.stop_config(**sampling_args(args, new))
            finish = functools.partial(writer.finished, index, line)
            request = Request(_build_prompt(pipeline, line, args), sampling, on_finish=finish)
            try:
                engine.add(request)
            except ValueError as e:  # its media made it longer than their headers said
                raise CommandError(f"{line.where}{e}") from None
            running.append((line, request))
        if not engine.busy:
            return
        engine.step()
        for line, request in running:
            if request.error is not None:
                raise CommandError(f"{line.where}{request.error}")
        running = [(line, r) for line, r in running if not r.finish_reason]
