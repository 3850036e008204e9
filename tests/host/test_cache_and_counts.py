"""Issue 7: the one-way reference cache and what the patch builds per model call, on the real host sampler.

A 4-block tiny native CogVideoX (the host's class, random weights) sampled with ``comfy.sample.sample``
(euler, cfg 2, so cond and uncond share each model call), with the pack's CustomVideoXApply on it. Module
attributes that the patch code looks up at call time (``reference_stream_kv``, ``column_bias``,
``ForwardState``, ...) are wrapped with counters through ``monkeypatch``.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import tiny_models as tm
import torch
from customvideox.cvx_core import entity_region, reference_attention, tab_schedule
from customvideox.cvx_host import (
    attention_override,
    backbone,
    cogvideox,
    cogvideox_block,
    entries,
    errors,
    forward_state,
    options,
    progress,
    reference_patch,
)
from customvideox.nodes import apply
from customvideox.nodes import types as node_types
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("one_thread")]

BLOCKS, STEPS = 4, 3




@pytest.fixture(scope="module")
def pk() -> SimpleNamespace:
    return SimpleNamespace(rp=reference_patch, cv=cogvideox,
                           ao=attention_override, opt=options,
                           prog=progress, ent=entries,
                           fs=forward_state, err=errors,
                           host_backbone=backbone, host_block=cogvideox_block, apply=apply, types=node_types,
                           ra=reference_attention, er=entity_region,
                           tab=tab_schedule)


def _load(seed: int):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(
        tm.build_native_state_dict({**tm.TINY_CONFIG_1_0, "num_layers": BLOCKS}, seed=seed))


@pytest.fixture(scope="module")
def model():
    return _load(0)


@pytest.fixture(scope="module")
def inputs() -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        ref=torch.randn(1, 16, 1, 8, 10, generator=g), ref2=torch.randn(1, 16, 1, 8, 10, generator=g),
        pos=torch.randn(1, 226, 32, generator=g), neg=torch.randn(1, 226, 32, generator=g),
        noise=torch.randn(1, 16, 3, 8, 10, generator=g))


def patch(pk, model, ref: torch.Tensor, mode: str = "one_way", strength: float = 1.5, region: Any = "mask",
          apply_to_uncond: bool = True, schedule: bool = True, **kw: Any):
    """CustomVideoXApply (the node's own execute) with TAB and, by default, a mask-mode ERAE region (or the
    EntityRegion given)."""
    reg = region if isinstance(region, pk.er.EntityRegion) else None
    if region == "mask":
        H, W = ref.shape[-2] * 8, ref.shape[-1] * 8  # the video's size: a mask of another aspect is refused
        m = torch.zeros(1, H, W)
        m[:, H // 4:3 * H // 4, W // 4:3 * W // 4] = 1.0
        reg = pk.er.EntityRegion(mode="mask", mask=m, lam=1.0, start_percent=0.0)
    elif region == "auto":
        reg = pk.er.EntityRegion(mode="auto", entity_idx=(3, 4), lam=1.0, map_block=1)
    enc = pk.types.EncodedReference(latent=ref, width=ref.shape[-1] * 8, height=ref.shape[-2] * 8)
    args = dict(reference=enc, strength=strength, block_start=0, block_end=-1, apply_to_uncond=apply_to_uncond,
                attention_mode=mode, reference_rope="negative", region=reg,
                schedule=pk.tab.TABSchedule() if schedule else None)
    args.update(kw)
    return pk.apply.CustomVideoXApply.execute(model=model, **args).result[0]


def sample(model, inputs, steps: int = STEPS, callback: Callable | None = None, sampler: str = "euler") -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros_like(inputs.noise)
    return comfy.sample.sample(model, inputs.noise, steps, 2.0, sampler, "simple", [[inputs.pos, {}]],
                               [[inputs.neg, {}]], latent, callback=callback, disable_pbar=True, seed=0)


@pytest.fixture
def ref_stream(pk, monkeypatch) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Every reference_stream_kv result (one per pass of the reference through the DiT blocks)."""
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    real = pk.cv.reference_stream_kv

    def counting(*args, **kwargs):
        kv = real(*args, **kwargs)
        calls.append(kv)
        return kv

    monkeypatch.setattr(pk.cv, "reference_stream_kv", counting)
    yield calls


def uncached(pk, patched):
    """The same patched model without the per-run cache (no OUTER_SAMPLE wrapper: every call recomputes)."""
    import comfy.patcher_extension as pe

    m = patched.clone()
    m.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, pk.opt.WRAPPER_KEY)
    return m


def calc_separately(args: dict, uncond_first: bool = False) -> list[torch.Tensor]:
    """A ``sampler_calc_cond_batch_function`` body: cond and uncond as separate model calls (as the host does
    when memory is short or the conds cannot be batched), cond first or uncond first. The other conds are
    passed as None, so each call keeps its rows' cond/uncond label (``cond_or_uncond``), as in the host."""
    import comfy.samplers

    conds = args["conds"]
    out = {}
    for i in list(range(len(conds)))[::-1 if uncond_first else 1]:
        only = [c if j == i else None for j, c in enumerate(conds)]
        out[i] = comfy.samplers.calc_cond_batch(args["model"], only, args["input"], args["sigma"],
                                                args["model_options"])[i]
    return [out[i] for i in range(len(conds))]


def separate_cond_uncond(model, uncond_first: bool = False):
    """A clone whose sampler runs cond and uncond as separate model calls (:func:`calc_separately`)."""
    m = model.clone()
    m.model_options["sampler_calc_cond_batch_function"] = partial(calc_separately, uncond_first=uncond_first)
    return m


# ---------------------------------------------------------------- cache correctness


def test_one_way_cached_equals_uncached_over_a_sampling_run(pk, model, inputs, ref_stream):
    patched = patch(pk, model, inputs.ref)
    cached = sample(patched, inputs)
    n_cached = len(ref_stream)
    plain = sample(uncached(pk, patched), inputs)
    assert len(ref_stream) - n_cached == STEPS  # the uncached model really recomputes every call
    assert torch.allclose(cached, plain, atol=1e-6, rtol=1e-5), (cached - plain).abs().max()
    base = sample(model, inputs)
    assert (cached - base).abs().max() > 1e-3  # the reference acts


def test_reference_passes_through_the_blocks_once_per_sampling_run(pk, model, inputs, ref_stream):
    per_step: list[int] = []
    # reference_timestep 'clean' (t = 0) is the one-way setting that is cached per run.
    sample(patch(pk, model, inputs.ref, reference_timestep="clean"), inputs,
           callback=lambda step, *_: per_step.append(len(ref_stream)))
    assert len(ref_stream) == 1, f"{len(ref_stream)} reference passes in one {STEPS}-step cfg run: {per_step}"


def test_one_way_output_and_passes_do_not_depend_on_cond_uncond_batching(pk, model, inputs, ref_stream):
    patched = patch(pk, model, inputs.ref, reference_timestep="clean")
    batched = sample(patched, inputs)
    n = len(ref_stream)
    separate = sample(separate_cond_uncond(patched), inputs)
    assert torch.allclose(batched, separate, atol=1e-5, rtol=1e-4), (batched - separate).abs().max()
    assert len(ref_stream) - n == 1


def test_cache_dropped_when_the_run_ends_or_is_interrupted_and_new_runs_recompute(pk, model, inputs, ref_stream):
    import comfy.model_management as mm

    patched = patch(pk, model, inputs.ref)
    refs: list[weakref.ref] = []

    def kv_refs() -> None:
        refs.extend(weakref.ref(t) for kv in ref_stream for pair in kv for t in pair)

    first = sample(patched, inputs)
    kv_refs()
    n_first = len(ref_stream)
    assert n_first >= 1
    assert pk.opt.RUN_KEY not in patched.model_options.get("transformer_options", {})

    def interrupt(step, *_):
        if step == 1:
            raise mm.InterruptProcessingException()

    with pytest.raises(mm.InterruptProcessingException):
        sample(patched, inputs, callback=interrupt)
    kv_refs()
    assert pk.opt.RUN_KEY not in patched.model_options.get("transformer_options", {})
    ref_stream.clear()
    gc.collect()
    assert refs and all(r() is None for r in refs), "cached reference K/V outlived its sampling run"

    # A new run recomputes and gives the same result; a new reference or a new model gives new K/V.
    again = sample(patched, inputs)
    assert len(ref_stream) >= 1 and torch.equal(again, first)
    k_first = ref_stream[0][0][0].clone()
    ref_stream.clear()
    other_ref = sample(patch(pk, model, inputs.ref2), inputs)
    assert len(ref_stream) >= 1 and not torch.allclose(ref_stream[0][0][0], k_first)
    assert not torch.allclose(other_ref, first)
    ref_stream.clear()
    sample(patch(pk, _load(1), inputs.ref), inputs)
    assert len(ref_stream) >= 1 and not torch.allclose(ref_stream[0][0][0], k_first)


def test_cached_kv_lives_on_the_models_device_in_its_dtype(pk, model, inputs, ref_stream):
    patched = patch(pk, model, inputs.ref)
    sample(patched, inputs, steps=1)
    dm = patched.model.diffusion_model
    want = next(dm.parameters()).device
    assert want == patched.load_device
    kv = ref_stream[0]
    assert len(kv) == BLOCKS
    for k, v in kv:
        assert k.device == want and v.device == want
        assert k.dtype == patched.model.get_dtype() and v.dtype == patched.model.get_dtype()
        assert k.shape == v.shape == (1, 2, 20, 64)  # [1, heads, reference tokens (4x5), head dim]


# ---------------------------------------------------------------- built once per model call


def _count(monkeypatch, module: ModuleType, name: str, counter: Counter, key: str | None = None) -> None:
    real = getattr(module, name)

    def counting(*args, **kwargs):
        counter[key or name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)


def _model_calls(model, counter: Counter):
    import comfy.patcher_extension as pe

    def count(executor, *args, **kwargs):
        counter["model calls"] += 1
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "cvx_test_count", count)
    return m


@pytest.mark.parametrize("strength,schedule", [(1.5, True), (1.0, False)],
                         ids=["bias", "zero-bias"])
@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_bias_and_layout_are_built_once_per_model_call(pk, model, inputs, monkeypatch, mode, strength, schedule):
    c: Counter = Counter()
    for module, name in ((pk.ao, "column_bias"), (pk.ra, "column_bias"), (pk.rp, "ForwardState"),
                         (pk.cv, "TokenLayout"), (pk.prog, "run_progress"), (pk.rp, "build_row_bias"),
                         (pk.rp, "mask_to_token_map"), (pk.rp, "refine_map")):
        _count(monkeypatch, module, name, c, f"{module.__name__.rsplit('.', 1)[-1]}.{name}")
    _count(monkeypatch, pk.ao, "reference_attention", c, "attention calls")
    patched = _model_calls(patch(pk, model, inputs.ref, mode=mode, strength=strength, schedule=schedule), c)
    sample(patched, inputs)
    calls = c["model calls"]
    assert calls == STEPS and c["attention calls"] == BLOCKS * calls, c
    for name in ("reference_patch.ForwardState", "cogvideox.TokenLayout", "reference_patch.build_row_bias",
                 "reference_patch.mask_to_token_map", "reference_patch.refine_map"):
        assert c[name] == calls, (name, c)
    # Progress only for a schedule, once per model call.
    assert c["progress.run_progress"] == (calls if schedule else 0), c
    # One column mask per model call (one block range here), none rebuilt inside the blocks.
    assert c["attention_override.column_bias"] == calls, c
    assert c["reference_attention.column_bias"] == 0, c


# ---------------------------------------------------------------- no dense Sq x Sk tensor


class AllocationRecorder(TorchDispatchMode):
    """Shapes of every tensor an aten op returns, except inside the host's own attention function (its
    kernels are the host's business, the same with or without the patch); the masks passed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.masks: list[tuple[int, ...] | None] = []
        self.inside = False

    def host_attention(self, func, *args, **kwargs):
        mask = kwargs.get("mask")
        self.masks.append(None if mask is None else tuple(mask.shape))
        self.inside = True
        try:
            return func(*args, **kwargs)
        finally:
            self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.inside:
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
        return out


@pytest.mark.parametrize("mode", ["two_way", "one_way"])
@pytest.mark.parametrize("region", [None, "mask", "auto"])
def test_no_dense_sq_by_sk_tensor_in_a_patched_forward(pk, model, mode, region):
    import comfy.model_management as mm

    rec = AllocationRecorder()
    base = model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = rec.host_attention
    g = torch.Generator().manual_seed(2)
    B, T, h, w = 2, 3, 32, 48  # 16x24 = 384 tokens per frame
    ref = torch.randn(1, 16, 1, h, w, generator=g)
    patched = patch(pk, pk.cv.install_rotary(base, "exact"), ref, mode=mode, strength=2.0, region=region,
                    apply_to_uncond=False, schedule=False)
    mm.load_models_gpu([patched])
    x = torch.randn(B, 16, T, h, w, generator=g)
    ctx = torch.randn(B, 226, 32, generator=g)
    opts = dict(patched.model_options["transformer_options"], wrappers=patched.wrappers, cond_or_uncond=[0, 1])
    st, r, sv = 226, 384, T * 384
    sq, sk = (st + r + sv if mode == "two_way" else st + sv), st + r + sv
    with torch.no_grad(), rec:
        out = patched.model.diffusion_model(x, torch.tensor([500.0, 500.0]), ctx, transformer_options=opts)
    assert out.shape == x.shape and not math.isnan(float(out.sum()))
    # The uncond row (reference off) runs on its own without reference tokens, then the cond row with them.
    assert rec.masks[:BLOCKS] == [None] * BLOCKS, rec.masks
    assert len(rec.masks) >= 2 * BLOCKS and all(m == (1, 1, 1, sk) for m in rec.masks[-BLOCKS:]), rec.masks
    dense = [s for s in rec.shapes if math.prod(s) >= sq * sk
             or (len(s) >= 2 and s[-2:] in ((sq, sk), (sq, r), (sv, r), (sk, sk)))]
    assert dense == [], dense[:5]
    biggest = max(math.prod(s) for s in rec.shapes)
    assert biggest <= B * sk * 4 * 128, biggest  # the FF hidden state, [B, S, 4 * width]
