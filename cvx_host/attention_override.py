"""The ``optimized_attention_override`` of the inserted-reference patch: the joint attention of one block
with the references' biases (strength/TAB on their key columns, ERAE per video query), read top to
bottom as q/k/v -> block -> biases -> attention (cvx_core.reference_attention).

It chains any override already on the model (the host has one slot). The ERAE auto maps are computed
here, at their map blocks, from the attention of the positive prompt's rows.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import partial

import torch

from ..cvx_core.entity_region import entity_attention, normalize_entity_map, refine_map
from ..cvx_core.reference_attention import column_bias, reference_attention, reference_attention_lse
from . import options
from .errors import PatchError
from .forward_state import ForwardState

log = logging.getLogger("customvideox")


class MapsReady(Exception):  # noqa: N818 (control flow, not an error)
    """Ends a map probe once the positive prompt's ERAE maps are computed (no block after is needed)."""

    def __init__(self, maps: dict[int, torch.Tensor]):
        super().__init__()
        self.maps = maps


class AttentionOverride:
    """The ``optimized_attention_override``: reference attention, chained onto ``prev``."""

    def __init__(self, prev: Callable | None = None):
        self.prev = prev
        if prev is not None and not _takes_mask(prev):
            log.warning("CustomVideoX: the attention override already on this model (%r) takes no `mask`; "
                        "reference biases may be ignored by it", prev)

    def __call__(self, func, *args, **kwargs):
        call = partial(self.prev, func) if self.prev is not None else func
        opts = kwargs.get("transformer_options") or {}
        state = options.forward_state(opts)
        if state is None:
            return call(*args, **kwargs)
        q, k, v = args[:3]
        heads = kwargs.pop("heads") if "heads" in kwargs else args[3]
        rest = args[4:]
        if kwargs.get("mask") is not None:
            raise PatchError("CustomVideoXApply model: another patch on this MODEL passes an attention mask to "
                             "CogVideoX; combining it with reference attention is not supported: remove that "
                             "patch, or apply it to a model without a reference")
        kwargs.pop("mask", None)
        block = state.backbone.next_block(state, opts)
        skip_reshape = kwargs.pop("skip_reshape", False)
        skip_out = kwargs.pop("skip_output_reshape", False)
        if not skip_reshape:
            b, s, _ = q.shape
            q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        layout = state.layout
        active = tuple(e.in_range(block, state.num_blocks) for e in state.entries)
        region = self._region(state, block, active, q, k)
        ref_kv = None
        if state.ref_kv is not None:
            ref_kv = state.ref_kv[block]

        def attn(q_, k_, v_, mask):
            return call(q_, k_, v_, heads, *rest, mask=mask, skip_reshape=True, skip_output_reshape=True, **kwargs)

        if state.lse:
            out = reference_attention_lse(q, k, v, layout, state.block_bias(active), region, ref_kv)
        else:
            if active not in state.masks:
                state.masks[active] = column_bias(layout, state.block_bias(active), q.dtype)
            out = reference_attention(q, k, v, layout, state.row_bias, region, ref_kv, attn=attn,
                                      mask=state.masks[active])
        if skip_out:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    @staticmethod
    def _region(state: ForwardState, block: int, active, q, k) -> torch.Tensor | None:
        """The per-video-query biases ``[B, n_refs, Sv]`` of this block (ERAE λ·map, and the strength/TAB
        bias of bias_rows=video references), or None; computes the auto maps at their blocks."""
        layout = state.layout
        for e_i, e in enumerate(state.entries):
            r = e.region
            if r is None or r.mode != "auto" or not state.erae_on[e_i] or state.maps_given \
                    or not r.map_block <= block <= r.last_map_block:
                continue
            vs = layout.video_query_start
            rows = state.map_rows
            a = entity_attention(q[rows], k[rows], (0, layout.text), (vs, vs + layout.video), r.entity_idx,
                                 layout.grid)
            state.map_acc[e_i] = a if block == r.map_block else state.map_acc[e_i] + a
            if block == r.last_map_block:
                map_ready(state, e_i, normalize_entity_map(state.map_acc.pop(e_i) / r.map_blocks, layout.grid,
                                                            r.norm), q.shape[0])
        uses = tuple(state.region_maps.get(e_i) is not None and active[e_i]
                     and not (e.region.mode == "auto" and block <= e.region.last_map_block)
                     for e_i, e in enumerate(state.entries))
        video = state.video_bias(active)
        if not any(uses) and video is None:
            return None
        key = (uses, active)
        if key not in state.region_bias:  # built once per call and block set, not once per block
            zeros = torch.zeros(q.shape[0], layout.video, device=q.device)
            bias = torch.stack([state.region_maps[e_i] * e.region.lam if use else zeros
                                for e_i, (e, use) in enumerate(zip(state.entries, uses)) for _ in range(e.count)],
                               dim=1)
            state.region_bias[key] = bias if video is None else bias + video[:, :, None].to(bias)
        return state.region_bias[key]


def map_ready(state: ForwardState, e_i: int, m: torch.Tensor, batch: int) -> None:
    """An auto map of ``state.map_rows`` is complete: serve it to every chunk; once all auto maps of the
    call exist, cache them for this (x, timestep) and end a probe."""
    r = state.entries[e_i].region
    state.region_maps[e_i] = refine_map(m.repeat(batch // m.shape[0], 1), state.layout.grid, r.refine, r.top_k,
                                        r.smooth)
    state.region_bias.clear()
    state.map_done[e_i] = m
    if any(state.erae_on[i] and e.region.mode == "auto" and i not in state.map_done
           for i, e in enumerate(state.entries)):
        return
    if state.run is not None and state.map_key is not None:
        state.run.store_maps(*state.map_key, state.map_done)
    if state.probe:
        raise MapsReady(state.map_done)


def _takes_mask(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "mask" or p.kind == p.VAR_KEYWORD for p in params)

