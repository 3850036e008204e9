"""The pack's custom socket types and the data they carry between nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

CVXReference = io.Custom("CVX_REFERENCE")
CVXSchedule = io.Custom("CVX_SCHEDULE")
CVXRegion = io.Custom("CVX_REGION")

CATEGORY = "CustomVideoX"


@dataclass(frozen=True, eq=False)
class EncodedReference:
    """What CustomVideoXReferenceEncode gives: raw VAE latents ``[N, C, 1, h, w]`` (one per
    reference image), the pixel size they were encoded at, and the VAE's latent family ("CogVideoX",
    "Wan2.1" — also Wan 2.2 A14B's — or "Wan2.2", the 48-channel TI2V-5B latent) so a MODEL of
    another family can refuse it."""

    latent: torch.Tensor
    width: int
    height: int
    family: str = "CogVideoX"
