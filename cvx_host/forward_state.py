"""Everything one model call of the inserted-reference patch needs, built once by the wrapper."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..cvx_core.token_layout import TokenLayout
from .entries import ReferenceEntry

if TYPE_CHECKING:
    from .backbone import InsertsReferences
    from .run_cache import AutoMaps


@dataclass
class ForwardState:
    """Everything one model call needs, built once by the wrapper and read by every block."""

    entries: list[ReferenceEntry]
    backbone: InsertsReferences
    layout: TokenLayout
    row_bias: torch.Tensor  # [B, n_refs] for blocks where every entry is in range
    ref_owner: list[int]  # entry index of each reference
    num_blocks: int
    cond_row: int = 0
    erae_on: tuple[bool, ...] = ()  # per entry: its ERAE is on at this call's progress
    maps: AutoMaps | None = None  # the ERAE auto maps this call reads (from its cond rows, unless given)
    lse: bool = False  # attention_path "lse" (see entries.ATTENTION_PATHS)
    ref_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # one-way: per entry, per block
    region_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> [B, Sv]
    masks: dict[tuple[bool, ...], torch.Tensor | None] = field(default_factory=dict)
    region_bias: dict[tuple, torch.Tensor] = field(default_factory=dict)  # [B, n_refs, Sv]
    block: int = 0  # the next attention call's block (CogVideoX has no block index: calls are counted)

    def block_bias(self, active: tuple[bool, ...]) -> torch.Tensor:
        """``[B, n_refs]`` biases for every query row (the column mask): bias_rows=video references
        keep only their -inf (off) here; their finite bias goes to the video rows (:meth:`video_bias`)."""
        bias = self.row_bias.clone()
        for j, owner in enumerate(self.ref_owner):
            if not active[owner]:
                bias[:, j] = -math.inf
            elif self.entries[owner].bias_rows == "video":
                bias[:, j] = bias[:, j].masked_fill(~torch.isneginf(bias[:, j]), 0.0)
        return bias

    def video_bias(self, active: tuple[bool, ...]) -> torch.Tensor | None:
        """``[B, n_refs]`` finite biases of active bias_rows=video references, for video query rows only."""
        cols = [j for j, owner in enumerate(self.ref_owner)
                if active[owner] and self.entries[owner].bias_rows == "video"]
        if not cols:
            return None
        bias = torch.zeros_like(self.row_bias)
        bias[:, cols] = self.row_bias[:, cols].masked_fill(torch.isneginf(self.row_bias[:, cols]), 0.0)
        return bias if bool((bias != 0).any()) else None

    def next_block(self) -> int:
        """The block of the current attention call; one call per block, in order."""
        block = self.block
        self.block += 1
        return block

    def restart_block(self, block: int) -> None:
        """A block recomputed in backward (gradient checkpointing) counts as ``block`` again."""
        self.block = block


def row_bias(entries: list[ReferenceEntry], progress: Callable[[str], float], cond_or_uncond: list[int], batch: int,
              device: torch.device) -> tuple[torch.Tensor, list[int]]:
    rows = torch.zeros(batch, dtype=torch.long)
    if cond_or_uncond:
        per = batch // len(cond_or_uncond)
        for i, c in enumerate(cond_or_uncond):
            rows[i * per:(i + 1) * per] = c
    cols, owner = [], []
    for e_i, e in enumerate(entries):
        b = e.bias(progress)
        col = torch.full((batch,), b)
        if not e.apply_to_uncond:
            col[rows == 1] = -math.inf
        cols += [col] * e.count
        owner += [e_i] * e.count
    return torch.stack(cols, dim=1).to(device), owner

