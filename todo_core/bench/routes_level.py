"""The routes of the mass correction (``todo_core/routes.py``) side by side: CPU time and error against the oracle.

One DiT joint-attention layer (77 text tokens first, 2-D RoPE, image tokens from a
photograph; :mod:`dit_attention`), heads of 128 channels (Flux, Wan, Qwen-Image)
and, the same channels split in two, of 64 (SD3, LTX). Each route computes the
same mass-corrected attention over ToDo's kept keys, every one including ToDo's
gather of the kept keys:

- ``mask``: the correction as an additive mask (ComfyUI's mask-honouring backends);
- ``fold``: one more head channel carries it, the backend runs without a mask
  (mask-less backends and other packs' overrides: SageAttention, flash);
- ``lse-merge``: one call per group size through PyTorch's CPU flash kernel,
  merged by log-sum-exp;
- beside them ``uncorrected`` (ToDo's keys, no correction: what a route costs
  on top), ``zero_cost`` (keys already reduced, a contiguous slice, no mask:
  the ceiling) and ``exact`` (every key).

Kernel: PyTorch SDPA on the CPU, float32, median of interleaved runs. The error
is the relative L2 error of each route's output against the group-replaced
oracle computed in float64, which every route equals in exact arithmetic.

Part of ``python -m todo_core.bench --levels routes`` (writes ``routes/`` in the results folder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dit import SequenceLayout, key_groups, reduce_keys, sdpa_attention, select_keys
from ..routes import attend_folded, attend_lse_merged
from .dit_attention import LAYOUTS, _interleaved, layout_inputs
from .tokens import PHOTOS

ROUTES = ("mask", "fold", "lse-merge")


@dataclass(frozen=True)
class RoutesConfig:
    grids: tuple[tuple[int, int], ...] = ((95, 97),)
    """An uneven grid: border groups of other sizes beside the interior's, as most sizes have."""
    factors: tuple[float, ...] = (2, 4)
    head_dims: tuple[int, ...] = (128, 64)
    photo: str = PHOTOS[0]
    repeats: int = 3


def split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, H, L, d]`` -> ``[B, H * d / head_dim, L, head_dim]``: the same channels in narrower heads."""
    batch, heads, length, width = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * width // head_dim, head_dim).transpose(1, 2).contiguous()


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout, factor: float) -> torch.Tensor:
    """The group-replaced attention in float64: kept keys with the mask, which is exact in float64."""
    k_small, v_small, mask = reduce_keys(k.double(), v.double(), None, layout, factor, 2)
    return F.scaled_dot_product_attention(q.double(), k_small, v_small, attn_mask=mask)


def route_calls(q, k, v, layout: SequenceLayout, factor: float) -> dict[str, Callable[[], torch.Tensor]]:
    """Every variant as a call that includes ToDo's own work (gather, mask or fold, merge)."""
    heads = q.shape[1]
    selection = select_keys(layout, factor, k.device, k.dtype)
    groups = key_groups(layout, factor, k.device)
    kept = selection.indices.numel()
    k_free, v_free = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
    options = {"skip_reshape": True, "skip_output_reshape": True}

    def plain(corrected: bool):
        k_small, v_small, mask = reduce_keys(k, v, None, layout, factor, 2, corrected)
        return F.scaled_dot_product_attention(q, k_small, v_small, attn_mask=mask)

    def folded():
        k_small, v_small, _ = reduce_keys(k, v, None, layout, factor, 2, False)
        return attend_folded(
            sdpa_attention, q, k_small, v_small, heads, selection.log_group_size, groups.bias_max, (None,), options
        )

    def merged():
        k_small, v_small, _ = reduce_keys(k, v, None, layout, factor, 2, False)
        return attend_lse_merged(q, k_small, v_small, heads, groups.sets, True, True)

    return {
        "uncorrected": lambda: plain(False),
        "mask": lambda: plain(True),
        "fold": folded,
        "lse-merge": merged,
        "zero_cost": lambda: F.scaled_dot_product_attention(q, k_free, v_free),
    }


def rows(config: RoutesConfig) -> Iterator[dict]:
    case = LAYOUTS["text-first"]
    for height, width in config.grids:
        q128, k128, v128, layout = layout_inputs(case, config.photo, height, width)
        for head_dim in config.head_dims:
            q, k, v = (split_heads(t, head_dim) for t in (q128, k128, v128))
            exact_seconds = None
            for factor in config.factors:
                calls = route_calls(q, k, v, layout, factor)
                if exact_seconds is None:
                    calls = {"exact": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), **calls}
                expected = oracle(q, k, v, layout, factor)
                errors = {name: float((calls[name]().double() - expected).norm() / expected.norm()) for name in ROUTES}
                seconds = _interleaved(calls, config.repeats)
                exact_seconds = seconds.get("exact", exact_seconds)
                for variant, value in seconds.items():
                    yield {
                        "grid": f"{height}x{width}", "head_dim": head_dim, "heads": q.shape[1],
                        "factor": 1 if variant == "exact" else factor, "variant": variant, "seconds": value,
                        "speedup": exact_seconds / value, "kv_tokens": k.shape[2] if variant == "exact" else
                        select_keys(layout, factor, k.device, k.dtype).indices.numel(),
                        "error_vs_float64_oracle": errors.get(variant),
                        "group_sizes": len(key_groups(layout, factor, k.device).sets),
                    }  # fmt: skip


def count_steps(config: RoutesConfig) -> int:
    return len(config.grids) * len(config.head_dims)


def markdown(meta: dict, results: list[dict]) -> str:
    load = meta.get("load_average_start")
    load_note = f" · load average {load} -> {meta.get('load_average_end')}" if load is not None else ""
    lines = [
        f"Measured {meta['date']} on {meta.get('machine', '?')} · torch {meta['torch']} · {meta['device']} · "
        f"float32 · command `{meta['command']}`{load_note}",
        "",
        "One joint-attention layer (77 text tokens first, then the grid; 2-D RoPE; image tokens from a photograph), "
        "the mass-corrected attention over ToDo's kept keys by each route (ToDo's gather included), against "
        "`uncorrected` (the same keys, no correction), `zero_cost` (keys already reduced, no gather, no mask) and "
        "`exact` (every key). PyTorch SDPA on the CPU, median of interleaved runs; error: relative L2 against the "
        "group-replaced oracle in float64 (every route equals it in exact arithmetic).",
        "",
        "| grid | heads × width | factor | group sizes | variant | seconds | vs uncorrected | speed-up | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["grid"], r["head_dim"], r["factor"]): r["seconds"] for r in results if r["variant"] == "uncorrected"}
    for r in results:
        key = (r["grid"], r["head_dim"], r["factor"])
        overhead = f"{r['seconds'] / base[key] - 1:+.0%}" if key in base and r["variant"] != "exact" else "—"
        error = f"{r['error_vs_float64_oracle']:.1e}" if r.get("error_vs_float64_oracle") is not None else "—"
        sizes = r["group_sizes"] if r["variant"] in ROUTES else "—"
        lines.append(
            f"| {r['grid']} | {r['heads']} × {r['head_dim']} | {r['factor']:g} | {sizes} | {r['variant']} | "
            f"{r['seconds']:.3f} | {overhead} | {r['speedup']:.2f}× | {error} |"
        )
    return "\n".join(lines) + "\n"
