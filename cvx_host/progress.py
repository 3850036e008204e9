"""Sampling progress of one model call: TAB's clock, shared by every patch of the pack.

τ comes from the sampler's sigmas, never from a call counter: "steps" mode within this run's schedule,
"noise" mode over the model's whole noise range (through the run's ``percent_to_sigma``), see
:func:`cvx_core.tab_schedule.run_progress`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cvx_core.tab_schedule import run_progress
from . import options
from .errors import PatchError


def call_progress(transformer_options: dict) -> Callable[[str], float]:
    """τ of this model call by TAB progress mode, computed once per mode used."""
    sigmas = transformer_options.get("sigmas")
    sample_sigmas = transformer_options.get("sample_sigmas")
    cache = options.run_cache(transformer_options)
    percent_to_sigma = cache.percent_to_sigma if cache is not None else None
    memo: dict[str, float] = {}

    def progress(mode: str) -> float:
        if mode not in memo:
            memo[mode] = 0.0 if sigmas is None else run_progress(mode, sigmas, sample_sigmas, percent_to_sigma)
        return memo[mode]

    return progress


def call_sigmas(transformer_options: dict, batch: int) -> torch.Tensor:
    """Per batch row, the sigma of this model call (what ``noised`` references are noised to)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        raise PatchError("CustomVideoXApply: reference_timestep 'noised' needs the sampler's sigma, which this "
                         "model call does not carry; run it through a sampler, or choose 'sampling' or 'clean'")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    return sigmas.expand(batch) if sigmas.numel() == 1 else sigmas

