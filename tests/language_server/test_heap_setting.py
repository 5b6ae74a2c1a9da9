"""The language server hands its `malloc_keep_freed_bytes` to `transfer.heap.keep_freed_heap` when
its engine is built, in every mode (the mechanism itself is tested with page-fault counts in
tests/transfer/test_heap.py)."""

from __future__ import annotations

from tests.conftest import torch_threads
from transfer import heap


def test_the_language_server_keeps_freed_heap(tiny_model_dir, monkeypatch):
    from language_server.config import LanguageSettings
    from language_server.server import build_engine

    calls: list[int] = []
    monkeypatch.setattr(heap, "keep_freed_heap", lambda n: calls.append(n) or True)
    settings = LanguageSettings(
        model=str(tiny_model_dir), threads=torch_threads, malloc_keep_freed_bytes=3 << 20
    )
    build_engine(settings)
    assert calls == [3 << 20]
