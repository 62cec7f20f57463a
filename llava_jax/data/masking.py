"""Input ids and labels as the original LLaVA training code makes them: "reference" masking.

The clean mode (`templates.render_spans` + `prompt.tokenize_spans`) tokenizes the prompt as
transformers' processors do and trains each assistant reply and its end of turn. This module
reproduces, token for token, the ids and labels of the original repositories instead, for
parity runs:

- `tokenizer_image_token` (haotian-liu/LLaVA `llava/mm_utils.py`, the same in LLaVA-NeXT),
  used by all but `qwen_1_5`: the text between placeholders is tokenized chunk by chunk, each
  chunk with the tokenizer's special tokens and all BOS but the first dropped. A
  SentencePiece tokenizer starts each chunk with a "▁" (a "▁" token before the "\\n" after
  `<image>`, "▁A" for a caption's "A"), which tokenizing the whole prompt does not give.
- `plain` (haotian-liu/LLaVA `llava/train/train.py::preprocess_plain`): "<image>" + caption
  + "\\n"; everything after `tokenizer_image_token("<image>")` is trained. The record must be
  one human turn holding one placeholder and one gpt caption (the original asserts the
  placeholder and the two turns, and keeps a single `<image>` whatever the turn held).
- `vicuna_v1` / `llava_v1` (`preprocess_v1`): the prompt is cut into rounds at `</s>` and
  each round at " ASSISTANT: "; lengths come from tokenizing each piece on its own, with the
  `-2` (BOS and the trailing "▁") and, for rounds after the first, the `-1` correction of
  non-legacy tokenizers (`tokenizer.legacy`, False when the tokenizer has no such attribute,
  as for transformers' v5 `LlamaTokenizer` default). When the round lengths do not add up to
  the sample's length, and stay under `model_max_length`, the original masks the whole sample
  and prints `WARNING: tokenization mismatch`; that raises `SkipSample("no_supervised_tokens")`.
- `llava_llama_2` / `mistral_instruct` (`preprocess_llama_2`): the same with rounds cut at
  "[/INST] " and no correction for later rounds.
- `chatml_direct` (`preprocess_mpt`): rounds cut at `<|im_end|>` (the system, the first user
  turn and its reply make the first), each instruction at `<|im_end|><|im_start|>assistant\\n`,
  a `-1` for the trailing "▁" (no BOS counted) and `+1` for later rounds of legacy tokenizers.
- `qwen_1_5` (LLaVA-VL/LLaVA-NeXT `llava/train/train.py::preprocess_qwen`): the system
  message and then each message go through the chat template
  "<|im_start|>{role}\\n{content}<|im_end|>\\n" and are tokenized one by one, with no special
  tokens (no BOS, whatever the tokenizer); the whole assistant message is trained,
  `<|im_start|>assistant\\n` and the trailing "\\n" included, and the ids of "\\n" (198, Qwen2's,
  hard-coded there; the tokenizer's own here), `<|im_start|>` and `<|im_end|>` everywhere.

Then, as `prepare_inputs_labels_for_multimodal` (`llava/model/llava_arch.py` of both repos):
each placeholder becomes its media's tokens, never trained, and the sample is cut at
`model_max_length` (our `max_len`), training on what is left. The collator's earlier cut of
the unexpanded ids (`DataCollatorForSupervisedDataset`) removes nothing the later one keeps.

Departures, where the original cannot be followed:
- A cut that reaches media tokens is refused (`too_long`): the original trains on part of an
  image's features (or, when the collator cut the placeholder itself, hands the image to the
  next sample); llava-jax places whole media only.
- A leading system turn replaces the default system message: the originals cannot read one
  (`roles["system"]` is a KeyError in each `preprocess_*`).
- A sample with no trained token (a mismatch, or a cut before the first reply) is skipped and
  counted instead of contributing a zero loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.data import templates
from llava_jax.data.prompt import expand_media, media_tokens
from llava_jax.data.schema import SkipSample
from llava_jax.data.templates import PLACEHOLDER, Template
from llava_jax.media.feature_plan import Media, MediaLayout

# Template name -> the original preprocessing function whose ids and labels we reproduce.
REFERENCE_STYLES = {
    "plain": "plain",
    "vicuna_v1": "v1",
    "llava_v1": "v1",
    "llava_llama_2": "llama_2",
    "mistral_instruct": "llama_2",
    "chatml_direct": "mpt",
    "qwen_1_5": "qwen",
}

MediaTokens = Mapping[str, tuple[str, int]]  # {"image": ("<image>", id), ...}


def reference_style(template: object) -> str:
    """The original preprocessing ("plain", "v1", "llama_2", "mpt", "qwen") of `template`;
    else ValueError."""
    name = getattr(template, "name", None)
    if not isinstance(template, Template) or name not in REFERENCE_STYLES:
        raise ValueError(
            f"reference masking reproduces the original code for the templates "
            f"{', '.join(REFERENCE_STYLES)}; template {name!r} has no original to reproduce, "
            "use masking='clean'"
        )
    return REFERENCE_STYLES[name]


def reference_tokenize(
    template: Template,
    messages: Sequence[Mapping[str, str]],
    tokenizer,
    media: Sequence[Media],
    cfg: LlavaConfig,
    max_len: int,
    layouts: Sequence[MediaLayout] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The original code's input ids and trained mask of a conversation.

    Args:
      template: a template of `REFERENCE_STYLES`.
      messages: `[{"role", "content"}]`, an optional system message first, then user and
        assistant alternating; `<image>` / `<video>` mark the media.
      tokenizer: the model's HF tokenizer.
      media: the media items, in the order of their placeholders.
      cfg: the model config (token ids, feature layout).
      max_len: the original's `model_max_length`.
      layouts: `feature_plan.media_layouts(cfg, media)` when the caller has them.

    Returns:
      (int32[L] ids, bool[L] trained), L <= max_len; labels are `where(trained, ids, -100)`.

    Raises:
      SkipSample: `no_supervised_tokens` where the original masks the whole sample
        (tokenization mismatch), `malformed_record` where it fails an assertion (plain),
        `too_long` where its cut at `max_len` reaches media tokens.
      PromptError: the text holds a media token's string outside placeholders.
    """
    style = reference_style(template)
    tokens = media_tokens(tokenizer, cfg)
    if style == "plain":
        ids, trained = _plain(template, messages, tokenizer, tokens)
    elif style == "qwen":
        ids, trained = _qwen(template, messages, tokenizer, tokens)
    else:
        ids, trained = _by_rounds(style, template, messages, tokenizer, tokens, max_len)
    ids, trained = expand_media(tokenizer, ids, trained, media, cfg, layouts)
    if len(ids) <= max_len:
        return ids, trained
    media_ids = [token_id for _, token_id in tokens.values()]
    if np.isin(ids[max_len:], media_ids).any():
        raise SkipSample(
            "too_long",
            f"{len(ids)} tokens > max_len {max_len}, and the original's cut there would cut "
            "media tokens (llava-jax never cuts media)",
        )
    return ids[:max_len], trained[:max_len]


def tokenizer_image_token(text: str, tokenizer, tokens: MediaTokens) -> list[int]:
    """`llava/mm_utils.py::tokenizer_image_token`: one media id per placeholder, the text
    between them tokenized chunk by chunk, the first chunk's BOS kept and the others' dropped."""
    chunks = [tokenizer(chunk).input_ids for chunk in PLACEHOLDER.split(text)]
    offset = int(bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id)
    ids = list(chunks[0])
    for placeholder, chunk in zip(PLACEHOLDER.findall(text), chunks[1:], strict=True):
        ids += [tokens[placeholder[1:-1]][1], *chunk[offset:]]
    return ids


def _plain(template: Template, messages, tokenizer, tokens: MediaTokens):
    roles = [m["role"] for m in messages]
    found = PLACEHOLDER.findall(messages[0]["content"]) if messages else []
    if roles != ["user", "assistant"] or len(found) != 1:
        raise SkipSample(
            "malformed_record",
            "the plain format takes one human turn holding one placeholder and one gpt caption",
        )
    # preprocess_plain: the instruction is reduced to its image; the caption and "\n" follow.
    text = templates.render(template, messages, add_generation_prompt=False)
    ids = tokenizer_image_token(text, tokenizer, tokens)
    trained = np.ones(len(ids), bool)
    trained[: len(tokenizer_image_token(found[0], tokenizer, tokens))] = False
    return ids, trained


def _rounds(style: str, template: Template, conversation: str) -> tuple[list[str], str]:
    """The rounds the original cuts the prompt into, and what ends each round's instruction."""
    if style == "v1":  # conv.sep2, and conv.sep + conv.roles[1] + ": "
        user_tail = template.user_format.split("{content}")[1]
        return conversation.split("</s>"), user_tail + "ASSISTANT: "
    if style == "llama_2":
        return conversation.split("</s>"), "[/INST] "
    # mpt: cut at conv.sep; the system, the first user turn and its reply make one round.
    sep = "<|im_end|>"
    pieces = conversation.split(sep)
    rounds = [sep.join(pieces[:3])]
    rounds += [sep.join(pieces[k : k + 2]) for k in range(3, len(pieces), 2)]
    return rounds, sep + "<|im_start|>assistant\n"


def _by_rounds(
    style: str, template: Template, messages, tokenizer, tokens: MediaTokens, max_len: int
):
    """preprocess_v1, preprocess_llama_2 and preprocess_mpt: the prompt tokenized whole, the
    mask from the lengths of its rounds and their instructions tokenized on their own."""
    conversation = templates.render(template, messages, add_generation_prompt=False)
    ids = np.asarray(tokenizer_image_token(conversation, tokenizer, tokens), np.int64)
    legacy = getattr(tokenizer, "legacy", False)

    def length(text: str) -> int:
        return len(tokenizer_image_token(text, tokenizer, tokens))

    # The originals' offsets: BOS (not for mpt) and the "▁" that ends an instruction alone,
    # and a per-round correction for tokenizers that do (v1) or do not (mpt) add a "▁".
    cur_len, offset = (0, 1) if style == "mpt" else (1, 2)
    correction = {"v1": 0 if legacy else -1, "llama_2": 0, "mpt": 1 if legacy else 0}[style]
    trained = np.ones(len(ids), bool)
    total_len = int(np.sum(ids != tokenizer.pad_token_id))
    rounds, sep = _rounds(style, template, conversation)
    trained[:cur_len] = False
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = length(rou)
        instruction_len = length(parts[0]) - offset
        if i != 0:
            round_len += correction
            instruction_len += correction
        # Python slice semantics, as the original's torch slicing (negative ends wrap).
        trained[cur_len : cur_len + instruction_len] = False
        cur_len += round_len
    trained[cur_len:] = False
    if cur_len < max_len and cur_len != total_len:
        raise SkipSample(
            "no_supervised_tokens",
            f"tokenization mismatch: {cur_len} vs. {total_len}. #turn = {len(rounds)}. "
            "(the original masks the whole sample)",
        )
    return ids, trained


def _qwen(template: Template, messages, tokenizer, tokens: MediaTokens):
    head = int(messages[0]["role"] == "system")
    system = messages[0]["content"] if head else template.system
    # preprocess_qwen's chat template is the template's turn formats; the system block is
    # written even when empty.
    texts = [("system", template.system_format.replace("{system}", system))]
    for m in messages[head:]:
        turn = template.user_format if m["role"] == "user" else template.assistant_format
        texts.append((m["role"], turn.replace("{content}", templates.place_media(m["content"]))))
    ids, trained = [], []
    for role, text in texts:
        text = PLACEHOLDER.sub(lambda p: tokens[p.group()[1:-1]][0], text)
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        trained += [role == "assistant"] * len(piece)
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]  # 198 for Qwen2
    vocab = tokenizer.get_vocab()
    unmasked = [newline, *(vocab[t] for t in ("<|im_start|>", "<|im_end|>") if t in vocab)]
    ids = np.asarray(ids, np.int64)
    return ids, np.asarray(trained, bool) | np.isin(ids, unmasked)
