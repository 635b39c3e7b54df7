"""One process of a multi-process loop that polls ``run_utils.PreemptionGuard`` at every step
(for test_multiprocess). Usage: preemption_worker.py PROCESS_ID NUM_PROCESSES PORT.

Prints 'ready' after a few steps and 'stopped at STEP' when the guard says stop."""

import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from dfrdet_jax import run_utils

process_id, num_processes, port = map(int, sys.argv[1:4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
with run_utils.PreemptionGuard() as guard:
    for step in range(1, 3000):
        multihost_utils.process_allgather(jnp.full(1, step))  # the processes move in step
        time.sleep(0.02)
        if step == 10:
            print("ready", flush=True)
        if guard.should_stop(step):
            print(f"stopped at {step}", flush=True)
            break
