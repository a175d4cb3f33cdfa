"""Attention-level benchmark: exact self-attention against ToDo and its peers, on photo-structured tokens.

Fidelity is the relative L2 error of the attention output against exact
attention, on a seeded sample of query rows (each query's output is exact to
compute on its own, so big grids stay affordable). Speed and memory come from
whole-layer runs: key/value projections plus attention, with
``torch.nn.functional.scaled_dot_product_attention`` as the backend.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LATENT_SCALE
from ..downsample import DownsampleMethod, downsample_tokens, output_side
from ..grid import ceil_side
from .memory import measure_peak
from .tokens import PHOTOS, AttentionLayer, attention_layer, merge_heads, photo_tokens


@dataclass(frozen=True)
class LayerShape:
    """One self-attention depth of a UNet: the grid level and its heads."""

    model: str
    depth: int
    heads: int
    head_dim: int

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


LAYER_SHAPES: dict[str, tuple[LayerShape, ...]] = {
    "sd15": (LayerShape("sd15", 1, 8, 40), LayerShape("sd15", 2, 8, 80), LayerShape("sd15", 3, 8, 160)),
    "sdxl": (LayerShape("sdxl", 2, 10, 64), LayerShape("sdxl", 3, 20, 64)),
}


@dataclass(frozen=True)
class Variant:
    """One way of computing (approximate) self-attention, with its share of the exact score work."""

    family: str
    setting: str
    work: float

    @property
    def label(self) -> str:
        return f"{self.family} {self.setting}"


def grid_for(resolution: int, depth: int) -> tuple[int, int]:
    side = ceil_side(-(-resolution // LATENT_SCALE), depth)
    return side, side


# --- the variants ------------------------------------------------------------------------------------------------


def todo_variant(method: DownsampleMethod, factor: float, grid: tuple[int, int]) -> Variant:
    kept = output_side(grid[0], factor) * output_side(grid[1], factor) / (grid[0] * grid[1])
    return Variant("todo", f"{method.value} x{factor:g}", kept)


def todo_outputs(layer, hidden, grid, queries, method, factor) -> torch.Tensor:
    """ToDo as the patch does it: downsample the hidden states on the grid, then project K/V."""
    small = downsample_tokens(hidden, grid[0], grid[1], factor, factor, method)
    k, v = layer.keys_values(small)
    return F.scaled_dot_product_attention(queries, k, v)


def tile_bounds(side: int, tiles: int) -> list[tuple[int, int]]:
    edges = [round(i * side / tiles) for i in range(tiles + 1)]
    return list(itertools.pairwise(edges))


def hypertile_outputs(layer, hidden, grid, query_index, tiles: int) -> torch.Tensor:
    """HyperTile's idea: each query attends only to the keys of its own spatial tile (tiles x tiles per image)."""
    height, width = grid
    rows, cols = query_index // width, query_index % width
    out = torch.empty(1, layer.heads, query_index.numel(), layer.head_dim, dtype=hidden.dtype, device=hidden.device)
    grid_hidden = hidden.view(1, height, width, -1)
    for r0, r1 in tile_bounds(height, tiles):
        for c0, c1 in tile_bounds(width, tiles):
            inside = ((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)).nonzero().flatten()
            if inside.numel() == 0:
                continue
            tile = grid_hidden[:, r0:r1, c0:c1].reshape(1, -1, hidden.shape[-1])
            k, v = layer.keys_values(tile)
            q = layer.queries(hidden[:, query_index[inside]])
            out[:, :, inside] = F.scaled_dot_product_attention(q, k, v)
    return out


def tome_merge(hidden: torch.Tensor, grid: tuple[int, int], ratio: float, generator: torch.Generator):
    """Token merging in the style of ToMe for SD: one random destination per 2x2 block, the most similar
    source tokens averaged into their destinations. Returns merged tokens and each token's representative."""
    height, width = grid
    n_tokens = height * width
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    block_id = (rows // 2) * ((width + 1) // 2) + cols // 2
    offset = torch.randint(0, 4, ((height + 1) // 2 * ((width + 1) // 2),), generator=generator)
    is_dst = ((rows % 2) * 2 + (cols % 2)) == offset[block_id]
    # Blocks cut by an odd border may miss their chosen cell: their tokens stay sources of the nearest block.
    dst = is_dst.nonzero().flatten()
    src = (~is_dst).nonzero().flatten()
    merged_count = min(int(ratio * n_tokens), src.numel())
    x = F.normalize(hidden[0].float(), dim=-1)
    similarity = x[src] @ x[dst].T
    best_score, best_dst = similarity.max(dim=-1)
    order = best_score.argsort(descending=True)
    merged_src, kept_src = order[:merged_count], order[merged_count:]
    # Representatives: kept sources first, then destinations.
    representative = torch.empty(n_tokens, dtype=torch.long)
    representative[src[kept_src]] = torch.arange(kept_src.numel())
    representative[dst] = kept_src.numel() + torch.arange(dst.numel())
    representative[src[merged_src]] = kept_src.numel() + best_dst[merged_src]
    sums = torch.zeros(kept_src.numel() + dst.numel(), hidden.shape[-1], dtype=hidden.dtype)
    counts = torch.zeros(sums.shape[0], 1, dtype=hidden.dtype)
    sums.index_add_(0, representative, hidden[0])
    counts.index_add_(0, representative, torch.ones(n_tokens, 1, dtype=hidden.dtype))
    return (sums / counts).unsqueeze(0), representative


def tome_outputs(layer, hidden, grid, query_index, ratio: float) -> torch.Tensor:
    """ToMe: queries, keys and values all merged; each token gets its representative's output."""
    generator = torch.Generator().manual_seed(0)
    merged, representative = tome_merge(hidden.cpu(), grid, ratio, generator)
    merged = merged.to(hidden.device)
    k, v = layer.keys_values(merged)
    q = layer.queries(merged[:, representative[query_index.cpu()].to(hidden.device)])
    return F.scaled_dot_product_attention(q, k, v)


def tome_work(ratio: float) -> float:
    return (1.0 - ratio) ** 2


# --- measurement -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    models: tuple[str, ...] = ("sd15", "sdxl")
    resolutions: tuple[int, ...] = (1024, 1536, 2048)
    timed_resolutions: tuple[int, ...] = (1024,)
    factors: tuple[float, ...] = (2.0, 3.0, 4.0)
    methods: tuple[DownsampleMethod, ...] = tuple(DownsampleMethod)
    timed_methods: tuple[DownsampleMethod, ...] = (DownsampleMethod.NEAREST, DownsampleMethod.AVG_POOL)
    hypertile_tiles: tuple[int, ...] = (2, 3, 4)
    tome_ratios: tuple[float, ...] = (0.5, 0.75)
    photos: tuple[str, ...] = PHOTOS
    query_sample: int = 2048
    repeats: int = 3
    depth_1_only_timing: bool = True


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = merge_heads(approx).float(), merge_heads(exact).float()
    return float((a - e).norm() / e.norm())


def time_call(call: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, int | None]:
    """Median seconds over ``repeats`` runs after one warm-up, and the peak extra memory of one run."""
    call()
    _, peak = measure_peak(call, device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak


def fidelity_rows(config: AttentionConfig, device: torch.device, dtype: torch.dtype) -> Iterator[dict]:
    """Relative error of every variant against exact attention, averaged over the photos; one row per variant."""
    for model in config.models:
        for shape in LAYER_SHAPES[model]:
            for resolution in config.resolutions:
                grid = grid_for(resolution, shape.depth)
                yield from _fidelity_for_layer(config, shape, resolution, grid, device, dtype)


def _variants(config: AttentionConfig, grid: tuple[int, int]):
    for method in config.methods:
        for factor in config.factors:
            yield (
                todo_variant(method, factor, grid),
                (lambda layer, hidden, q, idx, m=method, f=factor: todo_outputs(layer, hidden, grid, q, m, f)),
            )
    for tiles in config.hypertile_tiles:
        yield (
            Variant("hypertile", f"{tiles}x{tiles} tiles", 1.0 / tiles**2),
            (lambda layer, hidden, q, idx, t=tiles: hypertile_outputs(layer, hidden, grid, idx, t)),
        )
    for ratio in config.tome_ratios:
        yield (
            Variant("tome", f"ratio {ratio:g}", tome_work(ratio)),
            (lambda layer, hidden, q, idx, r=ratio: tome_outputs(layer, hidden, grid, idx, r)),
        )


def _fidelity_for_layer(config, shape, resolution, grid, device, dtype) -> Iterator[dict]:
    errors: dict[Variant, list[float]] = {}
    for photo in config.photos:
        hidden = photo_tokens(photo, grid[0], grid[1], shape.channels).to(device, dtype)
        layer = attention_layer(hidden, shape.heads, shape.head_dim)
        generator = torch.Generator().manual_seed(2)
        n_tokens = grid[0] * grid[1]
        query_index = torch.randperm(n_tokens, generator=generator)[: config.query_sample].sort().values.to(device)
        q = layer.queries(hidden[:, query_index])
        exact = F.scaled_dot_product_attention(q, *layer.keys_values(hidden))
        for variant, compute in _variants(config, grid):
            errors.setdefault(variant, []).append(relative_error(compute(layer, hidden, q, query_index), exact))
    for variant, values in errors.items():
        yield {
            "level": "attention", "kind": "fidelity", "model": shape.model, "depth": shape.depth,
            "resolution": resolution, "grid": list(grid), "family": variant.family, "setting": variant.setting,
            "work": variant.work, "rel_error": statistics.fmean(values), "photos": len(values),
        }  # fmt: skip


def timing_rows(config: AttentionConfig, device: torch.device, dtype: torch.dtype) -> Iterator[dict]:
    """Whole-layer time and peak memory: exact, ToDo, and attention on pre-reduced K/V of the same size."""
    for model in config.models:
        shapes = LAYER_SHAPES[model][:1] if config.depth_1_only_timing else LAYER_SHAPES[model]
        for shape in shapes:
            for resolution in config.timed_resolutions:
                grid = grid_for(resolution, shape.depth)
                yield from _timing_for_layer(config, shape, resolution, grid, device, dtype)


def _timing_for_layer(config, shape, resolution, grid, device, dtype) -> Iterator[dict]:
    hidden = photo_tokens(config.photos[0], grid[0], grid[1], shape.channels).to(device, dtype)
    layer: AttentionLayer = attention_layer(hidden, shape.heads, shape.head_dim)
    q = layer.queries(hidden)
    n_tokens = grid[0] * grid[1]
    bytes_per = torch.finfo(dtype).bits // 8

    def exact():
        return F.scaled_dot_product_attention(q, *layer.keys_values(hidden))

    base_seconds, base_peak = time_call(exact, device, config.repeats)
    common = {"level": "attention", "kind": "timing", "model": shape.model, "depth": shape.depth,
              "resolution": resolution, "grid": list(grid), "device": device.type, "dtype": str(dtype)}  # fmt: skip
    yield {**common, "family": "exact", "setting": "", "work": 1.0, "seconds": base_seconds, "peak_bytes": base_peak,
           "dense_score_bytes": shape.heads * n_tokens * n_tokens * bytes_per, "speedup": 1.0}  # fmt: skip
    for method in config.timed_methods:
        for factor in config.factors:
            variant = todo_variant(method, factor, grid)
            small = downsample_tokens(hidden, grid[0], grid[1], factor, factor, method)

            def with_todo(m=method, f=factor):
                return todo_outputs(layer, hidden, grid, q, m, f)

            def pre_reduced(s=small):
                return F.scaled_dot_product_attention(q, *layer.keys_values(s))

            seconds, peak = time_call(with_todo, device, config.repeats)
            reduced_seconds, _ = time_call(pre_reduced, device, config.repeats)
            kept = small.shape[1]
            yield {**common, "family": "todo", "setting": variant.setting, "work": variant.work, "seconds": seconds,
                   "peak_bytes": peak, "dense_score_bytes": shape.heads * n_tokens * kept * bytes_per,
                   "speedup": base_seconds / seconds, "pre_reduced_seconds": reduced_seconds,
                   "overhead": seconds / reduced_seconds - 1.0,
                   "memory_ratio": (base_peak / peak) if base_peak and peak else None}  # fmt: skip
    all_queries = torch.arange(n_tokens, device=device)
    peers = [
        *((Variant("hypertile", f"{t}x{t} tiles", 1.0 / t**2),
           lambda t=t: hypertile_outputs(layer, hidden, grid, all_queries, t)) for t in config.hypertile_tiles),
        *((Variant("tome", f"ratio {r:g}", tome_work(r)),
           lambda r=r: tome_outputs(layer, hidden, grid, all_queries, r)) for r in config.tome_ratios),
    ]  # fmt: skip
    for variant, call in peers:
        seconds, peak = time_call(call, device, config.repeats)
        yield {**common, "family": variant.family, "setting": variant.setting, "work": variant.work,
               "seconds": seconds, "peak_bytes": peak, "speedup": base_seconds / seconds}  # fmt: skip


def count_fidelity_steps(config: AttentionConfig) -> int:
    return sum(len(LAYER_SHAPES[m]) for m in config.models) * len(config.resolutions)


def count_timing_steps(config: AttentionConfig) -> int:
    layers = sum(1 if config.depth_1_only_timing else len(LAYER_SHAPES[m]) for m in config.models)
    return layers * len(config.timed_resolutions)
