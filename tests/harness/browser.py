"""Drive Debian's headless Chromium over the Chrome DevTools Protocol, for the web-UI test (test_browser.py).

Why raw CDP over ``websocket-client`` (already a pinned test tool) and not Selenium or Playwright:
nothing more to install (Selenium's current releases pin a ``certifi`` newer than the registry here
offers; the Python ``playwright`` package downloads its own browser, which fails here), no driver whose
version must match the browser, and the same protocol ChromeDriver and Playwright use underneath. The
test only needs four things, all one CDP call each: open a URL, run page JS (awaiting promises), read
console errors and uncaught exceptions, take a screenshot.

Chromium is started as this machine needs it (DESIGN.md §7): headless, no sandbox (root), no GPU,
no QUIC, no background networking, a fresh ``--user-data-dir`` per browser.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CVX_CHROMIUM", "/usr/bin/chromium")
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_browser.sh"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
]


class BrowserError(RuntimeError):
    pass


def browser_required(environ: dict[str, str] | None = None) -> bool:
    """Whether a missing Chromium must fail the run: on CI (``CI`` set to a true value, as every CI service
    sets it), where a skipped browser test would pass unseen. A local run skips, loudly."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def find_chromium() -> tuple[str | None, str]:
    """(path, '') when a runnable Chromium is here, else (None, why not)."""
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not path or not os.access(path, os.X_OK):
        return None, (f"no Chromium at {CHROMIUM}: `bash scripts/install_browser.sh` (run by `make setup`) "
                      "installs Debian's chromium + chromium-driver with apt-get; it could not here")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} --version failed: {e}"
    if out.returncode != 0:
        return None, f"{path} --version exited {out.returncode}: {out.stderr.strip()[-500:]}"
    return path, ""


class Chromium:
    """One headless Chromium process with one page, talked to over its DevTools websocket."""

    def __init__(self, width: int = 1600, height: int = 1000, binary: str = CHROMIUM) -> None:
        self.width, self.height, self.binary = width, height, binary
        self.user_dir = Path(tempfile.mkdtemp(prefix="cvx_chromium_"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: Any = None
        self._next_id = 0
        self.console_errors: list[str] = []
        self.console_warnings: list[str] = []
        self.exceptions: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> Chromium:
        import websocket  # websocket-client

        self.log_path = self.user_dir / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.user_dir}",
                 f"--window-size={self.width},{self.height}", "--remote-debugging-port=0",
                 "--remote-allow-origins=*", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        port_file = self.user_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"Chromium did not start: {self._log_tail()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = _get_json(f"http://127.0.0.1:{port}/json/list")
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                              suppress_origin=True, enable_multithread=False)
        self.cmd("Page.enable")
        self.cmd("Runtime.enable")
        self.cmd("Log.enable")
        self.cmd("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                 deviceScaleFactor=1, mobile=False)
        return self

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001  (closing a dead socket)
                pass
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.user_dir, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ protocol
    def cmd(self, method: str, wait: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send one CDP command and wait for its answer; events that arrive meanwhile are recorded."""
        self._next_id += 1
        msg_id = self._next_id
        self.ws.settimeout(wait)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + wait
        while True:
            if time.monotonic() > deadline:
                raise BrowserError(f"no answer to {method} in {wait:.0f} s")
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            self._on_event(msg)

    def _on_event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.exceptions.append(str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            (self.console_errors if params["type"] == "error" else self.console_warnings).append(text)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.console_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())

    # ------------------------------------------------------------------ page
    def goto(self, url: str, timeout: float = 60.0) -> None:
        self.cmd("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout=timeout, what=f"{url} to load")

    def mouse_move(self, x: float, y: float) -> None:
        self.cmd("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def type_text(self, text: str) -> None:
        """Type into the focused element as a keyboard would (an IME commit: one input event)."""
        self.cmd("Input.insertText", text=text)

    def press(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.cmd("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code)

    def js(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate ``expression`` in the page (awaiting a returned promise); return its JSON value."""
        res = self.cmd("Runtime.evaluate", wait=timeout + 5, expression=expression, awaitPromise=True,
                       returnByValue=True, userGesture=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            desc = d.get("exception", {}).get("description") or d.get("text")
            raise BrowserError(f"page JS failed: {desc}\n--- expression ---\n{expression[:2000]}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "", interval: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what or expression}")
            time.sleep(interval)

    def screenshot(self, path: Path | str, clip: dict[str, float] | None = None) -> Path:
        """A PNG of the viewport (or of ``clip``: x, y, width, height in CSS pixels)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": False}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.cmd("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode("utf-8"))


# ------------------------------------------------------------------------------- UI-format tiny variants
def _widget_names(info: dict[str, Any], values: list[Any]) -> list[str]:
    """The widget names of a UI node in ``widgets_values`` order (dynamic combos resolved by value)."""
    import workflow_tools as wt

    by_name: dict[str, Any] = {}
    names: list[str] = []
    for _ in range(8):
        names = wt.ui_widget_names(info, by_name)
        by_name = dict(zip(names, values))
    if len(names) != len(values):
        raise ValueError(f"{len(values)} widget values for the widgets {names}")
    return names


def set_widget(node: dict[str, Any], info: dict[str, Any], name: str, value: Any) -> None:
    names = _widget_names(info, node["widgets_values"])
    node["widgets_values"][names.index(name)] = value


def retype_node(ui: dict[str, Any], node: dict[str, Any], new_type: str, info: dict[str, Any],
                values: dict[str, Any]) -> None:
    """Turn UI node ``node`` into a ``new_type`` node in place: same id, position, size, title and
    output links (every linked output slot must exist in ``new_type`` with the same type); its input
    links are dropped from the links array (callers drop the nodes that fed them)."""
    import workflow_tools as wt

    for entry in node.get("inputs", []):
        if entry.get("link") is not None:
            ui["links"] = [lk for lk in ui["links"] if lk[0] != entry["link"]]
    new_outputs = []
    out_types = info.get("output", [])
    out_names = info.get("output_name") or out_types
    for slot, out in enumerate(node.get("outputs", [])):
        if out.get("links") and (slot >= len(out_types) or out_types[slot] != out["type"]):
            raise ValueError(f"node {node['id']} ({node['type']}): output {slot} ({out['type']}) is linked, but "
                             f"{new_type} has outputs {out_types}")
    for slot, out_type in enumerate(out_types):
        old = node["outputs"][slot] if slot < len(node.get("outputs", [])) else {}
        new_outputs.append({"name": out_names[slot], "type": out_type, "links": old.get("links"),
                            "slot_index": slot})
    inputs = []
    specs = wt.input_specs(info)
    for name, spec, _opt in specs:
        if not wt.is_widget(spec):
            inputs.append({"name": name, "type": wt.spec_type(spec), "link": None})
    for name, spec, _opt in specs:
        if wt.is_widget(spec):
            inputs.append({"name": name, "type": wt.spec_type(spec), "widget": {"name": name}, "link": None})
    names = wt.ui_widget_names(info, values)
    node.update(type=new_type, inputs=inputs, outputs=new_outputs,
                properties={"Node name for S&R": new_type},
                widgets_values=[values.get(n, "fixed" if n == "control_after_generate" else None) for n in names])


def tiny_ui_variant(ui: dict[str, Any], object_info: dict[str, Any], unet_name: str, vae_name: str,
                    width: int = 48, height: int = 32, length: int = 9, steps: int = 2, text_dim: int = 32,
                    text_length: int = 226, image_size: tuple[int, int] = (96, 64),
                    save_prefix: str | None = None) -> dict[str, Any]:
    """The UI-format counterpart of ``workflow_tools.tiny_variant``: the shipped UI workflow with the same
    node ids, positions, titles and links, made runnable on the tiny models:

    - model / VAE widgets -> the tiny files; the CLIPLoader is removed and every CLIPTextEncode becomes a
      ``CVXTestTextConditioning`` (random ``[1, text_length, text_dim]`` conditioning);
    - every LoadImage becomes a ``CVXTestImage`` (seeded by node id);
    - video width/height/length and sampler steps shrink; SaveVideo's prefix may move to ``save_prefix/``.
    """
    import copy

    ui = copy.deepcopy(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in list(ui["nodes"]):
        t = node["type"]
        info = object_info.get(t)
        if t == "CustomVideoXModelLoader":
            set_widget(node, info, "model_name", unet_name)
        elif t == "VAELoader":
            set_widget(node, info, "vae_name", vae_name)
        elif t == "CLIPLoader":
            for out in node.get("outputs", []):
                for link_id in out.get("links") or []:
                    lk = next(lk for lk in ui["links"] if lk[0] == link_id)
                    if nodes[lk[3]]["type"] != "CLIPTextEncode":
                        raise ValueError(f"CLIPLoader {node['id']} also feeds node {lk[3]} "
                                         f"({nodes[lk[3]]['type']}); the tiny variant cannot replace it")
            ui["nodes"].remove(node)  # the CLIPTextEncode nodes it feeds drop these links when retyped
        elif t == "CLIPTextEncode":
            retype_node(ui, node, "CVXTestTextConditioning", object_info["CVXTestTextConditioning"],
                        {"seed": 1000 + node["id"], "length": text_length, "dim": text_dim})
        elif t == "LoadImage":
            retype_node(ui, node, "CVXTestImage", object_info["CVXTestImage"],
                        {"seed": node["id"], "width": image_size[0], "height": image_size[1], "batch_size": 1})
        elif t in ("EmptyHunyuanLatentVideo", "CustomVideoXReferenceEncode"):
            set_widget(node, info, "width", width)
            set_widget(node, info, "height", height)
            if t == "EmptyHunyuanLatentVideo":
                set_widget(node, info, "length", length)
        elif t in ("BasicScheduler", "KSampler"):
            set_widget(node, info, "steps", steps)
        elif t == "SaveVideo" and save_prefix is not None:
            names = _widget_names(info, node["widgets_values"])
            i = names.index("filename_prefix")
            node["widgets_values"][i] = f"{save_prefix}/{node['widgets_values'][i].rsplit('/', 1)[-1]}"
    ids = {n["id"] for n in ui["nodes"]}
    dangling = [lk for lk in ui["links"] if lk[1] not in ids or lk[3] not in ids]
    if dangling:
        raise ValueError(f"links to removed nodes remain: {dangling}")
    return ui


# ------------------------------------------------------------------------------- the ComfyUI web UI
# The frontend's own state, read from its Pinia stores (comfyui-frontend-package 1.47, pinned by the host):
# the missing-node / missing-model / missing-media checks it runs on load, and the errors it shows.
_JS_PINIA = """(() => { if (!window.__cvxPinia) { for (const el of document.querySelectorAll('*')) {
  if (el.__vue_app__) { window.__cvxPinia = el.__vue_app__.config.globalProperties.$pinia; break; } } }
  return !!window.__cvxPinia; })()"""
_JS_STATE = """(() => { const st = id => { const s = window.__cvxPinia._s.get(id);
    if (!s) throw new Error('the frontend has no store ' + id); return s; };
  const plain = v => v == null ? null : JSON.parse(JSON.stringify(v));
  const g = app.graph, ser = g.serialize(), err = st('executionError'), mm = st('missingModel');
  const mn = st('missingNodesError').missingNodesError;
  return {
    nodes: g.nodes.map(n => ({id: String(n.id), type: n.type, title: n.title,
                              registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors})),
    links: ser.links.map(l => Array.isArray(l) ? l : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]),
    missing_nodes: ((mn && mn.nodeTypes) || []).map(t => typeof t === 'string' ? {type: t} : plain(t)),
    missing_models: (mm.missingModelCandidates || []).filter(c => c.isMissing !== false).map(c => ({
        node: String(c.nodeId), type: c.nodeType, widget: c.widgetName, name: c.name})),
    missing_media: (st('missingMedia').missingMediaCandidates || []).filter(c => c.isMissing !== false).map(c => ({
        node: String(c.nodeId), type: c.nodeType, widget: c.widgetName, name: c.name})),
    refreshing: !!mm.isRefreshingMissingModels,
    node_errors: plain(err.lastNodeErrors), prompt_error: plain(err.lastPromptError),
    execution_error: plain(err.lastExecutionError), total_errors: err.totalErrorCount,
    alerts: (window.__cvxAlerts || []).slice(),
  }; })()"""
# Graph (canvas) coordinates -> page CSS pixels: litegraph draws with scale(s) then translate(offset).
_JS_TO_PAGE = """((gx, gy) => { const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
  return [r.left + (gx + ds.offset[0]) * ds.scale, r.top + (gy + ds.offset[1]) * ds.scale]; })"""
_JS_VIEW_SETTLED = """new Promise(resolve => { let last = '', same = 0; const t0 = performance.now();
  const tick = () => { const ds = app.canvas.ds, k = ds.scale + ',' + ds.offset.join(',');
    same = k === last ? same + 1 : 0; last = k;
    if (same >= 6 || performance.now() - t0 > LIMIT_MS) resolve(true); else requestAnimationFrame(tick); };
  requestAnimationFrame(tick); })"""
_EVENTS = ["execution_start", "execution_cached", "executing", "executed", "execution_success", "execution_error",
           "execution_interrupted", "promptQueued"]
_TERMINAL = ["execution_success", "execution_error", "execution_interrupted"]


class ComfyUIPage:
    """The real ComfyUI web UI (served by a host on 127.0.0.1) in a headless Chromium page."""

    def __init__(self, browser: Chromium, base_url: str) -> None:
        self.b = browser
        self.base_url = base_url.rstrip("/")

    # User settings the page starts with (stored by the server, as the Settings dialog stores them): no
    # first-run templates dialog over the canvas, no minimap over previews, a short tooltip delay.
    # Also: the frontend's schema validation of loaded workflows (off by default), and full node detail
    # at any zoom (no low-detail rendering in the zoomed-out screenshots).
    SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.EnableTooltips": True,
                "LiteGraph.Node.TooltipDelay": 100, "Comfy.Validation.Workflows": True,
                "LiteGraph.Canvas.MinFontSizeForLOD": 0}

    def open(self, timeout: float = 120.0) -> ComfyUIPage:
        import urllib.request

        req = urllib.request.Request(self.base_url + "/api/settings", data=json.dumps(self.SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=30).close()
        self.b.goto(self.base_url + "/", timeout=timeout)
        self.b.wait_for("!!(window.app && app.vueAppReady && app.graph && window.LiteGraph && "
                        "document.querySelector('[data-testid=queue-button]'))", timeout=timeout,
                        what="the ComfyUI web UI to start")
        if not self.b.js(_JS_PINIA):
            raise BrowserError("no Vue app / Pinia in the page: is this the ComfyUI frontend?")
        events = json.dumps(_EVENTS)
        self.b.js(f"window.__cvxEvents = []; for (const ev of {events}) app.api.addEventListener(ev, e => "
                  "window.__cvxEvents.push({type: ev, t: Date.now(), "
                  "detail: JSON.parse(JSON.stringify(e.detail === undefined ? null : e.detail))})); true")
        # Alerts and error toasts the UI shows (the workflow schema validation reports through addAlert).
        self.b.js("""window.__cvxAlerts = []; window.__cvxPinia._s.get('toast').$onAction(({name, args}) => {
          const m = args[0];
          if (name === 'addAlert') window.__cvxAlerts.push(String(m));
          else if (name === 'add' && m && m.severity === 'error') window.__cvxAlerts.push(`${m.summary}: ${m.detail}`);
        }); true""")
        return self

    # -------------------------------------------------------------- workflows
    def load(self, workflow: dict[str, Any], name: str = "workflow", settle: float = 1.0,
             timeout: float = 30.0) -> dict[str, Any]:
        """``app.loadGraphData`` (what drag-and-drop and the Workflows menu call) into a new tab named
        ``name``; return the frontend's view of it once its load-time checks (schema, missing nodes, models,
        media) have settled."""
        self.b.js("window.__cvxAlerts.length = 0; true")
        self.b.js(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)}).then(() => true)",
                  timeout=timeout)
        deadline = time.monotonic() + timeout
        last = None
        while True:
            time.sleep(settle)
            state = self.state()
            if not state["refreshing"] and state == last:
                return state
            if time.monotonic() > deadline:
                raise BrowserError(f"the frontend's checks did not settle in {timeout:.0f} s: {state}")
            last = state

    def state(self) -> dict[str, Any]:
        return self.b.js(_JS_STATE)

    def graph_to_prompt(self) -> dict[str, Any]:
        """The API-format prompt the UI would queue for the loaded graph (``app.graphToPrompt``)."""
        return self.b.js("app.graphToPrompt().then(p => p.output)")

    def command(self, command_id: str) -> None:
        self.b.js(f"Promise.resolve(window.__cvxPinia._s.get('command').execute({json.dumps(command_id)}))"
                  ".then(() => true)")

    def fit_view(self, timeout: float = 10.0) -> None:
        """Zoom to fit the whole graph (the canvas menu's "zoom to fit"); wait until any zoom animation ends
        (the view unchanged for 6 frames)."""
        self.command("Comfy.Canvas.FitView")
        self.b.js(_JS_VIEW_SETTLED.replace("LIMIT_MS", str(int(timeout * 1000))), timeout=timeout + 5)

    def graph_screenshot(self, path: Path | str, width: int = 2200, height: int = 1400, pad: int = 16) -> Path:
        """The whole graph in a larger viewport (zoomed to fit), cropped to the nodes' bounding box; the
        viewport is restored afterwards."""
        b = self.b
        b.cmd("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        try:
            b.js("new Promise(r => setTimeout(() => r(true), 300))")
            self.fit_view()
            box = b.js(f"""(() => {{ const th = LiteGraph.NODE_TITLE_HEIGHT; let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
              for (const n of app.graph.nodes) {{ const a = {_JS_TO_PAGE}(n.pos[0], n.pos[1] - th),
                  c = {_JS_TO_PAGE}(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
                x0 = Math.min(x0, a[0]); y0 = Math.min(y0, a[1]); x1 = Math.max(x1, c[0]); y1 = Math.max(y1, c[1]); }}
              return [x0, y0, x1, y1]; }})()""")
            x0, y0 = max(0, box[0] - pad), max(0, box[1] - pad)
            clip = {"x": x0, "y": y0, "width": min(width, box[2] + pad) - x0, "height": min(height, box[3] + pad) - y0}
            return b.screenshot(path, clip=clip)
        finally:
            b.cmd("Emulation.setDeviceMetricsOverride", width=b.width, height=b.height, deviceScaleFactor=1,
                  mobile=False)
            b.js("new Promise(r => setTimeout(() => r(true), 300))")
            self.fit_view()

    def queue_and_wait(self, timeout: float = 300.0) -> dict[str, Any]:
        """Press the Run button; wait for the run's end. Returns ``{prompt_id, status, events}`` with
        status one of execution_success / execution_error / execution_interrupted."""
        self.b.js("window.__cvxEvents.length = 0; true")
        clicked = self.b.js("(() => { const b = document.querySelector('[data-testid=queue-button]');"
                            " if (!b || b.disabled) return false; b.click(); return true; })()")
        if not clicked:
            raise BrowserError("the Run button is missing or disabled")
        terminal = json.dumps(_TERMINAL)
        end = self.b.wait_for(f"window.__cvxEvents.find(e => {terminal}.includes(e.type))", timeout=timeout,
                              what="the queued workflow to finish", interval=0.5)
        events = self.b.js("window.__cvxEvents")
        return {"prompt_id": (end.get("detail") or {}).get("prompt_id"), "status": end["type"], "events": events}

    # -------------------------------------------------------------- outputs
    def videos(self) -> list[dict[str, Any]]:
        return self.b.js("""Array.from(document.querySelectorAll('video')).map(v => { const r = v.getBoundingClientRect();
          return {src: v.currentSrc || v.src, ready: v.readyState, width: v.videoWidth, height: v.videoHeight,
                  duration: v.duration, error: v.error && (v.error.message || String(v.error.code)),
                  shown: r.width > 0 && r.height > 0 && getComputedStyle(v).visibility !== 'hidden'}; })""")

    def node_outputs(self) -> dict[str, Any]:
        return self.b.js("JSON.parse(JSON.stringify(app.nodeOutputs || {}))")

    def node_images(self, node_id: str) -> list[dict[str, Any]]:
        """The preview images a node shows (``node.imgs``: <img> elements the canvas draws), decoded by the
        browser, with the fraction of white / black pixels in each."""
        return self.b.js(f"""(() => {{ const n = app.graph.getNodeById({json.dumps(node_id)});
          return (n && n.imgs || []).map(img => {{
            const out = {{src: img.src, tag: img.tagName, complete: img.complete, width: img.naturalWidth,
                         height: img.naturalHeight, white: 0, black: 0}};
            if (!img.complete || !img.naturalWidth) return out;
            const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
            const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
            const d = ctx.getImageData(0, 0, c.width, c.height).data; let w = 0, k = 0;
            for (let i = 0; i < d.length; i += 4) {{
              if (d[i] > 240 && d[i + 1] > 240 && d[i + 2] > 240) w++;
              if (d[i] < 15 && d[i + 1] < 15 && d[i + 2] < 15) k++; }}
            out.white = w / (d.length / 4); out.black = k / (d.length / 4); return out; }}); }})()""")

    def node_screen_rect(self, node_id: str) -> dict[str, float]:
        """The node's box (title included) in page CSS pixels."""
        return self.b.js(f"""(() => {{ const n = app.graph.getNodeById({json.dumps(node_id)});
          const th = LiteGraph.NODE_TITLE_HEIGHT, a = {_JS_TO_PAGE}(n.pos[0], n.pos[1] - th);
          const b = {_JS_TO_PAGE}(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
          return {{x: a[0], y: a[1], width: b[0] - a[0], height: b[1] - a[1]}}; }})()""")

    def canvas_bright_fraction(self, rect: dict[str, float]) -> float:
        """Fraction of near-white pixels the canvas shows inside ``rect`` (page CSS pixels)."""
        return self.b.js(f"""(() => {{ const rc = {json.dumps(rect)}, cv = app.canvas.canvas;
          const br = cv.getBoundingClientRect(), sx = cv.width / br.width, sy = cv.height / br.height;
          const x = Math.max(0, Math.round((rc.x - br.left) * sx)), y = Math.max(0, Math.round((rc.y - br.top) * sy));
          const w = Math.min(cv.width - x, Math.round(rc.width * sx)), h = Math.min(cv.height - y, Math.round(rc.height * sy));
          if (w <= 0 || h <= 0) return 0;
          const d = cv.getContext('2d').getImageData(x, y, w, h).data; let n = 0;
          for (let i = 0; i < d.length; i += 4) if (d[i] > 230 && d[i + 1] > 230 && d[i + 2] > 230) n++;
          return n / (d.length / 4); }})()""")

    # -------------------------------------------------------------- node search and tooltips
    def search_nodes(self, text: str, timeout: float = 15.0) -> list[list[str]]:
        """Open the node search box (as a double-click on the canvas does), type ``text``, return each
        result row's text lines (name, pack, category, description)."""
        self.command("Workspace.SearchBox.Toggle")
        self.b.wait_for("document.activeElement && document.activeElement.tagName === 'INPUT'", timeout=timeout,
                        what="the node search box")
        self.b.type_text(text)
        rows = self.b.wait_for(
            "(() => { const r = Array.from(document.querySelectorAll('[data-testid=result-item]'))"
            ".map(e => e.innerText.split('\\n').map(s => s.trim()).filter(Boolean));"
            " return r.length ? r : null; })()", timeout=timeout, what=f"node search results for {text!r}")
        self.b.press("Escape", "Escape", 27)
        return rows

    def hover_tooltip(self, x: float, y: float, timeout: float = 5.0) -> str:
        """Rest the mouse at (x, y) on the canvas; return the tooltip the UI shows there ('' if none)."""
        self.b.mouse_move(5, 5)
        self.b.mouse_move(x - 2, y)
        self.b.mouse_move(x, y)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.b.js("(() => { const t = document.querySelector('.node-tooltip');"
                             " return t && getComputedStyle(t).display !== 'none' ? t.innerText.trim() : ''; })()")
            if text:
                return text
            time.sleep(0.1)
        return ""

    def place_node(self, node_type: str) -> dict[str, Any]:
        """An empty graph with one ``node_type`` node at scale 1; the page positions of its title, its
        visible canvas widgets and its socket inputs (name -> [x, y])."""
        return self.b.js(f"""new Promise(resolve => {{
          app.graph.clear(); const n = LiteGraph.createNode({json.dumps(node_type)});
          n.pos = [120, 160]; app.graph.add(n); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
          app.canvas.setDirty(true, true);
          requestAnimationFrame(() => requestAnimationFrame(() => {{
            const page = {_JS_TO_PAGE};
            const widgets = {{}}, sockets = {{}};
            for (const w of n.widgets || []) {{
              const y = w.y ?? w.last_y;
              if (w.element || w.hidden || (w.advanced && !n.showAdvanced) || y == null || !(w.computedHeight ?? 1)) continue;
              widgets[w.name] = page(n.pos[0] + 40, n.pos[1] + y + (w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT) / 2);
            }}
            (n.inputs || []).forEach((inp, i) => {{
              if (inp.widget) return;
              const p = n.getConnectionPos(true, i); sockets[inp.name] = page(p[0] + 12, p[1]);
            }});
            resolve({{title: page(n.pos[0] + 40, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2), widgets, sockets}});
          }}));
        }})""")

    def node_def(self, node_type: str) -> dict[str, Any] | None:
        """The frontend's node definition (what the search box, node library and tooltips use)."""
        return self.b.js(f"""(() => {{ const d = window.__cvxPinia._s.get('nodeDef').nodeDefsByName[{json.dumps(node_type)}];
          if (!d) return null;
          const inputs = {{}};
          for (const [k, v] of Object.entries(d.inputs || {{}})) inputs[k] = {{type: v.type, tooltip: v.tooltip ?? null}};
          return {{name: d.name, display_name: d.display_name, category: d.category, description: d.description,
                   python_module: d.python_module, inputs}}; }})()""")


def save_small_png(src: Path, dst: Path, max_bytes: int = 300_000) -> Path:
    """A palette PNG copy of a screenshot for the repository (docs/), checked to stay under ``max_bytes``."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        for colors, scale in ((256, 1.0), (128, 1.0), (128, 0.8), (64, 0.7)):
            out = im if scale == 1.0 else im.resize((int(im.width * scale), int(im.height * scale)),
                                                   Image.Resampling.LANCZOS)
            out.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                dst, optimize=True)
            if dst.stat().st_size <= max_bytes:
                return dst
    raise ValueError(f"{dst} is {dst.stat().st_size} bytes even when reduced (limit {max_bytes})")
