"""Parameter trees as flat {"a/b/c": leaf} dicts and back.

Flat paths are what checkpoints, conversion tables, optimizer labels and LoRA rules match
against; nested dicts are what `nnx.state` and orbax hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flat_to_nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def nested_to_flat(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(nested_to_flat(value, path + "/"))
        else:
            flat[path] = value
    return flat
