"""The image serving benchmark's workload, its HTTP driver and its probes (no servers started here).

`make_image_workload` draws image+text chat requests (1-2 random-noise PNGs of distinct content,
sides in a range, short prompts, fixed output lengths); `drive_chat` replays them with the openai
client (streaming chat) at one concurrency and records TTFT/TPOT per request; `histogram_sum_count`
and `gauge` read Prometheus text; `cache_probe` times one request's encoder side through
/metrics; `CpuMeter` tells how much CPU *other* processes took meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import statistics
import time
from dataclasses import dataclass

from deepsplit.bench.serve_workload import Sample

ENC_TOTAL = "deepsplit_encode_total_seconds"  # encoder histogram: request received -> rows written

PROMPTS = [
    "Describe this image.",
    "What is in the picture?",
    "List the main colours you see.",
    "Is there any text here?",
    "Give this image a short title.",
    "What stands out most?",
]


@dataclass
class ImageReq:
    sizes: list[tuple[int, int]]  # (height, width) per image
    urls: list[str]  # data: URLs of the PNGs, in prompt order
    text: str
    max_tokens: int

    def messages(self, for_hf: bool = False) -> list[dict]:
        parts: list[dict] = [
            {"type": "image"} if for_hf else {"type": "image_url", "image_url": {"url": u}} for u in self.urls
        ]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}]


def noise_png(h: int, w: int, seed: tuple[int, ...]) -> str:
    """A random-noise RGB PNG (content fixed by `seed`) as a data: URL."""
    import numpy as np
    from PIL import Image

    px = np.random.default_rng(list(seed)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_image_workload(
    n: int,
    side_range: tuple[int, int],
    images_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int,
    tag: int,
) -> list[ImageReq]:
    """`n` requests; each image side uniform in `side_range` (step 32); `tag` keeps sets disjoint."""
    import random

    rng = random.Random(seed * 1000 + tag)
    lo, hi = side_range[0] // 32, side_range[1] // 32
    out = []
    for i in range(n):
        sizes = [
            (32 * rng.randint(lo, hi), 32 * rng.randint(lo, hi)) for _ in range(rng.randint(*images_range))
        ]
        urls = [noise_png(h, w, (seed, tag, i, j)) for j, (h, w) in enumerate(sizes)]
        out.append(ImageReq(sizes, urls, rng.choice(PROMPTS), rng.randint(*output_range)))
    return out


async def _one(client, r: ImageReq) -> Sample | None:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model="bench",
            messages=r.messages(),
            max_tokens=r.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or now
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        print(f"  request failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    first = first or time.perf_counter()
    last = last or first
    return Sample(first - t0, (last - first) / (tokens - 1) if tokens > 1 else None, tokens, last - t0)


def drive_chat(url: str, reqs: list[ImageReq], concurrency: int) -> tuple[list[Sample], float, int]:
    """-> (samples of the requests that succeeded, wall seconds, number that failed)."""
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(r):
            async with sem:
                return await _one(client, r)

        t0 = time.perf_counter()
        got = await asyncio.gather(*(bounded(r) for r in reqs))
        wall = time.perf_counter() - t0
        await client.close()
        return [s for s in got if s is not None], wall, sum(s is None for s in got)

    return asyncio.run(main())


def histogram_sum_count(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of an unlabelled Prometheus histogram in /metrics text."""
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                vals[suffix] = float(line.split()[1])
    return vals.get("_sum", 0.0), vals.get("_count", 0.0)


def gauge(text: str, name: str) -> float:
    """Value of an unlabelled Prometheus gauge in /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def port_base(n: int) -> int:
    """A base port with `n` consecutive free ports above it (other people's clusters use the defaults)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(_free(base + k) for k in range(n)):
            return base
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _metrics(url: str) -> str:
    import httpx

    return httpx.get(url + "/metrics", timeout=10).text


def cache_probe(endpoint: str, encoder_url: str, req: ImageReq, hits: int) -> dict:
    """Encoder-side time of one request whose image is new (miss), then of the same request again."""
    times, ttfts, hit_count = [], [], []
    for _ in range(1 + hits):
        text = _metrics(encoder_url)
        s0, c0 = histogram_sum_count(text, ENC_TOTAL)
        h0 = gauge(text, "deepsplit_encode_cache_hits")
        samples, _, failed = drive_chat(endpoint, [req], 1)
        text = _metrics(encoder_url)
        s1, c1 = histogram_sum_count(text, ENC_TOTAL)
        if failed or c1 - c0 != 1:
            raise RuntimeError(f"cache probe: {failed} failed, {c1 - c0} encoder observations")
        times.append(s1 - s0)
        ttfts.append(samples[0].ttft)
        hit_count.append(gauge(text, "deepsplit_encode_cache_hits") - h0)
    return {
        "image_sizes": req.sizes,
        "miss_s": times[0],
        "hit_s": statistics.median(times[1:]),
        "hit_all_s": times[1:],
        "miss_ttft_s": ttfts[0],
        "hit_ttft_s": statistics.median(ttfts[1:]),
        "cache_hits_per_request": hit_count,
    }


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest time is inside user)


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])  # utime stime cutime cstime


class CpuMeter:
    """CPU used by `pids` (ours) and by everything else on the host between start() and stop(), in
    cores: the machine is shared, and others' load explains noise no run of ours can remove."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> CpuMeter:
        self.t, self.busy, self.ours = time.monotonic(), _busy_ticks(), self._ours()
        return self

    def _ours(self) -> int:
        return sum(_proc_ticks(p) for p in self.pids)

    def stop(self) -> dict:
        wall = time.monotonic() - self.t
        busy, ours = _busy_ticks() - self.busy, self._ours() - self.ours
        return {
            "wall_s": wall,
            "ours_cores": ours / self.hz / wall,
            "others_cores": max(0, busy - ours) / self.hz / wall,
        }
