"""Tiny random-weight Wan 2.1 checkpoints for tests, built at run time from a seed (never committed).

- a native ComfyUI-layout Wan 2.1 text-to-video transformer (also the layout Phantom checkpoints use),
  built with the host's own ``WanModel`` so ``UNETLoader`` detects it as Wan 2.1 T2V;
- a native Wan 2.1 VACE transformer (``VaceWanModel``; detected as ``WAN21_Vace``);
- the T2V weights in diffusers layout, and diffusers' ``WanTransformer3DModel`` holding them (the oracle);
- a Wan 2.1 VAE at width 8 (the host reads the width from the file: ``decoder.head.0.gamma``).

The host's Wan detection assumes head dim 128, text dim 4096 and frequency dim 256, so the tiny models
keep those and shrink heads, blocks and the FFN instead.

Key map, native -> diffusers (a pure rename, identical shapes; the order matters):

====================================  ==========================================================
native                                diffusers
====================================  ==========================================================
``time_embedding.{0,2}``              ``condition_embedder.time_embedder.linear_{1,2}``
``text_embedding.{0,2}``              ``condition_embedder.text_embedder.linear_{1,2}``
``time_projection.1``                 ``condition_embedder.time_proj``
``blocks.N.self_attn.{q,k,v,o}``      ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}``
``blocks.N.cross_attn.{q,k,v,o}``     ``blocks.N.attn2.{to_q,to_k,to_v,to_out.0}``
``blocks.N.{self,cross}_attn.norm_q``  ``blocks.N.attn{1,2}.norm_q`` (``norm_k`` alike)
``blocks.N.norm3`` (cross-attn norm)  ``blocks.N.norm2`` (the FFN norms have no weights)
``blocks.N.ffn.{0,2}``                ``blocks.N.ffn.net.0.proj`` / ``blocks.N.ffn.net.2``
``blocks.N.modulation``               ``blocks.N.scale_shift_table``
``head.head`` / ``head.modulation``   ``proj_out`` / ``scale_shift_table``
``patch_embedding``                   ``patch_embedding``
====================================  ==========================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from tiny_models import _init_all, ensure_host_importable, save_safetensors

HEAD_DIM = 128  # the host's detection: heads = dim // 128
TEXT_DIM = 4096
TINY_WAN: dict[str, Any] = {"heads": 2, "layers": 2, "ffn_dim": 64}
LATENT_CHANNELS = 16  # Wan 2.1 and 2.2 A14B; 48 for Wan 2.2 TI2V-5B (``channels=48``)
VACE_LAYERS = 1

_NATIVE_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.attn([12])\.([qkv])\.", r".attn\1.to_\2."),
    (r"\.attn([12])\.o\.", r".attn\1.to_out.0."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
]


def native_to_diffusers_key(key: str) -> str:
    for pattern, repl in _NATIVE_TO_DIFFUSERS:
        key = re.sub(pattern, repl, key)
    return key


def native_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {native_to_diffusers_key(k): v for k, v in sd.items()}


def _seeded_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    _init_all(model, gen)
    with torch.no_grad():  # modulation tables are 1e-2-scale in real checkpoints; keep AdaLN non-trivial
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_wan_state_dict(seed: int = 0, vace: bool = False, **config: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights for the host's ``WanModel`` (or ``VaceWanModel``) in ComfyUI key layout.
    ``channels=48``: the Wan 2.2 TI2V-5B layout (48-channel latent in and out; detected as ``WAN22_T2V``)."""
    ensure_host_importable()
    import comfy.ops
    from comfy.ldm.wan.model import VaceWanModel, WanModel

    c = {**TINY_WAN, **config}
    channels = c.get("channels", LATENT_CHANNELS)
    kw = dict(patch_size=(1, 2, 2), in_dim=channels, dim=c["heads"] * HEAD_DIM, ffn_dim=c["ffn_dim"],
              freq_dim=256, text_dim=TEXT_DIM, out_dim=channels, num_heads=c["heads"],
              num_layers=c["layers"], operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    if vace:
        model = VaceWanModel(vace_layers=VACE_LAYERS, vace_in_dim=96, **kw)
    else:
        model = WanModel(model_type="t2v", **kw)
    return _seeded_state_dict(model, seed)


def build_diffusers_wan(native_sd: dict[str, torch.Tensor], **config: int) -> torch.nn.Module:
    """diffusers' ``WanTransformer3DModel`` with the native weights renamed (fp32, eval)."""
    from diffusers import WanTransformer3DModel

    c = {**TINY_WAN, **config}
    channels = c.get("channels", LATENT_CHANNELS)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=HEAD_DIM,
        in_channels=channels, out_channels=channels, text_dim=TEXT_DIM, freq_dim=256,
        ffn_dim=c["ffn_dim"], num_layers=c["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6)
    missing, unexpected = model.load_state_dict(native_to_diffusers(native_sd), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny Wan key map is incomplete: missing {missing}, unexpected {unexpected}")
    return model.float().eval()


def build_wan_vae_state_dict(seed: int = 0, dim: int = 8) -> dict[str, torch.Tensor]:
    """Random weights for the host's Wan 2.1 VAE at width ``dim`` (the real one is 96)."""
    ensure_host_importable()
    from comfy.ldm.wan.vae import WanVAE

    model = WanVAE(dim=dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("gamma") else 0.0  # RMS norm scales around 1
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_tiny_wan_set(models_dir: Path | str, seed: int = 0) -> dict[str, Path]:
    """Write ``wan_t2v``, ``wan_vace`` (diffusion_models/) and ``wan_vae`` (vae/) under ``models_dir``."""
    models_dir = Path(models_dir)
    paths = {
        "wan_t2v": models_dir / "diffusion_models" / "cvx_tiny_wan21_t2v.safetensors",
        "wan_vace": models_dir / "diffusion_models" / "cvx_tiny_wan21_vace.safetensors",
        "wan_vae": models_dir / "vae" / "cvx_tiny_wan21_vae.safetensors",
    }
    builders = {"wan_t2v": lambda: build_wan_state_dict(seed),
                "wan_vace": lambda: build_wan_state_dict(seed, vace=True),
                "wan_vae": lambda: build_wan_vae_state_dict(seed)}
    for kind, path in paths.items():
        if not path.exists():
            save_safetensors(builders[kind](), path)
    return paths
