"""The native kernels (`deepsplit.native`) build and load here, and each computes what the torch path
computes (fp32 rounding apart): paged decode attention, the MoE experts and routing, norms, rotary,
the lm_head row argmax, and the whole model's decode with every kernel on against all off."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from deepsplit import native
from deepsplit.model.attention import AttentionMetadata, PagedKVCache, attention
from deepsplit.model.layers import RMSNorm, apply_rotary, norm_rope, row_max
from deepsplit.model.moe import SparseMoeBlock

needs_native = pytest.mark.skipif(not native.load(), reason="native kernels did not build")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_kernels_build_and_load_where_a_compiler_is():
    assert native.load()
    assert hasattr(torch.ops.deepsplit, "paged_decode_attention")


def test_disabled_or_no_compiler_means_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("DEEPSPLIT_NATIVE", "0")
    assert native.load() is False
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("DEEPSPLIT_NATIVE", "1")
    monkeypatch.setenv("DEEPSPLIT_NATIVE_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert native.load() is False


def _decode_step(nh, nkv, d, bs, lens, native_flag, seed=0, q_scale=1.0):
    """One decode token per sequence over `lens` cached keys in scattered blocks (`q_scale` widens
    the scores: softmax maxima that move far along a sequence)."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, 256, bs, nkv, d)
    k_pool, v_pool = cache.layer(0)
    k_pool.normal_(generator=g)
    v_pool.normal_(generator=g)
    free = iter(torch.randperm(256, generator=g).tolist())
    tables = [[next(free) for _ in range((c + 1 + bs - 1) // bs)] for c in lens]
    width = max(map(len, tables))
    slots = [t[c // bs] * bs + c % bs for t, c in zip(tables, lens, strict=True)]
    meta = AttentionMetadata(
        [1] * len(lens),
        list(lens),
        torch.tensor(slots),
        torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        native=native_flag,
    )
    q = torch.randn(len(lens), nh, d, generator=g) * q_scale
    k, v = torch.randn(len(lens), nkv, d, generator=g), torch.randn(len(lens), nkv, d, generator=g)
    with torch.inference_mode():
        return attention(q, k, v, meta, cache.layer(0), d**-0.5)


@needs_native
@pytest.mark.parametrize(
    "nh,nkv,d,bs,lens,q_scale",
    [
        (
            8,
            4,
            64,
            16,
            [255, 3, 17, 100, 1, 64, 63, 200, 31, 32, 5, 128],
            1.0,
        ),  # many sequences: one task each
        (4, 2, 32, 5, [9, 1, 40], 1.0),  # few: split sequences; block size not a power of two
        (4, 4, 128, 16, [70, 12], 1.0),  # no GQA
        (16, 2, 16, 8, [33, 7, 300], 1.0),  # 8 query heads per KV head, smallest head_dim
        (16, 8, 32, 16, [500, 2, 130], 1.0),  # two groups of 8 query heads, long sequence split in chunks
        (8, 4, 64, 16, [255, 3, 17, 100, 1, 64, 63, 200, 31, 32, 5, 128], 6.0),  # running maxima rescaled
        (6, 3, 16, 4, [90, 41], 6.0),  # heads not a multiple of the lanes, split and rescaled
    ],
)
def test_paged_decode_attention_equals_torch_path(nh, nkv, d, bs, lens, q_scale):
    ref = _decode_step(nh, nkv, d, bs, lens, native_flag=False, q_scale=q_scale)
    out = _decode_step(nh, nkv, d, bs, lens, native_flag=True, q_scale=q_scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("T", [1, 5, 40, 300])
def test_moe_experts_and_routing_equal_torch_path(T):
    torch.manual_seed(T)
    torch_block = SparseMoeBlock(hidden=64, inter=48, num_experts=8, top_k=2, native=False)
    for p in torch_block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    native_block = SparseMoeBlock(64, 48, 8, 2, native=True)
    native_block.load_state_dict(torch_block.state_dict())
    x = torch.randn(T, 64)
    with torch.inference_mode():
        (w, i), (w_ref, i_ref) = native_block.route(x), torch_block.route(x)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(native_block(x), torch_block(x), atol=1e-5, rtol=1e-5)


@needs_native
def test_norms_rotary_and_row_max_equal_torch():
    torch.manual_seed(0)
    norm = RMSNorm(64)
    torch.nn.init.normal_(norm.weight)
    h, delta = torch.randn(7, 64), torch.randn(7, 64)
    ref = F.rms_norm(h, (64,), norm.weight, norm.eps)
    torch.testing.assert_close(norm(h), ref, atol=1e-5, rtol=1e-5)
    s, y = norm.add(h, delta)
    torch.testing.assert_close(s, h + delta, atol=0, rtol=0)
    torch.testing.assert_close(y, F.rms_norm(h + delta, (64,), norm.weight, norm.eps), atol=1e-5, rtol=1e-5)
    qk_norm = RMSNorm(32)
    torch.nn.init.normal_(qk_norm.weight)
    qkv = torch.randn(7, 6 * 32)
    q = qkv[:, : 4 * 32].view(7, 4, 32)  # strided rows, as split from the fused projection
    cos, sin = torch.randn(7, 32), torch.randn(7, 32)
    ref = apply_rotary(F.rms_norm(q, (32,), qk_norm.weight, qk_norm.eps), cos, sin)
    torch.testing.assert_close(norm_rope(q, qk_norm, cos, sin), ref, atol=1e-5, rtol=1e-5)
    for C in (1, 15, 16, 16384, 1000):
        logits = torch.randn(5, C)
        logits[1, C // 3] = logits[1, C - 1] = 1e3  # a tie: the first index wins, as in torch
        m, i = row_max(logits)
        m_ref, i_ref = logits.max(-1)
        assert torch.equal(m, m_ref) and torch.equal(i, i_ref)


@needs_native
def test_model_decode_native_equals_torch(tiny_model_dir, monkeypatch):
    """Prefill then three decode steps of the tiny model (packed, as served), every kernel on (and
    really called) vs every kernel off."""
    from deepsplit.model.build import load_language_model

    lm = load_language_model(tiny_model_dir)[0].pack_weights()
    t = lm.cfg
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])

    def run():
        cache = PagedKVCache(t.num_hidden_layers, 16, 8, t.num_key_value_heads, t.head_dim)
        lens = [17, 12, 9]  # prompt lengths
        toks = torch.cat([ids[i, :n] for i, n in enumerate(lens)])
        slots = torch.cat([torch.arange(n) + 24 * i for i, n in enumerate(lens)])
        pos = torch.cat([torch.arange(n) for n in lens])
        outs = [lm(toks, pos, AttentionMetadata(lens, [0, 0, 0], slots, tables), cache)]
        for _ in range(3):
            toks = torch.stack([ids[i, n] for i, n in enumerate(lens)])
            slots = torch.tensor([n + 24 * i for i, n in enumerate(lens)])
            meta = AttentionMetadata([1, 1, 1], lens, slots, tables)
            outs.append(lm(toks, torch.tensor(lens), meta, cache))
            outs.append(lm.sample_logits(outs[-1], [])[0])
            lens = [n + 1 for n in lens]
        return outs

    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            fast = run()
        used = {e.name for e in prof.events()}
        for op in (
            "paged_decode_attention",
            "moe_experts",
            "moe_route_x",
            "norm_rope",
            "add_rms_norm",
            "row_max",
        ):
            assert f"deepsplit::{op}" in used, op  # the serving path really runs the kernels here
        monkeypatch.setattr(native, "load", lambda: False)
        slow = run()
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
