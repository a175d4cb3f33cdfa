"""Naive, obviously-correct downsampling used as the oracle for todo_core.

Written for clarity, not speed: explicit reshape to the grid, explicit loops
over output cells or a plain ``F.interpolate`` call, then flatten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def out_side(side: int, factor: float) -> int:
    if factor <= 1:
        return side
    if abs(factor - round(factor)) < 1e-6:
        return math.ceil(side / round(factor))
    return max(1, math.ceil(side / factor - 1e-6))


def reference_downsample(tokens: torch.Tensor, height: int, width: int, factor: float, method: str) -> torch.Tensor:
    batch, _, channels = tokens.shape
    grid = tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()  # B C H W
    oh, ow = out_side(height, factor), out_side(width, factor)
    integer = abs(factor - round(factor)) < 1e-6
    if factor <= 1:
        out = grid
    elif method == "nearest":
        rows = [min(height - 1, math.floor(i * factor + 1e-6)) for i in range(oh)]
        cols = [min(width - 1, math.floor(j * factor + 1e-6)) for j in range(ow)]
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
    elif method in ("bilinear", "bicubic"):
        out = F.interpolate(grid, size=(oh, ow), mode=method, align_corners=False)
    else:
        out = F.interpolate(grid, size=(oh, ow), mode=method)
    return out.permute(0, 2, 3, 1).reshape(batch, oh * ow, channels)
