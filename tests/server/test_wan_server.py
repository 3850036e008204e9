"""The Phantom example (workflows/api/wan_phantom_tab.json) queued on the real server, as the web UI does.

The graph is the one tests/host/test_wan_e2e.py runs in-process: the shipped workflow with only the model
files, the text encoder, the image and the sizes swapped for tiny stand-ins. The server needs no other
arrangement: its models folder (the session's, see tests/harness/host.py) holds the tiny Wan files the
host's UNETLoader and VAELoader list, and the text and image stand-ins (CVXTestTextConditioning,
CVXTestImage) are dev nodes it loads like the in-process host does.
"""

from __future__ import annotations

import pytest
import torch
from wan_graphs import SIZE, nodes_of, tiny_phantom
from workflow_tools import decode_mp4

pytestmark = [pytest.mark.server, pytest.mark.host, pytest.mark.usefixtures("one_thread")]


def test_phantom_tab_workflow_on_the_server_decodes_an_mp4_and_matches_in_process(server, host, wan_files):
    prompt = tiny_phantom(wan_files)
    sampler, bias = nodes_of(prompt, "KSampler"), nodes_of(prompt, "CustomVideoXReferenceFramesBias")
    prompt["99"] = {"class_type": "CVXTestSaveTensor", "inputs": {"value": [sampler, 0], "name": "wan_server"}}
    run = server.run(prompt, timeout=300)
    assert run.history["status"]["status_str"] == "success", run.history["status"]
    executed = {m["node"] for m in run.of_type("executing")}
    assert bias in executed and nodes_of(prompt, "SaveVideo") in {m["node"] for m in run.of_type("executed")}
    progress = [m for m in run.of_type("progress") if m.get("node") == sampler]
    steps = prompt[sampler]["inputs"]["steps"]
    assert progress and {m["max"] for m in progress} == {steps} and max(m["value"] for m in progress) == steps
    (mp4,) = [f for f in run.files if f.suffix == ".mp4"]
    assert decode_mp4(mp4) == (SIZE["length"], SIZE["width"], SIZE["height"], "h264")
    (saved,) = [f for f in run.files if f.name == "wan_server.pt"]
    over_http = torch.load(saved)
    in_process = host.run(prompt, capture=[sampler]).output(sampler)["samples"]
    assert torch.isfinite(over_http).all()
    torch.testing.assert_close(over_http, in_process.cpu(), rtol=1e-5, atol=1e-5)
