"""Dense attention with a whole additive bias, written out by hand: the independent reference for the
biased attention paths (tests/unit/test_lse_merge.py, tests/host/test_attention_rows.py)."""

from __future__ import annotations

import math

import torch
from customvideox.cvx_core.token_layout import TokenLayout


def dense_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v with the whole [B, 1 or H, Sq, Sk] bias."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1) @ v


def dense_bias(layout: TokenLayout, all_rows: torch.Tensor, video_rows: torch.Tensor) -> torch.Tensor:
    """[B, 1, Sq, Sk]: ``all_rows[b, j]`` on every query's logits on reference j's keys, plus
    ``video_rows[b, j, i]`` on video query i's."""
    bias = torch.zeros(all_rows.shape[0], 1, layout.queries, layout.keys)
    vs = layout.video_query_start
    for j in range(len(layout.refs)):
        a, b = layout.ref_key_span(j)
        bias[:, 0, :, a:b] = all_rows[:, j, None, None]
        bias[:, 0, vs:vs + layout.video, a:b] += video_rows[:, j, :, None]
    return bias
