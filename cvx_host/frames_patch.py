"""The Wan patch: TAB/ERAE on the reference frames a native Wan model already carries (Phantom, VACE), and
on the references CustomVideoXApply inserts into Wan T2V (:mod:`.wan_insert`), which it biases the same way.

``apply_frames_bias(model, entry)`` returns a patched clone of a host ``ModelPatcher`` with:

* a DIFFUSION_MODEL wrapper that, once per model call, finds the reference frames (via
  :mod:`.wan`, the Wan backbone), works out the per-row biases at this call's sampling progress and puts them,
  with the token layout, in a copy of ``transformer_options``. Nothing is added to the model's input:
  the reference tokens are the model's own;
* an ``optimized_attention_override`` (chained onto any existing one) that adds the bias on the
  reference-key columns of the self-attention calls, and reads the ERAE map from the text
  cross-attention of blocks ``map_block .. map_block + map_blocks - 1`` (averaged).

ERAE auto maps are the positive prompt's in every call: from the call's cond rows, else (the host ran the
uncond rows alone) the maps this step's cond call cached, else a probe forward of the positive
conditioning's inputs (its prompt, and its Phantom frames) up to the last map block (:mod:`.run_cache`).

With a subject mask on the reference images, the reference tokens outside the subject get an extra
bias on their key columns (hidden by default): the same column mask, no extra attention cost.

Where every bias is 0 (strength 1, no schedule or region, rows or blocks outside the settings) the
attention call is passed through untouched, so the output is the unpatched model's bit for bit.
Several patches stack: their biases add.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import comfy.patcher_extension as pe
import torch

from ..cvx_core.entity_region import entity_attention, mask_to_token_map
from ..cvx_core.frame_layout import FrameLayout, background_column_bias, row_biases, subject_tokens
from ..cvx_core.reference_attention import column_bias, reference_attention
from ..cvx_core.token_layout import TokenLayout
from . import options
from . import wan_reference_stream as stream
from .entries import BiasSettings
from .errors import PatchError
from .progress import call_progress
from .run_cache import AutoMaps, estimate_with_extra_frames, install_run_cache, positive_maps
from .wan import CallOrder, Wan, check_self_call, timestep_with_references, to_heads

NODE = "CustomVideoXReferenceFramesBias"


@dataclass(frozen=True, eq=False)
class FramesEntry(BiasSettings):
    """One CustomVideoXReferenceFramesBias (or CustomVideoXApply on Wan T2V): the bias it adds and where."""

    leading_frames: int = 0
    reference_mask: torch.Tensor | None = None  # [1 or n_refs, H, W], 1 = subject
    background_bias: float = -math.inf  # extra logit bias on the tokens outside the subject
    # An inserted reference (CustomVideoXApply on Wan T2V): its own frames [start, end) among the inserted
    # ones; "unbiased" (uncond with apply_to_uncond off, blocks outside the range) means off (-inf) for
    # them, not the model's own attention. None: the model's own frames (Phantom/VACE), all of them.
    frames: tuple[int, int] | None = None
    # An inserted reference's attention_mode, reference_rope and reference_timestep (wan_reference_stream).
    mode: str = "two_way"
    ref_rope: str = "negative"
    reference_timestep: str = "sampling"

    def columns(self, n_refs: int) -> list[bool]:
        """Which of the call's reference frames this entry biases."""
        return [self.frames is None or self.frames[0] <= i < self.frames[1] for i in range(n_refs)]

    def biases(self, progress: Callable[[str], float], n_refs: int) -> tuple[list[float], list[float]]:
        """Per reference frame: the bias on the rows this entry biases, and on the others."""
        b, off = self.bias(progress), (0.0 if self.frames is None else -math.inf)
        cols = self.columns(n_refs)
        return [b if c else 0.0 for c in cols], [off if c else 0.0 for c in cols]



@dataclass
class FramesState:
    """What one model call needs, built by the wrapper and read by every attention call."""

    entries: list[FramesEntry]
    layout: TokenLayout  # a FrameLayout, or one-way inserted references' (keys only)
    entry_bias: list[torch.Tensor]  # per entry: [B, n_refs]
    entry_off: list[torch.Tensor | None]  # per entry: [B, n_refs] in blocks outside its range (None = 0)
    entry_background: list[torch.Tensor | None]  # per entry: [B, keys] background column bias, or None
    entry_rows: list[torch.Tensor]  # per entry: [B] 1 on the rows it biases (apply_to_uncond), else 0
    num_blocks: int
    backbone: Wan
    region_on: tuple[bool, ...]  # per entry: ERAE applies at this call's progress
    maps: AutoMaps  # the ERAE auto maps this call reads (from its cond rows, unless given)
    order: CallOrder = field(default_factory=CallOrder)
    region_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # entry -> [B, Sv]
    cache: dict = field(default_factory=dict)  # (kind, active entries) -> mask / region bias
    ref_kv: list | None = None  # one-way inserted references: per block, their cached (K, V)

    def active(self, block: int) -> tuple[bool, ...]:
        return tuple(e.in_range(block, self.num_blocks) for e in self.entries)

    def bias(self, active: tuple[bool, ...]) -> torch.Tensor:
        """``[B, n_refs]``: the sum of the entries' biases in this block (inactive ones: their "off" bias)."""
        parts = [b if on else off for b, off, on in zip(self.entry_bias, self.entry_off, active)]
        return sum((p for p in parts if p is not None), torch.zeros_like(self.entry_bias[0]))

    def mask(self, active: tuple[bool, ...], dtype: torch.dtype) -> torch.Tensor | None:
        key = ("mask", active, dtype)  # built once per call and block set, not once per block
        if key not in self.cache:
            mask = column_bias(self.layout, self.bias(active), dtype)
            background = [b for b, on in zip(self.entry_background, active) if on and b is not None]
            if background:
                mask = sum(background)[:, None, None].to(dtype) + (0 if mask is None else mask)
            self.cache[key] = mask
        return self.cache[key]

    def region(self, block: int, active: tuple[bool, ...]) -> torch.Tensor | None:
        uses = tuple(on and i in self.region_maps
                     and not (e.region.mode == "auto" and block <= e.region.last_map_block)
                     for i, (e, on) in enumerate(zip(self.entries, active)))
        if not any(uses):
            return None
        key = ("region", uses)
        if key not in self.cache:
            n = len(self.layout.refs)
            total = torch.zeros(self.entry_bias[0].shape[0], n, self.layout.video, device=self.entry_bias[0].device)
            for i, u in enumerate(uses):
                if u:  # an entry's map on its own frames' columns
                    cols = torch.tensor(self.entries[i].columns(n), device=total.device)
                    m = self.region_maps[i] * (self.entries[i].region.lam * self.entry_rows[i][:, None])
                    total[:, cols] += m[:, None]
            self.cache[key] = total
        return self.cache[key]


def _rows_biased(entry: FramesEntry, cond_or_uncond: list[int], batch: int) -> list[bool]:
    if entry.apply_to_uncond or not cond_or_uncond:
        return [True] * batch
    per = batch // len(cond_or_uncond)
    return [cond_or_uncond[r // per] != 1 for r in range(batch)]


def _background(entry: FramesEntry, layout: FrameLayout, rows: list[bool], device) -> torch.Tensor | None:
    """The entry's background column bias ``[B, keys]``, or None where it changes nothing."""
    if entry.reference_mask is None:
        return None
    n, masks = len(layout.refs), entry.reference_mask
    if masks.shape[0] not in (1, n):
        raise PatchError(f"{NODE}: reference_mask holds {masks.shape[0]} masks but this run has {n} reference "
                         f"frame(s): give one mask per reference image, in order, or one for all")
    subject = subject_tokens(masks, layout.grid[1:]).expand(n, -1)
    for i in range(n):
        if not bool(subject[i].any()):
            raise PatchError(f"{NODE}: reference_mask {min(i, masks.shape[0] - 1)} covers no token of reference "
                             f"frame {i} ({layout.grid[1]}x{layout.grid[2]} tokens, half a token's area or more "
                             f"counts): paint the subject white (1); LoadImage's mask of a cut-out is 1 on the "
                             f"transparent background, so put InvertMask after it")
    if entry.background_bias == 0:
        return None
    out = background_column_bias(layout, subject, entry.background_bias, rows, device)
    return out if bool((out != 0).any()) else None


def diffusion_wrapper(executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
    entries: list[FramesEntry] = transformer_options.get(options.FRAMES_ENTRIES_KEY) or []
    if not entries:
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    backbone = Wan(executor.class_obj)
    inserted = transformer_options.get(options.INSERTED_FRAMES_KEY) or []
    if kwargs.get("context_latents") is not None:  # more tokens after the video: the layout would be wrong
        raise PatchError(f"{'CustomVideoXApply' if inserted else NODE} model: the conditioning carries in-context "
                         f"reference latents (BerniniConditioning), which the pack does not handle yet: sample this "
                         f"MODEL without the CustomVideoX node, or build the conditioning without them")
    if inserted:  # CustomVideoXApply on Wan T2V: the references' K/V (one-way) or leading frames (two-way)
        backbone.check_call(inserted, x)
        if entries[0].mode == "one_way":
            kv = partial(stream.one_way_kv, executor.class_obj, entries, inserted, x, timestep, context,
                         transformer_options, _cond_row(transformer_options.get("cond_or_uncond") or [], x.shape[0]))
            return _biased_call(executor, entries, backbone, x, 0, timestep, context, clip_fea, time_dim_concat,
                                transformer_options, layout=stream.one_way_layout(x, len(inserted)), ref_kv=kv,
                                **kwargs)
        refs = stream.two_way_inputs(entries, inserted, x, transformer_options)
        n_in = sum(r.shape[2] for r in refs)
        # Wan 2.2 TI2V gives one timestep per latent frame: the references' go in front, the video keeps its own.
        timestep = timestep_with_references(timestep, n_in, x.shape[2], "CustomVideoXApply")
        out = _biased_call(executor, entries, backbone, torch.cat([*refs, x], dim=2), n_in, timestep, context,
                           clip_fea, time_dim_concat, stream.with_rope(transformer_options, n_in, entries[0].ref_rope),
                           **kwargs)
        return out[:, :, n_in:]
    return _biased_call(executor, entries, backbone, x, entries[0].leading_frames, timestep, context, clip_fea,
                        time_dim_concat, transformer_options, **kwargs)


def _cond_row(cond_or_uncond: list[int], batch: int) -> int:
    return cond_or_uncond.index(0) * (batch // len(cond_or_uncond)) if 0 in cond_or_uncond else 0


def _biased_call(executor, entries: list[FramesEntry], backbone: Wan, x, leading: int, timestep, context, clip_fea,
                 time_dim_concat, transformer_options: dict, layout: TokenLayout | None = None,
                 ref_kv: Callable[[], list] | None = None, **kwargs):
    """``layout``/``ref_kv``: one-way inserted references, their layout and a call giving their per-block K/V."""
    if layout is None:
        layout = backbone.frames_layout(x, time_dim_concat, leading, NODE)
    progress = call_progress(transformer_options)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or []
    batch = x.shape[0]
    n = len(layout.refs)
    rows = [_rows_biased(e, cond_or_uncond, batch) for e in entries]
    pairs = [e.biases(progress, n) for e in entries]
    entry_bias = [row_biases(on, r, n, x.device, unbiased=off) for (on, off), r in zip(pairs, rows)]
    entry_off = [None if e.frames is None else row_biases(off, [False] * batch, n, x.device, unbiased=off)
                 for e, (_, off) in zip(entries, pairs)]
    entry_background = [_background(e, layout, r, x.device) for e, r in zip(entries, rows)]
    region_on = tuple(e.region_on(progress) for e in entries)
    # Nothing to do only if no entry biases any block: an inserted reference is off outside its block range.
    if (all(not bool((b != 0).any()) for b in entry_bias) and all(b is None for b in (*entry_off, *entry_background))
            and not any(region_on)):
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    if ref_kv is not None:
        # One-way references off for every row (and so in every block): the plain model, without their pass.
        if all(bool(torch.isneginf(b).all()) for b in entry_bias):
            return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        ref_kv = ref_kv()
    per = batch // len(cond_or_uncond) if cond_or_uncond else batch
    cond_row = _cond_row(cond_or_uncond, batch)
    auto = {i: e.region for i, e in enumerate(entries) if region_on[i] and e.region.mode == "auto"}
    state = FramesState(entries=entries, layout=layout, entry_bias=entry_bias, entry_off=entry_off,
                        entry_background=entry_background,
                        entry_rows=[torch.tensor(r, dtype=torch.float32, device=x.device) for r in rows],
                        num_blocks=backbone.num_blocks, backbone=backbone, region_on=region_on,
                        maps=AutoMaps(auto, layout.grid, slice(cond_row, cond_row + per),
                                      probe=options.is_map_probe(transformer_options)),
                        ref_kv=ref_kv)
    for i, e in enumerate(entries):
        r = e.region
        if r is not None and r.mode == "mask" and state.region_on[i]:
            m = mask_to_token_map(r.mask, layout.grid).to(x.device, torch.float32)
            state.region_maps[i] = r.refined(m[None].expand(batch, -1), layout.grid)
    # ERAE auto reads the positive prompt in every call. Outside a sampler (no run cache) a call without
    # cond rows reads its own first chunk.
    cache = options.run_cache(transformer_options)
    text = cache.positive(context) if cache is not None else None
    if auto and text is not None:
        if 0 in cond_or_uncond:
            rows = state.maps.rows
            if torch.equal(context[rows], text.expand(per, -1, -1)):
                state.maps.run, state.maps.key = cache, (x[rows], timestep[rows])
        elif cond_or_uncond:
            def probe(rows: slice, opts: dict) -> None:
                # The cond rows' inputs: the positive prompt, and the positive's own extra inputs (Phantom's
                # frames are zeros in WanPhantomSubjectToVideo's negative_img_text, the images in the positive).
                pos = cache.positive_inputs(per, x)
                kv = state.ref_kv  # one-way references: their K/V come from the positive prompt already
                _biased_call(executor, entries, backbone, x[rows], leading, timestep[rows], text.expand(per, -1, -1),
                             pos.pop("clip_fea", None), pos.pop("time_dim_concat", None), opts, layout=layout,
                             ref_kv=None if kv is None else (lambda: kv), **{**kwargs, **pos})

            need = [i for i in auto if bool(state.entry_rows[i].any())]
            maps = positive_maps(cache, x, timestep, transformer_options, need, probe) if need else {}
            state.region_maps.update({i: entries[i].region.refined(m, layout.grid) for i, m in maps.items()})
            state.maps.given = True
    opts = dict(transformer_options)
    opts[options.FRAMES_STATE_KEY] = state
    return executor(x, timestep, context, clip_fea, time_dim_concat, opts, **kwargs)


class FramesAttentionOverride:
    """The ``optimized_attention_override``, chained onto ``prev``."""

    def __init__(self, prev=None):
        self.prev = prev

    def __call__(self, func, *args, **kwargs):
        call = partial(self.prev, func) if self.prev is not None else func
        opts = kwargs.get("transformer_options") or {}
        state: FramesState | None = opts.get(options.FRAMES_STATE_KEY)
        if state is None:
            return call(*args, **kwargs)
        block, is_self, branch = state.backbone.attention_call(state.order, opts)
        q, k, v = args[:3]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        active = state.active(block)
        if not is_self:
            if branch == 0:
                self._read_map(state, block, q, k, heads)
            return call(*args, **kwargs)
        check_self_call(q, k, state.layout, block, NODE)
        mask = state.mask(active, q.dtype)
        region = state.region(block, active)
        if mask is None and region is None and state.ref_kv is None:
            return call(*args, **kwargs)  # the model's own attention, untouched
        if kwargs.get("mask") is not None:
            raise ValueError(f"{NODE}: another patch passes an attention mask to Wan's self-attention; "
                             f"combining it with the reference bias is not supported")
        kwargs = {key: val for key, val in kwargs.items() if key not in ("heads", "mask", "skip_reshape",
                                                                         "skip_output_reshape")}
        rest = args[4:]

        def attn(q_, k_, v_, mask_):
            return call(q_, k_, v_, heads, *rest, mask=mask_, skip_reshape=True, skip_output_reshape=True, **kwargs)

        q4, k4, v4 = (to_heads(t, heads) for t in (q, k, v))
        ref_kv = None if state.ref_kv is None else state.ref_kv[block]
        out = reference_attention(q4, k4, v4, state.layout, state.bias(active), region, ref_kv, attn=attn, mask=mask)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    @staticmethod
    def _read_map(state: FramesState, block: int, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        layout = state.layout
        for i, e in enumerate(state.entries):
            if not state.maps.reads(i, block):
                continue
            r = e.region
            if max(r.entity_idx) >= k.shape[1]:
                raise ValueError(f"{NODE}: the region's subject words are at text positions up to "
                                 f"{max(r.entity_idx)}, but the prompt has {k.shape[1]} tokens")
            vs, rows = layout.video_query_start, state.maps.rows
            a = entity_attention(to_heads(q[rows], heads), to_heads(k[rows], heads), (0, k.shape[1]),
                                 (vs, vs + layout.video), r.entity_idx, layout.grid)
            m = state.maps.add(i, block, a)
            if m is not None:  # only a cond chunk's prompt holds the entity: its maps serve every chunk
                state.region_maps[i] = r.refined(m.repeat(q.shape[0] // m.shape[0], 1), layout.grid)
                state.cache = {key: val for key, val in state.cache.items() if key[0] != "region"}


def apply_frames_bias(model, entry: FramesEntry):
    """A patched clone of ``model`` with ``entry`` added (the input model is not changed)."""
    m = model.clone()
    Wan.for_model(m, NODE)
    to = options.model_options(m)
    entries = list(to.get(options.FRAMES_ENTRIES_KEY) or [])
    if entries and entries[0].leading_frames != entry.leading_frames:
        raise ValueError(f"{NODE}: this model is already patched with leading_frames="
                         f"{entries[0].leading_frames}; every {NODE} on one model needs the same value")
    if to.get(options.INSERTED_FRAMES_KEY):
        raise PatchError(f"{NODE} model: this MODEL already has a reference inserted by CustomVideoXApply; bias its "
                         f"frames with CustomVideoXApply's own strength/schedule/region, or use {NODE} on a "
                         f"Phantom/VACE graph without CustomVideoXApply")
    to[options.FRAMES_ENTRIES_KEY] = entries + [entry]
    install(m)
    return m


def _prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    """Count the inserted reference frames in the host's memory estimate (as extra latent frames)."""
    extra = len(model.model_options.get("transformer_options", {}).get(options.INSERTED_FRAMES_KEY) or [])
    return estimate_with_extra_frames(executor, model, noise_shape, extra, *args, **kwargs)


def install(m) -> None:
    """The Wan patch's wrappers and attention override on the clone ``m`` (once)."""
    if m.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, options.FRAMES_WRAPPER_KEY):
        return
    to = options.model_options(m)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, options.FRAMES_WRAPPER_KEY, diffusion_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, options.FRAMES_WRAPPER_KEY, _prepare_sampling_wrapper)
    install_run_cache(m)  # TAB progress by noise level reads the run's percent_to_sigma
    to[options.ATTENTION_OVERRIDE_KEY] = FramesAttentionOverride(to.get(options.ATTENTION_OVERRIDE_KEY))
