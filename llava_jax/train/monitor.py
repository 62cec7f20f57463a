"""What a person watching a run sees: a progress line, TensorBoard scalars, metrics.jsonl.

Only process 0 writes. Metrics arrive as device scalars and are fetched only on logging
steps, so the host never waits on the device in between.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping

from etils import epath

from llava_jax.train.tensorboard import SummaryWriter


def _format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Monitor:
    """Accumulates per-step metrics and reports them every `log_every` steps.

    Args:
      workdir: run directory; writes `tensorboard/` and `metrics.jsonl` there.
      total_steps: for the progress fraction and ETA.
      enabled: False on processes other than 0 (they stay silent).
      stream: where the progress line goes (stderr by default).
    """

    def __init__(
        self,
        workdir,
        total_steps: int,
        *,
        enabled: bool = True,
        stream=None,
        flops_per_step: float = 0.0,
        peak_flops: float | None = None,
    ):
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step  # model FLOPs of one step (`train/flops.py`)
        self.peak_flops = peak_flops  # of all chips together; None on CPUs
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._writer = SummaryWriter(epath.Path(workdir) / "tensorboard") if enabled else None
        self._jsonl = None
        if enabled:
            # One file per start: object stores (gs://) cannot append to a file.
            starts = len(list(epath.Path(workdir).glob("metrics*.jsonl")))
            name = "metrics.jsonl" if starts == 0 else f"metrics.{starts}.jsonl"
            self._jsonl = (epath.Path(workdir) / name).open("w")
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        """Marks the step the timing window starts from (after compilation, ideally)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def report(self, step: int, metrics: Mapping[str, float], tokens: float, samples: float):
        """Writes `metrics` (already fetched to host floats) for `step`.

        Args:
          tokens, samples: counted since the previous report, for the rates.
        Returns:
          the metrics with the rates added (`tokens_per_s`, `samples_per_s`, `step_time`,
          and `train/mfu` when the chip's peak is known).
        """
        now = time.perf_counter()
        out = dict(metrics)
        if self._last_time is not None and step > self._last_step:
            elapsed = now - self._last_time
            out["step_time"] = elapsed / (step - self._last_step)
            out["tokens_per_s"] = tokens / elapsed
            out["samples_per_s"] = samples / elapsed
            if self.peak_flops:
                out["train/mfu"] = self.flops_per_step / out["step_time"] / self.peak_flops
        self._last_time, self._last_step = now, step
        if not self.enabled:
            return out
        self._writer.scalars(step, {k: float(v) for k, v in out.items()})
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in out.items()}}))
        self._jsonl.write("\n")
        self._jsonl.flush()
        self._progress(step, out)
        return out

    def _progress(self, step: int, m: Mapping[str, float]) -> None:
        eta = (self.total_steps - step) * m.get("step_time", math.nan)
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {m['train/loss']:.4f}" if "train/loss" in m else "",
            f"lr {m['train/lr']:.2e}" if "train/lr" in m else "",
            f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else "",
            f"MFU {100 * m['train/mfu']:.1f}%" if "train/mfu" in m else "",
            f"ETA {_format_seconds(eta)}",
        ]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
