"""The user's first hour, from the outside: every command run as the README documents it (a subprocess with
that command line) or the web UI in a real browser, and the docs checked against what the commands and the
server say.

Model files are fakes whose safetensors headers look like the real ones (the real key names, tiny tensors,
the real first dimension where detection reads it), under names no default would guess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import model_files as mf  # noqa: E402  (scripts/)
import pytest
import torch
import workflow_tools as wt
import workflow_ui  # noqa: E402
from harness.host import REPO_ROOT
from safetensors.torch import save_file

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
RUN = [PY, str(REPO_ROOT / "scripts" / "run_example.py")]
TRAIN = [PY, str(REPO_ROOT / "scripts" / "train_adapter.py")]
EVAL = [PY, "-m", "evaluation"]
STARTER = REPO_ROOT / "eval" / "starter_suite.json"


def run(cmd: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """A command as a user types it: from the repository root, no CUDA device."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def fake_models(models: Path) -> dict[str, Path]:
    """A CogVideoX transformer (diffusers keys), a CogVideoX VAE and a T5-XXL encoder, tiny but with the keys
    (and the T5 width) detection reads, under names no default matches."""
    files = {
        mf.TRANSFORMER: models / "diffusion_models" / "downloads" / "my_dit_v2.safetensors",
        mf.VAE: models / "vae" / "decoder_thing.safetensors",
        mf.T5: models / "text_encoders" / "enc.safetensors",
    }
    tensors = {
        mf.TRANSFORMER: {"transformer_blocks.0.norm1.linear.weight": torch.zeros(4, 2),
                         "patch_embed.proj.weight": torch.zeros(2, 16, 2, 2)},
        mf.VAE: {"decoder.conv_in.conv.weight": torch.zeros(2), "encoder.conv_out.conv.weight": torch.zeros(32, 1),
                 "decoder.mid_block.resnets.0.norm1.norm_layer.weight": torch.zeros(2)},
        mf.T5: {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": torch.zeros(10240, 1, dtype=torch.float16),
                "shared.weight": torch.zeros(2, 1)},
    }
    for kind, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors[kind], str(path))
    return files


def isolated(tmp_path: Path) -> list[str]:
    """Arguments that keep `make run` away from the repository's models/ and extra_model_paths.yaml."""
    return ["--models-dir", str(tmp_path / "models"), "--extra-model-paths", str(tmp_path / "no.yaml"),
            "--output-dir", str(tmp_path / "out")]


# ------------------------------------------------------------------------------------------ make run
def test_make_run_finds_weights_by_content_and_names_whats_missing(tmp_path: Path) -> None:
    files = fake_models(tmp_path / "models")
    r = run([*RUN, *isolated(tmp_path), "--dry-run"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "downloads/my_dit_v2.safetensors" in r.stdout and "decoder_thing.safetensors" in r.stdout
    assert "enc.safetensors" in r.stdout and "tiny" not in r.stdout.lower(), r.stdout

    # T5 gone, the VAE dropped into the transformers' folder: both are named, with folder and source.
    files[mf.T5].unlink()
    files[mf.VAE].rename(tmp_path / "models" / "diffusion_models" / "vae_backup.safetensors")
    r = run([*RUN, *isolated(tmp_path)], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr
    assert "T5-XXL text encoder" in err and "models/text_encoders/" in err, err
    assert mf.downloads(mf.T5)[0].url in err and "vae_backup.safetensors" in err and "move it to models/vae/" in err
    assert "Traceback" not in err and "{" not in err, err


def test_make_run_explains_a_rejected_workflow(tmp_path: Path) -> None:
    """The host's 400 answer (node_errors) comes out as node, input and message, never as a JSON dump."""
    fake_models(tmp_path / "models")
    workflow = wt.load_api("subject_to_video_void")
    guider = next(n for n in workflow.values() if n["class_type"] == "CFGGuider")
    del guider["inputs"]["cfg"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(workflow))
    r = run([*RUN, *isolated(tmp_path), "--workflow", str(path), "--steps", "1", "--frames", "9"], timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next((x for x in r.stderr.splitlines() if "CFGGuider" in x), "")
    assert "cfg" in line and "missing" in line.lower(), r.stderr
    assert '{"' not in r.stderr and "node_errors" not in r.stderr, r.stderr


@pytest.mark.slow
def test_make_run_tiny_demo_prints_progress_summary_and_stays_out_of_models(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    r = run([*RUN, *isolated(tmp_path), "--tiny"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    steps = re.findall(r"step (\d+)/(\d+)", out)
    assert steps and steps[-1][0] == steps[-1][1] and "ETA" in out, out  # the host's progress, forwarded
    summary = out[out.index("=== CustomVideoX: done in"):]
    for field in ("size:", "frames", "steps", "reference image:", "prompt:", "output:", "make serve"):
        assert field in summary, f"{field!r} missing from the summary:\n{summary}"
    assert "shrunk" in summary and "tabby cat" in summary and "A tabby cat" in summary, summary
    assert "NOISE" in summary and mf.downloads(mf.VAE)[0].url in summary, summary
    video = Path(re.search(r"output:\s+(\S+\.mp4)", summary).group(1))
    assert video.is_file() and video.is_relative_to(tmp_path / "out"), video
    # The tiny model is in none of the folders the web UI lists (the user's models/ and the repo's yaml).
    assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file()]
    listed = [f for folder in ("diffusion_models", "vae")
              for root in mf.model_roots(folder, REPO_ROOT / "models", REPO_ROOT / "extra_model_paths.yaml")
              for f in (root.rglob("*") if root.is_dir() else []) if f.name.startswith("cvx_tiny")]
    assert not listed, f"the tiny test model would show up in the UI's model lists: {listed}"


# ---------------------------------------------------------------------------------------------- train
def test_train_cli_checks_every_path_before_loading(tmp_path: Path) -> None:
    r = run([*TRAIN, "--model", str(tmp_path / "nope"), "--vae", str(tmp_path / "no_vae.safetensors"),
             "--text-encoder", str(tmp_path / "no_t5.safetensors"), "--data", str(tmp_path / "no_clips")],
            timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    for flag in ("--model", "--vae", "--text-encoder", "--data"):
        assert flag in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "CUDA" not in r.stderr and "nothing was loaded" in r.stderr
    help_text = run([*TRAIN, "--help"], timeout=60).stdout
    assert "Example" in help_text and "--tiny" in help_text and "requirements-train.txt" in help_text


@pytest.mark.slow
def test_train_cli_tiny_runs_the_loop_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    loras = tmp_path / "loras"
    first = run([*TRAIN, "--tiny", "--steps", "2", "--checkpoint-every", "1", "--out", str(out),
                 "--loras-dir", str(loras)], timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "device: CPU (no CUDA device found)" in first.stdout, first.stdout
    assert "dataset: 2/2 clips encoded" in first.stdout and "step 2/2" in first.stdout, first.stdout
    assert (out / "customvideox_adapter.safetensors").is_file() and (out / "loss.png").is_file()
    assert "not copied to models/loras" in first.stdout and not loras.exists()
    again = run([*TRAIN, "--tiny", "--steps", "3", "--out", str(out), "--loras-dir", str(loras)], timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from step 2" in again.stdout and "step 3/3" in again.stdout, again.stdout
    assert "step 1/" not in again.stdout


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_cli_lists_without_out_and_checks_models_first(tmp_path: Path) -> None:
    r = run([*EVAL, str(STARTER), "--list"], timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) > 10, r.stdout + r.stderr
    r = run([*EVAL, str(STARTER), "--out", str(tmp_path / "ev"), "--model", "no_such_transformer.safetensors",
             "--limit", "1"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no_such_transformer.safetensors" in r.stderr and "--tiny" in r.stderr and "nothing was run" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ev").exists()


@pytest.mark.host
def test_evaluate_report_keeps_each_video_and_labels_proxies(host, tiny_models, tmp_path: Path) -> None:
    from evaluation import host_backend as HB
    from evaluation import runner as R
    from evaluation import suite as S

    suite = S.load_suite(STARTER)
    case = suite.cases(subjects=["cup"], prompts=["cam_pan_left"], rows=["base"], limit=1)
    opts = R.RunOptions(models=S.Models(unet=tiny_models.unet, vae=tiny_models.vae), tiny=True, progress=False,
                        video={"width": 64, "height": 48, "length": 5, "steps": 1})
    report = R.run_suite(suite, tmp_path, HB.HostBackend(tiny=True).start(), opts, case)
    assert report["done"] == 1, report["failed"]
    video = tmp_path / "cases" / f"{case[0].id}.mp4"
    assert video.is_file() and video.stat().st_size > 0
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"(cases/{case[0].id}.mp4)" in md, md
    header = next(line for line in md.splitlines() if line.startswith("| setting |"))
    record = json.loads((tmp_path / "cases" / f"{case[0].id}.json").read_text())
    proxies = [m["label"] for m in record["metrics"].values() if m["value"] is not None and "proxy" in m["label"]]
    assert proxies and header.count("proxy") == len(proxies), (header, proxies)


def test_plot_font_draws_arrows_and_spaces() -> None:
    from customvideox.cvx_core.image_ops import label_font
    from PIL import Image, ImageChops, ImageDraw

    font = label_font(14)

    def ink(text: str) -> Image.Image:
        img = Image.new("L", (60, 30), 0)
        ImageDraw.Draw(img).text((5, 5), text, fill=255, font=font)
        return img

    assert ImageChops.difference(ink("↓"), ink("\uffff")).getbbox(), "the arrow is drawn as the missing-glyph box"
    assert font.getlength("a b") - font.getlength("ab") >= 0.2 * 14, "spaces are (nearly) zero-width"


# ------------------------------------------------------------------------------------- workflows, docs
@pytest.mark.parametrize("folder", [wt.UI_DIR, wt.EXAMPLES_DIR], ids=["workflows_ui", "example_workflows"])
def test_loader_nodes_say_where_to_download_their_files(folder: Path) -> None:
    # The pack's own entries (CogVideoX, Phantom), or for the Wan files the host templates' own entries.
    urls = {d.url: d.kind for d in (*mf.DOWNLOADS, *mf.WAN_EXTRA_DOWNLOADS)}
    urls.update({m["url"]: mf.KIND_OF_FOLDER[m["directory"]] for m in workflow_ui.template_models().values()
                 if m["directory"] in mf.KIND_OF_FOLDER})
    checked = 0
    for path in sorted(folder.glob("*.json")):
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            if node["type"] not in workflow_ui.LOADER_FILES:
                continue
            models = node["properties"].get("models")
            assert models, f"{path.name}: node {node['id']} ({node['type']}) has no properties.models"
            kind = workflow_ui.LOADER_FILES[node["type"]][1]
            for m in models:
                assert m["name"] in node["widgets_values"], (path.name, node["id"], m)
                assert urls[m["url"]] == kind and m["directory"] == mf.FOLDERS[kind], (path.name, m)
            checked += 1
    assert checked >= 3 * 5, checked


def test_docs_list_the_downloads_and_training_requirements() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    nodes_md = (REPO_ROOT / "NODES.md").read_text(encoding="utf-8")
    for doc in (readme, nodes_md):
        for d in mf.DOWNLOADS:
            assert d.url in doc and d.folder in doc and d.size in doc, d
    assert "requirements-train.txt" in readme and "[train]" in readme
    assert "cu130" in readme and "harmless" in readme
    assert "Templates" in readme and "Extensions" in readme and "Browse Templates" not in readme




# ------------------------------------------------------------------------------------------- web UI




