"""The data-parallel mesh shared by pretraining and probing: batch sharded, state replicated."""

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over `devices` (default: all), with classic sharding propagation."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(
        np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
