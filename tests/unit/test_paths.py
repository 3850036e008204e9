"""Name checks before names become paths (cvx_core/paths.py): known good and bad names."""

from __future__ import annotations

import pytest
from customvideox.cvx_core.paths import is_plain_file_name, is_relative_name, is_safe_file_name


@pytest.mark.parametrize("name", ["model.safetensors", "CogVideoX-5b/transformer", "a\\b.sft", "my clips", "x..y"])
def test_relative_names_accepted(name: str) -> None:
    assert is_relative_name(name)


@pytest.mark.parametrize("name", ["", "../x", "a/../../b", "a\\..\\b", "/etc/passwd", "\\\\server\\share", "C:x",
                                  "c:\\models", "a\x00b"])
def test_relative_names_rejected(name: str) -> None:
    assert not is_relative_name(name)


def test_plain_and_safe_file_names() -> None:
    assert is_plain_file_name("diffusion_pytorch_model-00001-of-00003.safetensors")
    for bad in ("", ".", "..", "sub/shard.safetensors", "..\\shard", "/abs", "a\x00"):
        assert not is_plain_file_name(bad), bad
    assert is_safe_file_name("my_adapter-v1.2")
    for bad in ("", ".hidden", "a b", "a/b", "ä", "x;rm"):
        assert not is_safe_file_name(bad), bad
