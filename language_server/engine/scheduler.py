"""Decides, each engine step, which sequences run and how many of their tokens: pure bookkeeping.

States: waiting-for-embeddings -> waiting -> running -> finished. Running sequences go first
(oldest first: one decode token, or the next chunk of a long prompt), then waiting prompts are
admitted FCFS while the step's token budget, `max_num_seqs` and free KV blocks allow. A prompt is
admitted only when blocks for all its tokens are free; when a decode needs a block and none is
free, the newest running sequence is preempted (blocks freed, recomputed later). With prefix
caching, an admitted sequence first takes the cached blocks its leading tokens match (at least its
last token is always computed: that row is sampled) and starts after them, and each block a step
fills is keyed as the step is scheduled, so a sequence admitted later in the same step already
shares it (each layer writes the step's K/V before any attention reads it). A request that asks for
its prompt's log-probabilities computes every prompt row. No tensors here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from language_server.engine import prefix
from language_server.engine.block_manager import BlockManager
from language_server.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first token index computed this step (= tokens already cached)
    num_tokens: int  # tokens computed this step
    samples: bool = field(init=False)  # the chunk reaches the last known token: its last row is sampled

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (cannot ever fit)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, watermark: float = 0.01
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.watermark_blocks = int(watermark * blocks.num_blocks)
        self.pending: dict[str, Sequence] = {}  # waiting for embeddings
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache (first admissions)
        self.prefix_hit_tokens = 0  # ... and found there

    # -- requests in and out ------------------------------------------------------------------
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, seq: Sequence) -> None:
        if seq.status is Status.WAITING_FOR_EMBEDDINGS:
            self.pending[seq.id] = seq
            return
        self._check_fits(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def inputs_ready(
        self,
        seq_id: str,
        prompt_ids: list[int],
        mrope_delta: int,
        block_extras: dict[int, bytes] | None = None,
    ) -> Sequence:
        """A pending sequence got its prompt (expanded ids) and becomes schedulable; `block_extras`:
        the digest of each block's image pads (the runner's `add_vision`)."""
        seq = self.pending.pop(seq_id)
        seq.prompt_ids, seq.mrope_delta = list(prompt_ids), mrope_delta
        seq.block_extras, seq.block_keys = dict(block_extras or {}), []
        try:
            self._check_fits(seq)
        except ValueError:
            self.finish(seq, "error")
            raise
        seq.status = Status.WAITING
        self.waiting.append(seq)
        return seq

    def _check_fits(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens does not fit the KV cache ({self.capacity_tokens()} tokens)"
            )

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:  # not there if `add` refused it
            self.waiting.remove(seq)
        else:
            self.pending.pop(seq.id, None)
        self.blocks.free(seq.block_ids)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.budget
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.grow(seq.block_ids, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
                self._key_filled(seq, seq.num_computed + n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if self.blocks.blocks_for(seq.num_tokens) > self.blocks.num_blocks:  # grew past the cache
                self.finish(seq, "length")
                out.finished.append(seq)
                continue
            hit = self._cached_prefix(seq)
            need = self.blocks.blocks_for(seq.num_tokens) - len(seq.block_ids)
            if hit is not None:
                need += self.blocks.reviving(hit) - len(hit)
            if need + self.watermark_blocks > self.blocks.num_free and self.running:
                break
            if need > self.blocks.num_free:
                break  # nothing running and still short: only possible with a tiny watermark slack
            self._take_prefix(seq, hit)
            self.blocks.grow(seq.block_ids, seq.num_tokens)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            self._key_filled(seq, seq.num_computed + n)
            budget -= n
        return out

    # -- prefix caching -----------------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int] | None:
        """The cached blocks a sequence holding nothing yet could start from; None if it does not
        look (no caching, blocks held, or it wants its prompt's log-probabilities: those need every
        prompt row computed)."""
        if not self.blocks.caching or seq.block_ids or seq.params.prompt_logprobs is not None:
            return None
        bs = self.blocks.block_size
        most = (seq.num_tokens - 1) // bs  # the last token is computed: its row is sampled
        return self.blocks.lookup(prefix.extend_keys(seq, most, bs), most)

    def _take_prefix(self, seq: Sequence, hit: list[int] | None) -> None:
        if hit is None:
            return
        self.blocks.take(hit)
        seq.block_ids.extend(hit)
        seq.num_computed = len(hit) * self.blocks.block_size
        if seq.num_preemptions == 0 and not seq.output_ids:  # the first admission: what usage reports
            seq.num_cached = seq.num_computed
            self.prefix_queried_tokens += seq.num_prompt
            self.prefix_hit_tokens += seq.num_computed

    def _key_filled(self, seq: Sequence, upto: int) -> None:
        """Key the blocks that tokens [0, upto) fill, as this step writes them."""
        if not self.blocks.caching:
            return
        bs = self.blocks.block_size
        first = seq.num_computed // bs
        keys = prefix.extend_keys(seq, upto // bs, bs)
        for i in range(first, len(keys)):
            self.blocks.register(seq.block_ids[i], keys[i])

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def commit(self, out: SchedulerOutput) -> None:
        """After the runner computed the step: advance each scheduled sequence's cached-token count."""
        for s in out.scheduled:
            s.seq.num_computed = s.start + s.num_tokens
