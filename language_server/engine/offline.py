"""Blocking helper for in-process use (tests, benchmarks, scripts): submit sequences, wait for all.

It talks to a started `Engine` only through its thread-safe API, exactly as the HTTP side does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from language_server.engine.engine import Engine, RequestOutput
from language_server.engine.sequence import Sequence, Status
from language_server.mm.base import MultimodalInputs


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    outputs: list[RequestOutput] = field(default_factory=list)


def generate(
    engine: Engine,
    seqs: list[Sequence],
    mm: dict[str, MultimodalInputs] | None = None,
    timeout: float = 300.0,
) -> dict[str, Result]:
    """Run `seqs` (those with an entry in `mm` start waiting for embeddings) to completion."""
    results = {s.id: Result() for s in seqs}
    left = len(seqs)
    done = threading.Event()
    lock = threading.Lock()

    def sink_for(rid: str):
        def sink(out: RequestOutput) -> None:
            nonlocal left
            r = results[rid]
            r.outputs.append(out)
            r.token_ids.extend(out.token_ids)
            r.text += out.text
            if out.finished:
                r.finish_reason, r.error = out.finish_reason, out.error
                with lock:
                    left -= 1
                    if left == 0:
                        done.set()

        return sink

    for s in seqs:
        if mm and s.id in mm:
            s.status = Status.WAITING_FOR_EMBEDDINGS
        engine.add(s, sink_for(s.id))
    for rid, inputs in (mm or {}).items():
        engine.inputs_ready(rid, inputs)
    if seqs and not done.wait(timeout):
        raise TimeoutError(f"{left} of {len(seqs)} sequences unfinished after {timeout}s")
    return results
