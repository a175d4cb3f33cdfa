"""The tested ComfyUI host: found where a user keeps one, else unpacked from the shipped archive, never skipped."""

from __future__ import annotations

import pytest

from todo_core.bench import comfyui_path
from todo_core.bench.comfyui_path import HOST_ARCHIVE, TESTED_VERSION, comfyui_version, find_comfyui, is_comfyui


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No COMFYUI_PATH, an empty home, a fresh cache: what CI's fresh machine looks like."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COMFYUI_TODO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(comfyui_path, "PACK_ROOT", tmp_path / "pack")  # not inside a custom_nodes/ folder
    return tmp_path


@pytest.mark.skipif(not HOST_ARCHIVE.is_file(), reason=f"the tested host archive is not at {HOST_ARCHIVE}")
def test_a_fresh_machine_gets_the_tested_host_unpacked_once(bare_machine):
    assert find_comfyui() is None
    root = comfyui_path.ensure_comfyui()
    assert is_comfyui(root) and root.is_relative_to(bare_machine / "cache")
    assert comfyui_version(root) == TESTED_VERSION
    assert find_comfyui() == root, "the unpacked host is found again without unpacking"
    assert comfyui_path.ensure_comfyui() == root


def test_a_users_checkout_comes_first(bare_machine, monkeypatch):
    checkout = bare_machine / "mine" / "ComfyUI"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "comfy" / "model_management.py").write_text("")
    (checkout / "nodes.py").write_text("")
    (checkout / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    monkeypatch.setenv("COMFYUI_PATH", str(checkout))
    assert comfyui_path.ensure_comfyui() == checkout.resolve()
    assert comfyui_version(checkout) == "9.9.9"
    assert not (bare_machine / "cache").exists(), "nothing unpacked when a checkout is there"


def test_a_half_unpacked_tree_is_not_taken_for_a_checkout(bare_machine):
    half = comfyui_path.host_cache_dir() / "ComfyUI" / "comfy"
    half.mkdir(parents=True)
    assert find_comfyui() is None
