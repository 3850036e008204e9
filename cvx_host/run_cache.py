"""Per sampling run state, owned by an OUTER_SAMPLE wrapper and dropped when the run ends, however it ends.

It also holds what makes ERAE auto maps the positive prompt's in every model call, for every backbone: a
call's cond rows accumulate the maps over their map blocks (:class:`AutoMaps`) and cache them for their
(x, timestep); a call without cond rows (the host runs uncond alone when memory is short) reuses them, or
runs the positive prompt's inputs up to the last map block, a "probe" ended by :class:`MapsReady`
(:func:`positive_maps`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import comfy.patcher_extension as pe
import torch
from comfy.model_base import convert_tensor

from ..cvx_core.entity_region import normalize_entity_map
from . import options

if TYPE_CHECKING:
    from ..cvx_core.entity_region import EntityRegion


class RunCache:
    """Per sampling run: one-way reference K/V by entry, the positive prompt (the reference pass and
    ERAE auto maps read it), the latest positive ERAE maps with their (x, timestep), and the sampled
    model's ``percent_to_sigma`` (TAB progress by noise level). Not a dict, so the host's per-call
    copies of transformer_options share it."""

    def __init__(self, text: torch.Tensor | None = None,
                 percent_to_sigma: Callable[[float], float] | None = None,
                 conds: Callable[[], dict] | None = None) -> None:
        self.kv: dict = {}
        self.text = text
        self.conds = conds  # the positive's model conds (the host's CONDs), once the sampler has built them
        self.percent_to_sigma = percent_to_sigma
        self.maps: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None

    def positive(self, context: torch.Tensor) -> torch.Tensor | None:
        """The positive prompt ``[1, L, D]`` on ``context``'s device and dtype, or None if it has no
        prompt of ``context``'s shape."""
        if self.text is None or self.text.shape[1:] != context.shape[1:]:
            return None
        self.text = self.text.to(context.device, context.dtype)
        return self.text[:1]

    def positive_inputs(self, batch: int, like: torch.Tensor) -> dict:
        """The positive conditioning's extra model inputs (Phantom's ``time_dim_concat``, VACE's context...)
        for ``batch`` rows, as the host hands a cond call's to the diffusion model (repeated to the batch,
        cast like the call's input ``like``); the prompt and channel-concat inputs excluded."""
        out = {}
        for name, cond in (self.conds() if self.conds is not None else {}).items():
            if name in ("c_crossattn", "c_concat"):
                continue
            value = cond.process_cond(batch_size=batch, area=None).concat([])
            out[name] = [convert_tensor(v, like.dtype, like.device) for v in value] if isinstance(value, list) \
                else convert_tensor(value, like.dtype, like.device)
        return out

    def store_maps(self, x: torch.Tensor, timestep: torch.Tensor, maps: dict[int, torch.Tensor]) -> None:
        # One record: a step's cond and uncond calls come one after the other.
        self.maps = (x.clone(), timestep.clone(), maps)

    def maps_for(self, x: torch.Tensor, timestep: torch.Tensor) -> dict[int, torch.Tensor] | None:
        if self.maps is None:
            return None
        mx, mt, maps = self.maps
        same = mx.shape == x.shape and mt.shape == timestep.shape and torch.equal(mt, timestep) \
            and torch.equal(mx, x)
        return maps if same else None


class MapsReady(Exception):  # noqa: N818 (control flow, not an error)
    """Ends a map probe once the positive prompt's ERAE maps are computed (no block after is needed)."""

    def __init__(self, maps: dict[int, torch.Tensor]):
        super().__init__()
        self.maps = maps


@dataclass
class AutoMaps:
    """The ERAE auto maps of one model call: each region's entity attention from the rows ``rows`` (a cond
    chunk), summed over its blocks ``map_block .. last_map_block``, then averaged and normalised. Once all
    exist they are cached in ``run`` for the (x, timestep) ``key`` of those rows, and a probe ends."""

    regions: dict[int, EntityRegion]  # entry -> its auto region, for the entries whose ERAE is on
    grid: tuple[int, int, int]
    rows: slice
    probe: bool = False
    run: RunCache | None = None
    key: tuple[torch.Tensor, torch.Tensor] | None = None
    given: bool = False  # the wrapper already holds the maps (a call without cond rows): read none
    acc: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> summed raw attention
    done: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> normalised map of ``rows``

    def reads(self, e_i: int, block: int) -> bool:
        r = self.regions.get(e_i)
        return not self.given and r is not None and r.map_block <= block <= r.last_map_block

    def add(self, e_i: int, block: int, attention: torch.Tensor) -> torch.Tensor | None:
        """Adds one block's raw attention ``[rows, Sv]``; at the region's last map block, returns its map."""
        r = self.regions[e_i]
        self.acc[e_i] = attention if block == r.map_block else self.acc[e_i] + attention
        if block != r.last_map_block:
            return None
        m = self.done[e_i] = normalize_entity_map(self.acc.pop(e_i) / r.map_blocks, self.grid, r.norm)
        if self.done.keys() == self.regions.keys():
            if self.run is not None and self.key is not None:
                self.run.store_maps(*self.key, dict(self.done))
            if self.probe:
                raise MapsReady(self.done)
        return m


def select_rows(transformer_options: dict, chunks: list[int], idx: torch.Tensor, batch: int) -> dict:
    """``transformer_options`` for the rows ``idx`` (the chunks ``chunks`` of ``cond_or_uncond``)."""
    n = len(transformer_options["cond_or_uncond"])
    opts = {}
    for key, value in transformer_options.items():
        if isinstance(value, list) and len(value) == n:
            value = [value[i] for i in chunks]
        elif isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            value = value[idx]
        opts[key] = value
    return opts


def positive_maps(cache: RunCache, x: torch.Tensor, timestep: torch.Tensor, transformer_options: dict,
                  need: list[int], probe: Callable[[slice, dict], None]) -> dict[int, torch.Tensor]:
    """The positive prompt's normalised ERAE maps ``[B, Sv]`` for a call without cond rows: per chunk, the
    maps cached for the same (x, timestep), else ``probe(rows, opts)``, a forward of the positive prompt's
    inputs on those rows with ``opts`` (labelled cond, flagged as a probe), which raises :class:`MapsReady`.
    The same noisy input and positive inputs give the same maps as the cond rows of a batched call (x, not
    sigma alone, is compared: Heun evaluates one sigma at two x)."""
    chunks = transformer_options["cond_or_uncond"]
    per = x.shape[0] // len(chunks)
    parts: dict[int, list[torch.Tensor]] = {e_i: [] for e_i in need}
    for c in range(len(chunks)):
        rows = slice(c * per, (c + 1) * per)
        maps = cache.maps_for(x[rows], timestep[rows])
        if maps is None or any(e_i not in maps for e_i in need):
            idx = torch.arange(c * per, (c + 1) * per, device=x.device)
            opts = select_rows(transformer_options, [c], idx, x.shape[0])
            opts.update(cond_or_uncond=[0], **{options.PROBE_KEY: True})
            try:
                probe(rows, opts)
            except MapsReady as done:
                maps = done.maps
            else:
                raise RuntimeError("CustomVideoX: the ERAE map probe ran past its map blocks")
        for e_i in need:
            parts[e_i].append(maps[e_i])
    return {e_i: torch.cat(p) for e_i, p in parts.items()}


def stream_text(transformer_options: dict, context: torch.Tensor, cond_row: int) -> torch.Tensor:
    """The text a one-way reference pass reads: the run's positive prompt, whichever rows this call holds (the
    host may run cond and uncond in one batch or apart); outside a sampler, the call's cond row."""
    cache = options.run_cache(transformer_options)
    text = cache.positive(context) if cache is not None else None
    return context[cond_row:cond_row + 1] if text is None else text


def cached_stream(transformer_options: dict, key: tuple, text: torch.Tensor, when: tuple | None,
                  compute: Callable[[], object]):
    """A one-way reference pass's per-block K/V: the run's cached one for ``key`` if it was computed from the
    same ``text`` at the same ``when`` (None: any step, i.e. clean), else ``compute()`` (kept for the run)."""
    cache = options.run_cache(transformer_options)
    run = cache.kv if cache is not None else None
    hit = run.get(key) if run is not None else None
    # The sampler rebuilds the conditioning batch every step: compare the text by value.
    if hit is not None and hit[1] == when and hit[0].shape == text.shape and torch.equal(hit[0], text):
        return hit[2]
    kv = compute()
    if run is not None:
        run[key] = (text.clone(), when, kv)
    return kv


def positive_text(guider) -> torch.Tensor | None:
    positive = (getattr(guider, "conds", None) or {}).get("positive") or []
    text = positive[0].get("cross_attn") if positive else None
    # A copy: run state must not alias the user's conditioning (it is dropped with the run).
    return text[:1].clone() if isinstance(text, torch.Tensor) else None


def positive_conds(guider) -> dict:
    """The positive conditioning's model conds: the sampler builds them inside the run, so this is read when
    a probe needs it, not when the run starts."""
    positive = (getattr(guider, "conds", None) or {}).get("positive") or []
    return dict(positive[0].get("model_conds") or {}) if positive else {}


def outer_sample_wrapper(executor, *args, **kwargs):
    """Owns the per-run cache; it is dropped when sampling ends, however it ends."""
    guider = executor.class_obj
    opts = guider.model_options.setdefault("transformer_options", {})
    # The guider's model is the one sampled: its model_sampling includes any sampling node after Apply.
    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    opts[options.RUN_KEY] = RunCache(positive_text(guider), getattr(sampling, "percent_to_sigma", None),
                                     partial(positive_conds, guider))
    try:
        return executor(*args, **kwargs)
    finally:
        opts.pop(options.RUN_KEY, None)


def estimate_with_extra_frames(executor, model, noise_shape, extra: int, *args, **kwargs):
    """A PREPARE_SAMPLING wrapper's body: the host's memory estimate for ``extra`` more latent frames (the
    pack's reference frames), so the host frees and offloads for what the patched model will really use."""
    if extra and len(noise_shape) == 5:
        noise_shape = torch.Size([*noise_shape[:2], noise_shape[2] + extra, *noise_shape[3:]])
    return executor(model, noise_shape, *args, **kwargs)


def install_run_cache(model) -> None:
    """Give ``model`` (a clone) the OUTER_SAMPLE wrapper that owns the run cache (once)."""
    if not model.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, options.WRAPPER_KEY):
        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, options.WRAPPER_KEY, outer_sample_wrapper)
