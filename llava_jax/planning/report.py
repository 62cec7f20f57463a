"""Plans as readable text: one plan in detail, or a search as one table."""

from __future__ import annotations

from collections.abc import Sequence

from llava_jax.hardware import Chip
from llava_jax.planning.estimate import Plan

GB = 1e9


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def seconds_text(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def mesh_text(p: Plan) -> str:
    return f"data={p.mesh['data']} fsdp={p.mesh['fsdp']} tensor={p.mesh['tensor']}"


def fit_text(p: Plan) -> str:
    if p.memory is None:
        return "does not fit" if not p.fits else "fits"
    share = p.memory.used / p.memory.hbm
    return f"{'fits' if p.fits else 'does not fit'} ({100 * share:.0f}% of HBM)"


def format_plan(p: Plan, chip: Chip, title: str) -> str:
    """The detailed report of one plan."""
    lines = [
        title,
        f"  mesh {mesh_text(p)}, remat {p.remat_policy}, global batch {p.batch_size} rows "
        f"({p.rows_per_chip:g} per chip per micro-batch, grad_accum {p.grad_accum}), "
        f"{p.seq_len} tokens per row, attention {p.attention}, loss {p.loss_impl}",
    ]
    m = p.memory
    lines.append("Memory per chip (XLA memory_analysis, GB)")
    if m is None:
        lines.append(f"  does not fit: {p.error}")
    elif m.argument == 0 and not p.fits:  # from the out-of-memory message alone
        lines += [f"  used  {_gb(m.used)} of {_gb(m.hbm)}: does not fit", f"  XLA: {p.error}"]
    else:
        rows = [
            ("parameters", m.params),
            ("optimizer state", m.opt_state),
            ("batch", m.batch),
            ("arguments (all of the above)", m.argument),
            ("outputs", m.output),
            ("temporaries (activations, gradients)", m.temp),
            ("aliased (outputs reusing donated arguments)", -m.alias),
            ("total = arguments + outputs + temporaries - aliased", m.total),
            ("peak", m.peak or None),
            ("HBM", m.hbm),
        ]
        lines += [f"  {name:<52} {_gb(v):>9}" for name, v in rows]
        lines.append(f"  -> {fit_text(p)}")
    c = p.cost
    if c is not None:
        lines.append("Cost per chip per step (compiler estimates, not measurements)")
        ratio = c.flops * p.num_chips / p.model_flops if p.model_flops else None
        lines += [
            f"  XLA FLOPs              {c.flops:.3e}"
            + (f"  ({ratio:.2f}x the model FLOPs: remat, optimizer)" if ratio else ""),
            f"  bytes accessed         {c.bytes_accessed:.3e}",
            f"  step time, XLA         {seconds_text(c.xla_seconds)}  (optimal_seconds)",
            f"  step time, roofline    {seconds_text(c.roofline_seconds)}  "
            "(max of FLOPs / peak, bytes / HBM bandwidth)",
            f"  MFU                    {_pct(p.mfu(chip))}  "
            f"(model FLOPs {p.model_flops:.3e} per step / (step time x {p.num_chips} chips x "
            f"{chip.peak_bf16_flops / 1e12:g} TFLOP/s))",
            f"  tokens/s               {p.tokens_per_second:,.0f} "
            f"({p.tokens_per_second / p.num_chips:,.0f} per chip, padded rows)",
            f"  from                   {c.method}",
        ]
        if p.cost_plausible is False:
            lines.append(
                "  WARNING: XLA counts fewer FLOPs than the model needs: it put matmuls in loops "
                "of its own (collective matmuls), whose body its cost analysis counts once; the "
                "step time is too low and the MFU too high"
            )
    elif p.error and p.memory is not None and p.fits:
        lines.append(f"Cost per chip per step: {p.error}")
    lines.append(f"Compile time: {p.compile_seconds:.1f} s")
    return "\n".join(lines)


TABLE_COLUMNS = (
    "data",
    "fsdp",
    "tensor",
    "remat",
    "accum",
    "rows/chip",
    "GB/chip",
    "fits",
    "step",
    "MFU",
    "tok/s/chip",
)


def table_row(p: Plan, chip: Chip) -> tuple[str, ...]:
    tps = p.tokens_per_second
    return (
        str(p.mesh["data"]),
        str(p.mesh["fsdp"]),
        str(p.mesh["tensor"]),
        p.remat_policy,
        str(p.grad_accum),
        f"{p.rows_per_chip:g}",
        _gb(p.memory.used) if p.memory else "-",
        "yes" if p.fits else "no",
        seconds_text(p.step_seconds),
        _pct(p.mfu(chip)),
        "-" if tps is None else f"{tps / p.num_chips:,.0f}",
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def sort_key(p: Plan):
    """Fitting plans first, fastest first; then the rest by memory used."""
    s = p.step_seconds
    return (
        not p.fits,
        s if s is not None else float("inf"),
        p.memory.used if p.memory else float("inf"),
    )


def format_search(plans: Sequence[Plan], chip: Chip, title: str) -> str:
    ordered = sorted(plans, key=sort_key)
    out = [title, format_table(TABLE_COLUMNS, [table_row(p, chip) for p in ordered])]
    errors = [p for p in ordered if p.error and p.memory is None]
    out += [
        f"  ({mesh_text(p)}, remat {p.remat_policy}, accum {p.grad_accum}: {p.error})"
        for p in errors
    ]
    out.append("Step time and MFU are compiler estimates (XLA optimal_seconds), not measurements.")
    return "\n".join(out)
