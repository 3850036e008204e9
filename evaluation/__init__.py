"""The evaluation suite runner (``python -m evaluation SUITE.json --out DIR``; see docs/EVALUATION.md).

Developer tooling beside the pack, not part of it: it drives the pack's example workflow through the real
host and scores the frames with :mod:`cvx_core.metrics`; nothing in the pack imports it.
"""

import sys
from pathlib import Path

# The pack is imported one way everywhere, as the package ``customvideox`` (scripts/pack_import.py), the name
# the in-process host loads it under: the metrics the report uses are the objects the pack's nodes use.
_SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
from pack_import import pack_module  # noqa: E402

pack_module()
