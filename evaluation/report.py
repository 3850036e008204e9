"""The evaluation reports: tables per setting and per motion type (report.md, report.json), a bar chart per
metric and contact sheets of the cases' frame strips. Host-free: reads the case records the runner wrote."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from customvideox.cvx_core import metrics as M
from customvideox.cvx_core.image_ops import contact_sheet
from customvideox.cvx_core.plots import bar_chart_image
from PIL import Image

from .suite import Suite

TABLE_METRICS = ("clip_t", "clip_i", "dino_i", "subject_similarity", "temporal_consistency", "dynamic_degree",
                 "warp_error")
# The y axis of each metric's chart: the numbers as the tables print them.
_COSINE = "cosine similarity × 100 (higher is better)"
UNITS = {"clip_t": _COSINE, "clip_i": _COSINE, "dino_i": _COSINE, "subject_similarity": _COSINE,
         "temporal_consistency": _COSINE, "dynamic_degree": "dynamic videos (% of cases)",
         "warp_error": "mean abs. RGB error, 0..1 (lower is better)"}


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_records(out_dir: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    recs = []
    for cid in ids:
        p = out_dir / "cases" / f"{cid}.json"
        if p.is_file():
            recs.append(json.loads(p.read_text(encoding="utf-8")))
    return recs


def aggregate(records: list[dict[str, Any]], group_by: str) -> dict[str, dict[str, Any]]:
    """{group: {metric: {value, label, n, reason}}} over done cases (dynamic degree = share dynamic)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "done":
            groups.setdefault(str(r[group_by]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for g, recs in groups.items():
        row: dict[str, Any] = {"n": len(recs)}
        for key in TABLE_METRICS:
            ms = [rec["metrics"].get(key) for rec in recs if rec["metrics"].get(key)]
            vals = [m["value"] for m in ms if m["value"] is not None]
            labels = sorted({m["label"] for m in ms if m["value"] is not None})
            reasons = sorted({m["reason"] for m in ms if m["value"] is None and m.get("reason")})
            row[key] = {"value": M.mean_or_none(vals), "n": len(vals),
                        "label": "; ".join(labels) or (ms[0]["label"] if ms else key),
                        "reason": "; ".join(reasons) or None}
        out[g] = row
    return out


def _fmt(m: dict[str, Any], key: str) -> str:
    if m["value"] is None:
        return "n/a"
    return f"{m['value']:.4f}" if key == "warp_error" else f"{100 * m['value']:.2f}"


def _table(title: str, agg: dict[str, dict[str, Any]], order: Sequence[str], first_col: str) -> list[str]:
    keys = [k for k in TABLE_METRICS if any(agg[g][k]["value"] is not None for g in agg)]
    missing = [k for k in TABLE_METRICS if k not in keys]
    head = [first_col, "n"] + [column_header(k, _labels(agg, k)) for k in keys]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in [o for o in order if o in agg]:
        lines.append("| " + " | ".join([g, str(agg[g]["n"])] + [_fmt(agg[g][k], k) for k in keys]) + " |")
    lines.append("")
    if missing:
        lines.append("Not available: " + "; ".join(
            f"{_short(k)} ({next((agg[g][k]['reason'] for g in agg if agg[g][k]['reason']), 'no data')})"
            for k in missing) + ".")
        lines.append("")
    return lines


def _labels(agg: dict[str, dict[str, Any]], key: str) -> list[str]:
    return sorted({agg[g][key]["label"] for g in agg if agg[g][key]["value"] is not None})


def column_header(key: str, labels: Sequence[str]) -> str:
    """A table column / plot title: the short name plus what computed it (e.g. "EfficientNet-Lite0 proxy",
    "Farneback"), so a proxy score never passes for the paper's metric."""
    inner = sorted({m.group(1) for lab in labels if (m := re.search(r"\(([^()]*)\)\s*$", lab))})
    return _short(key) + (f" ({'; '.join(inner)})" if inner else "")


def _short(key: str) -> str:
    return {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "subject_similarity": "Subject sim.",
            "temporal_consistency": "Temporal cons.", "dynamic_degree": "Dynamic deg.",
            "warp_error": "Warp err. ↓"}[key]


def write_reports(suite: Suite, out_dir: Path, ids: Sequence[str], stats: dict[str, int]) -> dict[str, Any]:
    records = _load_records(out_dir, ids)
    done = [r for r in records if r.get("status") == "done"]
    settings = list(dict.fromkeys(r["setting"] for r in sorted(done, key=lambda r: (
        [x.name for x in suite.rows].index(r["row"]) if r["row"] in [x.name for x in suite.rows] else 99,
        r["strength"]))))
    by_setting = aggregate(records, "setting")
    by_motion = aggregate(records, "motion")
    overall = aggregate([{**r, "all": "all"} for r in records], "all")
    labels = {}
    for r in done:
        for k, m in r["metrics"].items():
            if m["value"] is not None:
                labels.setdefault(k, set()).add(m["label"])
    tiny = any(r.get("tiny") for r in done)
    report = {"suite": suite.name, "cases": len(ids), "done": len(done),
              "failed": [{"id": r["id"], "error": r.get("error")} for r in records if r.get("status") == "error"],
              "this_run": stats, "tiny": tiny, "by_setting": by_setting, "by_motion": by_motion,
              "overall": overall.get("all", {}), "labels": {k: sorted(v) for k, v in labels.items()},
              "cases_done": [r["id"] for r in done]}
    atomic_write(out_dir / "report.json", json.dumps(report, indent=1).encode())

    md = [f"# Evaluation: {suite.name}", ""]
    if tiny:
        md += ["**Tiny random test model: these numbers are meaningless; only the plumbing is real.**", ""]
    md += [f"{len(done)} of {len(ids)} cases done" + (f", {len(report['failed'])} failed" if report["failed"] else "")
           + ". Cosine metrics and dynamic degree ×100 as in the paper's tables; warp error in RGB 0..1 "
           "(lower is better).", ""]
    if by_setting:
        md += _table("By setting (cf. the paper's Table 2)", by_setting, settings, "setting")
        md += _table("By motion type", by_motion, sorted(by_motion), "motion")
    md += ["### Metric labels", ""] + [f"- {_short(k)}: {', '.join(sorted(v))}" for k, v in
                                        sorted(labels.items(), key=lambda kv: TABLE_METRICS.index(kv[0])
                                               if kv[0] in TABLE_METRICS else 99)]
    md += ["", "Dynamic degree follows VBench's rule on OpenCV optical flow (not RAFT); \"proxy\" scores come "
           "from an ImageNet classifier's features, not CLIP or DINO, and are not comparable with the paper.", ""]
    md += ["### Cases", ""] + [
        f"- {r['id']}: " + ", ".join([f"[video]({r['video']})"] * bool(r.get("video"))
                                     + [f"[frames](cases/{r['id']}_frames.png)"]) for r in done] + [""]
    if report["failed"]:
        md += ["### Failed cases", ""] + [f"- {f['id']}: {f['error']}" for f in report["failed"]] + [""]
    atomic_write(out_dir / "report.md", "\n".join(md).encode())

    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for key in TABLE_METRICS:
        vals = [by_setting[s][key]["value"] for s in settings]
        if any(v is not None for v in vals):
            scale = 1.0 if key == "warp_error" else 100.0
            img = bar_chart_image(f"{column_header(key, _labels(by_setting, key))} vs setting", settings,
                                  [None if v is None else scale * v for v in vals], UNITS[key])
            Image.fromarray(img).save(plots / f"{key}.png")
    for old in plots.glob("contact_sheet_*.png"):
        old.unlink()
    strips = [out_dir / "cases" / f"{r['id']}_frames.png" for r in done]
    strips = [p for p in strips if p.is_file()]
    for page, start in enumerate(range(0, len(strips), 20)):
        contact_sheet(strips[start:start + 20]).save(plots / f"contact_sheet_{page + 1:03d}.png")
    return report
