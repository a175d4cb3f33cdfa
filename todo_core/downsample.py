"""Spatial downsampling of a flat ``[B, N, C]`` token sequence on its ``h x w`` grid.

The output grid is ``ceil(h / f) x ceil(w / f)`` for every method, so a side
that the factor does not divide keeps its last row or column instead of
silently dropping it. Integer factors take fast paths that work on the
token-major layout directly (a strided view for nearest, pooling on a
channels-last view for avg/max), so the only copy made is the small output.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F

from .choices import parse_choice
from .memo import memoised

_INTEGER_TOLERANCE = 1e-6


class DownsampleMethod(str, Enum):
    """How K/V tokens are reduced. Values are the names users see in the node."""

    NEAREST = "nearest"
    AVG_POOL = "avg_pool"
    MAX_POOL = "max_pool"
    AREA = "area"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST_EXACT = "nearest-exact"

    @classmethod
    def parse(cls, name: str | DownsampleMethod) -> DownsampleMethod:
        return parse_choice(cls, "method", name)


def output_side(side: int, factor: float) -> int:
    """Side after downsampling by ``factor``: ceil, so no partial row is dropped."""
    if factor <= 1.0:
        return side
    integer = _as_integer(factor)
    if integer is not None:
        return -(-side // integer)
    return max(1, math.ceil(side / factor - _INTEGER_TOLERANCE))


def output_tokens(height: int, width: int, factor_h: float, factor_w: float) -> int:
    """Number of tokens left on an ``height x width`` grid after downsampling."""
    return output_side(height, factor_h) * output_side(width, factor_w)


def _as_integer(factor: float) -> int | None:
    rounded = round(factor)
    if rounded >= 1 and abs(factor - rounded) < _INTEGER_TOLERANCE:
        return int(rounded)
    return None


@memoised(maxsize=256)
def nearest_rows(side: int, factor: float) -> tuple[int, ...]:
    """Source rows of nearest sampling: ``floor(i * factor)`` for each output row ``i``, as plain ints.

    Python floats are IEEE doubles: the same values a float64 tensor gives,
    without a tensor to read back (``.tolist()`` is a graph break under torch.compile).
    """
    count = output_side(side, factor)
    return tuple(min(side - 1, math.floor(i * factor + _INTEGER_TOLERANCE)) for i in range(count))


@memoised(maxsize=256)
def nearest_indices(side: int, factor: float, device: torch.device) -> torch.Tensor:
    """:func:`nearest_rows` as an index tensor on ``device``.

    Memoised (the same few grids recur in every step) so that a GPU render does
    not copy index tensors to the device on every attention call; never mutated.
    """
    return torch.tensor(nearest_rows(side, factor), dtype=torch.long, device=device)


def downsample_tokens(
    tokens: torch.Tensor,
    height: int,
    width: int,
    factor_h: float,
    factor_w: float | None = None,
    method: DownsampleMethod = DownsampleMethod.NEAREST,
) -> torch.Tensor:
    """Downsample ``tokens`` (``[B, height*width, C]``, row-major) by a factor per axis.

    Returns a new ``[B, h', w'...]``-flattened tensor of the same dtype and
    device; factors of 1 on both axes return ``tokens`` itself. The input is
    never modified.
    """
    if factor_w is None:
        factor_w = factor_h
    batch, n_tokens, channels = tokens.shape
    if n_tokens != height * width:
        raise ValueError(f"tokens hold {n_tokens} tokens, not a {height}x{width} grid")
    if factor_h <= 1.0 and factor_w <= 1.0:
        return tokens
    factor_h, factor_w = max(factor_h, 1.0), max(factor_w, 1.0)

    grid = tokens.view(batch, height, width, channels)
    out_h, out_w = output_side(height, factor_h), output_side(width, factor_w)
    int_h, int_w = _as_integer(factor_h), _as_integer(factor_w)
    integer = int_h is not None and int_w is not None

    if method is DownsampleMethod.NEAREST:
        if integer:
            picked = grid[:, ::int_h, ::int_w]
        else:
            rows = nearest_indices(height, factor_h, tokens.device)
            cols = nearest_indices(width, factor_w, tokens.device)
            picked = grid[:, rows[:, None], cols[None, :]]
        return picked.reshape(batch, out_h * out_w, channels)

    # Channels-first *view* of the token-major memory (channels_last layout):
    # pooling and interpolation read it without a transposing copy.
    planar = grid.permute(0, 3, 1, 2)
    if method in (DownsampleMethod.AVG_POOL, DownsampleMethod.MAX_POOL) and integer:
        pool = F.avg_pool2d if method is DownsampleMethod.AVG_POOL else F.max_pool2d
        reduced = pool(planar, kernel_size=(int_h, int_w), stride=(int_h, int_w), ceil_mode=True)
    elif method is DownsampleMethod.AVG_POOL:
        reduced = F.adaptive_avg_pool2d(planar, (out_h, out_w))
    elif method is DownsampleMethod.MAX_POOL:
        reduced = F.adaptive_max_pool2d(planar, (out_h, out_w))
    elif method in (DownsampleMethod.BILINEAR, DownsampleMethod.BICUBIC):
        reduced = F.interpolate(planar, size=(out_h, out_w), mode=method.value, align_corners=False)
    else:  # AREA, NEAREST_EXACT
        reduced = F.interpolate(planar, size=(out_h, out_w), mode=method.value)
    return reduced.permute(0, 2, 3, 1).reshape(batch, out_h * out_w, channels)
