"""API-format prompt builders for the tiny CogVideoX, using only core nodes plus the test-only nodes."""

from __future__ import annotations

from typing import Any

# Node ids used by `t2v_prompt`, so tests can capture outputs by name.
MODEL, POS, NEG, LATENT, SAMPLED, VAE, DECODED = "model", "pos", "neg", "latent", "sampled", "vae", "decoded"


def t2v_prompt(
    unet_name: str,
    vae_name: str | None = None,
    route: str = "void",
    width: int = 32,
    height: int = 32,
    length: int = 9,
    steps: int = 3,
    cfg: float = 2.0,
    seed: int = 0,
    text_dim: int = 32,
    text_length: int = 226,
    save_name: str = "t2v",
) -> dict[str, Any]:
    """A text-to-video graph for the tiny model.

    ``route="void"``: CFGGuider + BasicScheduler + RandomNoise + VOIDSampler + SamplerCustomAdvanced
    (alpha-space DDIM); ``route="ksampler"``: ModelSamplingDiscrete(v_prediction, zsnr) + KSampler —
    the two routes DESIGN.md §2 names for CogVideoX. The sampled LATENT is node ``SAMPLED`` (output 0);
    with ``vae_name`` the decoded IMAGE is node ``DECODED``. Output nodes (a prompt needs one): CVXTestSaveTensor
    writes ``<output>/cvx_test_tensors/<save_name>_latent.pt`` (and ``..._image.pt`` with a VAE).
    """
    p: dict[str, Any] = {
        MODEL: {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        POS: {
            "class_type": "CVXTestTextConditioning",
            "inputs": {"seed": seed + 1, "length": text_length, "dim": text_dim},
        },
        NEG: {
            "class_type": "CVXTestTextConditioning",
            "inputs": {"seed": seed + 2, "length": text_length, "dim": text_dim},
        },
        # 16 channels, (length-1)//4+1 frames, /8 spatially: the CogVideoX latent shape.
        LATENT: {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": width, "height": height, "length": length, "batch_size": 1},
        },
    }
    if route == "void":
        p.update(
            {
                "guider": {
                    "class_type": "CFGGuider",
                    "inputs": {"model": [MODEL, 0], "positive": [POS, 0], "negative": [NEG, 0], "cfg": cfg},
                },
                "sigmas": {
                    "class_type": "BasicScheduler",
                    "inputs": {"model": [MODEL, 0], "scheduler": "simple", "steps": steps, "denoise": 1.0},
                },
                "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
                "sampler": {"class_type": "VOIDSampler", "inputs": {}},
                SAMPLED: {
                    "class_type": "SamplerCustomAdvanced",
                    "inputs": {
                        "noise": ["noise", 0],
                        "guider": ["guider", 0],
                        "sampler": ["sampler", 0],
                        "sigmas": ["sigmas", 0],
                        "latent_image": [LATENT, 0],
                    },
                },
            }
        )
    elif route == "ksampler":
        p.update(
            {
                "msd": {
                    "class_type": "ModelSamplingDiscrete",
                    "inputs": {"model": [MODEL, 0], "sampling": "v_prediction", "zsnr": True},
                },
                SAMPLED: {
                    "class_type": "KSampler",
                    "inputs": {
                        "model": ["msd", 0],
                        "seed": seed,
                        "steps": steps,
                        "cfg": cfg,
                        "sampler_name": "euler",
                        "scheduler": "simple",
                        "positive": [POS, 0],
                        "negative": [NEG, 0],
                        "latent_image": [LATENT, 0],
                        "denoise": 1.0,
                    },
                },
            }
        )
    else:
        raise ValueError(f"unknown route {route!r}")
    if vae_name is not None:
        p[VAE] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}}
        p[DECODED] = {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLED, 0], "vae": [VAE, 0]}}
        p["save_image"] = {
            "class_type": "CVXTestSaveTensor",
            "inputs": {"value": [DECODED, 0], "name": f"{save_name}_image"},
        }
    p["save_latent"] = {
        "class_type": "CVXTestSaveTensor",
        "inputs": {"value": [SAMPLED, 0], "name": f"{save_name}_latent"},
    }
    return p
