"""Tiny random-weight CogVideoX checkpoints for tests and for the main job without real weights.

Everything is built at run time from a seed (no weight file is ever committed):

- native ComfyUI-layout CogVideoX 1.0 (RoPE) and 1.5 (``patch_size_t=2``) transformers, built with the
  host's own class so ``UNETLoader`` detects them as ``CogVideoX_T2V``;
- the same 1.0 weights in diffusers layout, as one file and as a sharded set with an index json and a
  ``config.json`` (written by diffusers' own ``save_pretrained``), plus the matching diffusers model;
- a CogVideoX VAE with random weights that ``VAELoader`` detects as the CogVideoX VAE.

The host (``comfy``) must be importable when a builder runs; callers that also run the host in-process
must have parsed the host's arguments first (see ``tests/harness/host.py``). Nothing here imports the
host at module import time.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host" / "ComfyUI"

# The host's detection hard-codes head_dim 64 (heads = dim // 64), so width must be 64 * heads.
TINY_CONFIG_1_0: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "time_embed_dim": 64,
    "text_embed_dim": 32,
    "num_layers": 2,
    "patch_size": 2,
    "patch_size_t": None,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
}
TINY_CONFIG_1_5: dict[str, Any] = {**TINY_CONFIG_1_0, "patch_size_t": 2}
# The host's CogVideoX 1.5 detection leaves these at the 1.5 training grid; diffusers must get the same.
_HOST_1_5_SAMPLE = {"sample_height": 96, "sample_width": 170, "sample_frames": 81}
_HOST_1_0_SAMPLE = {"sample_height": 60, "sample_width": 90, "sample_frames": 49}

TEXT_DIM = TINY_CONFIG_1_0["text_embed_dim"]
LATENT_CHANNELS = 16

# DESIGN.md §2: diffusers -> ComfyUI names, a pure rename with identical shapes (order matters:
# the more specific patterns first).
_DIFFUSERS_TO_NATIVE: list[tuple[str, str]] = [
    ("transformer_blocks.", "blocks."),
    (".attn1.to_q.", ".q."),
    (".attn1.to_k.", ".k."),
    (".attn1.to_v.", ".v."),
    (".attn1.to_out.0.", ".attn_out."),
    (".attn1.norm_q.", ".norm_q."),
    (".attn1.norm_k.", ".norm_k."),
    (".ff.net.0.proj.", ".ff_proj."),
    (".ff.net.2.", ".ff_out."),
    ("time_embedding.linear_", "time_embedding_linear_"),
    ("ofs_embedding.linear_", "ofs_embedding_linear_"),
]


def ensure_host_importable(host_dir: Path | str = HOST_DIR) -> Path:
    """Put the host tree on ``sys.path`` (first), so ``import comfy`` finds it."""
    host_dir = Path(host_dir).resolve()
    if not (host_dir / "comfy" / "ldm" / "cogvideo" / "model.py").is_file():
        raise FileNotFoundError(f"no ComfyUI host at {host_dir}; run `make setup` first")
    if str(host_dir) not in sys.path:
        sys.path.insert(0, str(host_dir))
    return host_dir


def native_to_diffusers_key(key: str) -> str:
    """ComfyUI-native CogVideoX key -> diffusers key (the inverse of the §2 rename)."""
    for diffusers_part, native_part in _DIFFUSERS_TO_NATIVE:
        if native_part.startswith("."):
            key = key.replace(native_part, diffusers_part)
        elif key.startswith(native_part):
            key = diffusers_part + key[len(native_part) :]
    return key


def native_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {native_to_diffusers_key(k): v for k, v in sd.items()}


def _perturb_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every norm a non-trivial affine so a mixed-up norm mapping changes outputs."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _init_all(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded init for modules built with the host's no-init ops (their weights are torch.empty)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # 1-D weights are norm scales
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))


def build_native_state_dict(config: dict[str, Any] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for the host's ``CogVideoXTransformer3DModel`` (ComfyUI key layout), fp32."""
    ensure_host_importable()
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    config = dict(TINY_CONFIG_1_0 if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # torch.nn as `operations`: real default inits (the host's ops skip init to load faster).
        model = CogVideoXTransformer3DModel(**config, dtype=torch.float32, operations=torch.nn)
    gen = torch.Generator().manual_seed(seed + 1)
    _perturb_norms(model, gen)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return sd


def save_safetensors(
    sd: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written file that a later run would trust
    return path


def diffusers_config(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The diffusers ``CogVideoXTransformer3DModel`` kwargs that match a tiny native config."""
    config = dict(TINY_CONFIG_1_0 if config is None else config)
    sample = _HOST_1_5_SAMPLE if config.get("patch_size_t") else _HOST_1_0_SAMPLE
    return {
        "num_attention_heads": config["num_attention_heads"],
        "attention_head_dim": config["attention_head_dim"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "time_embed_dim": config["time_embed_dim"],
        "text_embed_dim": config["text_embed_dim"],
        "num_layers": config["num_layers"],
        "patch_size": config["patch_size"],
        "patch_size_t": config.get("patch_size_t"),
        "use_rotary_positional_embeddings": config["use_rotary_positional_embeddings"],
        "use_learned_positional_embeddings": config["use_learned_positional_embeddings"],
        **sample,
    }


def build_diffusers_model(native_sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Any:
    """The diffusers model holding exactly ``native_sd`` (renamed); loading is strict, so a wrong
    rename fails here rather than silently leaving random weights."""
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**diffusers_config(config))
    model.load_state_dict(native_to_diffusers(native_sd), strict=True)
    return model.eval()


def diffusers_rotary_emb(
    config: dict[str, Any] | None, latent_t: int, latent_h: int, latent_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) exactly as diffusers' ``CogVideoXPipeline._prepare_rotary_positional_embeddings``
    builds it (diffusers computes RoPE in the pipeline, not in the transformer)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = diffusers_config(config)
    p, p_t = cfg["patch_size"], cfg["patch_size_t"]
    grid_h, grid_w = latent_h // p, latent_w // p
    base_w, base_h = cfg["sample_width"] // p, cfg["sample_height"] // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=cfg["attention_head_dim"],
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_t,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=cfg["attention_head_dim"],
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_t + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
    )


def diffusers_forward(
    model: Any,
    x: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One diffusers transformer forward on ComfyUI-layout input ``x`` [B, C, T, H, W]; returns the same
    layout, so it can be compared with the host's ``diffusion_model(x, timestep, context)``."""
    rope = diffusers_rotary_emb(config, x.shape[2], x.shape[3], x.shape[4])
    with torch.no_grad():
        out = model(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=context,
            timestep=timestep,
            image_rotary_emb=rope,
            return_dict=False,
        )[0]
    return out.permute(0, 2, 1, 3, 4)


def save_diffusers_single(native_sd: dict[str, torch.Tensor], path: Path | str) -> Path:
    """Diffusers-layout weights as one ``.safetensors`` file (as found in the wild, no config)."""
    return save_safetensors(native_to_diffusers(native_sd), path)


def save_diffusers_sharded(
    native_sd: dict[str, torch.Tensor],
    folder: Path | str,
    config: dict[str, Any] | None = None,
    shards: int = 3,
) -> Path:
    """A diffusers ``save_pretrained`` folder: ``config.json``, ``diffusion_pytorch_model-0000N-of-0000M
    .safetensors`` shards and ``diffusion_pytorch_model.safetensors.index.json``."""
    folder = Path(folder)
    model = build_diffusers_model(native_sd, config)
    total = sum(v.numel() * v.element_size() for v in native_sd.values())
    # diffusers splits at max_shard_size; aim for about `shards` files.
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max(1, total // shards + 1))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index.is_file():
        raise RuntimeError(f"diffusers did not shard the tiny model into {folder}")
    return folder


def build_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights for the host's CogVideoX VAE.

    The host builds ``AutoencoderKLCogVideoX(latent_channels=...)`` with its full, hard-coded widths
    whatever the file holds (comfy/sd.py reads only the latent channel count), and loads non-strictly,
    so a smaller file would leave uninitialised weights. Hence full shapes with random values, stored in
    fp16 to halve the file (~430 MB); 8x spatial / 4x temporal compression, 16 latent channels.
    """
    ensure_host_importable()
    from comfy.ldm.cogvideo.vae import AutoencoderKLCogVideoX

    model = AutoencoderKLCogVideoX(latent_channels=LATENT_CHANNELS)
    _init_all(model, torch.Generator().manual_seed(seed))
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def _iter_tiny_files(models_dir: Path) -> Iterator[tuple[str, Path]]:
    yield "native_1_0", models_dir / "diffusion_models" / "cvx_tiny_test_model.safetensors"
    yield "native_1_5", models_dir / "diffusion_models" / "cvx_tiny_test_model_1_5.safetensors"
    yield "diffusers_single", models_dir / "diffusion_models" / "cvx_tiny_test_model_diffusers.safetensors"
    yield "diffusers_sharded", models_dir / "diffusion_models" / "cvx_tiny_test_model_diffusers_sharded"
    yield "vae", models_dir / "vae" / "cvx_tiny_test_vae.safetensors"


def build_tiny_model_set(
    models_dir: Path | str, seed: int = 0, include: set[str] | None = None, overwrite: bool = False
) -> dict[str, Path]:
    """Write the tiny set into a ComfyUI-style ``models_dir`` and return ``{kind: path}``.

    Kinds: ``native_1_0``, ``native_1_5``, ``diffusers_single``, ``diffusers_sharded`` (a folder) and
    ``vae``. ``include`` limits what is built (the main job needs only ``native_1_0`` and ``vae``; the
    diffusers kinds need the ``diffusers`` package). Existing files are kept unless ``overwrite``.
    """
    models_dir = Path(models_dir)
    paths = dict(_iter_tiny_files(models_dir))
    wanted = set(paths) if include is None else set(include)
    unknown = wanted - set(paths)
    if unknown:
        raise ValueError(f"unknown tiny model kinds: {sorted(unknown)}")
    sd_1_0: dict[str, torch.Tensor] | None = None

    def native_1_0() -> dict[str, torch.Tensor]:
        nonlocal sd_1_0
        if sd_1_0 is None:
            sd_1_0 = build_native_state_dict(TINY_CONFIG_1_0, seed)
        return sd_1_0

    for kind in sorted(wanted):
        path = paths[kind]
        if path.exists() and not overwrite:
            continue
        if kind == "native_1_0":
            save_safetensors(native_1_0(), path)
        elif kind == "native_1_5":
            save_safetensors(build_native_state_dict(TINY_CONFIG_1_5, seed), path)
        elif kind == "diffusers_single":
            save_diffusers_single(native_1_0(), path)
        elif kind == "diffusers_sharded":
            save_diffusers_sharded(native_1_0(), path)
        elif kind == "vae":
            save_safetensors(build_vae_state_dict(seed), path)
    return {k: paths[k] for k in sorted(wanted)}


def read_index(folder: Path | str) -> dict[str, Any]:
    """The ``weight_map`` index json of a sharded diffusers folder."""
    with open(Path(folder) / "diffusion_pytorch_model.safetensors.index.json", encoding="utf-8") as f:
        return json.load(f)
