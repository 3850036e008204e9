"""Boot the real ComfyUI host inside this process, for everything that drives the pack without the host's
own ``main.py``: the tests (tests/harness/host.py), the evaluation runner (evaluation/host_backend.py),
scripts/train_adapter.py, scripts/run_example.py (the tiny model build) and bench/.

Two steps, in this order:

1. :func:`bootstrap_host_args` puts the host tree first on ``sys.path`` and parses its CLI arguments, as
   ``main.py`` does; it must run before anything imports ``comfy.model_management`` (which reads
   ``args.cpu`` at import).
2. :class:`InProcessHost` (optional) loads the host's nodes, this pack and extra node folders through the
   host's own ``nodes.init_extra_nodes``, and runs API-format prompts with its ``PromptExecutor``.

Nothing in the pack (nodes/, cvx_core/, cvx_host/) imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from host_server import HOST_DIR, REPO_ROOT, HostRunError  # scripts/, beside this file
from pack_import import PACKAGE

SCRIPTS_DIR = REPO_ROOT / "scripts"
PACK_NODE = "CustomVideoXApply"  # present in the host's registry once the pack is loaded


def bootstrap_host_args(argv: Iterable[str] = ("--cpu",), host_dir: Path = HOST_DIR) -> None:
    """Make the host importable and parse its CLI args as if it was started with ``argv``.

    ``utils.extra_config`` is imported here too: once the host puts ``comfy/`` on ``sys.path`` (custom
    node loading does), ``utils`` would resolve to ``comfy/utils.py`` instead. A second call keeps the
    args of the first; asking for ``--cpu`` after a run without it is an error.
    """
    argv, host_dir = list(argv), Path(host_dir)
    if not (host_dir / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI host at {host_dir}; run `make setup` first")
    for p in (str(SCRIPTS_DIR), str(host_dir)):
        if p in sys.path:
            sys.path.remove(p)
        # Host first: its top-level `nodes`/`utils` must win over this repo's `nodes/` package.
        sys.path.insert(0, p)
    if "comfy.cli_args" in sys.modules:
        from comfy.cli_args import args

        if not args.cpu and "--cpu" in argv:
            raise RuntimeError("comfy.cli_args was imported before bootstrap_host_args(); args.cpu is off")
    else:
        saved = sys.argv
        sys.argv = [str(host_dir / "main.py"), *argv]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        finally:
            sys.argv = saved
    import utils.extra_config  # noqa: F401


def cpu_args(cpu: bool | None = None) -> list[str]:
    """``["--cpu"]`` when asked, or (``cpu=None``) when torch sees no CUDA device."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    return ["--cpu"] if cpu else []


class ServerStub:
    """What PromptExecutor needs of a PromptServer; records every message it is sent."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self.sent: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.sent.append((event, data))

    def queue_updated(self) -> None:
        pass


class PromptFailed(HostRunError):
    """Validation (``error``, ``node_errors``) or execution (``errors``: the executor's error messages) failed."""

    def __init__(self, message: str, *, error: Any = None, node_errors: Any = None,
                 errors: list[dict[str, Any]] | None = None, messages: list[Any] | None = None) -> None:
        super().__init__(message)
        self.error, self.node_errors = error, node_errors
        self.errors, self.messages = errors or [], messages or []


@contextlib.contextmanager
def _pack_named_as_package() -> Iterator[None]:
    """While the host loads its custom nodes, its module spec for this pack is named ``customvideox``
    (``pack_import.PACKAGE``) instead of the folder's path: scripts, bench and tests then import the very
    modules the host's nodes use (``customvideox.nodes.apply``), one object per module. Everything else in
    the host's loader runs as under ``main.py`` (the server tests load the pack exactly as users do)."""
    real = importlib.util.spec_from_file_location
    init = (REPO_ROOT / "__init__.py").resolve()

    def spec(name, location=None, *args, **kwargs):
        if location is not None and Path(location).resolve() == init:
            return real(PACKAGE, location, submodule_search_locations=[str(REPO_ROOT)])
        return real(name, location, *args, **kwargs)

    importlib.util.spec_from_file_location = spec
    try:
        yield
    finally:
        importlib.util.spec_from_file_location = real


class InProcessHost:
    """The host's node registry and a PromptExecutor in this process (no server socket).

    Call :func:`bootstrap_host_args` first. :meth:`load_nodes` runs the host's node loading once per
    process; a second instance (e.g. the evaluation runner inside a test session) reuses what is loaded.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ServerStub()
        self.executor: Any = None
        self.import_failed: list[str] = []
        self.prompt_server: Any = None
        self._node_links: tempfile.TemporaryDirectory[str] | None = None

    def load_nodes(self, extra_model_paths: Iterable[Path] = (), node_dirs: Mapping[str, Path] | None = None
                   ) -> InProcessHost:
        """Load ``extra_model_paths`` yaml files and, unless this process already has the pack's nodes, the
        host's nodes, every custom node folder and ``node_dirs`` (folder name -> node package folder)."""
        if "comfy.cli_args" not in sys.modules:
            raise RuntimeError("call bootstrap_host_args() before InProcessHost.load_nodes()")
        import folder_paths
        import utils.extra_config

        import nodes

        if PACK_NODE in nodes.NODE_CLASS_MAPPINGS:
            self.reset()
            return self
        for y in extra_model_paths:
            utils.extra_config.load_extra_path_config(str(y))
        if node_dirs:
            self._node_links = tempfile.TemporaryDirectory(prefix="cvx_nodes_")
            for name, target in node_dirs.items():
                (Path(self._node_links.name) / name).symlink_to(Path(target), target_is_directory=True)
            folder_paths.add_model_folder_path("custom_nodes", self._node_links.name)
        import server

        # The real PromptServer object, never started (no port): some host nodes register with
        # PromptServer.instance at load time (e.g. comfy_extras/nodes_replacements.py), as under main.py.
        asyncio.set_event_loop(self.loop)
        self.prompt_server = server.PromptServer(self.loop)
        with _pack_named_as_package():
            self.import_failed = self.loop.run_until_complete(
                nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)) or []
        self.reset()
        return self

    def reset(self) -> None:
        """A fresh executor: drops every cached node output (models included). CLASSIC cache: nodes whose
        inputs are unchanged are not rerun between prompts."""
        import execution

        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @property
    def node_classes(self) -> dict[str, Any]:
        import nodes

        return nodes.NODE_CLASS_MAPPINGS

    def execute(self, prompt: dict[str, Any], prompt_id: str | None = None) -> str:
        """Validate and execute an API-format prompt; its prompt id. Raises :class:`PromptFailed`."""
        prompt_id = prompt_id or str(uuid.uuid4())
        self.loop.run_until_complete(self._execute(prompt, prompt_id))
        return prompt_id

    async def _execute(self, prompt: dict[str, Any], prompt_id: str) -> None:
        import execution

        valid, error, outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
        if not valid:
            raise PromptFailed(f"invalid prompt: {json.dumps(error, indent=1)}\nnode errors: "
                               f"{json.dumps(node_errors, indent=1, default=str)}",
                               error=error, node_errors=node_errors)
        ex = self.executor
        await ex.execute_async(prompt, prompt_id, {}, outputs)
        if not ex.success:
            messages = list(ex.status_messages)
            errs = [d for ev, d in messages if ev in ("execution_error", "execution_interrupted")]
            detail = "\n".join(
                f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                f"{e.get('exception_message')}\n{''.join(e.get('traceback') or [])}" for e in errs)
            raise PromptFailed(f"prompt {prompt_id} failed:\n{detail or messages}", errors=errs, messages=messages)

    def cached_outputs(self, node_id: str) -> list[Any] | None:
        """The last run's outputs of ``node_id`` (one list per output slot), or None when it has none."""
        entry = self.loop.run_until_complete(self.executor.caches.outputs.get(node_id))
        return None if entry is None else entry.outputs

    def ui_outputs(self) -> dict[str, Any]:
        """The last run's ``{node_id: ui dict}``, as /history reports it."""
        return dict((getattr(self.executor, "history_result", None) or {}).get("outputs", {}))

    def close(self) -> None:
        self.loop.close()
        if self._node_links is not None:
            self._node_links.cleanup()
