"""The real ComfyUI host in this process as the evaluation runner's backend (scripts/host_boot.py), and the
model-file checks and tiny model registration of the CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .runner import CaseRunError
from .suite import REPO_ROOT, STANDIN_TEXT_NODE, Models, Suite

DEV_NODES_DIR = REPO_ROOT / "devnodes"
LEGACY_FOLDERS = {"diffusion_models": "unet", "text_encoders": "clip", "vae": "vae"}


class HostBackend:
    """The real ComfyUI host in this process: its node registry (this pack included) and PromptExecutor.

    ``start()`` boots the host unless this process already did (a test session): it parses the host's args
    from ``comfyui_dir`` (``--cpu`` without CUDA), loads ``extra_model_paths`` yaml files and the host's
    nodes (scripts/host_boot.py). In tiny mode it also loads the dev stand-in nodes (devnodes/).
    """

    def __init__(self, comfyui_dir: Path | None = None, extra_model_paths: Sequence[Path] = (), tiny: bool = False,
                 host_args: Sequence[str] = ()) -> None:
        self.comfyui_dir = Path(comfyui_dir) if comfyui_dir else default_comfyui_dir()
        self.extra_model_paths = [Path(p) for p in extra_model_paths]
        self.tiny = tiny
        self.host_args = list(host_args)
        self.input_dir = Path()
        self._host: Any = None

    def start(self) -> HostBackend:
        import host_boot

        if "comfy.cli_args" not in sys.modules:
            if not (self.comfyui_dir / "main.py").is_file():
                raise CaseRunError(f"no ComfyUI at {self.comfyui_dir}; pass --comfyui or run `make setup`")
            args = list(self.host_args)
            host_boot.bootstrap_host_args(args + ([] if "--cpu" in args else host_boot.cpu_args()), self.comfyui_dir)
        self._host = host_boot.InProcessHost().load_nodes(
            self.extra_model_paths, {"cvx_dev_nodes": DEV_NODES_DIR} if self.tiny else None)
        if host_boot.PACK_NODE not in self._host.node_classes:
            raise CaseRunError(f"the CustomVideoX nodes did not load into the host at {self.comfyui_dir} "
                               f"(import failures: {self._host.import_failed}); install the pack into its custom_nodes/")
        if self.tiny and STANDIN_TEXT_NODE not in self._host.node_classes:
            raise CaseRunError("tiny mode needs the dev stand-in nodes (devnodes/)")
        import folder_paths

        self.input_dir = Path(folder_paths.get_input_directory())
        self.input_dir.mkdir(parents=True, exist_ok=True)
        return self

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor:
        import host_boot

        try:
            self._host.execute(prompt)
        except host_boot.PromptFailed as e:
            if e.error is not None or e.node_errors is not None:
                raise CaseRunError(f"invalid prompt: {json.dumps(e.error)} {json.dumps(e.node_errors, default=str)}"
                                   ) from e
            raise CaseRunError("; ".join(f"node {d.get('node_id')} ({d.get('node_type')}): "
                                         f"{d.get('exception_message')}" for d in e.errors) or "execution failed") from e
        outputs = self._host.cached_outputs(capture)
        if outputs is None:
            raise CaseRunError(f"node {capture} produced no output")
        out = outputs[0]
        return (out[0] if isinstance(out, list) else out).detach().cpu()

    def saved_files(self) -> list[Path]:
        """The files the last run's output nodes saved (SaveVideo's mp4), as absolute paths."""
        import folder_paths

        outputs = self._host.ui_outputs()
        bases = {"output": Path(folder_paths.get_output_directory()), "temp": Path(folder_paths.get_temp_directory())}
        return [bases[i["type"]] / i.get("subfolder", "") / i["filename"] for ui in outputs.values()
                for items in (ui or {}).values() if isinstance(items, list)
                for i in items if isinstance(i, dict) and i.get("filename") and i.get("type") in bases]

    def load_clip_vision(self, name: str) -> Any:
        import comfy.clip_vision
        import folder_paths

        return comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", name))

    def load_clip_text(self, name: str) -> Any:
        import comfy.sd
        import folder_paths

        path = folder_paths.get_full_path_or_raise("text_encoders", name)
        return comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def default_comfyui_dir() -> Path:
    """The ComfyUI this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``), else ``.host/ComfyUI``."""
    parent = REPO_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return REPO_ROOT / ".host" / "ComfyUI"


def missing_models(suite: Suite, models: Models, yamls: Sequence[Path], comfyui_dir: Path) -> list[str]:
    """One line per model file the suite's workflow (or --model/--vae/--t5) names that is in none of the
    host's model folders (its own models/, this repo's and the extra_model_paths yaml files'), with where to
    get it."""
    import model_files as mf

    api = json.loads((REPO_ROOT / suite.workflow if not Path(suite.workflow).is_absolute()
                      else Path(suite.workflow)).read_text(encoding="utf-8"))
    wanted = {mf.TRANSFORMER: models.unet, mf.VAE: models.vae, mf.T5: models.t5}
    loaders = {"CustomVideoXModelLoader": ("model_name", mf.TRANSFORMER), "UNETLoader": ("unet_name", mf.TRANSFORMER),
               "VAELoader": ("vae_name", mf.VAE), "CLIPLoader": ("clip_name", mf.T5)}
    out = []
    for node in api.values():
        if node["class_type"] not in loaders:
            continue
        key, kind = loaders[node["class_type"]]
        name = wanted[kind] or node["inputs"][key]
        folder = mf.FOLDERS[kind]
        roots = [r for y in [*yamls, None] for r in mf.model_roots(folder, REPO_ROOT / "models", y)]
        roots += [comfyui_dir / "models" / folder, comfyui_dir / "models" / LEGACY_FOLDERS[folder]]
        if not any((Path(r) / name.rstrip("/")).exists() for r in roots):
            flag = {mf.TRANSFORMER: "--model", mf.VAE: "--vae", mf.T5: "--t5"}[kind]
            out.append(f"{mf.WHAT[kind]} {name!r} is in none of {', '.join(map(str, dict.fromkeys(roots)))} "
                       f"(pick yours with {flag} NAME)\n{mf.where_to_get(kind)}")
    return out


def register_tiny_models() -> None:
    """The tiny random test model and VAE (built once into .host/tiny_models, where `make run` keeps them,
    outside the folders the web UI lists) added to the booted host's model folders."""
    import folder_paths
    import tiny_models

    tiny_dir = REPO_ROOT / ".host" / "tiny_models"
    tiny_models.build_tiny_model_set(tiny_dir, include={"native_1_0", "vae"})
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, str(tiny_dir / kind))
