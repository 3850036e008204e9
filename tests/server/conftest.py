"""The host's CLI args (``--cpu`` and the host tree first on ``sys.path``), parsed before any test module here
imports ``comfy`` (scripts/host_boot.py)."""

from host_boot import bootstrap_host_args

bootstrap_host_args()
