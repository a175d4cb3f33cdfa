"""The attn1 patch callable: queries untouched, keys and values downsampled on their grid.

ComfyUI calls an attn1 patch as ``patch(q, k, v, extra_options)`` with the
layer-normed hidden states before the q/k/v projections and expects
``(q, k, v)`` back; K/V may come back with fewer tokens than Q. The patch holds
no state between calls: everything it decides comes from its frozen
configuration and the call's own arguments.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import ToDoConfig
from .downsample import downsample_tokens, output_tokens
from .grid import TokenGrid, resolve_grid

logger = logging.getLogger("comfyui_todo")

Tokens = torch.Tensor


_warned_kinds: dict[str, weakref.ref | None] = {}
"""Per kind of event: the render it was last reported in (a weak reference to its sigmas), or None."""


def warn_once(kind: str, message: str, render: torch.Tensor | None = None, level: int = logging.WARNING) -> None:
    """Log one warning per kind of event per render: attention runs thousands of times per image.

    ``render`` is the ``sample_sigmas`` tensor ComfyUI puts in the transformer
    options of one sampling run; a new run reports again. Without it (a model
    called outside a sampler) a kind is reported once per process. Only logging
    state: no patch decision ever depends on it.
    """
    if kind in _warned_kinds:
        last = _warned_kinds[kind]
        if render is None or (last is not None and last() is render):
            return
    _warned_kinds[kind] = None if render is None else weakref.ref(render)
    logger.log(level, message)


SIGMA_WINDOW_KEY = "todo_sigma_window"
"""``transformer_options`` entry: the :class:`SigmaWindow` of the current model call (absent = whole schedule)."""


@dataclass(frozen=True, slots=True)
class SigmaWindow:
    """The part of the schedule where ToDo acts, as sigmas (``low <= sigma <= high``).

    Percents are converted with the schedule the sampler really uses, at
    sampling time: a shift node (``ModelSamplingFlux``, ``ModelSamplingSD3``,
    ...) placed after ToDo changes it. The node's model-call wrapper converts
    them once per model call; the hot path only compares one float.
    """

    low: float
    high: float

    @classmethod
    def between(cls, sigma_start: float | None, sigma_end: float | None) -> SigmaWindow | None:
        """``None`` (the whole schedule) when either bound is unknown."""
        if sigma_start is None or sigma_end is None:
            return None
        return cls(float(sigma_end), float(sigma_start))

    @classmethod
    def from_percents(cls, model_sampling: Any, start_percent: float, end_percent: float) -> SigmaWindow | None:
        """The window of ``start_percent``..``end_percent`` on ``model_sampling``'s schedule (its ``percent_to_sigma``);
        ``None`` for the whole schedule."""
        if start_percent <= 0.0 and end_percent >= 1.0:
            return None
        return cls.between(model_sampling.percent_to_sigma(start_percent), model_sampling.percent_to_sigma(end_percent))

    def contains(self, options: Mapping[str, Any]) -> bool:
        sigmas = options.get("sigmas")
        if sigmas is None:
            return True
        return self.low <= float(sigmas.reshape(-1)[0]) <= self.high


def in_sigma_window(options: Mapping[str, Any]) -> bool:
    """Whether this call's sigma lies in the window recorded for the model call (everywhere when none is)."""
    window = options.get(SIGMA_WINDOW_KEY)
    return window is None or window.contains(options)


class ToDoAttn1Patch:
    """Downsample self-attention keys/values for the depths configured, inside the call's sigma window.

    The window comes with each call (:data:`SIGMA_WINDOW_KEY`); without one the
    hot path never reads the sigma tensor (which would force a device sync on GPUs).
    """

    def __init__(self, config: ToDoConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"ToDoAttn1Patch({self.config})"

    def grid_for(self, q: Tokens, k: Tokens, v: Tokens, extra_options: Mapping[str, Any]) -> TokenGrid | None:
        """The grid K/V live on, or ``None`` when this call is not spatial self-attention we can reduce."""
        if k.ndim != 3 or k.shape != v.shape or q.ndim != 3:
            return None
        batch, n_tokens, channels = k.shape
        # Cross-attention (disable_self_attn blocks) brings text context with
        # another width; a previous patch may re-batch q (tiling) or merge it,
        # but always from the same B x N tokens K/V came from.
        if q.shape[-1] != channels or q.shape[0] % batch != 0:
            return None
        grid = resolve_grid(n_tokens, extra_options.get("activations_shape"), extra_options.get("original_shape"))
        if grid is None:
            warn_once(
                "no-grid",
                f"ToDo: attention tokens that do not form the latent grid are left unchanged (first seen: "
                f"{n_tokens} tokens in block {extra_options.get('block')}, activations "
                f"{extra_options.get('activations_shape')}, latent {extra_options.get('original_shape')}). "
                "Expected for temporal attention in video models; reported once per render.",
                extra_options.get("sample_sigmas"),
            )
        return grid

    def __call__(
        self, q: Tokens, k: Tokens, v: Tokens, extra_options: Mapping[str, Any]
    ) -> tuple[Tokens, Tokens, Tokens]:
        if not in_sigma_window(extra_options):
            return q, k, v
        if _attn1_replaced(extra_options):
            return q, k, v
        grid = self.grid_for(q, k, v, extra_options)
        if grid is None:
            return q, k, v
        factor = self.config.factor_for(grid)
        if factor <= 1.0:
            return q, k, v

        # A previous patch that tiled q into T batches (HyperTile) makes the
        # attention backend view K/V as T contiguous chunks: keep that possible.
        tiles = q.shape[0] // k.shape[0]
        if tiles > 1 and output_tokens(grid.height, grid.width, factor, factor) % tiles != 0:
            warn_once(
                "tiled",
                f"ToDo: another patch tiles the queries into {tiles} parts and the reduced keys would not split "
                "evenly among them; those layers are left unchanged (reported once per render).",
                extra_options.get("sample_sigmas"),
            )
            return q, k, v

        method = self.config.method
        k_small = downsample_tokens(k, grid.height, grid.width, factor, factor, method)
        v_small = k_small if v is k else downsample_tokens(v, grid.height, grid.width, factor, factor, method)
        return q, k_small, v_small


def run_todo_last(transformer_options: dict[str, Any]) -> dict[str, Any]:
    """``transformer_options`` with every ToDo patch moved to the end of the attn1 patch chain.

    Patches registered after ToDo may re-batch the queries (HyperTile tiles
    them); the attention backend then splits K/V into as many chunks, which
    fails when the reduced token count does not divide. Running last, ToDo
    sees the final query layout and can keep K/V splittable or step aside.
    ToDo patches are found by type: ComfyUI deep-copies patches on every model
    clone. The input dict is not modified: a shallow copy is returned when the
    order changes, the same dict otherwise.
    """
    patches = transformer_options.get("patches") or {}
    chain = patches.get("attn1_patch") or []
    ours = [p for p in chain if isinstance(p, ToDoAttn1Patch)]
    if not ours or chain[-len(ours) :] == ours:
        return transformer_options
    reordered = [p for p in chain if not isinstance(p, ToDoAttn1Patch)] + ours
    return {**transformer_options, "patches": {**patches, "attn1_patch": reordered}}


ATTN1_REPLACED_KEY = "todo_attn1_replaced"
"""``transformer_options`` entry: the blocks whose attn1 another patch replaces (see :func:`prepare_unet_options`)."""


def _attn1_replaced(extra_options: Mapping[str, Any]) -> bool:
    """True in a block whose attention another patch computes itself (PAG, SAG): it may need every key."""
    replaced = extra_options.get(ATTN1_REPLACED_KEY)
    block = extra_options.get("block")
    if not replaced or block is None:
        return False
    return (block[0], block[1], extra_options.get("block_index", 0)) in replaced or tuple(block) in replaced


def prepare_unet_options(transformer_options: dict[str, Any]) -> dict[str, Any]:
    """``transformer_options`` as ToDo needs them for one UNet call: ToDo last, replaced attn1 blocks named.

    ComfyUI hands attn1 patches their options without ``patches_replace``; a
    block whose attn1 is replaced (Perturbed-Attention Guidance returns the
    values as the output, Self-Attention Guidance records the attention map on
    the grid) must keep every key, so the replaced blocks are recorded here.
    """
    options = run_todo_last(transformer_options)
    replaced = (options.get("patches_replace") or {}).get("attn1") or {}
    if replaced:
        options = {**options, ATTN1_REPLACED_KEY: frozenset(replaced)}
    return options
