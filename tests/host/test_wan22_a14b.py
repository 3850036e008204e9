"""The Wan 2.2 A14B example (workflows/api/wan22_a14b_reference.json) through the real executor, on tiny Wan models.

The shipped graph with only the files, the text encoder, the image, the sizes and the step counts swapped for
tiny stand-ins: two tiny Wan text-to-video files with different weights stand in for the high- and low-noise
experts, and the host's UNETLoader, ModelSamplingSD3, both KSamplerAdvanced, VAEDecode, CreateVideo and
SaveVideo run unchanged. Checked here: the example is the host's ``video_wan2_2_14B_t2v`` template (its
default, Lightning-free branch) with the reference on both experts; it decodes an mp4; and its TAB curve
continues across the two samplers: the τ of every model call of the split run is exactly that of the same call
in the one-sampler run of the same graph, which the same graph set to ``steps`` progress fails (it restarts).
"""

from __future__ import annotations

import copy
import itertools
import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import tiny_wan as tw
import workflow_tools as wt
from wan_graphs import SIZE, assert_decoded, nodes_of, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "wan22_a14b_reference"
TEMPLATE = "video_wan2_2_14B_t2v"  # the host's Wan 2.2 14B text-to-video template (a subgraph)
STEPS, SPLIT = 4, 2  # the tiny run: the shipped 20 / 10, shrunk
LOW_FILE = "cvx_tiny_wan22_low_noise.safetensors"
SEEDS = itertools.count(100)
KSA_WIDGETS = ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
               "start_at_step", "end_at_step", "return_with_leftover_noise")


# ------------------------------------------------------------------------------------------ the template
def _template() -> tuple[dict[int, dict], dict[int, dict]]:
    """The template's subgraph: its nodes by id and its links by id."""
    spec = find_spec("comfyui_workflow_templates_json")
    (path,) = [p for f in spec.submodule_search_locations for p in Path(f, "templates").glob(f"{TEMPLATE}.json")]
    (sub,) = json.loads(path.read_text(encoding="utf-8"))["definitions"]["subgraphs"]
    return {n["id"]: n for n in sub["nodes"]}, {link["id"]: link for link in sub["links"]}


def _sampler_values(nodes: dict[int, dict], links: dict[int, dict], nid: int) -> dict:
    """A template KSamplerAdvanced's settings: its widgets, with each linked one read from the primitive behind
    it (through the Lightning switches, which are off by default: their ``on_false`` input)."""
    node = nodes[nid]
    values = dict(zip(KSA_WIDGETS, node["widgets_values"], strict=True))
    for inp in node["inputs"]:
        if inp["name"] not in values or inp.get("link") is None:
            continue
        src = nodes[links[inp["link"]]["origin_id"]]
        while src["type"] == "ComfySwitchNode":
            (on_false,) = [i for i in src["inputs"] if i["name"] == "on_false"]
            src = nodes[links[on_false["link"]]["origin_id"]]
        assert src["type"].startswith("Primitive"), src["type"]
        values[inp["name"]] = src["widgets_values"][0]
    return values


def samplers_of(p: dict) -> tuple[str, str]:
    """The two KSamplerAdvanced: high-noise (the first), low-noise."""
    high, low = sorted((n for n in p if p[n]["class_type"] == "KSamplerAdvanced"), key=int)
    return high, low


def _download(entry: dict) -> tuple[str, str, str]:
    """A download entry up to the repository: Comfy-Org publishes the same umT5 and VAE files in its Wan 2.1 and
    2.2 repositories, and the shipped Wan examples share the Wan 2.1 ones (the Wan 2.1 templates' entries)."""
    assert entry["url"].startswith("https://huggingface.co/Comfy-Org/Wan_2."), entry
    return entry["name"], entry["url"].split("/resolve/main/")[1], entry["directory"]


def test_a14b_example_is_the_host_template_with_the_reference_on_both_experts():
    nodes, links = _template()
    api, ui = wt.load_api(NAME), {n["id"]: n for n in wt.load_ui(NAME)["nodes"]}
    theirs = {t: [n for n in nodes.values() if n["type"] == t] for t in ("UNETLoader", "CLIPLoader", "VAELoader")}
    for ctype, found in theirs.items():  # same files, same download entries
        ours = sorted(ui[int(n)]["widgets_values"][0] for n in api if api[n]["class_type"] == ctype)
        assert ours == sorted(n["widgets_values"][0] for n in found), ctype
        for n in api:
            if api[n]["class_type"] == ctype:
                (match,) = [t for t in found if t["widgets_values"][0] == ui[int(n)]["widgets_values"][0]]
                assert [_download(m) for m in ui[int(n)]["properties"]["models"]] == \
                       [_download(m) for m in match["properties"]["models"]], ctype
    high_file, low_file = (api[n]["inputs"]["unet_name"] for n in ("1", "2"))
    assert "high_noise" in high_file and "low_noise" in low_file
    (t_high,) = [nid for nid, n in nodes.items() if n["type"] == "KSamplerAdvanced" and n["widgets_values"][0] == "enable"]
    (t_low,) = [nid for nid, n in nodes.items() if n["type"] == "KSamplerAdvanced" and nid != t_high]
    (latent,) = [n for n in nodes.values() if n["type"] == "EmptyHunyuanLatentVideo"]
    fps = [n["widgets_values"][0] for n in nodes.values() if n.get("title") in ("Float (FPS)", "Float (Duration)")]
    ours_latent, encode = (api[nodes_of(api, t)]["inputs"] for t in ("EmptyHunyuanLatentVideo",
                                                                      "CustomVideoXReferenceEncode"))
    assert (ours_latent["width"], ours_latent["height"]) == tuple(latent["widgets_values"][:2])
    assert (encode["width"], encode["height"]) == (ours_latent["width"], ours_latent["height"])
    assert ours_latent["length"] == int(fps[0] * fps[1]) + 1  # the template's floor(a * b) + 1
    (negative,) = [n["widgets_values"][0] for n in nodes.values() if "Negative" in (n.get("title") or "")]
    assert api[api[samplers_of(api)[0]]["inputs"]["negative"][0]]["inputs"]["text"] == negative
    # Each expert: UNETLoader -> Apply -> ModelSamplingSD3 (the template's shift) -> its KSamplerAdvanced.
    (shift,) = {n["widgets_values"][0] for n in nodes.values() if n["type"] == "ModelSamplingSD3"}
    samplers = samplers_of(api)
    for loader, sampler, t_sampler in zip(("1", "2"), samplers, (t_high, t_low), strict=True):
        ms = api[sampler]["inputs"]["model"][0]
        apply = api[ms]["inputs"]["model"][0]
        assert api[ms]["class_type"] == "ModelSamplingSD3" and [api[ms]["inputs"]["shift"]] == pytest.approx([shift])
        assert api[apply]["class_type"] == "CustomVideoXApply" and api[apply]["inputs"]["model"] == [loader, 0]
        assert api[apply]["inputs"]["reference"] == [nodes_of(api, "CustomVideoXReferenceEncode"), 0]
        assert api[apply]["inputs"]["schedule"] == [nodes_of(api, "CustomVideoXTABSchedule"), 0]
        want = _sampler_values(nodes, links, t_sampler)
        got = {k: v for k, v in zip(KSA_WIDGETS, ui[int(sampler)]["widgets_values"], strict=True)}
        if want["start_at_step"] > 0:  # the low-noise sampler runs to the end: the template's steps, our 10000
            assert got["end_at_step"] >= want["steps"] == want["end_at_step"]
            got["end_at_step"] = want["end_at_step"]
        assert {k: v for k, v in got.items() if "seed" not in k and "control" not in k} == \
               {k: v for k, v in want.items() if "seed" not in k and "control" not in k}, (sampler, got, want)
    assert api[samplers[1]]["inputs"]["latent_image"] == [samplers[0], 0]
    assert api[nodes_of(api, "CustomVideoXTABSchedule")]["inputs"]["progress"] == "noise"


# ------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def tiny_a14b(wan_files) -> dict:
    """The shipped graph on the tiny files: the low-noise expert another tiny T2V file (seed 1), STEPS steps
    split at SPLIT, the reference encoded at the tiny video's size."""
    low = wan_files["wan_t2v"].parent / LOW_FILE
    if not low.exists():
        tw.save_safetensors(tw.build_wan_state_dict(seed=1), low)
    p = tiny_wan(NAME, wan_files["wan_t2v"], wan_files)
    (high_loader, low_loader) = sorted((n for n in p if p[n]["class_type"] == "UNETLoader"), key=int)
    assert "low" in wt.load_api(NAME)[low_loader]["inputs"]["unet_name"]
    p[low_loader]["inputs"]["unet_name"] = LOW_FILE
    p[nodes_of(p, "EmptyHunyuanLatentVideo")]["inputs"].update(SIZE)
    p[nodes_of(p, "CustomVideoXReferenceEncode")]["inputs"].update(width=SIZE["width"], height=SIZE["height"])
    high, low_s = samplers_of(p)
    p[high]["inputs"].update(steps=STEPS, end_at_step=SPLIT)
    p[low_s]["inputs"].update(steps=STEPS, start_at_step=SPLIT)
    return p




@pytest.fixture
def record_taus(monkeypatch):
    """τ of every biased model call as the patch reads it (the mode its TAB schedule asks for), with the patched
    model the call belongs to (its entries' identity: one per Apply node)."""
    from customvideox.cvx_host import frames_patch as fp
    from customvideox.cvx_host import options

    calls: list[tuple[int, float]] = []
    real = fp.call_progress

    def recording(transformer_options):
        progress_of = real(transformer_options)
        model = id(transformer_options[options.FRAMES_ENTRIES_KEY][0])

        def progress(mode: str) -> float:
            tau = progress_of(mode)
            calls.append((model, tau))
            return tau

        return progress

    monkeypatch.setattr(fp, "call_progress", recording)
    return calls


def _by_model(calls: list[tuple[int, float]]) -> list[list[float]]:
    """The calls' τ grouped by patched model, in order of first call (the high-noise expert runs first)."""
    groups: dict[int, list[float]] = {}
    for model, tau in calls:
        groups.setdefault(model, []).append(tau)
    return list(groups.values())


def _latent_only(p: dict) -> dict:
    p = {k: v for k, v in copy.deepcopy(p).items() if v["class_type"] not in ("VAEDecode", "CreateVideo", "SaveVideo")}
    p["99"] = {"class_type": "CVXTestSaveTensor", "inputs": {"value": [samplers_of(p)[1], 0], "name": "latent"}}
    return p


def _one_sampler(p: dict) -> dict:
    """The same graph sampled by the high-noise sampler alone, all STEPS steps (the curve's reference)."""
    p = copy.deepcopy(p)
    high, low = samplers_of(p)
    p[high]["inputs"].update(end_at_step=10000, return_with_leftover_noise="disable")
    p["99"]["inputs"]["value"] = [high, 0]
    del p[low]
    return p


def _with_progress(p: dict, progress: str) -> dict:
    p = copy.deepcopy(p)
    p[nodes_of(p, "CustomVideoXTABSchedule")]["inputs"]["progress"] = progress
    return p


def _split_and_whole(host, record_taus, p: dict) -> tuple[list[list[float]], list[float]]:
    """τ per call of the split run (per expert) and of the one-sampler run. A seed of its own makes the host run
    the samplers again rather than reuse an earlier test's cached outputs (τ depends on the sigmas only)."""
    p = copy.deepcopy(p)
    p[samplers_of(p)[0]]["inputs"]["noise_seed"] = next(SEEDS)
    host.run(p)
    split = _by_model(record_taus)
    record_taus.clear()
    host.run(_one_sampler(p))
    (whole,) = _by_model(record_taus)
    record_taus.clear()
    return split, whole


def _continues(split: list[list[float]], whole: list[float]) -> bool:
    """The split run's two experts together see exactly the one-sampler run's τ, call for call."""
    return len(split) == 2 and split[0] + split[1] == whole


def test_a14b_workflow_decodes_an_mp4(host, tiny_a14b, record_taus):
    high, low = samplers_of(tiny_a14b)
    encode, decode = nodes_of(tiny_a14b, "CustomVideoXReferenceEncode"), nodes_of(tiny_a14b, "VAEDecode")
    result = host.run(tiny_a14b, capture=[high, low, encode, decode])
    assert result.output(encode).family == "Wan2.1"
    assert_decoded(result, low, decode)
    # Both experts ran patched: the high-noise one up to the split, the low-noise one after it.
    experts = _by_model(record_taus)
    assert len(experts) == 2 and len(experts[0]) == len(experts[1]) >= STEPS - SPLIT, experts


def test_noise_progress_continues_the_curve_across_the_two_experts(host, tiny_a14b, record_taus):
    split, whole = _split_and_whole(host, record_taus, _latent_only(tiny_a14b))
    print("noise: high", split[0], "low", split[1], "one sampler", whole)
    assert _continues(split, whole), (split, whole)
    high, low = split
    assert whole[0] == 0.0 and all(a <= b for a, b in zip(whole, whole[1:]))
    assert low[0] > high[-1] > 0.0  # the low-noise expert picks up where the high-noise one stopped


def test_steps_progress_restarts_in_the_low_noise_sampler(host, tiny_a14b, record_taus):
    """Why the example uses noise progress: with steps progress the same graph restarts the curve."""
    split, whole = _split_and_whole(host, record_taus, _with_progress(_latent_only(tiny_a14b), "steps"))
    print("steps: high", split[0], "low", split[1], "one sampler", whole)
    assert not _continues(split, whole)
    assert split[0][0] == 0.0 and split[1][0] == 0.0
