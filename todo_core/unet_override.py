"""UNet self-attention through ComfyUI's attention override, where ToDo must see the projected keys.

An attn1 patch receives the hidden states before the query/key/value
projections, which is all auto and manual modes need (selecting tokens commutes
with a per-token linear map). Measuring the attention error needs the
projected queries and keys, so in fidelity mode, or when the error report is
asked for, the node registers this override beside the attn1 patch. The first
call of each layer, grid, band and branch in a render reaches it with every
key (the patch leaves undecided layers alone): it measures, decides, and
reduces the projected keys and values exactly as the patch would. Every later
call of that layer is reduced by the patch, before the projections, and passes
through here untouched. Cross-attention modules are flagged by the
node (:class:`~.dit.CrossAttentionFlag`): by shape alone a text context as long
as the image cannot be told from self-attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .calibrate import (
    SAMPLED_ROWS,
    SampledQueries,
    Selection,
    calibrated_factor,
    call_calibration,
    sample_rows,
    stable_seed,
    unet_key,
)
from .config import CONFIGURABLE_DEPTHS, FactorMode
from .dit import APPLIED_KEY, CROSS_ATTENTION_KEY, select_keys
from .downsample import DownsampleMethod, output_tokens
from .families import SequenceLayout
from .grid import TokenGrid
from .patch import ToDoAttn1Patch

AttentionOverride = Callable[..., torch.Tensor]


def unet_selection(method: DownsampleMethod, grid: TokenGrid, device: torch.device) -> Selection | None:
    """Nearest sampling keeps a subset of the grid's tokens: their positions, for the one-pass measurement."""
    if method is not DownsampleMethod.NEAREST:
        return None  # pooling and interpolation make new tokens: measured on the reduced keys themselves
    layout = SequenceLayout(0, 1, grid.height, grid.width, 0)

    def selection(factor: float) -> tuple[torch.Tensor, None]:
        return select_keys(layout, factor, device).indices, None

    return selection


class ToDoUNetAttention:
    """ComfyUI's ``optimized_attention_override`` for UNets: attn1's projected keys reduced, and measured.

    Holds no state between calls; decisions live in the render's calibration,
    which the node's model-call wrapper hands to each call. An override already
    registered on the model is kept and called with the reduced keys.
    """

    passes_attention_masks = True
    """It hands the caller's mask on as it is (see ``routes.PASSES_MASKS_ATTRIBUTE``)."""

    def __init__(self, patch: ToDoAttn1Patch, inner: AttentionOverride | None = None) -> None:
        self.patch = patch
        self.config = patch.config
        self.inner = inner
        self.settings = patch.settings

    def __repr__(self) -> str:
        return f"ToDoUNetAttention({self.config})"

    def with_inner(self, inner: AttentionOverride | None) -> ToDoUNetAttention:
        return ToDoUNetAttention(self.patch, inner)

    def _call(self, attention: AttentionOverride, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.inner is not None:
            kwargs["transformer_options"] = {**(kwargs.get("transformer_options") or {}), APPLIED_KEY: True}
            return self.inner(attention, *args, **kwargs)
        return attention(*args, **kwargs)

    def __call__(self, attention: AttentionOverride, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        if options.get(APPLIED_KEY) or options.get(CROSS_ATTENTION_KEY) or len(args) < 4:
            return self._call(attention, *args, **kwargs)
        if kwargs.get("skip_reshape") or kwargs.get("mask") is not None or len(args) > 4:
            return self._call(attention, *args, **kwargs)  # not a UNet attn1 call: those pass no mask
        q, k, v, heads = args[:4]
        if k.shape[0] * k.shape[1] < q.shape[0] * q.shape[1]:
            return self._call(attention, *args, **kwargs)  # the attn1 patch reduced it already (a decided layer)
        plan = self.patch.plan(q, k, v, options)
        if plan is None:
            return self._call(attention, *args, **kwargs)
        grid, factor = plan
        call = call_calibration(options)
        if call is not None and grid.depth <= CONFIGURABLE_DEPTHS:
            factor = self._calibrated(call, q, k, v, heads, grid, factor, options)
        q, k, v = self.patch.reduce(q, k, v, grid, factor, options)
        return self._call(attention, q, k, v, heads, **kwargs)

    def _calibrated(self, call, q, k, v, heads, grid: TokenGrid, factor: float, options) -> float:
        key = unet_key(call, options, grid.height, grid.width, grid.depth)
        decided = call.calibration.peek(key)
        if decided is not None:
            return decided  # a layer decided on factor 1: the attn1 patch looked it up and counted this call
        rows = functools.partial(sample_rows, q.shape[1], SAMPLED_ROWS, stable_seed(key.layer, grid.height, grid.width))

        def reduce(candidate: float) -> tuple[torch.Tensor, torch.Tensor, None]:
            _, k_small, v_small = self.patch.reduce(q, k, v, grid, candidate, options)
            return k_small, v_small, None

        return calibrated_factor(
            call,
            key,
            self.config.mode is FactorMode.FIDELITY,
            self.config.max_error,
            factor,
            lambda: SampledQueries.of(q, heads, False, rows()),
            k,
            v,
            None,
            reduce,
            lambda candidate: output_tokens(grid.height, grid.width, candidate, candidate),
            grid.tokens,
            unet_selection(self.config.method, grid, k.device),
        )
