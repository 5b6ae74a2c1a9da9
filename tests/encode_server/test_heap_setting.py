"""The encode server hands its `malloc_keep_freed_bytes` to `transfer.heap.keep_freed_heap` when its
app is built (the mechanism itself is tested with page-fault counts in tests/transfer/test_heap.py)."""

from __future__ import annotations

import encode_server.app as app_module
from encode_server.config import EncodeSettings


def test_the_encode_server_keeps_freed_heap(tiny_model_dir, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(app_module, "keep_freed_heap", lambda n: calls.append(n) or True)
    app = app_module.build_app(EncodeSettings(model=str(tiny_model_dir), malloc_keep_freed_bytes=5 << 20))
    app.state.service.close()
    assert calls == [5 << 20]
