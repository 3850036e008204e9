"""3D reference attention: the joint attention with a bias on the reference keys' logits.

One scaled-dot-product call per block over ``[text | references | video]`` keys
(DESIGN.md §1.1). Two kinds of bias, neither of them a dense ``Sq x Sk`` tensor:

* **Column biases** — one logit bias per (batch row, reference), the same for every query:
  a key-column mask of shape ``(B, 1, 1, Sk)``. Peak extra memory: ``B * Sk`` elements
  (76 KB at 480x720x49 in fp32, B = 1).
* **Video-row biases** — a per-video-query bias on one reference's columns (ERAE's
  ``lambda * map[q]``, and a strength/TAB bias limited to the video rows). A per-query x
  per-key bias cannot be broadcast into one mask, so it is folded into the dot product
  instead: each reference gets one extra q/k channel (k = 1 on its columns, q = the bias),
  padded to a multiple of 8 channels so fused kernels still apply, with q pre-scaled so the
  backend's default ``1/sqrt(d)`` scale stays exact. Peak extra memory: copies of q, k, v
  with ``d + pad`` channels, ``3 * B * H * S * (d + pad)`` elements, plus the column mask
  (about 3x the q size at d = 64; never ``Sq x Sk``).

Which rows a bias reaches (the callers' rule): ``-inf`` (reference off) is a column bias, so it
masks the reference from every query, text and reference queries included, which is what makes
"off" equal the base model (masking only the video queries still lets the reference reach the
video through the text; DESIGN.md §1.1). A finite strength/TAB bias is a column bias by default
([reconstructed]: one broadcast mask, and every token reading the reference sees it scaled
alike), or a video-row bias when the user limits it to the video queries. ERAE's bias is always
a video-row bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .token_layout import TokenLayout

# attn(q, k, v, mask) -> [B, H, Sq, Dv]; q, k, v are [B, H, S, D].
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
FOLD_CHANNELS = 8


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def column_bias(layout: TokenLayout, ref_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``(B, 1, 1, Sk)`` key-column mask for per-row, per-reference biases ``[B, n_refs]``.

    Returns None when every bias is exactly 0 (the unbiased joint attention).
    """
    if ref_bias.shape[-1] != len(layout.refs):
        raise ValueError(f"{ref_bias.shape[-1]} reference biases for {len(layout.refs)} references")
    if not bool((ref_bias != 0).any()):
        return None
    mask = torch.zeros(ref_bias.shape[0], 1, 1, layout.keys, dtype=dtype, device=ref_bias.device)
    for i in range(len(layout.refs)):
        a, b = layout.ref_key_span(i)
        mask[:, 0, 0, a:b] = ref_bias[:, i, None].to(dtype)
    return mask


def fold_region_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    region_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold per-video-query biases ``[B, n_refs, Sv]`` into extra q/k channels (see module doc).

    ``softmax((q' k'^T) / sqrt(d'))`` then equals ``softmax(q k^T / sqrt(d) + bias)`` where
    ``bias[b, q, key] = region_bias[b, j, q - video_start]`` for video query q and a key of
    reference j, and 0 elsewhere. The caller slices the zero channels off the output.
    """
    B, H, Sq, D = q.shape
    n = region_bias.shape[1]
    pad = FOLD_CHANNELS * math.ceil(n / FOLD_CHANNELS)
    d_new = D + pad
    q2 = q.new_zeros(B, H, Sq, d_new)
    q2[..., :D] = q * math.sqrt(d_new / D)
    vs = layout.video_query_start
    q2[:, :, vs:vs + layout.video, D:D + n] = (region_bias.transpose(1, 2) * math.sqrt(d_new)).to(q.dtype)[:, None]
    k2 = k.new_zeros(k.shape[0], H, k.shape[2], d_new)
    k2[..., :D] = k
    for j in range(n):
        a, b = layout.ref_key_span(j)
        k2[:, :, a:b, D + j] = 1.0
    v2 = F.pad(v, (0, pad))
    return q2, k2, v2


def insert_reference_kv(
    k: torch.Tensor, v: torch.Tensor, text: int, ref_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-way mode: put cached reference keys/values (``[1 or B, H, R, D]``) after the text."""
    B = k.shape[0]
    ks = [k[:, :, :text]] + [rk.expand(B, -1, -1, -1).to(k.dtype) for rk, _ in ref_kv] + [k[:, :, text:]]
    vs = [v[:, :, :text]] + [rv.expand(B, -1, -1, -1).to(v.dtype) for _, rv in ref_kv] + [v[:, :, text:]]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    ref_bias: torch.Tensor,
    region_bias: torch.Tensor | None = None,
    ref_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    attn: AttentionFn = sdpa,
    mask: torch.Tensor | None | str = "build",
) -> torch.Tensor:
    """Joint attention over ``layout`` with reference biases; returns ``[B, H, Sq, D]``.

    q, k, v: ``[B, H, S, D]`` (RoPE applied). ``ref_bias``: ``[B, n_refs]`` logit biases
    (``-inf`` = off). ``region_bias``: optional ``[B, n_refs, Sv]`` per-video-query biases
    (ERAE). ``ref_kv``: cached reference K/V for one-way mode (the keys then do not hold
    the references yet). ``mask``: the column mask :func:`column_bias` gives for ``ref_bias``
    (None included), passed in to build it once per model call rather than once per block;
    by default it is built here.
    """
    if ref_kv is not None:
        k, v = insert_reference_kv(k, v, layout.text, ref_kv)
    if k.shape[2] != layout.keys or q.shape[2] != layout.queries:
        raise ValueError(f"attention has {q.shape[2]} queries / {k.shape[2]} keys, "
                         f"layout expects {layout.queries} / {layout.keys}")
    if isinstance(mask, str):
        mask = column_bias(layout, ref_bias, q.dtype)
    D = v.shape[-1]
    if region_bias is not None:
        q, k, v = fold_region_bias(q, k, v, layout, region_bias)
    return attn(q, k, v, mask)[..., :D]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention and its log-sum-exp ``[B, H, >= Sq]``, from torch's fused kernels.

    CUDA: the flash kernel for fp16/bf16, the memory-efficient one otherwise; CPU: the CPU flash
    kernel. These are torch-internal ops (stable across 2.x), used only by the ``"lse"`` path. The
    memory-efficient kernel pads its log-sum-exp along the query axis (to a multiple of 32):
    :func:`merge_by_lse` reads the first Sq entries only.
    """
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse.float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse.float()


def merge_by_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Softmax attention over the union of several key sets, from each set's ``(out, lse, shift)``.

    ``out``: ``[B, H, Sq, D]``; ``lse``: ``[B, H, >= Sq]`` (a kernel may pad it past Sq; only the first
    Sq entries are read); ``shift``: a logit bias constant over the set's keys, per query, broadcastable
    to ``[B, H, Sq]`` (None = 0; ``-inf`` = the set is off for that query).
    """
    sq = parts[0][0].shape[2]
    lses = []
    for _, lse, shift in parts:
        lse = lse[..., :sq].float()
        lses.append(lse if shift is None else lse + shift)
    weights = torch.softmax(torch.stack(lses), dim=0)  # [G, B, H, Sq]; a -inf shift gives weight 0
    return sum(w[..., None].to(out.dtype) * out for w, (out, _, _) in zip(weights, parts))


def reference_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    ref_bias: torch.Tensor,
    region_bias: torch.Tensor | None = None,
    ref_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The same attention as :func:`reference_attention`, as unmasked fused calls merged by log-sum-exp.

    One call over the text and video keys and one per reference. A bias that is constant over a
    reference's keys, per query (TAB per row, ERAE per video query), only shifts that call's
    log-sum-exp, so no mask and no extra channel is needed and every call stays on the flash
    kernel. Costs a copy of the text+video K/V in two-way mode and one fused call per reference.
    """
    text, vq = layout.text, layout.video_query_start
    if ref_kv is None:
        spans = [layout.ref_key_span(j) for j in range(len(layout.refs))]
        ref_kv = [(k[:, :, a:b], v[:, :, a:b]) for a, b in spans]
        vk = layout.video_key_start
        k, v = torch.cat([k[:, :, :text], k[:, :, vk:]], 2), torch.cat([v[:, :, :text], v[:, :, vk:]], 2)
    B = q.shape[0]
    parts = [(*attention_with_lse(q, k, v), None)]
    for j, (rk, rv) in enumerate(ref_kv):
        out, lse = attention_with_lse(q, rk.expand(B, -1, -1, -1).to(q.dtype), rv.expand(B, -1, -1, -1).to(q.dtype))
        shift = ref_bias[:, j, None, None].float().expand(B, 1, q.shape[2]).clone()
        if region_bias is not None:
            shift[:, 0, vq:vq + layout.video] += region_bias[:, j].float()
        parts.append((out, lse, shift))
    return merge_by_lse(parts)
