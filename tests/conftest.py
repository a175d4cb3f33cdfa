"""Shared fixtures. ComfyUI fixtures skip (saying how to enable them) when no ComfyUI is found."""

from __future__ import annotations

import pytest
from comfy_server import STAND_IN_NAMES, checkpoint_cache, comfy_server
from comfy_server import write_random_sd15_checkpoint as random_checkpoint
from comfy_support import import_comfyui, load_pack, tiny_model
from hypothesis import HealthCheck, settings

from todo_core.bench.comfyui_path import ENABLE_HINT, comfyui_version, ensure_comfyui

# Shared 2-core CI machines: timing is no part of what the property tests check.
settings.register_profile("shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-machine")


def pytest_report_header(config) -> str:
    """Which ComfyUI the ComfyUI-level tests run against (unpacking the tested host where none is found)."""
    root = ensure_comfyui()
    if root is None:
        return f"ComfyUI: none ({ENABLE_HINT})"
    return f"ComfyUI: v{comfyui_version(root)} at {root}"


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


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A running ComfyUI server with this pack and a random-weight SD1.5 checkpoint under every example name."""
    comfyui = import_comfyui()
    checkpoint = random_checkpoint(checkpoint_cache() / "sd15-random-fp16.safetensors")
    base = tmp_path_factory.mktemp("comfyui-base")
    with comfy_server(comfyui, base, dict.fromkeys(STAND_IN_NAMES, checkpoint)) as running:
        yield running
