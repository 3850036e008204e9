"""Train a CustomVideoX adapter (a LoRA on the reference tokens; the base model stays frozen) from the
command line, with the host's own loaders and model management.

Example (real weights; the adapter is copied to models/loras for CustomVideoXAdapterLoader):

    .venv/bin/python scripts/train_adapter.py --model models/diffusion_models/CogVideoX-5b/transformer \\
        --vae models/vae/cogvideox_vae.safetensors --text-encoder models/text_encoders/t5xxl_fp16.safetensors \\
        --data my_clips --out output/customvideox_training/dog --subject dog --steps 2000

See the whole loop in a minute, without weights (tiny random model, stand-in encoders, a generated
sample dataset; the result is a test adapter, not copied to models/loras):

    .venv/bin/python scripts/train_adapter.py --tiny

The dataset folder holds NAME.mp4 (or .webm/.gif, or a folder of frames) + NAME.txt (caption), optional
NAME.subject.txt and NAME.mask.png (cvx_core/dataset.py). --out receives the adapter with its metadata,
loss.png, checkpoints/ (a rerun with the same --out resumes from the latest) and the encoded cache/.
Extra packages for training: pip install -r requirements-train.txt (or the pack's `train` extra).
Runs on the GPU when torch sees one, else on the CPU (slow for real models); --cpu forces the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import model_files as mf  # scripts/, beside this file
from host_boot import bootstrap_host_args, cpu_args
from pack_import import pack_module

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = REPO_ROOT / ".host" / "tiny_models"  # also where `make run` keeps its tiny model
# The tiny run: small clips, few steps; everything else keeps the real defaults.
TINY = {"width": 64, "height": 64, "num_frames": 9, "steps": 20, "checkpoint_every": 10, "rank": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/train_adapter.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model, stand-in encoders and a generated "
                                                      "sample dataset: the whole loop without weights")
    p.add_argument("--model", help="CogVideoX transformer: .safetensors (ComfyUI or diffusers layout), an index "
                                   "json or a diffusers folder")
    p.add_argument("--vae", help="CogVideoX VAE .safetensors")
    p.add_argument("--text-encoder", help="T5-XXL .safetensors (as for CLIPLoader type cogvideox)")
    p.add_argument("--data", help="dataset folder (with --tiny: default a generated sample set)")
    p.add_argument("--out", help="output folder (adapter, loss.png, checkpoints, cache); default "
                                 "output/customvideox_training/NAME")
    p.add_argument("--name", default="customvideox_adapter", help="adapter file name without extension")
    p.add_argument("--loras-dir", type=Path, default=REPO_ROOT / "models" / "loras",
                   help="where the finished adapter is copied for CustomVideoXAdapterLoader (default models/loras)")
    p.add_argument("--subject", default="", help="subject word for clips without NAME.subject.txt")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q,k,v,attn_out", help="comma list of q,k,v,attn_out,ff_proj,ff_out")
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--num-frames", type=int, default=49)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--reference-drop", type=float, default=0.05)
    p.add_argument("--text-drop", type=float, default=0.1)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-dtype", default="default", choices=["default", "bf16", "fp16", "fp8_e4m3fn"])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = p.parse_args(argv)
    if args.tiny:
        given = {k for k in TINY if f"--{k.replace('_', '-')}" in (argv if argv is not None else sys.argv[1:])}
        for key, value in TINY.items():
            if key not in given:
                setattr(args, key, value)
    else:
        missing = [f"--{k}" for k in ("model", "vae", "text_encoder", "data") if not getattr(args, k)]
        if missing:
            p.error(f"{', '.join(m.replace('_', '-') for m in missing)} required (or --tiny to try the loop "
                    f"without weights)")
    args.out = Path(args.out) if args.out else REPO_ROOT / "output" / "customvideox_training" / args.name
    return args


def check_paths(args: argparse.Namespace) -> list[str]:
    """Every problem with the given files, before anything is loaded (headers only)."""
    problems = []
    wanted = ((args.model, mf.TRANSFORMER, "--model"), (args.vae, mf.VAE, "--vae"),
              (args.text_encoder, mf.T5, "--text-encoder"))
    for value, kind, flag in wanted:
        path = Path(value)
        if not path.exists():
            problems.append(f"{flag} {value}: no such file or folder\n{mf.where_to_get(kind)}")
            continue
        got = (mf.TRANSFORMER if mf.is_transformer_folder(path) else None) if path.is_dir() else mf.kind_of_file(path)
        if got != kind:
            what = f"a {mf.WHAT[got]}" if got else "not a file the pack recognises"
            problems.append(f"{flag} {value}: expected a {mf.WHAT[kind]}, but this is {what}")
    try:
        pack_module("cvx_core.dataset").find_clips(args.data, args.subject)
    except ValueError as e:
        problems.append(f"--data {args.data}: {e}")
    return problems


def write_sample_dataset(folder: Path, clips: int = 2, frames: int = 9, size: int = 64) -> Path:
    """A few synthetic clips (a coloured ball moving over a plain background) with caption, subject word and
    mask, so the tiny run needs no video files and no saliency model."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(clips):
        colour = np.array([[220, 40, 40], [40, 90, 220]][c % 2], np.uint8)
        name = f"ball_{c}"
        frames_dir = folder / name
        frames_dir.mkdir(exist_ok=True)
        for t in range(frames):
            cx, cy = size * (0.25 + 0.5 * t / max(1, frames - 1)), size * (0.5 + 0.15 * (-1) ** c)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < (size / 6) ** 2
            img = np.full((size, size, 3), 235, np.uint8)
            img[inside] = colour
            Image.fromarray(img).save(frames_dir / f"{t:03d}.png")
            if t == 0:
                Image.fromarray((inside * 255).astype(np.uint8)).save(folder / f"{name}.mask.png")
        (folder / f"{name}.txt").write_text(f"a {['red', 'blue'][c % 2]} ball rolls to the right", encoding="utf-8")
        (folder / f"{name}.subject.txt").write_text("ball", encoding="utf-8")
    return folder


def standin_encoders(text_dim: int, channels: int = 16):
    """Encoders for the tiny run: a fixed random projection of 8x8x4-pooled pixels (the VAE's compression)
    and a seeded random caption embedding of the tiny model's text width."""
    import hashlib

    import torch

    proj = torch.randn(3, channels, generator=torch.Generator().manual_seed(0))

    def encode_video(frames: torch.Tensor) -> torch.Tensor:  # [T, H, W, 3] -> [1, C, t, H/8, W/8]
        x = frames.permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]
        first, rest = x[:, :, :1], x[:, :, 1:]
        pooled = [torch.nn.functional.avg_pool3d(first, (1, 8, 8))]
        if rest.shape[2]:
            pooled.append(torch.nn.functional.avg_pool3d(rest, (4, 8, 8)))
        z = torch.cat(pooled, dim=2)
        return torch.einsum("bcthw,cd->bdthw", z * 2 - 1, proj)

    def encode_text(caption: str) -> torch.Tensor:
        seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
        return torch.randn(1, 226, text_dim, generator=torch.Generator().manual_seed(seed))

    return encode_video, encode_text


def tiny_model_path() -> Path:
    import tiny_models

    return tiny_models.build_tiny_model_set(TINY_DIR, include={"native_1_0"})["native_1_0"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.data = args.data or str(write_sample_dataset(args.out / "sample_dataset", frames=args.num_frames,
                                                          size=max(args.width, args.height)))
        args.subject = args.subject or "ball"
    else:
        problems = check_paths(args)
        if problems:
            print("train_adapter: nothing was loaded, because:\n" + "\n".join(problems), file=sys.stderr)
            return 2
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    print(f"device: {'CPU' if cpu else 'GPU (' + torch.cuda.get_device_name(0) + ')'}"
          + (" (no CUDA device found)" if cpu and not args.cpu else ""))
    bootstrap_host_args(cpu_args(cpu))
    import comfy.sd
    import comfy.utils

    training = pack_module("cvx_core.training")
    dataset = pack_module("cvx_core.dataset")
    loader = pack_module("nodes.model_loader")
    train = pack_module("cvx_host.training")

    dtype = loader.WEIGHT_DTYPES[args.weight_dtype]
    if args.tiny:
        import tiny_models

        args.model = str(tiny_model_path())
        print(f"tiny RANDOM test model {args.model}, stand-in encoders, sample dataset {args.data}: the adapter "
              f"shows the loop works, it is not a useful adapter")
        model = loader.load_cogvideox(args.model)
        encode_video, encode_text = standin_encoders(tiny_models.TEXT_DIM)
        encoder_id = "tiny-standin"
    else:
        print(f"loading {args.model}, {args.vae}, {args.text_encoder}")
        model = loader.load_cogvideox(args.model, {} if dtype is None else {"dtype": dtype})
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae))
        clip = comfy.sd.load_clip([args.text_encoder], clip_type=comfy.sd.CLIPType.COGVIDEOX)
        encode_video, encode_text = train.host_encoders(model, vae, clip)
        encoder_id = f"{Path(args.vae).name}:{Path(args.text_encoder).name}"
    settings = training.TrainSettings(
        steps=args.steps, learning_rate=args.learning_rate, rank=args.rank, alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), seed=args.seed,
        reference_drop=args.reference_drop, text_drop=args.text_drop,
        gradient_checkpointing=not args.no_gradient_checkpointing, checkpoint_every=args.checkpoint_every)
    prep = dataset.PrepSettings(width=args.width, height=args.height, num_frames=args.num_frames,
                                frame_stride=args.frame_stride)
    first: list[float] = []  # (step, time) of the first step this run

    def prep_progress(done: int, total: int, clip: str) -> None:
        print(f"dataset: {done}/{total} clips encoded" + (f" (next: {clip})" if clip else ""), flush=True)

    def progress(step: int, total: int, loss: float) -> None:
        if not first:
            first.extend((step, time.monotonic()))
            if step > 1:
                print(f"resumed from step {step - 1} (checkpoint in {args.out / 'checkpoints'})", flush=True)
        if step == first[0] or step % max(1, total // 20) == 0 or step == total:
            line = f"step {step}/{total}  loss {loss:.5f}"
            if step > first[0]:
                per = (time.monotonic() - first[1]) / (step - first[0])
                line += f"  {per:.2f} s/step  ETA {per * (total - step):.0f} s"
            print(line, flush=True)

    result = train.train_on_host(
        model, encode_video, encode_text, args.data, args.out, settings, prep, subject=args.subject,
        base_model=Path(args.model).name, adapter_name=args.name, encoder_id=encoder_id,
        resume=not args.no_resume, progress=progress, prep_progress=prep_progress)
    if not first:
        print(f"already trained: the checkpoints in {args.out / 'checkpoints'} reach step {settings.steps}")
    print(f"adapter: {result.adapter_path}\nloss curve: {result.curve_path}")
    if args.tiny:
        print("(a tiny test adapter: not copied to models/loras)")
    else:
        target = args.loras_dir / result.adapter_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(result.adapter_path, target)
        print(f"copied to {target}: pick it in CustomVideoXAdapterLoader (the web UI lists it after a refresh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
