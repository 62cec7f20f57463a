"""Recipes in configs/: each loads, is locked, builds its model; overrides parse or fail."""

import math
from pathlib import Path

import ml_collections
import pytest

from llava_jax.config import Family, LlavaConfig, Projector
from llava_jax.models.build import abstract_params
from llava_jax.train import config_loader
from llava_jax.train.config_loader import ConfigLoadError, load_config, model_config, total_steps

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# spec -> (family, billions of parameters low, high, template, max_views)
RECIPES = {
    "llava_v1_pretrain.py": (Family.LLAVA, 6.9, 7.2, "plain", 1),
    "llava_v1_finetune.py": (Family.LLAVA, 6.9, 7.2, "vicuna_v1", 1),
    "llava_v1_finetune.py:full": (Family.LLAVA, 6.9, 7.2, "vicuna_v1", 1),
    "llava15_7b_pretrain.py": (Family.LLAVA, 6.9, 7.2, "plain", 1),
    "llava15_7b_pretrain.py:13b": (Family.LLAVA, 13.0, 13.5, "plain", 1),
    "llava15_7b_finetune.py": (Family.LLAVA, 6.9, 7.2, "vicuna_v1", 1),
    "llava15_7b_finetune.py:13b": (Family.LLAVA, 13.0, 13.5, "vicuna_v1", 1),
    "llava15_7b_lora.py": (Family.LLAVA, 6.9, 7.2, "vicuna_v1", 1),
    "llava15_7b_lora.py:13b,qlora": (Family.LLAVA, 13.0, 13.5, "vicuna_v1", 1),
    "llava15_task_lora.py": (Family.LLAVA, 6.9, 7.2, "vicuna_v1", 1),
    "llava_next_finetune.py": (Family.LLAVA_NEXT, 6.9, 7.2, "vicuna_v1", 5),
    "llava_next_finetune.py:vicuna-13b": (Family.LLAVA_NEXT, 13.0, 13.5, "vicuna_v1", 5),
    "llava_next_finetune.py:mistral-7b": (Family.LLAVA_NEXT, 7.4, 7.7, "mistral_instruct", 5),
    "onevision_stage1.py:0.5b": (Family.LLAVA_ONEVISION, 0.85, 0.95, "plain", 1),
    "onevision_stage1.py": (Family.LLAVA_ONEVISION, 7.9, 8.2, "plain", 1),
    "onevision_si.py:7b": (Family.LLAVA_ONEVISION, 7.9, 8.2, "qwen_1_5", 37),
    "onevision_ov.py:72b": (Family.LLAVA_ONEVISION, 72.5, 74.0, "qwen_1_5", 37),
    "onevision_72b_ov.py": (Family.LLAVA_ONEVISION, 72.5, 74.0, "qwen_1_5", 37),
    "shapes_tiny.py": (Family.LLAVA, 0.0001, 0.002, "plain", 1),
    "shapes_tiny.py:stage2": (Family.LLAVA, 0.0001, 0.002, "vicuna_v1", 1),
    "shapes_tiny.py:stage2-lora": (Family.LLAVA, 0.0001, 0.002, "vicuna_v1", 1),
    "shapes_tiny.py:lora": (Family.LLAVA, 0.0001, 0.002, "plain", 1),
}


def _billions(cfg: LlavaConfig) -> float:
    return sum(math.prod(v.shape) for v in abstract_params(cfg).values()) / 1e9


@pytest.mark.parametrize("spec", sorted(RECIPES))
def test_recipe_builds(spec):
    family, low, high, template, max_views = RECIPES[spec]
    config = load_config(str(CONFIGS / spec))
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.optimizer.lr_typo = 1.0
    cfg = model_config(config)
    assert cfg.family == family
    assert low <= _billions(cfg) <= high, f"{spec}: {_billions(cfg):.3f}B parameters"
    assert config.data.template == template
    assert config.data.max_views == max_views
    # Trainable patterns name real parameter paths, and the vision LR goes with the tower.
    import re

    paths = list(abstract_params(cfg))
    for pattern in config.train.trainable:
        assert any(re.fullmatch(pattern, p) for p in paths), f"{spec}: {pattern} matches nothing"
    tower_trains = any(p.startswith("vision_tower") for p in config.train.trainable)
    assert tower_trains == (config.optimizer.vision_lr > 0), spec


def test_stage_values_from_recipes_md():
    s1 = load_config(str(CONFIGS / "llava15_7b_pretrain.py"))
    s2 = load_config(str(CONFIGS / "llava15_7b_finetune.py:13b"))
    assert (s1.optimizer.lr, s1.train.batch_size, s1.train.trainable) == (
        1e-3, 256, ("multi_modal_projector/.*",))  # fmt: skip
    assert (s2.optimizer.lr, s2.train.batch_size, s2.data.group_by_length) == (2e-5, 128, True)
    assert s2.train.trainable == ("multi_modal_projector/.*", "language_model/.*")
    v1 = model_config(load_config(str(CONFIGS / "llava_v1_pretrain.py")))
    assert (v1.projector, v1.vision.image_size, v1.text.max_position_embeddings) == (
        Projector.LINEAR, 224, 2048)  # fmt: skip
    assert load_config(str(CONFIGS / "llava_v1_pretrain.py")).optimizer.lr == 2e-3
    ov = load_config(str(CONFIGS / "onevision_si.py"))
    assert (ov.optimizer.lr, ov.optimizer.vision_lr, ov.data.max_len) == (1e-5, 2e-6, 32768)
    big = load_config(str(CONFIGS / "onevision_72b_ov.py"))
    assert model_config(big).run.param_dtype == "bfloat16"
    assert load_config(str(CONFIGS / "llava_v1_finetune.py:full")).train.num_epochs == 3.0


def test_overrides_parse_with_the_field_type():
    config = load_config(
        str(CONFIGS / "llava15_7b_finetune.py"),
        [
            "--config.optimizer.lr=1e-5",
            "config.train.batch_size=64",
            "train.num_epochs=2",
            "--config.data.packing=true",
            "--config.data.template=plain",
            "--config.train.trainable=('multi_modal_projector/.*',)",
            "--config.mesh.fsdp=4",
            "--config.train.scan_layers=False",
            "--config.model.overrides.vision.image_size=224",
            "--config.model.overrides.projector=linear",
        ],
    )
    assert config.optimizer.lr == 1e-5 and isinstance(config.optimizer.lr, float)
    assert config.train.batch_size == 64 and config.train.num_epochs == 2.0
    assert config.data.packing is True and config.data.template == "plain"
    assert config.train.trainable == ("multi_modal_projector/.*",)
    assert config.mesh.fsdp == 4
    cfg = model_config(config)
    assert (cfg.run.scan_layers, cfg.vision.image_size, cfg.projector) == (
        False,
        224,
        Projector.LINEAR,
    )
    unquoted = load_config(
        str(CONFIGS / "llava15_7b_finetune.py"), ["--config.train.trainable=a/.*,b/.*"]
    )
    assert unquoted.train.trainable == ("a/.*", "b/.*")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optimizer.lrr=1e-5", "no config field 'optimizer.lrr'"),
        ("--config.nothing.lr=1", "no config field 'nothing.lr'"),
        ("--config.train.batch_size=1e3", "train.batch_size='1e3': not a valid int"),
        ("--config.train.batch_size=many", "not a valid int"),
        ("--config.data.packing=maybe", "not a valid bool"),
        ("--config.optimizer=1", "'optimizer' is a group"),
        ("--config.model.overrides.nope=1", "LlavaConfig has no field 'nope'"),
        (
            "--config.model.overrides.remat_policy=dots",
            "remat_policy is a run setting, not architecture: set --config.train.remat_policy",
        ),
        ("--config.model.overrides.run=1", "LlavaConfig has no field 'run'"),
        ("--config.train.remat_policy=some", "config.train: 'some' is not a valid RematPolicy"),
        ("--config.model.overrides.vision.nope=1", "VisionConfig has no field 'nope'"),
        ("--config.train.trainable=(1, 2)", "item 1 is not a str"),
        ("optimizer.lr", "expected --config.FIELD=VALUE"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=None) as e:
        load_config(str(CONFIGS / "llava15_7b_pretrain.py"), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_specs():
    with pytest.raises(ConfigLoadError, match="no such recipe file"):
        load_config(str(CONFIGS / "nope.py"))
    with pytest.raises(ValueError, match="onevision_si.py: size '3b'; choose one of 0.5b, 7b"):
        load_config(str(CONFIGS / "onevision_si.py:3b"))
    assert config_loader.split_spec("a/b.py:13b") == ("a/b.py", "13b")
    assert config_loader.split_spec("C:/x/b.py") == ("C:/x/b.py", None)
    bad = load_config(str(CONFIGS / "llava15_7b_pretrain.py"), ["--config.model.preset=x"])
    with pytest.raises(ConfigLoadError, match="unknown preset 'x'"):
        model_config(bad)
    empty = load_config(str(CONFIGS / "llava15_7b_pretrain.py"), ["--config.model.preset="])
    with pytest.raises(ConfigLoadError, match="no model to build"):
        model_config(empty)


@pytest.mark.parametrize("recipe", sorted({spec.partition(":")[0] for spec in RECIPES}))
def test_an_unknown_recipe_argument_names_the_recipe_and_its_choices(recipe):
    with pytest.raises(ValueError, match=f"^{recipe.replace('.', '[.]')}:.*'nope'.*choose one of"):
        load_config(str(CONFIGS / f"{recipe}:nope"))


def test_model_config_from_init_from_dir(tmp_path):
    cfg = model_config(load_config(str(CONFIGS / "shapes_tiny.py")))
    (tmp_path / "llava_config.json").write_text(__import__("json").dumps(cfg.to_dict()))
    config = load_config(
        str(CONFIGS / "shapes_tiny.py"),
        ["--config.model.preset=", f"--config.init_from={tmp_path}"],
    )
    with config.model.overrides.unlocked():  # no architecture overrides
        config.model.overrides = ml_collections.ConfigDict()
    config.train.dtype = "bfloat16"
    assert model_config(config) == cfg.with_run(dtype="bfloat16")


def test_total_steps():
    config = load_config(str(CONFIGS / "llava15_7b_finetune.py"))  # batch 128, 1 epoch
    assert total_steps(config, 665_298) == math.ceil(665_298 / 128)
    assert total_steps(config, 1) == 1
    config = load_config(
        str(CONFIGS / "llava_v1_finetune.py:full"), ["--config.train.batch_size=10"]
    )
    assert total_steps(config, 95) == 30  # 10 steps per epoch (last batch partial) x 3
    config = load_config(str(CONFIGS / "llava_v1_finetune.py"), ["--config.train.num_steps=7"])
    assert total_steps(config, 10**6) == 7
    with pytest.raises(ConfigLoadError, match="0 records"):
        total_steps(load_config(str(CONFIGS / "llava_v1_finetune.py")), 0)
    # Packed rows hold several records each: counting epochs in records would over-train.
    packed = load_config(str(CONFIGS / "llava_v1_finetune.py"), ["--config.data.packing=True"])
    with pytest.raises(ConfigLoadError, match="packing=True needs config.train.num_steps"):
        total_steps(packed, 1000)
    packed.train.num_steps = 40
    assert total_steps(packed, 1000) == 40


def test_shapes_tiny_fits_the_shapes_tokenizer():
    from llava_jax.train import shapes

    cfg = model_config(load_config(str(CONFIGS / "shapes_tiny.py:stage2")))
    tok = shapes.build_tokenizer()
    assert cfg.text.vocab_size >= len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert (cfg.text.bos_token_id, cfg.text.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert cfg.vision.image_size == 32 and cfg.tokens_per_view == 16


@pytest.mark.parametrize("spec", ["llava15_7b_lora.py", "llava15_task_lora.py:13b,qlora"])
def test_lora_recipes_from_finetune_lora_sh(spec):
    """haotian-liu/LLaVA scripts/v1_5/finetune_lora.sh and finetune_task_lora.sh."""
    from llava_jax.train.state import labels_for

    config = load_config(str(CONFIGS / spec))
    lora, o = config.train.lora, config.optimizer
    assert (lora.rank, lora.alpha, o.lr, o.projector_lr) == (128, 256.0, 2e-4, 2e-5)
    assert lora.dropout == 0.05  # llava/train/train.py's lora_dropout default
    assert lora.quantize == ("nf4" if spec.endswith("qlora") else "")
    labels = labels_for(model_config(config), config)
    adapted = {p.removesuffix("_lora_a") for p in labels if p.endswith("_lora_a")}
    # find_all_linear_names: all 7 linears of every decoder layer (stacked), nothing else.
    assert len(adapted) == 7 and all(p.startswith("language_model/layers/") for p in adapted)
    assert {label for p, label in labels.items() if p.startswith("multi_modal_projector/")} == {
        "projector"
    }
