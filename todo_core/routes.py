"""How a mass-corrected attention call reaches the softmax: the routes, each exact, and the choice among them.

The mass correction adds ``log(group size)`` to the logit of every kept image
key (ToMe's proportional attention). An additive attention mask carries it to
every backend that honours masks (ComfyUI's PyTorch, sub-quadratic, split,
basic and xformers backends): the ``mask`` route. SageAttention drops a mask
without a word and flash-attn refuses one, and another pack's attention
override may do either; for them ToDo has two exact routes that need no mask:

- ``fold``: one more channel per head carries the bias. The queries get a
  constant ``c`` there and each key ``b * sqrt(D) / c``; the key channels are
  scaled by ``sqrt(D / d)``, so the backend's own ``1 / sqrt(D)`` scaling of the
  wider heads gives back ``q.k / sqrt(d) + b`` exactly. The user's backend keeps
  running, on heads padded from ``d`` to ``D`` (a multiple of 8); it is chosen
  where that width stays within what the backend accepts.
- ``lse-merge``: one call per set of kept keys that share a group size, each
  returning its log-sum-exp, merged with weights ``exp(lse + log size)`` (the
  algebra flash attention merges blocks with). It needs a kernel that returns
  the log-sum-exp, which ComfyUI's backends do not; PyTorch's CPU flash kernel
  does, so it is measured beside the others in the benchmark and kept for
  CPU calls that the other routes cannot take.

Where neither applies (SageAttention at head width 128: it refuses heads wider
than 128), the call runs on PyTorch SDPA with the mask, as before: ``sdpa``.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

FOLD_ALIGNMENT = 8
"""Head widths the fold pads to: flash kernels want multiples of 8."""

MASKLESS_BACKENDS = frozenset({"attention_sage", "attention_flash"})
"""ComfyUI backends that ignore a mask (SageAttention 2) or refuse one and fall back with a log line (flash)."""

HEAD_DIM_LIMITS = {"attention_sage": 128, "attention_flash": 256}
"""Widest head each mask-less backend runs: SageAttention pads heads to 64 or 128 and refuses wider ones."""

PASSES_MASKS_ATTRIBUTE = "passes_attention_masks"
"""An attention override that hands every mask to ComfyUI's backend unchanged says so with this attribute set to
True; ToDo then gives it the correction as a mask. Any other override may drop masks (SageAttention patch nodes do)."""

FOREIGN_HEAD_DIM_LIMIT = 128
"""Another pack's override is assumed to run SageAttention (the common case): its head-width limit applies."""


class Route(enum.Enum):
    MASK = "mask"
    FOLD = "fold"
    LSE_MERGE = "lse-merge"
    SDPA = "sdpa"


def folded_head_dim(dim_head: int, alignment: int = FOLD_ALIGNMENT) -> int:
    """The head width of a folded call: one channel more, rounded up to ``alignment``."""
    return -(-(dim_head + 1) // alignment) * alignment


def choose_route(
    backend_name: str, foreign_override: bool, dim_head: int, device_type: str, caller_mask: bool
) -> Route:
    """The exact route for a mass-corrected call that keeps the user's backend wherever one exists.

    ``foreign_override``: another pack's attention override will run the call,
    and it may drop masks. ``caller_mask``: the model passes its own mask too,
    which only the mask and SDPA routes carry for every backend.
    """
    if not foreign_override and backend_name not in MASKLESS_BACKENDS:
        return Route.MASK
    limit = FOREIGN_HEAD_DIM_LIMIT if foreign_override else HEAD_DIM_LIMITS[backend_name]
    if folded_head_dim(dim_head) <= limit:
        return Route.FOLD
    if device_type == "cpu" and not caller_mask:
        return Route.LSE_MERGE
    return Route.SDPA


@functools.lru_cache(maxsize=256)
def _fold_constants(bias_max: float, dim_head: int) -> tuple[int, float, float, float]:
    """(D, key scale, query channel value, key channel factor) for heads of width ``dim_head``.

    The query channel ``c`` and the largest key channel value are made equal
    (``c**2 = b_max * sqrt(D)``), so that neither dominates a quantizing
    backend's per-block scale.
    """
    width = folded_head_dim(dim_head)
    query_value = math.sqrt(max(bias_max, 1e-3) * math.sqrt(width))
    return width, math.sqrt(width / dim_head), query_value, math.sqrt(width) / query_value


def _heads_last(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """``[B, L, H, d]`` (or ``[B, H, L, d]`` when the caller already split the heads)."""
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1)


def fold_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    bias_max: float,
    heads: int,
    skip_reshape: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q, k, v with one more channel per head that adds ``key_bias`` to every logit; and the original head width.

    ``bias_max`` is the largest bias, known on the host (reading it from the
    tensor would stall a GPU). Shapes stay in the caller's convention (``[B, L, H*D]``, or ``[B, H, L, D]``
    with ``skip_reshape``), so any ComfyUI backend takes them as they come.
    """
    q4, k4, v4 = (_heads_last(t, heads, skip_reshape) for t in (q, k, v))
    dim_head = q4.shape[-1]
    width, key_scale, query_value, key_factor = _fold_constants(bias_max, dim_head)
    pad = (0, width - dim_head)
    q_folded = torch.nn.functional.pad(q4, pad)
    q_folded[..., dim_head] = query_value
    k_folded = torch.nn.functional.pad(k4 * key_scale, pad)
    channel = (key_bias * key_factor).to(k_folded.dtype)
    k_folded[..., dim_head] = channel if skip_reshape else channel[:, None]
    v_folded = torch.nn.functional.pad(v4, pad)
    if not skip_reshape:
        q_folded, k_folded, v_folded = (t.reshape(t.shape[0], t.shape[1], -1) for t in (q_folded, k_folded, v_folded))
    return q_folded, k_folded, v_folded, dim_head


def unfold_output(
    out: torch.Tensor, heads: int, dim_head: int, skip_reshape: bool, skip_output_reshape: bool
) -> torch.Tensor:
    """The backend's output of a folded call, back to the original head width and the caller's layout."""
    if skip_output_reshape:  # [B, H, L, D]
        return out[..., :dim_head]
    batch, length = out.shape[0], out.shape[1]
    return out.reshape(batch, length, heads, -1)[..., :dim_head].reshape(batch, length, heads * dim_head)


def attend_folded(
    attention: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    key_bias: torch.Tensor,
    bias_max: float,
    args: tuple,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """``attention(q, k, v, heads, *args, **kwargs)`` with ``key_bias`` added to the logits through a folded channel."""
    skip_reshape = bool(kwargs.get("skip_reshape", False))
    q_f, k_f, v_f, dim_head = fold_bias(q, k, v, key_bias, bias_max, heads, skip_reshape)
    out = attention(q_f, k_f, v_f, heads, *args, **kwargs)
    return unfold_output(out, heads, dim_head, skip_reshape, bool(kwargs.get("skip_output_reshape", False)))


def lse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``[B, H, L, d]`` and its per-query log-sum-exp, from PyTorch's CPU flash kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, lse


def attend_lse_merged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    key_sets: tuple[tuple[torch.Tensor, float], ...],
    skip_reshape: bool,
    skip_output_reshape: bool,
    lse_attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] = lse_attention_cpu,
) -> torch.Tensor:
    """Attention over the kept keys with each set's ``log(group size)`` added, as one merged softmax.

    ``key_sets``: (positions in the kept keys, log group size) per set of keys
    that share a group size. Each set is attended to on its own; the outputs
    are merged with weights ``exp(lse_i + log size_i)``, normalised, in float32
    (float64 for float64 inputs).
    """
    q4, k4, v4 = (_heads_last(t, heads, skip_reshape) for t in (q, k, v))
    if not skip_reshape:  # [B, L, H, d] -> [B, H, L, d]
        q4, k4, v4 = (t.transpose(1, 2) for t in (q4, k4, v4))
    merge_dtype = torch.float64 if q4.dtype == torch.float64 else torch.float32
    outputs, weights = [], []
    for positions, log_size in key_sets:
        out, lse = lse_attention(q4, k4.index_select(2, positions), v4.index_select(2, positions))
        outputs.append(out.to(merge_dtype))
        weights.append(lse.to(merge_dtype) + log_size)
    stacked = torch.stack(weights)
    shares = torch.softmax(stacked, dim=0).unsqueeze(-1)
    merged = sum(share * out for share, out in zip(shares, outputs, strict=True)).to(q4.dtype)
    if skip_output_reshape:
        return merged
    return merged.transpose(1, 2).reshape(merged.shape[0], merged.shape[2], -1)
