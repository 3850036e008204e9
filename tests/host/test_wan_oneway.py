"""CustomVideoXApply on Wan T2V: one-way (cached) references, the reference's temporal RoPE slot, and its timestep,
against diffusers' WanTransformer3DModel.

The peer is diffusers' transformer fed ``[reference | video]`` concatenated in time, with an attention processor
written here: plain softmax attention with a dense additive bias ``[B, 1, S, S]`` spelled out by hand, and RoPE
built by hand from diffusers' own frequency tables at positions written out here (the reference's temporal slot,
the video at 0..T-1). One-way: each reference's query rows see only its own keys (-inf on the video's and other
references') and read the
positive prompt (row 0) in the cross-attention; video rows get the bias on the reference columns. The host's
native WanModel with the node must give the same video output.
"""

from __future__ import annotations

import math

import pytest
import tiny_wan as tw
import torch
from harness import patching
from test_wan_oracle import projections

pytestmark = pytest.mark.usefixtures("one_thread")
T, H, W = 3, 8, 10  # latent frames and size: 4 x 5 tokens per frame
HW = (H // 2) * (W // 2)
ATOL = 5e-5  # host vs diffusers without any patch: ~2e-5 on outputs of magnitude ~4 (fp32 round-off)
# Temporal slot of the reference for each reference_rope, the video at 0..T-1 (hand-written, not the pack's).
SLOTS = {"negative": -1, "shift": -1, "none": 0, "after": T}


@pytest.fixture(scope="module")
def wan_sd() -> dict:
    return tw.build_wan_state_dict(seed=7)


class Oracle:
    """The dense rule of one run: token order ``[refs | video]``, every reference one frame at ``slot``."""

    def __init__(self, refs: int, slot: int, one_way: bool, col_bias: list[list[float]], blocks: range,
                 region: torch.Tensor | None = None, lam: float = 0.0, auto: tuple[int, tuple[int, ...]] | None = None):
        self.refs, self.slot, self.one_way, self.auto = refs, slot, one_way, auto  # auto: (map_block, entity)
        self.col_bias = col_bias  # [B][refs] bias on each reference's columns from video (and two-way ref) rows
        self.blocks, self.region, self.lam = blocks, region, lam  # region: [B, video tokens] ERAE map or None
        self.r, self.tokens = refs * HW, (refs + T) * HW

    def positions(self) -> torch.Tensor:
        """``[S, 3]`` (t, h, w) integer positions, shifted so that the smallest temporal index is 0 (RoPE is
        relative in self-attention: a common shift changes nothing)."""
        t = torch.tensor([self.slot] * self.refs + list(range(T)))
        shift = -min(int(t.min()), 0)
        hh, ww = torch.meshgrid(torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
        return torch.stack([(t + shift).repeat_interleave(HW), hh.flatten().repeat(len(t)),
                            ww.flatten().repeat(len(t))], dim=1)

    def dense(self, block: int, batch: int) -> torch.Tensor:
        bias = torch.zeros(batch, 1, self.tokens, self.tokens)
        for b in range(batch):
            rows = slice(self.r, None) if self.one_way else slice(None)
            for j in range(self.refs):
                cols = slice(j * HW, (j + 1) * HW)
                bias[b, 0, rows, cols] += self.col_bias[b][j] if block in self.blocks else -math.inf
                if self.region is not None and block in self.blocks:
                    bias[b, 0, self.r:, cols] += self.lam * self.region[b][:, None]
            if self.one_way:  # each reference sees only its own tokens (its own stream)
                own = torch.block_diag(*[torch.ones(HW, HW)] * self.refs).bool()
                bias[b, 0, :self.r] = -math.inf
                bias[b, 0, :self.r, :self.r][own] = 0.0
        return bias


class Processor:
    def __init__(self, block: int, oracle: Oracle, cos: torch.Tensor, sin: torch.Tensor):
        self.block, self.oracle, self.cos, self.sin = block, oracle, cos, sin

    def rope(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, H, D]; interleaved channel pairs
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = self.cos[None, :, None, 0::2], self.sin[None, :, None, 0::2]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        cross = encoder_hidden_states is not None
        q, k, v = projections(attn, hidden_states, encoder_hidden_states, self.rope)
        if cross and self.oracle.auto and self.block == self.oracle.auto[0]:
            self.entity_map(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                            + (0 if cross else self.oracle.dense(self.block, q.shape[0])), dim=-1) @ v
        if cross and self.oracle.one_way:  # the reference's own stream reads the positive prompt (row 0)
            r = self.oracle.r
            out[:, :, :r] = torch.softmax(q[:, :, :r] @ k[:1].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v[:1]
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


    def entity_map(self, logits: torch.Tensor) -> None:
        # The cond row's (0) video rows' attention to the entity's text tokens: softmax over the text, summed
        # over the entity, mean over heads; per frame the excess over the frame's mean relative to that mean,
        # clamped to 0..1 (the default "relative" normalisation); it serves every row.
        o = self.oracle
        p = torch.softmax(logits[0, :, o.r:], dim=-1)[..., list(o.auto[1])].sum(-1)
        frames = p.mean(0).view(-1, HW)
        mean = frames.mean(-1, keepdim=True)
        o.region = ((frames - mean) / mean).clamp(0, 1).flatten()[None].expand(logits.shape[0], -1)


def diffusers_run(sd: dict, latent: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, oracle: Oracle) -> torch.Tensor:
    peer = tw.build_diffusers_wan(sd)
    pos = oracle.positions()
    dims = [peer.rope.t_dim, peer.rope.h_dim, peer.rope.w_dim]
    tables = [tab.split(dims, dim=1) for tab in (peer.rope.freqs_cos, peer.rope.freqs_sin)]
    cos, sin = (torch.cat([part[pos[:, a]] for a, part in enumerate(tab)], dim=1).float() for tab in tables)
    for i, block in enumerate(peer.blocks):
        block.attn1.set_processor(Processor(i, oracle, cos, sin))
        block.attn2.set_processor(Processor(i, oracle, cos, sin))
    with torch.no_grad():
        return peer(latent, t, ctx, return_dict=False)[0][:, :, oracle.refs:]


def apply_model(host, sd: dict, refs: list[torch.Tensor], **node_kw):
    """The host's Wan with one CustomVideoXApply (the node's own execute) per reference, chained; one_way
    unless ``attention_mode`` says otherwise (a list value: one per reference)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    for i, raw in enumerate(refs):
        kw = {"attention_mode": "one_way", **{k: (v[i] if isinstance(v, list) else v) for k, v in node_kw.items()}}
        model = patching.apply_reference(model, raw, family="Wan2.1", **kw)
    return model


def forward(model, x, t, ctx, opts=None) -> torch.Tensor:
    return patching.forward(model, x, t, ctx, **(opts or {}))


def inputs(seed: int, refs: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, T, H, W, generator=g)
    raw = [torch.randn(1, 16, 1, H, W, generator=g) for _ in range(refs)]
    ctx = torch.randn(2, 12, 4096, generator=g)
    return x, raw, ctx, torch.tensor([600.0, 600.0])


def processed(raw: torch.Tensor) -> torch.Tensor:
    import comfy.latent_formats

    return comfy.latent_formats.Wan21().process_in(raw)  # the host's latent format, as the model sees it


def test_one_way_equals_the_dense_oracle_with_uncond_off_block_range_and_region(host, wan_sd):
    """Strength 2.5 on the cond row, off on the uncond row (apply_to_uncond off), off in block 0, an ERAE mask;
    the uncond row has its own prompt while the reference stream reads the positive one."""
    from customvideox.cvx_core import entity_region as er
    x, raw, ctx, t = inputs(1)
    region = er.EntityRegion(mode="mask", mask=torch.rand(T, H // 2, W // 2, generator=torch.Generator().manual_seed(4)),
                             lam=1.5, start_percent=0.0)
    model = apply_model(host, wan_sd, raw, strength=2.5, block_start=1, apply_to_uncond=False, region=region)
    ours = forward(model, x, t, ctx, {"cond_or_uncond": [0, 1]})
    region_map = region.mask.flatten()[None].repeat(2, 1)
    region_map[1] = 0
    oracle = Oracle(1, -1, True, [[math.log(2.5)], [-math.inf]], range(1, 2), region=region_map, lam=1.5)
    want = diffusers_run(wan_sd, torch.cat([processed(raw[0]).expand(2, -1, -1, -1, -1), x], 2), t, ctx, oracle)
    assert ours.shape == x.shape
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    two_way = forward(apply_model(host, wan_sd, raw, strength=2.5, block_start=1, apply_to_uncond=False,
                                  region=region, attention_mode="two_way"), x, t, ctx, {"cond_or_uncond": [0, 1]})
    assert (two_way[:1] - ours[:1]).abs().max() > 1e-3  # one-way is not two-way at this size


@pytest.mark.parametrize("mode", ["one_way", "two_way"])
@pytest.mark.parametrize("rope", ["negative", "shift", "none", "after"])
def test_reference_rope_slot_equals_the_oracle_at_hand_built_positions(host, wan_sd, mode, rope):
    x, raw, ctx, t = inputs(2)
    ours = forward(apply_model(host, wan_sd, raw, strength=1.5, attention_mode=mode, reference_rope=rope), x, t, ctx)
    oracle = Oracle(1, SLOTS[rope], mode == "one_way", [[math.log(1.5)]] * 2, range(2))
    want = diffusers_run(wan_sd, torch.cat([processed(raw[0]).expand(2, -1, -1, -1, -1), x], 2), t, ctx, oracle)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    if rope != "negative":  # the slot really moves the reference: another slot is another output
        other = Oracle(1, SLOTS["negative"], mode == "one_way", [[math.log(1.5)]] * 2, range(2))
        moved = diffusers_run(wan_sd, torch.cat([processed(raw[0]).expand(2, -1, -1, -1, -1), x], 2), t, ctx, other)
        assert (rope == "shift") == bool(torch.allclose(ours, moved, atol=ATOL))


def test_one_way_off_for_every_row_is_the_plain_model_without_the_reference_pass(host, wan_sd, monkeypatch):
    """Strength 0 (or TAB off at this step): the reference's own pass is not run, the output is the plain model's."""
    from customvideox.cvx_host import wan_reference_stream as stream
    runs = []
    real = stream.reference_stream_kv
    monkeypatch.setattr(stream, "reference_stream_kv", lambda *a: runs.append(1) or real(*a))
    x, raw, ctx, t = inputs(9)
    import comfy.sd

    plain = forward(comfy.sd.load_diffusion_model_state_dict(dict(wan_sd)), x, t, ctx)
    off = forward(apply_model(host, wan_sd, raw, strength=0.0), x, t, ctx)
    assert torch.equal(off, plain) and runs == []
    on = forward(apply_model(host, wan_sd, raw, strength=1.0), x, t, ctx)
    assert runs == [1] and (on - plain).abs().max() > 1e-2


def test_one_way_erae_auto_map_from_the_videos_cross_attention_equals_the_oracle(host, wan_sd):
    from customvideox.cvx_core import entity_region as er
    x, raw, ctx, t = inputs(8)
    region = er.EntityRegion(mode="auto", entity_idx=(1, 3), map_block=0, lam=3.0, start_percent=0.0)
    ours = forward(apply_model(host, wan_sd, raw, strength=1.5, region=region), x, t, ctx, {"cond_or_uncond": [0, 1]})
    oracle = Oracle(1, -1, True, [[math.log(1.5)]] * 2, range(2), lam=3.0, auto=(0, (1, 3)))
    want = diffusers_run(wan_sd, torch.cat([processed(raw[0]).expand(2, -1, -1, -1, -1), x], 2), t, ctx, oracle)
    assert oracle.region is not None and float(oracle.region.max()) > 0
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


@pytest.mark.parametrize("mode", ["one_way", "two_way"])
def test_two_stacked_references_share_the_slot_after_the_video(host, wan_sd, mode):
    x, raw, ctx, t = inputs(3, refs=2)
    model = apply_model(host, wan_sd, raw, strength=[2.0, 0.5], reference_rope="after", attention_mode=mode)
    ours = forward(model, x, t, ctx)
    oracle = Oracle(2, T, mode == "one_way", [[math.log(2.0), math.log(0.5)]] * 2, range(2))
    refs = torch.cat([processed(r) for r in raw], 2).expand(2, -1, -1, -1, -1)
    want = diffusers_run(wan_sd, torch.cat([refs, x], 2), t, ctx, oracle)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_one_way_clean_is_the_reference_at_timestep_zero(host, wan_sd):
    """reference_timestep clean: the reference's tokens are modulated at t=0 (a per-token timestep in diffusers,
    as Wan 2.2 TI2V takes it), the video's at the sampling timestep."""
    x, raw, ctx, t = inputs(4)
    ours = forward(apply_model(host, wan_sd, raw, strength=0.7, reference_timestep="clean"), x, t, ctx)
    oracle = Oracle(1, -1, True, [[math.log(0.7)]] * 2, range(2))
    per_token = torch.cat([torch.zeros(2, HW), t[:, None].expand(2, T * HW)], dim=1)
    want = diffusers_run(wan_sd, torch.cat([processed(raw[0]).expand(2, -1, -1, -1, -1), x], 2), per_token, ctx,
                         oracle)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    sampling = forward(apply_model(host, wan_sd, raw, strength=0.7), x, t, ctx)
    assert (sampling - ours).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["one_way", "two_way"])
def test_noised_is_the_reference_noised_by_rectified_flow_to_the_calls_sigma(host, wan_sd, mode):
    """noised: (1 - σ)·x0 + σ·ε with the fixed noise (a CPU normal draw of seed 0, shaped like the references)."""
    x, raw, ctx, t = inputs(5)
    sigma = 0.6
    opts = {"sigmas": torch.tensor([sigma, sigma])}
    ours = forward(apply_model(host, wan_sd, raw, strength=1.5, attention_mode=mode, reference_timestep="noised"),
                   x, t, ctx, opts)
    eps = torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(0))
    ref = (1 - sigma) * processed(raw[0]) + sigma * eps
    oracle = Oracle(1, -1, mode == "one_way", [[math.log(1.5)]] * 2, range(2))
    want = diffusers_run(wan_sd, torch.cat([ref.expand(2, -1, -1, -1, -1), x], 2), t, ctx, oracle)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def _sample(host, model, steps: int = 3, callback=None) -> torch.Tensor:
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, T, H, W, generator=g)
    pos, neg = torch.randn(1, 5, 4096, generator=g), torch.randn(1, 5, 4096, generator=g)
    return comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", [[pos, {}]], [[neg, {}]],
                               torch.zeros_like(noise), disable_pbar=True, seed=0, callback=callback)


@pytest.mark.host
def test_the_reference_stream_runs_once_per_run_clean_once_per_step_sampling_and_leaves_nothing(host, wan_sd,
                                                                                                 monkeypatch):
    from customvideox.cvx_host import options as options
    from customvideox.cvx_host import wan_reference_stream as stream
    runs: list[float] = []
    real = stream.reference_stream_kv

    def counting(dm, latent, text, slot, timestep, opts):
        kv = real(dm, latent, text, slot, timestep, opts)
        assert len(kv) == len(dm.blocks) and kv[0][0].shape[2] == HW  # per block, the reference's own K
        runs.append(float(timestep))
        return kv

    monkeypatch.setattr(stream, "reference_stream_kv", counting)
    _, raw, _, _ = inputs(6)
    clean = apply_model(host, wan_sd, raw, reference_timestep="clean")
    out = _sample(host, clean)
    assert torch.isfinite(out).all() and runs == [0.0]  # 3 steps x (cond + uncond), one stream
    assert options.RUN_KEY not in clean.model_options["transformer_options"]
    runs.clear()
    _sample(host, clean)
    assert runs == [0.0]  # a new run computes its own: nothing was kept from the last one
    runs.clear()
    _sample(host, apply_model(host, wan_sd, raw))
    assert len(runs) == 3 and runs[0] > runs[1] > runs[2] > 0  # sampling: one per step, cond and uncond share it

    class Stop(Exception):
        pass

    def interrupt(step, *_):
        if step == 1:
            raise Stop

    runs.clear()
    with pytest.raises(Stop):
        _sample(host, clean, callback=interrupt)
    assert runs == [0.0] and options.RUN_KEY not in clean.model_options["transformer_options"]


def test_wan_refuses_what_it_cannot_honour_and_cogvideox_refuses_after(host, wan_sd, tiny_models):
    import comfy.sd

    _, raw, _, _ = inputs(7)
    with pytest.raises(ValueError, match="CustomVideoXApply reference_timestep: 'clean' needs attention_mode "
                                         "'one_way'"):
        apply_model(host, wan_sd, raw, attention_mode="two_way", reference_timestep="clean")
    model = apply_model(host, wan_sd, raw)
    from customvideox.nodes import types as types
    enc = types.EncodedReference(latent=raw[0], width=W * 8, height=H * 8, family="Wan2.1")
    apply = host.node_classes["CustomVideoXApply"]
    args = dict(strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True)
    with pytest.raises(ValueError, match="CustomVideoXApply attention_mode: this node has 'two_way' but the MODEL "
                                         "already has a reference with 'one_way'"):
        apply.execute(model=model, reference=enc, attention_mode="two_way", reference_rope="negative", **args)
    with pytest.raises(ValueError, match="CustomVideoXApply reference_rope: this node has 'after'"):
        apply.execute(model=model, reference=enc, attention_mode="one_way", reference_rope="after", **args)
    vace = comfy.sd.load_diffusion_model_state_dict(tw.build_wan_state_dict(seed=7, vace=True))
    with pytest.raises(ValueError, match="CustomVideoXApply attention_mode: 'one_way' on a Wan VACE model"):
        apply.execute(model=vace, reference=enc, attention_mode="one_way", reference_rope="negative", **args)
    cog = comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict("native_1_0"))
    cog_ref = types.EncodedReference(latent=torch.randn(1, 16, 1, H, W), width=W * 8, height=H * 8, family="CogVideoX")
    with pytest.raises(ValueError, match="CustomVideoXApply reference_rope: 'after' on a CogVideoX model"):
        apply.execute(model=cog, reference=cog_ref, attention_mode="two_way", reference_rope="after", **args)
