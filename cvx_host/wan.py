"""What the pack needs to know about the host's native Wan DiT (``comfy.ldm.wan.model``), in one place.

* Which Wan models are handled: ``WanModel`` text-to-video (Wan 2.1/2.2 T2V, TI2V-5B, Phantom) and
  ``VaceWanModel``. Image-to-video (also Wan 2.2 I2V A14B and the Fun models, which load as text-to-video
  with extra input channels) and the other variants raise a clear error naming them.
* Where reference frames sit in a model call: Phantom's ``time_dim_concat`` frames are appended after
  the video (the DIFFUSION_MODEL wrapper receives them as an argument); VACE's reference frame(s) are
  the leading latent frames of ``x`` (how many is a setting: the graph's ``trim_latent``).
* Which attention call is which: every Wan block calls ``optimized_attention`` for its
  self-attention (video tokens, RoPE applied) and then for its text cross-attention; a VACE block
  at the same ``block_index`` does the same after the main block. So within one block index the
  calls alternate self, cross, self, cross — the order of ``WanAttentionBlock.forward``. The shapes
  are checked too (self: as many keys as queries, all of the layout's tokens).
* Patch size: one latent frame per token frame (``patch_size[0] == 1``), 2x2 spatial patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from comfy.ldm.wan.model import VaceWanModel, WanModel, WanT2VCrossAttention
from comfy.model_base import WAN21, WAN22, WAN21_Vace

from ..cvx_core.frame_layout import FrameLayout, frame_layout
from ..cvx_core.token_layout import TokenLayout
from .backbone import first_frame_in_latent_format, register
from .errors import PatchError

# The host classes (DiT and model wrapper) of the Wan models the pack handles; any other is named in the error.
_HANDLED = (WanModel, VaceWanModel)
_HANDLED_BASES = (WAN21, WAN22, WAN21_Vace)


def check_wan(model, node: str) -> WanModel:
    """The model's Wan DiT (T2V or VACE), or a clear error naming ``node`` and what was given."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, WanModel):
        raise PatchError(f"{node}: the MODEL is a {type(dm).__name__} ({type(model.model).__name__}), not Wan: "
                         f"load a Wan 2.1/2.2 text-to-video, Phantom or VACE model with UNETLoader")
    if type(dm) not in _HANDLED or type(model.model) not in _HANDLED_BASES:
        raise PatchError(f"{node}: the MODEL is a Wan variant the pack does not handle yet "
                         f"({type(dm).__name__}, {type(model.model).__name__}); handled: Wan 2.1/2.2 "
                         f"text-to-video (incl. Phantom and TI2V-5B) and VACE")
    if not isinstance(dm.blocks[0].cross_attn, WanT2VCrossAttention) or dm.model_type != "t2v":
        raise PatchError(f"{node}: the MODEL is Wan image-to-video ({type(model.model).__name__}), which the "
                         f"pack does not handle yet; use a Wan text-to-video, Phantom or VACE model")
    ref_conv = getattr(dm, "ref_conv", None) is not None
    if dm.in_dim != dm.out_dim or ref_conv:
        # Wan 2.2 I2V A14B and the Fun inpaint/control models load as text-to-video but take image, mask or
        # control channels (or a reference image) beside the video latent.
        raise PatchError(f"{node}: the MODEL takes {dm.in_dim} input channels for a {dm.out_dim}-channel video "
                         f"latent{' and a reference image' if ref_conv else ''} (Wan 2.2 "
                         f"image-to-video or a Fun inpaint/control model), which the pack does not handle yet; "
                         f"use a Wan text-to-video, Phantom or VACE model")
    if tuple(dm.patch_size) != (1, 2, 2):
        raise PatchError(f"{node}: the Wan MODEL has patch size {tuple(dm.patch_size)}; expected (1, 2, 2)")
    return dm


def is_vace(dm: WanModel) -> bool:
    return isinstance(dm, VaceWanModel)


def call_layout(x: torch.Tensor, time_dim_concat: torch.Tensor | None, leading: int, node: str) -> FrameLayout:
    """The self-attention layout of one model call: video tokens and the reference frames' tokens.

    ``x``: the latent ``[B, C, T, H, W]`` the wrapper receives; ``time_dim_concat``: Phantom's frames
    (appended after the video by the host); ``leading``: VACE's reference frames at the front of ``x``.
    """
    _, _, t, h, w = x.shape
    hw = ((h + 1) // 2, (w + 1) // 2)  # the host pads H and W to the 2x2 patch
    trailing = 0 if time_dim_concat is None else int(time_dim_concat.shape[2])
    if trailing and leading:
        raise PatchError(f"{node}: this model call has {trailing} Phantom reference frame(s) after the video and "
                         f"leading_frames={leading} in front; use one kind: leading_frames 0 for Phantom")
    if not trailing and not leading:
        raise PatchError(f"{node}: this model call has no reference frames: build the conditioning with "
                         f"WanPhantomSubjectToVideo (with images), or with WanVaceToVideo (with a reference_image) "
                         f"and connect its trim_latent to leading_frames")
    if leading >= t:
        raise PatchError(f"{node}: leading_frames={leading} but the latent has only {t} frames: connect "
                         f"WanVaceToVideo's trim_latent (1 with a reference_image)")
    if trailing:
        return frame_layout((t, *hw), trailing, after_video=True)
    return frame_layout((t - leading, *hw), leading, after_video=False)


def timestep_with_references(timestep: torch.Tensor, refs: int, frames: int, node: str) -> torch.Tensor:
    """The timestep of a model call whose ``frames`` video latent frames get ``refs`` reference frames in front.

    One timestep per row is every token's already. Wan 2.2 (``WAN22``) with a denoise mask gives one per
    latent frame ``[B, T]`` (0 on a given start image), which the host repeats over each frame's tokens: the
    references get the row's sampling timestep (its largest, a frame being generated) in front, so every
    video frame keeps its own."""
    if timestep.ndim < 2 or timestep.shape[1] == 1:
        return timestep
    if timestep.shape[1] != frames:
        raise PatchError(f"{node}: this model call has {timestep.shape[1]} timesteps per row for {frames} latent "
                         f"frames; the inserted reference needs one per row or one per latent frame")
    return torch.cat([timestep.amax(1, keepdim=True).expand(-1, refs), timestep], dim=1)


@dataclass
class CallOrder:
    """Tells self- from cross-attention calls by their order within each ``block_index``."""

    block: int = -1
    count: int = 0

    def next(self, transformer_options: dict) -> tuple[int, bool, int]:
        """``(block, is_self, branch)`` of this call; branch 0 = the main block, 1 = its VACE block."""
        block = int(transformer_options.get("block_index", -1))
        if block != self.block:
            self.block, self.count = block, 0
        n = self.count
        self.count += 1
        return block, n % 2 == 0, n // 2


def check_self_call(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, block: int, node: str) -> None:
    # One-way references are keys only, and joined to the call's keys by the patch: the call has the queries'.
    keys = layout.keys if layout.refs_in_queries else layout.queries
    if q.shape[1] != layout.queries or k.shape[1] != keys:
        raise PatchError(f"{node}: block {block}'s self-attention has {q.shape[1]} queries / {k.shape[1]} keys, "
                         f"expected {layout.queries} (video and reference frames); another patch may be calling "
                         f"attention inside the Wan blocks")


def block_call(block) -> Callable[[dict], dict]:
    """The ``original_block`` a ``("dit", "double_block", i)`` replace receives, bound to ``block`` itself (the
    host's own refers to its loop variable when it runs, so a later call, e.g. a checkpoint recompute in
    backward, would run the last block). Text-to-video: no CLIP image context."""
    def run(a: dict) -> dict:
        return {"img": block(a["img"], context=a["txt"], e=a["vec"], freqs=a["pe"], context_img_len=None,
                             transformer_options=a["transformer_options"])}
    return run


def to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, H*D]`` -> ``[B, H, S, D]`` (the host's default layout for optimized_attention)."""
    b, s, _ = t.shape
    return t.view(b, s, heads, -1).transpose(1, 2)


@register
class Wan:
    """The Wan implementation of :class:`.backbone.CarriesReferenceFrames` (Phantom's and VACE's frames).
    CustomVideoXApply on Wan T2V inserts references through the same frames patch (:mod:`.frames_patch`,
    :mod:`.wan_reference_stream`), not through :class:`.backbone.InsertsReferences`."""

    family = "Wan"

    def __init__(self, dm: WanModel):
        self.dm = dm
        self.num_blocks = len(dm.blocks)

    @classmethod
    def recognises(cls, dm: torch.nn.Module) -> bool:
        return isinstance(dm, WanModel)

    @classmethod
    def for_model(cls, model, node: str) -> Wan:
        return cls(check_wan(model, node))

    def prepare_reference(self, model, latent: torch.Tensor, node: str) -> torch.Tensor:
        """A reference VAE latent ``[N, C, F, H, W]`` -> frame 0 in the model's latent format ``[N, C, 1, H, W]``."""
        wide = model.get_model_object("latent_format").latent_channels == 48
        vae = ("the Wan 2.2 VAE (wan2.2_vae, 48 channels: TI2V-5B's)" if wide else
               "the Wan 2.1 VAE (wan_2.1_vae, 16 channels: Wan 2.1's and Wan 2.2 A14B's)")
        return first_frame_in_latent_format(model, latent, node, vae)

    def check_call(self, references: list[torch.Tensor], x: torch.Tensor) -> None:
        """Checks that need the video (run at the sampler; messages name the pack node and input)."""
        for r in references:
            if r.shape[1] != x.shape[1]:
                raise PatchError(f"CustomVideoXReferenceEncode vae: the reference latent has {r.shape[1]} channels, "
                                 f"the model takes {x.shape[1]}: encode the reference with this model's Wan VAE")
            if r.shape[-2:] != x.shape[-2:]:
                raise PatchError(f"CustomVideoXReferenceEncode width/height: the reference was encoded at "
                                 f"{r.shape[-1] * 8}x{r.shape[-2] * 8} pixels but the video is "
                                 f"{x.shape[-1] * 8}x{x.shape[-2] * 8}: set its width/height to the video's")

    def frames_layout(self, x: torch.Tensor, frames_after: torch.Tensor | None, leading: int,
                      node: str) -> FrameLayout:
        return call_layout(x, frames_after, leading, node)

    def attention_call(self, order: CallOrder, opts: dict) -> tuple[int, bool, int]:
        return order.next(opts)
