"""`llava-jax serve`: an OpenAI-compatible multimodal chat server with a browser chat page.

`create_app(pipeline, ServeConfig(...))` builds the FastAPI app; `llava_jax.cli.serve` runs it
with uvicorn. Modules: `config` (limits and defaults, as data), `errors` (OpenAI-style JSON
errors), `guards` (Host, Origin and content-type checks; the page's security headers),
`request` (parsing and validating a chat request), `images` (reading and decoding its images
within a memory budget), `fetch` (remote images, guarded), `scheduler` (the thread that
batches requests into the jitted generator), `app` (routes, SSE), `http` (uvicorn with a
deadline on request headers).
"""

from llava_jax.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args, **kwargs):
    """`llava_jax.serve.app.create_app`, imported lazily (FastAPI is the `serve` extra)."""
    from llava_jax.serve.app import create_app as create

    return create(*args, **kwargs)
