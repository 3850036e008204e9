"""The Wan example workflows' files (workflows/api, workflows/ui, example_workflows) against the host's
node schemas (a real server's /object_info) and the host's own VACE template.

(They run in tests/host/test_wan_e2e.py; tests/server/test_workflows.py covers the CogVideoX examples.)
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import workflow_tools as wt
import workflow_ui as wu

pytestmark = pytest.mark.server
TEMPLATE = "video_wan_vace_14B_ref2v"


@pytest.fixture(scope="module")
def object_info(server) -> dict[str, Any]:
    return server.object_info()


def nodes_of(api: dict, ctype: str) -> list[str]:
    return [nid for nid, n in api.items() if n["class_type"] == ctype]


def test_wan_ui_files_match_the_schemas_and_queue_the_api_graph(object_info):
    rendered = wu.render(object_info)
    for name in wu.WAN_DESCRIPTIONS:
        api = wt.load_api(name)
        # UNETLoader's file list is the user's (workflow_tools.FILE_INPUTS names only the CogVideoX loaders).
        errors = [e for e in wt.check_api(api, object_info) if "(UNETLoader): input 'unet_name'" not in e]
        assert not errors, "\n".join(errors)
        ui = wt.load_ui(name)
        errors = wt.check_ui(ui, object_info)
        assert not errors, "\n".join(errors)
        # That it queues exactly the API graph: the frontend's graphToPrompt, tests/server/test_browser.py.
        assert wt.example_path(name).read_bytes() == (wt.UI_DIR / f"{name}.json").read_bytes()
        assert rendered[name] == (wt.UI_DIR / f"{name}.json").read_text(encoding="utf-8"), (
            "out of date: run `python scripts/workflow_ui.py`")


def test_vace_example_is_the_host_template_with_the_bias_node_and_its_downloads():
    spec = find_spec("comfyui_workflow_templates_json")
    (path,) = [p for f in spec.submodule_search_locations for p in Path(f, "templates").glob(f"{TEMPLATE}.json")]
    template = {n["id"]: n for n in json.loads(path.read_text(encoding="utf-8"))["nodes"] if n.get("mode") == 0}
    api = wt.load_api("wan_vace_ref_tab")
    ui = {n["id"]: n for n in wt.load_ui("wan_vace_ref_tab")["nodes"]}
    # The template's active loaders (14B model, fp16 umT5, VAE): same files, same download entries.
    for ctype in ("UNETLoader", "CLIPLoader", "VAELoader"):
        (theirs,) = [n for n in template.values() if n["type"] == ctype]
        (ours,) = nodes_of(api, ctype)
        assert list(api[ours]["inputs"].values())[0] == theirs["widgets_values"][0]
        assert ui[int(ours)]["properties"]["models"] == theirs["properties"]["models"]
    (vace,) = nodes_of(api, "WanVaceToVideo")
    (bias,) = nodes_of(api, "CustomVideoXReferenceFramesBias")
    (trim,) = nodes_of(api, "TrimVideoLatent")
    (sampler,) = nodes_of(api, "KSampler")
    (shift,) = nodes_of(api, "ModelSamplingSD3")
    assert api[bias]["inputs"]["leading_frames"] == [vace, 3] == api[trim]["inputs"]["trim_amount"]  # trim_latent
    assert api[trim]["inputs"]["samples"] == [sampler, 0]
    assert api[sampler]["inputs"]["model"] == [shift, 0] and api[shift]["inputs"]["model"] == [bias, 0]
    assert wt.is_link(api[vace]["inputs"]["reference_image"]) and wt.is_link(api[bias]["inputs"]["reference_mask"])
    (t_vace,) = [n for n in template.values() if n["type"] == "WanVaceToVideo"]
    assert [api[vace]["inputs"][k] for k in ("width", "height", "length")] == t_vace["widgets_values"][:3]
