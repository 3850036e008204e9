"""TAB progress: by step (first model call 0, last 1) and by noise level (continuous across split runs).

Expected values are written by hand from each sampler's own call pattern (euler calls at every sigma
but the final 0; heun adds a corrector at the next sigma unless it is 0; dpm_2 adds the log-sigma
midpoint), and the bias each model call really uses is read from the attention mask the patched model
hands to the attention function.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from customvideox.cvx_core.tab_schedule import (
    TABSchedule,
    progress_from_noise,
    progress_from_sigmas,
    reference_bias,
    strength_to_bias,
)
from harness import patching

BLOCKS = 2
TEXT = 226  # the tiny model's text tokens: the first reference key column


def test_steps_progress_known_answers():
    # The last model call of a run ending in 0 is at sigmas[-2]: it is the end of the curve.
    assert [progress_from_sigmas(s, [10.0, 5.0, 1.0, 0.0]) for s in (10.0, 5.0, 1.0)] == [0.0, 0.5, 1.0]
    assert progress_from_sigmas(math.sqrt(50.0), [10.0, 5.0, 1.0, 0.0]) == pytest.approx(0.25)  # dpm_2 midpoint
    # A run cut short (start/end steps) has a call (Heun's corrector) at its last sigma.
    assert [progress_from_sigmas(s, [10.0, 5.0, 1.0]) for s in (10.0, 5.0, 1.0)] == [0.0, 0.5, 1.0]
    assert progress_from_sigmas(4.0, [4.0, 0.0]) == 0.0  # one step: its single call is the first
    assert progress_from_sigmas(torch.tensor([5.0, 5.0]), torch.tensor([10.0, 5.0, 1.0, 0.0])) == 0.5


def test_noise_progress_inverts_percent_to_sigma():
    def percent_to_sigma(p: float) -> float:  # a flow-style schedule: sigma = 1 - p
        return 1.0 if p <= 0 else 0.0 if p >= 1 else 1.0 - p

    for p in (0.0, 0.1, 0.5, 0.93):
        assert progress_from_noise(1.0 - p, percent_to_sigma) == pytest.approx(p, abs=1e-12)
    assert progress_from_noise(0.0, percent_to_sigma) == pytest.approx(1.0, abs=1e-12)
    assert progress_from_noise(5.0, percent_to_sigma) == 0.0


# ---------------------------------------------------------------- host schedules and samplers


@pytest.fixture(scope="module")
def tiny():
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(
        tm.build_native_state_dict({**tm.TINY_CONFIG_1_0, "num_layers": BLOCKS}, seed=0))
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(model=model, ms=model.get_model_object("model_sampling"),
                           ref=torch.randn(1, 16, 1, 8, 10, generator=g), pos=torch.randn(1, 226, 32, generator=g),
                           neg=torch.randn(1, 226, 32, generator=g), noise=torch.randn(1, 16, 3, 8, 10, generator=g))


def euler_call_sigmas(sigmas: list[float]) -> list[float]:
    return sigmas[:-1]


@pytest.mark.host
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_steps_progress_over_every_host_scheduler(tiny, steps):
    import comfy.samplers

    checked = 0
    for name in comfy.samplers.SCHEDULER_NAMES:
        sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(tiny.ms, name, steps)]
        if any(math.isnan(s) for s in sigmas):  # the host's kl_optimal gives [nan, 0] for one step
            with pytest.raises(ValueError, match="NaN"):
                progress_from_sigmas(sigmas[0], sigmas)
            continue
        taus = [progress_from_sigmas(s, sigmas) for s in euler_call_sigmas(sigmas)]
        assert taus[0] == 0.0, (name, steps)
        assert taus[-1] == (0.0 if len(taus) == 1 else 1.0), (name, steps, taus[-1])
        assert all(a <= b for a, b in zip(taus, taus[1:])), (name, steps, taus)
        # b_min 0: the parabola is "no schedule" exactly at the first and the last call.
        para = TABSchedule(curve="parabolic", b_min=0.0, b_max=1.0)
        for tau in (taus[0], taus[-1]):
            assert reference_bias(para, tau, 1.5) == strength_to_bias(1.5), (name, steps)
        checked += 1
    assert checked >= len(comfy.samplers.SCHEDULER_NAMES) - 1


def patched(tiny, schedule: TABSchedule | None, strength: float = 1.0):
    """CustomVideoXApply on the tiny model, under an attention override that records, per model call,
    the reference bias the attention receives (the mask value at the first reference key column)."""
    seen: list[float] = []

    def record(func, q, k, v, heads, *args, mask=None, **kwargs):
        seen.append(0.0 if mask is None else float(mask[0, 0, 0, TEXT]))
        return func(q, k, v, heads, *args, mask=mask, **kwargs)

    m = tiny.model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    out = patching.apply_reference(m, tiny.ref, strength=strength, schedule=schedule)
    return out, seen


def sample(model, tiny, sampler: str, steps: int, scheduler: str = "normal", **kw) -> torch.Tensor:
    import comfy.sample

    return comfy.sample.sample(model, tiny.noise, steps, 2.0, sampler, scheduler, [[tiny.pos, {}]],
                               [[tiny.neg, {}]], torch.zeros_like(tiny.noise), disable_pbar=True, seed=0, **kw)


def hand_taus(sampler: str, steps: int) -> list[float]:
    """τ of every model call of a full run ending in 0, by the rule: call sigmas c_0..c_M get i/M."""
    m = steps - 1
    if sampler == "euler":
        return [i / m for i in range(steps)]
    if sampler == "heun":  # predictor at c_i, corrector at c_{i+1}; the last step has no corrector
        return [t for i in range(m) for t in (i / m, (i + 1) / m)] + [1.0]
    return [t for i in range(m) for t in (i / m, (i + 0.5) / m)] + [1.0]  # dpm_2: log-sigma midpoint


@pytest.mark.host
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2"])
def test_each_model_call_of_a_real_run_sees_first_0_last_1(tiny, sampler):
    steps = 4
    model, seen = patched(tiny, TABSchedule(curve="linear_up", b_min=0.0, b_max=1.0))  # bias = τ
    sample(model, tiny, sampler, steps)
    per_call = seen[::BLOCKS]
    assert len(per_call) == len(hand_taus(sampler, steps))
    assert per_call == pytest.approx(hand_taus(sampler, steps), abs=1e-6), per_call
    assert per_call[0] == 0.0 and per_call[-1] == 1.0


@pytest.mark.host
@pytest.mark.usefixtures("one_thread")
def test_parabola_with_b_min_0_equals_no_schedule_at_the_first_and_last_call(tiny):
    model, with_tab = patched(tiny, TABSchedule(curve="parabolic", b_min=0.0, b_max=1.0), strength=1.5)
    sample(model, tiny, "euler", 10)
    plain, without = patched(tiny, None, strength=1.5)
    sample(plain, tiny, "euler", 10)
    with_tab, without = with_tab[::BLOCKS], without[::BLOCKS]
    assert with_tab[0] == without[0] and with_tab[-1] == without[-1], (with_tab, without)
    assert all(a > b for a, b in zip(with_tab[1:-1], without[1:-1]))


def split_run_biases(tiny, progress: str) -> tuple[list[float], list[float]]:
    """Per-call biases of one 20-step run and of the same run split 0-10 / 10-20 (as two
    KSamplerAdvanced: the first keeps its leftover noise, the second adds none)."""
    schedule = TABSchedule(progress=progress)  # the default parabola
    model, whole = patched(tiny, schedule)
    sample(model, tiny, "euler", 20)
    model, split = patched(tiny, schedule)
    first = sample(model, tiny, "euler", 20, start_step=0, last_step=10, force_full_denoise=False)
    import comfy.sample

    comfy.sample.sample(model, tiny.noise, 20, 2.0, "euler", "normal", [[tiny.pos, {}]], [[tiny.neg, {}]], first,
                        disable_noise=True, start_step=10, last_step=20, disable_pbar=True, seed=0)
    return whole[::BLOCKS], split[::BLOCKS]


@pytest.mark.host
@pytest.mark.usefixtures("one_thread")
def test_noise_progress_continues_across_a_split_run(tiny):
    whole, split = split_run_biases(tiny, "noise")
    assert len(whole) == len(split) == 20
    assert split == whole  # bit for bit: τ depends on the noise level only
    assert whole[0] == pytest.approx(-1.0, abs=1e-6)  # the default parabola starts at b_min
    steps_whole, steps_split = split_run_biases(tiny, "steps")
    assert steps_split != steps_whole  # by steps, each half restarts the curve


def cogvideox_model_sampling():
    """The host's CogVideoX sampling: v-prediction DDPM, linear betas, zero terminal SNR."""
    import comfy.model_sampling
    import comfy.supported_models

    class ModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    config = SimpleNamespace(sampling_settings=comfy.supported_models.CogVideoX_T2V.sampling_settings)
    assert config.sampling_settings["zsnr"] is True
    return ModelSampling(config, zsnr=True)


@pytest.mark.host
def test_progress_over_every_host_scheduler():
    import comfy.samplers

    ms = cogvideox_model_sampling()
    for name in comfy.samplers.SCHEDULER_NAMES:
        for steps in (1, 7, 50):
            if name == "kl_optimal" and steps == 1:
                continue  # the host's kl_optimal gives [nan, 0] for one step (rejected, see below)
            sigmas = comfy.samplers.calculate_sigmas(ms, name, steps)
            n = len(sigmas) - 2  # model calls at sigmas[0..n] (the schedule ends in 0)
            if n == 0:
                assert progress_from_sigmas(sigmas[0], sigmas) == 0.0
                continue
            taus = [progress_from_sigmas(sigmas[i], sigmas) for i in range(n + 1)]
            assert taus == [i / n for i in range(n + 1)], (name, steps)
            # between calls τ rises strictly inside (i/n, (i+1)/n)
            for i in range(n):
                hi, lo = float(sigmas[i]), float(sigmas[i + 1])
                if hi > lo:
                    mid = progress_from_sigmas((hi + lo) / 2, sigmas)
                    assert i / n < mid < (i + 1) / n, (name, steps, i)
    nan_schedule = comfy.samplers.calculate_sigmas(ms, "kl_optimal", 1)
    with pytest.raises(ValueError, match="NaN"):
        progress_from_sigmas(nan_schedule[-1], nan_schedule)


@pytest.mark.host
@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "euler"])
def test_progress_seen_by_the_model_inside_real_host_samplers(sampler):
    """Run the host's own k-diffusion sampler with a stub denoiser and record τ at every call."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(cogvideox_model_sampling(), "normal", 10)
    seen: list[float] = []

    def model(x, sigma, **kwargs):
        seen.append(progress_from_sigmas(sigma, sigmas))
        return torch.zeros_like(x)

    getattr(kds, f"sample_{sampler}")(model, torch.randn(1, 4, 2, 2) * sigmas[0], sigmas, disable=True)
    assert seen[0] == 0.0
    assert all(0.0 <= t <= 1.0 for t in seen)
    assert all(a <= b for a, b in zip(seen, seen[1:])), seen  # never goes back, unlike a call counter
    if sampler == "dpm_2":
        # dpm_2's second evaluation sits at the log-sigma midpoint of each step: exactly half a step
        assert seen[1] == pytest.approx(0.5 / 9, abs=1e-5)
    if sampler == "heun":
        assert len(seen) > 10 and seen[1] == pytest.approx(1 / 9)  # the corrector sees the next sigma
    assert seen[-1] == 1.0  # the last model call ends the curve
