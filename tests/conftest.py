import os

# Tests see 8 CPU devices (sharding tests need a mesh); must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One JAX persistent compilation cache for the run, shared by both xdist workers and every
# CLI subprocess a test starts (they compile the same tiny programs again and again): made by
# the controlling process before the workers start, removed when the run ends. Entries are
# keyed by the program, the compile options and the JAX version, so a hit is the same
# executable; the size cap turns on JAX's file lock, so concurrent writers are safe.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get(
    "PYTEST_XDIST_WORKER"
)
if _OWN_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llava-jax-tests-jit-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# -- the serving tests' model and servers (test_serve*.py) -------------------------------------

import pytest  # noqa: E402


# The model and its pipeline (its compiled programs) are built once a session: building and
# compiling them is most of a serving test module's time.
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from serve_helpers import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def pipeline(model_dir):
    from serve_helpers import TEMPLATE

    from llava_jax.inference.pipeline import Pipeline

    return Pipeline.load(model_dir, template=TEMPLATE, echo=lambda _: None)


@pytest.fixture(scope="module")
def serve(pipeline):
    """serve(**config) -> a live server's URL; servers share the pipeline (and its compiled
    programs) and stop at the end of the module."""
    from serve_helpers import APPS, MODEL, LiveServer

    from llava_jax.serve import ServeConfig, create_app

    servers = {}

    def start(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in servers:
            cfg = ServeConfig(model_name=MODEL, **overrides)
            servers[key] = LiveServer(create_app(pipeline, cfg), cfg)
            APPS[servers[key].url] = servers[key].app
        return servers[key].url

    yield start
    for server in servers.values():
        server.close()


# -- the tpu_scripts tests' sandbox (test_tpu_scripts_*.py) -----------------------------------


@pytest.fixture
def sandbox(tmp_path):
    """A working directory with a config file, a HOME, and a guard `gcloud` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud-calls"
    guard = bin_dir / "gcloud"
    guard.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexit 97\n')
    guard.chmod(0o755)
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "exp.py").write_text("def get_config(arg=None):\n    return None\n")
    return tmp_path


# -- the conversion tests' tiny models (test_convert_*.py, test_convert_original_*.py) ---------


def _once_per_name(tmp_path_factory, build):
    """get(name) -> build(name, a fresh folder), built on the first call for that name."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    """case(name) -> a `convert_helpers.Case`: built (saved, converted, exported) once a session,
    shared by the round-trip and refusal tests."""
    from convert_helpers import Case

    return _once_per_name(tmp_path_factory, Case)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(name) -> a `convert_original_helpers.Converted`: written in the original layout
    and converted by both routes once a session, shared by the parity and refusal tests."""
    from convert_original_helpers import Converted

    return _once_per_name(tmp_path_factory, Converted)
