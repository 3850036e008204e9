"""The main job (`make run`): the pack's example CustomVideoX workflow through the real ComfyUI host.

Finds a CogVideoX transformer, a CogVideoX VAE and a T5-XXL text encoder under models/ (and the folders
extra_model_paths.yaml adds) by what the files hold, whatever they are called; starts ``main.py`` on a free
loopback port (``--cpu`` when torch sees no CUDA), runs the workflow with your reference image and prompt,
shows the sampling progress, prints a summary and the mp4 path, and stops the host.

With no CogVideoX transformer anywhere it runs a tiny RANDOM test model instead (built once into
.host/tiny_models, never into models/, so it never shows up in the web UI's model lists): that video is
noise, made at a shrunk size with few steps, only to show the whole path works.

Examples:
  make run
  make run ARGS="--dry-run"                       # what would be used, without running
  make run ARGS="--model CogVideoX-5b/transformer/ --vae cogvideox_vae.safetensors --t5 t5xxl_fp16.safetensors"
  make run ARGS="--image photos/my_dog.png --prompt 'A small dog runs across a meadow' --frames 25 --steps 30"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_files as mf  # noqa: E402
from host_boot import bootstrap_host_args  # noqa: E402
from host_server import (  # noqa: E402
    HOST_DIR,
    REPO_ROOT,
    HostRunError,
    HostServer,
    describe_error,
    files_from_ui,
    watch_prompt,
)

DEFAULT_WORKFLOW = REPO_ROOT / "workflows" / "api" / "subject_to_video_void.json"
DEFAULT_YAML = REPO_ROOT / "extra_model_paths.yaml"
TINY_DIR = REPO_ROOT / ".host" / "tiny_models"
# The tiny files older versions of this script wrote into models/ (they showed up in the UI's lists).
TINY_PREFIX = "cvx_tiny_test"  # never taken for real weights
OLD_TINY_FILES = ("diffusion_models/cvx_tiny_test_model.safetensors", "vae/cvx_tiny_test_vae.safetensors")
# Random stand-in conditioning for the tiny model; the same dev node the tests use (loaded into the host
# subprocess only in tiny mode, never imported by this script).
DEV_NODES_DIR = REPO_ROOT / "devnodes"
# The default reference and a prompt that describes it: a tabby cat (scikit-image data.chelsea, CC0).
DEFAULT_IMAGE = "skimage:chelsea"
DEFAULT_IMAGE_TEXT = "a tabby cat (scikit-image's data.chelsea photo, CC0)"
DEFAULT_PROMPT = ("A tabby cat walks slowly across a sunlit wooden floor toward the camera, whiskers twitching, "
                  "tail swaying, soft window light, shallow depth of field, high quality, detailed.")
MODEL_LOADERS = {"UNETLoader": "unet_name", "CustomVideoXModelLoader": "model_name"}
LOADER_KIND = {"UNETLoader": mf.TRANSFORMER, "CustomVideoXModelLoader": mf.TRANSFORMER, "VAELoader": mf.VAE,
               "CLIPLoader": mf.T5}
LOADER_INPUT = {**MODEL_LOADERS, "VAELoader": "vae_name", "CLIPLoader": "clip_name"}
SIZE_NODES = ("EmptyHunyuanLatentVideo", "CustomVideoXReferenceEncode")
STEP_NODES = ("BasicScheduler", "KSampler")
# Noise needs no 720x480x49 at 50 steps: a small clip keeps the tiny run (random full-size VAE included)
# to well under a minute on a CPU.
TINY_SIZE = {"width": 96, "height": 64, "frames": 9, "steps": 4}
# What each stage of the workflow is, for the progress lines.
STAGES = {
    "CustomVideoXModelLoader": "loading the transformer", "UNETLoader": "loading the transformer",
    "CLIPLoader": "loading the T5 text encoder", "VAELoader": "loading the VAE",
    "CLIPTextEncode": "encoding the prompt", "CustomVideoXReferenceEncode": "encoding the reference image",
    "SamplerCustomAdvanced": "sampling", "KSampler": "sampling", "VAEDecode": "decoding the video",
    "SaveVideo": "writing the mp4",
}
# Seconds per sampling step (both CFG passes) at 720x480x49 on a 5B model: generous bounds for the time-out.
STEP_SECONDS = {"gpu": 60.0, "cpu": 7200.0}


class UsageError(Exception):
    """Something the user can fix before anything runs; the message says what and how."""


@dataclass
class Plan:
    """What one run uses; printed by --dry-run and in the summary."""

    tiny: bool
    names: dict[str, str] = field(default_factory=dict)  # kind -> name as the loader lists it
    sizes: dict[str, int] = field(default_factory=dict)  # kind -> bytes
    extra_roots: dict[str, Path] = field(default_factory=dict)  # kind -> folder to add for an explicit path
    image: str = DEFAULT_IMAGE
    image_text: str = DEFAULT_IMAGE_TEXT
    prompt: str = DEFAULT_PROMPT
    width: int = 720
    height: int = 480
    frames: int = 49
    steps: int = 50
    shrunk_from: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ models
def resolve_choice(kind: str, value: str, found: dict[str, list[mf.Found]]) -> tuple[str, Path | None, int]:
    """An explicit ``--model/--vae/--t5``: a name the loader lists, or a path to a file or folder anywhere.
    Returns (name, extra root to add or None, bytes). The file's content must be of that kind."""
    folder = mf.FOLDERS[kind]
    for f in found[folder]:
        if value.rstrip("/") in (f.name.rstrip("/"), str(f.path)):
            if f.kind != kind:
                raise UsageError(f"--{_flag(kind)} {value}: this file is a {mf.WHAT[f.kind]}, not a {mf.WHAT[kind]}")
            return f.name, None, f.size_bytes
    path = Path(value).expanduser()
    if not path.exists():
        names = ", ".join(f.name for f in found[folder] if f.kind == kind) or "none"
        raise UsageError(f"--{_flag(kind)} {value}: no such file or folder, and no {mf.WHAT[kind]} of that name in "
                         f"{mf.FOLDERS_TEXT[kind]} (found there: {names})")
    path = path.resolve()
    got = (mf.TRANSFORMER if mf.is_transformer_folder(path) else None) if path.is_dir() else mf.kind_of_file(path)
    if got != kind:
        what = f"a {mf.WHAT[got]}" if got else "not a file the pack recognises"
        raise UsageError(f"--{_flag(kind)} {value}: expected a {mf.WHAT[kind]}, but this is {what}")
    entry = mf.Found(kind, path.name + ("/" if path.is_dir() else ""), path, path.parent)
    return entry.name, path.parent, entry.size_bytes


def _flag(kind: str) -> str:
    return {mf.TRANSFORMER: "model", mf.VAE: "vae", mf.T5: "t5"}[kind]


def choose_models(args: argparse.Namespace, found: dict[str, list[mf.Found]], plan: Plan) -> None:
    """Fill ``plan.names`` from explicit choices or what the scan found; decide tiny mode; raise UsageError
    naming every missing file, its folder and where to get it."""
    explicit = {mf.TRANSFORMER: args.model, mf.VAE: args.vae, mf.T5: args.t5}
    missing: list[str] = []
    for kind, value in explicit.items():
        if value:
            name, root, size = resolve_choice(kind, value, found)
            plan.names[kind], plan.sizes[kind] = name, size
            if root is not None:
                plan.extra_roots[kind] = root
            continue
        mine = [f for f in found[mf.FOLDERS[kind]] if f.kind == kind]
        if mine:
            plan.names[kind], plan.sizes[kind] = mine[0].name, mine[0].size_bytes
            if len(mine) > 1:
                plan.notes.append(f"several {mf.WHAT[kind]}s found ({', '.join(f.name for f in mine)}); using "
                                  f"{mine[0].name} (choose with --{_flag(kind)} NAME)")
        else:
            missing.append(kind)
    if mf.TRANSFORMER in missing and not any(explicit.values()):
        plan.tiny = True
        return
    if missing:
        lines = [f"a real run needs a {mf.WHAT[k]}, and none was found" for k in missing]
        misplaced = [f for folder, fs in found.items() for f in fs
                     if f.kind in missing and mf.FOLDERS[f.kind] != folder]
        lines += [f"found {f.path} in {f.root}: it is a {mf.WHAT[f.kind]}; move it to {mf.FOLDERS_TEXT[f.kind]}"
                  for f in misplaced]
        lines += ["", "Where to get it:"] + [mf.where_to_get(k) for k in missing]
        lines += ["", "Or choose a file anywhere: make run ARGS=\"--vae PATH --t5 PATH\"; or run the tiny test "
                  "model: make run ARGS=--tiny"]
        raise UsageError("\n".join(lines))


# ----------------------------------------------------------------------------------------- workflow
def _find(prompt: dict[str, Any], *class_types: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") in class_types]


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)


def positive_text_nodes(prompt: dict[str, Any]) -> list[str]:
    """The CLIPTextEncode nodes feeding a guider's or sampler's ``positive`` input."""
    ids = []
    for nid in _find(prompt, "CFGGuider", "KSampler"):
        link = prompt[nid]["inputs"].get("positive")
        if _is_link(link) and prompt.get(link[0], {}).get("class_type") == "CLIPTextEncode":
            ids.append(link[0])
    return list(dict.fromkeys(ids))


def workflow_defaults(prompt: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for nid in _find(prompt, "EmptyHunyuanLatentVideo"):
        i = prompt[nid]["inputs"]
        out.update(width=int(i["width"]), height=int(i["height"]), frames=int(i["length"]))
    for nid in _find(prompt, *STEP_NODES):
        out["steps"] = int(prompt[nid]["inputs"]["steps"])
    return out


def apply_plan(prompt: dict[str, Any], plan: Plan, image_name: str) -> dict[str, Any]:
    """The example graph with the plan's files, image, prompt, size, frames and steps."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        ct, inputs = node["class_type"], node["inputs"]
        kind = LOADER_KIND.get(ct)
        if kind in plan.names:
            inputs[LOADER_INPUT[ct]] = plan.names[kind]
        if ct == "EmptyHunyuanLatentVideo":
            inputs.update(width=plan.width, height=plan.height, length=plan.frames)
        elif ct == "CustomVideoXReferenceEncode":
            inputs.update(width=plan.width, height=plan.height)
        elif ct in STEP_NODES:
            inputs["steps"] = plan.steps
        elif ct == "LoadImage":
            inputs["image"] = image_name
    for nid in positive_text_nodes(out):
        out[nid]["inputs"]["text"] = plan.prompt
    return out


def tiny_workflow(prompt: dict[str, Any]) -> dict[str, Any]:
    """The graph rewired for the tiny model: random conditioning of its text width in place of T5 (the tiny
    model cannot read 4096-wide T5 features); the text encoder's loader dropped."""
    import tiny_models

    out = json.loads(json.dumps(prompt))
    for i, (node_id, node) in enumerate(list(out.items())):
        if node.get("class_type") == "CLIPTextEncode":
            out[node_id] = {
                "class_type": "CVXTestTextConditioning",
                "inputs": {"seed": i, "length": 226, "dim": tiny_models.TEXT_DIM},
            }
    used = {v[0] for n in out.values() for v in n.get("inputs", {}).values() if _is_link(v)}
    for node_id in _find(out, "CLIPLoader", "DualCLIPLoader"):
        if node_id in used:
            raise UsageError(f"node {node_id} ({out[node_id]['class_type']}) feeds a node other than CLIPTextEncode; "
                             "the tiny-model run cannot replace it")
        del out[node_id]
    return out


def build_tiny() -> dict[str, str]:
    """The tiny random transformer + VAE in TINY_DIR (built once); the names the loaders list them by."""
    import tiny_models

    bootstrap_host_args(["--cpu"])
    paths = tiny_models.build_tiny_model_set(TINY_DIR, include={"native_1_0", "vae"})
    return {
        mf.TRANSFORMER: paths["native_1_0"].relative_to(TINY_DIR / "diffusion_models").as_posix(),
        mf.VAE: paths["vae"].relative_to(TINY_DIR / "vae").as_posix(),
    }


def remove_old_tiny_files(models_dir: Path) -> list[Path]:
    removed = []
    for rel in OLD_TINY_FILES:
        p = models_dir / rel
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def check_size(plan: Plan) -> None:
    bad = []
    if plan.width % 16 or plan.height % 16 or min(plan.width, plan.height) < 16:
        bad.append(f"--width/--height {plan.width}x{plan.height}: both must be multiples of 16 (720x480 is native)")
    if plan.frames < 1 or (plan.frames - 1) % 4:
        bad.append(f"--frames {plan.frames}: CogVideoX needs 4n+1 frames (9, 25, 49; 49 is native)")
    if plan.steps < 1:
        bad.append(f"--steps {plan.steps}: must be at least 1")
    if bad:
        raise UsageError("\n".join(bad))


def auto_timeout(plan: Plan, cpu: bool) -> float:
    """Seconds to wait: model loading plus a generous per-step bound scaled by pixels and frames."""
    if plan.tiny:
        return 900.0
    work = plan.steps * (plan.width * plan.height) / (720 * 480) * plan.frames / 49
    return 900.0 + work * STEP_SECONDS["cpu" if cpu else "gpu"]


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressPrinter:
    """The host's websocket messages as terminal lines: each stage once, sampling steps with an ETA."""

    def __init__(self, prompt: dict[str, Any], stream: Any = sys.stdout) -> None:
        self.prompt = prompt
        self.stream = stream
        self.t0 = time.monotonic()
        self.stages_seen: set[str] = set()
        self.first_step: tuple[float, int] | None = None
        self.last_printed = -1

    def __call__(self, msg: dict[str, Any]) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "executing" and data.get("node") is not None:
            stage = STAGES.get(self.prompt.get(str(data["node"]), {}).get("class_type", ""))
            if stage and stage not in self.stages_seen:
                self.stages_seen.add(stage)
                self._print(f"[{_duration(time.monotonic() - self.t0):>9}] {stage}")
        elif kind == "progress":
            self._step(int(data.get("value", 0)), int(data.get("max", 0)))

    def _step(self, value: int, total: int) -> None:
        now = time.monotonic()
        if self.first_step is None or value < self.first_step[1]:
            self.first_step = (now, value)
            self.last_printed = -1
        t_first, v_first = self.first_step
        every = max(1, total // 20)
        if value == self.last_printed or (value % every and value != total and value != 1):
            return
        self.last_printed = value
        line = f"            step {value}/{total}"
        if value > v_first:
            per = (now - t_first) / (value - v_first)
            line += f"  {per:.1f} s/step  ETA {_duration(per * (total - value))}"
        self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make run ARGS=...", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="CogVideoX transformer: a name under models/diffusion_models (a file, or a "
                                    "diffusers folder ending in /) or a path anywhere; default: the one found")
    ap.add_argument("--vae", help="CogVideoX VAE: a name under models/vae or a path; default: the one found")
    ap.add_argument("--t5", help="T5-XXL text encoder: a name under models/text_encoders or a path; default: the "
                                 "one found")
    ap.add_argument("--image", help="reference image of the subject (a file; default: a photo of a tabby cat "
                                    "from scikit-image, CC0)")
    ap.add_argument("--prompt", help="what the subject does (default: a sentence about the cat photo, or the "
                                     "workflow's own prompt when --image is given)")
    ap.add_argument("--width", type=int, help="video width, a multiple of 16 (workflow: 720)")
    ap.add_argument("--height", type=int, help="video height, a multiple of 16 (workflow: 480)")
    ap.add_argument("--frames", type=int, help="frames, 4n+1 (workflow: 49)")
    ap.add_argument("--steps", type=int, help="sampling steps (workflow: 50)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random test model even if real weights exist")
    ap.add_argument("--dry-run", action="store_true", help="print which files and settings would be used; run nothing")
    ap.add_argument("--timeout", type=float, help="seconds to wait for the workflow (default: scaled to size, "
                                                  "frames and steps)")
    ap.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="API-format workflow JSON")
    ap.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models folder (default: models/)")
    ap.add_argument("--extra-model-paths", type=Path, default=DEFAULT_YAML)
    ap.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace, prompt: dict[str, Any]) -> Plan:
    found = {folder: [f for f in fs if not f.path.name.startswith(TINY_PREFIX)]
             for folder, fs in mf.scan(args.models_dir.resolve(), args.extra_model_paths).items()}
    plan = Plan(tiny=args.tiny)
    if not args.tiny:
        choose_models(args, found, plan)
    defaults = workflow_defaults(prompt)
    if args.image:
        image = Path(args.image).expanduser()
        if not image.is_file():
            raise UsageError(f"--image {args.image}: no such file")
        plan.image, plan.image_text = str(image.resolve()), str(image.resolve())
        texts = [prompt[n]["inputs"]["text"] for n in positive_text_nodes(prompt)]
        plan.prompt = args.prompt or (texts[0] if texts else DEFAULT_PROMPT)
        if not args.prompt:
            plan.notes.append("no --prompt given: using the workflow's own prompt; describe your subject with "
                              "--prompt '...'")
    elif args.prompt:
        plan.prompt = args.prompt
    for key in ("width", "height", "frames", "steps"):
        wanted = getattr(args, key)
        if wanted is not None:
            setattr(plan, key, wanted)
        elif plan.tiny:
            setattr(plan, key, TINY_SIZE[key])
            plan.shrunk_from[key] = defaults.get(key, getattr(plan, key))
        else:
            setattr(plan, key, defaults.get(key, getattr(plan, key)))
    check_size(plan)
    return plan


def print_plan(plan: Plan) -> None:
    if plan.tiny:
        print("model:            tiny RANDOM test model (no CogVideoX transformer found): the video will be NOISE")
    else:
        for kind in (mf.TRANSFORMER, mf.VAE, mf.T5):
            print(f"{mf.WHAT[kind] + ':':<18}{plan.names[kind]} ({plan.sizes.get(kind, 0) / 1e9:.2f} GB)")
    print(f"size:             {plan.width}x{plan.height}, {plan.frames} frames, {plan.steps} steps"
          + (" (shrunk for the tiny demo from the workflow's "
             f"{plan.shrunk_from.get('width')}x{plan.shrunk_from.get('height')}, {plan.shrunk_from.get('frames')} "
             f"frames, {plan.shrunk_from.get('steps')} steps)" if plan.shrunk_from else ""))
    print(f"reference image:  {plan.image_text}")
    print(f"prompt:           {plan.prompt}" + (" (the tiny model gets random text conditioning)" if plan.tiny else ""))
    for note in plan.notes:
        print(f"note: {note}")


def print_summary(plan: Plan, seconds: float, videos: list[Path]) -> None:
    print("\n=== CustomVideoX: done in " + _duration(seconds) + " ===")
    print_plan(plan)
    for v in videos:
        print(f"output:           {v}")
    print("\nNext:")
    print("  make serve   the web UI on http://127.0.0.1:8188; open Templates -> Extensions -> comfyui-customvideox "
          "-> subject_to_video_void (the workflow this run used)")
    if plan.tiny:
        print("  real video:  put these in models/ and run `make run` again (it finds them by content, any name):")
        for kind in (mf.TRANSFORMER, mf.VAE, mf.T5):
            print("  " + mf.where_to_get(kind).replace("\n", "\n  "))
    print('  your subject: make run ARGS="--image PHOTO --prompt \'what it does\' --frames 25 --steps 30"')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (HOST_DIR / "main.py").is_file():
        print(f"no ComfyUI host at {HOST_DIR}: run `make setup` first", file=sys.stderr)
        return 2
    if not args.workflow.is_file():
        print(f"workflow not found: {args.workflow}", file=sys.stderr)
        return 2
    prompt = json.loads(args.workflow.read_text(encoding="utf-8"))
    try:
        plan = make_plan(args, prompt)
    except UsageError as e:
        print(f"make run: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(plan)
        return 0

    import torch

    cpu = not torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="cvx_run_"))
    input_dir = work / "input"
    input_dir.mkdir()
    image_name = "cvx_reference.png"
    from PIL import Image

    sys.path.append(str(REPO_ROOT))  # the evaluation suite's image loader (wheel images such as skimage:chelsea)
    from evaluation.suite import load_subject_image

    Image.fromarray(load_subject_image(plan.image)).save(input_dir / image_name)
    graph = apply_plan(prompt, plan, image_name)
    yaml_lines: list[str] = []
    if plan.tiny:
        removed = remove_old_tiny_files(REPO_ROOT / "models")
        if removed:
            print(f"removed the tiny test files older versions put in models/: {', '.join(map(str, removed))}")
        plan.names = build_tiny()
        graph = tiny_workflow(apply_plan(prompt, plan, image_name))
        custom = work / "custom_nodes"
        custom.mkdir()
        (custom / "cvx_dev_nodes").symlink_to(DEV_NODES_DIR, target_is_directory=True)
        yaml_lines += [f"cvx_tiny:\n  base_path: {TINY_DIR}\n  diffusion_models: diffusion_models\n  vae: vae\n"
                       f"  custom_nodes: {custom}\n"]
    for kind, root in plan.extra_roots.items():
        yaml_lines.append(f"cvx_choice_{kind}:\n  {mf.FOLDERS[kind]}: {root}\n")
    host_args = ["--output-directory", str(args.output_dir.resolve()), "--temp-directory", str(work),
                 "--input-directory", str(input_dir), "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    if args.extra_model_paths.is_file():
        host_args += ["--extra-model-paths-config", str(args.extra_model_paths.resolve())]
    if args.models_dir.resolve() != (REPO_ROOT / "models").resolve():
        yaml_lines.append("cvx_models:\n" + "".join(f"  {f}: {args.models_dir.resolve() / f}\n"
                                                    for f in mf.FOLDERS.values()))
    if yaml_lines:
        (work / "run_paths.yaml").write_text("".join(yaml_lines), encoding="utf-8")
        host_args += ["--extra-model-paths-config", str(work / "run_paths.yaml")]
    if cpu:
        host_args.insert(0, "--cpu")

    print_plan(plan)
    timeout = args.timeout or auto_timeout(plan, cpu)
    server = HostServer(host_args, work / "host.log")
    print(f"starting ComfyUI ({'CPU' if cpu else 'GPU'}) on {server.base_url}; time-out {_duration(timeout)} "
          f"(scaled to the job; --timeout S to change); log: {server.log_path}")
    t0 = time.monotonic()
    try:
        server.start()
        history = watch_prompt(server, graph, ProgressPrinter(graph), timeout=timeout)
    except HostRunError as e:
        print(f"make run: the workflow failed:\n{describe_error(e.response, graph) if e.response else e}\n"
              f"(host log: {server.log_path})", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"make run: {e}\n--- host log (tail) ---\n{server.log_tail(4000)}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    videos = [p for p in files_from_ui(history.get("outputs", {}), args.output_dir.resolve()) if p.suffix == ".mp4"]
    if not videos:
        print(f"make run: the workflow finished but wrote no mp4 (host log: {server.log_path})", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed, for its log
    print_summary(plan, time.monotonic() - t0, videos)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
