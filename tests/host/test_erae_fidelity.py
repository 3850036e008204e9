"""ERAE auto reads the positive prompt in every model call, however the host batches cond and uncond.

On a GPU the host often runs the uncond rows alone (``_calc_cond_batch`` splits cond and uncond when they
do not fit together, uncond first). The uncond rows must then get the same entity map as when they share
a call with the cond rows: the positive prompt's map for that step. The peer is the same patched model
with cond and uncond batched in one call (the host's default), where the map comes from the cond row's own
attention. Both are evaluated on the same sampler state at every model evaluation of a real sampling run
(a whole trajectory cannot be compared to 1e-6: fp32 round-off between batch sizes grows over steps even
for the base model).
"""

from __future__ import annotations

from collections import Counter

import pytest
import test_cache_and_counts as cc
import torch
from test_cache_and_counts import calc_separately, patch, sample

pk, model, inputs = cc.pk, cc.model, cc.inputs  # the shared module fixtures: the tiny 4-block model and inputs
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]


def alone_vs_batched(m, uncond_first: bool):
    """A clone whose sampler evaluates each step both ways on the same input: cond and uncond in separate
    calls (in the given order), then batched; it records ``(alone, batched)`` and continues with batched."""
    import comfy.samplers

    pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def calc(args):
        alone = calc_separately(args, uncond_first)
        batched = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                 args["model_options"])
        pairs.append((alone, batched))
        return batched

    m = m.clone()
    m.model_options["sampler_calc_cond_batch_function"] = calc
    return m, pairs


def region(pk, **kw):
    return pk.er.EntityRegion(**{"mode": "auto", "entity_idx": (3, 4), "lam": 3.0, "map_block": 1,
                                 "start_percent": 0.0, **kw})


def max_diff(pairs, row: int) -> float:
    """The largest difference of a row, relative to the prediction's scale when above 1 (the tiny random
    model's predictions reach ~100 in late heun steps, where fp32 round-off alone is ~1e-5)."""
    return max(float((alone[row] - batched[row]).abs().max() / batched[row].abs().max().clamp_min(1.0))
               for alone, batched in pairs)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("order", ["cond_first", "uncond_first"])
@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_uncond_alone_equals_uncond_batched_with_cond(pk, model, inputs, mode, order, sampler):
    patched = patch(pk, model, inputs.ref, mode=mode, region=region(pk))
    m, pairs = alone_vs_batched(patched, uncond_first=order == "uncond_first")
    sample(m, inputs, steps=4, sampler=sampler)
    assert len(pairs) == (4 if sampler == "euler" else 7)
    uncond, cond = max_diff(pairs, 1), max_diff(pairs, 0)
    print(f"{mode} {order} {sampler}: max |uncond alone - batched| = {uncond:.2e}, cond {cond:.2e}")
    assert uncond <= 1e-6 and cond <= 1e-6, (uncond, cond)
    # ERAE acts on the uncond rows: without it they differ.
    plain, plain_pairs = alone_vs_batched(patch(pk, model, inputs.ref, mode=mode, region=None), False)
    sample(plain, inputs, steps=4, sampler=sampler)
    assert max(float((p[1][1] - b[1][1]).abs().max()) for p, b in zip(plain_pairs, pairs)) > 1e-3


def test_uncond_alone_reuses_the_cond_calls_maps_or_probes(pk, model, inputs, monkeypatch):
    """Cond first: the uncond call reuses the maps its cond call cached. Uncond first: one probe per uncond
    call, stopped after the map blocks. Averaged maps (map_blocks 2) too."""
    calls: Counter = Counter()
    real = pk.ao.entity_attention

    def counting(*args, **kwargs):
        calls["map blocks"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pk.ao, "entity_attention", counting)
    patched = patch(pk, model, inputs.ref, mode="two_way", region=region(pk, map_block=0, map_blocks=2))
    for uncond_first, per_step in ((False, 2 + 2), (True, 2 + 2 + 2)):  # alone (cond, probe) + batched
        calls.clear()
        m, pairs = alone_vs_batched(patched, uncond_first)
        sample(m, inputs)
        assert calls["map blocks"] == per_step * 3, (uncond_first, calls)
        assert max_diff(pairs, 1) <= 1e-6


def recorded_batched(m):
    """A clone that records each evaluation's cond and uncond predictions ([2, ...]), batched as usual."""
    import comfy.samplers

    preds: list[torch.Tensor] = []

    def calc(args):
        out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                             args["model_options"])
        preds.append(torch.cat(out))
        return out

    m = m.clone()
    m.model_options["sampler_calc_cond_batch_function"] = calc
    return m, preds


@pytest.mark.parametrize("mode", ["auto", "mask"])
def test_erae_applies_from_start_percent(pk, model, inputs, monkeypatch, mode):
    """Before start_percent the model is exactly the same reference without a region (no map is even
    computed); from it on, the region acts. 4 euler steps: progress 0, 0.25, 0.5, 0.75."""
    calls: list[int] = []
    real = pk.ao.entity_attention
    monkeypatch.setattr(pk.ao, "entity_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    mask = torch.zeros(1, 64, 80)
    mask[:, 16:48, 20:60] = 1.0
    reg = region(pk, start_percent=0.5) if mode == "auto" else \
        pk.er.EntityRegion(mode="mask", mask=mask, lam=3.0, start_percent=0.5)
    with_region, r_preds = recorded_batched(patch(pk, model, inputs.ref, mode="two_way", region=reg))
    sample(with_region, inputs, steps=4)
    without, w_preds = recorded_batched(patch(pk, model, inputs.ref, mode="two_way", region=None))
    sample(without, inputs, steps=4)
    assert len(r_preds) == len(w_preds) == 4
    assert all(torch.equal(a, b) for a, b in zip(r_preds[:2], w_preds[:2]))
    assert float((r_preds[2] - w_preds[2]).abs().max()) > 1e-3
    assert len(calls) == (2 if mode == "auto" else 0)  # maps only at progress 0.5 and 0.75


def test_apply_checks_the_last_map_block_against_block_end(pk, model, inputs):
    # 4 blocks (0..3): map blocks 1..2 are fine; 2..3 reach the last block, which would leave none to use it.
    patch(pk, model, inputs.ref, region=region(pk, map_block=1, map_blocks=2))
    with pytest.raises(pk.err.PatchError, match=r"map_block 2 with map_blocks 2 \(blocks 2\.\.3\).*below 3"):
        patch(pk, model, inputs.ref, region=region(pk, map_block=2, map_blocks=2))
    with pytest.raises(pk.err.PatchError, match=r"map_block 1.*below 1"):
        patch(pk, model, inputs.ref, region=region(pk, map_block=1), block_end=1)
