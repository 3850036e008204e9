"""The main job (`make run`): the pack's example CustomVideoX workflow through the real ComfyUI host.

Starts ``main.py`` on a free loopback port (``--cpu`` when torch sees no CUDA), POSTs the API-format
workflow, waits for it, prints the mp4 path(s) and stops the host. Nothing keeps running afterwards.

Models come from ``models/`` and whatever ``extra_model_paths.yaml`` adds. With no CogVideoX transformer
there, it builds the tiny random test model (and a random VAE) into ``models/``, swaps the T5 text
encoding for random conditioning of the tiny model's width, and says plainly that the video is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_server import HOST_DIR, REPO_ROOT, HostServer, files_from_ui  # noqa: E402

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "subject_to_video_void.json"
DEFAULT_YAML = REPO_ROOT / "extra_model_paths.yaml"
# Example inputs (the reference image) that the workflow's LoadImage nodes name.
INPUTS_DIR = REPO_ROOT / "workflows" / "inputs"
# Random stand-in conditioning for the tiny model; the same node the tests use (loaded into the host
# subprocess only in tiny mode, never imported by this script).
STANDIN_NODES_DIR = REPO_ROOT / "tests" / "test_nodes_testonly"
TRANSFORMER_EXTS = (".safetensors", ".sft")
MODEL_LOADERS = {"UNETLoader": "unet_name", "CustomVideoXModelLoader": "model_name"}
# Noise needs no 720x480x49 at 50 steps: a small clip keeps the tiny run (random full-size VAE included)
# to well under a minute on a CPU.
TINY_SIZE = {"width": 96, "height": 64, "length": 9}
TINY_SIZE_NODES = ("EmptyHunyuanLatentVideo", "CustomVideoXReferenceEncode")
TINY_STEPS = 4


def model_roots(kind: str, yaml_path: Path) -> list[Path]:
    """``models/<kind>`` plus every ``<kind>`` folder that ``extra_model_paths.yaml`` names (same path
    rules as the host's utils/extra_config.py)."""
    roots = [REPO_ROOT / "models" / kind]
    if yaml_path.is_file():
        import yaml  # a host requirement, in the venv

        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        for conf in config.values():
            if not conf or kind not in conf:
                continue
            base = conf.get("base_path")
            if base:
                base = os.path.expandvars(os.path.expanduser(base))
                if not os.path.isabs(base):
                    base = os.path.join(yaml_path.parent, base)
            for entry in str(conf[kind]).split("\n"):
                if entry:
                    roots.append(Path(os.path.normpath(os.path.join(base or yaml_path.parent, entry))))
    return list(dict.fromkeys(r.resolve() for r in roots))


def _is_cogvideox_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception:
        return False
    return any(
        k.endswith(("blocks.0.norm1.linear.weight", "transformer_blocks.0.norm1.linear.weight")) for k in keys
    )


def find_cogvideox_weights(yaml_path: Path) -> list[str]:
    """Names (as the loaders list them) of real CogVideoX transformers: native or diffusers single files
    and diffusers folders (config.json of a CogVideoXTransformer3DModel). The tiny test model is skipped."""
    found: list[str] = []
    for root in model_roots("diffusion_models", yaml_path):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if "cvx_tiny_test_model" in rel:
                continue
            if path.suffix in TRANSFORMER_EXTS and _is_cogvideox_file(path):
                found.append(rel)
            elif path.name == "config.json":
                try:
                    cls = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
                except (OSError, ValueError):
                    continue
                if cls == "CogVideoXTransformer3DModel":
                    found.append(path.parent.relative_to(root).as_posix())
    return found


def build_tiny(models_dir: Path) -> dict[str, str]:
    """The tiny random transformer + VAE in ``models_dir``; returns the names the loaders list them by."""
    import tiny_models

    tiny_models.ensure_host_importable()
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its args when comfy is first imported
    import comfy.options

    comfy.options.enable_args_parsing()

    paths = tiny_models.build_tiny_model_set(models_dir, include={"native_1_0", "vae"})
    return {
        "unet": paths["native_1_0"].relative_to(models_dir / "diffusion_models").as_posix(),
        "vae": paths["vae"].relative_to(models_dir / "vae").as_posix(),
    }


def tiny_workflow(prompt: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The example graph rewired for the tiny model: its transformer and VAE, random conditioning of
    its text width in place of T5 (the tiny model cannot read 4096-wide T5 features), a small clip and
    few steps."""
    import tiny_models

    out = json.loads(json.dumps(prompt))
    for i, (node_id, node) in enumerate(list(out.items())):
        ct, inputs = node.get("class_type"), node.get("inputs", {})
        if ct in MODEL_LOADERS:
            inputs[MODEL_LOADERS[ct]] = names["unet"]
        elif ct == "VAELoader":
            inputs["vae_name"] = names["vae"]
        elif ct in TINY_SIZE_NODES:
            inputs.update({k: v for k, v in TINY_SIZE.items() if k in inputs})
        elif ct in ("BasicScheduler", "KSampler"):
            inputs["steps"] = min(int(inputs.get("steps", TINY_STEPS)), TINY_STEPS)
        elif ct == "CLIPTextEncode":
            out[node_id] = {
                "class_type": "CVXTestTextConditioning",
                "inputs": {"seed": i, "length": 226, "dim": tiny_models.TEXT_DIM},
            }
    # Loaders of the text encoder are now unused: drop them (the host would still run them).
    used = {v[0] for n in out.values() for v in n.get("inputs", {}).values() if isinstance(v, list) and v}
    for node_id in [k for k, n in out.items() if n.get("class_type") in ("CLIPLoader", "DualCLIPLoader")]:
        if node_id not in used:
            del out[node_id]
        else:
            raise SystemExit(
                f"node {node_id} ({out[node_id]['class_type']}) feeds a node other than CLIPTextEncode; "
                "the tiny-model run cannot replace it"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="API-format workflow JSON")
    ap.add_argument("--extra-model-paths", type=Path, default=DEFAULT_YAML)
    ap.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output")
    ap.add_argument(
        "--tiny", action="store_true", help="use the tiny random test model even if real weights exist"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the workflow")
    args = ap.parse_args(argv)

    if not (HOST_DIR / "main.py").is_file():
        print(f"no ComfyUI host at {HOST_DIR}: run `make setup` first", file=sys.stderr)
        return 2
    if not args.workflow.is_file():
        print(f"workflow not found: {args.workflow}", file=sys.stderr)
        return 2
    prompt = json.loads(args.workflow.read_text(encoding="utf-8"))

    real = [] if args.tiny else find_cogvideox_weights(args.extra_model_paths)
    work = Path(tempfile.mkdtemp(prefix="cvx_run_"))
    host_args = [
        "--output-directory",
        str(args.output_dir.resolve()),
        "--temp-directory",
        str(work),
        "--disable-api-nodes",
        "--database-url",
        "sqlite:///:memory:",
    ]
    if args.extra_model_paths.is_file():
        host_args += ["--extra-model-paths-config", str(args.extra_model_paths.resolve())]
    if INPUTS_DIR.is_dir():
        host_args += ["--input-directory", str(INPUTS_DIR)]
    if real:
        print(f"using CogVideoX weights found in models: {', '.join(real)}")
    else:
        names = build_tiny(REPO_ROOT / "models")
        prompt = tiny_workflow(prompt, names)
        # The stand-in conditioning node, plus models/ itself (the tiny files live there).
        yaml_path = work / "tiny_extra_paths.yaml"
        custom = work / "custom_nodes"
        custom.mkdir()
        (custom / "cvx_standin_nodes").symlink_to(STANDIN_NODES_DIR, target_is_directory=True)
        yaml_path.write_text(
            f"cvx_tiny:\n  base_path: {REPO_ROOT / 'models'}\n  diffusion_models: diffusion_models\n"
            f"  vae: vae\n  custom_nodes: {custom}\n",
            encoding="utf-8",
        )
        host_args += ["--extra-model-paths-config", str(yaml_path)]
        print(
            "NOTE: no CogVideoX weights in models/diffusion_models: using the tiny RANDOM test model "
            f"({names['unet']}, VAE {names['vae']}) and random text conditioning.\n"
            "NOTE: the video will be NOISE from a random test model, not a real result. Put a CogVideoX "
            "transformer in models/diffusion_models (see README) for a real video."
        )

    import torch

    if not torch.cuda.is_available():
        host_args.insert(0, "--cpu")
    server = HostServer(host_args, work / "host.log")
    print(
        f"starting ComfyUI ({'CPU' if '--cpu' in host_args else 'GPU'}) on {server.base_url}; log: {server.log_path}"
    )
    try:
        server.start()
        prompt_id = server.post_prompt(prompt)
        history = server.wait_history(prompt_id, timeout=args.timeout)
    except Exception as e:
        print(f"run failed: {e}\n--- host log (tail) ---\n{server.log_tail(6000)}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    videos = [
        p for p in files_from_ui(history.get("outputs", {}), args.output_dir.resolve()) if p.suffix == ".mp4"
    ]
    if not videos:
        print(
            f"the workflow wrote no mp4; outputs: {json.dumps(history.get('outputs', {}))}", file=sys.stderr
        )
        return 1
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed, for its log
    if not real:
        print("the video below is noise from the tiny random test model:")
    for v in videos:
        print(v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
