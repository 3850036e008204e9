"""CustomVideoXModelLoader: a CogVideoX transformer in ComfyUI or diffusers layout -> the host's native MODEL.

The weights go through the host's own ``comfy.sd.load_diffusion_model_state_dict`` (detection, dtype,
memory management), so the MODEL is exactly what ``UNETLoader`` would give for a native file; the only
addition is the optional exact-RoPE object patch (DESIGN.md §2), on the training grid a diffusers folder's
``config.json`` states (the host's detection reads only the weights).
"""

from __future__ import annotations

import json
import os
from typing import Any

import comfy.sd
import folder_paths
import torch
from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel
from comfy_api.latest import io

from ..cvx_core.checkpoint_keys import (
    CheckpointError,
    detect_layout,
    diffusers_to_native,
    is_transformer_folder,
    read_checkpoint,
    strip_prefix,
)
from ..cvx_core.paths import is_relative_name
from ..cvx_core.rope import SPATIAL_MODES
from ..cvx_host.cogvideox import install_rotary
from .types import CATEGORY

FOLDER = "diffusion_models"
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}


def list_models() -> list[str]:
    """Files under the diffusion_models roots plus folders holding a diffusers transformer (listed with a
    trailing separator; the files inside them are hidden, they load as the folder)."""
    files = folder_paths.get_filename_list(FOLDER)
    roots = folder_paths.get_folder_paths(FOLDER)
    folders = {d for d in {os.path.dirname(f) for f in files}
               if d and any(is_transformer_folder(os.path.join(r, d)) for r in roots)}
    loose = [f for f in files if os.path.dirname(f) not in folders]
    return sorted(d + os.sep for d in folders) + loose


def resolve_model_path(model_name: str) -> str:
    """The file or folder ``model_name`` names under the diffusion_models roots.

    Only names relative to a root are accepted: no absolute paths, no ``..``. Symlinks inside a root
    are followed, as the host's own loaders do (models are often linked in from other disks).
    """
    name = model_name.rstrip("/\\")
    if not is_relative_name(name):
        raise CheckpointError(f"model_name {model_name!r} is not allowed: it must be a path relative to "
                              f"models/{FOLDER} (as listed), without '..' or a drive/absolute path")
    for root in folder_paths.get_folder_paths(FOLDER):
        root = os.path.abspath(root)
        path = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:  # belt and braces after the checks above
            continue
        if os.path.isfile(path) or os.path.isdir(path):
            return path
    raise CheckpointError(f"model_name {model_name!r} was not found under any models/{FOLDER} folder "
                          f"({', '.join(folder_paths.get_folder_paths(FOLDER))}); put the file or diffusers "
                          f"folder there and refresh the node list")


def folder_config(path: str) -> dict[str, Any] | None:
    """The ``config.json`` of the diffusers transformer folder ``path`` is (or whose file it is); None for
    a loose file. Only a folder that holds a diffusers transformer counts, so a stray config.json beside
    single files under a models root is never read."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not (os.path.isfile(config) and is_transformer_folder(folder)):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config}: {e}; fix or remove the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} is not a JSON object; fix or remove the file")
    return data


def training_grid(config: dict[str, Any] | None, dm: CogVideoXTransformer3DModel, name: str
                  ) -> tuple[int, int] | None:
    """The model's training grid in tokens from its config (``sample_height/width // patch_size``), after
    checking that the config describes the weights the host built; None without a config."""
    if config is None:
        return None
    built = {"patch_size": dm.patch_size, "patch_size_t": dm.patch_size_t,
             "attention_head_dim": dm.attention_head_dim,
             "use_rotary_positional_embeddings": dm.use_rotary_positional_embeddings}
    wrong = {k: (config[k], v) for k, v in built.items() if k in config and config[k] != v}
    if wrong:
        found = ", ".join(f"{k}={c!r} (the host built {v!r})" for k, (c, v) in wrong.items())
        raise CheckpointError(f"{name}: its config.json says {found}; the host's CogVideoX detection cannot build "
                              f"this model from its weights, so it would run wrongly")
    try:
        return int(config.get("sample_height", 60)) // dm.patch_size, int(config.get("sample_width", 90)) // dm.patch_size
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: config.json sample_height/sample_width are not numbers ({e})") from e


def load_cogvideox(path: str, model_options: dict[str, Any] | None = None, disable_dynamic: bool = False):
    """The host's ModelPatcher for the CogVideoX transformer at ``path`` (file, index json or folder),
    with the host's own RoPE positions.

    Also registered as the patcher's ``cached_patcher_init`` factory, so the host can reload it (for a
    non-dynamic delegate or a multi-GPU deep clone) exactly as it does for UNETLoader models.
    """
    model_options = dict(model_options or {})
    sd, metadata = read_checkpoint(path, return_metadata=True)
    sd = diffusers_to_native(sd) if detect_layout(sd) == "diffusers" else strip_prefix(sd)
    keys = set(sd)  # the host pops tensors out of sd while loading
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata,
                                                     disable_dynamic=disable_dynamic)
    if model is None:
        raise CheckpointError(f"the host could not detect the model type of {os.path.basename(path)}; expected a "
                              f"CogVideoX transformer")
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, CogVideoXTransformer3DModel):
        raise CheckpointError(f"{os.path.basename(path)} was detected as {type(model.model).__name__} "
                              f"({type(dm).__name__}), not CogVideoX; pick a CogVideoX transformer")
    # The host loads non-strictly: a file missing tensors would silently leave weights uninitialised.
    missing = sorted(k for k in dm.state_dict() if k.endswith((".weight", ".bias")) and k not in keys)
    if missing:
        raise CheckpointError(f"{os.path.basename(path)} is incomplete: {len(missing)} weight(s) of the detected "
                              f"CogVideoX are missing (e.g. {', '.join(missing[:3])}); the file is truncated or "
                              f"only part of a sharded set; download it again or pick the whole folder")
    model.cached_patcher_init = (load_cogvideox, (path, model_options))
    return model


class CustomVideoXModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXModelLoader",
            display_name="CustomVideoX Load CogVideoX Model",
            category=CATEGORY,
            description="Loads a CogVideoX transformer from models/diffusion_models, in ComfyUI layout or "
                        "diffusers layout (one file, or a folder with shards and an index json), as the host's "
                        "native MODEL: it works with the core samplers, LoRA loaders and other patches.",
            inputs=[
                io.Combo.Input("model_name", options=list_models(),
                               tooltip="A CogVideoX transformer under models/diffusion_models: a .safetensors "
                                       "file (ComfyUI or diffusers key names) or a diffusers folder (listed "
                                       "with a trailing path separator) holding diffusion_pytorch_model"
                                       ".safetensors or shards with their *.safetensors.index.json. Pickle "
                                       "files (.ckpt/.pt/.bin) are refused: convert them to safetensors."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Weight dtype. default: the host's choice for this device (as UNETLoader); "
                                       "bf16 / fp16: cast on load; fp8_e4m3fn: store weights in fp8 to halve "
                                       "memory (computed in a higher precision, slightly lower quality)."),
                io.Combo.Input("rope", options=list(SPATIAL_MODES), default="exact",
                               tooltip="Spatial RoPE positions. exact: as the original CogVideoX and diffusers "
                                       "(integer positions at the model's training grid, stretched into it at "
                                       "other sizes; the grid is 480x720, or the sample size a diffusers "
                                       "folder's config.json states). host: ComfyUI's own positions, which for CogVideoX "
                                       "1.0 are multiplied by 1.875 (spatial_interpolation_scale) and so differ "
                                       "from the model's training; the MODEL then equals UNETLoader's exactly. "
                                       "CogVideoX 1.5 uses integer positions in both modes."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str = "default", rope: str = "exact") -> io.NodeOutput:
        where = f"CustomVideoXModelLoader (model_name={model_name!r})"
        if weight_dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: weight_dtype {weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}")
        if rope not in SPATIAL_MODES:
            raise CheckpointError(f"{where}: rope {rope!r} is not one of {list(SPATIAL_MODES)}")
        dtype = WEIGHT_DTYPES[weight_dtype]
        model_options = {} if dtype is None else {"dtype": dtype}
        try:
            path = resolve_model_path(model_name)
            model = load_cogvideox(path, model_options)
            grid = training_grid(folder_config(path), model.get_model_object("diffusion_model"),
                                 os.path.basename(path.rstrip("/\\")))
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        if rope == "exact":
            model = install_rotary(model, "exact", grid)
        return io.NodeOutput(model)
