"""CustomVideoXApply end to end in the real host: samplers, executor, the unpatched model as the peer."""

from __future__ import annotations

import pytest
import torch
from harness import graphs, patching


@pytest.fixture(scope="module")
def sampler(host, tiny_models):
    """Sample a ModelPatcher with the host's own KSampler path (4 euler steps, cfg 3)."""
    import comfy.sample
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(tiny_models.paths["native_1_0"]))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 226, 32, generator=g), torch.randn(1, 226, 32, generator=g)
    latent = torch.zeros(1, 16, 3, 8, 10)

    def sample(m, seed: int = 0) -> torch.Tensor:
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(m, noise, 4, 3.0, "euler", "normal", [[cond, {}]], [[uncond, {}]], latent,
                                   disable_pbar=True)

    return model, sample


def apply(host, model, latent=None, **kw):
    if latent is None:
        latent = torch.randn(1, 16, 1, 8, 10, generator=torch.Generator().manual_seed(7))
    return patching.apply_reference(model, latent, **kw)


def test_strength_zero_is_exactly_the_unpatched_model_and_the_input_model_is_untouched(host, sampler):
    model, sample = sampler
    before = sample(model)
    options_before = repr(model.model_options), dict(model.object_patches), repr(model.wrappers)
    off = sample(apply(host, model, strength=0.0))
    on = sample(apply(host, model))
    after = sample(model)
    assert torch.equal(off, before)
    assert (on - before).abs().max() > 1e-4
    assert torch.equal(after, before)  # the shared diffusion model was unpatched again
    assert (repr(model.model_options), dict(model.object_patches), repr(model.wrappers)) == options_before


@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_every_setting_gives_finite_distinct_output(host, sampler, mode):
    model, sample = sampler
    from customvideox.cvx_core import entity_region as er
    from customvideox.cvx_core import tab_schedule as ts
    plain = sample(apply(host, model, attention_mode=mode))
    outs = {
        "tab": sample(apply(host, model, attention_mode=mode, schedule=ts.TABSchedule(b_max=2.0))),
        "erae_auto": sample(apply(host, model, attention_mode=mode, region=er.EntityRegion(
            mode="auto", entity_idx=(2, 3), map_block=0, lam=3.0))),
        "erae_mask": sample(apply(host, model, attention_mode=mode, region=er.EntityRegion(
            mode="mask", mask=torch.nn.functional.pad(torch.ones(1, 32, 40), (20, 20, 16, 16)), lam=3.0))),
        "no_uncond": sample(apply(host, model, attention_mode=mode, apply_to_uncond=False)),
        "late_blocks": sample(apply(host, model, attention_mode=mode, block_start=1)),
    }
    for name, out in outs.items():
        assert torch.isfinite(out).all(), name
        assert (out - plain).abs().max() > 1e-5, name


def test_a_second_reference_at_strength_zero_changes_nothing(host, sampler):
    model, sample = sampler
    one = apply(host, model, strength=0.8)
    two = apply(host, one, latent=torch.randn(2, 16, 1, 8, 10), strength=0.0)
    assert torch.allclose(sample(two), sample(one), atol=1e-5)
    both = apply(host, one, latent=torch.randn(2, 16, 1, 8, 10), strength=1.5)
    assert (sample(both) - sample(one)).abs().max() > 1e-4


def test_one_way_reference_is_computed_once_per_run(host, sampler, monkeypatch):
    model, sample = sampler
    from customvideox.cvx_host import cogvideox as rp
    calls = []
    real = rp.reference_stream_kv
    monkeypatch.setattr(rp, "reference_stream_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    sample(apply(host, model, attention_mode="one_way", reference_timestep="clean"))
    assert len(calls) == 1  # 4 steps x cond/uncond share one reference pass (t = 0 does not change per step)


def test_reference_encode_and_apply_through_the_executor(host, tiny_models):
    """The real graph: CVXTestImage -> CustomVideoXReferenceEncode -> CustomVideoXApply -> sampler."""

    def prompt(strength: float | None, name: str):
        p = graphs.t2v_prompt(tiny_models.unet, route="void", width=80, height=64, steps=2, save_name=name)
        if strength is not None:
            p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models.vae}}
            p["img"] = {"class_type": "CVXTestImage", "inputs": {"seed": 3, "width": 120, "height": 90,
                                                                 "batch_size": 1}}
            p["enc"] = {"class_type": "CustomVideoXReferenceEncode", "inputs": {
                "vae": ["vae", 0], "image": ["img", 0], "width": 80, "height": 64, "fit": "pad",
                "background": "keep"}}
            p["apply"] = {"class_type": "CustomVideoXApply", "inputs": {
                "model": [graphs.MODEL, 0], "reference": ["enc", 0], "strength": strength, "block_start": 0,
                "block_end": -1, "apply_to_uncond": True, "attention_mode": "two_way",
                "reference_rope": "negative"}}
            p["guider"]["inputs"]["model"] = ["apply", 0]
        return p

    base = host.run(prompt(None, "base"), capture=[graphs.SAMPLED]).output(graphs.SAMPLED)["samples"]
    off = host.run(prompt(0.0, "off"), capture=[graphs.SAMPLED, "enc"])
    on = host.run(prompt(1.0, "on"), capture=[graphs.SAMPLED]).output(graphs.SAMPLED)["samples"]
    assert torch.equal(off.output(graphs.SAMPLED)["samples"], base)
    assert (on - base).abs().max() > 1e-4
    encoded = off.output("enc", 1)
    assert encoded.shape == (1, 64, 80, 3)  # 120x90 padded into 80x64, exactly what was encoded


def test_reference_frames_are_counted_in_the_host_memory_estimate(host, sampler, monkeypatch):
    import comfy.sampler_helpers as sh

    model, sample = sampler
    shapes = []
    real = sh.estimate_memory
    monkeypatch.setattr(sh, "estimate_memory", lambda m, shape, conds: shapes.append(tuple(shape)) or
                        real(m, shape, conds))
    sample(model)
    sample(apply(host, model, latent=torch.randn(2, 16, 1, 8, 10)))
    assert shapes[0] == (1, 16, 3, 8, 10)
    assert shapes[1] == (1, 16, 5, 8, 10)  # two reference frames in front of three video frames
