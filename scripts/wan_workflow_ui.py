"""UI-format copies of the Wan examples (``workflows/api/wan_*.json``).

The conversion is ``scripts/workflow_ui.py``'s (``api_to_ui``); this adds what only the Wan examples need:

- ``properties.models`` (name, url, directory) on each loader node whose file the host's own templates
  (package ``comfyui_workflow_templates``, e.g. ``video_wan_vace_14B_ref2v``) list, copied from them, so
  the web UI's missing-models dialog offers the same downloads as those templates. The host has no
  Phantom template, so the Phantom model loader carries none;
- an "About this workflow" note.

Run it after ``scripts/workflow_ui.py`` (which renders every API file, these included, without them)::

    python scripts/wan_workflow_ui.py                    # start the host (main.py --cpu), read /object_info
    python scripts/wan_workflow_ui.py --object-info URL  # or a running host / a saved /object_info JSON
    python scripts/wan_workflow_ui.py --check            # exit 1 if a file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workflow_ui as wu  # noqa: E402

WAN_NAMES = ("wan_phantom_tab", "wan_vace_ref_tab")
# Loader nodes and the input that names their file.
LOADER_INPUTS = {"UNETLoader": "unet_name", "CLIPLoader": "clip_name", "VAELoader": "vae_name"}
TEMPLATE_PACKAGE = "comfyui_workflow_templates_json"

MODELS_NOTE = (
    "**Models** (the host's Wan templates list the same files; the loaders offer their downloads):\n\n"
    "- `models/diffusion_models/`: the Wan model ({model}).\n"
    "- `models/text_encoders/`: umT5-XXL (`umt5_xxl_fp16.safetensors` or `umt5_xxl_fp8_e4m3fn_scaled."
    "safetensors`), loaded with type `wan`.\n"
    "- `models/vae/`: `wan_2.1_vae.safetensors`.\n\n"
    "Load your subject in **Subject reference**: a cut-out on a plain background works best. Video size: "
    "multiples of 16; frames 4n+1. The mp4 goes to `output/video/`."
)
DESCRIPTIONS = {
    "wan_phantom_tab": (
        "## CustomVideoX on Wan Phantom: TAB on the reference frames\n\n"
        "`WanPhantomSubjectToVideo` appends the subject's latent frames after the video, as Phantom was "
        "trained. **Reference Frames Bias** on the MODEL biases the video's attention to those frames with "
        "a TAB schedule (parabolic: highest mid-way through sampling). Strength 1 without a schedule is the "
        "plain Phantom run. Add a **Entity Region** for ERAE, or a subject mask on `reference_mask` to hide "
        "the reference's background.",
        "a Wan 2.1 Phantom 14B checkpoint in ComfyUI layout",
    ),
    "wan_vace_ref_tab": (
        "## CustomVideoX on Wan VACE: TAB on the reference frame, background hidden\n\n"
        "The host's VACE reference-to-video graph (`video_wan_vace_14B_ref2v`, without the CausVid LoRA: "
        "its default 20 steps, cfg 6). `WanVaceToVideo` puts the reference image's latent frame in front "
        "of the video; its `trim_latent` tells **Reference Frames Bias** how many leading frames are the "
        "reference and `TrimVideoLatent` how many to cut after sampling. The reference image's mask "
        "(inverted: LoadImage's mask is 1 where the image is transparent) hides the reference's background "
        "from the video; an image without alpha gives a full mask, i.e. no effect.",
        "`wan2.1_vace_14B_fp16.safetensors`, or the 1.3B one at 480p",
    ),
}


def template_models() -> dict[str, dict[str, str]]:
    """``{file name: properties.models entry}`` over every host template's loader nodes."""
    spec = find_spec(TEMPLATE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the host's templates package {TEMPLATE_PACKAGE} is not installed (host requirements)")
    out: dict[str, dict[str, str]] = {}
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder, "templates").glob("*.json")):
            workflow = json.loads(path.read_text(encoding="utf-8"))
            for node in workflow.get("nodes", []) if isinstance(workflow, dict) else []:
                for entry in (node.get("properties") or {}).get("models") or []:
                    out.setdefault(entry["name"], {k: entry[k] for k in ("name", "url", "directory")})
    return out


def api_to_wan_ui(api: dict[str, Any], object_info: dict[str, Any], name: str,
                  models: dict[str, dict[str, str]]) -> dict[str, Any]:
    ui = wu.api_to_ui(api, object_info, name)
    for node in ui["nodes"]:
        key = LOADER_INPUTS.get(node["type"])
        entry = models.get(api[str(node["id"])]["inputs"].get(key)) if key else None
        if entry:
            node["properties"]["models"] = [entry]
    text, model = DESCRIPTIONS[name]
    next_id = ui["last_node_id"] + 1
    ui["nodes"].append({
        "id": next_id, "type": "MarkdownNote", "pos": [40, -560], "size": [760, 520], "flags": {},
        "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
        "properties": {}, "widgets_values": [text + "\n\n" + MODELS_NOTE.format(model=model)],
        "color": "#432", "bgcolor": "#653",
    })
    ui["last_node_id"] = next_id
    return ui


def render(object_info: dict[str, Any]) -> dict[str, str]:
    models = template_models()
    out = {}
    for name in WAN_NAMES:
        api = json.loads((wu.API_DIR / f"{name}.json").read_text(encoding="utf-8"))
        out[f"{name}.json"] = json.dumps(api_to_wan_ui(api, object_info, name, models), indent=2,
                                         ensure_ascii=False) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", help="a host URL or a saved /object_info JSON (default: start the host)")
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for fname, text in render(wu.load_object_info(args.object_info)).items():
        for folder in wu.UI_DIRS:
            path = folder / fname
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
                if not args.check:
                    path.write_text(text, encoding="utf-8")
    for path in stale:
        print(("out of date: " if args.check else "wrote: ") + str(path.relative_to(wu.REPO_ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
