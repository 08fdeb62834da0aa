"""The converted checkpoint format: a Hugging Face folder whose safetensors are replaced by an orbax `params/` tree in
rtpjax's layout, dtype and quantization, plus a marker file. `rtpjax convert` writes it; loading restores it straight
into the mesh, each device reading only its own slices.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from rtpjax.loading.loader import CheckpointError, log, target_shardings
from rtpjax.models import decoder
from rtpjax.models.config import ModelConfig
from rtpjax.loading.quantization import check_method, is_quantized_param, shape_struct

MARKER = "rtpjax_checkpoint.json"
_FORMAT = 1


def is_converted(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def save_params(folder: Path, params: dict, source: str, dtype: str, quantization: str | None) -> None:
    """Write `params` and the marker into `folder` (which already holds the config and tokenizer files)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(folder / "params", params)
    checkpointer.wait_until_finished()
    marker = {"format": _FORMAT, "source": source, "dtype": dtype, "quantization": quantization}
    (folder / MARKER).write_text(json.dumps(marker))


def _check_stored_shapes(folder: Path, checkpointer, target: dict) -> None:
    """Compare orbax's metadata with the config before reading, so a mismatch names the parameter."""
    meta = checkpointer.metadata(folder / "params")
    tree = getattr(meta, "item_metadata", meta)
    stored = {path: tuple(m.shape) for path, m in decoder.flatten(getattr(tree, "tree", tree)).items()}
    for path, leaf in decoder.flatten(target).items():
        shape = leaf.shape
        if stored.get(path) != tuple(shape):
            raise CheckpointError(
                f"{folder}: converted checkpoint does not match its config.json: parameter {path} is "
                f"{list(stored[path]) if path in stored else 'absent'}, the config needs {list(shape)}"
            )


def restore_params(folder: str | Path, cfg: ModelConfig, family, mesh=None, progress: bool = False,
                   quantization: str | None = None) -> dict:  # fmt: skip
    """Each device reads only its own slices of each parameter, already in the final dtype, layout and quantization."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    meta = json.loads((folder / MARKER).read_text())
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{folder / MARKER}: format {meta.get('format')!r}, this rtpjax reads {_FORMAT}")
    stored = check_method(meta.get("quantization"))
    if quantization is not None and quantization != stored:
        was = f"with quantization {stored!r}" if stored else "without quantization"
        raise CheckpointError(f"{folder}: was converted {was}; it cannot load as {quantization!r} (convert the "
                              f"original checkpoint again with --quantization {quantization})")  # fmt: skip
    began = time.perf_counter()
    shapes = decoder.param_shapes(cfg)
    shardings = target_shardings(shapes, family, mesh, cfg)
    target = decoder.nest({
        path: shape_struct(shape, shardings[path], stored) if stored and is_quantized_param(path)
        else jax.ShapeDtypeStruct(shape, cfg.jnp_dtype, sharding=shardings[path])
        for path, shape in shapes.items()
    })  # fmt: skip
    checkpointer = ocp.StandardCheckpointer()
    _check_stored_shapes(folder, checkpointer, target)
    params = checkpointer.restore(folder / "params", target)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - began
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    line = f"restored {total / 1e9:.2f} GB in {seconds:.2f} s ({total / 1e9 / seconds:.2f} GB/s) from {folder}"
    log.info(line)
    return params
