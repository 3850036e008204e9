"""Prompt builders and bookkeeping shared by tests/test_reliability_*.py.

Graphs use the tiny models (tests/conftest.py ``tiny_models``), core nodes, the pack's nodes and the
test-only nodes in tests/test_nodes_testonly. Tallies of bad inputs / faults / repeated runs go to
``test-artifacts/reliability.json`` (one section per test file) and are printed at the end of a module.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import graphs

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = REPO_ROOT / "test-artifacts" / "reliability.json"

# Tiny run: 32x32 pixels, 5 frames (2 latent frames of 4x4), short random text, 2 steps.
SIZE = {"width": 32, "height": 32, "length": 5}
STEPS = 2
TEXT_LEN = 16
REF, ENC, APPLY, IMG, VAE_ID = "ref_img", "ref_enc", "apply", "ref_vae_loader", "ref_vae"


def base_prompt(tiny_models, seed: int = 0, save_name: str = "rel", route: str = "void",
                **size: int) -> dict[str, Any]:
    """The plain text-to-video graph (no pack node): UNETLoader -> sampler -> CVXTestSaveTensor."""
    s = {**SIZE, **size}
    return graphs.t2v_prompt(tiny_models.unet, None, route=route, steps=STEPS, seed=seed, text_length=TEXT_LEN,
                             save_name=save_name, **s)


def model_users(prompt: dict[str, Any]) -> list[tuple[str, str]]:
    """(node id, input name) of every input linked to the loader's MODEL."""
    return [(nid, name) for nid, node in prompt.items() for name, v in node["inputs"].items()
            if v == [graphs.MODEL, 0]]


def patched_prompt(tiny_models, seed: int = 0, ref_seed: int = 7, strength: float = 2.0,
                   save_name: str = "rel", route: str = "void", apply_inputs: dict[str, Any] | None = None,
                   enc_inputs: dict[str, Any] | None = None, **size: int) -> dict[str, Any]:
    """``base_prompt`` with the reference path: CVXTestImage -> CustomVideoXReferenceEncode (the tiny
    CogVideoX VAE) -> CustomVideoXApply on the loader's MODEL, feeding every model user."""
    s = {**SIZE, **size}
    p = base_prompt(tiny_models, seed=seed, save_name=save_name, route=route, **s)
    users = model_users(p)
    p[IMG] = {"class_type": "CVXTestImage",
              "inputs": {"seed": ref_seed, "width": 40, "height": 24, "batch_size": 1}}
    p[VAE_ID] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models.vae}}
    p[ENC] = {"class_type": "CustomVideoXReferenceEncode",
              "inputs": {"vae": [VAE_ID, 0], "image": [IMG, 0], "width": s["width"], "height": s["height"],
                         "fit": "pad", "background": "keep", **(enc_inputs or {})}}
    p[APPLY] = {"class_type": "CustomVideoXApply",
                "inputs": {"model": [graphs.MODEL, 0], "reference": [ENC, 0], "strength": strength,
                           "block_start": 0, "block_end": -1, "apply_to_uncond": True,
                           "attention_mode": "two_way", "reference_rope": "negative", **(apply_inputs or {})}}
    for nid, name in users:
        p[nid]["inputs"][name] = [APPLY, 0]
    return p


def insert_model_node(prompt: dict[str, Any], node_id: str, node: dict[str, Any], after: str) -> dict[str, Any]:
    """A copy of ``prompt`` with ``node`` (whose "model" input is set to ``after``'s MODEL) placed between
    ``after`` and every node that used ``after``'s MODEL."""
    p = copy.deepcopy(prompt)
    users = [(nid, name) for nid, n in p.items() for name, v in n["inputs"].items() if v == [after, 0]]
    p[node_id] = copy.deepcopy(node)
    p[node_id]["inputs"]["model"] = [after, 0]
    for nid, name in users:
        p[nid]["inputs"][name] = [node_id, 0]
    return p


def record(section: str, data: dict[str, Any], replace: bool = False) -> None:
    """Merge ``data`` into ``section`` of test-artifacts/reliability.json (``replace``: the section
    becomes ``data``, so nothing from an earlier run survives in it)."""
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(ARTIFACT.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    doc[section] = data if replace else {**doc.get(section, {}), **data}
    ARTIFACT.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")


def report_line(config, text: str) -> None:
    """Print ``text`` on the terminal even under ``-q`` and output capture."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    # Output capture is on during fixture teardown: suspend it so the line reaches the terminal.
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        if tr is not None:
            tr.write_line(text)
        else:  # pragma: no cover
            print(text)


class Outcomes:
    """Each test's outcome as pytest reports it (``nodeid -> "passed" | "failed" | "skipped"``): a test
    counts as passed only when its setup, call and teardown all passed. A pytest plugin, registered
    for a while by :func:`collect_outcomes`."""

    def __init__(self) -> None:
        self.by_nodeid: dict[str, str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or not report.passed:
            if self.by_nodeid.get(report.nodeid) in (None, "passed"):
                self.by_nodeid[report.nodeid] = report.outcome


@contextlib.contextmanager
def collect_outcomes(config) -> Iterator[Outcomes]:
    """Register an :class:`Outcomes` plugin while the block runs (e.g. around a module fixture's yield:
    the last test's call report arrives before module teardown)."""
    seen = Outcomes()
    config.pluginmanager.register(seen)
    try:
        yield seen
    finally:
        config.pluginmanager.unregister(seen)


def tally_report(cases: Sequence[Any], items: Sequence[Any], outcomes: dict[str, str],
                 messages: dict[str, str] | None = None) -> dict[str, Any]:
    """The tally of a table of cases from pytest's outcomes, per owner (e.g. "pack" / "host").

    ``cases``: objects with ``id``, ``owner`` and ``kind`` (several cases may share a kind, e.g. one
    input on two models); ``items``: the module's collected tests, a case's test being the item whose
    ``callspec.params["case"]`` is it; ``outcomes``: :attr:`Outcomes.by_nodeid`. Per owner: ``kinds`` in
    the table, ``tried`` (a case of the kind ran), ``handled`` (every case of the kind ran and passed);
    then each case's outcome ("passed", "failed", "skipped" or "not run") and the module's other tests.
    """
    def case_of(item: Any) -> Any:
        return getattr(getattr(item, "callspec", None), "params", {}).get("case")

    by_case = {case_of(i).id: outcomes.get(i.nodeid, "not run") for i in items if case_of(i) is not None}
    owners: dict[str, dict[str, list[str]]] = {}
    for c in cases:
        owners.setdefault(c.owner, {}).setdefault(c.kind, []).append(by_case.get(c.id, "not run"))
    report: dict[str, Any] = {}
    for owner, kinds in owners.items():
        tried = {k for k, res in kinds.items() if any(r != "not run" for r in res)}
        handled = {k for k in tried if all(r == "passed" for r in kinds[k])}
        report[owner] = {"kinds": len(kinds), "tried": len(tried), "handled": len(handled),
                         "not_handled": sorted(tried - handled), "not_run": sorted(set(kinds) - tried)}
    report["cases"] = {c.id: {"owner": c.owner, "kind": c.kind, "outcome": by_case.get(c.id, "not run"),
                              "message": (messages or {}).get(c.id, "")[:300]} for c in cases}
    report["other_checks"] = {i.name: outcomes.get(i.nodeid, "not run") for i in items if case_of(i) is None}
    return report


@dataclass
class Ctx:
    tiny: Any
    bad: dict[str, str] = field(default_factory=dict)  # kind -> file name under the extra folders


def patched(c: Ctx, **kw) -> dict[str, Any]:
    return patched_prompt(c.tiny, **kw)


def tab_only(**inputs) -> dict[str, Any]:
    """A TAB schedule node alone (its plot saved): no model needed."""
    tab = {"curve": "keyframes", "b_min": 0.0, "b_max": 1.0, "start_percent": 0.0, "end_percent": 1.0,
           "outside": "base", "keyframes": "0:0, 0.5:1, 1:0"}
    tab.update(inputs)
    return {"tab": {"class_type": "CustomVideoXTABSchedule", "inputs": tab},
            "save": {"class_type": "CVXTestSaveTensor", "inputs": {"value": ["tab", 1], "name": "rel_tab_plot"}}}


def drop_input(p: dict[str, Any], nid: str, name: str) -> dict[str, Any]:
    del p[nid]["inputs"][name]
    return p


def retype(p: dict[str, Any], nid: str, class_type: str) -> dict[str, Any]:
    p[nid]["class_type"] = class_type
    return p
