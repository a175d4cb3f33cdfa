"""Shared fixtures. ComfyUI fixtures skip (saying how to enable them) when no ComfyUI is found."""

from __future__ import annotations

import pytest
from comfy_support import import_comfyui, load_pack, tiny_model


@pytest.fixture(scope="session")
def node():
    """ToDoModelPatch as loaded by ComfyUI's own custom-node loader."""
    import_comfyui()
    return load_pack()


@pytest.fixture(scope="session")
def sd15():
    import_comfyui()
    return tiny_model("sd15")


@pytest.fixture(scope="session")
def sdxl():
    import_comfyui()
    return tiny_model("sdxl")
