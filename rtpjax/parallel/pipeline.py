"""Pipeline-parallel steps: one program per stage, on that stage's devices, and a step split into micro-batches.

Per-stage programs rather than one program over a "stage" mesh axis (see stages.py for the layout): a stage's program
is the decoder's own `run_layers` over its layers, so every layer kind, tensor and expert parallelism inside a stage
and the KV cache layout are unchanged. Hidden states move to the next stage by `jax.device_put` (a device-to-device
copy), queued like everything else: the host never waits between stages.

The schedule: a step's sequences are split in two micro-batches of about equal tokens (padded to one smaller token
bucket). The host queues micro-batch 0 through every stage, then micro-batch 1. Each stage's device runs its queue in
order, and stage s of micro-batch 1 waits only for stage s - 1 of micro-batch 1, so while stage 1 runs micro-batch 0
stage 0 already runs micro-batch 1 (with two stages the devices are busy 2 of 3 slots instead of 1 of 2). A step
that cannot be split into a smaller bucket (one long prefill chunk) runs as one micro-batch. The last stage gathers
both micro-batches' logits rows into the step's order, so the sampler sees one ordinary step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from rtpjax.models import decoder, layers
from rtpjax.parallel.stages import PipelineMesh, replicated
from rtpjax.runner.step_inputs import pack


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """A step's micro-batches (StepBatch each, one shape) and, with two, the row of their concatenated logits that
    each of the step's sequence rows reads (`join_rows`)."""

    batches: tuple
    join: np.ndarray | None = None


def split_point(token_counts: list[int]) -> int:
    """Sequences [0, cut) form micro-batch 0: the cut with the fewest tokens in the larger half."""
    total, best, cut, run = sum(token_counts), None, 0, 0
    for i, n in enumerate(token_counts[:-1], start=1):
        run += n
        if best is None or max(run, total - run) < best:
            best, cut = max(run, total - run), i
    return cut


def join_rows(first: int, second: int, rows: int, step_rows: int) -> np.ndarray:
    """Row i of the step reads row join[i] of concat(micro-batch 0 logits [rows], micro-batch 1 logits [rows])."""
    join = np.zeros(step_rows, np.int32)
    join[:first] = np.arange(first)
    join[first : first + second] = rows + np.arange(second)
    return join


def stage_step(params, cache, x, flat, packing, *, cfg, layers_range: range, first: bool, last: bool, mesh):
    """One stage on one micro-batch. x: the last sampled token per slot (first stage; a step's tokens may still be on
    the device) or the previous stage's hidden states. Returns (hidden states or logits, cache, expert load)."""
    batch = packing.unpack(flat)
    meta = batch.meta if batch.meta.mesh is None else dataclasses.replace(batch.meta, mesh=mesh)  # this stage's heads
    if first:
        x = params["embed"][jnp.where(batch.token_slot >= 0, x[batch.token_slot], batch.tokens)]
    x, cache, load = decoder.run_layers(params["layers"], layers_range.start, cfg, x, batch.positions, cache, meta)
    if last:
        hidden = layers.rms_norm(x[batch.logits_indices], params["final_norm"], cfg.rms_norm_eps)
        x = decoder.logits(params, cfg, hidden)
    return jax.lax.with_sharding_constraint(x, replicated(mesh)), cache, load


class Pipeline:
    """The stages' parameters and programs; `run` queues one step's micro-batches through them."""

    def __init__(self, cfg, params: dict, pmesh: PipelineMesh):
        self.cfg, self.pmesh = cfg, pmesh
        n = len(pmesh.stages)
        self.inputs = [replicated(m) for m in pmesh.stages]
        self.logits_sharding = self.inputs[-1]
        self.params = []
        for s, r in enumerate(pmesh.layers):
            p = {"layers": params["layers"][r.start : r.stop]}
            if s == 0:
                p["embed"] = params["embed"]
            if s == n - 1:
                p["final_norm"] = params["final_norm"]
                # the head on the last stage: `lm_head` (a tied model's quantized copy is made there already), else a
                # tied model's embedding, copied from the first stage
                name = "lm_head" if "lm_head" in params else "embed"
                p[name] = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(pmesh.stages[-1], a.sharding.spec)),
                                       params[name])  # fmt: skip
            self.params.append(p)
        self._steps = [
            jax.jit(functools.partial(stage_step, cfg=cfg, layers_range=r, first=s == 0, last=s == n - 1,
                                      mesh=pmesh.stages[s]), static_argnums=(4,), donate_argnums=(1,))
            for s, r in enumerate(pmesh.layers)
        ]  # fmt: skip
        self._join = jax.jit(lambda a, b, rows: jnp.concatenate([a, b])[rows], out_shardings=self.logits_sharding)
        self._loads = jax.jit(lambda loads: jnp.concatenate([sum(mb) for mb in loads]), out_shardings=self.logits_sharding)
        self.split_steps = 0  # steps run as two micro-batches

    def run(self, cache: list, last_token: jax.Array, micro: MicroBatches):
        """Queue every micro-batch through every stage; returns (logits [the step's rows], cache, expert load or None).
        `cache` is the whole model's (each layer's arrays on its stage) and is donated."""
        cache = list(cache)
        first_input = jax.device_put(last_token, self.inputs[0])
        outputs, loads = [], [[] for _ in self._steps]
        for batch in micro.batches:
            flat, packing = pack(batch)
            x = first_input
            for s, (step, r) in enumerate(zip(self._steps, self.pmesh.layers)):
                x = x if s == 0 else jax.device_put(x, self.inputs[s])
                x, cache[r.start : r.stop], load = step(self.params[s], cache[r.start : r.stop], x,
                                                        jax.device_put(flat, self.inputs[s]), packing)  # fmt: skip
                if load is not None:
                    loads[s].append(jax.device_put(load, self.logits_sharding))
            outputs.append(x)
        if micro.join is None:
            logits = outputs[0]
        else:
            self.split_steps += 1
            logits = self._join(*outputs, jax.device_put(micro.join, self.logits_sharding))
        loads = [mb for mb in loads if mb]
        return logits, cache, self._loads(loads) if loads else None
