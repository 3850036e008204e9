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

from ..cvx_core.entity_region import entity_attention, refine_map
from ..cvx_core.reference_attention import column_bias, reference_attention, reference_attention_lse
from . import options
from .errors import PatchError
from .forward_state import ForwardState

log = logging.getLogger("customvideox")


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
            if state.maps is None or not state.maps.reads(e_i, block):
                continue
            r, vs, rows = e.region, layout.video_query_start, state.maps.rows
            a = entity_attention(q[rows], k[rows], (0, layout.text), (vs, vs + layout.video), r.entity_idx,
                                 layout.grid)
            m = state.maps.add(e_i, block, a)
            if m is not None:  # the cond chunk's maps serve every chunk
                state.region_maps[e_i] = refine_map(m.repeat(q.shape[0] // m.shape[0], 1), layout.grid, r.refine,
                                                    r.top_k, r.smooth)
                state.region_bias.clear()
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


def _takes_mask(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "mask" or p.kind == p.VAR_KEYWORD for p in params)

