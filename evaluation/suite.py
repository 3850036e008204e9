"""The evaluation suite: subjects, prompts and the settings grid of a suite file, and the example workflow
patched for one case. Host-free (a suite is data; the graph is an API-format dict)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from customvideox.cvx_core import metrics as M

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = "workflows/api/subject_to_video_void.json"
WHEEL_IMAGES = {
    "skimage:chelsea": "scikit-image data.chelsea() (cat, CC0)",
    "skimage:coffee": "scikit-image data.coffee() (cup, CC0)",
    "skimage:astronaut": "scikit-image data.astronaut() (public domain)",
    "skimage:rocket": "scikit-image data.rocket() (public domain)",
    "matplotlib:grace_hopper": "matplotlib sample_data/grace_hopper.jpg (public domain)",
}
TAB_CURVES = ("off", "parabolic", "fixed", "linear_up", "linear_down")
ERAE_MODES = ("off", "auto", "mask")
# The dev stand-in for T5 in the tiny variant (devnodes/).
STANDIN_TEXT_NODE = "CVXTestTextConditioning"


class SuiteError(ValueError):
    """The suite file is malformed."""


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
    """Random text conditioning of the tiny model's width in place of T5 (a dev stand-in node)."""
    for i, (nid, node) in enumerate(list(p.items())):
        if node["class_type"] == "CLIPTextEncode":
            p[nid] = {"class_type": STANDIN_TEXT_NODE, "inputs": {"seed": 1000 + i, "length": 226, "dim": 32}}
    used = {v[0] for n in p.values() for v in n["inputs"].values() if _is_link(v)}
    for nid in _find(p, "CLIPLoader"):
        if nid in used:
            raise SuiteError(f"CLIPLoader {nid} feeds a node the tiny variant cannot replace")
        del p[nid]
    return p
