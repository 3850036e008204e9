"""Which query rows a reference bias reaches, and the fused log-sum-exp path with a padded log-sum-exp.

* ``attention_path=lse``: torch's CUDA memory-efficient kernel pads its log-sum-exp to a multiple of 32
  along the query axis. The merge must read only the first Sq entries; checked on CPU with a padded
  log-sum-exp built by hand, against masked attention written out densely.
* ``bias_rows``: ``all`` (default) puts a reference's strength/TAB bias on every query row's logits on its
  key columns; ``video`` on the video query rows only, while "off" (-inf) still masks it from every query.
  Checked through the patch's attention override against a dense additive-bias softmax written out here.
* "Reference off" with the reference tokens in the sequence (blocks outside the reference's block range)
  is the unpatched model with ``reference_rope`` negative *and* none; shift moves the video and differs.
"""

from __future__ import annotations

import math

import pytest
import test_cache_and_counts as cc
import torch
from customvideox.cvx_core.token_layout import TokenLayout
from dense_attention import dense_attention, dense_bias

pk, model, inputs = cc.pk, cc.model, cc.inputs  # the shared module fixtures: the tiny 4-block model, inputs

B, H, D, TEXT, R, GRID = 2, 2, 16, 5, 6, (3, 2, 3)  # Sq = 5 + 2*6 + 18 = 35: not a multiple of 32


# ------------------------------------------------------------------ bias_rows, through the patch's override


def host_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    """The host's attention call as the override sees it (inputs already [B, H, S, D])."""
    assert skip_reshape and skip_output_reshape
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.host
@pytest.mark.parametrize("lse", [False, True], ids=["masked", "lse"])
@pytest.mark.parametrize("bias_rows", ["all", "video"])
def test_bias_rows_through_the_attention_override_equals_dense_bias(pk, model, bias_rows, lse):
    latent = torch.zeros(1, 16, 1, 2, 3)
    # Reference 0: strength 2 and a mask-mode ERAE map (lambda 1.5); reference 1: strength 0.5, off for uncond.
    entries = [pk.ent.ReferenceEntry(latent=latent, strength=2.0, bias_rows=bias_rows),
               pk.ent.ReferenceEntry(latent=latent, strength=0.5, bias_rows=bias_rows, apply_to_uncond=False)]
    layout = TokenLayout(text=TEXT, refs=(R, R), grid=GRID)
    row_bias, owner = pk.fs.row_bias(entries, 0.0, [0, 1], B, torch.device("cpu"))
    assert torch.allclose(row_bias, torch.tensor([[math.log(2.0), math.log(0.5)], [math.log(2.0), -math.inf]]))
    g = torch.Generator().manual_seed(2)
    region_map = torch.rand(B, layout.video, generator=g)
    lam = 1.5
    object.__setattr__(entries[0], "region", pk.er.EntityRegion(mode="mask", mask=torch.ones(1, 4, 4), lam=lam))
    backbone = pk.cv.CogVideoX(model.get_model_object("diffusion_model"))
    state = pk.fs.ForwardState(entries=entries, backbone=backbone, layout=layout, row_bias=row_bias, ref_owner=owner, num_blocks=1,
                            erae_on=(True, False), lse=lse)
    state.region_maps[0] = region_map
    q, k, v = (torch.randn(B, H, layout.keys, D, generator=g) for _ in range(3))
    got = pk.ao.AttentionOverride()(host_attention, q, k, v, H, skip_reshape=True, skip_output_reshape=True,
                                 transformer_options={pk.opt.STATE_KEY: state})
    # By hand: -inf reaches every row; a finite bias every row (all) or the video rows (video); lambda*map the
    # video rows on reference 0.
    finite = row_bias.masked_fill(torch.isneginf(row_bias), 0.0)
    region_rows = torch.stack([region_map * lam, torch.zeros_like(region_map)], 1)

    def by_hand(rows: str) -> torch.Tensor:
        if rows == "all":
            return dense_attention(q, k, v, dense_bias(layout, row_bias, region_rows))
        return dense_attention(q, k, v, dense_bias(layout, row_bias - finite, region_rows + finite[:, :, None]))

    want = by_hand(bias_rows)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # The two settings differ (the text and reference rows do not get the bias under "video").
    assert (by_hand("video" if bias_rows == "all" else "all") - want).abs().max() > 1e-3


# ------------------------------------------------------------------ reference off with its tokens present


@pytest.mark.host
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ref_rope", ["negative", "none", "shift"])
def test_reference_masked_in_every_block_is_the_unpatched_model_for_negative_and_none(pk, model, ref_rope):
    import comfy.model_management as mm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 8, 10, generator=g)
    ctx = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([600.0, 600.0])
    base = pk.cv.install_rotary(model, "exact")
    # A block range past the model's 4 blocks: the reference tokens are in the sequence, masked in every block.
    entry = pk.ent.ReferenceEntry(latent=torch.randn(1, 16, 1, 8, 10, generator=g), strength=2.0, block_start=9,
                                 block_end=9, ref_rope=ref_rope)
    patched = pk.rp.apply_reference(base, entry)
    outs = []
    for m in (base, patched):
        mm.load_models_gpu([m])
        opts = dict(m.model_options["transformer_options"], wrappers=m.wrappers, cond_or_uncond=[0, 1])
        with torch.no_grad():
            outs.append(m.model.diffusion_model(x, t, ctx, transformer_options=opts))
    diff = float((outs[1] - outs[0]).abs().max())
    print(f"reference_rope={ref_rope}: max |reference masked in every block - unpatched| = {diff:.2e}")
    if ref_rope == "shift":
        assert diff > 1e-4, diff  # the video moved to temporal positions 1..T
    else:
        assert diff <= 1e-5, diff


@pytest.mark.host
@pytest.mark.usefixtures("one_thread")
def test_rows_with_every_reference_off_run_without_reference_tokens_in_a_real_sampler(pk, model, inputs,
                                                                                     monkeypatch):
    """apply_to_uncond off: the host's sampler passes ``control=None`` to the model; the uncond rows still run
    on their own, without the reference tokens (the exact base model), rather than masked inside the batch."""
    splits: list[int] = []
    real = pk.rp._split_rows
    monkeypatch.setattr(pk.rp, "_split_rows", lambda *a, **k: splits.append(1) or real(*a, **k))
    cc.sample(cc.patch(pk, model, inputs.ref, mode="two_way", apply_to_uncond=False), inputs)
    assert len(splits) == cc.STEPS
