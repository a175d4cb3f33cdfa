"""ToDo's peers as ComfyUI runs them: token merging (``TomePatchModel``) and ``HyperTile``, as attn1 patches.

Both ComfyUI nodes act through the same hook as ToDo: an ``attn1_patch`` that receives the normalised hidden
states ``n`` (queries) and ``context``/``value`` (keys and values, the same ``n`` for self-attention) and returns
new ones, and an ``attn1_output_patch`` that maps the attention output back to one row per token. What they do
there, read from ComfyUI v0.8.0 (``comfy_extras/nodes_tomesd.py``, ``comfy_extras/nodes_hypertile.py``):

* ``TomePatchModel`` merges the *queries* only (``return m(q), k, v``): ``ratio`` of the tokens are averaged into
  their most similar partner (bipartite soft matching, one random destination per 2x2 block), every key and value
  is kept, and the output is unmerged. Query x key work kept: ``1 - ratio``.
* ``HyperTile`` moves the query tiles into the batch (``b (nh h nw w) c -> (b nh nw) (h w) c``) and leaves keys and
  values as they are; ComfyUI's attention then views keys and values with the queries' batch size, so each query
  tile attends to one contiguous run of ``N / tiles`` tokens (whole rows of the image), not to its own tile. Work
  kept: ``1 / tiles``.

The originals act differently, and are benchmarked too, built from the same ComfyUI functions: ToMe for SD merges
the hidden states before self-attention, so queries, keys and values all come from the merged tokens (work kept
``(1 - ratio)^2``); the original HyperTile tiles the hidden states, so each tile attends within itself.

:func:`load_peers` returns ComfyUI's own functions when a ComfyUI checkout is importable and otherwise
:class:`TorchPeers`, this module's torch-only implementation of the same algorithms, which the tests check
against ComfyUI's, bit for bit, on the same inputs and seeds.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .comfyui_path import PACK_ROOT, find_comfyui

logger = logging.getLogger("comfyui_todo")

Tensor = torch.Tensor
MergeFunctions = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class Patch:
    """An attn1 patch pair in ComfyUI's calling convention."""

    before: Callable[[Tensor, Tensor, Tensor, dict], tuple[Tensor, Tensor, Tensor]]
    after: Callable[[Tensor, dict], Tensor]


def _unchanged(out: Tensor, extra_options: dict) -> Tensor:
    return out


IDENTITY = Patch(lambda n, context, value, extra_options: (n, context, value), _unchanged)


class _PatchRecorder:
    """Stands in for a ComfyUI ModelPatcher: the peer nodes' ``execute`` hands it their attn1 patches."""

    def __init__(self) -> None:
        self.before: Callable | None = None
        self.after: Callable | None = None

    def clone(self) -> _PatchRecorder:
        return self

    def set_model_attn1_patch(self, patch: Callable) -> None:
        self.before = patch

    def set_model_attn1_output_patch(self, patch: Callable) -> None:
        self.after = patch


# --- torch-only implementation ------------------------------------------------------------------------------------


def _identity(x: Tensor, mode: str | None = None) -> Tensor:
    return x


@dataclass(frozen=True)
class _Matching:
    """Which tokens are destinations and which sources, and where each merged source goes (index tensors)."""

    tokens: int
    dst: Tensor  # [1, D, 1] token index of each destination
    src: Tensor  # [1, S, 1] token index of each source
    kept: Tensor  # [B, S - r, 1] position in ``src`` of each source left alone
    moved: Tensor  # [B, r, 1] position in ``src`` of each merged source
    into: Tensor  # [B, r, 1] position in ``dst`` that each merged source joins

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, width = x.shape
        return (
            torch.gather(x, 1, self.src.expand(batch, self.src.shape[1], width)),
            torch.gather(x, 1, self.dst.expand(batch, self.dst.shape[1], width)),
        )

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        sources, destinations = self._split(x)
        batch, _, width = sources.shape
        left = torch.gather(sources, -2, self.kept.expand(batch, self.kept.shape[1], width))
        joining = torch.gather(sources, -2, self.moved.expand(batch, self.moved.shape[1], width))
        destinations = destinations.scatter_reduce(
            -2, self.into.expand(batch, self.into.shape[1], width), joining, reduce=mode
        )
        return torch.cat([left, destinations], dim=1)

    def unmerge(self, x: Tensor) -> Tensor:
        batch, width = self.kept.shape[0], x.shape[-1]
        n_left = self.kept.shape[1]
        left, destinations = x[..., :n_left, :], x[..., n_left:, :]
        out = torch.zeros(batch, self.tokens, width, device=x.device, dtype=x.dtype)
        src_tokens = self.src.expand(batch, self.src.shape[1], 1)
        out.scatter_(-2, self.dst.expand(batch, self.dst.shape[1], width), destinations)
        out.scatter_(-2, torch.gather(src_tokens, 1, self.kept).expand(batch, n_left, width), left)
        joined = torch.gather(destinations, -2, self.into.expand(batch, self.into.shape[1], width))
        out.scatter_(-2, torch.gather(src_tokens, 1, self.moved).expand(batch, self.moved.shape[1], width), joined)
        return out


def soft_matching_2d(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int, no_rand: bool = False) -> MergeFunctions:
    """Bipartite soft matching with one random destination per ``sy x sx`` block (ToMe for SD's rule).

    Blocks that the grid's border cuts off hold sources only. The ``r`` sources most similar (cosine, on ``metric``)
    to some destination are averaged into it. Returns ``(merge, unmerge)``.
    """
    batch, tokens, _ = metric.shape
    if r <= 0 or w == 1 or h == 1:
        return _identity, _identity
    with torch.no_grad():
        rows, cols = h // sy, w // sx
        if no_rand:
            pick = torch.zeros(rows, cols, 1, device=metric.device, dtype=torch.int64)
        else:
            pick = torch.randint(sy * sx, size=(rows, cols, 1), device=metric.device)
        flags = torch.zeros(h, w, device=metric.device, dtype=torch.int64)
        block_row = torch.arange(rows, device=metric.device).view(rows, 1) * sy
        block_col = torch.arange(cols, device=metric.device).view(1, cols) * sx
        chosen = pick[..., 0]
        flags[block_row + chosen // sx, block_col + chosen % sx] = -1
        order = flags.reshape(1, -1, 1).argsort(dim=1)  # destinations (-1) first, then sources (0)
        n_dst = rows * cols
        dst, src = order[:, :n_dst, :], order[:, n_dst:, :]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        width = unit.shape[-1]
        similarity = torch.gather(unit, 1, src.expand(batch, tokens - n_dst, width)) @ torch.gather(
            unit, 1, dst.expand(batch, n_dst, width)
        ).transpose(-1, -2)
        r = min(similarity.shape[1], r)
        best, best_dst = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        moved = ranked[..., :r, :]
        matching = _Matching(tokens, dst, src, ranked[..., r:, :], moved, torch.gather(best_dst[..., None], -2, moved))
    return matching.merge, matching.unmerge


def random_divisor(value: int, min_value: int, /, max_options: int = 1) -> int:
    """``value // d`` for a divisor ``d >= min_value`` of ``value``: the smallest, or one of the ``max_options``
    smallest drawn with torch's global generator (the draw's upper bound is exclusive, as in ComfyUI)."""
    low = min(min_value, value)
    counts = [value // d for d in range(low, value + 1) if value % d == 0][:max_options]
    index = torch.randint(low=0, high=len(counts) - 1, size=(1,)).item() if len(counts) > 1 else 0
    return counts[index]


def tile_to_batch(x: Tensor, nh: int, nw: int, h: int, w: int) -> Tensor:
    """``[B, h*w, C]`` row-major grid -> ``[B*nh*nw, (h/nh)*(w/nw), C]``, one batch entry per tile."""
    batch, _, width = x.shape
    return (
        x.reshape(batch, nh, h // nh, nw, w // nw, width)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch * nh * nw, (h // nh) * (w // nw), width)
    )


def batch_to_tile(x: Tensor, nh: int, nw: int, h: int, w: int) -> Tensor:
    """The inverse of :func:`tile_to_batch`."""
    width = x.shape[-1]
    batch = x.shape[0] // (nh * nw)
    return x.reshape(batch, nh, nw, h // nh, w // nw, width).permute(0, 1, 3, 2, 4, 5).reshape(batch, h * w, width)


class TorchPeers:
    """The peers without ComfyUI: the same algorithms, written against torch alone."""

    source = "torch-only re-implementation (no ComfyUI found)"

    @staticmethod
    def random_divisor(value: int, min_value: int, max_options: int = 1) -> int:
        return random_divisor(value, min_value, max_options)

    @staticmethod
    def merge_functions(x: Tensor, ratio: float, original_shape) -> MergeFunctions:
        """ComfyUI's rule: merge only at the full-resolution depth, ``int(tokens * ratio)`` tokens, 2x2 blocks."""
        _, _, height, width = original_shape
        downsample = math.ceil(math.sqrt(height * width // x.shape[1]))
        if downsample > 1:
            return _identity, _identity
        return soft_matching_2d(x, math.ceil(width / downsample), math.ceil(height / downsample), 2, 2,
                                int(x.shape[1] * ratio))  # fmt: skip

    def tome_node(self, ratio: float) -> Patch:
        """TomePatchModel's attn1 patches: queries merged, keys and values untouched, output unmerged."""
        state: dict[str, Callable] = {}

        def before(q, k, v, extra_options):
            merge, state["unmerge"] = self.merge_functions(q, ratio, extra_options["original_shape"])
            return merge(q), k, v

        def after(out, extra_options):
            return state["unmerge"](out)

        return Patch(before, after)

    def hypertile_node(self, tile_size: int, swap_size: int = 2, max_depth: int = 0, scale_depth: bool = False):
        """HyperTile's attn1 patches: query tiles moved into the batch at the chosen depths, moved back after."""
        latent_tile = max(32, tile_size) // 8
        state: dict[str, tuple[int, int, int, int] | None] = {"tiles": None}

        def before(q, k, v, extra_options):
            shape = extra_options["original_shape"]
            sizes = [(shape[-2] / 2**i) * (shape[-1] / 2**i) for i in range(max_depth + 1)]
            if q.shape[-2] not in sizes:
                return q, k, v
            aspect = shape[-1] / shape[-2]
            tokens = q.size(1)
            h, w = round(math.sqrt(tokens * aspect)), round(math.sqrt(tokens / aspect))
            scale = 2 ** sizes.index(q.shape[-2]) if scale_depth else 1
            nh = self.random_divisor(h, latent_tile * scale, swap_size)
            nw = self.random_divisor(w, latent_tile * scale, swap_size)
            if nh * nw > 1:
                q = tile_to_batch(q, nh, nw, h, w)
                state["tiles"] = (nh, nw, h, w)
            return q, k, v

        def after(out, extra_options):
            tiles, state["tiles"] = state["tiles"], None
            return out if tiles is None else batch_to_tile(out, *tiles)

        return Patch(before, after)


COMFYUI_PEERS = PACK_ROOT / "benchmarks" / "comfyui_peers.py"
"""The ComfyUI side of the peers: outside ``todo_core``, which never imports ComfyUI."""


def comfyui_peers_module():
    """``benchmarks/comfyui_peers.py``, loaded from its file (it imports ComfyUI only when called)."""
    spec = importlib.util.spec_from_file_location("todo_comfyui_peers", COMFYUI_PEERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_peers(comfyui: Path | None = None, use_comfyui: bool = True) -> TorchPeers:
    """ComfyUI's functions when a checkout is found and imports; this module's torch-only ones otherwise."""
    root = (comfyui or find_comfyui()) if use_comfyui else None
    if root is None:
        return TorchPeers()
    try:
        return comfyui_peers_module().comfyui_peers(root)
    except Exception as error:  # any failure to import ComfyUI leaves the torch-only peers, with a warning
        logger.warning("ComfyUI at %s cannot be imported (%s): the peers run on the torch-only implementation",
                       root, error)  # fmt: skip
        return TorchPeers()


# --- the variants built on either implementation ------------------------------------------------------------------


def tome_qkv(peers: TorchPeers, ratio: float) -> Patch:
    """ToMe for SD's own placement: the hidden states merged before self-attention (queries, keys and values)."""
    state: dict[str, Callable] = {}

    def before(n, context, value, extra_options):
        merge, state["unmerge"] = peers.merge_functions(n, ratio, extra_options["original_shape"])
        merged = merge(n)
        return merged, merged, merged

    def after(out, extra_options):
        return state["unmerge"](out)

    return Patch(before, after)


def hypertile_qkv(peers: TorchPeers, tile_size: int, swap_size: int = 2) -> Patch:
    """The original HyperTile's placement: the hidden states tiled, so each tile attends within itself."""
    latent_tile = max(32, tile_size) // 8
    state: dict[str, tuple[int, int, int, int]] = {}

    def before(n, context, value, extra_options):
        h, w = extra_options["original_shape"][-2:]
        nh, nw = peers.random_divisor(h, latent_tile, swap_size), peers.random_divisor(w, latent_tile, swap_size)
        state["tiles"] = (nh, nw, h, w)
        tiled = tile_to_batch(n, nh, nw, h, w)
        return tiled, tiled, tiled

    def after(out, extra_options):
        return batch_to_tile(out, *state["tiles"])

    return Patch(before, after)
