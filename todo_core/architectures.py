"""Where the self-attention layers of the SD-family UNets sit, for demos and benchmarks.

Only geometry: which resolution levels hold transformer blocks and how many
blocks each level has, as in the published SD1.5 / SD2.x / SDXL configs. The
patch itself never uses this table; it measures every grid it is given.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UNetLayout:
    name: str
    native_resolution: int
    blocks_per_depth: dict[int, int]
    """Self-attention (attn1) layers per resolution level, input + middle + output."""


LAYOUTS: dict[str, UNetLayout] = {
    # SD1.x/2.x: 2 input + 3 output blocks with one transformer at levels 1-3, one middle block at level 4.
    "sd15": UNetLayout("SD1.5", 512, {1: 5, 2: 5, 3: 5, 4: 1}),
    "sd21": UNetLayout("SD2.1-768", 768, {1: 5, 2: 5, 3: 5, 4: 1}),
    # SDXL: no attention at level 1; 2 / 10 transformer layers per block at levels 2 / 3, 10 in the middle.
    "sdxl": UNetLayout("SDXL", 1024, {2: 2 * 2 + 3 * 2, 3: 2 * 10 + 3 * 10 + 10}),
}
