"""TAB: time-aware reference attention bias (design.md §1, part 2).

A bias ``b`` is added to the attention logits from video queries to reference keys, which multiplies
the reference's softmax weight by ``e^b``. The bias follows a curve over the sampling progress
``τ ∈ [0, 1]``, and ``τ`` comes from the sampler's sigmas (never from a call counter), so it is the
same for every model call at one noise level, substeps of Heun-type samplers included.

Host-free: plain Python and torch; PIL/numpy only inside :func:`plot_schedule_image`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

CURVES = ("parabolic", "fixed", "linear_up", "linear_down", "keyframes")
OUTSIDE_MODES = ("base", "off")
_KEYFRAME_EXAMPLE = '"0:0, 0.5:1, 1:0"'
_OFF_WORDS = ("-inf", "off")


def strength_to_bias(strength: float) -> float:
    """Bias for a reference strength: ``log(strength)``; 0 gives -inf (reference off).

    [reconstructed] b = log(strength), so strength multiplies the reference's softmax weight
    (design.md §1, TAB).
    """
    strength = float(strength)
    if math.isnan(strength) or strength < 0:
        raise ValueError(
            f"reference strength {strength} is invalid: expected a number >= 0 "
            "(0 = reference off, 1 = unchanged, 2 = twice the attention weight)"
        )
    if strength == 0:
        return -math.inf
    return math.log(strength)


def progress_from_sigmas(sigma: float | torch.Tensor, sample_sigmas: Sequence[float] | torch.Tensor) -> float:
    """Sampling progress ``τ ∈ [0, 1]`` of ``sigma`` within the sampler's schedule.

    ``sample_sigmas`` is the full descending schedule (``steps + 1`` values, usually ending in 0,
    as in the host's ``transformer_options["sample_sigmas"]``). With ``sigma`` between
    ``sample_sigmas[i]`` and ``sample_sigmas[i+1]``, ``τ = (i + frac) / steps`` where ``frac`` is
    interpolated in log-sigma (linearly when the lower end is 0), so ``τ`` is exactly ``i / steps``
    at ``sample_sigmas[i]`` and in-between values for substeps (e.g. dpm_2's geometric midpoint gives
    ``i + 0.5``). Above the first sigma → 0; at or below the last → 1. A tensor ``sigma`` (one per
    batch element; cond and uncond share it) is reduced with ``max``.
    """
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().float().max().item()
    sigma = float(sigma)
    if isinstance(sample_sigmas, torch.Tensor):
        sigmas = [float(s) for s in sample_sigmas.detach().flatten().tolist()]
    else:
        sigmas = [float(s) for s in sample_sigmas]
    if len(sigmas) < 2:
        raise ValueError(
            f"sample_sigmas has {len(sigmas)} value(s): expected the sampler's schedule of steps + 1 sigmas"
        )
    if any(math.isnan(s) for s in sigmas) or math.isnan(sigma):
        raise ValueError(f"sigma {sigma:g} / sample_sigmas {sigmas} contain NaN: expected real noise levels")
    if sigmas[0] < sigmas[-1]:
        raise ValueError(
            f"sample_sigmas goes up ({sigmas[0]:g} → {sigmas[-1]:g}): expected a descending schedule"
        )
    steps = len(sigmas) - 1
    if sigma >= sigmas[0]:
        return 0.0
    if sigma <= sigmas[-1]:
        return 1.0
    for i in range(steps):
        hi, lo = sigmas[i], sigmas[i + 1]
        if sigma > lo:  # first interval with hi >= sigma > lo
            if lo > 0:
                frac = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
            else:
                frac = (hi - sigma) / (hi - lo)
            return min(1.0, (i + frac) / steps)
    return 1.0


def _parse_bias(text: str) -> float:
    if text.lower() in _OFF_WORDS:
        return -math.inf
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def parse_keyframes(text: str) -> tuple[tuple[float, float], ...]:
    """Parse a user curve ``"progress:bias, ..."`` (commas, semicolons or newlines separate items).

    Progress values lie in [0, 1]; items may come in any order and are sorted, but two items at the
    same progress are an error. A bias is a finite number, or ``-inf``/``off`` (reference off).
    """
    items = [item.strip() for item in text.replace(";", ",").replace("\n", ",").split(",")]
    points: list[tuple[float, float]] = []
    position = 0
    for item in items:
        if not item:
            continue
        position += 1
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(
                f'keyframe {position} "{item}" is not "progress:bias" (expected e.g. {_KEYFRAME_EXAMPLE})'
            )
        tau_text, bias_text = parts[0].strip(), parts[1].strip()
        try:
            tau = float(tau_text)
        except ValueError:
            raise ValueError(
                f'keyframe {position} "{item}": progress "{tau_text}" is not a number '
                f"(expected a value from 0 to 1, e.g. {_KEYFRAME_EXAMPLE})"
            ) from None
        if not 0.0 <= tau <= 1.0:
            raise ValueError(
                f'keyframe {position} "{item}": progress {tau_text} is outside 0..1 '
                "(expected sampling progress from 0 = first step to 1 = last step)"
            )
        try:
            bias = _parse_bias(bias_text)
        except ValueError:
            raise ValueError(
                f'keyframe {position} "{item}": bias "{bias_text}" is not a finite number '
                '(expected e.g. 0.5, -1, or "off" / "-inf" for reference off)'
            ) from None
        points.append((tau, bias))
    if not points:
        raise ValueError(f'keyframes "{text}" contain no point (expected e.g. {_KEYFRAME_EXAMPLE})')
    points.sort(key=lambda p: p[0])
    for (t0, _), (t1, _) in zip(points, points[1:]):
        if t0 == t1:
            raise ValueError(
                f'keyframes "{text}" give progress {t0:g} twice (expected each progress value once)'
            )
    return tuple(points)


def _lerp(b0: float, b1: float, w: float) -> float:
    # An "off" end keeps the whole segment off; it never turns into NaN (-inf * 0).
    if w <= 0.0:
        return b0
    if w >= 1.0:
        return b1
    if math.isinf(b0) or math.isinf(b1):
        return -math.inf
    return b0 + (b1 - b0) * w


def _interpolate_keyframes(points: Sequence[tuple[float, float]], tau: float) -> float:
    if tau <= points[0][0]:
        return points[0][1]
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if tau <= t1:
            return _lerp(b0, b1, (tau - t0) / (t1 - t0))
    return points[-1][1]


def _normalise_keyframes(keyframes: Any) -> tuple[tuple[float, float], ...]:
    """Accept keyframe text or (progress, bias) pairs; validate both through :func:`parse_keyframes`."""
    if isinstance(keyframes, str):
        return parse_keyframes(keyframes)
    items = []
    for k, point in enumerate(keyframes, start=1):
        if isinstance(point, str) or not isinstance(point, Sequence) or len(point) != 2:
            raise ValueError(
                f"keyframe {k} {point!r} is not a (progress, bias) pair (expected e.g. (0.5, 1.0))"
            )
        t, b = point
        items.append(f"{t}:{'off' if isinstance(b, float) and math.isinf(b) else b}")
    return parse_keyframes(", ".join(items)) if items else ()


@dataclass(frozen=True)
class TABSchedule:
    """A bias curve over sampling progress, optionally limited to a window.

    The curve is defined over the window ``[start_percent, end_percent]`` re-normalised to a local
    ``τ ∈ [0, 1]``, so a window still rises and falls inside itself (keyframe positions are window-
    local too). Outside the window the bias is 0 (``outside="base"``: plain strength) or -inf
    (``outside="off"``: reference off).

    - parabolic: ``b_min + (b_max - b_min) · 4τ(1 - τ)`` — [reconstructed] paper says "parabola,
      low at both ends, peak in the middle" (design.md §1, TAB).
    - fixed: ``b_max``; linear_up: ``b_min → b_max``; linear_down: ``b_max → b_min``.
    - keyframes: piecewise-linear through ``keyframes`` ((progress, bias) pairs, or text for
      :func:`parse_keyframes`), constant beyond the first/last point; -inf ("off") allowed.
    - [reconstructed] window re-normalisation and the "base"/"off" outside modes (design.md §1, TAB).

    The total logit bias is ``strength_to_bias(strength) + bias_at(τ)`` (see :func:`reference_bias`).
    """

    curve: str = "parabolic"
    b_min: float = 0.0
    b_max: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    outside: str = "base"
    keyframes: tuple[tuple[float, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f'TAB curve "{self.curve}" is unknown (expected one of {", ".join(CURVES)})')
        if self.outside not in OUTSIDE_MODES:
            raise ValueError(
                f'TAB outside mode "{self.outside}" is unknown (expected "base" = plain strength '
                'outside the window, or "off" = reference off outside the window)'
            )
        for name in ("b_min", "b_max", "start_percent", "end_percent"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"TAB {name} is {value}: expected a finite number")
            object.__setattr__(self, name, value)
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(
                f"TAB window start_percent={self.start_percent:g}, end_percent={self.end_percent:g} "
                "is invalid: expected 0 <= start_percent < end_percent <= 1"
            )
        object.__setattr__(self, "keyframes", _normalise_keyframes(self.keyframes))
        if self.curve == "keyframes" and not self.keyframes:
            raise ValueError(f'TAB curve "keyframes" needs keyframes (expected e.g. {_KEYFRAME_EXAMPLE})')

    def bias_at(self, progress: float) -> float:
        """Schedule bias (added to ``log(strength)``) at global sampling progress ``progress``."""
        p = min(1.0, max(0.0, float(progress)))
        if not self.start_percent <= p <= self.end_percent:
            return 0.0 if self.outside == "base" else -math.inf
        tau = (p - self.start_percent) / (self.end_percent - self.start_percent)
        if self.curve == "parabolic":
            return self.b_min + (self.b_max - self.b_min) * 4.0 * tau * (1.0 - tau)
        if self.curve == "fixed":
            return self.b_max
        if self.curve == "linear_up":
            return self.b_min + (self.b_max - self.b_min) * tau
        if self.curve == "linear_down":
            return self.b_max + (self.b_min - self.b_max) * tau
        return _interpolate_keyframes(self.keyframes, tau)

    def curve_points(self, n: int = 101) -> tuple[list[float], list[float]]:
        """``n`` evenly spaced (progress, bias) samples over [0, 1], as data for a plot."""
        if n < 2:
            raise ValueError(f"curve_points needs n >= 2 samples, got {n}")
        xs = [i / (n - 1) for i in range(n)]
        return xs, [self.bias_at(x) for x in xs]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (an "off" keyframe bias is stored as the string "off", not -Infinity)."""
        return {
            "curve": self.curve,
            "b_min": self.b_min,
            "b_max": self.b_max,
            "start_percent": self.start_percent,
            "end_percent": self.end_percent,
            "outside": self.outside,
            "keyframes": [[t, "off" if math.isinf(b) else b] for t, b in self.keyframes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TABSchedule:
        known = {"curve", "b_min", "b_max", "start_percent", "end_percent", "outside", "keyframes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"TAB schedule data has unknown keys {unknown} (expected some of {sorted(known)})"
            )
        return cls(**data)


def reference_bias(schedule: TABSchedule, progress: float, strength: float = 1.0) -> float:
    """Total video→reference logit bias: ``log(strength) + schedule.bias_at(progress)``."""
    base = strength_to_bias(strength)
    if math.isinf(base):
        return base
    return base + schedule.bias_at(progress)


_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def plot_schedule_image(
    schedules: list[tuple[str, TABSchedule]],
    strength: float = 1.0,
    width: int = 512,
    height: int = 256,
) -> np.ndarray:
    """Draw the total bias ``log(strength) + b(τ)`` of each named schedule; returns uint8 ``[H, W, 3]``.

    Windows are shaded; -inf (reference off) stretches are drawn as a dotted line along the bottom.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if not schedules:
        raise ValueError("plot_schedule_image needs at least one (name, TABSchedule) pair")
    n = max(2, width // 2)
    series = []
    for name, schedule in schedules:
        xs, _ = schedule.curve_points(n)
        series.append((name, schedule, xs, [reference_bias(schedule, x, strength) for x in xs]))
    finite = [b for *_, ys in series for b in ys if math.isfinite(b)] or [0.0]
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 12, 18, height - 34

    def px(x: float) -> float:
        return left + x * (right - left)

    def py(y: float) -> float:
        return bottom - (y - lo) / (hi - lo) * (bottom - top)

    for _, schedule, _, _ in series:
        if schedule.start_percent == 0.0 and schedule.end_percent == 1.0:
            continue  # no window to show
        draw.rectangle(
            [px(schedule.start_percent), top, px(schedule.end_percent), bottom], fill=(236, 240, 248)
        )
    draw.line([(left, py(0.0)), (right, py(0.0))], fill=(200, 200, 200))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0))
    for i in range(5):
        x = px(i / 4)
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x - 8, bottom + 5), f"{i / 4:g}", fill=(0, 0, 0), font=font)
    for y in (lo + pad, 0.0, hi - pad):
        draw.line([(left - 4, py(y)), (left, py(y))], fill=(0, 0, 0))
        draw.text((4, py(y) - 6), f"{y:.2f}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 50, height - 14), "sampling progress", fill=(0, 0, 0), font=font)
    draw.text((left + 4, 3), "bias (log weight)", fill=(0, 0, 0), font=font)

    for k, (name, _, xs, ys) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        segment: list[tuple[float, float]] = []
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                segment.append((px(x), py(y)))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=colour, width=2)
            segment = []
            if round(x * (n - 1)) % 4 == 0:
                draw.point((px(x), bottom - 2 - k), fill=colour)
        if len(segment) > 1:
            draw.line(segment, fill=colour, width=2)
        draw.text((right - 110, top + 2 + 12 * k), f"- {name}", fill=colour, font=font)
    return np.asarray(img, dtype=np.uint8).copy()
