"""Run (or resume) a suite's cases through a backend and score them; host-free.

:func:`run_suite` takes any backend with ``run(prompt, capture_node) -> frames`` and an ``input_dir``
(:class:`Backend`), which keeps the runner testable and the host swappable; the real host is
:class:`evaluation.host_backend.HostBackend`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from customvideox.cvx_core import metrics as M
from customvideox.cvx_core.image_ops import frame_strip, png_bytes

from .report import atomic_write, write_reports
from .suite import REPO_ROOT, Case, Models, Suite, load_mask, load_subject_image, patch_workflow

TINY_UNET = "cvx_tiny_test_model.safetensors"
TINY_VAE = "cvx_tiny_test_vae.safetensors"
TINY_VIDEO = {"width": 96, "height": 64, "length": 9, "steps": 2, "cfg": 2.0}


class CaseRunError(RuntimeError):
    """The host failed to run a case's workflow."""


class Backend(Protocol):
    input_dir: Path

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor: ...



@dataclass
class RunOptions:
    models: Models = field(default_factory=Models)
    tiny: bool = False
    clip_vision: Any = None
    dino_vision: Any = None
    text_embed: Callable[[str], torch.Tensor] | None = None
    progress: bool = True
    video: dict[str, Any] = field(default_factory=dict)  # overrides the suite's video settings


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
            atomic_write(result_path, json.dumps(record, indent=1).encode())
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
        buf = png_bytes(strip)
        atomic_write(case_dir / f"{case.id}_frames.png", buf)
        atomic_write(result_path, json.dumps(record, indent=1).encode())  # last: marks the case done
        stats["ran"] += 1
    return write_reports(suite, out_dir, [c.id for c in cases], stats)
