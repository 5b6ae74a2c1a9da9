"""Per-request bookkeeping the scheduler and engine share: sampling parameters, status, token ids.

A `Sequence` holds plain Python data only (ids, counters, block ids) — never tensors; the runner
keeps any tensors a sequence needs (vision rows, generator) keyed by `seq.id`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING_FOR_EMBEDDINGS = "waiting_for_embeddings"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best rivals
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids unique
    grammar: str | None = None  # the answer must follow it (`engine/grammar.py` spec: json, schema:...)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(eq=False)  # identity: two requests with equal fields are still two requests
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    status: Status = Status.WAITING
    multimodal: bool = False  # vision rows live in the runner under this id
    mrope_delta: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    # prefix caching (plain data: the keys are bytes)
    block_extras: dict[int, bytes] = field(default_factory=dict)  # block index -> its image pads' digest
    block_keys: list[bytes] = field(default_factory=list)  # content keys of the full blocks so far
    num_cached: int = 0  # prompt tokens found in the cache when first admitted
    arrival: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of tokens [start, end) of prompt + output."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids[start:] if start < n else []) + self.output_ids[max(0, start - n) : end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
