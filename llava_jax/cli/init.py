"""`llava-jax init`: assemble a stage-1 model from pretrained vision and LLM checkpoints.

    llava-jax init --vision clip-vit-large-patch14-336 --llm vicuna-7b-v1.5 \\
        --config configs/llava15_7b_pretrain.py --out /models/llava15-7b-init

The recipe fixes the architecture (family, connector, vocabulary size); the parts must fit
it. The output is a llava-jax model dir that `llava-jax train --init-from` starts from.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError
from llava_jax.cli.failures import os_errors
from llava_jax.paths import local_path, location


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="assemble a stage-1 model from a pretrained vision tower and LLM",
        description="Convert an HF CLIP / SigLIP vision model and an HF Llama / Mistral / "
        "Qwen2 causal LM into one llava-jax model dir for a recipe: the media tokens are "
        "added to the tokenizer and the embeddings resized (new rows = the mean row), the "
        "connector (and image_newline) freshly initialised.",
    )
    parser.add_argument(
        "--vision",
        required=True,
        type=local_path,
        metavar="HF_DIR",
        help="CLIPVisionModel / SiglipVisionModel (or CLIPModel) directory",
    )
    parser.add_argument(
        "--llm",
        required=True,
        type=local_path,
        metavar="HF_DIR",
        help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM "
        "directory with its tokenizer",
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="RECIPE[:ARG]",
        help="the recipe the model is for, e.g. configs/llava15_7b_pretrain.py",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=location,
        metavar="DIR",
        help="llava-jax model directory to create, local or gs:// (must not exist, or be empty)",
    )
    parser.add_argument(
        "--image-processor",
        type=local_path,
        metavar="HF_DIR",
        help="take the image mean / std from this dir's image processor (preprocessor_config"
        ".json, or processor_config.json as transformers 5 saves it; default: the vision "
        "dir's, else the tower's standard values)",
    )
    parser.add_argument(
        "--projector",
        type=local_path,
        metavar="PATH",
        help="load the connector from a stage-1 mm_projector.bin / .safetensors "
        "or model dir (default: config.projector_from, else fresh)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh connector")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled .bin/.pt weights; they can run code, so only for files you trust",
    )
    parser.set_defaults(run=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--vision", args.vision), ("--llm", args.llm)):
        if not path.is_dir():
            raise CommandError(f"{flag} {path}: no such directory")
    from llava_jax.conversion.init_model import assemble
    from llava_jax.train.config_loader import load_config, model_config

    config = load_config(args.config, list(args.overrides))
    recipe = model_config(config)
    projector = args.projector or config.projector_from or None
    with os_errors(args.out):
        cfg = assemble(
            args.vision,
            args.llm,
            recipe,
            args.out,
            image_processor_dir=args.image_processor,
            seed=args.seed,
            allow_pickle=args.allow_pickle,
            projector_from=projector,
        )
    tokens = f"<image> = {cfg.image_token_id}"
    if cfg.video_token_id is not None:
        tokens += f", <video> = {cfg.video_token_id}"
    print(f"wrote {args.out} ({cfg.family}, vocab {cfg.text.vocab_size}, {tokens})")
    return 0
