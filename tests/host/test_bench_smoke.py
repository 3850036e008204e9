"""Every bench script runs, as a user runs it (a subprocess with this venv's python), at its ``--smoke`` size.

The benches import the pack's internals (the wrapper, the attention override, the run cache, the training
loop), so a refactor there can break a bench without breaking any other test: these runs catch that. The
smoke sizes measure nothing; they go through the same code as the real runs (every row, one-way included).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow  # a bench subprocess: about 10 s
def test_block_bench_smoke_every_row_and_batching() -> None:
    proc = run_bench("block_bench.py", "--smoke", "--repeats", "1", "--warmup", "0", "--batching")
    out = ok(proc)
    assert "smoke (tiny, not a measurement)" in out, out
    for row in ("unpatched", "two-way TAB", "two-way TAB+ERAE", "one-way cached TAB", "one-way cached TAB+ERAE",
                "ERAE map block (2-way)", "two_way split", "one_way split", "unpatched B=2"):
        assert re.search(rf"^{re.escape(row)}\s+\d", out, re.M), f"row {row!r} missing:\n{out}"
    assert "SUMMARY two-way meas/ideal" in out and "SUMMARY batching one_way" in out, out
    # The split path (what the pack runs) equals the masked batch (float32 round-off).
    diffs = [float(d) for d in re.findall(r"^\w+ split\s+.*\s(\S+e[-+]\d+)$", out, re.M)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out
    # Progress goes to stderr, one line per row and round.
    assert "round 1/1, row 1/6 unpatched" in proc.stderr, proc.stderr


@pytest.mark.slow  # a bench subprocess: about 10 s
def test_sampling_bench_smoke_and_its_minimum_layer_count() -> None:
    out = ok(run_bench("sampling_bench.py", "--smoke"))
    for row in ("unpatched", "two-way TAB", "two-way TAB+ERAE mask", "two-way TAB+ERAE auto", "one-way TAB",
                "one-way TAB+ERAE mask"):
        assert re.search(rf"^{re.escape(row)}\s+\d", out, re.M), f"row {row!r} missing:\n{out}"
    assert "SUMMARY patch overhead per step" in out, out
    # One reference pass per one-way run (the run cache works through the bench's path).
    one_way = re.search(r"^one-way TAB\s+.*\s(\d+)$", out.split("the patch's own time")[1], re.M)
    assert one_way and one_way.group(1) == "1", out

    short = run_bench("sampling_bench.py", "--layers", "2")
    assert short.returncode == 2, (short.returncode, short.stderr[-2000:])
    assert "--layers 2 is too few" in short.stderr and "at least 4 blocks" in short.stderr, short.stderr
    assert "Traceback" not in short.stderr, short.stderr


@pytest.mark.slow  # a bench subprocess: about 10 s
def test_train_bench_smoke() -> None:
    out = ok(run_bench("train_bench.py", "--smoke", "--repeats", "1"))
    for row in ("base forward (no ref)", "forward (no grad)", "train step, ckpt on", "train step, ckpt off"):
        assert re.search(rf"^{re.escape(row)}\s+\d", out, re.M), f"row {row!r} missing:\n{out}"
    up = re.search(r"max \|lora up\| after \d+ steps: (\S+) ", out)
    assert up and float(up.group(1)) > 0, out  # the gradients reached the adapter
    assert "SUMMARY train step" in out, out


@pytest.mark.parametrize("mode", ["two_way", "one_way"])
def test_gpu_check_smoke_runs_the_table_on_any_device(mode: str) -> None:
    out = ok(run_bench("gpu_check.py", "--smoke", "--mode", mode))
    for row in ("plain [text|video]", "column mask (TAB)", "fold (TAB+ERAE)", "LSE merge (TAB)",
                "LSE merge (TAB+ERAE)", "MATH"):
        assert row in out, f"row {row!r} missing:\n{out}"
    diffs = [float(d) for d in re.findall(r"^LSE merge \(TAB(?:\+ERAE)?\)\s+.*\s(\S+e[-+]\d+)$", out, re.M)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out


@pytest.mark.slow  # a bench subprocess: about 10 s
def test_wan_bench_tiny_every_row_of_both_tables() -> None:
    """Phantom's own frames biased and a reference inserted into Wan T2V (two-way, one-way cached, ERAE), every
    row through the pack's real path at a tiny width; the FLOP ideals are the model's known answers."""
    out = ok(run_bench("wan_bench.py", "--tiny"))
    assert "smoke (tiny, not a measurement)" in out, out
    rows = dict(re.findall(r"^  (T2V unpatched \+1 frame|T2V unpatched|two-way TAB\+ERAE mask|two-way TAB|one-way cached TAB\+ERAE mask|"
                           r"one-way cached TAB)\s+\S+\s+\S+\s+\S+\s+(\S+)", out, re.M))
    assert set(rows) == {"T2V unpatched", "T2V unpatched +1 frame", "two-way TAB", "two-way TAB+ERAE mask", "one-way cached TAB",
                         "one-way cached TAB+ERAE mask"}, out
    # 24 video tokens + 24 reference tokens: two-way costs more than the plain call, one-way only its attention.
    assert float(rows["T2V unpatched"]) == 1.0 and float(rows["two-way TAB"]) > float(rows["one-way cached TAB"]) >= 1.0
    assert rows["T2V unpatched +1 frame"] == rows["two-way TAB"]  # as many tokens: the same ideal
    for row in ("unpatched", "bias", "bias+background", "bias+ERAE mask"):
        assert re.search(rf"^  {re.escape(row)}\s+\d", out, re.M), f"row {row!r} missing:\n{out}"
    assert "SUMMARY tiny inserted: two-way meas/ideal" in out and "SUMMARY ratio over unpatched Phantom" in out, out


def test_wan_rope_slots_smoke_known_answers() -> None:
    """Known answers of relative RoPE: a reference at a frame's own index gets the factor 1 there ('none' at frame
    0, 'middle' at its frame); 'after' is 'negative' mirrored in time; 'shift' is 'negative' on Wan."""
    out = ok(run_bench("wan_rope_slots.py", "--smoke"))
    assert "smoke (tiny, not a measurement)" in out and "head dim 128" in out, out
    table = out.split("F per video frame:")[1]
    f = {name: [float(v) for v in re.findall(r"\d\.\d+", rest)]
         for name, rest in re.findall(r"^(negative|shift|none|after|middle) (?:\(not an option\))?(.*)$", table, re.M)}
    assert set(f) == {"negative", "shift", "none", "after", "middle"} and all(len(v) == 5 for v in f.values()), out
    assert f["none"][0] == 1.0 and f["middle"][2] == 1.0 and max(f["negative"]) < 1.0, out
    assert f["after"] == f["negative"][::-1] and f["shift"] == f["negative"], out
    errs = [float(e) for e in re.findall(r"\s(\d\.\de[-+]\d+)$", out.split("F per video frame:")[0], re.M)]
    assert len(errs) == 5 and max(errs) < 0.1, out  # the Monte Carlo mean agrees with the exact factor
    assert "SUMMARY spread" in out, out
