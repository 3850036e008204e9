"""The pack on the Wan models users load with the host's own nodes, beyond the tiny Wan 2.1 T2V of
tests/host/test_wan_oracle.py:

* Wan 2.2 TI2V-5B's layout (48-channel latent in and out, detected as the host's ``WAN22``) with a
  48-channel reference through CustomVideoXApply, against diffusers' ``WanTransformer3DModel`` built with
  48 channels and the dense bias written out by hand; also with the per-frame timesteps the host's WAN22
  gives a video with a start image (the inserted reference must keep the sampling timestep);
* any native Wan MODEL: UNETLoader's weight dtypes, core LoRA loaders before or after the patch (against
  the LoRA merged by hand into the oracle), the host's attention functions;
* clear errors for a reference from the other Wan VAE and for the Wan variants the pack does not handle.
"""

from __future__ import annotations

import math
import re

import pytest
import tiny_wan as tw
import torch
from customvideox.nodes import types as node_types
from test_reference_encode import wan22_vae  # noqa: F401  (fixture: the host's Wan 2.2 VAE, narrowed)
from test_wan_oracle import ATOL, HW, DenseBiasProcessor, H, InsertedSpec, Spec, T, W
from tiny_models import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")
BIAS = "CustomVideoXReferenceFramesBias"
APPLY = "CustomVideoXApply"
BIAS_ARGS = dict(strength=1.0, leading_frames=0, block_start=0, block_end=-1, apply_to_uncond=True)
APPLY_ARGS = dict(strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True, attention_mode="two_way",
                  reference_rope="negative")


@pytest.fixture(scope="module")
def wan_sd() -> dict:
    return tw.build_wan_state_dict(seed=3)


@pytest.fixture(scope="module")
def ti2v_sd() -> dict:
    return tw.build_wan_state_dict(seed=5, channels=48)


def load(sd: dict, **model_options):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=model_options)


def encoded(host, latent: torch.Tensor, family: str):
    return node_types.EncodedReference(latent=latent, width=W * 8, height=H * 8, family=family)


def bias(host, model, **kw):
    return host.node_classes[BIAS].execute(model=model, **{**BIAS_ARGS, **kw}).result[0]


def apply(host, model, reference, **kw):
    return host.node_classes[APPLY].execute(model=model, reference=reference, **{**APPLY_ARGS, **kw}).result[0]


def forward(model, x, t, ctx, tdc=None, opts=None, **kwargs) -> torch.Tensor:
    """One call of the model's DiT with the patcher's wrappers and options, at timestep(s) ``t``."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    to = dict(model.model_options["transformer_options"], wrappers=model.wrappers, **(opts or {}))
    with torch.no_grad():
        return model.model.diffusion_model(x, t, ctx, time_dim_concat=tdc, transformer_options=to, **kwargs)


def denoise(model, x, sigma: float, ctx, tdc=None) -> torch.Tensor:
    """The host's whole model call (``BaseModel.apply_model``): its input dtype, weight casts and timestep."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    to = dict(model.model_options["transformer_options"], wrappers=model.wrappers)
    s = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return model.model.apply_model(x, s, c_crossattn=ctx, time_dim_concat=tdc, transformer_options=to)


def oracle(sd: dict, latent, t, ctx, spec: Spec, **config) -> torch.Tensor:
    """diffusers' WanTransformer3DModel with the dense bias of ``spec`` (``t``: [B] or per token [B, S])."""
    peer = tw.build_diffusers_wan(sd, **config)
    for i, block in enumerate(peer.blocks):
        block.attn1.set_processor(DenseBiasProcessor(i, spec))
        block.attn2.set_processor(DenseBiasProcessor(i, spec))
    with torch.no_grad():
        return peer(latent, t, ctx, return_dict=False)[0]


def inputs(seed: int, channels: int = 16, refs: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, T, H, W, generator=g)
    ref = torch.randn(2, channels, refs, H, W, generator=g)
    ctx = torch.randn(2, 12, tw.TEXT_DIM, generator=g)
    return x, ref, ctx


# --- Wan 2.2 TI2V-5B: 48-channel latent -------------------------------------------------------------------


def test_ti2v_5b_layout_loads_as_the_hosts_wan22_with_its_48_channel_latent(ti2v_sd):
    model = load(ti2v_sd)
    assert type(model.model).__name__ == "WAN22"
    assert type(model.get_model_object("latent_format")).__name__ == "Wan22"
    assert model.get_model_object("latent_format").latent_channels == 48
    dm = model.get_model_object("diffusion_model")
    assert (dm.in_dim, dm.out_dim) == (48, 48)


@pytest.mark.parametrize("per_frame", [False, True], ids=["one_timestep", "start_image_per_frame_timesteps"])
def test_apply_on_ti2v_5b_with_tab_equals_the_dense_oracle(host, ti2v_sd, per_frame):
    """A 48-channel reference, strength 0.8 with a parabolic TAB bias, off on the uncond row. With a start image
    the host's WAN22 gives one timestep per latent frame (0 on the given frame): the inserted reference keeps
    the sampling timestep and every video frame its own, as diffusers' per-token timesteps spell out."""
    import comfy.latent_formats
    from customvideox.cvx_core import tab_schedule as tab
    x, ref, ctx = inputs(20, channels=48)
    raw = ref[:1]
    model = load(ti2v_sd)
    t = torch.tensor([600.0, 600.0])
    if per_frame:
        given = torch.ones(2, 1, T, H, W)
        given[:, :, 0] = 0.0  # Wan22ImageToVideoLatent's noise mask: frame 0 is the start image
        t = model.model.process_timestep(t, x=x, denoise_mask=given)  # the host's own per-frame timesteps
        assert t.tolist() == [[0.0, 600.0, 600.0]] * 2
    patched = apply(host, model, encoded(host, raw, "Wan2.2"), strength=0.8, apply_to_uncond=False,
                    schedule=tab.TABSchedule(curve="parabolic", b_min=-0.5, b_max=1.5))
    opts = {"sigmas": torch.tensor([0.8, 0.8]), "sample_sigmas": torch.tensor([1.0, 0.8, 0.6, 0.3, 0.0]),
            "cond_or_uncond": [0, 1]}
    ours = forward(patched, x, t, ctx, opts=opts)
    # Called at 1.0, 0.8, 0.6, 0.3: sigma 0.8 is call 1 of 0..3, tau = 1/3 ("steps" progress).
    tau = 1 / 3
    b = math.log(0.8) - 0.5 + 2.0 * 4 * tau * (1 - tau)
    processed = comfy.latent_formats.Wan22().process_in(raw)
    video = T * HW
    spec = InsertedSpec(video + HW, slice(0, HW), slice(HW, None), [b, -math.inf], range(2))
    # per token: the reference's HW tokens at 600, then each video frame's HW tokens at its frame's timestep
    tokens_t = torch.cat([torch.full((2, 1), 600.0), t.view(2, -1).expand(2, T)], 1).repeat_interleave(HW, 1)
    want = oracle(ti2v_sd, torch.cat([processed.expand(2, -1, -1, -1, -1), x], 2), tokens_t, ctx, spec,
                  channels=48)[:, :, 1:]
    assert ours.shape == x.shape
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    plain = forward(model, x, t, ctx)
    assert (ours - plain).abs().max() > 1e-2  # the reference really acts at this size


def test_ti2v_5b_start_image_graph_with_the_reference_off_is_the_graph_without_it(host, ti2v_sd, wan22_vae):  # noqa: F811
    """The TI2V-5B image-to-video graph through the host's nodes and KSampler: Wan22ImageToVideoLatent's start
    image (a noise mask, so per-frame timesteps), a reference encoded by the same Wan 2.2 VAE. Strength 0
    masks the inserted reference from every query: the sampled video is the graph without CustomVideoXApply to
    round-off, which holds only if every video frame keeps its own timestep."""
    g = torch.Generator().manual_seed(25)
    start, subject = torch.rand(1, 64, 96, 3, generator=g), torch.rand(1, 40, 60, 3, generator=g)
    latent = host.node_classes["Wan22ImageToVideoLatent"].execute(
        vae=wan22_vae, width=96, height=64, length=5, batch_size=1, start_image=start).result[0]
    assert tuple(latent["samples"].shape) == (1, 48, 2, 4, 6) and "noise_mask" in latent
    reference = host.node_classes["CustomVideoXReferenceEncode"].execute(
        vae=wan22_vae, image=subject, width=96, height=64, fit="pad", background="white").result[0]
    assert reference.family == "Wan2.2" and tuple(reference.latent.shape) == (1, 48, 1, 4, 6)
    ctx = torch.randn(2, 12, tw.TEXT_DIM, generator=g)
    positive, negative = [[ctx[:1], {}]], [[ctx[1:], {}]]

    def sample(model) -> torch.Tensor:
        return host.node_classes["KSampler"]().sample(model, 0, 2, 3.0, "euler", "simple", positive, negative,
                                                     latent)[0]["samples"]

    model = load(ti2v_sd)
    plain = sample(model)
    off = sample(apply(host, model, reference, strength=0.0))
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-4)
    on = sample(apply(host, model, reference, strength=2.0))
    assert torch.isfinite(on).all() and (on - plain).abs().max() > 1e-3
    assert torch.equal(on[:, :, :1], plain[:, :, :1])  # the start image's latent frame is kept as given


# --- A reference from the other Wan VAE (and from CogVideoX's) ---------------------------------------------


def test_a_wan21_reference_on_ti2v_5b_and_a_wan22_reference_on_wan21_are_clear_errors(host, wan_sd, ti2v_sd):
    wan21_ref = encoded(host, torch.randn(1, 16, 1, H, W), "Wan2.1")
    wan22_ref = encoded(host, torch.randn(1, 48, 1, H, W), "Wan2.2")
    with pytest.raises(ValueError, match=r"CustomVideoXApply reference: the reference latent has shape "
                                         r"\(1, 16, 1, 8, 10\); this model takes 48-channel .*Wan 2\.2 VAE"):
        apply(host, load(ti2v_sd), wan21_ref)
    with pytest.raises(ValueError, match=r"CustomVideoXApply reference: the reference latent has shape "
                                         r"\(1, 48, 1, 8, 10\); this model takes 16-channel .*Wan 2\.1 VAE"):
        apply(host, load(wan_sd), wan22_ref)
    cog_ref = encoded(host, torch.randn(1, 16, 1, H, W), "CogVideoX")
    with pytest.raises(ValueError, match="CustomVideoXApply reference: .*CogVideoX VAE but the MODEL is Wan"):
        apply(host, load(ti2v_sd), cog_ref)


# --- Any native Wan MODEL: weight dtypes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_files(tiny_models_dir, wan_sd) -> dict[str, str]:
    """The tiny Wan 2.1 T2V saved in fp32, fp16 and bf16, where UNETLoader lists them."""
    names = {}
    for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        name = f"cvx_tiny_wan21_t2v_host_{label}.safetensors"
        save_safetensors({k: v.to(dtype) for k, v in wan_sd.items()}, tiny_models_dir / "diffusion_models" / name)
        names[label] = name
    return names


@pytest.mark.parametrize("file,weight_dtype,stored", [
    ("fp32", "default", torch.float32), ("fp16", "default", torch.float32), ("bf16", "default", torch.float32),
    ("fp32", "fp8_e4m3fn", torch.float8_e4m3fn), ("fp32", "fp8_e4m3fn_fast", torch.float8_e4m3fn),
    ("fp32", "fp8_e5m2", torch.float8_e5m2), ("fp16", "fp16 weights", torch.float16),
    ("bf16", "bf16 weights", torch.bfloat16)])
def test_unet_loader_weight_dtypes_strength_one_is_the_unpatched_model_and_the_bias_acts(
        host, unet_files, tiny_models_dir, file, weight_dtype, stored):
    """UNETLoader's weight dtypes (on this CPU the host keeps fp16/bf16 files' weights in fp32; "fp16/bf16
    weights" loads them as a GPU keeps them, cast to fp32 for compute here): ReferenceFramesBias at strength 1
    is the unpatched model bit for bit, at 2.5 finite and different; an inserted reference at strength 0
    reproduces the unpatched model to round-off, at 2 it acts."""
    import comfy.sd

    if weight_dtype.endswith(" weights"):
        path = tiny_models_dir / "diffusion_models" / unet_files[file]
        model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": stored})
    else:
        model = host.node_classes["UNETLoader"]().load_unet(unet_files[file], weight_dtype)[0]
    dm = model.get_model_object("diffusion_model")
    assert dm.blocks[0].self_attn.q.weight.dtype == stored
    x, ref, ctx = inputs(21, refs=2)
    plain = denoise(model, x, 0.6, ctx, tdc=ref)
    assert torch.equal(denoise(bias(host, model, strength=1.0), x, 0.6, ctx, tdc=ref), plain)
    stronger = denoise(bias(host, model, strength=2.5), x, 0.6, ctx, tdc=ref)
    assert torch.isfinite(stronger).all() and (stronger - plain).abs().max() > 1e-3
    reference = encoded(host, ref[:1, :, :1], "Wan2.1")
    video_only = denoise(model, x, 0.6, ctx)
    off = denoise(apply(host, model, reference, strength=0.0), x, 0.6, ctx)
    torch.testing.assert_close(off, video_only, rtol=1e-5, atol=1e-4)
    on = denoise(apply(host, model, reference, strength=2.0), x, 0.6, ctx)
    assert torch.isfinite(on).all() and (on - video_only).abs().max() > 1e-3


# --- Any native Wan MODEL: core LoRA loaders before and after the patch -----------------------------------

LORA_RANK, LORA_ALPHA, LORA_STRENGTH = 4, 2.0, 0.7
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "ffn.0")


def lora_state_dict(sd: dict, seed: int = 8) -> dict[str, torch.Tensor]:
    """A LoRA in the host's own key format (``diffusion_model.<module>.lora_up/lora_down/alpha``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(tw.TINY_WAN["layers"]):
        for target in LORA_TARGETS:
            key = f"blocks.{block}.{target}"
            rows, cols = sd[f"{key}.weight"].shape
            out[f"diffusion_model.{key}.lora_up.weight"] = 0.3 * torch.randn(rows, LORA_RANK, generator=g)
            out[f"diffusion_model.{key}.lora_down.weight"] = 0.3 * torch.randn(LORA_RANK, cols, generator=g)
            out[f"diffusion_model.{key}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def merged_by_hand(sd: dict, lora: dict) -> dict[str, torch.Tensor]:
    """W + strength * alpha / rank * up @ down on each targeted weight."""
    out = dict(sd)
    for key in {k[len("diffusion_model."):].rsplit(".lora_up", 1)[0] for k in lora if ".lora_up." in k}:
        up, down = lora[f"diffusion_model.{key}.lora_up.weight"], lora[f"diffusion_model.{key}.lora_down.weight"]
        out[f"{key}.weight"] = sd[f"{key}.weight"] + LORA_STRENGTH * LORA_ALPHA / LORA_RANK * (up @ down)
    return out


@pytest.fixture(scope="module")
def lora_file(tiny_models_dir, wan_sd) -> tuple[str, dict]:
    lora = lora_state_dict(wan_sd)
    name = "cvx_tiny_wan21_host_lora.safetensors"
    save_safetensors(lora, tiny_models_dir / "loras" / name)
    return name, lora


def with_lora(host, model, name: str):
    return host.node_classes["LoraLoaderModelOnly"]().load_lora_model_only(model, name, LORA_STRENGTH)[0]


def test_lora_before_or_after_the_frames_bias_is_the_merged_model_with_the_bias(host, wan_sd, lora_file):
    name, lora = lora_file
    model = load(wan_sd)
    x, ref, ctx = inputs(22, refs=2)
    t = torch.tensor([500.0, 500.0])
    lora_first = forward(bias(host, with_lora(host, model, name), strength=2.5), x, t, ctx, tdc=ref)
    lora_after = forward(with_lora(host, bias(host, model, strength=2.5), name), x, t, ctx, tdc=ref)
    assert torch.equal(lora_first, lora_after)
    lora_only = forward(with_lora(host, model, name), x, t, ctx, tdc=ref)
    assert torch.equal(forward(with_lora(host, bias(host, model, strength=1.0), name), x, t, ctx, tdc=ref), lora_only)
    video = T * HW
    spec = Spec(video + 2 * HW, slice(video, None), slice(0, video), [math.log(2.5)] * 2, range(2))
    want = oracle(merged_by_hand(wan_sd, lora), torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert torch.allclose(lora_first, want, atol=ATOL), (lora_first - want).abs().max()
    assert (lora_first - forward(bias(host, model, strength=2.5), x, t, ctx, tdc=ref)).abs().max() > 1e-2


def test_lora_before_or_after_apply_is_the_merged_model_with_the_inserted_reference(host, wan_sd, lora_file):
    import comfy.latent_formats

    name, lora = lora_file
    model = load(wan_sd)
    x, ref, ctx = inputs(23)
    t = torch.tensor([500.0, 500.0])
    reference = encoded(host, ref[:1], "Wan2.1")
    lora_first = forward(apply(host, with_lora(host, model, name), reference, strength=1.7), x, t, ctx)
    lora_after = forward(with_lora(host, apply(host, model, reference, strength=1.7), name), x, t, ctx)
    assert torch.equal(lora_first, lora_after)
    processed = comfy.latent_formats.Wan21().process_in(ref[:1])
    video = T * HW
    spec = InsertedSpec(video + HW, slice(0, HW), slice(HW, None), [math.log(1.7)] * 2, range(2))
    want = oracle(merged_by_hand(wan_sd, lora), torch.cat([processed.expand(2, -1, -1, -1, -1), x], 2), t, ctx,
                  spec)[:, :, 1:]
    assert torch.allclose(lora_first, want, atol=ATOL), (lora_first - want).abs().max()


# --- Any native Wan MODEL: the host's attention functions -------------------------------------------------

ATTENTION = ("attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch")


@pytest.mark.parametrize("name", ATTENTION)
def test_each_host_attention_function_gives_the_oracle(host, wan_sd, monkeypatch, name):
    """The function the host picks at start (--use-split-cross-attention, --use-pytorch-cross-attention, ...;
    sub-quadratic on this CPU by default), swapped in where the Wan blocks call it: the pack's override runs
    through each, with its key-column mask (strength 2.5) and with the inserted reference masked off (-inf)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.model as wan_model

    chosen, calls = getattr(attention, name), []

    def counted(*args, **kwargs):
        calls.append(name)
        return chosen(*args, **kwargs)

    monkeypatch.setattr(wan_model, "optimized_attention", counted)
    model = load(wan_sd)
    x, ref, ctx = inputs(24, refs=2)
    t = torch.tensor([700.0, 700.0])
    plain = forward(model, x, t, ctx, tdc=ref)
    assert torch.equal(forward(bias(host, model, strength=1.0), x, t, ctx, tdc=ref), plain)
    ours = forward(bias(host, model, strength=2.5), x, t, ctx, tdc=ref)
    video = T * HW
    spec = Spec(video + 2 * HW, slice(video, None), slice(0, video), [math.log(2.5)] * 2, range(2))
    want = oracle(wan_sd, torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    off = forward(apply(host, model, encoded(host, ref[:1, :, :1], "Wan2.1"), strength=0.0), x, t, ctx)
    torch.testing.assert_close(off, forward(model, x, t, ctx), rtol=1e-5, atol=1e-4)
    assert len(calls) == 2 * 2 * 5  # 2 blocks x (self + cross) x 5 forwards: every call went through it


def test_in_context_reference_latents_are_a_clear_error(host, wan_sd):
    """BerniniConditioning's reference streams are tokens after the video in the same self-attention."""
    x, ref, ctx = inputs(26)
    model = load(wan_sd)
    context = [torch.randn(2, 16, 1, H, W)]
    for node, patched in ((APPLY, apply(host, model, encoded(host, ref[:1], "Wan2.1"), strength=2.0)),
                          (BIAS, bias(host, model, strength=2.0, leading_frames=1))):
        with pytest.raises(ValueError, match=f"{node} model: the conditioning carries in-context reference "
                                             f"latents \\(BerniniConditioning\\)"):
            forward(patched, x, torch.tensor([500.0, 500.0]), ctx, context_latents=context)


# --- Wan variants the pack does not handle: a clear error naming them -------------------------------------

TINY_CONFIG = dict(image_model="wan2.1", dim=256, num_heads=2, ffn_dim=64, num_layers=1, patch_size=(1, 2, 2),
                   freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=16,
                   out_dim=16)
# host model config class, its detected unet_config, what the error names
VARIANTS = {
    "wan21_i2v": ("WAN21_I2V", dict(model_type="i2v", in_dim=36), "Wan image-to-video"),
    "wan22_i2v_a14b": ("WAN21_T2V", dict(in_dim=36), "takes 36 input channels for a 16-channel"),
    "fun_control": ("WAN21_FunControl2V", dict(model_type="i2v", in_dim=48), "Wan image-to-video"),
    "fun_reference": ("WAN21_T2V", dict(in_dim=52, in_dim_ref_conv=16), "and a reference image"),
    "camera": ("WAN21_Camera", dict(model_type="camera", in_dim=32), r"CameraWanModel, WAN21_Camera"),
    "camera_2.2": ("WAN22_Camera", dict(model_type="camera_2.2", in_dim=36), r"CameraWanModel, WAN21_Camera"),
    "humo": ("WAN21_HuMo", dict(model_type="humo"), r"HumoWanModel, WAN21_HuMo"),
    "s2v": ("WAN22_S2V", dict(model_type="s2v"), r"WanModel_S2V, WAN22_S2V"),
    "animate": ("WAN22_Animate", dict(model_type="animate"), r"AnimateWanModel, WAN22_Animate"),
    "scail": ("WAN21_SCAIL", dict(model_type="scail", in_dim=20), r"SCAILWanModel, WAN21_SCAIL"),
    "wandancer": ("WAN22_WanDancer", dict(model_type="wandancer", in_dim=36), r"WanDancerModel, WAN22_WanDancer"),
    "causal_ar": ("WAN21_CausalAR_T2V", dict(model_type="t2v", causal_ar=True), r"CausalWanModel, WAN21_CausalAR"),
    "flow_rvs": ("WAN21_FlowRVS", dict(model_type="flow_rvs"), r"WanModel, WAN21_FlowRVS"),
}


def variant_model(config_class: str, unet_config: dict):
    """The host's model for a detected ``unet_config`` (as comfy.sd builds it after detection), on the meta
    device: the checks read only classes and shapes."""
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)({**TINY_CONFIG, **unet_config})
    base = config.get_model({}, device="meta")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wan_variants_the_pack_does_not_handle_are_clear_errors_naming_them(host, variant):
    config_class, unet_config, named = VARIANTS[variant]
    model = variant_model(config_class, unet_config)
    reference = encoded(host, torch.randn(1, 16, 1, H, W), "Wan2.1")
    for node, patch in ((APPLY, lambda: apply(host, model, reference)), (BIAS, lambda: bias(host, model, strength=2.0))):
        with pytest.raises(ValueError, match=f"{node}: the MODEL ") as err:
            patch()
        assert re.search(named, str(err.value)) and "does not handle yet" in str(err.value), str(err.value)
