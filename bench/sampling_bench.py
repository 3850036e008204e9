"""Sampling benchmark: whole sampling runs of a tiny native CogVideoX through the real host, with and without
the pack's patch, and the patch's own per-step time outside the DiT's arithmetic.

The model is the host's class with the tiny width (2 heads x 64) but the 5B's 42 blocks, so that the
per-block work of the patch (one attention override call per block) is counted as often as in the real
model, while the arithmetic stays small. Runs go through ``comfy.sample.sample`` (euler, cfg 2: cond and
uncond share one model call per step) with the patch made by the pack's own CustomVideoXApply node.

Columns of the first table: median wall time of the whole run, per step, and the difference to the
unpatched run per step in microseconds (that difference holds both the patch's overhead and the arithmetic
of the extra reference tokens, which is small at this size).

The second table splits the patch's own time per model call (= per step here), measured in a separate
instrumented run with timers around: the pack's DIFFUSION_MODEL wrapper (minus the DiT it calls), the pack's
attention override (minus the host attention function it calls, summed over the blocks), and the module
functions the patch looks up at call time (schedule lookup, row bias, column bias, layout/state, region map,
reference stream).

Run from the repo root: ``.venv/bin/python bench/sampling_bench.py [--steps 10] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_bench import boot_host, environment_line, pack_module, progress  # noqa: E402

# (module, function) pairs of the host layer timed per model call.
TIMED = (("progress", "run_progress"), ("reference_patch", "build_row_bias"), ("attention_override", "column_bias"),
         ("reference_patch", "ForwardState"), ("cogvideox", "TokenLayout"), ("reference_patch", "mask_to_token_map"),
         ("reference_patch", "refine_map"), ("attention_override", "entity_attention"),
         ("cogvideox", "reference_stream_kv"), ("reference_patch", "_one_way_kv"))
# The auto ERAE row takes its map from this block, and later blocks use it: the model needs more blocks.
MAP_BLOCK = 2
MIN_LAYERS = MAP_BLOCK + 2
# --smoke: the minimum model and run, through the same code (seconds; checks the bench runs, measures nothing).
SMOKE = {"layers": MIN_LAYERS, "steps": 2, "runs": 1, "frames": 1}


class Timers:
    """Accumulated seconds and call counts per name."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] += time.process_time() - t0
                self.n[name] += 1

        return timed


def build(layers: int, seed: int = 0):
    import comfy.sd
    import tiny_models as tm

    sd = tm.build_native_state_dict({**tm.TINY_CONFIG_1_0, "num_layers": layers}, seed=seed)
    return comfy.sd.load_diffusion_model_state_dict(sd)


def configs(pk) -> dict[str, dict[str, Any]]:
    mask = torch.zeros(1, 64, 80)
    mask[:, 16:48, 20:60] = 1.0
    tab = pk.tab.TABSchedule()
    return {
        "two-way TAB": dict(attention_mode="two_way", schedule=tab),
        "two-way TAB+ERAE mask": dict(attention_mode="two_way", schedule=tab,
                                      region=pk.er.EntityRegion(mode="mask", mask=mask)),
        "two-way TAB+ERAE auto": dict(attention_mode="two_way", schedule=tab,
                                      region=pk.er.EntityRegion(mode="auto", entity_idx=(3, 4),
                                                                map_block=MAP_BLOCK)),
        # One-way rows measure the cached path: one reference pass per run (reference_timestep "clean"; with
        # "sampling"/"noised" the pass runs once per step).
        "one-way TAB": dict(attention_mode="one_way", schedule=tab, reference_timestep="clean"),
        "one-way TAB+ERAE mask": dict(attention_mode="one_way", schedule=tab, reference_timestep="clean",
                                      region=pk.er.EntityRegion(mode="mask", mask=mask)),
    }


def patched(pk, model, ref: torch.Tensor, **kw: Any):
    enc = pk.types.EncodedReference(latent=ref, width=ref.shape[-1] * 8, height=ref.shape[-2] * 8)
    args = dict(reference=enc, strength=1.0, block_start=0, block_end=-1, apply_to_uncond=True,
                attention_mode="two_way", reference_rope="negative")
    args.update(kw)
    return pk.apply.CustomVideoXApply.execute(model=model, **args).result[0]


def instrument(pk, model, ref: torch.Tensor, timers: Timers, **kw: Any):
    """A patched clone whose wrapper and override are timed from outside and inside."""
    import comfy.patcher_extension as pe

    def outer(executor, *args, **kwargs):
        return timers.wrap("wrapper total", executor)(*args, **kwargs)

    def inner(executor, *args, **kwargs):
        return timers.wrap("DiT (inside wrapper)", executor)(*args, **kwargs)

    def host_attention(func, *args, **kwargs):
        return timers.wrap("host attention", func)(*args, **kwargs)

    base = model.clone()
    base.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_outer", outer)
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = host_attention
    m = patched(pk, base, ref, **kw)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "zz_bench_inner", inner)
    to = m.model_options["transformer_options"]
    pack_override = to["optimized_attention_override"]
    to["optimized_attention_override"] = lambda func, *a, **k: timers.wrap("override total", pack_override)(
        func, *a, **k)
    return m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=42,
                    help=f"DiT blocks (42 = CogVideoX-5B; at least {MIN_LAYERS}: the auto ERAE row maps at block "
                         f"{MAP_BLOCK})")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per config (median), after one warmup")
    ap.add_argument("--frames", type=int, default=3, help="latent frames (8x10 latent, 4x5 tokens per frame)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny ops are latency-bound; 2 threads on a shared CPU add ms of jitter)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"the minimum run ({', '.join(f'--{k} {v}' for k, v in SMOKE.items())}): checks the bench "
                         f"runs, measures nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.layers < MIN_LAYERS:
        ap.error(f"--layers {args.layers} is too few: the auto ERAE row computes its map in block {MAP_BLOCK} and "
                 f"applies it to the blocks after it, so the model needs at least {MIN_LAYERS} blocks")
    boot_host()
    torch.set_num_threads(args.threads)
    import comfy.sample

    pk = type("pk", (), {})()
    pk.host = {m: pack_module(f"cvx_host.{m}") for m, _ in TIMED}
    pk.apply, pk.types = pack_module("nodes.apply"), pack_module("nodes.types")
    pk.er, pk.tab = pack_module("cvx_core.entity_region"), pack_module("cvx_core.tab_schedule")
    model = build(args.layers)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 1, 8, 10, generator=g)
    pos, neg = ([[torch.randn(1, 226, 32, generator=g), {}]] for _ in range(2))
    noise = torch.randn(1, 16, args.frames, 8, 10, generator=g)
    latent = torch.zeros_like(noise)

    def run(m) -> None:
        comfy.sample.sample(m, noise, args.steps, 2.0, "euler", "simple", pos, neg, latent, disable_pbar=True,
                            seed=0)

    cfgs = configs(pk)
    models = {"unpatched": model} | {name: patched(pk, model, ref, **kw) for name, kw in cfgs.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.runs + 1):  # interleaved; round 0 is warmup
        for i, (name, m) in enumerate(models.items()):
            t0 = time.process_time()
            run(m)
            dt = time.process_time() - t0
            progress(f"{f'run {r}/{args.runs}' if r else 'warmup'}, config {i + 1}/{len(models)} {name}: "
                     f"{dt * 1e3:.0f} ms")
            if r:
                times[name].append(dt)
    print(f"sampling bench: tiny native CogVideoX (host class, 2 heads x 64, {args.layers} blocks), latent "
          f"16x{args.frames}x8x10 (text 226 + reference 20 + video {args.frames * 20} tokens), euler, "
          f"{args.steps} steps, cfg 2 (one model call per step, B=2), median of {args.runs} runs; process CPU time")
    print(environment_line())
    base = statistics.median(times["unpatched"]) / args.steps
    print(f"{'config':24s} {'run ms':>9s} {'ms/step':>8s} {'+us/step':>9s} {'ratio':>6s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:24s} {t * 1e3:9.1f} {t / args.steps * 1e3:8.2f} {(t / args.steps - base) * 1e6:9.0f} "
              f"{t / args.steps / base:6.3f}")

    print(f"\nthe patch's own time per model call (us; {args.layers} blocks; one instrumented run, after a warmup)")
    header = ["wrapper self", "w/o ref strm", "override self", "override/blk"] + [n for _, n in TIMED] + ["ref passes"]
    print(f"{'config':24s} " + " ".join(f"{h[:13]:>13s}" for h in header))
    summary = []
    for i, (name, kw) in enumerate(cfgs.items()):
        progress(f"instrumented run, config {i + 1}/{len(cfgs)} {name}")
        timers = Timers()
        run(instrument(pk, model, ref, timers, **kw))  # warmup
        timers = Timers()
        m = instrument(pk, model, ref, timers, **kw)
        real = {(mod, n): getattr(pk.host[mod], n) for mod, n in TIMED}
        try:
            for (mod, n), fn in real.items():
                setattr(pk.host[mod], n, timers.wrap(n, fn))
            run(m)
        finally:
            for (mod, n), fn in real.items():
                setattr(pk.host[mod], n, fn)
        calls = timers.n["wrapper total"]
        wrapper_self = timers.s["wrapper total"] - timers.s["DiT (inside wrapper)"]
        override_self = timers.s["override total"] - timers.s["host attention"]
        per_block = override_self / max(timers.n["override total"], 1)
        no_ref = wrapper_self - timers.s["reference_stream_kv"]
        cells = [wrapper_self / calls, no_ref / calls, override_self / calls, per_block]
        cells += [timers.s[n] / calls for _, n in TIMED]
        print(f"{name:24s} " + " ".join(f"{c * 1e6:13.0f}" for c in cells)
              + f" {timers.n['reference_stream_kv']:13d}")
        summary.append(f"{name} {(no_ref + override_self) / calls * 1e6:.0f}")
    print(f"SUMMARY patch overhead per step outside the DiT arithmetic (wrapper w/o reference stream + override "
          f"self, {args.layers} blocks), us: " + ", ".join(summary) + f"; unpatched step {base * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
