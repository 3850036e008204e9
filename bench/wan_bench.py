"""Wan benchmark: the cost of biasing Wan Phantom's own reference frame (CustomVideoXReferenceFramesBias), and of
inserting a reference into plain Wan T2V (CustomVideoXApply: two-way and one-way cached) against its FLOP ideal.

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

Target: biasing the existing frames costs <= +2 % over the unpatched run (only the mask).

Inserted-reference table (``--inserted``, Wan T2V: the video's latent frames; CustomVideoXApply adds one
reference latent frame, R = 1560 tokens; strength 1 with the default TAB parabola at progress 0.5, its peak):

* ``T2V unpatched``           the plain text-to-video call;
* ``T2V unpatched +1 frame`` the plain call on one more latent frame: as many tokens as two-way attends over,
  without the pack (what those tokens cost on this machine, whatever its attention/GEMM speed ratio);
* ``two-way TAB``             the reference as a leading frame of the call: Nq = Nk = S + R;
* ``two-way TAB+ERAE mask``   the same plus an ERAE region from a mask;
* ``one-way cached TAB``      ``reference_timestep`` clean: the reference's own pass runs once per run (here:
  in the warm-up call, kept in the run cache every timed call reads), the video reads its K/V: Nq = S,
  Nk = S + R;
* ``one-way cached TAB+ERAE mask``.

FLOP model of one Wan block call, batch 1 (C width, F FFN width, L = 512 text tokens): self-attention
projections 4·2·Nq·C² (one-way: the cached reference needs none), attention 2·2·Nq·Nk·C, cross-attention
2·2·Nq·C² + 2·2·L·C² + 2·2·Nq·L·C, FFN 2·2·Nq·C·F, text embedding 2·L·(4096·C + C²). Targets (as on
CogVideoX): two-way measured/ideal <= 1.05, one-way ratio <= 1 + 1.2·(ideal − 1), ERAE <= +5 % over TAB.
``mach-id``: the same FLOPs at this machine's own speeds, attention and the rest solved from the two plain
rows (attention products run slower than GEMMs on a CPU, which the pure FLOP ideal charges to the pack). Times are
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
    h, w = LAT_H * 8, LAT_W * 8
    mask = torch.zeros(1, h, w)
    mask[:, h // 4:3 * h // 4, w * 5 // 16:w * 11 // 16] = 1.0  # the subject in the middle, the rest background
    return mask


def call_inputs(frames: int, seed: int):
    """One call's video latent, reference latent frame, text, timestep and an ERAE mask region (seeded)."""
    er = bb.pack_module("cvx_core.entity_region")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, LAT_H, LAT_W, generator=g)
    ref = torch.randn(1, 16, 1, LAT_H, LAT_W, generator=g)
    ctx = torch.randn(1, TEXT_TOKENS, 4096, generator=g)
    region = er.EntityRegion(mode="mask", mask=torch.rand(frames, LAT_H // 2, LAT_W // 2, generator=g), lam=1.0)
    return x, ref, ctx, torch.tensor([500.0]), region


def rows(model, frames: int) -> dict:
    wr = bb.pack_module("cvx_host.frames_patch")
    x, ref, ctx, t, region = call_inputs(frames, seed=1)
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


def inserted_rows(model, frames: int) -> dict:
    """CustomVideoXApply on Wan T2V through its real path (the wrapper, the override; one-way with its stream)."""
    wi = bb.pack_module("cvx_host.wan_insert")
    tab = bb.pack_module("cvx_core.tab_schedule")
    opt, rc = bb.pack_module("cvx_host.options"), bb.pack_module("cvx_host.run_cache")
    x, ref, ctx, t, region = call_inputs(frames, seed=2)  # ref: a VAE latent, as CustomVideoXReferenceEncode gives it

    def apply(mode: str, with_region: bool):
        return wi.apply_wan_reference(
            model, ref, strength=1.0, schedule=tab.TABSchedule(), region=region if with_region else None,
            block_start=0, block_end=-1, apply_to_uncond=True, attention_mode=mode, reference_rope="negative",
            bias_rows="all", reference_timestep="clean" if mode == "one_way" else "sampling", attention_path="mask")

    patched = {
        "T2V unpatched": model,
        "T2V unpatched +1 frame": model,
        "two-way TAB": apply("two_way", False),
        "two-way TAB+ERAE mask": apply("two_way", True),
        "one-way cached TAB": apply("one_way", False),
        "one-way cached TAB+ERAE mask": apply("one_way", True),
    }
    sigmas = torch.linspace(1.0, 0.0, 51)

    longer = torch.cat([ref, x], dim=2)  # the plain model on as many tokens as two-way attends over

    def call(m, video: torch.Tensor):
        # Mid-run (progress 0.5): the TAB parabola at its peak. One run cache per row: the one-way stream is
        # computed in the warm-up call and read by every timed call, as in the steps of one sampling run.
        to = dict(m.model_options["transformer_options"], wrappers=m.wrappers, sigmas=sigmas[25:26],
                  sample_sigmas=sigmas, cond_or_uncond=[0], **{opt.RUN_KEY: rc.RunCache()})

        def run():
            with torch.no_grad():
                return m.model.diffusion_model(video, t, ctx, transformer_options=to)
        return run

    return {name: call(m, longer if name.endswith("+1 frame") else x) for name, m in patched.items()}


def wan_block_flops(width: int, ffn: int, nq: int, nk: int, kv_tokens: int) -> tuple[float, float]:
    """The FLOP model in the module docstring as (attention products, everything else); ``kv_tokens``: the
    tokens whose K/V this call projects."""
    attention = 2 * 2 * nq * nk * width + 2 * 2 * nq * TEXT_TOKENS * width
    projections = (2 * 2 * nq * width * width + 2 * 2 * kv_tokens * width * width + 2 * 2 * nq * width * width
                   + 2 * 2 * TEXT_TOKENS * width * width)
    text_embedding = 2 * TEXT_TOKENS * (4096 * width + width * width)
    return attention, projections + 2 * 2 * nq * width * ffn + text_embedding


def machine_speeds(flops_a: tuple[float, float], sec_a: float, flops_b: tuple[float, float], sec_b: float
                   ) -> tuple[float, float]:
    """Seconds per FLOP of the attention products and of the rest on this machine, solved from two plain calls
    of different lengths (their attention shares differ): CPU attention runs well below GEMM speed, so the
    FLOP ideal alone charges the pack for the machine."""
    (a1, o1), (a2, o2) = flops_a, flops_b
    det = a1 * o2 - a2 * o1
    return (sec_a * o2 - sec_b * o1) / det, (a1 * sec_b - a2 * sec_a) / det


def inserted_table(name: str, cfg: dict, frames: int, repeats: int) -> dict:
    model = build(cfg)
    times = bb.time_rows(inserted_rows(model, frames), repeats=repeats, warmup=1, device=torch.device("cpu"))
    width, ffn = cfg["heads"] * 128, cfg["ffn_dim"]
    s, r = frames * (LAT_H // 2) * (LAT_W // 2), (LAT_H // 2) * (LAT_W // 2)
    flops = {"T2V unpatched": wan_block_flops(width, ffn, s, s, s),
             "T2V unpatched +1 frame": wan_block_flops(width, ffn, s + r, s + r, s + r),
             "two-way TAB": wan_block_flops(width, ffn, s + r, s + r, s + r),
             "one-way cached TAB": wan_block_flops(width, ffn, s, s + r, s)}
    flops["two-way TAB+ERAE mask"], flops["one-way cached TAB+ERAE mask"] = flops["two-way TAB"], flops["one-way cached TAB"]
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["T2V unpatched"]
    ideal = {k: sum(f) / sum(flops["T2V unpatched"]) for k, f in flops.items()}
    speed = machine_speeds(flops["T2V unpatched"], base, flops["T2V unpatched +1 frame"], med["T2V unpatched +1 frame"])
    machine = {k: (speed[0] * f[0] + speed[1] * f[1]) / base for k, f in flops.items()}
    print(f"\nWan {name} T2V + inserted reference ({width} = {cfg['heads']} x 128, FFN {ffn}), {LAT_H * 8}x{LAT_W * 8}, "
          f"{frames} video latent frame(s) = {s} tokens + R = {r}, {TEXT_TOKENS} text tokens, batch 1, fp32, 1 block, "
          f"{repeats} repeats; attention runs at {speed[1] / speed[0]:.2f} of the rest's FLOP rate here")
    print(f"  {'row':<30} {'s':>7} {'min-max s':>13} {'ratio':>6} {'ideal':>6} {'meas/id':>7} {'mach-id':>7} {'meas/m':>7}")
    for row, sec in med.items():
        lo, hi = min(times[row]), max(times[row])
        print(f"  {row:<30} {sec:7.2f} {lo:6.2f}-{hi:<6.2f} {sec / base:6.3f} {ideal[row]:6.3f} "
              f"{sec / base / ideal[row]:7.3f} {machine[row]:7.3f} {sec / base / machine[row]:7.3f}")
    two, one = med["two-way TAB"] / base, med["one-way cached TAB"] / base
    one_target = 1 + 1.2 * (ideal["one-way cached TAB"] - 1)
    e2 = med["two-way TAB+ERAE mask"] / med["two-way TAB"] - 1
    e1 = med["one-way cached TAB+ERAE mask"] / med["one-way cached TAB"] - 1
    print(f"SUMMARY {name} inserted: two-way meas/ideal {two / ideal['two-way TAB']:.3f} (target <= 1.05), over this "
          f"machine's ideal {two / machine['two-way TAB']:.3f}; one-way ratio {one:.3f} vs target <= {one_target:.3f}, "
          f"over this machine's ideal {one / machine['one-way cached TAB']:.3f}; ERAE over TAB two-way "
          f"{e2 * 100:+.1f}%, one-way {e1 * 100:+.1f}% (target <= 5%)")
    del model
    return med


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 video latent frame, 3 repeats (1.3B) / 2 (14B)")
    ap.add_argument("--tiny", action="store_true",
                    help="the suite's smoke run: a 256-wide block on a 64x96 video, 1 frame, 1 repeat (no numbers)")
    ap.add_argument("--frames", type=int, default=21, help="video latent frames (21 = 81 frames)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--widths", default="1.3B,14B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", choices=("phantom", "inserted", "both"), default="both",
                    help="Phantom's own frames biased, a reference inserted into T2V, or both")
    ap.add_argument("--inserted-frames", type=int, default=None,
                    help="video latent frames of the inserted-reference table (default: --frames)")
    args = ap.parse_args(argv)
    if args.tiny:  # every row through the real path in seconds; its times mean nothing
        global LAT_H, LAT_W
        LAT_H, LAT_W = 8, 12
        WIDTHS["tiny"] = {"heads": 2, "ffn_dim": 512}
        args.widths, args.smoke, args.repeats = "tiny", True, 1
    frames = 1 if args.smoke else args.frames
    bb.boot_host()
    torch.set_num_threads(args.threads)
    print(bb.environment_line())
    if args.tiny:
        print("smoke (tiny, not a measurement)")
    table = {}
    start = time.perf_counter()
    if args.table in ("inserted", "both"):
        for name in args.widths.split(","):
            repeats = args.repeats if args.tiny or not args.smoke else (3 if name == "1.3B" else 2)
            inserted_table(name, WIDTHS[name], 1 if args.smoke else (args.inserted_frames or args.frames), repeats)
    if args.table == "inserted":
        return
    tokens = (frames + 1) * (LAT_H // 2) * (LAT_W // 2)
    print(f"\nPhantom table: {LAT_H * 8}x{LAT_W * 8}, {frames} video latent frame(s) + 1 reference frame = {tokens} "
          f"self-attention tokens ({(LAT_H // 2) * (LAT_W // 2)} per frame), {TEXT_TOKENS} text tokens, batch 1, "
          f"fp32, 1 block")
    for name in args.widths.split(","):
        cfg = WIDTHS[name]
        model = build(cfg)
        repeats = args.repeats if args.tiny or not args.smoke else (3 if name == "1.3B" else 2)
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
