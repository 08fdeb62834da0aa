"""`speculative_config` in vLLM's spelling, checked once: a bad key or value is a one-line ValueError naming it.

Pure Python (no JAX): EngineArgs checks it while the command line is still parsing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

METHODS = ("ngram", "draft_model", "eagle3")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" (prompt lookup), "draft_model" (a smaller model of the same vocabulary), "eagle3" (a head)
    num_speculative_tokens: int  # K: drafts per sequence per step at most
    model: str | None = None  # draft_model: the draft model's folder; eagle3: the head's
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up
    prompt_lookup_min: int = 2  # ngram: shortest suffix that may match (vLLM's default is 1; 1 guesses too often)
    # Above this many running sequences a step does not speculate (vLLM's name): at large batches a step is
    # compute-bound and verifying rejected drafts costs more than it saves.
    disable_by_batch_size: int = 32
    # A sequence whose drafts were accepted less often than this (over its recent drafts) proposes fewer tokens.
    min_acceptance_rate: float = 0.25

    @property
    def chain_lookup(self) -> tuple[int, int]:
        """Where the drafts of chained verify rounds (spec/chained.py) come from on the device: the n-gram lookup's
        (prompt_lookup_min, prompt_lookup_max), or (0, 0): a draft model's or EAGLE-3 head's program."""
        return (self.prompt_lookup_min, self.prompt_lookup_max) if self.method == "ngram" else (0, 0)

    @classmethod
    def parse(cls, value: dict | str) -> "SpeculativeConfig":
        """From the dict LLM(speculative_config=...) takes or the JSON --speculative-config takes."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                raise ValueError(f"speculative_config: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        value = dict(value)
        if "method" not in value:  # vLLM: a model alone means a draft model
            value["method"] = "draft_model" if value.get("model") else None
        if value["method"] not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(METHODS)}, got {value['method']!r}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        config = cls(**value)
        config._check()
        return config

    def _check(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"speculative_config: {message}")

        def integer(name: str, low: int):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{name} must be an integer >= {low}, got {v!r}")

        integer("num_speculative_tokens", 1)
        need(self.num_speculative_tokens <= 16, f"num_speculative_tokens must be <= 16, got {self.num_speculative_tokens}")
        integer("prompt_lookup_min", 1)
        integer("prompt_lookup_max", self.prompt_lookup_min)
        integer("disable_by_batch_size", 1)
        need(isinstance(self.min_acceptance_rate, (int, float)) and 0 <= self.min_acceptance_rate <= 1,
             f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate!r}")  # fmt: skip
        if self.method == "ngram":
            need(self.model is None, "method ngram takes no model")
            return
        need(isinstance(self.model, str) and self.model, f"method {self.method} needs a model (the folder of its weights)")
        need(Path(self.model, "config.json").is_file(), f"model {self.model!r} is not a folder with a config.json")
