"""Every chart the pack draws (TAB curves, training loss, evaluation bars), on matplotlib's Agg backend.

Host-free and headless: figures are rendered off-screen to RGB arrays or PNG files, with axis labels
and units. matplotlib is imported when a chart is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .tab_schedule import TABSchedule

DPI = 100


def _figure(width: int, height: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    return fig, fig.add_subplot(1, 1, 1)


def _to_array(fig: Any) -> np.ndarray:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def curves_image(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    windows: Sequence[tuple[float, float]] = (),
    width: int = 640,
    height: int = 320,
) -> np.ndarray:
    """Named ``(name, xs, ys)`` lines as a uint8 ``[H, W, 3]`` image.

    ``-inf`` values (a reference switched off) are drawn as markers on the bottom edge instead of
    being dropped silently; ``windows`` are shaded x ranges.
    """
    if not series:
        raise ValueError("curves_image needs at least one (name, xs, ys) series")
    fig, ax = _figure(width, height)
    finite = [y for _, _, ys in series for y in ys if math.isfinite(y)] or [0.0]
    lo = min(finite + [0.0])
    for a, b in windows:
        ax.axvspan(a, b, color="#dde5f2", zorder=0)
    ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    for name, xs, ys in series:
        line = ax.plot(xs, [y if math.isfinite(y) else math.nan for y in ys], linewidth=2, label=name)[0]
        off = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
        if off:
            ax.plot(off, [lo] * len(off), linestyle="none", marker="|", color=line.get_color(),
                    label=f"{name}: reference off")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _to_array(fig)


def tab_curves_image(
    schedules: Sequence[tuple[str, TABSchedule]],
    strength: float = 1.0,
    points: int = 256,
    width: int = 640,
    height: int = 320,
) -> np.ndarray:
    """The total reference bias ``log(strength) + b(τ)`` of each named TAB schedule over sampling
    progress; windows other than the whole run are shaded."""
    from .tab_schedule import reference_bias

    xs = [i / (points - 1) for i in range(points)]
    series = [(name, xs, [reference_bias(s, x, strength) for x in xs]) for name, s in schedules]
    windows = [(s.start_percent, s.end_percent) for _, s in schedules
               if (s.start_percent, s.end_percent) != (0.0, 1.0)]
    return curves_image(series, xlabel="sampling progress τ (0 = first step, 1 = last step)",
                        ylabel=r"logit bias (weight × $e^{\mathrm{bias}}$)", title="TAB schedule",
                        windows=windows, width=width, height=height)


def loss_curve_png(losses: Sequence[float], path: str | Path,
                   title: str = "CustomVideoX adapter training loss") -> Path:
    """Per-step loss and its moving average, as a PNG file."""
    n = len(losses)
    k = max(1, n // 20)
    avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(n)]
    steps = list(range(1, n + 1))
    fig, ax = _figure(900, 480)
    ax.plot(steps, losses, color="#bbbbbb", linewidth=1, label="per step")
    ax.plot(steps, avg, color="#1e5ac8", linewidth=2, label=f"mean of {k} steps")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean squared error of the v-prediction)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def bar_chart_image(title: str, names: Sequence[str], values: Sequence[float | None], ylabel: str,
                    xlabel: str = "setting", width: int = 640, height: int = 360) -> np.ndarray:
    """One bar per setting; ``None`` (not computable) is labelled n/a rather than drawn as 0."""
    fig, ax = _figure(width, height)
    xs = list(range(len(names)))
    ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
           color="#4678be")
    for x, v in zip(xs, values):
        ax.annotate("n/a" if v is None else f"{v:.3g}", (x, 0 if v is None else v), ha="center",
                    va="bottom", fontsize="small", color="red" if v is None else "black")
    ax.set_xticks(xs, [str(n) for n in names], rotation=20, ha="right", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _to_array(fig)
