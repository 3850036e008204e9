"""TAB/ERAE on Wan's own reference frames (Phantom, VACE) against diffusers' WanTransformer3DModel.

The peer is diffusers' transformer fed the reference frames concatenated in time, with an attention
processor written here: plain softmax attention with a dense additive bias ``[B, 1, S, S]`` spelled
out by hand on the reference key columns (and the ERAE map, computed by hand from the text
cross-attention). The host's native WanModel with the pack's node must give the same output.
"""

from __future__ import annotations

import math

import pytest
import tiny_wan as tw
import torch
from harness import patching

pytestmark = pytest.mark.usefixtures("one_thread")
NODE = "CustomVideoXReferenceFramesBias"
T, H, W = 3, 8, 10  # latent frames and size: 4 x 5 tokens per frame
HW = (H // 2) * (W // 2)
ATOL = 5e-5  # host vs diffusers without any patch: ~2e-5 on outputs of magnitude ~4 (fp32 round-off)


@pytest.fixture(scope="module")
def wan_sd() -> dict:
    return tw.build_wan_state_dict(seed=3)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1) by the angle whose cos/sin diffusers' RoPE gives."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


class Spec:
    """Where the reference columns are, the biases, and the ERAE settings, as plain numbers."""

    def __init__(self, tokens: int, ref_cols: slice, video_rows: slice, col_bias: list[float], blocks: range,
                 lam: float = 0.0, region_map: torch.Tensor | None = None, auto: tuple | None = None,
                 col_extra: torch.Tensor | None = None):
        self.tokens, self.ref_cols, self.video_rows = tokens, ref_cols, video_rows
        self.col_extra = col_extra  # [B, S]: a further bias per key column (every query row), or None
        self.col_bias, self.blocks, self.lam = col_bias, blocks, lam
        self.region_map = region_map  # [B, Sv] or None
        self.auto = auto  # (map_block, entity positions[, map_blocks: the map averaged over them]) or None
        self.attention_sum: torch.Tensor | None = None  # the entity attention summed over the map blocks so far

    @property
    def last_map_block(self) -> int:
        return self.auto[0] + (self.auto[2] if len(self.auto) > 2 else 1) - 1

    def dense(self, block: int, batch: int) -> torch.Tensor:
        bias = torch.zeros(batch, 1, self.tokens, self.tokens)
        if block not in self.blocks:
            return bias
        for b in range(batch):
            bias[b, 0, :, self.ref_cols] += self.col_bias[b]
            if self.col_extra is not None:
                bias[b, 0] += self.col_extra[b]
            if self.region_map is not None and not (self.auto and block <= self.last_map_block):
                bias[b, 0, self.video_rows, self.ref_cols] += self.lam * self.region_map[b][:, None]
        return bias


def projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                rope_fn=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, S, D]`` of one diffusers Wan attention call, as its own processor computes them
    (``rope_fn`` rotates the self-attention's q and k)."""
    cross = encoder_hidden_states is not None
    src = encoder_hidden_states if cross else hidden_states
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(src)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(src).unflatten(2, (attn.heads, -1))
    if not cross and rope_fn is not None:
        q, k = rope_fn(q), rope_fn(k)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


class DenseBiasProcessor:
    def __init__(self, block: int, spec: Spec):
        self.block, self.spec = block, spec

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        cross = encoder_hidden_states is not None
        q, k, v = projections(attn, hidden_states, encoder_hidden_states,
                              None if rotary_emb is None else (lambda t: rope(t, *rotary_emb)))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if cross:
            if self.spec.auto and self.spec.auto[0] <= self.block <= self.spec.last_map_block:
                self._entity_map(logits)
        else:
            logits = logits + self.spec.dense(self.block, q.shape[0])
        out = torch.softmax(logits, dim=-1) @ v
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))

    def _entity_map(self, logits: torch.Tensor) -> None:
        # Video rows' attention to the entity's text tokens: softmax over the text, summed over the
        # entity, mean over heads, averaged over the map blocks, then per frame the excess over the frame's
        # mean relative to that mean, clamped to 0..1 (the default "relative" normalisation); the cond row (0)
        # gives the map for all rows.
        p = torch.softmax(logits[0, :, self.spec.video_rows], dim=-1)[..., list(self.spec.auto[1])].sum(-1).mean(0)
        self.spec.attention_sum = p if self.block == self.spec.auto[0] else self.spec.attention_sum + p
        if self.block < self.spec.last_map_block:
            return
        frames = (self.spec.attention_sum / (self.spec.last_map_block - self.spec.auto[0] + 1)).view(-1, HW)
        mean = frames.mean(-1, keepdim=True)
        m = ((frames - mean) / mean).clamp(0, 1).flatten()
        self.spec.region_map = m[None].expand(logits.shape[0], -1)


def rope_at_frames(peer, frame_index: list[int]):
    """A ``peer.rope.forward`` that gives latent frame i the temporal index ``frame_index[i]`` (diffusers'
    own frequency tables; indices shifted to start at 0: RoPE in self-attention is relative)."""
    shift = -min(0, min(frame_index))
    t = torch.tensor(frame_index) + shift

    def forward(hidden_states: torch.Tensor):
        _, _, f, h, w = hidden_states.shape
        assert f == len(frame_index)
        ph, pw = h // 2, w // 2
        dims = [peer.rope.t_dim, peer.rope.h_dim, peer.rope.w_dim]
        out = []
        for table in (peer.rope.freqs_cos, peer.rope.freqs_sin):
            tf, th, tw_ = table.split(dims, dim=1)
            parts = [tf[t].view(f, 1, 1, -1).expand(f, ph, pw, -1), th[:ph].view(1, ph, 1, -1).expand(f, ph, pw, -1),
                     tw_[:pw].view(1, 1, pw, -1).expand(f, ph, pw, -1)]
            out.append(torch.cat(parts, dim=-1).reshape(1, f * ph * pw, 1, -1))
        return tuple(out)
    return forward


def diffusers_run(sd: dict, latent: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, spec: Spec,
                  frame_index: list[int] | None = None, **config: int) -> torch.Tensor:
    """``frame_index``: the temporal RoPE index of each latent frame (default 0, 1, 2, ...)."""
    peer = tw.build_diffusers_wan(sd, **config)
    if frame_index is not None:
        peer.rope.forward = rope_at_frames(peer, frame_index)
    for i, block in enumerate(peer.blocks):
        block.attn1.set_processor(DenseBiasProcessor(i, spec))
        block.attn2.set_processor(DenseBiasProcessor(i, spec))
    with torch.no_grad():
        return peer(latent, t, ctx, return_dict=False)[0]


def host_run(host, sd: dict, x, t, ctx, tdc=None, opts=None, **node_kw) -> torch.Tensor:
    import comfy.model_management
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    if node_kw:
        args = dict(strength=1.0, leading_frames=0, block_start=0, block_end=-1, apply_to_uncond=True)
        args.update(node_kw)
        model = host.node_classes[NODE].execute(model=model, **args).result[0]
    comfy.model_management.load_models_gpu([model])
    to = dict(model.model_options["transformer_options"], wrappers=model.wrappers, **(opts or {}))
    with torch.no_grad():
        return model.model.diffusion_model(x, t, ctx, time_dim_concat=tdc, transformer_options=to)


def inputs(seed: int, refs: int, leading: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, T, H, W, generator=g)
    ref = torch.randn(2, 16, refs, H, W, generator=g)
    ctx = torch.randn(2, 12, 4096, generator=g)
    t = torch.tensor([600.0, 600.0])
    return x, ref, ctx, t


def test_phantom_strength_equals_dense_bias_oracle(host, wan_sd):
    x, ref, ctx, t = inputs(0, refs=2, leading=False)
    ours = host_run(host, wan_sd, x, t, ctx, tdc=ref, strength=2.5)
    video = T * HW
    spec = Spec(video + 2 * HW, slice(video, None), slice(0, video), [math.log(2.5)] * 2, range(2))
    want = diffusers_run(wan_sd, torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert ours.shape == x.shape
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    plain = host_run(host, wan_sd, x, t, ctx, tdc=ref)
    assert (ours - plain).abs().max() > 1e-2  # the bias is not a no-op at this size


def test_phantom_tab_schedule_uncond_and_block_range_equal_oracle(host, wan_sd):
    from customvideox.cvx_core import tab_schedule as tab
    x, ref, ctx, t = inputs(1, refs=1, leading=False)
    sample_sigmas = torch.tensor([1.0, 0.8, 0.6, 0.3, 0.0])
    opts = {"sigmas": torch.tensor([0.7, 0.7]), "sample_sigmas": sample_sigmas, "cond_or_uncond": [0, 1]}
    schedule = tab.TABSchedule(curve="parabolic", b_min=-0.5, b_max=1.5)
    ours = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=0.8, schedule=schedule,
                    block_start=1, apply_to_uncond=False)
    # The model is called at 1.0, 0.8, 0.6, 0.3 (the schedule ends in 0): TAB "steps" progress puts the first
    # call at 0 and the last at 1, so 0.7, between calls 1 (0.8) and 2 (0.6), is (1 + log(0.8/0.7)/log(0.8/0.6)) / 3.
    tau = (1 + math.log(0.8 / 0.7) / math.log(0.8 / 0.6)) / 3
    b = math.log(0.8) - 0.5 + 2.0 * 4 * tau * (1 - tau)
    video = T * HW
    spec = Spec(video + HW, slice(video, None), slice(0, video), [b, 0.0], range(1, 2))
    want = diffusers_run(wan_sd, torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_vace_style_leading_frame_with_erae_mask_equals_oracle(host, wan_sd):
    from customvideox.cvx_core import entity_region as er
    x, ref, ctx, t = inputs(2, refs=1, leading=True)
    mask = torch.rand(T, H // 2, W // 2, generator=torch.Generator().manual_seed(5))  # already token-sized
    region = er.EntityRegion(mode="mask", mask=mask, lam=2.0, start_percent=0.0)
    latent = torch.cat([ref, x], 2)
    ours = host_run(host, wan_sd, latent, t, ctx, strength=0.5, leading_frames=1, region=region)
    video = T * HW
    spec = Spec(video + HW, slice(0, HW), slice(HW, None), [math.log(0.5)] * 2, range(2), lam=2.0,
                region_map=mask.flatten()[None].expand(2, -1))
    want = diffusers_run(wan_sd, latent, t, ctx, spec)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_phantom_erae_auto_map_from_cross_attention_equals_oracle(host, wan_sd):
    from customvideox.cvx_core import entity_region as er
    x, ref, ctx, t = inputs(3, refs=1, leading=False)
    region = er.EntityRegion(mode="auto", entity_idx=(1, 3), map_block=0, lam=3.0, start_percent=0.0)
    ours = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts={"cond_or_uncond": [0, 1]}, strength=1.5,
                    region=region)
    video = T * HW
    spec = Spec(video + HW, slice(video, None), slice(0, video), [math.log(1.5)] * 2, range(2), lam=3.0,
                auto=(0, (1, 3)))
    want = diffusers_run(wan_sd, torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert spec.region_map is not None
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_strength_one_is_the_unpatched_phantom_run_bit_for_bit(host, wan_sd):
    x, ref, ctx, t = inputs(4, refs=2, leading=False)
    opts = {"sigmas": torch.tensor([0.5, 0.5]), "sample_sigmas": torch.tensor([1.0, 0.5, 0.0]),
            "cond_or_uncond": [0, 1]}
    ours = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=1.0, block_start=1)
    plain = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts)
    assert torch.equal(ours, plain)


# --- the reference's background (subject mask on the reference images) ------------------------------
# A frame is 4 x 5 tokens = 64 x 80 pixels. The masks are drawn at twice that scale on a wider image
# (128 x 240): the host centre-crops the reference image to 128 x 160 (40 px off each side), so one
# token is a 32 x 32 pixel square starting at column 40.
MASK_H, MASK_W, CROP_X, TOKEN_PX = 128, 240, 40, 32


def paint(mask: torch.Tensor, row: int, col: int, rows_px: int = TOKEN_PX) -> None:
    """Fill the top ``rows_px`` pixel rows of token (row, col) of the cropped image."""
    y, x = row * TOKEN_PX, CROP_X + col * TOKEN_PX
    mask[y:y + rows_px, x:x + TOKEN_PX] = 1.0


def two_subject_masks() -> tuple[torch.Tensor, list[set[tuple[int, int]]]]:
    """Two masks and, written by hand, the tokens each one's subject covers (half a token or more)."""
    masks = torch.zeros(2, MASK_H, MASK_W)
    for r, c in ((1, 1), (1, 2), (2, 1), (2, 2)):
        paint(masks[0], r, c)
    paint(masks[0], 3, 2, rows_px=20)  # 62 % of the token: subject
    paint(masks[0], 0, 3, rows_px=12)  # 38 %: background
    masks[0, :, :CROP_X] = 1.0  # outside the host's crop: ignored
    masks[0, :, MASK_W - CROP_X:] = 1.0
    paint(masks[1], 0, 0)
    paint(masks[1], 3, 4)
    return masks, [{(1, 1), (1, 2), (2, 1), (2, 2), (3, 2)}, {(0, 0), (3, 4)}]


def background_columns(subjects: list[set], first_ref_col: int, tokens: int, bias: float,
                       rows: list[bool]) -> torch.Tensor:
    """``[B, S]``: ``bias`` on each reference frame's tokens outside its subject, on the biased rows."""
    out = torch.zeros(len(rows), tokens)
    for i, subject in enumerate(subjects):
        for r in range(H // 2):
            for c in range(W // 2):
                if (r, c) not in subject:
                    out[[b for b, on in enumerate(rows) if on], first_ref_col + i * HW + r * (W // 2) + c] = bias
    return out


def test_phantom_reference_mask_hides_the_background_like_the_oracle(host, wan_sd):
    x, ref, ctx, t = inputs(7, refs=2, leading=False)
    masks, subjects = two_subject_masks()
    ours = host_run(host, wan_sd, x, t, ctx, tdc=ref, strength=1.5, reference_mask=masks)  # default: hidden
    video = T * HW
    tokens = video + 2 * HW
    spec = Spec(tokens, slice(video, None), slice(0, video), [math.log(1.5)] * 2, range(2),
                col_extra=background_columns(subjects, video, tokens, -math.inf, [True, True]))
    want = diffusers_run(wan_sd, torch.cat([x, ref], 2), t, ctx, spec)[:, :, :T]
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()
    unmasked = host_run(host, wan_sd, x, t, ctx, tdc=ref, strength=1.5)
    assert (ours - unmasked).abs().max() > 1e-2  # hiding the background is not a no-op at this size


def test_vace_style_background_strength_with_erae_and_uncond_off_equals_oracle(host, wan_sd):
    from customvideox.cvx_core import entity_region as er
    x, ref, ctx, t = inputs(8, refs=1, leading=True)
    masks, subjects = two_subject_masks()
    region = er.EntityRegion(mode="mask", mask=torch.rand(T, H // 2, W // 2, generator=torch.Generator().manual_seed(9)),
                             lam=1.5, start_percent=0.0)
    latent = torch.cat([ref, x], 2)
    ours = host_run(host, wan_sd, latent, t, ctx, opts={"cond_or_uncond": [0, 1]}, strength=0.7, leading_frames=1,
                    region=region, apply_to_uncond=False, reference_mask=masks[:1], background_strength=0.3)
    video = T * HW
    tokens = video + HW
    rows = [True, False]
    region_map = region.mask.flatten()[None].expand(2, -1).clone()
    region_map[1] = 0  # the uncond row is left as the graph built it
    spec = Spec(tokens, slice(0, HW), slice(HW, None), [math.log(0.7), 0.0], range(2), lam=1.5,
                region_map=region_map, col_extra=background_columns(subjects[:1], 0, tokens, math.log(0.3), rows))
    want = diffusers_run(wan_sd, latent, t, ctx, spec)
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_full_subject_mask_and_background_strength_one_equal_no_mask_exactly(host, wan_sd):
    x, ref, ctx, t = inputs(10, refs=2, leading=False)
    opts = {"cond_or_uncond": [0, 1]}
    no_mask = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=2.0)
    full = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=2.0, reference_mask=torch.ones(1, 90, 200))
    masks, _ = two_subject_masks()
    one = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=2.0, reference_mask=masks,
                   background_strength=1.0)
    assert torch.equal(full, no_mask)
    assert torch.equal(one, no_mask)
    plain = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts)
    neutral = host_run(host, wan_sd, x, t, ctx, tdc=ref, opts=opts, strength=1.0, reference_mask=torch.ones(3, 8))
    assert torch.equal(neutral, plain)  # strength 1 and a full mask: still the unpatched model bit for bit


def test_reference_mask_errors_name_the_node_the_input_and_the_fix(host, wan_sd):
    import comfy.sd

    x, ref, ctx, t = inputs(11, refs=2, leading=False)
    with pytest.raises(ValueError, match=f"{NODE}: reference_mask is empty"):
        host_run(host, wan_sd, x, t, ctx, tdc=ref, reference_mask=torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=f"{NODE}: reference_mask holds 3 masks but this run has 2 reference"):
        host_run(host, wan_sd, x, t, ctx, tdc=ref, reference_mask=torch.ones(3, 16, 16))
    only_margin = torch.zeros(2, MASK_H, MASK_W)
    only_margin[:, :, :CROP_X] = 1.0  # the subject lies in the part the host crops away
    only_margin[0, :TOKEN_PX, CROP_X:CROP_X + TOKEN_PX] = 1.0
    with pytest.raises(ValueError, match=f"{NODE}: reference_mask 1 covers no token of reference frame 1.*InvertMask"):
        host_run(host, wan_sd, x, t, ctx, tdc=ref, reference_mask=only_margin)
    model = comfy.sd.load_diffusion_model_state_dict(dict(wan_sd))
    with pytest.raises(ValueError, match="reference_mask has shape"):
        host.node_classes[NODE].execute(model=model, strength=1.0, leading_frames=0, block_start=0, block_end=-1,
                                        apply_to_uncond=True, reference_mask=torch.ones(1, 1, 4, 4))


def test_node_errors_name_the_node_and_the_fix(host, wan_sd):
    import comfy.sd

    node = host.node_classes[NODE]
    vace = comfy.sd.load_diffusion_model_state_dict(tw.build_wan_state_dict(seed=0, vace=True))
    with pytest.raises(ValueError, match="trim_latent"):
        node.execute(model=vace, strength=2.0, leading_frames=0, block_start=0, block_end=-1, apply_to_uncond=True)
    plain = comfy.sd.load_diffusion_model_state_dict(dict(wan_sd))
    with pytest.raises(ValueError, match="block_start..block_end"):
        node.execute(model=plain, strength=2.0, leading_frames=0, block_start=1, block_end=5, apply_to_uncond=True)
    x, _, ctx, t = inputs(0, refs=1, leading=False)
    with pytest.raises(ValueError, match=f"{NODE}: this model call has no reference frames"):
        host_run(host, wan_sd, x, t, ctx, strength=2.0)


def test_vace_model_leading_frame_bias_is_exact_at_one_and_reaches_the_vace_blocks(host, monkeypatch):
    """On a real VaceWanModel (main blocks + a VACE block at index 0): strength 1 is the unpatched
    model bit for bit; strength 2 biases the self-attention of both the main and the VACE block."""
    from customvideox.cvx_host import frames_patch as wr
    sd = tw.build_wan_state_dict(seed=1, vace=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 1 + T, H, W, generator=g)
    ctx = torch.randn(2, 12, 4096, generator=g)
    vace = {"vace_context": torch.randn(2, 1, 96, 1 + T, H, W, generator=g), "vace_strength": [1.0]}
    t = torch.tensor([500.0, 500.0])

    def run(**node_kw):
        import comfy.model_management
        import comfy.sd

        model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
        if node_kw:
            model = host.node_classes[NODE].execute(model=model, leading_frames=1, block_start=0, block_end=-1,
                                                    apply_to_uncond=True, **node_kw).result[0]
        comfy.model_management.load_models_gpu([model])
        to = dict(model.model_options["transformer_options"], wrappers=model.wrappers)
        with torch.no_grad():
            return model.model.diffusion_model(x, t, ctx, transformer_options=to, **vace)

    biased = []
    real_mask = wr.FramesState.mask
    monkeypatch.setattr(wr.FramesState, "mask", lambda self, active, dtype: biased.append(
        (self.order.block, self.order.count)) or real_mask(self, active, dtype))
    plain = run()
    assert torch.equal(run(strength=1.0), plain)
    biased.clear()
    stronger = run(strength=2.0)
    assert torch.isfinite(stronger).all() and (stronger - plain).abs().max() > 1e-3
    # (block, calls so far in it): the main block's self-attention is call 1, the VACE block's call 3.
    assert (0, 1) in biased and (0, 3) in biased and (1, 1) in biased


# --- CustomVideoXApply on plain Wan T2V: the encoded reference inserted as a leading latent frame ----------


class InsertedSpec(Spec):
    """An inserted reference is off (-inf on its columns) in the blocks outside its range."""

    def dense(self, block: int, batch: int) -> torch.Tensor:
        if block in self.blocks:
            return super().dense(block, batch)
        bias = torch.zeros(batch, 1, self.tokens, self.tokens)
        bias[:, 0, :, self.ref_cols] = -math.inf
        return bias


def apply_run(host, sd: dict, raw_ref: torch.Tensor, x, t, ctx, opts=None, **node_kw) -> torch.Tensor:
    """The host's Wan with CustomVideoXApply (the node's own execute) and its wrappers, one forward."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    model = patching.apply_reference(model, raw_ref, family="Wan2.1", **node_kw)
    return patching.forward(model, x, t, ctx, **(opts or {}))


def test_apply_on_wan_t2v_inserts_the_reference_and_equals_the_dense_oracle(host, wan_sd):
    """Strength 2.5 on the cond row, off on the uncond row (apply_to_uncond off), off in block 0 (block_start
    1), an ERAE mask: the same as diffusers fed [reference | video] with that dense bias written out."""
    import comfy.latent_formats
    from customvideox.cvx_core import entity_region as er
    x, ref, ctx, t = inputs(11, refs=1, leading=True)
    raw = ref[:1]
    region = er.EntityRegion(mode="mask", mask=torch.rand(T, H // 2, W // 2, generator=torch.Generator().manual_seed(4)),
                             lam=1.5, start_percent=0.0)
    ours = apply_run(host, wan_sd, raw, x, t, ctx, opts={"cond_or_uncond": [0, 1]}, strength=2.5, block_start=1,
                     apply_to_uncond=False, region=region)
    processed = comfy.latent_formats.Wan21().process_in(raw)  # the host's latent format, as the model sees it
    video = T * HW
    region_map = region.mask.flatten()[None].expand(2, -1).clone()
    region_map[1] = 0
    spec = InsertedSpec(video + HW, slice(0, HW), slice(HW, None), [math.log(2.5), -math.inf], range(1, 2), lam=1.5,
                        region_map=region_map)
    want = diffusers_run(wan_sd, torch.cat([processed.expand(2, -1, -1, -1, -1), x], 2), t, ctx, spec)[:, :, 1:]
    assert ours.shape == x.shape
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_apply_on_wan_t2v_with_the_reference_off_is_the_unpatched_model(host, wan_sd):
    """Strength 0: the reference frame is in the sequence, masked from every query in every block; Wan's
    self-attention RoPE is relative, so the video's output is the plain model's to fp32 round-off."""
    x, ref, ctx, t = inputs(12, refs=1, leading=True)
    ours = apply_run(host, wan_sd, ref[:1], x, t, ctx, strength=0.0)
    plain = host_run(host, wan_sd, x, t, ctx)
    assert (ours - plain).abs().max() < 1e-4, (ours - plain).abs().max()
    on = apply_run(host, wan_sd, ref[:1], x, t, ctx, strength=1.0)
    assert (on - plain).abs().max() > 1e-2  # the reference is really in the attention at strength 1


@pytest.mark.parametrize("setting,value", [("bias_rows", "video"), ("attention_path", "lse")])
def test_apply_on_wan_refuses_settings_it_cannot_honour(host, wan_sd, setting, value):
    x, ref, ctx, t = inputs(13, refs=1, leading=True)
    with pytest.raises(ValueError, match=f"CustomVideoXApply {setting}: '{value}' on a Wan model"):
        apply_run(host, wan_sd, ref[:1], x, t, ctx, **{setting: value})


def test_apply_refuses_a_reference_from_another_models_vae(host, wan_sd, tiny_models):
    """CogVideoX and Wan 2.1 latents both have 16 channels: only the recorded VAE family tells them apart."""
    import comfy.sd
    from customvideox.nodes import types as types
    apply = host.node_classes["CustomVideoXApply"]
    args = dict(strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True, attention_mode="two_way",
                reference_rope="negative")
    wan = comfy.sd.load_diffusion_model_state_dict(dict(wan_sd))
    cog_ref = types.EncodedReference(latent=torch.randn(1, 16, 1, H, W), width=W * 8, height=H * 8, family="CogVideoX")
    with pytest.raises(ValueError, match="CustomVideoXApply reference: .*CogVideoX VAE but the MODEL is Wan"):
        apply.execute(model=wan, reference=cog_ref, **args)
    cog = comfy.sd.load_diffusion_model_state_dict(tiny_models.native_state_dict("native_1_0"))
    wan_ref = types.EncodedReference(latent=torch.randn(1, 16, 1, H, W), width=W * 8, height=H * 8, family="Wan2.1")
    with pytest.raises(ValueError, match="CustomVideoXApply reference: .*Wan2.1 VAE but the MODEL is CogVideoX"):
        apply.execute(model=cog, reference=wan_ref, **args)


def test_apply_on_wan_at_strength_one_is_off_outside_its_block_range(host, wan_sd):
    """Strength 1 with no schedule adds no bias inside the range, but the blocks outside it must still mask the
    inserted reference (it is not the model's own frame): the same as diffusers with -inf there."""
    import comfy.latent_formats

    x, ref, ctx, t = inputs(14, refs=1, leading=True)
    raw = ref[:1]
    ours = apply_run(host, wan_sd, raw, x, t, ctx, strength=1.0, block_start=1)
    processed = comfy.latent_formats.Wan21().process_in(raw)
    video = T * HW
    spec = InsertedSpec(video + HW, slice(0, HW), slice(HW, None), [0.0, 0.0], range(1, 2))
    want = diffusers_run(wan_sd, torch.cat([processed.expand(2, -1, -1, -1, -1), x], 2), t, ctx, spec)[:, :, 1:]
    assert torch.allclose(ours, want, atol=ATOL), (ours - want).abs().max()


def test_wan_refuses_an_erae_map_whose_blocks_reach_the_last_biased_block(host):
    """map_blocks > 1 is built on Wan (tests/host/test_wan_erae.py checks it against the oracle); map blocks that
    leave no later block to use the map are a clear error naming the node, for both nodes."""
    from customvideox.cvx_core import entity_region as er
    wan_sd = tw.build_wan_state_dict(seed=3, layers=4)
    x, ref, ctx, t = inputs(15, refs=1, leading=True)
    fine = er.EntityRegion(mode="auto", entity_idx=(1,), map_block=0, map_blocks=2, lam=1.0, start_percent=0.0)
    assert torch.isfinite(apply_run(host, wan_sd, ref[:1], x, t, ctx, region=fine)).all()
    region = er.EntityRegion(mode="auto", entity_idx=(1,), map_block=2, map_blocks=2, lam=1.0)
    reach = r"map_block 2 with map_blocks 2 \(blocks 2\.\.3\) reaches block 3.*below 3"
    with pytest.raises(ValueError, match=f"CustomVideoXApply: the region's {reach}"):
        apply_run(host, wan_sd, ref[:1], x, t, ctx, region=region)
    with pytest.raises(ValueError, match=f"{NODE}: the region's {reach}"):
        host_run(host, wan_sd, x, t, ctx, tdc=ref, region=region)
