"""The backbone seam's contract (cvx_host/backbone.py): what every DiT family module must satisfy, checked
on the host's real models (tiny random weights). A new family passes these before any patch uses it.

InsertsReferences, run for CogVideoX 1.0 and 1.5:
- it recognises its model and counts the host's blocks;
- ``prepare_reference`` gives the host's latent format of frame 0, filling the temporal patch;
- ``layout`` predicts the sequence the attention really sees once ``forward_with_references`` put the
  references in; ``next_block`` numbers the attention calls of one forward 0..blocks-1;
- ``forward_with_references`` returns the video's part only, and with the references masked off in every
  block it is the unpatched model (the RoPE table keeps the video's own positions);
- ``reference_stream`` gives per block one (K, V) pair over exactly the reference tokens;
- the copied host block forward (cvx_host/cogvideox_block.py) is the host's own forward, bit for bit.

CarriesReferenceFrames, run for Wan: it recognises its model and tells self- from cross-attention calls
in a real forward.
"""

from __future__ import annotations

import math

import pytest
import test_cache_and_counts as cc
import tiny_models as tm
import tiny_wan as tw
import torch
from customvideox.cvx_host import wan

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]
pk = cc.pk
BLOCKS = 3


@pytest.fixture(scope="module", params=["1.0", "1.5"])
def cog(request):
    import comfy.sd

    config = {**(tm.TINY_CONFIG_1_5 if request.param == "1.5" else tm.TINY_CONFIG_1_0), "num_layers": BLOCKS}
    return comfy.sd.load_diffusion_model_state_dict(tm.build_native_state_dict(config, seed=5))


def _inputs(frames: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, frames, 8, 10, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    t = torch.full((2,), 400.0)
    return x, ctx, t


class Recorder:
    """An attention override that records each call's block (as the backbone numbers it) and shapes."""

    def __init__(self, backbone, state) -> None:
        self.backbone, self.state, self.calls = backbone, state, []

    def __call__(self, func, q, k, v, *args, **kwargs):
        self.calls.append((self.backbone.next_block(self.state, kwargs.get("transformer_options") or {}),
                           q.shape[1], k.shape[1]))
        return func(q, k, v, *args, **kwargs)


class _NotADiT:
    """A MODEL whose DiT is no family the pack handles."""

    model = torch.nn.Linear(1, 1)

    def get_model_object(self, name: str) -> torch.nn.Module:
        return torch.nn.Linear(1, 1)


def test_recognises_its_model_and_counts_blocks(pk, cog):
    backbone = pk.host_backbone.backbone_for(cog, "test")
    assert isinstance(backbone, pk.cv.CogVideoX) and backbone.family == "CogVideoX"
    assert isinstance(backbone, pk.host_backbone.InsertsReferences)
    assert backbone.num_blocks == len(cog.get_model_object("diffusion_model").blocks) == BLOCKS
    with pytest.raises(pk.err.PatchError, match="test model: .*handled families: CogVideoX, Wan"):
        pk.host_backbone.backbone_for(_NotADiT(), "test")


def test_prepare_reference_is_the_hosts_latent_format_filling_the_temporal_patch(pk, cog):
    backbone = pk.cv.CogVideoX.for_model(cog, "test")
    raw = torch.randn(2, 16, 3, 8, 10)
    got = backbone.prepare_reference(cog, raw, "test")
    want = cog.get_model_object("latent_format").process_in(raw[:, :, :1].float())
    p_t = cog.get_model_object("diffusion_model").patch_size_t or 1
    assert got.shape == (2, 16, p_t, 8, 10)
    for f in range(p_t):
        assert torch.equal(got[:, :, f:f + 1], want)
    with pytest.raises(pk.err.PatchError, match="test reference: .*16-channel"):
        backbone.prepare_reference(cog, torch.randn(1, 4, 1, 8, 10), "test")


def _forward(model, x, t, ctx, opts):
    with torch.no_grad():
        return model.model.diffusion_model(x, t, ctx, transformer_options=opts)


def test_layout_matches_the_sequence_the_attention_sees_and_blocks_are_numbered(pk, cog):
    backbone = pk.cv.CogVideoX.for_model(cog, "test")
    patched = pk.cv.install_rotary(cog, "exact")
    dm = patched.get_model_object("diffusion_model")
    x, ctx, t = _inputs()
    refs = [backbone.prepare_reference(cog, torch.randn(1, 16, 1, 8, 10), "test") for _ in range(2)]
    layout = backbone.layout(x, ctx, refs, one_way=False)
    state = pk.fs.ForwardState(entries=[], backbone=backbone, layout=layout, row_bias=torch.zeros(2, 2),
                               ref_owner=[0, 0], num_blocks=BLOCKS)
    rec = Recorder(backbone, state)
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = rec
    patched.patch_model()
    try:
        out = backbone.forward_with_references(
            lambda x_, *a, **k: dm(x_, *a, **k), x, [r.expand(2, -1, -1, -1, -1) for r in refs], "negative", t, ctx,
            transformer_options=patched.model_options["transformer_options"])
    finally:
        patched.unpatch_model()
    assert out.shape == x.shape
    assert [c[0] for c in rec.calls] == list(range(BLOCKS))
    assert {(c[1], c[2]) for c in rec.calls} == {(layout.queries, layout.keys)}
    p_t = dm.patch_size_t or 1
    assert layout.video == math.ceil(x.shape[2] / p_t) * (8 // 2) * (10 // 2)
    assert layout.refs == (20, 20) and layout.text == ctx.shape[1]
    assert backbone.layout(x, ctx, refs, one_way=True).queries == layout.text + layout.video


@pytest.mark.parametrize("ref_rope", ["negative", "none"])
def test_references_masked_off_everywhere_are_the_unpatched_model(pk, cog, ref_rope):
    """forward_with_references + the RoPE table keep the video exactly where the unpatched model has it:
    a reference at strength 1e-30 (logit bias -69) is in the sequence but carries no weight."""
    import comfy.model_management as mm

    x, ctx, t = _inputs(seed=1)
    base = pk.cv.install_rotary(cog, "exact")
    latent = pk.cv.CogVideoX.for_model(cog, "test").prepare_reference(cog, torch.randn(1, 16, 1, 8, 10), "test")
    entry = pk.ent.ReferenceEntry(latent=latent, strength=1e-30, ref_rope=ref_rope)
    patched = pk.rp.apply_reference(base, entry)
    outs = []
    for m in (base, patched):
        mm.load_models_gpu([m])
        opts = dict(m.model_options["transformer_options"], wrappers=m.wrappers, cond_or_uncond=[0, 1])
        outs.append(_forward(m, x, t, ctx, opts))
    assert (outs[1] - outs[0]).abs().max() < 1e-5, (outs[1] - outs[0]).abs().max()


def test_reference_stream_gives_per_block_kv_over_the_reference_tokens(pk, cog):
    backbone = pk.cv.CogVideoX.for_model(cog, "test")
    patched = pk.cv.install_rotary(cog, "exact")
    patched.patch_model()
    try:
        backbone = pk.cv.CogVideoX(patched.get_model_object("diffusion_model"))
        ref = backbone.prepare_reference(cog, torch.randn(2, 16, 1, 8, 10), "test")
        text = torch.randn(1, 7, 32)
        with torch.no_grad():
            kv = backbone.reference_stream(ref, text, "negative", None, {}, None)
            kv_other_text = backbone.reference_stream(ref, text + 1, "negative", None, {}, None)
    finally:
        patched.unpatch_model()
    dm = cog.get_model_object("diffusion_model")
    heads, dim = dm.num_attention_heads, dm.attention_head_dim
    assert len(kv) == BLOCKS
    for k, v in kv:
        assert k.shape == v.shape == (1, heads, 2 * 20, dim)
    assert not torch.equal(kv[-1][0], kv_other_text[-1][0])  # the reference attends to the text


def test_copied_block_forward_is_the_hosts_own(pk, cog):
    """cvx_host/cogvideox_block.py copies CogVideoXBlock.forward (v0.30.0) to add reference-row deltas; with
    no delta it must equal the host's forward bit for bit, or the host changed and the copy must follow."""
    cb = pk.host_block
    dm = cog.get_model_object("diffusion_model")
    block = dm.blocks[0]
    g = torch.Generator().manual_seed(3)
    inner = block.q.in_features
    hid = torch.randn(1, 40, inner, generator=g)
    enc = torch.randn(1, 7, inner, generator=g)
    temb = torch.randn(1, dm.time_embedding_linear_2.out_features, generator=g)
    with torch.no_grad():
        want = block(hid, enc, temb, None, transformer_options={})
        # The adapted forward of the same module (its class swapped as the adapter patch does), no delta.
        block.__class__ = cb.block_class(0)
        try:
            got = block._adapted_forward(hid, enc, temb, None, {}, (7, 12), [])
        finally:
            block.__class__ = type(dm.blocks[1])
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def _wan():
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(tw.build_wan_state_dict(seed=2))


def test_wan_recognises_its_model_and_tells_self_from_cross_attention(pk):
    model = _wan()
    backbone = pk.host_backbone.backbone_for(model, "test")
    wan = pack_wan()
    assert isinstance(backbone, wan.Wan) and isinstance(backbone, pk.host_backbone.CarriesReferenceFrames)
    dm = model.get_model_object("diffusion_model")
    assert backbone.num_blocks == len(dm.blocks)
    order, seen = wan.CallOrder(), []

    def record(func, q, k, v, *args, **kwargs):
        seen.append((*backbone.attention_call(order, kwargs.get("transformer_options") or {}), q.shape[1],
                     k.shape[1]))
        return func(q, k, v, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 4096, generator=g)
    with torch.no_grad():
        dm(x, torch.full((1,), 500.0), ctx, transformer_options={"optimized_attention_override": record})
    video = 2 * 4 * 4
    assert [(b, s) for b, s, *_ in seen] == [(b, s) for b in range(backbone.num_blocks) for s in (True, False)]
    for _, is_self, _, q_len, k_len in seen:
        assert (q_len, k_len) == ((video, video) if is_self else (video, k_len))
        if not is_self:
            assert k_len != video


def pack_wan():
    return wan
