"""Wan benchmark: the cost of biasing Wan Phantom's own reference frame (CustomVideoXReferenceFramesBias).

One host Wan DiT with one block at real width (Wan 2.1 1.3B: 1536 = 12 heads x 128, FFN 8960; 14B: 5120 =
40 x 128, FFN 13824) and random weights, loaded by the host (``comfy.sd.load_diffusion_model_state_dict``);
every patched row goes through the pack's real path: ``apply_frames_bias`` clones the ModelPatcher, its
DIFFUSION_MODEL wrapper builds the per-call state, the host block calls ``optimized_attention``, which calls
the pack's override -> ``cvx_core.reference_attention`` -> the host's attention function.

Rows (Phantom style: the video's latent frames plus 1 reference latent frame appended by the conditioning,
as the unpatched Phantom run already has them; no tokens are added):

* ``unpatched``          the plain Phantom call;
* ``bias``               strength 2 (a ``(B,1,1,S)`` key-column mask on the reference frame);
* ``bias+background``    the same with a subject mask hiding the reference's background (same column mask);
* ``bias+ERAE mask``     the same plus an ERAE region from a mask (per-video-query bias, folded q/k channel).

Target: biasing the existing frames costs <= +2 % over the unpatched run (only the mask). Times are
process CPU time with one torch thread (median of interleaved repeats of one whole 1-block DiT call: patch
embedding, text embedding of 512 tokens, the block, the head). Geometry: 480x832 -> 60x104 latent -> 30x52
= 1560 tokens per latent frame; ``--frames`` video latent frames (21 = 81 video frames).

Run from the repo root: ``.venv/bin/python bench/wan_bench.py --smoke`` (1 video latent frame, both widths).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import block_bench as bb  # noqa: E402  (host boot, pack import, interleaved timing)

WIDTHS = {"1.3B": {"heads": 12, "ffn_dim": 8960}, "14B": {"heads": 40, "ffn_dim": 13824}}
LAT_H, LAT_W = 60, 104  # 480 x 832
TEXT_TOKENS = 512


def build(config: dict[str, int], seed: int = 0):
    import comfy.model_management
    import comfy.sd
    import tiny_wan as tw  # scripts/, on sys.path once boot_host ran

    sd = tw.build_wan_state_dict(seed=seed, layers=1, **config)
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    comfy.model_management.load_models_gpu([model])
    return model


def subject_mask() -> torch.Tensor:
    mask = torch.zeros(1, 480, 832)
    mask[:, 120:360, 256:576] = 1.0  # the subject in the middle, the rest background
    return mask


def rows(model, frames: int) -> dict:
    wr = bb.pack_module("cvx_host.frames_patch")
    er = bb.pack_module("cvx_core.entity_region")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, frames, LAT_H, LAT_W, generator=g)
    ref = torch.randn(1, 16, 1, LAT_H, LAT_W, generator=g)
    ctx = torch.randn(1, TEXT_TOKENS, 4096, generator=g)
    t = torch.tensor([500.0])
    region = er.EntityRegion(mode="mask", mask=torch.rand(frames, LAT_H // 2, LAT_W // 2, generator=g), lam=1.0)
    patched = {
        "unpatched": model,
        "bias": wr.apply_frames_bias(model, wr.FramesEntry(strength=2.0)),
        "bias+background": wr.apply_frames_bias(model, wr.FramesEntry(strength=2.0, reference_mask=subject_mask())),
        "bias+ERAE mask": wr.apply_frames_bias(model, wr.FramesEntry(strength=2.0, region=region)),
    }

    def call(m):
        to = dict(m.model_options["transformer_options"], wrappers=m.wrappers)

        def run():
            with torch.no_grad():
                return m.model.diffusion_model(x, t, ctx, time_dim_concat=ref, transformer_options=to)
        return run

    return {name: call(m) for name, m in patched.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 video latent frame, 3 repeats (1.3B) / 2 (14B)")
    ap.add_argument("--frames", type=int, default=21, help="video latent frames (21 = 81 frames)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--widths", default="1.3B,14B")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    frames = 1 if args.smoke else args.frames
    bb.boot_host()
    torch.set_num_threads(args.threads)
    print(bb.environment_line())
    tokens = (frames + 1) * (LAT_H // 2) * (LAT_W // 2)
    print(f"geometry: 480x832, {frames} video latent frame(s) + 1 reference frame = {tokens} self-attention "
          f"tokens (1560 per frame), {TEXT_TOKENS} text tokens, batch 1, fp32, 1 block")
    table = {}
    start = time.perf_counter()
    for name in args.widths.split(","):
        cfg = WIDTHS[name]
        model = build(cfg)
        repeats = (3 if name == "1.3B" else 2) if args.smoke else args.repeats
        times = bb.time_rows(rows(model, frames), repeats=repeats, warmup=1, device=torch.device("cpu"))
        table[name] = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: (min(v), max(v)) for k, v in times.items()}
        width = cfg["heads"] * 128
        print(f"\nWan {name} block width ({width} = {cfg['heads']} x 128, FFN {cfg['ffn_dim']}), {repeats} repeats")
        base = table[name]["unpatched"]
        for row, sec in table[name].items():
            lo, hi = spread[row]
            print(f"  {row:<18} {sec:8.2f} s  ({lo:.2f}-{hi:.2f})  x{sec / base:.3f}  {100 * (sec / base - 1):+5.1f} %")
        del model
    names = list(table)
    print("\nSUMMARY ratio over unpatched Phantom (target: bias <= 1.02): " + "; ".join(
        f"{row}: " + " / ".join(f"{n} {table[n][row] / table[n]['unpatched']:.3f}" for n in names)
        for row in table[names[0]] if row != "unpatched") + f"  ({time.perf_counter() - start:.0f} s wall)")


if __name__ == "__main__":
    main()
