"""Decode efficiency: our engine's decode step at batch B against the bare weight matmuls of that step.

The engine runs in-process (same code as the server) on B sequences; the step time is taken from its
`on_step` hook for steps that are pure decodes of all B. The roofline replays only the weight
GEMMs of such a step — attention projections, router, the experts with the routing counts actually
observed, dense MLPs, lm_head — timed alone. The experts count as the faster of one GEMM per expert
and two `bmm` over all experts with rows padded to the busiest (the model's decode dispatch); both
are reported. It does not change the model code.
"""

from __future__ import annotations

import statistics
import time


def measure(model_dir: str, batch: int, context: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from deepsplit.model.moe import SparseMoeBlock
    from language_server.config import LanguageSettings
    from language_server.engine.offline import generate
    from language_server.engine.sequence import SamplingParams, Sequence
    from language_server.server import build_engine

    settings = LanguageSettings(
        model=model_dir,
        threads=threads,
        max_num_seqs=batch,
        max_num_batched_tokens=2048,
        kv_cache_bytes=1 << 30,
    )
    built = build_engine(settings)
    eng = built.engine
    lm = eng.runner.lm
    counts: list[list[int]] = []
    for m in lm.modules():
        if isinstance(m, SparseMoeBlock):
            orig = m.route

            def route(x, orig=orig, E=m.num_experts):
                w, i = orig(x)
                counts.append(torch.bincount(i.reshape(-1), minlength=E).tolist())
                return w, i

            m.route = route
    times: list[float] = []
    run_times: list[float] = []
    step_counts: list[list[list[int]]] = []

    def on_step(out, dt):
        if len(out.scheduled) == batch and all(s.num_tokens == 1 for s in out.scheduled):
            times.append(dt)
            run_times.append(eng.runner.last_step_s)
            step_counts.append(list(counts))
        counts.clear()

    eng.on_step = on_step
    eng.start(threads)
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(
            f"d{i}",
            torch.randint(1000, 150000, (context,), generator=g).tolist(),
            SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True),
        )
        for i in range(batch)
    ]
    generate(eng, seqs, timeout=3600)
    eng.stop()
    step = statistics.median(times[1:] or times)
    roof = _roofline(lm, batch, step_counts[len(step_counts) // 2], F)
    return {
        "batch": batch,
        "context": context,
        "decode_step_s": step,
        "decode_forward_sample_s": statistics.median(run_times[1:] or run_times),
        "roofline_s": roof["total"],
        "ratio": step / roof["total"],
        "roofline_parts_s": roof,
    }


def _roofline(lm, B: int, counts: list[list[int]], F) -> dict:
    import torch

    from deepsplit.model.moe import SparseMoeBlock

    H = lm.cfg.hidden_size
    dt = lm.lm_head.weight.dtype
    x = torch.randn(B, H, dtype=dt)
    ops: dict[str, list] = {"attention_proj": [], "router": [], "experts": [], "dense_mlp": [], "lm_head": []}
    ops["experts_per_gemm"], ops["experts_padded_bmm"] = [], []
    # (fn, a, b): fn(a, b) is one weight GEMM of the step
    moe_i = 0
    for layer in lm.model.layers:
        a = layer.self_attn
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            ops["attention_proj"].append((F.linear, x, lin.weight))
        ops["attention_proj"].append((F.linear, torch.randn(B, a.nh * a.d, dtype=dt), a.o_proj.weight))
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            ops["router"].append((F.linear, x, mlp.gate.weight))
            gu, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
            for e, n in enumerate(counts[moe_i]):
                if n:
                    ops["experts_per_gemm"].append((torch.mm, torch.randn(n, H, dtype=dt), gu[e]))
                    ops["experts_per_gemm"].append(
                        (torch.mm, torch.randn(n, down.shape[1], dtype=dt), down[e])
                    )
            n, E = max(counts[moe_i]), gu.shape[0]
            ops["experts_padded_bmm"].append((torch.bmm, torch.randn(E, n, H, dtype=dt), gu))
            ops["experts_padded_bmm"].append((torch.bmm, torch.randn(E, n, down.shape[1], dtype=dt), down))
            moe_i += 1
        else:
            for _, lin in mlp.named_children():
                if isinstance(lin, torch.nn.Linear):
                    ops["dense_mlp"].append((F.linear, torch.randn(B, lin.in_features, dtype=dt), lin.weight))
    W = lm.lm_head.weight  # timed as the runner computes it (W @ h^T); F.linear reported separately
    ops["lm_head"].append((lambda w, a: torch.mm(w, a.t()), W, x))
    ops["lm_head_as_linear"] = [(F.linear, x, W)]
    out = {}
    with torch.inference_mode():
        for name, group in ops.items():
            out[name] = _time(lambda g=group: [f(a, w) for f, a, w in g]) if group else 0.0
    out["experts"] = min(out["experts_per_gemm"], out["experts_padded_bmm"])
    alternatives = ("lm_head_as_linear", "experts_per_gemm", "experts_padded_bmm")
    out["total"] = sum(v for k, v in out.items() if k not in alternatives)
    return out


def _time(fn, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)
