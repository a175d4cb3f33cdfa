"""The attn1 patch callable: queries untouched, keys and values downsampled on their grid.

ComfyUI calls an attn1 patch as ``patch(q, k, v, extra_options)`` with the
layer-normed hidden states before the q/k/v projections and expects
``(q, k, v)`` back; K/V may come back with fewer tokens than Q. The patch holds
no state between calls: everything it decides comes from its frozen
configuration and the call's own arguments (while torch.compile traces, from
the record its model call published: see :class:`ModelCall`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .calibrate import call_calibration, unet_key
from .config import CONFIGURABLE_DEPTHS, ToDoConfig
from .downsample import downsample_tokens, output_tokens
from .grid import TokenGrid, resolve_grid
from .memo import is_compiling

if TYPE_CHECKING:
    from .families import LatentInfo

logger = logging.getLogger("comfyui_todo")

Tokens = torch.Tensor


_warned_kinds: dict[str, weakref.ref | None] = {}
"""Per kind of event: the render it was last reported in (a weak reference to its sigmas), or None."""


def warn_once(kind: str, message: str, render: torch.Tensor | None = None, level: int = logging.WARNING) -> None:
    """Log one warning per kind of event per render: attention runs thousands of times per image.

    ``render`` is the ``sample_sigmas`` tensor ComfyUI puts in the transformer
    options of one sampling run; a new run reports again. Without it (a model
    called outside a sampler) a kind is reported once per process. Only logging
    state: no patch decision ever depends on it. Nothing is logged from a graph
    torch.compile traces: a logging call there is a graph break that every later
    call of the compiled model would pay, for a call ToDo leaves unchanged anyway.
    """
    if is_compiling():
        return
    if kind in _warned_kinds:
        last = _warned_kinds[kind]
        if render is None or (last is not None and last() is render):
            return
    _warned_kinds[kind] = None if render is None else weakref.ref(render)
    logger.log(level, message)


IN_WINDOW_KEY = "todo_in_sigma_window"
"""``transformer_options`` entry: whether the current model call's sigma lies in ToDo's window (absent = it does).

Decided once per model call by the node's model-call wrapper (:meth:`SigmaWindow.contains`), so that the
attention calls never read the sigma tensor (a device-to-host copy on GPUs, a graph break under torch.compile).
"""


@dataclass(frozen=True, slots=True)
class SigmaWindow:
    """The part of the schedule where ToDo acts, as sigmas (``low <= sigma <= high``).

    Percents are converted with the schedule the sampler really uses, at
    sampling time: a shift node (``ModelSamplingFlux``, ``ModelSamplingSD3``,
    ...) placed after ToDo changes it. The node's model-call wrapper converts
    them once per render and compares the call's sigma once per model call.
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

    def contains(self, sigma: float) -> bool:
        return self.low <= sigma <= self.high


@dataclass(frozen=True, slots=True)
class ModelCall:
    """What the node's model-call wrapper decided for one model call, as code traced by torch.compile reads it.

    ComfyUI's ``TorchCompileModel`` drops every guard on ``transformer_options``
    (it changes on every step), so whatever an attention patch reads from there
    is baked into the compiled graph when it is traced. The wrapper therefore
    also publishes this record in a module attribute for the duration of the
    model call (:func:`published`); traced code reads it there and dynamo
    guards the values it reads: the graph is traced again, once, when the
    window closes, when the DiT latent grid changes, or when ToDo's settings
    change. Eager code reads the same facts from ``transformer_options``.
    """

    in_window: bool
    latent: LatentInfo | None = None
    """The DiT latent grid, text prefix and references of the call; ``None`` for UNets."""
    settings: int | None = None
    """``settings`` of the ToDo patch the call was prepared for: a graph traced for other settings is not reused."""


_published: ModelCall | None = None
"""The record of the model call in progress (see :class:`ModelCall`); ``None`` outside one."""


@contextlib.contextmanager
def published(call: ModelCall) -> Iterator[None]:
    """Publish ``call`` for the duration of one model call, restoring the previous record after it (nested calls)."""
    global _published
    previous, _published = _published, call
    try:
        yield
    finally:
        _published = previous


def traced_call() -> ModelCall | None:
    """While torch.compile traces: the published record of the model call (dynamo guards what is read from it)."""
    return _published if is_compiling() else None


def in_sigma_window(options: Mapping[str, Any], settings: int | None = None) -> bool:
    """Whether ToDo acts in this call's step: no host sync, one dictionary lookup when eager.

    Traced by torch.compile, the decision comes from the published record.
    Its ``settings`` are compared with the caller's, so that dynamo guards them
    too (a graph traced for one factor is never reused for another); a record
    prepared for other settings (another ToDo's) leaves the call unchanged.
    """
    call = traced_call()
    if call is not None:
        return call.in_window and (settings is None or call.settings is None or call.settings == settings)
    return options.get(IN_WINDOW_KEY, True)


class ToDoAttn1Patch:
    """Downsample self-attention keys/values for the depths configured, inside the call's sigma window.

    Whether the call's step lies in the window comes with each call
    (:data:`IN_WINDOW_KEY`): the hot path never reads the sigma tensor (which
    would force a device sync on GPUs).
    """

    def __init__(self, config: ToDoConfig) -> None:
        self.config = config
        self.settings = hash(config)
        """What a compiled graph traced with this patch depends on (see :class:`ModelCall`)."""

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

    def plan(self, q: Tokens, k: Tokens, v: Tokens, extra_options: Mapping[str, Any]) -> tuple[TokenGrid, float] | None:
        """The grid and configured factor of this call, or ``None`` to leave it exactly as it is."""
        if not in_sigma_window(extra_options, self.settings):
            return None
        if _attn1_replaced(extra_options):
            return None
        grid = self.grid_for(q, k, v, extra_options)
        if grid is None:
            return None
        return grid, self.config.factor_for(grid)

    def reduce(
        self, q: Tokens, k: Tokens, v: Tokens, grid: TokenGrid, factor: float, extra_options: Mapping[str, Any]
    ) -> tuple[Tokens, Tokens, Tokens]:
        """``(q, k, v)`` with K/V downsampled by ``factor`` on ``grid``; unchanged where queries are tiled unevenly."""
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

    def __call__(
        self, q: Tokens, k: Tokens, v: Tokens, extra_options: Mapping[str, Any]
    ) -> tuple[Tokens, Tokens, Tokens]:
        plan = self.plan(q, k, v, extra_options)
        if plan is None:
            return q, k, v
        grid, factor = plan
        if self.config.measures and grid.depth <= CONFIGURABLE_DEPTHS:
            call = call_calibration(extra_options)
            if call is not None:
                decided = call.calibration.lookup(unet_key(call, extra_options, grid.height, grid.width, grid.depth))
                if decided is None:
                    return q, k, v  # ToDo's attention override measures this layer on its projected keys first
                factor = decided
        return self.reduce(q, k, v, grid, factor, extra_options)


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
