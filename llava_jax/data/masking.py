"""Label masks as the original LLaVA training code computes them: the "reference" masking mode.

The clean mode (`templates.render_spans` + `prompt.tokenize_spans`) trains each assistant reply
and its end-of-turn token. This module reproduces what the original repositories train
instead (haotian-liu/LLaVA and
LLaVA-VL/LLaVA-NeXT `llava/train/train.py`), for parity runs, on the same token ids:

- `plain` (haotian-liu/LLaVA `train.py::preprocess_plain`): everything after
  `tokenizer("<image>")` is trained, i.e. the caption and its "\\n"; BOS and image ignored.
  The record must be exactly one human turn holding `<image>` and one gpt caption (the
  original asserts both).
- `vicuna_v1` / `llava_v1` (`preprocess_v1`): the prompt is cut into rounds at `</s>` and
  each round at " ASSISTANT: "; lengths come from tokenizing each piece on its own, with the
  `-2` (BOS and the trailing "▁") and, for rounds after the first, the `-1` correction of
  non-legacy tokenizers (`tokenizer.legacy`, False when the tokenizer has no such attribute,
  as for transformers' v5 `LlamaTokenizer` default). When the round lengths do not add up to
  the sample's length the original masks the whole sample and prints `WARNING: tokenization
  mismatch`; here that raises `SkipSample("no_supervised_tokens", ...)`, so it is counted.
- `qwen_1_5` (LLaVA-NeXT `preprocess_qwen`): each message is tokenized on its own; the
  whole assistant message is trained, `<|im_start|>assistant\\n` and the trailing "\\n"
  included, and the ids of "\\n" (198 in Qwen's vocabulary), `<|im_start|>` and
  `<|im_end|>` are trained everywhere, system and user turns included.

Lengths are measured with the tokenizer's own handling of the media token (an added token,
one id per placeholder), as transformers' processors tokenize, rather than the original's
`tokenizer_image_token`, which tokenizes the text after an image on its own and so adds a
"▁" there on SentencePiece tokenizers: the ids stay those of the clean mode, only the mask
differs. Other departures: a leading system turn keeps its text in the ids (preprocess_qwen
would replace it by the default system message), and image positions are never trained (the
original gives them IGNORE_INDEX when it splices the features in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from llava_jax.data import templates
from llava_jax.data.schema import SkipSample
from llava_jax.data.templates import PLACEHOLDER, Template

# Template name -> the original preprocessing function whose masks we reproduce.
REFERENCE_STYLES = {"plain": "plain", "vicuna_v1": "v1", "llava_v1": "v1", "qwen_1_5": "qwen"}


def reference_style(template: object) -> str:
    """The original preprocessing ("plain", "v1", "qwen") of `template`; else ValueError."""
    name = getattr(template, "name", None)
    if not isinstance(template, Template) or name not in REFERENCE_STYLES:
        raise ValueError(
            f"reference masking reproduces the original code for the templates "
            f"{', '.join(REFERENCE_STYLES)}; template {name!r} has no original to reproduce, "
            "use masking='clean'"
        )
    return REFERENCE_STYLES[name]


def reference_mask(
    template: Template,
    messages: Sequence[Mapping[str, str]],
    ids: np.ndarray,
    tokenizer,
    media_tokens: Mapping[str, str],
) -> np.ndarray:
    """The original code's trained mask over `ids`.

    Args:
      template: a template of `REFERENCE_STYLES`.
      messages: the conversation `[{"role", "content"}]` that `ids` encode (an optional system
        message first, then user and assistant alternating).
      ids: int[N], the conversation's token ids with one id per media placeholder (before
        expansion to the media's token count), as `prompt.tokenize_spans` makes them.
      tokenizer: the HF tokenizer that made `ids`.
      media_tokens: {"image": "<image>", "video": "<video>"}: the token string that stands
        for each placeholder kind in the tokenizer's vocabulary.

    Returns:
      bool[N], True where the original trains the token.

    Raises:
      SkipSample: `no_supervised_tokens` where the original masks the whole sample
        (tokenization mismatch), `malformed_record` where it fails an assertion (plain).
    """
    style = reference_style(template)
    ids = np.asarray(ids)

    def with_tokens(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: media_tokens[m.group()[1:-1]], text)

    if style == "plain":
        return _plain(messages, ids, tokenizer, with_tokens)
    if style == "v1":
        text = with_tokens(templates.render(template, messages, add_generation_prompt=False))
        return _v1(template, text, ids, tokenizer)
    return _qwen(template, messages, ids, tokenizer, with_tokens)


def _plain(messages, ids, tokenizer, with_tokens) -> np.ndarray:
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] or templates.IMAGE not in messages[0]["content"]:
        raise SkipSample(
            "malformed_record",
            "the plain format takes one human turn holding <image> and one gpt caption",
        )
    # preprocess_plain: the instruction is reduced to "<image>"; tokenizer("<image>") -> BOS
    # and the image are ignored, the caption and its "\n" trained.
    ignored = len(tokenizer(with_tokens(templates.IMAGE)).input_ids)
    trained = np.ones(len(ids), bool)
    trained[:ignored] = False
    return trained


def _v1(template: Template, conversation: str, ids, tokenizer) -> np.ndarray:
    # conv.sep + conv.roles[1] + ": " and conv.sep2 of SeparatorStyle.TWO, read off the template.
    user_tail = template.user_format.split("{content}")[1]
    sep = user_tail + template.assistant_format.split("{content}")[0]
    sep2 = template.end_of_turn
    legacy = getattr(tokenizer, "legacy", False)

    def length(text: str) -> int:
        return len(tokenizer(text).input_ids)

    trained = np.ones(len(ids), bool)
    total_len = int(np.sum(ids != tokenizer.pad_token_id))
    rounds = conversation.split(sep2)
    cur_len = 1
    trained[:cur_len] = False
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = length(rou)
        instruction_len = length(parts[0]) - 2
        if i != 0 and not legacy:
            round_len -= 1
            instruction_len -= 1
        # Python slice semantics, as the original's torch slicing (negative ends wrap).
        trained[cur_len : cur_len + instruction_len] = False
        cur_len += round_len
    trained[cur_len:] = False
    if cur_len != total_len:
        raise SkipSample(
            "no_supervised_tokens",
            f"tokenization mismatch: {cur_len} vs. {total_len}. #turn = {len(rounds)}. "
            "(the original masks the whole sample)",
        )
    return trained


def _message_texts(template: Template, messages) -> list[tuple[str, str]]:
    """(role, text) of the system block and of each message, cut from prefix renders."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    prefixes = [
        templates.render(template, messages[:k], add_generation_prompt=False)
        for k in range(head, len(messages) + 1)
    ]
    pieces = [("system", prefixes[0])]
    for m, before, after in zip(messages[head:], prefixes[:-1], prefixes[1:], strict=True):
        if not after.startswith(before):
            raise RuntimeError(f"template {template.name}: a render is not a prefix of the next")
        pieces.append((m["role"], after[len(before) :]))
    return pieces


def _qwen(template: Template, messages, ids, tokenizer, with_tokens) -> np.ndarray:
    # Special tokens the tokenizer adds to any text (a BOS; Qwen adds none) lead the ids.
    prefix = len(tokenizer("").input_ids)
    trained = np.zeros(len(ids), bool)
    cur_len = prefix
    for role, text in _message_texts(template, messages):
        n = len(tokenizer(with_tokens(text), add_special_tokens=False).input_ids)
        trained[cur_len : cur_len + n] = role == "assistant"
        cur_len += n
    if cur_len != len(ids):
        raise SkipSample(
            "no_supervised_tokens",
            f"tokenization mismatch: the messages tokenized one by one give {cur_len} tokens, "
            f"the conversation {len(ids)}",
        )
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]  # 198 for Qwen2
    vocab = tokenizer.get_vocab()
    unmasked = [newline, *(vocab[t] for t in ("<|im_start|>", "<|im_end|>") if t in vocab)]
    trained |= (np.arange(len(ids)) >= prefix) & np.isin(ids, unmasked)
    return trained
