"""Prompt text -> token ids, each `<image>` / `<video>` expanded to the model's token count.

The ids are those of transformers' processors (`LlavaProcessor`, `LlavaNextProcessor`,
`LlavaOnevisionProcessor`): they repeat the image token's string N times and tokenize the
whole text. The image token is an added token, which the tokenizer splits off before anything
else, so it never merges with the text around it, and text after it is tokenized as it is in
the full prompt (no SentencePiece prefix space). We tokenize with one token per placeholder
and repeat its id N times: the same ids, without tokenizing thousands of copies.

Everything is checked on the host, because a JAX gather clamps a bad index silently:
placeholders against media (number, kind and order) before tokenizing, and the image and
video ids the tokenizer produced against the placeholders after.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from llava_jax.config import Convention, LlavaConfig
from llava_jax.data.templates import PLACEHOLDER, PromptError, assets_dir
from llava_jax.errors import CheckpointError
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media, MediaLayout

__all__ = [
    "PromptError",
    "expand_media",
    "load_tokenizer",
    "media_token_counts",
    "media_tokens",
    "stop_token_ids",
    "tokenize_prompt",
    "tokenize_spans",
]


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer of a llava-jax model dir (its `assets/`) or an HF dir; no network."""
    import transformers

    d = assets_dir(path)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{d}: no tokenizer files (tokenizer.json or tokenizer.model)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{d}: cannot load the tokenizer ({first})") from None


def media_token_counts(
    cfg: LlavaConfig, media: Sequence[Media], layouts: Sequence[MediaLayout] | None = None
) -> list[int]:
    """How many image / video tokens each media item fills, in the order given.

    Each item's length in the feature plan (`feature_plan.media_layouts`, or `layouts` when
    the caller has them), so the text always has the positions the model fills (for
    OneVision, a sample with several images is multi-image: one view each).
    """
    return [layout.num_tokens for layout in feature_plan.given_layouts(cfg, media, layouts)]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _check_media(text: str, media: Sequence[Media], cfg: LlavaConfig) -> list[str]:
    """Placeholders of `text` against `media`: same number of each kind, same order."""
    found = [p[1:-1] for p in PLACEHOLDER.findall(text)]
    given = [m.kind for m in media]
    for kind in ("image", "video"):
        n_text, n_given = found.count(kind), given.count(kind)
        if n_text != n_given:
            raise PromptError(
                f"prompt has {_plural(n_text, f'<{kind}> placeholder')} but "
                f"{_plural(n_given, kind)} {'was' if n_given == 1 else 'were'} given"
            )
    for i, (want, got) in enumerate(zip(found, given, strict=True)):
        if want != got:
            raise PromptError(
                f"placeholder {i + 1} is <{want}> but media item {i + 1} is "
                f"{'an image' if got == 'image' else 'a video'}; "
                "give media in the order of their placeholders"
            )
    if "video" in given and cfg.video_token_id is None:
        raise PromptError(f"{cfg.family} models take no video")
    return found


def media_tokens(tokenizer, cfg: LlavaConfig) -> dict[str, tuple[str, int]]:
    """{"image": (token string, id), ...}; each must be an added token of the tokenizer."""
    added = tokenizer.get_added_vocab()
    tokens = {}
    for kind, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        if token_id is None:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if added.get(token) != token_id:
            raise PromptError(
                f"the tokenizer has no added token with the model's {kind}_token_id {token_id} "
                f"(id {token_id} is {token!r}); the tokenizer does not belong to this model"
            )
        tokens[kind] = (token, token_id)
    return tokens


def _expand(ids, found, counts, tokens, trained=None):
    """Repeats each media id to its count; checks the tokenizer produced exactly `found`."""
    ids = np.asarray(ids, np.int64)
    by_id = {token_id: kind for kind, (_, token_id) in tokens.items()}
    at = np.flatnonzero(np.isin(ids, list(by_id)))
    kinds = [by_id[int(i)] for i in ids[at]]
    if kinds != found:
        extra = {k: kinds.count(k) - found.count(k) for k in tokens}
        kind = max(extra, key=lambda k: abs(extra[k]))
        raise PromptError(
            f"the text holds {kinds.count(kind)} {tokens[kind][0]!r} tokens for "
            f"{_plural(found.count(kind), f'<{kind}> placeholder')}; the token string may not "
            "appear in the text outside placeholders"
        )
    repeats = np.ones(len(ids), np.int64)
    repeats[at] = counts
    out = np.repeat(ids, repeats).astype(np.int32)
    if trained is None:
        return out
    trained = np.asarray(trained, bool).copy()
    trained[at] = False  # media features are inputs, never labels
    return out, np.repeat(trained, repeats)


def expand_media(
    tokenizer,
    ids,
    trained,
    media: Sequence[Media],
    cfg: LlavaConfig,
    layouts: Sequence[MediaLayout] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ids with one media id per placeholder -> each repeated to its media item's token count.

    For ids made otherwise than by `tokenize_spans` (the original code's, `masking.py`).

    Args:
      tokenizer: the model's HF tokenizer.
      ids: int[N], one image / video id per placeholder, in the order of `media`.
      trained: bool[N], the label mask over `ids`.
      media: the media items, in the order of their placeholders.
      cfg: the model config (token ids, feature layout).
      layouts: `feature_plan.media_layouts(cfg, media)` when the caller has them.

    Returns:
      (int32[L] ids, bool[L] trained); media tokens are never trained.
    """
    kinds = [m.kind for m in media]
    counts = media_token_counts(cfg, media, layouts)
    return _expand(ids, kinds, counts, media_tokens(tokenizer, cfg), trained)


def _one_token_each(text: str, tokens) -> str:
    return PLACEHOLDER.sub(lambda m: tokens[m.group()[1:-1]][0], text)


def _prepare(tokenizer, text: str, media: Sequence[Media], cfg: LlavaConfig, layouts=None):
    found = _check_media(text, media, cfg)
    counts = media_token_counts(cfg, media, layouts)
    return found, counts, media_tokens(tokenizer, cfg)


def _adds_bos(tokenizer, text: str, add_special_tokens: bool | None) -> bool:
    # As transformers' processors: special tokens are added unless the text brings its own BOS.
    if add_special_tokens is not None:
        return add_special_tokens
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def tokenize_prompt(
    tokenizer,
    text: str,
    media: Sequence[Media],
    cfg: LlavaConfig,
    add_special_tokens: bool | None = None,
    layouts: Sequence[MediaLayout] | None = None,
) -> np.ndarray:
    """Token ids of a prompt, each placeholder expanded to its media item's token count.

    Args:
      tokenizer: the model's HF tokenizer (`load_tokenizer`).
      text: a rendered template, or raw text; `<image>` / `<video>` mark the media.
      media: the media items, in the order of their placeholders.
      cfg: the model config (token ids, feature layout).
      add_special_tokens: default: as the processors do (BOS unless the text starts with it);
        ignored for `Convention.ORIGINAL` models, which take `tokenizer_image_token`'s ids.
      layouts: `feature_plan.media_layouts(cfg, media)` when the caller has them.

    Returns:
      int32[L] ids with `media_token_counts(cfg, media)` image/video ids per placeholder.
    """
    found, counts, tokens = _prepare(tokenizer, text, media, cfg, layouts)
    if cfg.convention == Convention.ORIGINAL:
        # Models of the original repositories were trained, and are run there, on the ids of
        # `tokenizer_image_token`; imported here since masking builds on this module.
        from llava_jax.data.masking import tokenizer_image_token

        ids = tokenizer_image_token(text, tokenizer, tokens)
    else:
        add = _adds_bos(tokenizer, text, add_special_tokens)
        ids = tokenizer.encode(_one_token_each(text, tokens), add_special_tokens=add)
    return _expand(ids, found, counts, tokens)


def _encode_piece(tokenizer, text: str, newline_ids: list[int]) -> list[int]:
    # A piece from the middle of a prompt, encoded after a newline so that SentencePiece adds
    # no prefix space, then the newline removed (transformers' `_encode_chat_piece`).
    ids = tokenizer.encode("\n" + text, add_special_tokens=False)
    if ids[: len(newline_ids)] == newline_ids:
        return ids[len(newline_ids) :]
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize_spans(
    tokenizer,
    spans: Sequence[tuple[str, bool]],
    media: Sequence[Media],
    cfg: LlavaConfig,
    layouts: Sequence[MediaLayout] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and label mask of a conversation from `templates.render_spans`.

    Each span is tokenized on its own and the ids concatenated, so the mask can never be off
    by a token (the originals' "tokenization mismatch"). For the tokenizers LLaVA uses this
    gives the ids of `tokenize_prompt` on the joined text, since spans are cut where tokens
    start. `layouts`: `feature_plan.media_layouts(cfg, media)` when the caller has them.

    Returns:
      (int32[L] ids, bool[L] trained); media tokens and BOS are never trained.
    """
    text = "".join(t for t, _ in spans)
    found, counts, tokens = _prepare(tokenizer, text, media, cfg, layouts)
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    ids, trained = [], []
    for i, (piece, is_trained) in enumerate(spans):
        piece = _one_token_each(piece, tokens)
        if i == 0:
            add = _adds_bos(tokenizer, piece, None)
            piece_ids = tokenizer.encode(piece, add_special_tokens=add)
        else:
            piece_ids = _encode_piece(tokenizer, piece, newline_ids)
        ids += piece_ids
        trained += [is_trained] * len(piece_ids)
    if trained and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        trained[0] = False
    return _expand(ids, found, counts, tokens, trained)


def stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> tuple[int, ...]:
    """Ids of the stop strings that are single added tokens (`</s>`, `<|im_end|>`).

    Other stop strings ("###", "\\n") span several tokens and are matched on the text.
    """
    added = tokenizer.get_added_vocab()
    return tuple(added[s] for s in stop_strings if s in added)
