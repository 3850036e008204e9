"""TAB: time-aware reference attention bias (DESIGN.md §1.2).

Units: ``strength`` is a multiplier of the reference's attention weight (its bias is
``log(strength)``); TAB (and ERAE's λ) are additive logit biases on the reference columns, so a bias
``b`` multiplies the reference's softmax weight by ``e^b``. The TAB bias follows a curve over the
sampling progress ``τ ∈ [0, 1]``; ``τ`` comes from the sigma of the model call (never from a call
counter), either by step within the run (``"steps"``) or by noise level over the model's whole sigma
range (``"noise"``), so it is the same for every model call at one noise level, substeps of Heun-type
samplers included.

Host-free: plain Python and torch (the plot of a schedule is :func:`cvx_core.plots.tab_curves_image`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

CURVES = ("parabolic", "fixed", "linear_up", "linear_down", "keyframes")
OUTSIDE_MODES = ("base", "off")
PROGRESS_MODES = ("steps", "noise")
_KEYFRAME_EXAMPLE = '"0:0, 0.5:1, 1:0"'
_OFF_WORDS = ("-inf", "off")


def strength_to_bias(strength: float) -> float:
    """Bias for a reference strength: ``log(strength)``; 0 gives -inf (reference off).

    [reconstructed] b = log(strength), so strength multiplies the reference's softmax weight
    (DESIGN.md §1.2).
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


def _sigma_list(sample_sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(sample_sigmas, torch.Tensor):
        return [float(s) for s in sample_sigmas.detach().flatten().tolist()]
    return [float(s) for s in sample_sigmas]


def _sigma_value(sigma: float | torch.Tensor) -> float:
    # One value per batch row; cond and uncond share it.
    if isinstance(sigma, torch.Tensor):
        return float(sigma.detach().float().max().item())
    return float(sigma)


def progress_from_sigmas(sigma: float | torch.Tensor, sample_sigmas: Sequence[float] | torch.Tensor) -> float:
    """Progress by step: ``τ ∈ [0, 1]`` of ``sigma`` within this run's own schedule.

    ``sample_sigmas`` is the run's descending schedule (``steps + 1`` values, as in the host's
    ``transformer_options["sample_sigmas"]``). The model is called at every positive sigma of it: at
    ``sample_sigmas[:-1]`` when the schedule ends in 0 (the last step only denoises), and also at the
    last one when it does not (a run cut short, whose Heun-type corrector evaluates there). Those
    call sigmas ``c_0 > ... > c_M`` get ``τ = i / M``, so the first model call sees 0 and the last 1;
    a sigma between two of them (a DPM2 midpoint) is interpolated in log-sigma. A run with a single
    call sigma (one step ending in 0) gives 0: its only call is the first, as in "noise" progress,
    where the highest sigma is 0 too. Above ``c_0`` → 0, at or below ``c_M`` → 1.
    """
    sigma = _sigma_value(sigma)
    sigmas = _sigma_list(sample_sigmas)
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
    calls = [s for s in sigmas if s > 0]
    if len(calls) < 2 or sigma >= calls[0]:
        return 0.0
    last = len(calls) - 1
    if sigma <= calls[-1]:
        return 1.0
    for i in range(last):
        hi, lo = calls[i], calls[i + 1]
        if sigma > lo:  # first interval with hi >= sigma > lo (lo > 0)
            frac = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
            return min(1.0, (i + frac) / last)
    return 1.0


def progress_from_noise(sigma: float | torch.Tensor, percent_to_sigma: Callable[[float], Any],
                        iterations: int = 60) -> float:
    """Progress by noise level: the percent ``p ∈ [0, 1]`` with ``percent_to_sigma(p) == sigma``.

    ``percent_to_sigma`` is the model's ``model_sampling.percent_to_sigma`` (decreasing: 0 = the
    model's highest noise, 1 = clean), the convention the host's own start/end percent settings use.
    So ``τ`` depends on the noise level only, not on the run: two samplers that split one schedule
    (start/end steps, high- and low-noise experts) continue one curve. Found by bisection (the host
    offers no inverse); a sigma at or above ``percent_to_sigma(0)`` gives 0.
    """
    sigma = _sigma_value(sigma)
    if math.isnan(sigma):
        raise ValueError("sigma is NaN: expected a real noise level")
    if sigma >= float(percent_to_sigma(0.0)):
        return 0.0
    lo, hi = 0.0, 1.0  # percent_to_sigma(lo) > sigma >= percent_to_sigma(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return hi


def run_progress(mode: str, sigma: float | torch.Tensor, sample_sigmas: Sequence[float] | torch.Tensor | None,
                 percent_to_sigma: Callable[[float], Any] | None) -> float:
    """``τ`` of one model call in progress mode ``mode`` ("steps" or "noise"); 0 without the inputs the
    mode needs (a model call outside a sampler)."""
    if mode == "steps":
        return 0.0 if sample_sigmas is None else progress_from_sigmas(sigma, sample_sigmas)
    if mode == "noise":
        return 0.0 if percent_to_sigma is None else progress_from_noise(sigma, percent_to_sigma)
    raise ValueError(f'TAB progress mode "{mode}" is unknown (expected one of {", ".join(PROGRESS_MODES)})')


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
      low at both ends, peak in the middle" (DESIGN.md §1.2).
    - fixed: ``b_max``; linear_up: ``b_min → b_max``; linear_down: ``b_max → b_min``.
    - keyframes: piecewise-linear through ``keyframes`` ((progress, bias) pairs, or text for
      :func:`parse_keyframes`), constant beyond the first/last point; -inf ("off") allowed.
    - [reconstructed] window re-normalisation and the "base"/"off" outside modes (DESIGN.md §1.2).

    - [reconstructed] defaults b_min -1, b_max 0.5: the parabola's mean over τ is
      ``b_min + (b_max - b_min) · 2/3 = 0``, the mean of "no schedule", so TAB tempers the reference at
      the ends and raises it in the middle at the same average weight (the paper's comparison with a
      fixed bias); with b_min 0 a curve could only raise the reference.
    - ``progress``: how ``τ`` is measured (:func:`run_progress`): "steps" (default) spans each run from
      its first model call (0) to its last (1); "noise" follows the noise level over the model's whole
      sigma range, so a run split over two samplers continues one curve.

    The total logit bias is ``strength_to_bias(strength) + bias_at(τ)`` (see :func:`reference_bias`).
    """

    curve: str = "parabolic"
    b_min: float = -1.0
    b_max: float = 0.5
    start_percent: float = 0.0
    end_percent: float = 1.0
    outside: str = "base"
    keyframes: tuple[tuple[float, float], ...] = field(default=())
    progress: str = "steps"

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f'TAB curve "{self.curve}" is unknown (expected one of {", ".join(CURVES)})')
        if self.outside not in OUTSIDE_MODES:
            raise ValueError(
                f'TAB outside mode "{self.outside}" is unknown (expected "base" = plain strength '
                'outside the window, or "off" = reference off outside the window)'
            )
        if self.progress not in PROGRESS_MODES:
            raise ValueError(
                f'TAB progress "{self.progress}" is unknown (expected "steps" = first to last model call of '
                'each run, or "noise" = noise level over the model\'s sigma range)'
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


def reference_bias(schedule: TABSchedule, progress: float, strength: float = 1.0) -> float:
    """Total video→reference logit bias: ``log(strength) + schedule.bias_at(progress)``."""
    base = strength_to_bias(strength)
    if math.isinf(base):
        return base
    return base + schedule.bias_at(progress)
