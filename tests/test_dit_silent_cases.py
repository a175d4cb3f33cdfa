"""Settings that used to do nothing on a DiT without a word: each now acts as documented or warns once."""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_support import apply_node, import_comfyui
from dit_support import TEXT_TOKENS, sample_dit, tiny_dit, with_probe

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def flux_and_wan():
    import_comfyui()
    return {"flux": tiny_dit("flux"), "wan": tiny_dit("wan")}


def todo_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfyui_todo" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_a_factor_that_leaves_one_image_key_per_frame_still_acts(node, flux_and_wan, kind):
    """As on UNets: factor 8 on a 4 x 4 token grid keeps one key (per frame), mass-corrected."""
    model, probe = with_probe(flux_and_wan[kind])
    frames = 2 if kind == "wan" else 1
    out = sample_dit(apply_node(node, model, mode="manual", depth_1_factor=8.0), 8, 8, frames=frames)
    assert torch.isfinite(out).all()
    pairs = {(c.q_tokens, c.kv_tokens) for c in probe.self_attention()}
    if kind == "wan":
        assert pairs == {(frames * 16, frames * 1)}
    else:
        assert pairs == {(TEXT_TOKENS + 16, TEXT_TOKENS + 1)}


@pytest.mark.parametrize(
    ("kind", "dit_blocks", "named", "acts_nowhere"),
    [
        ("wan", "single", "'single'", True),  # Wan numbers its blocks as double
        ("flux", "double:5-999", "'double:5-999'", True),  # the tiny Flux has 2 double blocks
        ("flux", "double, single:7", "'single:7'", False),
        ("flux", "9", "'9'", True),
    ],
)
def test_dit_blocks_naming_no_block_of_the_model_warn_once(node, flux_and_wan, caplog, kind, dit_blocks, named,
                                                           acts_nowhere):  # fmt: skip
    model, probe = with_probe(flux_and_wan[kind])
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        patched = apply_node(node, model, mode="manual", depth_1_factor=2.0, dit_blocks=dit_blocks)
        sample_dit(patched, 8, 8, steps=2)
    warnings = todo_warnings(caplog)
    assert len(warnings) == 1 and named in warnings[0], warnings
    assert ("ToDo acts in no block" in warnings[0]) == acts_nowhere
    reduced = [c for c in probe.self_attention() if c.kv_tokens < c.q_tokens]
    assert bool(reduced) != acts_nowhere


@pytest.mark.parametrize(("kind", "dit_blocks"), [("flux", "single:0-19"), ("flux", "double, 1"), ("wan", "0-99")])
def test_dit_blocks_that_select_blocks_give_no_warning(node, flux_and_wan, caplog, kind, dit_blocks):
    with caplog.at_level(logging.WARNING, logger="comfyui_todo"):
        apply_node(node, flux_and_wan[kind], mode="manual", depth_1_factor=2.0, dit_blocks=dit_blocks)
    assert todo_warnings(caplog) == []
