"""Broken workflows over HTTP: the real server rejects them with the node and input, and goes on serving."""

from __future__ import annotations

import pytest
import reliability_graphs as rg
import torch
from harness.host import HostRunError


@pytest.mark.server
def test_server_rejects_broken_workflows_and_keeps_serving(server, tiny_models) -> None:
    """Validation errors over HTTP (400 with the node and input); execution errors through the server are in
    test_reliability_faults.py, on a server of its own (the shared server's log must stay traceback-free)."""
    bad_json = rg.drop_input(rg.tab_only(), "tab", "keyframes")
    with pytest.raises(HostRunError) as e:
        server.post_prompt(bad_json)
    assert "400" in str(e.value) and "keyframes" in str(e.value) and "required_input_missing" in str(e.value)
    with pytest.raises(HostRunError) as e:
        server.post_prompt(rg.retype(rg.tab_only(), "tab", "CustomVideoXTABScheduleV9"))
    assert "CustomVideoXTABScheduleV9" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(HostRunError) as e:
        server.post_prompt(rg.patched(rg.Ctx(tiny_models), strength=20.0))
    assert "400" in str(e.value) and "strength" in str(e.value) and "bigger than max" in str(e.value)
    run = server.run(rg.base_prompt(tiny_models, save_name="rel_server_after_bad"), timeout=120)
    assert run.history["status"]["status_str"] == "success"
    saved = [p for p in run.files if p.name == "rel_server_after_bad_latent.pt"]
    assert saved and torch.isfinite(torch.load(saved[0])).all()
