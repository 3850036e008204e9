"""CustomVideoXReferenceFramesBias: TAB/ERAE on the reference frames of a native Wan Phantom or VACE run."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..cvx_core.image_ops import has_subject
from ..cvx_host.entries import check_blocks
from ..cvx_host.errors import PatchError
from ..cvx_host.frames_patch import NODE, FramesEntry, apply_frames_bias
from ..cvx_host.wan import check_wan, is_vace
from .types import CATEGORY, CVXRegion, CVXSchedule


class CustomVideoXReferenceFramesBias(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="CustomVideoX Reference Frames Bias (Wan Phantom/VACE)",
            category=CATEGORY,
            description="TAB and ERAE on the reference frames a Wan Phantom or VACE graph already gives the "
                        "model: biases the video's attention to those frames (a patched copy of the MODEL; the "
                        "input MODEL is unchanged). Adds no tokens. Chain several: their biases add.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1/2.2 Phantom (or text-to-video) or VACE MODEL."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Reference attention weight: bias log(strength). 1 = the model's own "
                                       "attention (exactly the unpatched run), 0 = reference frames ignored."),
                io.Int.Input("leading_frames", default=0, min=0, max=64,
                             tooltip="VACE: reference latent frames in front of the video; connect "
                                     "WanVaceToVideo's trim_latent. Phantom: 0 (its reference frames are found "
                                     "in the conditioning)."),
                CVXSchedule.Input("schedule", optional=True,
                                  tooltip="Optional TAB schedule: bias over sampling progress, added to strength's."),
                CVXRegion.Input("region", optional=True,
                                tooltip="Optional ERAE region: extra bias where the subject is (auto: from the "
                                        "video-to-text cross-attention at map_block; or a mask)."),
                io.Int.Input("block_start", default=0, min=0, max=99,
                             tooltip="First Wan block whose self-attention gets the bias.", advanced=True),
                io.Int.Input("block_end", default=-1, min=-1, max=99,
                             tooltip="Last Wan block that gets the bias (-1 = the last block). Blocks outside "
                                     "keep the model's own attention.", advanced=True),
                io.Boolean.Input("apply_to_uncond", default=True,
                                 tooltip="Also bias the negative (uncond) pass. Off leaves the negative pass "
                                         "exactly as the graph built it."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="Optional subject mask of the reference image(s) (1 = subject; one per image "
                                      "in order, or one for all; any size, at the reference image's aspect). The "
                                      "reference tokens outside the subject get background_strength. LoadImage's "
                                      "mask of a cut-out is 1 on the background: put InvertMask after it."),
                io.Float.Input("background_strength", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="With reference_mask: weight of the reference's background tokens relative "
                                       "to its subject (bias log of it). 0 = hidden, so the background cannot "
                                       "leak; 1 = like the subject (the mask has no effect)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, strength, leading_frames, block_start, block_end, apply_to_uncond,
                background_strength=0.0, schedule=None, region=None, reference_mask=None) -> io.NodeOutput:
        dm = check_wan(model, NODE)
        if is_vace(dm) and leading_frames == 0:
            raise PatchError(f"{NODE}: the MODEL is Wan VACE but leading_frames is 0: connect WanVaceToVideo's "
                             f"trim_latent to leading_frames (the VACE reference frame sits in front of the video)")
        entry = FramesEntry(strength=strength, schedule=schedule, region=region, block_start=block_start,
                            block_end=block_end, apply_to_uncond=apply_to_uncond, leading_frames=leading_frames,
                            reference_mask=_subject_masks(reference_mask),
                            background_bias=math.log(background_strength) if background_strength > 0 else -math.inf)
        check_blocks(len(dm.blocks), entry, NODE)
        return io.NodeOutput(apply_frames_bias(model, entry))


def _subject_masks(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[N, H, W]`` on the CPU (mapped onto each run's token grid later), or None."""
    if mask is None:
        return None
    m = mask.float()
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3:
        raise PatchError(f"{NODE}: reference_mask has shape {tuple(mask.shape)}; expected a MASK [N, H, W]")
    if not has_subject(m):
        raise PatchError(f"{NODE}: reference_mask is empty (all zeros), which would hide the whole reference: paint "
                         f"the subject white (1), or disconnect the mask")
    return m.detach().cpu().clone()
