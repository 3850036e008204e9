"""Reference frames that a model already carries inside its video self-attention.

Some backbones are trained with the reference as extra latent frames of the video sequence itself,
with no text in that attention: Wan Phantom appends them after the video, Wan VACE puts them in
front. Their self-attention sequence is then ``[video | ref_0 .. ref_n]`` or ``[ref_0 .. ref_n |
video]``, and the reference attention maths (:mod:`.reference_attention`) applies unchanged once the
layout says where the reference columns are.

Host-free: plain Python and torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
               device: torch.device | None = None) -> torch.Tensor:
    """Per-row, per-reference logit biases ``[B, n_refs]``.

    ``biases[i]``: the bias of reference i (strength and schedule); rows whose ``rows_biased`` is False
    get 0, i.e. the attention the model computes without this pack (the reference frames are part of
    the model's own input, so "unbiased" is not "off").
    """
    if len(biases) != n_refs:
        raise ValueError(f"{len(biases)} reference biases for {n_refs} reference frames")
    out = torch.zeros(len(rows_biased), n_refs)
    for r, on in enumerate(rows_biased):
        if on:
            out[r] = torch.tensor([float(b) for b in biases])
    return out.to(device) if device is not None else out

