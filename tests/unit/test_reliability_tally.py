"""The reliability tally counts outcomes pytest reported, never attempts (tests/reliability_graphs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import reliability_graphs as rg


def report(nodeid: str, when: str, outcome: str) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome, passed=outcome == "passed")


def test_outcomes_take_every_phase_into_account() -> None:
    seen = rg.Outcomes()
    phases = {
        "ok": [("setup", "passed"), ("call", "passed"), ("teardown", "passed")],
        "assert_failed": [("setup", "passed"), ("call", "failed"), ("teardown", "passed")],
        "teardown_failed": [("setup", "passed"), ("call", "passed"), ("teardown", "failed")],
        "setup_failed": [("setup", "failed"), ("teardown", "passed")],
        "skipped": [("setup", "skipped"), ("teardown", "passed")],
    }
    for nodeid, steps in phases.items():
        for when, outcome in steps:
            seen.pytest_runtest_logreport(report(nodeid, when, outcome))
    assert seen.by_nodeid == {"ok": "passed", "assert_failed": "failed", "teardown_failed": "failed",
                              "setup_failed": "failed", "skipped": "skipped"}


@dataclass(frozen=True)
class FakeCase:
    id: str
    owner: str
    kind: str


def item(case: FakeCase | None, name: str) -> SimpleNamespace:
    params = {"case": case} if case is not None else {}
    return SimpleNamespace(nodeid=f"t.py::{name}", name=name, callspec=SimpleNamespace(params=params))


def test_tally_counts_kinds_from_outcomes() -> None:
    a, b1, b2 = FakeCase("a", "pack", "a"), FakeCase("b_1_0", "pack", "b"), FakeCase("b_1_5", "pack", "b")
    c, d, e = FakeCase("c", "host", "c"), FakeCase("d", "pack", "d"), FakeCase("e", "pack", "e")
    cases = [a, b1, b2, c, d, e]
    items = [item(x, f"test_case[{x.id}]") for x in (a, b1, b2, c, e)] + [item(None, "test_other")]
    outcomes = {"t.py::test_case[a]": "passed", "t.py::test_case[b_1_0]": "passed",
                "t.py::test_case[b_1_5]": "failed", "t.py::test_case[c]": "passed", "t.py::test_other": "failed"}
    # d was deselected (no item); e was collected but never reported (the run stopped before it)
    rep = rg.tally_report(cases, items, outcomes, {"a": "the message"})
    assert rep["pack"] == {"kinds": 4, "tried": 2, "handled": 1, "not_handled": ["b"], "not_run": ["d", "e"]}
    assert rep["host"] == {"kinds": 1, "tried": 1, "handled": 1, "not_handled": [], "not_run": []}
    assert rep["cases"]["b_1_5"]["outcome"] == "failed" and rep["cases"]["d"]["outcome"] == "not run"
    assert rep["cases"]["a"]["message"] == "the message"
    assert rep["other_checks"] == {"test_other": "failed"}
