"""Conversation templates: the original LLaVA prompt formats as data, and the checkpoint's own.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
whose text holds `<image>` / `<video>` placeholders (`prompt.tokenize_prompt` expands them).

- `Template`: one `conv_templates` entry of the original repos' `llava/conversation.py`
  (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT), written as the text of each part of a chat.
- `ChatTemplate`: the Jinja `chat_template` shipped with an HF checkpoint, rendered by
  transformers' own renderer, with HF's typed content parts (`{"type": "image"}`) where the
  template reads them. The default whenever the checkpoint has one (`resolve_template`).

`render` gives the prompt text; `render_spans` gives the same text cut into (text, is_trained)
spans for label masking in training (docs/data.md, clean mode): an assistant reply and its
end of turn are trained, everything else is not. Tokenizing span by span and concatenating
(`prompt.tokenize_spans`) makes the original's "tokenization mismatch" impossible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

IMAGE = "<image>"
VIDEO = "<video>"
PLACEHOLDER = re.compile(f"{IMAGE}|{VIDEO}")

Message = Mapping[str, Any]
Spans = list[tuple[str, bool]]


class PromptError(ValueError):
    """A conversation or prompt that cannot be rendered or tokenized as asked."""


@dataclasses.dataclass(frozen=True)
class Template:
    """One prompt format of the original repos, as data.

    Attributes:
      name: the original `--conv-mode` name.
      system: the default system message; a leading `system` message replaces it.
      system_format: how a non-empty system message is written (`{system}` is replaced).
      empty_system: how an empty system message is written: the separator `get_prompt` still
        writes after it (`system + sep`). None: the block is left out (NeXT's CHATML and the
        LLAMA_2 style's `wrap_sys`).
      user_format: one user turn (`{content}` is replaced).
      assistant_format: one assistant turn (`{content}` is replaced).
      end_of_turn: what the text after `{content}` starts with and the model must learn to
        emit: trained together with the reply.
      generation_prompt: what opens the model's reply at inference.
      stop_strings: generation stops at any of these, besides EOS.
      turn_separator: written before every user turn but the first (LLAMA_2's `<s>`).
      system_in_first_user: the system block opens the first user turn (LLAMA_2).
      media: "start": a turn's single placeholder moves to its start, followed by "\\n"
        (haotian-liu `preprocess_multimodal`; NeXT skips turns that already start with it,
        which differs only for e.g. "<image>What"); several placeholders stay in place.
        "only": in the training form (`add_generation_prompt=False`, `render_spans`) a user
        turn is reduced to its placeholders, the caption following directly
        (`preprocess_plain`); a prompt for generation keeps the user's text, placed as
        "start" does (`get_prompt`: "<image>\\nHi\\n").
    """

    name: str
    system: str
    system_format: str
    user_format: str
    assistant_format: str
    end_of_turn: str
    generation_prompt: str
    stop_strings: tuple[str, ...]
    empty_system: str | None = None
    turn_separator: str = ""
    system_in_first_user: bool = False
    media: Literal["start", "only"] = "start"

    def __post_init__(self):
        head, sep, tail = self.assistant_format.partition("{content}")
        if not sep or not tail.startswith(self.end_of_turn):
            raise ValueError(f"template {self.name}: end_of_turn must follow {{content}}")


_VICUNA_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {who}'s questions."
)
# SeparatorStyle.LLAMA_2: "[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] ..."
_LLAMA_2 = dict(
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    user_format="[INST] {content} [/INST]",
    assistant_format=" {content} </s>",
    end_of_turn=" </s>",
    generation_prompt="",
    stop_strings=("</s>",),
    system_in_first_user=True,
)
# SeparatorStyle.TWO with sep=" ", sep2="</s>".
_TWO = dict(
    system_format="{system} ",
    user_format="USER: {content} ",
    assistant_format="ASSISTANT: {content}</s>",
    end_of_turn="</s>",
    generation_prompt="ASSISTANT:",
    stop_strings=("</s>",),
    empty_system=" ",
)
_IM = dict(end_of_turn="<|im_end|>", generation_prompt="<|im_start|>assistant\n")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # PLAIN (stage-1 pretraining): "<image>{caption}\n", no EOS; caption + "\n" trained.
        # A prompt is every message followed by sep="\n" (the original's sep2 is None, so its
        # get_prompt cannot write a reply; we write it as the caption it was trained as).
        Template(
            name="plain",
            system="",
            system_format="{system}",
            user_format="{content}\n",
            assistant_format="{content}\n",
            end_of_turn="\n",
            generation_prompt="",
            stop_strings=("\n",),
            media="only",
        ),
        # SINGLE with sep="###".
        Template(
            name="llava_v0",
            system=_VICUNA_SYSTEM.format(who="human"),
            system_format="{system}###",
            user_format="Human: {content}###",
            assistant_format="Assistant: {content}###",
            end_of_turn="###",
            generation_prompt="Assistant:",
            stop_strings=("###",),
            empty_system="###",
        ),
        Template(name="vicuna_v1", system=_VICUNA_SYSTEM.format(who="user"), **_TWO),
        Template(name="llava_v1", system=_VICUNA_SYSTEM.format(who="human"), **_TWO),
        Template(
            name="llava_llama_2",
            system="You are a helpful language and vision assistant. You are able to understand "
            "the visual content that the user provides, and assist the user with a variety of "
            "tasks using natural language.",
            turn_separator="<s>",
            **_LLAMA_2,
        ),
        Template(name="mistral_instruct", system="", **_LLAMA_2),
        # MPT style: ChatML without newlines between turns (llava-v1.6-34b).
        Template(
            name="chatml_direct",
            system="Answer the questions.",
            system_format="<|im_start|>system\n{system}<|im_end|>",
            user_format="<|im_start|>user\n{content}<|im_end|>",
            assistant_format="<|im_start|>assistant\n{content}<|im_end|>",
            stop_strings=("<|im_end|>",),
            empty_system="<|im_end|>",  # conv.system holds "<|im_start|>system\n" itself
            **_IM,
        ),
        # CHATML style (OneVision).
        Template(
            name="qwen_1_5",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_format="<|im_start|>assistant\n{content}<|im_end|>\n",
            stop_strings=("<|im_end|>",),
            **_IM,
        ),
    )
}
ALIASES = {"v1": "vicuna_v1", "qwen_2": "qwen_1_5"}  # as in the originals' conv_templates


def template_names() -> list[str]:
    """Every name `get_template` takes, aliases included, sorted."""
    return sorted([*TEMPLATES, *ALIASES])


def get_template(name: str) -> Template:
    name = ALIASES.get(name, name)
    if name not in TEMPLATES:
        choices = ", ".join(template_names())
        raise PromptError(f"unknown template {name!r}; choose one of {choices}")
    return TEMPLATES[name]


# -- the original formats --------------------------------------------------------------------


def _check_messages(messages: Sequence[Message], alternate: bool) -> str | None:
    """Validates roles and content; returns the leading system message, if any."""
    system = None
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (0, 0)
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"message {i}: role {role!r} is not system, user or assistant")
        if role == "system":
            if i:
                raise PromptError(f"message {i}: a system message may only come first")
            system = content
        elif alternate:
            want = ("user", "assistant")[(i - (system is not None)) % 2]
            if role != want:
                raise PromptError(
                    f"message {i}: {role} where {want} was expected; turns must alternate "
                    "user, assistant, user, ..."
                )
        if not isinstance(content, str) and (alternate or not isinstance(content, list)):
            parts = "" if alternate else " or a list of HF content parts"
            raise PromptError(f"message {i}: content must be a string with placeholders{parts}")
    return system


def place_media(content: str) -> str:
    """A turn's single placeholder moved to its start, followed by "\\n" (`preprocess_multimodal`
    of both original repos); several placeholders stay where they are."""
    found = PLACEHOLDER.findall(content)
    if len(found) != 1:
        return content  # interleaved placeholders stay where they are (LLaVA-NeXT)
    rest = content.replace(found[0], "").strip()
    return (found[0] + "\n" + rest).strip()


def _template_spans(template: Template, messages: Sequence[Message], generation: bool) -> Spans:
    system = _check_messages(messages, alternate=True)
    turns = messages[1:] if system is not None else messages
    system = template.system if system is None else system
    if system:
        system_block = template.system_format.replace("{system}", system)
    else:
        system_block = template.empty_system or ""
    head, _, tail = template.assistant_format.partition("{content}")
    # A space that ends the reply's header goes with the reply: BPE and SentencePiece
    # vocabularies attach a space to the word after it ("ASSISTANT:", " A cat</s>").
    header = head.rstrip(" ")
    reply_lead, after_end = head[len(header) :], tail[len(template.end_of_turn) :]

    spans = [] if template.system_in_first_user else [(system_block, False)]
    for i, m in enumerate(turns):
        if m["role"] == "user" and template.media == "only" and not generation:
            # preprocess_plain: the instruction is reduced to its image, the caption follows.
            spans.append(("".join(PLACEHOLDER.findall(m["content"])), False))
            continue
        content = place_media(m["content"])
        if m["role"] == "user":
            if i == 0 and template.system_in_first_user:
                content = system_block + content
            separator = template.turn_separator if i else ""
            spans.append((separator + template.user_format.replace("{content}", content), False))
        else:
            spans += [(header, False), (reply_lead + content + template.end_of_turn, True)]
            spans.append((after_end, False))
    if generation:
        spans.append((template.generation_prompt, False))
    return spans


# -- the checkpoint's Jinja chat template ----------------------------------------------------

_READS_PARTS = re.compile(r"\bin\s+message(?:\[['\"]content['\"]\]|\.content)")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """An HF Jinja chat template, rendered exactly as transformers' `apply_chat_template`.

    Attributes:
      text: the Jinja source.
      source: the file it came from (for messages).
      special_tokens: (name, token) pairs the template may read, e.g. ("bos_token", "<s>").
    """

    text: str
    source: str = "<chat_template>"
    special_tokens: tuple[tuple[str, str], ...] = ()
    name = "chat_template"
    stop_strings: tuple[str, ...] = ()  # EOS ends the reply

    @property
    def content_parts(self) -> bool:
        """Whether the template iterates over typed content parts (HF's multimodal format)."""
        return bool(_READS_PARTS.search(self.text))


def to_hf_content(content: str) -> list[dict[str, str]]:
    """ "<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", "text": "What is this?"}].

    Text between placeholders is stripped: HF templates write their own "\\n" after an image.
    """
    parts = []
    for i, piece in enumerate(re.split(f"({IMAGE}|{VIDEO})", content)):
        if i % 2:
            parts.append({"type": piece[1:-1]})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _chat_template_spans(template: ChatTemplate, messages, generation: bool, trained: bool):
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    _check_messages(messages, alternate=False)
    if trained and not re.search(r"\{%-?\s*generation\s*-?%\}", template.text):
        raise PromptError(
            f"{template.source}: chat template marks no {{% generation %}} blocks, so the "
            "trained tokens are unknown; use a named template for training"
        )
    if template.content_parts:
        messages = [
            {**m, "content": to_hf_content(m["content"])} if isinstance(m["content"], str) else m
            for m in messages
        ]
    try:
        (text,), indices = render_jinja_template(
            conversations=[list(messages)],
            chat_template=template.text,
            add_generation_prompt=generation,
            return_assistant_tokens_mask=trained,
            **dict(template.special_tokens),
        )
    except TemplateError as e:
        raise PromptError(f"{template.source}: chat template failed: {e}") from None
    spans, last = [], 0
    for start, end in indices[0] if trained else ():
        spans += [(text[last:start], False), (text[start:end], True)]
        last = end
    return [*spans, (text[last:], False)]


# -- rendering ---------------------------------------------------------------------------------


def _merge(spans: Spans) -> Spans:
    merged: Spans = []
    for text, trained in spans:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _spans(template: Template | ChatTemplate, messages, generation: bool, trained: bool) -> Spans:
    if isinstance(template, ChatTemplate):
        return _chat_template_spans(template, messages, generation, trained)
    return _template_spans(template, messages, generation)


def render(
    template: Template | ChatTemplate,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of a conversation.

    Args:
      template: a named `Template` or the checkpoint's `ChatTemplate`.
      messages: `[{"role": ..., "content": str}]`, an optional system message first, then
        user and assistant turns alternating (named templates); `<image>` / `<video>` mark media.
      add_generation_prompt: end with what opens the assistant's reply.
    """
    return "".join(text for text, _ in _spans(template, messages, add_generation_prompt, False))


def render_spans(template: Template | ChatTemplate, messages: Sequence[Message]) -> Spans:
    """`render(template, messages, add_generation_prompt=False)` cut into (text, is_trained).

    Trained: each assistant reply with its end of turn (named templates), or the template's
    `{% generation %}` blocks (Jinja). Adjacent spans alike are merged, empty ones dropped.
    """
    return _merge(_spans(template, messages, generation=False, trained=True))


# -- finding a checkpoint's template ----------------------------------------------------------


def assets_dir(path: str | os.PathLike) -> Path:
    """A llava-jax model directory's `assets/`, or `path` itself (an HF or assets directory)."""
    path = Path(path)
    return path / "assets" if (path / "assets").is_dir() else path


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: not valid JSON ({e})") from None


def load_chat_template(path: str | os.PathLike) -> ChatTemplate | None:
    """The checkpoint's Jinja chat template, or None; looked up where transformers looks."""
    d = assets_dir(path)
    tokenizer_config = _json(d / "tokenizer_config.json")
    found = None
    for name, read in (
        ("processor_config.json", lambda p: _json(p).get("chat_template")),
        ("chat_template.json", lambda p: _json(p).get("chat_template")),
        ("chat_template.jinja", lambda p: p.read_text(encoding="utf-8") if p.is_file() else None),
        ("tokenizer_config.json", lambda p: tokenizer_config.get("chat_template")),
    ):
        text = read(d / name)
        if isinstance(text, list):  # [{"name": "default", "template": ...}, ...]
            text = next((t["template"] for t in text if t.get("name") == "default"), None)
        if isinstance(text, str) and text:
            found = ChatTemplate(text, source=str(d / name))
            break
    if found is None:
        return None
    special = {**_json(d / "special_tokens_map.json"), **tokenizer_config}
    tokens = tuple(
        (key, value["content"] if isinstance(value, dict) else value)
        for key, value in sorted(special.items())
        if key.endswith("_token") and isinstance(value, (str, dict))
    )
    return dataclasses.replace(found, special_tokens=tokens)


TRAINED_TEMPLATE_FILE = "llava_template.json"  # written by training into assets/


def resolve_template(name: str | None, model_dir: str | os.PathLike) -> Template | ChatTemplate:
    """A named template, or (name None) the checkpoint's own.

    The checkpoint's own is the template it was trained with when training recorded one
    (`assets/llava_template.json`), else its Jinja chat template.
    """
    if name is not None:
        return get_template(name)
    trained = _json(assets_dir(model_dir) / TRAINED_TEMPLATE_FILE).get("template")
    if isinstance(trained, str):
        return get_template(trained)
    template = load_chat_template(model_dir)
    if template is None:
        choices = ", ".join(template_names())
        raise PromptError(
            f"{assets_dir(model_dir)}: no chat template (chat_template.jinja, chat_template.json "
            f"or tokenizer_config.json); pass a template name, one of {choices}"
        )
    return template
