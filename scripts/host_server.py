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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host" / "ComfyUI"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


class HostRunError(RuntimeError):
    """A prompt failed validation or execution; the message carries the host's own error."""


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
            raise HostRunError(f"POST /prompt rejected ({e.code}): {detail}") from e

    def wait_history(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; raise HostRunError if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise HostRunError(f"prompt {prompt_id} failed: {json.dumps(status, indent=1)}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HostRunError(f"server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")


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
