"""CustomVideoXEntityRegion (ERAE): where in the video the reference is enhanced."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cvx_core.entity_region import (
    ERAE_START,
    MAP_BLOCK,
    MAP_NORMS,
    REFINE_MODES,
    REGION_MODES,
    EntityRegion,
    entity_tokens_with_tokenizer,
)
from ..cvx_core.image_ops import has_subject
from ..cvx_host.prompt_tokens import prompt_tokens
from .types import CATEGORY, CVXRegion


class CustomVideoXEntityRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXEntityRegion",
            display_name="CustomVideoX Entity Region (ERAE)",
            category=CATEGORY,
            description="Entity region-aware enhancement: raise the reference bias where the subject is, found "
                        "from the subject's words in the prompt (auto) or from a mask you draw.",
            inputs=[
                io.Combo.Input("mode", options=list(REGION_MODES), default="auto",
                               tooltip="auto: from the attention to the subject word(s); mask: from the MASK input."),
                io.Float.Input("lam", display_name="lambda", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Extra bias where the map is 1 (added to TAB's bias on reference keys)."),
                io.Int.Input("map_block", default=MAP_BLOCK, min=0, max=99,
                             tooltip="auto: the (first) block whose attention gives the map; later blocks use "
                                     "it. Its last map block must be below the Apply node's last block (41 for "
                                     "5B, 29 for 2B)."),
                io.Combo.Input("refine", options=list(REFINE_MODES), default="soft",
                               tooltip="soft: the map as is (the paper: no hard spatial constraint); top_k: "
                                       "1 on the top fraction of each frame, else 0."),
                io.Float.Input("top_k", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="For refine=top_k: the fraction of each frame kept."),
                io.Int.Input("smooth", default=0, min=0, max=15,
                             tooltip="Spatial smoothing kernel in tokens (0 = none; odd sizes)."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="auto: the same prompt text you encode for the video."),
                io.String.Input("subject_words", default="", optional=True,
                                tooltip="auto: the subject's word(s) in the prompt, comma-separated (e.g. 'corgi, dog')."),
                io.Clip.Input("clip", optional=True, tooltip="auto: the T5 CLIP (CogVideoX) or umT5 CLIP (Wan), used only "
                                                           "to tokenise the prompt."),
                io.Mask.Input("mask", optional=True, tooltip="mask: where the subject should be (any size with the "
                                                            "video's aspect ratio; 1 frame, or one per video "
                                                            "frame)."),
                io.Float.Input("start_percent", default=ERAE_START, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Sampling progress (0 = first step, 1 = last) from which the region bias "
                                       "applies. The first steps' latent is nearly pure noise, so an auto map "
                                       "read from it would be noise; 0 = from the first step."),
                io.Int.Input("map_blocks", default=1, min=1, max=16, optional=True, advanced=True,
                             tooltip="auto: average the map over this many consecutive blocks from map_block "
                                     "(steadier map; the blocks after the last one use it)."),
                io.Combo.Input("normalize", options=list(MAP_NORMS), default="relative", optional=True,
                               advanced=True,
                               tooltip="auto: relative = excess over the frame's mean attention (a flat frame "
                                       "gives no region; twice the mean or more gives the full lambda); minmax "
                                       "= stretch each frame to 0..1 (also a nearly flat one)."),
            ],
            outputs=[
                CVXRegion.Output(display_name="region"),
                io.Mask.Output(display_name="map", tooltip="mask mode: the mask as used; auto mode: empty "
                                                          "(the map is made during sampling)."),
            ],
        )

    @classmethod
    def execute(cls, mode, lam, map_block, refine, top_k, smooth, prompt="", subject_words="", clip=None,
                mask=None, start_percent=ERAE_START, map_blocks=1, normalize="relative") -> io.NodeOutput:
        common = dict(lam=lam, map_block=map_block, refine=refine, top_k=top_k, smooth=smooth,
                      start_percent=start_percent, map_blocks=map_blocks, norm=normalize)
        if mode == "mask":
            if mask is None:
                raise ValueError("CustomVideoXEntityRegion mask: mode is 'mask' but no MASK is connected: connect "
                                 "one, or use auto mode")
            m = mask.float()
            if m.ndim == 2:
                m = m[None]
            if not has_subject(m):
                raise ValueError("CustomVideoXEntityRegion mask: the mask is empty (all zeros): paint the subject's "
                                 "region, or use auto mode")
            return io.NodeOutput(EntityRegion(mode="mask", mask=m.cpu(), **common), m)
        if clip is None or not prompt.strip() or not subject_words.strip():
            raise ValueError("CustomVideoXEntityRegion: auto mode needs the CLIP, the prompt and the subject "
                             "word(s); or use mask mode")
        words = [w.strip() for w in subject_words.split(",") if w.strip()]
        ids, hf = prompt_tokens(clip, prompt, "CustomVideoXEntityRegion")
        try:
            idx = entity_tokens_with_tokenizer(ids, words, hf, prompt=prompt)
        except ValueError as e:
            raise ValueError(f"CustomVideoXEntityRegion subject_words: {e}") from e
        return io.NodeOutput(EntityRegion(mode="auto", entity_idx=tuple(idx), **common), torch.zeros(1, 64, 64))
