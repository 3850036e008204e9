"""Wan 2.2 A14B users sample the high-noise expert for the first steps and the low-noise expert for the rest:
two samplers over one schedule (KSamplerAdvanced start/end steps), each with a patched MODEL. The TAB curve
must continue across the split, not restart: in "noise" progress mode every model call of the split run sees
exactly the τ of the same call in the unsplit run; in "steps" mode each half restarts (why noise mode exists).

Run on the tiny Wan 2.1 T2V model with CustomVideoXApply (an inserted reference), through the host's own
``comfy.sample.sample`` with ``start_step`` / ``last_step`` as KSamplerAdvanced calls it.
"""

from __future__ import annotations

import pytest
import tiny_wan as tw
import torch
from customvideox.cvx_core import tab_schedule

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]
STEPS, SPLIT = 6, 3


def _patched(host, progress: str):
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(tw.build_wan_state_dict(seed=1))
    tab = tab_schedule.TABSchedule(progress=progress)
    from customvideox.nodes import types as types
    ref = types.EncodedReference(latent=torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(2)),
                                 width=48, height=32, family="Wan2.1")
    return host.node_classes["CustomVideoXApply"].execute(
        model=model, reference=ref, strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True,
        attention_mode="two_way", reference_rope="negative", schedule=tab).result[0]


def _taus(host, monkeypatch, progress: str) -> tuple[list[float], list[float]]:
    """τ of every model call: the unsplit run, and the same run split in two samplers at step SPLIT."""
    import comfy.sample
    from customvideox.cvx_host import frames_patch as fp
    seen: list[float] = []
    real = fp.call_progress

    def recording(opts):
        progress_of = real(opts)
        seen.append(progress_of(progress))
        return progress_of

    monkeypatch.setattr(fp, "call_progress", recording)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 6, generator=g)
    pos, neg = torch.randn(1, 5, 4096, generator=g), torch.randn(1, 5, 4096, generator=g)

    def run(model, latent, start, last, **kw):
        return comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", [[pos, {}]], [[neg, {}]], latent,
                                   start_step=start, last_step=last, disable_pbar=True, seed=0, **kw)

    model = _patched(host, progress)
    run(model, torch.zeros_like(noise), 0, STEPS)
    whole, seen[:] = list(seen), []
    high, low = _patched(host, progress), _patched(host, progress)  # two experts, each patched
    half = run(high, torch.zeros_like(noise), 0, SPLIT, force_full_denoise=False)
    run(low, half, SPLIT, STEPS, disable_noise=True)
    return whole, list(seen)


def test_noise_progress_continues_across_two_samplers(host, monkeypatch):
    whole, split = _taus(host, monkeypatch, "noise")
    assert len(whole) == STEPS and split == whole, (whole, split)
    assert whole[0] == 0.0 and all(a < b for a, b in zip(whole, whole[1:]))


def test_steps_progress_restarts_in_each_sampler(host, monkeypatch):
    whole, split = _taus(host, monkeypatch, "steps")
    assert whole[0] == 0.0 and whole[-1] == 1.0
    assert split[0] == 0.0 and split[SPLIT] == 0.0 and split != whole  # each half starts its own curve
