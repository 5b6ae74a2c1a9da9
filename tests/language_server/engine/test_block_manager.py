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


# -- prefix caching ---------------------------------------------------------------------------
def test_a_freed_keyed_block_is_found_again_and_taken_back_from_the_free_list():
    bm = BlockManager(4, 4, caching=True)
    a = bm.allocate(2)
    bm.register(a[0], b"k0")
    bm.register(a[1], b"k1")
    held = list(a)
    bm.free(a)
    assert bm.num_free == 4 and bm.num_cached == 2
    hit = bm.lookup([b"k0", b"k1", b"k2"], 3)
    assert hit == held and bm.reviving(hit) == 2
    bm.take(hit)
    assert bm.num_free == 2 and bm.reviving(hit) == 0
    assert bm.lookup([b"k1"], 1) == [held[1]]  # a key matches only as the first of a run it starts
    assert bm.lookup([b"kx", b"k1"], 2) == []  # the run stops at the first miss


def test_shared_blocks_stay_held_until_their_last_holder_frees_them():
    bm = BlockManager(4, 4, caching=True)
    mine = bm.allocate(1)
    bm.register(mine[0], b"k")
    theirs = bm.lookup([b"k"], 1)
    bm.take(theirs)
    bm.free(mine)
    assert bm.num_free == 3  # still held by the second sequence
    bm.free(theirs)
    assert bm.num_free == 4 and bm.lookup([b"k"], 1) == [0]


def test_allocation_takes_uncached_blocks_first_then_evicts_the_least_recently_freed():
    bm = BlockManager(4, 4, caching=True)
    first, second, plain = bm.allocate(1), bm.allocate(1), bm.allocate(2)
    bm.register(first[0], b"first")
    bm.register(second[0], b"second")
    f, s, p = first[0], second[0], list(plain)
    bm.free(first)
    bm.free(second)
    bm.free(plain)  # freed last, but it holds nothing worth keeping
    assert sorted(bm.allocate(2)) == sorted(p) and bm.num_cached == 2
    assert bm.allocate(1) == [f] and bm.lookup([b"first"], 1) == [] and bm.num_cached == 1
    assert bm.lookup([b"second"], 1) == [s]


def test_a_prefix_is_evicted_from_its_tail():
    bm = BlockManager(3, 4, caching=True)
    blocks = bm.allocate(3)
    ids = list(blocks)
    for i, b in enumerate(blocks):
        bm.register(b, b"k%d" % i)
    bm.free(blocks)
    assert bm.allocate(1) == [ids[2]]  # the last block of the prefix goes first
    assert bm.lookup([b"k0", b"k1", b"k2"], 3) == ids[:2]


def test_a_key_already_held_by_another_block_stays_there_and_caching_off_keys_nothing():
    bm = BlockManager(4, 4, caching=True)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a[0], b"same")
    bm.register(b[0], b"same")
    assert bm.lookup([b"same"], 1) == a and bm.num_cached == 1
    off = BlockManager(4, 4)
    c = off.allocate(1)
    off.register(c[0], b"k")
    assert off.lookup([b"k"], 1) == [] and off.num_cached == 0
