"""Rows sharded over devices: the layout the solvers run on, whatever mesh the user built.

A fit on X, labels and weights whose rows are sharded over a mesh (a `NamedSharding` with the
row axis partitioned) is compiled by XLA's SPMD partitioner: the logits X·W and every per-row
quantity stay on the device that holds the row, and each gradient or Hessian product ends in
one all-reduce of a d̃ × K block (X̃ᵀ·U) with the parameters replicated. Nothing in the solvers
changes for it. Meshes whose axes are typed `Explicit` ask every contraction over a sharded
dimension to state its output sharding; the solvers leave that to the partitioner, so the
arrays are moved to the same mesh with `Auto` axes first (the same devices and layout: no data
moves).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .._manual import explicit_mesh


def with_auto_axes(array):
    """`array` on the same devices and layout, its mesh's axes typed `Auto`.

    Raises:
        ValueError: for a traced array sharded over `Explicit` axes (inside a caller's `jit`,
            `vmap` or `grad`), whose sharding is part of the trace and cannot be retyped here:
            the solver's products then failed deep inside JAX with a `ShardingTypeError`.
    """
    if isinstance(array, jax.core.Tracer):
        if explicit_mesh(array) is not None:
            raise ValueError(
                "inside jit, vmap or grad, a fit cannot take arrays sharded over Explicit mesh "
                "axes (jax.make_mesh's default): build the mesh with "
                "axis_types=(jax.sharding.AxisType.Auto,) * ndim, or call the fit outside the "
                "transformation, where Explicit arrays are moved to Auto axes."
            )
        return array
    sharding = getattr(array, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return array
    mesh = sharding.mesh
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return array
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    return jax.device_put(array, NamedSharding(auto, sharding.spec))


def row_mesh(devices) -> Mesh:
    """A one-axis mesh named "rows" over `devices` (an int: the first that many devices)."""
    if isinstance(devices, bool | np.bool_):  # an int to Python, but never a device count
        raise ValueError(
            f"devices={devices} is not a number of devices: give an integer count or a list of "
            "devices (devices=None uses the default device)."
        )
    if isinstance(devices, int | np.integer):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices={devices} asks for more devices than the {len(available)} available "
                f"({available[0].platform})."
            )
        devices = available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    # Device ids are accepted too: a list of them can be copied and pickled (scikit-learn's
    # clone, a search's workers), which a list of jax Device objects cannot.
    by_id = {device.id: device for device in jax.devices()}
    named = []
    for device in devices:
        if isinstance(device, int | np.integer):
            if int(device) not in by_id:
                raise ValueError(f"devices: no device has the id {device} (ids: {sorted(by_id)})")
            device = by_id[int(device)]
        elif not isinstance(device, jax.Device):
            # A platform name ("cpu") failed reading its `.id`.
            raise TypeError(
                f"devices must list jax devices (jax.devices()) or their integer ids, got "
                f"{device!r}"
            )
        named.append(device)
    devices = named
    if len({device.id for device in devices}) != len(devices):
        raise ValueError(f"devices names a device more than once: {devices}")
    return Mesh(np.array(devices), ("rows",), axis_types=(AxisType.Auto,))


def shard_rows(mesh: Mesh, *arrays):
    """Each array placed on `mesh` with its first axis split over "rows" (others replicated).

    The row count must be a multiple of the mesh size (pad with zero-weight rows first).
    """
    sharding = NamedSharding(mesh, PartitionSpec("rows"))
    return tuple(jax.device_put(array, sharding) for array in arrays)
