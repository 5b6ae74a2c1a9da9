"""Block manager: free-list accounting, growth by whole blocks, refusal without side effects."""

from __future__ import annotations

import pytest

from language_server.engine.block_manager import BlockManager


def test_allocate_and_free_round_trip():
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert len(set(a) | set(b)) == 8 and bm.num_free == 0 and bm.num_used == 8
    with pytest.raises(MemoryError):
        bm.allocate(1)
    bm.free(a)
    assert a == [] and bm.num_free == 3


def test_grow_adds_blocks_only_at_block_boundaries():
    bm = BlockManager(4, 4)
    blocks: list[int] = []
    assert bm.grow(blocks, 1) and len(blocks) == 1
    assert bm.grow(blocks, 4) and len(blocks) == 1
    assert bm.grow(blocks, 5) and len(blocks) == 2
    assert bm.blocks_for(0) == 0 and bm.blocks_for(9) == 3


def test_grow_without_enough_blocks_changes_nothing():
    bm = BlockManager(3, 2)
    blocks: list[int] = []
    assert not bm.grow(blocks, 7)  # needs 4
    assert blocks == [] and bm.num_free == 3


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
