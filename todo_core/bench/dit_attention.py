"""DiT attention at the attention level: fidelity and kernel time of ToDo with and without mass correction.

One attention layer of a diffusion transformer, 8 heads of 128 channels, 2-D
RoPE on the image positions (frame, row and column for video; text, register
and pad tokens at position 0, as Flux's text ids), image tokens from
photographs (see :mod:`tokens`), text tokens seeded random. The same layer is
measured in each sequence layout a DiT family uses (:data:`LAYOUTS`): the text
first (Flux, SD3, Qwen-Image), the image first (HiDream, HunyuanVideo, Mochi),
the text and the image each padded to a multiple of 32 with learned pad tokens
(Z-Image), register tokens before the text (AuraFlow), and several frames of
the grid alone (video self-attention: Wan, LTX-Video; the frames pan across the
photograph). ToDo keeps every query and one key/value per nearest-sampling
group of image tokens (and, with a temporal factor, one frame per group of
frames); the mass correction adds ``log(group size)`` to the kept image keys'
logits. Every token that is not an image token is kept.

Kernel comparison for the correction: an additive float mask through the
attention call (what the node does, so ComfyUI's selected backend runs it)
against text-key and image-key attention computed separately and merged by
their log-sum-exp with the ``log(f²)`` offset (needs the kernel's log-sum-exp,
a private torch op; divisible grids only; text-first layout only), and against
the zero-cost ceiling: attention on keys and values already reduced (a
contiguous slice of the kept length, no mask), which no gather and no mask can
beat.

Part of ``python -m todo_core.bench --levels dit-attention`` (writes ``dit-attention/`` in the results folder).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dit import SequenceLayout, key_groups, reduce_keys, select_keys
from ..routes import attend_lse_merged
from .tokens import PHOTOS, attention_layer, merge_heads, photo_tokens

HEADS, HEAD_DIM = 8, 128
TEXT_TOKENS = 77
ROPE_AXES = (16, 56, 56)
"""Flux's split of a 128-channel head between its (index, row, column) position axes."""
ROPE_THETA = 10_000.0
PAN = 2
"""Video: image tokens the camera moves right from one frame to the next."""


@dataclass(frozen=True)
class LayoutCase:
    """Where a DiT family puts the image grid among the other tokens of one attention call."""

    name: str
    families: str
    text: int = TEXT_TOKENS
    """Text tokens (0: image-only attention)."""
    image_first: bool = False
    """The grid before the text (else after it)."""
    registers: int = 0
    """Learned register tokens before the text."""
    pad_multiple: int = 1
    """The text and the image tokens each padded to a multiple of this with a learned pad token of their own."""
    frames: int = 1
    """Frames of the grid (video self-attention)."""

    def layout(self, height: int, width: int) -> SequenceLayout:
        text = self.registers + _padded(self.text, self.pad_multiple)
        image_pad = _padded(height * width, self.pad_multiple) - height * width
        if self.image_first:
            return SequenceLayout(0, self.frames, height, width, text + image_pad)
        return SequenceLayout(text, self.frames, height, width, image_pad)

    def describe(self) -> str:
        parts = []
        if self.registers:
            parts.append(f"{self.registers} register tokens")
        if self.text:
            pad = f" padded to a multiple of {self.pad_multiple} with a learned token" if self.pad_multiple > 1 else ""
            parts.append(f"{self.text} text tokens{pad}")
        grid = f"{self.frames} frames of the grid (image only)" if self.frames > 1 else "the grid"
        if self.pad_multiple > 1:
            grid += f" padded to a multiple of {self.pad_multiple} with another learned token"
        order = [grid, *parts] if self.image_first else [*parts, grid]
        return f"`{self.name}` ({self.families}): " + ", then ".join(order)


def _padded(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


LAYOUTS: dict[str, LayoutCase] = {
    case.name: case
    for case in (
        LayoutCase("text-first", "Flux, SD3, Qwen-Image"),
        LayoutCase("image-first", "HiDream, HunyuanVideo, Mochi", image_first=True),
        LayoutCase("padded-32", "Z-Image", pad_multiple=32),
        LayoutCase("registers", "AuraFlow", registers=8),
        LayoutCase("video", "Wan, LTX-Video", text=0, frames=5),
    )
}
"""The sequence layouts measured, by name."""


@dataclass(frozen=True)
class DiTAttentionConfig:
    """What the DiT attention level measures."""

    layouts: tuple[str, ...] = tuple(LAYOUTS)
    fidelity_grids: tuple[tuple[int, int], ...] = ((96, 96), (95, 97))
    other_layout_fidelity_grids: tuple[tuple[int, int], ...] = ((95, 97),)
    """The image layouts but the text-first one: the uneven grid (border groups; Z-Image pads it)."""
    video_grids: tuple[tuple[int, int], ...] = ((30, 52), (31, 53))
    """Grids of one video frame (Wan 2.1 1.3B's 832x480 is 30x52 tokens)."""
    factors: tuple[float, ...] = (2, 3, 4)
    temporal_factors: tuple[float, ...] = (2,)
    """Video: also each of these, with spatial factor 2."""
    timing_grids: tuple[tuple[int, int], ...] = ((96, 96), (128, 128))
    other_layout_timing_grids: tuple[tuple[int, int], ...] = ((96, 96),)
    """Every layout but the text-first one is timed on these (the video one on its first grid)."""
    timing_factors: tuple[float, ...] = (2, 4)
    photos: tuple[str, ...] = PHOTOS
    repeats: int = 5

    def grids(self, case: LayoutCase) -> tuple[tuple[int, int], ...]:
        if case.frames > 1:
            return self.video_grids
        return self.fidelity_grids if case.name == "text-first" else self.other_layout_fidelity_grids

    def settings(self, case: LayoutCase) -> tuple[tuple[float, float], ...]:
        """(spatial factor, temporal factor) pairs measured for fidelity."""
        extra = tuple((2, t) for t in self.temporal_factors) if case.frames > 1 else ()
        return tuple((f, 1) for f in self.factors) + extra

    def timed_grids(self, case: LayoutCase) -> tuple[tuple[int, int], ...]:
        if case.frames > 1:
            return self.video_grids[:1]
        return self.timing_grids if case.name == "text-first" else self.other_layout_timing_grids


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


def _image_tokens(photo: str, case: LayoutCase, height: int, width: int, channels: int) -> torch.Tensor:
    """``[1, frames*height*width, channels]``; video frames are windows panning right across the photograph."""
    if case.frames == 1:
        return photo_tokens(photo, height, width, channels)
    wide = width + (case.frames - 1) * PAN
    grid = photo_tokens(photo, height, wide, channels).view(height, wide, channels)
    frames = [grid[:, t * PAN : t * PAN + width] for t in range(case.frames)]
    return torch.stack(frames).reshape(1, -1, channels)


def layout_inputs(case: LayoutCase, photo: str, height: int, width: int, seed: int = 0):
    """q, k, v ``[1, heads, tokens, head_dim]`` of one attention call in ``case``'s layout, RoPE applied."""
    channels = HEADS * HEAD_DIM
    layout = case.layout(height, width)
    generator = torch.Generator().manual_seed(seed)
    text = F.layer_norm(torch.randn(1, case.text, channels, generator=generator), (channels,))
    learned = torch.Generator().manual_seed(seed + 2)  # registers and pad tokens: the same in every image
    registers, text_pad, image_pad = (
        F.layer_norm(torch.randn(1, count, channels, generator=learned), (channels,))
        for count in (case.registers, 1, 1)
    )
    image = _image_tokens(photo, case, height, width, channels)
    text_pads = _padded(case.text, case.pad_multiple) - case.text
    image_pads = _padded(layout.image_tokens, case.pad_multiple) - layout.image_tokens
    text_run = torch.cat((registers, text, text_pad.expand(1, text_pads, -1)), dim=1)
    image_run = torch.cat((image, image_pad.expand(1, image_pads, -1)), dim=1)
    frames, rows, cols = torch.meshgrid(
        torch.arange(case.frames), torch.arange(height), torch.arange(width), indexing="ij"
    )
    grid_positions = torch.stack((frames.flatten(), rows.flatten(), cols.flatten()), -1)
    image_positions = torch.cat((grid_positions, torch.zeros(image_pads, 3, dtype=torch.long)))
    text_positions = torch.zeros(text_run.shape[1], 3, dtype=torch.long)
    runs = [(image_run, image_positions), (text_run, text_positions)]
    if not case.image_first:
        runs.reverse()
    hidden = torch.cat([tokens for tokens, _ in runs], dim=1)
    positions = torch.cat([where for _, where in runs])
    assert hidden.shape[1] == layout.tokens
    layer = attention_layer(hidden, HEADS, HEAD_DIM, seed=seed + 1)
    q = layer.queries(hidden)
    k, v = layer.keys_values(hidden)
    return rope(q, positions), rope(k, positions), v, layout


def joint_inputs(photo: str, height: int, width: int, seed: int = 0):
    """q, k, v and layout of one joint layer as Flux runs it: 77 text tokens first, then the image."""
    return layout_inputs(LAYOUTS["text-first"], photo, height, width, seed)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = merge_heads(approx).double(), merge_heads(exact).double()
    return float((a - e).norm() / e.norm())


def _other_queries(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """The rows of every token that is not an image token (text, registers, padding)."""
    return torch.cat((x[:, :, : layout.prefix], x[:, :, layout.prefix + layout.image_tokens :]), dim=2)


def fidelity_rows(config: DiTAttentionConfig) -> Iterator[dict]:
    """Relative output error against exact attention, per layout, grid, photo, factors, with and without correction."""
    for name in config.layouts:
        case = LAYOUTS[name]
        for height, width in config.grids(case):
            for photo in config.photos:
                q, k, v, layout = layout_inputs(case, photo, height, width)
                exact = F.scaled_dot_product_attention(q, k, v)
                for factor, temporal_factor in config.settings(case):
                    for corrected in (False, True):
                        k_small, v_small, mask = reduce_keys(
                            k, v, None, layout, factor, 2, mass_correction=corrected, temporal_factor=temporal_factor
                        )
                        out = F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask)
                        others = layout.prefix + layout.suffix
                        yield {
                            "layout": name, "grid": f"{height}x{width}", "frames": case.frames, "photo": photo,
                            "factor": factor, "temporal_factor": temporal_factor, "mass_correction": corrected,
                            "masked": mask is not None, "kv_tokens": k_small.shape[2], "tokens": layout.tokens,
                            "error_all": relative_error(out, exact),
                            "error_text_queries": relative_error(_other_queries(out, layout),
                                                                 _other_queries(exact, layout)) if others else None,
                        }  # fmt: skip


def lse_merge_attention(q, k, v, layout: SequenceLayout, factor: int) -> torch.Tensor:
    """Mass-corrected attention without a mask: one call per group size, merged by log-sum-exp (``routes.py``)."""
    k_small, v_small, _ = reduce_keys(k, v, None, layout, factor, 2, mass_correction=False)
    return attend_lse_merged(q, k_small, v_small, q.shape[1], key_groups(layout, factor, k.device).sets, True, True)


def timing_rows(config: DiTAttentionConfig) -> Iterator[dict]:
    """Median seconds per variant, the variants of one layout, grid and factor interleaved run by run."""
    for name in config.layouts:
        case = LAYOUTS[name]
        for height, width in config.timed_grids(case):
            q, k, v, layout = layout_inputs(case, config.photos[0], height, width)
            exact_seconds = None
            for factor in config.timing_factors:
                variants = _variants(
                    q, k, v, layout, factor, with_exact=exact_seconds is None, lse=name == "text-first"
                )
                merged_error = None
                if "todo_lse_merge" in variants:
                    merged = lse_merge_attention(q, k, v, layout, factor)
                    merged_error = float((merged - _masked(q, k, v, layout, factor)).abs().max())
                seconds = _interleaved(variants, config.repeats)
                exact_seconds = seconds.get("exact", exact_seconds)
                for variant, value in seconds.items():
                    yield {
                        "layout": name, "grid": f"{height}x{width}", "frames": case.frames,
                        "factor": 1 if variant == "exact" else factor, "variant": variant, "seconds": value,
                        "speedup": exact_seconds / value, "lse_merge_max_abs_diff_vs_mask": merged_error,
                    }  # fmt: skip


def _variants(q, k, v, layout, factor: int, with_exact: bool, lse: bool) -> dict[str, Callable[[], torch.Tensor]]:
    kept = select_keys(layout, factor, k.device, k.dtype).indices.numel()
    k_free, v_free = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
    variants = {
        "todo_uncorrected": lambda: F.scaled_dot_product_attention(
            q, *reduce_keys(k, v, None, layout, factor, 2, mass_correction=False)[:2]
        ),
        "todo_mask": lambda: _masked(q, k, v, layout, factor),
        "todo_lse_merge": lambda: lse_merge_attention(q, k, v, layout, factor),
        "zero_cost": lambda: F.scaled_dot_product_attention(q, k_free, v_free),
    }
    if not (lse and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")):
        del variants["todo_lse_merge"]
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


def _fidelity_key(row: dict) -> tuple:
    return (row.get("layout", "text-first"), row["grid"], row["factor"], row.get("temporal_factor", 1))


def summarise_fidelity(rows: list[dict]) -> list[dict]:
    """Mean over photos, and the range, per layout, grid, factors and correction (in the order measured)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((*_fidelity_key(row), row["mass_correction"]), []).append(row)
    summary = []
    for (layout, grid, factor, temporal_factor, corrected), group in groups.items():
        errors = [r["error_all"] for r in group]
        others = [r["error_text_queries"] for r in group if r["error_text_queries"] is not None]
        summary.append({
            "layout": layout, "grid": grid, "frames": group[0].get("frames", 1), "factor": factor,
            "temporal_factor": temporal_factor, "mass_correction": corrected,
            "masked": any(r.get("masked", corrected) for r in group),
            "kv_tokens": group[0]["kv_tokens"], "tokens": group[0].get("tokens"),
            "error_mean": statistics.mean(errors), "error_min": min(errors), "error_max": max(errors),
            "text_query_error_mean": statistics.mean(others) if others else None,
        })  # fmt: skip
    return summary


def markdown(meta: dict, fidelity: list[dict], timing: list[dict]) -> str:
    layouts = list(dict.fromkeys(r.get("layout", "text-first") for r in [*fidelity, *timing]))
    header = (
        f"Measured {meta['date']} on {meta.get('machine', '?')} · torch {meta['torch']} · {meta['device']} · "
        f"{meta.get('dtype', 'float32')} · command `{meta['command']}`"
        + (f" · {meta['runtime_s'] / 60:.0f} min in all" if "runtime_s" in meta else "")
        if "command" in meta
        else f"{meta['device']}, torch {meta['torch']}, fp32."
    )
    lines = [
        header,
        "",
        f"One DiT attention layer ({HEADS} heads × {HEAD_DIM}, 2-D RoPE, image tokens from "
        f"{meta.get('photos', len(PHOTOS))} photograph(s)) in each sequence layout:",
        "",
        *(f"- {LAYOUTS[name].describe()}" for name in layouts if name in LAYOUTS),
        "",
        "Relative output error against exact attention (all queries; mean over photos, min–max; the queries of "
        "the other tokens alone: text, registers, padding). Where every group is the same size and there is no "
        "other token, the correction is a constant and is left out (\u2018constant\u2019):",
        "",
        "| layout | grid | factor | K/V kept | plain subsampling | mass-corrected "
        "| text queries: plain \u2192 corrected |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(*_fidelity_key(r), r["mass_correction"]): r for r in fidelity}
    for key in dict.fromkeys(_fidelity_key(r) for r in fidelity):
        plain, fixed = by_key[(*key, False)], by_key[(*key, True)]
        others = (
            f"{plain['text_query_error_mean']:.1%} \u2192 {fixed['text_query_error_mean']:.1%}"
            if plain.get("text_query_error_mean") is not None
            else "—"
        )
        corrected = _range(fixed) if fixed.get("masked", True) else f"{_range(fixed)} (constant)"
        lines.append(
            f"| {key[0]} | {_grid(key[1], fixed)} | {_factor(key[2], key[3])} | {fixed['kv_tokens']}"
            f"{' of ' + str(fixed['tokens']) if fixed.get('tokens') else ''} | {_range(plain)} | {corrected} | "
            f"{others} |"
        )
    lines += [
        "",
        "Kernel time (torch SDPA on this device, median of interleaved runs; speed-up against exact attention; "
        "`zero_cost`: keys and values already reduced, a contiguous slice of the kept length without a mask):",
        "",
        "| layout | grid | factor | variant | seconds | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.get('layout', 'text-first')} | {_grid(r['grid'], r)} | {r['factor']} | {r['variant']} | "
        f"{r['seconds']:.3f} | {r['speedup']:.2f}× |"
        for r in timing
    ]
    return "\n".join(lines) + "\n"


def _grid(grid: str, row: dict) -> str:
    frames = row.get("frames", 1)
    return grid if frames == 1 else f"{grid}, {frames} frames"


def _factor(factor: float, temporal_factor: float) -> str:
    return f"{factor:g}" + (f", frames ÷{temporal_factor:g}" if temporal_factor != 1 else "")


def _range(row: dict) -> str:
    return f"{row['error_mean']:.1%} ({row['error_min']:.1%}–{row['error_max']:.1%})"


def count_steps(config: DiTAttentionConfig) -> tuple[int, int]:
    """Progress steps: fidelity, one per layout, grid and photo; timing, one per timed layout and grid."""
    fidelity = sum(len(config.grids(LAYOUTS[name])) * len(config.photos) for name in config.layouts)
    timing = sum(len(config.timed_grids(LAYOUTS[name])) for name in config.layouts)
    return fidelity, timing


if __name__ == "__main__":  # the former entry point: the one command's dit-attention level
    import sys

    from .__main__ import main

    sys.exit(main(["--levels", "dit-attention", *sys.argv[1:]]))
