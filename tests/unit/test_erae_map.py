"""ERAE maps do not invent regions: known answers for the per-frame normalisation of the entity attention.

Host-free. The attention comes from q/k built by hand (softmax over the text keys, summed over the entity
tokens, mean over heads), and the expected maps are worked out from the formula
``clamp((a - mean) / (contrast · mean), 0, 1)`` per frame with the default contrast 1.
"""

from __future__ import annotations

import pytest
import torch
from customvideox.cvx_core.entity_region import (
    ERAE_START,
    MAP_BLOCK,
    MAP_CONTRAST,
    EntityRegion,
    entity_attention,
    entity_map_from_attention,
    normalize_entity_map,
)

TEXT, ENTITY, D = 6, 2, 8


def qk(frames: list[torch.Tensor], ripple: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 1, TEXT + Sv, D] q/k: text key ENTITY points along e0, the others along e1. Video token i of a frame
    gets q = (logit_i, 0, ...): its entity logit is logit_i, every other text logit 0 (D**-0.5 scale undone)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.cat([f.flatten() for f in frames])
    logits = logits + ripple * torch.randn(logits.shape, generator=g)
    sv = logits.numel()
    k = torch.zeros(1, 1, TEXT + sv, D)
    k[0, 0, ENTITY, 0] = 1.0
    q = torch.zeros(1, 1, TEXT + sv, D)
    q[0, 0, TEXT:, 0] = logits * D**0.5
    return q, k


def emap(frames, grid, **kw) -> torch.Tensor:
    q, k = qk(frames, **kw)
    return entity_map_from_attention(q, k, (0, TEXT), (TEXT, q.shape[2]), [ENTITY], grid)


def test_defaults_are_one_per_setting():
    assert MAP_BLOCK == 2 and EntityRegion(entity_idx=(1,)).map_block == MAP_BLOCK
    r = EntityRegion(entity_idx=(1,))
    assert (r.map_blocks, r.norm, r.start_percent, r.last_map_block) == (1, "relative", ERAE_START, 2)
    assert MAP_CONTRAST == 1.0


def test_the_attention_is_the_softmax_share_of_the_entity():
    # Logit x on the entity key, 0 on the 5 other text keys: share e^x / (e^x + 5).
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    q, k = qk([logits])
    a = entity_attention(q, k, (0, TEXT), (TEXT, TEXT + 4), [ENTITY], (1, 2, 2))
    want = logits.exp() / (logits.exp() + TEXT - 1)
    assert torch.allclose(a[0], want, atol=1e-6)


def test_flat_frame_with_ripples_stays_near_zero():
    # Every token attends 1/6 to the entity, with ~1e-3 ripples: no region to find.
    grid = (1, 4, 5)
    m = emap([torch.zeros(4, 5)], grid, ripple=1e-3)
    assert float(m.max()) < 5e-3, m
    minmax = normalize_entity_map(entity_attention(*qk([torch.zeros(4, 5)], ripple=1e-3), (0, TEXT),
                                                   (TEXT, TEXT + 20), [ENTITY], grid), grid, "minmax")
    assert float(minmax.max()) == pytest.approx(1.0) and float(minmax.min()) == 0.0  # what min-max invents
    assert float(emap([torch.zeros(4, 5)], grid).max()) < 1e-6  # exactly flat: 0 up to round-off


def test_a_clear_single_peak_is_one_at_the_peak_and_zero_elsewhere():
    grid = (1, 4, 5)
    frame = torch.zeros(4, 5)
    frame[2, 3] = 6.0  # share e^6/(e^6+5) = 0.99 vs 1/6 elsewhere: ~5.5x the frame mean
    m = emap([frame], grid).reshape(4, 5)
    assert float(m[2, 3]) == 1.0
    m[2, 3] = 0.0
    assert torch.equal(m, torch.zeros(4, 5))


def test_a_flat_frame_stays_zero_while_another_frame_has_a_peak():
    grid = (2, 3, 3)
    peak = torch.zeros(3, 3)
    peak[1, 1] = 6.0
    m = emap([torch.zeros(3, 3), peak], grid, ripple=1e-3).reshape(2, 3, 3)
    assert float(m[0].max()) < 5e-3  # the flat frame: near 0 (min-max would stretch it to 0..1)
    assert float(m[1, 1, 1]) == 1.0 and float(m[1].sum()) == 1.0


def test_relative_map_known_values():
    # Frame [1, 1, 1, 3]: mean 1.5 -> (3 - 1.5)/1.5 = 1; others below the mean -> 0.
    # Frame [2, 2, 2, 2.5]: mean 2.125 -> 0.375/2.125; frame [4, 4, 4, 4] -> 0.
    raw = torch.tensor([[1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.5, 4.0, 4.0, 4.0, 4.0]])
    got = normalize_entity_map(raw, (3, 2, 2))
    want = torch.tensor([[0, 0, 0, 1.0, 0, 0, 0, 0.375 / 2.125, 0, 0, 0, 0]])
    assert torch.allclose(got, want, atol=1e-7)
    # Contrast 0.5: a token at 1.5x its frame mean (3 vs 2) already gets the full lambda.
    assert float(normalize_entity_map(torch.tensor([[1.0, 3.0]]), (1, 1, 2), contrast=0.5)[0, 1]) == 1.0


def test_settings_errors():
    for kwargs, word in (({"map_blocks": 0}, "map_blocks 0"), ({"norm": "max"}, '"max"'),
                         ({"start_percent": 1.5}, "start_percent 1.5"),
                         ({"start_percent": float("nan")}, "start_percent nan")):
        with pytest.raises(ValueError, match=word):
            EntityRegion(entity_idx=(1,), **kwargs)
    with pytest.raises(ValueError, match='"max"'):
        normalize_entity_map(torch.ones(1, 4), (1, 2, 2), "max")
