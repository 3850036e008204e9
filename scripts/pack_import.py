"""This repository imported as the Python package the host would load (its modules use relative
imports), for the scripts, benchmarks and tests that drive the pack without the host's node loader."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "customvideox"


def pack_module(sub: str | None = None) -> ModuleType:
    """The pack (``sub=None``) or one of its modules, e.g. ``pack_module("cvx_host.reference_patch")``."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{sub}") if sub else sys.modules[PACKAGE]
