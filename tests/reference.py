"""Naive, obviously-correct oracles for todo_core, written without todo_core and without ``F.interpolate``.

Written for clarity, not speed. Downsampling: explicit loops over output rows,
columns or cells, each output index mapped to its source indices and weights
the way the paper (nearest sampling: ``floor(i * factor)``) or PyTorch's
documented kernels (half-pixel centres, clamped taps) define them. Token
counts: per-side ceil arithmetic for the UNet levels, kept rows counted one by
one, and the auto mode's factor found by searching the factors at which a side
loses a row.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

TOLERANCE = 1e-6
"""A sampling position this close below a whole number counts as that number (``3 * (10 / 3)`` is 10)."""

CUBIC_A = -0.75
"""The Keys cubic-convolution coefficient PyTorch's bicubic interpolation uses."""

CONFIGURABLE_DEPTHS = (1, 2, 3)
"""UNet depths whose keys ToDo may reduce; the middle block and deeper levels are never reduced."""
LATENT_SCALE = 8
MAX_DEPTH = 8


# --- token counts ---------------------------------------------------------------------------------------------------


def nearest_rows(side: int, factor: float) -> list[int]:
    """Rows nearest sampling keeps: ``floor(i * factor)`` for ``i = 0, 1, ...`` while ``i * factor`` is inside."""
    if factor <= 1:
        return list(range(side))
    rows: list[int] = []
    i = 0
    while i * factor < side - TOLERANCE:
        row = min(side - 1, math.floor(i * factor + TOLERANCE))
        if not rows or rows[-1] != row:
            rows.append(row)
        i += 1
    return rows


def out_side(side: int, factor: float) -> int:
    """Rows left of ``side`` rows downsampled by ``factor`` (every method keeps as many as nearest sampling)."""
    return len(nearest_rows(side, factor))


def kept_tokens(height: int, width: int, factor: float) -> int:
    return out_side(height, factor) * out_side(width, factor)


def unet_side(latent_side: int, depth: int) -> int:
    """A latent side at UNet ``depth``: every stride-2 convolution gives ``ceil(side / 2)``."""
    side = latent_side
    for _ in range(depth - 1):
        side = math.ceil(side / 2)
    return side


def unet_grid(latent_hw: tuple[int, int], depth: int) -> tuple[int, int]:
    return unet_side(latent_hw[0], depth), unet_side(latent_hw[1], depth)


def latent_hw_for(width_px: int, height_px: int) -> tuple[int, int]:
    return math.ceil(height_px / LATENT_SCALE), math.ceil(width_px / LATENT_SCALE)


def grid_depth(latent_hw: tuple[int, int], grid: tuple[int, int]) -> int:
    """The UNet level a grid is (ceil arithmetic), else the level nearest to its size in log2 (Deep Shrink)."""
    for depth in range(1, MAX_DEPTH + 1):
        if unet_grid(latent_hw, depth) == tuple(grid):
            return depth
    ratio = max(latent_hw[0] / grid[0], latent_hw[1] / grid[1])
    return min(range(1, MAX_DEPTH + 1), key=lambda depth: abs(math.log2(ratio) - (depth - 1)))


def auto_budget(native_resolution: int, depth: int) -> int:
    """Auto mode's K/V budget at ``depth``: the tokens a square image at the native resolution has there."""
    return unet_side(native_resolution // LATENT_SCALE, depth) ** 2


@functools.cache
def smallest_factor_within(height: int, width: int, budget: int) -> float:
    """Smallest factor >= 1 whose nearest sampling keeps at most ``budget`` tokens of the grid.

    A side of ``n`` rows keeps ``a`` rows from factor ``n / a`` up to the next such factor, so the kept count
    only changes at the factors ``height / a`` and ``width / b``: the answer is one of them (or 1). Kept counts
    fall as the factor grows, so the candidates are searched by bisection, each counted row by row.
    """
    if height * width <= budget:
        return 1.0
    candidates = sorted({height / a for a in range(1, height + 1)} | {width / b for b in range(1, width + 1)})
    candidates = [c for c in candidates if c >= 1.0]
    low, high = 0, len(candidates) - 1  # the largest keeps one row and one column: within any budget >= 1
    while low < high:
        middle = (low + high) // 2
        if kept_tokens(height, width, candidates[middle]) <= budget:
            high = middle
        else:
            low = middle + 1
    return candidates[low]


def expected_kv(
    latent_hw: tuple[int, int],
    grid: tuple[int, int],
    factors: tuple[float, float, float] | None = None,
    native_resolution: int = 512,
) -> int:
    """K/V tokens self-attention on ``grid`` should get: ``factors`` per depth (manual) or the auto budget."""
    height, width = grid
    depth = grid_depth(latent_hw, grid)
    if depth not in CONFIGURABLE_DEPTHS:
        return height * width
    if factors is not None:
        factor = factors[depth - 1]
    else:
        factor = smallest_factor_within(height, width, auto_budget(native_resolution, depth))
    return kept_tokens(height, width, factor)


def expected_unet_kv(
    latent_hw: tuple[int, int],
    attention_depths,
    factors: tuple[float, float, float] | None = None,
    native_resolution: int = 512,
) -> dict[tuple[int, int], set[int]]:
    """Self-attention K/V counts per grid of a UNet with attention at ``attention_depths``, as a Probe reports them."""
    out: dict[tuple[int, int], set[int]] = {}
    for depth in attention_depths:
        grid = unet_grid(latent_hw, depth)
        out.setdefault(grid, set()).add(expected_kv(latent_hw, grid, factors, native_resolution))
    return out


# --- downsampling ---------------------------------------------------------------------------------------------------


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as PyTorch's CPU kernels hold their scales and positions."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _kernel_scale(in_size: int, out_size: int) -> float:
    """Source pixels per output pixel, computed as PyTorch does it for an explicit output size (float32)."""
    return _float32(in_size / out_size)


def _linear_weights(in_size: int, out_size: int) -> list[dict[int, float]]:
    """Bilinear, ``align_corners=False``: half-pixel centres, negative positions clamped to 0, edge row repeated."""
    scale = _kernel_scale(in_size, out_size)
    rows = []
    for i in range(out_size):
        source = max(0.0, _float32(scale * (i + 0.5) - 0.5))
        low = min(math.floor(source), in_size - 1)
        high = min(low + 1, in_size - 1)
        fraction = min(max(_float32(source - low), 0.0), 1.0)
        weights: dict[int, float] = {}
        for index, weight in ((low, 1.0 - fraction), (high, fraction)):
            weights[index] = weights.get(index, 0.0) + weight
        rows.append(weights)
    return rows


def _cubic(distance: float) -> float:
    """Keys' cubic convolution kernel with ``a = CUBIC_A``."""
    x, a = abs(distance), CUBIC_A
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _cubic_weights(in_size: int, out_size: int) -> list[dict[int, float]]:
    """Bicubic, ``align_corners=False``: four taps around the half-pixel source position, clamped to the edge."""
    scale = _kernel_scale(in_size, out_size)
    rows = []
    for i in range(out_size):
        source = _float32(scale * (i + 0.5) - 0.5)  # not clamped: the taps are
        base = math.floor(source)
        fraction = _float32(source - base)
        weights: dict[int, float] = {}
        for tap in (-1, 0, 1, 2):
            index = min(max(base + tap, 0), in_size - 1)
            weights[index] = weights.get(index, 0.0) + _cubic(tap - fraction)
        rows.append(weights)
    return rows


def _nearest_exact_weights(in_size: int, out_size: int) -> list[dict[int, float]]:
    """``nearest-exact``: the source pixel whose centre is nearest, ``floor((i + 0.5) * scale)``, clamped."""
    scale = _kernel_scale(in_size, out_size)
    return [{min(math.floor(_float32((i + 0.5) * scale)), in_size - 1): 1.0} for i in range(out_size)]


def _separable(grid: torch.Tensor, rows: list[dict[int, float]], cols: list[dict[int, float]]) -> torch.Tensor:
    """Apply per-axis weights (output index -> {source index: weight}) to a ``B C H W`` grid, in float64."""
    height, width = grid.shape[-2:]
    row_matrix = torch.zeros(len(rows), height, dtype=torch.float64)
    for i, weights in enumerate(rows):
        for index, weight in weights.items():
            row_matrix[i, index] += weight
    col_matrix = torch.zeros(len(cols), width, dtype=torch.float64)
    for j, weights in enumerate(cols):
        for index, weight in weights.items():
            col_matrix[j, index] += weight
    out = torch.einsum("ih,bchw,jw->bcij", row_matrix, grid.double(), col_matrix)
    return out.to(grid.dtype)


INTERPOLATION_WEIGHTS = {
    "bilinear": _linear_weights,
    "bicubic": _cubic_weights,
    "nearest-exact": _nearest_exact_weights,
}


def reference_downsample(tokens: torch.Tensor, height: int, width: int, factor: float, method: str) -> torch.Tensor:
    batch, _, channels = tokens.shape
    grid = tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()  # B C H W
    oh, ow = out_side(height, factor), out_side(width, factor)
    integer = abs(factor - round(factor)) < TOLERANCE
    if factor <= 1:
        out = grid
    elif method == "nearest":
        rows, cols = nearest_rows(height, factor), nearest_rows(width, factor)
        out = grid[:, :, rows][:, :, :, cols]
    elif method in ("avg_pool", "max_pool") and integer:
        f = round(factor)
        out = torch.empty(batch, channels, oh, ow, dtype=tokens.dtype)
        for i in range(oh):
            for j in range(ow):
                block = grid[:, :, i * f : (i + 1) * f, j * f : (j + 1) * f]  # clipped at the border
                out[:, :, i, j] = block.mean(dim=(2, 3)) if method == "avg_pool" else block.amax(dim=(2, 3))
    elif method in ("avg_pool", "max_pool", "area"):
        out = torch.empty(batch, channels, oh, ow, dtype=tokens.dtype)
        for i in range(oh):
            r0, r1 = (i * height) // oh, -(-((i + 1) * height) // oh)
            for j in range(ow):
                c0, c1 = (j * width) // ow, -(-((j + 1) * width) // ow)
                block = grid[:, :, r0:r1, c0:c1]
                out[:, :, i, j] = block.amax(dim=(2, 3)) if method == "max_pool" else block.mean(dim=(2, 3))
    elif method in INTERPOLATION_WEIGHTS:
        weights = INTERPOLATION_WEIGHTS[method]
        out = _separable(grid, weights(height, oh), weights(width, ow))
    else:
        raise ValueError(f"no reference for method {method!r}")
    return out.permute(0, 2, 3, 1).reshape(batch, oh * ow, channels)
