"""The model files the example workflows need: what each one is, where to get it, which folder it goes in,
and how to recognise one on disk from its safetensors header alone (the weights are never read).

Used by ``make run`` (scripts/run_example.py) to find the user's files whatever they are called, by
scripts/workflow_ui.py for the loader nodes' ``properties.models`` (the web UI's missing-models dialog),
and by the evaluation CLI to check a suite's models before it boots the host.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

TRANSFORMER, VAE, T5 = "transformer", "vae", "t5"
# models/<folder> of each kind, as the host's loaders list them.
FOLDERS = {TRANSFORMER: "diffusion_models", VAE: "vae", T5: "text_encoders"}
WHAT = {TRANSFORMER: "CogVideoX transformer", VAE: "CogVideoX VAE", T5: "T5-XXL text encoder"}
FOLDERS_TEXT = {k: f"models/{v}/" for k, v in FOLDERS.items()}
KIND_OF_FOLDER = {v: k for k, v in FOLDERS.items()}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MAX_HEADER = 100 * 1024 * 1024  # a real header is a few MB at most; more means the file is not safetensors

# Header keys that identify each kind (the host's own detection: comfy/sd.py for the VAE and T5; the pack's
# checkpoint_keys probes for the transformer, with the prefixes full checkpoints carry).
_TRANSFORMER_PROBES = ("blocks.0.norm1.linear.weight", "transformer_blocks.0.norm1.linear.weight")
_TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "transformer.")
_VAE_KEYS = ("decoder.conv_in.conv.weight", "decoder.mid_block.resnets.0.norm1.norm_layer.weight")
_T5_XXL_KEY = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"  # [10240, 4096] in T5-XXL v1.1
_T5_XXL_OLD_KEY = "encoder.block.23.layer.1.DenseReluDense.wi.weight"
_SHARD_RE = re.compile(r"^.+-\d{5}-of-\d{5}\.safetensors$")


@dataclass(frozen=True)
class Download:
    """One file (or folder) a workflow needs, as README/NODES.md and the loader nodes' metadata list it."""

    kind: str
    model: str  # which model it belongs to
    name: str  # where the command below puts it, as the host's loader lists it
    url: str  # a direct download for single files; the repository folder for sharded transformers
    size: str
    how: str  # one shell command that puts it where the host finds it

    @property
    def folder(self) -> str:
        return f"models/{FOLDERS[self.kind]}"

    @property
    def repo(self) -> str:
        """``owner/name`` of the Hugging Face repository."""
        return "/".join(self.url.split("huggingface.co/", 1)[1].split("/")[:2])

    @property
    def file(self) -> str:
        """The file (or folder) inside the repository."""
        return self.url.split("/main/", 1)[1] + ("/" if "/tree/" in self.url else "")


# URLs of the VAE and T5 are those the host's own CogVideoX template (comfyui_workflow_templates,
# utility_void_video_inpainting) downloads. Sizes: each transformer is 5.57 B parameters in bf16 (counted on
# the host's class at the real config), the VAE 216 M parameters in bf16/fp16; T5-XXL is the fp16 file.
DOWNLOADS: tuple[Download, ...] = (
    Download(TRANSFORMER, "CogVideoX 1.0 (CogVideoX-5b, 720x480, 49 frames)", "CogVideoX-5b/transformer/",
             "https://huggingface.co/THUDM/CogVideoX-5b/tree/main/transformer", "11.1 GB",
             'huggingface-cli download THUDM/CogVideoX-5b --include "transformer/*" '
             "--local-dir models/diffusion_models/CogVideoX-5b"),
    Download(TRANSFORMER, "CogVideoX 1.5 (CogVideoX1.5-5B, 1360x768, 81 frames)", "CogVideoX1.5-5B/transformer/",
             "https://huggingface.co/THUDM/CogVideoX1.5-5B/tree/main/transformer", "11.1 GB",
             'huggingface-cli download THUDM/CogVideoX1.5-5B --include "transformer/*" '
             "--local-dir models/diffusion_models/CogVideoX1.5-5B"),
    Download(VAE, "CogVideoX 1.0 and 1.5", "cogvideox_vae.safetensors",
             "https://huggingface.co/Comfy-Org/void-model/resolve/main/vae/cogvideox_vae.safetensors", "0.43 GB",
             "wget -P models/vae https://huggingface.co/Comfy-Org/void-model/resolve/main/vae/"
             "cogvideox_vae.safetensors"),
    Download(T5, "CogVideoX 1.0 and 1.5", "t5xxl_fp16.safetensors",
             "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
             "9.8 GB",
             "wget -P models/text_encoders https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
             "t5xxl_fp16.safetensors"),
)

# Files of the Wan examples that the host's own Wan templates do not list (those come from the templates).
# Phantom is published by ByteDance as a diffusers-style repository, not as one ComfyUI file: its entry is the
# repository page, so the missing-models dialog points there instead of saying "Unknown".
WAN_EXTRA_DOWNLOADS: tuple[Download, ...] = (
    Download(TRANSFORMER, "Wan 2.1 Phantom 14B", "phantom_wan_14B_fp16.safetensors",
             "https://huggingface.co/bytedance-research/Phantom/tree/main", "about 28 GB",
             "see https://huggingface.co/bytedance-research/Phantom (one ComfyUI-format file)"),
)


def downloads(kind: str) -> list[Download]:
    return [d for d in DOWNLOADS if d.kind == kind]


def where_to_get(kind: str) -> str:
    """Lines for a user who lacks a ``kind`` file: what it is, which folder, where to get it."""
    lines = [f"- the {WHAT[kind]}, in {FOLDERS_TEXT[kind]}:"]
    for d in downloads(kind):
        lines.append(f"    {d.model}: {d.url} ({d.size})\n      {d.how}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ header reading
def safetensors_header(path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from a safetensors file's JSON header (8-byte length + JSON): only the header
    is read, so a 10 GB file costs a few KB. Raises ValueError when the file is not safetensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if not 2 <= n <= MAX_HEADER:
            raise ValueError(f"{path.name} has no safetensors header")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no safetensors header")
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def kind_of_keys(shapes: dict[str, list[int]]) -> str | None:
    """``transformer`` / ``vae`` / ``t5`` for a CogVideoX transformer, a CogVideoX VAE or a T5-XXL encoder."""
    if any(p + probe in shapes for p in _TRANSFORMER_PREFIXES for probe in _TRANSFORMER_PROBES):
        return TRANSFORMER
    if all(k in shapes for k in _VAE_KEYS):
        return VAE
    if shapes.get(_T5_XXL_KEY, [0])[0] == 10240 or _T5_XXL_OLD_KEY in shapes:
        return T5
    return None


def kind_of_file(path: Path) -> str | None:
    try:
        return kind_of_keys(safetensors_header(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_transformer_folder(folder: Path) -> bool:
    """A diffusers ``transformer`` folder: its config names a CogVideoX transformer, or its weights' header
    (the single file, or the first shard of the index) holds CogVideoX transformer keys."""
    config = folder / "config.json"
    try:
        if json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "CogVideoXTransformer3DModel":
            return True
    except (OSError, ValueError, AttributeError):
        pass
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return kind_of_file(single) == TRANSFORMER
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        return any(kind_of_file(folder / s) == TRANSFORMER for s in shards if (folder / s).is_file())
    return False


# ------------------------------------------------------------------------------------------ scanning
@dataclass(frozen=True)
class Found:
    kind: str
    name: str  # as the host's loader lists it (relative to its root; folders end with "/")
    path: Path
    root: Path

    @property
    def size_bytes(self) -> int:
        files = [p for p in self.path.rglob("*") if p.is_file()] if self.path.is_dir() else [self.path]
        return sum(p.stat().st_size for p in files)


def scan_root(root: Path) -> list[Found]:
    """Every CogVideoX transformer (file or diffusers folder), CogVideoX VAE and T5-XXL under ``root``,
    whatever their names; files inside a transformer folder belong to that folder."""
    found: list[Found] = []
    if not root.is_dir():
        return found
    folders: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames.sort()
        if here != root and is_transformer_folder(here):
            folders.append(here)
            found.append(Found(TRANSFORMER, here.relative_to(root).as_posix() + "/", here, root))
            dirnames.clear()
            continue
        for fn in sorted(filenames):
            if not fn.endswith(SAFETENSORS_SUFFIXES) or _SHARD_RE.match(fn):
                continue
            kind = kind_of_file(here / fn)
            if kind:
                found.append(Found(kind, (here / fn).relative_to(root).as_posix(), here / fn, root))
    return found


def model_roots(kind_folder: str, models_dir: Path, yaml_path: Path | None) -> list[Path]:
    """``models_dir/<kind_folder>`` plus every ``<kind_folder>`` entry of ``extra_model_paths.yaml`` (same
    path rules as the host's utils/extra_config.py)."""
    roots = [models_dir / kind_folder]
    if yaml_path is not None and yaml_path.is_file():
        import yaml  # a host requirement, in the venv

        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        for conf in config.values():
            if not isinstance(conf, dict) or kind_folder not in conf:
                continue
            base = conf.get("base_path")
            if base:
                base = os.path.expandvars(os.path.expanduser(base))
                if not os.path.isabs(base):
                    base = os.path.join(yaml_path.parent, base)
            for entry in str(conf[kind_folder]).split("\n"):
                if entry.strip():
                    roots.append(Path(os.path.normpath(os.path.join(base or yaml_path.parent, entry.strip()))))
    return list(dict.fromkeys(r.resolve() for r in roots))


def scan(models_dir: Path, yaml_path: Path | None) -> dict[str, list[Found]]:
    """``{folder name: [Found]}`` for the three folders, every file classified by its header (so a file in
    the wrong folder is found too, under the folder it sits in)."""
    return {folder: [f for root in model_roots(folder, models_dir, yaml_path) for f in scan_root(root)]
            for folder in FOLDERS.values()}
