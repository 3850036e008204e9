"""The patch on the host's native CogVideoX against diffusers' transformer (the independent peer).

With exact RoPE, strength 1 (no bias) and the reference at temporal position 0 ("shift"), the
patched host model must compute exactly what diffusers computes when the reference latent is
simply one more frame in front of the video: that is what 3D reference attention is.
"""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
from harness import patching


def patched_forward(host, model, raw_ref, x, t, ctx, **apply_kw):
    from customvideox.cvx_host import cogvideox as rp

    patched = patching.apply_reference(rp.install_rotary(model, "exact"), raw_ref, **{"reference_rope": "shift", **apply_kw})
    return patched, patching.forward(patched, x, t, ctx)


@pytest.mark.parametrize("kind,config,frames", [("native_1_0", tm.TINY_CONFIG_1_0, 3),
                                                ("native_1_5", tm.TINY_CONFIG_1_5, 4)])
def test_patched_host_model_equals_diffusers_with_reference_as_extra_frame(host, tiny_models, kind, config, frames):
    import comfy.sd

    sd = tiny_models.native_state_dict(kind)
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, frames, 8, 10, generator=g)
    raw_ref = torch.randn(1, 16, 1, 8, 10, generator=g)
    ctx = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([700.0, 700.0])
    patched, ours = patched_forward(host, model, raw_ref, x, t, ctx)

    ref = patched.model.latent_format.process_in(raw_ref)
    ref = ref.repeat(1, 1, config.get("patch_size_t") or 1, 1, 1).expand(2, -1, -1, -1, -1)
    peer = tm.build_diffusers_model(tiny_models.native_state_dict(kind), config)  # the host consumed `sd`
    want = tm.diffusers_forward(peer, torch.cat([ref, x], dim=2), t, ctx, config)[:, :, ref.shape[2]:]
    assert ours.shape == x.shape
    assert torch.allclose(ours, want, atol=2e-5), (ours - want).abs().max()


def test_reference_off_through_the_patch_equals_diffusers_stock(host, tiny_models):
    """Reference on for the cond row only: the uncond row is exactly the unpatched model (it runs without
    reference tokens), and both rows match diffusers where they should."""
    import comfy.sd

    sd = tiny_models.native_state_dict("native_1_0")
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 10, generator=g)
    ctx = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([300.0, 300.0])
    # Row 0 is cond (reference on), row 1 uncond with apply_to_uncond off.
    import comfy.model_management
    from customvideox.cvx_host import cogvideox as rp
    from customvideox.nodes import types as types

    ref = types.EncodedReference(latent=torch.randn(1, 16, 1, 8, 10, generator=g), width=80, height=64)
    patched = host.node_classes["CustomVideoXApply"].execute(
        model=rp.install_rotary(model, "exact"), reference=ref, strength=1.0, block_start=0, block_end=-1,
        apply_to_uncond=False, attention_mode="two_way", reference_rope="negative").result[0]
    comfy.model_management.load_models_gpu([patched])
    opts = dict(patched.model_options["transformer_options"], wrappers=patched.wrappers, cond_or_uncond=[0, 1])
    with torch.no_grad():
        ours = patched.model.diffusion_model(x, t, ctx, transformer_options=opts)
    peer = tm.build_diffusers_model(tiny_models.native_state_dict("native_1_0"))
    stock = tm.diffusers_forward(peer, x, t, ctx)
    assert torch.allclose(ours[1], stock[1], atol=2e-5), (ours[1] - stock[1]).abs().max()
    assert (ours[0] - stock[0]).abs().max() > 1e-4
    assert not math.isnan(float(ours.sum()))
    plain = rp.install_rotary(model, "exact")
    comfy.model_management.load_models_gpu([plain])
    with torch.no_grad():
        unpatched = plain.model.diffusion_model(x[1:], t[1:], ctx[1:], transformer_options=dict(
            plain.model_options["transformer_options"], cond_or_uncond=[1]))
    assert torch.equal(ours[1:], unpatched)  # bit for bit (the same batch shape as the split call)


@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_lse_attention_path_equals_the_default_path(host, tiny_models, monkeypatch, mode):
    """CustomVideoXApply attention_path=lse (fused calls merged by log-sum-exp) computes what the masked
    default does."""
    import comfy.sd
    from customvideox.cvx_core import entity_region as er
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 3, 8, 10, generator=g)
    raw_ref = torch.randn(1, 16, 1, 8, 10, generator=g)
    ctx = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([500.0, 500.0])
    region = er.EntityRegion(mode="auto", entity_idx=(1, 2), map_block=0, lam=2.0)
    outs = {}
    from customvideox.cvx_host import attention_override as ao
    real, fused = ao.reference_attention_lse, []
    monkeypatch.setattr(ao, "reference_attention_lse", lambda *a, **k: fused.append(1) or real(*a, **k))
    for path in ("mask", "lse"):
        fused.clear()
        model = comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict("native_1_0"))
        outs[path] = patched_forward(host, model, raw_ref, x, t, ctx, strength=2.0, attention_mode=mode,
                                     reference_rope="negative", region=region, attention_path=path)[1]
        assert bool(fused) == (path == "lse")  # the path really taken
    assert torch.allclose(outs["lse"], outs["mask"], atol=1e-5), (outs["lse"] - outs["mask"]).abs().max()


@pytest.mark.parametrize("kind,config,frames", [("native_1_0", tm.TINY_CONFIG_1_0, 3),
                                                ("native_1_5", tm.TINY_CONFIG_1_5, 4)])
def test_default_placement_with_finite_bias_equals_diffusers(host, tiny_models, request, kind, config, frames):
    """What users get: the default reference placement (temporal index -1, the video at 0..T-1), two-way (the
    reference's own query rows included) and a finite bias (strength 2), against diffusers' transformer with
    the reference as extra frames, positions from diffusers' RoPE builder and the bias in a processor of this
    test (tests/diffusers_oracle.py)."""
    import comfy.sd
    from diffusers_oracle import ReferenceBiasProcessor, with_reference_at_minus_one

    strength = 2.0
    model = comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict(kind))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, frames, 8, 10, generator=g)
    raw_ref = torch.randn(1, 16, 1, 8, 10, generator=g)
    ctx = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([600.0, 600.0])
    apply_defaults = {p.id: p.default for p in host.node_classes["CustomVideoXApply"].define_schema().inputs
                      if p.id in ("reference_rope", "attention_mode")}
    assert apply_defaults == {"reference_rope": "negative", "attention_mode": "two_way"}, apply_defaults
    patched, ours = patched_forward(host, model, raw_ref, x, t, ctx, strength=strength, **apply_defaults)

    p_t = config.get("patch_size_t") or 1
    ref = patched.model.latent_format.process_in(raw_ref).repeat(1, 1, p_t, 1, 1).expand(2, -1, -1, -1, -1)
    per_frame = (8 // 2) * (10 // 2)
    rot = with_reference_at_minus_one(tm.diffusers_rotary_emb(config, frames, 8, 10), per_frame)
    peer = tm.build_diffusers_model(tiny_models.native_state_dict(kind), config)
    peer.set_attn_processor(ReferenceBiasProcessor(math.log(strength), per_frame))
    with torch.no_grad():
        want = peer(hidden_states=torch.cat([ref, x], dim=2).permute(0, 2, 1, 3, 4), encoder_hidden_states=ctx,
                    timestep=t, image_rotary_emb=rot, return_dict=False)[0].permute(0, 2, 1, 3, 4)[:, :, p_t:]
    diff = float((ours - want).abs().max())
    request.node.user_properties.append(("max_abs_diff", diff))
    print(f"\n{kind}: patched host model (default placement, strength {strength}) vs diffusers: max |diff| {diff:.2e}")
    assert ours.shape == x.shape
    assert diff < 2e-5, diff
    # The oracle can tell: the reference changes the output, and placing it at index 0 instead changes it too.
    rot_shift = tm.diffusers_rotary_emb(config, frames + p_t, 8, 10)
    with torch.no_grad():
        shifted = peer(hidden_states=torch.cat([ref, x], dim=2).permute(0, 2, 1, 3, 4), encoder_hidden_states=ctx,
                       timestep=t, image_rotary_emb=rot_shift, return_dict=False)[0].permute(0, 2, 1, 3, 4)[:, :, p_t:]
    assert float((shifted - want).abs().max()) > 100 * max(diff, 1e-7)
