"""Named device meshes and the shardings of parameters and KV cache, from per-family partition rules.

Parallelism is declarative: the jitted step sees NamedShardings and XLA inserts the collectives. The same code runs on
one device (a 1x1x1 mesh) and on many.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "expert", "tensor")


def make_mesh(tensor: int = 1, expert: int = 1, data: int = 1, devices=None) -> Mesh:
    """A (data, expert, tensor) mesh. Tensor is innermost so tensor-parallel peers are neighbouring devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * expert * tensor
    if need > len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x tensor={tensor} needs {need} devices, have {len(devices)}")
    return Mesh(np.array(devices[:need]).reshape(data, expert, tensor), AXES)


def tensor_ways(mesh) -> int:
    """Devices the heads split over: the mesh's "tensor" axis (1 without a mesh or without that axis)."""
    return 1 if mesh is None else mesh.shape.get("tensor", 1)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop the mesh axes a dimension cannot be split over evenly (e.g. 2 KV heads on 4 tensor devices)."""
    dims = []
    for i, size in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        dims.append(axis if ways > 1 and size % ways == 0 else None)
    return P(*dims)


def spec_for(path: str, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh)
    return P()


def param_shardings(shapes: dict[str, tuple[int, ...]], rules, mesh: Mesh) -> dict[str, NamedSharding]:
    """Dotted path -> NamedSharding for every parameter."""
    return {path: NamedSharding(mesh, spec_for(path, shape, rules, mesh)) for path, shape in shapes.items()}


def kv_cache_sharding(kv_cache_shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """KV heads over the tensor axis, matching the column-parallel k/v projections."""
    return NamedSharding(mesh, fit_spec(P("tensor", *(None,) * (len(kv_cache_shape) - 1)), kv_cache_shape, mesh))
