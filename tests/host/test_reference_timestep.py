"""The reference's timestep (CustomVideoXApply ``reference_timestep``): sampling, clean, noised.

Each mode is checked against a computation written here from the host's own modules or diffusers:

* one-way: the reference stream run by hand through the host's blocks at the mode's timestep (and the
  noised latent), its keys/values appended to the unpatched model's attention;
* two-way ``noised``: diffusers' transformer fed the reference noised by hand as one more frame;
* training's model call equals inference's for the same setting.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from customvideox.cvx_core import reference_timestep
from customvideox.cvx_host import cogvideox, reference_patch
from customvideox.nodes import apply as apply_mod
from customvideox.nodes import types as node_types
from harness import patching

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

TEXT = 226
T_INDEX = 500


@pytest.fixture(scope="module")
def pk() -> SimpleNamespace:
    return SimpleNamespace(rp=reference_patch, cv=cogvideox, apply=apply_mod,
                           types=node_types, rt=reference_timestep)


@pytest.fixture(scope="module")
def case(tiny_models) -> SimpleNamespace:
    g = torch.Generator().manual_seed(5)
    return SimpleNamespace(x=torch.randn(2, 16, 3, 8, 10, generator=g), raw_ref=torch.randn(1, 16, 1, 8, 10, generator=g),
                           ctx=torch.randn(2, TEXT, 32, generator=g), sd=tiny_models.native_state_dict("native_1_0"))


def load(case):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(case.sd))


def apply(pk, model, raw_ref, mode: str, reference_timestep: str, reference_rope: str = "none"):
    return patching.apply_reference(model, raw_ref, attention_mode=mode, reference_rope=reference_rope,
                                    reference_timestep=reference_timestep)


def call(patcher, x, t, ctx, sigma: float | None, **extra):
    sigmas = {} if sigma is None else {"sigmas": torch.full((x.shape[0],), sigma)}
    return patching.forward(patcher, x, t, ctx, **{"cond_or_uncond": [0, 1], **extra, **sigmas})


def noised_by_hand(ref: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """DDPM forward noising in alpha space: sqrt(a) x0 + sqrt(1 - a) eps, a = 1 / (1 + sigma^2)."""
    eps = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    a = 1.0 / (1.0 + sigma * sigma)
    return math.sqrt(a) * ref + math.sqrt(1.0 - a) * eps


def one_way_by_hand(model, ref: torch.Tensor, x, t, ctx, t_ref: float) -> torch.Tensor:
    """Run [positive text | reference] through the host's blocks at timestep ``t_ref`` (the reference
    unrotated: reference_rope 'none'), keep each block's reference keys/values, and append them to the
    keys/values of the unpatched model's attention in the same block."""
    import comfy.ldm.cogvideo.model as cog
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(func, q, k, v, heads, **kw):
        kv.append((k[:, TEXT:], v[:, TEXT:]))
        return func(q, k, v, heads, **kw)

    with torch.no_grad():
        hidden = dm.patch_embed(ctx[:1], ref.permute(0, 2, 1, 3, 4))
        enc, hid = hidden[:, :TEXT], hidden[:, TEXT:]
        emb = cog.get_timestep_embedding(torch.tensor([t_ref]), dm.time_proj_dim, dm.time_proj_flip,
                                         dm.time_proj_shift)
        temb = dm.time_embedding_linear_2(dm.time_embedding_act(dm.time_embedding_linear_1(emb)))
        for block in dm.blocks:
            hid, enc = block(hid, enc, temb, None, {"optimized_attention_override": capture})
        block_of_call = iter(range(len(dm.blocks)))

        def append(func, q, k, v, heads, **kw):
            rk, rv = kv[next(block_of_call)]
            b = q.shape[0]
            return func(q, torch.cat([k, rk.expand(b, -1, -1)], 1), torch.cat([v, rv.expand(b, -1, -1)], 1),
                        heads, **kw)

        return dm(x, t, ctx, transformer_options={"optimized_attention_override": append})


@pytest.mark.parametrize("reference_timestep", ["clean", "sampling", "noised"])
def test_one_way_equals_the_reference_stream_run_by_hand(pk, case, reference_timestep):
    model = load(case)
    sigma = float(model.get_model_object("model_sampling").sigmas[T_INDEX])
    t = torch.full((2,), float(T_INDEX))
    ours = call(apply(pk, model, case.raw_ref, "one_way", reference_timestep), case.x, t, case.ctx, sigma)
    ref = model.get_model_object("latent_format").process_in(case.raw_ref)
    if reference_timestep == "noised":
        ref = noised_by_hand(ref, sigma, pk.rt.REFERENCE_NOISE_SEED)
    t_ref = 0.0 if reference_timestep == "clean" else float(T_INDEX)
    want = one_way_by_hand(model, ref, case.x, t, case.ctx, t_ref)
    assert torch.allclose(ours, want, atol=2e-5), (ours - want).abs().max()
    other = one_way_by_hand(model, ref, case.x, t, case.ctx, float(T_INDEX) if t_ref == 0 else 0.0)
    assert (other - want).abs().max() > 1e-4  # the reference's timestep matters in this test


def test_two_way_noised_equals_diffusers_fed_the_noised_reference(pk, case):
    model = load(case)
    sigma = float(model.get_model_object("model_sampling").sigmas[T_INDEX])
    t = torch.full((2,), float(T_INDEX))
    patched = apply(pk, pk.cv.install_rotary(model, "exact"), case.raw_ref, "two_way", "noised", "shift")
    ours = call(patched, case.x, t, case.ctx, sigma)
    ref = noised_by_hand(model.get_model_object("latent_format").process_in(case.raw_ref), sigma,
                         pk.rt.REFERENCE_NOISE_SEED)
    peer = tm.build_diffusers_model(case.sd)
    want = tm.diffusers_forward(peer, torch.cat([ref.expand(2, -1, -1, -1, -1), case.x], 2), t, case.ctx)[:, :, 1:]
    assert torch.allclose(ours, want, atol=2e-5), (ours - want).abs().max()
    clean = apply(pk, pk.cv.install_rotary(model, "exact"), case.raw_ref, "two_way", "sampling", "shift")
    assert (call(clean, case.x, t, case.ctx, sigma) - ours).abs().max() > 1e-4


def test_two_way_clean_is_a_clear_error_naming_the_node_and_input(pk, case):
    with pytest.raises(ValueError, match="CustomVideoXApply: reference_timestep 'clean' needs attention_mode "
                                         "'one_way'"):
        apply(pk, load(case), case.raw_ref, "two_way", "clean")


def test_noised_outside_a_sampler_is_a_clear_error(pk, case):
    model = load(case)
    with pytest.raises(ValueError, match="reference_timestep 'noised' needs the sampler's sigma"):
        call(apply(pk, model, case.raw_ref, "two_way", "noised"), case.x, torch.full((2,), 500.0), case.ctx, None)


@pytest.mark.parametrize("reference_timestep,separate,passes", [
    ("clean", False, 1), ("sampling", False, 3), ("noised", False, 3), ("sampling", True, 3)])
def test_one_way_reference_pass_is_cached_per_run_or_per_step(pk, case, monkeypatch, reference_timestep, separate,
                                                             passes):
    import comfy.sample
    import comfy.samplers

    calls = []
    real = pk.cv.reference_stream_kv
    monkeypatch.setattr(pk.cv, "reference_stream_kv", lambda *a, **k: calls.append(k.get("timestep")) or real(*a, **k))
    model = apply(pk, load(case), case.raw_ref, "one_way", reference_timestep)
    if separate:  # cond and uncond as separate model calls: they still share one pass per step
        def calc(args):
            return [comfy.samplers.calc_cond_batch(args["model"], [c], args["input"], args["sigma"],
                                                   args["model_options"])[0] for c in args["conds"]]
        model.model_options["sampler_calc_cond_batch_function"] = calc
    noise = case.x[:1]
    comfy.sample.sample(model, noise, 3, 2.0, "euler", "normal", [[case.ctx[:1], {}]], [[case.ctx[1:], {}]],
                        torch.zeros_like(noise), disable_pbar=True, seed=0)
    assert len(calls) == passes
    if reference_timestep != "clean":
        assert len({float(c) for c in calls}) == 3  # each step's own timestep


@pytest.mark.parametrize("reference_timestep", ["sampling", "noised"])
def test_training_calls_the_model_as_inference_does(pk, case, reference_timestep):
    from customvideox.cvx_core import lora as lora
    from customvideox.cvx_host import adapters as rb
    from customvideox.cvx_host import training as ta
    model = load(case)
    adapter = lora.init_adapter(lora.block_target_shapes(rb.module_shapes(model), lora.DEFAULT_TARGETS), 2, 2.0)
    model_fn, *_ = ta.training_model_fn(model, adapter, reference_timestep)
    ref = model.get_model_object("latent_format").process_in(case.raw_ref)
    t = torch.tensor([float(T_INDEX)])
    with torch.no_grad():
        trained = model_fn(case.x[:1], t, case.ctx[:1], ref, False)
    sigma = float(model.get_model_object("model_sampling").sigmas[T_INDEX])
    inference = call(apply(pk, load(case), case.raw_ref, "two_way", reference_timestep, "negative"),
                     case.x[:1], t, case.ctx[:1], sigma, cond_or_uncond=[0])
    assert torch.allclose(trained, inference, atol=1e-6), (trained - inference).abs().max()
    from customvideox.cvx_core import training as tr
    with pytest.raises(ValueError, match="reference_timestep 'clean'"):
        tr.TrainSettings(reference_timestep="clean").check()
