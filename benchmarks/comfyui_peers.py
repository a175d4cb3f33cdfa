"""ToDo's peers through ComfyUI's own functions (``comfy_extras.nodes_tomesd``, ``nodes_hypertile``).

Kept outside ``todo_core``, which never imports ComfyUI; ``todo_core.bench.peers.load_peers`` loads this file when a
ComfyUI checkout is found, and falls back on its torch-only implementation otherwise.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from todo_core.bench.peers import MergeFunctions, Patch, Tensor, TorchPeers, _PatchRecorder


class ComfyUIPeers(TorchPeers):
    """The peers as ComfyUI's own nodes and functions (``comfy_extras.nodes_tomesd``, ``nodes_hypertile``)."""

    def __init__(self, root: Path, tomesd, hypertile) -> None:
        self.source = f"ComfyUI's own functions ({root}: comfy_extras.nodes_tomesd, comfy_extras.nodes_hypertile)"
        self.tomesd, self.hypertile = tomesd, hypertile

    def random_divisor(self, value: int, min_value: int, max_options: int = 1) -> int:
        return self.hypertile.random_divisor(value, min_value, max_options)

    def merge_functions(self, x: Tensor, ratio: float, original_shape) -> MergeFunctions:
        return self.tomesd.get_functions(x, ratio, original_shape)

    def tome_node(self, ratio: float) -> Patch:
        recorder = _PatchRecorder()
        self.tomesd.TomePatchModel.execute(recorder, ratio)
        return Patch(recorder.before, recorder.after)

    def hypertile_node(self, tile_size: int, swap_size: int = 2, max_depth: int = 0, scale_depth: bool = False):
        recorder = _PatchRecorder()
        self.hypertile.HyperTile.execute(recorder, tile_size, swap_size, max_depth, scale_depth)
        return Patch(recorder.before, recorder.after)


def comfyui_peers(root: Path) -> ComfyUIPeers:
    """Import ComfyUI's peer nodes from the checkout at ``root`` (CPU mode when there is no CUDA device)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    importlib.import_module("comfy.model_management")
    return ComfyUIPeers(
        root,
        importlib.import_module("comfy_extras.nodes_tomesd"),
        importlib.import_module("comfy_extras.nodes_hypertile"),
    )
