"""Grid geometry: the grid comes from the activations, then from ceil arithmetic, or not at all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import unet_grid

from todo_core import TokenGrid, ceil_side, resolve_grid
from todo_core.grid import depth_from_sides


def latent(height: int, width: int) -> list[int]:
    return [2, 4, height, width]


@pytest.mark.parametrize(("pixels_w", "pixels_h"), [(1920, 1080), (1000, 584), (832, 1216), (1024, 1024), (2048, 1536)])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_ceil_fallback_finds_every_unet_level(pixels_w, pixels_h, depth):
    lat_h, lat_w = pixels_h // 8, pixels_w // 8
    height, width = unet_grid((lat_h, lat_w), depth)
    assert resolve_grid(height * width, None, latent(lat_h, lat_w)) == TokenGrid(height, width, depth)


def test_1080p_levels_are_ceil_not_floor():
    assert [ceil_side(135, d) for d in (1, 2, 3, 4)] == [135, 68, 34, 17]
    lat = latent(135, 240)
    # Without activations the grid comes from the latent: the real depth-2 tokens (68 rows) are placed...
    assert resolve_grid(68 * 120, None, lat) == TokenGrid(68, 120, 2)
    assert resolve_grid(17 * 30, None, lat) == TokenGrid(17, 30, 4)
    # ...and a floor-based level (135 // 2 = 67 rows) is no level of this latent at all.
    assert resolve_grid(67 * 120, None, lat) is None
    assert resolve_grid(33 * 60, None, lat) is None
    # With activations, a 68-row grid is depth 2 exactly (not a Deep-Shrink-like rescale).
    assert depth_from_sides((135, 240), (68, 120)) == 2
    assert depth_from_sides((135, 240), (34, 60)) == 3


def test_activations_shape_wins_over_latent_guess():
    # Deep Shrink halves the activations inside the UNet: the latent no longer predicts the grid.
    grid = resolve_grid(64 * 64, [2, 320, 64, 64], latent(128, 128))
    assert grid == TokenGrid(64, 64, 2)
    # A 1.5x shrink lands on the nearest level.
    assert resolve_grid(80 * 80, [2, 320, 80, 80], latent(120, 120)).depth == 2


def test_tokens_that_do_not_fill_the_reported_grid_are_not_placed():
    # Temporal attention over 14 frames, tiled queries, merged tokens.
    assert resolve_grid(14, [28, 320, 72, 128], latent(72, 128)) is None
    assert resolve_grid(72 * 128 // 4, [2, 320, 72, 128], latent(72, 128)) is None
    # Even when the count would match a deeper level of the latent.
    assert resolve_grid(36 * 64, [2, 320, 72, 128], latent(72, 128)) is None


def test_no_latent_or_no_fit_means_no_grid():
    assert resolve_grid(4096, [2, 320, 64, 64], None) is None
    assert resolve_grid(4096, None, [2, 4]) is None
    assert resolve_grid(77, None, latent(64, 64)) is None


def test_video_latent_uses_spatial_sides():
    assert resolve_grid(60 * 104, None, [1, 16, 21, 60, 104]) == TokenGrid(60, 104, 1)


def test_small_odd_latents_get_their_exact_level():
    assert resolve_grid(3 * 3, [1, 8, 3, 3], latent(33, 33)).depth == 5


@given(st.integers(1, 512), st.integers(1, 512), st.integers(1, 5))
def test_ceil_levels_always_resolve_to_their_depth(lat_h, lat_w, depth):
    height, width = unet_grid((lat_h, lat_w), depth)
    assert (ceil_side(lat_h, depth), ceil_side(lat_w, depth)) == (height, width)
    for activations in ([1, 8, height, width], None):
        grid = resolve_grid(height * width, activations, latent(lat_h, lat_w))
        assert (grid.height, grid.width) == (height, width)
        # Once both sides have shrunk to one token, deeper levels look the same; real UNets stop well before.
        if (height, width) != (1, 1):
            assert grid.depth == depth
        assert grid.tokens == height * width
