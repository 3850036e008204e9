"""The shipped example workflows (workflows/api, workflows/ui, example_workflows) against the real host.

(i)   every API workflow passes the host's own ``execution.validate_prompt`` (only the users' model file
      names may be missing here) and a schema check against the server's ``/object_info`` that also
      catches inputs the schema no longer has; every UI workflow has known node types, the widget value
      count of each node's schema and consistent links (that it queues exactly the API graph is checked
      by the web UI's own graphToPrompt: tests/server/test_browser.py);
(ii)  every workflow, shrunk to the tiny models (tests/workflow_tools.py ``tiny_variant``), runs through
      the in-process executor: finite latents and frames of the right shape, a decodable h264 mp4 with
      the right frame count and size;
(iii) the main workflow (a) also runs through the real server (``main.py``, HTTP + websocket): the
      websocket shows the sampler's progress, the mp4 decodes;
(iv)  the host lists the examples under its templates browser and serves them.
"""

from __future__ import annotations

import copy
import json
import shutil
import urllib.parse
from typing import Any

import pytest
import torch
import workflow_tools as wt
import workflow_ui  # noqa: E402  (scripts/)
from harness.host import HOST_DIR, PACK_LINK, REPO_ROOT, HostEnv, InProcessHost, ServerProcess

# Tiny run size: 3:2 like the shipped 720x480, multiples of 16, 4n+1 frames. The host's CogVideoX VAE has
# its full widths even in the tiny set (scripts/tiny_models.py), so decoding dominates the run time (~3-4 s
# per latent frame on 2 CPU cores): keep the video small. Not 5 frames: the host's VAE decodes 2 latent
# frames into 8 frames (3 -> 9, 13 -> 49 as expected), so 9 is the smallest length that round-trips.
TINY = {"width": 48, "height": 32, "length": 9, "steps": 2}
# The real-server run: the main workflow (a). The others run in-process only, through the same
# validate_prompt + PromptExecutor the server uses; each extra server run would add a full VAE decode.
SERVER_WORKFLOWS = ("subject_to_video_void",)
LATENT_SHAPE = (1, 16, (TINY["length"] - 1) // 4 + 1, TINY["height"] // 8, TINY["width"] // 8)
SAMPLERS = ("SamplerCustomAdvanced", "KSampler")
PACK_NODES = {
    "CustomVideoXModelLoader", "CustomVideoXReferenceEncode", "CustomVideoXApply", "CustomVideoXTABSchedule",
    "CustomVideoXEntityRegion",
}


def nodes_of(api: dict[str, Any], *types: str) -> list[str]:
    return sorted((nid for nid, n in api.items() if n["class_type"] in types), key=int)


def tiny(name: str, tiny_models, save_prefix: str) -> dict[str, Any]:
    return wt.tiny_variant(wt.load_api(name), tiny_models.unet, tiny_models.vae, save_prefix=save_prefix, **TINY)


def expected_video_size(api: dict[str, Any]) -> tuple[int, int]:
    """The mp4's width x height for the tiny run: side by side (ImageStitch) doubles the width."""
    stitched = bool(nodes_of(api, "ImageStitch"))
    return TINY["width"] * (2 if stitched else 1), TINY["height"]


@pytest.fixture(scope="session")
def object_info(server: ServerProcess) -> dict[str, Any]:
    return server.object_info()


@pytest.fixture(scope="session")
def example_image(host_env: HostEnv) -> str:
    """The host's own input/example.png (shipped with every ComfyUI), which the workflows' LoadImage
    names, in the in-process host's input folder, as in a real install."""
    shutil.copy(HOST_DIR / "input" / "example.png", host_env.input_dir / "example.png")
    return "example.png"


# ---------------------------------------------------------------------------------------------- (i)
def test_workflow_files_complete_and_core_only() -> None:
    names = set(wt.WORKFLOW_NAMES)
    for folder in (wt.API_DIR, wt.UI_DIR, wt.EXAMPLES_DIR):
        api_only = {wt.example_path(n).stem if folder == wt.EXAMPLES_DIR else n for n in wt.API_ONLY_NAMES}
        found = {p.stem for p in folder.glob("*.json")} - api_only
        want = {wt.example_path(n).stem for n in names} if folder == wt.EXAMPLES_DIR else names
        assert found == want, f"{folder.relative_to(REPO_ROOT)}: {sorted(found)} != {sorted(want)}"
    # The host also serves a pack's `workflows/` folder as templates: loose JSON there would be listed twice.
    assert not list((REPO_ROOT / "workflows").glob("*.json"))
    for name in wt.WORKFLOW_NAMES:
        api = wt.load_api(name)
        types = {n["class_type"] for n in api.values()}
        assert types <= wt.CORE_NODE_TYPES | PACK_NODES, f"{name}: not core/pack: {types - wt.CORE_NODE_TYPES}"
        for required in ("CustomVideoXModelLoader", "CLIPLoader", "CLIPTextEncode", "VAELoader", "LoadImage",
                         "CustomVideoXReferenceEncode", "CustomVideoXApply", "EmptyHunyuanLatentVideo",
                         "VAEDecode", "CreateVideo", "SaveVideo"):
            assert required in types, f"{name} lacks {required}"
        for nid in nodes_of(api, "CLIPLoader"):
            assert api[nid]["inputs"]["type"] == "cogvideox"
        for nid in nodes_of(api, "SaveVideo"):
            assert (api[nid]["inputs"]["format"], api[nid]["inputs"]["codec"]) == ("mp4", "h264")
        # Shipped size: CogVideoX's native 720x480, 49 frames (4n+1); references encoded at the video size.
        for nid in nodes_of(api, "EmptyHunyuanLatentVideo"):
            v = api[nid]["inputs"]
            assert (v["width"], v["height"], v["length"]) == (720, 480, 49)
        for nid in nodes_of(api, "CustomVideoXReferenceEncode"):
            assert (api[nid]["inputs"]["width"], api[nid]["inputs"]["height"]) == (720, 480)
    void = {n["class_type"] for n in wt.load_api("subject_to_video_void").values()}
    assert {"VOIDSampler", "CFGGuider", "BasicScheduler", "RandomNoise", "SamplerCustomAdvanced"} <= void
    ks = wt.load_api("subject_to_video_ksampler")
    msd = [ks[n]["inputs"] for n in nodes_of(ks, "ModelSamplingDiscrete")]
    assert msd == [{"model": msd[0]["model"], "sampling": "v_prediction", "zsnr": True}]
    assert all(ks[n]["inputs"]["model"] == [nodes_of(ks, "ModelSamplingDiscrete")[0], 0]
               for n in nodes_of(ks, "KSampler"))
    tab = wt.load_api("tab_vs_fixed")
    curves = sorted(tab[n]["inputs"]["curve"] for n in nodes_of(tab, "CustomVideoXTABSchedule"))
    assert curves == ["fixed", "parabolic"] and len(nodes_of(tab, "SamplerCustomAdvanced")) == 2
    # The paper's comparison: a fixed bias against a parabola of the same mean (mean of 4t(1-t) is 2/3).
    means = {tab[n]["inputs"]["curve"]: tab[n]["inputs"]["b_max"] if tab[n]["inputs"]["curve"] == "fixed" else
             tab[n]["inputs"]["b_min"] + (tab[n]["inputs"]["b_max"] - tab[n]["inputs"]["b_min"]) * 2 / 3
             for n in nodes_of(tab, "CustomVideoXTABSchedule")}
    assert abs(means["fixed"] - means["parabolic"]) < 1e-9, means
    assert len({tuple(tab[n]["inputs"]["noise"]) for n in nodes_of(tab, "SamplerCustomAdvanced")}) == 1
    two = wt.load_api("two_references")
    applies = nodes_of(two, "CustomVideoXApply")
    assert len(applies) == 2 and len(nodes_of(two, "LoadImage")) == 2
    assert two[applies[1]]["inputs"]["model"] == [applies[0], 0]  # chained: the second patches the first
    assert len({two[a]["inputs"]["strength"] for a in applies}) == 2
    erae = wt.load_api("erae_mask")
    (region,) = nodes_of(erae, "CustomVideoXEntityRegion")
    assert erae[region]["inputs"]["mode"] == "mask" and wt.is_link(erae[region]["inputs"]["mask"])


@pytest.mark.parametrize("name", wt.WORKFLOW_NAMES)
def test_api_workflow_validates_in_host(name: str, host: InProcessHost, example_image: str) -> None:
    """The host's own validation: every node, input, link type and value; only the users' model files
    (not on this machine) may be reported missing."""
    import execution

    api = wt.load_api(name)
    valid, error, outputs, node_errors = host.loop.run_until_complete(
        execution.validate_prompt("validate-" + name, copy.deepcopy(api), None)
    )
    unexpected = []
    for nid, entry in node_errors.items():
        for err in entry["errors"]:
            key = (api[nid]["class_type"], err.get("extra_info", {}).get("input_name"))
            if not (err["type"] == "value_not_in_list" and key in wt.FILE_INPUTS and key[0] != "LoadImage"):
                unexpected.append((nid, err))
    assert not unexpected, json.dumps(unexpected, indent=1, default=str)
    missing = {(api[nid]["class_type"], e["extra_info"]["input_name"]) for nid, en in node_errors.items()
               for e in en["errors"]}
    assert missing <= wt.FILE_INPUTS


@pytest.mark.parametrize("name", wt.WORKFLOW_NAMES)
def test_api_workflow_matches_object_info(name: str, object_info: dict[str, Any]) -> None:
    errors = wt.check_api(wt.load_api(name), object_info)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", wt.WORKFLOW_NAMES)
def test_ui_workflow_matches_object_info(name: str, object_info: dict[str, Any]) -> None:
    ui = wt.load_ui(name)
    errors = wt.check_ui(ui, object_info)
    assert not errors, "\n".join(errors)
    assert ui["version"] == 0.4 and ui["last_link_id"] == len(ui["links"])
    # That the UI file queues exactly the API graph is checked by the frontend's own graphToPrompt, in the
    # browser (tests/server/test_browser.py), not by a re-implementation of the converter's widget rules here.
    # The templates copy is the same file, and both are what the converter makes from the API file today.
    assert wt.example_path(name).read_bytes() == (wt.UI_DIR / f"{name}.json").read_bytes()
    fresh = workflow_ui.api_to_ui(wt.load_api(name), object_info, name)
    assert json.dumps(fresh, indent=2, ensure_ascii=False) + "\n" == (wt.UI_DIR / f"{name}.json").read_text(
        encoding="utf-8"
    ), "workflows/ui is out of date: run `python scripts/workflow_ui.py`"


def test_schema_checks_catch_renamed_inputs(host: InProcessHost, object_info: dict[str, Any]) -> None:
    """The checks above must fail when a node's interface changes under a shipped workflow."""
    import execution

    api = wt.load_api("subject_to_video_void")
    (apply_id,) = nodes_of(api, "CustomVideoXApply")
    renamed = copy.deepcopy(api)
    renamed[apply_id]["inputs"]["weight"] = renamed[apply_id]["inputs"].pop("strength")
    errors = wt.check_api(renamed, object_info)
    assert any("'weight' is not in the schema" in e for e in errors), errors
    assert any("required input 'strength' is missing" in e for e in errors), errors
    valid, _, _, node_errors = host.loop.run_until_complete(
        execution.validate_prompt("renamed", renamed, None)
    )
    assert not valid and apply_id in node_errors
    wrong_link = copy.deepcopy(api)
    wrong_link[apply_id]["inputs"]["reference"] = [nodes_of(api, "VAELoader")[0], 0]
    assert any("linked to a VAE output" in e for e in wt.check_api(wrong_link, object_info))
    bad_value = copy.deepcopy(api)
    bad_value[apply_id]["inputs"]["attention_mode"] = "three_way"
    assert any("'three_way' is not one of" in e for e in wt.check_api(bad_value, object_info))
    ui = wt.load_ui("subject_to_video_void")
    node = next(n for n in ui["nodes"] if n["type"] == "CustomVideoXApply")
    node["widgets_values"] = node["widgets_values"][:-1]
    assert any("widget values" in e for e in wt.check_ui(ui, object_info))
    unknown = copy.deepcopy(api)
    unknown[apply_id]["class_type"] = "CustomVideoXApplyV2"
    assert any("unknown node type" in e for e in wt.check_api(unknown, object_info))


# ---------------------------------------------------------------------------------------------- (ii)
@pytest.mark.parametrize("name", wt.WORKFLOW_NAMES)
def test_example_workflow_runs_in_process(name: str, host: InProcessHost, tiny_models) -> None:
    prompt = tiny(name, tiny_models, save_prefix="inproc")
    samplers = nodes_of(prompt, *SAMPLERS)
    decoders = nodes_of(prompt, "VAEDecode")
    (create,) = nodes_of(prompt, "CreateVideo")
    frames_src = prompt[create]["inputs"]["images"][0]
    result = host.run(prompt, capture=[*samplers, *decoders, frames_src])
    for nid in samplers:
        latent = result.output(nid)["samples"]
        assert tuple(latent.shape) == LATENT_SHAPE, (nid, tuple(latent.shape))
        assert torch.isfinite(latent).all(), f"sampler {nid} gave non-finite latents"
    for nid in decoders:
        image = result.output(nid)
        assert tuple(image.shape) == (TINY["length"], TINY["height"], TINY["width"], 3)
        assert torch.isfinite(image).all()
    w, h = expected_video_size(prompt)
    assert tuple(result.output(frames_src).shape) == (TINY["length"], h, w, 3)
    if len(samplers) == 2:  # TAB vs fixed: the two branches (same noise) must differ
        a, b = (result.output(n)["samples"] for n in samplers)
        assert not torch.equal(a, b), "TAB and fixed-bias branches gave identical latents"
    mp4s = [p for p in result.files if p.suffix == ".mp4"]
    assert len(mp4s) == 1, result.files
    assert wt.decode_mp4(mp4s[0]) == (TINY["length"], w, h, "h264")


# ---------------------------------------------------------------------------------------------- (iii)
@pytest.mark.parametrize("name", SERVER_WORKFLOWS)
def test_example_workflow_runs_on_server(name: str, server: ServerProcess, tiny_models) -> None:
    prompt = tiny(name, tiny_models, save_prefix="server")
    run = server.run(prompt, timeout=300)
    assert run.history["status"]["status_str"] == "success"
    executed = {m["node"] for m in run.of_type("executed")}
    assert nodes_of(prompt, "SaveVideo")[0] in executed
    for sampler in nodes_of(prompt, *SAMPLERS):
        progress = [m for m in run.of_type("progress") if m.get("node") == sampler]
        assert progress, f"no websocket progress from sampler {sampler}: {[m['type'] for m in run.messages]}"
        assert {m["max"] for m in progress} == {TINY["steps"]}
        assert max(m["value"] for m in progress) == TINY["steps"]
        assert all(m["prompt_id"] == run.prompt_id for m in progress)
    mp4s = [p for p in run.files if p.suffix == ".mp4"]
    assert len(mp4s) == 1, run.files
    w, h = expected_video_size(prompt)
    assert wt.decode_mp4(mp4s[0]) == (TINY["length"], w, h, "h264")


# ---------------------------------------------------------------------------------------------- (iv)
def test_templates_route_lists_examples(server: ServerProcess) -> None:
    listing = server.get_json("/api/workflow_templates")
    pack = PACK_LINK.name
    assert pack in listing, f"{pack} not in /api/workflow_templates: {sorted(listing)}"
    titles = [wt.example_path(n).stem for n in (*wt.WORKFLOW_NAMES, *wt.API_ONLY_NAMES) if wt.example_path(n).exists()]
    assert sorted(listing[pack]) == sorted(titles), listing[pack]  # each once, no duplicates
    for name in wt.WORKFLOW_NAMES:
        served = server.get_json(f"/api/workflow_templates/{pack}/{urllib.parse.quote(wt.example_path(name).name)}")
        assert served == wt.load_ui(name, wt.EXAMPLES_DIR)
