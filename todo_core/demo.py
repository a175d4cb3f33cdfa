"""Show what ToDo does to a UNet's self-attention at a given image size.

    python -m todo_core.demo --model sdxl --size 2048x2048 --size 1920x1080

For every resolution level with self-attention it runs the real patch on
tokens of the real grid shape and reports query and key/value token counts and
the share of attention score work (queries x keys) left. Needs only torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from .architectures import LAYOUTS, UNetLayout
from .config import LATENT_SCALE, FactorMode, ToDoConfig
from .downsample import DownsampleMethod
from .grid import ceil_side
from .patch import ToDoAttn1Patch

DEFAULT_SIZES = ("1024x1024", "1536x1536", "2048x2048", "1920x1080")


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` in pixels (a single number means a square)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1920x1080; got {text!r}") from None
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < LATENT_SCALE:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, each at least {LATENT_SCALE} px; got {text!r}")
    return sides[0], sides[1]


def measure(layout: UNetLayout, width: int, height: int, patch: ToDoAttn1Patch) -> list[dict[str, int | float]]:
    """Run the patch once per attention level of ``layout`` and count what it leaves."""
    latent_h, latent_w = -(-height // LATENT_SCALE), -(-width // LATENT_SCALE)
    rows = []
    for depth, layers in layout.blocks_per_depth.items():
        grid_h, grid_w = ceil_side(latent_h, depth), ceil_side(latent_w, depth)
        tokens = torch.zeros(1, grid_h * grid_w, 1)
        extra_options = {"original_shape": [1, 4, latent_h, latent_w], "activations_shape": [1, 1, grid_h, grid_w]}
        _, keys, _ = patch(tokens, tokens, tokens, extra_options)
        rows.append(
            {
                "depth": depth,
                "grid_h": grid_h,
                "grid_w": grid_w,
                "layers": layers,
                "q_tokens": tokens.shape[1],
                "kv_tokens": keys.shape[1],
            }
        )
    return rows


def attention_work_left(rows: Sequence[dict[str, int | float]]) -> float:
    """Share of q x k score work left over the whole UNet (1.0 = unchanged)."""
    before = sum(r["layers"] * r["q_tokens"] ** 2 for r in rows)
    after = sum(r["layers"] * r["q_tokens"] * r["kv_tokens"] for r in rows)
    return after / before


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m todo_core.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=sorted(LAYOUTS), action="append", help="UNet layout (repeatable; default sd15 and sdxl)"
    )
    parser.add_argument("--size", type=parse_size, action="append", help="WIDTHxHEIGHT in pixels (repeatable)")
    parser.add_argument(
        "--mode",
        choices=[FactorMode.AUTO.value, FactorMode.MANUAL.value],  # fidelity mode decides by measuring a real model
        default=FactorMode.AUTO.value,
    )
    parser.add_argument(
        "--factors",
        type=float,
        nargs=3,
        default=(2.0, 1.0, 1.0),
        metavar=("D1", "D2", "D3"),
        help="manual factors for depths 1-3",
    )
    parser.add_argument("--method", choices=[m.value for m in DownsampleMethod], default=DownsampleMethod.NEAREST.value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    sizes = args.size or [parse_size(s) for s in DEFAULT_SIZES]
    for key in args.model or ["sd15", "sdxl"]:
        layout = LAYOUTS[key]
        config = ToDoConfig.create(
            args.mode, *args.factors, method=args.method, native_resolution=layout.native_resolution
        )
        patch = ToDoAttn1Patch(config)
        title = f"{layout.name} (native {layout.native_resolution} px)"
        print(f"\n{title}, mode {config.mode.value}, method {config.method.value}")
        print(f"{'size':>11} {'depth':>5} {'grid':>9} {'layers':>6} {'Q tokens':>9} {'K/V tokens':>10} {'K/V kept':>8}")
        for width, height in sizes:
            rows = measure(layout, width, height, patch)
            for r in rows:
                kept = r["kv_tokens"] / r["q_tokens"]
                print(
                    f"{width:>5}x{height:<5} {r['depth']:>5} {r['grid_h']:>4}x{r['grid_w']:<4} {r['layers']:>6} "
                    f"{r['q_tokens']:>9} {r['kv_tokens']:>10} {kept:>8.1%}"
                )
            print(f"{'':>11} self-attention score work left: {attention_work_left(rows):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
