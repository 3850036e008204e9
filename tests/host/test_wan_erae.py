"""ERAE and stacked references on Wan (Phantom/VACE frames and references inserted into Wan T2V).

* ERAE auto reads the positive prompt in every model call, however the host batches cond and uncond: the
  uncond rows run alone equal the same rows run batched with cond, in both orders (the peer is the same
  patched model with the host's default batching, evaluated on the same sampler state at every model call,
  as tests/host/test_erae_fidelity.py does for CogVideoX). On Phantom the probe for the positive prompt's map
  uses the positive's own reference frames: WanPhantomSubjectToVideo's ``negative_img_text`` carries zeros.
* ``map_blocks`` averages the entity attention over blocks, against diffusers with the map written by hand.
* Two CustomVideoXApply nodes stacked on one Wan T2V model: each reference's key columns get its own
  biases (dense oracle), and the graph runs through the real executor to an mp4.
"""

from __future__ import annotations

import copy
import math

import pytest
import tiny_wan as tw
import torch
from harness import patching
from test_erae_fidelity import alone_vs_batched, max_diff
from test_wan_oracle import ATOL, HW, NODE, H, Spec, T, W, diffusers_run, host_run, inputs
from wan_graphs import LATENT, SIZE, latent_only, nodes_of, tiny_t2v
from workflow_tools import decode_mp4

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]


# --- ERAE auto: the positive prompt's map whatever rows a call holds ----------------------------------------


def _region(host, **kw):
    from customvideox.cvx_core import entity_region as er
    return er.EntityRegion(**{"mode": "auto", "entity_idx": (1, 3), "lam": 3.0, "map_block": 0,
                              "start_percent": 0.0, **kw})


def _patched(host, kind: str, region, layers: int):
    """A tiny Wan model with ERAE auto: Phantom's or VACE's frames biased by the frames node, or a reference
    inserted into Wan T2V by CustomVideoXApply."""
    import comfy.sd

    sd = tw.build_wan_state_dict(seed=5, layers=layers, vace=kind == "vace")
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    common = dict(block_start=0, block_end=-1, apply_to_uncond=True, region=region)
    if kind in ("phantom", "vace"):
        return host.node_classes[NODE].execute(model=model, strength=1.5, leading_frames=int(kind == "vace"),
                                               **common).result[0]
    from customvideox.nodes import types as types
    ref = types.EncodedReference(latent=torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(8)),
                                 width=W * 8, height=H * 8, family="Wan2.1")
    mode = "one_way" if kind == "inserted_one_way" else "two_way"
    return host.node_classes["CustomVideoXApply"].execute(model=model, reference=ref, strength=1.5,
                                                          attention_mode=mode, reference_rope="negative",
                                                          **common).result[0]


def _sample(model, kind: str, steps: int = 3):
    """A CFG run. Phantom as WanPhantomSubjectToVideo wires it: the positive carries the reference images, the
    negative (``negative_img_text``) zeros in the model's latent space. VACE: the leading latent frame is the
    reference, and (stricter than WanVaceToVideo, which gives both the same) the positive's and negative's
    VACE context differ, so a probe must use the positive's."""
    import comfy.latent_formats
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, T + int(kind == "vace"), H, W, generator=g)
    pos, neg = torch.randn(1, 12, tw.TEXT_DIM, generator=g), torch.randn(1, 12, tw.TEXT_DIM, generator=g)
    pos_extra, neg_extra = {}, {}
    if kind == "phantom":
        images = torch.randn(1, 16, 1, H, W, generator=g)
        pos_extra = {"time_dim_concat": images}
        neg_extra = {"time_dim_concat": comfy.latent_formats.Wan21().process_out(torch.zeros_like(images))}
    if kind == "vace":
        pos_extra = {"vace_frames": [torch.randn(1, 32, *noise.shape[2:], generator=g)]}
        neg_extra = {"vace_frames": [torch.randn(1, 32, *noise.shape[2:], generator=g)]}
    return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", [[pos, pos_extra]], [[neg, neg_extra]],
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.mark.parametrize("order", ["uncond_first", "cond_first"])
@pytest.mark.parametrize("kind,map_blocks", [("phantom", 1), ("phantom", 2), ("vace", 1), ("inserted", 1),
                                             ("inserted_one_way", 1)])
def test_uncond_alone_equals_uncond_batched_with_cond(host, kind, map_blocks, order):
    # VACE adds its hints after block 0, so the map is read at block 1 there, where they count.
    map_block = int(kind == "vace")
    layers = map_block + map_blocks + 1  # the map's blocks, then a block that uses it
    patched = _patched(host, kind, _region(host, map_block=map_block, map_blocks=map_blocks), layers)
    m, pairs = alone_vs_batched(patched, uncond_first=order == "uncond_first")
    _sample(m, kind)
    assert len(pairs) == 3
    uncond, cond = max_diff(pairs, 1), max_diff(pairs, 0)
    print(f"{kind} map_blocks {map_blocks} {order}: max |uncond alone - batched| = {uncond:.2e}, cond {cond:.2e}")
    assert uncond <= 1e-6 and cond <= 1e-6, (uncond, cond)
    # ERAE acts on the uncond rows: without it they differ.
    plain, plain_pairs = alone_vs_batched(_patched(host, kind, None, layers), uncond_first=False)
    _sample(plain, kind)
    assert max(float((p[1][1] - b[1][1]).abs().max()) for p, b in zip(plain_pairs, pairs)) > 1e-3


def test_uncond_first_probes_once_per_call_and_cond_first_reuses_the_cached_maps(host, monkeypatch):
    """Map blocks read per model evaluation: uncond first, the probe's blocks (stopped after the last map
    block) plus the cond call's; cond first, the cond call's only (the uncond call reuses them)."""
    from customvideox.cvx_host import frames_patch as fp
    calls: list[int] = []
    real = fp.entity_attention
    monkeypatch.setattr(fp, "entity_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    blocks: list[int] = []  # the block of every attention call that ran, probes included
    real_call = fp.FramesAttentionOverride.__call__

    def counting(self, func, *args, **kwargs):
        blocks.append(int(kwargs["transformer_options"].get("block_index", -1)))
        return real_call(self, func, *args, **kwargs)

    monkeypatch.setattr(fp.FramesAttentionOverride, "__call__", counting)
    patched = _patched(host, "phantom", _region(host, map_blocks=2), layers=4)
    for uncond_first, maps_per_step in ((True, 2 + 2 + 2), (False, 2 + 2)):  # alone (probe?, cond) + batched
        calls.clear()
        m, pairs = alone_vs_batched(patched, uncond_first)
        _sample(m, "phantom")
        assert len(calls) == maps_per_step * 3, (uncond_first, len(calls))
        assert max_diff(pairs, 1) <= 1e-6
    # The probe stops after the map blocks: 2 of the 4 blocks (self- and cross-attention in each), then the
    # uncond call's own 4 blocks, the cond call's and the batched call's.
    blocks.clear()
    m, _ = alone_vs_batched(patched, True)
    _sample(m, "phantom", steps=1)
    assert blocks == [0, 0, 1, 1] + [b for b in range(4) for _ in (0, 1)] * 3, blocks


# --- map_blocks: the map averaged over several blocks, against diffusers ----------------------------------


def test_phantom_erae_map_averaged_over_blocks_equals_oracle(host):
    """Blocks 0 and 1 give the map (the entity attention averaged over both, then normalised), blocks 2 and 3
    use it; diffusers' Wan with the map computed by hand from its own cross-attention."""
    sd = tw.build_wan_state_dict(seed=4, layers=4)
    x, ref, ctx, t = inputs(21, refs=1, leading=False)
    region = _region(host, map_blocks=2, lam=4.0)
    ours = host_run(host, sd, x, t, ctx, tdc=ref, opts={"cond_or_uncond": [0, 1]}, strength=1.5, region=region)
    video = T * HW
    spec = Spec(video + HW, slice(video, None), slice(0, video), [math.log(1.5)] * 2, range(4), lam=4.0,
                auto=(0, (1, 3), 2))
    want = diffusers_run(sd, torch.cat([x, ref], 2), t, ctx, spec, layers=4)[:, :, :T]
    assert spec.region_map is not None and float(spec.region_map.max()) > 0.5
    print(f"map_blocks 2 vs oracle: max |diff| = {float((ours - want).abs().max()):.2e}")
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    # Averaging is not reading block 0 alone: the one-block map gives another output.
    one = Spec(video + HW, slice(video, None), slice(0, video), [math.log(1.5)] * 2, range(4), lam=4.0,
               auto=(0, (1, 3)))
    assert (diffusers_run(sd, torch.cat([x, ref], 2), t, ctx, one, layers=4)[:, :, :T] - want).abs().max() > 10 * ATOL


# --- two references inserted into one Wan T2V model ---------------------------------------------------------


class TwoReferences(Spec):
    """Per reference: its key columns, per-row bias, block range (off, -inf, outside it) and ERAE map."""

    def __init__(self, tokens: int, video_rows: slice, refs: list[tuple[slice, list[float], range, torch.Tensor | None]],
                 lam: float):
        super().__init__(tokens, slice(0, 0), video_rows, [], range(0))
        self.refs, self.lam = refs, lam

    def dense(self, block: int, batch: int) -> torch.Tensor:
        bias = torch.zeros(batch, 1, self.tokens, self.tokens)
        for cols, row_bias, blocks, region_map in self.refs:
            if block not in blocks:
                bias[:, 0, :, cols] = -math.inf
                continue
            for b in range(batch):
                bias[b, 0, :, cols] += row_bias[b]
                if region_map is not None:
                    bias[b, 0, self.video_rows, cols] += self.lam * region_map[b][:, None]
        return bias


def _stacked(host, sd, raws: list[torch.Tensor], settings: list[dict]):
    import comfy.sd
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    for raw, kw in zip(raws, settings):
        model = patching.apply_reference(model, raw, family="Wan2.1", **kw)
    return model


def test_two_stacked_references_each_get_their_own_biases_like_the_dense_oracle(host):
    """Reference A: strength 2, off for uncond. Reference B: strength 0.6 from block 1 (off in block 0), an
    ERAE mask with λ 1.5. Diffusers fed [A | B | video] with that bias written out per column block, both references at
    temporal index -1 (they share one slot)."""
    import comfy.latent_formats
    import comfy.model_management
    from customvideox.cvx_core import entity_region as er
    sd = tw.build_wan_state_dict(seed=6)
    x, ref, ctx, t = inputs(22, refs=2, leading=True)
    raws = [ref[:1, :, :1], ref[1:, :, 1:]]
    mask = torch.rand(T, H // 2, W // 2, generator=torch.Generator().manual_seed(23))
    region = er.EntityRegion(mode="mask", mask=mask, lam=1.5, start_percent=0.0)
    model = _stacked(host, sd, raws, [dict(strength=2.0, apply_to_uncond=False),
                                      dict(strength=0.6, block_start=1, region=region)])
    comfy.model_management.load_models_gpu([model])
    to = dict(model.model_options["transformer_options"], wrappers=model.wrappers, cond_or_uncond=[0, 1])
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, ctx, transformer_options=to)
    fmt = comfy.latent_formats.Wan21()
    a, b = (fmt.process_in(r).expand(2, -1, -1, -1, -1) for r in raws)
    video = T * HW
    region_map = mask.flatten()[None].expand(2, -1)
    spec = TwoReferences(video + 2 * HW, slice(2 * HW, None), [
        (slice(0, HW), [math.log(2.0), -math.inf], range(2), None),
        (slice(HW, 2 * HW), [math.log(0.6)] * 2, range(1, 2), region_map)], lam=1.5)
    shared_slot = [-1, -1, *range(T)]  # every reference at one temporal slot, before the video
    want = diffusers_run(sd, torch.cat([a, b, x], 2), t, ctx, spec, frame_index=shared_slot)[:, :, 2:]
    assert ours.shape == x.shape
    print(f"two stacked references vs oracle: max |diff| = {float((ours - want).abs().max()):.2e}")
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    # The columns are told apart: the same biases on swapped references give another output.
    swapped = diffusers_run(sd, torch.cat([b, a, x], 2), t, ctx, spec, frame_index=shared_slot)[:, :, 2:]
    assert (swapped - want).abs().max() > 1e-2


def test_two_stacked_references_workflow_decodes_an_mp4(host, wan_files, monkeypatch):
    """The shipped Wan T2V graph with a second reference (its own image, encode, strength and ERAE mask)
    chained after the first CustomVideoXApply, through the real executor."""
    from customvideox.cvx_host import wan as wan
    seen: list[int] = []
    real = wan.Wan.check_call
    monkeypatch.setattr(wan.Wan, "check_call", lambda self, refs, x: seen.append(len(refs)) or real(self, refs, x))
    prompt = tiny_t2v(wan_files)
    apply, image, shift = (nodes_of(prompt, c) for c in ("CustomVideoXApply", "CVXTestImage", "ModelSamplingSD3"))
    encode = nodes_of(prompt, "CustomVideoXReferenceEncode")
    prompt["40"] = {"class_type": "CVXTestImage", "inputs": {**prompt[image]["inputs"], "seed": 77}}
    prompt["41"] = {"class_type": "CustomVideoXReferenceEncode", "inputs": {**prompt[encode]["inputs"], "image": ["40", 0]}}
    prompt["42"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE["width"], "height": SIZE["height"]}}
    prompt["43"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 24, "height": 16}}
    prompt["44"] = {"class_type": "MaskComposite", "inputs": {"destination": ["42", 0], "source": ["43", 0], "x": 12,
                                                              "y": 8, "operation": "add"}}
    prompt["45"] = {"class_type": "CustomVideoXEntityRegion", "inputs": {
        "mode": "mask", "lam": 2.0, "map_block": 0, "refine": "soft", "top_k": 0.25, "smooth": 0, "mask": ["44", 0],
        "start_percent": 0.0}}
    second = {**prompt[apply]["inputs"], "model": [apply, 0], "reference": ["41", 0], "strength": 0.5,
              "region": ["45", 0]}
    second.pop("schedule")
    prompt["46"] = {"class_type": "CustomVideoXApply", "inputs": second}
    prompt[shift]["inputs"]["model"] = ["46", 0]
    sampler, decode = nodes_of(prompt, "KSampler"), nodes_of(prompt, "VAEDecode")
    result = host.run(prompt, capture=[sampler, decode])
    latent = result.output(sampler)["samples"]
    assert tuple(latent.shape) == LATENT and torch.isfinite(latent).all()  # neither reference frame in the output
    assert seen and set(seen) == {2}  # every model call carried both references
    assert tuple(result.output(decode).shape) == (SIZE["length"], SIZE["height"], SIZE["width"], 3)
    (mp4,) = [f for f in result.files if f.suffix == ".mp4"]
    assert decode_mp4(mp4) == (SIZE["length"], SIZE["width"], SIZE["height"], "h264")
    # The second reference acts: the same graph without it samples another latent.
    single, s_sampler = latent_only(copy.deepcopy(prompt))
    single[nodes_of(single, "ModelSamplingSD3")]["inputs"]["model"] = [apply, 0]
    for nid in ("40", "41", "42", "43", "44", "45", "46"):
        del single[nid]
    one = host.run(single, capture=[s_sampler]).output(s_sampler)["samples"]
    assert (one - latent).abs().max() > 1e-2
