"""ToDo beside other patches and unusual layouts, in a real ComfyUI: both patches act; what is not ours passes."""

from __future__ import annotations

import pytest
import torch
from comfy_support import Probe, apply_node, forward, run_node, tiny_model
from reference import expected_kv, unet_grid

pytestmark = pytest.mark.comfyui

DOWNSCALE = "comfy_extras.nodes_model_downscale"
HYPERTILE = "comfy_extras.nodes_hypertile"
TOME = "comfy_extras.nodes_tomesd"
MANUAL_221 = {"mode": "manual", "depth_1_factor": 2.0, "depth_2_factor": 2.0, "depth_3_factor": 1.0}


def deep_shrink(model, factor: float):
    return run_node(
        "PatchModelAddDownscale",
        DOWNSCALE,
        model,
        block_number=1,
        downscale_factor=factor,
        start_percent=0.0,
        end_percent=0.35,
        downscale_after_skip=True,
        downscale_method="bicubic",
        upscale_method="bicubic",
    )


@pytest.mark.parametrize("shrink", [2.0, 1.5])
@pytest.mark.parametrize("order", ["deep_shrink_first", "todo_first"])
def test_deep_shrink_grids_come_from_the_activations(node, sd15, shrink, order):
    high_sigma = 14.0  # inside Deep Shrink's 0-35 % window
    if order == "deep_shrink_first":
        patched = apply_node(node, deep_shrink(sd15, shrink), **MANUAL_221)
    else:
        patched = deep_shrink(apply_node(node, sd15, **MANUAL_221), shrink)
    probe = Probe()
    out = forward(patched, (64, 56), batch=2, sigma=high_sigma, probe=probe)
    assert out.shape == (2, 4, 64, 56) and torch.isfinite(out).all()
    grids = probe.kv_by_grid()
    assert (32, 28) not in grids, "Deep Shrink did not act: the test would prove nothing"
    # Level 2 of the UNet now runs on a shrunk grid; depth is counted by grid size, so a grid a quarter of the
    # latent's side is depth 3 (factor 1 here) whichever block holds it.
    expected = {
        2.0: {(64, 56): {32 * 28}, (16, 14): {16 * 14}, (8, 7): {8 * 7}, (4, 4): {4 * 4}},
        1.5: {(64, 56): {32 * 28}, (22, 19): {22 * 19}, (11, 10): {11 * 10}, (6, 5): {6 * 5}},
    }[shrink]
    assert grids == expected


HYPERTILED = {(64, 64): {(64, 64), (32, 32)}, (37, 45): {(37, 45)}, (48, 80): {(48, 80), (24, 40)}}
"""Grids HyperTile (max_depth 1) tiles: depth 1, and depth 2 where it is exactly half the latent per side."""


@pytest.mark.parametrize("latent_hw", [(64, 64), (37, 45), (48, 80)])
@pytest.mark.parametrize("order", ["hypertile_first", "todo_first"])
def test_hypertile_before_or_after(node, sd15, latent_hw, order):
    def hypertile(model):
        return run_node("HyperTile", HYPERTILE, model, tile_size=32, swap_size=2, max_depth=1, scale_depth=False)

    if order == "hypertile_first":
        patched = apply_node(node, hypertile(sd15), **MANUAL_221)
    else:
        patched = hypertile(apply_node(node, sd15, **MANUAL_221))
    factors = tuple(MANUAL_221[f"depth_{depth}_factor"] for depth in (1, 2, 3))
    steps_aside = 0
    for seed in range(4):  # HyperTile picks its tiling at random
        torch.manual_seed(seed)
        probe = Probe()
        out = forward(patched, latent_hw, batch=1, probe=probe)
        assert out.shape == (1, 4, *latent_hw) and torch.isfinite(out).all()
        calls = probe.self_attention()
        assert {c.grid for c in calls} == {unet_grid(latent_hw, depth) for depth in (1, 2, 3, 4)}
        for call in calls:
            tiles = call.q_batch // call.kv_batch
            full = call.grid[0] * call.grid[1]
            # HyperTile's effect: its grids' queries come in tiles, every query kept.
            assert (tiles > 1) == (call.grid in HYPERTILED[latent_hw]), call
            assert call.q_tokens * tiles == full, call
            # ToDo's effect: keys reduced, unless the reduced keys would not split evenly among the tiles.
            reduced = expected_kv(latent_hw, call.grid, factors)
            assert call.kv_tokens == (reduced if reduced % tiles == 0 else full), call
            steps_aside += reduced < full and reduced % tiles != 0
    if latent_hw == (64, 64):
        assert steps_aside == 0, "every tiling HyperTile picks at 64 x 64 divides the reduced keys"
    if latent_hw == (37, 45):
        assert steps_aside > 0, "19 x 23 reduced keys never split among 5 or 9 query tiles: ToDo steps aside"


def test_hypertile_and_todo_together_still_reduce_keys(node, sd15):
    tiled = run_node("HyperTile", HYPERTILE, sd15, tile_size=64, swap_size=1, max_depth=0, scale_depth=False)
    probe = Probe()
    forward(apply_node(node, tiled, **MANUAL_221), (64, 64), batch=1, probe=probe)
    depth1 = [c for c in probe.self_attention() if c.grid == (64, 64)]
    assert depth1 and all(c.kv_tokens == 32 * 32 for c in depth1)
    assert all(c.q_tokens == 64 for c in depth1), "HyperTile's query tiles (8x8 tokens) should be intact"


@pytest.mark.parametrize("order", ["tome_first", "todo_first"])
def test_tome_before_or_after(node, sd15, order):
    def tome(model):
        return run_node("TomePatchModel", TOME, model, ratio=0.5)

    patched = (
        apply_node(node, tome(sd15), **MANUAL_221)
        if order == "tome_first"
        else tome(apply_node(node, sd15, **MANUAL_221))
    )
    probe = Probe()
    out = forward(patched, (40, 40), batch=2, probe=probe)
    assert out.shape == (2, 4, 40, 40) and torch.isfinite(out).all()
    alone = forward(tome(sd15), (40, 40), batch=2)
    assert not torch.equal(out, alone), "ToDo should change ToMe's result"
    queries: dict = {}
    for call in probe.self_attention():
        queries.setdefault(call.grid, set()).add(call.q_tokens)
    # ToMe merges the queries of depth 1 only: 1600 tokens less int(1600 * 0.5) merged ones.
    assert queries == {(40, 40): {800}, (20, 20): {400}, (10, 10): {100}, (5, 5): {25}}
    # ToDo reduces the keys of depths 1 and 2 beside it (ToMe leaves the keys whole).
    assert probe.kv_by_grid() == {(40, 40): {20 * 20}, (20, 20): {10 * 10}, (10, 10): {100}, (5, 5): {25}}


def test_disable_self_attn_blocks_are_left_alone(node):
    model = tiny_model("sd15", disable_self_attentions=[True, True, True, True])
    probe = Probe()
    patched = apply_node(node, model, **MANUAL_221)
    forward(patched, (32, 32), batch=1, probe=probe)
    # Every attn1 but the middle block's (depth 4, never reduced) attends to the text: nothing to downsample.
    assert probe.kv_by_grid() == {(4, 4): {16}}
    assert len(probe.calls) > 2 * len(probe.self_attention())


def test_temporal_blocks_pass_through(node):
    from comfy.ldm.modules.attention import SpatialVideoTransformer

    node_module = __import__("sys").modules[node.__module__]
    torch.manual_seed(0)
    block = SpatialVideoTransformer(32, n_heads=2, d_head=16, depth=1, use_linear=True, context_dim=24)
    frames, height, width = 5, 12, 10
    x = torch.randn(frames, 32, height, width)
    todo = node_module.ToDoAttn1Patch(node_module.ToDoConfig.create("manual", 2.0, 1.0, 1.0))
    probe = Probe()
    options = {
        "patches": {"attn1_patch": [todo]},
        "original_shape": [frames, 4, height, width],
        "block": ("input", 1),
        "optimized_attention_override": probe,
    }
    with torch.no_grad():
        out = block(
            x,
            context=torch.randn(frames, 9, 24),
            timesteps=frames,
            image_only_indicator=torch.zeros(1, frames),
            transformer_options=options,
        )
    assert out.shape == x.shape
    spatial = [c for c in probe.calls if c.q_tokens == height * width and c.kv_tokens != 9]
    temporal = [c for c in probe.calls if c.q_tokens == frames]
    assert spatial and all(c.kv_tokens == 6 * 5 for c in spatial)
    assert temporal and all(c.kv_tokens == frames for c in temporal)
