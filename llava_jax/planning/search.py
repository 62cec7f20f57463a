"""`plan --search`: compile alternatives to a recipe's mesh, remat policy and micro-batch size.

Two rounds, so that the count of compiles stays near a dozen rather than a full grid:
1. The recipe as configured, then one change at a time: FSDP over every chip, data x FSDP
   splits (data 2, 4), tensor parallelism 2 and 4, each remat policy (none, dots, full),
   and half / a quarter of the rows per chip (grad_accum x2, x4: the global batch, and so
   the optimisation, stays the same).
2. The best mesh and the best remat policy of round 1 together, with the smallest
   grad_accum that fits when they alone do not.

Every candidate's memory comes from its own full compile; its cost from the small unrolled
compiles (`estimate.extrapolated_cost`), only when it fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from llava_jax.planning.estimate import Plan, PlanError, apply, plan
from llava_jax.planning.report import sort_key

MESHES = ((1, -1, 1), (2, -1, 1), (4, -1, 1), (1, -1, 2), (1, -1, 4))
REMATS = ("none", "dots", "full")
ACCUM_FACTORS = (2, 4)

Changes = dict[str, Any]


def _mesh_changes(mesh: tuple[int, int, int]) -> Changes:
    return {"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]}


def round_one(config) -> list[Changes]:
    """The baseline ({}) and the one-knob changes."""
    out: list[Changes] = [{}]
    out += [_mesh_changes(m) for m in MESHES]
    out += [{"train.remat_policy": r, "train.vision_remat_policy": r} for r in REMATS]
    accum = int(config.optimizer.grad_accum)
    out += [{"optimizer.grad_accum": accum * f} for f in ACCUM_FACTORS]
    return out


def _key(config, changes: Changes) -> tuple:
    """What a candidate resolves to, so that equal candidates compile once."""
    c = apply(config, changes)
    return (
        c.mesh.data,
        c.mesh.fsdp,
        c.mesh.tensor,
        c.train.remat_policy,
        c.train.vision_remat_policy,
        c.optimizer.grad_accum,
    )


def search(
    config,
    devices,
    *,
    plan_kwargs: dict[str, Any],
    on_plan: Callable[[Plan, Changes], None] | None = None,
) -> list[tuple[Plan, Changes]]:
    """Compiles the candidates; returns (plan, changes) for each, in the order tried."""
    done: dict[tuple, tuple[Plan, Changes]] = {}

    def run(candidates: Iterable[Changes]):
        for changes in candidates:
            key = _key(config, changes)
            if key in done:
                continue
            candidate = apply(config, changes)
            try:
                result = plan(candidate, devices, **plan_kwargs)
            except PlanError as e:
                result = _invalid(candidate, devices, plan_kwargs, str(e))
            done[key] = (result, changes)
            if on_plan is not None:
                on_plan(result, changes)

    first = round_one(config)
    run(first)
    tried = list(done.values())
    best_mesh = _best(tried, lambda ch: ch == {} or "mesh.data" in ch)
    best_remat = _best(tried, lambda ch: ch == {} or "train.remat_policy" in ch)
    combined = {**best_mesh, **best_remat}
    second = [combined]
    accum = int(config.optimizer.grad_accum)
    second += [{**combined, "optimizer.grad_accum": accum * f} for f in ACCUM_FACTORS]
    for changes in second:
        key = _key(config, changes)
        if key in done and done[key][0].fits:
            break  # the combination (or a smaller accum) already fits
        run([changes])
        if done[key][0].fits:
            break
    return list(done.values())


def _best(tried: list[tuple[Plan, Changes]], among: Callable[[Changes], bool]) -> Changes:
    pool = [(p, ch) for p, ch in tried if among(ch)]
    p, ch = min(pool, key=lambda pc: sort_key(pc[0]))
    return {k: v for k, v in ch.items()} if p.fits else {}


def _invalid(config, devices, plan_kwargs, error: str) -> Plan:
    """A Plan that records why a candidate was not compiled (e.g. a batch that does not
    divide over the chips)."""
    return Plan(
        topology=plan_kwargs.get("topology_name", "?"),
        num_chips=len(devices),
        chip=plan_kwargs["chip"].name,
        mesh={"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
        remat_policy=str(config.train.remat_policy),
        grad_accum=int(config.optimizer.grad_accum),
        batch_size=int(config.train.batch_size),
        rows_per_chip=0.0,
        seq_len=int(config.data.max_len),
        fits=False,
        memory=None,
        error=error,
        cost=None,
        model_flops=0.0,
        compile_seconds=0.0,
    )
