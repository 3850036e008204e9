"""Build the UI-format (drag-and-drop) workflows from the API-format ones, using the host's node schemas.

``workflows/api/<name>.json`` (API format: what ``POST /prompt`` takes, what the tests run) is the source
of truth. This script writes, for each of them, the UI format the web UI loads and saves (litegraph
``version 0.4``: nodes with id/type/pos/size/inputs/outputs/widgets_values, a links array) to

- ``example_workflows/<title>.json``: the host lists this folder of a custom node as templates
  (``GET /api/workflow_templates``, file names only) and serves the files from
  ``/api/workflow_templates/<pack>/``; the web UI shows them under Templates -> Extensions, titled by the
  file name (its only title), with ``<title>.jpg`` beside it as the thumbnail;
- ``workflows/ui/<name>.json``: the same file beside the API copy, for drag-and-drop from the repo.

Loader nodes carry ``properties.models`` (name, url, directory), which the web UI's missing-models dialog
reads to offer the download, as the host's own templates do.

Widget values follow the schema's input order (``input_order``: required, then optional), as the web UI
builds its widgets; INT widgets with ``control_after_generate`` (seed, noise_seed) get the extra control
value, image-upload combos (LoadImage) the upload widget's ``"image"``, and a dynamic combo (SaveVideo's
``codec``) is followed by the widgets of the option it selects.

Usage::

    python scripts/workflow_ui.py                    # start the host (main.py --cpu), read /object_info
    python scripts/workflow_ui.py --object-info URL  # a running host, e.g. http://127.0.0.1:8188
    python scripts/workflow_ui.py --object-info F    # a saved /object_info JSON
    python scripts/workflow_ui.py --check            # exit 1 if a generated file is out of date
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import urllib.request
import uuid
from collections import defaultdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_files as mf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
API_DIR = REPO_ROOT / "workflows" / "api"
UI_DIRS = (REPO_ROOT / "example_workflows", REPO_ROOT / "workflows" / "ui")
PACK_ID = "customvideox"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
# Frontend-only node types (no entry in /object_info) that may appear in a UI workflow.
UI_ONLY_TYPES = {"Note", "MarkdownNote"}

# The templates' file names: the web UI (comfyui-frontend-package 1.47) shows a custom node's template by its
# file name and nothing else, so the name is the title. "VOID" (the core sampler's name) stays out of it.
TEMPLATE_TITLES = {
    "subject_to_video_void": "CustomVideoX subject to video",
    "subject_to_video_ksampler": "CustomVideoX subject to video (KSampler)",
    "tab_vs_fixed": "CustomVideoX TAB vs fixed bias",
    "two_references": "CustomVideoX two subjects",
    "erae_mask": "CustomVideoX subject placed by a mask (ERAE)",
    "wan_phantom_tab": "CustomVideoX Wan Phantom subject with TAB",
    "wan_vace_ref_tab": "CustomVideoX Wan VACE reference with TAB",
    "wan_t2v_reference": "CustomVideoX Wan text to video with a reference",
    "wan22_a14b_reference": "CustomVideoX Wan 2.2 A14B two experts with a reference",
}
# Loader inputs that name a model file, and the kind of file (model_files) they take.
LOADER_FILES = {
    "CustomVideoXModelLoader": ("model_name", mf.TRANSFORMER), "UNETLoader": ("unet_name", mf.TRANSFORMER),
    "VAELoader": ("vae_name", mf.VAE), "CLIPLoader": ("clip_name", mf.T5),
}

# One note per workflow: what it shows and which files it needs.
TEMPLATE_PACKAGE = "comfyui_workflow_templates_json"
MODELS_NOTE = (
    "**Models** (any CogVideoX 1.0/1.5 text-to-video transformer; pick yours in each loader):\n\n"
    + "\n".join(f"- `{d.folder}/`: {mf.WHAT[d.kind]} for {d.model}: [{d.repo}: {d.file}]({d.url}) "
                f"({d.size})" for d in mf.DOWNLOADS)
    + "\n\nThe transformer is a diffusers folder (put the whole `transformer` folder there) or one "
    ".safetensors file. Load your subject's photo in **Reference image** (a plain background or a subject "
    "mask works best). Video size: multiples of 16 (720x480 native); frames 4n+1 (49 native). The mp4 goes "
    "to `output/video/`."
)
WAN_MODELS_NOTE = (
    "**Models** (the host's Wan templates list the same files; the loaders offer their downloads):\n\n"
    "- `models/diffusion_models/`: the Wan model ({model}).\n"
    "- `models/text_encoders/`: umT5-XXL (`umt5_xxl_fp16.safetensors` or `umt5_xxl_fp8_e4m3fn_scaled."
    "safetensors`), loaded with type `wan`.\n"
    "- `models/vae/`: `wan_2.1_vae.safetensors`.\n\n"
    "Load your subject in **Subject reference**: a cut-out on a plain background works best. Video size: "
    "multiples of 16; frames 4n+1. The mp4 goes to `output/video/`."
)
DESCRIPTIONS = {
    "subject_to_video_void": (
        "## CustomVideoX: subject to video\n\n"
        "One reference image of a subject + a prompt -> a video of that subject. The reference joins the "
        "model's 3D attention (**Apply reference**); the **TAB schedule** raises its weight in the middle "
        "of sampling (parabolic). Sampled with the core alpha-space DDIM sampler through "
        "`SamplerCustomAdvanced`, the route CogVideoX (v-prediction, zero terminal SNR) needs; the core node "
        "is called `VOIDSampler` after the VOID model it came with, and works for any CogVideoX."
    ),
    "subject_to_video_ksampler": (
        "## CustomVideoX: subject to video (KSampler)\n\n"
        "The same with a plain `KSampler`: `ModelSamplingDiscrete` (v_prediction, zsnr on) must sit "
        "before it, or the noise is scaled wrongly for CogVideoX. Reference strength 1 = plain joint "
        "attention; 0 = reference off."
    ),
    "tab_vs_fixed": (
        "## CustomVideoX: TAB (parabolic) vs a fixed bias\n\n"
        "One reference, one seed, two patched models: left, the time-aware bias (low at start and end, "
        "highest mid-way); right, a fixed bias over the whole run. The two videos are stitched side by "
        "side into one mp4."
    ),
    "two_references": (
        "## CustomVideoX: two references\n\n"
        "Two **Apply reference** nodes in a row: each adds its own reference with its own strength "
        "(here 1.0 and 0.7) and schedule. Load a different subject in each reference image and name both "
        "in the prompt."
    ),
    "erae_mask": (
        "## CustomVideoX: ERAE from a drawn mask\n\n"
        "Entity region-aware enhancement: the reference's bias is raised where the subject should be. "
        "The mask here is a box composed with core mask nodes (a 720x480 canvas + a 320x320 box); "
        "replace it with any MASK, e.g. a painted one (Load Image -> mask editor -> MASK output). For "
        "the automatic map from the subject's words, set the region's mode to auto and connect the CLIP, "
        "the prompt and the subject word(s)."
    ),
}
# Wan examples: (description, the model file the note names).
WAN_DESCRIPTIONS = {
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
    "wan_t2v_reference": (
        "## CustomVideoX on plain Wan 2.1 text to video: an inserted reference with TAB\n\n"
        "The host's Wan 2.1 text-to-video graph (`text_to_video_wan`: 832x480, 33 frames, shift 8, 30 "
        "uni_pc steps, cfg 6). **Reference Encode** turns the subject into one latent frame with the Wan "
        "VAE, at the video's size; **Apply reference** on the MODEL puts it in front of the video in every "
        "block's self-attention (two-way), with a TAB schedule (parabolic). Plain Wan was not trained with "
        "a reference, so judge by eye how much of the subject carries over; strength 0 is exactly the "
        "plain text-to-video run.",
        "`wan2.1_t2v_1.3B_fp16.safetensors`, or the 14B one",
    ),
    "wan22_a14b_reference": (
        "## CustomVideoX on Wan 2.2 A14B: two experts, one reference, one TAB curve\n\n"
        "The host's Wan 2.2 14B text-to-video graph (`video_wan2_2_14B_t2v`, without the Lightning LoRA: "
        "640x640, 81 frames, shift 5, 20 euler steps, cfg 3.5): the **high-noise** expert samples steps "
        "0-10 (`KSamplerAdvanced`, leftover noise returned), the **low-noise** expert steps 10-20. **Reference "
        "Encode** turns the subject into one latent frame with the Wan 2.1 VAE, at the video's size; one "
        "**Apply reference** per expert MODEL inserts that same reference, both driven by one **TAB "
        "schedule** whose `progress` is `noise`: progress is read from the noise level, so the curve runs "
        "on from the high-noise expert into the low-noise one instead of restarting at 0 in the second "
        "sampler (`steps` would restart it). Change the split on both samplers together. Plain Wan was not "
        "trained with a reference, so judge by eye how much of the subject carries over; strength 0 on both "
        "is the plain run.",
        "the two Wan 2.2 T2V A14B experts, `wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors` and "
        "`wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors`, one per loader",
    ),
}


# --------------------------------------------------------------------------------------------- schemas
def input_specs(info: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """``(name, spec, optional)`` in the web UI's order: required then optional, each by input_order."""
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    out: list[tuple[str, list[Any], bool]] = []
    for section, optional in (("required", False), ("optional", True)):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        out += [(n, specs[n], optional) for n in names if n in specs]
    return out


def spec_type(spec: list[Any]) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


def spec_options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list[Any]) -> bool:
    t = spec_type(spec)
    return (t in WIDGET_TYPES or t == DYNAMIC_COMBO) and not spec_options(spec).get("forceInput")


def has_control_widget(name: str, spec: list[Any]) -> bool:
    """The web UI adds a 'control_after_generate' widget after seed-like INT (and flagged) widgets."""
    opts = spec_options(spec)
    flag = opts.get("control_after_generate")
    if spec_type(spec) == "INT":
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(flag)


def dynamic_option_inputs(spec: list[Any], key: Any) -> list[tuple[str, list[Any], bool]]:
    """The inputs a dynamic combo adds when ``key`` is selected (required, then optional)."""
    for option in spec_options(spec).get("options", []):
        if option.get("key") == key:
            return input_specs({"input": option.get("inputs", {})})
    raise ValueError(f"{key!r} is not an option of this dynamic combo")


def widget_slots(info: dict[str, Any], values: dict[str, Any]) -> list[tuple[str, Any]]:
    """The node's widgets in order, as ``(name, value)``: its own inputs' values (``values``, API names,
    defaults where absent) plus the extra control / upload values the web UI stores."""
    slots: list[tuple[str, Any]] = []

    def add(specs: list[tuple[str, list[Any], bool]], prefix: str) -> None:
        for name, spec, _optional in specs:
            full = prefix + name
            if not is_widget(spec):
                continue
            value = values.get(full, default_value(spec))
            if _is_link(value):  # a widget input driven by a link keeps its widget (default value)
                value = default_value(spec)
            slots.append((full, value))
            if has_control_widget(name, spec):
                slots.append(("control_after_generate", "fixed"))
            if spec_options(spec).get("image_upload"):
                slots.append(("upload", "image"))
            if spec_type(spec) == DYNAMIC_COMBO:
                add(dynamic_option_inputs(spec, value), full + ".")

    add(input_specs(info), "")
    return slots


def default_value(spec: list[Any]) -> Any:
    opts = spec_options(spec)
    if "default" in opts:
        return opts["default"]
    t = spec_type(spec)
    if t == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return choices[0] if choices else None
    if t == DYNAMIC_COMBO:
        return opts["options"][0]["key"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(t)


# --------------------------------------------------------------------------------------------- layout
def _columns(api: dict[str, Any]) -> dict[str, int]:
    """Longest-path depth of each node from the graph's sources (its column in the layout)."""
    depth: dict[str, int] = {}

    def visit(nid: str, stack: tuple[str, ...] = ()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise ValueError(f"cycle through node {nid}")
        ups = [v[0] for v in api[nid]["inputs"].values() if _is_link(v)]
        depth[nid] = 1 + max((visit(u, (*stack, nid)) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# The frontend draws an image-upload node's preview below its widgets (LoadImage: 326 px tall at least).
IMAGE_PREVIEW_HEIGHT = 220


def _size(n_sockets: int, n_widgets: int, multiline: bool, preview: bool = False) -> list[int]:
    return [340, 46 + 24 * (n_sockets + n_widgets) + (80 if multiline else 0) + (IMAGE_PREVIEW_HEIGHT if preview else 0)]


# --------------------------------------------------------------------------------------------- convert
def api_to_ui(api: dict[str, Any], object_info: dict[str, Any], name: str = "") -> dict[str, Any]:
    """The UI-format workflow (litegraph 0.4) for an API-format prompt; node ids are kept (they must be
    integers), so ``ui_to_api`` on the result gives ``api`` back."""
    for nid, node in api.items():
        if not nid.isdigit():
            raise ValueError(f"node id {nid!r} must be an integer string for the UI format")
        if node["class_type"] not in object_info:
            raise KeyError(f"node {nid}: type {node['class_type']!r} is not in /object_info")
    cols = _columns(api)
    col_y: dict[int, int] = defaultdict(int)
    links: list[list[Any]] = []
    out_links: dict[tuple[str, int], list[int]] = defaultdict(list)
    ui_nodes: list[dict[str, Any]] = []
    order = sorted(api, key=lambda n: (cols[n], int(n)))

    # Socket inputs: every non-widget input in schema order; widget inputs follow, marked as widgets.
    for exec_order, nid in enumerate(order):
        node = api[nid]
        info = object_info[node["class_type"]]
        values = node["inputs"]
        known = {n for n, _, _ in input_specs(info)}
        slots = widget_slots(info, values)
        dynamic_names = {n for n, _ in slots if "." in n}
        unknown = set(values) - known - dynamic_names
        if unknown:
            raise KeyError(f"node {nid} ({node['class_type']}): inputs {sorted(unknown)} are not in its schema")
        inputs: list[dict[str, Any]] = []
        for in_name, spec, _optional in input_specs(info):
            if is_widget(spec):
                continue
            entry: dict[str, Any] = {"name": in_name, "type": spec_type(spec), "link": None}
            if _is_link(values.get(in_name)):
                entry["link"] = _add_link(links, out_links, api, object_info, values[in_name], nid, len(inputs))
            inputs.append(entry)
        for in_name, spec, _optional in input_specs(info):
            if not is_widget(spec) or spec_type(spec) == DYNAMIC_COMBO:
                continue
            entry = {"name": in_name, "type": spec_type(spec), "widget": {"name": in_name}, "link": None}
            if _is_link(values.get(in_name)):  # a widget input driven by a link
                entry["link"] = _add_link(links, out_links, api, object_info, values[in_name], nid, len(inputs))
            inputs.append(entry)
        multiline = any(spec_options(s).get("multiline") for _, s, _ in input_specs(info))
        preview = any(spec_options(s).get("image_upload") for _, s, _ in input_specs(info))
        size = _size(sum(1 for i in inputs if "widget" not in i) + len(info.get("output", [])), len(slots),
                     multiline, preview)
        col = cols[nid]
        pos = [40 + col * 400, 40 + col_y[col]]
        col_y[col] += size[1] + 60
        ui_node: dict[str, Any] = {
            "id": int(nid),
            "type": node["class_type"],
            "pos": pos,
            "size": size,
            "flags": {},
            "order": exec_order,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": [v for _, v in slots],
        }
        models = models_property(node["class_type"], values)
        if models:
            ui_node["properties"]["models"] = models
        title = (node.get("_meta") or {}).get("title")
        if title:
            ui_node["title"] = title
        ui_nodes.append(ui_node)

    by_id = {n["id"]: n for n in ui_nodes}
    for nid in order:
        info = object_info[api[nid]["class_type"]]
        names = info.get("output_name") or info.get("output") or []
        for slot, out_type in enumerate(info.get("output", [])):
            by_id[int(nid)]["outputs"].append(
                {"name": names[slot] if slot < len(names) else out_type, "type": out_type,
                 "links": out_links.get((nid, slot)) or None, "slot_index": slot}
            )
    next_id = max(int(n) for n in api) + 1
    if name in DESCRIPTIONS or name in WAN_DESCRIPTIONS:
        ui_nodes.append({
            "id": next_id, "type": "MarkdownNote", "pos": [40, -560], "size": [760, 520], "flags": {},
            "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
            "properties": {}, "widgets_values": [_note(name)],
            "color": "#432", "bgcolor": "#653",
        })
        next_id += 1
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{name}")),
        "revision": 0,
        "last_node_id": next_id - 1,
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [0, 600]}, "customvideox_workflow": name},
        "version": 0.4,
    }


@functools.cache
def template_models() -> dict[str, dict[str, str]]:
    """``{file name: properties.models entry}`` over every host template's loader nodes; those inside
    subgraphs (the Wan 2.2 templates keep their loaders in one) only for files no top-level loader lists."""
    spec = find_spec(TEMPLATE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the host's templates package {TEMPLATE_PACKAGE} is not installed (host requirements)")
    top: list[dict[str, Any]] = []
    nested: list[dict[str, Any]] = []
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder, "templates").glob("*.json")):
            workflow = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(workflow, dict):
                continue
            top += workflow.get("nodes", [])
            nested += [n for g in (workflow.get("definitions") or {}).get("subgraphs") or [] for n in g.get("nodes", [])]
    out: dict[str, dict[str, str]] = {}
    for node in (*top, *nested):
        for entry in (node.get("properties") or {}).get("models") or []:
            out.setdefault(entry["name"], {k: entry[k] for k in ("name", "url", "directory")})
    return out


def _note(name: str) -> str:
    if name in WAN_DESCRIPTIONS:
        text, model = WAN_DESCRIPTIONS[name]
        return text + "\n\n" + WAN_MODELS_NOTE.format(model=model)
    return DESCRIPTIONS[name] + "\n\n" + MODELS_NOTE


def models_property(class_type: str, values: dict[str, Any]) -> list[dict[str, str]] | None:
    """``properties.models`` of a loader node: the file its widget names, where to download it, the folder.

    A file the host's own templates list gets their entry (the Wan files); a CogVideoX file gets the pack's
    (scripts/model_files.py), and a CogVideoX transformer name that is not a published file (it is a
    diffusers folder) its repository page. Other files (the Phantom model, published by nobody in ComfyUI
    layout) get none rather than a wrong download."""
    if class_type not in LOADER_FILES:
        return None
    key, kind = LOADER_FILES[class_type]
    name = values.get(key)
    if not isinstance(name, str):
        return None
    d = next((d for d in mf.DOWNLOADS if d.name == name), None)
    if d is None and name in template_models():
        return [template_models()[name]]
    d = d or next((d for d in mf.WAN_EXTRA_DOWNLOADS if d.name == name), None)
    if d is None and class_type == "CustomVideoXModelLoader":
        d = mf.downloads(kind)[0]
    return None if d is None else [{"name": name, "url": d.url, "directory": mf.FOLDERS[kind]}]


def file_name(folder: Path, name: str) -> str:
    """The file name of workflow ``name`` in ``folder`` (the templates folder uses the titles)."""
    return f"{TEMPLATE_TITLES[name]}.json" if folder == UI_DIRS[0] else f"{name}.json"


def _add_link(links: list[list[Any]], out_links: dict[tuple[str, int], list[int]], api: dict[str, Any],
              object_info: dict[str, Any], value: list[Any], target: str, target_slot: int) -> int:
    src, src_slot = value
    if src not in api:
        raise KeyError(f"node {target} links to missing node {src}")
    outputs = object_info[api[src]["class_type"]].get("output", [])
    if src_slot >= len(outputs):
        raise IndexError(f"node {target} links to output {src_slot} of node {src}, which has {len(outputs)}")
    link_id = len(links) + 1
    links.append([link_id, int(src), src_slot, int(target), target_slot, outputs[src_slot]])
    out_links[(src, src_slot)].append(link_id)
    return link_id


# --------------------------------------------------------------------------------------------- CLI
def load_object_info(source: str | None) -> dict[str, Any]:
    if source and source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read().decode("utf-8"))
    if source:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_server import HostServer

    with tempfile.TemporaryDirectory() as tmp:
        srv = HostServer(["--cpu", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
                          "--user-directory", tmp, "--temp-directory", tmp], Path(tmp) / "server.log")
        srv.start()
        try:
            return srv.object_info()
        finally:
            srv.stop()


def render(object_info: dict[str, Any]) -> dict[str, str]:
    """``{workflow name: text}`` of every UI workflow, from ``workflows/api``."""
    out: dict[str, str] = {}
    for path in sorted(API_DIR.glob("*.json")):
        api = json.loads(path.read_text(encoding="utf-8"))
        out[path.stem] = json.dumps(api_to_ui(api, object_info, path.stem), indent=2, ensure_ascii=False) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", help="a host URL or a saved /object_info JSON (default: start the host)")
    ap.add_argument("--check", action="store_true", help="only check that the UI files are up to date")
    args = ap.parse_args(argv)
    rendered = render(load_object_info(args.object_info))
    stale = []
    for folder in UI_DIRS:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            path = folder / file_name(folder, name)
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != text:
                stale.append(path)
                if not args.check:
                    path.write_text(text, encoding="utf-8")
        extra = sorted(p for p in folder.glob("*.json") if p.name not in {file_name(folder, n) for n in rendered})
        for path in extra:
            stale.append(path)
            if not args.check:
                path.unlink()
    for path in stale:
        print(("out of date: " if args.check else "wrote: ") + str(path.relative_to(REPO_ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
