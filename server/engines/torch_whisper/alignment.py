"""Word timing from the alignment heads' cross-attention: openai-whisper's timing.py
method (and CTranslate2's `align`), on scores the decoder handed out while it decoded.

The scores of each head are turned into attention over the real audio frames, normalized
over the tokens, median-filtered along time, averaged over the heads; a dynamic time
warping path through the negated matrix then gives each token its first frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median of `width` (odd) neighbours along the last axis, edges reflected."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x, (pad, pad), mode="reflect")  # x: [heads, tokens, frames]
    return padded.unfold(-1, width, 1).sort(dim=-1).values[..., pad]


def attention_matrix(scores: Tensor, audio_positions: int, median_width: int) -> np.ndarray:
    """scores [heads, tokens, positions] (before the softmax) -> [tokens, audio_positions]."""
    weights = scores[..., :audio_positions].float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std
    result: np.ndarray = median_filter(weights, median_width).mean(dim=0).cpu().numpy()
    return result


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost_matrix` [tokens, frames]: (token index,
    frame index) per step, as openai-whisper's `dtw_cpu` finds it.

    Each row is computed at once: cost[i, j] = x[i, j] + min(cost[i-1, j-1], cost[i-1, j],
    cost[i, j-1]) unrolls along the row to a running minimum over cumulative sums.
    """
    x = np.asarray(cost_matrix, dtype=np.float64)
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    for i in range(1, n + 1):
        row = x[i - 1]
        above = np.minimum(cost[i - 1, :-1], cost[i - 1, 1:])  # diagonal or from above
        through = np.cumsum(row)
        cost[i, 1:] = through + np.minimum.accumulate(row + above - through)
    # Back from the end, choosing as the forward pass would have (ties: left).
    i, j = n, m
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        if i == 0:
            j -= 1
            continue
        if j == 0:
            i -= 1
            continue
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        if c0 < c1 and c0 < c2:
            i, j = i - 1, j - 1
        elif c1 < c0 and c1 < c2:
            i -= 1
        else:
            j -= 1
    steps = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return steps[:, 0], steps[:, 1]
