"""Orbax checkpoints of training runs, with a safety policy, readable without the trainer.

Layout of ``WORKDIR/checkpoints/<step>/`` (any path may be ``gs://``):

* ``state``: the train state pytree ``{"step", "params": {group: tree}, "ema_params": {group:
  tree}, "opt_state": {group: optax state}, "mutable": {...}}``;
* ``meta``: JSON ``{"step", "task", "config": the full config as a dict}``.

Policy:

* async saves every N steps, on preemption and at the end; keep-N;
* a resumed run compares its config with the stored one and refuses, listing every differing
  key, unless ``allow_config_changes`` (changes that keep the state shapes, e.g. a longer
  schedule) or the key cannot change the run (logging, eval, paths of inputs);
* a checkpoint written before configs were stored resumes with a warning saying so;
* if checkpoints exist but the newest does not restore, the run stops and names the failure. It
  never restarts from scratch over them. ``fallback=True`` resumes from the newest older one that
  restores and moves the unrestorable ones aside (``<step>.unrestorable``), deleting nothing.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from etils import epath

from titok_jax.infra.paths import as_path

log = logging.getLogger(__name__)

# Config keys that cannot change what a resumed run computes: how often it logs, evaluates and
# saves, where it reads its data from, how many threads decode, the step-0 warm start. Prefix
# match on dotted keys. (A moved teacher file is a difference: its contents could have changed.)
NEUTRAL_KEYS = ("log_every", "ckpt_every", "image_every", "eval_every", "evals", "eval.",
                "keep_ckpts", "num_grid_images", "preemption_check_every", "progress_bar",
                "tensorboard", "data.data_dir", "data.num_threads", "data.embedded", "init_from",
                "allow_config_changes", "checkpoint_fallback")


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but cannot be resumed (unreadable, or written by another config)."""



def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> ``{"a.b.c": value}`` (lists and tuples compared as lists)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = list(tree) if isinstance(tree, tuple) else tree
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """``key: stored -> current`` for every key whose value differs or exists on one side."""
    a, b = flatten(stored), flatten(_jsonable(current))
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def _jsonable(config: Any) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _neutral(line: str) -> bool:
    key = line.split(":", 1)[0]
    return any(key == k or key.startswith(k) for k in NEUTRAL_KEYS)


class Checkpointer:
    """An ``ocp.CheckpointManager`` holding ``state`` (a pytree) and ``meta`` (JSON)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, save_every: int,
                 async_save: bool = True, create: bool = True):
        self.directory = as_path(directory)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        if not (force or self.due(step)):
            return False
        if step in self.manager.all_steps():  # the step this run was resumed from
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def _restore(self, step: int, abstract_state: Any | None) -> tuple[Any, dict]:
        state_args = (ocp.args.StandardRestore(abstract_state) if abstract_state is not None
                      else ocp.args.StandardRestore())
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=state_args, meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_for_resume(self, abstract_state: Any, config: Any, *,
                           allow_changes: bool = False,
                           fallback: bool = False) -> tuple[Any, dict, int] | None:
        """The newest checkpoint as ``(state, meta, step)``, or None if there is none.

        Raises :class:`CheckpointRestoreError` if the config changed (see the module doc) or the
        newest checkpoint does not restore; with ``fallback`` older ones are tried first.
        """
        steps = self.all_steps()[::-1]
        if not steps:
            return None
        failures = []
        for i, step in enumerate(steps):
            meta = self._read_meta(step)
            if meta is not None:
                self._check_config(step, meta, config, allow_changes)
            try:
                state, meta = self._restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - reported with its type and message
                failures.append(f"step {step}: {type(e).__name__}: {_first_line(e)}")
                if not fallback:
                    raise CheckpointRestoreError(
                        f"the newest checkpoint in {self.directory} cannot be restored, so the "
                        f"run stops instead of starting over ({failures[-1]}). Fix the cause "
                        "(a changed model or optimizer, a missing file, an I/O error), or set "
                        "--config.checkpoint_fallback=True to resume from the newest older "
                        "checkpoint that restores (unrestorable ones are moved aside, not "
                        "deleted).") from e
                continue
            if failures:
                self._move_aside(steps[:i])
                log.warning("resumed from step %d; newer checkpoints did not restore and were "
                            "moved aside: %s", step, "; ".join(failures))
            return state, meta, step
        raise CheckpointRestoreError(
            f"checkpoints exist in {self.directory} but none restores; the run stops instead "
            "of starting over:\n  " + "\n  ".join(failures))

    def _read_meta(self, step: int) -> dict | None:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except Exception:  # noqa: BLE001 - an unreadable meta fails the state restore anyway
            return None

    def _check_config(self, step: int, meta: dict, config: Any, allow_changes: bool) -> None:
        stored = meta.get("config")
        if stored is None:
            log.warning("the checkpoint at step %d in %s was written before titok-jax stored "
                        "configs with checkpoints: the config of this run cannot be checked "
                        "against it", step, self.directory)
            return
        diffs = [d for d in config_differences(stored, config) if not _neutral(d)]
        if not diffs:
            return
        if allow_changes:
            log.warning("resuming with a changed config (allow_config_changes=True):\n  %s",
                        "\n  ".join(diffs))
            return
        raise CheckpointRestoreError(
            f"the config differs from the one stored with the checkpoint at step {step} in "
            f"{self.directory}:\n  " + "\n  ".join(diffs) + "\nUse another workdir, restore "
            "the old values, or pass --config.allow_config_changes=True for changes that keep "
            "the state shapes (e.g. a longer schedule).")

    def _move_aside(self, steps: Iterable[int]) -> None:
        for step in steps:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.unrestorable"
            src.rename(dst)
            log.warning("moved unrestorable checkpoint %s to %s", src, dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: Exception) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""


def checkpoint_dir(path: str | os.PathLike) -> epath.Path | None:
    """The Orbax directory of a training workdir (``WORKDIR/checkpoints``) or the directory
    itself if it holds numbered checkpoints; None if neither."""
    path = as_path(path)
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    return None


def read_latest(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """``(state as nested numpy dicts, meta, step)`` of the newest checkpoint of a workdir, with
    no model or trainer: for evaluation and export of training runs. The arrays are restored
    onto this process's first device, whatever mesh or number of hosts wrote them."""
    directory = checkpoint_dir(path)
    if directory is None:
        raise FileNotFoundError(f"no training checkpoints at {path}")
    ckpt = Checkpointer(directory, keep=1, save_every=0, async_save=False, create=False)
    try:
        step = ckpt.all_steps()[-1]
        tree = ckpt.manager.item_metadata(step)["state"].tree
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            if hasattr(m, "shape") else m, tree)
        state, meta = ckpt._restore(step, target)
    finally:
        ckpt.close()
    return jax.device_get(state), meta, step


class PreemptionFlag:
    """Set by SIGTERM (what TPU/GPU schedulers send before preemption); all hosts agree on it."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step and stopping")
        self._event.set()

    def should_stop(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(local).any())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
