"""`llava-jax serve`: an OpenAI-compatible chat API and a browser chat page for one model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from llava_jax.cli import CommandError
from llava_jax.paths import local_path, location

API_KEY_ENV = "LLAVA_JAX_API_KEY"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat API and a chat page",
        description="Serve POST /v1/chat/completions (OpenAI format, images as base64 data "
        "URLs, streaming), GET /v1/models, GET /health, and a chat page at /. Concurrent "
        "requests are decoded together: they join and leave the decoding slots at every step.",
    )
    parser.add_argument("--model", required=True, type=location, metavar="PATH",
                        help="llava-jax model directory (local or gs://), or a Hugging Face "
                        "checkpoint (converted in memory)")  # fmt: skip
    parser.add_argument("--adapter", type=local_path, metavar="DIR",
                        help="LoRA adapters trained on --model, unmerged (`llava-jax "
                        "export` of a LoRA run without --merge)")  # fmt: skip
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
    parser.add_argument("--image-memory-mb", type=float, default=1024.0, metavar="MB",
                        help="decoded images of all requests being prepared stay within this; "
                        "8 bytes a pixel (default 1024: 8 images of 4096x4096)")  # fmt: skip
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs from public addresses (default: "
                        "refused)")  # fmt: skip
    parser.add_argument("--fetch-network", action="append", default=[], metavar="CIDR",
                        help="with --allow-remote-images, also fetch from this network "
                        "(e.g. 10.0.0.0/8; repeatable)")  # fmt: skip
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name clients may use besides IP addresses and localhost "
                        "(repeatable; * for any)")  # fmt: skip
    parser.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (https://app.example) whose pages may call the API "
                        "(repeatable; * for any)")  # fmt: skip
    parser.add_argument("--read-timeout", type=float, default=60.0, metavar="S",
                        help="a request's body must arrive within this (default 60)")  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                        help="a request's headers must arrive within this "
                        "(default 10)")  # fmt: skip
    parser.add_argument("--max-connections", type=int, default=512, metavar="N",
                        help="open connections beyond which a request gets 503 "
                        "(default 512; keep it under `ulimit -n`)")  # fmt: skip
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
    parser.add_argument("--scheduler", choices=("engine", "batch"), default="engine",
                        help="engine (default): requests join and leave the --max-batch "
                        "slots at every decode step; batch: batches decoded from start to "
                        "end")  # fmt: skip
    parser.add_argument("--prefix-cache-mb", type=float, default=1024.0, metavar="MB",
                        help="the engine's cache of prompt prefixes (KV entries reused by "
                        "prompts that start with the same tokens and images; 0: off; "
                        "default 1024)")  # fmt: skip
    parser.add_argument("--slot-tokens", type=int, default=None, metavar="N",
                        help="each engine slot's length in tokens, prompt and answer: the "
                        "longest request served (default: the model's context). The slots' "
                        "KV cache grows with the requests to --max-batch x N tokens at "
                        "most")  # fmt: skip
    parser.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _api_key(args: argparse.Namespace) -> str | None:
    from llava_jax.serve.config import check_api_key

    where, key = ("--api-key", args.api_key) if args.api_key is not None else (
        f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV))  # fmt: skip
    if key is not None:
        try:
            check_api_key(key)
        except ValueError as e:
            raise CommandError(f"{where}: {e}") from None
    return key


def config_from_args(args: argparse.Namespace):
    from llava_jax.serve.config import ServeConfig

    if args.local_image_dir is not None and not args.local_image_dir.is_dir():
        raise CommandError(f"--local-image-dir {args.local_image_dir}: not a directory")
    for cidr in args.fetch_network:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise CommandError(f"--fetch-network {cidr}: not a network (CIDR)") from None
    return ServeConfig(
        model_name=args.model_name or args.model.name,
        api_key=_api_key(args),
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        image_memory_bytes=int(args.image_memory_mb * 1024 * 1024),
        allow_remote_images=args.allow_remote_images,
        fetch_networks=tuple(args.fetch_network),
        allowed_hosts=tuple(h.lower() for h in args.allowed_host),
        allowed_origins=tuple(args.allowed_origin),
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        read_timeout_s=args.read_timeout,
        local_image_dir=args.local_image_dir,
        default_max_tokens=args.max_tokens,
        default_temperature=args.temperature,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
        scheduler=args.scheduler,
        prefix_cache_bytes=int(args.prefix_cache_mb * 1024 * 1024),
        slot_tokens=args.slot_tokens,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)  # bad flags fail before anything heavy loads
    except ValueError as e:  # a limit ServeConfig refuses
        raise CommandError(str(e)) from None
    if args.template is not None:
        from llava_jax.data.templates import get_template

        get_template(args.template)
    try:
        import uvicorn

        from llava_jax.serve.app import create_app
        from llava_jax.serve.http import uvicorn_config
    except ImportError as e:
        raise CommandError(
            f"serving needs the serve extra: pip install 'llava-jax[serve]' ({e})"
        ) from None
    from llava_jax.inference.pipeline import Pipeline

    if not _is_loopback(args.host) and cfg.api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it "
              "can use it (--api-key)", file=sys.stderr)  # fmt: skip
    overrides = {"dtype": args.dtype} if args.dtype else {}
    echo = lambda message: print(message, file=sys.stderr)  # noqa: E731
    pipeline = Pipeline.load(args.model, template=args.template, echo=echo,
                             adapter=args.adapter, **overrides)  # fmt: skip
    try:
        app = create_app(pipeline, cfg)
    except ValueError as e:  # a limit the model cannot meet (--slot-tokens over its context)
        raise CommandError(str(e)) from None
    url = base_url(args.host, args.port)
    print(f"serving {cfg.model_name!r} on {url}/ (chat page) and {url}/v1 (OpenAI API)",
          file=sys.stderr)  # fmt: skip
    uvicorn.Server(uvicorn_config(app, cfg, args.host, args.port)).run()
    return 0
