"""Our model code against the transformers oracle on the same tiny checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch

from deepsplit.model.generate import encode_prompts, greedy_generate, prefill_logits
from deepsplit.model.mrope import mrope_positions
from tests.deepsplit.model.conftest import PROMPTS, build_prompt, hf_inputs

ATOL = 1e-4


@pytest.mark.parametrize("name", [n for n in PROMPTS if PROMPTS[n][1]])
def test_vision_embeddings_and_deepstack_match(ours, hf_oracle, name):
    lm, vm, cfg, pre = ours
    p = build_prompt(pre, name)
    grid = torch.tensor(p.grid_thw)
    with torch.no_grad():
        ref = hf_oracle.model.get_image_features(p.pixel_values, grid)
        embeds, deepstack = vm(p.pixel_values, grid)
    H = cfg.text.hidden_size
    assert deepstack.shape == (embeds.shape[0], cfg.n_deepstack * H)
    torch.testing.assert_close(embeds, torch.cat(ref.pooler_output), atol=ATOL, rtol=0)
    for i, feat in enumerate(ref.deepstack_features):
        torch.testing.assert_close(deepstack[:, i * H : (i + 1) * H], torch.cat(feat), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_mrope_positions_and_delta_match(ours, hf_oracle, name):
    _, _, cfg, pre = ours
    p = build_prompt(pre, name)
    pos, delta = mrope_positions(p.input_ids, cfg.image_token_id, p.grid_thw, cfg.vision.spatial_merge_size)
    if not p.grid_thw:
        assert delta == 0 and torch.equal(pos, torch.arange(len(p.input_ids)).expand(3, -1))
        return
    kw = hf_inputs(p, cfg)
    ref_pos, ref_delta = hf_oracle.model.get_rope_index(
        kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"]
    )
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == int(ref_delta)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_full_prompt_logits_match(ours, hf_oracle, name):
    lm, vm, cfg, pre = ours
    p = build_prompt(pre, name)
    (logits,) = prefill_logits(lm, cfg, encode_prompts(vm, cfg, [p]))
    with torch.no_grad():
        ref = hf_oracle(**hf_inputs(p, cfg)).logits[0]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


def test_mixed_batch_logits_match_each_prompt(ours, hf_oracle):
    """All prompt kinds flattened into ONE forward (and one vision call) equal their solo oracle logits."""
    lm, vm, cfg, pre = ours
    prepared = [build_prompt(pre, n, seed=i * 10) for i, n in enumerate(PROMPTS)]
    batch_logits = prefill_logits(lm, cfg, encode_prompts(vm, cfg, prepared))
    for p, logits in zip(prepared, batch_logits, strict=False):
        with torch.no_grad():
            ref = hf_oracle(**hf_inputs(p, cfg)).logits[0]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["text", "one_image", "three_images", "image_end"])
def test_greedy_16_tokens_match_generate(ours, hf_oracle, name):
    lm, vm, cfg, pre = ours
    p = build_prompt(pre, name)
    kw = hf_inputs(p, cfg)
    with torch.no_grad():
        ref = hf_oracle.generate(**kw, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    ref_tokens = ref[0, len(p.input_ids) :].tolist()
    (tokens,) = greedy_generate(lm, cfg, encode_prompts(vm, cfg, [p]), max_new_tokens=16)
    assert tokens == ref_tokens


def test_batched_chunked_decode_matches_solo(ours):
    """Several prompts decoded together, prefilled in small chunks, equal each prompt decoded alone."""
    lm, vm, cfg, pre = ours
    prepared = [build_prompt(pre, n, seed=3) for n in ("text", "one_image", "three_images")]
    inputs = encode_prompts(vm, cfg, prepared)
    together = greedy_generate(lm, cfg, inputs, max_new_tokens=12, block_size=8, prefill_chunk=13)
    alone = [greedy_generate(lm, cfg, [x], max_new_tokens=12)[0] for x in inputs]
    assert together == alone
