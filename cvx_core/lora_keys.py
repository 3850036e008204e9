"""LoRA files in the key layouts found in the wild -> one :class:`~cvx_core.lora.ReferenceLora` in native names.

Accepted (DESIGN.md §2):

* diffusers / PEFT: ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B``; alpha from
  ``adapter_config.json`` beside the file or from the safetensors metadata (``lora_adapter_metadata``,
  as diffusers writes it), ``alpha_pattern`` / ``rank_pattern`` / ``use_rslora`` honoured;
* kohya: ``lora_unet_blocks_N_q.lora_down.weight`` / ``lora_up`` + ``.alpha`` (native or diffusers module
  names, ``lora_unet_`` or ``lora_transformer_`` prefix);
* ComfyUI-native: ``diffusion_model.blocks.N.q.lora_down.weight`` (or ``lora_A``/``lora_B``) + ``.alpha``.

Module names are per backbone family (:class:`KeyScheme`): CogVideoX's go through the one diffusers -> native
rename (:mod:`cvx_core.checkpoint_keys`); Wan's diffusers names (``blocks.N.attn1.to_q``, ``attn2``, ``ffn.net.0.proj``)
map onto the host's (``blocks.N.self_attn.q``, ``cross_attn``, ``ffn.0``), and kohya/musubi-tuner files
(``lora_unet_blocks_N_self_attn_q``) resolve against the model's own module names. ``alpha / rank``
is folded into each pair's scale; with no alpha anywhere the scale is 1 (the host's convention). Every
file key ends up either used or listed as unused with a reason: nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_keys import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, diffusers_key_to_native, read_safetensors
from .lora import AdapterMeta, LoraPair, ReferenceLora, describe

PEFT_CONFIG_NAME = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PAIR_RE = re.compile(r"^(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_SUFFIX = ".alpha"
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_KOHYA_BLOCK_RE = re.compile(r"^(?:transformer_)?blocks_(\d+)_(.+)$")
# Block sub-modules in diffusers names; their native names come from the rename in checkpoint_keys.
_DIFFUSERS_BLOCK_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                            "ff.net.2", "norm1.linear", "norm2.linear")
EXPECTED_EXAMPLES = ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
                     "lora_unet_blocks_0_q.lora_down.weight",
                     "diffusion_model.blocks.0.q.lora_up.weight")


class LoraKeyError(ValueError):
    """A user-facing LoRA file problem: says what was found and what is expected."""


def _native_block_sub(diffusers_sub: str) -> str:
    return diffusers_key_to_native(f"transformer_blocks.0.{diffusers_sub}.weight")[len("blocks.0."):-len(".weight")]


def _kohya_subs(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """kohya's underscored block sub-module name (diffusers or native) -> native sub-module path."""
    return {name.replace(".", "_"): nat for dif, nat in pairs for name in (dif, nat)}


@dataclass(frozen=True)
class KeyScheme:
    """How one backbone family's LoRA module names map onto the host's native names."""

    family: str
    to_native: Callable[[str], str]  # a module path (prefix stripped), diffusers or native -> native
    kohya_subs: dict[str, str]  # kohya block sub-module (underscored) -> native block sub-module
    examples: tuple[str, ...]  # file keys to quote in errors

    @property
    def block_subs(self) -> frozenset[str]:
        return frozenset(self.kohya_subs.values())


COGVIDEOX = KeyScheme(
    family="CogVideoX",
    to_native=lambda module: diffusers_key_to_native(module + ".weight")[:-len(".weight")],
    kohya_subs=_kohya_subs([(sub, _native_block_sub(sub)) for sub in _DIFFUSERS_BLOCK_MODULES]),
    examples=EXPECTED_EXAMPLES)

# Wan, diffusers (WanTransformer3DModel) -> the host's comfy.ldm.wan names; a pure rename, same shapes.
_WAN_BLOCK_SUBS = [(f"attn{i}.to_{p}", f"{attn}.{p}") for i, attn in ((1, "self_attn"), (2, "cross_attn"))
                   for p in "qkv"] + [("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
                                      ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")]
_WAN_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
            "condition_embedder.time_embedder.linear_2": "time_embedding.2",
            "condition_embedder.text_embedder.linear_1": "text_embedding.0",
            "condition_embedder.text_embedder.linear_2": "text_embedding.2",
            "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}
_WAN_SUB_TO_NATIVE = dict(_WAN_BLOCK_SUBS)
_NATIVE_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _wan_to_native(module: str) -> str:
    m = _NATIVE_BLOCK_RE.match(module)
    if m:
        sub = _WAN_SUB_TO_NATIVE.get(m.group(2), m.group(2))
        return f"blocks.{m.group(1)}.{sub}"
    return _WAN_TOP.get(module, module)


WAN = KeyScheme(family="Wan", to_native=_wan_to_native, kohya_subs=_kohya_subs(_WAN_BLOCK_SUBS),
                examples=("transformer.blocks.0.attn1.to_q.lora_A.weight",
                          "lora_unet_blocks_0_self_attn_q.lora_down.weight",
                          "diffusion_model.blocks.0.self_attn.q.lora_up.weight"))
SCHEMES = (COGVIDEOX, WAN)


@dataclass
class ParsedLora:
    """A file's LoRA pairs in native module names, before they are matched against a model."""

    pairs: dict[str, LoraPair]
    sources: dict[str, list[str]]  # native module -> the file keys it was built from
    unused: dict[str, str]  # file key -> why it was not used
    layouts: set[str]
    alpha_source: str
    meta: AdapterMeta | None
    name: str = "LoRA file"


@dataclass
class KeyReport:
    """Which file keys an application used and which it did not (with the reason)."""

    name: str
    layouts: list[str]
    alpha_source: str
    used: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    modules: int = 0
    meta: str = ""

    def text(self, limit: int = 20) -> str:
        lines = [f"{self.name}: layout {', '.join(self.layouts) or '?'}; alpha from {self.alpha_source}; "
                 f"{len(self.used)} key(s) used on {self.modules} module(s), {len(self.unused)} not used",
                 f"metadata: {self.meta}"]
        if self.unused:
            lines.append("not used:")
            items = sorted(self.unused.items())
            lines += [f"  {k}: {why}" for k, why in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, dict | None]:
    """``(tensors, safetensors metadata, PEFT config)`` of a LoRA file. The PEFT config is
    ``adapter_config.json`` beside the file (PEFT's ``save_pretrained`` layout), if there is one."""
    p = Path(path)
    if p.name.lower().endswith(PICKLE_SUFFIXES):
        raise LoraKeyError(f"{p.name} is a pickle-based file ({p.suffix}), which is never opened because it can "
                           f"run code; convert it to safetensors and load that")
    if not p.name.lower().endswith(SAFETENSORS_SUFFIXES):
        raise LoraKeyError(f"{p.name} is not a .safetensors file")
    if not p.is_file():
        raise LoraKeyError(f"LoRA file not found: {p}")
    sd, metadata = read_safetensors(p)
    config = None
    cfg_path = p.parent / PEFT_CONFIG_NAME
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraKeyError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from e
    return sd, metadata, config


def _peft_config_from_metadata(metadata: dict[str, str] | None) -> dict | None:
    raw = (metadata or {}).get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    # diffusers' pipeline-level save prefixes each field with the component ("transformer.r").
    return {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in cfg.items()}


def _pattern_value(patterns: dict, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_to_native(module: str, known: set[str] | None = None, scheme: KeyScheme = COGVIDEOX
                     ) -> tuple[str | None, str]:
    """``(native module path or None, layout name)`` for a LoRA module name as stored in a file."""
    for prefix in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            m = _KOHYA_BLOCK_RE.match(rest)
            if m and m.group(2) in scheme.kohya_subs:
                return f"blocks.{m.group(1)}.{scheme.kohya_subs[m.group(2)]}", "kohya"
            if known:
                by_kohya = {k.replace(".", "_"): k for k in known}
                return by_kohya.get(rest), "kohya"
            return None, "kohya"
    name = module
    stripped = True
    while stripped:
        stripped = False
        for prefix in _DOTTED_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    native = scheme.to_native(name)
    return native, ("diffusers/PEFT" if native != name else "ComfyUI-native")


def parse_lora(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, peft_config: dict | None = None,
               name: str = "LoRA file", known_modules: set[str] | None = None,
               scheme: KeyScheme = COGVIDEOX) -> ParsedLora:
    """Group ``sd``'s tensors into native-named LoRA pairs with folded ``alpha / rank``.

    ``peft_config`` (an ``adapter_config.json``) wins over the metadata's PEFT config; an ``.alpha``
    tensor wins over both for its module. ``known_modules`` (the model's native module paths) lets
    kohya names outside the blocks resolve too; ``scheme``: the model's family names.
    """
    config = peft_config or _peft_config_from_metadata(metadata)
    groups: dict[str, dict[str, str]] = {}
    unused: dict[str, str] = {}
    for key in sd:
        m = _PAIR_RE.match(key)
        if m:
            groups.setdefault(m.group("mod"), {})[m.group("kind")] = key
        elif key.endswith(_ALPHA_SUFFIX):
            groups.setdefault(key[:-len(_ALPHA_SUFFIX)], {})["alpha"] = key
        else:
            unused[key] = "not a LoRA down/up/alpha tensor (DoRA, LoHa, full diffs and biases are not supported)"

    pairs: dict[str, LoraPair] = {}
    sources: dict[str, list[str]] = {}
    layouts: set[str] = set()
    alpha_sources: set[str] = set()
    for module, parts in sorted(groups.items()):
        keys = sorted(parts.values())
        down_key = parts.get("lora_A") or parts.get("lora_down")
        up_key = parts.get("lora_B") or parts.get("lora_up")
        if down_key is None or up_key is None:
            for k in keys:
                unused[k] = "incomplete pair (needs both down/lora_A and up/lora_B)"
            continue
        native, layout = module_to_native(module, known_modules, scheme)
        if native is None:
            for k in keys:
                unused[k] = f"module {module!r} is not a {scheme.family} module"
            continue
        down, up = sd[down_key], sd[up_key]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            for k in keys:
                unused[k] = f"not a linear LoRA pair (down {tuple(down.shape)}, up {tuple(up.shape)})"
            continue
        if native in pairs:
            for k in keys:
                unused[k] = f"a second LoRA for {native} (already from {sources[native][0]})"
            continue
        rank = down.shape[0]
        rslora = False
        if "alpha" in parts:
            alpha, source = float(sd[parts["alpha"]].item()), ".alpha tensors"
        elif config is not None and "lora_alpha" in config:
            peft_name = module
            for prefix in _DOTTED_PREFIXES:
                peft_name = peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name
            alpha = float(_pattern_value(config.get("alpha_pattern"), peft_name, config["lora_alpha"]))
            rslora = bool(config.get("use_rslora"))
            source = "PEFT config" + (" (rsLoRA)" if rslora else "")
        else:
            alpha, source = None, "nowhere (scale 1, as the host does)"
        scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
        pairs[native] = LoraPair(down=down.float(), up=up.float(), scale=scale)
        sources[native] = keys
        layouts.add(layout)
        alpha_sources.add(source)
    return ParsedLora(pairs=pairs, sources=sources, unused=unused, layouts=layouts,
                      alpha_source=", ".join(sorted(alpha_sources)) or "-", meta=AdapterMeta.from_metadata(metadata),
                      name=name)


def other_family(modules: list[str], scheme: KeyScheme) -> str | None:
    """The family whose block sub-modules (and not ``scheme``'s) the LoRA's native module names use, if any."""
    subs = {m.group(2) for name in modules if (m := _NATIVE_BLOCK_RE.match(name))}
    for other in SCHEMES:
        if other is not scheme and subs and subs <= other.block_subs and not subs & scheme.block_subs:
            return other.family
    return None


def select(parsed: ParsedLora, module_shapes: dict[str, tuple[int, ...]],
           allowed: Callable[[str], str | None], scheme: KeyScheme = COGVIDEOX) -> tuple[ReferenceLora, KeyReport]:
    """The pairs that fit the model: the module exists, shapes match, and ``allowed(module)`` returns
    None (else it returns the reason it is not used). Raises :class:`LoraKeyError` when none fits."""
    report = KeyReport(name=parsed.name, layouts=sorted(parsed.layouts), alpha_source=parsed.alpha_source,
                       unused=dict(parsed.unused), meta=describe(parsed.meta))
    chosen: dict[str, LoraPair] = {}
    shape_misses = 0
    for module, pair in sorted(parsed.pairs.items()):
        why = None
        shape = module_shapes.get(module)
        if shape is None:
            why = f"the model has no module {module}"
        elif tuple(shape[:2]) != (pair.up.shape[0], pair.down.shape[1]):
            why = (f"shape mismatch on {module}: LoRA {pair.up.shape[0]}x{pair.down.shape[1]}, model "
                   f"{shape[0]}x{shape[1]} (a LoRA for another model size?)")
            shape_misses += 1
        else:
            why = allowed(module)
        if why is None:
            chosen[module] = pair
            report.used += parsed.sources[module]
        else:
            for k in parsed.sources[module]:
                report.unused[k] = why
    report.modules = len(chosen)
    if not chosen:
        found = ", ".join(sorted(report.unused)[:3]) or "(no tensors)"
        hint = ""
        other = other_family(list(parsed.pairs), scheme)
        if other:
            hint = f"; its module names are a {other} model's: this LoRA is for {other}, not {scheme.family}"
        elif shape_misses:
            hint = f"; {shape_misses} module(s) matched by name but not by shape: the LoRA is for another model"
        elif parsed.pairs:
            hint = "; " + next(iter(sorted(set(report.unused.values()))))
        raise LoraKeyError(f"{parsed.name}: none of its {len(report.unused)} keys can be applied to this "
                           f"{scheme.family} model: found keys like {found}; expected keys like "
                           f"{', '.join(scheme.examples)}{hint}")
    return ReferenceLora(chosen, parsed.meta), report
