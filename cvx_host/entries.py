"""What one CustomVideoXApply adds to a model: a reference and its settings, and the stacking rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cvx_core.entity_region import EntityRegion
from ..cvx_core.reference_timestep import REFERENCE_TIMESTEPS, noised_reference, reference_noise
from ..cvx_core.rope import COGVIDEOX_REF_ROPE_MODES
from ..cvx_core.tab_schedule import TABSchedule, reference_bias, strength_to_bias
from .errors import PatchError

MODES = ("two_way", "one_way")
# Which query rows a reference's strength/TAB bias reaches on its key columns (-inf, "off", reaches all).
BIAS_ROWS = ("all", "video")
# How the biased attention is computed: "mask" = the host's attention with a key-column mask (default);
# "lse" = unmasked fused calls merged by log-sum-exp (keeps GPU flash kernels, bypasses the host's
# attention choice; exact, not the default until measured on a GPU: bench/gpu_check.py).
ATTENTION_PATHS = ("mask", "lse")


@dataclass(frozen=True, eq=False, kw_only=True)
class BiasSettings:
    """What every reference node sets, whatever the reference's tokens are: strength, the TAB schedule, the
    ERAE region, the block range and whether the negative pass gets it."""

    strength: float = 1.0
    schedule: TABSchedule | None = None
    region: EntityRegion | None = None
    block_start: int = 0
    block_end: int = -1
    apply_to_uncond: bool = True

    def bias(self, progress: Callable[[str], float]) -> float:
        """The entry's logit bias; ``progress(mode)`` gives this call's τ in a TAB progress mode."""
        if self.schedule is None:
            return strength_to_bias(self.strength)
        return reference_bias(self.schedule, progress(self.schedule.progress), self.strength)

    def in_range(self, block: int, num_blocks: int) -> bool:
        end = num_blocks - 1 if self.block_end < 0 else self.block_end
        return self.block_start <= block <= end

    def region_on(self, progress: Callable[[str], float]) -> bool:
        """ERAE applies from its start_percent on (read in the schedule's progress mode, steps without one)."""
        r = self.region
        if r is None:
            return False
        return r.start_percent <= 0 or progress(self.schedule.progress if self.schedule else "steps") >= r.start_percent


@dataclass(frozen=True, eq=False)
class ReferenceEntry(BiasSettings):
    """One CustomVideoXApply: processed reference latents ``[N, C, F, h, w]`` and settings."""

    latent: torch.Tensor
    mode: str = "two_way"
    ref_rope: str = "negative"
    bias_rows: str = "all"
    reference_timestep: str = "sampling"
    attention_path: str = "mask"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PatchError(f"CustomVideoXApply attention_mode: {self.mode!r} is not one of {MODES}")
        if self.attention_path not in ATTENTION_PATHS:
            raise PatchError(f"CustomVideoXApply attention_path: {self.attention_path!r} is not one of "
                             f"{ATTENTION_PATHS}")
        if self.reference_timestep not in REFERENCE_TIMESTEPS:
            raise PatchError(f"CustomVideoXApply: reference_timestep {self.reference_timestep!r} is not one of "
                             f"{REFERENCE_TIMESTEPS}")
        if self.ref_rope not in COGVIDEOX_REF_ROPE_MODES:
            raise PatchError(f"CustomVideoXApply reference_rope: {self.ref_rope!r} on a CogVideoX model: the slot "
                             f"after the video (Phantom's layout) is built for Wan only; on CogVideoX use one of "
                             f"{COGVIDEOX_REF_ROPE_MODES}")
        if self.reference_timestep == "clean" and self.mode == "two_way":
            raise PatchError("CustomVideoXApply: reference_timestep 'clean' needs attention_mode 'one_way': in "
                             "two_way the reference tokens share the video's batch row, and AdaLN gives every "
                             "token of a row the sampling timestep; choose one_way, or reference_timestep "
                             "'sampling' or 'noised'")

    @property
    def count(self) -> int:
        return self.latent.shape[0]

    def model_latent(self, i: int, sigma: torch.Tensor | None) -> torch.Tensor:
        """Reference ``i`` as the model sees it: ``[B, C, F, h, w]`` noised to ``sigma`` per row
        (``reference_timestep='noised'``), else the clean latent ``[1, C, F, h, w]``."""
        latent = self.latent[i:i + 1]
        if self.reference_timestep != "noised":
            return latent
        return noised_reference(latent, sigma, reference_noise(self.latent.shape)[i:i + 1])


# ReferenceEntry fields the patch reads from the first entry only, with the Apply input that sets them: one
# attention layout and one attention path per model call (two-way tokens in the sequence or one-way cached
# K/V), and one RoPE table in which the video's own positions depend on the placement (shift moves them).
SHARED_SETTINGS = (("mode", "attention_mode"), ("ref_rope", "reference_rope"), ("attention_path", "attention_path"))


def check_stackable(first: BiasSettings, entry: BiasSettings,
                    settings: tuple[tuple[str, str], ...] = SHARED_SETTINGS) -> None:
    for field_name, input_name in settings:
        old, new = getattr(first, field_name), getattr(entry, field_name)
        if old != new:
            raise PatchError(f"CustomVideoXApply {input_name}: this node has {new!r} but the MODEL already has a "
                             f"reference with {old!r} from an earlier CustomVideoXApply; stacked references share "
                             f"one {input_name}: set the same value on every CustomVideoXApply of this model")



def check_blocks(n_blocks: int, entry: BiasSettings, node: str) -> None:
    """The entry's block range and ERAE map blocks fit a model of ``n_blocks`` blocks (clear errors naming
    ``node``); every node that takes a block range or a region checks it here."""
    end = n_blocks - 1 if entry.block_end < 0 else entry.block_end
    if not 0 <= entry.block_start <= end < n_blocks:
        raise PatchError(f"{node}: block_start..block_end is {entry.block_start}..{entry.block_end}, which is not "
                         f"inside this model's blocks 0..{n_blocks - 1} (block_end -1 = the last block)")
    region = entry.region
    if region is not None and region.mode == "auto" and region.last_map_block >= end:
        blocks = f"map_block {region.map_block}" + (f" with map_blocks {region.map_blocks} (blocks "
                                                     f"{region.map_block}..{region.last_map_block})"
                                                     if region.map_blocks > 1 else "")
        raise PatchError(f"{node}: the region's {blocks} reaches block {region.last_map_block}, but the "
                         f"reference is used up to block {end} of 0..{n_blocks - 1}: the map's last block must "
                         f"be below {end} (lower map_block or map_blocks)")
