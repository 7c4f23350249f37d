"""PyTorch <-> Flax parameter layouts as a name map plus invertible transforms.

A :class:`NameMap` derives, for every leaf of a Flax parameter tree, the official PyTorch key and
the transform between the two layouts:

* module paths: ``transformer_3`` -> ``transformer.3`` for the list containers a model declares,
  ``/`` -> ``.``;
* leaves by name and rank: Dense ``kernel`` [in, out] <-> Linear ``weight`` [out, in]; Conv
  ``kernel`` [kh, kw, in, out] <-> ``weight`` [out, in, kh, kw]; norm ``scale`` <-> ``weight``;
  codebook ``embedding`` <-> ``embedding.weight``; raw parameters keep their name and shape;
* per-model overrides (regexes on the Flax path), e.g. 1x1 convs that the Flax model runs as
  Dense layers, or the fused attention projection ``in_proj_weight``;
* scanned stacks: a model run with ``scan_layers`` keeps block ``i``'s parameters at index ``i``
  of one stacked module (``transformer`` with a leading depth axis) instead of ``transformer_i``.
  :func:`unstack_layers` / :func:`to_layout` convert between the two, so import, export and
  native checkpoints work in either layout.

Import checks the state dict against the expected keys and shapes and reports every missing,
unexpected and mis-shaped key at once; nothing loads partially.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T)
CONV = Transform("conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
CONV1X1_AS_DENSE = Transform(
    "conv1x1_as_dense", lambda a: a.reshape(a.shape[:2]).T, lambda a: a.T[:, :, None, None])


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: lists every missing/unexpected/mis-shaped key."""

    def __init__(self, model: str, missing: list[str], unexpected: list[str],
                 misshaped: list[str], hint: str = ""):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        parts = [f"checkpoint does not match {model}:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped)):
            if items:
                shown = items if len(items) <= 40 else items[:40] + [f"... {len(items) - 40} more"]
                parts.append(f"  {len(items)} {label}:\n    " + "\n    ".join(shown))
        if hint:
            parts.append(f"  hint: {hint}")
        super().__init__("\n".join(parts))


@dataclasses.dataclass(frozen=True)
class Entry:
    flax_path: tuple[str, ...]
    torch_key: str
    transform: Transform


@dataclasses.dataclass(frozen=True)
class NameMap:
    """How one model's Flax tree is named in the official PyTorch state dict.

    list_names: Flax module names ``<name>_<i>`` that are PyTorch ``ModuleList``/``Sequential``
      entries ``<name>.<i>``.
    overrides: ``(regex on the '/'-joined Flax path, transform, (key pattern, replacement))``;
      the first match replaces the default transform and, when given, rewrites the PyTorch key
      with ``re.sub`` (e.g. ``attn.in_proj.weight`` -> ``attn.in_proj_weight``).
    renames: ``(pattern, replacement)`` pairs applied in order with ``re.sub`` to every PyTorch
      key after the rules above (the replacement may be a function of the match).
    ignored: regexes of PyTorch keys that are known and deliberately dropped on import.
    scanned: list names whose blocks a scanned model stacks into one module of that exact name.
    """

    model: str
    list_names: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Transform, tuple[str, str] | None], ...] = ()
    renames: tuple[tuple[str, Any], ...] = ()
    ignored: tuple[str, ...] = ()
    scanned: tuple[str, ...] = ()

    def entry(self, flax_path: tuple[str, ...], ndim: int) -> Entry:
        joined = "/".join(flax_path)
        *modules, leaf = flax_path
        list_re = re.compile(rf"^({'|'.join(map(re.escape, self.list_names))})_(\d+)$") \
            if self.list_names else None
        torch_modules = [list_re.sub(r"\1.\2", m) if list_re else m for m in modules]
        if leaf == "kernel":
            torch_leaf, transform = "weight", {2: LINEAR, 4: CONV}.get(ndim)
        elif leaf == "scale":
            torch_leaf, transform = "weight", IDENTITY
        elif leaf == "embedding":
            torch_leaf, transform = "embedding.weight", IDENTITY
        else:
            torch_leaf, transform = leaf, IDENTITY
        key = ".".join(torch_modules + [torch_leaf])
        for pattern, override, rename in self.overrides:
            if re.search(pattern, joined):
                transform = override
                if rename is not None:
                    key = re.sub(rename[0], rename[1], key)
                break
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        if transform is None:
            raise ValueError(f"no layout rule for a rank-{ndim} kernel at {joined}")
        return Entry(flax_path, key, transform)

    def entries(self, params_or_shapes: Mapping) -> list[Entry]:
        """Entries of an unrolled tree (see :func:`unstack_layers` for a scanned one)."""
        flat = traverse_util.flatten_dict(_unfreeze(params_or_shapes))
        out = [self.entry(path, len(leaf.shape)) for path, leaf in flat.items()]
        keys = [e.torch_key for e in out]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"name map of {self.model} is not injective: {dup}")
        return out

    def is_ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignored)


def _index(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i] if isinstance(leaf, (np.ndarray, jax.Array)) else np.asarray(leaf)[i]


def _stack(leaves: list[Any]) -> Any:
    """Host arrays stack on the host; jax arrays (and tracers, inside ``jit``) with jnp."""
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    if any(isinstance(x, jax.Array) for x in leaves):
        return jax.numpy.stack(leaves)
    return np.stack([np.asarray(x) for x in leaves])


def _depth(tree: Mapping) -> int:
    depths = {np.shape(x)[0] if not isinstance(x, jax.ShapeDtypeStruct) else x.shape[0]
              for x in jax.tree_util.tree_leaves(tree)}
    if len(depths) != 1:
        raise ValueError(f"a stacked module's leaves disagree on the layer axis: {sorted(depths)}")
    return depths.pop()


def unstack_layers(tree: Mapping, names: tuple[str, ...]) -> dict:
    """Scanned -> unrolled layout: a module named exactly one of ``names`` (parameters stacked
    on a leading axis) becomes ``<name>_0 .. <name>_{depth-1}``. Unrolled trees pass unchanged;
    leaves may be arrays or ``jax.ShapeDtypeStruct``."""
    out = {}
    for key, value in tree.items():
        if key in names and isinstance(value, Mapping):
            for i in range(_depth(value)):
                out[f"{key}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: _index(a, i),
                                                           dict(value))
        elif isinstance(value, Mapping):
            out[key] = unstack_layers(value, names)
        else:
            out[key] = value
    return out


def to_layout(tree: Mapping, like: Mapping) -> dict:
    """``tree`` in the layer layout of ``like``: stacked where ``like`` has ``<name>`` and
    ``tree`` has ``<name>_0..``, unstacked in the opposite case. Anything else (and a stack of
    the wrong depth) is kept as it is, so a mismatch is still reported by the caller's key
    check."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    out = dict(tree)
    for name in [k for k, v in tree.items()
                 if isinstance(v, Mapping) and k not in like and f"{k}_0" in like]:
        out.update(unstack_layers({name: out.pop(name)}, (name,)))
    for name in [k for k, v in like.items()
                 if isinstance(v, Mapping) and k not in tree and f"{k}_0" in tree]:
        depth = 0
        while f"{name}_{depth}" in tree:
            depth += 1
        if depth == _depth(like[name]):
            parts = [out.pop(f"{name}_{i}") for i in range(depth)]
            out[name] = jax.tree_util.tree_map(lambda *xs: _stack(list(xs)), *parts)
    return {k: to_layout(v, like[k]) if k in like else v for k, v in out.items()}


def _unfreeze(tree: Mapping) -> dict:
    tree = dict(tree)
    return dict(tree["params"]) if set(tree) == {"params"} else tree


def import_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params: Mapping,
                      name_map: NameMap) -> dict:
    """Official state dict -> Flax params with the structure/shapes/dtypes of
    ``abstract_params`` (e.g. from ``jax.eval_shape(model.init, ...)``)."""
    target = _unfreeze(abstract_params)
    abstract_params = unstack_layers(target, name_map.scanned)
    flat_abstract = traverse_util.flatten_dict(abstract_params)
    entries = name_map.entries(abstract_params)
    expected = {e.torch_key for e in entries}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not name_map.is_ignored(k))
    misshaped, flat = [], {}
    for e in entries:
        if e.torch_key not in state_dict:
            continue
        want = flat_abstract[e.flax_path]
        value = np.asarray(state_dict[e.torch_key])
        want_torch = tuple(e.transform.to_torch(np.empty(want.shape, np.uint8)).shape)
        if tuple(value.shape) != want_torch:
            misshaped.append(f"{e.torch_key}: checkpoint {tuple(value.shape)}, model expects "
                             f"{want_torch}")
            continue
        flat[e.flax_path] = np.ascontiguousarray(e.transform.to_flax(value)).astype(want.dtype)
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(name_map.model, missing, unexpected, misshaped)
    return to_layout(traverse_util.unflatten_dict(flat), target)


def export_state_dict(params: Mapping, name_map: NameMap) -> dict[str, np.ndarray]:
    """Flax params (unrolled or scanned) -> official PyTorch key names and layouts (contiguous
    numpy arrays)."""
    params = unstack_layers(_unfreeze(params), name_map.scanned)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for e in name_map.entries(params):
        out[e.torch_key] = np.ascontiguousarray(e.transform.to_torch(np.asarray(flat[e.flax_path])))
    return out


def check_params(params: Mapping, abstract_params: Mapping, model: str) -> dict:
    """Checks a Flax param tree against the model's abstract tree; returns it cast to the
    expected dtypes, in its layer layout (a scanned model reads an unrolled checkpoint and the
    other way round). Raises :class:`CheckpointMismatchError` listing every difference."""
    params = to_layout(_unfreeze(params), _unfreeze(abstract_params))
    got = traverse_util.flatten_dict(params, sep="/")
    want = traverse_util.flatten_dict(_unfreeze(abstract_params), sep="/")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(f"{k}: checkpoint {tuple(np.shape(got[k]))}, model expects "
                       f"{tuple(want[k].shape)}" for k in set(got) & set(want)
                       if tuple(np.shape(got[k])) != tuple(want[k].shape))
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(model, missing, unexpected, misshaped)
    return traverse_util.unflatten_dict(
        {k: np.asarray(v).astype(want[k].dtype) for k, v in got.items()}, sep="/")


def init_unrolled(model, rng: jax.Array, *args) -> dict:
    """``model.init(rng, *args)["params"]`` drawn as the unrolled model draws them, then put in
    the model's layer layout: ``scan_layers`` changes how blocks are stored and run, never the
    initial values (a scanned and an unrolled run start from the same weights)."""
    if not getattr(model, "scan_layers", False):
        return model.init(rng, *args)["params"]
    like = jax.eval_shape(model.init, rng, *args)["params"]
    return to_layout(model.clone(scan_layers=False).init(rng, *args)["params"], like)
