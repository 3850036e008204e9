"""References inserted into a Wan text-to-video model: their RoPE slot, their timestep, and the one-way stream.

* **RoPE slot.** The host numbers the frames of its input from 0, so references put in front of the video
  would sit at 0..N-1 and the video at N..N+T-1. :class:`WanRope` (an object patch of
  ``diffusion_model.rope_encode``) keeps the video at 0..T-1 and gives every reference the one temporal
  slot ``reference_rope`` names (:func:`cvx_core.rope.wan_reference_slot`), spatial positions as the video's.
* **Two-way inputs.** The reference latents as the model sees them in the sequence: clean, or noised to each
  row's sigma (``reference_timestep`` 'noised', rectified-flow noising as Wan is sampled).
* **One-way stream.** The references attend only to themselves: per reference, its tokens run through every
  block alone (self-attention among them, the positive prompt's cross-attention, the FFN) at the reference's
  timestep, and each block's self-attention K/V (after RoPE, at the reference's slot) is kept. The video's
  self-attention then reads them as extra key columns. With ``reference_timestep`` 'clean' the stream runs
  once per sampling run (kept in the run cache, dropped when the run ends); 'sampling'/'noised' once per step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import comfy.ldm.common_dit as common_dit
import torch
from comfy.ldm.wan.model import WanModel, sinusoidal_embedding_1d

from ..cvx_core.reference_timestep import flow_noised_reference, reference_noise
from ..cvx_core.rope import wan_reference_slot
from ..cvx_core.token_layout import TokenLayout
from . import options
from .progress import call_sigmas
from .run_cache import cached_stream, stream_text
from .wan import CallOrder, block_call, to_heads

ROPE_ATTR = "diffusion_model.rope_encode"
# (reference frames in front of the video, reference_rope) of the current two-way model call, read by WanRope.
ROPE_KEY = "customvideox_wan_reference_rope"


class WanRope:
    """Replaces ``WanModel.rope_encode`` on the patched clone: with :data:`ROPE_KEY` in the call's options, the
    leading reference frames all get their slot and the video keeps 0..T-1; otherwise the host's own."""

    def __init__(self, prev):
        self.prev = prev  # the host's bound rope_encode, or another patch's

    def __call__(self, t, h, w, *args, transformer_options: dict | None = None, **kwargs):
        opts = transformer_options or {}
        spec = opts.get(ROPE_KEY)
        if spec is None or args or kwargs.get("source_id"):
            return self.prev(t, h, w, *args, transformer_options=opts, **kwargs)
        refs, ref_rope = spec
        video = self.prev(t - refs, h, w, transformer_options=opts, **kwargs)
        ref = reference_freqs(self.prev, h, w, wan_reference_slot(ref_rope, t - refs), opts, **kwargs)
        return torch.cat([ref] * refs + [video], dim=1)


def reference_freqs(rope_encode, h: int, w: int, slot: float, opts: dict, **kwargs) -> torch.Tensor:
    """The RoPE table of one reference frame at temporal index ``slot`` (in frames; the host's ``rope_options``
    scale and shift apply as to the video's)."""
    kwargs.pop("t_start", None)
    scale = (opts.get("rope_options") or {}).get("scale_t", 1.0)
    return rope_encode(1, h, w, t_start=slot * scale, transformer_options=opts, **kwargs)


def install_rope(model: Any) -> None:
    """Give ``model`` (a clone) :class:`WanRope` once, chaining any rope_encode patch already on it."""
    prev = model.get_model_object(ROPE_ATTR)
    if not isinstance(prev, WanRope):
        model.add_object_patch(ROPE_ATTR, WanRope(prev))


def with_rope(transformer_options: dict, refs: int, ref_rope: str) -> dict:
    return {**transformer_options, ROPE_KEY: (refs, ref_rope)}


def owners(entries: list, n_refs: int) -> list[tuple[Any, int]]:
    """Per inserted reference: its entry and its index among the entry's references."""
    out = []
    for i in range(n_refs):
        e = next(e for e in entries if e.frames is not None and e.frames[0] <= i < e.frames[1])
        out.append((e, i - e.frames[0]))
    return out


def _noise(entry, j: int, ref: torch.Tensor) -> torch.Tensor:
    """The fixed noise of the entry's j-th reference (one draw per entry, as on CogVideoX)."""
    n = entry.frames[1] - entry.frames[0]
    return reference_noise((n, *ref.shape[1:]))[j:j + 1]


def two_way_inputs(entries: list, inserted: list[torch.Tensor], x: torch.Tensor,
                   transformer_options: dict) -> list[torch.Tensor]:
    """The references as the model's input sees them, ``[B, C, 1, h, w]`` each: clean, or noised to each row's
    sigma (``reference_timestep`` 'noised')."""
    sigmas = None
    out = []
    for ref, (e, j) in zip(inserted, owners(entries, len(inserted))):
        r = ref.to(x.device, torch.float32)
        if e.reference_timestep == "noised":
            sigmas = call_sigmas(transformer_options, x.shape[0]) if sigmas is None else sigmas
            r = flow_noised_reference(r, sigmas, _noise(e, j, ref).to(x.device))
        out.append(r.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1))
    return out


def one_way_layout(x: torch.Tensor, refs: int) -> TokenLayout:
    """The video's self-attention with ``refs`` cached reference frames in front of its keys only."""
    _, _, t, h, w = x.shape
    grid = (t, (h + 1) // 2, (w + 1) // 2)
    return TokenLayout(text=0, refs=(grid[1] * grid[2],) * refs, grid=grid, refs_in_queries=False)


class _Capture:
    """The stream's attention override: keeps each block's self-attention K/V (heads layout), then attends
    through whatever override the model already has (the pack's own passes through without its state)."""

    def __init__(self, prev):
        self.prev, self.order = prev, CallOrder()
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, func, q, k, v, *args, **kwargs):
        _, is_self, _ = self.order.next(kwargs.get("transformer_options") or {})
        if is_self:
            heads = kwargs["heads"] if "heads" in kwargs else args[0]
            self.kv.append((to_heads(k, heads), to_heads(v, heads)))
        if self.prev is not None:
            return self.prev(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)


def reference_stream_kv(dm: WanModel, latent: torch.Tensor, text: torch.Tensor, slot: float, timestep: torch.Tensor,
                        transformer_options: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one reference ``[1, C, 1, h, w]`` (model input space) alone through every block at ``timestep``
    (``[1]``) with ``text`` (``[1, L, D]``, before the text embedding), its RoPE at ``slot``; return per block
    its self-attention ``(K, V)``, each ``[1, H, h*w, D]``. The steps of ``WanModel.forward_orig`` for a
    plain text-to-video call, so the reference's tokens are exactly what they would be as leading frames of
    a call in which nothing else attends."""
    opts = {key: val for key, val in transformer_options.items()
            if key not in (options.FRAMES_STATE_KEY, ROPE_KEY)}
    capture = _Capture(opts.get(options.ATTENTION_OVERRIDE_KEY))
    opts.update({options.ATTENTION_OVERRIDE_KEY: capture, options.REFERENCE_STREAM_KEY: True})
    _, _, _, h, w = latent.shape
    x = common_dit.pad_to_patch_size(latent, dm.patch_size)
    freqs = reference_freqs(dm.rope_encode, h, w, slot, opts, device=x.device, dtype=x.dtype)
    hidden = dm.patch_embedding(x.float()).to(x.dtype).flatten(2).transpose(1, 2)
    e = dm.time_embedding(sinusoidal_embedding_1d(dm.freq_dim, timestep.flatten()).to(dtype=x.dtype))
    e0 = dm.time_projection(e.reshape(1, -1, e.shape[-1])).unflatten(2, (6, dm.dim))
    context = dm.text_embedding(text)
    opts["total_blocks"] = len(dm.blocks)
    replaces = opts.get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(dm.blocks):
        opts["block_index"] = i
        replace = replaces.get(("double_block", i))
        if replace is None:
            hidden = block(hidden, e=e0, freqs=freqs, context=context, context_img_len=None, transformer_options=opts)
            continue
        # Block patches (the pack's reference adapters among them) see the pass as the host's forward shows them.
        hidden = replace({"img": hidden, "txt": context, "vec": e0, "pe": freqs, "transformer_options": opts},
                         {"original_block": block_call(block)})["img"]
    return capture.kv


def one_way_kv(dm: WanModel, entries: list, inserted: list[torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
               context: torch.Tensor, transformer_options: dict,
               cond_row: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per block, one ``(K, V)`` per inserted reference in order, from each reference's own stream (cached in
    the run: per run with 'clean', per timestep otherwise)."""
    text = stream_text(transformer_options, context, cond_row)
    slot = wan_reference_slot(entries[0].ref_rope, x.shape[2])
    # The row's timestep (Wan 2.2 TI2V gives one per token: its noisiest, the video's own).
    t_row = timestep.reshape(x.shape[0], -1)[cond_row].max().reshape(1)
    per_ref = []
    for i, (ref, (e, j)) in enumerate(zip(inserted, owners(entries, len(inserted)))):
        r, t_ref, when = ref.to(x.device, torch.float32), torch.zeros_like(t_row), None
        if e.reference_timestep != "clean":
            t_ref, when = t_row, (float(t_row),)
            if e.reference_timestep == "noised":
                sigma = call_sigmas(transformer_options, x.shape[0])[cond_row:cond_row + 1]
                r = flow_noised_reference(r, sigma, _noise(e, j, ref).to(x.device))
                when += (float(sigma),)
        key = (id(e), i, slot, x.device, x.dtype)
        per_ref.append(cached_stream(transformer_options, key, text, when,
                                     partial(reference_stream_kv, dm, r.to(x.dtype), text, slot, t_ref,
                                             transformer_options)))
    return [[kv[b] for kv in per_ref] for b in range(len(dm.blocks))]
