"""Test pictures shared by several levels: a synthetic subject on noise, and the bundled subject photos."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluation.suite import load_subject_image


def photo(seed: int = 0, n: int = 1, h: int = 40, w: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """A ComfyUI IMAGE batch (noise background, a bright subject square) and its subject mask."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, h, w, 3, generator=g) * 0.5
    mask = torch.zeros(n, h, w)
    mask[:, 8:24, 20:36] = 1.0
    img[mask.bool()] = torch.tensor([0.9, 0.3, 0.1])
    return img, mask


def subject_photo(name: str, h: int = 96, w: int = 144) -> torch.Tensor:
    arr = torch.from_numpy(load_subject_image(name)).float().div(255).permute(2, 0, 1)[None]
    return F.interpolate(arr, size=(h, w), mode="area")[0].permute(1, 2, 0)
