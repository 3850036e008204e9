"""The Wan T2V example (workflows/api/wan_t2v_reference.json) through the real executor, on tiny Wan models.

The shipped graph with only the model files, the text encoder, the image and the sizes swapped for tiny
stand-ins (as tests/host/test_wan_e2e.py does for Phantom and VACE): the host's UNETLoader, VAELoader,
ModelSamplingSD3, KSampler, VAEDecode, CreateVideo and SaveVideo run unchanged, and
CustomVideoXReferenceEncode encodes the reference with the tiny Wan 2.1 VAE. The example itself is checked
against the host's Wan 2.1 text-to-video template it starts from.
"""

from __future__ import annotations

import copy
import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import workflow_tools as wt
from wan_graphs import LATENT, assert_decoded, latent_only, nodes_of, tiny_t2v

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "wan_t2v_reference"
TEMPLATE = "text_to_video_wan"  # the host's Wan 2.1 text-to-video template


def downloads(ui_node: dict) -> list[tuple[str, str, str]]:
    """A loader's download entries; the url without its query (templates differ in ``?download=true``)."""
    return [(m["name"], m["url"].split("?")[0], m["directory"]) for m in ui_node["properties"].get("models", [])]


def test_t2v_example_is_the_host_template_with_the_reference_on_the_model():
    spec = find_spec("comfyui_workflow_templates_json")
    (path,) = [p for f in spec.submodule_search_locations for p in Path(f, "templates").glob(f"{TEMPLATE}.json")]
    graph = json.loads(path.read_text(encoding="utf-8"))
    template = [n for n in graph["nodes"] if n.get("mode") == 0]
    api, ui = wt.load_api(NAME), {n["id"]: n for n in wt.load_ui(NAME)["nodes"]}

    def theirs(ctype: str) -> dict:
        (node,) = [n for n in template if n["type"] == ctype]
        return node

    for ctype in ("UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingSD3", "EmptyHunyuanLatentVideo"):
        ours = nodes_of(api, ctype)
        assert ui[int(ours)]["widgets_values"] == theirs(ctype)["widgets_values"], ctype
        assert downloads(ui[int(ours)]) == downloads(theirs(ctype)), ctype
    sampler = nodes_of(api, "KSampler")
    assert ui[int(sampler)]["widgets_values"][2:] == theirs("KSampler")["widgets_values"][2:]  # all but the seed
    negative = api[sampler]["inputs"]["negative"][0]
    # links: [id, from node, from slot, to node, to slot, type]; the sampler's slot 2 is `negative`
    (their_negative,) = [link[1] for link in graph["links"] if link[3] == theirs("KSampler")["id"] and link[4] == 2]
    assert [api[negative]["inputs"]["text"]] == [n["widgets_values"][0] for n in template if n["id"] == their_negative]
    apply, encode, shift, latent = (nodes_of(api, t) for t in (
        "CustomVideoXApply", "CustomVideoXReferenceEncode", "ModelSamplingSD3", "EmptyHunyuanLatentVideo"))
    assert api[shift]["inputs"]["model"] == [apply, 0] and api[apply]["inputs"]["model"] == [nodes_of(api, "UNETLoader"), 0]
    assert api[apply]["inputs"]["reference"] == [encode, 0]
    assert api[encode]["inputs"]["vae"] == [nodes_of(api, "VAELoader"), 0]
    assert [api[encode]["inputs"][k] for k in ("width", "height")] == [api[latent]["inputs"][k] for k in ("width", "height")]


def test_t2v_reference_workflow_decodes_an_mp4(host, wan_files):
    prompt = tiny_t2v(wan_files)
    sampler, encode, decode = (nodes_of(prompt, t) for t in ("KSampler", "CustomVideoXReferenceEncode", "VAEDecode"))
    result = host.run(prompt, capture=[sampler, encode, decode])
    reference = result.output(encode)
    assert reference.family == "Wan2.1" and tuple(reference.latent.shape) == (1, 16, 1, *LATENT[3:])
    assert_decoded(result, sampler, decode)


def test_strength_zero_is_the_graph_without_apply_and_the_shipped_strength_acts(host, wan_files):
    prompt, sampler = latent_only(tiny_t2v(wan_files))
    apply = nodes_of(prompt, "CustomVideoXApply")
    off = copy.deepcopy(prompt)
    off[apply]["inputs"]["strength"] = 0.0  # the shipped TAB schedule stays connected
    plain = copy.deepcopy(prompt)
    plain[nodes_of(plain, "ModelSamplingSD3")]["inputs"]["model"] = plain[apply]["inputs"]["model"]
    for ctype in ("CustomVideoXApply", "CustomVideoXTABSchedule", "CustomVideoXReferenceEncode", "CVXTestImage"):
        del plain[nodes_of(plain, ctype)]
    out = {name: host.run(p, capture=[sampler]).output(sampler)["samples"]
           for name, p in (("plain", plain), ("off", off), ("shipped", prompt))}
    # Off masks the inserted frame from every query; the frame still lengthens the attention calls, so the
    # plain run is reproduced to fp32 round-off (measured: 1.9e-5 max on values up to 24), not bit for bit.
    torch.testing.assert_close(out["off"], out["plain"], rtol=1e-5, atol=1e-4)
    assert torch.isfinite(out["shipped"]).all() and (out["shipped"] - out["plain"]).abs().max() > 0.1
