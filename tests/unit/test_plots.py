"""The charts (cvx_core/plots.py): the drawn pixels match the numbers; host-free."""

from __future__ import annotations

import numpy as np
import pytest
from customvideox.cvx_core.plots import bar_chart_image, loss_curve_png
from PIL import Image

BAR = (0x46, 0x78, 0xBE)


def test_bar_heights_are_proportional_and_missing_values_are_not_bars() -> None:
    img = bar_chart_image("t", ["a", "b", "c", "d"], [20.0, 40.0, None, 80.0], "cosine similarity × 100")
    assert img.dtype == np.uint8 and img.shape == (360, 640, 3)
    bar = (img == np.array(BAR, dtype=np.uint8)).all(axis=-1)
    cols = np.nonzero(bar.any(axis=0))[0]
    runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)  # one run of columns per drawn bar
    assert len(runs) == 3, "the None value must not be drawn as a bar"
    heights = [int(bar[:, r[len(r) // 2]].sum()) for r in runs]
    bottoms = [int(np.nonzero(bar[:, r[len(r) // 2]])[0].max()) for r in runs]
    assert len(set(bottoms)) == 1  # one baseline
    assert heights[1] / heights[0] == pytest.approx(2.0, rel=0.03)
    assert heights[2] / heights[0] == pytest.approx(4.0, rel=0.03)


def test_loss_curve_png(tmp_path) -> None:
    path = loss_curve_png([1.0 / (1 + i) for i in range(50)], tmp_path / "sub" / "loss.png")
    with Image.open(path) as im:
        assert im.size == (900, 480)
        rgb = np.asarray(im.convert("RGB"))
    avg = (rgb == np.array((0x1E, 0x5A, 0xC8), dtype=np.uint8)).all(axis=-1)  # the moving average's colour
    cols = np.nonzero(avg.any(axis=0))[0]
    first, last = np.nonzero(avg[:, cols[2]])[0].mean(), np.nonzero(avg[:, cols[-3]])[0].mean()
    assert first < last  # a falling loss: the curve starts high (small row) and ends low
