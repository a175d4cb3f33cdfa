"""DiT joint attention at the attention level: fidelity and kernel time of ToDo with and without mass correction.

One joint-attention layer as Flux runs it: 77 text tokens first, then the image
tokens of a photograph (see :mod:`tokens`), 8 heads of 128 channels, 2-D RoPE
on the image positions (text at position 0, as Flux's text ids). ToDo keeps
every query and one key/value per nearest-sampling group of image tokens; the
mass correction adds ``log(group size)`` to the kept image keys' logits.

Kernel comparison for the correction: an additive float mask through the
attention call (what the node does, so ComfyUI's selected backend runs it)
against text-key and image-key attention computed separately and merged by
their log-sum-exp with the ``log(f²)`` offset (needs the kernel's log-sum-exp,
a private torch op; divisible grids only).

``python -m todo_core.bench.dit_attention --out bench-results/dit-attention``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..dit import SequenceLayout, reduce_keys, select_keys
from .report import update_readme
from .tokens import PHOTOS, attention_layer, merge_heads, photo_tokens

logger = logging.getLogger("comfyui_todo.bench")

HEADS, HEAD_DIM = 8, 128
TEXT_TOKENS = 77
ROPE_AXES = (16, 56, 56)
"""Flux's split of a 128-channel head between its (index, row, column) position axes."""
ROPE_THETA = 10_000.0
FIDELITY_GRIDS = ((96, 96), (95, 97))
FIDELITY_FACTORS = (2, 3, 4)
TIMING_GRIDS = ((96, 96), (128, 128))
TIMING_FACTORS = (2, 4)
PACK_ROOT = Path(__file__).resolve().parents[2]


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over several position axes (``positions``: ``[tokens, len(ROPE_AXES)]``)."""
    angles = []
    for axis, dim in enumerate(ROPE_AXES):
        freqs = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, axis : axis + 1].double() * freqs)
    angle = torch.cat(angles, dim=-1).to(x.dtype)  # [tokens, head_dim / 2]
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = angle.cos(), angle.sin()
    rotated = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos), -1)
    return rotated.flatten(-2)


def joint_inputs(photo: str, height: int, width: int, seed: int = 0):
    """q, k, v ``[1, heads, text + image, head_dim]`` of one joint layer, RoPE applied, and the layout."""
    channels = HEADS * HEAD_DIM
    image = photo_tokens(photo, height, width, channels)
    generator = torch.Generator().manual_seed(seed)
    text = F.layer_norm(torch.randn(1, TEXT_TOKENS, channels, generator=generator), (channels,))
    hidden = torch.cat((text, image), dim=1)
    layer = attention_layer(hidden, HEADS, HEAD_DIM, seed=seed + 1)
    q = layer.queries(hidden)
    k, v = layer.keys_values(hidden)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image_positions = torch.stack((torch.zeros(height * width, dtype=torch.long), rows.flatten(), cols.flatten()), -1)
    positions = torch.cat((torch.zeros(TEXT_TOKENS, 3, dtype=torch.long), image_positions))
    layout = SequenceLayout(TEXT_TOKENS, 1, height, width, 0)
    return rope(q, positions), rope(k, positions), v, layout


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = merge_heads(approx).double(), merge_heads(exact).double()
    return float((a - e).norm() / e.norm())


def fidelity_rows() -> Iterator[dict]:
    """Relative output error against exact attention, per photo, grid, factor, with and without correction."""
    for height, width in FIDELITY_GRIDS:
        for photo in PHOTOS:
            q, k, v, layout = joint_inputs(photo, height, width)
            exact = F.scaled_dot_product_attention(q, k, v)
            for factor in FIDELITY_FACTORS:
                for corrected in (False, True):
                    k_small, v_small, mask = reduce_keys(k, v, None, layout, factor, 2, mass_correction=corrected)
                    out = F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask)
                    yield {
                        "grid": f"{height}x{width}",
                        "photo": photo,
                        "factor": factor,
                        "mass_correction": corrected,
                        "kv_tokens": k_small.shape[2],
                        "error_all": relative_error(out, exact),
                        "error_text_queries": relative_error(out[:, :, :TEXT_TOKENS], exact[:, :, :TEXT_TOKENS]),
                    }


def lse_merge_attention(q, k, v, layout: SequenceLayout, factor: int) -> torch.Tensor:
    """Text keys and kept image keys attended separately, merged by log-sum-exp with the ``log(f²)`` offset."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    selection = select_keys(layout, factor, k.device, k.dtype)
    image_index = selection.indices[layout.prefix :]
    out_text, lse_text = flash(q, k[:, :, : layout.prefix], v[:, :, : layout.prefix])[:2]
    out_image, lse_image = flash(q, k.index_select(2, image_index), v.index_select(2, image_index))[:2]
    lse_image = lse_image + 2 * math.log(factor)
    top = torch.maximum(lse_text, lse_image)
    w_text, w_image = (lse_text - top).exp().unsqueeze(-1), (lse_image - top).exp().unsqueeze(-1)
    return (out_text * w_text + out_image * w_image) / (w_text + w_image)


def timing_rows(repeats: int) -> Iterator[dict]:
    """Median seconds per variant, the variants of one grid and factor interleaved run by run."""
    for height, width in TIMING_GRIDS:
        q, k, v, layout = joint_inputs(PHOTOS[0], height, width)
        exact_seconds = None
        for factor in TIMING_FACTORS:
            variants = _variants(q, k, v, layout, factor, with_exact=exact_seconds is None)
            merged_error = float(
                (lse_merge_attention(q, k, v, layout, factor) - _masked(q, k, v, layout, factor)).abs().max()
            )
            seconds = _interleaved(variants, repeats)
            exact_seconds = seconds.get("exact", exact_seconds)
            for name, value in seconds.items():
                yield {
                    "grid": f"{height}x{width}",
                    "factor": 1 if name == "exact" else factor,
                    "variant": name,
                    "seconds": value,
                    "speedup": exact_seconds / value,
                    "lse_merge_max_abs_diff_vs_mask": merged_error,
                }


def _variants(q, k, v, layout, factor: int, with_exact: bool) -> dict[str, Callable[[], torch.Tensor]]:
    variants = {
        "todo_uncorrected": lambda: F.scaled_dot_product_attention(
            q, *reduce_keys(k, v, None, layout, factor, 2, mass_correction=False)[:2]
        ),
        "todo_mask": lambda: _masked(q, k, v, layout, factor),
        "todo_lse_merge": lambda: lse_merge_attention(q, k, v, layout, factor),
    }
    if with_exact:
        variants = {"exact": lambda: F.scaled_dot_product_attention(q, k, v), **variants}
    return variants


def _masked(q, k, v, layout, factor):
    k_small, v_small, mask = reduce_keys(k, v, None, layout, factor, 2)
    return F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask)


def _interleaved(variants: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    for call in variants.values():
        call()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def summarise_fidelity(rows: list[dict]) -> list[dict]:
    """Mean over photos, and the range, per grid, factor and correction."""
    keys = sorted({(r["grid"], r["factor"], r["mass_correction"]) for r in rows}, key=str)
    summary = []
    for grid, factor, corrected in keys:
        group = [r for r in rows if (r["grid"], r["factor"], r["mass_correction"]) == (grid, factor, corrected)]
        errors = [r["error_all"] for r in group]
        summary.append(
            {
                "grid": grid,
                "factor": factor,
                "mass_correction": corrected,
                "kv_tokens": group[0]["kv_tokens"],
                "error_mean": statistics.mean(errors),
                "error_min": min(errors),
                "error_max": max(errors),
                "text_query_error_mean": statistics.mean(r["error_text_queries"] for r in group),
            }
        )
    return summary


def markdown(meta: dict, fidelity: list[dict], timing: list[dict]) -> str:
    lines = [
        f"DiT joint attention ({HEADS} heads × {HEAD_DIM}, {TEXT_TOKENS} text tokens first, 2-D RoPE, image tokens "
        f"from {len(PHOTOS)} photos), {meta['device']}, torch {meta['torch']}, fp32.",
        "",
        "Relative output error against exact attention (all queries; mean over photos, min–max; text queries alone):",
        "",
        "| grid | factor | K/V kept | plain subsampling | mass-corrected | text queries: plain \u2192 corrected |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(r["grid"], r["factor"], r["mass_correction"]): r for r in fidelity}
    for grid, factor in sorted({(r["grid"], r["factor"]) for r in fidelity}, key=str):
        plain, fixed = by_key[(grid, factor, False)], by_key[(grid, factor, True)]
        lines.append(
            f"| {grid} | {factor} | {fixed['kv_tokens']} | {_range(plain)} | {_range(fixed)} | "
            f"{plain['text_query_error_mean']:.1%} \u2192 {fixed['text_query_error_mean']:.1%} |"
        )
    lines += [
        "",
        "Kernel time (torch SDPA on this CPU, median of interleaved runs; speed-up against exact attention):",
        "",
        "| grid | factor | variant | seconds | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['grid']} | {r['factor']} | {r['variant']} | {r['seconds']:.3f} | {r['speedup']:.2f}× |" for r in timing
    ]
    return "\n".join(lines) + "\n"


def _range(row: dict) -> str:
    return f"{row['error_mean']:.1%} ({row['error_min']:.1%}–{row['error_max']:.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/dit-attention"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--update-readme", action="store_true", help="write the tables into README.md's bench-dit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    meta = {"device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__}
    logger.info("fidelity ...")
    fidelity = summarise_fidelity(list(fidelity_rows()))
    timing: list[dict] = []
    if not args.skip_timing:
        logger.info("timing ...")
        timing = list(timing_rows(args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "fidelity": fidelity, "timing": timing}, indent=1))
    table = markdown(meta, fidelity, timing)
    (args.out / "results.md").write_text(table)
    if args.update_readme:
        update_readme(PACK_ROOT / "README.md", table, name="bench-dit")
    logger.info("%s", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
