"""The Phantom example (workflows/api/wan_phantom_tab.json) through the real executor, on tiny Wan models.

The graph is the shipped one with only the model files, the text encoder, the image and the sizes
swapped for tiny stand-ins: the host's own UNETLoader, VAELoader, WanPhantomSubjectToVideo,
ModelSamplingSD3, KSampler, VAEDecode, CreateVideo and SaveVideo run unchanged. The host builds the Wan
2.1 VAE at the width the file holds (8 here, 96 in the real one), so decoding is cheap.
"""

from __future__ import annotations

import copy

import pytest
import torch
import workflow_tools as wt
from wan_graphs import LATENT, SIZE, assert_decoded, latent_only, nodes_of, tiny_phantom, tiny_wan
from workflow_tools import decode_mp4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_phantom_tab_workflow_decodes_an_mp4(host, wan_files):
    prompt = tiny_phantom(wan_files)
    sampler, decode = nodes_of(prompt, "KSampler"), nodes_of(prompt, "VAEDecode")
    result = host.run(prompt, capture=[sampler, decode])
    assert_decoded(result, sampler, decode)


def test_strength_one_without_schedule_is_the_unpatched_phantom_graph(host, wan_files):
    prompt, sampler = latent_only(tiny_phantom(wan_files))
    bias = nodes_of(prompt, "CustomVideoXReferenceFramesBias")
    neutral = copy.deepcopy(prompt)
    del neutral[bias]["inputs"]["schedule"]
    plain = copy.deepcopy(neutral)
    plain[nodes_of(plain, "ModelSamplingSD3")]["inputs"]["model"] = plain[bias]["inputs"]["model"]
    del plain[bias], plain[nodes_of(plain, "CustomVideoXTABSchedule")], neutral[nodes_of(neutral, "CustomVideoXTABSchedule")]
    stronger = copy.deepcopy(neutral)
    stronger[bias]["inputs"]["strength"] = 3.0
    out = {name: host.run(p, capture=[sampler]).output(sampler)["samples"]
           for name, p in (("plain", plain), ("neutral", neutral), ("stronger", stronger))}
    assert torch.equal(out["neutral"], out["plain"])
    assert not torch.equal(out["stronger"], out["plain"])


def test_phantom_erae_auto_mode_from_the_wan_umt5_clip(host, wan_files):
    """ERAE auto on the Phantom graph: CustomVideoXEntityRegion tokenises the shipped positive prompt with
    the host's Wan umT5 tokenizer (CLIPLoader type wan's; see CVXTestWanTokenizerClip for its vocabulary)
    and the region reaches the sampler."""
    prompt, sampler = latent_only(tiny_phantom(wan_files))
    bias = nodes_of(prompt, "CustomVideoXReferenceFramesBias")
    text = wt.load_api("wan_phantom_tab")["4"]["inputs"]["text"]
    assert text.startswith("A corgi dog runs")
    prompt["50"] = {"class_type": "CVXTestWanTokenizerClip", "inputs": {}}
    prompt["51"] = {"class_type": "CustomVideoXEntityRegion",
                    "inputs": {"mode": "auto", "lam": 2.0, "map_block": 0, "refine": "soft", "top_k": 0.25,
                               "smooth": 0, "prompt": text, "subject_words": "corgi, dog", "clip": ["50", 0]}}
    with_region = copy.deepcopy(prompt)
    with_region[bias]["inputs"]["region"] = ["51", 0]
    result = host.run(with_region, capture=[sampler, "51"])
    # SentencePiece pieces of the prompt: "▁A", "▁c", "org", "i", "▁dog", "▁runs", ... (tests/host/test_wan_tokens.py)
    assert result.output("51").entity_idx == (1, 2, 3, 4)
    region_latent = result.output(sampler)["samples"]
    plain_latent = host.run(prompt, capture=[sampler]).output(sampler)["samples"]
    assert torch.isfinite(region_latent).all()
    assert (region_latent - plain_latent).abs().max() > 1e-4


def test_vace_ref_workflow_decodes_an_mp4_without_the_reference_frame(host, wan_files):
    prompt = tiny_wan("wan_vace_ref_tab", wan_files["wan_vace"], wan_files)
    sampler, trim, decode = (nodes_of(prompt, t) for t in ("KSampler", "TrimVideoLatent", "VAEDecode"))
    result = host.run(prompt, capture=[sampler, trim, decode])
    sampled = result.output(sampler)["samples"]
    assert tuple(sampled.shape) == (1, 16, 1 + LATENT[2], *LATENT[3:]) and torch.isfinite(sampled).all()
    assert tuple(result.output(trim)["samples"].shape) == LATENT  # the reference frame is cut off
    assert tuple(result.output(decode).shape) == (SIZE["length"], SIZE["height"], SIZE["width"], 3)
    (mp4,) = [f for f in result.files if f.suffix == ".mp4"]
    assert decode_mp4(mp4) == (SIZE["length"], SIZE["width"], SIZE["height"], "h264")


def test_vace_ref_graph_neutral_settings_are_the_unpatched_graph_and_the_mask_acts(host, wan_files):
    prompt = tiny_wan("wan_vace_ref_tab", wan_files["wan_vace"], wan_files)
    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("VAEDecode", "CreateVideo", "SaveVideo")}
    trim, bias = nodes_of(prompt, "TrimVideoLatent"), nodes_of(prompt, "CustomVideoXReferenceFramesBias")
    prompt["99"] = {"class_type": "CVXTestSaveTensor", "inputs": {"value": [trim, 0], "name": "latent"}}
    del prompt[bias]["inputs"]["schedule"], prompt[nodes_of(prompt, "CustomVideoXTABSchedule")]
    neutral = copy.deepcopy(prompt)
    neutral[bias]["inputs"]["background_strength"] = 1.0
    plain = copy.deepcopy(neutral)
    plain[nodes_of(plain, "ModelSamplingSD3")]["inputs"]["model"] = plain[bias]["inputs"]["model"]
    del plain[bias]
    out = {name: host.run(p, capture=[trim]).output(trim)["samples"]
           for name, p in (("plain", plain), ("neutral", neutral), ("hidden", prompt))}
    assert torch.equal(out["neutral"], out["plain"])
    assert torch.isfinite(out["hidden"]).all() and not torch.equal(out["hidden"], out["plain"])
