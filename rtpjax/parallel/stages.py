"""Pipeline stages: which layers each stage runs and on which devices, and where every parameter lives.

A pipelined engine is `stages` ordinary (data, expert, tensor) meshes on disjoint devices, one per stage, rather than
one mesh with a "stage" axis: layers of different kinds (dense and MoE, windowed) and uneven layer counts then need no
stacking into equal per-stage blocks, and tensor / expert parallelism inside a stage is the same code as without
stages (each layer's weights carry their stage's mesh). Stage s holds layers `layers[s]` and their KV cache; the
first stage also holds the embedding, the last the final norm and the head (a tied head is a copy of the embedding).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from jax.sharding import Mesh, NamedSharding

from rtpjax.parallel.sharding import make_mesh, param_shardings

_LAYER = re.compile(r"^layers\.(\d+)\.")


def split_layers(num_layers: int, stages: int) -> tuple[range, ...]:
    """Contiguous layer ranges, as even as they go; the first stages take one more layer where it does not divide
    (the last stage also computes the head)."""
    if stages > num_layers:
        raise ValueError(f"--pipeline-parallel-size {stages}: the model has only {num_layers} layers to split")
    size, extra = divmod(num_layers, stages)
    bounds = np.cumsum([0] + [size + (s < extra) for s in range(stages)])
    return tuple(range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineMesh:
    """One mesh per stage (disjoint devices, the same shape each) and the layers each stage runs."""

    stages: tuple[Mesh, ...]
    layers: tuple[range, ...]

    @property
    def shape(self) -> dict[str, int]:
        """The axes of every stage's mesh, and "stage": what `tensor_ways` and the KV cache read."""
        return {"stage": len(self.stages), **self.stages[0].shape}

    def stage_of(self, layer: int) -> int:
        return next(s for s, r in enumerate(self.layers) if layer in r)

    def mesh_of(self, path: str) -> Mesh:
        """The stage mesh a parameter (dotted path) lives on."""
        match = _LAYER.match(path)
        if match:
            return self.stages[self.stage_of(int(match.group(1)))]
        return self.stages[0] if path == "embed" else self.stages[-1]


def pipeline_mesh(num_layers: int, stages: int, tensor: int = 1, expert: int = 1, devices=None) -> PipelineMesh:
    devices = list(devices)
    per_stage = tensor * expert
    if stages * per_stage > len(devices):
        raise ValueError(f"--pipeline-parallel-size {stages} x --tensor-parallel-size {tensor} x "
                         f"--expert-parallel-size {expert} needs {stages * per_stage} devices; {len(devices)} are "
                         f"visible")  # fmt: skip
    meshes = tuple(make_mesh(tensor=tensor, expert=expert, devices=devices[s * per_stage : (s + 1) * per_stage])
                   for s in range(stages))  # fmt: skip
    return PipelineMesh(meshes, split_layers(num_layers, stages))


def stage_param_shardings(shapes: dict[str, tuple[int, ...]], rules_for, pmesh: PipelineMesh) -> dict:
    """Dotted path -> NamedSharding on the parameter's stage mesh, by that mesh's partition rules (`rules_for(mesh)`)."""
    out = {}
    for mesh in pmesh.stages:
        mine = {path: shape for path, shape in shapes.items() if pmesh.mesh_of(path) is mesh}
        out |= param_shardings(mine, rules_for(mesh), mesh)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P())
