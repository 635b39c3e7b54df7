"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` when the job asks for it.

``config.distributed.mode``:
  'auto'  initialise when the environment describes a multi-process job: a coordinator address in
          ``JAX_COORDINATOR_ADDRESS``, a SLURM job of several tasks, an Open MPI job of several
          ranks, or a TPU VM slice of several hosts (jax then reads the cluster itself);
  'on'    always initialise (with the explicit settings below, or jax's cluster detection);
  'off'   never (single process).
Explicit ``coordinator_address``, ``num_processes`` and ``process_id`` override detection. On CPU
the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from dfrdet_jax.choices import check_choice

MODES = ("auto", "on", "off")


def _environment_is_multiprocess() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(count, "1") or 1) > 1:
            return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Initialises the multi-process runtime if asked; returns whether it did."""
    settings = config.get("distributed", ml_collections.ConfigDict({"mode": "auto"}))
    mode = settings.get("mode", "auto")
    check_choice("config.distributed.mode", mode, MODES)
    if mode == "off" or (mode == "auto" and not _environment_is_multiprocess()):
        return False
    kwargs = {
        key: settings.get(key)
        for key in ("coordinator_address", "num_processes", "process_id")
        if settings.get(key) is not None
    }
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
