"""CustomVideoXTABSchedule: the time-aware reference bias curve, and a plot of it."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cvx_core.plots import tab_curves_image
from ..cvx_core.tab_schedule import CURVES, OUTSIDE_MODES, PROGRESS_MODES, TABSchedule, parse_keyframes
from .types import CATEGORY, CVXSchedule


class CustomVideoXTABSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXTABSchedule",
            display_name="CustomVideoX TAB Schedule",
            category=CATEGORY,
            description="Time-aware reference bias (TAB): how strongly the video attends to the reference over "
                        "the sampling run. Bias b is added to the reference's attention logits, i.e. multiplies "
                        "its attention weight by e^b (0 = unchanged); it adds to Apply's log(strength).",
            inputs=[
                io.Combo.Input("curve", options=list(CURVES), default="parabolic",
                               tooltip="parabolic: low at start and end, b_max in the middle (the paper's TAB); "
                                       "fixed: b_max throughout; linear ramps; keyframes: your own curve."),
                io.Float.Input("b_min", default=-1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Bias at the ends of the curve (0 = unchanged attention, -1 = weight "
                                       "x0.37). With the default b_max 0.5 the parabola's mean is 0."),
                io.Float.Input("b_max", default=0.5, min=-10.0, max=10.0, step=0.05,
                               tooltip="Bias at the peak (0.5 = reference weight x1.65, 1.0 = x2.7). Too high "
                                       "kills motion."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where the curve starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where the curve ends (1 = last step)."),
                io.Combo.Input("outside", options=list(OUTSIDE_MODES), default="base",
                               tooltip="Outside start/end: 'base' keeps the reference at plain strength, "
                                       "'off' switches it off."),
                io.String.Input("keyframes", default="0:0, 0.5:1, 1:0", multiline=False,
                                tooltip="For curve=keyframes: 'progress:bias' pairs inside the window, e.g. "
                                        "'0:0, 0.5:1, 1:0'. 'off' as a bias switches the reference off."),
                io.Combo.Input("progress", options=list(PROGRESS_MODES), default="steps", optional=True,
                               tooltip="How progress is measured. steps: from the first model call (0) to the "
                                       "last (1) of each sampler run, whatever the step count or scheduler. "
                                       "noise: by noise level over the model's whole range (as core "
                                       "start/end percent), so a run split over two samplers (start/end steps, "
                                       "high/low-noise experts) continues one curve instead of restarting."),
            ],
            outputs=[
                CVXSchedule.Output(display_name="schedule"),
                io.Image.Output(display_name="plot", tooltip="Bias b over sampling progress (a matplotlib chart)."),
            ],
        )

    @classmethod
    def execute(cls, curve, b_min, b_max, start_percent, end_percent, outside, keyframes,
                progress: str = "steps") -> io.NodeOutput:
        try:
            kf = parse_keyframes(keyframes) if curve == "keyframes" else ()
        except ValueError as e:
            raise ValueError(f"CustomVideoXTABSchedule: keyframes: {e}") from e
        schedule = TABSchedule(curve=curve, b_min=b_min, b_max=b_max, start_percent=start_percent,
                               end_percent=end_percent, outside=outside, keyframes=kf, progress=progress)
        plot = torch.from_numpy(tab_curves_image([(curve, schedule)])).float().div(255.0)[None]
        return io.NodeOutput(schedule, plot)
