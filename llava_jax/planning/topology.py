"""Cloud TPU slice names (`v5p-128`, `v5e-16`, ...) and their compile-only devices.

The number in a name is what Cloud TPU's accelerator type says: TensorCores for v4 and v5p
(two per chip, run as one "megacore" device: v5p-128 is 64 chips), chips for v5e and v6e.
Chips form a 3D torus (v4, v5p) or a 2D one (v5e, v6e: 2x2, 2x4, 4x4, ..., 16x16). A 3D
slice below one 4x4x4 cube is 2x2x1, 2x2x2, 2x2x4 or 2x4x4; from one cube up it is whole
cubes, any number of them (v5p-384 is 4x4x12), in the most cube-like shape: the longest side
as short as it can be, then the shortest as long (the shapes of Google's v5p page and of
xpk's `system_characteristics.py`: v5p-768 4x8x12, v5p-1536 8x8x12, v5p-9216 12x16x24). A 3D
slice of whole cubes has wraparound links, a 2D side of 16 chips (a full pod's) has them.

`compile_devices` asks libtpu (`pip install -e .[tpu]`) for the slice's devices without any
TPU attached; programs can be lowered and compiled for them, not run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile

from llava_jax.hardware import CHIPS, Chip

# generation -> (get_topology_desc's name prefix, name counts TensorCores, dimensions)
_GENERATIONS = {
    "v4": ("v4", True, 3),
    "v5p": ("v5", True, 3),
    "v5e": ("v5e", False, 2),
    "v6e": ("v6e", False, 2),
}
_ALIASES = {"v5litepod": "v5e"}  # the Cloud TPU accelerator-type spelling of v5e
# Chips of the largest single slice (Cloud TPU v4 and v5p pages: a v4 pod, 16x16x24 v5p).
_MAX_CHIPS = {"v4": 4096, "v5p": 6144}
VALID_FORMS = (
    "v4-N or v5p-N (N TensorCores, 2 per chip: 8, 16, 32, 64, then any multiple of 128, "
    "whole 4x4x4 cubes; at most v4-8192, v5p-12288), "
    "v5e-N or v6e-N (N chips: 1 or a power of two >= 4, at most 256), e.g. v5p-384, v5e-256"
)
INSTALL_HINT = "libtpu is not installed; install it with `pip install -e .[tpu]`"


class TopologyError(ValueError):
    """An unknown slice name, or a topology libtpu cannot describe; one line."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """One or more identical TPU slices.

    Attributes:
      name: the accelerator type, e.g. "v5p-128".
      generation: "v4", "v5p", "v5e" or "v6e" (a key of `hardware.CHIPS`).
      shape: chips along each torus dimension, e.g. (4, 4, 4).
      num_slices: slices joined over the data-centre network (multi-slice).
    """

    name: str
    generation: str
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def topology_name(self) -> str:
        """The `get_topology_desc` name, e.g. "v5:4x4x4"."""
        return f"{_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"

    @property
    def chip_config_name(self) -> str:
        return "megacore" if _GENERATIONS[self.generation][1] else "default"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.chips_per_slice == 1:
            return (1, 1, 1)
        if len(self.shape) == 2 and self.chips_per_slice == 8:
            return (2, 4, 1)  # v5e-8 / v6e-8 are one host of 8 chips
        return (2, 2, 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        if len(self.shape) == 3:
            full = all(s % 4 == 0 for s in self.shape)  # whole 4x4x4 cubes
            return (full, full, full)
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (
            f"{self.name}{slices} ({self.num_chips} chips {self.chip.name}, {self.topology_name})"
        )


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape of `chips` chips on a `dims`-D torus (a power of two, or whole cubes)."""
    if dims == 3 and chips >= 64:
        return _cubes(chips // 64)
    shape = [2, 2, 1] if dims == 3 else [2, 2]
    if chips == 1 and dims == 2:
        return (1, 1)
    while _product(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def _cubes(n: int) -> tuple[int, int, int]:
    """The shape of `n` 4x4x4 cubes: the longest side shortest, then the shortest longest."""
    shapes = [
        (a, b, n // (a * b))
        for a in range(1, n + 1)
        for b in range(a, n + 1)
        if n % (a * b) == 0 and n // (a * b) >= b
    ]
    a, b, c = min(shapes, key=lambda s: (s[2], -s[0]))
    return (4 * a, 4 * b, 4 * c)


def _product(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`"v5p-128"` -> Topology("v5p-128", "v5p", (4, 4, 4)); a one-line TopologyError else."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", name.strip().lower())
    if not match:
        raise TopologyError(f"unknown TPU topology {name!r}; valid forms: {VALID_FORMS}")
    generation = _ALIASES.get(match[1], match[1])
    n = int(match[2])
    _, counts_cores, dims = _GENERATIONS[generation]
    power_of_two = n > 0 and n & (n - 1) == 0
    if counts_cores:
        chips = n // 2
        ok = n % 2 == 0 and (chips in (4, 8, 16, 32) or chips % 64 == 0)
        ok = ok and 0 < chips <= _MAX_CHIPS[generation]
    else:
        ok, chips = power_of_two and (n == 1 or 4 <= n <= 256), n
    if not ok:
        raise TopologyError(f"unsupported TPU topology {name!r}; valid forms: {VALID_FORMS}")
    if num_slices < 1:
        raise TopologyError(f"--num-slices must be at least 1, got {num_slices}")
    return Topology(f"{generation}-{n}", generation, _torus(chips, dims), num_slices)


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _captured_stderr():
    """Collects what C++ writes to fd 2 (libtpu's warnings about the missing TPU host
    environment, harmless here) into a list of one string, instead of the console."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def compile_devices(topology: Topology) -> list:
    """The slice's compile-only `jax.Device`s, sorted by (slice, id).

    Raises:
      TopologyError: libtpu is missing, or refused the topology.
    """
    if not libtpu_available():
        raise TopologyError(INSTALL_HINT)
    # Another process (a test run, a second plan) may hold libtpu's lock file; nothing here
    # touches a TPU, so sharing the library is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _captured_stderr() as err:
        try:
            desc = topologies.get_topology_desc(
                platform="tpu",
                topology_name=topology.topology_name,
                chip_config_name=topology.chip_config_name,
                chips_per_host_bounds=topology.chips_per_host_bounds,
                num_slices=topology.num_slices,
                wrap=topology.wrap,
            )
        except Exception as e:  # noqa: BLE001 (libtpu raises XlaRuntimeError and friends)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TopologyError(f"libtpu cannot describe {topology.describe()}: {first}") from e
    devices = sorted(desc.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
    if len(devices) != topology.num_chips:
        raise TopologyError(
            f"libtpu gave {len(devices)} devices for {topology.describe()}, expected "
            f"{topology.num_chips} (stderr: {err[0][-200:] if err else ''})"
        )
    return devices
