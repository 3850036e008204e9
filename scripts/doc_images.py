"""Regenerate the charts the docs show: ``.venv/bin/python scripts/doc_images.py`` (writes docs/*.png).

docs/tab_schedule.png (NODES.md): the default parabolic TAB curve beside a fixed bias of the same mean.
"""

from __future__ import annotations

from pathlib import Path

from pack_import import pack_module  # scripts/, beside this file
from PIL import Image

DOCS = Path(__file__).resolve().parent.parent / "docs"


def tab_schedule_png(path: Path = DOCS / "tab_schedule.png") -> Path:
    plots, tab = pack_module("cvx_core.plots"), pack_module("cvx_core.tab_schedule")
    schedules = [("parabolic (default)", tab.TABSchedule()),
                 ("fixed, same mean", tab.TABSchedule(curve="fixed", b_max=0.0))]
    Image.fromarray(plots.tab_curves_image(schedules, width=640, height=300)).save(path)
    return path


if __name__ == "__main__":
    print(tab_schedule_png())
