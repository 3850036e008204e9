"""CustomVideoXApply on a Wan text-to-video MODEL: the encoded reference joins the video's self-attention.

Wan's self-attention holds no text: two-way, the reference latent is a leading frame of every model call; one-way,
its own pass (:mod:`.wan_reference_stream`) leaves cached key columns the video reads. Either way it is biased by
the Wan patch (:mod:`.frames_patch`) exactly as Phantom's and VACE's own frames are, at the temporal RoPE slot
``reference_rope`` names. Settings Wan cannot honour yet are errors naming the input.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from comfy.model_sampling import CONST

from ..cvx_core.entity_region import EntityRegion
from ..cvx_core.reference_timestep import REFERENCE_TIMESTEPS
from ..cvx_core.rope import REF_ROPE_MODES
from ..cvx_core.tab_schedule import TABSchedule
from . import options
from . import wan_reference_stream as stream
from .entries import MODES, check_blocks, check_stackable
from .errors import PatchError
from .frames_patch import NODE, FramesEntry, install
from .wan import Wan, is_vace

# What every CustomVideoXApply on one Wan model shares: one attention layout and one RoPE table per call.
WAN_SHARED_SETTINGS = (("mode", "attention_mode"), ("ref_rope", "reference_rope"))


def apply_inserted_reference(model, latent: torch.Tensor, entry: FramesEntry, node: str = "CustomVideoXApply"):
    """A patched clone of a Wan T2V ``model`` with the reference ``latent`` ``[N, C, 1, h, w]`` (the model's
    latent format) inserted as N leading latent frames of every model call, biased by ``entry``."""
    m = model.clone()
    Wan.for_model(m, node)
    to = options.model_options(m)
    entries = list(to.get(options.FRAMES_ENTRIES_KEY) or [])
    if any(e.frames is None for e in entries):
        raise PatchError(f"{node} model: this MODEL is already patched by {NODE} (Phantom/VACE reference frames); "
                         f"put CustomVideoXApply on a plain Wan text-to-video model instead")
    if entries:
        check_stackable(entries[0], entry, WAN_SHARED_SETTINGS)
    inserted = list(to.get(options.INSERTED_FRAMES_KEY) or [])
    start = len(inserted)
    to[options.INSERTED_FRAMES_KEY] = inserted + [latent[i:i + 1] for i in range(latent.shape[0])]
    to[options.FRAMES_ENTRIES_KEY] = entries + [replace(entry, frames=(start, start + latent.shape[0]))]
    install(m)
    stream.install_rope(m)
    return m


def apply_wan_reference(model, latent: torch.Tensor, *, strength: float, schedule: TABSchedule | None,
                        region: EntityRegion | None, block_start: int, block_end: int, apply_to_uncond: bool,
                        attention_mode: str, reference_rope: str, bias_rows: str, reference_timestep: str,
                        attention_path: str, node: str = "CustomVideoXApply"):
    """CustomVideoXApply on a Wan text-to-video MODEL: the encoded reference joins the video's self-attention
    (Wan has no text there): two-way as leading frames of every call, one-way as cached key columns from its
    own stream (:mod:`.wan_reference_stream`), at the temporal slot ``reference_rope`` names; biased like
    Phantom's and VACE's frames. Settings Wan cannot honour yet are errors naming the input."""
    wan = Wan.for_model(model, node)
    unsupported = {
        "bias_rows": (bias_rows, "all", "'video' is not built for Wan yet"),
        "attention_path": (attention_path, "mask", "the fused 'lse' path is not built for Wan yet"),
    }
    for name, (value, ok, why) in unsupported.items():
        if value != ok:
            raise PatchError(f"{node} {name}: {value!r} on a Wan model: {why}; use {ok!r}")
    choices = {"attention_mode": (attention_mode, MODES), "reference_rope": (reference_rope, REF_ROPE_MODES),
               "reference_timestep": (reference_timestep, REFERENCE_TIMESTEPS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise PatchError(f"{node} {name}: {value!r} is not one of {allowed}")
    if reference_timestep == "clean" and attention_mode == "two_way":
        raise PatchError(f"{node} reference_timestep: 'clean' needs attention_mode 'one_way': in two_way the "
                         f"reference frames share the video's batch row, and Wan modulates every token of a row "
                         f"with the sampling timestep; choose one_way, or reference_timestep 'sampling' or 'noised'")
    if reference_timestep == "noised" and not isinstance(model.get_model_object("model_sampling"), CONST):
        raise PatchError(f"{node} reference_timestep: 'noised' noises the reference as a rectified-flow model "
                         f"(Wan's own sampling); this MODEL's sampling is "
                         f"{type(model.get_model_object('model_sampling')).__name__}: remove the sampling node "
                         f"that changed it, or choose 'sampling'")
    if attention_mode == "one_way" and is_vace(wan.dm):
        raise PatchError(f"{node} attention_mode: 'one_way' on a Wan VACE model is not built (its VACE blocks "
                         f"attend over the video too); use 'two_way', or a plain Wan text-to-video model")
    entry = FramesEntry(strength=strength, schedule=schedule, region=region, block_start=block_start,
                        block_end=block_end, apply_to_uncond=apply_to_uncond, mode=attention_mode,
                        ref_rope=reference_rope, reference_timestep=reference_timestep)
    check_blocks(wan.num_blocks, entry, node)
    return apply_inserted_reference(model, wan.prepare_reference(model, latent, node), entry, node)
