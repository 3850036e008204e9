"""GPU check: what a float key-column mask costs SDPA on a GPU, and the alternatives.

On a CUDA device, at CogVideoX-5B attention geometry (48 heads x 64, 226 text + 1,350 reference + video
tokens for 480x720 at ``--frames`` latent frames, bf16), it times and names the backend of:

* ``plain [text|video]``        flash SDPA without the reference (the unpatched model's attention);
* ``plain [text|ref|video]``    flash SDPA with the reference keys but no bias (strength 1, bias 0);
* ``column mask``               SDPA with the pack's ``(B, 1, 1, Sk)`` float mask (TAB): flash takes no mask,
                                so the dispatcher falls back (cuDNN / memory-efficient / math);
* ``fold (ERAE)``               the pack's ERAE fold: q/k/v padded to 72 channels, with the column mask;
* ``LSE merge (TAB)``           two flash calls (``[text|video]`` keys and reference keys), merged with their
                                log-sum-exp and the bias: exact, no mask, flash kernels only;
* ``LSE merge (TAB+ERAE)``      the same with a per-query bias on the reference part (exact ERAE, no fold);
* every backend forced one at a time (``sdpa_kernel``) for the masked call: time or "not available".

The backend SDPA picks is read from the profiler's kernel names. Outputs of the alternatives are compared
with the masked SDPA call (max |diff|). Without CUDA it says so, runs the LSE-merge equality check on the
CPU at a small size (the CPU flash kernel also returns the log-sum-exp), and exits 0. ``--smoke`` runs the
whole table at a tiny size on whatever device there is (the CPU here): it checks the script runs, it
measures nothing.

Run: ``.venv/bin/python bench/gpu_check.py [--frames 13] [--batch 2] [--dtype bf16] [--smoke]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from pack_import import pack_module  # noqa: E402  (the pack as the package `customvideox`; no host needed)

pack_module()
from customvideox.cvx_core.reference_attention import reference_attention_lse  # noqa: E402
from customvideox.cvx_core.token_layout import TokenLayout  # noqa: E402

HEADS, HEAD_DIM, TEXT, PER_FRAME = 48, 64, 226, 1350
SMOKE_HEADS, SMOKE_TEXT, SMOKE_PER_FRAME = 2, 16, 20  # --smoke: 2 heads x 64, 16 text and 20 tokens per frame
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lse_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, ref: int,
              bias: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """The pack's ``attention_path=lse`` path (cvx_core.reference_attention_lse) on keys ``[text | ref | video]``
    and queries ``[text | ref | video]`` or ``[text | video]``: bias ``[B]`` (+ ``region[B, Sv]`` on video
    queries) on the reference keys."""
    video = k.shape[2] - text - ref
    layout = TokenLayout(text=text, refs=(ref,), grid=(1, 1, video), refs_in_queries=q.shape[2] == k.shape[2])
    return reference_attention_lse(q, k, v, layout, bias.view(-1, 1), None if region is None else region[:, None])


def dense_reference(q, k, v, text: int, ref: int, bias: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Float64 softmax with the whole bias written out (small sizes only)."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits[..., text:text + ref] += bias.double().view(-1, 1, 1, 1)
    if region is not None:
        vs = q.shape[2] - region.shape[1]
        logits[:, :, vs:, text:text + ref] += region.double()[:, None, :, None]
    return (logits.softmax(-1) @ v).float()


def cpu_equality_check() -> float:
    g = torch.Generator().manual_seed(0)
    B, H, D, text, ref, video = 2, 3, 64, 7, 11, 40
    q = torch.randn(B, H, text + video, D, generator=g)
    k = torch.randn(B, H, text + ref + video, D, generator=g)
    v = torch.randn_like(k)
    bias = torch.tensor([0.7, -math.inf])
    region = torch.rand(B, video, generator=g) * 2
    worst = 0.0
    for reg in (None, region):
        got = lse_merge(q, k, v, text, ref, bias, reg)
        want = dense_reference(q, k, v, text, ref, bias, reg)
        worst = max(worst, (got - want).abs().max().item())
    return worst


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def backend_of(fn: Callable[[], torch.Tensor], dev: torch.device) -> str:
    """The attention kernels a call launches, from the CUDA profiler's kernel names."""
    from torch.profiler import ProfilerActivity, profile

    if dev.type != "cuda":
        return dev.type
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
    keys = {"flash": "flash", "fmha": "mem-efficient", "efficient": "mem-efficient", "cudnn": "cudnn",
            "softmax": "math(softmax)", "gemm": "gemm"}
    found = sorted({label for n in names for k, label in keys.items() if k in n.lower()})
    return "+".join(found) or "?"


def bench(fn: Callable[[], torch.Tensor], repeats: int, dev: torch.device) -> float:
    fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fold(q, k, v, text: int, ref: int, region: torch.Tensor):
    """The pack's ERAE fold (cvx_core.reference_attention.fold_region_bias), for one reference."""
    B, H, Sq, D = q.shape
    d2 = D + 8
    q2 = q.new_zeros(B, H, Sq, d2)
    q2[..., :D] = q * math.sqrt(d2 / D)
    vs = Sq - region.shape[1]
    q2[:, :, vs:, D] = (region * math.sqrt(d2)).to(q.dtype)[:, None]
    k2 = k.new_zeros(B, H, k.shape[2], d2)
    k2[..., :D] = k
    k2[:, :, text:text + ref, D] = 1.0
    return q2, k2, F.pad(v, (0, 8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--mode", choices=["two_way", "one_way"], default="two_way")
    ap.add_argument("--smoke", action="store_true",
                    help="the whole table at a tiny size on any device (checks the script runs, measures nothing)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}")
    if not torch.cuda.is_available():
        err = cpu_equality_check()
        print(f"no CUDA GPU here: nothing measured. CPU check: LSE merge vs dense float64 softmax (TAB, TAB+ERAE, "
              f"one row off) max |diff| {err:.2e} ({'ok' if err < 1e-4 else 'MISMATCH'})")
        if err >= 1e-4 or not args.smoke:
            return 0 if err < 1e-4 else 1
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if dev.type == "cpu" else DTYPES[args.dtype]
    H, text, per_frame = (SMOKE_HEADS, SMOKE_TEXT, SMOKE_PER_FRAME) if args.smoke else (HEADS, TEXT, PER_FRAME)
    frames, repeats = (2, 1) if args.smoke else (args.frames, args.repeats)
    B, D = args.batch, HEAD_DIM
    video, ref = frames * per_frame, per_frame
    sk = text + ref + video
    sq = sk if args.mode == "two_way" else text + video
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}{' (smoke: tiny size, not a measurement)' if args.smoke else ''}, {dtype}, B={B}, "
          f"{H} heads x {D}, {args.mode}: Sq {sq}, Sk {sk} (text {text}, reference {ref}, video {video}); "
          f"median of {repeats}")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, sq, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, H, sk, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, H, sk, D, device=dev, dtype=dtype, generator=g)
    bias = torch.tensor([1.0] + [-math.inf] * (B - 1), device=dev)  # row 0 cond (bias 1), others reference off
    mask = torch.zeros(B, 1, 1, sk, device=dev, dtype=dtype)
    mask[:, 0, 0, text:text + ref] = bias.to(dtype)[:, None]
    region = torch.rand(B, video, device=dev, generator=g)
    q0 = torch.cat([q[:, :, :text], q[:, :, sq - video:]], dim=2)
    k0 = torch.cat([k[:, :, :text], k[:, :, text + ref:]], dim=2)
    v0 = torch.cat([v[:, :, :text], v[:, :, text + ref:]], dim=2)
    qf, kf, vf = fold(q, k, v, text, ref, region)

    rows: dict[str, Callable[[], torch.Tensor]] = {
        "plain [text|video]": lambda: F.scaled_dot_product_attention(q0, k0, v0),
        "plain [text|ref|video]": lambda: F.scaled_dot_product_attention(q, k, v),
        "column mask (TAB)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "fold (TAB+ERAE)": lambda: F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)[..., :D],
        "fold copies only": lambda: fold(q, k, v, text, ref, region)[0],
        "LSE merge (TAB)": lambda: lse_merge(q, k, v, text, ref, bias),
        "LSE merge (TAB+ERAE)": lambda: lse_merge(q, k, v, text, ref, bias, region),
    }
    with torch.no_grad():
        base = None
        want = {"column mask (TAB)": rows["column mask (TAB)"](), "fold (TAB+ERAE)": rows["fold (TAB+ERAE)"]()}
        print(f"{'call':28s} {'ms':>8s} {'ratio':>6s}  backend (profiler)         max|diff| vs masked SDPA")
        for name, fn in rows.items():
            t = bench(fn, repeats, dev)
            base = base or t
            diff = ""
            if name == "LSE merge (TAB)":
                diff = f"{(fn().float() - want['column mask (TAB)'].float()).abs().max().item():.2e}"
            elif name == "LSE merge (TAB+ERAE)":
                diff = f"{(fn().float() - want['fold (TAB+ERAE)'].float()).abs().max().item():.2e}"
            print(f"{name:28s} {t * 1e3:8.2f} {t / base:6.3f}  {backend_of(fn, dev):26s} {diff}")
        print("masked call with one backend forced:")
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH):
            try:
                with sdpa_kernel([be]):
                    t = bench(rows["column mask (TAB)"], repeats, dev)
                print(f"  {be.name:24s} {t * 1e3:8.2f} ms  {t / base:6.3f}")
            except RuntimeError as e:  # "No available kernel" or out of memory
                print(f"  {be.name:24s} not available: {str(e).splitlines()[0][:90]}")
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
