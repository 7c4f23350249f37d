"""Device mesh and rule-based sharding of parameter/optimizer trees (big_vision style).

One mesh axis, ``data``. Batches are split over it. Parameters follow ``rules``: an ordered list of
``(regex on the '/'-joined tree path, PartitionSpec)``; the first match wins, the default is
replicated. ``fsdp=True`` adds one catch-all rule: every leaf with at least ``fsdp_min_size``
elements is sharded over ``data`` along its largest axis that the axis size divides. Because the
rule reads only shapes and path suffixes, the optimizer state (same shapes, paths that end in the
parameter path) is sharded exactly like its parameters. Under a scanned stack (a path component
named exactly as in ``STACKED_MODULES``) the leading layer axis is never the sharded one: each
scan step slices one layer, which must not need a gather across devices.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
# Modules that hold a scanned stack of blocks, parameters stacked on axis 0 (models' scan_layers).
STACKED_MODULES = ("transformer", "layer", "in_blocks", "out_blocks")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1D ``data`` mesh over all (global) devices."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices).reshape(-1), (DATA,))


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int,
               stacked: bool = False) -> P:
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(int(stacked), len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA
            return P(*spec)
    return P()


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = (), *,
               fsdp: bool = False, fsdp_min_size: int = 2 ** 12) -> Any:
    """PartitionSpecs for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    axis = mesh.shape[DATA]
    compiled = [(re.compile(r), spec) for r, spec in rules]

    def spec_for(path, leaf):
        name = _path_str(path)
        for regex, spec in compiled:
            if regex.search(name):
                return spec
        if fsdp and axis > 1 and getattr(leaf, "ndim", 0) > 0:
            stacked = any(part in STACKED_MODULES for part in name.split("/")[:-1])
            return _fsdp_spec(tuple(leaf.shape), axis, fsdp_min_size, stacked)
        return P()
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = (), *,
                   fsdp: bool = False, fsdp_min_size: int = 2 ** 12) -> Any:
    specs = tree_specs(tree, mesh, rules, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree``'s arrays resident on the first local device (to check FSDP savings)."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.size * shard.data.dtype.itemsize
    return total
