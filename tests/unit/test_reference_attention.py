"""cvx_core's 3D reference attention against diffusers' CogVideoX (an implementation we did not write).

The reference latent frame is prepended on T in diffusers' own transformer; an attention
processor routes each block's attention through ``cvx_core.reference_attention``. A second
processor computes the same attention densely, with the full bias matrix written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from customvideox.cvx_core import rope
from customvideox.cvx_core.reference_attention import column_bias, reference_attention
from customvideox.cvx_core.token_layout import TokenLayout
from diffusers import CogVideoXTransformer3DModel
from diffusers_oracle import Processor, diffusers_rope, with_reference_at_minus_one
from torch.utils._python_dispatch import TorchDispatchMode

HEADS, HEAD_DIM, TEXT, C = 2, 16, 8, 4


def tiny_transformer(patch_t: int | None = None) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
        time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=16, sample_height=12, sample_frames=9,
        patch_size=2, patch_size_t=patch_t, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():  # several layers are zero-initialised; make every path count
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def our_rope(m, h: int, w: int, ref_frames: int, frames: int, ref_rope: str = "negative"):
    p = m.config.patch_size
    hp, wp = rope.spatial_positions(h, w, temporal_patch=m.config.patch_size_t is not None, spatial="exact",
                                    base_hw=(m.config.sample_height // p, m.config.sample_width // p))
    tp = rope.temporal_positions(ref_frames, frames, ref_rope)
    return rope.rotary_table(HEAD_DIM, tp, hp, wp, unrotated_frames=ref_frames if ref_rope == "none" else 0)


def dense(layout: TokenLayout, ref_bias: torch.Tensor, region: torch.Tensor | None):
    """Full softmax with the whole ``[B, 1, Sq, Sk]`` bias written out (test-only, tiny sizes)."""

    def fn(q, k, v):
        bias = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2])
        vs = layout.video_query_start
        for j in range(len(layout.refs)):
            a, b = layout.ref_key_span(j)
            bias[:, 0, :, a:b] = ref_bias[:, j, None, None]
            if region is not None:
                bias[:, 0, vs:vs + layout.video, a:b] += region[:, j, :, None]
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        return logits.softmax(-1) @ v

    return fn


def run(m, x, text, proc, rot):
    m.set_attn_processor(proc)
    with torch.no_grad():
        return m(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500, 500]),
                 image_rotary_emb=rot).sample


@pytest.fixture(params=[None, 2], ids=["cogvideox-1.0", "cogvideox-1.5"])
def setup(request):
    patch_t = request.param
    m = tiny_transformer(patch_t)
    g = torch.Generator().manual_seed(1)
    frames = 4 if patch_t else 3
    ref_f = patch_t or 1
    video = torch.randn(2, frames, C, 8, 10, generator=g)
    ref = torch.randn(1, ref_f, C, 8, 10, generator=g).expand(2, -1, -1, -1, -1)
    text = torch.randn(2, TEXT, 32, generator=g)
    h, w = 4, 5
    t_tok = frames // (patch_t or 1)
    layout = TokenLayout(text=TEXT, refs=(h * w,), grid=(t_tok, h, w))
    return m, video, ref, text, layout, (h, w, t_tok)


def test_exact_rope_table_equals_diffusers_at_native_and_other_grids():
    for patch_t in (None, 2):
        m = tiny_transformer(patch_t)
        # 1.0 also off the native 6x8 grid (diffusers stretches it); 1.5 slices integer positions.
        for h, w in ((6, 8), (4, 5), (9, 7) if patch_t is None else (3, 7)):
            ours = our_rope(m, h, w, 0, 3)
            theirs = diffusers_rope(m.config, (h, w), 3)
            assert torch.allclose(ours[0], theirs[0], atol=1e-6) and torch.allclose(ours[1], theirs[1], atol=1e-6)


def test_reference_at_minus_one_rope_table_equals_diffusers_positions():
    """The pack's table with the default reference placement equals the one built from diffusers' RoPE."""
    for patch_t in (None, 2):
        m = tiny_transformer(patch_t)
        for h, w in ((6, 8), (4, 5)):
            ours = our_rope(m, h, w, 1, 3)
            theirs = with_reference_at_minus_one(diffusers_rope(m.config, (h, w), 3), h * w)
            assert torch.allclose(ours[0], theirs[0], atol=1e-6) and torch.allclose(ours[1], theirs[1], atol=1e-6)


def reference_rope(m, h: int, w: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's positions: one reference token frame at index -1, from diffusers' RoPE builder."""
    return with_reference_at_minus_one(diffusers_rope(m.config, (h, w), frames), h * w)


def test_host_rope_positions_differ_for_cogvideox_1_0():
    hp, _ = rope.spatial_positions(6, 8, temporal_patch=False, spatial="host", base_hw=(6, 8))
    ep, _ = rope.spatial_positions(6, 8, temporal_patch=False, spatial="exact", base_hw=(6, 8))
    assert torch.equal(ep, torch.arange(6.0))
    assert torch.allclose(hp, torch.arange(6.0) * 1.875)


def test_reference_off_equals_stock_diffusers(setup):
    m, video, ref, text, layout, (h, w, t_tok) = setup
    stock = run(m, video, text, Processor(dense(TokenLayout(TEXT, (), layout.grid), torch.zeros(2, 0), None)),
                diffusers_rope(m.config, (h, w), t_tok))
    off = torch.full((2, 1), -math.inf)
    ours = run(m, torch.cat([ref, video], 1), text,
               Processor(lambda q, k, v: reference_attention(q, k, v, layout, off)),
               reference_rope(m, h, w, t_tok))
    assert torch.allclose(ours[:, ref.shape[1]:], stock, atol=1e-5), (ours[:, ref.shape[1]:] - stock).abs().max()


@pytest.mark.parametrize("bias", [0.0, 2.0, -1.5])
@pytest.mark.parametrize("with_region", [False, True])
def test_finite_bias_equals_dense_attention(setup, bias, with_region):
    m, video, ref, text, layout, (h, w, t_tok) = setup
    x = torch.cat([ref, video], 1)
    rot = reference_rope(m, h, w, t_tok)
    ref_bias = torch.tensor([[bias], [bias - 0.5]])
    region = torch.rand(2, 1, layout.video, generator=torch.Generator().manual_seed(3)) * 2 if with_region else None
    ours = run(m, x, text, Processor(lambda q, k, v: reference_attention(q, k, v, layout, ref_bias, region)), rot)
    want = run(m, x, text, Processor(dense(layout, ref_bias, region)), rot)
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()
    off = run(m, x, text, Processor(dense(layout, torch.full((2, 1), -math.inf), None)), rot)
    assert (ours[:, ref.shape[1]:] - off[:, ref.shape[1]:]).abs().max() > 1e-3  # the reference does act


def test_one_way_cached_kv_equals_dense_keys():
    g = torch.Generator().manual_seed(5)
    B, H, D, text, R, grid = 2, 2, 16, 5, 6, (2, 2, 3)
    layout = TokenLayout(text=text, refs=(R, R), grid=grid, refs_in_queries=False)
    q = torch.randn(B, H, layout.queries, D, generator=g)
    k = torch.randn(B, H, text + layout.video, D, generator=g)
    v = torch.randn(B, H, text + layout.video, D, generator=g)
    kv = [(torch.randn(1, H, R, D, generator=g), torch.randn(1, H, R, D, generator=g)) for _ in range(2)]
    ref_bias = torch.tensor([[0.5, -math.inf], [1.0, 0.0]])
    region = torch.rand(B, 2, layout.video, generator=g)
    out = reference_attention(q, k, v, layout, ref_bias, region, ref_kv=kv)
    full_k = torch.cat([k[:, :, :text], kv[0][0].expand(B, -1, -1, -1), kv[1][0].expand(B, -1, -1, -1),
                        k[:, :, text:]], 2)
    full_v = torch.cat([v[:, :, :text], kv[0][1].expand(B, -1, -1, -1), kv[1][1].expand(B, -1, -1, -1),
                        v[:, :, text:]], 2)
    want = dense(layout, ref_bias, region)(q, full_k, full_v)
    assert torch.allclose(out, want, atol=1e-5)


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


# 480x720x49 on CogVideoX-5B: 226 text + 1,350 reference + 17,550 video tokens.
FULL = TokenLayout(text=226, refs=(1350,), grid=(13, 30, 45))


def test_tab_column_bias_at_full_geometry_is_one_row_per_batch_element():
    mask = column_bias(FULL, torch.tensor([[0.7], [-math.inf]]), torch.float32)
    assert mask.shape == (2, 1, 1, FULL.keys)
    assert mask.numel() * mask.element_size() == 2 * 19126 * 4  # 153 KB, the stated bound


def test_no_dense_bias_is_allocated_at_full_geometry():
    """TAB and TAB+ERAE at full sequence length (2 heads to keep it quick): the largest tensor any op
    makes is the (padded) q/k/v, never Sq x Sk or Sq x R."""
    B, H, D = 1, 2, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, FULL.keys, D, generator=g) for _ in range(3))
    region = torch.rand(B, 1, FULL.video, generator=g)
    for reg in (None, region):
        with AllocationRecorder() as rec:
            reference_attention(q, k, v, FULL, torch.tensor([[0.5]]), reg)
        biggest = max(math.prod(s) for s in rec.shapes)
        assert biggest <= B * H * FULL.keys * (D + 8)
        assert not any(len(s) >= 2 and s[-2:] in ((FULL.queries, FULL.keys), (FULL.queries, 1350)) for s in rec.shapes)


@pytest.mark.parametrize("one_way", [False, True])
def test_lse_merge_path_equals_the_masked_path(one_way):
    """The fused-kernel switch: unmasked calls merged by log-sum-exp give the same attention."""
    from customvideox.cvx_core.reference_attention import reference_attention_lse

    g = torch.Generator().manual_seed(11)
    B, H, D, text, R, grid = 2, 2, 16, 5, 6, (2, 2, 3)
    layout = TokenLayout(text=text, refs=(R, R), grid=grid, refs_in_queries=not one_way)
    n_keys = text + layout.video + (0 if one_way else 2 * R)
    q = torch.randn(B, H, layout.queries, D, generator=g)
    k, v = (torch.randn(B, H, n_keys, D, generator=g) for _ in range(2))
    kv = [(torch.randn(1, H, R, D, generator=g), torch.randn(1, H, R, D, generator=g)) for _ in range(2)] \
        if one_way else None
    region = torch.rand(B, 2, layout.video, generator=g)
    for ref_bias in (torch.tensor([[0.5, -math.inf], [1.0, 0.0]]), torch.full((B, 2), -math.inf)):
        for reg in (None, region):
            want = reference_attention(q, k, v, layout, ref_bias, reg, ref_kv=kv)
            got = reference_attention_lse(q, k, v, layout, ref_bias, reg, ref_kv=kv)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
