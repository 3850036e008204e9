"""CogVideoX (1.0 and 1.5, text-to-video) behind the backbone seam: the host's ``comfy.ldm.cogvideo``.

One joint attention per block over ``[text | video]``; the pack inserts the reference frames in front of
the video on T, so the sequence becomes ``[text | references | video]``. The host numbers every frame of
its input from 0, which would shift the video's temporal RoPE positions when references are in front:
an object patch of ``diffusion_model._get_rotary_emb`` (:class:`RotaryPatch`) keeps the video at 0..T-1
and gives the references their own slot (DESIGN.md §1.1). There is no per-block hook and no block index
in CogVideoX: the attention calls of one forward are counted (one per block).
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import comfy.ldm.cogvideo.model as cogvideo
import comfy.ldm.common_dit as common_dit
import torch

from ..cvx_core import rope
from ..cvx_core.token_layout import TokenLayout
from . import options
from .backbone import first_frame_in_latent_format, register
from .errors import PatchError

log = logging.getLogger("customvideox")

ROTARY_ATTR = "diffusion_model._get_rotary_emb"
# Reference token frames in front of the video during the current model call (set around the forward,
# read by RotaryPatch: the host's rotary builder takes no transformer_options).
_ref_frames: contextvars.ContextVar[tuple[int, str]] = contextvars.ContextVar("cvx_ref_frames", default=(0, "negative"))


class RotaryPatch:
    """Replaces the host's ``_get_rotary_emb``: exact or host spatial positions, references first."""

    def __init__(self, dm: torch.nn.Module, spatial: str, base_hw: tuple[int, int] | None = None):
        """``base_hw``: the training grid in tokens (a diffusers config's sample size // patch size);
        default: the host's (its detection never reads a config)."""
        if spatial not in rope.SPATIAL_MODES:
            raise PatchError(f"CustomVideoXModelLoader rope: RoPE mode {spatial!r} is not one of {rope.SPATIAL_MODES}")
        self.spatial = spatial
        self.head_dim = dm.attention_head_dim
        self.temporal_patch = dm.patch_size_t is not None
        self.base_hw = base_hw or (dm.patch_embed.sample_height // dm.patch_size,
                                   dm.patch_embed.sample_width // dm.patch_size)
        self.scale = dm.spatial_interpolation_scale

    def table(self, h: int, w: int, ref_frames: int, video_frames: int, ref_rope: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        hp, wp = rope.spatial_positions(h, w, temporal_patch=self.temporal_patch, spatial=self.spatial,
                                        base_hw=self.base_hw, interpolation_scale=self.scale, device=device)
        tp = rope.temporal_positions(ref_frames, video_frames, ref_rope, device=device)
        return rope.rotary_table(self.head_dim, tp, hp, wp,
                                 unrotated_frames=ref_frames if ref_rope == "none" else 0)

    def __call__(self, h: int, w: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ref_frames, ref_rope = _ref_frames.get()
        return self.table(h, w, ref_frames, t - ref_frames, ref_rope, device)


def install_rotary(model, spatial: str, base_hw: tuple[int, int] | None = None):
    """Return a clone of ``model`` whose rotary positions follow ``spatial`` ("exact"/"host"), on the
    training grid ``base_hw`` (tokens; default: the host's)."""
    m = model.clone()
    m.add_object_patch(ROTARY_ATTR, RotaryPatch(m.get_model_object("diffusion_model"), spatial, base_hw))
    return m


def _timestep_embedding(dm, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t_emb = cogvideo.get_timestep_embedding(timestep, dm.time_proj_dim, dm.time_proj_flip, dm.time_proj_shift)
    return dm.time_embedding_linear_2(dm.time_embedding_act(dm.time_embedding_linear_1(t_emb.to(dtype))))


def reference_stream_kv(dm, latent: torch.Tensor, context: torch.Tensor, ref_rope: str, rotary: RotaryPatch,
                        ofs: torch.Tensor | None, block_opts: dict | None = None,
                        timestep: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One-way mode: run ``[text | reference]`` through every block at ``timestep`` (``[1]``; None = 0,
    clean) and keep each block's reference K/V (post-RoPE).

    Returns per block a pair of ``[1, H, N*R, D]`` tensors. The references attend to themselves and
    the text only, so this depends on the step only through ``timestep`` (and a noised ``latent``).
    ``block_opts``: the model call's transformer_options, passed on to the blocks (with this
    pass's attention override and :data:`options.REFERENCE_STREAM_KEY`) so block patches see them.
    """
    n, _, f, h, w = latent.shape
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in dm.blocks]
    for i in range(n):
        x = latent[i:i + 1].permute(0, 2, 1, 3, 4)
        hidden = dm.patch_embed(context, x)
        text = context.shape[1]
        enc, hid = hidden[:, :text], hidden[:, text:]
        t = torch.zeros(1, device=x.device) if timestep is None else timestep.reshape(1).to(x.device)
        temb = _timestep_embedding(dm, t, x.dtype)
        if dm.ofs_embedding_linear_1 is not None and ofs is not None:
            o = cogvideo.get_timestep_embedding(ofs[:1], dm.ofs_proj_dim, dm.time_proj_flip, dm.time_proj_shift)
            temb = temb + dm.ofs_embedding_linear_2(dm.ofs_embedding_act(dm.ofs_embedding_linear_1(o.to(x.dtype))))
        frames = f // (dm.patch_size_t or 1)
        rot = rotary.table(h // dm.patch_size, w // dm.patch_size, frames, 0, ref_rope, x.device) \
            if dm.use_rotary_positional_embeddings else None

        def capture(func, q, k, v, *args, _text=text, **kw):
            heads = kw.get("heads", args[0] if args else None)
            b, s, _ = k.shape
            kv_k = k.view(b, s, heads, -1).transpose(1, 2)[:, :, _text:]
            kv_v = v.view(b, s, heads, -1).transpose(1, 2)[:, :, _text:]
            kv[capture.block].append((kv_k, kv_v))
            capture.block += 1
            return func(q, k, v, *args, **kw)

        capture.block = 0
        opts = {**(block_opts or {}), "optimized_attention_override": capture, options.REFERENCE_STREAM_KEY: True}
        for block in dm.blocks:
            hid, enc = block(hidden_states=hid, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rot,
                             transformer_options=opts)
    return [(torch.cat([p[0] for p in blk], dim=2), torch.cat([p[1] for p in blk], dim=2)) for blk in kv]


@register
class CogVideoX:
    """The CogVideoX implementation of :class:`.backbone.InsertsReferences`."""

    family = "CogVideoX"

    def __init__(self, dm: cogvideo.CogVideoXTransformer3DModel):
        self.dm = dm
        self.num_blocks = len(dm.blocks)
        self.patch_t = dm.patch_size_t or 1

    @classmethod
    def recognises(cls, dm: torch.nn.Module) -> bool:
        return isinstance(dm, cogvideo.CogVideoXTransformer3DModel)

    @classmethod
    def for_model(cls, model: Any, node: str) -> CogVideoX:
        """The backbone of a text-to-video CogVideoX MODEL, or a clear error naming ``node``."""
        dm = model.get_model_object("diffusion_model")
        if not cls.recognises(dm):
            raise PatchError(f"{node}: the MODEL is a {type(dm).__name__} ({type(model.model).__name__}), not "
                             f"CogVideoX: load a CogVideoX transformer (CustomVideoXModelLoader or UNETLoader); "
                             f"for Wan Phantom/VACE use CustomVideoXReferenceFramesBias")
        if dm.in_channels != dm.out_channels:
            raise PatchError(f"{node}: the MODEL is a CogVideoX that takes {dm.in_channels} input channels "
                             f"(image-to-video or inpainting); CustomVideoX needs a text-to-video CogVideoX "
                             f"({dm.out_channels} channels)")
        return cls(dm)

    def prepare_reference(self, model: Any, latent: torch.Tensor, node: str) -> torch.Tensor:
        latent = first_frame_in_latent_format(model, latent, node, "its CogVideoX VAE")
        # CogVideoX 1.5 patches 2 latent frames together: the still reference fills both.
        return latent.repeat(1, 1, self.patch_t, 1, 1)

    def check_call(self, entries: Sequence[Any], x: torch.Tensor, context: torch.Tensor) -> None:
        """Checks that need the video, so run at the sampler: each message starts with the pack node and the
        input to change, as the host attributes the error to the sampler node."""
        _, c, t, h, w = x.shape
        if h % self.dm.patch_size or w % self.dm.patch_size:
            raise PatchError(f"CustomVideoXReferenceEncode width/height: the video (the sampler's latent) is "
                             f"{w * 8}x{h * 8} pixels; with a reference, width and height must be multiples of "
                             f"{8 * self.dm.patch_size}: set the empty latent node to such a size (e.g. 720x480) and "
                             f"CustomVideoXReferenceEncode's width/height to the same")
        for e in entries:
            _, rc, _, rh, rw = e.latent.shape
            if rc != c:
                raise PatchError(f"CustomVideoXReferenceEncode vae: the reference latent has {rc} channels, the model "
                                 f"takes {c}: encode the reference with this model's CogVideoX VAE")
            if (rh, rw) != (h, w):
                raise PatchError(f"CustomVideoXReferenceEncode width/height: the reference was encoded at "
                                 f"{rw * 8}x{rh * 8} pixels but the video is {w * 8}x{h * 8}: set "
                                 f"CustomVideoXReferenceEncode's width/height to the video's")
            r = e.region
            if r is not None and r.mode == "auto" and max(r.entity_idx) >= context.shape[1]:
                raise PatchError(f"CustomVideoXEntityRegion subject_words: the subject's words are at text tokens "
                                 f"up to {max(r.entity_idx)} of the region's prompt, but the sampler's conditioning "
                                 f"has {context.shape[1]} text tokens: encode the same prompt with the T5 CLIP "
                                 f"(CLIPLoader type cogvideox) that the region node tokenises with")

    def layout(self, x: torch.Tensor, context: torch.Tensor, reference_latents: Sequence[torch.Tensor],
               one_way: bool) -> TokenLayout:
        dm = self.dm
        _, _, t, h, w = x.shape
        grid = (math.ceil(t / self.patch_t), h // dm.patch_size, w // dm.patch_size)
        per_frame = grid[1] * grid[2]
        refs = tuple(per_frame * (r.shape[2] // self.patch_t) for r in reference_latents)
        return TokenLayout(text=context.shape[1], refs=refs, grid=grid, refs_in_queries=not one_way)

    def forward_with_references(self, executor: Callable, x: torch.Tensor, references: Sequence[torch.Tensor],
                                ref_rope: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``executor(x, *args, **kwargs)`` with the references in front of the video on T.

        CogVideoX 1.5 pads an odd frame count to its temporal patch circularly, i.e. with the sequence's
        first frame: with references in front that would be a reference frame instead of the video's own
        first frame. So the video is padded here, as the host pads it alone, before the references go in."""
        frames = x.shape[2]
        x = common_dit.pad_to_patch_size(x, (self.patch_t, 1, 1))
        ref_frames = sum(r.shape[2] for r in references)
        token = _ref_frames.set((ref_frames // self.patch_t, ref_rope))
        try:
            out = executor(torch.cat([*references, x], dim=2), *args, **kwargs)
        finally:
            _ref_frames.reset(token)
        return out[:, :, ref_frames:ref_frames + frames]

    def rotary(self) -> RotaryPatch:
        rot = self.dm._get_rotary_emb
        return rot if isinstance(rot, RotaryPatch) else RotaryPatch(self.dm, "host")

    def reference_stream(self, latent: torch.Tensor, text: torch.Tensor, ref_rope: str, ofs: torch.Tensor | None,
                         block_opts: dict, timestep: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return reference_stream_kv(self.dm, latent, text, ref_rope, self.rotary(), ofs, block_opts=block_opts,
                                   timestep=timestep)

    def next_block(self, state: Any, opts: dict) -> int:
        return state.next_block()

    @staticmethod
    def install(model: Any) -> None:
        """Give ``model`` (a clone) the pack's RoPE table, keeping a loader's RotaryPatch (its mode)."""
        existing = model.object_patches.get(ROTARY_ATTR)
        if isinstance(existing, RotaryPatch):
            return
        if existing is not None:
            log.warning("CustomVideoX: replacing another patch of %s (%r) with the pack's RoPE table",
                        ROTARY_ATTR, existing)
        model.add_object_patch(ROTARY_ATTR, RotaryPatch(model.get_model_object("diffusion_model"), "host"))
