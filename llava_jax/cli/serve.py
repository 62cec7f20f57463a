"""`llava-jax serve`: an OpenAI-compatible chat API and a browser chat page for one model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from llava_jax.cli import CommandError
from llava_jax.paths import local_path

API_KEY_ENV = "LLAVA_JAX_API_KEY"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat API and a chat page",
        description="Serve POST /v1/chat/completions (OpenAI format, images as base64 data "
        "URLs, streaming), GET /v1/models, GET /health, and a chat page at /. Concurrent "
        "requests are decoded together in batches.",
    )
    parser.add_argument("--model", required=True, type=local_path, metavar="PATH",
                        help="llava-jax model directory, or a Hugging Face checkpoint "
                        "(converted in memory)")  # fmt: skip
    parser.add_argument("--template", metavar="NAME",
                        help="conversation template; default: the checkpoint's own")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--model-name", metavar="NAME",
                        help="the model id clients send (default: the directory name)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"require `Authorization: Bearer KEY` on /v1 (or set "
                        f"${API_KEY_ENV})")  # fmt: skip
    parser.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB",
                        help="largest request body (default 20)")  # fmt: skip
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                        help="largest image, width x height (default 4096x4096)")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=8, metavar="N",
                        help="most images in one request (default 8)")  # fmt: skip
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (default: refused)")  # fmt: skip
    parser.add_argument("--local-image-dir", type=local_path, metavar="DIR",
                        help="allow file:// image URLs, read from under DIR only "
                        "(default: refused)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N",
                        help="answer length when a request sets none (default 256)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="when a request sets none (default 0: greedy)")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="most requests decoded together (default 8)")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="most requests waiting; more get 429 (default 64)")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, metavar="MS",
                        help="at most this long, a request waits for others the server is "
                        "reading to join its batch (default 50)")  # fmt: skip
    parser.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(args: argparse.Namespace):
    from llava_jax.serve.config import ServeConfig

    if args.local_image_dir is not None and not args.local_image_dir.is_dir():
        raise CommandError(f"--local-image-dir {args.local_image_dir}: not a directory")
    return ServeConfig(
        model_name=args.model_name or args.model.resolve().name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        allow_remote_images=args.allow_remote_images,
        local_image_dir=args.local_image_dir,
        default_max_tokens=args.max_tokens,
        default_temperature=args.temperature,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # bad flags fail before anything heavy loads
    if args.template is not None:
        from llava_jax.data.templates import get_template

        get_template(args.template)
    try:
        import uvicorn

        from llava_jax.serve.app import create_app
    except ImportError as e:
        raise CommandError(
            f"serving needs the serve extra: pip install 'llava-jax[serve]' ({e})"
        ) from None
    from llava_jax.pipeline import Pipeline

    if not _is_loopback(args.host) and cfg.api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it "
              "can use it (--api-key)", file=sys.stderr)  # fmt: skip
    overrides = {"dtype": args.dtype} if args.dtype else {}
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731
    pipeline = Pipeline.load(args.model, template=args.template, echo=echo, **overrides)
    app = create_app(pipeline, cfg)
    print(f"serving {cfg.model_name!r} on http://{args.host}:{args.port}/ (chat page) and "
          f"http://{args.host}:{args.port}/v1 (OpenAI API)", file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
