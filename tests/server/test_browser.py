"""The pack in the real ComfyUI web UI (comfyui-frontend-package), driven in Debian's headless Chromium.

One real server (the session ``server`` fixture: ``main.py --cpu`` on a free loopback port with this pack,
the test-only nodes and the tiny models) and one browser page for the whole module. For each UI-format
workflow in ``workflows/ui``:

(a) the shipped file, loaded as drag-and-drop loads it (``app.loadGraphData``): no missing node types, no
    node the frontend marks red other than the users' own files it cannot find here (model files, the
    reference photo), every node and link kept, and the prompt the UI would queue is exactly
    ``workflows/api/<name>.json`` (this checks the converter's widget order against the real frontend);
(b) its tiny variant (same node ids, positions, titles and links; tiny model files and sizes, test nodes
    in place of T5 and the photo): no error of any kind in the frontend, queued with the Run button, the
    run succeeds, the server received exactly ``workflow_tools.tiny_variant`` of the API file, and the
    SaveVideo node's <video> preview plays the mp4 (decoded by the browser, at the tiny size).

Also: the pack's nodes in the node search box under ``CustomVideoX``, with the tooltips the canvas shows on
hover; and the TAB plot and ERAE map previews (PreviewImage / MaskPreview) rendered in the UI.

Screenshots go to ``test-artifacts/browser/``; with ``CVX_UPDATE_SCREENSHOTS=1`` the README's screenshots
in ``docs/screenshots/`` are rewritten too. Only where Chromium cannot be installed
(``scripts/install_browser.sh``) does the module skip, with the reason in the summary; under ``CI=true`` it
fails instead.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import workflow_tools as wt
import workflow_ui  # noqa: E402  (scripts/)
from harness.browser import (
    INSTALL_SCRIPT,
    Chromium,
    ComfyUIPage,
    browser_required,
    find_chromium,
    save_small_png,
    tiny_ui_variant,
)
from harness.host import PACK_LINK, PACK_NODE_IDS, REPO_ROOT, ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

# As in test_workflows.py: 3:2, multiples of 16, 4n+1 frames; the VAE decode dominates the run time.
TINY = {"width": 48, "height": 32, "length": 9, "steps": 2}
IMAGE_SIZE = (96, 64)  # the stand-in reference photo (CVXTestImage)
SAVE_PREFIX = "cvx_browser"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
DOCS_SHOTS = REPO_ROOT / "docs" / "screenshots"
UPDATE_SHOTS = os.environ.get("CVX_UPDATE_SCREENSHOTS") == "1"
MAIN_WORKFLOW = "subject_to_video_void"
UI_WORKFLOWS = sorted(p.stem for p in wt.UI_DIR.glob("*.json") if p.stem not in wt.API_ONLY_NAMES)  # Wan: CogVideoX tiny variant
# The users' files a shipped workflow names and this machine lacks: the frontend flags exactly these.
USER_FILE_WIDGETS = {(t, w) for t, w in wt.FILE_INPUTS}
PACK_MODULE = f"custom_nodes.{PACK_LINK.name}"


def _chromium_or_skip() -> str:
    """Chromium's path; where there is none, try the installer once (``make setup`` runs it). Where that fails,
    on CI (``CI=true``) the run fails; elsewhere this whole module skips, loudly: on stderr, as a warning and
    in the skip summary (-ra)."""
    path, why = find_chromium()
    if path is None and INSTALL_SCRIPT.is_file():
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, timeout=900)
        path, why = find_chromium()
    if path is None and browser_required():
        pytest.fail(f"BROWSER TEST FAILED: CI is set and there is no Chromium, so the web UI cannot be tested: {why}",
                    pytrace=False)
    if path is None:
        msg = f"BROWSER TEST SKIPPED (the web UI is NOT tested): {why}"
        sys.__stderr__.write(f"\n{'!' * 100}\n!!! {msg}\n{'!' * 100}\n")
        warnings.warn(msg, pytest.PytestWarning, stacklevel=2)
        pytest.skip(msg, allow_module_level=True)
    return path


CHROMIUM_BINARY = _chromium_or_skip()


@pytest.fixture(scope="module")
def object_info(server: ServerProcess) -> dict[str, Any]:
    return server.object_info()


@pytest.fixture(scope="module")
def page(server: ServerProcess, tiny_models) -> Iterator[ComfyUIPage]:
    browser = Chromium(binary=CHROMIUM_BINARY).start()
    try:
        yield ComfyUIPage(browser, server.base_url).open()
    finally:
        if browser.exceptions:
            print(f"uncaught exceptions in the page: {browser.exceptions}")
        browser.close()


def _shot(page: ComfyUIPage, name: str, docs_name: str | None = None, clip: dict[str, float] | None = None) -> Path:
    path = page.b.screenshot(ARTIFACTS / f"{name}.png", clip=clip)
    if docs_name and UPDATE_SHOTS:
        save_small_png(path, DOCS_SHOTS / f"{docs_name}.png")
    return path


def _no_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(prompt)
    for node in out.values():
        node.pop("_meta", None)
    return out


def _describe(state: dict[str, Any]) -> str:
    keys = ("alerts", "missing_nodes", "missing_models", "missing_media", "node_errors", "prompt_error", "execution_error",
            "total_errors")
    red = [n for n in state["nodes"] if n["has_errors"] or not n["registered"]]
    return json.dumps({**{k: state[k] for k in keys}, "red_or_unknown_nodes": red}, indent=1)


def _assert_clean(state: dict[str, Any], what: str) -> None:
    ui_only = wt.UI_ONLY_TYPES
    unknown = [n for n in state["nodes"] if not n["registered"] and n["type"] not in ui_only]
    red = [n for n in state["nodes"] if n["has_errors"]]
    assert not (state["alerts"] or state["missing_nodes"] or unknown or red or state["missing_models"] or state["missing_media"]
                or state["node_errors"] or state["prompt_error"] or state["execution_error"]
                or state["total_errors"]), f"{what}: the web UI reports problems:\n{_describe(state)}"


# ------------------------------------------------------------------------------------------ workflows
def _assert_queues_api(name: str, queued: dict[str, Any], api: dict[str, Any], object_info: dict[str, Any]) -> None:
    """The frontend's own graph-to-prompt result equals the API file: the same nodes, links and values; an
    input the API file leaves out must be queued at the default the node's schema declares (read from
    /object_info as is, not through the converter that wrote the UI files)."""
    queued = _no_meta(queued)
    assert {k: v["class_type"] for k, v in queued.items()} == {k: v["class_type"] for k, v in api.items()}, name
    for nid, node in api.items():
        got = queued[nid]["inputs"]
        for key, value in node["inputs"].items():
            assert got.get(key) == value, f"{name}: node {nid} ({node['class_type']}) input {key}: UI queues " \
                                          f"{got.get(key)!r}, workflows/api has {value!r}"
        info = object_info[node["class_type"]]["input"]
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for key in set(got) - set(node["inputs"]):
            spec = specs.get(key.split(".")[0])
            assert spec is not None and len(spec) > 1 and "default" in spec[1], \
                f"{name}: node {nid} queues {key}={got[key]!r}, which workflows/api and the schema lack"
            if "." not in key:  # a dynamic combo's sub-input: its default sits in the chosen option
                assert got[key] == spec[1]["default"], f"{name}: node {nid} {key}={got[key]!r} is not the " \
                                                       f"schema default {spec[1]['default']!r}"


def test_graph_to_prompt_of_every_ui_file_is_the_api_file(page: ComfyUIPage, object_info: dict[str, Any]) -> None:
    """Each UI file (workflows/ui and the templates copy), loaded in the real web UI, queues exactly its
    workflows/api graph according to the frontend's own ``app.graphToPrompt``."""
    for folder in (wt.UI_DIR, wt.EXAMPLES_DIR):
        for name in (*UI_WORKFLOWS, *wt.API_ONLY_NAMES):  # the Wan examples too (they run in test_wan_e2e)
            page.load(wt.load_ui(name, folder), name=f"{name}.json")
            _assert_queues_api(f"{folder.name}/{name}", page.graph_to_prompt(), wt.load_api(name), object_info)


def _assert_loads_clean(page: ComfyUIPage, name: str, shipped: dict[str, Any], object_info: dict[str, Any]) -> None:
    """The shipped UI file, dropped on the canvas: no alert, no missing node type, exactly the users' own files
    (models, photos) flagged, no other red node, every node and link kept, and it queues its API graph."""
    state = page.load(shipped, name=f"{name}.json")
    _shot(page, f"{name}_shipped")
    assert not state["alerts"], f"{name}: the UI shows alerts (workflow schema validation, errors):\n{_describe(state)}"
    unknown = [n for n in state["nodes"] if not n["registered"] and n["type"] not in wt.UI_ONLY_TYPES]
    assert not state["missing_nodes"] and not unknown, f"{name}: missing node types:\n{_describe(state)}"
    # Exactly the users' files (model files, the reference photo) this machine lacks are flagged.
    flagged = {(m["node"], m["widget"]) for m in state["missing_models"] + state["missing_media"]}
    user_files = {(str(n["id"]), w) for n in shipped["nodes"] for t, w in USER_FILE_WIDGETS if n["type"] == t}
    assert flagged == user_files, (
        f"{name}: the UI should flag exactly the users' files {sorted(user_files)}:\n{_describe(state)}")
    file_nodes = {m["node"] for m in state["missing_models"] + state["missing_media"]}
    red = [n for n in state["nodes"] if n["has_errors"] and n["id"] not in file_nodes]
    assert not red, f"{name}: red nodes beyond the missing user files:\n{_describe(state)}"
    assert not (state["node_errors"] or state["prompt_error"] or state["execution_error"]), _describe(state)
    assert sorted(n["id"] for n in state["nodes"]) == sorted(str(n["id"]) for n in shipped["nodes"])
    assert sorted(map(tuple, state["links"])) == sorted(map(tuple, shipped["links"])), (
        f"{name}: the frontend dropped or changed links on load")
    _assert_queues_api(name, page.graph_to_prompt(), wt.load_api(name), object_info)


@pytest.mark.parametrize("name", wt.API_ONLY_NAMES)
def test_wan_workflow_loads_without_red_nodes(name: str, page: ComfyUIPage, object_info: dict[str, Any]) -> None:
    """The Wan examples as a user drops them on the canvas (they run on tiny models in tests/host: their tiny
    variants need the tiny Wan files, not the CogVideoX ones this module's run uses)."""
    _assert_loads_clean(page, name, wt.load_ui(name), object_info)


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_loads_queues_and_shows_video(name: str, page: ComfyUIPage, server: ServerProcess,
                                               object_info: dict[str, Any], tiny_models) -> None:
    shipped = wt.load_ui(name)

    # (a) the shipped file, as a user drops it on the canvas
    _assert_loads_clean(page, name, shipped, object_info)

    # (b) the tiny variant, queued with the Run button
    tiny = tiny_ui_variant(shipped, object_info, tiny_models.unet, tiny_models.vae, save_prefix=SAVE_PREFIX,
                           image_size=IMAGE_SIZE,
                           **TINY)
    state = page.load(tiny, name=f"{name} (tiny test model).json")
    _assert_clean(state, f"{name} (tiny variant) after load")
    run = page.queue_and_wait(timeout=600)
    state = page.state()
    assert run["status"] == "execution_success", (
        f"{name}: the run ended with {run['status']}:\n{_describe(state)}\nevents: {run['events'][-5:]}")
    _assert_clean(state, f"{name} (tiny variant) after the run")

    history = server.get_json(f"/history/{run['prompt_id']}")[run["prompt_id"]]
    expected = wt.with_defaults(wt.tiny_variant(wt.load_api(name), tiny_models.unet, tiny_models.vae,
                                                save_prefix=SAVE_PREFIX, image_size=IMAGE_SIZE, **TINY),
                                object_info)
    assert _no_meta(history["prompt"][2]) == _no_meta(expected), (
        f"{name}: the server got another graph from the UI than tiny_variant(workflows/api/{name}.json)")

    save_nodes = [n["id"] for n in tiny["nodes"] if n["type"] == "SaveVideo"]
    assert save_nodes, f"{name} has no SaveVideo node"
    outputs = page.node_outputs()
    files = [img["filename"] for nid in save_nodes for img in (outputs.get(str(nid)) or {}).get("images", [])]
    assert files and all(f.endswith(".mp4") for f in files), f"{name}: SaveVideo shows no mp4 in the UI: {outputs}"
    page.fit_view()
    stitched = any(n["type"] == "ImageStitch" for n in tiny["nodes"])
    want = (TINY["width"] * (2 if stitched else 1), TINY["height"])
    page.b.wait_for(
        "Array.from(document.querySelectorAll('video')).some(v => v.readyState >= 2 && "
        f"(v.currentSrc || v.src).includes({json.dumps(files[0])}))",
        timeout=60, what=f"the {files[0]} preview to load in a <video>")
    videos = [v for v in page.videos() if files[0] in v["src"]]
    assert any(v["shown"] and v["error"] is None and (v["width"], v["height"]) == want for v in videos), (
        f"{name}: no visible, decoded {want[0]}x{want[1]} <video> for {files[0]}: {videos}")
    _shot(page, name)
    if name == MAIN_WORKFLOW:  # the README's screenshot: the whole graph, larger
        path = page.graph_screenshot(ARTIFACTS / f"{name}_graph.png")
        if UPDATE_SHOTS:
            save_small_png(path, DOCS_SHOTS / f"{name}.png")


def test_ui_checks_detect_broken_workflows(page: ComfyUIPage) -> None:
    """The detectors the tests above rely on fire here: an unknown node type is reported missing and a
    malformed link fails the frontend's workflow schema validation (an alert)."""
    broken = copy.deepcopy(wt.load_ui(MAIN_WORKFLOW))
    broken["nodes"][0]["type"] = "CVXNoSuchNode"
    broken["links"][0] = broken["links"][0][:3]
    state = page.load(broken, name="broken.json")
    assert [m.get("type") for m in state["missing_nodes"]] == ["CVXNoSuchNode"], _describe(state)
    assert any("zod" in a.lower() or "invalid workflow" in a.lower() for a in state["alerts"]), _describe(state)


# ------------------------------------------------------------------------------------------ nodes
def test_pack_nodes_in_search_with_tooltips(page: ComfyUIPage, object_info: dict[str, Any]) -> None:
    pack = {k: v for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    assert set(PACK_NODE_IDS) <= set(pack), f"pack nodes missing from /object_info: {set(PACK_NODE_IDS) - set(pack)}"

    # The search box, typed into as a user does.
    rows = page.search_nodes("CustomVideoX")
    _shot(page, "node_search")
    for node_id, info in pack.items():
        hits = [r for r in rows if r and r[0] == info["display_name"]]
        assert hits, f"{node_id} ({info['display_name']!r}) not among the search results {[r[0] for r in rows]}"
        assert "CustomVideoX" in hits[0][1:], f"{node_id}: search shows category {hits[0][1:]}, not CustomVideoX"

    problems: list[str] = []
    for node_id, info in pack.items():
        # The frontend's definition: category, description and every input's tooltip, as the server sent them.
        d = page.node_def(node_id)
        assert d is not None, f"{node_id} is not in the frontend's node definitions"
        if d["category"] != "CustomVideoX":
            problems.append(f"{node_id}: category {d['category']!r}")
        if not (d["description"] or "").strip():
            problems.append(f"{node_id}: no description")
        want = {n: (s[1] if len(s) > 1 and isinstance(s[1], dict) else {}).get("tooltip")
                for sec in ("required", "optional") for n, s in (info["input"].get(sec) or {}).items()}
        for inp, tip in want.items():
            if not tip:
                problems.append(f"{node_id}.{inp}: no tooltip in the schema")
            elif (d["inputs"].get(inp) or {}).get("tooltip") != tip:
                problems.append(f"{node_id}.{inp}: the frontend has tooltip {d['inputs'].get(inp)!r}")

        # What the canvas shows on hover: the title gives the description, widgets and sockets their tooltip.
        spots = page.place_node(node_id)
        shown = page.hover_tooltip(*spots["title"])
        if " ".join(shown.split()) != " ".join(d["description"].split()):
            problems.append(f"{node_id}: hovering the title shows {shown!r}")
        hovered = {**spots["widgets"], **spots["sockets"]}
        if not hovered:
            problems.append(f"{node_id}: no widget or socket to hover")
        for inp, (x, y) in hovered.items():
            shown = page.hover_tooltip(x, y)
            if want.get(inp) and " ".join(shown.split()) != " ".join(want[inp].split()):
                problems.append(f"{node_id}.{inp}: hovering shows {shown!r}, expected {want[inp]!r}")
        if node_id == "CustomVideoXApply":
            _shot(page, "tooltip_apply")
    assert not problems, "node search / tooltip problems:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------ previews
def _previews_workflow(object_info: dict[str, Any]) -> dict[str, Any]:
    """TAB schedule -> PreviewImage (its plot) and ERAE region (mask mode) -> MaskPreview (its map)."""
    api = {
        "1": {"class_type": "CustomVideoXTABSchedule", "_meta": {"title": "TAB schedule (parabolic)"},
              "inputs": {"curve": "parabolic", "b_min": 0.0, "b_max": 1.0, "start_percent": 0.0,
                         "end_percent": 1.0, "outside": "base", "keyframes": "0:0, 0.5:1, 1:0"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}, "_meta": {"title": "TAB plot"}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 720, "height": 480}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 320, "height": 320}},
        "5": {"class_type": "MaskComposite", "inputs": {"destination": ["3", 0], "source": ["4", 0], "x": 200,
                                                        "y": 120, "operation": "add"}},
        "6": {"class_type": "CustomVideoXEntityRegion", "_meta": {"title": "ERAE region (mask)"},
              "inputs": {"mode": "mask", "lam": 1.0, "map_block": 2, "refine": "soft", "top_k": 0.25, "smooth": 0,
                         "mask": ["5", 0]}},
        "7": {"class_type": "MaskPreview", "inputs": {"mask": ["6", 1]}, "_meta": {"title": "ERAE map"}},
    }
    ui = workflow_ui.api_to_ui(api, object_info, "previews")
    layout = {1: ([40, 60], None), 2: ([420, 60], [560, 380]), 3: ([40, 520], None), 4: ([40, 700], None),
              5: ([420, 520], None), 6: ([780, 520], None), 7: ([1160, 520], [480, 380])}
    for node in ui["nodes"]:
        pos, size = layout[node["id"]]
        node["pos"] = pos
        if size:
            node["size"] = size
    ui["extra"]["ds"] = {"scale": 1.0, "offset": [0, 0]}
    return ui


def test_tab_plot_and_erae_map_previews(page: ComfyUIPage, object_info: dict[str, Any]) -> None:
    state = page.load(_previews_workflow(object_info), name="TAB plot and ERAE map.json")
    _assert_clean(state, "previews workflow after load")
    run = page.queue_and_wait(timeout=120)
    assert run["status"] == "execution_success", f"previews run: {run['status']}: {_describe(page.state())}"
    page.fit_view()
    _shot(page, "previews")
    page.b.wait_for("['2', '7'].every(id => { const n = app.graph.getNodeById(id);"
                    " return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth); })",
                    timeout=30, what="the preview images to load")

    plot, = page.node_images("2")
    assert plot["tag"] == "IMG" and plot["width"] > 100 and plot["height"] > 50, plot
    # A white chart with a dark curve and axes: mostly white, not blank.
    assert 0.5 < plot["white"] < 0.999, f"the TAB plot preview looks blank or wrong: {plot}"
    erae, = page.node_images("7")
    assert erae["tag"] == "IMG" and (erae["width"], erae["height"]) == (720, 480), erae
    box = 320 * 320 / (720 * 480)  # the white 320x320 box on the 720x480 black canvas
    assert abs(erae["white"] - box) < 0.01 and abs(erae["black"] - (1 - box)) < 0.01, (
        f"the ERAE map preview is not the 320x320 box (white {box:.3f}): {erae}")
    for node_id in ("2", "7"):  # and the canvas draws them inside the nodes
        rect = page.node_screen_rect(node_id)
        assert page.canvas_bright_fraction(rect) > 0.05, f"node {node_id}'s preview is not drawn on the canvas"
    # The README's crop: the schedule and its plot at 100 % zoom (the pack's badge sits above the title).
    page.b.js("app.canvas.ds.scale = 1; app.canvas.ds.offset = [40, 80]; app.canvas.setDirty(true, true);"
              "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    tab, plot_rect = page.node_screen_rect("1"), page.node_screen_rect("2")
    pad, badge = 12, 24
    clip = {"x": tab["x"] - pad, "y": tab["y"] - pad - badge,
            "width": plot_rect["x"] + plot_rect["width"] - tab["x"] + 2 * pad,
            "height": max(tab["height"], plot_rect["height"]) + 2 * pad + badge}
    _shot(page, "tab_plot", docs_name="tab_plot", clip=clip)
