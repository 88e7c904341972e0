"""Shared fixtures: torchvision models exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.torchvision_models import export


@pytest.fixture(scope="session")
def torchvision_model(tmp_path_factory):
    """``torchvision_model(name, dynamo)`` -> path of the exported ONNX file (cached)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(name: str, dynamo: bool = False) -> Path:
        key = (name, dynamo)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{name}_{'dynamo' if dynamo else 'legacy'}")
            cache[key] = export(name, folder / f"{name}.onnx", dynamo)
        return cache[key]

    return get
