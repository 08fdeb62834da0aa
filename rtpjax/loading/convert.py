"""`rtpjax convert`: a checkpoint already in rtpjax's layout and dtype, restored by orbax straight into the mesh.

A converted folder is a Hugging Face folder whose safetensors are replaced by an orbax `params/` tree plus a marker
file; config and tokenizer files are copied, so everything that reads a model folder reads it too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax

from rtpjax.loading.loader import CheckpointError, log, target_shardings
from rtpjax.models import decoder
from rtpjax.models.config import ModelConfig
from rtpjax.loading.quantization import check_method, is_quantized_param, shape_struct

MARKER = "rtpjax_checkpoint.json"
_FORMAT = 1
_COPIED = ("*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken")


def is_converted(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def convert(model: str | Path | None, out: str | Path, dtype: str | None = None, progress: bool = True,
            quantization: str | None = None) -> Path:  # fmt: skip
    """Load `model` (folder, .gguf or None for the default), transform it (dtype, weight quantization), and write it
    to `out` with orbax."""
    import orbax.checkpoint as ocp

    from rtpjax.loading.gguf import resolve_model
    from rtpjax.loading.loader import load_model

    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    source = resolve_model(model)
    cfg, family, params = load_model(source, dtype=dtype, progress=progress, quantization=quantization)
    began = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for pattern in _COPIED:
        for f in Path(source).glob(pattern):
            if f.name not in ("model.safetensors.index.json", MARKER):
                shutil.copy(f, tmp / f.name)
    hf = json.loads((tmp / "config.json").read_text())
    hf["torch_dtype"] = hf["dtype"] = cfg.dtype
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    marker = {"format": _FORMAT, "source": str(source), "dtype": hf["torch_dtype"], "quantization": quantization}
    (tmp / MARKER).write_text(json.dumps(marker))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - began)
    return out


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
    if progress:
        print(line, flush=True)
    else:
        log.info(line)
    return params
