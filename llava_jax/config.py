"""Architecture configs: frozen dataclasses with presets for the released checkpoints.

`LlavaConfig` describes one model completely. It is built from, and written back to, a
Hugging Face `config.json` by `conversion/hf_config.py` (`from_hf_config`, `to_hf_config`:
functions there, not methods here, so that `config` stays below `conversion` in the
layering), and it names the family, whose only effect on the network is the host-side
feature layout (`media/feature_plan.py`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any


class Family(enum.StrEnum):
    LLAVA = "llava"  # LLaVA v1 / 1.5: one view per image, fixed token count.
    LLAVA_NEXT = "llava_next"  # AnyRes: base view + grid crops, unpad, newline per row.
    LLAVA_ONEVISION = "llava_onevision"  # anyres_max_N, multi-image, video pooling.


class VisionKind(enum.StrEnum):
    CLIP = "clip"  # class token, patch conv without bias, pre-layernorm
    SIGLIP = "siglip"  # no class token, patch conv with bias, no pre-layernorm


class TextKind(enum.StrEnum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"


class Activation(enum.StrEnum):
    QUICK_GELU = "quick_gelu"  # CLIP: x * sigmoid(1.702 x)
    GELU_TANH = "gelu_pytorch_tanh"  # SigLIP: tanh approximation
    GELU = "gelu"  # exact erf GELU (the mlp2x_gelu connector)
    SILU = "silu"


class FeatureSelect(enum.StrEnum):
    DEFAULT = "default"  # drop the CLS token (index 0)
    FULL = "full"  # keep every token


class Projector(enum.StrEnum):
    LINEAR = "linear"  # LLaVA v1: one Linear
    MLP2X_GELU = "mlp2x_gelu"  # Linear -> exact GELU -> Linear


class Convention(enum.StrEnum):
    """Whose image geometry and prompt tokenization a checkpoint was trained with."""

    TRANSFORMERS = "transformers"  # unpad sizes `int(round(x, 7))`, the prompt tokenized whole
    # haotian-liu/LLaVA and LLaVA-VL/LLaVA-NeXT: unpad sizes `int(x)` (`llava_arch.py::
    # unpad_image`), the text between placeholders tokenized chunk by chunk (`mm_utils.py::
    # tokenizer_image_token`). Their (width, height) pinpoints are stored transposed, as ours.
    ORIGINAL = "original"


class RematPolicy(enum.StrEnum):
    NONE = "none"  # keep every activation
    FULL = "full"  # recompute the whole layer in the backward pass
    DOTS = "dots"  # save matmul outputs
    DOTS_NO_BATCH = "dots_with_no_batch_dims"  # save weight matmuls, recompute attention


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a model runs, not what it is: never written into `llava_config.json`.

    None of these changes the parameters' names or shapes, so a checkpoint runs with any of
    them. Training takes them from `config.train` (`train/defaults.py`); `generate`, `serve`
    and `eval` from their flags (`--dtype`), with the parameters in the dtype they were
    stored in unless `param_dtype` is asked for.
    """

    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # the parameters' (master weights') dtype
    # Layers run in a `scan` (one compiled body); False unrolls them, and the attention and
    # loss chunks below too (slower compiles; XLA's cost analysis then counts every copy).
    scan_layers: bool = True
    remat_policy: RematPolicy = RematPolicy.NONE  # the decoder's layers
    vision_remat_policy: RematPolicy = RematPolicy.NONE  # the vision tower's layers
    # Training sequences longer than this attend in chunks of this many queries (memory
    # O(chunk * T) instead of O(T^2), e.g. OneVision's 32K); 0 = never.
    attention_chunk: int = 2048

    def __post_init__(self):
        # Enum fields given as strings (from configs and flags) are checked here, once.
        object.__setattr__(self, "remat_policy", RematPolicy(self.remat_policy))
        object.__setattr__(self, "vision_remat_policy", RematPolicy(self.vision_remat_policy))


# Run settings that llava_config.json held before they moved to `RunSettings`: an old model
# directory still loads, and they are dropped (they never affected the parameters).
LEGACY_RUN_KEYS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_chunk")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT encoder: CLIP ViT-L/14 or SigLIP so400m/14."""

    kind: VisionKind = VisionKind.CLIP
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: Activation = Activation.QUICK_GELU

    @property
    def has_class_token(self) -> bool:
        return self.kind == VisionKind.CLIP

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.patches_per_side**2 + int(self.has_class_token)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def clip_vit_l14(cls, image_size: int = 336) -> VisionConfig:
        return cls(image_size=image_size)

    @classmethod
    def siglip_so400m(cls, num_hidden_layers: int = 26) -> VisionConfig:
        # HF OneVision configs keep 26 of the 27 layers ("drop the last layer").
        return cls(
            kind=VisionKind.SIGLIP,
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=num_hidden_layers,
            image_size=384,
            layer_norm_eps=1e-6,
            hidden_act=Activation.GELU_TANH,
        )


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A decoder LLM: LLaMA / Vicuna / Mistral, or Qwen2 (q/k/v bias)."""

    kind: TextKind = TextKind.LLAMA
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v bias (Qwen2); o_proj never has one
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral; keys older than the window are masked
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def vicuna_7b(cls) -> TextConfig:
        return cls()

    @classmethod
    def vicuna_13b(cls) -> TextConfig:
        return cls(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
        )

    @classmethod
    def mistral_7b(cls) -> TextConfig:
        return cls(
            kind=TextKind.MISTRAL,
            intermediate_size=14336,
            num_key_value_heads=8,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
        )

    @classmethod
    def qwen2(cls, size: str) -> TextConfig:
        # (vocab, hidden, mlp, layers, heads, kv heads, tied); vocab sizes as in the llava-hf
        # OneVision configs.
        shapes = {
            "0.5b": (151936, 896, 4864, 24, 14, 2, True),
            "7b": (152128, 3584, 18944, 28, 28, 4, False),
            "72b": (152064, 8192, 29568, 80, 64, 8, False),
        }
        vocab, hidden, mlp, layers, heads, kv, tied = shapes[size]
        return cls(
            kind=TextKind.QWEN2,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=hidden // heads,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
            attention_bias=True,
            tie_word_embeddings=tied,
            bos_token_id=None,
            eos_token_id=151645,
            pad_token_id=None,
        )


NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A whole LLaVA model: vision tower, connector, decoder, and how image features are laid out.

    Every field but the last is architecture (`llava_config.json`); `run` is how this
    instance runs (`RunSettings`), set by the command and never saved.
    """

    family: Family = Family.LLAVA
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    projector: Projector = Projector.MLP2X_GELU
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: FeatureSelect = FeatureSelect.DEFAULT
    image_token_id: int = 32000
    video_token_id: int | None = None
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # (height, width) each
    vision_aspect_ratio: str | None = None  # "anyres_max_9" for OneVision
    # "original" for checkpoints of the original repositories (`convert hf-to-jax` of their
    # directories): the token layout and prompt ids they were trained with.
    convention: Convention = Convention.TRANSFORMERS
    # HF config fields that do not affect the network (ids, names, image_seq_length, ...),
    # kept as JSON so that writing the config back to HF loses nothing.
    hf_extra: str = "{}"
    run: RunSettings = RunSettings()

    def __post_init__(self):
        layers = self.feature_layers
        n = self.vision.num_hidden_layers
        for layer in layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer {layer} is outside the tower's {n} layers")
        if self.family != Family.LLAVA and not self.image_grid_pinpoints:
            raise ValueError(f"family {self.family} needs image_grid_pinpoints")
        if self.family == Family.LLAVA_ONEVISION and self.video_token_id is None:
            raise ValueError("family llava_onevision needs video_token_id")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """`vision_feature_layer` as a tuple of hidden-state indices (may be negative)."""
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """`feature_layers` as non-negative hidden-state indices: 0 is the tower's input
        (the embeddings), i the output of layer i."""
        n = self.vision.num_hidden_layers
        return tuple(i % (n + 1) for i in self.feature_layers)

    @property
    def vision_layers_run(self) -> int:
        """Tower layers a forward pass runs: those up to the deepest selected feature layer
        (OneVision selects the last of SigLIP's 27 minus one; LLaVA-1.5 the second to last)."""
        return max(self.feature_indices)

    @property
    def has_image_newline(self) -> bool:
        return self.family != Family.LLAVA

    @property
    def tokens_per_view(self) -> int:
        """Vision tokens per crop after feature selection (576 for CLIP-336, 729 for SigLIP-384)."""
        drop_cls = self.vision_feature_select_strategy == FeatureSelect.DEFAULT
        return self.vision.num_positions - int(drop_cls)

    def replace(self, **changes: Any) -> LlavaConfig:
        return dataclasses.replace(self, **changes)

    def with_run(self, **changes: Any) -> LlavaConfig:
        """This architecture with some run settings changed (`RunSettings` fields)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

    def with_fields(self, **changes: Any) -> LlavaConfig:
        """`replace` and `with_run` in one: each name is a field of one or the other."""
        run_names = {f.name for f in dataclasses.fields(RunSettings)}
        run = {k: v for k, v in changes.items() if k in run_names}
        arch = {k: v for k, v in changes.items() if k not in run_names}
        return self.replace(**arch).with_run(**run)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The architecture as JSON-ready data (`llava_config.json`): no run settings."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        del d["run"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        """Inverse of `to_dict`, with default run settings; unknown keys are an error, the
        run settings older versions saved (`LEGACY_RUN_KEYS`) are dropped."""
        d = {k: v for k, v in d.items() if k not in LEGACY_RUN_KEYS}
        vision = _dataclass_from_dict(VisionConfig, d.pop("vision", {}), "vision")
        text = _dataclass_from_dict(TextConfig, d.pop("text", {}), "text")
        cfg = _dataclass_from_dict(cls, d, "config", vision=vision, text=text)
        return cfg

    # -- presets for the released checkpoints ----------------------------------------------

    @classmethod
    def llava15_7b(cls) -> LlavaConfig:
        return cls(vision=VisionConfig.clip_vit_l14(336), text=TextConfig.vicuna_7b())

    @classmethod
    def llava15_13b(cls) -> LlavaConfig:
        return cls(vision=VisionConfig.clip_vit_l14(336), text=TextConfig.vicuna_13b())

    @classmethod
    def llava_next_vicuna_7b(cls) -> LlavaConfig:
        return cls.llava15_7b().replace(
            family=Family.LLAVA_NEXT, image_grid_pinpoints=NEXT_PINPOINTS
        )

    @classmethod
    def llava_next_vicuna_13b(cls) -> LlavaConfig:
        return cls.llava15_13b().replace(
            family=Family.LLAVA_NEXT, image_grid_pinpoints=NEXT_PINPOINTS
        )

    @classmethod
    def llava_next_mistral_7b(cls) -> LlavaConfig:
        return cls.llava_next_vicuna_7b().replace(text=TextConfig.mistral_7b())

    @classmethod
    def onevision_qwen2(cls, size: str) -> LlavaConfig:
        return cls(
            family=Family.LLAVA_ONEVISION,
            vision=VisionConfig.siglip_so400m(),
            text=TextConfig.qwen2(size),
            vision_feature_layer=-1,
            vision_feature_select_strategy=FeatureSelect.FULL,
            image_token_id=151646,
            video_token_id=151647,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
        )

    @classmethod
    def preset(cls, name: str) -> LlavaConfig:
        """A config by name, e.g. `LlavaConfig.preset("llava-onevision-qwen2-7b")`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()


PRESETS = {
    "llava-1.5-7b": LlavaConfig.llava15_7b,
    "llava-1.5-13b": LlavaConfig.llava15_13b,
    "llava-v1.6-vicuna-7b": LlavaConfig.llava_next_vicuna_7b,
    "llava-v1.6-vicuna-13b": LlavaConfig.llava_next_vicuna_13b,
    "llava-v1.6-mistral-7b": LlavaConfig.llava_next_mistral_7b,
    "llava-onevision-qwen2-0.5b": lambda: LlavaConfig.onevision_qwen2("0.5b"),
    "llava-onevision-qwen2-7b": lambda: LlavaConfig.onevision_qwen2("7b"),
    "llava-onevision-qwen2-72b": lambda: LlavaConfig.onevision_qwen2("72b"),
}


def _dataclass_from_dict(cls, d: dict[str, Any], where: str, **given: Any):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        kind = fields[name].type
        if isinstance(value, list):  # JSON has no tuples
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        enum_cls = _ENUMS.get(kind)
        kwargs[name] = enum_cls(value) if enum_cls else value
    return cls(**kwargs, **given)


_ENUMS = {
    e.__name__: e
    for e in (
        Family,
        VisionKind,
        TextKind,
        Activation,
        FeatureSelect,
        Projector,
        Convention,
        RematPolicy,
    )
}
