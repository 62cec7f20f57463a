"""What converting or loading an original-repository checkpoint refuses, in one line and
without writing anything: a missing tower or conversation mode, original-only flags on an HF
directory, loading unconverted, pickles without --allow-pickle, training with the clean
masking; and the `<image>` / `<video>` tokens the original tokenizers lack, added.
"""

from __future__ import annotations

import json
import shutil

import hf_tiny
from convert_original_helpers import one_line_error, write_original

from llava_jax.config import Convention, Family
from llava_jax.conversion.hf_config import ConfigError
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.original_to_jax import add_media_tokens
from llava_jax.errors import CheckpointError
from llava_jax.inference.pipeline import Pipeline

# -- refusals ---------------------------------------------------------------------------------


def test_llava15_without_its_tower_asks_for_vision(converted, tmp_path):
    c = converted("llava15")
    src = tmp_path / "orig"
    shutil.copytree(c.src, src)
    raw = json.loads((src / "config.json").read_text())
    # A known tower needs no --vision for its config, only for its weights.
    raw.update(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    (src / "config.json").write_text(json.dumps(raw))
    message = one_line_error(CheckpointError, "pass --vision DIR with openai/clip-vit-large",
                             convert_hf_to_jax, src, tmp_path / "out",
                             conv_mode="vicuna_v1")  # fmt: skip
    assert "holds no vision tower" in message
    assert not (tmp_path / "out").exists()


def test_conv_mode_is_needed_without_a_chat_template(converted, tmp_path):
    c = converted("llava15")
    one_line_error(CheckpointError, "--conv-mode", convert_hf_to_jax, c.src, tmp_path / "out",
                   vision_dir=c.vision)  # fmt: skip
    one_line_error(ValueError, "nope", convert_hf_to_jax, c.src, tmp_path / "out",
                   vision_dir=c.vision, conv_mode="nope")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_hf_directory_refuses_original_only_flags(converted, tmp_path):
    c = converted("llava15")
    one_line_error(CheckpointError, "--vision is for checkpoints of the original",
                   convert_hf_to_jax, c.hf_jax.parent / "hf", tmp_path / "out",
                   vision_dir=c.vision)  # fmt: skip


def test_in_memory_load_says_to_convert(converted):
    c = converted("llava15")
    one_line_error(ConfigError, "convert it once with `llava-jax convert hf-to-jax`",
                   Pipeline.load, c.src, echo=lambda _: None)  # fmt: skip


def test_pickled_bin_needs_allow_pickle(tmp_path):
    model = hf_tiny.llava_next()
    src, vision = write_original(model, "LlavaLlamaForCausalLM", tmp_path, pickle=True)
    one_line_error(CheckpointError, "--allow-pickle", convert_hf_to_jax, src, tmp_path / "no",
                   vision_dir=vision, conv_mode="vicuna_v1")  # fmt: skip
    assert not (tmp_path / "no").exists()
    cfg = convert_hf_to_jax(src, tmp_path / "jax", allow_pickle=True, vision_dir=vision,
                            conv_mode="vicuna_v1")  # fmt: skip
    assert cfg.convention == Convention.ORIGINAL and cfg.family == Family.LLAVA_NEXT


def test_missing_image_token_is_added_after_the_vocabulary(tmp_path):
    """The original tokenizers have no <image> (the code splices -200 into the ids)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("abc")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert add_media_tokens(tokenizer, Family.LLAVA_ONEVISION) == (6, 7)
    assert tokenizer.convert_ids_to_tokens([6, 7]) == ["<image>", "<video>"]
    assert add_media_tokens(tokenizer, Family.LLAVA) == (6, None)  # found, not added twice


def test_training_needs_the_original_prompt_ids(converted):
    """Clean masking would train a converted original model on ids it is never run with."""
    from llava_jax.data.transforms import SampleTransform

    c = converted("llava15")
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    args = (pipe.cfg, pipe.image_config, pipe.tokenizer, "vicuna_v1")
    one_line_error(ValueError, "train it with masking='reference'", SampleTransform, *args,
                   max_len=64, max_views=1)  # fmt: skip
    SampleTransform(*args, max_len=64, max_views=1, masking="reference")
