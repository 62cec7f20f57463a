"""`llava-jax init`: a model dir from a tiny HF CLIP / SigLIP tower and a tiny HF LLM."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llava_jax import model_io
from llava_jax.checks import tiny_hf
from llava_jax.cli.main import main
from llava_jax.conversion import source
from llava_jax.conversion.init_model import load_projector
from llava_jax.conversion.mapping import rule_for
from llava_jax.train.config_loader import CONNECTOR, load_config

OLD_VOCAB = 100  # the LLM's tokenizer and embedding rows; <image> becomes id 100
NEW_VOCAB = 112

RECIPE = """
from llava_jax.train.defaults import base_config


def get_config(arg=None):
    c = base_config()
    c.model.preset = {preset!r}
    c.train.dtype = "float32"
    with c.model.overrides.unlocked():
        c.model.overrides.vision = {vision!r}
        c.model.overrides.text = {text!r}
        for key, value in {top!r}.items():
            c.model.overrides[key] = value
    return c
"""
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=42, patch_size=14)  # fmt: skip
TEXT = dict(vocab_size=NEW_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            max_position_embeddings=256)  # fmt: skip
KINDS = {
    "llava": dict(
        preset="llava-1.5-7b",
        vision=VISION,
        text=dict(TEXT, rms_norm_eps=1e-5),
        top=dict(image_token_id=OLD_VOCAB),
    ),  # fmt: skip
    "onevision": dict(
        preset="llava-onevision-qwen2-0.5b",
        vision=dict(VISION, layer_norm_eps=1e-6, num_hidden_layers=2),  # 3 -> 2, as SigLIP 27 -> 26
        text=dict(TEXT, rms_norm_eps=1e-6, tie_word_embeddings=True),
        top=dict(
            image_token_id=OLD_VOCAB,
            video_token_id=OLD_VOCAB + 1,
            image_grid_pinpoints=tiny_hf.OV_PINPOINTS,
        ),  # fmt: skip
    ),
}


def word_tokenizer(n):
    """A word-level tokenizer of `n` ids without media tokens (as a plain LLM has)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    # The last id is Qwen2's end of text, which AutoTokenizer's Qwen2Tokenizer would add.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n - 1)}}
    vocab["<|endoftext|>"] = n - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def build_parts(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "llava":
        full = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=tiny_hf.clip_config().to_dict(),
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=50),
            projection_dim=16,
        ))  # fmt: skip
        vision = randomise(full)  # a two-tower CLIPModel: init takes its vision half
        text = tiny_hf.llama_config()
        text.vocab_size = OLD_VOCAB
        llm = randomise(transformers.LlamaForCausalLM(text))
    else:
        vision = randomise(transformers.SiglipVisionModel(tiny_hf.siglip_config()))
        text = tiny_hf.qwen2_config(tie=True)
        text.vocab_size = OLD_VOCAB
        llm = randomise(transformers.Qwen2ForCausalLM(text))
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    word_tokenizer(OLD_VOCAB).save_pretrained(tmp_path / "llm")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE.format(**KINDS[kind]))
    return vision, llm, recipe


@pytest.fixture(scope="module", params=sorted(KINDS))
def initialised(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    vision, llm, recipe = build_parts(tmp_path, request.param)
    argv = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
            "--config", str(recipe), "--out", str(tmp_path / "out"), "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    return request.param, vision, llm, tmp_path


def test_weights_are_the_parts(initialised):
    kind, vision, llm, tmp_path = initialised
    params = model_io.load_params(tmp_path / "out")
    # CLIPModel keys start with vision_model. (text_model.* is the other tower); transformers
    # 5 keeps a bare SiglipVisionModel's keys without it.
    hf_vision = {k.removeprefix("vision_model."): v for k, v in vision.state_dict().items()
                 if not k.startswith(("text_model.", "head.", "vision_model.head."))}  # fmt: skip
    hf_llm = llm.state_dict()
    checked = 0
    for path, value in params.items():
        rule = rule_for(path, value.shape)
        value = np.asarray(value)
        if path.startswith("vision_tower/"):
            name = rule.hf.removeprefix("vision_tower.")
            source = hf_vision
        elif path.startswith("language_model/"):
            name = rule.hf.removeprefix("language_model.")
            source = hf_llm
        else:
            continue
        for i, key in enumerate(rule.hf_keys() if rule.num_layers else [rule.hf]):
            key = key.removeprefix("vision_tower.").removeprefix("language_model.")
            want = rule.transform.to_jax(source[key].numpy())
            got = value[i] if rule.num_layers else value
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                got = got[:OLD_VOCAB] if "embed" in name else got[:, :OLD_VOCAB]
            np.testing.assert_array_equal(got, want, err_msg=f"{path} (layer {i})")
            checked += 1
    assert checked > 20


def test_new_rows_are_the_mean(initialised):
    kind, _, llm, tmp_path = initialised
    params = model_io.load_params(tmp_path / "out")
    embed = np.asarray(params["language_model/embed_tokens/embedding"])
    old = llm.get_input_embeddings().weight.detach().numpy()
    assert embed.shape == (NEW_VOCAB, old.shape[1])
    np.testing.assert_allclose(embed[OLD_VOCAB:], np.broadcast_to(old.mean(0), (12, old.shape[1])),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    if kind == "llava":  # untied: lm_head [D, V] too
        head = np.asarray(params["language_model/lm_head/kernel"])
        old_head = llm.lm_head.weight.detach().numpy()
        np.testing.assert_allclose(head[:, OLD_VOCAB:].T, np.broadcast_to(old_head.mean(0),
                                   (12, old.shape[1])), rtol=1e-6, atol=1e-7)  # fmt: skip
    else:
        assert "language_model/lm_head/kernel" not in params


def test_config_tokens_and_processor(initialised):
    kind, _, _, tmp_path = initialised
    out = tmp_path / "out"
    cfg = model_io.load_config(out)
    assert cfg.image_token_id == OLD_VOCAB and cfg.text.vocab_size == NEW_VOCAB
    tok = transformers.AutoTokenizer.from_pretrained(out / "assets")
    assert tok.convert_tokens_to_ids("<image>") == OLD_VOCAB
    assert tok.encode("<image>", add_special_tokens=False) == [OLD_VOCAB]
    if kind == "onevision":
        assert cfg.video_token_id == OLD_VOCAB + 1
        assert tok.convert_tokens_to_ids("<video>") == OLD_VOCAB + 1
    else:
        assert "<video>" not in tok.get_vocab()
    proc = json.loads((out / "assets" / "preprocessor_config.json").read_text())
    from llava_jax.media.processor_config import SIGLIP_MEAN, ImageProcessorConfig

    got = ImageProcessorConfig.from_pretrained(out / "assets", cfg)
    assert got.view_size == 42 and got.family == cfg.family
    if kind == "onevision":
        assert tuple(proc["image_mean"]) == SIGLIP_MEAN


def test_connector_init(initialised):
    _, _, _, tmp_path = initialised
    params = model_io.load_params(tmp_path / "out")
    k1 = np.asarray(params["multi_modal_projector/linear_1/kernel"])  # [32, 48], fan_in 32
    b2 = np.asarray(params["multi_modal_projector/linear_2/bias"])  # fan_in 48
    assert np.abs(k1).max() <= 1 / np.sqrt(32) and np.abs(k1).max() > 0.8 / np.sqrt(32)
    assert np.abs(b2).max() <= 1 / np.sqrt(48) and np.abs(b2).std() > 0
    if "image_newline" in params:
        newline = np.asarray(params["image_newline"])
        assert 0.5 / np.sqrt(48) < newline.std() < 1.5 / np.sqrt(48)


def test_text_only_logits_match_the_llm(initialised):
    _, _, llm, tmp_path = initialised
    model = source.load_model(tmp_path / "out")
    ids = np.array([[1, 5, 17, 42, 98, 3, 8]])
    got = np.asarray(model(ids).logits)
    with torch.no_grad():
        want = llm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got[..., :OLD_VOCAB], want, rtol=2e-4, atol=2e-4)
    # The new columns score every position like the mean output row.
    assert got.shape[-1] == NEW_VOCAB


def test_load_projector(initialised, tmp_path):
    from safetensors.torch import save_file

    kind, _, _, init_dir = initialised
    params = model_io.load_params(init_dir / "out")
    rng = np.random.default_rng(0)
    original = {  # the original repository's spelling, torch layout
        "model.mm_projector.0.weight": rng.standard_normal((48, 32)).astype(np.float32),
        "model.mm_projector.0.bias": rng.standard_normal(48).astype(np.float32),
        "model.mm_projector.2.weight": rng.standard_normal((48, 48)).astype(np.float32),
        "model.mm_projector.2.bias": rng.standard_normal(48).astype(np.float32),
    }
    tensors = {k: torch.from_numpy(v) for k, v in original.items()}
    save_file(tensors, tmp_path / "mm_projector.safetensors")
    torch.save(tensors, tmp_path / "mm_projector.bin")
    for name, pickle in (("mm_projector.safetensors", False), ("mm_projector.bin", True)):
        loaded = load_projector(tmp_path / name, params, allow_pickle=pickle)
        np.testing.assert_array_equal(loaded["multi_modal_projector/linear_1/kernel"],
                                      original["model.mm_projector.0.weight"].T)  # fmt: skip
        np.testing.assert_array_equal(loaded["multi_modal_projector/linear_2/bias"],
                                      original["model.mm_projector.2.bias"])  # fmt: skip
        for path in params:
            if not path.startswith("multi_modal_projector/"):
                assert loaded[path] is params[path]
    with pytest.raises(ValueError, match="pickle"):
        load_projector(tmp_path / "mm_projector.bin", params)
    # From a model dir: its connector.
    loaded = load_projector(init_dir / "out", {**params, "multi_modal_projector/linear_1/bias":
                                               np.zeros(48, np.float32)})  # fmt: skip
    np.testing.assert_array_equal(loaded["multi_modal_projector/linear_1/bias"],
                                  params["multi_modal_projector/linear_1/bias"])  # fmt: skip
    bad = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not part of the connector"):
        load_projector(tmp_path / "bad.safetensors", params)
    save_file({k: v for k, v in tensors.items() if ".2." not in k}, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="no tensor for multi_modal_projector/linear_2"):
        load_projector(tmp_path / "half.safetensors", params)


def test_parts_that_do_not_fit_the_recipe(tmp_path, capsys):
    _, _, recipe = build_parts(tmp_path, "llava")
    args = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    recipe_7b = Path(__file__).resolve().parent.parent / "configs" / "llava15_7b_pretrain.py"
    assert main([*args, "--config", str(recipe_7b)]) == 2
    err = capsys.readouterr().err
    assert "do not fit the recipe's model: vision.hidden_size: parts 32, recipe 1024" in err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--config", str(recipe), "--llm", str(tmp_path / "nope")]) == 2
    assert "--llm" in capsys.readouterr().err
    config = load_config(str(recipe))
    assert config.train.trainable != CONNECTOR  # base_config default: the recipe is a stub


def test_projector_and_vocab_checks(tmp_path, capsys):
    from safetensors.numpy import save_file

    _, _, recipe = build_parts(tmp_path, "llava")
    rng = np.random.default_rng(1)
    projector = {  # the HF spelling this time
        "multi_modal_projector.linear_1.weight": rng.standard_normal((48, 32), np.float32),
        "multi_modal_projector.linear_1.bias": rng.standard_normal(48, np.float32),
        "multi_modal_projector.linear_2.weight": rng.standard_normal((48, 48), np.float32),
        "multi_modal_projector.linear_2.bias": rng.standard_normal(48, np.float32),
    }
    save_file(projector, tmp_path / "projector.safetensors")
    args = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
            "--config", str(recipe)]  # fmt: skip
    out = tmp_path / "with_projector"
    assert (
        main([*args, "--out", str(out), "--projector", str(tmp_path / "projector.safetensors")])
        == 0
    )
    params = model_io.load_params(out)
    np.testing.assert_array_equal(
        params["multi_modal_projector/linear_2/kernel"],
        projector["multi_modal_projector.linear_2.weight"].T,
    )
    # A recipe vocabulary too small for the tokenizer plus <image>.
    small = tmp_path / "small.py"
    small.write_text(recipe.read_text().replace(f"'vocab_size': {NEW_VOCAB}", "'vocab_size': 100"))
    assert main(["init", *args[1:-1], str(small), "--out", str(tmp_path / "x")]) == 2
    assert "the recipe's vocab_size 100 must hold both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_image_processor_saved_by_transformers5(tmp_path, capsys):
    # transformers 5 nests the image processor in processor_config.json and writes no
    # preprocessor_config.json; its mean / std are the ones init must take.
    from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer

    _, _, recipe = build_parts(tmp_path, "llava")
    mean, std = [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]
    image = transformers.CLIPImageProcessorPil(image_mean=mean, image_std=std)
    transformers.CLIPProcessor(image_processor=image, tokenizer=build_tiny_tokenizer()
                               ).save_pretrained(tmp_path / "proc")  # fmt: skip
    assert not (tmp_path / "proc" / "preprocessor_config.json").exists()
    args = ["init", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
            "--config", str(recipe), "--image-processor"]  # fmt: skip
    assert main([*args, str(tmp_path / "proc"), "--out", str(tmp_path / "out")]) == 0
    proc = json.loads((tmp_path / "out" / "assets" / "preprocessor_config.json").read_text())
    assert (proc["image_mean"], proc["image_std"]) == (mean, std)
    # A directory with no image processor at all is refused, naming what was looked for.
    assert main([*args, str(tmp_path / "llm"), "--out", str(tmp_path / "x")]) == 2
    assert "no image processor (preprocessor_config.json, or processor_config" in (
        capsys.readouterr().err
    )
