"""The torch-free tokenizer path: same tokens, text and chat prompts as AutoTokenizer, and no torch import."""

import json
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from rtpjax.benchmarks.random_checkpoint import write_config_only
from rtpjax.loading.model_source import resolve_model
from rtpjax.loading.tokenizer import load_tokenizer, tokenizer_class

TEXTS = ["Hello world!  How are you?\n\nI'm fine. ", " leading space", "ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
         "w5 w6 w7", ""]  # fmt: skip


@pytest.fixture(scope="module")
def plain_folders(tmp_path_factory):
    return [resolve_model(None), write_config_only(tmp_path_factory.mktemp("wordlevel"), "tiny")]


def test_plain_tokenizer_matches_auto_tokenizer(plain_folders):
    for folder in plain_folders:
        assert tokenizer_class(folder) in ("PreTrainedTokenizerFast", "TokenizersBackend"), folder
        ours, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        for text in TEXTS:
            ids = auto.encode(text)
            assert ours.encode(text) == ids, (folder, text)
            assert ours.decode(ids) == auto.decode(ids) and ours.decode(ids, skip_special_tokens=True) == auto.decode(
                ids, skip_special_tokens=True
            )
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        if auto.chat_template:
            assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True
            )
        assert (ours.bos_token_id, ours.eos_token_id, ours.all_special_ids) == (
            auto.bos_token_id, auto.eos_token_id, auto.all_special_ids)  # fmt: skip


def test_other_classes_go_through_auto_tokenizer(stories_dir, tmp_path):
    assert tokenizer_class(stories_dir) == "LlamaTokenizer"
    assert type(load_tokenizer(stories_dir)) is type(AutoTokenizer.from_pretrained(stories_dir))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert tokenizer_class(tmp_path) is None  # AutoTokenizer then reports the broken file itself


def test_engine_start_imports_no_torch(tmp_path):
    """A server start on a checkpoint with a plain tokenizer never imports torch (13 s on a CUDA machine)."""
    code = f"""
import sys
from rtpjax.benchmarks.random_checkpoint import write_random_checkpoint
import rtpjax.serve.app
from rtpjax import LLM
llm = LLM(str(write_random_checkpoint({str(tmp_path)!r}, "tiny", shards=1)), max_num_seqs=4, max_model_len=128,
          max_num_batched_tokens=32)
print(json.dumps(["torch" in sys.modules, llm.generate("w5 w6")[0].outputs[0].text != None]))
""".replace("import sys", "import sys, json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True]


def test_an_engine_starts_after_another_failed_to(stories_dir, tmp_path):
    """A start that fails after its tokenizer thread began (a bad EAGLE-3 head: no weights) leaves that thread
    importing transformers; the next engine in the process still gets its tokenizer (a fresh interpreter: nothing
    imported yet)."""
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    code = f"""
from rtpjax import LLM
args = dict(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=32, warmup=False)
try:
    LLM({str(stories_dir)!r}, speculative_config={{"method": "eagle3", "model": {str(head)!r},
        "num_speculative_tokens": 2}}, **args)
except ValueError as e:
    print("failed:", e)
print("tokens:", LLM({str(stories_dir)!r}, **args).generate([[1, 2, 3]])[0].outputs[0].token_ids[:3])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "failed: speculative_config" in out.stdout and "tokens: [" in out.stdout, out.stdout


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2"])
def test_a_folder_without_tokenizer_fails_before_loading(tiny_checkpoints, monkeypatch, name):
    """transformers dies inside on such a folder (Llama, Mistral) or builds an empty tokenizer (Qwen2); instead one
    sentence names the folder and the fix, before any weights load or an engine process starts."""
    from conftest import ENGINE_ARGS
    from rtpjax import LLM, AsyncLLM
    from rtpjax.distributed import engine_process
    from rtpjax.loading import model_source

    def never(*args, **kwargs):
        raise AssertionError("weights loaded (or an engine started) for a folder without a tokenizer")

    monkeypatch.setattr(model_source, "load_model", never)
    monkeypatch.setattr(engine_process, "EngineProcess", never)
    folder = tiny_checkpoints[name]
    message = rf"^{re.escape(str(folder))} has no tokenizer files .*: pass --tokenizer DIR .*skip_tokenizer_init=True"
    for make in (LLM, AsyncLLM):
        with pytest.raises(ValueError, match=message):
            make(str(folder), **ENGINE_ARGS)


def test_skip_tokenizer_init_takes_and_gives_token_ids(tiny_checkpoints, compile_cache):
    from conftest import ENGINE_ARGS
    from rtpjax import LLM, SamplingParams
    from rtpjax.runner.greedy import greedy_tokens

    llm = LLM(str(tiny_checkpoints["llama3"]), skip_tokenizer_init=True, compilation_cache_dir=compile_cache,
              **ENGINE_ARGS)  # fmt: skip
    assert llm.tokenizer is None
    prompt = [1, 17, 42, 99]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    out = llm.generate(prompt, params)[0]
    e = llm.engine
    assert out.outputs[0].token_ids == list(greedy_tokens(e.runner.params, e.cfg, e.family, prompt, 6, block_size=16))
    assert out.outputs[0].text == "" and out.prompt is None
    assert len(out.outputs[0].logprobs) == 6 and len(out.prompt_logprobs) == 4
    with pytest.raises(ValueError, match="^a text prompt needs a tokenizer, .* runs without one"):
        llm.generate("Once upon a time")
    with pytest.raises(ValueError, match="^stop strings need a tokenizer"):
        llm.generate(prompt, SamplingParams(stop=["x"]))
