"""The engine loop: one thread running `schedule -> run -> postprocess` while there is work.

Other threads (the asyncio HTTP side) only call the thread-safe `add`, `inputs_ready`,
`inputs_failed`, `abort` and `fail_all`, which enqueue commands; results come back through each
request's `sink` callable, invoked on the engine thread (the caller hops it to its own loop). It
decides when a request ends (EOS, stop ids/strings, max_tokens) and frees everything it held.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from language_server.engine.detokenizer import Detokenizer
from language_server.engine.runner import ModelRunner
from language_server.engine.sampler import TokenLogprobs
from language_server.engine.scheduler import Scheduler, SchedulerOutput
from language_server.engine.sequence import Sequence, Status
from language_server.mm.base import MultimodalInputs

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""  # new text since the previous output
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_status: int = 400  # HTTP status the error maps to
    logprobs: tuple[TokenLogprobs, ...] = ()  # of `token_ids`, when the request asked for them
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # of prompt tokens 1.., with the first token
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


Sink = Callable[[RequestOutput], None]


class Engine:
    def __init__(
        self, runner: ModelRunner, scheduler: Scheduler, tokenizer, eos_ids: tuple[int, ...]
    ) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self._cmds: queue.Queue = queue.Queue()
        self._seqs: dict[str, tuple[Sequence, Sink, Detokenizer]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0
        self.on_step: Callable[[SchedulerOutput, float], None] | None = None  # metrics hook
        self.error: BaseException | None = None

    # -- thread-safe API ----------------------------------------------------------------------
    def add(self, seq: Sequence, sink: Sink) -> None:
        self._cmds.put(("add", seq, sink))

    def inputs_ready(self, seq_id: str, inputs: MultimodalInputs) -> None:
        self._cmds.put(("ready", seq_id, inputs))

    def inputs_failed(self, seq_id: str, message: str) -> None:
        self._cmds.put(("failed", seq_id, message))

    def abort(self, seq_id: str) -> None:
        self._cmds.put(("abort", seq_id, None))

    def fail_all(self, message: str, status: int = 503) -> None:
        """End every request the engine holds with an error (`status`); e.g. at the end of a drain."""
        self._cmds.put(("fail_all", message, status))

    def start(self, threads: int = 0) -> None:
        _release_openmp_workers()

        def main() -> None:
            if threads:
                torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    self._loop()
            except BaseException as e:  # a bug: make it visible via /health rather than hang silently
                self.error = e
                log.exception("engine loop died")
                self._fail_all(f"engine failure: {e}", 500)

        self._thread = threading.Thread(target=main, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.scheduler.has_work
            self._drain(block)
            if self.scheduler.has_work:
                self.step()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, a, b) -> None:
        if kind == "add":
            seq, sink = a, b
            self._seqs[seq.id] = (
                seq,
                sink,
                Detokenizer(self.tokenizer, seq.params.stop, seq.params.min_tokens),
            )
            try:
                self.scheduler.add(seq)
            except ValueError as e:
                self._end(seq.id, "error", str(e))
        elif kind == "ready":
            entry = self._seqs.get(a)
            if entry is None or entry[0].status is not Status.WAITING_FOR_EMBEDDINGS:
                b.release()  # aborted meanwhile: free the rows now
                return
            try:
                self.runner.add_vision(a, b)
                extras = self.runner.block_extras(a) if self.scheduler.blocks.caching else None
                self.scheduler.inputs_ready(a, b.fill_ids.tolist(), b.mrope_delta, extras)
            except ValueError as e:
                b.release()
                self._end(a, "error", str(e))
        elif kind == "failed":
            if a in self._seqs:
                self._end(a, "error", b)
        elif kind == "abort":
            if a in self._seqs:
                self._end(a, "abort")
        elif kind == "fail_all":
            self._fail_all(a, b)

    def step(self) -> None:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        tokens = self.runner.run(out) if out.scheduled else {}
        self.scheduler.commit(out)
        for seq in out.finished:
            self._end(seq.id, seq.finish_reason or "length")
        for s in out.scheduled:
            if s.samples and s.seq.id in tokens:
                self._append(s.seq, *tokens[s.seq.id])
        self.steps += 1
        if self.on_step is not None:
            self.on_step(out, time.perf_counter() - t0)

    def _append(self, seq: Sequence, tok: int, lp: TokenLogprobs | None = None) -> None:
        _, sink, detok = self._seqs[seq.id]
        lps = (lp,) if lp is not None else ()
        seq.output_ids.append(tok)
        p = seq.params
        plps = None  # with the first token: prefill has scored the whole prompt
        if p.prompt_logprobs is not None and len(seq.output_ids) == 1:
            plps = self.runner.prompt_logprobs(seq.id)
        reason, text = None, ""
        if (
            (tok in self.eos_ids and not p.ignore_eos)
            or tok in p.stop_token_ids
            or self.runner.grammar_ended(seq.id)
        ):
            reason = "stop"
        else:
            text, hit = detok.add(tok)
            if hit:
                reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens:
                reason = "length"
        if reason is None:
            n = len(seq.output_ids)
            sink(
                RequestOutput(
                    seq.id,
                    text,
                    (tok,),
                    prompt_tokens=seq.num_prompt,
                    completion_tokens=n,
                    logprobs=lps,
                    prompt_logprobs=plps,
                    cached_tokens=seq.num_cached,
                )
            )
        else:
            self._end(seq.id, reason, None, text, (tok,), lps=lps, plps=plps)

    def _end(
        self,
        seq_id: str,
        reason: str,
        error: str | None = None,
        text: str = "",
        toks=(),
        status: int = 400,
        lps: tuple[TokenLogprobs, ...] = (),
        plps: tuple[TokenLogprobs, ...] | None = None,
    ) -> None:
        seq, sink, detok = self._seqs.pop(seq_id)
        self.scheduler.finish(seq, reason)
        self.runner.release(seq_id)
        if reason in ("stop", "length"):
            text += detok.flush()  # held-back text can no longer start a stop string
        sink(
            RequestOutput(
                seq.id,
                text,
                tuple(toks),
                True,
                reason,
                seq.num_prompt,
                len(seq.output_ids),
                error,
                status,
                lps,
                plps,
                seq.num_cached,
            )
        )

    def _fail_all(self, message: str, status: int) -> None:
        for seq_id in list(self._seqs):
            try:
                self._end(seq_id, "error", message, status=status)
            except Exception:  # noqa: BLE001 - best effort while dying
                self._seqs.pop(seq_id, None)

    def stats(self) -> dict[str, int]:
        s = self.scheduler
        return {
            "waiting_for_embeddings": len(s.pending),
            "waiting": len(s.waiting),
            "running": len(s.running),
            "kv_blocks_used": s.blocks.num_used,
            "kv_blocks_total": s.blocks.num_blocks,
            "preemptions": s.num_preemptions,
            "kv_blocks_cached": s.blocks.num_cached,
            "prefix_cache_queried_tokens": s.prefix_queried_tokens,
            "prefix_cache_hit_tokens": s.prefix_hit_tokens,
            "steps": self.steps,
        }


def _release_openmp_workers() -> None:
    """Free the calling thread's OpenMP worker pool (it loaded the model) before the engine thread
    builds its own. libgomp counts the idle workers of every pool; with more than there are CPUs it
    lets each worker spin only ~100 times before sleeping, so every one of a step's ~1000 parallel
    regions pays a futex wake-up: 92 -> 110 ms per decode step (B=32) on 2 cores. A later parallel
    op on the calling thread builds a new pool, which only costs speed. No-op without libgomp."""
    try:
        ctypes.CDLL(None).omp_pause_resource_all(2)  # omp_pause_hard
    except (AttributeError, OSError):
        pass
