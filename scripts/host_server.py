"""Start the real ComfyUI host (``main.py``) as a subprocess on a loopback port and talk to it over HTTP.

Used by the main job (scripts/run_example.py) and by the test harness (tests/harness/host.py).
Standard library only, so the launcher needs nothing beyond the venv's python.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host" / "ComfyUI"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


class HostRunError(RuntimeError):
    """A prompt failed validation or execution; the message carries the host's own error, ``response`` the
    parsed body (``/prompt``'s 400 answer, or the history entry's ``status``) for :func:`describe_error`."""

    def __init__(self, message: str, response: Any = None) -> None:
        super().__init__(message)
        self.response = response


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    """``main.py --listen 127.0.0.1 --port P [args]``, its log in ``log_path``."""

    def __init__(self, args: Iterable[str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(VENV_PYTHON),
            str(HOST_DIR / "main.py"),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            *self.args,
        ]

    def start(self, timeout: float = 180.0) -> HostServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(HOST_DIR),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"ComfyUI did not answer on {self.base_url} in {timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 12000) -> str:
        return self.log_text()[-chars:]

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node class the server knows, with its inputs and outputs."""
        return self.get_json("/object_info", timeout=60)

    def post_prompt(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        """``POST /prompt``; returns the prompt id. Raises HostRunError with the node errors on 400."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id is not None:
            body["client_id"] = client_id
        req = urllib.request.Request(
            self.base_url + "/prompt",
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read().decode("utf-8"))["prompt_id"]
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                body = json.loads(detail)
            except ValueError:
                body = None
            raise HostRunError(f"POST /prompt rejected ({e.code}): {detail}", body) from e

    def wait_history(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; raise HostRunError if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise HostRunError(f"prompt {prompt_id} failed: {json.dumps(status, indent=1)}", status)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HostRunError(f"server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")


def watch_prompt(server: HostServer, prompt: dict[str, Any], on_message: Callable[[dict[str, Any]], None],
                 timeout: float) -> dict[str, Any]:
    """POST ``prompt`` while listening on the websocket as the web UI does; every JSON message for it goes
    to ``on_message`` (``progress``, ``executing``, ...). Returns the history entry; raises HostRunError
    when the host rejects or fails it, TimeoutError after ``timeout`` seconds."""
    import websocket  # websocket-client, installed by setup

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=5)
    deadline = time.monotonic() + timeout
    try:
        prompt_id = server.post_prompt(prompt, client_id=client_id)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workflow did not finish in {timeout:.0f} s")
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                if server.proc is not None and server.proc.poll() is not None:
                    raise HostRunError(f"ComfyUI exited while running the workflow:\n{server.log_tail()}") from None
                continue
            if not isinstance(raw, str):
                continue  # binary preview frames
            msg = json.loads(raw)
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            on_message(msg)
            if msg.get("type") in ("execution_error", "execution_interrupted") or (
                    msg.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
                break
    finally:
        ws.close()
    return server.wait_history(prompt_id, timeout=60)


def describe_error(response: Any, prompt: dict[str, Any] | None = None) -> str:
    """The host's error answer (``/prompt``'s 400 body, or a failed history entry's ``status``) as lines a
    person reads: which node, which input, what the host said; never the raw JSON."""
    prompt = prompt or {}

    def node_label(node_id: Any, class_type: Any = None) -> str:
        node = prompt.get(str(node_id), {})
        title = (node.get("_meta") or {}).get("title")
        kind = class_type or node.get("class_type") or "?"
        return f"node {node_id} ({kind}{', ' + title if title and title != kind else ''})"

    if not isinstance(response, dict):
        return str(response)
    lines: list[str] = []
    if "node_errors" in response or "error" in response:  # POST /prompt rejected the workflow
        err = response.get("error") or {}
        if isinstance(err, dict) and err.get("message"):
            lines.append(err["message"] + (f": {err['details']}" if err.get("details") else ""))
        for node_id, ne in (response.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                details = str(e.get("details") or "")
                details = details if len(details) <= 300 else details[:300] + " ..."
                lines.append(f"{node_label(node_id, ne.get('class_type'))}: {e.get('message', '?')}"
                             + (f" ({details})" if details else ""))
    for kind, data in response.get("messages", []):  # a history entry's status
        if kind == "execution_error":
            lines.append(f"{node_label(data.get('node_id'), data.get('node_type'))} failed: "
                         f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")
        elif kind == "execution_interrupted":
            lines.append(f"interrupted at {node_label(data.get('node_id'), data.get('node_type'))}")
    return "\n".join(lines) or "the host gave no details"


def files_from_ui(ui_outputs: dict[str, Any], output_dir: Path, temp_dir: Path | None = None) -> list[Path]:
    """Absolute paths of every saved file named in ``{node_id: {key: [{filename, subfolder, type}]}}``
    (the ``outputs`` of a /history entry). ``temp_dir`` is the host's temp folder itself."""
    bases = {"output": Path(output_dir)}
    if temp_dir is not None:
        bases["temp"] = Path(temp_dir)
    found: list[Path] = []
    for node_ui in ui_outputs.values():
        for items in (node_ui or {}).values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("filename") and item.get("type") in bases:
                    found.append(bases[item["type"]] / item.get("subfolder", "") / item["filename"])
    return found
