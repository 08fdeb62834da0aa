"""The torch-free tokenizer path: same tokens, text and chat prompts as AutoTokenizer, and no torch import."""

import json
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
