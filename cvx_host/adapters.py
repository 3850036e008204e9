"""CustomVideoX adapters (LoRA) on a host MODEL: reference-branch (only the reference tokens' projections,
through :mod:`.cogvideox_block` on CogVideoX, :mod:`.wan_adapters` on Wan) or global (a plain weight patch
through the host's own LoRA path). What differs per backbone family is one :class:`AdapterFamily`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.lora
import folder_paths
import torch

from ..cvx_core.lora import (
    COGVIDEOX_TARGET_MODULES,
    TARGETS,
    WAN_REFERENCE_MODULES,
    WAN_TARGET_MODULES,
    ReferenceLora,
)
from ..cvx_core.lora_keys import (
    COGVIDEOX,
    WAN,
    KeyReport,
    KeyScheme,
    LoraKeyError,
    parse_lora,
    read_lora_file,
    select,
)
from ..cvx_core.paths import is_relative_name
from . import options, wan_adapters
from .backbone import backbone_for
from .cogvideox_block import block_class

log = logging.getLogger("customvideox")

FOLDER = "loras"
MODES = ("reference_only", "global")
NODE = "CustomVideoXAdapterLoader"


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


def _install_cogvideox(m, lora: ReferenceLora) -> None:
    n_blocks = len(m.get_model_object("diffusion_model").blocks)
    for i in range(n_blocks):
        if f"diffusion_model.blocks.{i}.forward" in m.object_patches:
            log.warning("CustomVideoX: another node patches diffusion_model.blocks.%d.forward; its forward runs "
                        "instead of the reference-branch adapter's for that block", i)
        m.add_object_patch(f"diffusion_model.blocks.{i}.__class__", block_class(i))


@dataclass(frozen=True)
class AdapterFamily:
    """What reference-branch adapters need to know about one backbone family."""

    scheme: KeyScheme  # the LoRA files' module names
    reference_modules: tuple[str, ...]  # block sub-modules a reference-branch adapter may act on
    target_modules: dict[str, str]  # the trainer's targets (cvx_core.lora.TARGETS) -> block sub-modules
    install: Callable[[object, ReferenceLora], None]  # patch a clone so the adapters act on reference rows


ADAPTER_FAMILIES = {
    "CogVideoX": AdapterFamily(COGVIDEOX, TARGETS, COGVIDEOX_TARGET_MODULES, _install_cogvideox),
    "Wan": AdapterFamily(WAN, WAN_REFERENCE_MODULES, WAN_TARGET_MODULES, wan_adapters.install),
}


def adapter_family(model, node: str = NODE) -> AdapterFamily:
    """The model's family, or a clear error naming ``node`` (a family or variant the pack does not handle)."""
    backbone = type(backbone_for(model, node)).for_model(model, node)
    return ADAPTER_FAMILIES[backbone.family]


def apply_reference_adapter(model, lora: ReferenceLora, strength: float):
    """A clone of ``model`` whose blocks add ``lora`` on reference tokens (``model`` is not changed)."""
    family = adapter_family(model)
    m = model.clone()
    to = options.model_options(m)
    to[options.ADAPTERS_KEY] = [*options.adapters(to), AdapterUse(lora, strength)]
    family.install(m, lora)
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
    family = adapter_family(model)
    sd, metadata, config = read_lora_file(path)
    shapes = module_shapes(model)
    parsed = parse_lora(sd, metadata, config, name=os.path.basename(path), known_modules=set(shapes),
                        scheme=family.scheme)
    if mode == "reference_only":
        def allowed(module: str) -> str | None:
            parts = module.split(".", 2)
            if len(parts) == 3 and parts[0] == "blocks" and parts[2] in family.reference_modules:
                return None
            return (f"{module} is not a block projection of the reference tokens "
                    f"({', '.join(family.reference_modules)}): reference_only mode cannot use it")
    else:
        def allowed(module: str) -> str | None:
            return None
    lora, report = select(parsed, shapes, allowed, family.scheme)
    if mode == "reference_only":
        return apply_reference_adapter(model, lora, strength), report
    return apply_global_adapter(model, lora, strength), report


def log_report(report: KeyReport) -> None:
    log.info("CustomVideoX adapter: %s", report.text(limit=1000))
    if report.unused:
        log.warning("CustomVideoX adapter %s: %d key(s) NOT used (see the node's report output)", report.name,
                    len(report.unused))

