"""One process of a data-parallel training run over hand-made batches (for test_multiprocess).

Usage: multiprocess_worker.py PROCESS_ID NUM_PROCESSES LOCAL_DEVICES PORT STEPS OUT.npz
Every process builds the same global batches, feeds its own slice, and process 0 writes the
step losses and the final parameters to OUT.npz.
"""

import os
import sys

process_id, num_processes, local_devices, port, num_steps = map(int, sys.argv[1:6])
out_path = sys.argv[6]
import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from smoke import cheap_codegen_flags, make_batch, smoke_config  # noqa: E402

# Read when JAX starts its backend, below: this process's devices, and quick CPU compiles.
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={local_devices} {cheap_codegen_flags()}"
)

from dfrdet_jax import distributed, sharding, steps  # noqa: E402
from dfrdet_jax.models import registry  # noqa: E402

GLOBAL_BATCH = 4
config = smoke_config("dfr", batch_size=GLOBAL_BATCH)
if num_processes > 1:
    config.distributed.mode = "on"
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
assert distributed.initialize(config) == (num_processes > 1)
assert jax.process_count() == num_processes and jax.device_count() == GLOBAL_BATCH

model = registry.build_model(config, num_classes=3)
mesh = sharding.make_mesh()
state = steps.create_train_state(config, model, jax.random.key(0), (64, 64), num_steps)
state = jax.device_put(state, sharding.replicated_sharding(mesh))
step_fn = steps.make_sharded_train_step(config, model, mesh, num_steps)
data_sharding = sharding.batch_sharding(mesh)
per_process = GLOBAL_BATCH // num_processes
losses = []
for step in range(num_steps):
    global_batch = make_batch(seed=step, batch_size=GLOBAL_BATCH)
    local = {
        k: v[process_id * per_process : (process_id + 1) * per_process]
        for k, v in global_batch.items()
    }
    state, metrics = step_fn(state, sharding.to_global_batch(local, data_sharding))
    losses.append(float(metrics["loss"]))

if process_id == 0:
    params = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    np.savez(out_path, losses=np.asarray(losses), **params)
