"""CustomVideoX adapters: LoRA weights for the DiT blocks' projections, their maths, init, save and load.

An adapter maps native module paths (``blocks.N.q``, DESIGN.md §2 names) to a low-rank pair
``down [r, in]``, ``up [out, r]`` and a folded ``scale = alpha / r``. In the reference-branch mode
(default, DESIGN.md §1.4 [reconstructed]) the delta ``scale * up @ down @ x`` is added to the
projections of reference tokens only; ``global`` mode gives the same pairs to the host's weight
patcher. Host-free: torch and safetensors only.

Saved files use ComfyUI-native kohya-style names (``diffusion_model.blocks.N.q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), so the host's own LoRA loaders read them too, plus string metadata
under ``customvideox.*`` (rank, alpha, targets, base model, steps, pack version).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The block projections a CustomVideoX adapter may act on (native names, DESIGN.md §2). They also name the
# trainer's targets on every backbone: a family maps each to its own block sub-module (``WAN_TARGET_MODULES``).
TARGETS = ("q", "k", "v", "attn_out", "ff_proj", "ff_out")
DEFAULT_TARGETS = ("q", "k", "v", "attn_out")
COGVIDEOX_TARGET_MODULES = {t: t for t in TARGETS}
WAN_TARGET_MODULES = {"q": "self_attn.q", "k": "self_attn.k", "v": "self_attn.v", "attn_out": "self_attn.o",
                      "ff_proj": "ffn.0", "ff_out": "ffn.2"}
# Every per-token projection a Wan block applies to the reference rows: the trainer's targets, plus the text
# cross-attention's query and output (the reference's own rows). Its k and v project the text, which the video
# shares, so they are not reference-branch modules.
WAN_REFERENCE_MODULES = (*WAN_TARGET_MODULES.values(), "cross_attn.q", "cross_attn.o")
SAVE_PREFIX = "diffusion_model."
META_PREFIX = "customvideox."
FORMAT = "customvideox-reference-lora-v1"
_ROOT = Path(__file__).resolve().parents[1]


def pack_version() -> str:
    """The pack's version from pyproject.toml (the single place it is written)."""
    try:
        m = re.search(r'^version\s*=\s*"([^"]+)"', (_ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    except OSError:
        m = None
    return m.group(1) if m else "unknown"


@dataclass
class LoraPair:
    """One projection's low-rank update ``W + scale * up @ down`` (``scale`` already holds alpha / rank)."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    scale: float
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def weights_on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` on ``device``/``dtype``; cached unless trainable (a cache would cut the graph)."""
        if self.down.requires_grad or self.up.requires_grad:
            return self.down.to(device, dtype), self.up.to(device, dtype)
        key = (device, dtype)
        if key not in self._cache:
            self._cache.clear()  # one device/dtype at a time: the model runs on one
            self._cache[key] = (self.down.to(device, dtype), self.up.to(device, dtype))
        return self._cache[key]

    def delta(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``strength * scale * (x @ down^T) @ up^T`` for ``x [..., in]``."""
        down, up = self.weights_on(x.device, x.dtype)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * (self.scale * strength)


@dataclass
class AdapterMeta:
    """What an adapter file says about itself (all optional for files made elsewhere)."""

    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    base_model: str = ""
    steps: int = 0
    pack_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": "pt",
            META_PREFIX + "format": FORMAT,
            META_PREFIX + "rank": str(self.rank if self.rank is not None else ""),
            META_PREFIX + "alpha": str(self.alpha if self.alpha is not None else ""),
            META_PREFIX + "targets": ",".join(self.targets),
            META_PREFIX + "base_model": self.base_model,
            META_PREFIX + "steps": str(self.steps),
            META_PREFIX + "pack_version": self.pack_version or pack_version(),
        }
        meta.update({META_PREFIX + k: v for k, v in self.extra.items()})
        return meta

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> AdapterMeta | None:
        """None when the file was not written by this pack."""
        md = metadata or {}
        if md.get(META_PREFIX + "format") != FORMAT:
            return None
        known = {"format", "rank", "alpha", "targets", "base_model", "steps", "pack_version"}

        def get(k: str) -> str:
            return md.get(META_PREFIX + k, "")

        return cls(
            rank=int(get("rank")) if get("rank") else None,
            alpha=float(get("alpha")) if get("alpha") else None,
            targets=tuple(t for t in get("targets").split(",") if t),
            base_model=get("base_model"),
            steps=int(get("steps") or 0),
            pack_version=get("pack_version"),
            extra={k[len(META_PREFIX):]: v for k, v in md.items()
                   if k.startswith(META_PREFIX) and k[len(META_PREFIX):] not in known},
        )


class ReferenceLora:
    """A set of :class:`LoraPair` keyed by native module path (``blocks.N.q``)."""

    def __init__(self, pairs: dict[str, LoraPair], meta: AdapterMeta | None = None):
        self.pairs = pairs
        self.meta = meta or AdapterMeta()

    def get(self, module: str) -> LoraPair | None:
        return self.pairs.get(module)

    def parameters(self) -> list[torch.Tensor]:
        return [t for p in self.pairs.values() for t in (p.down, p.up)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """ComfyUI-native kohya-style tensors (what :func:`save_adapter` writes)."""
        sd: dict[str, torch.Tensor] = {}
        for name, p in sorted(self.pairs.items()):
            base = SAVE_PREFIX + name
            sd[base + ".lora_down.weight"] = p.down.detach().float().cpu().contiguous()
            sd[base + ".lora_up.weight"] = p.up.detach().float().cpu().contiguous()
            sd[base + ".alpha"] = torch.tensor(p.scale * p.rank, dtype=torch.float32)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy tensors saved by :meth:`state_dict` into this adapter's (same names and shapes)."""
        with torch.no_grad():
            for name, p in self.pairs.items():
                base = SAVE_PREFIX + name
                p.down.copy_(sd[base + ".lora_down.weight"])
                p.up.copy_(sd[base + ".lora_up.weight"])
                p._cache.clear()


def init_adapter(shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> ReferenceLora:
    """A trainable adapter for ``shapes`` (module path -> ``(out, in)`` of its weight).

    ``down`` gets PEFT's default init (Kaiming-uniform, a = sqrt(5)) and ``up`` zeros, so a new
    adapter is exactly the base model and its first gradient reaches ``up``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (out_f, in_f) in sorted(shapes.items()):
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_f))  # kaiming_uniform_(a=sqrt(5)) bound
        down = ((torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound).to(dtype).requires_grad_(True)
        up = torch.zeros(out_f, rank, dtype=dtype, requires_grad=True)
        pairs[name] = LoraPair(down=down, up=up, scale=alpha / rank)
    return ReferenceLora(pairs)


def block_target_shapes(named_weights: dict[str, tuple[int, ...]], targets: tuple[str, ...],
                        modules: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """``{"blocks.N.q": (out, in)}`` for every block projection in ``targets``, from the DiT's
    ``{module path: weight shape}`` (native names); ``modules``: target -> the family's block sub-module
    (default CogVideoX's, the targets' own names)."""
    modules = modules or COGVIDEOX_TARGET_MODULES
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"LoRA targets {list(targets)} must be a non-empty subset of {list(TARGETS)}")
    pat = re.compile(rf"^blocks\.\d+\.({'|'.join(re.escape(modules[t]) for t in targets)})$")
    shapes = {k: (s[0], s[1]) for k, s in named_weights.items() if pat.match(k)}
    if not shapes:
        raise ValueError(f"the model has no block projections named blocks.N.{modules[targets[0]]}: the targets "
                         f"are for another backbone")
    return shapes


def save_adapter(path: str | os.PathLike, lora: ReferenceLora, meta: AdapterMeta) -> Path:
    """Write ``lora`` with ``meta`` as safetensors, atomically (never a half-written file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(lora.state_dict(), str(tmp), metadata=meta.to_metadata())
    os.replace(tmp, path)
    return path


def describe(meta: AdapterMeta | None) -> str:
    """One line for reports and logs."""
    if meta is None:
        return "no CustomVideoX metadata (made elsewhere)"
    return json.dumps({"rank": meta.rank, "alpha": meta.alpha, "targets": list(meta.targets),
                       "base_model": meta.base_model, "steps": meta.steps, "pack_version": meta.pack_version})
