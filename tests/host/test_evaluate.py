"""The evaluation runner (evaluation/), the starter suite and the CustomVideoXEvaluate node.

The end-to-end test runs two cases of the shipped example workflow through the real in-process host on
the tiny random model (numbers meaningless, plumbing real), then resumes and checks nothing reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from evaluation import host_backend as HB  # noqa: E402
from evaluation import runner as R  # noqa: E402
from evaluation import suite as S  # noqa: E402

STARTER = ROOT / "eval" / "starter_suite.json"
WORKFLOW = json.loads((ROOT / S.DEFAULT_WORKFLOW).read_text(encoding="utf-8"))


def test_starter_suite_shape() -> None:
    suite = S.load_suite(STARTER)
    assert len(suite.prompts) >= 25
    assert {p.motion for p in suite.prompts} == {"camera", "subject", "background", "style"}
    assert {s.image for s in suite.subjects} == set(S.WHEEL_IMAGES)
    for s in suite.subjects:
        img = S.load_subject_image(s.image)
        assert img.dtype.name == "uint8" and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
        assert any(not p.subjects or s.id in p.subjects for p in suite.prompts), s.id
    # The paper's Table 2 rows: base (3D reference attention only), +TAB, +ERAE, +TAB+ERAE.
    rows = {r.name: (r.tab, r.erae) for r in suite.rows}
    assert rows == {"base": ("off", "off"), "+TAB": ("parabolic", "off"), "+ERAE": ("off", "auto"),
                    "+TAB+ERAE": ("parabolic", "auto")}
    cases = suite.cases()
    assert len({c.id for c in cases}) == len(cases) and all("{subject}" not in c.text for c in cases)


def test_bad_suite_is_rejected(tmp_path: Path) -> None:
    bad = json.loads(STARTER.read_text())
    bad["prompts"][0]["text"] = "no placeholder"
    (tmp_path / "s.json").write_text(json.dumps(bad))
    with pytest.raises(S.SuiteError, match="placeholder"):
        S.load_suite(tmp_path / "s.json")


def _case(row: str) -> S.Case:
    suite = S.load_suite(STARTER)
    return next(c for c in suite.cases(subjects=["cat"]) if c.row.name == row)


def test_patch_rows() -> None:
    video = S.load_suite(STARTER).video
    base, _ = S.patch_workflow(WORKFLOW, _case("base"), video, "ref.png", S.Models())
    apply = next(n for n in base.values() if n["class_type"] == "CustomVideoXApply")["inputs"]
    assert "schedule" not in apply and "region" not in apply
    assert not any(n["class_type"] == "CustomVideoXTABSchedule" for n in base.values())
    full, decode = S.patch_workflow(WORKFLOW, _case("+TAB+ERAE"), video, "ref.png", S.Models(unet="m.sft"))
    apply = next(n for n in full.values() if n["class_type"] == "CustomVideoXApply")["inputs"]
    assert full[apply["schedule"][0]]["inputs"]["curve"] == "parabolic"
    region = full[apply["region"][0]]["inputs"]
    assert region["mode"] == "auto" and region["subject_words"] == "cat" and "tabby cat" in region["prompt"]
    assert full[region["clip"][0]]["class_type"] == "CLIPLoader"
    assert full[decode]["class_type"] == "VAEDecode"
    assert full["1"]["inputs"]["model_name"] == "m.sft" and full["6"]["inputs"]["image"] == "ref.png"
    tiny, _ = S.patch_workflow(WORKFLOW, _case("+TAB+ERAE"), video, "ref.png", S.Models(), tiny=True)
    assert tiny["cvx_eval_region"]["inputs"]["mode"] == "mask"  # no T5 in the tiny variant
    assert not any(n["class_type"] in ("CLIPLoader", "CLIPTextEncode") for n in tiny.values())


def test_cli_lists_cases() -> None:
    out = subprocess.run([sys.executable, "-m", "evaluation", str(STARTER), "--out", "unused", "--list",
                          "--subjects", "rocket", "--rows", "base"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and all(line.startswith("rocket__") and "__base__" in line for line in lines)


class _Counting:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0
        self.input_dir = inner.input_dir

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor:
        self.calls += 1
        return self.inner.run(prompt, capture)


class _Fake:
    def __init__(self, input_dir: Path) -> None:
        self.input_dir, self.calls = input_dir, 0

    def run(self, prompt: dict[str, Any], capture: str) -> torch.Tensor:
        self.calls += 1
        return torch.rand(5, 48, 64, 3, generator=torch.Generator().manual_seed(self.calls))


@pytest.mark.host
@pytest.mark.slow
def test_end_to_end_tiny_and_resume(host, tiny_models, tmp_path: Path) -> None:
    suite_d = json.loads(STARTER.read_text())
    suite_d["name"] = "e2e"
    suite_d["metrics"] = {"flow": "farneback", "mask_source": "auto", "max_frames": 2}
    suite_d["grid"]["rows"] = [r for r in suite_d["grid"]["rows"] if r["name"] in ("base", "+TAB+ERAE")]
    suite_path = tmp_path / "suite.json"
    suite_path.write_text(json.dumps(suite_d))
    suite = S.load_suite(suite_path)
    cases = suite.cases(subjects=["cup"], prompts=["cam_pan_left"])
    assert len(cases) == 2
    backend = _Counting(HB.HostBackend(tiny=True).start())  # reuses the host this test session booted
    opts = R.RunOptions(models=S.Models(unet=tiny_models.unet, vae=tiny_models.vae), tiny=True, progress=False,
                        video={"width": 64, "height": 48, "length": 5})
    out = tmp_path / "run"
    report = R.run_suite(suite, out, backend, opts, cases)
    assert backend.calls == 2 and report["done"] == 2 and report["failed"] == [], report["failed"]
    rec = json.loads((out / "cases" / f"{cases[0].id}.json").read_text())
    assert rec["status"] == "done" and rec["frames"][1:] == [48, 64, 3] and rec["frames"][0] >= 5
    m = rec["metrics"]
    assert m["clip_t"]["value"] is None and m["dino_i"]["value"] is None
    assert m["dynamic_degree"]["label"] == "dynamic degree (Farneback)" and m["dynamic_degree"]["value"] in (0, 1)
    md = (out / "report.md").read_text()
    assert "Tiny random test model" in md and "| base s=1 | 1 |" in md and "| +TAB+ERAE s=1 | 1 |" in md
    assert "EfficientNet-Lite0 proxy" in md and "CLIP-T (needs a full CLIP" in md
    for name in ("subject_similarity", "temporal_consistency", "dynamic_degree", "warp_error", "contact_sheet_001"):
        assert (out / "plots" / f"{name}.png").is_file(), name
    # Resume: nothing reruns; a removed case result reruns alone.
    again = _Counting(backend.inner)
    report = R.run_suite(suite, out, again, opts, cases)
    assert again.calls == 0 and report["this_run"] == {"ran": 0, "skipped": 2, "failed": 0}
    (out / "cases" / f"{cases[1].id}.json").unlink()
    fake = _Fake(backend.input_dir)  # which cases rerun does not depend on the host
    report = R.run_suite(suite, out, fake, opts, cases)
    assert fake.calls == 1 and report["done"] == 2 and report["this_run"]["skipped"] == 1


@pytest.mark.host
def test_evaluate_node_in_host_graph(host) -> None:
    registered = "CustomVideoXEvaluate" in host.node_classes
    assert registered, "CustomVideoXEvaluate is not registered: add it to NODES in nodes/__init__.py"
    prompt = {
        "v": {"class_type": "CVXTestImage", "inputs": {"seed": 3, "width": 64, "height": 48, "batch_size": 4}},
        "r": {"class_type": "CVXTestImage", "inputs": {"seed": 4, "width": 64, "height": 48, "batch_size": 1}},
        "e": {"class_type": "CustomVideoXEvaluate",
              "inputs": {"frames": ["v", 0], "reference": ["r", 0], "fps": 8.0, "flow": "dis",
                         "mask_source": "none", "max_frames": 2}},
    }
    res = host.run(prompt, capture=["e"])
    text, sheet = res.output("e", 0), res.output("e", 1)
    assert "CLIP-T ↑: not available" in text and "dynamic degree (DIS)" in text and "proxy" in text
    assert sheet.ndim == 4 and sheet.shape[0] == 1 and sheet.shape[-1] == 3
    assert res.ui["e"]["text"] == [text] or res.ui["e"]["text"] == (text,)
