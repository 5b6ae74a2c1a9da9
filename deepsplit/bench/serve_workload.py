"""The serving benchmark's workload and its HTTP driver (the `openai` async client, streaming).

`make_workload` draws mixed text requests (prompt and output lengths uniform in the given ranges,
token-id prompts so lengths are exact); `drive` replays them against a server at a fixed
concurrency and records per-request TTFT, TPOT and output tokens. It knows nothing of the server.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    tokens: int
    latency: float


def make_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int, vocab_hi: int = 150000
) -> list[Req]:
    rng = random.Random(seed)
    return [
        Req(
            [rng.randrange(1000, vocab_hi) for _ in range(rng.randint(*prompt_range))],
            rng.randint(*output_range),
        )
        for _ in range(n)
    ]


async def _one(client, model: str, r: Req) -> Sample:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model=model,
        prompt=r.prompt,
        max_tokens=r.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    first = first or time.perf_counter()
    last = last or first
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - t0, tpot, tokens, last - t0)


async def _drive(url: str, model: str, reqs: list[Req], concurrency: int) -> tuple[list[Sample], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(r: Req) -> Sample:
        async with sem:
            return await _one(client, model, r)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*(bounded(r) for r in reqs))
    wall = time.perf_counter() - t0
    await client.close()
    return list(samples), wall


def drive(url: str, model: str, reqs: list[Req], concurrency: int) -> tuple[list[Sample], float]:
    """-> (per-request samples, wall seconds for the whole workload)."""
    return asyncio.run(_drive(url, model, reqs, concurrency))
