"""Content keys of full KV-cache blocks, for prefix caching: pure Python, no tensors.

A block's key digests its parent block's key, its token ids and, for a block that holds image
pads, the `extra` bytes the runner derived from those pads' vision rows and M-RoPE positions (the
pad token id is the same for every image, so ids alone would let two images share K/V). Equal keys
mean equal K/V: the chain makes a key stand for the whole prefix up to the block's end, and the
positions of text after an image follow from the pads' positions before it. blake2b, 16 bytes: no
accidental collisions at any cache size (Python's `hash` of a tuple is 64 bits and not meant for it).
"""

from __future__ import annotations

import hashlib
from array import array


def block_key(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(b"\x00mm")
        h.update(extra)
    return h.digest()


def extend_keys(seq, num_blocks: int, block_size: int) -> list[bytes]:
    """`seq.block_keys` grown to cover its first `num_blocks` full blocks (only blocks whose tokens
    are all known); returns that list."""
    keys = seq.block_keys
    num_blocks = min(num_blocks, seq.num_tokens // block_size)
    while len(keys) < num_blocks:
        i = len(keys)
        parent = keys[-1] if keys else b""
        ids = seq.token_ids(i * block_size, (i + 1) * block_size)
        keys.append(block_key(parent, ids, seq.block_extras.get(i, b"")))
    return keys
