"""Training benchmark: one adapter training step (forward + backward + optimizer step) at CogVideoX-5B width.

The model is the host's own ``CogVideoXTransformer3DModel`` at 5B width (48 heads x 64, time embedding 512,
T5 width 4096) with ``--blocks`` blocks and random weights, loaded as a host ModelPatcher
(``comfy.sd.load_diffusion_model_state_dict``). Everything after that is the pack's real training path:
``cvx_host.training.training_model_fn`` patches the model (reference-branch adapter blocks + the reference
machinery, loaded through the host's model management) and ``cvx_core.training.train_adapter`` runs the
steps on a one-sample in-memory ``CachedDataset`` (random latent, reference latent and T5-width caption
embedding; the dataset cache, VAE and text encoder are not part of a step). ``mm.in_training`` is set around
the steps as ``train_on_host`` does.

Rows (interleaved: every row once per round, so machine load hits all rows alike):

* ``base forward (no ref)``  the frozen base DiT on ``[text | video]``, no grad (no reference tokens);
* ``forward (no grad)``      the training call itself (``model_fn``: ``[text | ref | video]``, the adapter on
                             the reference rows) under ``torch.no_grad`` -- the baseline of ``ratio``;
* ``train step, ckpt on``    one ``train_adapter`` step with gradient checkpointing (the default);
* ``train step, ckpt off``   the same without.

A training step is timed from ``train_adapter``'s ``check_interrupt`` hook (called at the start of every
step) to its ``progress`` hook (called after ``optimizer.step()``): data pick, noise, forward, v-loss,
backward, grad clipping, AdamW step. Each round calls ``train_adapter`` with one step (``resume`` off,
no checkpoints), so AdamW's state is created inside the timed step (a few MB: negligible here).

Memory (one extra, untimed call per row, made before the timed rounds: it is also their warmup): on the CPU, the peak of bytes held by torch's CPU allocator during
the call, above the level at its start, from the profiler's memory records (as
``tests/unit/test_entity_region.py::peak_cpu_bytes``); allocations that oneDNN or other libraries make outside
torch's allocator are not seen. For a training row the call is the whole one-step ``train_adapter`` (its
setup: the adapter's fp32 copies and AdamW state, a few MB, is inside). On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation at the start. ``+weights`` adds the frozen model's
bytes (held throughout, not counted in ``peak``).

Times on the CPU are process CPU time (``time.process_time``; time spent descheduled on this shared machine
is not counted) with one torch thread by default; on a GPU, wall time with synchronisation.

Run from the repo root: ``.venv/bin/python bench/train_bench.py [--blocks 2] [--frames 13] [--dtype bf16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_bench import (  # noqa: E402
    ATTENTION_FLAGS,
    DTYPES,
    FULL,
    SMOKE,
    Geometry,
    boot_host,
    clock,
    environment_line,
    pack_module,
    progress,
    sync,
)

ROWS = ("base forward (no ref)", "forward (no grad)", "train step, ckpt on", "train step, ckpt off")
BASELINE = "forward (no grad)"


def build_model(geo: Geometry, blocks: int, dtype: torch.dtype, seed: int = 0):
    """A host ModelPatcher of a CogVideoX 1.0 DiT of ``geo``'s width with ``blocks`` blocks and random weights."""
    import comfy.sd
    import tiny_models as tm  # scripts/, on sys.path after boot_host

    config = {**tm.TINY_CONFIG_1_0, "num_attention_heads": geo.heads, "attention_head_dim": geo.head_dim,
              "time_embed_dim": geo.time_dim, "text_embed_dim": geo.text_dim, "num_layers": blocks}
    sd = tm.build_native_state_dict(config, seed=seed)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if model is None:
        raise RuntimeError("the host did not detect the benchmark's CogVideoX state dict")
    return model


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` above the level at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


class TrainBench:
    """The patched model, one cached sample and the four row calls."""

    def __init__(self, geo: Geometry, blocks: int, frames: int, dtype: torch.dtype, rank: int, alpha: float,
                 targets: tuple[str, ...], seed: int = 0) -> None:
        import comfy.model_management as mm

        self.mm = mm
        self.tr = pack_module("cvx_core.training")
        lora_mod = pack_module("cvx_core.lora")
        ds = pack_module("cvx_core.dataset")
        ta = pack_module("cvx_host.training")
        rb = pack_module("cvx_host.adapters")
        t0 = time.perf_counter()
        self.model = build_model(geo, blocks, dtype, seed)
        shapes = lora_mod.block_target_shapes(rb.module_shapes(self.model), targets)
        self.lora = lora_mod.init_adapter(shapes, rank, alpha, seed=seed)
        self.model_fn, self.device, self.dtype, self.objective = ta.training_model_fn(self.model, self.lora)
        self.build_s = time.perf_counter() - t0
        self.dm = self.model.model.diffusion_model
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.dm.parameters())
        self.lora_params = sum(p.numel() for p in self.lora.parameters())
        self.settings = {flag: self.tr.TrainSettings(
            steps=1, learning_rate=1e-4, rank=rank, alpha=alpha, targets=targets, seed=seed, reference_drop=0.0,
            text_drop=0.0, gradient_checkpointing=flag, checkpoint_every=0, timestep_min=500, timestep_max=500)
            for flag in (True, False)}
        g = torch.Generator().manual_seed(seed + 1)
        sample = {"latent": torch.randn(1, 16, frames, geo.lat_h, geo.lat_w, generator=g),
                  "reference": torch.randn(1, 16, 1, geo.lat_h, geo.lat_w, generator=g),
                  "text": torch.randn(1, geo.text, geo.text_dim, generator=g)}
        self.data = ds.CachedDataset([sample], torch.zeros(1, geo.text, geo.text_dim), [])
        # The forward rows' inputs, made as train_adapter makes them (t = 500, v-prediction noising).
        x_t, _ = self.objective.point(sample["latent"], torch.randn(sample["latent"].shape, generator=g), 500)
        self.inputs = (x_t.to(self.device, self.dtype), torch.tensor([500.0], device=self.device),
                       sample["text"].to(self.device, self.dtype), sample["reference"].to(self.device, self.dtype))
        self.out_dir = Path(tempfile.mkdtemp(prefix="cvx_train_bench_"))
        self.now = clock(self.device)
        self.step_s: float = float("nan")
        self.losses: list[float] = []

    def base_forward(self) -> None:
        x, t, text, _ = self.inputs
        with torch.no_grad():
            self.dm(x, t, text, transformer_options={})

    def forward(self) -> None:
        with torch.no_grad():
            self.model_fn(*self.inputs, False)

    def train_step(self, checkpointing: bool) -> None:
        """One ``train_adapter`` step; ``self.step_s`` = its time from the start hook to the progress hook."""
        marks: list[float] = []

        def start() -> None:
            sync(self.device)
            marks.append(self.now())

        def progress(step: int, total: int, loss: float) -> None:
            sync(self.device)
            marks.append(self.now())
            self.losses.append(loss)

        self.mm.in_training = True  # as nodes.train_adapter.train_on_host
        try:
            self.tr.train_adapter(self.settings[checkpointing], self.data, self.model_fn, self.lora, self.objective,
                                  self.out_dir, device=self.device, dtype=self.dtype, resume=False,
                                  progress=progress, check_interrupt=start)
        finally:
            self.mm.in_training = False
        self.step_s = marks[1] - marks[0]

    def rows(self) -> dict[str, Callable[[], None]]:
        return {ROWS[0]: self.base_forward, ROWS[1]: self.forward,
                ROWS[2]: lambda: self.train_step(True), ROWS[3]: lambda: self.train_step(False)}

    def timed(self, name: str, fn: Callable[[], None]) -> float:
        if name.startswith("train"):
            fn()
            return self.step_s
        sync(self.device)
        t0 = self.now()
        fn()
        sync(self.device)
        return self.now() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="DiT blocks at 5B width (the 5B has 42)")
    ap.add_argument("--frames", type=int, default=1, help="latent frames of the video (13 = 49 pixel frames)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the model's dtype (LoRA trains in fp32)")
    ap.add_argument("--attention", choices=list(ATTENTION_FLAGS), default="pytorch",
                    help="the host's attention function (pytorch = torch SDPA, the GPU default; host = the "
                         "host's own choice for the device)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", choices=("attention", "all"), default="attention",
                    help="attention = q,k,v,out (the default); all = + feed-forward")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds (default: 0 after the memory pass, which runs every row once first; "
                         "1 with --no-memory)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: CPU time is then exact; 0 = torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny width and grid through the same code (seconds; checks the bench runs, measures nothing)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    boot_host(args.attention, cpu=device.type == "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    lora_mod = pack_module("cvx_core.lora")
    targets = lora_mod.DEFAULT_TARGETS if args.targets == "attention" else lora_mod.TARGETS
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    warmup = args.warmup if args.warmup is not None else (1 if args.no_memory else 0)
    geo = SMOKE if args.smoke else FULL
    progress(f"building {args.blocks} {geo.label} block(s) and the training patch")
    bench = TrainBench(geo, args.blocks, args.frames, DTYPES[args.dtype], args.rank, args.alpha, targets)
    print(f"train bench: {args.blocks} block(s) of random weights (host CogVideoXTransformer3DModel), "
          f"{geo.describe(args.frames)} + 1 reference frame, batch 1, model {args.dtype} ({bench.dtype}), LoRA fp32 rank {args.rank} alpha "
          f"{args.alpha} on {','.join(targets)} of the reference rows ({bench.lora_params:,} parameters), AdamW; "
          f"median of {args.repeats} timed rounds after {'the memory round + ' if not args.no_memory else ''}{warmup} "
          f"warmup round(s); times are "
          f"{'process CPU time' if device.type == 'cpu' else 'wall time'}")
    print(environment_line(bench.device) + f"; model built and loaded in {bench.build_s:.1f} s")

    fns = bench.rows()
    peaks: dict[str, int] = {}
    if not args.no_memory:  # also the first (warmup) round
        for i, (name, fn) in enumerate(fns.items()):
            progress(f"memory round, row {i + 1}/{len(fns)} {name}")
            peaks[name] = peak_bytes(fn, bench.device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + args.repeats):
        label = f"warmup round {r + 1}/{warmup}" if r < warmup else f"round {r + 1 - warmup}/{args.repeats}"
        for i, (name, fn) in enumerate(fns.items()):
            t = bench.timed(name, fn)
            progress(f"{label}, row {i + 1}/{len(fns)} {name}: {t:.2f} s")
            if r >= warmup:
                times[name].append(t)
    shutil.rmtree(bench.out_dir, ignore_errors=True)
    load_end = os.getloadavg()[0]
    assert all(v == v and abs(v) < 1e30 for v in bench.losses), bench.losses

    base = statistics.median(times[BASELINE])
    plain = statistics.median(times[ROWS[0]])
    mb = 2 ** 20
    print(f"\n{'row':22s} {'s/step':>8s} {'min-max s':>15s} {'ratio':>6s} {'x base':>6s} {'peak MB':>9s} "
          f"{'+weights MB':>11s} {'LoRA params':>11s}")
    for name in fns:
        ts = times[name]
        t = statistics.median(ts)
        peak = f"{peaks[name] / mb:9.1f}" if name in peaks else f"{'n/a':>9s}"
        total = f"{(peaks[name] + bench.weight_bytes) / mb:11.1f}" if name in peaks else f"{'n/a':>11s}"
        params = f"{bench.lora_params:11,d}" if name.startswith("train") else f"{'-':>11s}"
        print(f"{name:22s} {t:8.2f} {min(ts):7.2f}-{max(ts):<7.2f} {t / base:6.3f} {t / plain:6.3f} {peak} "
              f"{total} {params}")
    print(f"frozen model weights: {bench.weight_bytes / mb:.1f} MB ({sum(p.numel() for p in bench.dm.parameters()):,} "
          f"parameters); losses seen: {min(bench.losses):.4g}..{max(bench.losses):.4g}; max |lora up| after "
          f"{len(bench.losses)} steps: {max(p.up.abs().max().item() for p in bench.lora.pairs.values()):.3g} "
          f"(0 at init: > 0 = the gradients reached the adapter)")
    on, off = statistics.median(times[ROWS[2]]), statistics.median(times[ROWS[3]])
    mem = (f"; peak MB ckpt on {peaks[ROWS[2]] / mb:.0f} / off {peaks[ROWS[3]] / mb:.0f} / forward "
           f"{peaks[BASELINE] / mb:.0f} (+ {bench.weight_bytes / mb:.0f} MB weights)" if peaks else "")
    saves = (f" and saves {(1 - peaks[ROWS[2]] / peaks[ROWS[3]]) * 100:.0f}% of the step's peak"
             if peaks and peaks[ROWS[3]] else "")
    print(f"SUMMARY train step ({args.blocks} blocks, {args.frames} frame(s), {args.dtype}): ckpt on {on:.2f} s "
          f"= {on / base:.2f}x forward, ckpt off {off:.2f} s = {off / base:.2f}x forward, checkpointing costs "
          f"{(on / off - 1) * 100:+.0f}% time{saves}{mem}; LoRA {bench.lora_params:,} parameters; "
          f"total {time.perf_counter() - t_start:.0f} s wall, load average {load_start:.1f} -> {load_end:.1f}")


if __name__ == "__main__":
    main()
