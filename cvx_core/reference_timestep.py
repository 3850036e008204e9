"""The timestep the reference tokens are modulated with, and the noised reference. Host-free.

* ``sampling``: the reference latent stays clean and its tokens get the call's sampling timestep
  (what AdaLN gives every token of a batch row; what adapters trained by this pack see).
* ``clean``: the clean latent at timestep 0. Only the one-way reference pass can honour it: in two-way
  mode the reference shares the video's batch row and so its AdaLN timestep.
* ``noised``: the latent noised to the call's sigma with fixed noise, at the sampling timestep, so the
  reference looks like one more frame of the video at the same noise level ("reference-only").
"""

from __future__ import annotations

import torch

REFERENCE_TIMESTEPS = ("sampling", "clean", "noised")
# [reconstructed] one fixed noise for every step and run: the reference is reproducible and does not flicker.
REFERENCE_NOISE_SEED = 0


def reference_noise(shape: torch.Size | tuple[int, ...], seed: int = REFERENCE_NOISE_SEED) -> torch.Tensor:
    """Standard normal noise of ``shape`` from a CPU generator: the same on every device and call."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def noised_reference(latent: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """``latent`` ``[N, C, F, h, w]`` (model space) noised to ``sigma`` (a number or one per output row).

    CogVideoX's DiT takes DDPM inputs in alpha space, ``sqrt(ā)·x0 + sqrt(1 - ā)·ε`` with
    ``ā = 1 / (1 + σ²)``, i.e. ``(x0 + σ·ε) / sqrt(1 + σ²)``: what the host's VOID sampler feeds it and
    what ``ModelSamplingDiscrete(v_prediction)``'s ``calculate_input(noise_scaling(...))`` gives. (The
    native model_sampling's own ``noise_scaling`` is not in alpha space, so it is not used here.)
    """
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (latent.ndim - 1)))
    return (latent.float() + s * noise.float()) / (1.0 + s * s).sqrt()


def flow_noised_reference(latent: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """``latent`` noised to ``sigma`` on a rectified-flow model (Wan): ``(1 - σ)·x0 + σ·ε``, the host's
    ``CONST.noise_scaling`` (the input such a model is fed as is)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (latent.ndim - 1)))
    return (1.0 - s) * latent.float() + s * noise.float()
