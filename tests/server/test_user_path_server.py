"""The user's path through the real server: NODES.md against /object_info, the templates in the browser."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import workflow_tools as wt
from harness.host import REPO_ROOT

UPDATE_SHOTS = os.environ.get("CVX_UPDATE_SCREENSHOTS") == "1"  # rewrite the shipped thumbnails
THUMB = 448  # px; the frontend's fallback thumbnail is 224 wide


@pytest.mark.server
def test_nodes_md_option_values_match_object_info(server) -> None:
    """Every combo of the pack's nodes: NODES.md lists exactly the option values /object_info gives."""
    info = server.object_info()
    text = (REPO_ROOT / "NODES.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    checked = 0
    for node_id, node in info.items():
        if not node_id.startswith("CustomVideoX") or node_id not in sections:
            continue
        rows = {m.group(1): m.group(2).strip() for m in
                re.finditer(r"^\| `([\w`, ]+)` \| ([^|]*) \|", sections[node_id], flags=re.M)}
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                options = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options") \
                    if spec[0] == "COMBO" else None
                if not options or name in ("model_name", "adapter_name", "lora_name"):
                    continue  # file lists depend on the machine
                row = next((v for k, v in rows.items() if name in re.split(r"[`, ]+", k)), None)
                assert row is not None, f"NODES.md {node_id}: no row for {name}"
                assert [v.strip() for v in row.split(" / ")] == [str(o) for o in options], (node_id, name, row, options)
                checked += 1
    assert checked >= 5, checked


@pytest.mark.server
@pytest.mark.slow
def test_templates_have_titles_thumbnails_and_no_overlapping_nodes(server, tmp_path: Path) -> None:
    from harness.browser import Chromium, ComfyUIPage, find_chromium, save_small_png

    binary, why = find_chromium()
    if binary is None:
        pytest.skip(f"no Chromium: {why}")
    shots = REPO_ROOT / "test-artifacts" / "user_path"
    browser = Chromium(binary=binary).start()
    try:
        page = ComfyUIPage(browser, server.base_url).open()
        for name in (*wt.WORKFLOW_NAMES, *wt.API_ONLY_NAMES):  # every template, the Wan ones included
            page.load(wt.load_ui(name, wt.EXAMPLES_DIR), name=name)
            rects = browser.js("""app.graph.nodes.map(n => { const m = n.computeSize(), th = LiteGraph.NODE_TITLE_HEIGHT;
                return [n.id, n.pos[0], n.pos[1] - th, Math.max(n.size[0], m[0]), Math.max(n.size[1], m[1]) + th]; })""")
            overlaps = [(a[0], b[0]) for i, a in enumerate(rects) for b in rects[i + 1:]
                        if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
            assert not overlaps, f"{name}: nodes overlap (ids): {overlaps}"
            shot = page.graph_screenshot(shots / f"{name}.png")
            if UPDATE_SHOTS:
                _thumbnail(shot, wt.example_path(name).with_suffix(".jpg"))
                if name == "subject_to_video_void":
                    save_small_png(shot, REPO_ROOT / "docs" / "screenshots" / "subject_to_video_workflow.png")
        page.command("Comfy.BrowseTemplates")
        browser.wait_for("""!!Array.from(document.querySelectorAll('[role=dialog] span'))
                         .find(e => e.textContent.trim() === 'comfyui-customvideox')""", what="the Extensions entry")
        browser.js("""Array.from(document.querySelectorAll('[role=dialog] span'))
                   .find(e => e.textContent.trim() === 'comfyui-customvideox').click(); true""")
        titles = sorted(wt.example_path(n).stem for n in (*wt.WORKFLOW_NAMES, *wt.API_ONLY_NAMES))
        # The dialog shows the thumbnails of the rows in view only: collect the cards while scrolling it down,
        # a step once the ones in view have loaded.
        cards = browser.wait_for(f"""(() => {{ const seen = window.__cvxCards = window.__cvxCards || {{}};
            const imgs = Array.from(document.querySelectorAll('[role=dialog] img'));
            for (const i of imgs) if (i.complete && i.naturalWidth > 0) seen[i.alt] = [i.naturalWidth, i.naturalHeight];
            if (imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0))
                for (const e of document.querySelectorAll('[role=dialog] *'))
                    if (e.scrollHeight > e.clientHeight + 1 && /auto|scroll/.test(getComputedStyle(e).overflowY))
                        e.scrollTop += e.clientHeight / 2;
            return Object.keys(seen).length >= {len(titles)} ? Object.entries(seen) : null; }})()""",
                                 what="the template cards")
        shown = {alt: size for alt, size in cards}
        assert sorted(shown) == titles, shown
        for title, size in shown.items():  # the frontend shows blob: URLs; our thumbnails are the square ones
            assert "void" not in title.lower() and size == [THUMB, THUMB], (title, size)
        browser.js("""for (const e of document.querySelectorAll('[role=dialog] *')) e.scrollTop = 0; true""")
        dialog = browser.screenshot(shots / "templates_extensions.png")
        if UPDATE_SHOTS:
            save_small_png(dialog, REPO_ROOT / "docs" / "screenshots" / "templates_extensions.png")
    finally:
        browser.close()


def _thumbnail(src: Path, dst: Path, size: int = THUMB) -> None:
    """The graph screenshot fitted into a square JPEG on the canvas colour (the dialog's cards are square)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size), im.getpixel((2, 2)))
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        canvas.save(dst, quality=85, optimize=True)
