"""Attention-level benchmark: exact self-attention against ToDo and its peers, on photo-structured tokens.

Every variant runs the same way, as a ComfyUI UNet's attn1 runs: the normalised hidden states go through the
variant's attn1 patch pair (``before`` may change queries, keys and values; ``after`` maps the output back to one
row per token), then the query, key and value projections, then attention (torch SDPA, with ComfyUI's batch
convention: keys and values are viewed with the queries' batch size). Exact attention is the identity patch, ToDo
downsamples the keys' and values' hidden states, and the peers are ComfyUI's own ``TomePatchModel`` and
``HyperTile`` patches (see :mod:`.peers`). Timing covers the whole path, projections included, for every variant
(the output projection is left out for every variant); the attention work kept is counted from the tensors that
actually reach attention.

Fidelity is the relative L2 error of the attention output against exact attention on a seeded sample of token
rows. Attention is row-independent, so each sampled row is computed on its own from the query row that produces it
(found by passing row numbers through the variant's ``after`` patch): the same numbers the full run gives, at a
fraction of the cost on big grids.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LATENT_SCALE
from ..downsample import DownsampleMethod, downsample_tokens
from ..grid import ceil_side
from .memory import measure_peak
from .peers import IDENTITY, Patch, TorchPeers, hypertile_qkv, load_peers, tome_qkv
from .tokens import PHOTOS, AttentionLayer, attention_layer, photo_tokens

SEED = 0
"""Torch's global generator is seeded with this before every patched run (ToMe and HyperTile draw from it)."""


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

FAMILIES = {
    "exact": "exact attention",
    "todo": "ToDo: keys and values downsampled on the grid, every query kept",
    "tome": "ComfyUI's TomePatchModel as it runs: queries merged, every key and value kept, output unmerged",
    "tome-qkv": "ToMe for SD's placement (ComfyUI's merge functions): hidden states merged, so queries, keys "
    "and values",
    "hypertile": "ComfyUI's HyperTile as it runs: query tiles moved into the batch, keys and values viewed with "
    "that batch (each tile attends to N/tiles consecutive tokens)",
    "hypertile-qkv": "the original HyperTile's placement (ComfyUI's divisor rule): hidden states tiled, each tile "
    "attends within itself",
}


@dataclass(frozen=True)
class Variant:
    """One way of computing (approximate) self-attention."""

    family: str
    setting: str

    @property
    def label(self) -> str:
        return f"{self.family} {self.setting}".strip()


def grid_for(resolution: int, depth: int) -> tuple[int, int]:
    side = ceil_side(-(-resolution // LATENT_SCALE), depth)
    return side, side


def extra_options(grid: tuple[int, int], heads: int) -> dict:
    """What ComfyUI passes to attn1 patches; the layer's grid stands as the latent, so the peers act on it."""
    return {"original_shape": [1, 4, grid[0], grid[1]], "n_heads": heads}


# --- running a variant -------------------------------------------------------------------------------------------


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, C]`` attention as ComfyUI's PyTorch backend does it: every tensor viewed with the queries' batch."""
    batch, _, width = q.shape
    q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, width)


def work_kept(q: torch.Tensor, k: torch.Tensor, tokens: int) -> float:
    """Query x key products computed, as a share of exact attention's: each of the ``q.shape[0]`` batch entries
    attends its ``q.shape[1]`` queries to ``k.numel() / (q.shape[0] * C)`` keys."""
    return q.shape[1] * (k.shape[0] * k.shape[1]) / tokens**2


def run_attn1(layer: AttentionLayer, hidden: torch.Tensor, patch: Patch, options: dict) -> tuple[torch.Tensor, float]:
    """One self-attention layer through ``patch``: ``[1, N, C]`` output (before the output projection), work kept."""
    torch.manual_seed(SEED)
    n, context, value = patch.before(hidden, hidden, hidden, options)
    q, k, v = n @ layer.w_q, context @ layer.w_k, value @ layer.w_v
    return patch.after(comfy_attention(q, k, v, layer.heads), options), work_kept(q, k, hidden.shape[1])


def sampled_rows(
    layer: AttentionLayer, hidden: torch.Tensor, patch: Patch, options: dict, token_index: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Rows ``token_index`` of :func:`run_attn1`'s output, computing only the attention rows they come from."""
    torch.manual_seed(SEED)
    n, context, value = patch.before(hidden, hidden, hidden, options)
    batch, rows_per_entry, width = n.shape
    row_ids = torch.arange(batch * rows_per_entry, dtype=torch.float64, device=hidden.device)
    source = patch.after(row_ids.view(batch, rows_per_entry, 1), options)[0, token_index, 0].round().long()
    k = (context @ layer.w_k).reshape(batch, -1, width)
    v = (value @ layer.w_v).reshape(batch, -1, width)
    out = torch.empty(1, token_index.numel(), width, dtype=hidden.dtype, device=hidden.device)
    entry, row = source // rows_per_entry, source % rows_per_entry
    for b in entry.unique().tolist():
        picked = (entry == b).nonzero().flatten()
        q = n[b : b + 1, row[picked]] @ layer.w_q
        out[:, picked] = comfy_attention(q, k[b : b + 1], v[b : b + 1], layer.heads)
    return out, work_kept(n, context, hidden.shape[1])


def todo_patch(grid: tuple[int, int], method: DownsampleMethod, factor: float) -> Patch:
    """ToDo as the node does it: the keys' and values' hidden states downsampled on the grid, queries untouched."""

    def before(n, context, value, options):
        small = downsample_tokens(context, grid[0], grid[1], factor, factor, method)
        return n, small, small

    return Patch(before, IDENTITY.after)


def pre_reduced_patch(small: torch.Tensor) -> Patch:
    """Attention on keys and values reduced beforehand: what ToDo would cost with a free downsampling."""
    return Patch(lambda n, context, value, options: (n, small, small), IDENTITY.after)


def peer_variants(
    config: AttentionConfig, grid: tuple[int, int], peers: TorchPeers
) -> Iterator[tuple[Variant, Callable[[], Patch]]]:
    """HyperTile and ToMe, each as ComfyUI's node runs it and as the original places it."""
    for tiles in config.hypertile_tiles:
        if grid[0] != grid[1] or grid[0] % tiles:
            continue  # square grids only (the benchmark's): equal tiles, and HyperTile's aspect rule is moot
        tile_size = 8 * grid[0] // tiles
        setting = f"{tiles}x{tiles} tiles"
        yield Variant("hypertile", setting), lambda s=tile_size: peers.hypertile_node(s)
        yield Variant("hypertile-qkv", setting), lambda s=tile_size: hypertile_qkv(peers, s)
    for ratio in config.tome_ratios:
        yield Variant("tome", f"ratio {ratio:g}"), lambda r=ratio: peers.tome_node(r)
        yield Variant("tome-qkv", f"ratio {ratio:g}"), lambda r=ratio: tome_qkv(peers, r)


def todo_variant(method: DownsampleMethod, factor: float) -> Variant:
    return Variant("todo", f"{method.value} x{factor:g}")


# --- measurement -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    models: tuple[str, ...] = ("sd15", "sdxl")
    resolutions: tuple[int, ...] = (1024,)
    timed_resolutions: tuple[int, ...] = (1024,)
    factors: tuple[float, ...] = (2.0, 3.0, 4.0)
    timed_factors: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0)
    methods: tuple[DownsampleMethod, ...] = tuple(DownsampleMethod)
    timed_methods: tuple[DownsampleMethod, ...] = (DownsampleMethod.NEAREST, DownsampleMethod.AVG_POOL)
    hypertile_tiles: tuple[int, ...] = (2, 4)
    tome_ratios: tuple[float, ...] = (0.5, 0.75)
    photos: tuple[str, ...] = PHOTOS
    query_sample: int = 2048
    repeats: int = 3
    depth_1_only_timing: bool = True


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = approx.float(), exact.float()
    return float((a - e).norm() / e.norm())


def time_call(call: Callable[[], object], device: torch.device, repeats: int) -> tuple[list[float], int | None]:
    """Seconds of ``repeats`` runs after one warm-up, and the peak extra memory of the first timed run (reading
    the peak costs microseconds next to a layer)."""
    call()
    seconds: list[float] = []
    peak = None
    for index in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if index == 0:
            _, peak = measure_peak(call, device)
        else:
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds, peak


def fidelity_rows(
    config: AttentionConfig, device: torch.device, dtype: torch.dtype, peers: TorchPeers | None = None
) -> Iterator[dict]:
    """Relative error of every variant against exact attention, averaged over the photos; one row per variant."""
    peers = peers or load_peers()
    for model in config.models:
        for shape in LAYER_SHAPES[model]:
            for resolution in config.resolutions:
                grid = grid_for(resolution, shape.depth)
                yield from _fidelity_for_layer(config, shape, resolution, grid, device, dtype, peers)


def _fidelity_variants(config, grid, peers):
    for method in config.methods:
        for factor in config.factors:
            yield todo_variant(method, factor), lambda m=method, f=factor: todo_patch(grid, m, f)
    yield from peer_variants(config, grid, peers)


def _fidelity_for_layer(config, shape, resolution, grid, device, dtype, peers) -> Iterator[dict]:
    errors: dict[Variant, list[float]] = {}
    work: dict[Variant, float] = {}
    options = extra_options(grid, shape.heads)
    for photo in config.photos:
        hidden = photo_tokens(photo, grid[0], grid[1], shape.channels).to(device, dtype)
        layer = attention_layer(hidden, shape.heads, shape.head_dim)
        n_tokens = grid[0] * grid[1]
        generator = torch.Generator().manual_seed(2)
        token_index = torch.randperm(n_tokens, generator=generator)[: config.query_sample].sort().values.to(device)
        exact, _ = sampled_rows(layer, hidden, IDENTITY, options, token_index)
        for variant, make_patch in _fidelity_variants(config, grid, peers):
            approx, work[variant] = sampled_rows(layer, hidden, make_patch(), options, token_index)
            errors.setdefault(variant, []).append(relative_error(approx, exact))
    for variant, values in errors.items():
        yield {
            "level": "attention", "kind": "fidelity", "model": shape.model, "depth": shape.depth,
            "resolution": resolution, "grid": list(grid), "family": variant.family, "setting": variant.setting,
            "work": work[variant], "rel_error": statistics.fmean(values), "photos": len(values),
            "peers": peers.source,
        }  # fmt: skip


def timing_rows(
    config: AttentionConfig, device: torch.device, dtype: torch.dtype, peers: TorchPeers | None = None
) -> Iterator[dict]:
    """Whole-layer time and peak memory of every variant on the same inputs, and ToDo against pre-reduced K/V."""
    peers = peers or load_peers()
    for model in config.models:
        shapes = LAYER_SHAPES[model][:1] if config.depth_1_only_timing else LAYER_SHAPES[model]
        for shape in shapes:
            for resolution in config.timed_resolutions:
                grid = grid_for(resolution, shape.depth)
                yield from _timing_for_layer(config, shape, resolution, grid, device, dtype, peers)


def _timing_for_layer(config, shape, resolution, grid, device, dtype, peers) -> Iterator[dict]:
    hidden = photo_tokens(config.photos[0], grid[0], grid[1], shape.channels).to(device, dtype)
    layer: AttentionLayer = attention_layer(hidden, shape.heads, shape.head_dim)
    options = extra_options(grid, shape.heads)
    n_tokens = grid[0] * grid[1]
    bytes_per = torch.finfo(dtype).bits // 8

    def timed(patch: Patch) -> tuple[list[float], int | None, float]:
        works = []

        def call():
            works.append(run_attn1(layer, hidden, patch, options)[1])

        seconds, peak = time_call(call, device, config.repeats)
        return seconds, peak, works[0]

    base_runs, base_peak, _ = timed(IDENTITY)
    base_seconds = statistics.median(base_runs)
    common = {"level": "attention", "kind": "timing", "model": shape.model, "depth": shape.depth,
              "resolution": resolution, "grid": list(grid), "device": device.type, "dtype": str(dtype),
              "projections": "q, k, v", "peers": peers.source}  # fmt: skip

    def row(variant: Variant, runs: list[float], peak: int | None, work: float, **extra) -> dict:
        seconds = statistics.median(runs)
        return {**common, "family": variant.family, "setting": variant.setting, "work": work, "seconds": seconds,
                "runs": runs, "peak_bytes": peak, "speedup": base_seconds / seconds,
                "memory_ratio": (base_peak / peak) if base_peak and peak else None,
                "dense_score_bytes": round(shape.heads * n_tokens**2 * work) * bytes_per, **extra}  # fmt: skip

    yield row(Variant("exact", ""), base_runs, base_peak, 1.0)
    for method in config.timed_methods:
        for factor in config.timed_factors:
            small = downsample_tokens(hidden, grid[0], grid[1], factor, factor, method)
            runs, peak, work = timed(todo_patch(grid, method, factor))
            reduced_runs, _, _ = timed(pre_reduced_patch(small))
            reduced = statistics.median(reduced_runs)
            yield row(todo_variant(method, factor), runs, peak, work, pre_reduced_seconds=reduced,
                      overhead=statistics.median(runs) / reduced - 1.0)  # fmt: skip
    for variant, make_patch in peer_variants(config, grid, peers):
        runs, peak, work = timed(make_patch())
        yield row(variant, runs, peak, work)


def count_fidelity_steps(config: AttentionConfig) -> int:
    return sum(len(LAYER_SHAPES[m]) for m in config.models) * len(config.resolutions)


def count_timing_steps(config: AttentionConfig) -> int:
    layers = sum(1 if config.depth_1_only_timing else len(LAYER_SHAPES[m]) for m in config.models)
    return layers * len(config.timed_resolutions)
