"""3D rotary position tables for CogVideoX video and reference tokens.

The table layout matches both the host's and diffusers' CogVideoX: per token, the head
dimension is split into temporal (d/4), height (3d/8) and width (3d/8) parts, each with
interleaved (cos, sin) pairs. What differs between implementations is the *positions*:

* ``spatial="exact"`` reproduces diffusers' pipeline (the reference implementation):
  CogVideoX 1.0 places the token grid inside the training grid's crop region with a
  ``linspace`` (integer positions at the native 480x720 grid, stretched otherwise);
  CogVideoX 1.5 uses integer positions.
* ``spatial="host"`` reproduces the host's port, which multiplies CogVideoX 1.0 spatial
  positions by ``spatial_interpolation_scale`` (1.875 by default; DESIGN.md §2).

Reference token frames get one shared temporal position by ``ref_rope`` (DESIGN.md §1.1,
[reconstructed]): ``"negative"`` (default: -1, the video keeps 0..T-1, so the video's own
attention is unchanged), ``"shift"`` (0, the video shifted to 1..T), or ``"none"``
(reference tokens are not rotated at all). ``"after"`` (the slot after the video's last frame,
Phantom's layout) is Wan's only (:func:`wan_reference_slot`); CogVideoX refuses it.
"""

from __future__ import annotations

import torch

SPATIAL_MODES = ("exact", "host")
REF_ROPE_MODES = ("negative", "shift", "none", "after")
COGVIDEOX_REF_ROPE_MODES = ("negative", "shift", "none")


def _axis_table(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    angles = torch.outer(pos.float(), freqs)
    return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


def crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The region of the base (training) grid that a ``grid_h x grid_w`` grid is resized into.

    Same rule as diffusers' CogVideoX pipeline: fit the aspect ratio inside the base grid,
    centred; returns ``((top, left), (bottom, right))``.
    """
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def spatial_positions(
    h: int,
    w: int,
    *,
    temporal_patch: bool,
    spatial: str = "exact",
    base_hw: tuple[int, int] = (30, 45),
    interpolation_scale: float = 1.875,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Height and width positions of a ``h x w`` token grid.

    ``temporal_patch`` is True for CogVideoX 1.5 (integer positions in every mode);
    ``base_hw`` is the training grid in tokens (sample size // patch size).
    """
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"spatial RoPE mode {spatial!r} is not one of {SPATIAL_MODES}")
    f32 = dict(dtype=torch.float32, device=device)
    if temporal_patch:
        return torch.arange(h, **f32), torch.arange(w, **f32)
    if spatial == "host":
        return (torch.linspace(0, h - 1, h, **f32) * interpolation_scale,
                torch.linspace(0, w - 1, w, **f32) * interpolation_scale)
    (top, left), (bottom, right) = crop_region(h, w, *base_hw)
    return (torch.linspace(top, bottom * (h - 1) / h, h, **f32),
            torch.linspace(left, right * (w - 1) / w, w, **f32))


def temporal_positions(refs: int, video_frames: int, ref_rope: str = "negative",
                       device: torch.device | None = None) -> torch.Tensor:
    """Temporal positions of ``refs`` reference token frames followed by the video's frames.

    Every reference shares one temporal slot ([reconstructed]): adding, removing or reordering
    references never moves another reference or the video, so stacked references are
    independent. With ``"none"`` the references get position 0 here; :func:`rotary_table`
    then leaves them unrotated.
    """
    if ref_rope not in COGVIDEOX_REF_ROPE_MODES:
        raise ValueError(f"reference RoPE mode {ref_rope!r} is not one of {COGVIDEOX_REF_ROPE_MODES}")
    video = torch.arange(video_frames, dtype=torch.float32, device=device)
    slot = {"negative": -1.0, "shift": 0.0, "none": 0.0}[ref_rope]
    refs_t = torch.full((refs,), slot, dtype=torch.float32, device=device)
    return torch.cat([refs_t, video + (1.0 if ref_rope == "shift" else 0.0)])


def rotary_table(
    head_dim: int,
    t_pos: torch.Tensor,
    h_pos: torch.Tensor,
    w_pos: torch.Tensor,
    *,
    unrotated_frames: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[T*h*w, head_dim]`` in frame-major token order.

    The first ``unrotated_frames`` frames get cos=1, sin=0 (the identity rotation).
    """
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    T, h, w = t_pos.numel(), h_pos.numel(), w_pos.numel()
    parts = [_axis_table(dim_t, t_pos), _axis_table(dim_hw, h_pos), _axis_table(dim_hw, w_pos)]
    (tc, ts), (hc, hs), (wc, ws) = parts

    def grid(t_, h_, w_):
        return torch.cat([t_[:, None, None].expand(-1, h, w, -1), h_[None, :, None].expand(T, -1, w, -1),
                          w_[None, None].expand(T, h, -1, -1)], dim=-1).reshape(T * h * w, -1)

    cos, sin = grid(tc, hc, wc), grid(ts, hs, ws)
    if unrotated_frames:
        n = unrotated_frames * h * w
        cos[:n] = 1.0
        sin[:n] = 0.0
    return cos, sin


def wan_reference_slot(ref_rope: str, video_frames: int) -> float:
    """The temporal RoPE index every inserted reference shares on Wan, the video keeping 0..T-1.

    Wan's self-attention holds no text and rotates every token, so only the reference's offset to the
    video matters ([reconstructed]): ``negative`` is one frame before frame 0 (``shift``, the video moved
    one frame on, is the same offset), ``none`` is frame 0's own index (no temporal offset; the spatial
    positions are kept, unlike CogVideoX's unrotated reference), ``after`` is the frame after the last one
    (where Phantom appends its reference frames). A shared slot keeps stacked references independent.
    """
    slots = {"negative": -1.0, "shift": -1.0, "none": 0.0, "after": float(video_frames)}
    if ref_rope not in slots:
        raise ValueError(f"reference RoPE mode {ref_rope!r} is not one of {REF_ROPE_MODES}")
    return slots[ref_rope]
