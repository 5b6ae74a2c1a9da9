"""Scheduler alone (no tensors, no model): states, budgets, chunking, admission and preemption."""

from __future__ import annotations

import pytest

from language_server.engine.block_manager import BlockManager
from language_server.engine.scheduler import Scheduler
from language_server.engine.sequence import SamplingParams, Sequence, Status


def seq(name: str, n: int, **kw) -> Sequence:
    return Sequence(name, list(range(1, n + 1)), SamplingParams(max_tokens=100), **kw)


def run_step(sch: Scheduler, token: int = 7):
    """What the engine does around the runner: commit, then append a token to sampling sequences."""
    out = sch.schedule()
    sch.commit(out)
    for s in out.scheduled:
        if s.samples:
            s.seq.output_ids.append(token)
    return out


def test_prefills_of_several_prompts_share_a_step_then_decode_together():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 10), seq("b", 5)
    sch.add(a)
    sch.add(b)
    out = run_step(sch)
    assert [(s.seq.id, s.start, s.num_tokens, s.samples) for s in out.scheduled] == [
        ("a", 0, 10, True),
        ("b", 0, 5, True),
    ]
    out = run_step(sch)
    assert [(s.seq.id, s.start, s.num_tokens) for s in out.scheduled] == [("a", 10, 1), ("b", 5, 1)]
    assert a.num_computed == 11 and len(a.block_ids) == 3  # ceil(11 / 4)


def test_long_prompt_is_chunked_by_the_token_budget_and_samples_only_at_the_end():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = seq("a", 40)
    sch.add(a)
    chunks = [run_step(sch).scheduled[0] for _ in range(3)]
    assert [(c.start, c.num_tokens, c.samples) for c in chunks] == [
        (0, 16, False),
        (16, 16, False),
        (32, 8, True),
    ]
    assert a.output_ids == [7]


def test_decodes_go_first_and_a_new_prompt_fills_the_rest_of_the_budget():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=12)
    a = seq("a", 4)
    sch.add(a)
    run_step(sch)
    b = seq("b", 30)
    sch.add(b)
    out = run_step(sch)
    assert [(s.seq.id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 11)]


def test_max_num_seqs_limits_the_running_batch():
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sch.add(seq(f"s{i}", 3))
    out = run_step(sch)
    assert [s.seq.id for s in out.scheduled] == ["s0", "s1"] and len(sch.waiting) == 1


def test_admission_waits_for_free_blocks_instead_of_failing():
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100, watermark=0)
    a, b = seq("a", 12), seq("b", 8)  # a holds 3 blocks, b needs 2
    sch.add(a)
    sch.add(b)
    out = run_step(sch)
    assert [s.seq.id for s in out.scheduled] == ["a"] and b.status is Status.WAITING
    sch.finish(a, "stop")
    assert sch.blocks.num_free == 4
    out = run_step(sch)
    assert [s.seq.id for s in out.scheduled] == ["b"]


def test_decode_short_of_blocks_preempts_the_newest_and_recomputes_it_later():
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100, watermark=0)
    a, b = seq("a", 8), seq("b", 8)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # both prefilled: 4 blocks used, each has 9 tokens (needs a 3rd block to decode)
    assert sch.blocks.num_free == 0
    out = run_step(sch)
    assert out.preempted == [b] and b.status is Status.WAITING and b.block_ids == [] and b.num_computed == 0
    assert [s.seq.id for s in out.scheduled] == ["a"] and len(a.block_ids) == 3
    sch.finish(a, "length")
    out = run_step(sch)  # b recomputes prompt + its generated token in one prefill and samples again
    assert [(s.seq.id, s.start, s.num_tokens, s.samples) for s in out.scheduled] == [("b", 0, 9, True)]
    assert b.output_ids == [7, 7] and sch.num_preemptions == 1


def test_a_lone_sequence_that_cannot_grow_preempts_itself_and_ends_without_wedging():
    sch = Scheduler(BlockManager(2, 4), max_num_seqs=8, max_num_batched_tokens=100, watermark=0)
    a = seq("a", 4)
    sch.add(a)
    run_step(sch)
    b = seq("b", 4)
    sch.add(b)
    run_step(sch)  # a decodes into its 2nd block; b waits (no block left)
    assert b.status is Status.WAITING
    for _ in range(10):  # the cache holds 8 tokens: a must give way by then
        out = run_step(sch)
        if out.preempted:
            break
    assert out.preempted == [a] and a.num_tokens == 9
    out = run_step(sch)  # a can never fit again: it ends ("length"); b runs
    assert out.finished == [a] and a.finish_reason == "length"
    assert [s.seq.id for s in out.scheduled] == ["b"]


def test_waiting_for_embeddings_is_not_scheduled_until_inputs_are_ready():
    sch = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = Sequence("a", [], SamplingParams(), status=Status.WAITING_FOR_EMBEDDINGS, multimodal=True)
    sch.add(a)
    assert not sch.has_work and sch.pending == {"a": a}
    assert run_step(sch).scheduled == []
    sch.inputs_ready("a", [5, 6, 7], mrope_delta=-2)
    assert a.status is Status.WAITING and a.mrope_delta == -2
    out = run_step(sch)
    assert [(s.seq.id, s.num_tokens) for s in out.scheduled] == [("a", 3)]


def test_prompt_larger_than_the_whole_cache_is_rejected():
    sch = Scheduler(BlockManager(2, 4), max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(ValueError, match="does not fit"):
        sch.add(seq("a", 8))
    b = Sequence("b", [], SamplingParams(), status=Status.WAITING_FOR_EMBEDDINGS)
    sch.add(b)
    with pytest.raises(ValueError):
        sch.inputs_ready("b", list(range(20)), 0)
    assert b.status is Status.FINISHED and not sch.pending


def test_finish_frees_blocks_from_every_state():
    sch = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=100)
    a, b = seq("a", 6), seq("b", 6)
    c = Sequence("c", [], SamplingParams(), status=Status.WAITING_FOR_EMBEDDINGS)
    for s in (a, b, c):
        sch.add(s)
    run_step(sch)
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    for s in (a, b, c):
        sch.finish(s, "abort")
        assert s.status is Status.FINISHED and s.finish_reason == "abort"
    assert sch.blocks.num_free == 16 and not sch.has_work and not sch.pending


# -- prefix caching ---------------------------------------------------------------------------
def cached(num_blocks: int = 64, **kw) -> Scheduler:
    kw.setdefault("max_num_batched_tokens", 100)
    return Scheduler(BlockManager(num_blocks, 4, caching=True), max_num_seqs=8, **kw)


def test_a_later_request_with_the_same_prompt_starts_after_the_cached_blocks():
    sch = cached()
    a = seq("a", 10)
    sch.add(a)
    run_step(sch)
    b, c = seq("b", 10), seq("c", 8)  # c: 8 tokens, exactly 2 blocks, but its last token is computed
    sch.add(b)
    sch.add(c)
    out = run_step(sch)
    assert [(s.seq.id, s.start, s.num_tokens) for s in out.scheduled] == [
        ("a", 10, 1),
        ("b", 8, 2),
        ("c", 4, 4),
    ]
    assert b.block_ids[:2] == a.block_ids[:2] and c.block_ids[0] == a.block_ids[0]
    assert c.block_ids[1] != a.block_ids[1]  # c writes its own copy of the block its last token is in
    assert (b.num_cached, c.num_cached) == (8, 4)
    assert (sch.prefix_queried_tokens, sch.prefix_hit_tokens) == (28, 12)


def test_requests_admitted_in_the_same_step_share_what_the_first_one_computes():
    sch = cached()
    seqs = [seq(f"s{i}", 9) for i in range(3)]
    for s in seqs:
        sch.add(s)
    out = run_step(sch)
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(0, 9), (8, 1), (8, 1)]
    assert len({tuple(s.block_ids[:2]) for s in seqs}) == 1
    assert sch.blocks.num_used == 2 + 3  # the two shared blocks and each one's own last block


def test_a_request_that_wants_its_prompt_logprobs_computes_every_prompt_row():
    sch = cached()
    sch.add(seq("a", 9))
    run_step(sch)
    b = Sequence("b", list(range(1, 10)), SamplingParams(max_tokens=5, prompt_logprobs=0))
    sch.add(b)
    out = run_step(sch)
    assert [(s.seq.id, s.start) for s in out.scheduled] == [("a", 9), ("b", 0)] and b.num_cached == 0


def test_generated_tokens_fill_keyed_blocks_a_follow_up_prompt_reuses():
    sch = cached()
    a = seq("a", 6)
    sch.add(a)
    for _ in range(5):  # 6 prompt tokens + 5 generated: tokens 0..10 computed, blocks 0 and 1 full
        run_step(sch)
    follow = Sequence("f", a.prompt_ids + a.output_ids[:4] + [50, 51], SamplingParams(max_tokens=5))
    sch.finish(a, "stop")
    sch.add(follow)
    out = run_step(sch)
    assert [(s.seq.id, s.start) for s in out.scheduled] == [("f", 8)]


def test_a_preempted_request_comes_back_to_its_own_cached_blocks():
    sch = cached(4, watermark=0)
    a = seq("a", 8)
    b = Sequence("b", list(range(11, 19)), SamplingParams(max_tokens=100))
    sch.add(a)
    sch.add(b)
    run_step(sch)  # both prefilled: all four blocks full and keyed
    out = run_step(sch)
    assert out.preempted == [b]  # a's decode took b's last block (freed last to first: its tail)
    sch.finish(a, "length")
    out = run_step(sch)  # b recomputes only what was evicted: its second block and its token
    assert [(s.seq.id, s.start, s.num_tokens) for s in out.scheduled] == [("b", 4, 5)]
    assert b.num_cached == 0 and sch.prefix_hit_tokens == 0  # usage reports its first admission


def test_cached_blocks_count_as_free_space_and_are_evicted_for_new_prompts():
    sch = cached(4, watermark=0)
    for name in "abcd":  # each distinct, each leaves two keyed blocks behind
        s = Sequence(name, [ord(name)] * 8, SamplingParams(max_tokens=1))
        sch.add(s)
        out = run_step(sch)
        assert [x.seq.id for x in out.scheduled] == [name]
        sch.finish(s, "length")
    assert sch.blocks.num_free == 4 and sch.blocks.num_cached <= 4


def test_the_image_digest_of_a_block_decides_whether_it_matches():
    sch = cached()
    ids = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6]  # block 1 holds image pads
    a, b, c = (
        Sequence(
            name, [], SamplingParams(max_tokens=5), status=Status.WAITING_FOR_EMBEDDINGS, multimodal=True
        )
        for name in "abc"
    )
    sch.add(a)
    sch.inputs_ready("a", ids, 0, {1: b"img-x"})
    run_step(sch)
    for s, digest in ((b, b"img-x"), (c, b"img-y")):
        sch.add(s)
        sch.inputs_ready(s.id, ids, 0, {1: digest})
    out = run_step(sch)
    assert [(s.seq.id, s.start) for s in out.scheduled] == [("a", 10), ("b", 8), ("c", 4)]
