"""Reference-branch adapters (LoRA) on Wan: loading in the common key layouts, acting on the inserted reference's
rows only, and training on a tiny random Wan with the pack's trainer.

The peer is diffusers' ``WanTransformer3DModel`` fed ``[reference | video]`` with its stock attention, and the
LoRA delta ``strength * alpha / r * up @ down @ x`` added by hand (forward hooks written here) to the reference
rows of each adapted projection. At reference strength 1 the inserted reference is unbiased and Wan's
self-attention RoPE is relative, so diffusers' positions (reference frame 0, video 1..T) are the pack's
(reference -1, video 0..T-1) shifted by one.

Module names, native -> diffusers: ``self_attn.{q,k,v,o}`` -> ``attn1.{to_q,to_k,to_v,to_out.0}``,
``cross_attn`` -> ``attn2`` alike, ``ffn.0`` -> ``ffn.net.0.proj``, ``ffn.2`` -> ``ffn.net.2``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import test_wan_oracle as wo
import tiny_wan as tw
import torch
from customvideox.cvx_core import lora
from customvideox.cvx_host import adapters
from harness import patching
from safetensors.torch import save_file

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

T, H, W = 3, 8, 10  # latent frames and size: 4 x 5 tokens per frame
HW = (H // 2) * (W // 2)
ATOL = 5e-5  # host vs diffusers without any patch: ~2e-5 (fp32 round-off)
RANK, ALPHA = 4, 2.0
DIM, FFN = 2 * 128, 64  # tiny_wan: 2 heads x 128, FFN 64
SHAPES = {"self_attn.q": (DIM, DIM), "self_attn.k": (DIM, DIM), "self_attn.v": (DIM, DIM), "self_attn.o": (DIM, DIM),
          "cross_attn.q": (DIM, DIM), "cross_attn.o": (DIM, DIM), "ffn.0": (FFN, DIM), "ffn.2": (DIM, FFN)}
REFERENCE_SUBS = tuple(SHAPES)
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
LAYOUTS = {"native": "ComfyUI-native", "peft": "diffusers/PEFT", "kohya": "kohya", "kohya_diffusers": "kohya"}


@pytest.fixture(scope="module")
def wan_sd() -> dict:
    return tw.build_wan_state_dict(seed=4)


def random_pairs(seed: int, subs=REFERENCE_SUBS, blocks=(0, 1), scale: float = 0.3) -> dict:
    """``{(block, sub): (down [r, in], up [out, r])}``."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(SHAPES, **{"cross_attn.k": (DIM, DIM)})
    return {(b, s): (torch.randn(RANK, shapes[s][1], generator=g) * scale,
                     torch.randn(shapes[s][0], RANK, generator=g) * scale) for b in blocks for s in subs}


def write_layout(layout: str, pairs: dict, folder: Path, name: str) -> Path:
    sd, metadata = {}, None
    for (b, sub), (down, up) in pairs.items():
        if layout == "peft":
            base = f"transformer.blocks.{b}.{DIFFUSERS[sub]}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = down, up
            continue
        base = {"native": f"diffusion_model.blocks.{b}.{sub}",
                "kohya": f"lora_unet_blocks_{b}_{sub}".replace(".", "_"),
                "kohya_diffusers": f"lora_transformer_blocks_{b}_{DIFFUSERS[sub]}".replace(".", "_")}[layout]
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        sd[f"{base}.alpha"] = torch.tensor(ALPHA)
    if layout == "peft":
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": RANK,
                                                                         "transformer.lora_alpha": ALPHA})}
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def base_model(sd: dict):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd))


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, T, H, W, generator=g), torch.randn(1, 16, 1, H, W, generator=g),
            torch.randn(2, 12, 4096, generator=g), torch.tensor([600.0, 600.0]))


def with_reference(host, m, raw_ref, **kw):
    return patching.apply_reference(m, raw_ref, family="Wan2.1", **kw)


def forward(m, x, t, ctx, cond_or_uncond=None) -> torch.Tensor:
    return patching.forward(m, x, t, ctx, **({} if cond_or_uncond is None else {"cond_or_uncond": cond_or_uncond}))


def load(host, m, path: Path, strength: float = 1.0, mode: str = "reference_only"):
    return adapters.load_adapter(m, str(path), strength, mode)


def oracle(sd: dict, pairs: dict, strength: float, processed_ref, x, t, ctx, processor=None) -> torch.Tensor:
    """diffusers on ``[reference | video]``, each adapted Linear's output plus the LoRA delta on rows ``[0, HW)``
    (``processor``: another attention rule for every block, e.g. one-way's)."""
    peer = tw.build_diffusers_wan(sd)
    if processor is not None:
        for block in peer.blocks:
            block.attn1.set_processor(processor)
            block.attn2.set_processor(processor)
    scale = strength * ALPHA / RANK

    def hook(down, up):
        def add(module, args, out):
            delta = torch.zeros_like(out)
            delta[:, :HW] = scale * (args[0][:, :HW] @ down.T) @ up.T
            return out + delta
        return add

    for (b, sub), (down, up) in pairs.items():
        peer.blocks[b].get_submodule(DIFFUSERS[sub]).register_forward_hook(hook(down, up))
    latent = torch.cat([processed_ref.expand(x.shape[0], -1, -1, -1, -1), x], 2)
    with torch.no_grad():
        return peer(latent, t, ctx, return_dict=False)[0][:, :, 1:]


def test_every_layout_loads_alike_and_equals_the_diffusers_oracle(host, wan_sd, tmp_path):
    import comfy.latent_formats

    pairs = random_pairs(0)
    files = {layout: write_layout(layout, pairs, tmp_path, f"wan_{layout}") for layout in LAYOUTS}
    x, raw, ctx, t = inputs(1)
    base = base_model(wan_sd)
    outs = {}
    for layout, path in files.items():
        adapted, report = load(host, base, path, strength=0.7)
        assert report.layouts == [LAYOUTS[layout]] and not report.unused, report.text()
        assert report.modules == 16
        outs[layout] = forward(with_reference(host, adapted, raw), x, t, ctx)
    assert all(torch.equal(o, outs["native"]) for o in outs.values())
    processed = comfy.latent_formats.Wan21().process_in(raw)
    want = oracle(wan_sd, pairs, 0.7, processed, x, t, ctx)
    assert torch.allclose(outs["native"], want, atol=ATOL), (outs["native"] - want).abs().max()
    no_adapter = forward(with_reference(host, base, raw), x, t, ctx)
    assert (outs["native"] - no_adapter).abs().max() > 1e-2  # the adapter is not a no-op at this size


def test_video_rows_see_the_adapter_only_through_the_references_keys_and_values(host, wan_sd, tmp_path):
    """In the last block, every adapted projection but k and v acts on the reference rows' own outputs, which
    the video never reads afterwards: the video's output is bit for bit the run without the adapter. k or v
    change it (the video attends to the reference's keys and values)."""
    x, raw, ctx, t = inputs(2)
    base = base_model(wan_sd)
    no_adapter = forward(with_reference(host, base, raw), x, t, ctx)
    own_rows = [s for s in REFERENCE_SUBS if s not in ("self_attn.k", "self_attn.v")]
    path = write_layout("native", random_pairs(3, subs=own_rows, blocks=(1,), scale=1.0), tmp_path, "last_own")
    adapted, report = load(host, base, path)
    assert report.modules == len(own_rows)
    assert torch.equal(forward(with_reference(host, adapted, raw), x, t, ctx), no_adapter)
    for sub in ("self_attn.k", "self_attn.v"):
        path = write_layout("native", random_pairs(4, subs=(sub,), blocks=(1,)), tmp_path, f"last_{sub}")
        out = forward(with_reference(host, load(host, base, path)[0], raw), x, t, ctx)
        assert (out - no_adapter).abs().max() > 1e-3, sub


def test_without_the_reference_the_model_is_the_base_model(host, wan_sd, tmp_path):
    x, raw, ctx, t = inputs(5)
    base = base_model(wan_sd)
    plain = forward(base, x, t, ctx)
    adapted, _ = load(host, base, write_layout("native", random_pairs(6), tmp_path, "full"))
    assert torch.equal(forward(adapted, x, t, ctx), plain)  # no CustomVideoXApply at all
    off = forward(with_reference(host, base, raw, strength=0.0), x, t, ctx)
    assert torch.equal(forward(with_reference(host, adapted, raw, strength=0.0), x, t, ctx), off)
    # Reference on for the cond row only: the uncond row (reference masked) is the run without the adapter.
    on = forward(with_reference(host, adapted, raw, apply_to_uncond=False), x, t, ctx, cond_or_uncond=[0, 1])
    ref_only = forward(with_reference(host, base, raw, apply_to_uncond=False), x, t, ctx, cond_or_uncond=[0, 1])
    assert torch.equal(on[1], ref_only[1]) and (on[0] - ref_only[0]).abs().max() > 1e-3
    # Adapter before or after CustomVideoXApply, and two loaders stacked: one adapter at 0.5 twice is one at 1.
    after = load(host, with_reference(host, base, raw), write_layout("native", random_pairs(6), tmp_path, "a"))[0]
    assert torch.equal(forward(after, x, t, ctx), forward(with_reference(host, adapted, raw), x, t, ctx))
    half = write_layout("native", random_pairs(6), tmp_path, "half")
    twice = with_reference(host, load(host, load(host, base, half, 0.5)[0], half, 0.5)[0], raw)
    assert torch.allclose(forward(twice, x, t, ctx), forward(with_reference(host, adapted, raw), x, t, ctx),
                          atol=1e-5)
    # Unpatched afterwards: the shared model's Linears are the host's classes again and compute the base model.
    assert torch.equal(forward(base, x, t, ctx), plain)
    assert not any(type(mod).__name__.startswith("ReferenceLora") for mod in base.model.diffusion_model.modules())


def test_text_side_and_other_backbones_keys_are_clear_errors_or_reported(host, wan_sd, tmp_path):
    from customvideox.cvx_core import lora_keys as lk
    base = base_model(wan_sd)
    # cross_attn.k projects the text the video shares: reference_only reports it unused; global mode applies it.
    pairs = random_pairs(7, subs=("self_attn.q", "cross_attn.k"), blocks=(1,))
    path = write_layout("peft", pairs, tmp_path, "with_text_k")
    _, report = load(host, base, path)
    assert report.modules == 1 and "transformer.blocks.1.attn2.to_k.lora_A.weight" in report.unused
    assert "not a block projection of the reference tokens" in report.text()
    glob, report = load(host, base, path, strength=0.5, mode="global")
    assert report.modules == 2 and not report.unused
    import comfy.model_management as mm

    mm.load_models_gpu([glob])
    down, up = pairs[(1, "cross_attn.k")]  # strength 0.5, alpha / r from the PEFT metadata
    w = glob.model.diffusion_model.blocks[1].cross_attn.k.weight
    assert torch.allclose(w, wan_sd["blocks.1.cross_attn.k.weight"] + 0.5 * ALPHA / RANK * up @ down, atol=1e-5)
    mm.unload_all_models()
    # A CogVideoX adapter (its native names) on a Wan model: the error names the family and the keys.
    cog = {f"diffusion_model.blocks.0.{s}.lora_{k}.weight": torch.zeros(2, 2) for s in ("q", "attn_out")
           for k in ("down", "up")}
    save_file(cog, str(tmp_path / "cogvideox.safetensors"))
    with pytest.raises(lk.LoraKeyError, match="this LoRA is for CogVideoX, not Wan") as e:
        load(host, base, tmp_path / "cogvideox.safetensors")
    assert "diffusion_model.blocks.0.attn_out.lora_down.weight" in str(e.value)
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in str(e.value)  # what is expected
    save_file({"text_model.fc1.lora_up.weight": torch.zeros(4, 4), "text_model.fc1.lora_down.weight": torch.zeros(4, 4)},
              str(tmp_path / "unknown.safetensors"))
    with pytest.raises(lk.LoraKeyError, match="can be applied to this Wan model: found keys like text_model.fc1"):
        load(host, base, tmp_path / "unknown.safetensors")


def test_loader_node_on_wan_names_itself_and_the_file(host, host_env, wan_sd):
    import folder_paths

    loras = Path(folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.q.lora_down.weight": torch.zeros(2, 2),
               "diffusion_model.blocks.0.q.lora_up.weight": torch.zeros(2, 2)}, str(loras / "cvx_cog_on_wan.safetensors"))
    node = host.node_classes["CustomVideoXAdapterLoader"]
    with pytest.raises(ValueError, match=r"CustomVideoXAdapterLoader \(lora_name='cvx_cog_on_wan.safetensors'\): "
                                         r".*diffusion_model.blocks.0.q.lora_down.weight.*for CogVideoX, not Wan"):
        node.execute(model=base_model(wan_sd), lora_name="cvx_cog_on_wan.safetensors", strength=1.0,
                     mode="reference_only")
    write_layout("kohya", random_pairs(8), loras, "cvx_wan_kohya")
    out = node.execute(model=base_model(wan_sd), lora_name="cvx_wan_kohya.safetensors", strength=1.0,
                       mode="reference_only")
    assert "48 key(s) used on 16 module(s), 0 not used" in out.result[1], out.result[1]


# --- training on a tiny Wan ----------------------------------------------------------------------------------


def tiny_dataset(host, n: int = 2):
    """Clips whose reference is their own first frame: a reference-branch adapter has something to carry."""
    from customvideox.cvx_core import dataset as ds
    g = torch.Generator().manual_seed(21)
    samples = []
    for _ in range(n):
        latent = torch.randn(1, 16, T, H, W, generator=g)
        samples.append({"latent": latent, "reference": latent[:, :, :1].clone(),
                        "text": torch.randn(1, 12, 4096, generator=g)})
    return ds.CachedDataset(samples, torch.zeros(1, 12, 4096), [])


def train(host, sd: dict, data, out_dir: Path, **kw):
    import comfy.model_management as mm
    from customvideox.cvx_core import lora as lora
    from customvideox.cvx_core import training as tr
    from customvideox.cvx_host import adapters as rb
    from customvideox.cvx_host import training as ta
    model = base_model(sd)
    args = dict(steps=150, learning_rate=3e-3, rank=4, alpha=4.0, seed=0, reference_drop=0.0, text_drop=0.0,
                gradient_checkpointing=True, checkpoint_every=0, timestep_min=300, timestep_max=700)
    args.update(kw)
    settings = tr.TrainSettings(**args)
    shapes = lora.block_target_shapes(rb.module_shapes(model), settings.targets, lora.WAN_TARGET_MODULES)
    adapter = lora.init_adapter(shapes, settings.rank, settings.alpha, seed=settings.seed)
    model_fn, device, dtype, objective = ta.training_model_fn(model, adapter)
    mm.in_training = True  # as train_on_host: the host's Wan RoPE then takes its autograd-friendly path
    try:
        result = tr.train_adapter(settings, data, model_fn, adapter, objective, out_dir, device=device, dtype=dtype,
                                  base_model="tiny_wan", adapter_name="tiny_wan_adapter")
    finally:
        mm.in_training = False
    return model, model_fn, objective, result


def test_flow_objective_is_the_hosts_model_sampling(host, wan_sd):
    """Wan is a flow model: x_t and the target must be what the host's sampling noises and denoises with, and the
    DiT must get the timestep the host's own model call gives it (1000 * sigma)."""
    from customvideox.cvx_host import training as ta
    model = base_model(wan_sd)
    objective = ta.objective_of(model)
    ms = model.get_model_object("model_sampling")
    assert objective.kind == "flow" and len(objective.sigmas) == 1000
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, T, H, W, generator=g), torch.randn(1, 16, T, H, W, generator=g)
    for t in (0, 400, 999):
        x_t, target = objective.point(x0, noise, t)
        sigma = ms.sigmas[t].reshape(1)
        assert torch.allclose(x_t, ms.noise_scaling(sigma, noise, x0), atol=1e-6)
        assert torch.allclose(ms.calculate_denoised(sigma, target, x_t), x0, atol=1e-5)
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    try:
        model_fn, *_ = ta.training_model_fn(model, lora.init_adapter(
            {"blocks.0.self_attn.q": (DIM, DIM)}, 2, 2.0))
        with torch.no_grad():
            model_fn(x0, torch.tensor([400.0]), torch.randn(1, 12, 4096), x0[:, :, :1], False)
    finally:
        hook.remove()
    assert torch.allclose(seen[0], ms.sigmas[400].reshape(1) * 1000, rtol=1e-6)


def test_training_on_a_tiny_wan_lowers_the_loss_and_the_adapter_reloads(host, wan_sd, tmp_path):
    import comfy.model_management as mm

    data = tiny_dataset(host)
    _, _, _, result = train(host, wan_sd, data, tmp_path / "run")
    k = 30
    first, last = np.mean(result.losses[:k]), np.mean(result.losses[-k:])
    assert len(result.losses) == 150 and all(math.isfinite(v) for v in result.losses)
    assert last < 0.9 * first, (first, last)

    from customvideox.cvx_core import lora_keys as lk
    sd, metadata, config = lk.read_lora_file(result.adapter_path)
    assert set(sd) >= {"diffusion_model.blocks.1.self_attn.o.lora_up.weight", "diffusion_model.blocks.0.self_attn.q.alpha"}
    base = base_model(wan_sd)
    adapted, report = load(host, base, result.adapter_path)
    assert report.modules == 8 and not report.unused, report.text()
    x, raw, ctx, t = inputs(9)
    assert torch.equal(forward(adapted, x, t, ctx), forward(base, x, t, ctx))  # no reference: the base model
    on = forward(with_reference(host, adapted, raw), x, t, ctx)
    assert (on - forward(with_reference(host, base, raw), x, t, ctx)).abs().max() > 1e-4
    off = forward(with_reference(host, base, raw, strength=0.0), x, t, ctx)
    assert torch.equal(forward(with_reference(host, adapted, raw, strength=0.0), x, t, ctx), off)
    mm.unload_all_models()


def test_gradient_checkpointing_on_wan_gives_the_same_losses(host, wan_sd, tmp_path):
    data = tiny_dataset(host)
    kw = dict(steps=4, targets=("q", "k", "v", "attn_out", "ff_proj", "ff_out"))
    *_, a = train(host, wan_sd, data, tmp_path / "a", gradient_checkpointing=True, **kw)
    *_, b = train(host, wan_sd, data, tmp_path / "b", gradient_checkpointing=False, **kw)
    assert a.losses[-1] != a.losses[0]  # the adapter moved
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


def test_training_refuses_a_reference_timestep_wan_cannot_honour(host, wan_sd):
    from customvideox.cvx_core import training as tr
    from customvideox.cvx_host import training as ta
    adapter = lora.init_adapter({"blocks.0.self_attn.q": (DIM, DIM)}, 2, 2.0)
    with pytest.raises(tr.TrainingError, match="CustomVideoXTrainAdapter reference_timestep: 'noised' on a Wan"):
        ta.training_model_fn(base_model(wan_sd), adapter, "noised")


class StubWanClip:
    """Stands in for the umT5 CLIP object (no T5 weights here): the two methods the node calls."""

    def __init__(self) -> None:
        self.cond_stage_model = torch.nn.Linear(2, 2)

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str):
        g = torch.Generator().manual_seed(len(tokens))
        return [[torch.randn(1, 12, 4096, generator=g), {}]]


def test_train_adapter_node_on_wan_with_the_hosts_vae(host, host_env, wan_sd, tmp_path):
    """The node's glue on Wan under the host's inference mode: a core-loaded model, the real (tiny) Wan VAE, the
    adapter saved into models/loras in the host's Wan names, loadable by the adapter loader."""
    import comfy.sd
    import folder_paths
    from PIL import Image

    unet = tmp_path / "tiny_wan.safetensors"
    save_file(wan_sd, str(unet))
    model = comfy.sd.load_diffusion_model(str(unet))
    vae = comfy.sd.VAE(sd=tw.build_wan_vae_state_dict(seed=0))
    clips = Path(folder_paths.get_input_directory()) / "cvx_wan_train_set"
    (clips / "box").mkdir(parents=True, exist_ok=True)
    for i in range(9):
        frame = np.full((32, 32, 3), 40, np.uint8)
        frame[10:20, 2 + 2 * i:12 + 2 * i] = (230, 40, 40)
        Image.fromarray(frame).save(clips / "box" / f"{i:03d}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 2:12] = 255
    Image.fromarray(mask).save(clips / "box.mask.png")
    (clips / "box.txt").write_text("a red box slides to the right", encoding="utf-8")
    node = host.node_classes["CustomVideoXTrainAdapter"]
    with torch.inference_mode():
        out = node.execute(model=model, vae=vae, clip=StubWanClip(), dataset_folder="cvx_wan_train_set", subject="box",
                           adapter_name="cvx_wan_node_trained", steps=3, learning_rate=1e-3, rank=2, alpha=2.0,
                           targets="attention + feed-forward", width=32, height=32, num_frames=9, frame_stride=1,
                           reference_drop=0.0, text_drop=0.0, gradient_checkpointing=True, checkpoint_every=0,
                           resume=False, seed=0)
    name, curve = out.result
    assert name == "cvx_wan_node_trained.safetensors" and curve.shape == (1, 480, 900, 3)
    path = Path(folder_paths.get_full_path("loras", name))
    from customvideox.cvx_core import lora_keys as lk
    sd, metadata, config = lk.read_lora_file(path)
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in sd
    assert (lk.parse_lora(sd, metadata, config).meta.steps, len(sd)) == (3, 2 * 6 * 3)
    _, report = load(host, base_model(wan_sd), path)
    assert report.modules == 12 and not report.unused


class OneWayProcessor:
    """diffusers attention for a one-way reference at rows ``[0, HW)``: its rows attend to its own tokens only
    and read the positive prompt (row 0) in cross-attention; the video rows attend to everything, unbiased."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        cross = encoder_hidden_states is not None
        q, k, v = wo.projections(attn, hidden_states, encoder_hidden_states, lambda t: wo.rope(t, *rotary_emb))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if not cross:
            logits[:, :, :HW, HW:] = -math.inf
        out = torch.softmax(logits, dim=-1) @ v
        if cross:
            out[:, :, :HW] = torch.softmax(q[:, :, :HW] @ k[:1].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v[:1]
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def test_one_way_reference_pass_carries_the_adapter_like_the_diffusers_oracle(host, wan_sd, tmp_path):
    """attention_mode one_way: the adapter acts in the reference's own pass (every row of it) and on no video
    row; diffusers with the one-way rule written out and the LoRA delta on the reference rows."""
    pairs = random_pairs(4)
    path = write_layout("native", pairs, tmp_path, "one_way.safetensors")
    import comfy.latent_formats

    x, raw, ctx, t = inputs(5)
    adapted = load(host, base_model(wan_sd), path, 0.7)[0]
    ours = forward(with_reference(host, adapted, raw, attention_mode="one_way"), x, t, ctx)
    without = forward(with_reference(host, base_model(wan_sd), raw, attention_mode="one_way"), x, t, ctx)
    processed = comfy.latent_formats.Wan21().process_in(raw)
    want = oracle(wan_sd, pairs, 0.7, processed, x, t, ctx, processor=OneWayProcessor())
    print(f"one-way adapter vs oracle: max |diff| = {float((ours - want).abs().max()):.2e}, "
          f"adapter effect {float((ours - without).abs().max()):.2e}")
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    assert (ours - without).abs().max() > 1e-3
