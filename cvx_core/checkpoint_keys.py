"""CogVideoX transformer checkpoints: reading safetensors files and sharded sets, and the
diffusers -> ComfyUI-native key rename (DESIGN.md §2). Host-free: torch, safetensors, json.

The rename is pure (identical shapes), so a diffusers checkpoint becomes one the host's own
detection and loader accept unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from .paths import is_plain_file_name

NATIVE_PROBE = "blocks.0.norm1.linear.weight"
DIFFUSERS_PROBE = "transformer_blocks.0.norm1.linear.weight"
# Full ComfyUI checkpoints nest the transformer under the first, diffusers pipeline dumps under the second.
PREFIXES = ("model.diffusion_model.", "transformer.")

# Anchored at the start of a key.
_LEADING_RULES = (
    ("transformer_blocks.", "blocks."),
    ("time_embedding.linear_", "time_embedding_linear_"),
    ("ofs_embedding.linear_", "ofs_embedding_linear_"),
)
# Anywhere inside a key (block sub-modules).
_INNER_RULES = (
    (".attn1.to_q.", ".q."),
    (".attn1.to_k.", ".k."),
    (".attn1.to_v.", ".v."),
    (".attn1.to_out.0.", ".attn_out."),
    (".attn1.norm_q.", ".norm_q."),
    (".attn1.norm_k.", ".norm_k."),
    (".ff.net.0.proj.", ".ff_proj."),
    (".ff.net.2.", ".ff_out."),
)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Pickle-based formats: loading them can run arbitrary code, so they are refused, never opened.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
SHARD_RE = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")

Layout = Literal["native", "diffusers", "unknown"]


class CheckpointError(ValueError):
    """A user-facing checkpoint problem: says what was given and what to do."""


def _prefix_and_layout(keys: Iterable[str]) -> tuple[str, Layout]:
    keys = set(keys)
    for prefix in ("", *PREFIXES):
        if prefix + NATIVE_PROBE in keys:
            return prefix, "native"
        if prefix + DIFFUSERS_PROBE in keys:
            return prefix, "diffusers"
    return "", "unknown"


def detect_layout(keys: Iterable[str]) -> Layout:
    """``"native"`` (ComfyUI names), ``"diffusers"``, or ``"unknown"`` (not a CogVideoX transformer).

    Keys may carry one of :data:`PREFIXES`.
    """
    return _prefix_and_layout(keys)[1]


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's own tensors: a known prefix removed, tensors outside it (VAE, text encoder) dropped."""
    prefix, _ = _prefix_and_layout(state_dict)
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def diffusers_key_to_native(key: str) -> str:
    """One diffusers key -> its ComfyUI-native name (native keys come back unchanged)."""
    for old, new in _LEADING_RULES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in _INNER_RULES:
        key = key.replace(old, new)
    return key


def diffusers_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout CogVideoX state dict (optionally prefixed) in ComfyUI-native names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_prefix(state_dict).items():
        new = diffusers_key_to_native(key)
        if new in out:
            raise CheckpointError(f"the checkpoint mixes layouts: both {key!r} and another key map to {new!r}; "
                                  f"use a file that is entirely in diffusers or entirely in ComfyUI layout")
        out[new] = value
    return out


def read_checkpoint(path: str | Path, return_metadata: bool = False
                    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Read a CogVideoX transformer as one state dict (keys as stored, not renamed).

    ``path`` is a ``.safetensors`` file, a sharded set's ``*.safetensors.index.json`` (or one of its
    shards), or a folder holding either (a diffusers ``save_pretrained`` folder). With
    ``return_metadata``, also returns the safetensors header metadata of a single file (the host reads
    quantisation settings from it); ``None`` for sharded sets. Raises :class:`CheckpointError` with a
    message meant for the user; pickle formats are refused without being opened.
    """
    p = Path(path)
    if p.is_dir():
        p = _transformer_in_folder(p)
    elif not p.exists():
        raise CheckpointError(f"model file not found: {p}; put the CogVideoX transformer (.safetensors file or "
                              f"diffusers folder) under models/diffusion_models and pick it again")
    name = p.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{p.name} is a pickle-based checkpoint ({p.suffix}), which is never opened because "
                              f"it can run code; convert it to safetensors (e.g. safetensors.torch.save_file) "
                              f"and load the .safetensors file")
    metadata: dict[str, str] | None = None
    if name.endswith(INDEX_SUFFIX):
        sd = _read_index(p)
    elif not name.endswith(SAFETENSORS_SUFFIXES):
        raise CheckpointError(f"{p.name} is not a safetensors file; expected a .safetensors file, a "
                              f"*{INDEX_SUFFIX} with its shards, or a folder holding them")
    elif (index := _index_of_shard(p)) is not None:
        sd = _read_index(index)
    else:
        sd, metadata = read_safetensors(p)
    _check_cogvideox(sd, p)
    return (sd, metadata) if return_metadata else sd


def is_transformer_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a diffusers transformer (single file or index json) that is not another
    diffusers class (a pipeline's ``vae/`` or ``text_encoder/`` folder, by its ``config.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    has_weights = (folder / SINGLE_DIFFUSERS_FILE).is_file() or any(folder.glob("*" + INDEX_SUFFIX))
    if not has_weights:
        return False
    config = folder / "config.json"
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        cls = None
    return cls is None or "Transformer" in cls


def _transformer_in_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise CheckpointError(f"folder {folder} holds several index files ({', '.join(i.name for i in indexes)}); "
                              f"keep one sharded set per folder or pick the index file itself")
    if indexes:
        return indexes[0]
    if (folder / SINGLE_DIFFUSERS_FILE).is_file():
        return folder / SINGLE_DIFFUSERS_FILE
    raise CheckpointError(f"folder {folder} holds no transformer weights; expected {SINGLE_DIFFUSERS_FILE} or a "
                          f"*{INDEX_SUFFIX} with its shards (for a diffusers pipeline, pick its transformer/ folder)")


def _index_of_shard(path: Path) -> Path | None:
    """The index json of a sharded set ``path`` belongs to, so a lone shard is never loaded as a whole model."""
    m = SHARD_RE.match(path.name)
    if m is None:
        return None
    index = path.with_name(m.group("stem") + INDEX_SUFFIX)
    return index if index.is_file() else None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path.name}: not a valid safetensors file ({e}); the file is truncated "
                              f"or corrupt (an interrupted download?) or another format renamed to .safetensors; "
                              f"download or convert it again") from e


def _read_index(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty or not a mapping")
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map values must be shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the shard index {index.name}: {e!r}; expected diffusers' index json "
                              f"with a non-empty \"weight_map\"; download it again") from e
    shards = sorted(set(weight_map.values()))
    # Shard names come from a file a stranger may have written: plain names in the index's folder only.
    bad = [s for s in shards if not is_plain_file_name(s)]
    if bad:
        raise CheckpointError(f"the shard index {index.name} names shards outside its folder ({bad[:3]}); "
                              f"an index may only name files beside it")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"the shard index {index.name} names {len(missing)} shard(s) missing from "
                              f"{index.parent}: {', '.join(missing)}; download the missing shard(s) again")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(read_safetensors(index.parent / shard)[0])
    absent = [k for k in weight_map if k not in sd]
    if absent:
        raise CheckpointError(f"the shards of {index.name} lack {len(absent)} tensor(s) the index lists (e.g. "
                              f"{absent[0]!r} in {weight_map[absent[0]]}); a shard is incomplete or from another "
                              f"download; download the set again")
    return sd


def _check_cogvideox(sd: dict[str, torch.Tensor], path: Path) -> None:
    if detect_layout(sd) != "unknown":
        return
    if not sd:
        raise CheckpointError(f"{path.name} holds no tensors; expected a CogVideoX transformer")
    found = ", ".join(sorted(sd)[:3])
    hint = "; it looks like a LoRA: load it with a LoRA node" if any("lora" in k.lower() for k in sd) else ""
    raise CheckpointError(f"{path.name} is not a CogVideoX transformer: found keys like {found}; expected keys "
                          f"like {NATIVE_PROBE} or {DIFFUSERS_PROBE}{hint}")
