"""CustomVideoXAdapterLoader: a CustomVideoX adapter (LoRA) from models/loras in any common key layout."""

from __future__ import annotations

import logging
import os
import re

import folder_paths
from comfy_api.latest import io

from ..cvx_core.lora import TARGETS
from ..cvx_core.lora_keys import KeyReport, LoraKeyError, parse_lora, read_lora_file, select
from .apply import check_cogvideox_t2v
from .reference_block import apply_global_adapter, apply_reference_adapter, module_shapes
from .types import CATEGORY

log = logging.getLogger("customvideox")

FOLDER = "loras"
MODES = ("reference_only", "global")


def resolve_lora_path(lora_name: str) -> str:
    """The file ``lora_name`` names under the loras roots; no absolute paths, no ``..``."""
    parts = re.split(r"[/\\]", lora_name)
    if (not lora_name or "\x00" in lora_name or ".." in parts or os.path.isabs(lora_name)
            or re.match(r"^[A-Za-z]:", lora_name)):
        raise LoraKeyError(f"lora_name {lora_name!r} is not allowed: it must be a path relative to models/{FOLDER} "
                           f"(as listed), without '..' or a drive/absolute path")
    path = folder_paths.get_full_path(FOLDER, lora_name)
    if path is None:
        raise LoraKeyError(f"lora_name {lora_name!r} was not found under any models/{FOLDER} folder; put the file "
                           f"there and refresh the node list")
    return path


def load_adapter(model, path: str, strength: float, mode: str):
    """``(patched clone, KeyReport)``; raises :class:`LoraKeyError` (the input model is never changed)."""
    if mode not in MODES:
        raise LoraKeyError(f"mode {mode!r} is not one of {list(MODES)}")
    sd, metadata, config = read_lora_file(path)
    shapes = module_shapes(model)
    parsed = parse_lora(sd, metadata, config, name=os.path.basename(path), known_modules=set(shapes))
    if mode == "reference_only":
        def allowed(module: str) -> str | None:
            parts = module.split(".")
            if len(parts) == 3 and parts[0] == "blocks" and parts[2] in TARGETS:
                return None
            return f"{module} is not a block projection ({', '.join(TARGETS)}): reference_only mode cannot use it"
    else:
        def allowed(module: str) -> str | None:
            return None
    lora, report = select(parsed, shapes, allowed)
    if mode == "reference_only":
        return apply_reference_adapter(model, lora, strength), report
    return apply_global_adapter(model, lora, strength), report


def _log_report(report: KeyReport) -> None:
    log.info("CustomVideoX adapter: %s", report.text(limit=1000))
    if report.unused:
        log.warning("CustomVideoX adapter %s: %d key(s) NOT used (see the node's report output)", report.name,
                    len(report.unused))


class CustomVideoXAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomVideoXAdapterLoader",
            display_name="CustomVideoX Load Adapter",
            category=CATEGORY,
            description="Loads a CustomVideoX adapter (LoRA) from models/loras in diffusers/PEFT, kohya or "
                        "ComfyUI key layout. reference_only: the LoRA acts on the reference tokens only, so "
                        "without a reference the model is exactly the base model. Works before or after "
                        "CustomVideoXApply and the core LoRA loaders.",
            inputs=[
                io.Model.Input("model", tooltip="A CogVideoX MODEL (before or after CustomVideoXApply)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors LoRA under models/loras. PEFT files take alpha from "
                                       "adapter_config.json beside them or from their metadata."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Multiplies the LoRA's update (0 = off)."),
                io.Combo.Input("mode", options=list(MODES), default="reference_only",
                               tooltip="reference_only: applied to the reference tokens' projections only (how "
                                       "CustomVideoX adapters are trained). global: a plain weight patch on every "
                                       "token, like the core LoRA loaders (for ordinary LoRAs)."),
            ],
            outputs=[io.Model.Output(display_name="model"),
                     io.String.Output(display_name="report", tooltip="Which keys were used and which were not.")],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float = 1.0, mode: str = "reference_only") -> io.NodeOutput:
        check_cogvideox_t2v(model, node="CustomVideoXAdapterLoader")
        try:
            patched, report = load_adapter(model, resolve_lora_path(lora_name), strength, mode)
        except (LoraKeyError, ValueError) as e:
            raise LoraKeyError(f"CustomVideoXAdapterLoader (lora_name={lora_name!r}): {e}") from e
        _log_report(report)
        return io.NodeOutput(patched, report.text())
