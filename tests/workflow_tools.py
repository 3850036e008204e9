"""The shipped example workflows, as tests see them: load, check against node schemas, shrink for tiny models.

``workflows/api/<name>.json`` are the API-format graphs users' runs and the tests share;
``workflows/ui/<name>.json`` and ``example_workflows/<name>.json`` their UI-format copies, written by
``scripts/workflow_ui.py``. Nothing here imports the host: the schema checks take an ``/object_info``
dict, so they work on the in-process registry and on a real server alike.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# scripts/, on sys.path via the conftest: one schema reader for the converter and the checks
from workflow_ui import (
    TEMPLATE_TITLES,
    default_value,
    has_control_widget,
    input_specs,
    is_widget,
    spec_options,
    spec_type,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
API_DIR = REPO_ROOT / "workflows" / "api"
UI_DIR = REPO_ROOT / "workflows" / "ui"
EXAMPLES_DIR = REPO_ROOT / "example_workflows"

# The five example workflows; a test fails if one is missing or an extra appears.
WORKFLOW_NAMES = (
    "subject_to_video_void",
    "subject_to_video_ksampler",
    "tab_vs_fixed",
    "two_references",
    "erae_mask",
)
# Examples with their own tests (tests/host/test_wan_e2e.py, test_wan_t2v_e2e.py and test_wan22_a14b.py run them,
# tests/server/test_wan_workflows.py checks their files).
API_ONLY_NAMES = ("wan_phantom_tab", "wan_vace_ref_tab", "wan_t2v_reference", "wan22_a14b_reference")
PACK_PREFIX = "CustomVideoX"
# Node types a shipped workflow may use from the host's own node set (anything else must be the pack's).
CORE_NODE_TYPES = {
    "CLIPLoader", "CLIPTextEncode", "VAELoader", "VAEDecode", "LoadImage", "EmptyHunyuanLatentVideo",
    "CFGGuider", "BasicScheduler", "RandomNoise", "VOIDSampler", "SamplerCustomAdvanced",
    "ModelSamplingDiscrete", "KSampler", "CreateVideo", "SaveVideo", "ImageStitch", "SolidMask",
    "MaskComposite",
}
UI_ONLY_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes, not in /object_info
# Inputs whose options are the user's files: a shipped name need not exist on the machine that checks it.
FILE_INPUTS = {
    ("CustomVideoXModelLoader", "model_name"),
    ("UNETLoader", "unet_name"),  # the Wan examples load the DiT with the core loader
    ("CLIPLoader", "clip_name"),
    ("VAELoader", "vae_name"),
    ("LoadImage", "image"),
}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def load_api(name: str) -> dict[str, Any]:
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def example_path(name: str) -> Path:
    """The templates copy of workflow ``name``: the web UI titles a template by its file name."""
    return EXAMPLES_DIR / f"{TEMPLATE_TITLES[name]}.json"


def load_ui(name: str, folder: Path = UI_DIR) -> dict[str, Any]:
    path = example_path(name) if folder == EXAMPLES_DIR else folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ------------------------------------------------------------------------------------------- schemas
def combo_choices(spec: list[Any]) -> list[Any]:
    return spec[0] if isinstance(spec[0], list) else list(spec_options(spec).get("options", []))


def _dynamic_inputs(spec: list[Any], key: Any) -> list[tuple[str, list[Any], bool]] | None:
    for option in spec_options(spec).get("options", []):
        if option.get("key") == key:
            return input_specs({"input": option.get("inputs", {})})
    return None


def expanded_specs(info: dict[str, Any], values: dict[str, Any]) -> list[tuple[str, list[Any], bool]]:
    """The node's inputs including those a dynamic combo's chosen option adds (``codec.encoding``)."""
    out: list[tuple[str, list[Any], bool]] = []

    def add(specs: list[tuple[str, list[Any], bool]], prefix: str) -> None:
        for name, spec, optional in specs:
            full = prefix + name
            out.append((full, spec, optional))
            if spec_type(spec) == DYNAMIC_COMBO:
                sub = _dynamic_inputs(spec, values.get(full, default_value(spec)))
                if sub:
                    add(sub, full + ".")

    add(input_specs(info), "")
    return out


def types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def check_api(api: dict[str, Any], object_info: dict[str, Any], allow_missing_files: bool = True) -> list[str]:
    """Every way the API-format ``api`` disagrees with the node schemas in ``object_info``: unknown node
    types, inputs the schema does not have (a renamed input), missing required inputs, links to missing
    nodes/outputs or of the wrong type, combo values not offered, numbers out of range or of the wrong
    kind. File-list combos (FILE_INPUTS) may name files this machine lacks when ``allow_missing_files``."""
    errors: list[str] = []
    for nid, node in api.items():
        ctype = node.get("class_type")
        where = f"node {nid} ({ctype})"
        info = object_info.get(ctype)
        if info is None:
            errors.append(f"{where}: unknown node type")
            continue
        values = node.get("inputs", {})
        specs = {n: (s, o) for n, s, o in expanded_specs(info, values)}
        for name in values:
            if name not in specs:
                errors.append(f"{where}: input {name!r} is not in the schema (inputs: {sorted(specs)})")
        for name, (spec, optional) in specs.items():
            if name not in values:
                if not optional and "." not in name:
                    errors.append(f"{where}: required input {name!r} is missing")
                continue
            value = values[name]
            t = spec_type(spec)
            if is_link(value):
                src = api.get(value[0])
                if src is None:
                    errors.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outs = object_info.get(src.get("class_type"), {}).get("output", [])
                if value[1] >= len(outs):
                    errors.append(f"{where}: input {name!r} links to output {value[1]} of node {value[0]}, "
                                  f"which has {len(outs)} outputs")
                elif not types_match(outs[value[1]], "COMBO" if t == DYNAMIC_COMBO else t):
                    errors.append(f"{where}: input {name!r} ({t}) is linked to a {outs[value[1]]} output")
                continue
            if not is_widget(spec):
                errors.append(f"{where}: input {name!r} ({t}) must be linked, got the value {value!r}")
                continue
            errors += [f"{where}: input {name!r}: {e}" for e in _check_value(ctype, name, spec, value,
                                                                                allow_missing_files)]
    return errors


def _check_value(ctype: str, name: str, spec: list[Any], value: Any, allow_missing_files: bool) -> list[str]:
    t, opts = spec_type(spec), spec_options(spec)
    if t in ("COMBO", DYNAMIC_COMBO):
        choices = ([o["key"] for o in opts.get("options", [])] if t == DYNAMIC_COMBO else combo_choices(spec))
        if value not in choices and not (allow_missing_files and (ctype, name) in FILE_INPUTS):
            return [f"{value!r} is not one of {choices}"]
        return []
    kinds = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}[t]
    if not isinstance(value, kinds) or (t != "BOOLEAN" and isinstance(value, bool)):
        return [f"{value!r} is not a {t}"]
    if t in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return [f"{value} is below the minimum {opts['min']}"]
        if "max" in opts and value > opts["max"]:
            return [f"{value} is above the maximum {opts['max']}"]
    return []


def ui_widget_names(info: dict[str, Any], values_by_name: dict[str, Any]) -> list[str]:
    """The names of a node's widgets in the order its ``widgets_values`` lists them (the web UI's order:
    schema inputs, ``control_after_generate`` after seed-like INTs, ``upload`` after image-upload combos,
    a dynamic combo's option widgets right after it)."""
    names: list[str] = []

    def add(specs: list[tuple[str, list[Any], bool]], prefix: str) -> None:
        for name, spec, _optional in specs:
            if not is_widget(spec):
                continue
            full = prefix + name
            names.append(full)
            if has_control_widget(name, spec):
                names.append("control_after_generate")
            if spec_options(spec).get("image_upload"):
                names.append("upload")
            if spec_type(spec) == DYNAMIC_COMBO:
                sub = _dynamic_inputs(spec, values_by_name.get(full, default_value(spec)))
                if sub:
                    add(sub, full + ".")

    add(input_specs(info), "")
    return names


def check_ui(ui: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """Every way the UI-format ``ui`` disagrees with the node schemas: unknown node types, widget value
    counts that do not match the schema, links whose ends or types do not match the nodes' slots."""
    errors: list[str] = []
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    for node in nodes.values():
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in UI_ONLY_TYPES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            errors.append(f"{where}: unknown node type")
            continue
        values = list(node.get("widgets_values") or [])
        by_name: dict[str, Any] = {}
        for _ in range(8):
            names = ui_widget_names(info, by_name)
            by_name = dict(zip(names, values))
        if len(names) != len(values):
            errors.append(f"{where}: {len(values)} widget values, the schema has {len(names)} widgets {names}")
        specs = {n: s for n, s, _ in input_specs(info)}
        for slot, entry in enumerate(node.get("inputs", [])):
            spec = specs.get(entry["name"])
            if spec is None:
                errors.append(f"{where}: input slot {slot} {entry['name']!r} is not in the schema")
            elif entry.get("type") != spec_type(spec):
                errors.append(f"{where}: input {entry['name']!r} has type {entry.get('type')}, schema "
                              f"{spec_type(spec)}")
    for lk in ui.get("links", []):
        link_id, src, src_slot, dst, dst_slot, ltype = lk
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: node {src} or {dst} does not exist")
            continue
        outs = object_info.get(nodes[src]["type"], {}).get("output", [])
        ins = nodes[dst].get("inputs", [])
        if src_slot >= len(outs) or dst_slot >= len(ins):
            errors.append(f"link {link_id}: slot out of range ({src}:{src_slot} -> {dst}:{dst_slot})")
            continue
        if outs[src_slot] != ltype or not types_match(ltype, ins[dst_slot]["type"]):
            errors.append(f"link {link_id}: {outs[src_slot]} output into {ins[dst_slot]['type']} input "
                          f"(link says {ltype})")
        if ins[dst_slot].get("link") != link_id:
            errors.append(f"link {link_id}: node {dst} input {dst_slot} does not name it")
    return errors


def with_defaults(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """``api`` with every absent widget input at its schema default (what the web UI would queue)."""
    out = copy.deepcopy(api)
    for node in out.values():
        info = object_info[node["class_type"]]
        for name, spec, _ in expanded_specs(info, node["inputs"]):
            if name not in node["inputs"] and is_widget(spec):
                node["inputs"][name] = default_value(spec)
    return out


# ------------------------------------------------------------------------------------------- tiny variant
def tiny_variant(
    api: dict[str, Any],
    unet_name: str,
    vae_name: str,
    width: int = 96,
    height: int = 64,
    length: int = 9,
    steps: int = 2,
    text_dim: int = 32,
    text_length: int = 226,
    image_size: tuple[int, int] = (128, 96),
    save_prefix: str | None = None,
) -> dict[str, Any]:
    """The shipped graph ``api`` made runnable on the tiny random models in seconds, otherwise unchanged:

    - model / VAE file names -> the tiny files; CLIPLoader is dropped and every CLIPTextEncode becomes a
      ``CVXTestTextConditioning`` (random ``[1, text_length, text_dim]`` conditioning; no T5 needed);
    - every LoadImage becomes a ``CVXTestImage`` (a smooth random photo-like image, seeded by node id, so
      two references differ);
    - video width/height/length (EmptyHunyuanLatentVideo, CustomVideoXReferenceEncode) and sampler steps
      shrink. ``width:height`` keeps the shipped 3:2 so masks drawn for 720x480 map the same way.
    Every other node, link and value stays as shipped.
    """
    p = copy.deepcopy(api)
    used = {(v[0], v[1]) for n in p.values() for v in n["inputs"].values() if is_link(v)}
    for nid, node in list(p.items()):
        ctype, inputs = node["class_type"], node["inputs"]
        if ctype == "CustomVideoXModelLoader":
            inputs["model_name"] = unet_name
        elif ctype == "VAELoader":
            inputs["vae_name"] = vae_name
        elif ctype == "CLIPLoader":
            users = [m for m, n in p.items() if any(is_link(v) and v[0] == nid for v in n["inputs"].values())
                     and n["class_type"] != "CLIPTextEncode"]
            if users:
                raise ValueError(f"CLIPLoader {nid} also feeds {users}; the tiny variant cannot replace it")
            del p[nid]
        elif ctype == "CLIPTextEncode":
            p[nid] = {"class_type": "CVXTestTextConditioning",
                      "inputs": {"seed": 1000 + int(nid), "length": text_length, "dim": text_dim},
                      "_meta": node.get("_meta", {})}
        elif ctype == "LoadImage":
            if (nid, 1) in used:
                raise ValueError(f"LoadImage {nid}'s MASK output is used; the tiny variant has no stand-in")
            p[nid] = {"class_type": "CVXTestImage",
                      "inputs": {"seed": int(nid), "width": image_size[0], "height": image_size[1],
                                 "batch_size": 1},
                      "_meta": node.get("_meta", {})}
        elif ctype in ("EmptyHunyuanLatentVideo", "CustomVideoXReferenceEncode"):
            inputs.update(width=width, height=height)
            if "length" in inputs:
                inputs["length"] = length
        elif ctype in ("BasicScheduler", "KSampler"):
            inputs["steps"] = steps
        elif ctype == "SaveVideo" and save_prefix is not None:
            inputs["filename_prefix"] = f"{save_prefix}/{inputs['filename_prefix'].rsplit('/', 1)[-1]}"
    return p


def decode_mp4(path: Path) -> tuple[int, int, int, str]:
    """(frames, width, height, codec) of an mp4, by decoding every frame with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        codec = stream.codec_context.name
    assert frames, f"{path} has no decodable video frames"
    sizes = {(f.width, f.height) for f in frames}
    assert len(sizes) == 1, f"{path}: frame sizes vary: {sizes}"
    (w, h), = sizes
    for f in frames:
        assert f.to_ndarray(format="rgb24").shape == (h, w, 3)
    return len(frames), w, h, codec
