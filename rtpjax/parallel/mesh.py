"""The engine's mesh from its options, checked against the model and the devices first, with one-line reasons.

One mesh description: `--tensor-parallel-size` (attention heads, MLP columns, vocabulary) and `--expert-parallel-size`
(a MoE model's experts) multiply into the devices one engine uses, times `--pipeline-parallel-size` (layers in
stages, each stage a mesh of tensor x expert devices of its own: stages.py). Replicas behind a router (`--data-parallel-size`
of `rtpjax serve`) are separate engines, each with its own mesh of this shape.
"""

from __future__ import annotations

import logging

import jax

from rtpjax.kv.kv_cache import cache_heads
from rtpjax.parallel.sharding import make_mesh
from rtpjax.parallel.stages import pipeline_mesh

log = logging.getLogger("rtpjax")


def engine_mesh(cfg, tensor: int = 1, expert: int = 1, devices=None, pipeline: int = 1):
    """A (data=1, expert, tensor) mesh for `cfg`, or with `pipeline` > 1 stages one such mesh per stage (a
    PipelineMesh). Raises ValueError for layouts that cannot work; logs what a layout that works but does not split
    evenly does instead."""
    devices = list(jax.devices() if devices is None else devices)
    if pipeline > 1:
        stages = pipeline_mesh(cfg.num_layers, pipeline, tensor, expert, devices)  # checks layers and devices
        engine_mesh(cfg, tensor, expert, devices[: tensor * expert])  # the checks of one stage's mesh
        sizes = sorted({len(r) for r in stages.layers})
        if len(sizes) > 1:
            log.info("%d layers over %d pipeline stages: %s layers each", cfg.num_layers, pipeline,
                     ", ".join(str(len(r)) for r in stages.layers))  # fmt: skip
        return stages
    need = tensor * expert
    if need > len(devices):
        raise ValueError(f"--tensor-parallel-size {tensor} x --expert-parallel-size {expert} needs {need} devices; "
                         f"{len(devices)} are visible")  # fmt: skip
    if expert > 1 and not cfg.num_experts:
        raise ValueError(f"--expert-parallel-size {expert}: {cfg.architecture} has no experts to split")
    if expert > 1 and cfg.num_experts % expert:
        raise ValueError(f"--expert-parallel-size {expert}: the model's {cfg.num_experts} experts do not split evenly "
                         f"over {expert} devices")  # fmt: skip
    if tensor > 1 and cfg.num_heads % tensor:
        log.warning("%d attention heads do not split over %d tensor-parallel devices: the attention projections stay "
                    "whole on every device", cfg.num_heads, tensor)  # fmt: skip
    elif tensor > 1 and cfg.num_kv_heads % tensor:
        heads = cache_heads(cfg, tensor)
        log.info("%d KV heads on %d tensor-parallel devices: each device computes all KV heads and caches the ones its "
                 "%d query heads read (the cache holds %d heads, %d per device)", cfg.num_kv_heads, tensor,
                 cfg.num_heads // tensor, heads, heads // tensor)  # fmt: skip
    if tensor > 1 and cfg.num_experts and cfg.moe_intermediate_size % tensor:
        log.warning("expert MLPs of width %d do not split over %d tensor-parallel devices: each device holds them "
                    "whole", cfg.moe_intermediate_size, tensor)  # fmt: skip
    return make_mesh(tensor=tensor, expert=expert, devices=devices)
