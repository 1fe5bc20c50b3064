"""Data parallelism over a device mesh, and multi-host start-up.

The mesh is one-dimensional, axis ``"data"``, over the devices of this process. A batch [B, T] is split
along B (rows padded up to a multiple of the device count); parameters are either replicated on every
device or, with ``fsdp=True``, each split along one axis so every device holds 1/n of the model and XLA
gathers the pieces for the matmuls. Both give the single-device result up to float32 summation order.

Multi-host runs (TPU pod slices, several GPU hosts, several CPU processes) start with
:func:`initialize_distributed`; each process then encodes its own share of the data on a mesh of its own
local devices, so hosts never wait on each other while encoding (see ``embgemma_jax.corpus_job``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all local devices of this process)."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devs), (DATA_AXIS,))


def data_size(mesh: Mesh) -> int:
    """Devices along the mesh's ``"data"`` axis (raises if the mesh has none)."""
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r} (got axes {mesh.axis_names}); use make_mesh()")
    return mesh.shape[DATA_AXIS]


def fsdp_axis(shape: Sequence[int], n_devices: int) -> int | None:
    """The axis a parameter of ``shape`` is split along under FSDP: the largest one divisible by
    ``n_devices`` (the first among equals), or None (replicate) when no axis divides or n_devices is 1."""
    if n_devices <= 1:
        return None
    best = None
    for axis, size in enumerate(shape):
        if size % n_devices == 0 and (best is None or size > shape[best]):
            best = axis
    return best


def param_sharding(mesh: Mesh, shape: Sequence[int], *, fsdp: bool = False) -> NamedSharding:
    """Where one parameter lives: replicated, or (fsdp) split along :func:`fsdp_axis` over ``"data"``."""
    n_dev = data_size(mesh)
    axis = fsdp_axis(shape, n_dev) if fsdp else None
    spec = [None] * len(shape)
    if axis is not None:
        spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_params(params: Any, mesh: Mesh, *, fsdp: bool = False) -> Any:
    """Places every array of a parameter pytree on ``mesh`` with :func:`param_sharding`."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, param_sharding(mesh, np.shape(x), fsdp=fsdp)), params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, ...] split along B over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def padded_rows(n: int, n_devices: int) -> int:
    """n rounded up to a multiple of n_devices (every device gets the same number of rows)."""
    return -(-n // n_devices) * n_devices


def shard_batch(mesh: Mesh, *arrays: np.ndarray | None) -> list[jax.Array | None]:
    """Pads int arrays [B, T] with zero rows up to a multiple of the mesh size and splits them along B.

    Zero rows have an all-zero attention mask: they pool to a zero vector (finite, see model.py) and are
    dropped again by the caller.
    """
    n_dev = data_size(mesh)
    out: list[jax.Array | None] = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        a = np.asarray(a, dtype=np.int32)
        rows = padded_rows(a.shape[0], n_dev)
        if rows != a.shape[0]:
            a = np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])
        out.append(jax.device_put(a, batch_sharding(mesh)))
    return out


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts JAX's multi-process runtime (``jax.distributed.initialize``); call before any JAX work.

    With no arguments JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI, ...). On other
    clusters, and for several CPU processes on one machine, pass all three. CPU processes exchange data
    with gloo collectives (the default of ``jax_cpu_collectives_implementation`` in current JAX; set here
    if it is off).

    Args:
      coordinator_address: ``host:port`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index in [0, num_processes).
    """
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "pass all of coordinator_address, num_processes and process_id, or none of them (auto-detection); "
            f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}"
        )
    if num_processes is not None and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
