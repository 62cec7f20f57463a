"""A tiny SentencePiece-style BPE tokenizer, built in-process (nothing is downloaded).

For the tests and `llava-jax selfcheck`. It behaves like the LLaMA tokenizers where prompts
are concerned: a space is written `▁` and belongs to the token after it, a `▁` is prepended
to the start of the text only (so text right after a special token gets none, the case that
breaks naive segment-wise tokenization), BOS is added, and `<image>`, `<video>`,
`<|im_start|>`, `<|im_end|>` are special added tokens that never merge with text.

Ids fit the tiny models of `llava_jax.checks.tiny_hf`: 160 ids, `<image>` = 150, `<video>` = 151,
BOS = 1, EOS = 2 (the LlamaConfig defaults).

`build_tiny_bytelevel_tokenizer` is the other kind LLaVA models use, a byte-level BPE like
Qwen2's, with the same media and ChatML ids.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

VOCAB_SIZE = 160
IMAGE_TOKEN_ID = 150
VIDEO_TOKEN_ID = 151

_BASE = ("<unk>", "<s>", "</s>", "<pad>")
_ALPHABET = "▁\n" + string.ascii_letters + string.digits + string.punctuation
# Applied in this order (BPE rank); enough that words become a few tokens.
_MERGES = (
    "▁ t", "h e", "▁t he", "▁ a", "i n", "e r", "a n", "o n", "a t", "e s", "o r", "i s",
    "▁ i", "▁i s", "▁ w", "▁ c", "▁c at", "▁ W", "▁W h", "▁Wh at", "▁ A", "o u", "▁ s",
    "▁ y", "▁y ou", "▁ d", "▁ h", "▁ o", "▁ b", "e d", "in g", "▁ p", "r e", "▁a n",
    "▁an d", "U S", "E R", "US ER", "A S", "S I", "S T", "A N", "AN T", "AS SI", "ASSI ST",
    "ASSIST ANT", "< /", "s >",
)  # fmt: skip
_ADDED = {
    "<image>": IMAGE_TOKEN_ID,
    "<video>": VIDEO_TOKEN_ID,
    "<|im_start|>": 152,
    "<|im_end|>": 153,
}


def _vocab() -> dict[str, int]:
    tokens = list(_BASE) + list(_ALPHABET) + ["".join(m.split(" ")) for m in _MERGES]
    assert len(tokens) <= min(_ADDED.values()), "merges overflow into the added-token ids"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    for i in range(len(tokens), VOCAB_SIZE):  # dense ids: fill the gaps
        vocab.setdefault(f"<unused{i}>", i)
    for tok, i in _ADDED.items():
        del vocab[f"<unused{i}>"]
        vocab[tok] = i
    return vocab


def build_tiny_tokenizer(add_bos: bool = True, chat_template: str | None = None):
    """A `transformers.PreTrainedTokenizerFast` with the 160-id vocabulary above."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(
        models.BPE(vocab=_vocab(), merges=[tuple(m.split(" ")) for m in _MERGES], unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = [*_BASE, *_ADDED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


def save_tiny_tokenizer(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Writes the tokenizer files (as in an HF checkpoint) to `out_dir`; kwargs as above."""
    out = Path(out_dir)
    build_tiny_tokenizer(**kwargs).save_pretrained(out)
    return out


# -- a byte-level BPE tokenizer, as Qwen2's --------------------------------------------------

# Qwen2's pre-tokenizer split (Qwen/Qwen2-7B tokenizer.json): a space joins the word after it.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's byte-to-character map for the bytes used here: " " is "Ġ", "\n" is "Ċ".
_BYTE_ALPHABET = "ĠĊ" + "".join(chr(b) for b in range(33, 127))
_BYTE_MERGES = (
    "Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "a n", "a t", "i s", "Ġ i", "Ġi s", "Ġ c",
    "Ġc at", "Ġ W", "Ġ A", "U S", "E R", "US ER", "A S", "S I", "S T", "A N", "AN T",
    "AS SI", "ASSI ST", "ASSIST ANT", "< /", "s >", "Ċ Ċ", "y s", "ys t", "e m", "u s", "us er",
)  # fmt: skip


def build_tiny_bytelevel_tokenizer():
    """A byte-level BPE `PreTrainedTokenizerFast` like Qwen2's: no BOS, spaces are `Ġ` and
    belong to the word after them, "\\n" is `Ċ`; `<|endoftext|>` (id 0) is EOS and padding.

    The ids of `<image>`, `<video>`, `<|im_start|>`, `<|im_end|>` are those of
    `build_tiny_tokenizer`, so the tiny models take either. Only ASCII text is covered.
    """
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = ["<|endoftext|>", *_BYTE_ALPHABET, *("".join(m.split(" ")) for m in _BYTE_MERGES)]
    assert len(tokens) <= min(_ADDED.values()), "merges overflow into the added-token ids"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    for i in range(len(tokens), VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    for tok, i in _ADDED.items():
        del vocab[f"<unused{i}>"]
        vocab[tok] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in _BYTE_MERGES]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *_ADDED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
