"""Every key the pack keeps in the host's ``transformer_options``, with typed accessors.

``transformer_options`` is the only channel the host offers from a sampler down to each attention call;
the host copies it per model call, so what must live for a whole run is an object (:class:`RunCache`),
not a plain value. Keys are namespaced ``customvideox_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters import AdapterUse
    from .entries import ReferenceEntry
    from .forward_state import ForwardState
    from .run_cache import RunCache

# Wrapper key of the inserted-reference patch (DIFFUSION_MODEL, OUTER_SAMPLE, PREPARE_SAMPLING).
WRAPPER_KEY = "customvideox"
# list[ReferenceEntry]: one per CustomVideoXApply on this model, in order.
ENTRIES_KEY = "customvideox_entries"
# ForwardState of the current model call (set on the call's copy of the options by the wrapper).
STATE_KEY = "customvideox_state"
# RunCache of the current sampling run (set by the OUTER_SAMPLE wrapper, dropped when the run ends).
RUN_KEY = "customvideox_run"
# True in the block options of the one-way reference pass: every image token there is a reference token.
REFERENCE_STREAM_KEY = "customvideox_reference_stream"
# True in a call that only computes the positive prompt's ERAE maps (ended once they exist).
PROBE_KEY = "customvideox_map_probe"
# list[AdapterUse]: reference-branch LoRAs (loaders stack).
ADAPTERS_KEY = "customvideox_adapters"
# Training only: recompute each adapted block in backward instead of keeping its activations.
CHECKPOINT_KEY = "customvideox_gradient_checkpointing"
# The existing-frames patch (Wan Phantom/VACE): its wrapper key, entries and per-call state.
FRAMES_WRAPPER_KEY = "customvideox_frames"
FRAMES_ENTRIES_KEY = "customvideox_frames_entries"
FRAMES_STATE_KEY = "customvideox_frames_state"
# list[Tensor]: references CustomVideoXApply inserts into a Wan T2V model, one latent frame each, in order.
INSERTED_FRAMES_KEY = "customvideox_inserted_frames"
# The host's own key: the one attention override slot (chained, never replaced).
ATTENTION_OVERRIDE_KEY = "optimized_attention_override"


def model_options(model: Any) -> dict:
    """The ``transformer_options`` of a ModelPatcher (created if missing; call on a clone only)."""
    return model.model_options.setdefault("transformer_options", {})


def entries(opts: dict) -> list[ReferenceEntry]:
    return opts.get(ENTRIES_KEY) or []


def forward_state(opts: dict) -> ForwardState | None:
    return opts.get(STATE_KEY)


def run_cache(opts: dict) -> RunCache | None:
    return opts.get(RUN_KEY)


def adapters(opts: dict) -> list[AdapterUse]:
    return opts.get(ADAPTERS_KEY) or []


def in_reference_stream(opts: dict) -> bool:
    return bool(opts.get(REFERENCE_STREAM_KEY))


def is_map_probe(opts: dict) -> bool:
    return bool(opts.get(PROBE_KEY))


def checkpointing(opts: dict) -> bool:
    return bool(opts.get(CHECKPOINT_KEY))
