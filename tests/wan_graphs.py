"""The shipped Wan workflows on tiny models, for the host and server levels: the graphs are the shipped ones
with only the model files, the text encoder, the image and the sizes swapped for tiny stand-ins (the host's
own UNETLoader, VAELoader, WanPhantomSubjectToVideo, ModelSamplingSD3, KSampler, VAEDecode, CreateVideo and
SaveVideo run unchanged). The tiny Wan files come from the session fixture ``wan_files`` (conftest)."""

from __future__ import annotations

import copy
from pathlib import Path

import tiny_wan as tw
import workflow_tools as wt

SIZE = {"width": 48, "height": 32, "length": 5}
LATENT = (1, 16, 2, 4, 6)
T2V_NAME = "wan_t2v_reference"


def tiny_wan(name: str, model: Path, wan_files) -> dict:
    """The shipped Wan graph ``name`` on the tiny files, otherwise unchanged. LoadImage's MASK (1 on a
    cut-out's transparent background) becomes a 64x48 canvas of 1 with a 32x24 hole of 0 in the middle."""
    p = copy.deepcopy(wt.load_api(name))
    images = []
    for nid, node in list(p.items()):
        ctype, inputs = node["class_type"], node["inputs"]
        if ctype == "UNETLoader":
            inputs["unet_name"] = model.name
        elif ctype == "VAELoader":
            inputs["vae_name"] = wan_files["wan_vae"].name
        elif ctype == "CLIPLoader":
            del p[nid]
        elif ctype == "CLIPTextEncode":
            p[nid] = {"class_type": "CVXTestTextConditioning",
                      "inputs": {"seed": 1000 + int(nid), "length": 16, "dim": tw.TEXT_DIM}}
        elif ctype == "LoadImage":
            images.append(nid)
            p[nid] = {"class_type": "CVXTestImage", "inputs": {"seed": int(nid), "width": 64, "height": 48,
                                                               "batch_size": 1}}
        elif ctype in ("WanPhantomSubjectToVideo", "WanVaceToVideo"):
            inputs.update(SIZE)
        elif ctype == "KSampler":
            inputs["steps"] = 2
        elif ctype == "SaveVideo":
            inputs["filename_prefix"] = "wan_e2e/" + inputs["filename_prefix"].rsplit("/", 1)[-1]
    for node in list(p.values()):
        for key, value in node["inputs"].items():
            if wt.is_link(value) and value[0] in images and value[1] == 1:
                node["inputs"][key] = ["90", 0]
                p["90"] = {"class_type": "MaskComposite", "inputs": {"destination": ["91", 0], "source": ["92", 0],
                                                                     "x": 16, "y": 12, "operation": "multiply"}}
                p["91"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 48}}
                p["92"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 24}}
    return p


def tiny_phantom(wan_files) -> dict:
    return tiny_wan("wan_phantom_tab", wan_files["wan_t2v"], wan_files)


def nodes_of(api: dict, ctype: str) -> str:
    (nid,) = [n for n, v in api.items() if v["class_type"] == ctype]
    return nid


def latent_only(prompt: dict) -> tuple[dict, str]:
    """The graph up to the sampler, with the sampled latent as the output (no decode)."""
    p = {k: v for k, v in prompt.items() if v["class_type"] not in ("VAEDecode", "CreateVideo", "SaveVideo")}
    sampler = nodes_of(p, "KSampler")
    p["99"] = {"class_type": "CVXTestSaveTensor", "inputs": {"value": [sampler, 0], "name": "latent"}}
    return p, sampler


def tiny_t2v(wan_files) -> dict:
    """The shipped graph on the tiny files, at the tiny video size (the reference encoded at it too)."""
    p = tiny_wan(T2V_NAME, wan_files["wan_t2v"], wan_files)
    p[nodes_of(p, "EmptyHunyuanLatentVideo")]["inputs"].update(SIZE)
    p[nodes_of(p, "CustomVideoXReferenceEncode")]["inputs"].update(width=SIZE["width"], height=SIZE["height"])
    return p


def assert_decoded(result, sampler: str, decode: str) -> None:
    """A tiny Wan run's sampled latent (the video only, no reference frame), decoded frames and mp4 all have the
    tiny video's size and frame count."""
    import torch
    from workflow_tools import decode_mp4

    latent = result.output(sampler)["samples"]
    assert tuple(latent.shape) == LATENT and torch.isfinite(latent).all()
    assert tuple(result.output(decode).shape) == (SIZE["length"], SIZE["height"], SIZE["width"], 3)
    (mp4,) = [f for f in result.files if f.suffix == ".mp4"]
    assert decode_mp4(mp4) == (SIZE["length"], SIZE["width"], SIZE["height"], "h264")
