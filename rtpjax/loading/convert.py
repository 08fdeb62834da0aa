"""`rtpjax convert`: a checkpoint already in rtpjax's layout and dtype (the format of orbax_checkpoint), so a later
start restores it straight into the mesh with no work at load.

Config and tokenizer files are copied, so everything that reads a model folder reads the converted one too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rtpjax.loading.loader import log
from rtpjax.loading.model_source import load_model, resolve_model
from rtpjax.loading.orbax_checkpoint import MARKER, save_params
from rtpjax.quant.checkpoints import quant_config

_COPIED = ("*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken")


def convert(model: str | Path | None, out: str | Path, dtype: str | None = None, progress: bool = True,
            quantization: str | None = None) -> Path:  # fmt: skip
    """Load `model` (folder, .gguf or None for the default), transform it (dtype, weight quantization), and write it
    to `out` with orbax."""
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    source = resolve_model(model)
    if Path(source).is_dir() and quant_config(source) is not None:
        raise ValueError(f"{source}: a pre-quantized checkpoint ({quant_config(source)['quant_method']}) loads as it "
                         "is; rtpjax convert does not rewrite it")  # fmt: skip
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
    save_params(tmp, params, str(source), hf["torch_dtype"], quantization)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - began)
    return out
