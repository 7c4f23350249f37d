"""Multi-process start-up: ``jax.distributed.initialize`` for TPU pods, SLURM and explicit
coordinators, before any other JAX call."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
    """Initialises the JAX distributed runtime when this is one process of many.

    * explicit ``coordinator``/``num_processes``/``process_id`` (or the env variables
      ``TITOK_COORDINATOR``, ``TITOK_NUM_PROCESSES``, ``TITOK_PROCESS_ID``);
    * SLURM (``SLURM_NTASKS`` > 1) and Cloud TPU pods: JAX detects the cluster itself;
    * otherwise a single process: nothing to do.
    """
    coordinator = coordinator or os.environ.get("TITOK_COORDINATOR")
    if num_processes is None and "TITOK_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["TITOK_NUM_PROCESSES"])
    if process_id is None and "TITOK_PROCESS_ID" in os.environ:
        process_id = int(os.environ["TITOK_PROCESS_ID"])
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
