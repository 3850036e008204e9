"""The fused log-sum-exp path (``attention_path=lse``) with a padded log-sum-exp.

torch's CUDA memory-efficient kernel pads its log-sum-exp to a multiple of 32 along the query axis. The merge
must read only the first Sq entries; checked on CPU with a padded log-sum-exp built by hand, against masked
attention written out densely (tests/dense_attention.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from customvideox.cvx_core import reference_attention as ra
from customvideox.cvx_core.token_layout import TokenLayout
from dense_attention import dense_attention, dense_bias

B, H, D, TEXT, R, GRID = 2, 2, 16, 5, 6, (3, 2, 3)  # Sq = 5 + 2*6 + 18 = 35: not a multiple of 32



def padded_lse(monkeypatch):
    """attention_with_lse as the CUDA memory-efficient kernel returns it: the log-sum-exp padded to a multiple
    of 32 queries, with junk (large values) in the padding."""
    real = ra.attention_with_lse

    def padded(q, k, v):
        out, lse = real(q, k, v)
        pad = -lse.shape[-1] % 32 or 32
        return out, torch.cat([lse, torch.full((*lse.shape[:-1], pad), 1e4)], dim=-1)

    monkeypatch.setattr(ra, "attention_with_lse", padded)


def test_merge_by_lse_reads_only_the_query_rows_of_a_padded_lse():
    g = torch.Generator().manual_seed(0)
    sq = 37
    q = torch.randn(B, H, sq, D, generator=g)
    groups = [(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)) for n in (9, 4, 5)]
    shifts = [None, torch.tensor([0.7, -math.inf]).view(B, 1, 1).expand(B, 1, sq),
              torch.rand(B, 1, sq, generator=g) * 2]
    parts = []
    for (k, v), shift in zip(groups, shifts):
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        out = torch.softmax(scores, -1) @ v
        lse = torch.logsumexp(scores, -1)
        junk = torch.full((B, H, 64 - sq), 1e4)  # padded to 64 queries, as the CUDA kernel does
        parts.append((out, torch.cat([lse, junk], -1), shift))
    got = ra.merge_by_lse(parts)
    k = torch.cat([g_[0] for g_ in groups], 2)
    v = torch.cat([g_[1] for g_ in groups], 2)
    bias = torch.cat([torch.zeros(B, 1, sq, 9), shifts[1][..., None].expand(B, 1, sq, 4),
                      shifts[2][..., None].expand(B, 1, sq, 5)], -1)
    want = dense_attention(q, k, v, bias)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("one_way", [False, True])
def test_lse_path_with_a_padded_lse_equals_dense_masked_attention(monkeypatch, one_way):
    padded_lse(monkeypatch)
    g = torch.Generator().manual_seed(1)
    layout = TokenLayout(text=TEXT, refs=(R, R), grid=GRID, refs_in_queries=not one_way)
    q = torch.randn(B, H, layout.queries, D, generator=g)
    k, v = (torch.randn(B, H, layout.keys, D, generator=g) for _ in range(2))
    kv = None
    if one_way:  # the cached reference keys/values, inserted after the text
        kv = [(k[:1, :, a:b], v[:1, :, a:b]) for a, b in (layout.ref_key_span(j) for j in range(2))]
        k = k.expand(B, -1, -1, -1).clone()
        v = v.expand(B, -1, -1, -1).clone()
        k[1:, :, TEXT:TEXT + 2 * R], v[1:, :, TEXT:TEXT + 2 * R] = k[:1, :, TEXT:TEXT + 2 * R], v[:1, :, TEXT:TEXT + 2 * R]
    ref_bias = torch.tensor([[0.5, -math.inf], [1.0, 0.0]])
    region = torch.rand(B, 2, layout.video, generator=g)
    keep = [*range(TEXT), *range(TEXT + 2 * R, layout.keys)]
    got = ra.reference_attention_lse(q, k[:, :, keep] if one_way else k, v[:, :, keep] if one_way else v, layout,
                                     ref_bias, region, ref_kv=kv)
    want = dense_attention(q, k, v, dense_bias(layout, ref_bias, region))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
