"""The two things most host tests do: put a reference on a MODEL with the node users have, and run one
diffusion-model call through the patcher's wrappers as the sampler does.

:func:`apply_reference` calls ``CustomVideoXApply`` with the defaults of its own V3 schema (what a user
gets from a fresh node), overridden by keyword; :func:`forward` loads the patcher like a sampler and calls
its diffusion model with the patcher's ``transformer_options`` and wrappers.
"""

from __future__ import annotations

from typing import Any

import torch
from customvideox.nodes.apply import CustomVideoXApply
from customvideox.nodes.types import EncodedReference


def apply_defaults() -> dict[str, Any]:
    """CustomVideoXApply's widget defaults, read from its schema (not written out here)."""
    return {i.id: i.default for i in CustomVideoXApply.define_schema().inputs
            if getattr(i, "default", None) is not None}


def apply_reference(model, latent: torch.Tensor, width: int | None = None, height: int | None = None,
                    family: str = "CogVideoX", **overrides: Any):
    """``model`` patched by CustomVideoXApply with the reference ``latent`` ``[N, C, F, h, w]`` (a VAE
    latent as CustomVideoXReferenceEncode gives it, from a VAE of ``family``), at the node's defaults plus
    ``overrides``."""
    ref = EncodedReference(latent=latent, width=width or latent.shape[-1] * 8, height=height or latent.shape[-2] * 8,
                           family=family)
    return CustomVideoXApply.execute(model=model, reference=ref, **(apply_defaults() | overrides)).result[0]


def forward(patcher, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **transformer_options: Any
            ) -> torch.Tensor:
    """One model call through ``patcher``'s wrappers (``transformer_options`` adds to the patcher's own,
    e.g. ``cond_or_uncond=[0, 1]`` or ``sigmas``)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    opts = dict(patcher.model_options.get("transformer_options", {}), wrappers=patcher.wrappers,
                **transformer_options)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, context, transformer_options=opts)
