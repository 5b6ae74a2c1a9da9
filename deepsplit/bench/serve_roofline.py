"""Decode efficiency: our engine's decode step at batch B against the bare weight matmuls of that step.

The engine runs in-process (same code as the server) on B sequences; the step time is taken from its
`on_step` hook for steps that are pure decodes of all B. The roofline replays only the weight
GEMMs of such a step — attention projections, router, the experts with the routing counts actually
observed, dense MLPs, lm_head — timed alone. Each part is timed in every form the model could use
and counts at its fastest (all forms are reported as `part[form]`): torch's dense GEMM (MKL; for
lm_head as `W @ h^T` and as `F.linear`; for the experts one GEMM per expert and two `bmm` over all
experts padded to the busiest), the oneDNN-packed weights the serving runner uses (one GEMM per
expert on exactly its rows) and, where it loads, the native expert kernel the model decodes with
(`deepsplit.native`, its GEMMs only: no SiLU, no weighted sum). Step and roofline are measured in
`rounds` alternating rounds (a batch of sequences decoded, then every form timed with that round's
routing). From the second round on, every decode step is also *paired*: right after it, in the
engine thread (between steps, outside the step's time), the roofline of that very step's routing is
replayed in the forms the previous round found fastest, each part timed as in the rounds (median of
3 after a warm-up; a cold single call would be ~4% slower and flatter our ratio). The ratio is the
median over those pairs — a step and its roofline under a second apart, so the slow phases of a
shared machine (seconds to minutes long, up to 1.6x here) fall on both sides alike; the rounds' own
ratios are reported too. It does not change the model code.
"""

from __future__ import annotations

import statistics
import time


def measure(model_dir: str, batch: int, context: int, steps: int, threads: int, rounds: int = 3) -> dict:
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
    # (step, its forward+sample, its roofline replayed right after)
    pairs: list[tuple[float, float, float]] = []
    fastest: dict[str, str] = {}  # part -> form, from the last round's full timing

    def on_step(out, dt):
        if len(out.scheduled) == batch and all(s.num_tokens == 1 for s in out.scheduled):
            first = not times
            times.append(dt)
            run_times.append(eng.runner.last_step_s)
            step_counts.append(list(counts))
            if fastest and not first:
                roof = _roofline(lm, batch, step_counts[-1], F, fastest, repeats=3)["total"]
                pairs.append((dt, run_times[-1], roof))
        counts.clear()

    eng.on_step = on_step
    eng.start(threads)
    g = torch.Generator().manual_seed(0)
    per_round = []
    try:
        for r in range(rounds):
            times.clear(), run_times.clear(), step_counts.clear()
            seqs = [
                Sequence(
                    f"d{r}.{i}",
                    torch.randint(1000, 150000, (context,), generator=g).tolist(),
                    SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True),
                )
                for i in range(batch)
            ]
            generate(eng, seqs, timeout=3600)
            step = statistics.median(times[1:] or times)
            roof = _roofline(lm, batch, step_counts[len(step_counts) // 2], F)
            fastest.update(roof["fastest"])
            per_round.append(
                {
                    "decode_step_s": step,
                    "decode_forward_sample_s": statistics.median(run_times[1:] or run_times),
                    "roofline_s": roof["total"],
                    "ratio": step / roof["total"],
                    "roofline_parts_s": roof,
                }
            )
    finally:
        eng.stop()
    mid = sorted(per_round, key=lambda x: x["ratio"])[len(per_round) // 2]  # the median round
    out = {"batch": batch, "context": context, **mid, "rounds": per_round, "round_ratio": mid["ratio"]}
    if pairs:
        steps, runs, roofs = (list(x) for x in zip(*pairs, strict=True))
        ratios = [st / rf for st, rf in zip(steps, roofs, strict=True)]
        out["paired"] = {
            "pairs": len(pairs),
            "decode_step_s": statistics.median(steps),
            "decode_forward_sample_s": statistics.median(runs),
            "roofline_s": statistics.median(roofs),
            "ratio": statistics.median(ratios),
            "ratio_p10_p90": _quantiles(ratios),
            "steps_s": steps,
            "rooflines_s": roofs,
        }
        for k in ("decode_step_s", "decode_forward_sample_s", "roofline_s", "ratio"):
            out[k] = out["paired"][k]
    return out


def _quantiles(xs: list[float]) -> tuple[float, float]:
    """10th and 90th percentiles (the single value twice for one pair)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[0], q[-1]


def _roofline(
    lm, B: int, counts: list[list[int]], F, only: dict[str, str] | None = None, repeats: int = 7
) -> dict:
    """Every part of the step's weight GEMMs timed in every form (`only`: part -> the one form to
    time); `out[part]` is its fastest form, `out["fastest"]` names them."""
    import torch

    from deepsplit import native
    from deepsplit.model import packed
    from deepsplit.model.moe import SparseMoeBlock

    H = lm.cfg.hidden_size
    dt = lm.lm_head.weight.dtype
    x = torch.randn(B, H, dtype=dt)
    mm, pk = torch.mm, packed.linear
    # part -> form -> [(fn, a, b)]: fn(a, b) is one weight GEMM of the step
    ops: dict[str, dict[str, list]] = {
        k: {} for k in ("attention_proj", "router", "experts", "dense_mlp", "lm_head")
    }

    def add(part: str, form: str, fn, a, b) -> None:
        if only is None or only.get(part) == form:
            ops[part].setdefault(form, []).append((fn, a, b))

    moe_i = 0
    for layer in lm.model.layers:
        a = layer.self_attn
        o_in = torch.randn(B, a.nh * a.d, dtype=dt)
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            add("attention_proj", "dense", F.linear, x, lin.weight)
        add("attention_proj", "dense", F.linear, o_in, a.o_proj.weight)
        if a._qkv is not None:
            add("attention_proj", "packed", pk, x, a._qkv)
            add("attention_proj", "packed", pk, o_in, a._o)
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            add("router", "dense", F.linear, x, mlp.gate.weight)
            gu, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
            inter = down.shape[1]
            for e, n in enumerate(counts[moe_i]):
                if n:
                    xe, ae = torch.randn(n, H, dtype=dt), torch.randn(n, inter, dtype=dt)
                    add("experts", "per_gemm", mm, xe, gu[e])
                    add("experts", "per_gemm", mm, ae, down[e])
                    if mlp._packed is not None:
                        add("experts", "packed", pk, xe, mlp._packed[e][0])
                        add("experts", "packed", pk, ae, mlp._packed[e][1])
            n, E = max(counts[moe_i]), gu.shape[0]
            if native.load() and dt == torch.float32:
                ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts[moe_i])).view(B, -1)
                wts = torch.full(ids.shape, 1.0 / ids.shape[1])

                def gemms(x_, w, ids=ids, wts=wts):
                    return torch.ops.deepsplit.moe_experts(x_, ids, wts, *w, True)

                add("experts", "native", gemms, x, (gu, down))
            add("experts", "padded_bmm", torch.bmm, torch.randn(E, n, H, dtype=dt), gu)
            add("experts", "padded_bmm", torch.bmm, torch.randn(E, n, inter, dtype=dt), down)
            moe_i += 1
        else:
            for _, lin in mlp.named_children():
                if isinstance(lin, torch.nn.Linear):
                    add("dense_mlp", "dense", F.linear, torch.randn(B, lin.in_features, dtype=dt), lin.weight)
            if mlp._gate_up is not None:
                add("dense_mlp", "packed", pk, x, mlp._gate_up)
                add("dense_mlp", "packed", pk, torch.randn(B, mlp.down_proj.in_features, dtype=dt), mlp._down)
    W = lm.lm_head.weight
    add("lm_head", "W@h^T", lambda w, a: mm(w, a.t()), W, x)
    add("lm_head", "linear", F.linear, x, W)
    for w in lm._lm_head or []:
        add("lm_head", "packed", pk, x, w)
    out: dict = {"fastest": {}}
    with torch.inference_mode():
        for part, forms in ops.items():
            for form, group in forms.items():
                out[f"{part}[{form}]"] = _time(lambda g=group: [f(a, w) for f, a, w in g], repeats)
            if forms:
                out["fastest"][part] = min(forms, key=lambda f: out[f"{part}[{f}]"])
            out[part] = out[f"{part}[{out['fastest'][part]}]"] if forms else 0.0
    out["total"] = sum(out[part] for part in ops)
    return out


def _time(fn, repeats: int = 7) -> float:
    """Median of `repeats` timed calls after an untimed warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)
