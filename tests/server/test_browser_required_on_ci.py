"""A missing Chromium fails a CI run (``CI=true``) instead of skipping the web-UI test; a local run skips loudly.

Run from the outside, as CI runs them: the browser test module and the installer, each in a subprocess,
with Chromium pointed at a path that does not exist and the installer told not to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_BROWSER = {"CVX_CHROMIUM": "/nonexistent/chromium", "CVX_CHROMEDRIVER": "/nonexistent/chromedriver",
              "CVX_SKIP_BROWSER_INSTALL": "1"}


def env(ci: str | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "CI"} | NO_BROWSER
    return e if ci is None else e | {"CI": ci}


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_without_chromium_fails_the_browser_module(ci: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/server/test_browser.py"], cwd=REPO, env=env(ci), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "BROWSER TEST FAILED" in out and "/nonexistent/chromium" in out, out[-3000:]


@pytest.mark.parametrize("ci", [None, "false"])
def test_local_run_without_chromium_skips_loudly(ci: str | None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/server/test_browser.py"], cwd=REPO, env=env(ci), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 5), out[-3000:]  # 5: every test of the run skipped (pytest's "no tests ran")
    assert "BROWSER TEST SKIPPED (the web UI is NOT tested)" in out and "skipped" in proc.stdout, out[-3000:]


@pytest.mark.parametrize(("ci", "rc"), [("true", 1), (None, 0)])
def test_installer_fails_setup_on_ci_only(ci: str | None, rc: int) -> None:
    proc = subprocess.run(["bash", "scripts/install_browser.sh"], cwd=REPO, env=env(ci), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    assert ("FAILS setup" if rc else "will be SKIPPED") in proc.stderr, proc.stderr
