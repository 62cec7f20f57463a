"""Keeps libraries' messages that do not concern a command-line user off the console.

- libtpu (installed for `plan`, which compiles for TPUs on any machine) is loaded by JAX's
  backend search on every machine; without TPU chips it prints `E0000 ... INVALID_ARGUMENT`
  errors about the TPU host environment it cannot find. Where this machine has no TPU,
  JAX is told not to look for one (`plan` loads libtpu itself, for compiling only).
- transformers, imported without torch, advises that "PyTorch was not found"; the commands
  that need torch say so themselves, in one line.

`quiet()` runs before a command, after its arguments are parsed (so `--help` stays instant).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os


def on_cloud_tpu() -> bool:
    """A Cloud TPU VM: TPU device files, or the worker list a TPU runtime sets."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or bool(
        os.environ.get("TPU_WORKER_HOSTNAMES")
    )


def skip_absent_tpu() -> None:
    """Where no TPU can be found, JAX's TPU backend fails at once instead of loading libtpu.

    The backend stays registered (TPU lowering rules and `plan`'s compile-only topology need
    the platform to be known); only its factory is replaced, before any backend starts.
    Nothing changes when the user chose the platforms (JAX_PLATFORMS, JAX_FORCE_TPU_INIT),
    when libtpu is not installed (JAX does not try it then), or when a TPU is attached (on
    the PCI bus, as JAX itself checks, or by `on_cloud_tpu`).
    """
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return
    if importlib.util.find_spec("libtpu") is None or on_cloud_tpu():
        return
    # JAX has no public switch that leaves one backend out.
    from jax._src import hardware_utils, xla_bridge

    registration = getattr(xla_bridge, "_backend_factories", {}).get("tpu")
    if registration is None or not dataclasses.is_dataclass(registration):
        return  # another JAX: its messages stay
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        # A factory returning None is a backend that failed to start; "tpu" is quiet about it.
        xla_bridge._backend_factories["tpu"] = dataclasses.replace(
            registration, factory=lambda: None
        )


class _DropTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


def drop_torch_advice() -> None:
    """transformers logs its advice through its root logger, "transformers", on import."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchAdvice) for f in logger.filters):
        logger.addFilter(_DropTorchAdvice())


def quiet() -> None:
    drop_torch_advice()
    skip_absent_tpu()
