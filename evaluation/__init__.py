"""The evaluation suite runner (``python -m evaluation SUITE.json --out DIR``; see docs/EVALUATION.md).

Developer tooling beside the pack, not part of it: it drives the pack's example workflow through the real
host and scores the frames with :mod:`cvx_core.metrics`; nothing in the pack imports it.
"""
