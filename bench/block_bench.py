"""Block benchmark: one host ``CogVideoXBlock`` at CogVideoX-5B width, unpatched vs the pack's reference attention.

The block is the host's own class (comfy/ldm/cogvideo/model.py, inside a one-block host DiT with random
weights) and every patched row goes through the pack's real path: the inputs, the ``ForwardState`` and (in
one-way mode) the cached reference K/V are made by ``nodes.reference_patch.diffusion_wrapper`` itself (the
DiT call it wraps is captured, not run), the block calls the host's ``optimized_attention``, which calls the
pack's ``AttentionOverride`` -> ``cvx_core.reference_attention`` -> the host's attention function again.

Rows (time is the median of interleaved repeats of one block call):

* ``unpatched``            the host block on ``[text | video]``;
* ``two-way TAB``          ``[text | ref | video]`` as queries and keys, TAB column bias;
* ``two-way TAB+ERAE``     the same plus ERAE's region bias (folded q/k channel; a block after map_block);
* ``one-way TAB``          ``[text | video]`` queries, cached reference K/V inserted into the keys;
* ``one-way TAB+ERAE``     the same plus ERAE;
* ``ERAE map block``       two-way TAB in the block that computes the auto ERAE map (once per forward).

FLOP model per block and batch element (C = width, Nq tokens through the block, Nk keys, d' = attention
channels / head, e.g. 64 + 8 with ERAE's fold; elementwise ops not counted):

    projections  q, k, v, out : 4 * 2 * Nq * C^2
    attention    QK^T and AV  : 2 * 2 * Nq * Nk * C * (d' / 64)   (ideal rows use d' = 64: ERAE is O(Nq * R) adds)
    feed-forward              : 2 * 2 * Nq * C * 4C
    AdaLN modulation          : 2 * 2 * T_emb * 6C

Two-way: Nq = Nk = St + R + Sv. One-way: Nq = St + Sv, Nk = St + R + Sv (the reference's own pass through
the block runs once per sampling run; shown separately as ``ref stream``).

Memory: the peak of live tensor bytes made during the call (a TorchDispatchMode follows every aten op's
outputs and their storages; kernel-internal scratch is not visible), minus the unpatched row's peak. Ideal
extra: two-way = the reference tokens' share of the unpatched peak (peak * R / (St + Sv)) + bias; one-way =
the reference K/V for this call (2 * B * R * C) + bias; ERAE adds the region map (B * Sv floats).

Times on the CPU are process CPU time with one torch thread by default (the machine is shared; wall time
under load spread by +-30 %); on a GPU, wall time with synchronisation.

Run from the repo root: ``.venv/bin/python bench/block_bench.py [--frames 13] [--dtype bf16] [--batching]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
ATTENTION_FLAGS: dict[str, list[str]] = {
    "host": [],  # whatever the host picks (sub-quadratic on --cpu)
    "pytorch": ["--use-pytorch-cross-attention"],  # torch SDPA, the GPU default
    "sub_quad": ["--use-quad-cross-attention"],
    "split": ["--use-split-cross-attention"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Geometry:
    """Model width and token grid of a run (``FULL``: CogVideoX-5B at 480x720; ``SMOKE``: a tiny one)."""

    label: str
    heads: int
    head_dim: int
    time_dim: int
    text_dim: int
    text: int  # text tokens
    lat_h: int
    lat_w: int
    patch: int = 2

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def per_frame(self) -> int:
        return (self.lat_h // self.patch) * (self.lat_w // self.patch)

    def describe(self, frames: int) -> str:
        return (f"{self.label}: width {self.width} ({self.heads} heads x {self.head_dim}), "
                f"{self.lat_h * 8}x{self.lat_w * 8} px -> {self.lat_h}x{self.lat_w} latent, {frames} latent "
                f"frame(s): text {self.text} + reference {self.per_frame} + video {frames * self.per_frame} tokens")


# CogVideoX-5B: 48 heads x 64, time embedding 512, T5 width 4096; 480x720 -> 60x90 latent -> 30x45 tokens.
FULL = Geometry("CogVideoX-5B", 48, 64, 512, 4096, 226, 60, 90)
# --smoke: the same code path at a size that runs in seconds, so a refactor that breaks a bench fails the suite.
SMOKE = Geometry("smoke (tiny, not a measurement)", 2, 64, 64, 32, 16, 8, 10)


# ---------------------------------------------------------------- host + pack loading (shared by bench/*)


def boot_host(attention: str = "host", cpu: bool = True) -> None:
    """Parse the host's CLI args (before comfy.model_management is imported) and make it importable."""
    sys.path.insert(0, str(REPO / "scripts"))
    from host_boot import bootstrap_host_args

    bootstrap_host_args((["--cpu"] if cpu else []) + ATTENTION_FLAGS[attention])


def pack_module(sub: str) -> ModuleType:
    from pack_import import pack_module as load  # scripts/, on sys.path once boot_host ran

    return load(sub)


def environment_line(device: torch.device | str = "cpu") -> str:
    import comfy.ldm.modules.attention as host_attention

    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
            f"host attention {host_attention.optimized_attention.__name__}")


# ---------------------------------------------------------------- measuring


class PeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created by aten ops while active (inputs made before are not counted).

    A storage is live while any tensor returned by an op (or a view of it) is alive. Also records the
    largest tensor shape any op returned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0
        self.largest: tuple[int, ...] = ()
        self.shapes: list[tuple[int, ...]] = []

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                continue
            self.shapes.append(tuple(o.shape))
            if not func.is_view and o.numel() > math.prod(self.largest or (0,)):
                self.largest = tuple(o.shape)
            key = o.untyped_storage().data_ptr()
            if key in self.live:
                self.live[key][1] += 1
            elif func.is_view or key in inputs:
                continue  # a view of, or in-place write into, a tensor made before tracking started
            else:
                self.live[key] = [o.untyped_storage().nbytes(), 1]
                self.current += self.live[key][0]
                self.peak = max(self.peak, self.current)
            weakref.finalize(o, self._release, key)
        return out


_T0 = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr (the tables stay on stdout), with the wall time since start."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """CPU time of this process on the CPU (robust when other processes share the cores: time spent
    descheduled is not counted; exact for one torch thread), wall time on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def time_rows(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
              ) -> dict[str, list[float]]:
    """Interleaved timing (every row once per round, so drift hits all rows alike); seconds per call."""
    now = clock(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        label = f"warmup round {r + 1}/{warmup}" if r < warmup else f"round {r + 1 - warmup}/{repeats}"
        for i, (name, fn) in enumerate(fns.items()):
            sync(device)
            t0 = now()
            fn()
            sync(device)
            progress(f"{label}, row {i + 1}/{len(fns)} {name}: {(now() - t0) * 1e3:.0f} ms")
            if r >= warmup:
                times[name].append(now() - t0)
    return times


def block_flops(geo: Geometry, batch: int, nq: int, nk: int, attn_channels: int | None = None) -> float:
    """The FLOP model in the module docstring."""
    width = geo.width
    proj = 4 * 2 * nq * width * width
    attn = 2 * 2 * nq * nk * width * (attn_channels or geo.head_dim) / geo.head_dim
    ff = 2 * 2 * nq * width * 4 * width
    ada = 2 * 2 * geo.time_dim * 6 * width
    return batch * (proj + attn + ff + ada)


# ---------------------------------------------------------------- the block under the pack's real path


def random_init(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights (the host's ops skip init): ~unit-variance activations, non-trivial norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build_dit(geo: Geometry, dtype: torch.dtype, device: torch.device, layers: int = 1, seed: int = 0
              ) -> torch.nn.Module:
    """A host CogVideoX DiT of ``geo``'s width with ``layers`` blocks (the benchmark times ``blocks[0]``)."""
    import comfy.ops
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    dm = CogVideoXTransformer3DModel(
        num_attention_heads=geo.heads, attention_head_dim=geo.head_dim, in_channels=16, out_channels=16,
        time_embed_dim=geo.time_dim, text_embed_dim=geo.text_dim, num_layers=layers, patch_size=geo.patch,
        use_rotary_positional_embeddings=True, dtype=dtype, operations=comfy.ops.disable_weight_init)
    random_init(dm, seed)
    return dm.to(device).eval()


class CaptureExecutor:
    """Stands in for the host's DIFFUSION_MODEL executor: records what the pack's wrapper would run the DiT
    on (latent, transformer_options, the RoPE table the patched ``_get_rotary_emb`` gives for it)."""

    def __init__(self, dm: torch.nn.Module) -> None:
        self.class_obj = dm
        self.x: torch.Tensor | None = None
        self.opts: dict[str, Any] = {}
        self.rot: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x, timestep, context, ofs, transformer_options, **kwargs):
        dm = self.class_obj
        self.x, self.opts = x, transformer_options
        _, _, t, h, w = x.shape
        self.rot = dm._get_rotary_emb(h // dm.patch_size, w // dm.patch_size, t, device=x.device)
        return torch.zeros_like(x)


@dataclass
class Case:
    """One row: a block call and the FLOP/memory model of its shapes."""

    name: str
    fn: Callable[[], torch.Tensor]
    nq: int
    nk: int
    attn_channels: int | None = None  # None: the head dim (no ERAE fold)
    mode: str = "unpatched"
    erae: bool = False
    state: Any = None
    extra: dict[str, float] = field(default_factory=dict)


class BlockBench:
    """Builds the rows' inputs through the pack's wrapper, for one geometry."""

    def __init__(self, geo: Geometry, frames: int, batch: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> None:
        self.rp = pack_module("cvx_host.reference_patch")
        self.cv = pack_module("cvx_host.cogvideox")
        self.opt = pack_module("cvx_host.options")
        self.ent = pack_module("cvx_host.entries")
        self.rc = pack_module("cvx_host.run_cache")
        self.ao = pack_module("cvx_host.attention_override")
        self.er = pack_module("cvx_core.entity_region")
        self.tab = pack_module("cvx_core.tab_schedule")
        self.geo, self.frames, self.batch, self.dtype, self.device = geo, frames, batch, dtype, device
        self.dm = build_dit(geo, dtype, device, seed=seed)
        # What add_object_patch(ROTARY_ATTR, RotaryPatch) does on a patched clone.
        self.dm._get_rotary_emb = self.cv.RotaryPatch(self.dm, "exact")
        self.block = self.dm.blocks[0]
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 16, frames, geo.lat_h, geo.lat_w, generator=g).to(device, dtype)
        self.context = torch.randn(batch, geo.text, geo.text_dim, generator=g).to(device, dtype)
        self.ref = torch.randn(1, 16, 1, geo.lat_h, geo.lat_w, generator=g)
        self.timestep = torch.full((batch,), 500.0, device=device)
        mask = torch.zeros(1, geo.lat_h * 8, geo.lat_w * 8)
        mask[:, geo.lat_h * 2:geo.lat_h * 6, geo.lat_w * 8 // 3:geo.lat_w * 16 // 3] = 1.0  # the subject's box
        self.region_mask = mask
        self.ref_stream_seconds = float("nan")
        self.ref_kv_bytes = 0

    @property
    def video(self) -> int:
        return self.frames * self.geo.per_frame

    def entry(self, mode: str, erae: str | None = None, apply_to_uncond: bool = True) -> Any:
        region = None
        if erae == "mask":
            region = self.er.EntityRegion(mode="mask", mask=self.region_mask, lam=1.0)
        elif erae == "auto":
            region = self.er.EntityRegion(mode="auto", entity_idx=(3, 4), lam=1.0, map_block=0)
        # One-way rows measure the cached path: the reference pass once per run (reference_timestep "clean";
        # with the default "sampling" it runs once per step, shared by cond and uncond).
        return self.ent.ReferenceEntry(latent=self.ref, strength=1.0, schedule=self.tab.TABSchedule(),
                                      region=region, apply_to_uncond=apply_to_uncond, mode=mode,
                                      reference_timestep="clean" if mode == "one_way" else "sampling")

    def options(self, entries: list[Any], cond_or_uncond: list[int]) -> dict[str, Any]:
        steps = 50
        sample_sigmas = torch.linspace(10.0, 0.0, steps + 1)
        return {
            self.opt.ENTRIES_KEY: entries,
            # Mid-run (progress 0.5): the parabolic TAB bias is at its peak, so the column mask is built.
            "sigmas": sample_sigmas[steps // 2: steps // 2 + 1],
            "sample_sigmas": sample_sigmas,
            "cond_or_uncond": cond_or_uncond,
            self.opt.RUN_KEY: self.rc.RunCache(),  # the per-run cache an OUTER_SAMPLE wrapper would own
            "optimized_attention_override": self.ao.AttentionOverride(None),
        }

    def prepare(self, entries: list[Any], rows: slice | None = None, cond_or_uncond: list[int] | None = None,
                ) -> tuple[Callable[[], torch.Tensor], Any, dict[str, Any]]:
        """Run the pack's wrapper on a captured executor; return the block call, its state and options."""
        rows = rows if rows is not None else slice(None)
        x, ctx, ts = self.x[rows], self.context[rows], self.timestep[rows]
        cou = cond_or_uncond if cond_or_uncond is not None else ([0] if x.shape[0] == 1 else [0, 1])
        ex = CaptureExecutor(self.dm)
        with torch.no_grad():
            now = clock(self.device)
            t0 = now()
            self.rp.diffusion_wrapper(ex, x, ts, ctx, None, self.options(entries, cou) if entries else {})
            wrapper_s = now() - t0
            hidden = self.dm.patch_embed(ctx, ex.x.permute(0, 2, 1, 3, 4))
            text = self.geo.text
            enc, hid = hidden[:, :text].contiguous(), hidden[:, text:].contiguous()
            temb = self.cv._timestep_embedding(self.dm, ts, self.dtype)
        opts, rot = ex.opts, ex.rot
        state = opts.get(self.opt.STATE_KEY)
        if state is not None and state.ref_kv is not None:
            self.ref_stream_seconds = wrapper_s  # the wrapper ran the reference stream (cache miss)
            self.ref_kv_bytes = sum(t.numel() * t.element_size() for kv in state.ref_kv for p in kv for t in p)

        def call() -> torch.Tensor:
            if state is not None:
                state.block = 0  # one block per "forward": every call is block 0
            with torch.no_grad():
                return self.block(hidden_states=hid, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rot,
                                  transformer_options=opts)[0]

        return call, state, opts

    def cases(self) -> list[Case]:
        St, R, Sv, d = self.geo.text, self.geo.per_frame, self.video, self.geo.head_dim
        out = []
        call, _, _ = self.prepare([])
        out.append(Case("unpatched", call, St + Sv, St + Sv))
        for mode, label in (("two_way", "two-way"), ("one_way", "one-way cached")):
            nq = St + R + Sv if mode == "two_way" else St + Sv
            for erae in (None, "mask"):
                call, state, _ = self.prepare([self.entry(mode, erae)])
                out.append(Case(f"{label} TAB" + ("+ERAE" if erae else ""), call, nq, St + R + Sv,
                                d + (8 if erae else 0), mode, bool(erae), state))
        call, state, _ = self.prepare([self.entry("two_way", "auto")])
        out.append(Case("ERAE map block (2-way)", call, St + R + Sv, St + R + Sv, d, "two_way", True, state))
        return out


# ---------------------------------------------------------------- reporting


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:8.1f}"


def run_block_table(bench: BlockBench, repeats: int, warmup: int, memory: bool) -> dict[str, dict[str, float]]:
    cases = bench.cases()
    times = time_rows({c.name: c.fn for c in cases}, repeats, warmup, bench.device)
    elt = torch.finfo(bench.dtype).bits // 8
    geo = bench.geo
    B, St, R, Sv, C = bench.batch, geo.text, geo.per_frame, bench.video, geo.width
    peaks: dict[str, tuple[int, tuple[int, ...]]] = {}
    if memory:
        for i, c in enumerate(cases):
            progress(f"memory pass, row {i + 1}/{len(cases)} {c.name}")
            with PeakTracker() as tr:
                c.fn()
            peaks[c.name] = (tr.peak, tr.largest)
    base_t = statistics.median(times["unpatched"])
    base_min = min(times["unpatched"])
    base_f = block_flops(geo, B, St + Sv, St + Sv)
    base_peak = peaks.get("unpatched", (0, ()))[0]
    print(f"{'row':26s} {'Nq':>6s} {'Nk':>6s} {'ms':>9s} {'min-max ms':>15s} {'ratio':>6s} {'ideal':>6s} "
          f"{'meas/id':>7s} {'r(min)':>6s} {'extraMB':>8s} {'idealMB':>8s}  largest tensor")
    results: dict[str, dict[str, float]] = {}
    for c in cases:
        t = statistics.median(times[c.name])
        ratio = t / base_t
        ideal = block_flops(geo, B, c.nq, c.nk) / base_f + (B * c.nq * R / base_f if c.erae else 0.0)
        bias = B * (St + R + Sv) * elt
        if c.mode == "two_way":
            ideal_mem = base_peak * R / (St + Sv) + bias
        elif c.mode == "one_way":
            ideal_mem = 2 * B * R * C * elt + bias
        else:
            ideal_mem = 0.0
        if c.erae:
            ideal_mem += B * Sv * 4
        peak, largest = peaks.get(c.name, (0, ()))
        extra = peak - base_peak if memory else float("nan")
        print(f"{c.name:26s} {c.nq:6d} {c.nk:6d} {t * 1e3:9.1f} "
              f"{min(times[c.name]) * 1e3:7.0f}-{max(times[c.name]) * 1e3:<7.0f} {ratio:6.3f} {ideal:6.3f} "
              f"{ratio / ideal:7.3f} {min(times[c.name]) / base_min:6.3f} "
              f"{fmt_mb(extra) if memory else '     n/a'} "
              f"{fmt_mb(ideal_mem) if c.mode != 'unpatched' else '     0.0'}  "
              f"{'x'.join(map(str, largest)) if memory else ''}")
        results[c.name] = {"ms": t * 1e3, "ratio": ratio, "min_ms": min(times[c.name]) * 1e3,
                           "min_ratio": min(times[c.name]) / base_min, "ideal": ideal, "meas_ideal": ratio / ideal,
                           "extra_mb": extra / 2**20, "ideal_mb": ideal_mem / 2**20}
    return results


def summarize(res: dict[str, dict[str, float]], bench: BlockBench, blocks: int, steps: int) -> None:
    two, one = res["two-way TAB"], res["one-way cached TAB"]
    e2 = res["two-way TAB+ERAE"]["ms"] / two["ms"] - 1
    e1 = res["one-way cached TAB+ERAE"]["ms"] / one["ms"] - 1
    # Default ERAE (auto, map_block 2) over a 42-block 5B forward: blocks 0..1 TAB, block 2 computes the map,
    # blocks 3..41 use it (fold).
    map_ms = res["ERAE map block (2-way)"]["ms"]
    full = (2 * two["ms"] + map_ms + (blocks - 3) * res["two-way TAB+ERAE"]["ms"]) / (blocks * two["ms"]) - 1
    one_target = 1 + 1.2 * (one["ideal"] - 1)
    ref_ms = bench.ref_stream_seconds * 1e3
    print(f"ref stream (one-way, once per run, this block incl. patch embed): {ref_ms:.0f} ms "
          f"= {ref_ms / max(one['ms'], 1e-9):.2f} block calls; cached K/V {bench.ref_kv_bytes / 2**20:.1f} MB/block "
          f"({bench.ref_kv_bytes * blocks / 2**20:.0f} MB for {blocks} blocks); "
          f"amortized over {steps} steps x 2 (cfg): {ref_ms / (2 * steps) / one['ms'] * 100:.2f}% per call with "
          f"reference_timestep clean, {ref_ms / 2 / one['ms'] * 100:.1f}% per call with sampling (once per step)")
    print(f"SUMMARY two-way meas/ideal {two['meas_ideal']:.3f} (target <= 1.05: "
          f"{'met' if two['meas_ideal'] <= 1.05 else 'MISSED'}); one-way ratio {one['ratio']:.3f} vs target "
          f"<= {one_target:.3f} ({'met' if one['ratio'] <= one_target else 'MISSED'}); ERAE over TAB per block: "
          f"two-way {e2 * 100:+.1f}%, one-way {e1 * 100:+.1f}%, default auto over {blocks} blocks (two-way) "
          f"{full * 100:+.1f}% (target <= 5%: {'met' if max(e2, e1, full) <= 0.05 else 'MISSED'})")
    m2 = res["two-way TAB+ERAE"]["min_ms"] / two["min_ms"] - 1
    m1 = res["one-way cached TAB+ERAE"]["min_ms"] / one["min_ms"] - 1
    print(f"SUMMARY(min of repeats) two-way meas/ideal {two['min_ratio'] / two['ideal']:.3f}; one-way ratio "
          f"{one['min_ratio']:.3f} (target <= {one_target:.3f}); ERAE over TAB two-way {m2 * 100:+.1f}%, "
          f"one-way {m1 * 100:+.1f}%")


def run_batching(bench: BlockBench, repeats: int, warmup: int) -> None:
    """cond+uncond in one batch, reference not applied to uncond: the masked batched call vs running the
    uncond row without reference tokens (unpatched) and the cond row patched (what the pack does)."""
    assert bench.batch == 2
    print("\nBatching (B=2: row 0 cond, row 1 uncond, apply_to_uncond off)")
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    outs: dict[str, torch.Tensor] = {}
    for mode in ("two_way", "one_way"):
        # One B=2 call with the uncond row's reference columns at -inf (the pack runs such batches split:
        # reference_patch._split_rows), built from a cond+cond batch whose row 1 bias is then switched off.
        batched, state, _ = bench.prepare([bench.entry(mode)], cond_or_uncond=[0, 1])
        state.row_bias[1] = -math.inf
        state.masks.clear()
        cond, _, _ = bench.prepare([bench.entry(mode, apply_to_uncond=False)], rows=slice(0, 1),
                                   cond_or_uncond=[0])
        uncond, _, _ = bench.prepare([], rows=slice(1, 2))

        def split(cond=cond, uncond=uncond) -> torch.Tensor:
            return torch.cat([cond()[:, -bench.video:], uncond()])  # two-way outputs also hold the reference

        fns[f"{mode} batched+masked"] = batched
        fns[f"{mode} split"] = split
        outs[f"{mode} batched+masked"], outs[f"{mode} split"] = batched()[:, -bench.video:], split()
    base, _, _ = bench.prepare([])
    fns["unpatched B=2"] = base
    times = time_rows(fns, repeats, warmup, bench.device)
    t0 = statistics.median(times["unpatched B=2"])
    geo = bench.geo
    St, R, Sv = geo.text, geo.per_frame, bench.video
    print(f"{'row':24s} {'ms':>9s} {'ratio':>6s} {'ideal':>6s}  max|split - batched|")
    for name, ts in times.items():
        mode = name.split()[0]
        t = statistics.median(ts)
        nq = St + R + Sv if mode == "two_way" else St + Sv
        if name.endswith("batched+masked"):
            ideal = block_flops(geo, 2, nq, St + R + Sv) / block_flops(geo, 2, St + Sv, St + Sv)
        elif name.endswith("split"):
            ideal = (block_flops(geo, 1, nq, St + R + Sv) + block_flops(geo, 1, St + Sv, St + Sv)) / block_flops(
                geo, 2, St + Sv, St + Sv)
        else:
            ideal = 1.0
        diff = ""
        if name.endswith("split"):
            d = (outs[name].float() - outs[f"{mode} batched+masked"].float()).abs().max().item()
            diff = f"{d:.2e}"
        print(f"{name:24s} {t * 1e3:9.1f} {t / t0:6.3f} {ideal:6.3f}  {diff}")
    for mode in ("two_way", "one_way"):
        b, s = statistics.median(times[f"{mode} batched+masked"]), statistics.median(times[f"{mode} split"])
        print(f"SUMMARY batching {mode}: split / batched+masked = {s / b:.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1, help="latent frames of the video (13 = 49 pixel frames)")
    ap.add_argument("--batch", type=int, default=1, help="batch rows (2 = cond + uncond)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--attention", choices=list(ATTENTION_FLAGS), default="host",
                    help="the host's attention function (host = the host's own choice for the device)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=42, help="blocks of the full model, for the ERAE/cache estimate")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps, for the amortized ref stream")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: CPU time is then exact; 0 = torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the (slow) memory pass")
    ap.add_argument("--batching", action="store_true", help="also the cond+uncond batching comparison (B=2)")
    ap.add_argument("--only-batching", action="store_true", help="only the batching comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny width and grid through the same code (seconds; checks the bench runs, measures nothing)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    boot_host(args.attention, cpu=device.type == "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    geo = SMOKE if args.smoke else FULL
    progress(f"building the {geo.label} block and the rows' inputs ({args.frames} latent frame(s))")
    bench = BlockBench(geo, args.frames, 2 if args.only_batching else args.batch, dtype, device)
    print(f"block bench: {geo.describe(args.frames)}, batch {bench.batch}, {args.dtype}, median of "
          f"{args.repeats} (+{args.warmup} warmup), TAB at progress 0.5 (bias 1.0), ERAE lambda 1; "
          f"times are {'process CPU time' if device.type == 'cpu' else 'wall time'}")
    print(environment_line(device))
    if not args.only_batching:
        res = run_block_table(bench, args.repeats, args.warmup, not args.no_memory)
        summarize(res, bench, args.blocks, args.steps)
    if args.batching or args.only_batching:
        bb = bench if bench.batch == 2 else BlockBench(geo, args.frames, 2, dtype, device)
        run_batching(bb, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
