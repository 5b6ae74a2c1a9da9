"""Backend contracts with real engines: work handed to `write` as `while_writing` runs while the
bytes move, and a failure in it never lets an out-of-band write outlive the call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfer import TransferSender
from transfer.backends.base import Write

pytestmark = pytest.mark.slow


def test_mooncake_write_waits_for_its_bytes_even_when_the_work_beside_it_fails(make_receiver):
    rx = make_receiver("mooncake", hidden=4096, num_deepstack=1, block_size=256, num_blocks=2)
    d = rx.open_room(256)
    tx = TransferSender()
    try:
        backend = tx.backend("mooncake")
        conn = tx._get(d.control)
        rb = d.buffers["embeddings"].row_bytes
        src = np.random.default_rng(0).integers(1, 255, 256 * rb, dtype=np.uint8)  # 4 MiB
        offset = d.block_ids[0] * 256 * rb
        calls = []

        def fail():
            calls.append(bytes(rx.buffers.embeddings.view(-1).view(torch.uint8)[offset : offset + 8]))
            raise RuntimeError("work beside the write failed")

        with pytest.raises(RuntimeError, match="beside the write"):
            backend.write(conn, d, d.room, [Write("embeddings", offset, src)], while_writing=fail)
        # the work ran while the write was under way, and the call returned only once it had landed
        assert len(calls) == 1
        pool = rx.buffers.embeddings.view(-1).view(torch.uint8)[offset : offset + src.nbytes]
        assert torch.equal(pool, torch.from_numpy(src))
        # and with nothing to write, the work still runs
        backend.write(conn, d, d.room, [], while_writing=lambda: calls.append(b""))
        assert len(calls) == 2
        conn.close()
    finally:
        tx.close()
