"""Wan reference RoPE slots: how evenly a reference at each ``reference_rope`` slot reaches the video's frames.

Weight-independent: only Wan's own rotary embedding is used, built by the host's ``WanModel.rope_encode`` on a
model with Wan's head dim (128 in every Wan 2.1/2.2 model: 1.3B 12 x 128, 14B 40 x 128, TI2V-5B 24 x 128;
axes 44 temporal + 42 + 42 channels, theta 10000). For a query at video frame ``f`` and a reference key at
temporal slot ``s`` with the *same content* ``u`` and the same spatial position, the logit is
``u . R(f - s) u``: RoPE scales it by the factor ``F(f - s) = mean over the 64 channel pairs of cos(angle)``
(1 at equal positions; exact for identical content, and the mean over random unit ``u``). ``F`` is printed per
frame and summarised: spread (max - min over the frames), the mean over the first and the last third of the
frames, and the reference weight ratio early/late ``exp(sqrt(128) * (F_early - F_late))`` for q = k at RMS 1
(what the qk-norm gives with unit weights; real norm weights scale the exponent).

Slots (the video at 0..T-1): negative/shift -1, none 0, after T (Phantom's place); "middle" (T // 2) is shown
for comparison only, it is not an option.

Run from the repo root: ``.venv/bin/python bench/wan_rope_slots.py [--frames 21] [--smoke]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import block_bench as bb  # noqa: E402  (host boot)

HEAD_DIM = 128


def rotations(frames: list[float]) -> torch.Tensor:
    """``[len(frames), 64, 2, 2]``: the host's Wan RoPE rotation of one token at each temporal index (h = w = 0)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    dm = WanModel(dim=HEAD_DIM, num_heads=1, num_layers=0, ffn_dim=8, operations=comfy.ops.disable_weight_init)
    return torch.stack([dm.rope_encode(1, 1, 1, t_start=f, dtype=torch.float64)[0, 0, 0] for f in frames])


def factor(frames: int, slot: float) -> torch.Tensor:
    """``F`` for every video frame 0..frames-1 against a key at ``slot`` (identical content, same place)."""
    rot = rotations([*range(frames), slot]).double()
    rel = torch.einsum("fpji,pjk->fpik", rot[:-1], rot[-1])  # R_f^T R_s per channel pair
    return rel[..., 0, 0].mean(-1)  # cos of the angle difference, averaged over the pairs


def monte_carlo(frames: int, slot: float, n: int) -> torch.Tensor:
    """The same factor as the mean of ``(R_f u) . (R_s u)`` over ``n`` random unit vectors ``u`` (a check)."""
    rot = rotations([*range(frames), slot]).double()
    u = torch.nn.functional.normalize(torch.randn(n, 64, 2, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), dim=(1, 2))
    ru = torch.einsum("fpij,npj->fnpi", rot, u)
    return (ru[:-1] * ru[-1:]).sum((-1, -2)).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=21, help="video latent frames (21 = 81 video frames)")
    ap.add_argument("--samples", type=int, default=4096, help="random unit vectors for the Monte Carlo check")
    ap.add_argument("--smoke", action="store_true", help="5 frames, 64 samples: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.frames, args.samples = 5, 64
    bb.boot_host()
    t = args.frames
    slots = {"negative": -1.0, "shift": -1.0, "none": 0.0, "after": float(t), "middle (not an option)": float(t // 2)}
    third = max(1, t // 3)
    print(("smoke (tiny, not a measurement); " if args.smoke else "")
          + f"Wan RoPE (host rope_encode), head dim {HEAD_DIM} (axes 44/42/42, theta 1e4), {t} video latent "
            f"frames at 0..{t - 1}; early = frames 0..{third - 1}, late = {t - third}..{t - 1}; torch {torch.__version__}")
    print(f"{'slot':<24}{'index':>6}{'F(0)':>8}{'F(mid)':>8}{'F(last)':>8}{'min':>8}{'max':>8}{'spread':>8}"
          f"{'early':>8}{'late':>8}{'w e/l':>8}{'MC err':>9}")
    per_frame = {}
    for name, slot in slots.items():
        f = factor(t, slot)
        per_frame[name] = f
        mc = (monte_carlo(t, slot, args.samples) - f).abs().max()
        early, late = f[:third].mean(), f[-third:].mean()
        ratio = math.exp(math.sqrt(HEAD_DIM) * float(early - late))
        print(f"{name:<24}{slot:>6.0f}{f[0]:>8.3f}{f[t // 2]:>8.3f}{f[-1]:>8.3f}{f.min():>8.3f}{f.max():>8.3f}"
              f"{f.max() - f.min():>8.3f}{early:>8.3f}{late:>8.3f}{ratio:>8.2f}{mc:>9.1e}")
    print("\nF per video frame:")
    print(f"{'slot':<24}" + "".join(f"{i:>6}" for i in range(t)))
    for name, f in per_frame.items():
        print(f"{name:<24}" + "".join(f"{v:>6.3f}" for v in f.tolist()))
    spread = {n: float(f.max() - f.min()) for n, f in per_frame.items() if "middle" not in n}
    print("\nSUMMARY spread (lower = more even reach): " + ", ".join(f"{n} {s:.3f}" for n, s in spread.items()))


if __name__ == "__main__":
    main()
