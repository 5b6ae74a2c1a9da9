"""M-RoPE positions for a prompt with any number of images, and the delta used while decoding.

Text tokens advance all three axes together; an image's rows get (t, h, w) grid coordinates offset
by the position where the image starts, and the text after it continues from
`start + max(h, w) / merge`. Decoding token number n (0-based, after a prompt of N tokens) sits at
`N + n + delta` on every axis.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: list[int] | torch.Tensor,
    image_token_id: int,
    grid_thw: list[list[int]],
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """-> (positions [3, N] long, mrope_position_delta). Images consume `grid_thw` in order."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    N = ids.numel()
    is_img = (ids == image_token_id).tolist()
    pos = torch.empty(3, N, dtype=torch.long)
    grids = iter(grid_thw)
    i, cur = 0, 0
    while i < N:
        j = i
        while j < N and is_img[j] == is_img[i]:
            j += 1
        if not is_img[i]:
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
        else:  # one run of pads may hold several adjacent images
            k = i
            while k < j:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more image placeholder tokens than images") from None
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                n = t * gh * gw
                if k + n > j:
                    raise ValueError("image placeholder count does not match the image grid")
                tt, hh, ww = torch.meshgrid(
                    torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"
                )
                pos[:, k : k + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
                cur += max(gh, gw)
                k += n
        i = j
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholder tokens")
    delta = int(pos.max()) + 1 - N if N else 0
    return pos, delta


def decode_positions(seq_lens: list[int], deltas: list[int]) -> torch.Tensor:
    """Positions [3, B] of the next token of each sequence: current length + delta on all axes."""
    p = torch.tensor(seq_lens, dtype=torch.long) + torch.tensor(deltas, dtype=torch.long)
    return p.expand(3, -1).contiguous()


def text_positions(start: int, n: int, delta: int = 0) -> torch.Tensor:
    return torch.arange(start + delta, start + delta + n).expand(3, -1).contiguous()
