"""Test harness: the real ComfyUI host in-process and as a server, plus tiny model builders."""

from .host import (
    HOST_DIR,
    PACK_NODE_IDS,
    REPO_ROOT,
    TEST_NODE_IDS,
    HostEnv,
    HostRunError,
    InProcessHost,
    RunResult,
    ServerProcess,
    ServerRun,
    bootstrap_host_args,
    files_from_ui,
    run_quick_test,
)

__all__ = [
    "HOST_DIR",
    "PACK_NODE_IDS",
    "REPO_ROOT",
    "TEST_NODE_IDS",
    "HostEnv",
    "HostRunError",
    "InProcessHost",
    "RunResult",
    "ServerProcess",
    "ServerRun",
    "bootstrap_host_args",
    "files_from_ui",
    "run_quick_test",
]
