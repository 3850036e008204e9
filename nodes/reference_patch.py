"""The 3D reference-attention patch on the host's native CogVideoX model (design.md §2).

``apply_reference(model, entry)`` returns a patched clone of a host ``ModelPatcher``:

* a DIFFUSION_MODEL wrapper that, once per model call, prepends the reference latent
  frame(s) on T (two-way), records the token layout and the per-row biases in a copy of
  ``transformer_options``, and slices the reference frames off the output;
* an ``optimized_attention_override`` that chains any override already present and runs
  :func:`cvx_core.reference_attention.reference_attention` with the call's layout;
* an object patch of ``diffusion_model._get_rotary_emb`` (:class:`RotaryPatch`) so the
  video keeps temporal positions 0..T-1 and references get theirs (cvx_core.rope);
* an OUTER_SAMPLE wrapper that owns the per-run cache (one-way reference K/V, the positive
  prompt, the latest ERAE auto maps) and drops it when the run ends, interrupted or not; a PREPARE_SAMPLING wrapper that counts the
  reference frames in the host's memory estimate.

ERAE auto maps are the positive prompt's in every call: a call without cond rows (the host
runs uncond alone when memory is short) reuses the maps its step's cond call cached, or runs
the positive prompt up to the last map block (a "probe", ended by :class:`_MapsReady`).

Several ``apply_reference`` calls stack: entries accumulate in
``transformer_options[ENTRIES_KEY]`` and the machinery above is installed once.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import comfy.ldm.cogvideo.model as cogvideo
import comfy.patcher_extension as pe
import torch

from ..cvx_core import rope
from ..cvx_core.entity_region import (
    EntityRegion,
    entity_attention,
    mask_to_token_map,
    normalize_entity_map,
    refine_map,
)
from ..cvx_core.reference_attention import column_bias, reference_attention, reference_attention_lse
from ..cvx_core.reference_timestep import REFERENCE_TIMESTEPS, noised_reference, reference_noise
from ..cvx_core.tab_schedule import TABSchedule, reference_bias, run_progress, strength_to_bias
from ..cvx_core.token_layout import TokenLayout

log = logging.getLogger("customvideox")

KEY = "customvideox"
ENTRIES_KEY = "customvideox_entries"
STATE_KEY = "customvideox_state"
RUN_KEY = "customvideox_run"
ROTARY_ATTR = "diffusion_model._get_rotary_emb"
# Set in the block options of the one-way reference pass: every image token there is a reference token
# (read by nodes/reference_block.py, which applies reference-branch LoRAs to those rows).
REFERENCE_STREAM_KEY = "customvideox_reference_stream"
MODES = ("two_way", "one_way")
# Which query rows a reference's strength/TAB bias reaches on its key columns (-inf, "off", reaches all).
BIAS_ROWS = ("all", "video")
# Set in the transformer_options of a call that only computes the positive prompt's ERAE maps.
PROBE_KEY = "customvideox_map_probe"

# Reference token frames in front of the video during the current model call (set by the
# wrapper, read by RotaryPatch: the host's rotary builder takes no transformer_options).
_ref_frames: contextvars.ContextVar[tuple[int, str]] = contextvars.ContextVar("cvx_ref_frames", default=(0, "negative"))


class PatchError(ValueError):
    """A user-facing error: says what was given and what is expected."""


@dataclass(frozen=True, eq=False)
class ReferenceEntry:
    """One CustomVideoXApply: processed reference latents ``[N, C, F, h, w]`` and settings."""

    latent: torch.Tensor
    strength: float = 1.0
    schedule: TABSchedule | None = None
    region: EntityRegion | None = None
    block_start: int = 0
    block_end: int = -1
    apply_to_uncond: bool = True
    mode: str = "two_way"
    ref_rope: str = "negative"
    bias_rows: str = "all"
    reference_timestep: str = "sampling"

    def __post_init__(self) -> None:
        if self.reference_timestep not in REFERENCE_TIMESTEPS:
            raise PatchError(f"CustomVideoXApply: reference_timestep {self.reference_timestep!r} is not one of "
                             f"{REFERENCE_TIMESTEPS}")
        if self.reference_timestep == "clean" and self.mode == "two_way":
            raise PatchError("CustomVideoXApply: reference_timestep 'clean' needs attention_mode 'one_way': in "
                             "two_way the reference tokens share the video's batch row, and AdaLN gives every "
                             "token of a row the sampling timestep; choose one_way, or reference_timestep "
                             "'sampling' or 'noised'")

    @property
    def count(self) -> int:
        return self.latent.shape[0]

    def bias(self, progress: Callable[[str], float]) -> float:
        """The entry's logit bias; ``progress(mode)`` gives this call's τ in a TAB progress mode."""
        if self.schedule is None:
            return strength_to_bias(self.strength)
        return reference_bias(self.schedule, progress(self.schedule.progress), self.strength)

    def in_range(self, block: int, num_blocks: int) -> bool:
        end = num_blocks - 1 if self.block_end < 0 else self.block_end
        return self.block_start <= block <= end


class RotaryPatch:
    """Replaces the host's ``_get_rotary_emb``: exact or host spatial positions, references first."""

    def __init__(self, dm: torch.nn.Module, spatial: str, base_hw: tuple[int, int] | None = None):
        """``base_hw``: the training grid in tokens (a diffusers config's sample size // patch size);
        default: the host's (its detection never reads a config)."""
        if spatial not in rope.SPATIAL_MODES:
            raise PatchError(f"RoPE mode {spatial!r} is not one of {rope.SPATIAL_MODES}")
        self.spatial = spatial
        self.head_dim = dm.attention_head_dim
        self.temporal_patch = dm.patch_size_t is not None
        self.base_hw = base_hw or (dm.patch_embed.sample_height // dm.patch_size,
                                   dm.patch_embed.sample_width // dm.patch_size)
        self.scale = dm.spatial_interpolation_scale

    def table(self, h: int, w: int, ref_frames: int, video_frames: int, ref_rope: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        hp, wp = rope.spatial_positions(h, w, temporal_patch=self.temporal_patch, spatial=self.spatial,
                                        base_hw=self.base_hw, interpolation_scale=self.scale, device=device)
        tp = rope.temporal_positions(ref_frames, video_frames, ref_rope, device=device)
        return rope.rotary_table(self.head_dim, tp, hp, wp,
                                 unrotated_frames=ref_frames if ref_rope == "none" else 0)

    def __call__(self, h: int, w: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ref_frames, ref_rope = _ref_frames.get()
        return self.table(h, w, ref_frames, t - ref_frames, ref_rope, device)


def install_rotary(model, spatial: str, base_hw: tuple[int, int] | None = None):
    """Return a clone of ``model`` whose rotary positions follow ``spatial`` ("exact"/"host"), on the
    training grid ``base_hw`` (tokens; default: the host's)."""
    m = model.clone()
    m.add_object_patch(ROTARY_ATTR, RotaryPatch(m.get_model_object("diffusion_model"), spatial, base_hw))
    return m


class _MapsReady(Exception):  # noqa: N818 (control flow, not an error)
    """Ends a map probe once the positive prompt's ERAE maps are computed (no block after is needed)."""

    def __init__(self, maps: dict[int, torch.Tensor]):
        super().__init__()
        self.maps = maps


@dataclass
class ForwardState:
    """Everything one model call needs, built once by the wrapper and read by every block."""

    entries: list[ReferenceEntry]
    layout: TokenLayout
    row_bias: torch.Tensor  # [B, n_refs] for blocks where every entry is in range
    ref_owner: list[int]  # entry index of each reference
    num_blocks: int
    cond_row: int = 0
    # ERAE auto maps: the rows whose attention gives them (a cond chunk; its maps are tiled over the
    # call's chunks), whether each entry's ERAE is on at this progress, maps given by the wrapper.
    map_rows: slice = field(default_factory=lambda: slice(None))
    erae_on: tuple[bool, ...] = ()
    maps_given: bool = False
    probe: bool = False
    run: RunCache | None = None
    map_key: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, timestep) of map_rows, to cache the maps
    map_acc: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> summed raw attention
    map_done: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> normalised map of map_rows
    # CVX_ATTENTION=lse: unmasked fused calls merged by log-sum-exp instead of the host's attention
    # with a column mask (keeps GPU flash kernels; bypasses the host's attention choice). Not the
    # default until measured on a GPU (bench/gpu_check.py).
    lse: bool = field(default_factory=lambda: os.environ.get("CVX_ATTENTION", "mask") == "lse")
    ref_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # one-way: per entry, per block
    region_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> [B, Sv]
    masks: dict[tuple[bool, ...], torch.Tensor | None] = field(default_factory=dict)
    region_bias: dict[tuple, torch.Tensor] = field(default_factory=dict)  # [B, n_refs, Sv]
    block: int = 0

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


def _row_bias(entries: list[ReferenceEntry], progress: Callable[[str], float], cond_or_uncond: list[int], batch: int,
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


def _call_progress(transformer_options: dict) -> Callable[[str], float]:
    """τ of this model call by TAB progress mode, computed once per mode used."""
    sigmas = transformer_options.get("sigmas")
    sample_sigmas = transformer_options.get("sample_sigmas")
    cache: RunCache | None = transformer_options.get(RUN_KEY)
    percent_to_sigma = cache.percent_to_sigma if cache is not None else None
    memo: dict[str, float] = {}

    def progress(mode: str) -> float:
        if mode not in memo:
            memo[mode] = 0.0 if sigmas is None else run_progress(mode, sigmas, sample_sigmas, percent_to_sigma)
        return memo[mode]

    return progress


def _call_sigmas(transformer_options: dict, batch: int) -> torch.Tensor:
    """Per batch row, the sigma of this model call (what ``noised`` references are noised to)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        raise PatchError("CustomVideoXApply: reference_timestep 'noised' needs the sampler's sigma, which this "
                         "model call does not carry; run it through a sampler, or choose 'sampling' or 'clean'")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    return sigmas.expand(batch) if sigmas.numel() == 1 else sigmas


def _reference_latent(e: ReferenceEntry, i: int, sigma: torch.Tensor | None) -> torch.Tensor:
    """Reference ``i`` of ``e`` as the model sees it: ``[B, C, F, h, w]`` noised to ``sigma`` per row
    (``reference_timestep='noised'``), else the clean latent ``[1, C, F, h, w]``."""
    latent = e.latent[i:i + 1]
    if e.reference_timestep != "noised":
        return latent
    return noised_reference(latent, sigma, reference_noise(e.latent.shape)[i:i + 1])


def _timestep_embedding(dm, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t_emb = cogvideo.get_timestep_embedding(timestep, dm.time_proj_dim, dm.time_proj_flip, dm.time_proj_shift)
    return dm.time_embedding_linear_2(dm.time_embedding_act(dm.time_embedding_linear_1(t_emb.to(dtype))))


def reference_stream_kv(dm, latent: torch.Tensor, context: torch.Tensor, ref_rope: str, rotary: RotaryPatch,
                        ofs: torch.Tensor | None, block_opts: dict | None = None,
                        timestep: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One-way mode: run ``[text | reference]`` through every block at ``timestep`` (``[1]``; None = 0,
    clean) and keep each block's reference K/V (post-RoPE).

    Returns per block a pair of ``[1, H, N*R, D]`` tensors. The references attend to themselves and
    the text only, so this depends on the step only through ``timestep`` (and a noised ``latent``).
    ``block_opts``: the model call's transformer_options, passed on to the blocks (with this
    pass's attention override and :data:`REFERENCE_STREAM_KEY`) so block patches see them.
    """
    n, _, f, h, w = latent.shape
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in dm.blocks]
    for i in range(n):
        x = latent[i:i + 1].permute(0, 2, 1, 3, 4)
        hidden = dm.patch_embed(context, x)
        text = context.shape[1]
        enc, hid = hidden[:, :text], hidden[:, text:]
        t = torch.zeros(1, device=x.device) if timestep is None else timestep.reshape(1).to(x.device)
        temb = _timestep_embedding(dm, t, x.dtype)
        if dm.ofs_embedding_linear_1 is not None and ofs is not None:
            o = cogvideo.get_timestep_embedding(ofs[:1], dm.ofs_proj_dim, dm.time_proj_flip, dm.time_proj_shift)
            temb = temb + dm.ofs_embedding_linear_2(dm.ofs_embedding_act(dm.ofs_embedding_linear_1(o.to(x.dtype))))
        frames = f // (dm.patch_size_t or 1)
        rot = rotary.table(h // dm.patch_size, w // dm.patch_size, frames, 0, ref_rope, x.device) \
            if dm.use_rotary_positional_embeddings else None

        def capture(func, q, k, v, *args, _text=text, **kw):
            heads = kw.get("heads", args[0] if args else None)
            b, s, _ = k.shape
            kv_k = k.view(b, s, heads, -1).transpose(1, 2)[:, :, _text:]
            kv_v = v.view(b, s, heads, -1).transpose(1, 2)[:, :, _text:]
            kv[capture.block].append((kv_k, kv_v))
            capture.block += 1
            return func(q, k, v, *args, **kw)

        capture.block = 0
        opts = {**(block_opts or {}), "optimized_attention_override": capture, REFERENCE_STREAM_KEY: True}
        for block in dm.blocks:
            hid, enc = block(hidden_states=hid, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rot,
                             transformer_options=opts)
    return [(torch.cat([p[0] for p in blk], dim=2), torch.cat([p[1] for p in blk], dim=2)) for blk in kv]


def _check_geometry(entries: list[ReferenceEntry], x: torch.Tensor, context: torch.Tensor, dm) -> None:
    """Checks that need the video, so run at the sampler: each message starts with the pack node and the
    input to change, as the host attributes the error to the sampler node."""
    _, c, t, h, w = x.shape
    if h % dm.patch_size or w % dm.patch_size:
        raise PatchError(f"CustomVideoXReferenceEncode width/height: the video (the sampler's latent) is "
                         f"{w * 8}x{h * 8} pixels; with a reference, width and height must be multiples of "
                         f"{8 * dm.patch_size}: set the empty latent node to such a size (e.g. 720x480) and "
                         f"CustomVideoXReferenceEncode's width/height to the same")
    for e in entries:
        _, rc, _, rh, rw = e.latent.shape
        if rc != c:
            raise PatchError(f"CustomVideoXReferenceEncode vae: the reference latent has {rc} channels, the model "
                             f"takes {c}: encode the reference with this model's CogVideoX VAE")
        if (rh, rw) != (h, w):
            raise PatchError(f"CustomVideoXReferenceEncode width/height: the reference was encoded at "
                             f"{rw * 8}x{rh * 8} pixels but the video is {w * 8}x{h * 8}: set "
                             f"CustomVideoXReferenceEncode's width/height to the video's")
        r = e.region
        if r is not None and r.mode == "auto" and max(r.entity_idx) >= context.shape[1]:
            raise PatchError(f"CustomVideoXEntityRegion subject_words: the subject's words are at text tokens "
                             f"up to {max(r.entity_idx)} of the region's prompt, but the sampler's conditioning "
                             f"has {context.shape[1]} text tokens: encode the same prompt with the T5 CLIP "
                             f"(CLIPLoader type cogvideox) that the region node tokenises with")


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
    entries: list[ReferenceEntry] = transformer_options.get(ENTRIES_KEY) or []
    dm = executor.class_obj
    if not entries:
        return executor(x, timestep, context, ofs, transformer_options, **kwargs)
    _check_geometry(entries, x, context, dm)
    progress = _call_progress(transformer_options)
    row_bias, owner = _row_bias(entries, progress,
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

    p_t = dm.patch_size_t or 1
    _, _, t, h, w = x.shape
    grid = (math.ceil(t / p_t), h // dm.patch_size, w // dm.patch_size)
    per_ref = (h // dm.patch_size) * (w // dm.patch_size)
    refs = tuple(per_ref * (e.latent.shape[2] // p_t) for e in entries for _ in range(e.count))
    one_way = entries[0].mode == "one_way"
    layout = TokenLayout(text=context.shape[1], refs=refs, grid=grid, refs_in_queries=not one_way)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    per = x.shape[0] // len(cond_or_uncond)
    cond_row = cond_or_uncond.index(0) * per if 0 in cond_or_uncond else 0
    # ERAE's start_percent is read in the entry's TAB progress mode (steps without a schedule).
    erae_on = tuple(e.region is not None and (
                    e.region.start_percent <= 0
                    or progress(e.schedule.progress if e.schedule is not None else "steps") >= e.region.start_percent)
                    for e in entries)
    state = ForwardState(entries=entries, layout=layout, row_bias=row_bias, ref_owner=owner,
                         num_blocks=len(dm.blocks), cond_row=cond_row, map_rows=slice(cond_row, cond_row + per),
                         erae_on=erae_on, probe=bool(transformer_options.get(PROBE_KEY)))

    # Every mask is checked on the first call (a clear error before sampling goes far); a region is
    # used only from its start_percent on.
    masks = _mask_maps(entries, grid, t, x.shape[0], x.device)
    state.region_maps.update({e_i: m for e_i, m in masks.items() if erae_on[e_i]})
    # ERAE auto reads the positive prompt in every call: from the call's cond rows, else (the host ran the
    # uncond rows alone) the maps this step's cond call cached, else a probe forward of the positive prompt.
    # Outside a sampler (no run cache) a call without cond rows reads its own first rows.
    cache: RunCache | None = transformer_options.get(RUN_KEY)
    text = cache.positive(context) if cache is not None else None
    auto = [e_i for e_i, e in enumerate(entries) if erae_on[e_i] and e.region.mode == "auto"]
    if auto and text is not None and by_rows:
        state.run = cache
        if 0 in cond_or_uncond:
            rows = state.map_rows
            if torch.equal(context[rows], text.expand(per, -1, -1)):
                state.map_key = (x[rows], timestep[rows])
        else:
            cols = {e_i: owner.index(e_i) for e_i in auto}
            need = [e_i for e_i in auto if bool(torch.isfinite(row_bias[:, cols[e_i]]).any())]
            maps = _positive_maps(executor, x, timestep, text, ofs, transformer_options, kwargs, cache, need) \
                if need else {}
            state.region_maps.update(
                {e_i: refine_map(m, grid, entries[e_i].region.refine, entries[e_i].region.top_k,
                                 entries[e_i].region.smooth) for e_i, m in maps.items()})
            state.maps_given = True

    opts = dict(transformer_options)
    opts[STATE_KEY] = state
    if one_way:
        state.ref_kv = _one_way_kv(dm, entries, context, transformer_options, ofs, x, timestep, cond_row)
        return executor(x, timestep, context, ofs, opts, **kwargs)

    row_sigmas = _call_sigmas(transformer_options, x.shape[0]) \
        if any(e.reference_timestep == "noised" for e in entries) else None
    ref_x = [_reference_latent(e, i, row_sigmas).to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1, -1)
             for e in entries for i in range(e.count)]
    ref_frames = sum(r.shape[2] for r in ref_x)
    token = _ref_frames.set((ref_frames // p_t, entries[0].ref_rope))
    try:
        out = executor(torch.cat(ref_x + [x], dim=2), timestep, context, ofs, opts, **kwargs)
    finally:
        _ref_frames.reset(token)
    return out[:, :, ref_frames:]


def _select_rows(transformer_options: dict, chunks: list[int], idx: torch.Tensor, batch: int) -> dict:
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


def _split_rows(executor, off: torch.Tensor, x, timestep, context, ofs, transformer_options, **kwargs):
    """Rows whose references are all off (e.g. uncond with apply_to_uncond off) run without the
    reference tokens: exact, and cheaper than masking them inside the batch (bench/README.md)."""
    chunks = transformer_options["cond_or_uncond"]
    per = x.shape[0] // len(chunks)
    out = torch.empty_like(x)
    for rows_off in (True, False):
        keep = [i for i in range(len(chunks)) if bool(off[i * per]) == rows_off]
        idx = torch.tensor([i * per + j for i in keep for j in range(per)], device=x.device)
        opts = _select_rows(transformer_options, keep, idx, x.shape[0])
        args = (x[idx], timestep[idx], context[idx], None if ofs is None else ofs[idx], opts)
        out[idx] = executor(*args, **kwargs) if rows_off else diffusion_wrapper(executor, *args, **kwargs)
    return out


def _positive_maps(executor, x, timestep, text, ofs, transformer_options, kwargs, cache: RunCache,
                   need: list[int]) -> dict[int, torch.Tensor]:
    """The positive prompt's raw-normalised ERAE maps ``[B, Sv]`` for a call without cond rows: per chunk,
    the maps cached for the same (x, timestep), else a probe forward of the positive prompt on that x and
    timestep, stopped once the maps exist. The same noisy input and text give the same maps as the cond
    rows of a batched call (x, not sigma alone, is compared: Heun evaluates one sigma at two x)."""
    chunks = transformer_options["cond_or_uncond"]
    per = x.shape[0] // len(chunks)
    parts: dict[int, list[torch.Tensor]] = {e_i: [] for e_i in need}
    for c in range(len(chunks)):
        rows = slice(c * per, (c + 1) * per)
        maps = cache.maps_for(x[rows], timestep[rows])
        if maps is None or any(e_i not in maps for e_i in need):
            idx = torch.arange(c * per, (c + 1) * per, device=x.device)
            opts = _select_rows(transformer_options, [c], idx, x.shape[0])
            opts.update(cond_or_uncond=[0], **{PROBE_KEY: True})
            try:
                diffusion_wrapper(executor, x[rows], timestep[rows], text.expand(per, -1, -1),
                                  None if ofs is None else ofs[rows], opts, **kwargs)
            except _MapsReady as done:
                maps = done.maps
            else:
                raise RuntimeError("CustomVideoX: the ERAE map probe ran past its map blocks")
        for e_i in need:
            parts[e_i].append(maps[e_i])
    return {e_i: torch.cat(p) for e_i, p in parts.items()}


def _one_way_kv(dm, entries, context, transformer_options, ofs, x, timestep, cond_row: int):
    cache: RunCache | None = transformer_options.get(RUN_KEY)
    run = cache.kv if cache is not None else None
    rotary = dm._get_rotary_emb if hasattr(dm._get_rotary_emb, "table") else RotaryPatch(dm, "host")
    # The reference pass reads the positive prompt, whichever rows this call holds (the host may run
    # cond and uncond in one batch or apart); outside a sampler, the call's cond row.
    text = cache.positive(context) if cache is not None else None
    if text is None:
        text = context[cond_row:cond_row + 1]
    out = []
    for e in entries:
        # clean: one pass per run. sampling / noised: the pass depends on the call's timestep (and sigma),
        # so it is kept for the current one only (cond and uncond calls of a step share it).
        t_ref, latent, when = None, e.latent, None
        if e.reference_timestep != "clean":
            t_ref = timestep.flatten()[cond_row:cond_row + 1]
            when = (float(t_ref),)
            if e.reference_timestep == "noised":
                sigma = _call_sigmas(transformer_options, x.shape[0])[cond_row:cond_row + 1]
                latent = noised_reference(e.latent, sigma, reference_noise(e.latent.shape))
                when += (float(sigma),)
        # The sampler rebuilds the conditioning batch every step: compare the text by value.
        key = (id(e), x.device, x.dtype)
        hit = run.get(key) if run is not None else None
        if hit is not None and hit[1] == when and hit[0].shape == text.shape and torch.equal(hit[0], text):
            kv = hit[2]
        else:
            kv = reference_stream_kv(dm, latent.to(x.device, x.dtype), text, e.ref_rope, rotary, ofs,
                                     block_opts=transformer_options, timestep=t_ref)
            if run is not None:
                run[key] = (text.clone(), when, kv)
        out.append(kv)
    # Per block: one (k, v) per reference, in entry order.
    return [[(k[:, :, j * r:(j + 1) * r], v[:, :, j * r:(j + 1) * r])
             for e, blocks in zip(entries, out) for k, v in [blocks[b]]
             for r in [k.shape[2] // e.count] for j in range(e.count)]
            for b in range(len(dm.blocks))]


class AttentionOverride:
    """The ``optimized_attention_override``: reference attention, chained onto ``prev``."""

    def __init__(self, prev=None):
        self.prev = prev
        if prev is not None and not _takes_mask(prev):
            log.warning("CustomVideoX: the attention override already on this model (%r) takes no `mask`; "
                        "reference biases may be ignored by it", prev)

    def __call__(self, func, *args, **kwargs):
        call = partial(self.prev, func) if self.prev is not None else func
        opts = kwargs.get("transformer_options") or {}
        state: ForwardState | None = opts.get(STATE_KEY)
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
        block = state.block
        state.block += 1
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
                _map_ready(state, e_i, normalize_entity_map(state.map_acc.pop(e_i) / r.map_blocks, layout.grid,
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


def _map_ready(state: ForwardState, e_i: int, m: torch.Tensor, batch: int) -> None:
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
        raise _MapsReady(state.map_done)


def _takes_mask(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "mask" or p.kind == p.VAR_KEYWORD for p in params)


class RunCache:
    """Per sampling run: one-way reference K/V by entry, the positive prompt (the reference pass and
    ERAE auto maps read it), the latest positive ERAE maps with their (x, timestep), and the sampled
    model's ``percent_to_sigma`` (TAB progress by noise level). Not a dict, so the host's per-call
    copies of transformer_options share it."""

    def __init__(self, text: torch.Tensor | None = None,
                 percent_to_sigma: Callable[[float], float] | None = None) -> None:
        self.kv: dict = {}
        self.text = text
        self.percent_to_sigma = percent_to_sigma
        self.maps: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None

    def positive(self, context: torch.Tensor) -> torch.Tensor | None:
        """The positive prompt ``[1, L, D]`` on ``context``'s device and dtype, or None if it has no
        prompt of ``context``'s shape."""
        if self.text is None or self.text.shape[1:] != context.shape[1:]:
            return None
        self.text = self.text.to(context.device, context.dtype)
        return self.text[:1]

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


def _positive_text(guider) -> torch.Tensor | None:
    positive = (getattr(guider, "conds", None) or {}).get("positive") or []
    text = positive[0].get("cross_attn") if positive else None
    # A copy: run state must not alias the user's conditioning (it is dropped with the run).
    return text[:1].clone() if isinstance(text, torch.Tensor) else None


def outer_sample_wrapper(executor, *args, **kwargs):
    """Owns the per-run cache; it is dropped when sampling ends, however it ends."""
    guider = executor.class_obj
    opts = guider.model_options.setdefault("transformer_options", {})
    # The guider's model is the one sampled: its model_sampling includes any sampling node after Apply.
    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    opts[RUN_KEY] = RunCache(_positive_text(guider), getattr(sampling, "percent_to_sigma", None))
    try:
        return executor(*args, **kwargs)
    finally:
        opts.pop(RUN_KEY, None)


def prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    """Count the reference frames in the host's memory estimate (as extra latent frames). One-way
    references are counted the same way: their cached per-block K/V and their own pass are of the
    order of one more frame's activations."""
    entries = model.model_options.get("transformer_options", {}).get(ENTRIES_KEY) or []
    extra = sum(e.latent.shape[2] * e.count for e in entries)
    if extra and len(noise_shape) == 5:
        noise_shape = torch.Size([*noise_shape[:2], noise_shape[2] + extra, *noise_shape[3:]])
    return executor(model, noise_shape, *args, **kwargs)


# ReferenceEntry fields the patch reads from the first entry only, with the Apply input that sets them:
# one attention layout per model call (two-way tokens in the sequence or one-way cached K/V) and one
# RoPE table in which the video's own positions depend on the reference placement (shift moves them).
SHARED_SETTINGS = (("mode", "attention_mode"), ("ref_rope", "reference_rope"))


def _check_stackable(first: ReferenceEntry, entry: ReferenceEntry) -> None:
    for field_name, input_name in SHARED_SETTINGS:
        old, new = getattr(first, field_name), getattr(entry, field_name)
        if old != new:
            raise PatchError(f"CustomVideoXApply {input_name}: this node has {new!r} but the MODEL already has a "
                             f"reference with {old!r} from an earlier CustomVideoXApply; stacked references share "
                             f"one {input_name}: set the same value on every CustomVideoXApply of this model")


def apply_reference(model, entry: ReferenceEntry):
    """A patched clone of ``model`` with ``entry`` added (the input model is not changed)."""
    if entry.mode not in MODES:
        raise PatchError(f"attention mode {entry.mode!r} is not one of {MODES}")
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    entries = list(to.get(ENTRIES_KEY) or [])
    if entries:
        _check_stackable(entries[0], entry)
    to[ENTRIES_KEY] = entries + [entry]
    if not m.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, KEY):
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, diffusion_wrapper)
        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
        m.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, prepare_sampling_wrapper)
        to["optimized_attention_override"] = AttentionOverride(to.get("optimized_attention_override"))
        existing = m.object_patches.get(ROTARY_ATTR)
        if existing is None or not hasattr(existing, "table"):  # keep the loader's RotaryPatch (its mode)
            if existing is not None:
                log.warning("CustomVideoX: replacing another patch of %s (%r) with the pack's RoPE table",
                            ROTARY_ATTR, existing)
            m.add_object_patch(ROTARY_ATTR, RotaryPatch(m.get_model_object("diffusion_model"), "host"))
    return m
