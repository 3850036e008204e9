"""The backbone seam: what the pack's patches need to know about one DiT family, and nothing else.

A family is one module implementing one or both protocols below for the host's model class, registered
in :data:`FAMILIES`. The patches (:mod:`.reference_patch`, :mod:`.frames_patch`) only talk to these
protocols, so a second family is one new module plus its contract tests (tests/host/test_backbone_contract.py).

* :class:`Backbone` — every family: recognise the model (or say clearly why not), count its blocks.
* :class:`InsertsReferences` — the family can take inserted reference tokens (CogVideoX): where they go
  in a model call, the RoPE table for video + reference slots, the one-way reference stream, which block
  an attention call belongs to, and the block options a block-level patch reads.
* :class:`CarriesReferenceFrames` — the family's own conditioning already carries reference frames
  (Wan Phantom/VACE): where they are in a model call, and which attention call is which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..cvx_core.token_layout import TokenLayout
from .errors import PatchError


@runtime_checkable
class Backbone(Protocol):
    family: str  # e.g. "CogVideoX"
    num_blocks: int

    @classmethod
    def recognises(cls, dm: torch.nn.Module) -> bool: ...


@runtime_checkable
class InsertsReferences(Backbone, Protocol):
    def prepare_reference(self, model: Any, latent: torch.Tensor, node: str) -> torch.Tensor:
        """A reference VAE latent ``[N, C, F, H, W]`` -> what the model takes (latent format, temporal patch)."""

    def check_call(self, entries: Sequence[Any], x: torch.Tensor, context: torch.Tensor) -> None:
        """Checks that need the video (run at the sampler; messages name the pack node and input)."""

    def layout(self, x: torch.Tensor, context: torch.Tensor, reference_latents: Sequence[torch.Tensor],
               one_way: bool) -> TokenLayout:
        """The joint attention's token layout of one model call with these references."""

    def forward_with_references(self, executor: Callable, x: torch.Tensor, references: Sequence[torch.Tensor],
                                ref_rope: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the model with the reference frames in its input; return the video's output only."""

    def reference_stream(self, latent: torch.Tensor, text: torch.Tensor, ref_rope: str, ofs: torch.Tensor | None,
                         block_opts: dict, timestep: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One-way mode: the references' per-block (K, V) from their own pass with the text."""

    def next_block(self, state: Any, opts: dict) -> int:
        """The block index of the current attention call."""


@runtime_checkable
class CarriesReferenceFrames(Backbone, Protocol):
    def frames_layout(self, x: torch.Tensor, frames_after: torch.Tensor | None, leading: int, node: str) -> Any:
        """The self-attention layout of one model call: video tokens and the reference frames' tokens."""

    def attention_call(self, order: Any, opts: dict) -> tuple[int, bool, int]:
        """``(block, is_self_attention, branch)`` of the current attention call."""


FAMILIES: list[type] = []


def register(cls: type) -> type:
    FAMILIES.append(cls)
    return cls


def first_frame_in_latent_format(model: Any, latent: torch.Tensor, node: str, what: str) -> torch.Tensor:
    """Frame 0 of a reference VAE latent ``[N, C, F, H, W]`` in the model's latent format ``[N, C, 1, H, W]``,
    or a clear error naming ``node`` when its channels are not the model's (``what``: the VAE to use)."""
    latent_format = model.get_model_object("latent_format")
    channels = latent_format.latent_channels
    if latent.ndim != 5 or latent.shape[1] != channels:
        raise PatchError(f"{node} reference: the reference latent has shape {tuple(latent.shape)}; this model "
                         f"takes {channels}-channel video latents: encode the reference with {what}")
    return latent_format.process_in(latent[:, :, :1].float())


# The VAE latent family each model family takes (CustomVideoXReferenceEncode records it on the reference):
# CogVideoX's and Wan 2.1's latents both have 16 channels, so the channel count cannot tell them apart.
REFERENCE_FAMILIES = {"CogVideoX": ("CogVideoX",), "Wan": ("Wan2.1", "Wan2.2")}


def check_reference_family(backbone: Backbone, family: str, node: str) -> None:
    accepted = REFERENCE_FAMILIES.get(backbone.family, ())
    if family not in accepted:
        raise PatchError(f"{node} reference: the reference was encoded with a {family} VAE but the MODEL is "
                         f"{backbone.family}: encode it with the {backbone.family} model's own VAE "
                         f"({' or '.join(accepted)}) in CustomVideoXReferenceEncode")


def backbone_for(model: Any, node: str) -> Backbone:
    """The backbone of a MODEL's DiT, or a clear error naming ``node`` and the families handled."""
    dm = model.get_model_object("diffusion_model")
    for cls in FAMILIES:
        if cls.recognises(dm):
            return cls(dm)
    names = ", ".join(sorted(cls.family for cls in FAMILIES))
    raise PatchError(f"{node} model: the MODEL is a {type(dm).__name__} ({type(model.model).__name__}), which the "
                     f"pack does not handle; handled families: {names}")
