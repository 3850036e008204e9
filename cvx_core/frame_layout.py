"""Reference frames that a model already carries inside its video self-attention.

Some backbones are trained with the reference as extra latent frames of the video sequence itself,
with no text in that attention: Wan Phantom appends them after the video, Wan VACE puts them in
front. Their self-attention sequence is then ``[video | ref_0 .. ref_n]`` or ``[ref_0 .. ref_n |
video]``, and the reference attention maths (:mod:`.reference_attention`) applies unchanged once the
layout says where the reference columns are.

A subject mask on a reference frame hides (or weakens) the frame's background tokens: a per-key-column
bias, carried by the same ``(B, 1, 1, S)`` column mask as the strength (:func:`background_column_bias`).

Host-free: plain Python and torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_layout import TokenLayout


@dataclass(frozen=True)
class FrameLayout(TokenLayout):
    """A :class:`TokenLayout` with no text and the references before or after the video.

    ``refs_after_video``: True for ``[video | refs]`` (Phantom), False for ``[refs | video]`` (VACE).
    Queries and keys are the same tokens (``refs_in_queries`` is always True).
    """

    refs_after_video: bool = True

    def __post_init__(self) -> None:
        if self.text != 0 or not self.refs_in_queries:
            raise ValueError("FrameLayout has no text tokens and its references are also queries")

    def ref_key_span(self, i: int) -> tuple[int, int]:
        start = (self.video if self.refs_after_video else 0) + sum(self.refs[:i])
        return start, start + self.refs[i]

    @property
    def video_key_start(self) -> int:
        return 0 if self.refs_after_video else self.ref_total

    @property
    def video_query_start(self) -> int:
        return self.video_key_start


def frame_layout(grid: tuple[int, int, int], ref_frames: int, after_video: bool) -> FrameLayout:
    """The layout of a video of ``grid`` tokens ``(T, h, w)`` with ``ref_frames`` one-frame references."""
    per_frame = grid[1] * grid[2]
    return FrameLayout(text=0, refs=(per_frame,) * ref_frames, grid=grid, refs_after_video=after_video)


def row_biases(biases: Sequence[float], rows_biased: Sequence[bool], n_refs: int,
               device: torch.device | None = None, unbiased: Sequence[float] | None = None) -> torch.Tensor:
    """Per-row, per-reference logit biases ``[B, n_refs]``.

    ``biases[i]``: the bias of reference i (strength and schedule); rows whose ``rows_biased`` is False
    get ``unbiased[i]`` (default 0: the attention the model computes without this pack — frames that are
    part of the model's own input are "unbiased", not "off"; an inserted reference is -inf there: off).
    """
    if len(biases) != n_refs or (unbiased is not None and len(unbiased) != n_refs):
        raise ValueError(f"{len(biases)} reference biases for {n_refs} reference frames")
    off = torch.tensor([float(b) for b in unbiased]) if unbiased is not None else torch.zeros(n_refs)
    on = torch.tensor([float(b) for b in biases])
    out = torch.stack([on if r else off for r in rows_biased]) if len(rows_biased) else torch.zeros(0, n_refs)
    return out.to(device) if device is not None else out



# A token is the subject's when at least this fraction of its area is inside the mask.
SUBJECT_COVERAGE = 0.5


def centre_crop(mask: torch.Tensor, aspect: float) -> torch.Tensor:
    """``[N, H, W]`` cropped about the centre to ``aspect`` (width / height).

    The rule (and its rounding) of the host's ``common_upscale(..., crop="center")``, which the Wan
    conditioning nodes apply to the reference image before encoding it, so that a mask drawn on the
    reference image lands on the same tokens as the image.
    """
    height, width = mask.shape[-2:]
    old = width / height
    x = y = 0
    if old > aspect:
        x = round((width - width * (aspect / old)) / 2)
    elif old < aspect:
        y = round((height - height * (old / aspect)) / 2)
    return mask[..., y:height - y, x:width - x]


def subject_tokens(mask: torch.Tensor, hw: tuple[int, int], coverage: float = SUBJECT_COVERAGE) -> torch.Tensor:
    """Which tokens of a reference frame of ``hw`` tokens show the subject: ``[N, h*w]`` bool.

    ``mask``: ``[N, H, W]`` in [0, 1] at the reference image's aspect (any size); centre-cropped to the
    frame's aspect like the image (:func:`centre_crop`), area-averaged onto the token grid, and
    thresholded at ``coverage``.
    """
    h, w = hw
    cropped = centre_crop(mask.float(), w / h)
    area = F.interpolate(cropped[:, None], size=(h, w), mode="area")[:, 0]
    return (area >= coverage).flatten(1)


def background_column_bias(layout: FrameLayout, subject: torch.Tensor, bias: float,
                           rows_biased: Sequence[bool], device: torch.device | None = None) -> torch.Tensor:
    """``[B, keys]``: ``bias`` on the key columns of the reference tokens outside the subject, 0 elsewhere.

    ``subject``: ``[n_refs, tokens per frame]`` bool (:func:`subject_tokens`); ``bias``: a logit bias,
    ``-inf`` hides the background; rows whose ``rows_biased`` is False get 0.
    """
    if subject.shape[0] != len(layout.refs):
        raise ValueError(f"{subject.shape[0]} subject masks for {len(layout.refs)} reference frames")
    background = torch.zeros(layout.keys, dtype=torch.bool)
    for i in range(len(layout.refs)):
        a, b = layout.ref_key_span(i)
        background[a:b] = ~subject[i].cpu()
    rows = torch.tensor([bool(r) for r in rows_biased])
    out = torch.zeros(len(rows_biased), layout.keys)
    out[rows[:, None] & background[None]] = float(bias)
    return out.to(device) if device is not None else out
