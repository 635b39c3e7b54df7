"""Sharding, declared once: a 1-d device mesh with a ``data`` axis, a replicated state and
batches split over that axis, the same on one CPU and on many hosts."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-d mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (train state, step outputs)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the ``data`` axis; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divides(batch_size: int, what: str) -> None:
    """ValueError naming ``what`` (a config field) when ``batch_size`` (a global batch, images)
    is not positive or does not split evenly over all devices of all processes."""
    if batch_size < 1:
        raise ValueError(f"{what}={batch_size} must be at least 1 (images per global batch)")
    devices = jax.device_count()
    if batch_size % devices:
        raise ValueError(
            f"{what}={batch_size} does not divide over {devices} devices; set it to a "
            f"multiple of {devices}"
        )


def to_global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays laid out as ``sharding``.

    Args:
      local_batch: name -> [B / process_count, ...] host array, this process's rows.
      sharding: usually ``batch_sharding(mesh)``.
    Returns:
      name -> [B, ...] jax.Array over all processes' devices.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
