"""CustomVideoX adapters (LoRA) on a host MODEL: reference-branch (only the reference tokens' projections,
through :mod:`.cogvideox_block`) or global (a plain weight patch through the host's own LoRA path)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.lora
import folder_paths
import torch

from ..cvx_core.lora import TARGETS, ReferenceLora
from ..cvx_core.lora_keys import KeyReport, LoraKeyError, parse_lora, read_lora_file, select
from ..cvx_core.paths import is_relative_name
from . import options
from .cogvideox_block import block_class

log = logging.getLogger("customvideox")

FOLDER = "loras"
MODES = ("reference_only", "global")


@dataclass(frozen=True, eq=False)
class AdapterUse:
    """One CustomVideoXAdapterLoader in reference_only mode: the adapter and its strength."""

    lora: ReferenceLora
    strength: float


def module_shapes(model) -> dict[str, tuple[int, ...]]:
    """Native module path -> weight shape for every linear layer of the model's DiT."""
    dm = model.get_model_object("diffusion_model")
    return {name: tuple(m.weight.shape) for name, m in dm.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2}


def apply_reference_adapter(model, lora: ReferenceLora, strength: float):
    """A clone of ``model`` whose blocks add ``lora`` on reference tokens (``model`` is not changed)."""
    m = model.clone()
    to = options.model_options(m)
    to[options.ADAPTERS_KEY] = [*options.adapters(to), AdapterUse(lora, strength)]
    n_blocks = len(m.get_model_object("diffusion_model").blocks)
    for i in range(n_blocks):
        if f"diffusion_model.blocks.{i}.forward" in m.object_patches:
            log.warning("CustomVideoX: another node patches diffusion_model.blocks.%d.forward; its forward runs "
                        "instead of the reference-branch adapter's for that block", i)
        m.add_object_patch(f"diffusion_model.blocks.{i}.__class__", block_class(i))
    return m


def apply_global_adapter(model, lora: ReferenceLora, strength: float):
    """A clone with ``lora`` as a plain weight patch through the host's own LoRA path (``add_patches``),
    exactly as the host's LoraLoaderModelOnly would apply the same file in native names."""
    m = model.clone()
    key_map = comfy.lora.model_lora_keys_unet(m.model, {})
    patches = comfy.lora.load_lora(lora.state_dict(), key_map, log_missing=False)
    applied = m.add_patches(patches, strength)
    if len(applied) != len(lora.pairs):
        missing = sorted(set(patches) - set(applied))[:3]
        raise ValueError(f"CustomVideoX: the host did not accept {len(lora.pairs) - len(applied)} of the "
                         f"adapter's weight patches (e.g. {missing})")
    return m


def resolve_lora_path(lora_name: str) -> str:
    """The file ``lora_name`` names under the loras roots; no absolute paths, no ``..``."""
    if not is_relative_name(lora_name):
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


def log_report(report: KeyReport) -> None:
    log.info("CustomVideoX adapter: %s", report.text(limit=1000))
    if report.unused:
        log.warning("CustomVideoX adapter %s: %d key(s) NOT used (see the node's report output)", report.name,
                    len(report.unused))

