"""Original-repository checkpoints convert like the HF route: the same parameters, the same
config but for the original conventions, the same generated tokens (with the original's
`tokenizer_image_token` ids), a SigLIP tower taken from --vision, `<image>` past the
vocabulary, and the `convert` CLI both ways.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from convert_helpers import original_spelling
from convert_original_helpers import CASES
from PIL import Image

from llava_jax.cli.main import main
from llava_jax.config import Convention
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.source import load_model
from llava_jax.conversion.tensor_io import CheckpointWriter
from llava_jax.data import templates
from llava_jax.data.masking import tokenizer_image_token
from llava_jax.data.prompt import media_tokens
from llava_jax.inference.generator import Generator, SamplingConfig
from llava_jax.inference.pipeline import Pipeline
from llava_jax.media.feature_plan import Media, num_tokens
from llava_jax.model_io import load_params

# -- conversion and generation ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_same_parameters_as_the_hf_route(converted, name):
    c = converted(name)
    got, want = load_params(c.jax), load_params(c.hf_jax)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.asarray(got[path]).tobytes() == np.asarray(want[path]).tobytes(), path


@pytest.mark.parametrize("name", list(CASES))
def test_config_keeps_the_original_conventions(converted, name):
    c = converted(name)
    orig, hf = load_model(c.jax).cfg, load_model(c.hf_jax).cfg
    assert orig.convention == Convention.ORIGINAL and hf.convention == Convention.TRANSFORMERS
    # Everything else that shapes the network or the token layout agrees with the HF route.
    fields = ("family", "vision", "text", "projector", "vision_feature_layer",
              "vision_feature_select_strategy", "image_token_id", "video_token_id")  # fmt: skip
    for field in fields:
        assert getattr(orig, field) == getattr(hf, field), field
    if hf.image_grid_pinpoints is not None:  # the "(1x1),...,(6x6)" grid lists (w, h) first
        assert set(orig.image_grid_pinpoints) == set(hf.image_grid_pinpoints)
    assets = c.jax / "assets"
    assert json.loads((assets / "llava_template.json").read_text()) == {"template": c.conv_mode}
    assert json.loads((assets / "original_config.json").read_text()) == json.loads(
        (c.src / "config.json").read_text()
    )


# Mistral's generation differs from Vicuna's only in the decoder, which test_generate covers.
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "next_mistral" else n for n in CASES],
)
def test_generates_like_the_hf_route(converted, name):
    """The converted pipeline tokenizes as `tokenizer_image_token`; on the same prompt both
    models generate the same tokens."""
    c = converted(name)
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (84, 84, 3), np.uint8))
    messages = [{"role": "user", "content": "<image>\nWhat is the cat?"}]
    prompt = pipe.prompt(messages, [image])

    rendered = templates.render(pipe.template, messages, add_generation_prompt=True)
    chunked = tokenizer_image_token(
        rendered, pipe.tokenizer, media_tokens(pipe.tokenizer, pipe.cfg)
    )
    assert chunked != pipe.tokenizer.encode(rendered)  # the chunks' "▁" after <image>
    n = num_tokens(pipe.cfg, Media.image(84, 84))
    image_id = pipe.cfg.image_token_id
    want = []
    for token in chunked:
        want += [image_id] * n if token == image_id else [token]
    assert prompt.input_ids.tolist() == want

    sampling = SamplingConfig(max_new_tokens=8, stop_token_ids=(2,))
    ours = pipe.generator.generate([prompt], sampling)[0].token_ids
    reference = Generator(load_model(c.hf_jax)).generate([prompt], sampling)[0].token_ids
    assert ours == reference and len(ours) > 0


# -- the image token, the tower, the CLI ---------------------------------------------------


def test_image_token_after_the_vocabulary(converted):
    """LLaVA-1.5's `<image>` is added at id 32000, one past its 32000 embeddings: the id is
    never embedded (its features replace it), so the model generates as with an in-vocab id."""
    c = converted("llava15")
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (42, 42, 3), np.uint8))
    prompt = pipe.prompt([{"role": "user", "content": "<image>\nWhat?"}], [image])
    vocab = pipe.cfg.text.vocab_size
    moved = load_model(c.jax, image_token_id=vocab)
    ids = np.where(prompt.input_ids == pipe.cfg.image_token_id, vocab, prompt.input_ids)
    sampling = SamplingConfig(max_new_tokens=6, stop_token_ids=(2,))
    want = pipe.generator.generate([prompt], sampling)[0].token_ids
    got = Generator(moved).generate([dataclasses.replace(prompt, input_ids=ids)], sampling)
    assert got[0].token_ids == want


def test_cli(converted, tmp_path, capsys):
    """`convert hf-to-jax --vision --conv-mode`, then `jax-to-hf` saying what transformers
    will not reproduce."""
    c = converted("llava15")
    out = tmp_path / "jax"
    code = main(["convert", "hf-to-jax", "--hf", str(c.src), "--vision", str(c.vision),
                 "--conv-mode", "vicuna_v1", "--out", str(out)])  # fmt: skip
    assert code == 0 and "llava:" in capsys.readouterr().out
    assert load_model(out).cfg.convention == Convention.ORIGINAL
    assert main(["convert", "jax-to-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert "original-repository checkpoint" in capsys.readouterr().err
    code = main(["convert", "hf-to-jax", "--hf", str(c.src), "--vision", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")])  # fmt: skip
    assert code != 0 and "--vision" in capsys.readouterr().err


def test_siglip_tower_from_vision_dir(converted, tmp_path):
    """A OneVision checkpoint without its tower takes it from --vision as LLaVA-NeXT loads it:
    the hub model's last layer and pooling head are not read."""
    import transformers

    c = converted("onevision")
    tower = c.model.model.vision_tower
    config = transformers.SiglipVisionConfig(**{**tower.config.to_dict(), "vision_use_head": True})
    config.num_hidden_layers += 1
    hub = transformers.SiglipVisionModel(config)
    missing = hub.load_state_dict(tower.state_dict(), strict=False).missing_keys
    assert missing and all(re.search(r"(^|\.)(layers\.3|head)\.", k) for k in missing), missing
    hub.save_pretrained(tmp_path / "tower")

    src = tmp_path / "orig"
    src.mkdir()
    for path in c.src.iterdir():  # config and tokenizer
        if ".safetensors" not in path.name:
            shutil.copy2(path, src / path.name)
    with CheckpointWriter(src) as writer:
        for key, value in c.model.state_dict().items():
            if ".vision_tower." not in key and key != "lm_head.weight":  # tied
                writer.add(original_spelling(key), value.detach().numpy())
    convert_hf_to_jax(src, tmp_path / "jax", vision_dir=tmp_path / "tower", conv_mode="qwen_1_5")
    got, want = load_params(tmp_path / "jax"), load_params(c.hf_jax)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.asarray(got[path]).tobytes() == np.asarray(want[path]).tobytes(), path
