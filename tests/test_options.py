"""Engine options (rtpjax/options.py): validation that names the flag, the CLI flags generated from EngineArgs, and the
kernel switches reaching the compiled step as static configuration rather than through the environment."""

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rtpjax import EngineArgs
from rtpjax import options
from rtpjax.options import CLI_COMPILATION_CACHE, cli_fields, engine_args_from, flag


@pytest.mark.parametrize("options, message", [
    (dict(max_num_seqs=0), "--max-num-seqs must be an integer >= 1 or None, got 0"),
    (dict(max_num_batched_tokens=2.5), "--max-num-batched-tokens must be an integer >= 1 or None, got 2.5"),
    (dict(block_size="16"), "--block-size must be an integer >= 1, got '16'"),
    (dict(max_model_len=-3), "--max-model-len must be an integer >= 1 or None, got -3"),
    (dict(gpu_memory_utilization=0), r"--gpu-memory-utilization must be a number in \(0, 1\], got 0"),
    (dict(gpu_memory_utilization=1.5), r"--gpu-memory-utilization must be a number in \(0, 1\], got 1.5"),
    (dict(kv_write="triton"), "--kv-write must be auto, pallas or xla, got 'triton'"),
    (dict(attention_impl="flash"), "--attention-impl must be auto, pallas or reference, got 'flash'"),
    (dict(dtype="fp64"), "--dtype must be float32, bfloat16, float16 or None, got 'fp64'"),
    (dict(quantization="int3"), "--quantization must be fp8, int8, fp8-weight-only, int8-weight-only, int4, "
                                  "int4-asym or None, got 'int3'"),
    (dict(enable_prefix_caching="no"), "--enable-prefix-caching must be True or False, got 'no'"),
    (dict(mosaic_prefill=1), "--mosaic-prefill must be True or False, got 1"),
    (dict(seed=None), "--seed must be an integer, got None"),
    (dict(progress="yes"), "^progress must be True or False"),  # no flag: its Python name
])  # fmt: skip
def test_bad_values_name_the_flag_and_what_it_takes(options, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**options)
    with pytest.raises(ValueError, match=message):  # dataclasses.replace checks too
        dataclasses.replace(EngineArgs(), **options)


def test_good_values_pass_as_given():
    import numpy as np

    args = EngineArgs(max_num_seqs=np.int64(4), gpu_memory_utilization=1, compilation_cache_dir=CLI_COMPILATION_CACHE,
                      tokenizer=Path("/tok"), dtype=None, seed=-5)  # fmt: skip
    assert type(args.max_num_seqs) is int and args.max_num_seqs == 4 and args.tokenizer == "/tok"
    with pytest.raises(TypeError):  # keyword-only: positions would shift as options are added
        EngineArgs(100)


def test_choices_match_the_modules_that_take_them():
    from rtpjax.models.config import _DTYPES
    from rtpjax.kernels.attention import IMPLEMENTATIONS
    from rtpjax.kv.kv_cache import KV_DTYPES
    from rtpjax.loading.model_source import LOAD_FORMATS
    from rtpjax.loading.quantization import METHODS

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(EngineArgs)}
    assert set(choices["kv_cache_dtype"]) == set(KV_DTYPES) and set(choices["load_format"]) == set(LOAD_FORMATS)
    assert set(choices["quantization"]) == set(METHODS) and set(choices["dtype"]) == set(_DTYPES)
    assert set(choices["attention_impl"]) == {"auto", *IMPLEMENTATIONS}


def test_unknown_options_fail_at_once_with_the_nearest_name(tmp_path):
    from rtpjax import LLM, AsyncLLM

    nowhere = str(tmp_path / "no-model")  # the options fail before the model is looked for
    with pytest.raises(TypeError, match="unknown engine option 'max_num_seq'; did you mean 'max_num_seqs'"):
        LLM(nowhere, max_num_seq=4)
    with pytest.raises(TypeError, match="unknown engine option 'bad_option'; options: max_model_len, "):
        LLM(nowhere, bad_option=1)
    with pytest.raises(TypeError, match="did you mean 'kv_write'"):
        AsyncLLM(nowhere, kv_writes="xla")
    for make in (LLM, AsyncLLM):
        with pytest.raises(ValueError, match="--max-num-seqs must be an integer >= 1 or None, got 0"):
            make(nowhere, max_num_seqs=0)


def parsers() -> dict[str, argparse.ArgumentParser]:
    from rtpjax.cli import add_generate_arguments
    from rtpjax.serve.launch import add_arguments

    serve, generate = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_arguments(serve)
    add_generate_arguments(generate)
    return {"serve": serve, "generate": generate}


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_engine_option_has_exactly_one_flag(command):
    parser = parsers()[command]
    for f in dataclasses.fields(EngineArgs):
        actions = [a for a in parser._actions if a.dest == f.name]
        if f.name == "progress":  # set by the program (serve turns it on), not a flag
            assert not actions and f not in cli_fields()
            continue
        assert len(actions) == 1, f.name
        spelled = [flag(f.name)] + (["--no-" + flag(f.name)[2:]] if options._kind(f)[0] is bool else [])
        assert actions[0].option_strings == spelled
    own = {"serve": {"host", "port", "api_key", "served_model_name", "max_queue", "graceful_shutdown_timeout", "model",
                     "data_parallel_size", "router_policy", "router_balance_abs_threshold",
                     "router_balance_rel_threshold"},
           "generate": {"prompt", "model", "max_tokens", "temperature", "top_p", "chat", "ignore_eos"}}[command]  # fmt: skip
    engine = {f.name for f in cli_fields()}
    assert {a.dest for a in parser._actions} - {"help"} == own | engine and not own & engine


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_lists_each_engine_flag_once(command):
    """The real command line: every engine flag heads one line of `--help`, its choices shown."""
    out = subprocess.run([sys.executable, "-m", "rtpjax.cli", command, "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    body = out[out.index("engine options (EngineArgs):") :]
    for f in cli_fields():
        assert len(re.findall(rf"^  {flag(f.name)}\b(?!-)", body, re.M)) == 1, f.name
    assert "--kv-write {auto,pallas,xla}" in body and "--mosaic-prefill, --no-mosaic-prefill" in body


def test_parsed_flags_make_engine_args():
    p = parsers()
    args = engine_args_from(p["serve"].parse_args(["--max-num-seqs", "4", "--no-enable-prefix-caching"]))
    assert args == EngineArgs(max_num_seqs=4, enable_prefix_caching=False, compilation_cache_dir=CLI_COMPILATION_CACHE)
    args = engine_args_from(p["serve"].parse_args(["m", "--kv-write", "pallas", "--mosaic-prefill"]), progress=True)
    assert (args.kv_write, args.mosaic_prefill, args.progress) == ("pallas", True, True)
    # generate: one sequence without warm-up unless told otherwise (the other sizes follow the prompt, see
    # rtpjax.cli.generate_sizes); --seed is the engine's seed (and the prompt's)
    gen = p["generate"]
    args = engine_args_from(gen.parse_args(["hi"]))
    assert args == EngineArgs(max_num_seqs=1, warmup=False, compilation_cache_dir=CLI_COMPILATION_CACHE)
    args = engine_args_from(gen.parse_args(["hi", "--max-num-seqs", "4", "--seed", "7", "--compilation-cache-dir", "",
                                            "--warmup"]))  # fmt: skip
    assert (args.max_num_seqs, args.warmup, args.seed, args.compilation_cache_dir) == (4, True, 7, "")
    with pytest.raises(SystemExit):  # argparse's own check of a choice
        gen.parse_args(["hi", "--kv-write", "triton"])


def test_a_bad_flag_value_is_one_line_and_exit_code_2(capsys):
    from rtpjax.cli import main

    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert capsys.readouterr().err == "rtpjax: error: --max-num-seqs must be an integer >= 1 or None, got 0\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, stories_dir):
    """A one-layer Llama with head_dim 16 (the Pallas kernels' smallest) and stories260K's tokenizer."""
    from conftest import make_tiny_checkpoint

    model = make_tiny_checkpoint("llama3", tmp_path_factory.mktemp("options") / "llama", num_hidden_layers=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, model / name)
    return model


@pytest.mark.slow
def test_engines_of_one_process_compile_their_own_kv_write(tiny_model, compile_cache):
    """Engine A writes K/V with XLA's scatter, then engine B, same model and shapes, with the Pallas kernel (the
    Pallas attention interpreted on CPU): B's compiled steps hold the kernel and A's do not (a choice read while
    tracing would have let B reuse A's layer), and both give the same tokens."""
    from conftest import ENGINE_ARGS
    from rtpjax import LLM, SamplingParams

    args = dict(ENGINE_ARGS, max_num_batched_tokens=16, attention_impl="pallas", compilation_cache_dir=compile_cache)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens, steps = {}, {}
    for write in ("xla", "pallas"):
        llm = LLM(str(tiny_model), kv_write=write, **args)
        tokens[write] = [o.outputs[0].token_ids for o in llm.generate([[1, 45, 39, 200], [1]], params)]
        steps[write] = [model.as_text() for model in llm.engine.runner._compiled.values()]
    assert steps["xla"] and not any("/kv_write/" in text for text in steps["xla"])  # the kernel's named scope
    assert steps["pallas"] and all("/kv_write/" in text for text in steps["pallas"])
    assert tokens["xla"] == tokens["pallas"] and len(tokens["xla"][0]) == 6


def test_readme_lists_every_engine_option():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(EngineArgs) if f"| `{f.name}` |" not in readme]
    assert not missing, f"README's engine-options table lacks {missing}"


def test_token_budget_default_follows_the_device_and_an_explicit_one_stays():
    from rtpjax.options import CPU_TOKEN_BUDGET, TOKEN_BUDGET

    assert EngineArgs().max_num_batched_tokens is None
    assert EngineArgs().for_platform("gpu").max_num_batched_tokens == TOKEN_BUDGET["gpu"] == 2048
    assert EngineArgs().for_platform("cpu").max_num_batched_tokens == CPU_TOKEN_BUDGET == 256
    assert EngineArgs(max_num_batched_tokens=512).for_platform("gpu").max_num_batched_tokens == 512
