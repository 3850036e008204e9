"""Run the real ComfyUI host (v0.30.0 in .host/ComfyUI) from tests: in-process and as a server.

In-process (fast): the host's own ``nodes.init_extra_nodes``, ``execution.validate_prompt`` and
``PromptExecutor.execute_async`` run a prompt dict in the test process (scripts/host_boot.py).
Server (real client): ``main.py --cpu --listen 127.0.0.1 --port P`` in a subprocess, talked to over
HTTP and the websocket, exactly as the web UI does.

Both load this pack through the host's own ``custom_nodes/`` (setup.sh links it there) plus the
dev stand-in nodes (devnodes/) and the test-only nodes (tests/test_nodes_testonly), and see only a per-session models folder (never the user's ``models/``).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
import host_boot  # noqa: E402
from host_boot import bootstrap_host_args  # noqa: E402, F401  (re-exported for the test modules)
from host_server import HOST_DIR, VENV_PYTHON, HostRunError, HostServer, files_from_ui  # noqa: E402

TEST_NODES_DIR = REPO_ROOT / "tests" / "test_nodes_testonly"  # fault injectors and probes, tests only
DEV_NODES_DIR = REPO_ROOT / "devnodes"  # stand-ins for T5 and photos, shared with the tiny demo
NODE_FOLDERS = {"cvx_test_nodes": TEST_NODES_DIR, "cvx_dev_nodes": DEV_NODES_DIR}
PACK_LINK = HOST_DIR / "custom_nodes" / "comfyui-customvideox"
# The pack's node ids; every one must appear in /object_info.
PACK_NODE_IDS = [
    "CustomVideoXModelLoader",
    "CustomVideoXReferenceEncode",
    "CustomVideoXApply",
    "CustomVideoXTABSchedule",
    "CustomVideoXEntityRegion",
    "CustomVideoXAdapterLoader",
    "CustomVideoXTrainAdapter",
    "CustomVideoXEvaluate",
    "CustomVideoXReferenceFramesBias",
]
TEST_NODE_IDS = ["CVXTestTextConditioning", "CVXTestImage", "CVXTestSaveTensor"]
@dataclass
class HostEnv:
    """A per-session sandbox the host is pointed at: models, custom_nodes, input/output/temp/user."""

    root: Path
    models_dir: Path
    custom_nodes_dir: Path
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    user_dir: Path
    yaml_path: Path

    @property
    def host_temp_dir(self) -> Path:
        return self.temp_dir / "temp"  # main.py appends "temp" to --temp-directory

    @classmethod
    def create(cls, root: Path, models_dir: Path) -> HostEnv:
        root = Path(root)
        env = cls(
            root=root,
            models_dir=Path(models_dir),
            custom_nodes_dir=root / "custom_nodes",
            output_dir=root / "output",
            input_dir=root / "input",
            temp_dir=root / "temp",
            user_dir=root / "user",
            yaml_path=root / "extra_model_paths.yaml",
        )
        for d in (env.custom_nodes_dir, env.output_dir, env.input_dir, env.temp_dir, env.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in ("diffusion_models", "vae", "text_encoders", "loras"):
            (env.models_dir / d).mkdir(parents=True, exist_ok=True)
        for name, target in NODE_FOLDERS.items():
            link = env.custom_nodes_dir / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        # The `custom_nodes:` entry is how v0.30.0 takes an extra node folder without touching the host.
        # is_default: the sandbox folders come first, so nodes that write models (the trainer) write there.
        lines = ["cvx_tests:", f"  base_path: {env.models_dir}", "  is_default: true"]
        lines += [f"  {d}: {d}" for d in ("diffusion_models", "vae", "text_encoders", "loras")]
        lines += [f"  custom_nodes: {env.custom_nodes_dir}"]
        env.yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return env


@dataclass
class RunResult:
    """What one in-process prompt run gave back."""

    prompt_id: str
    ui: dict[str, Any]  # {node_id: ui dict}, as /history reports it
    node_outputs: dict[str, tuple[Any, ...]]  # captured node outputs (one value per output slot)
    messages: list[tuple[str, dict[str, Any]]]  # the executor's status messages
    files: list[Path] = field(default_factory=list)

    def output(self, node_id: str, index: int = 0) -> Any:
        """The value at output slot ``index`` of node ``node_id`` (captured nodes only)."""
        if node_id not in self.node_outputs:
            raise KeyError(f"node {node_id} was not captured; pass capture=[...] to host.run")
        return self.node_outputs[node_id][index]


class InProcessHost(host_boot.InProcessHost):
    """The host's real node registry and PromptExecutor inside the test process, in the session sandbox."""

    def __init__(self, env: HostEnv) -> None:
        super().__init__()
        self.env = env

    def start(self) -> InProcessHost:
        bootstrap_host_args()
        import folder_paths

        folder_paths.set_output_directory(str(self.env.output_dir))
        folder_paths.set_input_directory(str(self.env.input_dir))
        folder_paths.set_temp_directory(str(self.env.host_temp_dir))
        folder_paths.set_user_directory(str(self.env.user_dir))
        self.load_nodes([self.env.yaml_path])
        return self

    def pack(self, name: str) -> Any:
        """A module of the pack as the host loaded it (e.g. ``"cvx_host.reference_patch"``), so its classes
        are the ones the host's nodes use."""
        import importlib

        pkg = self.node_classes["CustomVideoXApply"].__module__.rsplit(".nodes", 1)[0]
        return importlib.import_module(f"{pkg}.{name}")

    def run(
        self, prompt: dict[str, Any], capture: Iterable[str] = (), prompt_id: str | None = None
    ) -> RunResult:
        """Validate and execute an API-format prompt; return its ui outputs and the ``capture``d nodes'
        outputs. Raises HostRunError with the host's message when validation or execution fails."""
        prompt_id = self.execute(prompt, prompt_id)
        node_outputs: dict[str, tuple[Any, ...]] = {}
        for node_id in capture:
            outputs = self.cached_outputs(node_id)
            if outputs is None:
                raise HostRunError(f"node {node_id} has no cached output (not part of the executed graph?)")
            node_outputs[node_id] = tuple(o[0] if isinstance(o, list) and len(o) == 1 else o for o in outputs)
        ui = self.ui_outputs()
        return RunResult(prompt_id, ui, node_outputs, list(self.executor.status_messages),
                         files_from_ui(ui, self.env.output_dir, self.env.host_temp_dir))


@dataclass
class ServerRun:
    prompt_id: str
    history: dict[str, Any]  # the /history/<id> entry: prompt, outputs, status, meta
    messages: list[dict[str, Any]]  # every JSON websocket message for this client, in order
    files: list[Path]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m.get("type") == kind]


class ServerProcess(HostServer):
    """``main.py --cpu`` on a free loopback port with this pack, the test nodes and the session models,
    and a websocket client for progress messages."""

    def __init__(self, env: HostEnv, extra_args: Iterable[str] = ()) -> None:
        self.env = env
        super().__init__([*sandbox_args(env), "--disable-api-nodes", *extra_args], env.root / "server.log")

    def run(self, prompt: dict[str, Any], timeout: float = 300.0) -> ServerRun:
        """Post ``prompt`` over HTTP while listening on the websocket as the web UI does; return the
        history entry, the websocket messages (progress, executing, executed, ...) and saved files."""
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout
        )
        messages: list[dict[str, Any]] = []
        try:
            prompt_id = self.post_prompt(prompt, client_id=client_id)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = ws.recv()
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                messages.append(msg)
                data = msg.get("data", {})
                done = msg.get("type") == "executing" and data.get("node") is None
                if done and data.get("prompt_id") == prompt_id:
                    break
            else:
                raise TimeoutError(f"no end of prompt {prompt_id} on the websocket after {timeout:.0f} s")
        finally:
            ws.close()
        history = self.wait_history(prompt_id, timeout=30)
        files = files_from_ui(history.get("outputs", {}), self.env.output_dir, self.env.host_temp_dir)
        return ServerRun(prompt_id, history, messages, files)


def sandbox_args(env: HostEnv) -> list[str]:
    """Host CLI args that keep a run inside ``env``: models, extra nodes, in/out/temp/user, an in-memory DB."""
    return [
        "--cpu",
        "--extra-model-paths-config",
        str(env.yaml_path),
        "--output-directory",
        str(env.output_dir),
        "--input-directory",
        str(env.input_dir),
        "--temp-directory",
        str(env.temp_dir),
        "--user-directory",
        str(env.user_dir),
        "--database-url",
        "sqlite:///:memory:",
    ]


def run_quick_test(env: HostEnv, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``main.py --cpu --quick-test-for-ci --disable-api-nodes``: boot, load every node, exit."""
    cmd = [
        str(VENV_PYTHON),
        str(HOST_DIR / "main.py"),
        "--quick-test-for-ci",
        "--disable-api-nodes",
        *sandbox_args(env),
    ]
    return subprocess.run(cmd, cwd=str(HOST_DIR), capture_output=True, text=True, timeout=timeout)
