"""This pack against the official comfy-todo node (ethansmith2000/comfy-todo), where that node is installed.

The official node downsamples keys/values of depth 1 and 2 with ``F.interpolate(mode="nearest")`` to
``int(side / factor)`` rows, and finds the depth-2 grid as ``latent_side // 2``. Where the sides are even and the
factors divide the sides at both depths, its nearest sampling picks exactly the rows ``floor(i * factor)`` that
this pack keeps, so the two must render bit-identical latents. Elsewhere they differ by design: the official node
drops the last partial row (floor) and cannot place an odd depth-2 side; this pack keeps it (ceil).

Found in ``COMFY_TODO_PATH`` or as ``custom_nodes/comfy-todo`` (or ``comfy_todo``) of the ComfyUI the tests use;
skipped otherwise. Never shipped with this pack.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from comfy_support import Probe, apply_node, import_comfyui, sample
from reference import unet_grid

pytestmark = pytest.mark.comfyui

SKIP_REASON = "the official comfy-todo node is not installed (set COMFY_TODO_PATH)"
OFFICIAL_NODE = "ToDoPatchModel"


def official_folder(comfyui: Path) -> Path | None:
    candidates = [Path(os.environ["COMFY_TODO_PATH"])] if os.environ.get("COMFY_TODO_PATH") else []
    candidates += [comfyui / "custom_nodes" / name for name in ("comfy-todo", "comfy_todo")]
    return next((folder for folder in candidates if (folder / "nodes.py").is_file()), None)


@pytest.fixture(scope="module")
def official(node):
    """The official node's class, loaded through ComfyUI's custom-node loader (after this pack)."""
    import nodes

    folder = official_folder(import_comfyui())
    if folder is None:
        pytest.skip(SKIP_REASON)
    if OFFICIAL_NODE not in nodes.NODE_CLASS_MAPPINGS:
        loaded = asyncio.run(nodes.load_custom_node(str(folder), module_parent="custom_nodes"))
        assert loaded, f"ComfyUI's loader refused {folder}"
    return nodes.NODE_CLASS_MAPPINGS[OFFICIAL_NODE]


_unpatched: dict[tuple[int, int], torch.Tensor] = {}


def unpatched(sd15, latent_hw: tuple[int, int]) -> torch.Tensor:
    if latent_hw not in _unpatched:
        _unpatched[latent_hw] = sample(sd15, latent_hw)
    return _unpatched[latent_hw]


def with_probe(patcher, probe: Probe):
    clone = patcher.clone()
    options = clone.model_options.get("transformer_options", {})
    clone.model_options["transformer_options"] = {**options, "optimized_attention_override": probe}
    return clone


@pytest.mark.parametrize(
    ("latent_hw", "depth_1_factor", "depth_2_factor"),
    [
        ((24, 40), 2.0, 1.0),  # the official node's defaults
        ((24, 40), 2.0, 2.0),
        ((24, 40), 4.0, 2.0),
        ((24, 48), 1.5, 1.0),  # a fractional factor that divides both sides: 16 x 32
        ((24, 48), 3.0, 3.0),
        ((32, 32), 1.0, 4.0),  # depth 2 alone
    ],
)
def test_bit_identical_to_the_official_node_where_it_works(node, official, sd15, latent_hw, depth_1_factor,
                                                           depth_2_factor):  # fmt: skip
    factors = (depth_1_factor, depth_2_factor)
    for depth, factor in zip((1, 2), factors, strict=True):
        assert all(side % factor == 0 for side in unet_grid(latent_hw, depth)), "a case the official node handles"
    ours_probe, official_probe = Probe(), Probe()
    ours = apply_node(node, sd15, mode="manual", depth_1_factor=depth_1_factor, depth_2_factor=depth_2_factor,
                      depth_3_factor=1.0)  # fmt: skip
    theirs = getattr(official(), official.FUNCTION)(sd15, *factors)[0]
    ours_out = sample(with_probe(ours, ours_probe), latent_hw)
    official_out = sample(with_probe(theirs, official_probe), latent_hw)
    assert ours_probe.kv_by_grid() == official_probe.kv_by_grid()
    for depth, factor in zip((1, 2), factors, strict=True):
        grid = unet_grid(latent_hw, depth)
        assert ours_probe.kv_by_grid()[grid] == {int(grid[0] / factor) * int(grid[1] / factor)}
    assert not torch.equal(ours_out, unpatched(sd15, latent_hw)), "neither node acted: the test proves nothing"
    assert torch.equal(ours_out, official_out)
