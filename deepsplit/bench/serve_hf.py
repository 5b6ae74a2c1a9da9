"""The transformers contenders of the serving benchmark: `generate` one request at a time, and
`generate` on left-padded batches (only the tokens each request asked for are counted).

A logits processor stamps the time of every decoding step, which gives TTFT (first stamp) and TPOT
(mean gap after it) without a second run.
"""

from __future__ import annotations

import time

from deepsplit.bench.serve_workload import Req, Sample


class _Clock:
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def load(model_dir: str):
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def sequential(hf, reqs: list[Req]) -> tuple[list[Sample], float]:
    import torch
    from transformers import LogitsProcessorList

    out = []
    t_all = time.perf_counter()
    for r in reqs:
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                input_ids=torch.tensor([r.prompt]),
                attention_mask=torch.ones(1, len(r.prompt), dtype=torch.long),
                max_new_tokens=r.max_tokens,
                min_new_tokens=r.max_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        end = time.perf_counter()
        s = clock.stamps
        tpot = (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else None
        out.append(Sample(s[0] - t0, tpot, r.max_tokens, end - t0))
    return out, time.perf_counter() - t_all


def padded_batches(hf, reqs: list[Req], batch: int) -> tuple[list[Sample], float]:
    import torch
    from transformers import LogitsProcessorList

    out = []
    t_all = time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        width = max(len(r.prompt) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, r in enumerate(group):  # left padding
            ids[j, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt) :] = 1
        n = max(r.max_tokens for r in group)
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        s = clock.stamps
        for r in group:  # a request is "done" at the step that produced its last wanted token
            done = s[r.max_tokens - 1]
            tpot = (done - s[0]) / (r.max_tokens - 1) if r.max_tokens > 1 else None
            out.append(Sample(s[0] - t0, tpot, r.max_tokens, done - t0))
    return out, time.perf_counter() - t_all
