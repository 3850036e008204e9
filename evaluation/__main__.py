"""VideoBench-style evaluation runner: ``python -m evaluation SUITE.json --out DIR [...]``.

A suite names subjects (an image + the words for it), prompts with a ``{subject}`` placeholder and a
settings grid (TAB/ERAE rows × strengths × seeds). Each case (subject × prompt × setting) runs the pack's
example workflow (``workflows/api/subject_to_video_void.json``, its inputs patched) through the real
ComfyUI host in-process, and its frames are scored with :mod:`cvx_core.metrics`. Written to ``--out``:

- ``cases/<case>.json`` (one per finished case; a rerun skips them, so an interrupted run resumes) and
  ``cases/<case>_frames.png`` (reference, first, middle and last frame);
- ``report.json``, ``report.md`` (a table per setting like the paper's Table 2, and per motion type),
  ``plots/<metric>.png`` (metric vs setting, matplotlib) and ``plots/contact_sheet_NNN.png``.

Layout: ``suite.py`` (suite file, workflow patching), ``runner.py`` (run/resume, scoring), ``report.py``
(tables, charts) are host-free; ``host_backend.py`` boots the host in this process (scripts/host_boot.py)
only in ``HostBackend.start()``, which only a process-level entry point (this CLI, or a test fixture that
already booted it) can do before ``comfy`` is first imported.

``--tiny`` runs the same graph on the tiny random test model (random text conditioning instead of T5,
96×64×9 frames, 2 steps): numbers are meaningless there, the plumbing is real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from customvideox.cvx_core.metrics import clip_text_embedder

from .host_backend import HostBackend, default_comfyui_dir, missing_models, register_tiny_models
from .runner import RunOptions, run_suite
from .suite import REPO_ROOT, Models, SuiteError, load_suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
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
                  + f"\nTo check the plumbing without weights: python -m evaluation {a.suite} --tiny "
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
