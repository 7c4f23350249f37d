"""Orbax checkpointing policy: async saves every N steps and on preemption, keep-N, auto-resume
from the newest checkpoint that restores, the data position saved next to the state."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Wraps an ``ocp.CheckpointManager`` holding ``state`` (a pytree) and ``meta`` (JSON)."""

    def __init__(self, directory: str, *, keep: int, save_every: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def due(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        if not (force or self.due(step)) or step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """Restores the newest checkpoint that reads back; a truncated or corrupt one is
        reported and the previous one is tried. Returns (state, meta, step) or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable checkpoint"
                log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); trying the "
                            "previous one", step, self.directory, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                continue
            return restored["state"], dict(restored["meta"]), step
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
