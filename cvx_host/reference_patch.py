"""The inserted-reference patch: a reference image's tokens join the DiT's attention (DESIGN.md §1.1).

``apply_reference(model, entry)`` returns a patched clone of a host ``ModelPatcher`` with:

* a DIFFUSION_MODEL wrapper that, once per model call, works out the per-row biases at this call's
  progress, the token layout and the ERAE maps (:class:`.forward_state.ForwardState`), and runs the
  forward with the reference frames in the input (two-way) or their cached K/V (one-way);
* the attention override (:mod:`.attention_override`), chained onto any existing one;
* the backbone's own patches (CogVideoX: the RoPE table), the run cache's OUTER_SAMPLE wrapper
  (:mod:`.run_cache`) and a PREPARE_SAMPLING wrapper that counts the reference frames in the host's
  memory estimate.

ERAE auto maps are the positive prompt's in every call: a call without cond rows (the host runs uncond
alone when memory is short) reuses the maps its step's cond call cached, or runs the positive prompt up
to the last map block (a "probe", :func:`.run_cache.positive_maps`).

Several ``apply_reference`` calls stack: entries accumulate in the model's options; the machinery is
installed once.
"""

from __future__ import annotations

from functools import partial

import comfy.patcher_extension as pe
import torch

from ..cvx_core.entity_region import mask_to_token_map, refine_map
from ..cvx_core.reference_timestep import noised_reference, reference_noise
from . import options
from .attention_override import AttentionOverride
from .cogvideox import CogVideoX
from .entries import ReferenceEntry, check_stackable
from .errors import PatchError
from .forward_state import ForwardState
from .forward_state import row_bias as build_row_bias
from .progress import call_progress, call_sigmas
from .run_cache import (
    AutoMaps,
    cached_stream,
    estimate_with_extra_frames,
    install_run_cache,
    positive_maps,
    select_rows,
    stream_text,
)


def _mask_maps(entries: list[ReferenceEntry], grid: tuple[int, int, int], latent_frames: int, batch: int,
               device: torch.device) -> dict[int, torch.Tensor]:
    """Entry index -> refined ``[B, Sv]`` map, for every mask-mode region."""
    maps = {}
    for e_i, e in enumerate(entries):
        r = e.region
        if r is not None and r.mode == "mask":
            try:
                m = mask_to_token_map(r.mask, grid, latent_frames)
            except ValueError as err:
                raise PatchError(f"CustomVideoXEntityRegion mask: {err}") from err
            maps[e_i] = refine_map(m.to(device)[None].expand(batch, -1), grid, r.refine, r.top_k, r.smooth)
    return maps


def diffusion_wrapper(executor, x, timestep, context, ofs, transformer_options, **kwargs):
    """Once per model call: the biases at this call's progress, the token layout, the ERAE maps, then the
    forward with the references in the model's input (two-way) or their cached K/V (one-way)."""
    entries = options.entries(transformer_options)
    if not entries:
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    backbone = CogVideoX(executor.class_obj)
    backbone.check_call(entries, x, context)
    progress = call_progress(transformer_options)
    row_bias, owner = build_row_bias(entries, progress,
                                transformer_options.get("cond_or_uncond") or [],
                                x.shape[0], x.device)
    off = torch.isneginf(row_bias).all(dim=1)
    if bool(off.all()):
        # Every reference is off for every row: the exact base model, no extra tokens.
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    # The host passes control=None; other per-call arguments cannot be split by row.
    by_rows = all(v is None for v in kwargs.values())
    if bool(off.any()) and transformer_options.get("cond_or_uncond") and by_rows:
        return _split_rows(executor, off, x, timestep, context, ofs, transformer_options, **kwargs)

    one_way = entries[0].mode == "one_way"
    layout = backbone.layout(x, context, [e.latent for e in entries for _ in range(e.count)], one_way)
    grid = layout.grid
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    per = x.shape[0] // len(cond_or_uncond)
    cond_row = cond_or_uncond.index(0) * per if 0 in cond_or_uncond else 0
    # ERAE's start_percent is read in the entry's TAB progress mode (steps without a schedule).
    erae_on = tuple(e.region_on(progress) for e in entries)
    auto = {e_i: e.region for e_i, e in enumerate(entries) if erae_on[e_i] and e.region.mode == "auto"}
    state = ForwardState(entries=entries, backbone=backbone, layout=layout, row_bias=row_bias, ref_owner=owner,
                         num_blocks=backbone.num_blocks, cond_row=cond_row, erae_on=erae_on,
                         maps=AutoMaps(auto, grid, slice(cond_row, cond_row + per),
                                       probe=options.is_map_probe(transformer_options)),
                         lse=entries[0].attention_path == "lse")

    # Every mask is checked on the first call (a clear error before sampling goes far); a region is
    # used only from its start_percent on.
    masks = _mask_maps(entries, grid, x.shape[2], x.shape[0], x.device)
    state.region_maps.update({e_i: m for e_i, m in masks.items() if erae_on[e_i]})
    # ERAE auto reads the positive prompt in every call: from the call's cond rows, else (the host ran the
    # uncond rows alone) the maps this step's cond call cached, else a probe forward of the positive prompt.
    # Outside a sampler (no run cache) a call without cond rows reads its own first rows.
    cache = options.run_cache(transformer_options)
    text = cache.positive(context) if cache is not None else None
    if auto and text is not None and by_rows:
        if 0 in cond_or_uncond:
            rows = state.maps.rows
            if torch.equal(context[rows], text.expand(per, -1, -1)):
                state.maps.run, state.maps.key = cache, (x[rows], timestep[rows])
        else:
            def probe(rows: slice, opts: dict) -> None:
                diffusion_wrapper(executor, x[rows], timestep[rows], text.expand(per, -1, -1),
                                  None if ofs is None else ofs[rows], opts, **kwargs)

            need = [e_i for e_i in auto if bool(torch.isfinite(row_bias[:, owner.index(e_i)]).any())]
            maps = positive_maps(cache, x, timestep, transformer_options, need, probe) if need else {}
            state.region_maps.update(
                {e_i: refine_map(m, grid, entries[e_i].region.refine, entries[e_i].region.top_k,
                                 entries[e_i].region.smooth) for e_i, m in maps.items()})
            state.maps.given = True

    opts = dict(transformer_options)
    opts[options.STATE_KEY] = state
    if one_way:
        state.ref_kv = _one_way_kv(backbone, entries, context, transformer_options, ofs, x, timestep, cond_row)
        return executor(x, timestep, context, ofs, opts, **kwargs)

    row_sigmas = call_sigmas(transformer_options, x.shape[0]) \
        if any(e.reference_timestep == "noised" for e in entries) else None
    ref_x = [e.model_latent(i, row_sigmas).to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1, -1)
             for e in entries for i in range(e.count)]
    return backbone.forward_with_references(executor, x, ref_x, entries[0].ref_rope, timestep, context, ofs, opts,
                                            **kwargs)


def _split_rows(executor, off: torch.Tensor, x, timestep, context, ofs, transformer_options, **kwargs):
    """Rows whose references are all off (e.g. uncond with apply_to_uncond off) run without the
    reference tokens: exact, and cheaper than masking them inside the batch (bench/README.md)."""
    chunks = transformer_options["cond_or_uncond"]
    per = x.shape[0] // len(chunks)
    out = torch.empty_like(x)
    for rows_off in (True, False):
        keep = [i for i in range(len(chunks)) if bool(off[i * per]) == rows_off]
        idx = torch.tensor([i * per + j for i in keep for j in range(per)], device=x.device)
        opts = select_rows(transformer_options, keep, idx, x.shape[0])
        args = (x[idx], timestep[idx], context[idx], None if ofs is None else ofs[idx], opts)
        out[idx] = executor(*args, **kwargs) if rows_off else diffusion_wrapper(executor, *args, **kwargs)
    return out


def _one_way_kv(backbone: CogVideoX, entries: list[ReferenceEntry], context, transformer_options: dict, ofs, x,
                timestep, cond_row: int):
    text = stream_text(transformer_options, context, cond_row)
    out = []
    for e in entries:
        # clean: one pass per run. sampling / noised: the pass depends on the call's timestep (and sigma),
        # so it is kept for the current one only (cond and uncond calls of a step share it).
        t_ref, latent, when = None, e.latent, None
        if e.reference_timestep != "clean":
            t_ref = timestep.flatten()[cond_row:cond_row + 1]
            when = (float(t_ref),)
            if e.reference_timestep == "noised":
                sigma = call_sigmas(transformer_options, x.shape[0])[cond_row:cond_row + 1]
                latent = noised_reference(e.latent, sigma, reference_noise(e.latent.shape))
                when += (float(sigma),)
        out.append(cached_stream(transformer_options, (id(e), x.device, x.dtype), text, when,
                                 partial(backbone.reference_stream, latent.to(x.device, x.dtype), text, e.ref_rope,
                                         ofs, transformer_options, t_ref)))
    # Per block: one (k, v) per reference, in entry order.
    return [[(k[:, :, j * r:(j + 1) * r], v[:, :, j * r:(j + 1) * r])
             for e, blocks in zip(entries, out) for k, v in [blocks[b]]
             for r in [k.shape[2] // e.count] for j in range(e.count)]
            for b in range(backbone.num_blocks)]


def prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    """Count the reference frames in the host's memory estimate (as extra latent frames). One-way
    references are counted the same way: their cached per-block K/V and their own pass are of the
    order of one more frame's activations."""
    entries = options.entries(model.model_options.get("transformer_options", {}))
    extra = sum(e.latent.shape[2] * e.count for e in entries)
    return estimate_with_extra_frames(executor, model, noise_shape, extra, *args, **kwargs)


def install(model) -> None:
    """Give ``model`` (a clone) the patch's machinery once: wrappers, attention override, RoPE table.
    Entries come separately (:func:`apply_reference`, or per call in training)."""
    if model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, options.WRAPPER_KEY):
        return
    to = options.model_options(model)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, options.WRAPPER_KEY, diffusion_wrapper)
    model.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, options.WRAPPER_KEY, prepare_sampling_wrapper)
    install_run_cache(model)
    to[options.ATTENTION_OVERRIDE_KEY] = AttentionOverride(to.get(options.ATTENTION_OVERRIDE_KEY))
    CogVideoX.install(model)


def apply_reference(model, entry: ReferenceEntry):
    """A patched clone of ``model`` with ``entry`` added (the input model is not changed). The node checks
    the entry against the model first (:func:`check_entry`)."""
    m = model.clone()
    to = options.model_options(m)
    entries = list(options.entries(to))
    if entries:
        check_stackable(entries[0], entry)
    to[options.ENTRIES_KEY] = entries + [entry]
    install(m)
    return m
