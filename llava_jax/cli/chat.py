"""`llava-jax chat`: a conversation about images in the terminal.

The conversation stays open whatever a message does. One that would pass the model's
context first drops the oldest exchanges, saying so; one that does not fit even alone is
refused and the history kept. Ctrl-C during an answer stops it (and drops it); at the prompt
it leaves. A line starting with `/` is a command (`//` sends a message that starts with
`/`); an unknown one is an error that lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from llava_jax.cli import CommandError
from llava_jax.cli.generate import (
    DEFAULT_MAX_NEW_TOKENS,
    Streamer,
    check_model_args,
    check_utf8,
    load_pipeline,
    model_args,
    sampling_args,
    say,
    with_placeholders,
)

COMMANDS = ("/image FILE adds an image to your next message, /reset clears the history, "
            "/help lists these, /quit (or Ctrl-D) leaves")  # fmt: skip


def add_parser(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="hold a conversation about images in the terminal",
        description=f"Interactive chat. Commands: {COMMANDS}.",
    )
    model_args(chat)
    chat.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                      help="an image for the first message (repeat for several)")  # fmt: skip
    chat.set_defaults(run=run_chat)


@dataclasses.dataclass
class Exchange:
    """One message and its answer, with the images the message brought."""

    messages: list[dict[str, str]]
    images: list[Any]


class Chat:
    """The history, and what the model's context allows of it."""

    def __init__(self, pipeline, args: argparse.Namespace, images: list[Any]):
        self.pipeline, self.args = pipeline, args
        self.context = pipeline.cfg.text.max_position_embeddings
        # Room an answer needs before the oldest exchanges go: the length asked for, or by
        # default a quarter of the context (at most the default length), so that a small
        # context still holds a few exchanges.
        self.requested = args.max_new_tokens  # None: the default, capped to the room left
        if self.requested is not None and self.requested >= self.context:
            raise CommandError(
                f"--max-new-tokens {self.requested} leaves no room for a message in the model's "
                f"context of {self.context} tokens"
            )
        default = min(DEFAULT_MAX_NEW_TOKENS, self.context // 4)
        self.wanted = default if self.requested is None else self.requested
        self.history: list[Exchange] = []
        self.pending = images  # for the next message
        self.capped = False

    def reset(self) -> None:
        self.history, self.pending = [], []

    def _prompt(self, start: int, user: dict[str, str]):
        kept = self.history[start:]
        messages = [m for e in kept for m in e.messages] + [user]
        images = [i for e in kept for i in e.images] + self.pending
        return self.pipeline.prompt(messages, images)

    def send(self, line: str) -> None:
        """Answers `line` after the history, streaming to stdout; raises `CommandError`
        (history untouched) when the message does not fit the context even alone."""
        content = with_placeholders(line, len(self.pending), 0) if self.pending else line
        user = {"role": "user", "content": content}
        for start in range(len(self.history) + 1):
            prompt = self._prompt(start, user)
            room = self.context - len(prompt.input_ids)
            if room >= self.wanted:
                break
        needed = 1 if self.requested is None else self.requested
        if room < needed:
            answer = "" if self.requested is None else f" and {needed} new tokens"
            raise CommandError(
                f"this message takes {len(prompt.input_ids)} tokens{answer}, more than the "
                f"model's context of {self.context}: not sent; shorten it"
            )
        if start:
            say(f"(dropped the oldest {start} exchange(s) to stay within the model's context "
                f"of {self.context} tokens; /reset clears the rest)")  # fmt: skip
            del self.history[:start]
        max_new = self.requested
        if max_new is None:
            max_new = min(room, DEFAULT_MAX_NEW_TOKENS)
            if max_new < DEFAULT_MAX_NEW_TOKENS and not self.capped:
                say(f"(answers are capped at what the model's context of {self.context} tokens "
                    f"leaves: {max_new} new tokens for this one)")  # fmt: skip
                self.capped = True
        sampling = self.pipeline.stop_config(**sampling_args(self.args, max_new))
        print("assistant> ", end="", flush=True)
        streamer = Streamer(self.pipeline, sys.stdout)
        result = self.pipeline.generator.generate([prompt], sampling, on_token=streamer)[0]
        print()
        ids = result.token_ids
        if ids and ids[-1] in sampling.stop_token_ids:
            ids = ids[:-1]
        answer = {"role": "assistant", "content": self.pipeline.decode(ids)}
        self.history.append(Exchange([user, answer], self.pending))
        self.pending = []


def run_chat(args: argparse.Namespace) -> int:
    check_model_args(args)
    from llava_jax.media.image_processing import load_image

    images = [load_image(p) for p in args.image]
    chat = Chat(load_pipeline(args), args, images)
    if hasattr(sys.stdin, "reconfigure"):
        # A byte that is not UTF-8 becomes a lone surrogate that `check_utf8` reports,
        # instead of a UnicodeDecodeError that would end the conversation.
        sys.stdin.reconfigure(errors="surrogateescape")
    say(f"Chat with the model. {COMMANDS}.")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if line.startswith("//"):
                chat.send(check_utf8(line[1:], "the message"))
            elif not line.startswith("/"):
                chat.send(check_utf8(line, "the message"))
            elif command in ("/quit", "/exit"):
                return 0
            elif command == "/reset":
                chat.reset()
                say("(history cleared)")
            elif command == "/help":
                say(f"({COMMANDS})")
            elif command == "/image":
                if not rest.strip():
                    raise CommandError("/image needs a file: /image FILE")
                chat.pending.append(load_image(Path(rest.strip())))
                say(f"(image added: {len(chat.pending)} pending)")
            else:
                raise CommandError(f"unknown command {command}; {COMMANDS}; start a message "
                                   "with // to send one that begins with /")  # fmt: skip
        except (CommandError, ValueError) as e:
            # ValueError: an unreadable image, placeholders that do not match the images, ...
            say(f"error: {e}")
        except KeyboardInterrupt:  # stops the answer, not the conversation
            print()
            say("(stopped; the answer is not kept. Ctrl-C at the prompt, /quit or Ctrl-D leaves)")
