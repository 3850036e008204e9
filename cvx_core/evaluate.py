"""VideoBench-style evaluation runner: ``python -m cvx_core.evaluate SUITE.json --out DIR [...]``.

A suite names subjects (an image + the words for it), prompts with a ``{subject}`` placeholder and a
settings grid (TAB/ERAE rows × strengths × seeds). Each case (subject × prompt × setting) runs the pack's
example workflow (``workflows/api/subject_to_video_void.json``, its inputs patched) through the real
ComfyUI host in-process, and its frames are scored with :mod:`cvx_core.metrics`. Written to ``--out``:

- ``cases/<case>.json`` (one per finished case; a rerun skips them, so an interrupted run resumes) and
  ``cases/<case>_frames.png`` (reference, first, middle and last frame);
- ``report.json``, ``report.md`` (a table per setting like the paper's Table 2, and per motion type),
  ``plots/<metric>.png`` (metric vs setting) and ``plots/contact_sheet_NNN.png``; PIL only.

Design: everything but :class:`HostBackend` is host-free. ``HostBackend`` imports the host (``comfy``,
``execution``, ``nodes``) only in ``start()``, so importing this module never touches ComfyUI; the host
needs its arguments parsed before ``comfy`` is first imported, which only a process-level entry point
(this CLI, or a test fixture that already did it) can guarantee. ``run_suite`` takes any backend with
``run(prompt, capture_node) -> frames``, which keeps the runner testable and the host swappable.

``--tiny`` runs the same graph on the tiny random test model (random text conditioning instead of T5,
96×64×9 frames, 2 steps): numbers are meaningless there, the plumbing is real.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import metrics as M

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = "workflows/api/subject_to_video_void.json"
TEST_NODES_DIR = REPO_ROOT / "tests" / "test_nodes_testonly"
TINY_UNET = "cvx_tiny_test_model.safetensors"
TINY_VAE = "cvx_tiny_test_vae.safetensors"
TINY_VIDEO = {"width": 96, "height": 64, "length": 9, "steps": 2, "cfg": 2.0}
WHEEL_IMAGES = {
    "skimage:chelsea": "scikit-image data.chelsea() (cat, CC0)",
    "skimage:coffee": "scikit-image data.coffee() (cup, CC0)",
    "skimage:astronaut": "scikit-image data.astronaut() (public domain)",
    "skimage:rocket": "scikit-image data.rocket() (public domain)",
    "matplotlib:grace_hopper": "matplotlib sample_data/grace_hopper.jpg (public domain)",
}
TAB_CURVES = ("off", "parabolic", "fixed", "linear_up", "linear_down")
ERAE_MODES = ("off", "auto", "mask")
TABLE_METRICS = ("clip_t", "clip_i", "dino_i", "subject_similarity", "temporal_consistency", "dynamic_degree",
                 "warp_error")


class SuiteError(ValueError):
    """The suite file is malformed."""


class CaseRunError(RuntimeError):
    """The host failed to run a case's workflow."""


# ------------------------------------------------------------------------------------------------ suite
@dataclass(frozen=True)
class Subject:
    id: str
    image: str  # a WHEEL_IMAGES id or an image path (relative to the suite file)
    phrase: str  # what replaces {subject} in prompts, e.g. "a tabby cat"
    words: str  # the entity words ERAE looks for in the prompt, e.g. "cat"
    mask: str | None = None  # optional subject mask image (white = subject)


@dataclass(frozen=True)
class PromptSpec:
    id: str
    text: str  # with "{subject}"
    motion: str  # camera | subject | background | style
    subjects: tuple[str, ...] = ()  # empty: every subject


@dataclass(frozen=True)
class Row:
    """One ablation row: the paper's Table 2 toggles."""

    name: str
    tab: str = "off"  # TAB curve, or "off" (no schedule: 3D reference attention only)
    b_min: float = 0.0
    b_max: float = 1.0
    erae: str = "off"  # off | auto (from the subject words) | mask (a centre box or the subject mask)
    erae_lambda: float = 1.0


@dataclass(frozen=True)
class Case:
    subject: Subject
    prompt: PromptSpec
    row: Row
    strength: float
    seed: int

    @property
    def text(self) -> str:
        return self.prompt.text.replace("{subject}", self.subject.phrase)

    @property
    def setting(self) -> str:
        return f"{self.row.name} s={self.strength:g}"

    @property
    def id(self) -> str:
        raw = f"{self.subject.id}__{self.prompt.id}__{self.row.name}__s{self.strength:g}__seed{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw.replace("+", "plus"))


@dataclass
class Suite:
    name: str
    path: Path
    workflow: str
    video: dict[str, Any]
    subjects: list[Subject]
    prompts: list[PromptSpec]
    rows: list[Row]
    strengths: list[float]
    seeds: list[int]
    metrics: M.EvalOptions
    negative: str | None = None

    def cases(self, subjects: Sequence[str] = (), prompts: Sequence[str] = (), rows: Sequence[str] = (),
              limit: int | None = None) -> list[Case]:
        """Every case, subject-major; filtered by ids/row names, at most ``limit``."""
        out = []
        for subj in self.subjects:
            if subjects and subj.id not in subjects:
                continue
            for p in self.prompts:
                if (prompts and p.id not in prompts) or (p.subjects and subj.id not in p.subjects):
                    continue
                for row in self.rows:
                    if rows and row.name not in rows:
                        continue
                    for strength in self.strengths:
                        for seed in self.seeds:
                            out.append(Case(subj, p, row, float(strength), int(seed)))
        return out[:limit] if limit else out


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise SuiteError(f"{where}: missing {key!r}")
    return d[key]


def load_suite(path: Path | str) -> Suite:
    """Read and check a suite file (see eval/starter_suite.json)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SuiteError(f"cannot read suite {path}: {e}") from e
    subjects = [Subject(id=_req(s, "id", "subject"), image=_req(s, "image", f"subject {s.get('id')}"),
                        phrase=s.get("phrase") or s["words"], words=_req(s, "words", f"subject {s.get('id')}"),
                        mask=s.get("mask")) for s in _req(d, "subjects", str(path))]
    ids = [s.id for s in subjects]
    prompts = []
    for p in _req(d, "prompts", str(path)):
        where = f"prompt {p.get('id')}"
        text = _req(p, "text", where)
        if "{subject}" not in text:
            raise SuiteError(f"{where}: the text has no {{subject}} placeholder: {text!r}")
        unknown = [s for s in p.get("subjects", []) if s not in ids]
        if unknown:
            raise SuiteError(f"{where}: unknown subjects {unknown} (subjects: {ids})")
        prompts.append(PromptSpec(id=_req(p, "id", where), text=text, motion=p.get("motion", "other"),
                                  subjects=tuple(p.get("subjects", ()))))
    grid = d.get("grid", {})
    rows = [Row(**r) for r in grid.get("rows", [{"name": "base"}])]
    for r in rows:
        if r.tab not in TAB_CURVES:
            raise SuiteError(f"row {r.name}: tab {r.tab!r} is not one of {TAB_CURVES}")
        if r.erae not in ERAE_MODES:
            raise SuiteError(f"row {r.name}: erae {r.erae!r} is not one of {ERAE_MODES}")
    for what, items in (("subject", ids), ("prompt", [p.id for p in prompts]), ("row", [r.name for r in rows])):
        if len(set(items)) != len(items):
            raise SuiteError(f"duplicate {what} ids in {path}")
    video = {"width": 720, "height": 480, "length": 49, "steps": 50, "cfg": 6.0, "fps": 8.0, **d.get("video", {})}
    try:
        opts = M.EvalOptions(**{"fps": video["fps"], **d.get("metrics", {})})
    except (TypeError, ValueError) as e:
        raise SuiteError(f"{path}: metrics: {e}") from e
    return Suite(name=d.get("name", path.stem), path=path, workflow=d.get("workflow", DEFAULT_WORKFLOW),
                 video=video, subjects=subjects, prompts=prompts, rows=rows,
                 strengths=[float(s) for s in grid.get("strengths", [1.0])],
                 seeds=[int(s) for s in grid.get("seeds", [42])], metrics=opts, negative=d.get("negative"))


def load_subject_image(spec: str, base: Path | None = None) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` from a wheel image id (WHEEL_IMAGES) or a file path."""
    from PIL import Image

    if spec.startswith("skimage:"):
        data = M._require("skimage.data", "scikit-image")
        name = spec.split(":", 1)[1]
        if f"skimage:{name}" not in WHEEL_IMAGES:
            raise SuiteError(f"unknown scikit-image image {name!r}; known: {sorted(WHEEL_IMAGES)}")
        arr = np.asarray(getattr(data, name)())
    elif spec.startswith("matplotlib:"):
        mpl = M._require("matplotlib", "matplotlib")
        p = Path(mpl.get_data_path()) / "sample_data" / f"{spec.split(':', 1)[1]}.jpg"
        if not p.is_file():
            raise SuiteError(f"matplotlib ships no sample image {p.name}")
        arr = np.asarray(Image.open(p).convert("RGB"))
    else:
        p = Path(spec) if base is None or Path(spec).is_absolute() else base / spec
        arr = np.asarray(Image.open(p).convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def load_mask(spec: str, base: Path) -> np.ndarray:
    from PIL import Image

    p = Path(spec) if Path(spec).is_absolute() else base / spec
    return np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------- workflow
def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)


def _find(api: dict[str, Any], class_type: str) -> list[str]:
    return [nid for nid, n in api.items() if n["class_type"] == class_type]


def _one(api: dict[str, Any], class_type: str) -> str:
    ids = _find(api, class_type)
    if len(ids) != 1:
        raise SuiteError(f"the workflow must have exactly one {class_type} node, it has {len(ids)}")
    return ids[0]


@dataclass
class Models:
    """File names as the host's loaders list them; None keeps the workflow's own."""

    unet: str | None = None
    vae: str | None = None
    t5: str | None = None


def patch_workflow(api: dict[str, Any], case: Case, video: dict[str, Any], image_name: str, models: Models,
                   tiny: bool = False, negative: str | None = None, save_prefix: str = "cvx_eval") -> tuple[
                       dict[str, Any], str]:
    """The shipped API graph with this case's inputs: prompt text, reference image, size/length/steps/cfg,
    seed, strength, TAB row (schedule removed for "off") and ERAE region (added for "auto"/"mask").
    Returns the graph and the id of the VAEDecode node whose frames are scored."""
    p = copy.deepcopy(api)
    apply_id = _one(p, "CustomVideoXApply")
    guider = p[_one(p, "CFGGuider")]["inputs"]
    pos_id, neg_id = guider["positive"][0], guider["negative"][0]
    p[pos_id]["inputs"]["text"] = case.text
    if negative is not None:
        p[neg_id]["inputs"]["text"] = negative
    p[_one(p, "LoadImage")]["inputs"]["image"] = image_name
    w, h = int(video["width"]), int(video["height"])
    for nid in _find(p, "EmptyHunyuanLatentVideo"):
        p[nid]["inputs"].update(width=w, height=h, length=int(video["length"]))
    for nid in _find(p, "CustomVideoXReferenceEncode"):
        p[nid]["inputs"].update(width=w, height=h)
    for nid in _find(p, "BasicScheduler"):
        p[nid]["inputs"]["steps"] = int(video["steps"])
    guider["cfg"] = float(video["cfg"])
    p[_one(p, "RandomNoise")]["inputs"]["noise_seed"] = case.seed
    for nid in _find(p, "CustomVideoXModelLoader") + _find(p, "UNETLoader"):
        if models.unet:
            key = "model_name" if p[nid]["class_type"] == "CustomVideoXModelLoader" else "unet_name"
            p[nid]["inputs"][key] = models.unet
    for nid in _find(p, "VAELoader"):
        if models.vae:
            p[nid]["inputs"]["vae_name"] = models.vae
    clip_ids = _find(p, "CLIPLoader")
    for nid in clip_ids:
        if models.t5:
            p[nid]["inputs"]["clip_name"] = models.t5
    for nid in _find(p, "SaveVideo"):
        p[nid]["inputs"]["filename_prefix"] = f"{save_prefix}/{case.id}"

    apply = p[apply_id]["inputs"]
    apply["strength"] = case.strength
    row = case.row
    sched = apply.pop("schedule", None)
    if row.tab != "off":
        sid = sched[0] if sched else "cvx_eval_tab"
        p[sid] = {"class_type": "CustomVideoXTABSchedule",
                  "inputs": {"curve": row.tab, "b_min": row.b_min, "b_max": row.b_max, "start_percent": 0.0,
                             "end_percent": 1.0, "outside": "base", "keyframes": "0:0, 0.5:1, 1:0"}}
        apply["schedule"] = [sid, 0]
    elif sched:
        del p[sched[0]]
    apply.pop("region", None)
    erae = row.erae
    if erae == "auto" and (tiny or not clip_ids):
        erae = "mask"  # no T5 to tokenise the prompt (tiny variant): the region comes from a mask instead
    if erae != "off":
        region = {"mode": erae, "lam": row.erae_lambda, "map_block": 0 if tiny else 2, "refine": "soft",
                  "top_k": 0.25, "smooth": 0}
        if erae == "auto":
            region.update(prompt=case.text, subject_words=case.subject.words, clip=[clip_ids[0], 0])
        else:
            # [reconstructed] no per-video subject mask is known before sampling: a centre box over the
            # middle half of the frame.
            p["cvx_eval_mask_bg"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": w, "height": h}}
            p["cvx_eval_mask_box"] = {"class_type": "SolidMask",
                                      "inputs": {"value": 1.0, "width": max(1, w // 2), "height": max(1, h // 2)}}
            p["cvx_eval_mask"] = {"class_type": "MaskComposite",
                                  "inputs": {"destination": ["cvx_eval_mask_bg", 0], "source": ["cvx_eval_mask_box", 0],
                                             "x": w // 4, "y": h // 4, "operation": "add"}}
            region["mask"] = ["cvx_eval_mask", 0]
        p["cvx_eval_region"] = {"class_type": "CustomVideoXEntityRegion", "inputs": region}
        apply["region"] = ["cvx_eval_region", 0]
    if tiny:
        p = _tiny(p)
    decodes = [nid for nid in _find(p, "VAEDecode") if p[nid]["inputs"]["samples"][0] in _find(p, "SamplerCustomAdvanced")
               + _find(p, "KSampler")]
    if not decodes:
        raise SuiteError("the workflow has no VAEDecode of a sampler's output")
    return p, decodes[0]


def _tiny(p: dict[str, Any]) -> dict[str, Any]:
    """Random text conditioning of the tiny model's width in place of T5 (test-only node)."""
    for i, (nid, node) in enumerate(list(p.items())):
        if node["class_type"] == "CLIPTextEncode":
            p[nid] = {"class_type": "CVXTestTextConditioning", "inputs": {"seed": 1000 + i, "length": 226, "dim": 32}}
    used = {v[0] for n in p.values() for v in n["inputs"].values() if _is_link(v)}
    for nid in _find(p, "CLIPLoader"):
        if nid in used:
            raise SuiteError(f"CLIPLoader {nid} feeds a node the tiny variant cannot replace")
        del p[nid]
    return p


# -------------------------------------------------------------------------------------------- backend
class Backend(Protocol):
    input_dir: Path

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor: ...


class HostBackend:
    """The real ComfyUI host in this process: its node registry (this pack included) and PromptExecutor.

    ``start()`` boots the host unless this process already did (a test session): it puts ``comfyui_dir``
    first on ``sys.path``, parses the host's args (``--cpu`` without CUDA), loads ``extra_model_paths``
    yaml files, and runs ``nodes.init_extra_nodes``. In tiny mode it also loads the repo's test-only nodes.
    """

    def __init__(self, comfyui_dir: Path | None = None, extra_model_paths: Sequence[Path] = (), tiny: bool = False,
                 host_args: Sequence[str] = ()) -> None:
        self.comfyui_dir = Path(comfyui_dir) if comfyui_dir else default_comfyui_dir()
        self.extra_model_paths = [Path(p) for p in extra_model_paths]
        self.tiny = tiny
        self.host_args = list(host_args)
        self.input_dir = Path()
        self._executor: Any = None
        self._loop: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> HostBackend:
        import asyncio

        if "comfy.cli_args" not in sys.modules:
            if not (self.comfyui_dir / "main.py").is_file():
                raise CaseRunError(f"no ComfyUI at {self.comfyui_dir}; pass --comfyui or run `make setup`")
            for p in (str(REPO_ROOT / "scripts"), str(self.comfyui_dir)):
                if p in sys.path:
                    sys.path.remove(p)
                sys.path.insert(0, p)  # the host's `nodes`/`utils` must win over this repo's `nodes/`
            args = list(self.host_args)
            if "--cpu" not in args and not torch.cuda.is_available():
                args.append("--cpu")
            saved, sys.argv = sys.argv, [str(self.comfyui_dir / "main.py"), *args]
            try:
                import comfy.options

                comfy.options.enable_args_parsing()
                import comfy.cli_args  # noqa: F401  (parses sys.argv now)
            finally:
                sys.argv = saved
        import importlib

        # Before `nodes`: once the host puts comfy/ on sys.path, `utils` would be comfy/utils.py.
        extra_config = importlib.import_module("utils.extra_config")
        import folder_paths

        import nodes

        self._loop = asyncio.new_event_loop()
        if "CustomVideoXApply" not in nodes.NODE_CLASS_MAPPINGS:  # not booted in this process yet
            for y in self.extra_model_paths:
                extra_config.load_extra_path_config(str(y))
            if self.tiny:
                self._tmp = tempfile.TemporaryDirectory(prefix="cvx_eval_nodes_")
                (Path(self._tmp.name) / "cvx_test_nodes").symlink_to(TEST_NODES_DIR, target_is_directory=True)
                folder_paths.add_model_folder_path("custom_nodes", self._tmp.name)
            import server

            asyncio.set_event_loop(self._loop)
            server.PromptServer(self._loop)  # some host nodes register with PromptServer.instance at load
            failed = self._loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True,
                                                                          init_api_nodes=False))
            if "CustomVideoXApply" not in nodes.NODE_CLASS_MAPPINGS:
                raise CaseRunError(f"the CustomVideoX nodes did not load into the host at {self.comfyui_dir} "
                                   f"(import failures: {failed}); install the pack into its custom_nodes/")
        if self.tiny and "CVXTestTextConditioning" not in nodes.NODE_CLASS_MAPPINGS:
            raise CaseRunError("tiny mode needs the test-only nodes (tests/test_nodes_testonly)")
        self.input_dir = Path(folder_paths.get_input_directory())
        self.input_dir.mkdir(parents=True, exist_ok=True)
        import execution

        class _Stub:
            client_id = None
            last_node_id = None
            last_prompt_id = None
            sockets_metadata: dict[str, Any] = {}

            def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
                pass

            def queue_updated(self) -> None:
                pass

        # CLASSIC cache: unchanged nodes (model, VAE, T5, reference) are not rerun between cases.
        self._executor = execution.PromptExecutor(_Stub(), cache_type=execution.CacheType.CLASSIC,
                                                  cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        return self

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor:
        return self._loop.run_until_complete(self._run(prompt, capture))

    async def _run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor:
        import uuid

        import execution

        pid = str(uuid.uuid4())
        valid, error, outputs, node_errors = await execution.validate_prompt(pid, prompt, None)
        if not valid:
            raise CaseRunError(f"invalid prompt: {json.dumps(error)} {json.dumps(node_errors, default=str)}")
        ex = self._executor
        await ex.execute_async(prompt, pid, {}, outputs)
        if not ex.success:
            errs = [d for ev, d in ex.status_messages if ev in ("execution_error", "execution_interrupted")]
            raise CaseRunError("; ".join(f"node {e.get('node_id')} ({e.get('node_type')}): "
                                         f"{e.get('exception_message')}" for e in errs) or "execution failed")
        entry = await ex.caches.outputs.get(capture)
        if entry is None:
            raise CaseRunError(f"node {capture} produced no output")
        out = entry.outputs[0]
        return (out[0] if isinstance(out, list) else out).detach().cpu()

    def saved_files(self) -> list[Path]:
        """The files the last run's output nodes saved (SaveVideo's mp4), as absolute paths."""
        import folder_paths

        outputs = (getattr(self._executor, "history_result", None) or {}).get("outputs", {})
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


def clip_text_embedder(clip: Any) -> Callable[[str], torch.Tensor]:
    """A ComfyUI CLIP (text encoder) -> prompt -> its pooled (projected) embedding."""

    def embed(text: str) -> torch.Tensor:
        _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        if pooled is None:
            raise ValueError("this CLIP gives no pooled text embedding")
        return pooled.float().cpu()

    return embed


# --------------------------------------------------------------------------------------------- runner
@dataclass
class RunOptions:
    models: Models = field(default_factory=Models)
    tiny: bool = False
    clip_vision: Any = None
    dino_vision: Any = None
    text_embed: Callable[[str], torch.Tensor] | None = None
    progress: bool = True
    video: dict[str, Any] = field(default_factory=dict)  # overrides the suite's video settings


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def case_fingerprint(case: Case, video: dict[str, Any], opts: RunOptions, workflow: str,
                     metric_opts: M.EvalOptions) -> str:
    """What decides a case's result; a stored case with another fingerprint is rerun."""
    key = {"case": asdict(case), "video": video, "models": asdict(opts.models), "tiny": opts.tiny,
           "workflow": workflow, "metrics": asdict(metric_opts),
           "clip_vision": opts.clip_vision is not None, "dino": opts.dino_vision is not None,
           "clip_text": opts.text_embed is not None}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _progress(items: list[Case], enabled: bool) -> Iterable[Case]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc="cases", unit="case", file=sys.stderr)
    except ImportError:
        return items


def run_suite(suite: Suite, out_dir: Path, backend: Backend | None, opts: RunOptions,
              cases: list[Case] | None = None) -> dict[str, Any]:
    """Run (or resume) every case and write the reports; returns report.json's content.
    ``backend`` may be None when every case is already done (reports only)."""
    out_dir = Path(out_dir)
    case_dir = out_dir / "cases"
    case_dir.mkdir(parents=True, exist_ok=True)
    cases = suite.cases() if cases is None else cases
    video = dict(suite.video)
    if opts.tiny:
        video.update(TINY_VIDEO)
        opts.models = Models(unet=opts.models.unet or TINY_UNET, vae=opts.models.vae or TINY_VAE, t5=None)
    video.update(opts.video)
    api = json.loads((REPO_ROOT / suite.workflow if not Path(suite.workflow).is_absolute()
                      else Path(suite.workflow)).read_text(encoding="utf-8"))
    base = suite.path.parent
    images: dict[str, np.ndarray] = {}
    stats = {"ran": 0, "skipped": 0, "failed": 0}
    for case in _progress(cases, opts.progress):
        fp = case_fingerprint(case, video, opts, suite.workflow, suite.metrics)
        result_path = case_dir / f"{case.id}.json"
        if result_path.is_file():
            old = json.loads(result_path.read_text(encoding="utf-8"))
            if old.get("status") == "done" and old.get("fingerprint") == fp:
                stats["skipped"] += 1
                continue
        if backend is None:
            raise CaseRunError(f"case {case.id} is not done and no host backend was given")
        subj = case.subject
        if subj.id not in images:
            images[subj.id] = load_subject_image(subj.image, base)
        ref = images[subj.id]
        image_name = f"cvx_eval_{re.sub(r'[^A-Za-z0-9_-]', '_', suite.name)}_{subj.id}.png"
        if not (backend.input_dir / image_name).is_file():
            from PIL import Image

            Image.fromarray(ref).save(backend.input_dir / image_name)
        record: dict[str, Any] = {"id": case.id, "fingerprint": fp, "subject": subj.id, "prompt_id": case.prompt.id,
                                  "prompt": case.text, "motion": case.prompt.motion, "row": case.row.name,
                                  "setting": case.setting, "strength": case.strength, "seed": case.seed,
                                  "row_settings": asdict(case.row), "video": video, "tiny": opts.tiny}
        t0 = time.monotonic()
        try:
            graph, decode = patch_workflow(api, case, video, image_name, opts.models, opts.tiny, suite.negative,
                                           save_prefix=f"cvx_eval/{suite.name}")
            frames = backend.run(graph, decode)
            record["sample_s"] = round(time.monotonic() - t0, 2)
            mask = load_mask(subj.mask, base) if subj.mask else None
            results = M.evaluate_video(frames, torch.from_numpy(ref).float().div(255), mask,
                                       prompt=case.text, clip_vision=opts.clip_vision,
                                       dino_vision=opts.dino_vision, text_embed=opts.text_embed,
                                       options=suite.metrics)
        except (RuntimeError, ValueError, OSError) as e:  # a missing eval package (ImportError) stops the run
            record.update(status="error", error=f"{type(e).__name__}: {e}")
            _atomic_write(result_path, json.dumps(record, indent=1).encode())
            stats["failed"] += 1
            continue
        record["status"] = "done"
        record["seconds"] = round(time.monotonic() - t0, 2)
        record["frames"] = list(frames.shape)
        videos = [p for p in getattr(backend, "saved_files", list)() if p.suffix == ".mp4" and p.is_file()]
        if videos:  # a copy beside the case's record, so the report's link survives a cleaned output folder
            shutil.copyfile(videos[-1], case_dir / f"{case.id}.mp4")
            record["video"] = f"cases/{case.id}.mp4"
        record["metrics"] = {k: r.as_dict() for k, r in results.items()}
        strip = frame_strip(ref, M.as_frames(frames), case.id)
        buf = _png_bytes(strip)
        _atomic_write(case_dir / f"{case.id}_frames.png", buf)
        _atomic_write(result_path, json.dumps(record, indent=1).encode())  # last: marks the case done
        stats["ran"] += 1
    return write_reports(suite, out_dir, [c.id for c in cases], stats)


# -------------------------------------------------------------------------------------------- reports
def _load_records(out_dir: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    recs = []
    for cid in ids:
        p = out_dir / "cases" / f"{cid}.json"
        if p.is_file():
            recs.append(json.loads(p.read_text(encoding="utf-8")))
    return recs


def aggregate(records: list[dict[str, Any]], group_by: str) -> dict[str, dict[str, Any]]:
    """{group: {metric: {value, label, n, reason}}} over done cases (dynamic degree = share dynamic)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "done":
            groups.setdefault(str(r[group_by]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for g, recs in groups.items():
        row: dict[str, Any] = {"n": len(recs)}
        for key in TABLE_METRICS:
            ms = [rec["metrics"].get(key) for rec in recs if rec["metrics"].get(key)]
            vals = [m["value"] for m in ms if m["value"] is not None]
            labels = sorted({m["label"] for m in ms if m["value"] is not None})
            reasons = sorted({m["reason"] for m in ms if m["value"] is None and m.get("reason")})
            row[key] = {"value": M.mean_or_none(vals), "n": len(vals),
                        "label": "; ".join(labels) or (ms[0]["label"] if ms else key),
                        "reason": "; ".join(reasons) or None}
        out[g] = row
    return out


def _fmt(m: dict[str, Any], key: str) -> str:
    if m["value"] is None:
        return "n/a"
    return f"{m['value']:.4f}" if key == "warp_error" else f"{100 * m['value']:.2f}"


def _table(title: str, agg: dict[str, dict[str, Any]], order: Sequence[str], first_col: str) -> list[str]:
    keys = [k for k in TABLE_METRICS if any(agg[g][k]["value"] is not None for g in agg)]
    missing = [k for k in TABLE_METRICS if k not in keys]
    head = [first_col, "n"] + [column_header(k, _labels(agg, k)) for k in keys]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in [o for o in order if o in agg]:
        lines.append("| " + " | ".join([g, str(agg[g]["n"])] + [_fmt(agg[g][k], k) for k in keys]) + " |")
    lines.append("")
    if missing:
        lines.append("Not available: " + "; ".join(
            f"{_short(k)} ({next((agg[g][k]['reason'] for g in agg if agg[g][k]['reason']), 'no data')})"
            for k in missing) + ".")
        lines.append("")
    return lines


def _labels(agg: dict[str, dict[str, Any]], key: str) -> list[str]:
    return sorted({agg[g][key]["label"] for g in agg if agg[g][key]["value"] is not None})


def column_header(key: str, labels: Sequence[str]) -> str:
    """A table column / plot title: the short name plus what computed it (e.g. "EfficientNet-Lite0 proxy",
    "Farneback"), so a proxy score never passes for the paper's metric."""
    inner = sorted({m.group(1) for lab in labels if (m := re.search(r"\(([^()]*)\)\s*$", lab))})
    return _short(key) + (f" ({'; '.join(inner)})" if inner else "")


def _short(key: str) -> str:
    return {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "subject_similarity": "Subject sim.",
            "temporal_consistency": "Temporal cons.", "dynamic_degree": "Dynamic deg.",
            "warp_error": "Warp err. ↓"}[key]


def write_reports(suite: Suite, out_dir: Path, ids: Sequence[str], stats: dict[str, int]) -> dict[str, Any]:
    records = _load_records(out_dir, ids)
    done = [r for r in records if r.get("status") == "done"]
    settings = list(dict.fromkeys(r["setting"] for r in sorted(done, key=lambda r: (
        [x.name for x in suite.rows].index(r["row"]) if r["row"] in [x.name for x in suite.rows] else 99,
        r["strength"]))))
    by_setting = aggregate(records, "setting")
    by_motion = aggregate(records, "motion")
    overall = aggregate([{**r, "all": "all"} for r in records], "all")
    labels = {}
    for r in done:
        for k, m in r["metrics"].items():
            if m["value"] is not None:
                labels.setdefault(k, set()).add(m["label"])
    tiny = any(r.get("tiny") for r in done)
    report = {"suite": suite.name, "cases": len(ids), "done": len(done),
              "failed": [{"id": r["id"], "error": r.get("error")} for r in records if r.get("status") == "error"],
              "this_run": stats, "tiny": tiny, "by_setting": by_setting, "by_motion": by_motion,
              "overall": overall.get("all", {}), "labels": {k: sorted(v) for k, v in labels.items()},
              "cases_done": [r["id"] for r in done]}
    _atomic_write(out_dir / "report.json", json.dumps(report, indent=1).encode())

    md = [f"# Evaluation: {suite.name}", ""]
    if tiny:
        md += ["**Tiny random test model: these numbers are meaningless; only the plumbing is real.**", ""]
    md += [f"{len(done)} of {len(ids)} cases done" + (f", {len(report['failed'])} failed" if report["failed"] else "")
           + ". Cosine metrics and dynamic degree ×100 as in the paper's tables; warp error in RGB 0..1 "
           "(lower is better).", ""]
    if by_setting:
        md += _table("By setting (cf. the paper's Table 2)", by_setting, settings, "setting")
        md += _table("By motion type", by_motion, sorted(by_motion), "motion")
    md += ["### Metric labels", ""] + [f"- {_short(k)}: {', '.join(sorted(v))}" for k, v in
                                        sorted(labels.items(), key=lambda kv: TABLE_METRICS.index(kv[0])
                                               if kv[0] in TABLE_METRICS else 99)]
    md += ["", "Dynamic degree follows VBench's rule on OpenCV optical flow (not RAFT); \"proxy\" scores come "
           "from an ImageNet classifier's features, not CLIP or DINO, and are not comparable with the paper.", ""]
    md += ["### Cases", ""] + [
        f"- {r['id']}: " + ", ".join([f"[video]({r['video']})"] * bool(r.get("video"))
                                     + [f"[frames](cases/{r['id']}_frames.png)"]) for r in done] + [""]
    if report["failed"]:
        md += ["### Failed cases", ""] + [f"- {f['id']}: {f['error']}" for f in report["failed"]] + [""]
    _atomic_write(out_dir / "report.md", "\n".join(md).encode())

    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for key in TABLE_METRICS:
        vals = [by_setting[s][key]["value"] for s in settings]
        if any(v is not None for v in vals):
            img = bar_plot(f"{column_header(key, _labels(by_setting, key))} vs setting", settings, vals,
                           by_setting[settings[0]][key]["label"],
                           percent=key != "warp_error")
            img.save(plots / f"{key}.png")
    for old in plots.glob("contact_sheet_*.png"):
        old.unlink()
    strips = [out_dir / "cases" / f"{r['id']}_frames.png" for r in done]
    strips = [p for p in strips if p.is_file()]
    for page, start in enumerate(range(0, len(strips), 20)):
        contact_sheet(strips[start:start + 20]).save(plots / f"contact_sheet_{page + 1:03d}.png")
    return report


# --------------------------------------------------------------------------------------- images (PIL)
def _font(size: int = 12) -> Any:
    """DejaVu Sans (shipped with matplotlib, an eval requirement): Pillow's bundled default font has no
    arrows and near-zero-width spaces at small sizes."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _thumb(arr: np.ndarray, height: int) -> Any:
    from PIL import Image

    img = Image.fromarray(arr[..., :3])
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.Resampling.BILINEAR)


def frame_strip(reference: np.ndarray, frames: np.ndarray, title: str, height: int = 128) -> Any:
    """Reference | first | middle | last frame, titled."""
    from PIL import Image, ImageDraw

    n = frames.shape[0]
    tiles = [("reference", reference), ("first", frames[0]), ("middle", frames[n // 2]), ("last", frames[-1])]
    thumbs = [(name, _thumb(a, height)) for name, a in tiles]
    width = sum(t.width for _, t in thumbs) + 4 * (len(thumbs) + 1)
    img = Image.new("RGB", (max(width, 300), height + 36), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title[:120], fill="black", font=_font(12))
    x = 4
    for name, t in thumbs:
        img.paste(t, (x, 18))
        draw.text((x + 2, 20 + height), name, fill="black", font=_font(10))
        x += t.width + 4
    return img


def contact_sheet(strips: Sequence[Path]) -> Any:
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in strips]
    if not ims:
        return Image.new("RGB", (300, 40), "white")
    sheet = Image.new("RGB", (max(i.width for i in ims), sum(i.height for i in ims)), "white")
    y = 0
    for i in ims:
        sheet.paste(i, (0, y))
        y += i.height
    return sheet


def bar_plot(title: str, names: Sequence[str], values: Sequence[float | None], label: str,
             percent: bool = True, size: tuple[int, int] = (640, 360)) -> Any:
    """A bar chart of one metric per setting (PIL only); ``None`` bars are marked n/a."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=_font(14))
    d.text((8, 24), label[:100], fill=(90, 90, 90), font=_font(10))
    shown = [(100 * v if percent else v) if v is not None else None for v in values]
    finite = [v for v in shown if v is not None and math.isfinite(v)]
    top = max(finite) if finite else 1.0
    lo = min(0.0, min(finite)) if finite else 0.0
    top = top if top > lo else lo + 1.0
    x0, y0, x1, y1 = 50, 50, w - 10, h - 50
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    d.text((4, y0 - 6), f"{top:.3g}", fill="black", font=_font(10))
    d.text((4, y1 - 6), f"{lo:.3g}", fill="black", font=_font(10))
    n = max(1, len(shown))
    slot = (x1 - x0) / n
    for i, (name, v) in enumerate(zip(names, shown)):
        bx = x0 + i * slot + slot * 0.15
        bw = slot * 0.7
        if v is None:
            d.text((bx, y1 - 16), "n/a", fill="red", font=_font(10))
        else:
            by = y1 - (v - lo) / (top - lo) * (y1 - y0)
            d.rectangle([bx, by, bx + bw, y1], fill=(70, 120, 190))
            d.text((bx, by - 14), f"{v:.3g}", fill="black", font=_font(10))
        d.text((bx, y1 + 6), str(name)[:18], fill="black", font=_font(10))
    return img


def _png_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ CLI
def _scripts() -> None:
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))


LEGACY_FOLDERS = {"diffusion_models": "unet", "text_encoders": "clip", "vae": "vae"}


def missing_models(suite: Suite, models: Models, yamls: Sequence[Path], comfyui_dir: Path) -> list[str]:
    """One line per model file the suite's workflow (or --model/--vae/--t5) names that is in none of the
    host's model folders (its own models/, this repo's and the extra_model_paths yaml files'), with where to
    get it."""
    _scripts()
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
    _scripts()
    import folder_paths
    import tiny_models

    tiny_dir = REPO_ROOT / ".host" / "tiny_models"
    tiny_models.build_tiny_model_set(tiny_dir, include={"native_1_0", "vae"})
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, str(tiny_dir / kind))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cvx_core.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", type=Path, help="suite JSON (e.g. eval/starter_suite.json)")
    ap.add_argument("--out", type=Path, help="output folder (rerun with the same one to resume); not needed for --list")
    ap.add_argument("--tiny", action="store_true", help="the tiny random test model (plumbing check only)")
    ap.add_argument("--model", help="CogVideoX transformer file (diffusion_models), default: the workflow's")
    ap.add_argument("--vae", help="CogVideoX VAE file (vae), default: the workflow's")
    ap.add_argument("--t5", help="T5 text encoder file (text_encoders), default: the workflow's")
    ap.add_argument("--clip-vision", help="CLIP_VISION file (clip_vision) for CLIP-I and CLIP temporal consistency")
    ap.add_argument("--dino", help="DINOv2/v3 file (clip_vision) for DINO-I")
    ap.add_argument("--clip-text", help="CLIP text encoder (text_encoders) matching --clip-vision, for CLIP-T")
    ap.add_argument("--subjects", nargs="*", default=(), help="only these subject ids")
    ap.add_argument("--prompts", nargs="*", default=(), help="only these prompt ids")
    ap.add_argument("--rows", nargs="*", default=(), help="only these grid rows (e.g. base +TAB)")
    ap.add_argument("--limit", type=int, help="at most this many cases")
    ap.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: the one this pack is installed in, "
                                                  "else .host/ComfyUI)")
    ap.add_argument("--extra-model-paths", type=Path, action="append", default=[],
                    help="extra_model_paths.yaml (repeatable; default: the repo's, if present)")
    ap.add_argument("--host-arg", action="append", default=[], help="an argument for the host (repeatable)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    a = ap.parse_args(argv)
    try:
        suite = load_suite(a.suite)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cases = suite.cases(a.subjects, a.prompts, a.rows, a.limit)
    if a.list:
        for c in cases:
            print(f"{c.id}\t{c.text}")
        return 0
    if not cases:
        print("error: no case matches the filters", file=sys.stderr)
        return 2
    if a.out is None:
        ap.error("--out is required to run the suite (only --list works without it)")
    yamls = a.extra_model_paths or [p for p in [REPO_ROOT / "extra_model_paths.yaml"] if p.is_file()]
    if not a.tiny:
        missing = missing_models(suite, Models(unet=a.model, vae=a.vae, t5=a.t5), yamls,
                                 a.comfyui or default_comfyui_dir())
        if missing:
            print("error: the suite needs model files that are not there (nothing was run):\n" + "\n".join(missing)
                  + f"\nTo check the plumbing without weights: python -m cvx_core.evaluate {a.suite} --tiny "
                  f"--out {a.out}", file=sys.stderr)
            return 2
    backend = HostBackend(a.comfyui, yamls, tiny=a.tiny, host_args=a.host_arg).start()
    if a.tiny:
        register_tiny_models()
    opts = RunOptions(models=Models(unet=a.model, vae=a.vae, t5=a.t5), tiny=a.tiny, progress=not a.no_progress)
    if a.clip_vision:
        opts.clip_vision = backend.load_clip_vision(a.clip_vision)
    if a.dino:
        opts.dino_vision = backend.load_clip_vision(a.dino)
    if a.clip_text:
        opts.text_embed = clip_text_embedder(backend.load_clip_text(a.clip_text))
    report = run_suite(suite, a.out, backend, opts, cases)
    print(f"{report['done']}/{report['cases']} cases done ({report['this_run']}); report: {a.out / 'report.md'}")
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
