"""Token-grid geometry: which (h, w) grid a flat token sequence lives on, and at which UNet depth.

A UNet's stride-2 convolutions give a side of ``ceil(side / 2)`` per level, so a
1080-pixel-high image (latent 135) has 68, 34 and 17 rows at depths 2, 3 and 4.
Guessing the grid as ``H // 2**d`` (as several ports do) fails on such sides, and
guessing from the latent alone fails whenever something rescales the activations
inside the UNet (Deep Shrink). The grid is therefore taken from the shape of the
activations that ComfyUI reports for the current transformer, and only then
derived from the latent shape with ceil arithmetic, always checked against the
real token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .memo import memoised

MAX_DEPTH = 8
"""Deepest UNet level probed by the ceil fallback (SD-family UNets stop at 4)."""


@dataclass(frozen=True, slots=True)
class TokenGrid:
    """The spatial layout of a token sequence: ``height * width`` tokens, row-major.

    ``depth`` counts UNet resolution levels: 1 is the latent resolution, 2 is half
    of it, 3 a quarter. It is measured from the grid size relative to the latent,
    so it means "how coarse are these tokens", whatever block produced them.
    """

    height: int
    width: int
    depth: int

    @property
    def tokens(self) -> int:
        return self.height * self.width


def ceil_side(side: int, depth: int) -> int:
    """Side length at ``depth`` for a latent side, as stride-2 convolutions produce it."""
    for _ in range(depth - 1):
        side = -(-side // 2)
    return side


@memoised(maxsize=1024)
def depth_from_sides(latent_hw: tuple[int, int], grid_hw: tuple[int, int]) -> int:
    """Resolution level of a grid relative to the latent (1 = same size).

    A grid that is exactly a UNet level of the latent (ceil arithmetic) gets
    that level. A grid rescaled inside the UNet (Deep Shrink, by any factor)
    gets the nearest level in log2 space, from the larger ratio of its axes.
    Memoised: the same few grids recur in every attention call.
    """
    for depth in range(1, MAX_DEPTH + 1):
        if (ceil_side(latent_hw[0], depth), ceil_side(latent_hw[1], depth)) == grid_hw:
            return depth
    ratio = max(latent_hw[0] / grid_hw[0], latent_hw[1] / grid_hw[1])
    return max(1, 1 + round(math.log2(ratio)))


def _spatial_hw(shape: Sequence[int] | None) -> tuple[int, int] | None:
    """The last two entries of a ``[b, c, (t,) h, w]`` shape, when they are usable."""
    if shape is None or len(shape) < 4:
        return None
    height, width = int(shape[-2]), int(shape[-1])
    if height <= 0 or width <= 0:
        return None
    return height, width


def resolve_grid(
    n_tokens: int,
    activations_shape: Sequence[int] | None,
    original_shape: Sequence[int] | None,
) -> TokenGrid | None:
    """Find the grid of ``n_tokens`` tokens, or ``None`` when no grid fits.

    ``activations_shape`` is the ``[b, c, h, w]`` input of the current
    SpatialTransformer and ``original_shape`` the latent ``[b, c, H, W]``; both
    come from ComfyUI's ``extra_options``. When the activations are known they
    are the only truth; the ceil-arithmetic fallback is used only without them.
    ``None`` means the tokens are not a
    spatial grid we can place (temporal attention, tokens already tiled or
    merged by another patch, an unknown model layout): the caller passes them
    through unchanged.
    """
    latent_hw = _spatial_hw(original_shape)
    if latent_hw is None:
        return None

    activations_hw = _spatial_hw(activations_shape)
    if activations_hw is not None:
        # The host told us the grid: tokens that do not fill it (temporal
        # attention over frames, tiles, merged tokens) are not ours to reshape.
        if activations_hw[0] * activations_hw[1] != n_tokens:
            return None
        return TokenGrid(*activations_hw, depth_from_sides(latent_hw, activations_hw))

    # Hosts older than ComfyUI 0.3.28 do not report activations: derive the grid.

    for depth in range(1, MAX_DEPTH + 1):
        height, width = ceil_side(latent_hw[0], depth), ceil_side(latent_hw[1], depth)
        if height * width == n_tokens:
            return TokenGrid(height, width, depth)
        if height * width < n_tokens:
            break
    return None
