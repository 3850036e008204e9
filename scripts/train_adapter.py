"""Train a CustomVideoX adapter from the command line, with the host's own loaders and model management.

    .venv/bin/python scripts/train_adapter.py --model models/diffusion_models/CogVideoX-5b \\
        --vae models/vae/cogvideox_vae.safetensors --text-encoder models/text_encoders/t5xxl_fp16.safetensors \\
        --data my_clips --out output/customvideox_training/dog --subject dog --steps 2000

The dataset folder layout is described in cvx_core/dataset.py (NAME.mp4 + NAME.txt, optional
NAME.subject.txt and NAME.mask.png). The adapter lands in ``--out`` as ``<name>.safetensors`` with its
metadata, next to ``loss.png``, ``checkpoints/`` (resumed automatically) and the encoded ``cache/``.
Copy the adapter into models/loras to load it with CustomVideoXAdapterLoader.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pack_import import pack_module  # scripts/, beside this file

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host" / "ComfyUI"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="CogVideoX transformer: .safetensors (ComfyUI or diffusers "
                                                   "layout), an index json or a diffusers folder")
    p.add_argument("--vae", required=True, help="CogVideoX VAE .safetensors")
    p.add_argument("--text-encoder", required=True, help="T5-XXL .safetensors (as for CLIPLoader type cogvideox)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="output folder (adapter, loss.png, checkpoints, cache)")
    p.add_argument("--name", default="customvideox_adapter", help="adapter file name without extension")
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
    p.add_argument("--cpu", action="store_true", help="run on the CPU (passed to the host)")
    return p.parse_args(argv)


def boot_host(cpu: bool) -> None:
    """Import the host as main.py would (its args parsed first), without starting a server."""
    if not (HOST_DIR / "main.py").is_file():
        raise SystemExit(f"no ComfyUI host at {HOST_DIR}; run `make setup` first")
    sys.path.insert(0, str(HOST_DIR))
    saved = sys.argv
    sys.argv = [str(HOST_DIR / "main.py")] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    boot_host(args.cpu)
    import comfy.sd
    import comfy.utils

    dataset = pack_module("cvx_core.dataset")
    training = pack_module("cvx_core.training")
    loader = pack_module("nodes.model_loader")
    train = pack_module("nodes.train_adapter")

    dtype = loader.WEIGHT_DTYPES[args.weight_dtype]
    model = loader.load_cogvideox(args.model, {} if dtype is None else {"dtype": dtype})
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae))
    clip = comfy.sd.load_clip([args.text_encoder], clip_type=comfy.sd.CLIPType.COGVIDEOX)
    encode_video, encode_text = train.host_encoders(model, vae, clip)
    settings = training.TrainSettings(
        steps=args.steps, learning_rate=args.learning_rate, rank=args.rank, alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), seed=args.seed,
        reference_drop=args.reference_drop, text_drop=args.text_drop,
        gradient_checkpointing=not args.no_gradient_checkpointing, checkpoint_every=args.checkpoint_every)
    prep = dataset.PrepSettings(width=args.width, height=args.height, num_frames=args.num_frames,
                                frame_stride=args.frame_stride)

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step % 10 == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.5f}", flush=True)

    result = train.train_on_host(
        model, encode_video, encode_text, args.data, args.out, settings, prep, subject=args.subject,
        base_model=Path(args.model).name, adapter_name=args.name,
        encoder_id=f"{Path(args.vae).name}:{Path(args.text_encoder).name}", resume=not args.no_resume,
        progress=progress)
    print(f"adapter: {result.adapter_path}\nloss curve: {result.curve_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
