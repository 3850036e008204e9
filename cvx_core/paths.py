"""Checks for names that come from users or from downloaded files before they become paths. Host-free.

One rule each, shared by every place that turns such a name into a path (model and dataset folders,
adapter names, the shards an index file lists).
"""

from __future__ import annotations

import os
import re

_SEPARATORS = re.compile(r"[/\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_FILE_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")


def is_relative_name(name: str) -> bool:
    """A path below some root: not empty, no NUL, no ``..`` part, not absolute (``/``, ``\\``, a drive).
    Symlinks below the root are the caller's choice."""
    return (bool(name) and "\x00" not in name and ".." not in _SEPARATORS.split(name) and not os.path.isabs(name)
            and not name.startswith(("/", "\\")) and not _DRIVE.match(name))


def is_plain_file_name(name: str) -> bool:
    """One entry of a folder: no separator, not ``.`` or ``..``, no NUL (e.g. a shard an index names)."""
    return bool(name) and "\x00" not in name and not _SEPARATORS.search(name) and name not in (".", "..")


def is_safe_file_name(name: str) -> bool:
    """A name the pack may create a file or folder from: letters, digits, ``_ . -``, not hidden."""
    return bool(_FILE_NAME_CHARS.fullmatch(name)) and not name.startswith(".")
