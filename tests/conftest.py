"""Session fixtures: tiny random models, the real host in-process (``host``) and as a server (``server``).

Levels, one folder each: ``unit/`` (host-free, seconds), ``host/`` (the host in-process), ``server/`` (a real
server process and the browser). Helper modules shared by several levels live beside this file.

The pack is imported one way, as the package ``customvideox`` (``scripts/pack_import.py``), registered
here; the in-process host loads it under the same name, so tests and the host's nodes share one object
per module. The host's CLI args are parsed by ``host/`` and ``server/``'s own conftest, at import, before any
of their test modules can import ``comfy.model_management`` (it reads ``--cpu`` when first imported);
``pytest tests/unit`` imports nothing of the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny_models as _tiny  # scripts/ (pytest's pythonpath)
from harness import host as _host
from pack_import import pack_module

pack_module()  # registers the package `customvideox`


@dataclass
class TinyModels:
    """The tiny set as files and as the names the host's loaders list them by."""

    models_dir: Path
    paths: dict[str, Path]  # kind -> path (see scripts/tiny_models.py build_tiny_model_set)
    unet: str  # native CogVideoX 1.0, for UNETLoader / the pack's loader
    unet_1_5: str  # native CogVideoX 1.5 (patch_size_t=2)
    diffusers_single: str  # diffusers key layout, one file
    diffusers_sharded: str  # folder with shards + index json + config.json, as "name/"
    vae: str  # for VAELoader

    def native_state_dict(self, kind: str = "native_1_0") -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.paths[kind]))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cvx_models")


@pytest.fixture(scope="session")
def tiny_models(tiny_models_dir: Path) -> TinyModels:
    paths = _tiny.build_tiny_model_set(tiny_models_dir, seed=0)

    def rel(kind: str, folder: str) -> str:
        return paths[kind].relative_to(tiny_models_dir / folder).as_posix()

    return TinyModels(
        models_dir=tiny_models_dir,
        paths=paths,
        unet=rel("native_1_0", "diffusion_models"),
        unet_1_5=rel("native_1_5", "diffusion_models"),
        diffusers_single=rel("diffusers_single", "diffusion_models"),
        # Folders are listed with a trailing separator by the pack's loader (nodes/model_loader.py).
        diffusers_sharded=rel("diffusers_sharded", "diffusion_models") + "/",
        vae=rel("vae", "vae"),
    )


@pytest.fixture(scope="session")
def wan_files(tiny_models_dir: Path) -> dict[str, Path]:
    """The tiny Wan set (T2V, VACE, TI2V-5B layouts, a Wan 2.1 VAE) in the session's models folder."""
    import tiny_wan

    return tiny_wan.build_tiny_wan_set(tiny_models_dir, seed=0)


@pytest.fixture(scope="session")
def host_env(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> _host.HostEnv:
    return _host.HostEnv.create(tmp_path_factory.mktemp("cvx_host"), tiny_models_dir)


@pytest.fixture(scope="session")
def host(host_env: _host.HostEnv) -> Iterator[_host.InProcessHost]:
    h = _host.InProcessHost(host_env).start()
    yield h
    h.close()


@pytest.fixture(scope="session")
def server_env(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> _host.HostEnv:
    return _host.HostEnv.create(tmp_path_factory.mktemp("cvx_server"), tiny_models_dir)


@pytest.fixture(scope="session")
def server(server_env: _host.HostEnv) -> Iterator[_host.ServerProcess]:
    srv = _host.ServerProcess(server_env).start()
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    srv = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(srv, _host.ServerProcess):
        report.sections.append(("ComfyUI server log (tail)", srv.log_tail()))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny-model tests are latency-bound: one torch thread is several times faster than two on a shared,
    loaded 2-core CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LEVELS = ("unit", "host", "server")
# Fixtures that start the host (in-process or as a server) or build its model files: never in unit/.
_HOST_FIXTURES = {"host", "server", "host_env", "server_env", "tiny_models", "tiny_models_dir"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test is marked with its folder's level (``unit``, ``host``, ``server``), so ``-m unit`` and
    ``pytest tests/unit`` select the same host-free tests."""
    root = Path(__file__).resolve().parent
    for item in items:
        level = Path(str(item.path)).resolve().relative_to(root).parts[0]
        if level in LEVELS:
            item.add_marker(getattr(pytest.mark, level))
        if level == "unit" and not _HOST_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses a host fixture: move it to tests/host/")
